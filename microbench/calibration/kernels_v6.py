"""v6 held-out calibration points: the selection rule, committed before any of these kernels was re-written or
modeled (the published latencies were known, no modeled figure was). The kernels follow in a later commit, from
the published code (read for data flow, never copied); the choices the published code leaves to the compiler are
written here before anything is modeled.

Search record (00:19-00:22 UTC, 2026-12-07; `search` corpora docs / pages / code / issues, `find_repos`,
`find_files`, `find_string`, and the mirrors aws-neuron/aws-neuron-sdk, aws-neuron/nki-samples@6905a68,
aws-neuron/nki-library@d2ad3a5, zhang677/AccelOpt@47e29a7, ucb-bar/autocomp@dd26a56):
  * AccelOpt: the full_complete_local results are used (S3, A11.opt); the flb_* experiments are Triton kernels on
    NVIDIA GPUs (FlashInfer-Bench), not NKI; the paper (arXiv 2511.15915) gives trn2 results only as a mean
    percentage of peak, no per-kernel latency.                                                   -> nothing new
  * Autocomp: the trn traces and the LayerNorm sample run are used (U3-U5, LN, LN5); harnesses/ and sols/ hold
    code but no latency; the blog posts (charleshong3.github.io) on conv1d and attention restate the used traces.
                                                                                                  -> nothing new
  * nki-samples: only CI pass/fail ceilings (upper bounds, not measurements); nki-library: no published latency.
  * aws-neuron-sdk docs, every commit (git log -G over *.rst): the matmul and Mamba tutorials (reserved), the DMA
    figures already used (DMA1, the fixed costs), and the LayerNorm tutorial's nki.benchmark output (see below).
  * trnsci.dev benchmark pages (trnblas / trntensor / trnrand): per-call host-dispatch timings through a framework,
    not device times of a kernel.                                                                 -> not usable
  * GitHub issues: aws-neuron/nki-samples#45 quotes the reserved matmul tutorial; nothing else with code + time.
  * Stanford CS149 Fall 2025 assignment 4 (stanford-cs149/asst4-trainium2), run on trn2.3xlarge: public student
    repositories named *asst4-trainium2* (find_repos "trainium2": 13 student repositories). Three publish
    measurements: xaviergonzalez (writeup.md), chenhzhu (part1/profile_1k.txt, profile_2k.txt,
    transpose_1024_perf.txt) and rishic3 (part1/profile_view_stream_256k_fd1k.txt, _fd2k.txt, _transpose_1024.txt);
    chengli2003, EtashGuha, a-argy, nriedman, Ni2002ka, msthaniana, juntongshi48, tianyeeT, rajajisai and
    Kelvinthedrugger publish code or binary .ntff traces only. The 2024 edition (asst4-trainium, trn1) is out as a
    whole: its kernels use nl.load / nl.add / nl.store without `skip_middle_end_transformations`, so the device
    program is the compiler's rewrite, not the published code (rule (a) below).

The rule. A point is a published latency of an NKI kernel, not yet a point, not reserved (AWS matmul and Mamba
tutorial kernels and their derivatives, nki-autotune's GEMMs), with the hardware stated and the exact code the
device ran published, subject to (a) and (b) of points.py (the program runs as written; one point per distinct
instruction stream; a stream equal to an existing point's is not a new point). Two sources qualify:

1. CS149 F25 asst4-trainium2, trn2 (trn2.3xlarge; instance_type in the profiles; one NeuronCore, no SPMD: modeled
   as one physical core, LNC=1, as calibration.md prescribes for single-core trn2 numbers). Every kernel carries
   `@nki.compiler.skip_middle_end_transformations`, so the published code is the program. fp32 inputs
   (np.random.rand). Timing: `bench` = run_benchmark.py's nki.benchmark(warmup=1, iters=10) P99 nc_latency
   (NCL); `prof` = neuron-profile total_time of the `--profile_name` run (compiled with --disable-dge).
   Kernels: the starter code's vector_add_tiled / vector_add_stream (the assignment README gives the code; the
   students change only ROW_CHUNK / FREE_DIM, as the steps say) and a student's matrix_transpose when its code is
   in the same repository at the commit of the measurement file. Where several students report the same
   (kernel, constant, size, timing), the point's figure is the median of their reports (mean of the two middle
   values for an even count), every report listed. The points:
     CS.tiled1    vector_add_tiled ROW_CHUNK=1,    n=25600,  bench  37318 µs   (xaviergonzalez, NCL(99) table)
     CS.tiled128  vector_add_tiled ROW_CHUNK=128,  n=25600,  bench    378 µs   (xaviergonzalez, NCL(99) table)
     CS.stream2   vector_add_stream FREE_DIM=2,    n=25600,  bench    186 µs   (xaviergonzalez, NCL(99) table)
     CS.stream200 vector_add_stream FREE_DIM=200,  n=25600,  bench     15 µs   (xaviergonzalez, "ran in 15 μs")
     CS.fd2k      vector_add_stream FREE_DIM=2000, n=256000, prof  28.358 µs   (median of xaviergonzalez 2.8e-5 s,
                  chenhzhu 2.8904955e-5 s, rishic3 2.8358289e-5 s)
     CS.fd1k      vector_add_stream FREE_DIM=1000, n=256000, prof  26.417 µs   (median of xaviergonzalez 2.6e-5 s,
                  chenhzhu 2.6416626e-5 s, rishic3 2.785829e-5 s)
     CS.T1024     matrix_transpose 1024 x 1024, per 128 x 128 tile: dma_copy in, nisa.nc_transpose, copy PSUM ->
                  SBUF, dma_copy out; prof 46.662 µs (mean of chenhzhu 4.6470761e-5 s, matrix_transpose with
                  nl.copy at e30a10f, and rishic3 4.685326e-5 s, matrix_transpose with nisa.tensor_copy at
                  ef7e4ef: one stream, both profiles count 64 matmul, +65 ScalarE, 129 DMA transfers)
   Not points: xaviergonzalez's transpose (86 µs): his kernels.py in the index has no transpose body at any
   stored commit; the vector_add_naive runs (none published); conv2d (only MFU percentages are published).
2. AWS NKI LayerNorm tutorial (aws-neuron-sdk@4eba310 general/nki/tutorials/layernorm.rst; code
   general/nki/examples/layernorm/layernorm_nki_kernel.py), trn1, nki.benchmark output: v1 p99 2314 µs (p50
   2311), v2 p99 1974 µs (p50 1969). The text says "an input tensor of (300, 1000)"; the script that produced the
   output (its `--mode perf` path) runs its defaults, 4096 x 8192 fp32 (uniform [0, 1), eps 1e-5), and v1's 2314
   µs agrees within 6% with Autocomp's independent P99 of the same v1 program at 4096 x 8192 (LN.2461), where
   (300, 1000) is 112x less data: the shape is 4096 x 8192. v1 is LN.2461's stream (rule (b)): not a new point.
     LNT.v2       nki_layernorm_kernel_v2 (bn_stats per 512 columns, bn_aggr, rsqrt(var + eps), one two-op
                  tensor_scalar (x - mean) * rstd, * gamma + beta over [P, F]), 4096 x 8192 fp32, bench 1974 µs
                  (P99, as the other bench points), held out.
All eight are held out, `bench` / `prof` as listed. If a kernel fails (a) when it is re-written (e.g. an SBUF
overflow under the fixed choices), it is dropped and the reason written here, as kernels_v5.py did.
"""
from __future__ import annotations

# Published figures (µs) and their reports, as the rule above lists them; the kernels come in a later commit.
CS_REPORTS = {
    "CS.tiled1": (37318.0,),
    "CS.tiled128": (378.0,),
    "CS.stream2": (186.0,),
    "CS.stream200": (15.0,),
    "CS.fd2k": (28.0, 28.904955, 28.358289),
    "CS.fd1k": (26.0, 26.416626, 27.85829),
    "CS.T1024": (46.470761, 46.85326),
}
LNT_V2_P99_US = 1974.0


def median(values) -> float:
    """The rule's figure for several reports: the median (mean of the two middle values for an even count)."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
