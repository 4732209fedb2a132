"""v8 sealed calibration points: the selection, committed before any of these kernels was re-written (the published
latencies were known; nothing here has been modeled, and nothing may be until the round that re-fits the model on
the v6 / v7 trn2 points has frozen it: points.py docstring, "v8 sealed points"). The kernels follow in later
commits, from the published code (read for data flow, never copied); the choices the published code leaves to the
compiler are written here before each kernel is written.

Source and rule: the v7 rule (kernels_v7.py docstring, unchanged) applied to the operators it reserved, i.e. every
benchmark.csv row of Jerry2423/kda-for-trainium@90770f2 (trn2, one core, `--disable-dge --logical-nc-config=1`,
"p50 on-device latency" taken as `prof`, no launch term) with passed=true, a latency and a candidate file under
workspaces/<op>/runs/, except (i) the NKIBench baselines, (ii) mamba, (iii) probe / diagnostic / offline files and
rows that name no file; (a) the program runs as written (every SBUF / PSUM tensor it allocates fits the trn2 core:
192 KiB SBUF [NeuronCore-v2's figure, stricter than trn2's 212984 B usable: see kernels_v11.py's
correction; no selection changes] and 16 KiB PSUM per partition; checked by allocation arithmetic when the kernel
is re-written, a kernel that fails is dropped with the reason written here), (b) one point per distinct instruction
stream; several rows of one stream -> the median of their latency_ms; the notes' extra figures are not used.

Order (fixed by data flow, before anything was modeled; simplest first): 1 transpose_matmul (one GEMM, both
operands already contraction-major: no transpose), 2 matmul (one GEMM, lhs transposed on chip), 3 bmm, 4
rmsnorm_matmul, 5 add_rmsnorm_matmul, 6 matmul_add_rmsnorm, 7 swiglu, 8 lora, 9 rope_single_freq_apply,
10 bmm_softmax, 11 gqa_full. **This round re-writes operators 1 and 2**, in that order, landing each when done;
operators 3-11 stay reserved, un-modeled, for a later round (same rule, same order).

1. transpose_matmul: out[M, N] = lhs^T @ rhs, lhs (K, M) = (2048, 4096), rhs (K, N) = (2048, 10944) fp32, presented
   as v1 (128, 16, 4096), v2 (128, 16, 10944) (k = k_in * 16 + kt: contraction on partitions), out (32, 128, 10944).
   Every row (workspaces/transpose_matmul/benchmark.csv), published latency_ms:
     KT.v1  tmm_v1: fp32; M blocks of 8 x 128 rows (lhs block resident), rhs chunks [128, 16, 456] (24 chunks),
            per (block, chunk, subtile) 16 accumulating nc_matmul into one PSUM bank, copy, store     4.7274 ms
     KT.v2  tmm_v2_bf16_split: bf16 hi / lo limbs of both operands (lo = bf16(x - hi) through an fp32 residual
            tile and a copy), 3 products per kt (hi.hi, hi.lo, lo.hi), M blocks of 8 subtiles          3.8699 ms
     KT.v3  tmm_v3_mblk16_bf16_split: KT.v2 with M blocks of 16 subtiles and lo written directly as bf16 by
            the subtract                                                                             3.6338 ms
     KT.v4  tmm_v4_mblk16_nchunk512: KT.v3 with rhs chunks of 512 (21) plus one 192-wide tail            3.6762 ms
     KT.v5  tmm_v5_mblk16_nchunk512_masked_tail: KT.v3 with 22 uniform 512-wide chunks, the last masked
            to its 192 valid columns (load and store masks)                                          3.7887 ms
     KT.v6  tmm_v6_nchunk912: KT.v3 with rhs limbs built in 912-wide chunks (12), each used as two
            456-wide matmul sub-chunks                                                               7.3303 ms
     KT.v7  tmm_v7_dbuf_rhs: KT.v3 with two rhs limb buffers, the next chunk's limbs built before the
            current chunk's matmuls (explicit ping-pong over chunk pairs)                             3.6256 ms
   (tmm_v2b_bf16_split_tight has no benchmark.csv row; offline_* are not kernels.)
2. matmul: out[M, N] = lhs @ rhs, M 4096, K 5120, N 12288 fp32, presented as v1 (32, 128, 40, 128) [m_tile, m_in,
   k_tile, k_in], v2 (40, 128, 12288), out (32, 128, 12288). Every row (workspaces/matmul/benchmark.csv):
     KM.v1   matmul_v1: per M tile the 40 lhs tiles transposed on PE (identity matmul) into SBUF, then 24 N
             chunks of 512 accumulating 40 K tiles (rhs tile loaded per (chunk, kt))                 15.8853 ms
     KM.b2   matmul_v2_b2: M blocks of 2 tiles sharing each rhs tile load                             13.8084 ms
     KM.b4   matmul_v2_b4: M blocks of 4; three rows: median(13.3517, 13.35, 13.29) = 13.35 ms
     KM.b8   matmul_v2_b8: M blocks of 8                                                              14.0214 ms
     KM.b16  matmul_v2_b16: M blocks of 16                                                            26.1879 ms
     KM.v3   matmul_v3_bf16_split: KM.b4 with the bf16 hi / lo 3-product split                        10.656 ms
   (matmul_v2_b6: passed=false, no latency; _layout_check / offline_*: not kernels.)
All points sealed, `prof`, trn2, LNC=1.

Applying (a) to transpose_matmul (SBUF bytes per partition of the tiles as written, each live in its scope:
lhs block + max(lhs build tiles, rhs limbs or chunk + max(rhs build tiles, output tile)); tmm_sbuf_bytes below,
equal to the emulator's allocation peak at the published K and block; PSUM: one 2 KiB bank per accumulator): KT.v1
96544, KT.v2 98368, KT.v3 162080, KT.v4 / KT.v5 165888, KT.v6 193088, KT.v7 191264 B of 196608 (192 KiB): all
seven fit. Flagged for the round that unseals them (not a reason to drop under (a) as committed): the published
notes of KT.v6 and KT.v7, the two within 3 % of capacity, report compiler spills / re-fetches (KT.v6 hbm_write
259.6 MB and hbm_read 1765 MB for a 179.3 MB output; KT.v7 hbm_read 283.4 MB, hbm_write 183.0 MB).
Applying (a) to matmul (the emulator's allocation check at the published K = 40 x 128 and M block, one 512-wide N
chunk; every chunk allocates the same tiles; nothing modeled): SBUF peak per partition KM.v1 25088, KM.b2 45568,
KM.b4 86528, KM.b8 168448, KM.v3 86016 B (<= 196608), PSUM 1 / 2 / 4 / 8 / 4 banks (<= 8): fit. **KM.b16 is
dropped**: its lhs_t alone is 16 x 40 x 128 fp32 = 327680 B per partition (more than the core's SBUF) and its
16 accumulators need 16 PSUM banks of 8, so the device cannot have run it as written (its published notes report
PE 85 %, ScalarE 20 % busy and 1896 MB read, consistent with a compiler-chosen spill).

Choices the published code leaves to the compiler or to the emulator's API, written with each kernel, in the
same commit [review correction: the v8 choices entered in the commits that add the kernels (b315fb4,
1c929e6), not before them; the points are sealed, so no modeled figure existed either way]:
- As kernels_v7.py: NKI 0.7 form (`nisa.<op>(dst=..., ...)`); nl.affine_range loops as Python `range` in the
  published order (the emulator's scheduler overlaps independent iterations as dependencies and buffers allow); a
  0.6-style `t = nl.load(...)` / `t = nl.ndarray(...)` allocates its tile at that point of the loop body, as
  written; nl.load / nl.store = one nisa.dma_copy of the whole (masked: valid) tile, default static DGE as
  `--disable-dge`. Published HBM reshapes are views (no data movement): inputs are passed in the presented layouts.
- transpose_matmul: `acc = nl.zeros(psum)` then `acc += nisa.nc_matmul(...)` over kt (and products) = one
  nc_matmul per product into the PSUM tile, the first with accumulate=False (it overwrites the zeros; no memset
  instruction), the rest accumulate=True. nl.copy (PSUM -> SBUF fp32, fp32 -> bf16 hi limb) = one VectorE
  tensor_copy into the destination slice as written; nisa.tensor_tensor(subtract) on VectorE (its default), into
  the bf16 lo limb slice directly (KT.v3-v7) or into a fresh fp32 residual tile followed by a VectorE copy to
  the bf16 slice (KT.v2). KT.v5's masked last chunk: the load and the store move the 192 valid columns; the
  copies, subtract and matmuls run over the full 512-wide tiles as written (the 320 masked columns hold whatever
  the tile held and are never stored). KT.v7: the published ping-pong order (build chunk 0; per pair p build
  2p + 1, matmuls 2p, build 2p + 2, matmuls 2p + 1; then the last pair), two named limb buffers per M block.
- matmul: the published PE transpose nisa.nc_matmul(lhs_sb, identity,
  is_transpose=True) of a [128, 128] fp32 tile is one nisa.nc_transpose on TensorE into a PSUM tile (NKI 0.7's
  form of the same TensorE identity-transpose; the emulator refuses is_transpose on nc_matmul); the published
  identity load stays (one [128, 128] fp32 DMA per launch, from a host identity passed as an input, as
  nl.shared_constant), although nc_transpose takes no identity operand. The transposed tile's nl.copy out of
  PSUM = one VectorE tensor_copy into the resident lhs_t slice (KM.v3: into an fp32 tile, then the hi copy and
  lo subtract on VectorE, as KT). lhs_t (B, KT, par_dim(128), 128) = one [128, B, KT, 128] SBUF tile; the PSUM
  accumulator nl.zeros((B, par_dim(128), 512)) = one [128, B, 512] PSUM tile, one 2 KiB bank per block member;
  the accumulation rule of transpose_matmul (first product overwrites, no memset).
- Modeling (not done in this round): each point at the published shape, inputs standard normal fp32 (values do
  not change the instruction stream).
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import P_MAX

# Published latency_ms of every benchmark.csv report, as the selection above lists them.
KDA_REPORTS_MS = {
    "KT.v1": (4.7274,), "KT.v2": (3.8699,), "KT.v3": (3.6338,), "KT.v4": (3.6762,), "KT.v5": (3.7887,),
    "KT.v6": (7.3303,), "KT.v7": (3.6256,),
    "KM.v1": (15.8853,), "KM.b2": (13.8084,), "KM.b4": (13.3517, 13.35, 13.29), "KM.b8": (14.0214,),
    "KM.b16": (26.1879,), "KM.v3": (10.656,),
}


def median(values) -> float:
    """The rule's figure for several reports: the median (mean of the two middle values for an even count)."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


