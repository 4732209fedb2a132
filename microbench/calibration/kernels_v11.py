"""v11 sealed calibration points: the selection, committed before any of these kernels was re-written (the published
latencies were known; nothing here has been modeled, and nothing may be until the round that re-fits the trn2 model
after v10 has frozen it: points.py docstring, "v8 sealed points" and "v11 sealed points"). The kernels follow in
later commits from the published code (read for data flow, never copied); the choices the published code leaves to
the compiler are written below, in this commit, before any kernel exists.

Why: every trn2 point is modeled (the v9 sealed points were unsealed at the v10 freeze), so the next trn2 round (a
short-row DMA mechanism: 512 B - 1 KiB rows, docs/cost-model.md "v9 and v10 rounds") has nothing held out to be
judged on. Every DMA of this operator moves 512 B rows (q / k / v tiles are [128, 128] fp32 slices of wider HBM
rows; each output tile is 128 rows of 512 B), which is the regime that round changes.

Source and rule: the v9 rule unchanged (kernels_v9.py docstring; the v8 rule of kernels_v8.py), applied to operator
11 of the v8 order, the last one it reserved: every benchmark.csv row of Jerry2423/kda-for-trainium@90770f2
(workspaces/gqa_full/benchmark.csv; trn2, one core, `--disable-dge --logical-nc-config=1`, "p50 on-device latency"
taken as `prof`, no launch term) with passed=true, a latency and a candidate file under workspaces/gqa_full/runs/,
except (i) the NKIBench baselines, (ii) mamba, (iii) probe / diagnostic / offline files and rows that name no file;
(a) the program runs as written (every SBUF / PSUM tensor it allocates fits the trn2 core: 16 KiB PSUM and, as
corrected below, 212984 B of usable SBUF per partition; allocation arithmetic here, the emulator's allocation check
when the kernel is written; nothing modeled), (b) one point per distinct instruction stream (one instruction per
nisa / nl compute call, one DMA per nl.load / nl.store, dtypes and order as written); several rows of one stream ->
the median of their latency_ms; the notes' extra figures are not used. Exclusion (iii) is judged by the candidate
file's name, as in v9 (rmsnorm_matmul_probe_*): rows whose notes call the run a probe or sweep evidence but whose
file is an ordinary candidate (KG.m8 gqa_full_v4_msub8.py, "SPILL PROBE"; KG.v7m1 / KG.v7m4, "M_SUB re-probe")
stay points.

11. gqa_full: grouped-query full (non-causal) softmax attention, B 1, N 4096, QH 16, KH 8 (query head qh reads kv
   head kh = qh // 2), D 128 fp32: out[qh] = softmax(q[qh] k[kh]^T / sqrt(D)) v[kh], presented as v1 = q
   (32, 128, 16, 128) [t_q, p, qh, d], v2 = k (1, 8, 4, 128, 8, 128) [0, a, b, c, kh, d] (key n = 128 (4 a + b) +
   c), v3 = v (1, 32, 128, 1024) [0, t_v, p, kh * 128 + d], out (1, 8, 2, 32, 128, 128) [0, kh, grp, t_q, p, d]
   (qh = 2 kh + grp). Every kernel: the [128, 128] identity loaded once; per kv head kh the 32 k subtiles loaded
   ([128, 128] each), PE-transposed and copied into a resident k_t [128, 4096], v loaded as 32 [128, 128] tiles
   into a resident v_sb [128, 4096]; per (grp, query tile t_q) q loaded [128, 128], PE-transposed and copied to
   q_t; the [128, 4096] score row from 8 K = 128 matmuls (one 512-wide PSUM bank each); the row softmax; the 32
   [128, 128] probability subtiles PE-transposed and copied; the context O = sum_j A_t[j]^T v_sb[:, j] accumulated
   in one [128, 128] PSUM tile over the 32 key subtiles; eviction; one [128, 128] store. Every row, latency_ms:
     KG.v1   gqa_full_v1: per key subtile j interleaved transpose -> copy -> context matmul; softmax in the
             reference order: score *= 1 / sqrt(D) (VectorE tensor_scalar, in place), tensor_reduce(max,
             negate=True), ScalarE exp with the -max bias, VectorE add-reduce, reciprocal, attn = exp * recip
             (VectorE tensor_scalar into a new [128, 4096] tile); copy eviction                    10.6579 ms
     KG.v2   gqa_full_v2_twophase: KG.v1 with the context two-phase: the 32 transposes copied into a resident
             a_t_bank [128, 4096] first, then the 32 matmuls                                       10.5204 ms
     KG.sf   gqa_full_v3a_scalefold: KG.v2 without the full-width scale: the max on the unscaled score, its
             negation scaled by a [128, 1] tensor_scalar, exp with scale = 1 / sqrt(D) and that bias   9.6523 ms
     KG.dn   gqa_full_v3b_defernorm: KG.v2 with the normalisation deferred: no attn tile, the transposes read
             exp_t, the eviction a VectorE tensor_scalar O * recip reading PSUM                    8.6820 ms
     KG.v3   gqa_full_v3c_scalefold_defernorm (7.7904) and gqa_full_v4_msub1 (7.7902): both folds; v4_msub1
             is the query-tile-block form at block width 1 (a_t_bank and a [128, 1] recip tile allocated per
             block, before the tile's work; the same instructions in the same order: one stream by (b)): median
             7.7903 ms
     KG.m2   gqa_full_v4_msub2: KG.v3 in blocks of M_SUB = 2 query tiles: per block both tiles' score,
             softmax and 32 transposes into a [128, 2 x 4096] a_t_bank (recip [128, 2]), then both tiles'
             32 context matmuls, eviction and store                                                 7.5276 ms
     KG.m4   gqa_full_v4_msub4: M_SUB = 4                                                           7.5470 ms
     KG.m8   gqa_full_v4_msub8: M_SUB = 8 (a_t_bank [128, 8 x 4096]; restored by the correction below)
                                                                                                    7.5448 ms
     KG.v5   gqa_full_v5_scoresplit: KG.m2 with the score matmul as the compensated bf16 3-product split:
             per kv head k_t_hi = bf16 copy of k_t, k_t_lo = bf16(k_t - hi) (one VectorE subtract writing
             bf16), both [128, 4096]; per tile q_t limbs the same way ([128, 128]); per chunk hi.hi, hi.lo,
             lo.hi into one PSUM bank                                                               7.1907 ms
     KG.v6   gqa_full_v6_nomax: KG.v5 without the max: no tensor_reduce(max), no bias scaling; exp with
             scale = 1 / sqrt(D) and no bias                                                        5.9949 ms
     KG.v7   gqa_full_v7a_exp_from_psum: KG.v6 with the exp read from each chunk's PSUM bank into its slice of
             exp_t (no score tile, no score copies)                                                 4.3109 ms
     KG.v7m1 gqa_full_v7a_msub1: KG.v7 with M_SUB = 1                                               4.3752 ms
     KG.v7m4 gqa_full_v7a_msub4: KG.v7 with M_SUB = 4                                               4.7965 ms
     KG.v8   gqa_full_v8_ctxsplit: KG.v7 with the context matmul split too: per kv head v_sb limbs (bf16 hi
             copy, bf16 subtract) [128, 4096]; per transposed subtile the hi copy and the lo subtract read the
             transpose PSUM tile directly into a_t_bank_hi / a_t_bank_lo (bf16 [128, 2 x 4096] each); per j
             3 products (hi.hi, hi.lo, lo.hi) into o_psum                                          4.2878 ms
   Not points: gqa_full_v7b_fused_rowsum (passed=false, 6.3952: the rule takes passed=true rows only);
   offline_nomax_regime_sim, offline_score_bf16_split_sim (exclusion (iii), no row); the NKIBench baseline
   gqa_full_B1_N4096_QH16_KH8_D128_0.py (a parent, no row; exclusion (i); it is A10's stream).
   [Dropped in the first commit of this selection (342991f), restored by the correction below:]
   gqa_full_v4_msub8 (7.5448 ms): as written its block holds a_t_bank [128, 8 x 4096] fp32 (131072 B per partition)
   with the resident identity, k_t, v_sb (33280 B) and, while one tile's exp runs, that tile's score and exp_t
   (32768 B) plus the recip [128, 8], -max and scaled -max tiles (40 B): 197160 B > 196608 even counting only the
   tiles live at that instruction (198188 B counting every tile of its scope). The published row itself says
   "despite ~194 KB/part predicted a_t_bank residency it did NOT spill ... usable SBUF ~208 KB", and the published
   accounting (workspaces/gqa_full/docs/phase2-sbuf-psum-accounting.md) lists M_SUB 8 at ~194 KB, ">100%" of 192 KB:
   the compiler must have placed some tile otherwise (e.g. exp over score) [wrong: 196608 B is not trn2's capacity,
   see the correction].
   (a), SBUF bytes per partition as written, every tile of a scope counted live (identity 512; per kv head k_t, v_sb
   16384 each, KG.v5-v8 k_t limbs 16384, KG.v8 v_sb limbs 16384; per block a_t_bank 16384 per tile (KG.v8: its two
   bf16 limb banks, the same bytes) and recip 4 per tile; per query tile q_sb, q_t 512 each, q_t limbs 512 (split),
   score 16384 (not KG.v7*/v8), exp_t 16384, attn 16384 (KG.v1 / v2 / sf), [128, 1] tiles 4 each, KG.v1's rotating
   a_t 512, o_sb 512): KG.v1 84492, KG.v2 100364, KG.sf 100368, KG.dn 83980, KG.v3 83984 (v3c file; the msub1 file
   83472), KG.m2 99860, KG.m4 132636, KG.v5 116756, KG.v6 116748, KG.v7 100364, KG.v7m1 83976, KG.v7m4 133140, KG.v8
   116748, KG.m8 198188 B (of 212984, corrected below). PSUM: [128, 128] fp32 transpose / context tiles and one
   [128, 512] score bank, at most 4 of the 8 banks live (q_t_ps, acc, a_t_ps, o_psum). All fourteen fit.
All 14 points sealed, `prof`, trn2, LNC=1. This completes the v8 order (operators 1-11); any later sealed round
needs a new source, with its rule written first.

Correction (second selection commit, after the kernels were written and run on the emulator for correctness and
allocation only, before any of them landed; nothing modeled): the 192 KiB = 196608 B per partition that this
selection (and the v8 / v9 rule texts, and the KDA author's own accounting, "24 MB SBUF / 128 partitions") took for
trn2 is NeuronCore-v2's (trn1) figure. NeuronCore-v3 has 28 MiB of SBUF (224 KiB per partition: the Neuron
NeuronCore-v3 architecture page, "28MB of on-chip SRAM"; the Trainium3 guide, "32MiB (up from 28 MiB in
NeuronCore-v3)"), of which 212984 B per partition is usable (total_available_sbuf_size, ../shared/reference/
nki-api.md item 7, [U]; the emulator's trn2 capacity). Rule (a) asks whether the device ran the program as written;
at that capacity gqa_full_v4_msub8 does (the emulator's allocation check: 198700 B peak, below 212984), and its
published row agrees (no spill, HBM traffic at the read-once / write-once floor, "usable SBUF ~208 KB"). So it is
point **KG.m8** (7.5448 ms), and the selection has 14 points. No earlier drop changes: KM.b16 needs 327680 B and 16
PSUM banks, KB.lt was dropped for its 4-byte DMA transpose; only the v8 / v9 "within 3 % of capacity" flags (KT.v6,
KT.v7, KMN.*) overstate how tight those programs are.

Choices the published code leaves to the compiler or to the emulator's API (fixed here, before any kernel):
- As kernels_v9.py: NKI 0.7 form (`nisa.<op>(dst=..., ...)`); nl.affine_range loops as Python `range` in the
  published order ((a, b) of the k build as a outer, b inner; kh, grp, blk, mm, c, j); a 0.6-style
  `t = nl.ndarray(...)` allocates its tile at that point of the loop body, as written; nl.load / nl.store = one
  nisa.dma_copy of the whole tile (default static DGE, as `--disable-dge`); the identity load stays (one
  [128, 128] fp32 DMA per launch, from a host identity passed as an input, as nl.shared_constant); inputs and
  output in the presented layouts (the published reshape views).
- The PE transpose nisa.nc_matmul(tile, identity, is_transpose=True, is_moving_onezero=True) = one nc_transpose on
  TensorE into a [128, 128] fp32 PSUM tile; nl.copy (PSUM -> SBUF fp32, or to a bf16 limb) = one VectorE
  tensor_copy into the destination slice as written; nisa.tensor_scalar, tensor_reduce, tensor_tensor,
  reciprocal on VectorE; nisa.activation on ScalarE (data in SBUF, or a PSUM bank for KG.v7*/v8, as written).
- KG.v1's `score = tensor_scalar(score * scale)` = one VectorE tensor_scalar with dst = data (in place); scale =
  fp32(1 / sqrt(128)) an immediate everywhere it appears (tensor_scalar operand, activation scale);
  tensor_reduce(nl.max, negate=True) = one VectorE tensor_reduce writing -max; the bias of the exp is the
  [128, 1] tile as written (-max, or the scaled -max), none in KG.v6-v8.
- `recip[:, mm] = nisa.reciprocal(row_sum)` writes column mm of the block's [128, M_SUB] recip tile; the deferred
  eviction `o_sb = tensor_scalar(o_psum * recip[:, mm])` = one VectorE tensor_scalar reading PSUM with that
  [128, 1] column as its operand; KG.v1 / v2 / sf evict with a copy.
- Accumulators: `o_psum = nl.zeros(psum)` then `o_psum += nc_matmul(...)` over j (and products) = the first
  product accumulate=False (it overwrites the zeros; no memset instruction), the rest accumulate=True (v8's rule);
  the score split's `acc = nc_matmul(hi, hi)`, `acc += (hi, lo)`, `acc += (lo, hi)` = accumulate False, True,
  True. Every [128, 128] PSUM tile (k_t_ps, q_t_ps, a_t_ps, o_psum) and every [128, 512] score bank is its own
  PSUM tile allocated where written.
- bf16 limbs: `hi = nl.copy(x, dtype=bf16)` = one VectorE tensor_copy; `lo = nisa.tensor_tensor(x, hi, subtract,
  dtype=bf16)` = one VectorE subtract writing bf16 directly (no fp32 residual tile), as written; k_t and v_sb limbs
  as single [128, 4096] instructions once per kv head.
- KG.v3 is run in the block form at M_SUB = 1 (v4_msub1's allocation order; the v3c file's stream).
- Modeling (not done in this round): k = kv heads (published 8; each head with its 2 query heads), at the published
  shape (k_model = (k_full,)); q, k, v standard normal fp32 as NKIBench draws them (the no-max kernels KG.v6-v8 are
  exact for such inputs; values do not change the instruction stream); the trn2 single-kernel time convention of
  the model that unseals them (v10: time_cores = 2).
Added with the kernels (after this selection and its correction; nothing modeled): KG.v1-dn run as the per-tile
files (recip allocated after the row sum, a_t_bank after the softmax), the rest in the block form. The emulator's
allocation peaks on one kv head, one block of query tiles per group, at the published N and D: KG.v1 83980, v2
100364, sf 100368, dn 83980, v3 83984, m2 100372, m4 133148, m8 198700, v5 117268, v6 117260, v7 100876, v7m1 84488,
v7m4 133652, v8 100876 B of 212984, 2 PSUM banks. They are within 512 B of the arithmetic above (the emulator counts
tiles by allocation site and by first-to-last use, not by the scopes the arithmetic assumes), except KG.v8, 15872 B
lower: its fp32 v_sb is dead once split into limbs. No choice was added.

Source 2 (selection committed after the KG points landed, before any of its kernels was re-written; the published
latencies were known, nothing modeled). Search: the three repositories kernels_v7.py listed as not examined, fetched
at their newest snapshots: yohan278/io-aware-attention-trainium@77c015f times PyTorch / XLA modules (no NKI
program): out. Willy-Chan/trainium-linear-attention@acd2573 has NKI kernels and benchmark scripts but publishes no
latency (README, no result file): out. allenkchau/trainium-kernel-fusion@d709ddf (CS 217 project, "fused GEMM +
Softmax" attention and "fused GEMM + GELU" MLP) publishes nki.benchmark latencies with the exact code: qualifies.
Rule (the v6 rule, kernels_v6.py, for `bench` sources): every published latency of an NKI kernel in that
repository whose hardware is stated and whose exact code (the program the device ran) is published at the commit
that published the figure, except probes and programs not in the repository; (a) and (b) as above; `bench` =
nki.benchmark nc_latency **P99** (as the v6 CS149 and the Autocomp points); several reports of one configuration ->
their median. Facts: profiling/reports/summary_<ts>.json records "target": "trn2"; the harness
(benchmarks/full_attention_study.py) compiles with --target=trn2 and sets NEURON_LOGICAL_NC_CONFIG=2 by default
(os.environ.setdefault) before benchmarking; the kernels take no launch grid (one program, one core's
instructions; the time convention is the unsealing model's, v10: time_cores = 2); warmup 5, iters 20
(summary_20260307T073830Z.json; the S = 512 second run, summary_20260307T073617Z.json: warmup 3, iters 10). A
third run, 20260307T075335Z, left only plots (profiling/reports/figures/summary_20260307T075335Z/*.png: no csv or
json, no P99 figure): not a source. Order: A
attention (the 2026-03-07 study, 71713d4; kernels last changed at 9812be8, 2026-03-07 06:29 UTC, before both
runs, 07:36:17 and 07:38:30 UTC) now; B the MLP study (2026-03-10 17:23 UTC, c221ee8; kernels/fused/mlp.py at
3714516, kernels/baseline/mlp_gemm.py at 9b7c5d7; 3 kernels x 2 dtypes x 5 shapes = 30 rows) stays reserved,
un-modeled, for a later round (same rule).

A. attention: out = softmax(q^T k) v^T (no scale), q, k, v [D = 128, S] in the input dtype, out [S, D] in the input
   dtype; S = 512, 1024, 2048, 4096; fp32 and bf16 inputs (uniform in [-1, 1)). Every kernel loads q, k, v whole
   ([128, S], one DMA each); per 128-query tile the [128, S] fp32 score row from S / 512 matmuls (stationary q
   columns, moving k columns, one PSUM bank each) and their copies; per 512-wide chunk a max reduce into a [128,
   S / 512] partial tile, the max of those negated; per chunk a ScalarE exp with that bias and an add reduce into a
   partial-sum tile; the row sum, its reciprocal; the S / 128 probability subtiles transposed on PE and copied;
   S / 128 accumulating PV matmuls (stationary transposed probabilities, moving transposed v) into one [128, 128]
   PSUM tile; v transposed once into v_t [128, S / 128, 128] fp32.
     AF.b.<dtype>.<S>  kernels/baseline/attention.py baseline_attention: three phases through an internal fp32 HBM
                       tensor [S / 128, 128, S]: scores stored per tile; reloaded, softmax with the normalisation a
                       VectorE tensor_scalar per 512-wide chunk, stored over the scores; v transposed, then per tile
                       the probabilities reloaded, transposed, PV, copy eviction, store
     AF.f.<dtype>.<S>  kernels/fused/attention.py fused_attention: v transposed first; per tile scores, softmax
                       without the normalisation, transposes, PV, eviction a VectorE tensor_scalar * 1 / row sum,
                       store (no HBM intermediate)
   P99 nc_latency, µs (latency_throughput_20260307T073830Z.csv; at S = 512 also latency_throughput_
   20260307T073617Z.csv, a second run of the same code: median of the two):
     fp32  b: 512 median(53, 52) = 52.5, 1024 109, 2048 275, 4096 1140;  f: 512 median(32, 32) = 32, 1024 71,
           2048 218, 4096 840
     bf16  b: 512 median(48, 47) = 47.5, 1024 98, 2048 260, 4096 1037;   f: 512 median(29, 28) = 28.5, 1024 61,
           2048 189, 4096 686
   16 points by (b) (S changes every loop's count; the dtype changes the loads, the QK matmuls, the transposes of v
   and the stores). Not points: the neuron-profile runs (profiling/artifacts/*, nki.profile at S 512 / 1024: their
   json reports hold no latency the rule takes), kernels/baseline/softmax.py (no published figure).
   (a), SBUF bytes per partition at S = 4096 fp32, every tile counted live at once: q, k, v 3 x 16384; baseline
   tiles of the three phases (qk_buf 16384; s_tile, exp_tile, weight_tile 3 x 16384; partial tiles 2 x 32;
   [128, 1] tiles 3 x 4; v_t, p_tile, p_t 3 x 16384; attn_out 512) 115276: 164428 B in all; fused (v_t, qk,
   exp_tile, scores_t 4 x 16384, partial and [128, 1] tiles 76, attn_out 512) 66124: 115276 B; less for bf16 and
   shorter S. Of 212984 (and of 196608): all fit. PSUM: one score bank, the
   [128, 128] transpose tiles and the PV accumulator, at most 3 of 8 banks.
   Choices (in addition to the KDA ones above where they apply): nl.load of the whole input = one dma_copy into an
   SBUF tile of the input dtype; nisa.nc_transpose of a [128, 128] tile with no engine = TensorE into a fp32 PSUM
   tile, for bf16 data too; nisa.tensor_copy with no engine = VectorE; tensor_reduce(max / add, axis=1) into a
   column of the partial tile = one VectorE tensor_reduce writing that [128, 1] column; nisa.activation(exp,
   bias=neg_max, scale=1.0) per chunk = one ScalarE activation; reciprocal VectorE; `attn_psum = nl.zeros(psum)`
   then `+=` = first product accumulate=False (v8's rule); the internal score tensor = one nl.ndarray in
   shared_hbm, written by stores and read by loads in the published phase order; the bf16 runs' fp32 output tile
   stored into the bf16 output = one dma_copy that casts, as written. Modeling (not done): each point at its
   published shape (k = query tiles, k_full = S / 128: one launch per point; the harness's inputs, uniform in
   [-1, 1)), `bench` timing.
   Added with the kernels (nothing modeled): one choice corrected: nisa.nc_transpose returns a tile of its data's
   dtype (NKI 0.6; the emulator, as NKI 0.7, refuses another PSUM dtype), so the bf16 runs' v subtiles go through a
   bf16 PSUM tile before the fp32 copy (the choice above said fp32); the fp32 probability transposes are
   unchanged. The emulator's allocation peaks at S = 4096: AF.b.fp32 131588, AF.f.fp32 82436, AF.b.bf16 123396,
   AF.f.bf16 74244 B of 212984 (below the arithmetic above: each phase's tiles die before the next phase), 2 PSUM
   banks.
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import P_MAX
from .kernels_v8 import PSUM_FP32_BANK, median   # one 2 KiB PSUM bank of fp32; the rule's median of several reports
from .kernels_v9 import _KDA_SRC, _normal   # the KDA source line; standard normal fp32 inputs

# Published latency_ms of every benchmark.csv report of a point, as the selection above lists them.
KDA_REPORTS_MS = {
    "KG.v1": (10.6579,), "KG.v2": (10.5204,), "KG.sf": (9.6523,), "KG.dn": (8.6820,), "KG.v3": (7.7904, 7.7902),
    "KG.m2": (7.5276,), "KG.m4": (7.5470,), "KG.m8": (7.5448,), "KG.v5": (7.1907,), "KG.v6": (5.9949,),
    "KG.v7": (4.3109,), "KG.v7m1": (4.3752,), "KG.v7m4": (4.7965,), "KG.v8": (4.2878,),
}

# Source 2 (allenkchau/trainium-kernel-fusion): published P99 nc_latency of every report, µs, as selected above.
AF_REPORTS_US = {
    "AF.b.fp32.512": (53.0, 52.0), "AF.b.fp32.1024": (109.0,), "AF.b.fp32.2048": (275.0,), "AF.b.fp32.4096": (1140.0,),
    "AF.f.fp32.512": (32.0, 32.0), "AF.f.fp32.1024": (71.0,), "AF.f.fp32.2048": (218.0,), "AF.f.fp32.4096": (840.0,),
    "AF.b.bf16.512": (48.0, 47.0), "AF.b.bf16.1024": (98.0,), "AF.b.bf16.2048": (260.0,), "AF.b.bf16.4096": (1037.0,),
    "AF.f.bf16.512": (29.0, 28.0), "AF.f.bf16.1024": (61.0,), "AF.f.bf16.2048": (189.0,), "AF.f.bf16.4096": (686.0,),
}


# ------------------------------------------------------------------------------------------------ gqa_full (trn2)
# out[0, kh, grp, t_q] = softmax(q[t_q, :, qh] k[kh]^T / sqrt(D)) v[kh] for qh = rep * kh + grp, from the presented
# layouts (module docstring). A variant is (ctx, softmax, defer, m_sub, split):
#   ctx: "inter" (per key subtile transpose -> copy -> context matmul) or "two" (all transposes into a resident
#   a_t_bank, then the context matmuls); softmax: "ref" (full-width score * scale, max, exp with -max),
#   "fold" (max on the unscaled score, scaled -max bias, exp with scale), "nomax" (exp with scale, no bias),
#   "psum" (nomax, the exp read from each score bank; no score tile); defer: normalise O at eviction (else attn =
#   exp * recip before the transposes, copy eviction); m_sub: query tiles per block (None: the per-tile files
#   v1 / v2 / v3a / v3b, whose recip and a_t_bank are allocated where they write them); split: bf16 3-product
#   split of the score matmul ("score") or of the score and context matmuls ("both").
KG_VARIANTS = {
    "KG.v1": ("inter", "ref", False, None, ""),
    "KG.v2": ("two", "ref", False, None, ""),
    "KG.sf": ("two", "fold", False, None, ""),
    "KG.dn": ("two", "ref", True, None, ""),
    "KG.v3": ("two", "fold", True, 1, ""),
    "KG.m2": ("two", "fold", True, 2, ""),
    "KG.m4": ("two", "fold", True, 4, ""),
    "KG.m8": ("two", "fold", True, 8, ""),
    "KG.v5": ("two", "fold", True, 2, "score"),
    "KG.v6": ("two", "nomax", True, 2, "score"),
    "KG.v7": ("two", "psum", True, 2, "score"),
    "KG.v7m1": ("two", "psum", True, 1, "score"),
    "KG.v7m4": ("two", "psum", True, 4, "score"),
    "KG.v8": ("two", "psum", True, 2, "both"),
}
GQA_N, GQA_KH, GQA_REP, GQA_D = 4096, 8, 2, 128     # published N, kv heads, query heads per kv head, head dim
GQA_KEY_B = 4                                      # key subtiles per index a of the presented k: n = 128 (4a + b) + c


def _limbs(x):
    """bf16 hi = copy of x, lo = bf16(x - hi) by one subtract writing bf16 (the published split)."""
    hi = nl.ndarray(x.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_copy(dst=hi, src=x)
    lo = nl.ndarray(x.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=lo, data1=x, data2=hi, op=nl.subtract)
    return hi, lo


def _products(dst, st, mv, first):
    """dst (PSUM) = st^T mv as one fp32 product, or as hi.hi + hi.lo + lo.hi when st, mv are (hi, lo) limb pairs;
    `first` = the first product overwrites (accumulate=False), the rest accumulate."""
    pairs = [(st[0], mv[0]), (st[0], mv[1]), (st[1], mv[0])] if isinstance(st, tuple) else [(st, mv)]
    for i, (a, b) in enumerate(pairs):
        nisa.nc_matmul(dst, a, b, accumulate=not (first and i == 0))


def _cols(t, c0, width):
    """Columns [c0, c0 + width) of a tile or of each tile of a limb pair."""
    return tuple(x[:, c0:c0 + width] for x in t) if isinstance(t, tuple) else t[:, c0:c0 + width]


def _pe_transpose(src, ident_sb):
    """src [128, 128] transposed on PE into a fresh [128, 128] fp32 PSUM tile."""
    ps = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=ps, data=src)
    return ps


def _gqa_softmax_rows(v1, ident_sb, t_q, qh, keys, variant, recip=None):
    """One query tile: q loaded and transposed, the score row (8 chunks of 512) and its row softmax. Returns the
    [128, N] tile the context transposes read (exp_t, or attn when not deferred) and the recip tile written (the
    given block tile's column, or a fresh [128, 1] tile allocated after the row sum as the per-tile files do)."""
    _, softmax, defer, _, split = KG_VARIANTS[variant]
    n = keys[0].shape[1] if isinstance(keys, tuple) else keys.shape[1]
    scale = 1.0 / float(GQA_D) ** 0.5
    q_sb = nl.ndarray((P_MAX, GQA_D), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=q_sb, src=v1[t_q, :, qh, :])
    q_ps = _pe_transpose(q_sb, ident_sb)
    q_t = nl.ndarray((GQA_D, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=q_t, src=q_ps)
    q_ops = _limbs(q_t) if split else q_t
    if softmax == "psum":
        exp_t = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    else:
        score = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    for c0 in range(0, n, PSUM_FP32_BANK):
        acc = nl.ndarray((P_MAX, PSUM_FP32_BANK), dtype=nl.float32, buffer=nl.psum)
        _products(acc, q_ops, _cols(keys, c0, PSUM_FP32_BANK), first=True)
        if softmax == "psum":
            nisa.activation(dst=exp_t[:, c0:c0 + PSUM_FP32_BANK], op=nl.exp, data=acc, scale=scale)
        else:
            nisa.tensor_copy(dst=score[:, c0:c0 + PSUM_FP32_BANK], src=acc)
    if softmax in ("ref", "fold"):
        if softmax == "ref":
            nisa.tensor_scalar(dst=score, data=score, op0=nl.multiply, operand0=scale)
        neg_max = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=neg_max, op=nl.maximum, data=score, axis=[1], negate=True)
        bias, act_scale = neg_max, 1.0
        if softmax == "fold":
            bias = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=bias, data=neg_max, op0=nl.multiply, operand0=scale)
            act_scale = scale
        exp_t = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=exp_t, op=nl.exp, data=score, bias=bias, scale=act_scale)
    elif softmax == "nomax":
        exp_t = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=exp_t, op=nl.exp, data=score, scale=scale)
    row_sum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=row_sum, op=nl.add, data=exp_t, axis=[1])
    if recip is None:
        recip = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=recip, data=row_sum)
    if defer:
        return exp_t, recip
    attn = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=attn, data=exp_t, op0=nl.multiply, operand0=recip)
    return attn, recip


