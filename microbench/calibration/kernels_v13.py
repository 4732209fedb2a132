"""v13 sealed calibration points: the selection, committed before any of these kernels was re-written (the published
latencies were known; nothing here has been modeled, and nothing may be until the next calibration round (trn1 and
trn2) has frozen its model: points.py docstring, "v8 sealed points" and "v13 sealed points"). The kernel follows in a
later commit from the published code (read for data flow, never copied); the choices the published code leaves to the
compiler are written below, in this commit, before any kernel exists.

Why: the v12 round unsealed its 20 points (CS24.*, CV.*) under the frozen cost model v11 (median |error| 77.6%, all
20 modeled too slow: docs/cost-model.md, "v12 held-out result"); no sealed point is left, so the next round, which
will likely touch trn1's short-row DMA (the 2560 B packet knee against 4-80 B rows) and its `bench` term, has nothing
to be judged on. Every DMA of the kernel selected here moves partition rows of 64 or 128 B on trn1 (one output row
per step), or single elements (the filter's transposing loads): the regime that round changes.

Search record (21:05-21:09 UTC by `date`, 2026-12-07, `seal13` engineer; `find_repos`, `find_files`, `read_file`,
`find_string`, `search` corpora code / pages / issues, and `fetch` of the newest snapshot of every repository named
below unless said otherwise). Already used or excluded (the registry, kernels_v6 ... kernels_v12): AccelOpt, Autocomp
(ucb-bar/autocomp's newest snapshot is still dd26a56, the commit the U3 / U4 / U5 / LN / LN5 points cite: its trn
traces and sample run are all used or reserved; examples/*_opt.py are the traces' last steps; agent_builder/.built
and sols/ hold code and prompts but no latency), KDA (all 14 workspaces), CS149 F24 / F25 (kernels_v12.py: 14 + 13
student repositories; `find_repos` "asst4" / "trainium" list no repository they did not), CS152 lab 6 magmawolf8
(CV.*), allenkchau (AF.*; its MLP study reserved by v11), the AWS NKI tutorials (matmul and Mamba reserved).
  * UC Berkeley CS152 lab 6, other students. v12 found one student repository by name ("cs152" / "152-lab6" /
    "ucb-152"); `find_files` by the lab's file paths finds the others. nki_conv2d/conv2d.py: Jingfeng0705/cs152_lab6,
    RileyReichel/lab6, amyryao/CS152_AWS, areddy2005/AWS, devpatelio/tranium-kernels, isaack0ng/CS152_lab6,
    jermainelei/cs152tranium, magmawolf8/cs152-lab6 (v12), sanjanataware/cs152lab6-sanjanataware and the staff
    repository ucb-152/lab6 (spring 2025, 687dc2f); nki_ffnn/kernels.py: the same nine students;
    nki_conv2d/reports/fleet_performance_test_report.json: magmawolf8 (v12) and **Jingfeng0705@a635a9f**, nobody
    else. Fetched and searched at every commit (git grep of every text file for µs / ms figures, latency, P50,
    benchmark_time): RileyReichel (83 commits), areddy2005 (2), devpatelio (80), isaack0ng (80), jermainelei (88),
    sanjanataware (92): the course's harness and handout only, no figure of a student run.           -> out
    ucb-152/lab6 (the 2025 staff repository, 68 commits): the handout's NumPy prediction time (host, not a device
    latency of an NKI kernel) and no kernel figure.                                                   -> out
    amyryao, Jingfeng0705: `fetch` has no snapshot; read with `find_files` / `read_file` at their stored commits.
    amyryao: code only.                                                                                -> out
    Jingfeng0705: nki_conv2d/conv2d.py (stored at a635a9f and at 511801c), nki_ffnn/kernels.py (c6e8ab8, no figure)
    and, at a635a9f, nki_conv2d/reports/fleet_performance_test_report.json with the correctness report of the same
    run (every case "correct": true).                                                           -> qualifies (A)
  * `find_repos` "trainium" (93 repositories), the ones not examined before and not course repositories:
    xinyu511/trainium_experiment (image classifiers in PyTorch), lauyikfung/Amazon_Trainium_Optimizer (a GDN
    training code base), chris320211/flatquant-trainium (CUDA / PyTorch quantisation), arminagha1234/trainium-
    optimizer (model-serving configuration search): no NKI kernel with a device latency.                -> out
    LaelaZorana/kernel-grader-mi300x-rocm-trainium-nki: no snapshot here, not examined.
  * `find_string` "Execution Time:", "benchmark_result.nc_latency", "NCL(50)"; `search` code / pages for NKI kernel
    latency tables: besides the sources above, (i) a benchmark of a generated matmul against the AWS matmul tutorial
    kernels (reserved), (ii) a "Voyager" NKI code generator whose notes report trn2 (LNC=1) nki.benchmark p50 medians
    of machine-generated programs of up to several MB, and (iii) "flashlib", an NKI k-means assign kernel whose
    benchmark docstring gives trn2 times ("median warm iter" for the table, NCL(50) for the core sweep): for (ii)
    and (iii) the index names no repository (`find_files` by their paths: none) and the exact code of a timed run
    could not be tied to a commit within this round.                              -> not examined (a later round)
  * `search` issues: aws-neuron/nki-samples #44 / #45 / #59 / #72, aws-neuron/nki-llama #16 / #23, awslabs/
    nki-autotune #25: host wall-clock times through torch-xla or the reserved matmul tutorial kernels.  -> out

The rule: the v6 rule (kernels_v6.py; points.py "v6 held-out rule") for `bench` sources, unchanged, as v12's source 2
applied it to the same course (kernels_v12.py, "Source 2"), now to the second student repository that commits the
graded harness's fleet report beside its kernel. A point is a published latency of an NKI kernel, not yet a point and
not reserved, whose hardware is stated and whose exact code (the program the device ran) is in the repository at the
commit that published the figure, with its timing kind evident, subject to (a) and (b) of points.py: (a) the program
runs as written (every SBUF / PSUM tensor fits the trn1 core: 180224 B usable SBUF and 16 KiB PSUM per partition);
(b) one point per distinct instruction stream (one instruction per nisa / nl compute call, one DMA per nl.load /
nl.store, dtypes as written); several reports of one stream -> their median (none here: one report per case).

Facts fixed by the source (the same course edition and harness as v12's CV points): Jingfeng0705's conv2d.py is the
spring 2026 starter (cs152-teach/lab6, as RileyReichel's fork carries it at b27ea9e: the NEURON_CC_FLAGS
"--disable-dge" line and the four shape asserts the 2025 starter lacks) with the "YOUR CODE HERE" steps filled in;
the report's fields (gen_data, exec_time, met_threshold, benchmark_time) are those the 2026 harness writes
(nki_conv2d/tester.py, test_performance_conv2d_kernel: `nki.benchmark(warmup=20, iters=100)`, benchmark_time =
nc_latency **P50** in µs; the README's last step, `python tester.py --record`, writes the report). Hardware: the lab
handout, "program basic kernels on NeuronCore-v2" and "Trainium instances contain a single Trainium Device, which has
2 NeuronCores", and AWS_SETUP.md's instance (SSH host "trn1_cs152"): target **trn1**, **one NeuronCore** (one
launch, no grid), modeled at LNC=1 with **time_cores 1**; no skip_middle_end_transformations, so **tile_buffers
None** (the target's CostParams.tile_buffers); timing **`bench`** (P50, recorded per point as for CV). Inputs as the
harness draws them: X, W uniform [0, 1), bias uniform [0, 50), all in the case's dtype.

A. conv2d (conv2d_nki at Jingfeng0705/cs152_lab6@a635a9f0ac11627d3fda184ca05d2b285696a26f nki_conv2d/conv2d.py):
   out[n, k, r, q] = sum over c, i, j of W[k, c, i, j] X[n, c, r + i, q + j] + bias[k], valid padding, stride 1,
   OH = IH - F + 1, OW = IW - F + 1, out in X's dtype. Data flow: prologue, the whole filter resident in one SBUF
   tensor w [128 (c), 128 (k), K / 128, C / 128, F, F]: per (k tile, c tile, i, j) one nl.load_transpose2d of
   W[k tile, c tile, i, j] ([128 k, 128 c], element-strided in HBM) into w[:, :, k tile, c tile, i, j]. Then per image
   n, per 128 output channels (k tile): the bias tile loaded once ([128] of bias); per output row r: a PSUM row
   [128, OW] fp32 (nl.zeros), and per (c tile, i, j) one nl.load of X[n, c tile, r + i, j : j + OW] into a new
   [128, OW] tile and one nisa.nc_matmul (stationary w[:, :, k tile, c tile, i, j], moving that row) added into the
   PSUM row; then out_tile = nl.add(bias tile, PSUM row) and one nl.store of it to out[n, k tile, r]. Every case of
   the report, benchmark_time = P50 µs (one report each; OH = OW; "row" = the bytes per partition of each X load and
   output store):
     CR.c128k128f3b16s66.fp16   C 128, K 128, 3x3, N 16, 66 x 66, fp16, OW 64, rows 128 B                   1121
     CR.c128k128f5b16s36.fp16   C 128, K 128, 5x5, N 16, 36 x 36, fp16, OW 32, rows 64 B                    1483
     CR.c128k256f3b4s34.fp32    C 128, K 256, 3x3, N 4, 34 x 34, fp32, OW 32, rows 128 B                     504
     CR.c128k256f3b4s66.fp16    C 128, K 256, 3x3, N 4, 66 x 66, fp16, OW 64, rows 128 B                     557
     CR.c128k256f3b16s34.fp32   C 128, K 256, 3x3, N 16, 34 x 34, fp32, OW 32, rows 128 B                   1840
     CR.c128k256f5b4s36.fp32    C 128, K 256, 5x5, N 4, 36 x 36, fp32, OW 32, rows 128 B                    2162
                                (met_threshold false: above the course's threshold, still a measured latency of a
                                program the correctness report passes)
     CR.c128k256f5b16s36.fp16   C 128, K 256, 5x5, N 16, 36 x 36, fp16, OW 32, rows 64 B                    2899
     CR.c256k256f3b4s34.fp32    C 256, K 256, 3x3, N 4, 34 x 34, fp32, OW 32, rows 128 B                     989
     CR.c256k256f3b16s34.fp16   C 256, K 256, 3x3, N 16, 34 x 34, fp16, OW 32, rows 64 B                    2145
     CR.c256k256f5b4s36.fp16    C 256, K 256, 5x5, N 4, 36 x 36, fp16, OW 32, rows 64 B                     2169
     CR.c256k256f5b16s36.fp16   C 256, K 256, 5x5, N 16, 36 x 36, fp16, OW 32, rows 64 B                    7901
   11 points by (b): every case differs from the others in loop counts, filter size or dtype, and from the CV points
   (another student's kernel: 16 x 32 output tiles, halo windows, PE-transposed filters) in its whole stream. Per
   image K / 128 x OH x (C / 128) x F x F matmuls and X loads (576 ... 3200), K / 128 x OH output stores.
   Not points: the correctness report (host wall-clock exec_time); the other stored version of conv2d.py (511801c:
   the bias loaded per output row, with nl.expand_dims) is not the file of the report's commit; nki_ffnn (no figure).
   (a), SBUF bytes per partition as written: the resident filter w, 128 x (K / 128)(C / 128) F^2 elements of the
   dtype (2304 3x3 fp16 C 128 K 128, 4608 3x3 fp16 K 256, 6400 5x5 fp16 K 128, 9216 3x3 fp32 K 256 or 3x3 fp16 C 256,
   12800 5x5 fp16 C 128 K 256, 18432 3x3 fp32 C 256, 25600 5x5 fp32 K 256 or 5x5 fp16 C 256), plus one X row tile
   (OW elements), the bias tile and the fp32 output row tile (4 OW B): at most 26 KiB of 180224; PSUM: the
   [128, OW] fp32 row (128 or 256 B, one bank). All eleven fit.

Choices the published code leaves to the compiler or to the emulator's API (fixed here, before any kernel):
- NKI 0.7 form (`nisa.<op>(dst=..., ...)`); the `nl.affine_range` loops as Python `range` in the published order;
  tiles allocated where written (w once; the bias tile per (image, k tile); the PSUM row per output row; the X row
  tile per (c tile, i, j); the output row tile per output row); their rotation and the overlap of iterations are the
  compiler's (tile_buffers None).
- `nl.load_transpose2d(W[k tile, c tile, i, j])` = one nisa.dma_copy of that [128 k, 128 c] HBM slice viewed
  transposed ([c, k], element-strided) into the w slice: NeuronCore-v2 has no DMA transpose hardware (the emulator
  refuses a hardware-DGE transpose before NeuronCore-v3), so a transposing load on trn1 is a DMA of single elements,
  as the U4 points' load_transpose2d (kernels.py, trn1); this holds for 2- and 4-byte dtypes alike (the fp32 cases
  ran and passed the correctness report; v9's KB.lt drop concerns trn2's 2-byte DMA transpose, not this).
- `nl.load(bias[k tile])` = one dma_copy of the [128] slice into a [128, 1] SBUF tile (one element per partition).
- `nl.load(X[n, c tile, r + i, j : j + OW])` = one dma_copy into a new [128, OW] tile of X's dtype (one row of OW
  elements per partition, partitions IH x IW elements apart).
- `psum_row = nl.zeros(...)` then `psum_row += nisa.nc_matmul(w_tile, x_tile)` = one nisa.nc_matmul per (c tile,
  i, j), the first of each output row with accumulate=False and the rest accumulate=True (no memset: v8's rule),
  stationary the [128 c, 128 k] filter slice (free-dim strided in w), moving the [128 c, OW] row.
- `out_tile = nl.add(b_tile, psum_row)` = one VectorE nisa.tensor_scalar add reading the PSUM row with the [128, 1]
  bias column as operand, into a new [128, OW] SBUF tile of the promoted dtype (fp32: X's dtype and fp32 PSUM);
  `nl.store(out[n, k tile, r], out_tile)` = one dma_copy that casts to the output dtype (as the CV / AF points).
- Modeling (not done in this round): trn1, lnc 1, time_cores 1, tile_buffers None, `bench` (the trn1 bench term of
  the model that unseals them), k = images (the outermost loop; the prologue's filter loads once per launch), slices
  k = 1, 2 extrapolated to N (points.py), the harness's inputs.
Added with the kernel (after this selection, 8b8991d; nothing modeled; no choice added): cr_conv2d matches a float64
NumPy convolution for one image of every case at a 16 x 16 output (the published channels and filter), keeps a nan /
inf in one image's input inside that image's affected outputs, and the emulator's allocation peaks on one image at the
published shapes are 2690 (3x3 fp16 C 128 K 128), 4994 (3x3 fp16 K 256, side 66), 6594 (5x5 fp16 K 128), 9410 (3x3
fp16 C 256), 9476 (3x3 fp32 C 128 K 256), 12994 (5x5 fp16 C 128 K 256), 18692 (3x3 fp32 C 256), 25794 (5x5 fp16 C
256), 25860 (5x5 fp32) B of 180224, one PSUM bank: the arithmetic above (the resident filter) plus the row tiles.

Source 2 (a second selection commit, after the CR kernel landed (5b54ac2) and before any of its kernels was re-written;
the published latencies were known, nothing modeled). Search, continued (21:21-21:24 UTC by `date`): candidate (iii)
of the record above, the "flashlib" k-means kernel, is FlashML-org/flashlib (`find_files` of its kernel path
flashlib/primitives/kmeans/nki/assign_kernel.py; `fetch`ed): its NKI code exists only on branch nki-support, one
commit, efe797260ed54e6b804ab7d85bdd03b4f377f476 ("[feat] Support flash-kmeans on trn2", 2026-07-10), which adds the
kernel and benchmarks/micro/bench_kmeans_nki.py, whose docstring publishes the measurements (main does not contain
them). LaelaZorana/kernel-grader-mi300x-rocm-trainium-nki (read with `read_file`): a histogram NKI kernel run on a
trn1.2xlarge, but its device json files record only numerics and host wall times (sim_wall_s): out. Candidate (ii)
(the "Voyager" NKI generator) stays unidentified (`find_files` / `find_string` of its paths: none).
Rule: the v6 rule as above (a published latency, hardware stated, exact code at the commit that published it, timing
kind evident, (a) and (b)); several reports of one stream -> their median. Facts fixed by the source (efe7972):
hardware **trn2** (the commit title; the benchmark's peak denominator "per physical NeuronCore-v3", a trn2.3xlarge);
the benchmark script's default run (`main`: for each of its _SHAPES, `_bench_one` = `nki.benchmark(warmup=5,
iters=20)` of `_flash_assign_kernel`, nc_latency **P50**) and the docstring's "Measured device latency (NCL(50),
neuron-bench)" for the same shape (31.4 ms in both): timing **`bench`** (nc_latency P50, as the CV / CR points).
Cores, stated by the source: "one NC (nc=1): 31.4 ms" against "one LNC2 (nc=2): 15.7 ms -> 2.0x", nki.benchmark
spawning "neuron-bench --fixed-nc-count 1": the unsharded kernel is **one physical core's program**, modeled at LNC=1
with **time_cores 1** (the v11 lesson: the convention per source, here stated by it); the nc=2 run is
make_assign_kernel(2) launched with [nl.nc(2)] (each program one half of the point tiles, by nl.program_id(0)),
modeled as an LNC=2 launch of that kernel, time_cores 1. No skip_middle_end_transformations: **tile_buffers None**.
Inputs (`_bench_one`): x [N, D], c [K, D] standard normal fp32 (np.random.default_rng(0)), prep_assign: xT = x^T
[Dp, N] bf16, cT = c^T [Dp, Kp] bf16 (D, K already multiples of 128 / 512 here: no padding), c_sq [1, Kp] fp32 =
sum_d c^2 from the fp32 c.
B. flash k-means assign (flash_assign_body with its defaults: MT 128 points per tile, BK 512 centroids per streamed
   tile, fold_csq False, score_bf16 False): out_idx[m] = argmax_k (2 x[m] . c[k] - c_sq[k]) (= the nearest centroid),
   int32 [N, 1]. Data flow: prologue, cT resident in SBUF [128, D / 128, K] (one load per 128-row D tile, rows of
   2K B) and c_sq in a [1, K] fp32 SBUF tile (one load). Per point tile (128 points): x^T loaded [128, D / 128, 128]
   (one load per D tile, rows of 256 B); running best_val [128, 1] fp32 = -3e38 (nl.full), best_idx [128, 1] int32
   = 0 (nl.zeros); per centroid tile kt (nl.static_range, K / 512 of them): acc [128, 512] fp32 PSUM (nl.zeros) +=
   one nc_matmul per D tile (stationary x^T [128 d, 128 m], moving cT [128 d, 512 k]); csq_bc = nl.broadcast_to of
   c_sq[0, kt tile] to [128, 512]; sim = nisa.scalar_tensor_tensor(acc * 2.0 - csq_bc) fp32; top = nisa.max8(sim)
   [128, 8]; idx = nisa.nc_find_index8(sim, top) [128, 8]; tile_idx = nisa.tensor_scalar(idx[:, 0:1] + kt * 512,
   int32); upd = nl.greater(top[:, 0:1], best_val); best_idx = nl.where(upd, tile_idx, best_idx); best_val =
   nl.maximum(top[:, 0:1], best_val); then one store of best_idx to out_idx[tile] ([128, 1] int32: 4 B rows). The
   published figures (ms; one report each unless listed):
     FK.d128k4096       N 262144, D 128, K 4096, one core (the docstring table, "NKI (flash)")       31.3
     FK.d256k4096       N 262144, D 256, K 4096, one core: median(31.4 the table, 31.4 "one NC (nc=1)", NCL(50);
                        make_assign_kernel(1) "is equivalent to _flash_assign_kernel": one stream by (b))  31.4
     FK.d512k4096       N 131072, D 512, K 4096, one core (the table)                                  15.8
     FK.d256k16384      N 262144, D 256, K 16384, one core (the table)                                125.1
     FK.d256k4096.nc2   N 262144, D 256, K 4096, make_assign_kernel(2) [nl.nc(2)], two cores (NCL(50)) 15.7
   5 points by (b) (loop counts, or the two-program launch). Not points: the end-to-end Lloyd figures (2.15-2.25
   ms/iteration per worker: a loop of several launches through torch-xla), the torch-xla column (not NKI), the
   large-K path's TFLOP/s (no latency published) and bench_kmeans_nki_large.py's full-chip targets (four processes);
   bench_knn_nki.py's "about 3.7 ms" top-k figure (approximate, "on one LNC2" without the launch it used: the timing
   kind and cores are not evident).
   (a), SBUF bytes per partition as written: cT resident 2 K D / 128 (8192 D128 K4096, 16384 D256 K4096, 32768 D512
   K4096, 65536 D256 K16384), the c_sq tile 4 K on partition 0 (16384 or 65536), x^T 256 D / 128, the broadcast and
   score tiles 2048 each, [128, 8] and [128, 1] tiles: at most about 135800 (D256 K16384) of 212984; PSUM: the
   [128, 512] fp32 accumulator (one bank). All five fit.
   Choices (in addition to the source-1 ones where they apply): NKI 0.7 form; nl.affine_range / nl.static_range
   loops as Python `range` in the published order (static_range unrolled: the same instructions), tiles allocated
   where written (cT, c_sq once; x^T, best_val, best_idx per point tile; acc, csq_bc, sim, top, idx and the small
   tiles per centroid tile; best_val / best_idx rebound to the new tiles as written); nl.load / nl.store = one
   dma_copy each; `nl.full` / `nl.zeros` of an SBUF tile = one memset each (the PSUM acc: no memset, the first
   matmul accumulate=False, v8's rule); `nl.broadcast_to(c_sq[:, kt tile], (128, 512))` = one partition broadcast
   of that [1, 512] slice into a new [128, 512] fp32 SBUF tile per (point tile, centroid tile), as written (on
   TensorE, the emulator's nl.broadcast_to; not hoisted out of the point loop); scalar_tensor_tensor, max8,
   nc_find_index8 (uint32 indices), tensor_scalar, greater, where (a select) and maximum = one VectorE instruction
   each, into new tiles (upd fp32 1.0 / 0.0). Modeling (not done): trn2, time_cores 1, tile_buffers None, `bench`
   (the trn2 bench term of the model that unseals them), LNC=1 except FK.d256k4096.nc2 (LNC=2), k = point tiles
   (the outer loop; the resident centroid loads are the prologue), slices k = 2, 4 extrapolated to N / 128 (for the
   nc2 point 1 and 2 tiles per core), the benchmark's inputs.
   Added with the kernel (after this selection, e38f504; nothing modeled; no choice added): fk_assign returns the
   float64 argmax's indices exactly on 4 point tiles with K = 1024 and on 2 point tiles at every published D and K
   (the nc2 point as an LNC=2 launch, each program its half of the tiles), keeps the first of two equal centroids, and
   the emulator's allocation peaks per program at the published D and K are 29016 (D128 K4096), 37464 (D256 K4096;
   37460 per program at LNC=2), 54360 (D512 K4096), 135768 (D256 K16384) B of 212984, one PSUM bank.
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import P_MAX

from .kernels_v8 import median   # the rule's median of several reports
from .kernels_v12 import lab6_case_name, lab6_spec   # the lab 6 harness's case names and point specs

# Jingfeng0705/cs152_lab6@a635a9f nki_conv2d/reports/fleet_performance_test_report.json, benchmark_time (nc_latency
# P50, µs) of every fleet case, keyed by point id; the case name follows each id in the docstring.
CR_REPORTS_US = {
    "CR.c128k128f3b16s66.fp16": (1121.0,), "CR.c128k128f5b16s36.fp16": (1483.0,),
    "CR.c128k256f3b4s34.fp32": (504.0,), "CR.c128k256f3b4s66.fp16": (557.0,), "CR.c128k256f3b16s34.fp32": (1840.0,),
    "CR.c128k256f5b4s36.fp32": (2162.0,), "CR.c128k256f5b16s36.fp16": (2899.0,), "CR.c256k256f3b4s34.fp32": (989.0,),
    "CR.c256k256f3b16s34.fp16": (2145.0,), "CR.c256k256f5b4s36.fp16": (2169.0,),
    "CR.c256k256f5b16s36.fp16": (7901.0,),
}
# Source 2: FlashML-org/flashlib@efe7972 benchmarks/micro/bench_kmeans_nki.py docstring (nc_latency P50 / NCL(50), µs)
FK_REPORTS_US = {
    "FK.d128k4096": (31300.0,), "FK.d256k4096": (31400.0, 31400.0), "FK.d512k4096": (15800.0,),
    "FK.d256k16384": (125100.0,), "FK.d256k4096.nc2": (15700.0,),
}


# ------------------------------------------------------------------------------ CS152 lab 6 row-wise conv2d (trn1)
# out[n, k, r, q] = sum_{c, i, j} W[k, c, i, j] X[n, c, r + i, q + j] + bias[k] (module docstring, A): the filter
# resident from element-strided transposing loads; per output row one [128, OW] X load and one matmul per (c tile,
# tap), the bias added on the PSUM row's copy out, one store per output row.

CR_TILE_C = P_MAX             # c_in_tile: input channels per tile (the partitions of w and of every X row tile)
CR_TILE_K = P_MAX             # c_out_tile: output channels per tile (the stationary width)


@nki.jit
def cr_conv2d(x, w, bias):
    """CR.*: valid 2-D convolution, stride 1, X [N, C, IH, IW], W [K, C, F, F], bias [K] in one dtype (fp16 / fp32),
    out [N, K, OH, OW] in that dtype; the published data flow (module docstring, A): w [128 c, 128 k, K / 128,
    C / 128, F, F] resident (one element-strided transposing DMA per (k tile, c tile, tap)); per (image, k tile) the
    bias column; per output row a [128, OW] fp32 PSUM row accumulated over (c tile, tap), each product reading a
    freshly loaded X row; one VectorE bias add out of PSUM and one store per output row."""
    n_img, c_in, ih, iw = x.shape
    k_out, _, fh, fw = w.shape
    oh, ow = ih - fh + 1, iw - fw + 1
    n_tc, n_tk = c_in // CR_TILE_C, k_out // CR_TILE_K
    out = nl.ndarray((n_img, k_out, oh, ow), dtype=x.dtype, buffer=nl.shared_hbm)
    bias_col = bias.reshape((k_out, 1))
    w_sb = nl.ndarray((CR_TILE_C, CR_TILE_K, n_tk, n_tc, fh, fw), dtype=w.dtype, buffer=nl.sbuf)
    for i_tk in range(n_tk):
        for i_tc in range(n_tc):
            for i in range(fh):
                for j in range(fw):
                    w_kc = w[i_tk * CR_TILE_K:(i_tk + 1) * CR_TILE_K, i_tc * CR_TILE_C:(i_tc + 1) * CR_TILE_C, i, j]
                    nisa.dma_copy(dst=w_sb[:, :, i_tk, i_tc, i, j], src=w_kc.permute((1, 0)))
    for i_n in range(n_img):
        for i_tk in range(n_tk):
            ks = slice(i_tk * CR_TILE_K, (i_tk + 1) * CR_TILE_K)
            b_col = nl.ndarray((CR_TILE_K, 1), dtype=bias.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=b_col, src=bias_col[ks])
            for r in range(oh):
                row_psum = nl.ndarray((CR_TILE_K, ow), dtype=nl.float32, buffer=nl.psum)
                for i_tc in range(n_tc):
                    for i in range(fh):
                        for j in range(fw):
                            x_row = nl.ndarray((CR_TILE_C, ow), dtype=x.dtype, buffer=nl.sbuf)
                            nisa.dma_copy(dst=x_row,
                                          src=x[i_n, i_tc * CR_TILE_C:(i_tc + 1) * CR_TILE_C, r + i, j:j + ow])
                            nisa.nc_matmul(row_psum, w_sb[:, :, i_tk, i_tc, i, j], x_row,
                                           accumulate=not (i_tc == 0 and i == 0 and j == 0))
                res = nl.ndarray((CR_TILE_K, ow), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=res, data=row_psum, op0=nl.add, operand0=b_col, engine=nisa.vector_engine)
                nisa.dma_copy(dst=out[i_n, ks, r, :], src=res)
    return out


CR_CASES = {       # point id -> (C, K, filter, N, input side, dtype), the fleet case of the same name
    "CR.c128k128f3b16s66.fp16": (128, 128, 3, 16, 66, "float16"),
    "CR.c128k128f5b16s36.fp16": (128, 128, 5, 16, 36, "float16"),
    "CR.c128k256f3b4s34.fp32": (128, 256, 3, 4, 34, "float32"),
    "CR.c128k256f3b4s66.fp16": (128, 256, 3, 4, 66, "float16"),
    "CR.c128k256f3b16s34.fp32": (128, 256, 3, 16, 34, "float32"),
    "CR.c128k256f5b4s36.fp32": (128, 256, 5, 4, 36, "float32"),
    "CR.c128k256f5b16s36.fp16": (128, 256, 5, 16, 36, "float16"),
    "CR.c256k256f3b4s34.fp32": (256, 256, 3, 4, 34, "float32"),
    "CR.c256k256f3b16s34.fp16": (256, 256, 3, 16, 34, "float16"),
    "CR.c256k256f5b4s36.fp16": (256, 256, 5, 4, 36, "float16"),
    "CR.c256k256f5b16s36.fp16": (256, 256, 5, 16, 36, "float16"),
}


def cr_case_name(pid):
    """The harness's fleet case name of a CR point (the lab 6 harness's format, as for the v12 CV points)."""
    return lab6_case_name(CR_CASES[pid])


_CR_SRC = ("CS152 lab 6 (spring 2026, trn1 NeuronCore-v2), Jingfeng0705/cs152_lab6@a635a9f "
           "nki_conv2d/reports/fleet_performance_test_report.json (nki.benchmark nc_latency P50, bench): ")


def _cr(pid):
    """One POINT_SPECS entry (`kernels_v12.lab6_spec`: trn1, `bench` = the report's P50, one core, the compiler's
    tile buffers, slices of k = 1, 2 images extrapolated to N)."""
    return lab6_spec(pid, CR_CASES[pid], CR_REPORTS_US[pid], "conv2d_rows", cr_conv2d, _CR_SRC,
                     "filter resident (element-strided transposing loads); per output row one [128, OW] X load + "
                     "one matmul per (c tile, tap), bias add out of PSUM, one row store; k = images")


POINT_SPECS = tuple(_cr(pid) for pid in CR_REPORTS_US)


# ------------------------------------------------------------------------ source 2: flashlib k-means assign (trn2)
# out_idx[m] = argmax_k (2 x[m] . c[k] - c_sq[k]) (module docstring, "Source 2", B): centroids resident, per 128-point
# tile a running argmax over 512-centroid tiles (nc_matmul over D tiles, partition-broadcast c_sq, one
# scalar_tensor_tensor, max8 + nc_find_index8, select / maximum), one [128, 1] int32 store per point tile.

FK_TILE_M = P_MAX             # MT: points per tile (the stationary free size)
FK_TILE_K = 512               # BK: centroids per streamed tile (the moving free size, one fp32 PSUM bank)
FK_NEG = -3.0e38              # the published running-max sentinel, below any score


@nki.jit
def fk_assign(x_t, c_t, c_sq, n_shards=1):
    """FK.*: nearest-centroid index of every point, x_t [Dp, N] bf16 (x^T), c_t [Dp, Kp] bf16 (c^T), c_sq [1, Kp]
    fp32 -> out_idx [N, 1] int32; the published data flow (module docstring, "Source 2", B). n_shards > 1: an LNC
    launch of that many programs, program p taking the p-th contiguous block of point tiles."""
    d_p, n = x_t.shape
    k_p = c_t.shape[1]
    n_dt, n_kt = d_p // P_MAX, k_p // FK_TILE_K
    per = n // FK_TILE_M // n_shards
    m_base = nl.program_id(0) * per if n_shards > 1 else 0
    out_idx = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    ct_sb = nl.ndarray((P_MAX, n_dt, k_p), dtype=c_t.dtype, buffer=nl.sbuf)
    for i in range(n_dt):
        nisa.dma_copy(dst=ct_sb[:, i, :], src=c_t[i * P_MAX:(i + 1) * P_MAX, :])
    csq_sb = nl.ndarray((1, k_p), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=csq_sb, src=c_sq)
    for i_m in range(per):
        m0 = (m_base + i_m) * FK_TILE_M
        x_sb = nl.ndarray((P_MAX, n_dt, FK_TILE_M), dtype=x_t.dtype, buffer=nl.sbuf)
        for i in range(n_dt):
            nisa.dma_copy(dst=x_sb[:, i, :], src=x_t[i * P_MAX:(i + 1) * P_MAX, m0:m0 + FK_TILE_M])
        best_val = nl.full((FK_TILE_M, 1), FK_NEG, dtype=nl.float32, buffer=nl.sbuf)
        best_idx = nl.zeros((FK_TILE_M, 1), dtype=nl.int32, buffer=nl.sbuf)
        for i_k in range(n_kt):
            k0 = i_k * FK_TILE_K
            acc_psum = nl.ndarray((FK_TILE_M, FK_TILE_K), dtype=nl.float32, buffer=nl.psum)
            for i in range(n_dt):
                nisa.nc_matmul(acc_psum, x_sb[:, i, :], ct_sb[:, i, k0:k0 + FK_TILE_K], accumulate=i > 0)
            csq_bc = nl.broadcast_to(csq_sb[:, k0:k0 + FK_TILE_K], (FK_TILE_M, FK_TILE_K))
            sim = nl.ndarray((FK_TILE_M, FK_TILE_K), dtype=nl.float32, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=sim, data=acc_psum, op0=nl.multiply, operand0=2.0, op1=nl.subtract,
                                      operand1=csq_bc)
            top = nl.ndarray((FK_TILE_M, 8), dtype=nl.float32, buffer=nl.sbuf)
            nisa.max8(dst=top, src=sim)
            idx = nl.ndarray((FK_TILE_M, 8), dtype=nl.uint32, buffer=nl.sbuf)
            nisa.nc_find_index8(dst=idx, data=sim, vals=top)
            tile_idx = nl.ndarray((FK_TILE_M, 1), dtype=nl.int32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=tile_idx, data=idx[:, 0:1], op0=nl.add, operand0=k0, engine=nisa.vector_engine)
            upd = nl.ndarray((FK_TILE_M, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=upd, data1=top[:, 0:1], data2=best_val, op=nl.greater, engine=nisa.vector_engine)
            best_idx = nl.where(upd, tile_idx, best_idx)
            new_val = nl.ndarray((FK_TILE_M, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=new_val, data1=top[:, 0:1], data2=best_val, op=nl.maximum,
                               engine=nisa.vector_engine)
            best_val = new_val
        nisa.dma_copy(dst=out_idx[m0:m0 + FK_TILE_M, :], src=best_idx)
    return out_idx


FK_CASES = {       # point id -> (N, D, K, cores): the published shape and launch
    "FK.d128k4096": (262144, 128, 4096, 1), "FK.d256k4096": (262144, 256, 4096, 1),
    "FK.d512k4096": (131072, 512, 4096, 1), "FK.d256k16384": (262144, 256, 16384, 1),
    "FK.d256k4096.nc2": (262144, 256, 4096, 2),
}


def fk_prep(x, c):
    """The benchmark's operands (prep_assign, no padding at these shapes): x^T and c^T as bf16, c_sq = sum_d c^2 from
    the fp32 c, [1, K] fp32."""
    import ml_dtypes
    import numpy as np
    return (np.ascontiguousarray(x.T).astype(ml_dtypes.bfloat16), np.ascontiguousarray(c.T).astype(ml_dtypes.bfloat16),
            (c.astype(np.float32) ** 2).sum(axis=1, dtype=np.float32)[None, :])


def _fk_make(pid):
    """make(k, rng, d=, kk=): k point tiles (128 k points), x and c standard normal fp32 as the benchmark draws them,
    prepared by fk_prep; D and K as published unless given (small shapes for the tests); the nc2 point adds the LNC=2
    launch (kwargs lnc=2, n_shards=2)."""
    import numpy as np
    _, d0, k0, cores = FK_CASES[pid]

    def make(k, rng, d=d0, kk=k0):
        x = rng.standard_normal((FK_TILE_M * k, d), dtype=np.float32)
        c = rng.standard_normal((kk, d), dtype=np.float32)
        return fk_prep(x, c), ({"lnc": cores, "n_shards": cores} if cores > 1 else {})
    return make


def ref_assign(x_t, c_t, c_sq, **_launch):
    """argmax_k (2 x . c_k - c_sq[k]) in float64 from the bf16 operands (the first index of a tie), [N, 1]."""
    import numpy as np
    score = 2.0 * (x_t.astype(np.float64).T @ c_t.astype(np.float64)) - c_sq.astype(np.float64)
    return score.argmax(axis=1)[:, None]


_FK_SRC = ("flashlib k-means assign (trn2), FlashML-org/flashlib@efe7972 benchmarks/micro/bench_kmeans_nki.py "
           "docstring (nki.benchmark / neuron-bench nc_latency P50, bench)")


def _fk(pid):
    """One POINT_SPECS entry for source 2: trn2, `bench` (P50), time_cores 1 (one physical core per program, as the
    source states), tile_buffers None, modeled on slices of k = 2, 4 point tiles extrapolated to N / 128."""
    n, d, k, cores = FK_CASES[pid]
    return dict(id=pid, name="kmeans_assign", shape=f"N{n} D{d} K{k} bf16" + (f", LNC={cores}" if cores > 1 else ""),
                target="trn2", measured_us=median(FK_REPORTS_US[pid]), source=_FK_SRC, kernel=fk_assign,
                make=_fk_make(pid), k_full=n // FK_TILE_M, k_model=(2, 4), reference=ref_assign, timing="bench",
                time_cores=1, tile_buffers=None,
                notes="centroids resident; per 128-point tile a running argmax over 512-centroid tiles (matmul over "
                      "D tiles, c_sq partition broadcast, max8 + find_index8); k = point tiles"
                      + (f", {cores} programs (LNC={cores})" if cores > 1 else ""))


POINT_SPECS = (*POINT_SPECS, *[_fk(pid) for pid in FK_REPORTS_US])