# ------------------------------------------------------------------------------------------ transpose_matmul (trn2)
# out[M, N] = lhs^T @ rhs. v1 [K_IN, KT, M] and v2 [K_IN, KT, N] hold the contraction on the partitions (k = k_in *
# KT + kt); out [M / 128, 128, N]. A variant is (split, m_blk, fp32_residual, chunking):
#   split: bf16 hi / lo limbs and 3 products per kt (else fp32, 1 product); m_blk: 128-row subtiles per M block;
#   chunking: "exact" (456-wide rhs chunks), "tail" (512 + a 192-wide tail tile), "masked" (uniform 512, the last
#   masked to its valid columns), "build912" (912-wide limb builds, two 456-wide matmul sub-chunks), "pingpong"
#   (456-wide chunks, two limb buffers, next chunk built before the current chunk's matmuls).

PSUM_FP32_BANK = 512       # fp32 elements per partition in one 2 KiB PSUM bank: the widest matmul result
KT_VARIANTS = {
    "KT.v1": (False, 8, False, "exact"),
    "KT.v2": (True, 8, True, "exact"),
    "KT.v3": (True, 16, False, "exact"),
    "KT.v4": (True, 16, False, "tail"),
    "KT.v5": (True, 16, False, "masked"),
    "KT.v6": (True, 16, False, "build912"),
    "KT.v7": (True, 16, False, "pingpong"),
}
TMM_KT, TMM_M, TMM_N = 16, 4096, 10944     # published v1 (128, 16, 4096), v2 (128, 16, 10944)
TMM_EXACT_CHUNK, TMM_BUILD_CHUNK = 456, 912