def _gqa_transpose_all(probs, ident_sb, bank, c0, split):
    """The 32 (N / 128) probability subtiles transposed on PE into the bank(s) from column c0 (fp32 copies, or the
    hi copy and lo subtract read from the transpose PSUM tile into the two bf16 banks)."""
    for j in range(probs.shape[1] // P_MAX):
        ps = _pe_transpose(probs[:, j * P_MAX:(j + 1) * P_MAX], ident_sb)
        cols = slice(c0 + j * P_MAX, c0 + (j + 1) * P_MAX)
        if split == "both":
            nisa.tensor_copy(dst=bank[0][:, cols], src=ps)
            nisa.tensor_tensor(dst=bank[1][:, cols], data1=ps, data2=bank[0][:, cols], op=nl.subtract)
        else:
            nisa.tensor_copy(dst=bank[:, cols], src=ps)


def _gqa_context(out, kh, grp, t_q, a_t, c0, values, recip, defer):
    """O = sum over key subtiles of a_t[:, subtile]^T values[:, subtile] into one [128, D] PSUM tile, evicted
    (O * recip, or a copy), one store."""
    o_psum = nl.ndarray((P_MAX, GQA_D), dtype=nl.float32, buffer=nl.psum)
    n = values[0].shape[1] if isinstance(values, tuple) else values.shape[1]
    for j in range(n // P_MAX):
        _products(o_psum, _cols(a_t, c0 + j * P_MAX, P_MAX), _cols(values, j * P_MAX, P_MAX), first=j == 0)
    _gqa_evict(out, kh, grp, t_q, o_psum, recip, defer)


def _gqa_evict(out, kh, grp, t_q, o_psum, recip, defer):
    o_sb = nl.ndarray((P_MAX, GQA_D), dtype=nl.float32, buffer=nl.sbuf)
    if defer:
        nisa.tensor_scalar(dst=o_sb, data=o_psum, op0=nl.multiply, operand0=recip)
    else:
        nisa.tensor_copy(dst=o_sb, src=o_psum)
    nisa.dma_copy(dst=out[0, kh, grp, t_q], src=o_sb)


def _gqa_tile_inter(out, v1, ident_sb, kh, grp, t_q, qh, keys, v_sb, variant):
    """KG.v1's query tile: per key subtile transpose -> copy -> context matmul, copy eviction."""
    attn, recip = _gqa_softmax_rows(v1, ident_sb, t_q, qh, keys, variant)
    o_psum = nl.ndarray((P_MAX, GQA_D), dtype=nl.float32, buffer=nl.psum)
    for j in range(attn.shape[1] // P_MAX):
        ps = _pe_transpose(attn[:, j * P_MAX:(j + 1) * P_MAX], ident_sb)
        a_t = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=a_t, src=ps)
        nisa.nc_matmul(o_psum, a_t, v_sb[:, j * P_MAX:(j + 1) * P_MAX], accumulate=j > 0)
    _gqa_evict(out, kh, grp, t_q, o_psum, recip, defer=False)


@nki.jit
def kda_gqa(v1, v2, v3, ident, variant):
    """KG.*: grouped-query full softmax attention from the presented layouts: v1 = q [T, 128, QH, D], v2 = k
    [1, N / 512, 4, 128, KH, D], v3 = v [1, N / 128, 128, KH * D] (D = 128, fp32; the query tiles T may be fewer
    than N / 128), ident the [128, 128] fp32 identity (loaded once, as published); the published `variant`'s data
    flow (KG_VARIANTS). Returns out [1, KH, QH / KH, T, 128, D]."""
    ctx, _, defer, m_sub, split = KG_VARIANTS[variant]
    n_tq, _, n_qh, d = v1.shape
    n_kh = v2.shape[4]
    rep = n_qh // n_kh
    n = v3.shape[1] * P_MAX
    out = nl.ndarray((1, n_kh, rep, n_tq, P_MAX, d), dtype=nl.float32, buffer=nl.shared_hbm)
    ident_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ident_sb, src=ident)
    for kh in range(n_kh):
        k_t = nl.ndarray((d, n), dtype=nl.float32, buffer=nl.sbuf)
        for a in range(v2.shape[1]):
            for b in range(v2.shape[2]):
                k_sub = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
                nisa.dma_copy(dst=k_sub, src=v2[0, a, b, :, kh, :])
                col = (v2.shape[2] * a + b) * P_MAX
                nisa.tensor_copy(dst=k_t[:, col:col + P_MAX], src=_pe_transpose(k_sub, ident_sb))
        keys = _limbs(k_t) if split else k_t
        v_sb = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
        for t_v in range(n // P_MAX):
            nisa.dma_copy(dst=v_sb[:, t_v * P_MAX:(t_v + 1) * P_MAX], src=v3[0, t_v, :, kh * d:(kh + 1) * d])
        values = _limbs(v_sb) if split == "both" else v_sb
        for grp in range(rep):
            qh = rep * kh + grp
            if m_sub is None:              # the per-tile files: KG.v1 interleaved, KG.v2 / sf / dn two-phase
                for t_q in range(n_tq):
                    if ctx == "inter":
                        _gqa_tile_inter(out, v1, ident_sb, kh, grp, t_q, qh, keys, v_sb, variant)
                        continue
                    probs, recip = _gqa_softmax_rows(v1, ident_sb, t_q, qh, keys, variant)
                    a_t_bank = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
                    _gqa_transpose_all(probs, ident_sb, a_t_bank, 0, split)
                    _gqa_context(out, kh, grp, t_q, a_t_bank, 0, values, recip, defer)
                continue
            for blk in range(n_tq // m_sub):       # blocks of m_sub query tiles: build pass, then stream pass
                if split == "both":
                    bank = tuple(nl.ndarray((P_MAX, m_sub * n), dtype=nl.bfloat16, buffer=nl.sbuf) for _ in "hl")
                else:
                    bank = nl.ndarray((P_MAX, m_sub * n), dtype=nl.float32, buffer=nl.sbuf)
                recip = nl.ndarray((P_MAX, m_sub), dtype=nl.float32, buffer=nl.sbuf)
                for mm in range(m_sub):
                    probs, _ = _gqa_softmax_rows(v1, ident_sb, blk * m_sub + mm, qh, keys, variant,
                                                 recip[:, mm:mm + 1])
                    _gqa_transpose_all(probs, ident_sb, bank, mm * n, split)
                for mm in range(m_sub):
                    _gqa_context(out, kh, grp, blk * m_sub + mm, bank, mm * n, values, recip[:, mm:mm + 1], defer)
    return out


# ------------------------------------------------------------------------------------------------ point specs
# Each spec is a calibration Point's fields (points.py adds split="sealed"). make(k, rng) -> (args, kwargs): k = kv
# heads (published 8, each with its 2 query heads), N keys and query positions as published unless given (n_q:
# fewer query positions, in query tiles of 128, for the allocation check on one block).


def _gqa_make(variant):
    def make(k, rng, n=GQA_N, n_q=None):
        import numpy as np
        q = _normal(rng, (n if n_q is None else n_q) // P_MAX, P_MAX, GQA_REP * k, GQA_D)
        keys = _normal(rng, 1, n // (GQA_KEY_B * P_MAX), GQA_KEY_B, P_MAX, k, GQA_D)
        values = _normal(rng, 1, n // P_MAX, P_MAX, k * GQA_D)
        return (q, keys, values, np.identity(P_MAX, dtype=np.float32), variant), {}
    return make


def ref_gqa_presented(v1, v2, v3, *_consts):
    """softmax(q k^T / sqrt(D)) v per query head (query head qh reads kv head qh // (QH / KH)), max-shifted, in
    float64, from the presented layouts; as out [1, KH, QH / KH, T, 128, D]."""
    import numpy as np
    n_tq, _, n_qh, d = v1.shape
    n_kh = v2.shape[4]
    rep = n_qh // n_kh
    q = v1.astype(np.float64).reshape(n_tq * P_MAX, n_qh, d)
    k = v2.astype(np.float64).reshape(-1, n_kh, d)
    v = v3.astype(np.float64).reshape(-1, n_kh, d)
    o = np.empty((n_qh, n_tq * P_MAX, d))
    for qh in range(n_qh):
        s = q[:, qh] @ k[:, qh // rep].T / np.sqrt(d)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        o[qh] = e / e.sum(axis=1, keepdims=True) @ v[:, qh // rep]
    return o.reshape(n_kh, rep, n_tq, P_MAX, d)[None]


_KG_NOTES = {
    "KG.v1": "gqa_full_v1: per query tile score row, reference-order softmax, attn, per key subtile transpose -> "
             "copy -> context matmul",
    "KG.v2": "gqa_full_v2_twophase: the 32 attn transposes into a resident a_t_bank, then the context matmuls",
    "KG.sf": "gqa_full_v3a_scalefold: KG.v2 with 1 / sqrt(D) folded into the exp (scaled -max bias)",
    "KG.dn": "gqa_full_v3b_defernorm: KG.v2 with the normalisation at eviction (O * recip from PSUM)",
    "KG.v3": "gqa_full_v3c_scalefold_defernorm + gqa_full_v4_msub1 (one stream, 2 reports, median): both folds",
    "KG.m2": "gqa_full_v4_msub2: KG.v3 in blocks of 2 query tiles (build pass, then stream pass)",
    "KG.m4": "gqa_full_v4_msub4: blocks of 4 query tiles",
    "KG.m8": "gqa_full_v4_msub8: blocks of 8 query tiles (a_t_bank 128 KiB per partition)",
    "KG.v5": "gqa_full_v5_scoresplit: KG.m2 with the bf16x2 3-product score matmul",
    "KG.v6": "gqa_full_v6_nomax: KG.v5 without the row max (exp with scale, no bias)",
    "KG.v7": "gqa_full_v7a_exp_from_psum: KG.v6 with the exp read from each score PSUM bank (no score tile)",
    "KG.v7m1": "gqa_full_v7a_msub1: KG.v7 with blocks of 1 query tile",
    "KG.v7m4": "gqa_full_v7a_msub4: KG.v7 with blocks of 4 query tiles",
    "KG.v8": "gqa_full_v8_ctxsplit: KG.v7 with the bf16x2 3-product context matmul too (limbs from the transpose PSUM)",
}


def _kg(pid):
    """One POINT_SPECS entry (kernels_v9's _kda_spec fields; it reads kernels_v9's own report table, so v11 has its
    own): trn2, `prof`, the median of the point's reports, modeled at the published shape, and the v10 trn2
    convention time_cores = 2 (points.py "v10 round") that every trn2 KDA point carries."""
    return dict(id=pid, name="gqa_full", shape="B1 N4096 QH16 KH8 D128 fp32 (q [32, 128, 16, 128])", target="trn2",
                measured_us=1000.0 * median(KDA_REPORTS_MS[pid]), source=_KDA_SRC + "workspaces/gqa_full",
                kernel=kda_gqa, make=_gqa_make(pid), k_full=GQA_KH, k_model=(GQA_KH,), reference=ref_gqa_presented,
                timing="prof", time_cores=2, notes=_KG_NOTES[pid] + "; k = kv heads")



# ------------------------------------------------------------------------------ source 2: attention (trn2, bench)
# out [S, D] = softmax(q^T k) v^T for q, k, v [D = 128, S] (module docstring, "Source 2", A). A variant is (kind,
# dtype, S): kind "b" (baseline_attention: three phases through an internal fp32 HBM score tensor) or "f"
# (fused_attention: per query tile on chip, normalisation at eviction).
AF_VARIANTS = {f"AF.{kind}.{dt}.{s_len}": (kind, dt, s_len)
               for dt in ("fp32", "bf16") for kind in ("b", "f") for s_len in (512, 1024, 2048, 4096)}


def _af_scores(q_sb, k_sb, i_q, qk):
    """The [128, S] fp32 score row of query tile i_q: one matmul per 512-wide key chunk, copied out of PSUM."""
    for c0 in range(0, qk.shape[1], PSUM_FP32_BANK):
        ps = nl.ndarray((P_MAX, PSUM_FP32_BANK), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, q_sb[:, i_q * P_MAX:(i_q + 1) * P_MAX], k_sb[:, c0:c0 + PSUM_FP32_BANK], accumulate=False)
        nisa.tensor_copy(dst=qk[:, c0:c0 + PSUM_FP32_BANK], src=ps)


def _af_exp(s_tile):
    """Per 512-wide chunk a max into a partial tile, the negated max of those; per chunk exp(s - max) and its sum
    into a partial tile; the row sum and its reciprocal. Returns (exp_tile, inv_sum)."""
    n_ch = s_tile.shape[1] // PSUM_FP32_BANK
    chunks = [slice(j * PSUM_FP32_BANK, (j + 1) * PSUM_FP32_BANK) for j in range(n_ch)]
    partial_max = nl.ndarray((P_MAX, n_ch), dtype=nl.float32, buffer=nl.sbuf)
    for j, cols in enumerate(chunks):
        nisa.tensor_reduce(dst=partial_max[:, j:j + 1], op=nl.maximum, data=s_tile[:, cols], axis=[1])
    neg_max = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=neg_max, op=nl.maximum, data=partial_max, axis=[1], negate=True)
    exp_tile = nl.ndarray(s_tile.shape, dtype=nl.float32, buffer=nl.sbuf)
    sum_chunks = nl.ndarray((P_MAX, n_ch), dtype=nl.float32, buffer=nl.sbuf)
    for j, cols in enumerate(chunks):
        nisa.activation(dst=exp_tile[:, cols], op=nl.exp, data=s_tile[:, cols], bias=neg_max, scale=1.0)
        nisa.tensor_reduce(dst=sum_chunks[:, j:j + 1], op=nl.add, data=exp_tile[:, cols], axis=[1])
    row_sum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=row_sum, op=nl.add, data=sum_chunks, axis=[1])
    inv_sum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv_sum, data=row_sum)
    return exp_tile, inv_sum


def _af_transposed(src):
    """src [128, S] as S / 128 PE-transposed [128, 128] subtiles (a PSUM tile of src's dtype each) copied into a
    [128, S / 128, 128] fp32 tile."""
    n_sub = src.shape[1] // P_MAX
    dst = nl.ndarray((P_MAX, n_sub, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    for i in range(n_sub):
        ps = nl.ndarray((P_MAX, P_MAX), dtype=src.dtype, buffer=nl.psum)
        nisa.nc_transpose(dst=ps, data=src[:, i * P_MAX:(i + 1) * P_MAX])
        nisa.tensor_copy(dst=dst[:, i, :], src=ps)
    return dst


def _af_pv(p_t, v_t):
    """sum_i p_t[:, i]^T v_t[:, i] into one [128, 128] PSUM tile (first product overwrites)."""
    acc = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.psum)
    for i in range(p_t.shape[1]):
        nisa.nc_matmul(acc, p_t[:, i, :], v_t[:, i, :], accumulate=i > 0)
    return acc


@nki.jit
def af_attention(q, k, v, variant):
    """AF.*: softmax(q^T k) v^T for q, k, v [128, S] (fp32 or bf16, S a multiple of 512) as out [S, 128] in the
    input dtype, the published `variant`'s data flow (AF_VARIANTS)."""
    kind = AF_VARIANTS[variant][0]
    d, s_len = q.shape
    out = nl.ndarray((s_len, d), dtype=q.dtype, buffer=nl.shared_hbm)
    q_sb, k_sb, v_sb = (nl.ndarray((d, s_len), dtype=q.dtype, buffer=nl.sbuf) for _ in range(3))
    for dst, src in ((q_sb, q), (k_sb, k), (v_sb, v)):
        nisa.dma_copy(dst=dst, src=src)
    n_q = s_len // P_MAX
    if kind == "f":
        v_t = _af_transposed(v_sb)
        for i_q in range(n_q):
            qk = nl.ndarray((P_MAX, s_len), dtype=nl.float32, buffer=nl.sbuf)
            _af_scores(q_sb, k_sb, i_q, qk)
            exp_tile, inv_sum = _af_exp(qk)
            acc = _af_pv(_af_transposed(exp_tile), v_t)
            attn_out = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=attn_out, data=acc, op0=nl.multiply, operand0=inv_sum)
            nisa.dma_copy(dst=out[i_q * P_MAX:(i_q + 1) * P_MAX, :], src=attn_out)
        return out
    score_hbm = nl.ndarray((n_q, P_MAX, s_len), dtype=nl.float32, buffer=nl.shared_hbm)   # internal
    for i_q in range(n_q):                     # phase 1: scores to HBM
        qk_buf = nl.ndarray((P_MAX, s_len), dtype=nl.float32, buffer=nl.sbuf)
        _af_scores(q_sb, k_sb, i_q, qk_buf)
        nisa.dma_copy(dst=score_hbm[i_q], src=qk_buf)
    for i_q in range(n_q):                     # phase 2: softmax, weights over the scores
        s_tile = nl.ndarray((P_MAX, s_len), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=s_tile, src=score_hbm[i_q])
        exp_tile, inv_sum = _af_exp(s_tile)
        weight_tile = nl.ndarray((P_MAX, s_len), dtype=nl.float32, buffer=nl.sbuf)
        for c0 in range(0, s_len, PSUM_FP32_BANK):
            cols = slice(c0, c0 + PSUM_FP32_BANK)
            nisa.tensor_scalar(dst=weight_tile[:, cols], data=exp_tile[:, cols], op0=nl.multiply, operand0=inv_sum)
        nisa.dma_copy(dst=score_hbm[i_q], src=weight_tile)
    v_t = _af_transposed(v_sb)                 # phase 3: PV from the reloaded weights
    for i_q in range(n_q):
        p_tile = nl.ndarray((P_MAX, s_len), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=p_tile, src=score_hbm[i_q])
        acc = _af_pv(_af_transposed(p_tile), v_t)
        attn_out = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=attn_out, src=acc)
        nisa.dma_copy(dst=out[i_q * P_MAX:(i_q + 1) * P_MAX, :], src=attn_out)
    return out


def _af_make(variant):
    """make(k, rng): q, k, v [128, 128 k] uniform in [-1, 1) cast to the variant's dtype (the harness's inputs)."""
    def make(k, rng):
        import ml_dtypes
        import numpy as np
        dt = np.float32 if AF_VARIANTS[variant][1] == "fp32" else ml_dtypes.bfloat16
        q, kk, v = (((rng.random((GQA_D, P_MAX * k)) - 0.5) * 2).astype(np.float32).astype(dt) for _ in range(3))
        return (q, kk, v, variant), {}
    return make


def ref_attention_af(q, k, v, *_consts):
    """softmax(q^T k) v^T in float64 (max-shifted, no scale), [S, D]."""
    import numpy as np
    s = q.astype(np.float64).T @ k.astype(np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True) @ v.astype(np.float64).T


_AF_SRC = "allenkchau/trainium-kernel-fusion@71713d4 (trn2), nki.benchmark P99 nc_latency (bench): "
_AF_FILES = {"b": ("attention_baseline", "kernels/baseline/attention.py baseline_attention: scores, softmax "
                   "weights through an internal fp32 HBM tensor, then PV"),
             "f": ("attention_fused", "kernels/fused/attention.py fused_attention: per query tile scores, softmax, "
                   "transposes and PV on chip, normalised at eviction")}


def _af(pid):
    """One POINT_SPECS entry for source 2: trn2, `bench`, the median of the point's P99 reports, modeled at the
    published S (k = query tiles), the v10 trn2 convention time_cores = 2."""
    kind, dt, s_len = AF_VARIANTS[pid]
    name, note = _AF_FILES[kind]
    return dict(id=pid, name=name, shape=f"d128 S{s_len} {dt}", target="trn2", measured_us=median(AF_REPORTS_US[pid]),
                source=_AF_SRC + "profiling/reports/latency_throughput_20260307T073830Z.csv (S 512: and T073617Z)",
                kernel=af_attention,
                make=_af_make(pid), k_full=s_len // P_MAX, k_model=(s_len // P_MAX,), reference=ref_attention_af,
                timing="bench", time_cores=2, notes=note + "; k = query tiles of 128 (S = 128 k)")


POINT_SPECS = (*[_kg(pid) for pid in KG_VARIANTS], *[_af(pid) for pid in AF_VARIANTS])
