"""Chunked gated delta rule (prefill): all batches and heads in one launch, fp32 state kept in SBUF.

Per v-head the recurrence is S <- exp(g_t) S; delta = beta_t (v_t - S^T k_t); S <- S + k_t delta^T;
o_t = S^T q_t (transformers' torch_chunk_gated_delta_rule / fla's chunk_gated_delta_rule). The kernel
walks the sequence chunk by chunk (C = 64 or 128 tokens, tokens on the partitions) in the WY/UT form
(loop nest, memory plan and the solve's derivation in DESIGN.md):

    G_i = sum_{k<=i} g_k                        (within the chunk; exact sums of g by matmul)
    A   = strict_lower(diag(beta) (K K^T o exp(G_i - G_j)))
    T   = (I + A)^-1                            (exact, by recursive block doubling, see DESIGN.md)
    W   = T (beta e^G o K),  U = T (beta o V),  V' = U - W S
    O   = e^G o (Q S) + (Q K^T o exp(G_i - G_j))_{j<=i} V'
    S   <- e^{G_C} S + (K o e^{G_C - G_j})^T V'

Every exponent is a sum of g over a causal range (<= 0), formed directly by a matmul with a 0/1 mask,
so no exp of a positive number and no difference of two large cumulative sums is ever taken.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX, PSUM_FMAX_FP32
from ..validation import kernel_check
from ._checks import check_qkv_gate_layouts
from ._checks import dtype_name as _dtype_name

# ---------------------------------------------------------------- constraints
_CHUNK_SIZES = (64, 128)          # tokens per chunk: partitions of the intra-chunk tiles (<= P_MAX)
_MAX_HEAD_DIM = P_MAX             # Dk, Dv <= 128: Dk is the partition dim of the state tile
_L2NORM_EPS = 1e-6                # transformers' l2norm eps (added to the sum of squares)
# rsqrt is valid on [2^-87, 2^97] on the device; fp32 sums of squares span [eps ~ 2^-20, 2^128]:
# rsqrt(x) = rsqrt(x * 2^-40) * 2^-20 keeps every such x inside the valid range.
_RSQRT_PRESCALE = 2.0 ** -40
_RSQRT_POSTSCALE = 2.0 ** -20
# PSUM banks one [P, W, C] lockstep tile may span: the solve keeps 3 such tiles live (6 of 8 banks)
_LOCKSTEP_PSUM_BANKS = 2

# ---------------------------------------------------------------- host constants (index into consts)
_C_IDENT = 0                      # I[i, j] = [i == j]
_C_UTRI = 1                       # U[k, i] = [k <= i]   (inclusive cumsum / causal j <= i mask)
_C_SL = 2                         # SL[k, j] = [k > j]  (strict "after j")
_C_M1 = 3                         # level-1 off-diagonal block mask of A (rows 2q+1, cols 2q)
_C_MT0 = 4                        # first transposed level mask; level l (block s = 2^l) at _C_MT0 + l


def _n_levels(chunk):
    return int(chunk).bit_length() - 1          # log2(chunk)


def _host_constants(chunk):
    """[n_const, C, C] fp32 0/1 masks the kernel loads once (identity, triangles, block-doubling masks)."""
    idx = np.arange(chunk)
    i, j = idx[:, None], idx[None, :]
    consts = [np.eye(chunk), (i <= j), (i > j)]
    level_t = []
    for lvl in range(_n_levels(chunk)):
        s = 1 << lvl
        m = (i // (2 * s) == j // (2 * s)) & (i % (2 * s) >= s) & (j % (2 * s) < s)   # A-layout [row, col]
        if lvl == 0:
            consts.append(m)
        level_t.append(m.T)
    return np.stack([c.astype(np.float32) for c in consts + level_t])


@nki.jit
def gated_delta_rule_kernel(q, k, v, g, beta, initial_state, lengths, consts, chunk, scale, use_l2norm,
                            has_initial_state, checkpoint_every):
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
        initial_state: [B, Hv, Dk, Dv] @ HBM fp32 (read only when has_initial_state).
        lengths: [B] @ HBM int32, valid tokens per sequence (right padding beyond).
        consts: [n_const, C, C] @ HBM fp32, the 0/1 masks of `_host_constants(C)`.
        chunk, scale, use_l2norm, has_initial_state, checkpoint_every: trace-time constants.
    Returns:
        o: [B, T, Hv, Dv] @ HBM in q's dtype; final_state: [B, Hv, Dk, Dv] @ HBM fp32;
        checkpoints: [B, T // (checkpoint_every * C), Hv, Dk, Dv] fp32 (only when checkpoint_every).
    Constraints:
        C in _CHUNK_SIZES; Dk, Dv <= _MAX_HEAD_DIM; pad tokens (t >= lengths[b]) get g = beta = 0 and q = 0.
    Pseudocode:
        for b: S[h] = initial_state[b, h] (SBUF, [Dk, Hv, Dv] fp32)
          for each chunk: load q, k, v, g, beta rows; mask pads; l2norm + scale q, k (compute dtype)
            for each lockstep block of W v heads (W = Hv at Qwen shapes):
              K^T, Q^T of its q/k heads (TensorE), K K^T, (K Q^T masked j <= i)
              per head: decays by matmul with 0/1 masks; A; P^T
              T^T = (I + A)^-1 (block doubling, W heads per instruction); W^T, V' = T (beta V) - W S;
              O = e^G (Q S) + P V'; S = e^{G_C} S + K_d^T V'
            store the chunk's o rows (and the state every N chunks)
          store final S
    """
    bsz, seq, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    group = n_hv // n_hk
    n_chunks = (seq + chunk - 1) // chunk
    f32 = nl.float32

    o = nl.ndarray((bsz, seq, n_hv, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    final_state = nl.ndarray((bsz, n_hv, dk, dv), dtype=f32, buffer=nl.shared_hbm)
    n_ckpt = 0 if not checkpoint_every else seq // (checkpoint_every * chunk)
    ckpt = None
    if n_ckpt > 0:
        ckpt = nl.ndarray((bsz, n_ckpt, n_hv, dk, dv), dtype=f32, buffer=nl.shared_hbm)

    n_const = consts.shape[0]
    consts_sb = nl.ndarray((chunk, n_const, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=consts_sb, src=consts.permute((1, 0, 2)))
    utri = consts_sb[:, _C_UTRI, :]
    # matmul operand dtypes: bf16 inputs run TensorE at bf16 rate (fp32 PSUM accumulation, fp32 state);
    # decays (sums of g) stay fp32 everywhere
    cdt = nl.bfloat16 if q.dtype == nl.bfloat16 else f32
    consts_c = consts_sb
    if cdt != f32:
        consts_c = nl.ndarray((chunk, n_const, chunk), dtype=cdt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=consts_c, src=consts_sb)
    ones_sb = nl.ndarray((chunk, max(dk, chunk)), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    # v heads of one q/k group are processed W at a time in lockstep ([C, W, C] tiles): one instruction
    # serves W heads where the op is the same, and the W independent chains hide each other's latency
    width = _lockstep_width(n_hv, group, chunk, dk, dv)
    # masks of the block solve, replicated W times along the free dim (no broadcasting in NKI ops)
    n_lvl = _n_levels(chunk)
    masks_w = nl.ndarray((chunk, n_lvl + 2, width, chunk), dtype=cdt, buffer=nl.sbuf)
    for i_w in nl.affine_range(width):
        nisa.tensor_copy(dst=masks_w[:, 0, i_w, :], src=consts_sb[:, _C_IDENT, :], engine=nisa.engine.gpsimd)
        nisa.tensor_copy(dst=masks_w[:, 1, i_w, :], src=consts_sb[:, _C_M1, :], engine=nisa.engine.gpsimd)
        for lvl in nl.static_range(n_lvl):
            nisa.tensor_copy(dst=masks_w[:, 2 + lvl, i_w, :], src=consts_sb[:, _C_MT0 + lvl, :],
                             engine=nisa.engine.gpsimd)

    for i_b in nl.sequential_range(bsz):
        state_sb = nl.ndarray((dk, n_hv, dv), dtype=f32, buffer=nl.sbuf)
        if has_initial_state:
            nisa.dma_copy(dst=state_sb, src=initial_state[i_b].permute((1, 0, 2)))
        else:
            nisa.memset(dst=state_sb, value=0.0)
        len_i = nl.ndarray((chunk, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=len_i, src=lengths.ap(pattern=[[0, chunk], [1, 1]], offset=i_b))
        len_f = nl.ndarray((chunk, 1), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=len_f, src=len_i)

        for i_c in nl.sequential_range(n_chunks):
            t0 = i_c * chunk
            n_tok = min(chunk, seq - t0)
            q_sb, k_sb, v_sb, g_sb, beta_sb = _load_chunk(q, k, v, g, beta, i_b, t0, n_tok, chunk)
            valid = _valid_mask(len_f, t0, chunk)
            # pad tokens: g = 0 (no decay), beta = 0 (no write), q = 0 (zero output)
            nisa.tensor_scalar(dst=g_sb, data=g_sb, op0=nl.multiply, operand0=valid)
            nisa.tensor_scalar(dst=beta_sb, data=beta_sb, op0=nl.multiply, operand0=valid)
            q_c = _normalize(q_sb, valid, scale, use_l2norm, cdt)
            k_c = _normalize(k_sb, None, 1.0, use_l2norm, cdt)
            v_c = v_sb
            if cdt != f32:
                v_c = nl.ndarray((chunk, n_hv, dv), dtype=cdt, buffer=nl.sbuf)
                nisa.activation(dst=v_c, op=nl.copy, data=v_sb)

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

            o_sb = nl.ndarray((chunk, n_hv, dv), dtype=q.dtype, buffer=nl.sbuf)
            for i_blk in nl.affine_range(n_hv // width):
                hv0 = i_blk * width
                hk0 = hv0 // group
                n_kh = (hv0 + width - 1) // group - hk0 + 1          # q/k heads this block of v heads uses
                q_t = nl.ndarray((dk, n_kh, chunk), dtype=cdt, buffer=nl.sbuf)
                k_t = nl.ndarray((dk, n_kh, chunk), dtype=cdt, buffer=nl.sbuf)
                tq_ps = nl.ndarray((dk, 2, n_kh, chunk), dtype=f32, buffer=nl.psum)
                for i_k in nl.affine_range(n_kh):
                    nisa.nc_matmul(tq_ps[:, 0, i_k, :], q_c[:, hk0 + i_k, :], consts_c[:, _C_IDENT, :])
                    nisa.nc_matmul(tq_ps[:, 1, i_k, :], k_c[:, hk0 + i_k, :], consts_c[:, _C_IDENT, :])
                nisa.activation(dst=q_t, op=nl.copy, data=tq_ps[:, 0])      # Q^T [Dk, C] per q/k head
                nisa.activation(dst=k_t, op=nl.copy, data=tq_ps[:, 1])      # K^T
                del tq_ps
                kk_ps = nl.ndarray((chunk, n_kh, chunk), dtype=f32, buffer=nl.psum)
                kq_ps = nl.ndarray((chunk, n_kh, chunk), dtype=f32, buffer=nl.psum)
                for i_k in nl.affine_range(n_kh):
                    nisa.nc_matmul(kk_ps[:, i_k, :], k_t[:, i_k, :], k_t[:, i_k, :])   # K K^T (symmetric)
                    nisa.nc_matmul(kq_ps[:, i_k, :], k_t[:, i_k, :], q_t[:, i_k, :])   # [j, i] = k_j . q_i
                kk_sb = nl.ndarray((chunk, n_kh, chunk), dtype=f32, buffer=nl.sbuf)
                nisa.activation(dst=kk_sb, op=nl.copy, data=kk_ps)
                del kk_ps
                kq_causal = nl.ndarray((chunk, n_kh, chunk), dtype=f32, buffer=nl.sbuf)
                for i_k in nl.affine_range(n_kh):
                    nisa.tensor_tensor(dst=kq_causal[:, i_k, :], data1=kq_ps[:, i_k, :], data2=utri, op=nl.multiply)
                del kq_ps
                hs = slice(hv0, hv0 + width)
                head_kh = [(hv0 + w) // group - hk0 for w in range(width)]
                _chunk_heads(q_t, k_c[:, hk0:hk0 + n_kh, :], v_c[:, hs, :], kk_sb, kq_causal, head_kh, g_sb[:, hs],
                             beta_sb[:, hs], exp_g[:, hs], beta_exp_g[:, hs], exp_glast[:, hs],
                             state_sb[:, hs, :], o_sb[:, hs, :], consts_sb, masks_w, chunk, dk, dv, cdt)
            nisa.dma_copy(dst=o[i_b, t0:t0 + n_tok], src=o_sb[0:n_tok])
            if n_ckpt > 0 and (i_c + 1) % checkpoint_every == 0 and (i_c + 1) // checkpoint_every <= n_ckpt:
                i_k = (i_c + 1) // checkpoint_every - 1
                nisa.dma_copy(dst=ckpt[i_b, i_k].permute((1, 0, 2)), src=state_sb)
        nisa.dma_copy(dst=final_state[i_b].permute((1, 0, 2)), src=state_sb)
    if ckpt is not None:
        return o, final_state, ckpt
    return o, final_state


def _load_chunk(q, k, v, g, beta, i_b, t0, n_tok, chunk):
    """fp32 SBUF tiles (tokens on partitions) of one chunk; rows past the sequence end are zero."""
    n_hk, dk = q.shape[2], q.shape[3]
    n_hv, dv = v.shape[2], v.shape[3]
    f32 = nl.float32
    q_sb = nl.ndarray((chunk, n_hk, dk), dtype=f32, buffer=nl.sbuf)
    k_sb = nl.ndarray((chunk, n_hk, dk), dtype=f32, buffer=nl.sbuf)
    v_sb = nl.ndarray((chunk, n_hv, dv), dtype=f32, buffer=nl.sbuf)
    g_sb = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
    beta_sb = nl.ndarray((chunk, n_hv), dtype=f32, buffer=nl.sbuf)
    tiles = (q_sb, k_sb, v_sb, g_sb, beta_sb)
    if n_tok < chunk:
        for t in tiles:
            nisa.memset(dst=t, value=0.0)
    for t, src in zip(tiles, (q, k, v, g, beta)):
        nisa.dma_copy(dst=t[0:n_tok], src=src[i_b, t0:t0 + n_tok])
    return tiles


def _valid_mask(len_f, t0, chunk):
    """(C, 1) fp32: 1.0 where token t0 + p < length, else 0.0."""
    pos_i = nl.ndarray((chunk, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=pos_i, pattern=[[0, 1]], offset=t0, channel_multiplier=1)
    pos_f = nl.ndarray((chunk, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pos_f, src=pos_i)
    valid = nl.ndarray((chunk, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=valid, data1=pos_f, data2=len_f, op=nl.less)
    return valid


def _normalize(x_sb, valid, scale, use_l2norm, cdt):
    """Per (token, head): x * scale * rsqrt(sum x^2 + eps) (if use_l2norm) * valid, in dtype cdt."""
    chunk, n_h, d = x_sb.shape
    if not use_l2norm and valid is None and scale == 1.0 and cdt == x_sb.dtype:
        return x_sb
    factor = nl.ndarray((chunk, n_h), dtype=nl.float32, buffer=nl.sbuf)
    if use_l2norm:
        sq = nl.ndarray((chunk, n_h, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=sq, data1=x_sb, data2=x_sb, op=nl.multiply)
        nisa.tensor_reduce(dst=factor, op=nl.add, data=sq, axis=2)
        nisa.activation(dst=factor, op=nl.rsqrt, data=factor, scale=_RSQRT_PRESCALE,
                        bias=_L2NORM_EPS * _RSQRT_PRESCALE)
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.multiply, operand0=float(scale) * _RSQRT_POSTSCALE)
    else:
        nisa.memset(dst=factor, value=float(scale))
    if valid is not None:
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.multiply, operand0=valid)
    out = nl.ndarray((chunk, n_h, d), dtype=cdt, buffer=nl.sbuf)
    for i_h in nl.affine_range(n_h):
        nisa.activation(dst=out[:, i_h, :], op=nl.copy, data=x_sb[:, i_h, :], scale=factor[:, i_h:i_h + 1])
    return out


def _lockstep_width(n_hv, group, chunk, dk, dv):
    """v heads per lockstep block: the largest divisor W of Hv that is a multiple or a divisor of the GVA
    group and keeps a [P, W, max(C, Dk, Dv)] fp32 PSUM tile within _LOCKSTEP_PSUM_BANKS banks (one bank
    when a head's slice could straddle a bank boundary, i.e. when a size is not a power of two)."""
    widest = max(chunk, dk, dv)
    pow2 = all(x & (x - 1) == 0 for x in (chunk, dk, dv))
    limit = max(1, (PSUM_FMAX_FP32 * (_LOCKSTEP_PSUM_BANKS if pow2 else 1)) // widest)
    return max(w for w in range(1, n_hv + 1)
               if n_hv % w == 0 and w <= limit and (w % group == 0 or group % w == 0))


def _chunk_heads(q_t, k_c, v_w, kk_sb, kq_causal, head_kh, g_w, beta_w, exp_g, beta_exp_g, exp_glast, s_w, o_w,
                 consts_sb, masks_w, chunk, dk, dv, cdt):
    """One chunk for W v-heads of one q/k group in lockstep: o_w [C, W, Dv] written, s_w [Dk, W, Dv] updated.

    Per-head work (matmuls, ops with a per-head scalar) loops over w; element-wise work common to the W
    heads is one instruction over [P, W, ...]. Engines: decays and the solve on TensorE (fp32 where
    exactness matters), PSUM evictions with a scale on ScalarE, SBUF-only products on GpSimd,
    PSUM-reading two-input ops on VectorE.
    """
    f32 = nl.float32
    width = g_w.shape[1]
    pool = nisa.engine.gpsimd
    utri = consts_sb[:, _C_UTRI, :]
    strict_after = consts_sb[:, _C_SL, :]
    # decays as exact fp32 partial sums of g: gU[k, i] = g_k [k <= i];
    # D[i, j] = sum_{j<k<=i} g_k (0 for j >= i), D^T[j, i] likewise (0 for i <= j)
    g_u = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.sbuf)
    for w in nl.affine_range(width):
        nisa.activation(dst=g_u[:, w, :], op=nl.copy, data=utri, scale=g_w[:, w:w + 1])
    d_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(d_ps[:, w, :], g_u[:, w, :], strict_after)
    decay = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=decay, op=nl.exp, data=d_ps)
    del d_ps
    dt_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(dt_ps[:, w, :], strict_after, g_u[:, w, :])
    decay_t = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=decay_t, op=nl.exp, data=dt_ps)
    del dt_ps
    # A = beta_i (k_i . k_j) e^{G_i - G_j} (only the strictly lower part is read);
    # P^T[j, i] = (k_j . q_i) e^{G_i - G_j} for j <= i
    a_w = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    p_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    for w in nl.affine_range(width):
        kh = head_kh[w]
        nisa.scalar_tensor_tensor(dst=a_w[:, w, :], data=decay[:, w, :], op0=nl.multiply,
                                  operand0=beta_w[:, w:w + 1], op1=nl.multiply, operand1=kk_sb[:, kh, :])
        nisa.tensor_tensor(dst=p_t[:, w, :], data1=decay_t[:, w, :], data2=kq_causal[:, kh, :], op=nl.multiply,
                           engine=pool)
    t_t = _solve_unit_lower(a_w, masks_w, chunk, cdt)    # T^T per head, T = (I + A)^-1

    # W^T = (T (beta e^G K))^T, negated; V' = T (beta V) - W S
    xk = nl.ndarray((chunk, width, dk), dtype=cdt, buffer=nl.sbuf)
    xv = nl.ndarray((chunk, width, dv), dtype=cdt, buffer=nl.sbuf)
    for w in nl.affine_range(width):
        nisa.activation(dst=xk[:, w, :], op=nl.copy, data=k_c[:, head_kh[w], :], scale=beta_exp_g[:, w:w + 1])
        nisa.activation(dst=xv[:, w, :], op=nl.copy, data=v_w[:, w, :], scale=beta_w[:, w:w + 1])
    s_c = s_w
    if cdt != f32:
        s_c = nl.ndarray((dk, width, dv), dtype=cdt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=s_c, src=s_w, engine=pool)
    wt_ps = nl.ndarray((dk, width, chunk), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(wt_ps[:, w, :], xk[:, w, :], t_t[:, w, :])
    wt_neg = nl.ndarray((dk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.activation(dst=wt_neg, op=nl.copy, data=wt_ps, scale=-1.0)
    del wt_ps
    vn_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(vn_ps[:, w, :], t_t[:, w, :], xv[:, w, :])
        nisa.nc_matmul(vn_ps[:, w, :], wt_neg[:, w, :], s_c[:, w, :], accumulate=True)
    v_new = nl.ndarray((chunk, width, dv), dtype=cdt, buffer=nl.sbuf)
    nisa.activation(dst=v_new, op=nl.copy, data=vn_ps)
    del vn_ps

    # O = e^G o (Q S) + P V'
    qs_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(qs_ps[:, w, :], q_t[:, head_kh[w], :], s_c[:, w, :])
    o_inter = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.sbuf)
    for w in nl.affine_range(width):
        nisa.activation(dst=o_inter[:, w, :], op=nl.copy, data=qs_ps[:, w, :], scale=exp_g[:, w:w + 1])
    del qs_ps
    pv_ps = nl.ndarray((chunk, width, dv), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(pv_ps[:, w, :], p_t[:, w, :], v_new[:, w, :])
    nisa.tensor_tensor(dst=o_w, data1=pv_ps, data2=o_inter, op=nl.add)
    del pv_ps

    # S <- e^{G_C} S + (K o e^{G_C - G_j})^T V'   (decay_t[:, w, C-1] = e^{G_C - G_j})
    k_dec = nl.ndarray((chunk, width, dk), dtype=cdt, buffer=nl.sbuf)
    for w in nl.affine_range(width):
        nisa.activation(dst=k_dec[:, w, :], op=nl.copy, data=k_c[:, head_kh[w], :],
                        scale=decay_t[:, w, chunk - 1:chunk])
    su_ps = nl.ndarray((dk, width, dv), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(su_ps[:, w, :], k_dec[:, w, :], v_new[:, w, :])
    for w in nl.affine_range(width):
        nisa.scalar_tensor_tensor(dst=s_w[:, w, :], data=s_w[:, w, :], op0=nl.multiply,
                                  operand0=exp_glast[:, w:w + 1], op1=nl.add, operand1=su_ps[:, w, :])


def s_half(lvl):
    """Block size s of doubling level lvl (blocks of s -> 2s)."""
    return 1 << lvl


def _solve_unit_lower(a_w, masks_w, chunk, cdt):
    """T^T [C, W, C] per head, T = (I + strict_lower(A))^-1, by recursive block doubling.

    With T_s the inverse restricted to diagonal blocks of size s and A_s the entries of A in the
    (second half, first half) sub-blocks of each 2s block: T_2s = T_s - T_s A_s T_s, exact and free of the
    growth of a power series (each level computes exact sub-blocks of T). Each level computes M = A_s T_s,
    T_2s = T_s - T_s M and T_2s^T = T_s^T - M^T T_s^T (three matmuls per head, fp32 PSUM accumulation).
    Operands are in cdt: fp32 for fp32 inputs (exact to ~1e-7), bf16 for bf16 inputs (~1e-3 relative on T,
    twice the error of rounding the exact T to bf16 once; see DESIGN.md).
    masks_w [C, L + 2, W, C]: 0 = identity, 1 = level-0 mask of A, 2 + l = level-l mask of A^T.
    """
    f32 = nl.float32
    width = a_w.shape[1]
    pool = nisa.engine.gpsimd
    ident = masks_w[:, 0]
    at_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
    for w in nl.affine_range(width):
        nisa.nc_matmul(at_ps[:, w, :], a_w[:, w, :], ident[:, w, :])      # A^T = A^T I
    at_sb = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.activation(dst=at_sb, op=nl.copy, data=at_ps)
    del at_ps
    # level 0: blocks of 1 -> 2 (GpSimd: SBUF-only products)
    tmp = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=tmp, data1=a_w, data2=masks_w[:, 1], op=nl.multiply, engine=pool)
    t_cur = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_cur, data1=ident, data2=tmp, op=nl.subtract, engine=pool)
    tmp_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=tmp_t, data1=at_sb, data2=masks_w[:, 2], op=nl.multiply, engine=pool)
    t_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_t, data1=ident, data2=tmp_t, op=nl.subtract, engine=pool)
    n_lvl = _n_levels(chunk)
    # the W heads run as two interleaved half-chains: while one half waits for its evictions, TensorE and
    # VectorE work on the other half (in-order engines would otherwise idle along a single chain)
    mid = (width + 1) // 2
    halves = [(0, mid), (mid, width)] if mid < width else [(0, width)]
    for lvl in nl.sequential_range(1, n_lvl):
        last = lvl + 1 == n_lvl
        blocks = (chunk, width, chunk // (2 * s_half(lvl)), 2 * s_half(lvl))
        lo, hi = slice(0, s_half(lvl)), slice(s_half(lvl), 2 * s_half(lvl))
        a_off_t = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=a_off_t, data1=at_sb, data2=masks_w[:, 2 + lvl], op=nl.multiply, engine=pool)
        m_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
        m_sb = nl.ndarray((chunk, width, chunk), dtype=cdt, buffer=nl.sbuf)
        for i_half, (h0, h1) in enumerate(halves):
            for w in nl.affine_range(h0, h1):
                nisa.nc_matmul(m_ps[:, w, :], a_off_t[:, w, :], t_cur[:, w, :])      # M = A_s T_s
            if i_half == 0:                                  # evictions split over ScalarE and VectorE
                nisa.activation(dst=m_sb[:, h0:h1], op=nl.copy, data=m_ps[:, h0:h1])
            else:
                nisa.tensor_copy(dst=m_sb[:, h0:h1], src=m_ps[:, h0:h1])
        # X = T_s M is non-zero only in the first-half columns of each 2s block and Y = M^T T_s^T only in
        # the second-half columns: update just those columns of T and T^T, in place (half the elements)
        if not last:                                         # T itself is not needed after the last level
            x_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
            for h0, h1 in halves:
                for w in nl.affine_range(h0, h1):
                    nisa.nc_matmul(x_ps[:, w, :], t_t[:, w, :], m_sb[:, w, :])  # T_s M
                t_view = t_cur.reshape(blocks)[:, h0:h1, :, lo]
                nisa.tensor_tensor(dst=t_view, data1=t_view, data2=x_ps.reshape(blocks)[:, h0:h1, :, lo],
                                   op=nl.subtract)
            del x_ps
        y_ps = nl.ndarray((chunk, width, chunk), dtype=f32, buffer=nl.psum)
        for h0, h1 in halves:
            for w in nl.affine_range(h0, h1):
                nisa.nc_matmul(y_ps[:, w, :], m_sb[:, w, :], t_t[:, w, :])      # M^T T_s^T
            tt_view = t_t.reshape(blocks)[:, h0:h1, :, hi]
            nisa.tensor_tensor(dst=tt_view, data1=tt_view, data2=y_ps.reshape(blocks)[:, h0:h1, :, hi],
                               op=nl.subtract)
        del m_ps, y_ps
    return t_t



def gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=None, output_final_state=True,
                     use_qk_l2norm_in_kernel=False, valid_lengths=None, checkpoint_every=None, scale=None,
                     cu_seqlens=None, **kwargs):
    """Chunked gated delta rule (prefill) for all batches and heads in one launch.

    Layouts as transformers / fla: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv];
    initial_state [B, Hv, Dk, Dv] fp32. Returns (o [B, T, Hv, Dv] in q's dtype, final_state fp32 or None),
    plus checkpoints [B, T // (checkpoint_every * chunk_size), Hv, Dk, Dv] when checkpoint_every is set.
    valid_lengths [B] (ints): tokens t >= valid_lengths[b] are right padding (state untouched, output 0).
    """
    name = "gated_delta_rule"
    kernel_check(cu_seqlens is None, f"{name}: packed varlen (cu_seqlens) is not supported; pass right-padded "
                 f"[B, T, ...] inputs with valid_lengths instead, got cu_seqlens={cu_seqlens!r}")
    bsz, seq, n_hk, dk, n_hv, dv = check_qkv_gate_layouts(name, q, k, v, g, beta)
    kernel_check(seq >= 1, f"{name}: need at least one token, got T={seq}")
    kernel_check(chunk_size in _CHUNK_SIZES, f"{name}: chunk_size must be one of {_CHUNK_SIZES}, "
                 f"got chunk_size={chunk_size}")
    # Dv-wide PSUM tiles and [C, n_hv] decay tiles must fit one PSUM bank
    kernel_check(n_hv <= PSUM_FMAX_FP32, f"{name}: Hv must be <= {PSUM_FMAX_FP32}, got Hv={n_hv}")
    has_init = initial_state is not None
    if has_init:
        kernel_check(tuple(initial_state.shape) == (bsz, n_hv, dk, dv), f"{name}: initial_state must be "
                     f"[B, Hv, Dk, Dv]={(bsz, n_hv, dk, dv)}, got {tuple(initial_state.shape)}")
        kernel_check(_dtype_name(initial_state) == "float32",
                     f"{name}: initial_state must be float32, got {_dtype_name(initial_state)}")
        init = initial_state
    else:
        init = np.zeros((1, 1, 1, 1), dtype=np.float32)
    if valid_lengths is None:
        lengths = np.full(bsz, seq, dtype=np.int32)
    else:
        lengths = np.asarray(valid_lengths.cpu() if hasattr(valid_lengths, "cpu") else valid_lengths)
        kernel_check(lengths.shape == (bsz,), f"{name}: valid_lengths must be [B]={bsz}, got shape "
                     f"{lengths.shape}")
        kernel_check(bool(np.all((lengths >= 0) & (lengths <= seq))),
                     f"{name}: valid_lengths must be in [0, T={seq}], got {lengths.tolist()}")
        lengths = lengths.astype(np.int32)
    ckpt_every = 0
    if checkpoint_every is not None:
        kernel_check(int(checkpoint_every) >= 1, f"{name}: checkpoint_every must be >= 1 chunk, "
                     f"got checkpoint_every={checkpoint_every}")
        ckpt_every = int(checkpoint_every)
    sc = float(dk ** -0.5 if scale is None else scale)
    outs = call(gated_delta_rule_kernel, q, k, v, g, beta, init, lengths, _host_constants(chunk_size),
                chunk=int(chunk_size), scale=sc, use_l2norm=bool(use_qk_l2norm_in_kernel),
                has_initial_state=has_init, checkpoint_every=ckpt_every)
    o, final = outs[0], outs[1]
    final = final if output_final_state else None
    if checkpoint_every is not None:
        n_ckpt = seq // (ckpt_every * chunk_size)
        ckpts = outs[2] if n_ckpt > 0 else _empty_like_state(o, (bsz, 0, n_hv, dk, dv))
        return o, final, ckpts
    return o, final


def _empty_like_state(o, shape):
    arr = np.zeros(shape, dtype=np.float32)
    if not isinstance(o, np.ndarray):
        import torch
        return torch.from_numpy(arr)
    return arr