def tmm_chunks(n, chunking):
    """[(n0, tile width, valid columns, [(sub-chunk offset, width), ...])] of an N axis of n columns."""
    if chunking in ("exact", "pingpong"):
        return [(c, TMM_EXACT_CHUNK, TMM_EXACT_CHUNK, [(0, TMM_EXACT_CHUNK)]) for c in range(0, n, TMM_EXACT_CHUNK)]
    if chunking == "build912":
        half = TMM_BUILD_CHUNK // 2
        return [(c, TMM_BUILD_CHUNK, TMM_BUILD_CHUNK, [(0, half), (half, half)])
                for c in range(0, n, TMM_BUILD_CHUNK)]
    w = PSUM_FP32_BANK
    if chunking == "tail":
        return [(c, min(w, n - c), min(w, n - c), [(0, min(w, n - c))]) for c in range(0, n, w)]
    if chunking != "masked":
        raise ValueError(f"tmm_chunks: unknown chunking {chunking!r}")
    return [(c, w, min(w, n - c), [(0, w)]) for c in range(0, n, w)]


def tmm_sbuf_bytes(variant, kt=TMM_KT, n=TMM_N):
    """SBUF bytes per partition of a KT variant's tiles as written (each live in its scope), rule (a)."""
    split, m_blk, fp32_residual, chunking = KT_VARIANTS[variant]
    rows = m_blk * P_MAX
    limb = 2 * 2 if split else 4                  # bytes per element of the resident operand(s)
    build = 4 * (2 if fp32_residual else 1) if split else 0    # fp32 load (+ residual) tile per element
    lhs = kt * rows * limb
    worst = 0
    for _, width, _, subs in tmm_chunks(n, chunking):
        rhs = kt * width * limb * (2 if chunking == "pingpong" else 1)
        worst = max(worst, rhs + max(width * build, max(w for _, w in subs) * 4))
    return lhs + max(rows * build, worst)


