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
    [Review correction, after modeling; no point changed: this reason is not applied consistently. The KDA
    programs admitted by v7 / v8 and the LayerNorm tutorial kernel (LNT.v2), like the earlier AccelOpt and
    Autocomp points, carry no such decorator either, and KDA's own notes report compiler rewrites (auto
    software pipelining, re-fetches, spills). Rule (a) as the rounds apply it is "fits the core as written",
    not "bypasses the compiler's middle end"; by that reading the 2024 edition is not excluded. It is recorded
    as a candidate source for a later round (sealed points chosen by a rule, before any modeling).]

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
   [Review correction, after the v6 points were modeled; no point changed: the stated reason for the transpose is
   wrong. His commit c8ba7c8 ("finished warm up") adds a matrix_transpose body with CS.T1024's data flow and
   writeup.md "Execution Time: 86 μs" (run_benchmark.py prints the nc_latency P99 so, at -n 1024): a `bench`
   report of CS.T1024's stream, so not a new point by rule (b). It is evidence worth keeping: one trn2 stream
   measures 86 µs by `bench` and 46.7 µs by `prof` (the assignment README warns that the profiler changes
   execution time).]
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

Choices the published code leaves to the compiler or to the emulator's API, fixed here before any v6 kernel is
modeled (kernels written after the rule commit f3e0312):
- CS kernels are written in the NKI 0.7 form (`nisa.<op>(dst=..., ...)`; the published nl.affine_range loops as
  Python `range`, the 0.7 equivalent of a loop unrolled at trace time, which skip_middle_end_transformations
  makes them); a 0.6-style `res = nisa.<op>(...)`
  allocates its result tile in SBUF (PSUM for nc_transpose) at that point of the loop body, as written.
