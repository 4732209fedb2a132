"""Chunked gated delta rule (prefill): all batches and heads in one launch, fp32 state kept in SBUF.

Per v-head the recurrence is S <- exp(g_t) S; delta = beta_t (v_t - S^T k_t); S <- S + k_t delta^T;
o_t = S^T q_t (transformers' torch_chunk_gated_delta_rule / fla's chunk_gated_delta_rule). The kernel
walks the sequence chunk by chunk (C = 64 or 128 tokens, tokens on the partitions) in the WY/UT form
(loop nest, memory plan and the solve's derivation in DESIGN.md):

    G_i = sum_{k<=i} g_k                        (within the chunk; exact sums of g by matmul)
    A   = strict_lower(diag(beta) (K K^T o exp(G_i - G_j)))
    T   = (I + A)^-1                            (exact, by recursive block doubling on half-width tiles)
    W   = T (beta e^G o K),  U = T (beta o V),  V' = U - W S
    O   = e^G o (Q S) + (Q K^T o exp(G_i - G_j))_{j<=i} V'
    S   <- e^{G_C} S + (K o e^{G_C - G_j})^T V'

Every exponent is a sum of g over a causal range (<= 0), formed directly by a matmul with a 0/1 mask,
so no exp of a positive number and no difference of two large cumulative sums is ever taken.
The state-independent part of each chunk (everything but V', O and the S update) is emitted up to
_PIPELINE_DEPTH chunks ahead, interleaved with the sequential state chain (Python generators, trace time).
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nisa, nl
from ..hw import PSUM_FMAX_FP32, P_MAX
from ..lnc import current_target_name, resolve_lnc
from ..transpose import mixing_pe_transpose, vector_transpose
from ..validation import check_bool, check_float, check_int, kernel_check
from ._checks import check_cu_seqlens, check_lengths, check_qkv_gate_layouts, cu_seqlens_count, initial_state_arg
from ._checks import dtype_name as _dtype_name

# ---------------------------------------------------------------- constraints
_CHUNK_SIZES = (64, 128)          # tokens per chunk: partitions of the intra-chunk tiles (<= P_MAX)
_MAX_HEAD_DIM = P_MAX             # Dk, Dv <= 128: Dk is the partition dim of the state tile
_L2NORM_EPS = 1e-6                # transformers' l2norm eps (added to the sum of squares)
# g is clamped to >= this (fp32): exp(-1e30) = 0 exactly, and C * -1e30 stays finite in the fp32 decay sums
_G_FLOOR = -1e30
# rsqrt is valid on [2^-87, 2^97] on the device; fp32 sums of squares span [eps ~ 2^-20, 2^128]:
# rsqrt(x) = rsqrt(x * 2^-40) * 2^-20 keeps every such x inside the valid range.
_RSQRT_PRESCALE = 2.0 ** -40
_RSQRT_POSTSCALE = 2.0 ** -20
# non-finite containment (issue 16): a value counts as bad (non-finite) when it is NaN / +-Inf, or |k| (after the
# norm and scale) or |beta| > _SAFE_MAG (the fp32 intra-chunk products k.k, A and the solve's products of A
# could overflow), or g > _G_CEIL (g is a log-decay: growth e^{sum g} can overflow within a chunk); v is bad only
# when non-finite (|v| <= _FP32_MAX keeps every product finite). Bad values are zeroed before any product over
# the chunk's tokens, and the outputs / state the token-sequential recurrence makes NaN are set to NaN by select
_SAFE_MAG = 2.0 ** 32
# with the L2 norm in the kernel, a (token, head) row of q or k whose L2 norm is >= 2^_PRESCALE_LOG2_FIRST = 1 is
# multiplied by 2^-(_PRESCALE_STEP n) (exact) so that its norm lands in [2^-9, 1) (_pow2_prescale): every raw row
# p x then has norm < 1, so a product on raw keys / queries (K S, Q S, K K^T) is never larger in magnitude than
# the normalised one's bound |S| (no overflow where the normalised products stay finite: a key of norm 2^11.99 or
# 1e9 meeting a state of 1e35), and the norm of rows up to 2^112 is finite (it overflowed beyond ~1.8e19). eps
# is added to sum x^2 before the pre-scale (eps p^2 to |p x|^2), so the factor is exactly that of the reference
_PRESCALE_LOG2_FIRST = 0
_PRESCALE_STEP = 9                # log2 of the factor per threshold passed
_PRESCALE_THRESHOLDS = 13         # |x| >= 2^0 .. 2^108
_PRESCALE_SUMSQ = 2.0 ** -48      # the sums of squares are of x 2^-48 (finite up to |x| = 2^112)
_FP32_MAX = float(np.finfo(np.float32).max)
_G_CEIL = 0.0
_NAN = float("nan")
# chunks whose state-independent part is emitted ahead of (interleaved with) the current chunk's state update
_PIPELINE_DEPTH = 3
# chunks whose g and beta rows one DMA loads (tokens on the partitions, G runs of Hv * 4 B per partition row)
_GATE_CHUNKS = 16
# chunks in flight with fp32 compute when Hv * C <= 512 per core: 3 for launches of >= _FP32_DEEP_MIN_ITEMS (batch,
# chunk) items, else 2 (T=2048, C=128: 252.2 us at 3, 256.3 at 2; T=512: 89.5 at 3, 84.4 at 2; docs/deltanet.md)
_FP32_DEPTH = 2
_FP32_DEEP_MIN_ITEMS = 16
# SBUF per partition grows with Hv * C (the [C, W, C] lockstep tiles of every chunk in flight). Measured with
# lifetime-exact accounting at Dk = Dv = 128 on trn2 (212984 B): bf16 inputs fit 3 chunks in flight up to
# Hv * C = 1024, 2 up to 2048 and 1 up to 4096; fp32 compute on bf16 inputs (raw bf16 q / k tiles, one chunk in
# flight) fits Hv * C <= 2048 (Hk = Hv = 16, C = 128: 205016 B), on fp32 / fp16 inputs (fp32 q / k tiles) only
# Hv * C <= 1024 (Hk = Hv = 16, C = 128 overflowed; C = 64: 157336 B). trn1 (180224 B, LNC=1, no PE row tiles)
# takes less with fp32 compute, measured on the emulator at Dk = Dv = 128, Hk = Hv, T = C + 2: bf16 inputs Hv * C <=
# 1664 (Hv = 13 at C = 128 fits, 14 overflowed), fp32 inputs <= 896 (Hv = 7 at C = 128 fits, 8 overflowed); bf16
# compute keeps 4096 (Hv = 32, C = 128 fits)
_DEPTH_BY_HV_CHUNK = ((1024, 3), (2048, 2), (4096, 1))
_MAX_HV_CHUNK_FP32 = {"trn1": 1664, None: 2048}          # by target (None: any other)
_MAX_HV_CHUNK_FP32_INPUTS = {"trn1": 896, None: 1024}
_COMPUTE_DTYPES = (None, "float32", "bfloat16")


def target_limit(table, target):
    """The entry of a {target name or None: limit} table for the target in force (None: every other target)."""
    return table.get(target, table[None])

# packed sequences (cu_seqlens): N per launch (the on-device schedule builds [128, N] fp32 tiles per 128 slots),
# and slots N + T // C (the schedule keeps 10 B per slot on each partition for the whole launch)
_MAX_SEQS = 1024
_MAX_SLOTS = 1024
# compute instructions on <= 32 partitions must start at a multiple of 32 (0, 32, 64, 96)
_PARTITION_QUADRANT = 32
# the solve level whose rows are selected by a per-partition mask per block instead of a level mask of A
_ROW_MASK_BLOCK = 16
# the solve level whose A mask runs on VectorE (the other small levels' masks on GpSimd): engine balance
_VECTOR_MASK_LEVEL = 2
# the solve's levels with 2s <= 32 on compact 32 x 32 PE tiles (_compact_level), by compute dtype (bf16, fp32):
# off for both, modeled slower at T=2048 (docs/deltanet.md, "Compact solve"); tested against the reference
_COMPACT_SOLVE = {False: False, True: False}
# PSUM banks one [P, W, C] lockstep tile may span: the solve keeps 3 such tiles live (6 of 8 banks)
_LOCKSTEP_PSUM_BANKS = 2
# fp32 compute: the state update K^T (d o V') with the decay on V' (the stationary K shared by the v heads of a
# q/k head) instead of (K o d)^T V' per head
_SHARED_STATE_UPDATE = True

# ---------------------------------------------------------------- host constants (index into consts)
_C_UTRI = 0                       # U[k, i] = [k <= i]   (inclusive cumsum / causal j <= i mask)
_C_SL = 1                         # SL[k, j] = [k > j]  (strict "after j")
_C_IDENT = 2                      # I[i, j] = [i == j]
_C_MT0 = 3                        # first transposed level mask; level l (block s = 2^l) at _C_MT0 + l


def _c_hi_rows(chunk):
    return _C_MT0 + _n_levels(chunk)    # index of the hi-rows mask (after the level masks)


def _c_hi_lvl(chunk):
    return _c_hi_rows(chunk) + 1        # index of the per-level hi-rows columns (compact solve)


def _n_levels(chunk):
    return int(chunk).bit_length() - 1          # log2(chunk)


def _host_constants(chunk):
    """[n_const, C, C] fp32 0/1 masks the kernel loads once (identity, triangles, block-doubling masks)."""
    idx = np.arange(chunk)
    i, j = idx[:, None], idx[None, :]
    consts = [(i <= j), (i > j), np.eye(chunk)]
    for lvl in range(_n_levels(chunk)):
        s = 1 << lvl
        m = (i // (2 * s) == j // (2 * s)) & (i % (2 * s) >= s) & (j % (2 * s) < s)   # A-layout [row, col]
        consts.append(m.T)
    s = _ROW_MASK_BLOCK                   # hi_rows[p, b] = [p in the second half of 2s-block b]
    consts.append((i // (2 * s) == j) & (i % (2 * s) >= s))
    # hi_lvl[p, l] = [p in the second half of its 2^(l+1)-block] (the compact solve's row masks, level l)
    consts.append((j < _n_levels(chunk)) & (i % (2 << np.minimum(j, 30)) >= (1 << np.minimum(j, 30))))
    return np.stack([c.astype(np.float32) for c in consts])


def gated_delta_rule_kernel(q, k, v, g, beta, initial_state, lengths, cu_seqlens, consts, chunk, scale, use_l2norm,
                            has_initial_state, checkpoint_every, has_lengths, bf16_compute, varlen=False,
                            row_tiles=False):
    """Chunked gated delta rule over all (batch, head) pairs in one launch.

    Dimensions:
        B batch, T tokens, Hk q/k heads, Hv v heads (Hv % Hk == 0, v head h uses q/k head h // (Hv/Hk)),
        Dk key dim (<= 128), Dv value dim (<= 128), C chunk (64 or 128).
    Args:
        q: [B, T, Hk, Dk] @ HBM, fp32/bf16/fp16.
        k: [B, T, Hk, Dk] @ HBM, q's dtype.
        v: [B, T, Hv, Dv] @ HBM, q's dtype.
        g: [B, T, Hv] @ HBM, log-decay <= 0 (any float dtype).
        beta: [B, T, Hv] @ HBM, in [0, 1] (any float dtype).
        initial_state: [B, Hv, Dk, Dv] @ HBM fp32 (read only when has_initial_state); [N, Hv, Dk, Dv] when varlen.
        lengths: [B] @ HBM int32, valid tokens per sequence (right padding beyond).
        cu_seqlens: [N+1] @ HBM int32 (read only when varlen): B = 1 and sequence n is tokens cu[n] .. cu[n+1]-1.
        consts: [n_const, C, C] @ HBM fp32, the 0/1 masks of `_host_constants(C)`.
        chunk, scale, use_l2norm, has_initial_state, checkpoint_every, has_lengths, bf16_compute: trace-time
            constants (bf16_compute: bf16 matmul operands for bf16 inputs; else fp32 throughout).
        row_tiles: trace-time; the target has 32-row PE tiles (NeuronCore-v3+): the solve's small levels run compact.
        varlen: trace-time; packed sequences (see _varlen_schedule: a static number of chunk slots, N + T // C,
            each aligned to its sequence's start, with the schedule computed on device from cu_seqlens).
    Returns:
        o: [B, T, Hv, Dv] @ HBM in q's dtype; final_state: [B, Hv, Dk, Dv] ([N, ...] when varlen) @ HBM fp32;
        checkpoints: [B, T // (checkpoint_every * C), Hv, Dk, Dv] fp32 (only when checkpoint_every).
    Constraints:
        C in _CHUNK_SIZES; Dk, Dv <= _MAX_HEAD_DIM; pad tokens (t >= lengths[b], when has_lengths) get
        q = k = v = g = beta = 0 by a predicated copy (NaN-safe); g is clamped to >= _G_FLOOR (-inf decays to 0).
    Pseudocode (software-pipelined over the (b, chunk) items, see _chunk_prep / _chunk_tail):
        for b: S[h] = initial_state[b, h] (SBUF, [Dk, Hv, Dv] fp32)
          for each chunk:
            state-independent (emitted up to _PIPELINE_DEPTH chunks ahead, interleaved stage by stage):
              load q, k, v, g, beta rows; mask pads; l2norm + scale q, k (compute dtype)
              for each lockstep block of W v heads (W = Hv at Qwen shapes):
                K^T, Q^T (TensorE), K K^T, (K Q^T masked j <= i); decays e^{D^T} by fp32 matmuls with 0/1
                masks; A^T = (K K^T diag(beta)) o e^{D^T}; P^T; T^T = (I + A)^-1 (block doubling, W heads
                per instruction); -W^T; beta V; K o e^{G_C - G_j}
            state-dependent: V' = T (beta V) - W S; S = e^{G_C} S + K_d^T V'; O = e^G o (Q S) + P V'
            store the chunk's o rows (and the state every N chunks)
          store final S
    """
    bsz, seq, n_hk, dk = q.shape
    n_hk_all = n_hk
    n_hv_all, dv = v.shape[2], v.shape[3]
    group = n_hv_all // n_hk
    n_chunks = (seq + chunk - 1) // chunk
    n_states = bsz
    if varlen:
        n_states = cu_seqlens.shape[0] - 1
        n_chunks = n_states + seq // chunk            # slots: >= sum_n max(1, ceil(L_n / C)) for any lengths
    f32 = nl.float32

    o_all = nl.ndarray((bsz, seq, n_hv_all, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    final_all = nl.ndarray((n_states, n_hv_all, dk, dv), dtype=f32, buffer=nl.shared_hbm)
    n_ckpt = 0 if not checkpoint_every else seq // (checkpoint_every * chunk)
    ckpt_all = None
    if n_ckpt > 0:
        ckpt_all = nl.ndarray((n_states, n_ckpt, n_hv_all, dk, dv), dtype=f32, buffer=nl.shared_hbm)
    outs = (o_all, final_all) if ckpt_all is None else (o_all, final_all, ckpt_all)
    # LNC=2: each program instance owns a contiguous range of v heads (and the q/k heads they use), reads only
    # those heads' inputs and writes only their outputs and states; everything below sees the owned heads only
    hv_lo, hv_hi = _owned_heads(n_hv_all, nl.program_id(0), nl.num_programs(0))
    if hv_hi == hv_lo:
        return outs                                           # Hv = 1 at LNC=2: the second core has no head
    kh_lo, kh_hi = hv_lo // group, (hv_hi - 1) // group + 1
    q, k = q[:, :, kh_lo:kh_hi, :], k[:, :, kh_lo:kh_hi, :]
    v, g, beta = v[:, :, hv_lo:hv_hi, :], g[:, :, hv_lo:hv_hi], beta[:, :, hv_lo:hv_hi]
    if has_initial_state:
        initial_state = initial_state[:, hv_lo:hv_hi]
    o, final_state = o_all[:, :, hv_lo:hv_hi, :], final_all[:, hv_lo:hv_hi]
    ckpt = None if ckpt_all is None else ckpt_all[:, :, hv_lo:hv_hi]
    if varlen and ckpt is not None:          # checkpoints a sequence does not reach stay 0
        zero_sb = nl.ndarray((dk, hv_hi - hv_lo, dv), dtype=f32, buffer=nl.sbuf)
        nisa.memset(dst=zero_sb, value=0.0)
        for i_n in range(n_states):
            for i_k in range(n_ckpt):
                nisa.dma_copy(dst=ckpt[i_n, i_k].permute((1, 0, 2)), src=zero_sb)
    n_hv = hv_hi - hv_lo
    # k head (relative to kh_lo) of owned v head w: (hv_lo + w) // group - kh_lo
    head_base = hv_lo

    dims = dict(n_hv=n_hv, dk=dk, dv=dv, bsz=bsz, seq=seq, n_chunks=n_chunks, group=group, head_base=head_base,
                n_hk_all=n_hk_all, n_hv_all=n_hv_all, io_dtype=q.dtype)
    run_pipeline((q, k, v, g, beta), lengths, cu_seqlens, consts, initial_state, (o, final_state, ckpt), dims,
                 dict(chunk=chunk, scale=scale, use_l2norm=use_l2norm, has_initial_state=has_initial_state,
                      checkpoint_every=checkpoint_every, n_ckpt=n_ckpt, has_lengths=has_lengths,
                      bf16_compute=bf16_compute, varlen=varlen, row_tiles=row_tiles))
    return outs


def run_pipeline(inputs, lengths, cu_seqlens, consts, initial_state, outs, dims, opts, loader=None):
    """The chunk loop of one program instance over its owned heads (shared by the unfused and fused kernels).

    inputs (q, k, v, g, beta): HBM views of the owned heads (q, k, v None when `loader` makes their tiles);
    outs (o, final_state, ckpt or None): HBM views of the owned heads; dims: n_hv (owned), dk, dv, bsz, seq,
    n_chunks, group, head_base, n_hk_all, n_hv_all, io_dtype; opts: the kernel's trace-time options.
    loader(i_b, i_c, t0, n_tok, per_seq) -> (q, k, v [C, H, D] in the compute dtype, g, beta [C, Hv] fp32), rows
    past the sequence end zero: replaces the HBM loads of q, k, v, g, beta (the fused front end)."""
    q, k, v, g, beta = inputs
    o, final_state, ckpt = outs
    n_hv, dk, dv, bsz, seq, n_chunks = (dims[x] for x in ("n_hv", "dk", "dv", "bsz", "seq", "n_chunks"))
    group, head_base = dims["group"], dims["head_base"]
    chunk, scale, use_l2norm = opts["chunk"], opts["scale"], opts["use_l2norm"]
    has_initial_state, checkpoint_every, n_ckpt = opts["has_initial_state"], opts["checkpoint_every"], opts["n_ckpt"]
    has_lengths, bf16_compute, varlen = opts["has_lengths"], opts["bf16_compute"], opts["varlen"]
    f32 = nl.float32
    n_const = consts.shape[0]
    consts_sb = nl.ndarray((chunk, n_const, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=consts_sb, src=consts.permute((1, 0, 2)))
    # matmul operand dtype: fp32 by default, for every input dtype (what transformers' chunked function
    # computes in: bf16 outputs are then as accurate as the stock path's); bf16_compute (bf16 inputs only) runs
    # TensorE at bf16 rate (fp32 PSUM accumulation, fp32 state, ~2.5x the output error); decays stay fp32
    cdt = nl.bfloat16 if dims["io_dtype"] == nl.bfloat16 and bf16_compute else f32
    ones_sb = nl.ndarray((chunk, max(dk, chunk)), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    guard = _guard_constants(consts_sb, chunk, dk)
    sched = _varlen_schedule(cu_seqlens, seq, chunk, dk, n_chunks, n_ckpt, checkpoint_every) if varlen else None
    # v heads of one q/k group are processed W at a time in lockstep ([C, W, C] tiles): one instruction
    # serves W heads where the op is the same, and the W independent chains hide each other's latency
    width = _lockstep_width(n_hv, group, chunk, dk, dv, head_base)
    # I and the level masks of the block solve in the compute dtype, replicated W times along the free dim
    # (no broadcasting in NKI ops), copied on GpSimd and ScalarE (idle at the start)
    n_lvl = _n_levels(chunk)
    masks_w = nl.ndarray((chunk, n_lvl + 1, width, chunk), dtype=cdt, buffer=nl.sbuf)
    for i_w in range(width):
        if i_w % 2 == 0:
            nisa.tensor_copy(dst=masks_w[:, :, i_w, :], src=consts_sb[:, _C_IDENT:_C_MT0 + n_lvl, :],
                             engine=nisa.engine.gpsimd)
        else:
            nisa.activation(dst=masks_w[:, :, i_w, :], op=nl.copy, data=consts_sb[:, _C_IDENT:_C_MT0 + n_lvl, :])
    # one solve workspace per chunk in flight (fp32 compute: _FP32_DEPTH, +1 on long launches, when Hv * C <= 512
    # per core, else 1, to save SBUF)
    depth = _pipeline_depth(n_hv, chunk)
    if cdt == f32:
        depth = (_FP32_DEPTH + (bsz * n_chunks >= _FP32_DEEP_MIN_ITEMS)) if n_hv * chunk <= 512 else 1
    newton = _newton_constants(consts_sb, width, chunk) if cdt == f32 else None
    solve_wss = [_solve_workspace(masks_w, n_lvl, width, chunk, cdt, newton) for _ in range(depth)]

    cfg = dict(chunk=chunk, seq=seq, width=width, group=group, head_base=head_base, scale=scale,
               use_l2norm=use_l2norm, cdt=cdt, has_lengths=has_lengths,
               hi_rows=consts_sb[:, _c_hi_rows(chunk), :], hi_lvl=consts_sb[:, _c_hi_lvl(chunk), :],
               row_tiles=opts.get("row_tiles", False),
               vec_transpose=mixing_pe_transpose(),
               consts_sb=consts_sb, ones_sb=ones_sb, ident_c=solve_wss[0][0][:, 0, :], guard=guard,
               sched=sched, n_hk_all=dims["n_hk_all"], n_hv_all=dims["n_hv_all"], initial_state=initial_state,
               has_initial_state=has_initial_state, n_hv=n_hv, dk=dk, dv=dv, loader=loader)
    # software pipeline over the (batch, chunk) items: the state-independent parts of items n + 1 .. n + depth
    # (loads, norms, decays, A, the solve, W) are emitted interleaved, stage by stage, with the
    # state-dependent part of item n (V', O, S): their chains overlap instead of adding up
    items = [(i_b, i_c) for i_b in range(bsz) for i_c in range(n_chunks)]
    per_seq = {}
    ctxs, preps = {}, {}

    def start_prep(i_n):
        if i_n < len(items):
            ctxs[i_n] = dict(i_b=items[i_n][0], i_c=items[i_n][1], ws=solve_wss[i_n % depth])
            preps[i_n] = _chunk_prep(q, k, v, g, beta, lengths, per_seq, ctxs[i_n], cfg)

    for i_n in range(depth):
        start_prep(i_n)
    done = set()
    _run_interleaved(list(preps.values()), [preps[0]], done)
    for i_n in range(len(items)):
        start_prep(i_n + depth)
        tail = _chunk_tail(initial_state, has_initial_state, o, final_state, ckpt, n_ckpt, checkpoint_every,
                           n_chunks, per_seq, ctxs[i_n], cfg)
        ahead = [preps[j] for j in range(i_n + 1, i_n + 1 + depth) if j in preps]
        _run_interleaved([tail] + ahead, [tail] + ahead[:1], done)
        done.discard(preps.pop(i_n))
        done.discard(tail)
        ctxs.pop(i_n)                                      # the item's tiles go out of scope


def _owned_heads(n_hv, pid, n_prog):
    """[lo, hi) of the v heads program instance `pid` of `n_prog` owns: contiguous, ceil(Hv / n_prog) each
    (the last instance may own fewer, or none when Hv < n_prog)."""
    per = (n_hv + n_prog - 1) // n_prog
    lo = min(n_hv, pid * per)
    return lo, min(n_hv, lo + per)


def _run_interleaved(gens, needed, done):
    """Emit the stages of instruction generators round robin (program order = issue order) until every
    generator in `needed` is exhausted (recorded in the set `done`); the others keep their place."""
    while any(gen not in done for gen in needed):
        for gen in gens:
            if gen not in done:
                try:
                    next(gen)
                except StopIteration:
                    done.add(gen)


def _chunk_prep(q, k, v, g, beta, lengths, per_seq, ctx, cfg):
    """State-independent part of one chunk (a generator: yields between stages). Fills ctx with the tiles
    the state-dependent part needs."""
    i_b, i_c = ctx["i_b"], ctx["i_c"]
    chunk, seq, width, group, cdt = cfg["chunk"], cfg["seq"], cfg["width"], cfg["group"], cfg["cdt"]
    consts_sb, ones_sb = cfg["consts_sb"], cfg["ones_sb"]
    n_hv, dk, dv = cfg["n_hv"], cfg["dk"], cfg["dv"]
    f32 = nl.float32
    utri = consts_sb[:, _C_UTRI, :]
    if i_c == 0:
        per_seq[i_b] = {}
        if cfg["has_lengths"]:
            len_i = nl.ndarray((chunk, 1), dtype=nl.int32, buffer=nl.sbuf)
            nisa.dma_copy(dst=len_i, src=lengths.ap(pattern=[[0, chunk], [1, 1]], offset=i_b))
            len_f = nl.ndarray((chunk, 1), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=len_f, src=len_i)
            per_seq[i_b]["len_f"] = len_f
    len_f = per_seq[i_b].get("len_f")
    t0 = i_c * chunk
    n_tok = min(chunk, seq - t0)
    sched = cfg["sched"]
    if cfg["loader"] is not None:
        tiles = cfg["loader"](i_b, i_c, t0, n_tok, per_seq[i_b])
    elif sched is None:
        tiles = _load_chunk(q, k, v, g, beta, i_b, t0, n_tok, chunk, cdt, per_seq[i_b])
    else:
        n_tok = chunk
        tiles = _gather_chunk(q, k, v, g, beta, sched["load_row"][:, i_c:i_c + 1], chunk, cdt, cfg)
    q_sb, k_sb, v_sb, g_sb, beta_sb = tiles
    _init_workspace(ctx["ws"])
    valid = None
    if sched is not None:
        # rows past the slot's sequence (the next sequence's tokens, or clamped repeats of the last token) are pad
        valid = _column(sched["valid"], i_c, nl.uint8)
        _zero_pad_rows(tiles, valid)
        if cfg["has_initial_state"]:                          # initial_state[n_s], loaded ahead of the state chain
            ctx["init_sb"] = _load_state_row(cfg["initial_state"], sched["seq"][i_c], dk, dv)
    elif cfg["has_lengths"]:
        # pad tokens (t >= length): q = k = v = g = beta = 0 by a select, so a NaN / Inf there reaches nothing
        # (no decay, no write, zero output); a multiply by 0 would keep NaN
        valid = _valid_mask(len_f, t0, chunk)
        _zero_pad_rows(tiles, valid)
    # g = -inf is exact decay to 0: g >= _G_FLOOR keeps the 0/1-mask products of the decay matmuls finite
    # (0 * -inf would be NaN), and exp of any causal sum that includes it is still exactly 0
    nisa.tensor_scalar(dst=g_sb, data=g_sb, op0=nl.maximum, operand0=_G_FLOOR)
    # fp32 compute on bf16 q, k: the products over Dk (K K^T, K Q^T, Q S) take the raw bf16 q, k (exact operands,
    # one TensorE pass) and apply the norms as diagonal scalings outside the products (_raw_scalings)
    raw = cdt == f32 and q_sb.dtype == nl.bfloat16
    # rows of huge |x|: an exact power-of-two pre-scale p [C, (k, q), Hk] the norm absorbs (_pow2_prescale)
    sumsq, pre = (None, None)
    if cfg["use_l2norm"]:
        sumsq, pre = _pow2_prescale((k_sb, q_sb), cfg["guard"]["thr"])
    q_c, q_fac = _normalize(q_sb, None, cfg["scale"], cfg["use_l2norm"], cdt, factor_only=raw,
                            prescaled=None if pre is None else (sumsq[:, 1, :], pre[:, 1, :]))
    k_c, k_fac = _normalize(k_sb, None, 1.0, cfg["use_l2norm"], cdt,
                            prescaled=None if pre is None else (sumsq[:, 0, :], pre[:, 0, :]))
    if raw and pre is not None:        # the raw rows scaled too (raw k: by _raw_scalings' per-head pass)
        for i_k in range(q_sb.shape[1]):
            nisa.activation(dst=q_sb[:, i_k, :], op=nl.copy, data=q_sb[:, i_k, :], scale=pre[:, 1, i_k:i_k + 1])
    v_c = v_sb                                             # already in the compute dtype
    # bad values of k, v, g, beta zeroed before any product over the chunk's tokens (q needs no guard: its token's
    # output row is the only one that reads it); what the recurrence makes NaN is restored in the tail
    ctx.update(_guard_chunk(k_c, v_c, g_sb, beta_sb, _poison_threshold(valid, cfg), cfg))
    ctx["valid"] = valid
    # per-chunk decays for all v heads: e^{G_i} [C, Hv], e^{G_C} broadcast to Dk partitions [Dk, Hv]
    gcol_ps = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(gcol_ps, utri, g_sb)
    exp_g = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=exp_g, op=nl.exp, data=gcol_ps)
    beta_exp_g = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=beta_exp_g, data1=exp_g, data2=beta_sb, op=nl.multiply)
    glast_ps = nl.ndarray((dk, n_hv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(glast_ps, ones_sb[:, 0:dk], g_sb)
    exp_glast = nl.ndarray((dk, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=exp_glast, op=nl.exp, data=glast_ps)
    del gcol_ps, glast_ps
    ctx.update(n_tok=n_tok, exp_g=exp_g, exp_glast=exp_glast, blocks=[], raw=None)
    if raw:
        ctx["raw"] = _raw_scalings(k_sb, ctx["k_ok"], q_fac, k_fac, exp_g, cfg,
                                   None if pre is None else pre[:, 0, :])
    yield

    base = cfg["head_base"]                                # global index of owned v head 0
    kh_base = base // group                                # global index of q/k head 0 of q_c / k_c
    for i_blk in range(n_hv // width):
        hv0 = i_blk * width
        hk0 = (base + hv0) // group - kh_base
        n_kh = (base + hv0 + width - 1) // group - (base + hv0) // group + 1    # q/k heads this block uses
        q_t = nl.ndarray((dk, n_kh, chunk), dtype=cdt, buffer=nl.sbuf)
        k_t = nl.ndarray((dk, n_kh, chunk), dtype=cdt, buffer=nl.sbuf)
        # TensorE transposes (a data move: a NaN in token i stays in column i; a matmul with I would
        # spread it to every column through NaN * 0)
        # raw: Q^T, K^T of the raw bf16 q, k (bf16 transposes, one pass), K K^T and K Q^T exact in fp32 PSUM
        tdt = nl.bfloat16 if raw else cdt
        q_src, k_src = (q_sb, k_sb) if raw else (q_c, k_c)
        if raw:
            q_t = nl.ndarray((dk, n_kh, chunk), dtype=tdt, buffer=nl.sbuf)
            k_t = nl.ndarray((dk, n_kh, chunk), dtype=tdt, buffer=nl.sbuf)
        tq_ps = nl.ndarray((dk, 2, n_kh, chunk), dtype=tdt, buffer=nl.psum)
        for i_k in range(n_kh):
            if cfg["vec_transpose"]:     # trn1: the TensorE transpose is an identity matmul (0 * NaN over the chunk)
                vector_transpose(tq_ps[:, 0, i_k, :], q_src[:, hk0 + i_k, :])
                vector_transpose(tq_ps[:, 1, i_k, :], k_src[:, hk0 + i_k, :])
                continue
            nisa.nc_transpose(dst=tq_ps[:, 0, i_k, :], data=q_src[:, hk0 + i_k, :])
            nisa.nc_transpose(dst=tq_ps[:, 1, i_k, :], data=k_src[:, hk0 + i_k, :])
        nisa.activation(dst=q_t, op=nl.copy, data=tq_ps[:, 0])      # Q^T [Dk, C] per q/k head
        nisa.activation(dst=k_t, op=nl.copy, data=tq_ps[:, 1])      # K^T
        del tq_ps
        kk_ps = nl.ndarray((chunk, n_kh, chunk), dtype=f32, buffer=nl.psum)
        kq_ps = nl.ndarray((chunk, n_kh, chunk), dtype=f32, buffer=nl.psum)
        for i_k in range(n_kh):
            nisa.nc_matmul(kk_ps[:, i_k, :], k_t[:, i_k, :], k_t[:, i_k, :])   # K K^T (symmetric)
            nisa.nc_matmul(kq_ps[:, i_k, :], k_t[:, i_k, :], q_t[:, i_k, :])   # [j, i] = k_j . q_i
        kk_sb = nl.ndarray((chunk, n_kh, chunk), dtype=cdt, buffer=nl.sbuf)
        nisa.activation(dst=kk_sb, op=nl.copy, data=kk_ps)
        del kk_ps
        kq_causal = nl.ndarray((chunk, n_kh, chunk), dtype=cdt, buffer=nl.sbuf)
        for i_k in range(n_kh):
            if raw:          # row j of the raw K Q^T times the key norm of token j (q's norm: on the output rows)
                nisa.scalar_tensor_tensor(dst=kq_causal[:, i_k, :], data=kq_ps[:, i_k, :], op0=nl.multiply,
                                          operand0=k_fac[:, hk0 + i_k:hk0 + i_k + 1], op1=nl.multiply, operand1=utri)
            else:
                nisa.tensor_tensor(dst=kq_causal[:, i_k, :], data1=kq_ps[:, i_k, :], data2=utri, op=nl.multiply)
        del kq_ps
        yield
        hs = slice(hv0, hv0 + width)
        head_kh = [(base + hv0 + w) // group - kh_base - hk0 for w in range(width)]
        blk = dict(hs=hs, head_kh=head_kh, q_t=q_t, k_t=k_t, raw=None)
        if raw:
            blk["raw"] = {key: val[:, hs] for key, val in ctx["raw"].items()}
        yield from _block_prep(blk, k_c[:, hk0:hk0 + n_kh, :], v_c[:, hs, :], kk_sb,
                               kq_causal, g_sb[:, hs], beta_sb[:, hs], exp_g[:, hs], beta_exp_g[:, hs], ctx["ws"],
                               cfg, dk, dv)
        ctx["blocks"].append(blk)


def _chunk_tail(initial_state, has_initial_state, o, final_state, ckpt, n_ckpt, checkpoint_every, n_chunks,
                per_seq, ctx, cfg):
    """State-dependent part of one chunk (a generator): V' = U - W S, O, the S update, the stores."""
    i_b, i_c, n_tok = ctx["i_b"], ctx["i_c"], ctx["n_tok"]
    chunk = cfg["chunk"]
    n_hv, dk, dv = final_state.shape[1], final_state.shape[2], final_state.shape[3]
    f32 = nl.float32
    sched = cfg["sched"]
    if i_c == 0:
        state_sb = nl.ndarray((dk, n_hv, dv), dtype=f32, buffer=nl.sbuf)
        if has_initial_state and sched is None:
            nisa.dma_copy(dst=state_sb, src=initial_state[i_b].permute((1, 0, 2)))
        else:
            nisa.memset(dst=state_sb, value=0.0)
        per_seq[i_b]["state"] = state_sb
    state_sb = per_seq[i_b]["state"]
    if sched is not None:                    # a slot that starts its sequence: S = initial_state[n] (or 0), by select
        first = _column(sched["first"], i_c, nl.uint8)
        pred = first.ap(pattern=[[1, dk], [0, n_hv * dv]], offset=0)
        init = ctx["init_sb"].reshape((dk, n_hv * dv)) if has_initial_state else 0.0
        nisa.tensor_copy_predicated(dst=state_sb.reshape((dk, n_hv * dv)), src=init, predicate=pred)
    o_sb = nl.ndarray((chunk, n_hv, dv), dtype=o.dtype, buffer=nl.sbuf)
    for blk in ctx["blocks"]:
        hs = blk["hs"]
        blk.update(pred_o=ctx["pred_o"][:, hs, :], pred_s=ctx["pred_s"][:, hs, :])
        yield from _block_tail(blk, ctx["exp_g"][:, hs], ctx["exp_glast"][:, hs], state_sb[:, hs, :],
                               o_sb[:, hs, :], cfg, dk, dv)
    t0 = i_c * chunk
    if sched is not None:
        _store_slot(o, final_state, o_sb, state_sb, sched, i_c, cfg)
        if ckpt is not None:                 # checkpoint (n_s, i) when the slot ends chunk (i + 1) * N of n_s
            nisa.dma_copy(dst=ckpt.ap(pattern=[[dv, dk], [dk * dv, n_hv], [1, dv]], offset=0,
                                      scalar_offset=sched["ckpt"][i_c], indirect_dim=1),
                          src=state_sb, oob_mode=nisa.oob_mode.skip)
        return
    if ctx["valid"] is not None:             # pad rows: output 0 even after a bad value made the state NaN
        _zero_pad_rows((o_sb,), ctx["valid"])
    nisa.dma_copy(dst=o[i_b, t0:t0 + n_tok], src=o_sb[0:n_tok])
    if n_ckpt > 0 and (i_c + 1) % checkpoint_every == 0 and (i_c + 1) // checkpoint_every <= n_ckpt:
        i_k = (i_c + 1) // checkpoint_every - 1
        nisa.dma_copy(dst=ckpt[i_b, i_k].permute((1, 0, 2)), src=state_sb)
    if i_c + 1 == n_chunks:
        nisa.dma_copy(dst=final_state[i_b].permute((1, 0, 2)), src=state_sb)



def _load_chunk(q, k, v, g, beta, i_b, t0, n_tok, chunk, io_dt, per_seq):
    """SBUF tiles (tokens on partitions) of one chunk: q, k in their HBM dtype, v in io_dt, g and beta in fp32;
    rows past the sequence end are zero."""
    n_hk, dk = q.shape[2], q.shape[3]
    n_hv, dv = v.shape[2], v.shape[3]
    q_sb = nl.ndarray((chunk, n_hk, dk), dtype=q.dtype, buffer=nl.sbuf)       # as stored (normalised later)
    k_sb = nl.ndarray((chunk, n_hk, dk), dtype=q.dtype, buffer=nl.sbuf)
    v_sb = nl.ndarray((chunk, n_hv, dv), dtype=io_dt, buffer=nl.sbuf)
    g_sb, beta_sb = _load_gates(g, beta, i_b, t0 // chunk, chunk, q.shape[1], per_seq)
    tiles = (q_sb, k_sb, v_sb)
    if n_tok < chunk:
        for t in tiles:
            nisa.memset(dst=t, value=0.0)
    for t, src in zip(tiles, (q, k, v)):
        nisa.dma_copy(dst=t[0:n_tok], src=src[i_b, t0:t0 + n_tok])
    return q_sb, k_sb, v_sb, g_sb, beta_sb


def _load_gates(g, beta, i_b, i_c, chunk, seq, per_seq):
    """g, beta [C, Hv] fp32 of chunk i_c (rows past T zero): views of per-sequence tiles [C, G, Hv] that hold
    _GATE_CHUNKS chunks, loaded by one DMA each when the group's first chunk is prepared. A chunk's own rows are
    Hv * 4 B (16 B at a TP4 rank under LNC=2): one DMA per chunk moved 16 B descriptors, each paying the DMA
    packet cost of dma_knee_bytes (about 1/160 of the peak rate); the group load moves G runs per partition row."""
    n_hv = g.shape[2]
    n_chunks = (seq + chunk - 1) // chunk
    j = i_c % _GATE_CHUNKS
    if j == 0:
        n_c = min(_GATE_CHUNKS, n_chunks - i_c)
        t0 = i_c * chunk
        full = min(n_c, (seq - t0) // chunk)
        tiles = []
        for src in (g, beta):
            t = nl.ndarray((chunk, n_c, n_hv), dtype=nl.float32, buffer=nl.sbuf)
            if full < n_c:
                nisa.memset(dst=t, value=0.0)
            if full > 0:
                nisa.dma_copy(dst=t[:, 0:full, :],
                              src=src[i_b, t0:t0 + full * chunk].reshape((full, chunk, n_hv)).permute((1, 0, 2)))
            if full < n_c:
                nisa.dma_copy(dst=t[0:seq - t0 - full * chunk, full, :], src=src[i_b, t0 + full * chunk:seq])
            tiles.append(t)
        per_seq["gates"] = tiles
    g_grp, b_grp = per_seq["gates"]
    return g_grp[:, j, :], b_grp[:, j, :]


def _varlen_schedule(cu_seqlens, seq, chunk, dk, n_slots, n_ckpt=0, ckpt_every=0):
    """The chunk slots of packed sequences, computed on device from cu_seqlens (the trace never sees its values).

    Sequence n is tokens cu[n] .. cu[n+1] - 1 (cu clamped to [0, T] and made non-decreasing in-kernel, so any
    values give in-range accesses) and gets max(1, ceil(L_n / C)) consecutive slots; slot s processes C rows
    from token tok0_s of sequence n_s, valid while row < nval_s. Slots past the last sequence's are no-ops
    (nval = 0, no final-state write). A sequence of length 0 has one slot with no valid row: its final state is
    its initial state. Computed once with slots on the partitions (tiles of 128): the comparison
    start[n] <= s gives n_s and a one-hot over n that picks the slot's cu[n], cu[n+1], start[n] and chunk count;
    a matmul of ones with diag(values) spreads tok0, nval and the first-slot flag over the C row partitions.
    Returns dict of:
        load_row [C, S] int32: token of row p, clamped to [0, T - 1] (gather indices, always in range);
        store_row [C, S] int32: token of row p when valid, else T (outside o: that row's write is skipped);
        valid [C, S] uint8 0/1; first [Dk, S] uint8 0/1 (the slot starts its sequence);
        seq[s], fin[s]: (1, 1) int32 tiles: n_s (in [0, N - 1]) and n_s when the slot ends its sequence, else N
            (outside final_state: skipped);
        ckpt[s] (n_ckpt > 0): (1, 1) int32: n_s * n_ckpt + i when the slot is full and ends chunk (i + 1) *
            ckpt_every of its sequence (checkpoint i), else N * n_ckpt (outside the checkpoints: skipped).
    """
    f32, i32 = nl.float32, nl.int32
    n_seq = cu_seqlens.shape[0] - 1
    n1 = n_seq + 1
    p_all = P_MAX
    cu_i = nl.ndarray((p_all, n1), dtype=i32, buffer=nl.sbuf)
    nisa.dma_copy(dst=cu_i, src=cu_seqlens.ap(pattern=[[0, p_all], [1, n1]], offset=0))   # on every partition
    nisa.tensor_scalar(dst=cu_i, data=cu_i, op0=nl.maximum, operand0=0, op1=nl.minimum, operand1=seq)
    cu_f = nl.ndarray((p_all, n1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cu_f, src=cu_i)                       # exact: T < 2^24
    ones = nl.ndarray((p_all, n1), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    cu_m = nl.ndarray((p_all, n1), dtype=f32, buffer=nl.sbuf)   # running max: non-decreasing
    nisa.tensor_tensor_scan(dst=cu_m, data0=ones, data1=cu_f, initial=0.0, op0=nl.multiply, op1=nl.maximum)
    len_i = nl.ndarray((p_all, n_seq), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=len_i, data1=cu_m[:, 1:n1], data2=cu_m[:, 0:n_seq], op=nl.subtract)
    nch_i = nl.ndarray((p_all, n_seq), dtype=i32, buffer=nl.sbuf)    # max(1, ceil(L / C)) = (L + C - 1) >> log2 C
    nisa.tensor_scalar(dst=nch_i, data=len_i, op0=nl.add, operand0=chunk - 1, op1=nl.right_shift,
                       operand1=_n_levels(chunk))
    nisa.tensor_scalar(dst=nch_i, data=nch_i, op0=nl.maximum, operand0=1)
    vals = nl.ndarray((p_all, 4, n_seq), dtype=f32, buffer=nl.sbuf)   # cu[n], cu[n+1], start[n], chunks[n]
    nisa.tensor_copy(dst=vals[:, 0, :], src=cu_m[:, 0:n_seq])
    nisa.tensor_copy(dst=vals[:, 1, :], src=cu_m[:, 1:n1])
    nisa.tensor_copy(dst=vals[:, 3, :], src=nch_i)
    nisa.tensor_tensor_scan(dst=vals[:, 2, :], data0=ones[:, 0:n_seq], data1=vals[:, 3, :], initial=0.0,
                            op0=nl.multiply, op1=nl.add)
    nisa.tensor_tensor(dst=vals[:, 2, :], data1=vals[:, 2, :], data2=vals[:, 3, :], op=nl.subtract)   # exclusive
    ones_c = nl.ndarray((p_all, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_c, value=1.0)
    ident = nl.ndarray((p_all, p_all), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ident, value=1.0)
    nisa.affine_select(dst=ident, pattern=[[1, p_all]], offset=0, channel_multiplier=-1, on_true_tile=ident,
                       on_false_value=0.0, cmp_op=nl.equal)
    bcast = nl.ndarray((chunk, 3, n_slots), dtype=f32, buffer=nl.sbuf)   # tok0, nval, first per slot, every row
    seq_tiles, fin_tiles, ck_tiles = [], [], []
    for s0 in range(0, n_slots, p_all):
        n = min(p_all, n_slots - s0)
        per_slot = _slot_values(vals, s0, n_seq, chunk)
        seq_tiles.append(per_slot["seq"])
        fin_tiles.append(per_slot["fin"])
        if n_ckpt > 0:
            ck_tiles.append(_slot_checkpoint(per_slot, n_seq, n_ckpt, ckpt_every, chunk))
        diag = nl.ndarray((p_all, 3, p_all), dtype=f32, buffer=nl.sbuf)
        for i_v, key in enumerate(("tok0", "nval", "first")):
            nisa.tensor_scalar(dst=diag[0:n, i_v, 0:n], data=ident[0:n, 0:n], op0=nl.multiply,
                               operand0=per_slot[key][0:n, :])
        bc_ps = nl.ndarray((chunk, 3, p_all), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(bc_ps[:, :, 0:n], ones_c[0:n, :], diag[0:n, :, 0:n])
        nisa.tensor_copy(dst=bcast[:, :, s0:s0 + n], src=bc_ps[:, :, 0:n])
        del bc_ps
    pos = nl.ndarray((chunk, 1), dtype=i32, buffer=nl.sbuf)
    nisa.iota(dst=pos, pattern=[[0, 1]], offset=0, channel_multiplier=1)
    pos_f = nl.ndarray((chunk, 1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pos_f, src=pos)
    valid = nl.ndarray((chunk, n_slots), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=valid, data=bcast[:, 1, :], op0=nl.greater, operand0=pos_f)
    row = nl.ndarray((chunk, n_slots), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=row, data=bcast[:, 0, :], op0=nl.add, operand0=pos_f)
    load_row = nl.ndarray((chunk, n_slots), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=load_row, data=row, op0=nl.minimum, operand0=float(seq - 1))
    store_f = nl.ndarray((chunk, n_slots), dtype=f32, buffer=nl.sbuf)     # T where not valid
    nisa.scalar_tensor_tensor(dst=store_f, data=row, op0=nl.subtract, operand0=float(seq), op1=nl.multiply,
                              operand1=valid)                            # (row - T) * valid
    store_row = nl.ndarray((chunk, n_slots), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=store_row, data=store_f, op0=nl.add, operand0=float(seq))
    first = nl.ndarray((dk, n_slots), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_copy(dst=first, src=bcast[0:dk, 2, :])
    seq_rows = [t[i:i + 1, :] for t in seq_tiles for i in range(t.shape[0])][:n_slots]
    fin_rows = [t[i:i + 1, :] for t in fin_tiles for i in range(t.shape[0])][:n_slots]
    ck_rows = [t[i:i + 1, :] for t in ck_tiles for i in range(t.shape[0])][:n_slots]
    return dict(load_row=load_row, store_row=store_row, valid=valid, first=first, seq=seq_rows, fin=fin_rows,
                ckpt=ck_rows)


def _slot_checkpoint(per_slot, n_seq, n_ckpt, ckpt_every, chunk):
    """[P, 1] int32 checkpoint row of each slot (see _varlen_schedule): hit[i] = (j + 1 == (i + 1) * every) for
    the slot's chunk index j, counted only when the slot is full (nval == C)."""
    f32 = nl.float32
    p_all = per_slot["j"].shape[0]
    marks_i = nl.ndarray((p_all, n_ckpt), dtype=nl.int32, buffer=nl.sbuf)       # (i + 1) * every - 1
    nisa.iota(dst=marks_i, pattern=[[ckpt_every, n_ckpt]], offset=ckpt_every - 1, channel_multiplier=0)
    marks = nl.ndarray((p_all, n_ckpt), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=marks, src=marks_i)
    hit = nl.ndarray((p_all, n_ckpt), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=hit, data=marks, op0=nl.equal, operand0=per_slot["j"])
    idx_i = nl.ndarray((p_all, n_ckpt), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=idx_i, pattern=[[1, n_ckpt]], offset=0, channel_multiplier=0)
    idx = nl.ndarray((p_all, n_ckpt), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=idx, src=idx_i)
    nisa.tensor_tensor(dst=idx, data1=idx, data2=hit, op=nl.multiply)
    ok = nl.ndarray((p_all, 2), dtype=f32, buffer=nl.sbuf)                        # [any hit, checkpoint index]
    nisa.tensor_reduce(dst=ok[:, 0:1], op=nl.maximum, data=hit, axis=1)
    nisa.tensor_reduce(dst=ok[:, 1:2], op=nl.add, data=idx, axis=1)
    full = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=full, data=per_slot["nval"], op0=nl.greater_equal, operand0=float(chunk))
    nisa.tensor_tensor(dst=ok[:, 0:1], data1=ok[:, 0:1], data2=full, op=nl.multiply)
    row = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)                       # n_s * n_ckpt + i
    nisa.scalar_tensor_tensor(dst=row, data=per_slot["seq_f"], op0=nl.multiply, operand0=float(n_ckpt), op1=nl.add,
                              operand1=ok[:, 1:2])
    dump = float(n_seq * n_ckpt)                                                  # (row - dump) * ok + dump
    nisa.scalar_tensor_tensor(dst=row, data=row, op0=nl.subtract, operand0=dump, op1=nl.multiply,
                              operand1=ok[:, 0:1])
    row_i = nl.ndarray((p_all, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=row_i, data=row, op0=nl.add, operand0=dump)
    return row_i


def _slot_values(vals, s0, n_seq, chunk):
    """Per slot s = s0 + p (partition p): [P, 1] fp32 tok0, nval, first and int32 seq, fin (see _varlen_schedule).
    vals [P, 4, N]: cu[n], cu[n+1], start[n], chunks[n] (the same on every partition)."""
    f32, i32 = nl.float32, nl.int32
    p_all = vals.shape[0]
    s_i = nl.ndarray((p_all, 1), dtype=i32, buffer=nl.sbuf)
    nisa.iota(dst=s_i, pattern=[[0, 1]], offset=s0, channel_multiplier=1)
    s_f = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=s_f, src=s_i)
    started = nl.ndarray((p_all, n_seq), dtype=f32, buffer=nl.sbuf)       # start[n] <= s
    nisa.tensor_scalar(dst=started, data=vals[:, 2, :], op0=nl.less_equal, operand0=s_f)
    seq_f = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)           # n_s = #started - 1 (start[0] = 0 <= s)
    nisa.tensor_reduce(dst=seq_f, op=nl.add, data=started, axis=1)
    nisa.tensor_scalar(dst=seq_f, data=seq_f, op0=nl.subtract, operand0=1.0, op1=nl.maximum, operand1=0.0)
    onehot = nl.ndarray((p_all, n_seq), dtype=f32, buffer=nl.sbuf)      # [n == n_s] (start strictly increases)
    nisa.tensor_copy(dst=onehot, src=started)
    if n_seq > 1:
        nisa.tensor_tensor(dst=onehot[:, 0:n_seq - 1], data1=started[:, 0:n_seq - 1], data2=started[:, 1:n_seq],
                           op=nl.subtract)
    prod = nl.ndarray((p_all, 4, n_seq), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=prod, data1=vals, data2=onehot.ap(pattern=[[n_seq, p_all], [0, 4], [1, n_seq]], offset=0),
                       op=nl.multiply)
    picked = nl.ndarray((p_all, 4), dtype=f32, buffer=nl.sbuf)          # cu[n_s], cu[n_s + 1], start, chunks
    nisa.tensor_reduce(dst=picked, op=nl.add, data=prod, axis=2)
    j = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)               # chunk index inside the sequence
    nisa.tensor_tensor(dst=j, data1=s_f, data2=picked[:, 2:3], op=nl.subtract)
    tok0 = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=tok0, data=j, op0=nl.multiply, operand0=float(chunk), op1=nl.add,
                              operand1=picked[:, 0:1])
    nval = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=nval, data1=picked[:, 1:2], data2=tok0, op=nl.subtract)
    nisa.tensor_scalar(dst=nval, data=nval, op0=nl.maximum, operand0=0.0, op1=nl.minimum, operand1=float(chunk))
    first = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=first, data=j, op0=nl.equal, operand0=0.0)
    last = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)            # j == chunks - 1
    nisa.scalar_tensor_tensor(dst=last, data=picked[:, 3:4], op0=nl.subtract, operand0=1.0, op1=nl.equal,
                              operand1=j)
    fin_f = nl.ndarray((p_all, 1), dtype=f32, buffer=nl.sbuf)           # N - last * (N - n_s)
    nisa.tensor_scalar(dst=fin_f, data=seq_f, op0=nl.subtract, operand0=float(n_seq), op1=nl.multiply,
                       operand1=last)
    nisa.tensor_scalar(dst=fin_f, data=fin_f, op0=nl.add, operand0=float(n_seq))
    seq_i = nl.ndarray((p_all, 1), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=seq_i, src=seq_f)
    fin_i = nl.ndarray((p_all, 1), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=fin_i, src=fin_f)
    return dict(tok0=tok0, nval=nval, first=first, seq=seq_i, fin=fin_i, j=j, seq_f=seq_f)


def _column(tile, i, dtype):
    """Column i of a [P, S] schedule tile as its own [P, 1] tile of `dtype` (0/1 flags -> uint8 predicates)."""
    col = nl.ndarray((tile.shape[0], 1), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=col, src=tile[:, i:i + 1])
    return col


def _row_pattern(x, chunk, row_elems):
    """Access pattern [[0, 1], [row_elems, C], head dims...] of C token rows of x [1, T, H, (D)] (a head slice of
    a tensor with row_elems elements per token), for a gather / scatter with one token index per row (indirect
    dim 1, the token dim)."""
    inner = list(x.shape[2:])
    strides = [int(np.prod(inner[i + 1:], dtype=np.int64)) for i in range(len(inner))]
    return [[0, 1], [row_elems, chunk]] + [[st, n] for st, n in zip(strides, inner)]


def _gather_chunk(q, k, v, g, beta, rows, chunk, io_dt, cfg):
    """SBUF tiles (row p = token rows[p] of the packed sequence, rows [C, 1] int32 in [0, T - 1]) of one slot:
    q, k in their HBM dtype, v in io_dt, g and beta in fp32."""
    n_hk, dk = q.shape[2], q.shape[3]
    n_hv, dv = v.shape[2], v.shape[3]
    f32 = nl.float32
    tiles = (nl.ndarray((chunk, n_hk, dk), dtype=q.dtype, buffer=nl.sbuf),         # q, k as stored (_load_chunk)
             nl.ndarray((chunk, n_hk, dk), dtype=q.dtype, buffer=nl.sbuf),
             nl.ndarray((chunk, n_hv, dv), dtype=io_dt, buffer=nl.sbuf),
             nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf),
             nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf))
    row_elems = (cfg["n_hk_all"] * dk, cfg["n_hk_all"] * dk, cfg["n_hv_all"] * dv, cfg["n_hv_all"], cfg["n_hv_all"])
    for t, src, row_el in zip(tiles, (q, k, v, g, beta), row_elems):
        nisa.dma_copy(dst=t, src=src.ap(pattern=_row_pattern(src, chunk, row_el), offset=0, vector_offset=rows,
                                        indirect_dim=1))
    return tiles


def _load_state_row(state, n_tile, dk, dv):
    """SBUF [Dk, Hv, Dv] fp32 <- state[n] ([N, Hv, Dk, Dv] HBM, a head slice; n a (1, 1) int32 tile in range)."""
    n_hv = state.shape[1]
    st_sb = nl.ndarray((dk, n_hv, dv), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=st_sb, src=state.ap(pattern=[[dv, dk], [dk * dv, n_hv], [1, dv]], offset=0,
                                          scalar_offset=n_tile, indirect_dim=0))
    return st_sb


def _store_slot(o, final_state, o_sb, state_sb, sched, i_s, cfg):
    """Slot i_s's stores: its valid o rows scattered to their tokens (pad rows carry index T: skipped), and the
    state to final_state[n_s] when the slot ends its sequence (else index N: skipped)."""
    chunk = o_sb.shape[0]
    n_hv, dv = o_sb.shape[1], o_sb.shape[2]
    dk = state_sb.shape[0]
    rows = sched["store_row"][:, i_s:i_s + 1]
    pat = _row_pattern(o, chunk, cfg["n_hv_all"] * dv)
    nisa.dma_copy(dst=o.ap(pattern=pat, offset=0, vector_offset=rows, indirect_dim=1), src=o_sb,
                  oob_mode=nisa.oob_mode.skip)
    nisa.dma_copy(dst=final_state.ap(pattern=[[dv, dk], [dk * dv, n_hv], [1, dv]], offset=0,
                                     scalar_offset=sched["fin"][i_s], indirect_dim=0),
                  src=state_sb, oob_mode=nisa.oob_mode.skip)


def _valid_mask(len_f, t0, chunk):
    """(C, 1) uint8: 1 where token t0 + p < length, else 0."""
    pos_i = nl.ndarray((chunk, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=pos_i, pattern=[[0, 1]], offset=t0, channel_multiplier=1)
    pos_f = nl.ndarray((chunk, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pos_f, src=pos_i)
    valid = nl.ndarray((chunk, 1), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=valid, data1=pos_f, data2=len_f, op=nl.less)
    return valid


def _zero_pad_rows(tiles, valid):
    """Set the pad rows (valid == 0) of every [C, ...] tile to 0 with a predicated copy (a select: NaN-safe).
    The (C, 1) predicate is read with a zero free stride, broadcast over each tile's free elements."""
    chunk = valid.shape[0]
    for t in tiles:
        n_free = int(np.prod(t.shape[1:]))
        pred = valid.ap(pattern=[[1, chunk], [0, n_free]], offset=0)
        nisa.tensor_copy_predicated(dst=t.reshape((chunk, n_free)), src=0.0, predicate=pred, reverse_pred=True)


def _guard_constants(consts_sb, chunk, dk):
    """Tiles of the containment counts, made once: U [C, C] and ones [C, Dk] in bf16 (0/1 flags and counts
    <= C are exact) and pos1 [C, 1] fp32 (pos1[p] = p + 1)."""
    utri = nl.ndarray((chunk, chunk), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_copy(dst=utri, src=consts_sb[:, _C_UTRI, :])
    ones = nl.ndarray((chunk, dk), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    pos_i = nl.ndarray((chunk, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=pos_i, pattern=[[0, 1]], offset=1, channel_multiplier=1)
    pos1 = nl.ndarray((chunk, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pos1, src=pos_i)
    thr = nl.ndarray((chunk, _PRESCALE_THRESHOLDS), dtype=nl.float32, buffer=nl.sbuf)   # _pow2_prescale's
    for j in range(_PRESCALE_THRESHOLDS):             # |x| >= 2^(9 j) as sum (x 2^-48)^2
        nisa.memset(dst=thr[:, j:j + 1], value=(2.0 ** (_PRESCALE_LOG2_FIRST + _PRESCALE_STEP * j)) ** 2 *
                    _PRESCALE_SUMSQ ** 2, engine=nisa.engine.gpsimd)
    return dict(utri=utri, ones=ones, pos1=pos1, thr=thr)


def _pow2_prescale(tiles, thr):
    """The L2 norm's sums of squares with an exact power-of-two pre-scale of the rows, from shapes-only
    instructions (the scale comes from comparisons on device). Per (token, head) row x of the tiles [C, H, D] (k and
    q as loaded): ss' = sum (x 2^-48)^2 (ScalarE square with its free-axis sum: finite up to |x| = 2^112, and exact
    enough for the norm: what underflows is below eps 2^-24); p = 2^-(9 n), n = the number of thresholds
    thr[j] = 2^(18 j - 96) (j = 0 .. 12) at or below ss', i.e. |x| >= 2^(9 j). Rows with |x| < 1 get p = 1; larger
    ones |p x| in [2^-9, 1), so every raw row p x has norm < 1 and no product on the raw rows overflows fp32
    unless the normalised one's bound (|S| per row) does. The norm of p x absorbs p (x / |x| is unchanged), and
    eps is added before the scaling: (ss' + eps 2^-96) p^2 = (|p x|^2 + eps p^2) 2^-96, so p rsqrt(...) is the
    reference's rsqrt(|x|^2 + eps) (bit-identical to the unscaled path for p = 1).
    Returns ((ss' + eps 2^-96) p^2, p), each [C, len(tiles), H] fp32 (exact scalings). A NaN row compares false
    everywhere (p = 1, NaN stays NaN); an Inf (or |x| >= 2^112) gets the smallest p and ss' = Inf, whose rsqrt is
    outside the device's valid range: the row's factor is NaN and the row is contained as a non-finite one
    (docs/deltanet.md "Non-finite values"). Engines: the sums on ScalarE, the rest on VectorE (GpSimd, or a stage
    of its own, modeled slower: docs/deltanet.md "Non-finite values"). thr [C, _PRESCALE_THRESHOLDS] fp32
    (_guard_constants)."""
    f32 = nl.float32
    dve = nisa.engine.vector
    chunk, n_h, d = tiles[0].shape
    n_t = thr.shape[1]
    n_rows = len(tiles) * n_h
    ss = nl.ndarray((chunk, len(tiles), n_h), dtype=f32, buffer=nl.sbuf)
    ss2 = ss.reshape((chunk, n_rows))
    scratch = nl.ndarray((chunk, d), dtype=f32, buffer=nl.sbuf)
    for i_t, x in enumerate(tiles):
        for i_h in range(n_h):
            nisa.activation_reduce(dst=scratch, op=nl.square, data=x[:, i_h, :], reduce_op=nl.add,
                                   reduce_res=ss[:, i_t, i_h:i_h + 1], scale=_PRESCALE_SUMSQ)
    passed = nl.ndarray((chunk, n_rows, n_t), dtype=f32, buffer=nl.sbuf)         # [thr_j <= ss']
    nisa.tensor_tensor(dst=passed, data1=thr.ap(pattern=[[n_t, chunk], [0, n_rows], [1, n_t]], offset=0),
                       data2=ss2.ap(pattern=[[n_rows, chunk], [1, n_rows], [0, n_t]], offset=0), op=nl.less_equal,
                       engine=dve)
    step = 2.0 ** -_PRESCALE_STEP                                                # 1 - (1 - 2^-8) [passed]: exact
    nisa.tensor_scalar(dst=passed, data=passed, op0=nl.multiply, operand0=step - 1.0, op1=nl.add, operand1=1.0,
                       engine=dve)
    p = nl.ndarray((chunk, len(tiles), n_h), dtype=f32, buffer=nl.sbuf)          # product of powers of two: exact
    p_2 = p.reshape((chunk, n_rows))
    nisa.tensor_reduce(dst=p_2, op=nl.multiply, data=passed, axis=2)
    # (ss' + eps 2^-96) p p (p^2 alone can underflow: two multiplies; eps 2^-96 ~ 2^-116 is a normal fp32)
    nisa.scalar_tensor_tensor(dst=ss2, data=ss2, op0=nl.add, operand0=_L2NORM_EPS * _PRESCALE_SUMSQ ** 2,
                              op1=nl.multiply, operand1=p_2)
    nisa.tensor_tensor(dst=ss2, data1=ss2, data2=p_2, op=nl.multiply, engine=dve)
    return ss, p


def _poison_threshold(valid, cfg):
    """[C, 1] fp32: p + 1 on valid rows, -1 on pad rows (valid == 0), whose outputs stay 0 whatever came before."""
    pos1 = cfg["guard"]["pos1"]
    if valid is None:
        return pos1
    thr = nl.ndarray(pos1.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=thr, src=pos1)
    nisa.tensor_copy_predicated(dst=thr, src=-1.0, predicate=valid, reverse_pred=True)
    return thr


def _guard_chunk(k_c, v_c, g_sb, beta_sb, thr, cfg):
    """Non-finite containment of one chunk (issue 16), before any product over its tokens.

    k_c [C, Hk, Dk] (normalised, compute dtype), v_c [C, Hv, Dv], g_sb, beta_sb [C, Hv] (fp32, g clamped):
    their bad values (see _SAFE_MAG) are set to 0 by selects, in place, so every intra-chunk product is finite and
    no token reaches an earlier one through 0 x NaN. Returns the u8 predicates of what the token-sequential
    recurrence makes NaN, restored by selects in the tail:
        pred_o [C, Hv, Dv]: output (t, h, d) with t at or after a token t' of the chunk whose k (of h's q/k head),
            g[t', h] or beta[t', h] is bad, or whose v[t', h, d] is (and t a valid row: thr[t] = t + 1, else -1);
        pred_s [Dk, Hv, Dv]: state column (h, d) after the chunk when any token of the chunk is bad for (h, d).
    Bad values in earlier chunks reach this one through the state (NaN in, NaN out, column by column).
    Flags: ok = (|x| <= limit) is 0 for NaN (comparisons with NaN are false); counts of ok tokens by bf16
    matmuls with the 0/1 masks U (prefix) and ones (total), exact in fp32 PSUM.
    """
    chunk, n_hk, dk = k_c.shape
    n_hv, dv = v_c.shape[1], v_c.shape[2]
    u8, f32 = nl.uint8, nl.float32
    group, base = cfg["group"], cfg["head_base"]
    gd = cfg["guard"]
    k_ok = nl.ndarray((chunk, n_hk, dk), dtype=u8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=k_ok, data=k_c, op0=nl.abs_max, operand0=0.0, op1=nl.less_equal, operand1=_SAFE_MAG)
    nisa.tensor_copy_predicated(dst=k_c, src=0.0, predicate=k_ok, reverse_pred=True)
    k_tok = nl.ndarray((chunk, n_hk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=k_tok, op=nl.minimum, data=k_ok, axis=2)
    v_ok = nl.ndarray((chunk, n_hv, dv), dtype=u8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=v_ok, data=v_c, op0=nl.abs_max, operand0=0.0, op1=nl.less_equal, operand1=_FP32_MAX,
                       engine=nisa.engine.gpsimd)
    nisa.tensor_copy_predicated(dst=v_c, src=0.0, predicate=v_ok, reverse_pred=True)
    g_ok = nl.ndarray((chunk, n_hv), dtype=u8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=g_ok, data=g_sb, op0=nl.less_equal, operand0=_G_CEIL)
    nisa.tensor_copy_predicated(dst=g_sb, src=0.0, predicate=g_ok, reverse_pred=True)
    b_ok = nl.ndarray((chunk, n_hv), dtype=u8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=b_ok, data=beta_sb, op0=nl.abs_max, operand0=0.0, op1=nl.less_equal, operand1=_SAFE_MAG)
    nisa.tensor_copy_predicated(dst=beta_sb, src=0.0, predicate=b_ok, reverse_pred=True)
    # head_ok[t, h] = g, beta of (t, h) and k of (t, h's q/k head) all good
    head_ok = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=head_ok, data1=g_ok, data2=b_ok, op=nl.minimum)
    kh_base = base // group
    for i_k in range(n_hk):
        w0 = max(0, (kh_base + i_k) * group - base)
        w1 = min(n_hv, (kh_base + i_k + 1) * group - base)
        if w1 > w0:
            nisa.tensor_scalar(dst=head_ok[:, w0:w1], data=head_ok[:, w0:w1], op0=nl.minimum,
                               operand0=k_tok[:, i_k:i_k + 1])
    # per head, head_ok as the per-partition scalar: one pass over contiguous rows (a tensor_tensor reading head_ok
    # broadcast along Dv is a two-pass, element-strided read: 4x the VectorE time)
    tok_ok = nl.ndarray((chunk, n_hv, dv), dtype=nl.bfloat16, buffer=nl.sbuf)
    for w in range(n_hv):
        nisa.tensor_scalar(dst=tok_ok[:, w, :], data=v_ok[:, w, :], op0=nl.minimum, operand0=head_ok[:, w:w + 1],
                           engine=nisa.engine.gpsimd if w % 2 else nisa.engine.vector)
    pred_o = nl.ndarray((chunk, n_hv, dv), dtype=u8, buffer=nl.sbuf)
    pred_s = nl.ndarray((dk, n_hv, dv), dtype=u8, buffer=nl.sbuf)
    n_free = n_hv * dv
    ok2, po2, ps2 = (t.reshape((t.shape[0], n_free)) for t in (tok_ok, pred_o, pred_s))
    for c0 in range(0, n_free, PSUM_FMAX_FP32):
        c1 = min(n_free, c0 + PSUM_FMAX_FP32)
        cnt_ps = nl.ndarray((chunk, c1 - c0), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(cnt_ps, gd["utri"], ok2[:, c0:c1])                  # ok tokens <= t
        nisa.tensor_scalar(dst=po2[:, c0:c1], data=cnt_ps, op0=nl.less, operand0=thr)
        tot_ps = nl.ndarray((dk, c1 - c0), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(tot_ps, gd["ones"], ok2[:, c0:c1])                  # ok tokens of the chunk, on Dk rows
        nisa.tensor_scalar(dst=ps2[:, c0:c1], data=tot_ps, op0=nl.less, operand0=chunk - 0.5)
        del cnt_ps, tot_ps
    return dict(pred_o=pred_o, pred_s=pred_s, k_ok=k_ok)


def _normalize(x_sb, valid, scale, use_l2norm, cdt, factor_only=False, prescaled=None):
    """Per (token, head): (x * factor in dtype cdt, or None when factor_only; factor [C, H] fp32 or None), factor =
    scale * rsqrt(sum x^2 + eps) (if use_l2norm) * valid. prescaled (with use_l2norm) None or (ss, p) of
    _pow2_prescale, [C, H] fp32 each: the rows are taken as p x (exact powers of two) with sum (p x)^2 = ss 2^96:
    factor is that of p x, and x * (p factor) is returned."""
    chunk, n_h, d = x_sb.shape
    if not use_l2norm and valid is None and scale == 1.0 and cdt == x_sb.dtype and not factor_only:
        return x_sb, None
    factor = nl.ndarray((chunk, n_h), dtype=nl.float32, buffer=nl.sbuf)
    if use_l2norm:
        # sum of squares per (token, head) by one ScalarE square with its free-axis sum (fp32 squares and sum; the
        # squares themselves go to a scratch tile): VectorE and GpSimd are the busier engines
        if prescaled is None:
            sq = nl.ndarray((chunk, d), dtype=nl.float32, buffer=nl.sbuf)
            for i_h in range(n_h):
                nisa.activation_reduce(dst=sq, op=nl.square, data=x_sb[:, i_h, :], reduce_op=nl.add,
                                       reduce_res=factor[:, i_h:i_h + 1])
            nisa.activation(dst=factor, op=nl.rsqrt, data=factor, scale=_RSQRT_PRESCALE,
                            bias=_L2NORM_EPS * _RSQRT_PRESCALE)
        else:                                   # (sum (p x)^2 + eps p^2) 2^-40 = ss 2^56 (eps is in ss)
            nisa.activation(dst=factor, op=nl.rsqrt, data=prescaled[0], scale=_RSQRT_PRESCALE / _PRESCALE_SUMSQ ** 2)
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.multiply, operand0=float(scale) * _RSQRT_POSTSCALE)
    else:
        nisa.memset(dst=factor, value=float(scale))
    if valid is not None:
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.multiply, operand0=valid)
    if factor_only:
        return None, factor
    x_fac = factor
    if prescaled is not None:
        x_fac = nl.ndarray((chunk, n_h), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=x_fac, data1=factor, data2=prescaled[1], op=nl.multiply, engine=nisa.engine.gpsimd)
    out = nl.ndarray((chunk, n_h, d), dtype=cdt, buffer=nl.sbuf)
    for i_h in range(n_h):
        nisa.activation(dst=out[:, i_h, :], op=nl.copy, data=x_sb[:, i_h, :], scale=x_fac[:, i_h:i_h + 1])
    return out, factor


def _raw_scalings(k_raw, k_ok, q_fac, k_fac, exp_g, cfg, k_pre=None):
    """The raw-operand path (fp32 compute, bf16 q and k): with q' = diag(rq) q and k' = diag(rk) k (rq, rk the
    per-token norm factors, the q scale included),
        A^T[j, i] = rk_j (k_j . k_i) (rk_i beta_i) e^{G_i - G_j}   (rk_i beta_i: the diag moving operand; rk_j at
                                                                    the eviction, a per-partition scalar)
        P^T[j, i] = rk_j (k_j . q_i) e^{G_i - G_j},   O[i] = rq_i (e^{G_i} (q_i S) + (P V')[i])
    so the products over Dk read the raw bf16 q, k (exact operands: one TensorE pass instead of four) and
    every norm is a row scaling. k_raw [C, Hk, Dk] bf16 is sanitised in place like the normalised keys (its
    bad elements k_ok == 0 set to 0 by select), and a token whose key norm is not positive (NaN, or a sum of
    squares that overflowed: rk = 0) gets a zero raw row and rk = 0, so every raw product stays finite; q needs
    nothing (a bad q_i reaches output row i only, as in the reference). k_pre [C, Hk] or None: the exact
    power-of-two pre-scale of the raw rows (_pow2_prescale; k_fac is the factor of k_pre k_raw), applied here in
    the same pass. Returns per owned v head [C, Hv] fp32 tiles: rk (the key factor), rq (the query factor) and
    eq = e^{G} rq."""
    chunk, n_hk, dk = k_raw.shape
    n_hv = exp_g.shape[1]
    f32 = nl.float32
    pool = nisa.engine.gpsimd
    nisa.tensor_copy_predicated(dst=k_raw, src=0.0, predicate=k_ok, reverse_pred=True)
    if cfg["use_l2norm"]:
        # rk = 0 (a sum of squares that overflowed) or NaN: rk and the raw row to 0. The row is finite after the
        # select above (a non-finite raw element gives a non-finite normalised one), so a multiply by the 0/1 flag
        # (ScalarE, the flag as the per-partition scale) zeroes it
        fac_ok = nl.ndarray((chunk, n_hk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=fac_ok, data=k_fac, op0=nl.greater, operand0=0.0)      # NaN compares false
        fac_ok_u8 = nl.ndarray((chunk, n_hk), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_copy(dst=fac_ok_u8, src=fac_ok)
        nisa.tensor_copy_predicated(dst=k_fac, src=0.0, predicate=fac_ok_u8, reverse_pred=True)
        if k_pre is not None:                  # the raw rows take the pre-scale too (_pow2_prescale): flag x p
            nisa.tensor_tensor(dst=fac_ok, data1=fac_ok, data2=k_pre, op=nl.multiply, engine=pool)
        for i_k in range(n_hk):
            nisa.activation(dst=k_raw[:, i_k, :], op=nl.copy, data=k_raw[:, i_k, :], scale=fac_ok[:, i_k:i_k + 1])
    group, base = cfg["group"], cfg["head_base"]
    kh_base = base // group
    out = {}
    for key, fac in (("rk", k_fac), ("rq", q_fac)):
        t = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
        for i_k in range(n_hk):                 # v heads w0..w1 read q/k head i_k
            w0 = max(0, (kh_base + i_k) * group - base)
            w1 = min(n_hv, (kh_base + i_k + 1) * group - base)
            if w1 > w0:
                nisa.tensor_copy(dst=t[:, w0:w1], src=fac.ap(pattern=[[n_hk, chunk], [0, w1 - w0]], offset=i_k),
                                 engine=pool)
        out[key] = t
    eq = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=eq, data1=exp_g, data2=out["rq"], op=nl.multiply, engine=pool)
    out["eq"] = eq
    return out


def _pipeline_depth(n_hv, chunk):
    """Chunks in flight (<= _PIPELINE_DEPTH) whose tiles fit SBUF beside the state (bf16 inputs)."""
    return min(_PIPELINE_DEPTH, max(d for limit, d in _DEPTH_BY_HV_CHUNK if n_hv * chunk <= limit))


def _lockstep_width(n_hv, group, chunk, dk, dv, head_base=0):
    """v heads per lockstep block: the largest divisor W of Hv (the owned heads, from global head `head_base`)
    that is a multiple or a divisor of the GVA group (with blocks aligned to the groups when head_base is) and
    keeps a [P, W, max(C, Dk, Dv)] fp32 PSUM tile within _LOCKSTEP_PSUM_BANKS banks (one bank when a head's
    slice could straddle a bank boundary, i.e. when a size is not a power of two)."""
    widest = max(chunk, dk, dv)
    pow2 = all(x & (x - 1) == 0 for x in (chunk, dk, dv))
    limit = max(1, (PSUM_FMAX_FP32 * (_LOCKSTEP_PSUM_BANKS if pow2 else 1)) // widest)
    aligned = head_base % group == 0
    return max(w for w in range(1, n_hv + 1)
               if n_hv % w == 0 and w <= limit and ((aligned and w % group == 0) or group % w == 0))


def _block_prep(blk, k_c, v_w, kk_sb, kq_causal, g_w, beta_w, exp_g, beta_exp_g, solve_ws, cfg, dk, dv):
    """State-independent part of one chunk for W v-heads of one q/k group in lockstep (a generator).

    Fills blk with P^T [C, W, C], T^T [C, W, C], -W^T [Dk, W, C], beta V [C, W, Dv] and the decayed keys
    K o e^{G_C - G_j} [C, W, Dk]. Per-head work (matmuls, ops
    with a per-head scalar) loops over w; element-wise work common to the W heads is one instruction over
    [P, W, ...]. Engines: decays and the solve on TensorE (fp32 for the decay exponents), PSUM evictions on
    ScalarE / VectorE, SBUF-only products (masks, per-head scalings) on GpSimd.
    """
    f32 = nl.float32
    chunk, cdt, consts_sb = cfg["chunk"], cfg["cdt"], cfg["consts_sb"]
    width = g_w.shape[1]
    head_kh = blk["head_kh"]
    pool = nisa.engine.gpsimd
    utri = consts_sb[:, _C_UTRI, :]
    strict_after = consts_sb[:, _C_SL, :]
    # decays as exact fp32 partial sums of g: gU[k, i] = g_k [k <= i]; D^T[j, i] = sum_{j<k<=i} g_k (0 for
    # i <= j), so e^{D^T} = e^{G_i - G_j} on and above the diagonal and 1 below it
    g_u = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.sbuf)
    for w in range(width):
        nisa.tensor_scalar(dst=g_u[:, w, :], data=utri, op0=nl.multiply, operand0=g_w[:, w:w + 1], engine=pool)
    dt_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
    per_mm = max(1, min(width, PSUM_FMAX_FP32 // chunk))     # heads per matmul: one PSUM bank of moving data
    for w0 in range(0, width, per_mm):
        w1 = min(width, w0 + per_mm)
        nisa.nc_matmul(dt_ps[:, w0:w1, :], strict_after, g_u[:, w0:w1, :])
    decay_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.activation(dst=decay_t, op=nl.exp, data=dt_ps)
    del dt_ps
    yield
    # A^T[j, i] = (k_j . k_i) beta_i e^{G_i - G_j} = (K K^T diag(beta) o e^{D^T})[j, i] (the solve reads only
    # j < i); P^T[j, i] = (k_j . q_i) e^{G_i - G_j} for j <= i
    ident_w = solve_ws[0]
    raw = blk["raw"]
    beta_c = nl.ndarray((chunk, width), dtype=cdt, buffer=nl.sbuf)       # (compute dtype: fast VectorE path)
    if raw is None:
        nisa.tensor_copy(dst=beta_c, src=beta_w)
    else:                                                                 # rk_i beta_i (see _raw_scalings)
        nisa.tensor_tensor(dst=beta_c, data1=beta_w, data2=raw["rk"], op=nl.multiply)
    diag_b = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    for w in range(width):                     # ScalarE (VectorE is the busier engine)
        nisa.activation(dst=diag_b[:, w, :], op=nl.copy, data=ident_w[:, w, :], scale=beta_c[:, w:w + 1])
    kb_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
    for w0, w1 in _shared_stationary_runs(head_kh, chunk):      # (K K^T)^T diag(beta), heads of one q/k head
        nisa.nc_matmul(kb_ps[:, w0:w1, :], kk_sb[:, head_kh[w0], :], diag_b[:, w0:w1, :])
    at_sb = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    if raw is None:
        nisa.tensor_tensor(dst=at_sb, data1=kb_ps, data2=decay_t, op=nl.multiply)
    else:                                                                 # rk_j: a per-partition scalar
        for w in range(width):
            nisa.scalar_tensor_tensor(dst=at_sb[:, w, :], data=kb_ps[:, w, :], op0=nl.multiply,
                                      operand0=raw["rk"][:, w:w + 1], op1=nl.multiply, operand1=decay_t[:, w, :])
    del kb_ps
    p_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    for w in range(width):
        nisa.tensor_tensor(dst=p_t[:, w, :], data1=decay_t[:, w, :], data2=kq_causal[:, head_kh[w], :],
                           op=nl.multiply, engine=pool)
    yield
    compact = cfg["row_tiles"] and _COMPACT_SOLVE[cdt == nl.float32]
    t_t = yield from _solve_unit_lower(at_sb, solve_ws, cfg["hi_rows"], chunk, cdt,   # T^T, T = (I + A)^-1
                                       cfg["hi_lvl"] if compact else None, bf16_corrections=cfg["use_l2norm"],
                                       split_first=cfg["use_l2norm"] and cfg["n_hv"] * chunk <= _SPLIT_MAX_HV_CHUNK)

    # -W^T = -(T (beta e^G K))^T; beta V; K o e^{G_C - G_j} (decay_t[:, w, C-1] = e^{G_C - G_j})
    xv = nl.ndarray((chunk, width, dv), dtype=cdt, buffer=nl.sbuf)
    for w in range(width):
        nisa.tensor_scalar(dst=xv[:, w, :], data=v_w[:, w, :], op0=nl.multiply, operand0=beta_w[:, w:w + 1],
                           engine=pool)
    blk.update(p_t=p_t, t_t=t_t, xv=xv)
    if _SHARED_STATE_UPDATE and cdt == f32:
        # the state update as K^T (d o V') with d_j = e^{G_C - G_j} per v head on the moving side: the v heads of a
        # q/k head share the stationary K (one fp32 matmul of N = 2 Dv instead of two of Dv; _block_tail)
        d_last = nl.ndarray((chunk, width, 1), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=d_last, src=decay_t[:, :, chunk - 1:chunk], engine=pool)
        blk.update(k_rows=k_c, d_last=d_last)
    else:
        k_dec = nl.ndarray((chunk, width, dk), dtype=cdt, buffer=nl.sbuf)
        for w in range(width):
            nisa.tensor_scalar(dst=k_dec[:, w, :], data=k_c[:, head_kh[w], :], op0=nl.multiply,
                               operand0=decay_t[:, w, chunk - 1:chunk], engine=pool)
        blk.update(k_dec=k_dec)
    if raw is not None:
        # the tail forms V' = T (beta V - X S) with X S = diag(rk beta e^G) (K_raw S): no W^T (see _block_tail)
        x_scale = nl.ndarray((chunk, width), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=x_scale, data1=beta_exp_g, data2=raw["rk"], op=nl.multiply, engine=pool)
        blk.update(x_scale=x_scale)
        yield
        return
    xk = nl.ndarray((chunk, width, dk), dtype=cdt, buffer=nl.sbuf)
    for w in range(width):
        nisa.tensor_scalar(dst=xk[:, w, :], data=k_c[:, head_kh[w], :], op0=nl.multiply,
                           operand0=beta_exp_g[:, w:w + 1], engine=pool)
    wt_ps = nl.ndarray((dk, width, chunk), dtype=f32, buffer=nl.psum)
    for w in range(width):
        nisa.nc_matmul(wt_ps[:, w, :], xk[:, w, :], t_t[:, w, :])
    wt_neg = nl.ndarray((dk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.activation(dst=wt_neg, op=nl.copy, data=wt_ps, scale=-1.0)
    del wt_ps
    blk.update(wt_neg=wt_neg)
    yield


def _shared_stationary_runs(head_kh, inner):
    """[w0, w1) runs of consecutive lockstep heads with the same q/k head (the same stationary), each one matmul
    with the heads' moving columns side by side: N = (w1 - w0) inner <= 512 fp32 within one PSUM bank (the
    [P, W, inner] tile starts at a bank). An fp32 matmul pays 4 x (N + 64) cycles: one of N = 256 instead of two
    of 128 saves 256 cycles."""
    runs = []
    for w, kh in enumerate(head_kh):
        if runs:
            w0, w1 = runs[-1]
            same_bank = (w0 * inner) // PSUM_FMAX_FP32 == ((w + 1) * inner - 1) // PSUM_FMAX_FP32
            if head_kh[w0] == kh and w1 == w and same_bank:
                runs[-1] = (w0, w + 1)
                continue
        runs.append((w, w + 1))
    return runs


def _block_tail(blk, exp_g, exp_glast, s_w, o_w, cfg, dk, dv):
    """State-dependent part of one chunk for a lockstep block (a generator): V' = T (beta V) - W S,
    O = e^G o (Q S) + P V' into o_w [C, W, Dv], S <- e^{G_C} S + (K o e^{G_C - G_j})^T V' in s_w [Dk, W, Dv]."""
    f32 = nl.float32
    chunk, cdt = cfg["chunk"], cfg["cdt"]
    width = exp_g.shape[1]
    p_t, t_t = blk["p_t"], blk["t_t"]
    pool = nisa.engine.gpsimd
    s_c = s_w
    raw = blk["raw"]
    if cdt != f32:
        s_c = nl.ndarray((dk, width, dv), dtype=cdt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=s_c, src=s_w, engine=pool)
    if raw is not None:
        v_in, s_pieces = _raw_delta_input(blk, s_w, cfg)
        s_hi, s_lo = s_pieces[0], s_pieces[1]            # Q S (output only): S_hi + S_mid, ~2^-17 relative
    vn_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
    for w in range(width):
        if raw is not None:                                 # V' = T (beta V - X S)
            nisa.nc_matmul(vn_ps[:, w, :], t_t[:, w, :], v_in[:, w, :])
            continue
        nisa.nc_matmul(vn_ps[:, w, :], t_t[:, w, :], blk["xv"][:, w, :])
        nisa.nc_matmul(vn_ps[:, w, :], blk["wt_neg"][:, w, :], s_c[:, w, :], accumulate=True)
    d_v = None
    if "d_last" in blk:                      # d o V' (the state update's moving operand), evicted first
        d_v = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.sbuf)
        for w in range(width):
            nisa.activation(dst=d_v[:, w, :], op=nl.copy, data=vn_ps[:, w, :], scale=blk["d_last"][:, w, :])
    v_new = nl.ndarray((chunk, width, dv), dtype=cdt, buffer=nl.sbuf)
    nisa.activation(dst=v_new, op=nl.copy, data=vn_ps)
    del vn_ps
    yield

    def output():                          # O = e^G o (Q S) + P V': the row scaling applied at the eviction
        qs_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
        for w0, w1 in _shared_stationary_runs(blk["head_kh"], dv):   # the v heads of one q/k head at once
            q_stat = blk["q_t"][:, blk["head_kh"][w0], :]
            if raw is None:
                nisa.nc_matmul(qs_ps[:, w0:w1, :], q_stat, s_c[:, w0:w1, :])
            else:
                nisa.nc_matmul(qs_ps[:, w0:w1, :], q_stat, s_hi[:, w0:w1, :])
                nisa.nc_matmul(qs_ps[:, w0:w1, :], q_stat, s_lo[:, w0:w1, :], accumulate=True)
        qs_sb = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.sbuf)
        row_scale = exp_g if raw is None else raw["eq"]
        for w in range(width):
            nisa.activation(dst=qs_sb[:, w, :], op=nl.copy, data=qs_ps[:, w, :], scale=row_scale[:, w:w + 1])
        del qs_ps
        pv_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
        for w in range(width):
            nisa.nc_matmul(pv_ps[:, w, :], p_t[:, w, :], v_new[:, w, :])
        if raw is None:
            nisa.tensor_tensor(dst=o_w, data1=pv_ps, data2=qs_sb, op=nl.add)
        else:                                                       # O = rq (P V') + rq e^G (Q S)
            for w in range(width):
                nisa.scalar_tensor_tensor(dst=o_w[:, w, :], data=pv_ps[:, w, :], op0=nl.multiply,
                                          operand0=raw["rq"][:, w:w + 1], op1=nl.add, operand1=qs_sb[:, w, :])
        nisa.tensor_copy_predicated(dst=o_w, src=_NAN, predicate=blk["pred_o"])     # at / after a bad value

    def state_update():                    # S <- e^{G_C} S + (K o e^{G_C - G_j})^T V'
        su_ps = nl.ndarray((dk, width, dv), dtype=f32, buffer=nl.psum)
        if d_v is not None:                # K^T (d o V'): the v heads of one q/k head at once
            for w0, w1 in _shared_stationary_runs(blk["head_kh"], dv):
                nisa.nc_matmul(su_ps[:, w0:w1, :], blk["k_rows"][:, blk["head_kh"][w0], :], d_v[:, w0:w1, :])
        else:
            for w in range(width):
                nisa.nc_matmul(su_ps[:, w, :], blk["k_dec"][:, w, :], v_new[:, w, :])
        for w in range(width):
            nisa.scalar_tensor_tensor(dst=s_w[:, w, :], data=s_w[:, w, :], op0=nl.multiply,
                                      operand0=exp_glast[:, w:w + 1], op1=nl.add, operand1=su_ps[:, w, :])
        nisa.tensor_copy_predicated(dst=s_w, src=_NAN, predicate=blk["pred_s"])     # columns a bad value reached

    # the state update first (the next chunk waits for it) unless O reads the state tile itself (fp32)
    steps = (state_update, output) if s_c is not s_w or raw is not None else (output, state_update)
    for step in steps:
        step()
        yield


def _newton_constants(consts_sb, width, chunk):
    """The Newton steps' constants, made once and shared by the solve workspaces: strict [C, W, C] fp32 0/1,
    [p < f] per head (the strictly upper part of A^T), from U - I."""
    f32 = nl.float32
    strict = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=strict, data1=consts_sb[:, _C_UTRI, :], data2=consts_sb[:, _C_IDENT, :], op=nl.subtract)
    strict_t = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.sbuf)
    for w in range(width):
        nisa.activation(dst=strict_t[:, w, :], op=nl.copy, data=strict)
    return dict(strict=strict_t)


def _raw_delta_input(blk, s_w, cfg):
    """The raw-operand path's beta V - X S [C, W, Dv] fp32 (X = diag(rk beta e^G) K_raw: the rows of W = T X before
    T) and the exact three-piece split of S [Dk, W, Dv] fp32 = S_hi + S_mid + S_lo (bf16 each: 3 x 8 significand
    bits hold fp32's 24, so the split is exact, and K_raw S from the three bf16 products accumulated in fp32 PSUM
    is as accurate as one fp32 matmul: 3 bf16 passes of N = (heads of the q/k head) Dv instead of 4 fp32 passes
    per head). V' = T (beta V - X S) replaces U - W S: no W^T product in the prep, and the S product shares the
    raw K^T stationary across the v heads of a q/k head."""
    f32, bf16 = nl.float32, nl.bfloat16
    dk, width, dv = s_w.shape
    chunk = cfg["chunk"]
    pool = nisa.engine.gpsimd
    s_hi = nl.ndarray((dk, width, dv), dtype=bf16, buffer=nl.sbuf)
    nisa.activation(dst=s_hi, op=nl.copy, data=s_w)
    rest = nl.ndarray((dk, width, dv), dtype=f32, buffer=nl.sbuf)          # S - S_hi: exact in fp32
    nisa.tensor_tensor(dst=rest, data1=s_w, data2=s_hi, op=nl.subtract, engine=pool)
    s_mid = nl.ndarray((dk, width, dv), dtype=bf16, buffer=nl.sbuf)
    nisa.activation(dst=s_mid, op=nl.copy, data=rest)
    s_lo = nl.ndarray((dk, width, dv), dtype=bf16, buffer=nl.sbuf)        # exact: <= 8 significant bits left
    nisa.tensor_tensor(dst=s_lo, data1=rest, data2=s_mid, op=nl.subtract, engine=pool)
    pieces = (s_hi, s_mid, s_lo)
    head_kh = blk["head_kh"]
    ks_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
    for w0, w1 in _shared_stationary_runs(head_kh, dv):
        for i_p, piece in enumerate(pieces):
            nisa.nc_matmul(ks_ps[:, w0:w1, :], blk["k_t"][:, head_kh[w0], :], piece[:, w0:w1, :],
                           accumulate=i_p > 0)
    v_in = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.sbuf)
    for w in range(width):                                                 # beta V - (rk beta e^G) (K_raw S)
        nisa.scalar_tensor_tensor(dst=v_in[:, w, :], data=ks_ps[:, w, :], op0=nl.multiply,
                                  operand0=blk["x_scale"][:, w:w + 1], op1=nl.subtract, operand1=blk["xv"][:, w, :],
                                  reverse1=True)
    return v_in, pieces


def _solve_workspace(masks_w, n_lvl, width, chunk, cdt, newton=None):
    """[I (cdt), level masks, N_s tiles, initialised, I in the solve dtype, strict-upper mask (fp32) or None]:
    the N_s tiles persist across chunks with identity hi columns (each chunk rewrites only their lo columns).
    fp32 compute (cdt fp32) solves on bf16 operands and refines in fp32 (_refine_inverse): the level masks, I and
    N_s are then bf16 copies, and newton (_newton_constants, shared) is kept."""
    ident_w = masks_w[:, 0]
    if cdt != nl.float32:
        lvl_masks = [masks_w[:, 1 + lvl] for lvl in range(n_lvl)]
        n_lv = [None] + [nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf) for _ in range(1, n_lvl)]
        return [ident_w, lvl_masks, n_lv, False, ident_w, None]
    sdt = nl.bfloat16
    masks_bf = nl.ndarray((chunk, n_lvl + 1, width, chunk), dtype=sdt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=masks_bf, src=masks_w, engine=nisa.engine.gpsimd)
    lvl_masks = [masks_bf[:, 1 + lvl] for lvl in range(n_lvl)]
    n_lv = [None] + [nl.ndarray((chunk, width, chunk), dtype=sdt, buffer=nl.sbuf) for _ in range(1, n_lvl)]
    return [ident_w, lvl_masks, n_lv, False, masks_bf[:, 0], newton]


def _init_workspace(solve_ws):
    """Set the N_s tiles of a solve workspace to I (SBUF-to-SBUF DMAs, at the first chunk that uses it)."""
    if not solve_ws[3]:
        for n_s in solve_ws[2][1:]:
            nisa.dma_copy(dst=n_s, src=solve_ws[4])
        solve_ws[3] = True



def _cols(t, s, upper):
    """Columns of the first (upper=False) or second (upper=True) half of every 2s-wide column block of
    t [P, ..., C] (a strided view, C / 2 elements per row per head)."""
    shape = tuple(t.shape)
    v = t.reshape(shape[:-1] + (shape[-1] // (2 * s), 2 * s))
    return v[..., s:2 * s] if upper else v[..., 0:s]


# with the L2 norm, the first Newton residual on bf16 pieces (_refine_inverse) when Hv * C <= this per core (its
# tiles overflow SBUF at Hv * C = 1024, the fused path's fp32-compute limit, with one chunk in flight)
_SPLIT_MAX_HV_CHUNK = 512
_NEWTON_STEPS = 2                 # refinements of the bf16 solve (fp32 residual, bf16 corrections): 1e-2, 4e-5, fp32


def _solve_unit_lower(at_sb, solve_ws, hi_rows, chunk, cdt, hi_lvl=None, bf16_corrections=False, split_first=False):
    """T^T [C, W, C] per head, T = (I + strict_lower(A))^-1 (a generator; returns T^T in cdt).

    bf16 compute: block doubling on bf16 operands (_block_doubling). fp32 compute: the same block doubling on a
    bf16 copy of A^T (TensorE at the bf16 rate, ~1e-4 .. 1e-2 relative error on T), then _NEWTON_STEPS fp32
    Newton steps T <- T + T (I - (I + A) T) (each squares the relative error: fp32-exact after two, on random
    and on near-repeated keys, NumPy study in docs/deltanet.md). Full-width fp32 matmuls replace the 17
    half-width fp32 matmuls of an fp32 block doubling (4 passes each): about half the solve's TensorE time."""
    ident_w, lvl_masks, n_lv, _, ident_s, newton = solve_ws
    if newton is None:
        t_t, _ = yield from _block_doubling(at_sb, ident_s, lvl_masks, n_lv, hi_rows, chunk, cdt, False, hi_lvl)
        return t_t
    sdt = nl.bfloat16
    at_s = nl.ndarray(at_sb.shape, dtype=sdt, buffer=nl.sbuf)
    nisa.activation(dst=at_s, op=nl.copy, data=at_sb)
    t0_t, t0_row = yield from _block_doubling(at_s, ident_s, lvl_masks, n_lv, hi_rows, chunk, sdt, True, hi_lvl)
    return (yield from _refine_inverse(at_sb, newton, (ident_w, ident_s), t0_t, t0_row, bf16_corrections,
                                       split_first))


def _refine_inverse(at_sb, newton, idents, t0_t, t0_row, bf16_corrections, split_first=False):
    """Newton steps on T = (I + A)^-1 from the bf16 T0 (both layouts): E = I - T - A T, T^T <- T^T + E^T T^T,
    T <- T + T E (every matmul out = stationary^T moving: A T = (A^T)^T T, E^T T^T = (E)^T T^T, T E = (T^T)^T E).

    The residual A T is always an fp32 matmul (a difference of nearly equal terms). With bf16_corrections (the L2
    norm in kernel: unit keys, |A| <= |beta|) the corrections T E and E^T T^T, of size |E| (<= ~1e-2 after the
    bf16 solve, then ~1e-5), run on bf16 copies of E and T^T (one pass, fp32 PSUM): their 4e-3 relative rounding
    is removed by the next step's exact residual, and the last leaves ~4e-3 |E_1|. Without the norm (raw keys:
    A and T can be large and ill-conditioned) every product is fp32 (docs/deltanet.md "Newton corrections").
    With bf16_corrections and split_first the first residual, whose T is T0 (exactly bf16), is
    A_hi T0 + A_lo T0 (two bf16 passes, A split in two bf16 pieces: 2^-17, squared away by the exact second step)
    and I - T0 one exact bf16 subtraction; that step's updates accumulate in PSUM (T0 + T0 E with a bf16 pass of
    T0 I, likewise T^T) and ScalarE copies them out (docs/deltanet.md "Newton's first residual").
    at_sb [C, W, C] fp32 A^T (strict upper part used), newton: _newton_constants, idents (I fp32, I bf16); t0_t, t0_row
    bf16. Returns T^T fp32."""
    f32, bf16 = nl.float32, nl.bfloat16
    shape = at_sb.shape
    width = shape[1]
    pool = nisa.engine.gpsimd
    a_t = nl.ndarray(shape, dtype=f32, buffer=nl.sbuf)                 # strict upper part of A^T
    nisa.tensor_tensor(dst=a_t, data1=at_sb, data2=newton["strict"], op=nl.multiply, engine=pool)
    x_t = nl.ndarray(shape, dtype=f32, buffer=nl.sbuf)           # T^T
    ident_w, ident_s = idents
    tt_c = t0_t if bf16_corrections else x_t                      # T^T operand of the corrections
    a_split = None
    t_row = nl.ndarray(shape, dtype=f32, buffer=nl.sbuf)         # T
    if not (bf16_corrections and split_first):
        nisa.tensor_copy(dst=x_t, src=t0_t, engine=pool)
        nisa.activation(dst=t_row, op=nl.copy, data=t0_row)
    else:
        # the first residual's T is T0, exactly bf16: A T0 = A_hi T0 + A_lo T0 with A = A_hi + A_lo + O(2^-17 |A|),
        # two bf16 passes instead of four fp32 ones; its 2^-17 error is squared away by the second, exact, step
        a_hi = nl.ndarray(shape, dtype=bf16, buffer=nl.sbuf)
        nisa.activation(dst=a_hi, op=nl.copy, data=a_t)
        a_lo = nl.ndarray(shape, dtype=bf16, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=a_lo, data1=a_t, data2=a_hi, op=nl.subtract, engine=pool)
        a_split = (a_hi, a_lo)
    yield
    for step in range(_NEWTON_STEPS):
        last = step + 1 == _NEWTON_STEPS
        at_ps = nl.ndarray(shape, dtype=f32, buffer=nl.psum)
        for w in range(width):
            if step == 0 and a_split is not None:
                for i_p, piece in enumerate(a_split):
                    nisa.nc_matmul(at_ps[:, w, :], piece[:, w, :], t0_row[:, w, :], accumulate=i_p > 0)
                continue
            nisa.nc_matmul(at_ps[:, w, :], a_t[:, w, :], t_row[:, w, :])          # A T (fp32: the residual)
        if step == 0 and a_split is not None:         # I - T0: exact in bf16 (one bf16 pass, no fp32 copy of T0)
            e_sb = nl.ndarray(shape, dtype=bf16, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=e_sb, data1=ident_s, data2=t0_row, op=nl.subtract, engine=pool)
        else:
            e_sb = nl.ndarray(shape, dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=e_sb, data1=ident_w, data2=t_row, op=nl.subtract, engine=pool)
        e_c = nl.ndarray(shape, dtype=bf16 if bf16_corrections else f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=e_c, data1=e_sb, data2=at_ps, op=nl.subtract)      # E = I - T - A T
        del at_ps
        yield
        xe_ps = nl.ndarray(shape, dtype=f32, buffer=nl.psum)
        te_ps = None if last else nl.ndarray(shape, dtype=f32, buffer=nl.psum)
        # first split step: T0 and T0^T are exactly bf16, so T0 + T0 E and T0^T + E^T T0^T accumulate in PSUM
        # (one bf16 pass with I each) and ScalarE copies them out instead of two VectorE adds reading PSUM
        in_psum = step == 0 and a_split is not None and not last
        for w in range(width):
            nisa.nc_matmul(xe_ps[:, w, :], e_c[:, w, :], tt_c[:, w, :])           # E^T T^T
            if in_psum:
                nisa.nc_matmul(xe_ps[:, w, :], ident_s[:, w, :], t0_t[:, w, :], accumulate=True)
            if not last:
                nisa.nc_matmul(te_ps[:, w, :], tt_c[:, w, :], e_c[:, w, :])       # T E
            if in_psum:
                nisa.nc_matmul(te_ps[:, w, :], t0_t[:, w, :], ident_s[:, w, :], accumulate=True)
        if in_psum:
            nisa.activation(dst=t_row, op=nl.copy, data=te_ps)
            nisa.activation(dst=x_t, op=nl.copy, data=xe_ps)
        else:
            if not last:
                nisa.tensor_tensor(dst=t_row, data1=t_row, data2=te_ps, op=nl.add)
            nisa.tensor_tensor(dst=x_t, data1=x_t, data2=xe_ps, op=nl.add)
        if not last and bf16_corrections:
            tt_c = nl.ndarray(shape, dtype=bf16, buffer=nl.sbuf)
            nisa.activation(dst=tt_c, op=nl.copy, data=xe_ps if in_psum else x_t)
        del xe_ps, te_ps
        yield
    return x_t


def _compact_level(a_s, t_t, t_row, n_s, ident_w, hi_col, s, chunk, rows_too):
    """One block-doubling level with 2s <= 32 on compact 32 x 32 diagonal tiles (a generator).

    Below s = 32 every 2s block lies inside one of the C / 32 diagonal 32-blocks, and so do A_s, T_s, N_s and
    their products: per 32-block b and head, M_lo = A[b, b] T_s[b, lo(b)], T_2s[b, lo(b)] = T_s[b, b] N_s[b, lo(b)]
    and T_2s^T[b, hi(b)] = N_s[b, b]^T T_s^T[b, hi(b)] are matmuls with K = M = 32 (rows and columns of block b)
    and N = 16 on their own 32 x 32 PE tile (tile_position=(32 b, 32 b)): four blocks' matmuls share the array.
    a_s [C, W, C]: A_s^T (the level's entries) and hi_col None, or at s = 16 (one 2s block per 32-block) the
    unmasked A^T with hi_col [C, 1] = [row in the hi half]: M_lo is then exact in the hi rows, and
    N_s[:, lo] = I - hi_col M_lo keeps I in the lo rows (no level mask of A). Entries outside the 32-blocks are
    never written: they stay 0 in T, T^T (level 0 writes them) and N_s (I)."""
    f32 = nl.float32
    width = a_s.shape[1]
    quad = _PARTITION_QUADRANT
    sub = quad // 2                                   # lo (and hi) columns of one 32-block
    nbq = quad // (2 * s)                             # 2s blocks in a 32-block
    blocks = [slice(quad * b, quad * (b + 1)) for b in range(chunk // quad)]

    def lo_cols(t, r, upper=False):                   # [32, W, nbq, s] view of block r's lo (hi) columns
        return _cols(t[r, :, r], s, upper)

    m_ps = nl.ndarray((chunk, width, chunk // 2), dtype=f32, buffer=nl.psum)
    for i_b, r in enumerate(blocks):
        for w in range(width):
            nisa.nc_matmul(m_ps[r, w, sub * i_b:sub * (i_b + 1)], a_s[r, w, r], _cols(t_row[r, w, r], s, False),
                           tile_position=(r.start, r.start), tile_size=(quad, quad))
    for i_b, r in enumerate(blocks):
        m_lo = m_ps[r, :, sub * i_b:sub * (i_b + 1)].reshape((quad, width, nbq, s))
        if hi_col is None:
            nisa.tensor_tensor(dst=lo_cols(n_s, r), data1=lo_cols(ident_w, r), data2=m_lo, op=nl.subtract)
        else:
            nisa.scalar_tensor_tensor(dst=lo_cols(n_s, r), data=m_lo, op0=nl.multiply, operand0=hi_col[r],
                                      op1=nl.subtract, operand1=lo_cols(ident_w, r), reverse1=True)
    del m_ps
    yield
    x_ps = nl.ndarray((chunk, width, chunk // 2), dtype=f32, buffer=nl.psum) if rows_too else None
    y_ps = nl.ndarray((chunk, width, chunk // 2), dtype=f32, buffer=nl.psum)
    for i_b, r in enumerate(blocks):
        cols = slice(sub * i_b, sub * (i_b + 1))
        for w in range(width):
            if rows_too:                                  # T_2s[:, lo] = T_s N_s[:, lo]
                nisa.nc_matmul(x_ps[r, w, cols], t_t[r, w, r], _cols(n_s[r, w, r], s, False),
                               tile_position=(r.start, r.start), tile_size=(quad, quad))
            nisa.nc_matmul(y_ps[r, w, cols], n_s[r, w, r], _cols(t_t[r, w, r], s, True),       # N_s^T T_s^T[:, hi]
                           tile_position=(r.start, r.start), tile_size=(quad, quad))
    for i_b, r in enumerate(blocks):
        cols = slice(sub * i_b, sub * (i_b + 1))
        if rows_too:
            nisa.activation(dst=lo_cols(t_row, r), op=nl.copy, data=x_ps[r, :, cols].reshape((quad, width, nbq, s)))
        y_new = y_ps[r, :, cols].reshape((quad, width, nbq, s))
        if i_b % 2:                                   # evictions split between VectorE and ScalarE
            nisa.tensor_copy(dst=lo_cols(t_t, r, True), src=y_new)
        else:
            nisa.activation(dst=lo_cols(t_t, r, True), op=nl.copy, data=y_new)
    del x_ps, y_ps
    yield


def _block_doubling(at_sb, ident_w, lvl_masks, n_lv, hi_rows, chunk, cdt, want_row, hi_lvl=None):
    """(T^T, T) [C, W, C] per head, T = (I + strict_lower(A))^-1, by recursive block doubling (T: the row
    layout, complete only when want_row, else None).

    With T_s the inverse restricted to diagonal blocks of size s and A_s the entries of A in the
    (second half, first half) sub-blocks of each 2s block: T_2s = T_s - T_s A_s T_s = T_s N_s with
    N_s = I - A_s T_s, exact and free of the growth of a power series (each level computes exact
    sub-blocks of T). M = A_s T_s is non-zero only in the first-half columns ("lo") of every 2s block, so
    each level runs on half the columns: M_lo = A_s T_s[:, lo], N_s[:, lo] = I_lo - M_lo,
    T_2s[:, lo] = T_s N_s[:, lo] and T_2s^T[:, hi] = N_s^T T_s^T[:, hi] (three matmuls of C/2 columns per
    head; every other column of T and T^T is unchanged). Operands are in cdt: fp32 for fp32 inputs
    (exact to ~1e-7), bf16 for bf16 inputs (~1e-3 relative on T; see DESIGN.md).
    at_sb [C, W, C]: A^T (only its strictly upper entries are read). ident_w [C, W, C]: I per head.
    lvl_masks[l] [C, W, C]: level-l entries of A^T. n_lv[l] [C, W, C] (l >= 1): per-level N_s tiles that
    persist across chunks (their hi columns stay = I; each chunk rewrites the lo columns). hi_rows [C, C] fp32:
    column b = [row in the second half of 2s-block b] for s = _ROW_MASK_BLOCK.
    hi_lvl [C, >= log2 C] fp32 or None: column l = [row in the second half of its 2^(l+1)-block]; given (PE row
    tiles, NeuronCore-v3+), the levels with 2s <= 32 run compact (_compact_level).
    """
    f32 = nl.float32
    width = at_sb.shape[1]
    pool = nisa.engine.gpsimd
    half = chunk // 2
    mid = (width + 1) // 2
    halves = [(0, mid), (mid, width)] if mid < width else [(0, width)]
    # level 0 (blocks 1 -> 2): A_1^T = level-0 entries of A^T (odd columns); T_2^T = I - A_1^T and, from one
    # full-width PSUM eviction (contiguous), T_2 = I - A_1 with A_1 = (A_1^T)^T by a matmul with I
    a0 = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=a0, data1=at_sb, data2=lvl_masks[0], op=nl.multiply, engine=pool)
    t_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_t, data1=ident_w, data2=a0, op=nl.subtract, engine=pool)
    m_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
    for w in range(width):
        nisa.nc_matmul(m_ps[:, w, :], a0[:, w, :], ident_w[:, w, :])     # A_1 = (A_1^T)^T
    t_row = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_row, data1=ident_w, data2=m_ps, op=nl.subtract)
    del m_ps
    yield
    n_lvl = _n_levels(chunk)
    for lvl in range(1, n_lvl):
        s = 1 << lvl
        last = lvl + 1 == n_lvl
        nb = chunk // (2 * s)
        n_s = n_lv[lvl]
        if hi_lvl is not None and 2 * s <= _PARTITION_QUADRANT:
            a_s = at_sb
            if 2 * s < _PARTITION_QUADRANT:          # several 2s blocks per 32-block: the level entries of A
                a_s = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
                eng = nisa.engine.vector if lvl == _VECTOR_MASK_LEVEL else pool
                nisa.tensor_tensor(dst=a_s, data1=at_sb, data2=lvl_masks[lvl], op=nl.multiply, engine=eng)
            yield from _compact_level(a_s, t_t, t_row, n_s, ident_w, hi_lvl[:, lvl:lvl + 1] if a_s is at_sb else None,
                                      s, chunk, want_row or not last)
            continue
        # T_s[:, lo] is zero outside the lo rows of each block, so M = A T_s[:, lo] is exact in the hi rows of
        # each block even with the unmasked A^T. When those rows are aligned partition ranges (s % 32 == 0)
        # only they are evicted (N_s keeps I elsewhere); with few blocks (s = _ROW_MASK_BLOCK) each block's
        # columns are evicted with a per-partition row mask. Either way the level mask of A is skipped.
        by_rows = s % _PARTITION_QUADRANT == 0
        by_mask = s == _ROW_MASK_BLOCK and not by_rows
        a_s = at_sb
        if not (by_rows or by_mask):
            a_s = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
            # GpSimd, but level _VECTOR_MASK_LEVEL on VectorE (bf16 fast mode) to balance the two engines
            eng = nisa.engine.vector if lvl == _VECTOR_MASK_LEVEL else pool
            nisa.tensor_tensor(dst=a_s, data1=at_sb, data2=lvl_masks[lvl], op=nl.multiply, engine=eng)
        m_ps = nl.ndarray((chunk, width, half), dtype=f32, buffer=nl.psum)
        for h0, h1 in halves:
            for w in range(h0, h1):
                nisa.nc_matmul(m_ps[:, w, :], a_s[:, w, :], _cols(t_row[:, w, :], s, False))   # M_lo = A_s T_s
            n_lo = _cols(n_s[:, h0:h1], s, False)
            i_lo = _cols(ident_w[:, h0:h1], s, False)
            m_lo = m_ps[:, h0:h1].reshape((chunk, h1 - h0, nb, s))
            if by_rows:
                for b in range(nb):
                    rows = slice(2 * s * b + s, 2 * s * (b + 1))
                    nisa.tensor_tensor(dst=n_lo[rows, :, b, :], data1=i_lo[rows, :, b, :], data2=m_lo[rows, :, b, :],
                                       op=nl.subtract)
            elif by_mask:
                for b in range(nb):                 # N = I - [row in hi half of block b] M
                    nisa.scalar_tensor_tensor(dst=n_lo[:, :, b, :], data=m_lo[:, :, b, :], op0=nl.multiply,
                                              operand0=hi_rows[:, b:b + 1], op1=nl.subtract,
                                              operand1=i_lo[:, :, b, :], reverse1=True)
            else:
                nisa.tensor_tensor(dst=n_lo, data1=i_lo, data2=m_lo, op=nl.subtract)
        del m_ps
        yield
        rows_too = want_row or not last
        x_ps = nl.ndarray((chunk, width, half), dtype=f32, buffer=nl.psum) if rows_too else None
        y_ps = nl.ndarray((chunk, width, half), dtype=f32, buffer=nl.psum)
        for h0, h1 in halves:
            for w in range(h0, h1):
                if rows_too:                                  # T_2s[:, lo] = T_s N_s[:, lo]
                    nisa.nc_matmul(x_ps[:, w, :], t_t[:, w, :], _cols(n_s[:, w, :], s, False))
                nisa.nc_matmul(y_ps[:, w, :], n_s[:, w, :], _cols(t_t[:, w, :], s, True))  # N_s^T T_s^T[:, hi]
            if rows_too:
                nisa.activation(dst=_cols(t_row[:, h0:h1], s, False), op=nl.copy,
                                data=x_ps[:, h0:h1].reshape((chunk, h1 - h0, nb, s)))
            tt_new, y_new = _cols(t_t[:, h0:h1], s, True), y_ps[:, h0:h1].reshape((chunk, h1 - h0, nb, s))
            if h0 == 0 or lvl % 2:                       # evictions: 3/4 on ScalarE, 1/4 on VectorE
                nisa.activation(dst=tt_new, op=nl.copy, data=y_new)
            else:
                nisa.tensor_copy(dst=tt_new, src=y_new)
        del x_ps, y_ps
        yield
    return t_t, (t_row if want_row else None)


def gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=None, output_final_state=True,
                     use_qk_l2norm_in_kernel=False, valid_lengths=None, checkpoint_every=None, scale=None,
                     cu_seqlens=None, compute_dtype=None, lnc=None):
    """Chunked gated delta rule (prefill) for all batches and heads in one launch.

    Layouts as transformers / fla: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv];
    initial_state [B, Hv, Dk, Dv] fp32. Returns (o [B, T, Hv, Dv] in q's dtype, final_state fp32 or None),
    plus checkpoints [B, T // (checkpoint_every * chunk_size), Hv, Dk, Dv] when checkpoint_every is set.
    valid_lengths [B] (ints): tokens t >= valid_lengths[b] are right padding (state untouched, output 0).
    compute_dtype: None / "float32" (default): fp32 matmul operands and intermediates for every input dtype, as
    transformers' chunked function computes (bf16 outputs as accurate as the stock path's); "bfloat16": bf16
    operands for bf16 inputs (fp32 accumulation and state), about 2.6-4x faster (modeled), about 2.5x the error.
    lnc: 1 or 2 program instances (None: `resolve_lnc`, 2 on trn2); under LNC=2 each core owns half the v heads.
    """
    name = "gated_delta_rule"
    chk = check_gated_delta_rule(q, k, v, g, beta, chunk_size, initial_state, output_final_state,
                                 use_qk_l2norm_in_kernel, valid_lengths, checkpoint_every, scale, cu_seqlens,
                                 compute_dtype, lnc)
    bsz, seq = q.shape[0], q.shape[1]
    n_hv, dk, dv = v.shape[2], q.shape[3], v.shape[3]
    varlen = cu_seqlens is not None
    # host-side input validation only (before the launch): the kernel reads cu_seqlens on device and its trace
    # depends on N = len(cu_seqlens) - 1 alone, never on the values
    cu_arg = check_cu_seqlens(name, cu_seqlens, seq, max_seqs=_MAX_SEQS) if varlen else np.zeros(2, dtype=np.int32)
    if valid_lengths is None:
        lengths = np.full(bsz, seq, dtype=np.int32)
    else:
        lengths = check_lengths(name, valid_lengths, bsz, seq)
    chunk_size, ckpt_every = chk["chunk_size"], chk["checkpoint_every"]
    outs = call(gated_delta_rule_kernel, q, k, v, g, beta, chk["initial_state"], lengths, cu_arg,
                _host_constants(chunk_size), chunk=chunk_size, scale=chk["scale"], use_l2norm=chk["use_l2norm"],
                has_initial_state=chk["has_initial_state"], checkpoint_every=ckpt_every,
                has_lengths=valid_lengths is not None, bf16_compute=chk["bf16_compute"], varlen=varlen,
                row_tiles=current_target_name() != "trn1", lnc=chk["lnc"])
    o, final = outs[0], outs[1]
    final = final if chk["output_final_state"] else None
    if checkpoint_every is not None:
        n_states = cu_arg.size - 1 if varlen else bsz
        n_ckpt = seq // (ckpt_every * chunk_size)
        ckpts = outs[2] if n_ckpt > 0 else _empty_like_state(o, (n_states, 0, n_hv, dk, dv))
        return o, final, ckpts
    return o, final


def check_gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=None, output_final_state=True,
                           use_qk_l2norm_in_kernel=False, valid_lengths=None, checkpoint_every=None, scale=None,
                           cu_seqlens=None, compute_dtype=None, lnc=None) -> dict:
    """`gated_delta_rule`'s checks that read no tensor values (shapes, dtypes, options, N from cu_seqlens' shape,
    the SBUF / PSUM fit), so that torch_ops' fake runs them at trace time; the values of valid_lengths and
    cu_seqlens are checked by the wrapper. Returns the launch options (scale, lnc, chunk_size, ...)."""
    name = "gated_delta_rule"
    lnc = resolve_lnc(lnc, name)
    bsz, seq, n_hk, dk, n_hv, dv = check_qkv_gate_layouts(name, q, k, v, g, beta)
    kernel_check(seq >= 1, f"{name}: need at least one token, got T={seq}")
    varlen = cu_seqlens is not None
    n_states = bsz
    if varlen:
        n_states = cu_seqlens_count(name, cu_seqlens, _MAX_SEQS)
        kernel_check(bsz == 1, f"{name}: with cu_seqlens the sequences are packed along T and B must be 1, "
                     f"got B={bsz}")
        kernel_check(valid_lengths is None, f"{name}: valid_lengths and cu_seqlens are exclusive (packed "
                     f"sequences have no padding), got valid_lengths={valid_lengths!r}")
    chunk_size = check_int(name, "chunk_size", chunk_size)
    kernel_check(chunk_size in _CHUNK_SIZES, f"{name}: chunk_size must be one of {_CHUNK_SIZES}, "
                 f"got chunk_size={chunk_size}")
    use_qk_l2norm_in_kernel = check_bool(name, "use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    output_final_state = check_bool(name, "output_final_state", output_final_state)
    if scale is not None:
        scale = check_float(name, "scale", scale, positive=True)
    kernel_check(not varlen or n_states + seq // chunk_size <= _MAX_SLOTS, f"{name}: with cu_seqlens, N + T // "
                 f"chunk_size (chunk slots) must be <= {_MAX_SLOTS}, got N={n_states}, T={seq}, "
                 f"chunk_size={chunk_size}; split the pack into several launches")
    kernel_check(compute_dtype in _COMPUTE_DTYPES, f"{name}: compute_dtype must be one of {_COMPUTE_DTYPES}, "
                 f"got compute_dtype={compute_dtype!r}")
    bf16_compute = compute_dtype == "bfloat16" and _dtype_name(q) == "bfloat16"
    # per program instance (each owns ceil(Hv / lnc) v heads): [C, Hv] decay tiles must fit one PSUM bank, and
    # the chunk tiles of the owned heads SBUF
    n_own = -(-n_hv // lnc)
    kernel_check(n_own <= PSUM_FMAX_FP32, f"{name}: ceil(Hv / lnc) must be <= {PSUM_FMAX_FP32}, got Hv={n_hv}, "
                 f"lnc={lnc}")
    target = current_target_name()
    if bf16_compute:
        max_hv_chunk, what = _DEPTH_BY_HV_CHUNK[-1][0], "bf16 compute"
    elif _dtype_name(q) == "bfloat16":
        max_hv_chunk, what = target_limit(_MAX_HV_CHUNK_FP32, target), "fp32 compute on bfloat16 inputs"
    else:
        max_hv_chunk, what = target_limit(_MAX_HV_CHUNK_FP32_INPUTS, target), f"{_dtype_name(q)} inputs"
    kernel_check(n_own * chunk_size <= max_hv_chunk,
                 f"{name}: ceil(Hv / lnc) * chunk_size must be <= {max_hv_chunk} with "
                 f"{what} on {target} (SBUF per partition), got Hv={n_hv}, lnc={lnc}, "
                 f"chunk_size={chunk_size}; {hv_chunk_advice(chunk_size, lnc, target)}")
    has_init, init = initial_state_arg(name, initial_state, n_states, n_hv, dk, dv, "N" if varlen else "B",
                                       q_like=q)
    ckpt_every = 0
    if checkpoint_every is not None:
        ckpt_every = check_int(name, "checkpoint_every", checkpoint_every, lo=1)
    return dict(lnc=lnc, chunk_size=int(chunk_size), scale=float(dk ** -0.5 if scale is None else scale),
                use_l2norm=bool(use_qk_l2norm_in_kernel), output_final_state=output_final_state,
                has_initial_state=has_init, initial_state=init, checkpoint_every=ckpt_every,
                bf16_compute=bf16_compute)


def hv_chunk_advice(chunk_size, lnc, target, heads="v heads") -> str:
    """What would lower ceil(Hv / lnc) * chunk_size (or the per-core heads) on this call: only the options that
    change something (chunk_size=64 if larger, lnc=2 at LNC=1 where the target has two cores), then fewer heads."""
    from ..lnc import TARGET_LNC
    ways = []
    if chunk_size is not None and chunk_size > min(_CHUNK_SIZES):
        ways.append(f"chunk_size={min(_CHUNK_SIZES)}")
    if lnc == 1 and 2 in TARGET_LNC.get(target, ()):
        ways.append("lnc=2")
    ways.append(f"fewer {heads} per launch (tensor parallelism)")
    return "use " + " or ".join(ways)


def _empty_like_state(o, shape):
    arr = np.zeros(shape, dtype=np.float32)
    if not isinstance(o, np.ndarray):
        import torch
        return torch.from_numpy(arr)
    return arr