def _limbs(src_f, hi, lo, fp32_residual):
    """hi = bf16(src), lo = bf16(src - hi) (VectorE; through an fp32 residual tile when fp32_residual)."""
    nisa.tensor_copy(dst=hi, src=src_f)
    if fp32_residual:
        res = nl.ndarray(src_f.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=res, data1=src_f, data2=hi, op=nl.subtract)
        nisa.tensor_copy(dst=lo, src=res)
    else:
        nisa.tensor_tensor(dst=lo, data1=src_f, data2=hi, op=nl.subtract)


def _load_operand(src, cols, valid, split, fp32_residual):
    """[K_IN, KT, cols] of src[:, :, c0:c0 + valid] as (fp32,) or its (hi, lo) bf16 limbs: one load per kt."""
    k_in, kt_n = src.shape[0], src.shape[1]
    if not split:
        blk = nl.ndarray((k_in, kt_n, cols), dtype=nl.float32, buffer=nl.sbuf)
        for kt in range(kt_n):
            nisa.dma_copy(dst=blk[:, kt, 0:valid], src=src[:, kt, :])
        return (blk,)
    hi = nl.ndarray((k_in, kt_n, cols), dtype=nl.bfloat16, buffer=nl.sbuf)
    lo = nl.ndarray((k_in, kt_n, cols), dtype=nl.bfloat16, buffer=nl.sbuf)
    _build_limbs(src, hi, lo, valid, fp32_residual)
    return hi, lo


def _build_limbs(src, hi, lo, valid, fp32_residual):
    for kt in range(src.shape[1]):
        f_sb = nl.ndarray((src.shape[0], hi.shape[2]), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=f_sb[:, 0:valid], src=src[:, kt, :])
        _limbs(f_sb, hi[:, kt, :], lo[:, kt, :], fp32_residual)


def _products(lhs, rhs):
    """(stationary limb, moving limb) pairs: fp32 x fp32, or hi.hi, hi.lo, lo.hi (lo.lo dropped)."""
    if len(lhs) == 1:
        return [(lhs[0], rhs[0])]
    (lhi, llo), (rhi, rlo) = lhs, rhs
    return [(lhi, rhi), (lhi, rlo), (llo, rhi)]


def _tmm_subtile(out, lhs, rhs, row_tile, s, n0, off, width, valid):
    """One [128, width] output tile: the accumulating matmuls over kt and products, VectorE copy, store."""
    acc = nl.ndarray((P_MAX, width), dtype=nl.float32, buffer=nl.psum)
    first = True
    for kt in range(lhs[0].shape[1]):
        for st, mv in _products(lhs, rhs):
            nisa.nc_matmul(acc, st[:, kt, s * P_MAX:(s + 1) * P_MAX], mv[:, kt, off:off + width],
                           accumulate=not first)
            first = False
    out_sb = nl.ndarray((P_MAX, width), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=out_sb, src=acc)
    nisa.dma_copy(dst=out[row_tile, :, n0 + off:n0 + off + valid], src=out_sb[:, 0:valid])


