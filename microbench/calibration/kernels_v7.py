"""v7 held-out calibration points: the selection rule, committed before any of these kernels was re-written or
modeled (the published latencies were known, no modeled figure was). The kernels follow in a later commit, from
the published code (read for data flow, never copied); the choices the published code leaves to the compiler are
written here before anything is modeled. Nobody has modeled these points; the v6 points' modeled errors were not
looked at.

Search record (00:36-00:50 UTC, 2026-12-07; `find_repos` "asst4", "trainium", "cs149"; `find_files` / `read_file`
on the repositories below; `fetch` of Jerry2423/kda-for-trainium@90770f2):
  * CS149 F25 asst4-trainium2 (trn2): `find_repos` "asst4" / "trainium" list the same 13 student repositories
    *asst4-trainium2* that kernels_v6.py records (xaviergonzalez, chenhzhu, rishic3, chengli2003, EtashGuha, a-argy,
    nriedman, Ni2002ka, msthaniana, juntongshi48, tianyeeT, rajajisai, Kelvinthedrugger) and no other; their
    published measurements are the v6 points (or were excluded by the v6 rule); conv2d publishes MFU % only.
    "cs149" finds no further trainium repository (the 2024 trn1 edition, *asst4-trainium*, stays out for the v6
    reason: nl.* programs without skip_middle_end_transformations).                               -> nothing new
  * Jerry2423/kda-for-trainium@90770f2 ("KDA on NKIBench"): an agent-driven optimisation of the 14 AccelOpt
    NKIBench operators, scored on a remote Trainium profiler, **trn2, single core, compiled with
    `--disable-dge --logical-nc-config=1`** (RESULTS.md; adapter/nkibench_case.py NKIBENCH_COMPILER_FLAGS).
    workspaces/<op>/benchmark.csv holds one row per measured candidate (candidate path, passed, latency_ms, notes
    with per-engine active % and HBM bytes); the candidate's exact code is workspaces/<op>/runs/<file>.py at the
    same commit. About 150 rows with passed=true and a latency over 14 operators.              -> qualifies
  * Listed by `find_repos` "trainium" but not examined within this round's time box (recorded for a later round,
    not used): allenkchau/trainium-kernel-fusion (neuron-profile json reports of attention / MLP kernels),
    Willy-Chan/trainium-linear-attention, yohan278/io-aware-attention-trainium.

Timing convention, decided from published evidence only. KDA's latency_ms is "p50 on-device latency" (verify.py,
the backend's documented output contract) of a profiler run that also yields per-engine utilisation, HBM
read/write bytes and DMA active time (summary_metrics; the benchmark.csv notes quote them, e.g. silu "DMA=97%
Scl=34% ... HBMrd=117MB HBMwr=117MB"), with AccelOpt's compile flags ("match them so speedups are comparable to
the paper's methodology"); AccelOpt's own figures are neuron-profile device times (`prof`, calibration.md S3).
So these points are `prof`: device time of the kernel, **no launch term**. Target trn2, LNC=1 (the flag is
published), one physical core.

The rule. A point is a published latency of an NKI kernel, not yet a point, not reserved (AWS matmul / Mamba
tutorial kernels and their derivatives, nki-autotune's GEMMs), with the hardware stated and the exact code the
device ran published, subject to (a) and (b) of points.py (the program runs as written: every SBUF / PSUM tensor
it allocates fits the core, one instruction per nisa / nl compute call, one DMA per nl.load / nl.store; one point
per distinct instruction stream). From KDA every benchmark.csv row with passed=true, a latency, and a candidate
file under runs/ qualifies, except: (i) the NKIBench baseline kernels (their streams are the AccelOpt S3 points,
whose re-writes were chosen looking at their trn1 errors), (ii) the mamba workspace (derived from the reserved
Mamba tutorial kernel), (iii) probe / diagnostic files that are not an op kernel (names *probe*, *diag*,
*offline*). Several rows of one stream (the same file measured again, or two files with the same instruction
stream by (b)) -> the median of their latency_ms (mean of the two middle values for an even count); the notes'
extra figures are not used.

This round re-writes the two pure element-wise streaming operators, **silu** (x: 4096 x 7168 fp32, NKIBench's
tiled view [128, 32, 7168]) and **adamw** (theta, g, m, v: 10944 x 2048 fp32), because their kernels are a few
instructions per tile and can be re-written and reference-checked within this round; every other qualifying
KDA row (add_rmsnorm_matmul, bmm, bmm_softmax, gqa_full, lora, matmul, matmul_add_rmsnorm, rmsnorm_matmul,
rope_single_freq_apply, swiglu, transpose_matmul) stays unused and un-modeled, reserved as held-out for a later
round by this same rule. The points (published latency_ms, every report):
  KS.v1    silu_v1: 32 x ([128, 7168] load, ScalarE silu, store)                     0.3009 ms
  KS.k2    silu_v2_k2: 16 x ([128, 2, 7168] load, silu, store)                       0.3350 ms
  KS.k3    silu_v2_k3: 10 x [128, 3, 7168] + tail [128, 2, 7168]                     0.7729 ms
  KS.k4    silu_v2_k4: 8 x [128, 4, 7168], silu in place (dst = src tile)           0.3971 ms
  KS.pp    silu_v2_pingpong: manual 2-deep prefetch, sequential_range                0.5889 ms
  KS.s2    silu_v3_s2: 64 x [128, 3584] (flat reshape view)                          0.3001 ms
  KS.s4    silu_v3_s4: 128 x [128, 1792]                                             0.2981 ms
  KS.s7    silu_v3_s7 (224 x [128, 1024], flat) and silu_v3_s7_nested (32 x 7 nested, same stream by (b)):
           median of 0.2940, 0.2938 = 0.2939 ms
  KS.s8    silu_v3_s8: 256 x [128, 896]                                              0.3105 ms
  KA.v1    adamw_v1: 86 row tiles [128, 2048] (last 64 rows, masked): 4 loads, ScalarE square, VectorE
           scalar_tensor_tensor, ScalarE rsqrt, 3 VectorE scalar_tensor_tensor, store      0.6180 ms
  KA.ch<CH> adamw_v2_ch<CH>: v1's chain, mask-free, over the (128, 175104 / CH, CH) view, one tile per
           iteration: CH = 512 0.7768, 576 0.5839, 608 0.5860, 684 0.6390, 768 0.7517, 912 0.5606,
           1024 0.5921, 1152 0.6834, 1216 median(0.5614, 0.5601) = 0.56075, 1368 0.5825,
           1536 0.6515, 1824 median(0.5478, 0.5474) = 0.5476, 2304 0.6105 ms
All 23 (9 KS, 14 KA) are held out, `prof`, trn2, LNC=1. If a kernel fails (a) when it is re-written, it is
dropped and the reason written here.

Choices the published code leaves to the compiler or to the emulator's API, fixed here before any v7 kernel is
modeled:
- NKI 0.7 form (`nisa.<op>(dst=..., ...)`); nl.affine_range / nl.sequential_range loops as Python `range` (the
  trace-time unrolled loop; the emulator's scheduler overlaps independent iterations as their dependencies and
  buffers allow); a 0.6-style `t = nisa.<op>(...)` / `t = nl.load(...)` allocates its SBUF tile at that point of
  the loop body, as written. nl.load / nl.store = one nisa.dma_copy of the whole tile.
- nisa.activation runs on ScalarE, nisa.scalar_tensor_tensor on VectorE, as the published comments say.
  The fp32 scalars of the adamw chain are immediate operands.
- HBM views: the published reshapes ((128, ITERS, CH) of the contiguous buffers) are reshapes of the HBM tensor,
  no data movement; silu's input and output are [128, 32, 7168] as NKIBench presents them.
- adamw_v1's masked last tile (rows 10880..10943 valid) loads, computes and stores the 64 valid rows; the
  compute instructions' cost depends on the free size, which is the same.
- silu_v2_pingpong's xbuf (2, par_dim(128), 7168) is one [128, 2, 7168] SBUF tile indexed [:, i % 2, :].
"""