- vector_add_tiled: the 1-D HBM vectors are viewed as [M, 1] (a reshape of the HBM tensor, no data movement) so a
  ROW_CHUNK slice lands one element per partition in the [ROW_CHUNK, 1] tile, as the README draws it;
  `nisa.tensor_scalar(a_tile, nl.add, b_tile)` runs on VectorE (the README: "performs vector addition using the
  vector engine"), b_tile its per-partition operand.
- vector_add_stream: `nisa.tensor_tensor(a_tile, b_tile, op=nl.add)` on VectorE (the README's VectorE add); the
  [128, M/128] HBM views are the published reshapes.
- matrix_transpose (CS.T1024): nc_transpose on TensorE (SBUF -> PSUM, fp32, as the assignment prescribes); the
  PSUM -> SBUF copy (nl.copy in one report, nisa.tensor_copy in the other) on ScalarE: both published profiles
  count 65 more ScalarE instructions than the vector-add profiles (128 vs 63) and no extra VectorE ones, one per
  tile (64) -- a published count, not a modeled figure.
- the neuron-profile preamble (about 60 instructions per engine in every published profile, the same for a
  1-iteration vector add and the transpose) is not part of the published code and is not re-written.
- LNT.v2: kernels_v4.py's choices, unchanged (gamma / beta broadcast once before the row loop; each bn_stats
  result assigned into the stats buffer is a VectorE copy; rsqrt(var + eps) a [P, 1] VectorE add and a ScalarE
  rsqrt; `shift_scale_tensor * gamma + beta` two VectorE tensor_tensor into the one work tile); the tutorial's
  `nisa.tensor_scalar(op0=subtract, operand0=mean, op1=multiply, operand1=scale_var)` is one VectorE instruction
  with two ops, as written. Masks always true at 4096 x 8192 are dropped.
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import P_MAX

from .kernels import _broadcast_rows
from .kernels_v4 import LN_EPS, _affine, _mean_var_bn, _rstd

# Published figures (µs) and their reports, as the rule above lists them.
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


# ------------------------------------------------------------------------------------------------ CS149 (trn2)


CS_PARTITIONS = P_MAX          # PARTITION_DIM of vector_add_stream / tile_dim of matrix_transpose: 128 lanes
CS_TILED_ROW_CHUNK = {"CS.tiled1": 1, "CS.tiled128": 128}
CS_STREAM_FREE_DIM = {"CS.stream2": 2, "CS.stream200": 200, "CS.fd2k": 2000, "CS.fd1k": 1000}


@nki.jit
def cs_vector_add_tiled(a_vec, b_vec, row_chunk):
    """CS.tiled*: out[M] = a[M] + b[M]; per chunk of `row_chunk` rows (one element per partition) two loads, one
    VectorE tensor_scalar (b as the per-partition operand), one store."""
    m = a_vec.shape[0]
    out = nl.ndarray((m,), dtype=a_vec.dtype, buffer=nl.shared_hbm)
    a_col, b_col, out_col = (t.reshape((m, 1)) for t in (a_vec, b_vec, out))
    for i in range(m // row_chunk):
        rows = slice(i * row_chunk, (i + 1) * row_chunk)
        a_tile = nl.ndarray((row_chunk, 1), dtype=a_vec.dtype, buffer=nl.sbuf)
        b_tile = nl.ndarray((row_chunk, 1), dtype=b_vec.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_tile, src=a_col[rows])
        nisa.dma_copy(dst=b_tile, src=b_col[rows])
        res = nl.ndarray((row_chunk, 1), dtype=a_vec.dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=res, data=a_tile, op0=nl.add, operand0=b_tile, engine=nisa.vector_engine)
        nisa.dma_copy(dst=out_col[rows], src=res)
    return out


@nki.jit
def cs_vector_add_stream(a_vec, b_vec, free_dim):
    """CS.stream* / CS.fd*: out[M] = a[M] + b[M] with the vectors viewed as [128, M/128]; per [128, free_dim]
    tile two loads, one VectorE tensor_tensor add, one store."""
    m = a_vec.shape[0]
    cols_total = m // CS_PARTITIONS
    out = nl.ndarray((m,), dtype=a_vec.dtype, buffer=nl.shared_hbm)
    a_re, b_re, out_re = (t.reshape((CS_PARTITIONS, cols_total)) for t in (a_vec, b_vec, out))
    for i in range(m // (CS_PARTITIONS * free_dim)):
        cols = slice(i * free_dim, (i + 1) * free_dim)
        a_tile = nl.ndarray((CS_PARTITIONS, free_dim), dtype=a_vec.dtype, buffer=nl.sbuf)
        b_tile = nl.ndarray((CS_PARTITIONS, free_dim), dtype=b_vec.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_tile, src=a_re[:, cols])
        nisa.dma_copy(dst=b_tile, src=b_re[:, cols])
        res = nl.ndarray((CS_PARTITIONS, free_dim), dtype=a_vec.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=res, data1=a_tile, data2=b_tile, op=nl.add, engine=nisa.vector_engine)
        nisa.dma_copy(dst=out_re[:, cols], src=res)
    return out


@nki.jit
def cs_matrix_transpose(a_tensor):
    """CS.T1024: out[N, M] = a[M, N]^T; per 128 x 128 tile (m outer, n inner): load, TensorE transpose into PSUM,
    ScalarE copy PSUM -> SBUF, store at the swapped block."""
    m, n = a_tensor.shape
    t = CS_PARTITIONS
    out = nl.ndarray((n, m), dtype=a_tensor.dtype, buffer=nl.shared_hbm)
    for i in range(m // t):
        for j in range(n // t):
            a_tile = nl.ndarray((t, t), dtype=a_tensor.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=a_tile, src=a_tensor[i * t:(i + 1) * t, j * t:(j + 1) * t])
            tr_psum = nl.ndarray((t, t), dtype=a_tensor.dtype, buffer=nl.psum)
            nisa.nc_transpose(dst=tr_psum, data=a_tile, engine=nisa.tensor_engine)
            tr_sb = nl.ndarray((t, t), dtype=a_tensor.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=tr_sb, src=tr_psum, engine=nisa.scalar_engine)
            nisa.dma_copy(dst=out[j * t:(j + 1) * t, i * t:(i + 1) * t], src=tr_sb)
    return out


# ------------------------------------------------------------------------------------------------ LNT.v2 (trn1)


@nki.jit
def layernorm_tutorial_v2(x, gamma, beta):
    """LNT.v2: y[M, F] = (x - mean) * rsqrt(var + eps) * gamma + beta per row, fp32, M in 128-row tiles; bn_stats
    per 512 columns, bn_aggr, the [P, 1] rsqrt, one two-op tensor_scalar, * gamma + beta, store."""
    m, f = x.shape
    out = nl.ndarray((m, f), dtype=x.dtype, buffer=nl.shared_hbm)
    g_sb = _broadcast_rows(gamma)
    b_sb = _broadcast_rows(beta)
    for i in range(m // P_MAX):
        rows = slice(i * P_MAX, (i + 1) * P_MAX)
        x_sb = nl.ndarray((P_MAX, f), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x[rows, :])
        mean, var = _mean_var_bn(x_sb)
        rs = _rstd(var, LN_EPS)
        work = nl.ndarray((P_MAX, f), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=work, data=x_sb, op0=nl.subtract, operand0=mean, op1=nl.multiply, operand1=rs)
        _affine(work, g_sb, b_sb)
        nisa.dma_copy(dst=out[rows, :], src=work)
    return out


# ------------------------------------------------------------------------------------------------ point specs
# Each spec is a calibration Point's fields (points.py adds split="held-out"). make(k, rng) -> (args, kwargs);
# k = outer-loop count (tiles / row tiles). Inputs uniform in [0, 1) fp32, as the published harnesses draw them.


def _rand(rng, *shape):
    import numpy as np
    return rng.random(shape).astype(np.float32)


def _tiled_make(row_chunk):
    def make(k, rng):
        n = k * row_chunk
        return (_rand(rng, n), _rand(rng, n), row_chunk), {}
    return make


def _stream_make(free_dim):
    def make(k, rng):
        n = k * CS_PARTITIONS * free_dim
        return (_rand(rng, n), _rand(rng, n), free_dim), {}
    return make


def _ref_add(a, b, _const):
    return a.astype("float64") + b.astype("float64")


def _ref_transpose(a):
    return a.astype("float64").T


def _ref_layernorm(x, gamma, beta, eps=LN_EPS):
    import numpy as np
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=1, keepdims=True)
    return (x64 - mu) / np.sqrt(var + eps) * gamma.astype(np.float64) + beta.astype(np.float64)


def _lnt_make(k, rng, f=8192):
    return (_rand(rng, P_MAX * k, f), _rand(rng, f), _rand(rng, f)), {}


_CS_SRC = "CS149 F25 asst4-trainium2 (trn2.3xlarge), "
POINT_SPECS = (
    dict(id="CS.tiled1", name="vector_add_tiled", shape="n=25600 fp32, ROW_CHUNK=1", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.tiled1"]), source=_CS_SRC + "xaviergonzalez writeup (bench NCL P99)",
         kernel=cs_vector_add_tiled, make=_tiled_make(1), k_full=25600, k_model=(256, 512), reference=_ref_add,
         timing="bench", notes="k = one-element chunks: 3 DMAs of 4 B and one [1, 1] VectorE add each"),
    dict(id="CS.tiled128", name="vector_add_tiled", shape="n=25600 fp32, ROW_CHUNK=128", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.tiled128"]), source=_CS_SRC + "xaviergonzalez writeup (bench NCL P99)",
         kernel=cs_vector_add_tiled, make=_tiled_make(128), k_full=200, k_model=(200,), reference=_ref_add,
         timing="bench", notes="k = 128-element chunks, one element per partition"),
    dict(id="CS.stream2", name="vector_add_stream", shape="n=25600 fp32, FREE_DIM=2", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.stream2"]), source=_CS_SRC + "xaviergonzalez writeup (bench NCL P99)",
         kernel=cs_vector_add_stream, make=_stream_make(2), k_full=100, k_model=(100,), reference=_ref_add,
         timing="bench", notes="k = [128, 2] tiles (8 B per partition per DMA)"),
    dict(id="CS.stream200", name="vector_add_stream", shape="n=25600 fp32, FREE_DIM=200", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.stream200"]), source=_CS_SRC + "xaviergonzalez writeup (bench NCL P99)",
         kernel=cs_vector_add_stream, make=_stream_make(200), k_full=1, k_model=(1,), reference=_ref_add,
         timing="bench", notes="one [128, 200] tile"),
    dict(id="CS.fd2k", name="vector_add_stream", shape="n=256000 fp32, FREE_DIM=2000", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.fd2k"]),
         source=_CS_SRC + "neuron-profile total_time, median of 3 reports (prof)", kernel=cs_vector_add_stream,
         make=_stream_make(2000), k_full=1, k_model=(1,), reference=_ref_add, timing="prof-total",
         notes="one [128, 2000] tile (8000 B per partition per DMA)"),
    dict(id="CS.fd1k", name="vector_add_stream", shape="n=256000 fp32, FREE_DIM=1000", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.fd1k"]),
         source=_CS_SRC + "neuron-profile total_time, median of 3 reports (prof)", kernel=cs_vector_add_stream,
         make=_stream_make(1000), k_full=2, k_model=(2,), reference=_ref_add, timing="prof-total",
         notes="two [128, 1000] tiles"),
    dict(id="CS.T1024", name="matrix_transpose", shape="1024 x 1024 fp32", target="trn2",
         tile_buffers=1,
         measured_us=median(CS_REPORTS["CS.T1024"]),
         source=_CS_SRC + "neuron-profile total_time, mean of 2 reports (prof)", kernel=cs_matrix_transpose,
         make=lambda k, rng, n=1024: ((_rand(rng, CS_PARTITIONS * k, n),), {}), k_full=8, k_model=(8,),
         reference=_ref_transpose, timing="prof-total",
         notes="64 tiles of 128 x 128: load, TensorE transpose, ScalarE PSUM copy, store"),
    dict(id="LNT.v2", name="layernorm", shape="4096 x 8192 fp32", target="trn1", measured_us=LNT_V2_P99_US,
         source="AWS NKI LayerNorm tutorial v2, nki.benchmark p99 (bench)", kernel=layernorm_tutorial_v2,
         make=_lnt_make, k_full=32, k_model=(2, 4), reference=_ref_layernorm, timing="bench",
         notes="bn_stats / bn_aggr, one two-op tensor_scalar, * gamma + beta; k = 128-row tiles"),
)