def _tmm_chunk(out, lhs, rhs, mb, m_blk, n0, subs, valid):
    for off, width in subs:
        for s in range(m_blk):
            _tmm_subtile(out, lhs, rhs, mb * m_blk + s, s, n0, off, width, min(width, valid - off))


@nki.jit
def kda_transpose_matmul(v1, v2, variant):
    """KT.*: out[M / 128, 128, N] = (lhs^T @ rhs) for v1 [K_IN, KT, M], v2 [K_IN, KT, N] (fp32), the published
    `variant`'s data flow (KT_VARIANTS)."""
    split, m_blk, fp32_residual, chunking = KT_VARIANTS[variant]
    k_in, kt_n, m = v1.shape
    n = v2.shape[2]
    rows = m_blk * P_MAX
    out = nl.ndarray((m // P_MAX, P_MAX, n), dtype=nl.float32, buffer=nl.shared_hbm)
    chunks = tmm_chunks(n, chunking)
    for mb in range(m // rows):
        lhs = _load_operand(v1[:, :, mb * rows:(mb + 1) * rows], rows, rows, split, fp32_residual)
        if chunking == "pingpong":
            _tmm_pingpong(out, v2, lhs, mb, m_blk, chunks)
            continue
        for n0, width, valid, subs in chunks:
            rhs = _load_operand(v2[:, :, n0:n0 + valid], width, valid, split, fp32_residual)
            _tmm_chunk(out, lhs, rhs, mb, m_blk, n0, subs, valid)
    return out


def _tmm_pingpong(out, v2, lhs, mb, m_blk, chunks):
    """KT.v7's order: two limb buffers (a, b); build chunk 0 into a; per pair p: build 2p + 1 into b, matmuls of
    2p from a, build 2p + 2 into a, matmuls of 2p + 1 from b; the last pair's build and both matmul passes after."""
    k_in, kt_n = v2.shape[0], v2.shape[1]
    bufs = [tuple(nl.ndarray((k_in, kt_n, TMM_EXACT_CHUNK), dtype=nl.bfloat16, buffer=nl.sbuf) for _ in range(2))
            for _ in range(2)]

    def build(buf, c):
        n0, _, valid, _ = chunks[c]
        _build_limbs(v2[:, :, n0:n0 + valid], *bufs[buf], valid, False)

    def matmuls(buf, c):
        n0, _, valid, subs = chunks[c]
        _tmm_chunk(out, lhs, bufs[buf], mb, m_blk, n0, subs, valid)

    pairs = len(chunks) // 2
    build(0, 0)
    for p in range(pairs - 1):
        build(1, 2 * p + 1)
        matmuls(0, 2 * p)
        build(0, 2 * p + 2)
        matmuls(1, 2 * p + 1)
    build(1, 2 * pairs - 1)
    matmuls(0, 2 * pairs - 2)
    matmuls(1, 2 * pairs - 1)


# ------------------------------------------------------------------------------------------------ matmul (trn2)
# out[M, N] = lhs @ rhs from v1 [M / 128, 128, K / 128, 128] (m_tile, m_in, k_tile, k_in), v2 [K / 128, 128, N],
# out [M / 128, 128, N]. A variant is (B, split): B M tiles per block share each rhs tile load; split = bf16 hi / lo
# 3-product. Per block: the B x KT lhs tiles are transposed on PE into a resident lhs_t, then per 512-wide N chunk
# the KT rhs tiles are loaded one by one and multiplied into the B accumulators.

KM_VARIANTS = {"KM.v1": (1, False), "KM.b2": (2, False), "KM.b4": (4, False), "KM.b8": (8, False),
               "KM.b16": (16, False), "KM.v3": (4, True)}
KM_M_TILES, KM_K_TILES, KM_N = 32, 40, 12288      # published v1 (32, 128, 40, 128), v2 (40, 128, 12288)


def _km_lhs_block(v1, ident_sb, t0, b, split):
    """The block's B x KT lhs tiles transposed on PE: (lhs_t,) fp32 or (hi, lo) bf16, each [128, B, KT, 128]."""
    k_tiles = v1.shape[2]
    dts = (nl.bfloat16, nl.bfloat16) if split else (nl.float32,)
    res = tuple(nl.ndarray((P_MAX, b, k_tiles, P_MAX), dtype=dt, buffer=nl.sbuf) for dt in dts)
    for mb in range(b):
        for kt in range(k_tiles):
            lhs_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=lhs_sb, src=v1[t0 + mb, :, kt, :])
            t_psum = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_transpose(dst=t_psum, data=lhs_sb)    # SBUF -> PSUM: TensorE
            if not split:
                nisa.tensor_copy(dst=res[0][:, mb, kt, :], src=t_psum)
                continue
            t_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=t_sb, src=t_psum)
            _limbs(t_sb, res[0][:, mb, kt, :], res[1][:, mb, kt, :], False)
    return res


def _km_rhs_tile(v2, kt, n0, split):
    """One [128, 512] rhs tile: (fp32,) or its (hi, lo) bf16 limbs."""
    rhs_f = nl.ndarray((P_MAX, PSUM_FP32_BANK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=rhs_f, src=v2[kt, :, n0:n0 + PSUM_FP32_BANK])
    if not split:
        return (rhs_f,)
    hi = nl.ndarray((P_MAX, PSUM_FP32_BANK), dtype=nl.bfloat16, buffer=nl.sbuf)
    lo = nl.ndarray((P_MAX, PSUM_FP32_BANK), dtype=nl.bfloat16, buffer=nl.sbuf)
    _limbs(rhs_f, hi, lo, False)
    return hi, lo


@nki.jit
def kda_matmul(v1, v2, ident, variant):
    """KM.*: out[M / 128, 128, N] = lhs @ rhs for v1 [M / 128, 128, KT, 128], v2 [KT, 128, N] (fp32), ident the
    [128, 128] fp32 identity (loaded once, as published), the published `variant`'s data flow (KM_VARIANTS)."""
    b, split = KM_VARIANTS[variant]
    m_tiles, _, k_tiles, _ = v1.shape
    n = v2.shape[2]
    out = nl.ndarray((m_tiles, P_MAX, n), dtype=nl.float32, buffer=nl.shared_hbm)
    ident_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ident_sb, src=ident)
    for blk in range(m_tiles // b):
        lhs = _km_lhs_block(v1, ident_sb, blk * b, b, split)
        for n0 in range(0, n, PSUM_FP32_BANK):
            acc = nl.ndarray((P_MAX, b, PSUM_FP32_BANK), dtype=nl.float32, buffer=nl.psum)
            for kt in range(k_tiles):
                rhs = _km_rhs_tile(v2, kt, n0, split)
                for mb in range(b):
                    pairs = ([(lhs[0], rhs[0])] if not split else
                             [(lhs[0], rhs[0]), (lhs[0], rhs[1]), (lhs[1], rhs[0])])
                    for i, (st, mv) in enumerate(pairs):
                        nisa.nc_matmul(acc[:, mb, :], st[:, mb, kt, :], mv, accumulate=kt > 0 or i > 0)
            for mb in range(b):
                out_sb = nl.ndarray((P_MAX, PSUM_FP32_BANK), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_copy(dst=out_sb, src=acc[:, mb, :])
                nisa.dma_copy(dst=out[blk * b + mb, :, n0:n0 + PSUM_FP32_BANK], src=out_sb)
        del acc     # the block's accumulators end here: b = 8 holds all 8 PSUM banks, and the next block's
        #             transposes need one (the emulator frees a tensor when its last Python reference goes)
    return out


# ------------------------------------------------------------------------------------------------ point specs
# Each spec is a calibration Point's fields (points.py adds split="sealed"). make(k, rng) -> (args, kwargs). KT: k =
# M blocks (published M / (m_blk * 128): 4 for KT.v1 / v2, 2 for the rest), K and N as published unless given.


def _normal(rng, *shape):
    import numpy as np
    return rng.standard_normal(shape).astype(np.float32)


def _tmm_make(variant):
    def make(k, rng, kt=TMM_KT, n=TMM_N):
        rows = KT_VARIANTS[variant][1] * P_MAX
        return (_normal(rng, P_MAX, kt, k * rows), _normal(rng, P_MAX, kt, n), variant), {}
    return make


def ref_transpose_matmul(v1, v2, *_consts):
    """lhs^T @ rhs in float64 from the presented layouts (k = k_in * KT + kt on both), as [M / 128, 128, N]."""
    import numpy as np
    out = np.einsum("pkm,pkn->mn", v1.astype(np.float64), v2.astype(np.float64))
    return out.reshape(v1.shape[2] // P_MAX, P_MAX, v2.shape[2])


_KDA_SRC = "Jerry2423/kda-for-trainium@90770f2 (trn2, 1 core, LNC=1), p50 on-device latency (prof): "
_KT_NOTES = {
    "KT.v1": "tmm_v1: fp32, 1024-row M blocks, 456-wide rhs chunks",
    "KT.v2": "tmm_v2_bf16_split: bf16x2 3-product split, 1024-row blocks, fp32 residual tile",
    "KT.v3": "tmm_v3_mblk16_bf16_split: bf16x2 3-product split, 2048-row blocks",
    "KT.v4": "tmm_v4_mblk16_nchunk512: KT.v3 with 512-wide rhs chunks and a 192-wide tail",
    "KT.v5": "tmm_v5_mblk16_nchunk512_masked_tail: KT.v3 with 22 x 512 chunks, the last masked to 192",
    "KT.v6": "tmm_v6_nchunk912: KT.v3 with 912-wide limb builds, two 456-wide matmul sub-chunks",
    "KT.v7": "tmm_v7_dbuf_rhs: KT.v3 with two rhs limb buffers, ping-pong build-ahead",
}


def _kt(pid):
    k_full = TMM_M // (KT_VARIANTS[pid][1] * P_MAX)
    return dict(id=pid, name="transpose_matmul", shape="M4096 K2048 N10944 fp32 (v1 [128, 16, 4096])",
                target="trn2", measured_us=1000.0 * median(KDA_REPORTS_MS[pid]),
                source=_KDA_SRC + "workspaces/transpose_matmul", kernel=kda_transpose_matmul, make=_tmm_make(pid),
                k_full=k_full, k_model=(k_full,), reference=ref_transpose_matmul, timing="prof", time_cores=2,
                notes=_KT_NOTES[pid] + "; k = M blocks")


def _km_make(variant):
    def make(k, rng, k_tiles=KM_K_TILES, n=KM_N):
        import numpy as np
        m_tiles = k * KM_VARIANTS[variant][0]
        return (_normal(rng, m_tiles, P_MAX, k_tiles, P_MAX), _normal(rng, k_tiles, P_MAX, n),
                np.identity(P_MAX, dtype=np.float32), variant), {}
    return make


def ref_matmul_tiled(v1, v2, *_consts):
    """lhs @ rhs in float64 from the presented tiled layouts, as [M / 128, 128, N]."""
    import numpy as np
    lhs = v1.astype(np.float64).reshape(v1.shape[0] * P_MAX, -1)       # (m_tile, m_in) x (k_tile, k_in)
    rhs = v2.astype(np.float64).reshape(-1, v2.shape[2])                # (k_tile, k_in) x n
    return (lhs @ rhs).reshape(v1.shape[0], P_MAX, v2.shape[2])


_KM_NOTES = {
    "KM.v1": "matmul_v1: per M tile 40 PE transposes, 24 x 512 N chunks, rhs tile per (chunk, kt)",
    "KM.b2": "matmul_v2_b2: M blocks of 2 tiles share each rhs tile",
    "KM.b4": "matmul_v2_b4: M blocks of 4 tiles (3 reports, median)",
    "KM.b8": "matmul_v2_b8: M blocks of 8 tiles (all 8 PSUM banks)",
    "KM.v3": "matmul_v3_bf16_split: KM.b4 with the bf16x2 3-product split",
}


def _km(pid):
    k_full = KM_M_TILES // KM_VARIANTS[pid][0]
    return dict(id=pid, name="matmul", shape="M4096 K5120 N12288 fp32 (v1 [32, 128, 40, 128])", target="trn2",
                measured_us=1000.0 * median(KDA_REPORTS_MS[pid]), source=_KDA_SRC + "workspaces/matmul",
                kernel=kda_matmul, make=_km_make(pid), k_full=k_full, k_model=(k_full,), reference=ref_matmul_tiled,
                timing="prof", time_cores=2, notes=_KM_NOTES[pid] + "; k = M blocks")


KM_DROPPED = {"KM.b16": "rule (a): 16 PSUM accumulators (8 banks on the core) and a 327680 B lhs_t per partition"}
POINT_SPECS = (*[_kt(pid) for pid in KT_VARIANTS], *[_km(pid) for pid in KM_VARIANTS if pid not in KM_DROPPED])
