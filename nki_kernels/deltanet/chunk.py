"""Chunked gated delta rule (prefill): all batches and heads in one launch, fp32 state kept in SBUF.

Per v-head the recurrence is S <- exp(g_t) S; delta = beta_t (v_t - S^T k_t); S <- S + k_t delta^T;
o_t = S^T q_t (transformers' torch_chunk_gated_delta_rule / fla's chunk_gated_delta_rule). The kernel
walks the sequence chunk by chunk (C = 64 or 128 tokens, tokens on the partitions) in the WY/UT form:

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

# ---------------------------------------------------------------- constraints
_CHUNK_SIZES = (64, 128)          # tokens per chunk: partitions of the intra-chunk tiles (<= P_MAX)
_MAX_HEAD_DIM = P_MAX             # Dk, Dv <= 128: Dk is the partition dim of the state tile
_L2NORM_EPS = 1e-6                # transformers' l2norm eps (added to the sum of squares)
# rsqrt is valid on [2^-87, 2^97] on the device; fp32 sums of squares span [eps ~ 2^-20, 2^128]:
# rsqrt(x) = rsqrt(x * 2^-40) * 2^-20 keeps every such x inside the valid range.
_RSQRT_PRESCALE = 2.0 ** -40
_RSQRT_POSTSCALE = 2.0 ** -20
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")

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
          for each chunk: load q, k, v, g, beta rows; mask pads; l2norm + scale q, k
            for each q/k head: K^T, Q^T (PE transposes), K K^T, (K Q^T masked j <= i)
              for each v head of the group: decays by matmul with masks; A; T = (I + A)^-1;
                W^T, V' = T (beta V) - W S; O = e^G (Q S) + P V'; S = e^{G_C} S + K_d^T V'
          store final S (and checkpoints every N chunks)
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
    ident = consts_sb[:, _C_IDENT, :]
    utri = consts_sb[:, _C_UTRI, :]
    strict_after = consts_sb[:, _C_SL, :]
    ones_sb = nl.ndarray((chunk, max(dk, chunk)), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)

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
            _normalize(q_sb, valid, scale, use_l2norm)
            _normalize(k_sb, None, 1.0, use_l2norm)

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
            for i_hk in nl.affine_range(n_hk):
                q_t = _transpose_to_sbuf(q_sb[:, i_hk, :], chunk, dk)        # [Dk, C]
                k_t = _transpose_to_sbuf(k_sb[:, i_hk, :], chunk, dk)        # [Dk, C]
                kk_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
                nisa.nc_matmul(kk_ps, k_t, k_t)                              # K K^T (symmetric)
                kq_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
                nisa.nc_matmul(kq_ps, k_t, q_t)                              # [j, i] = k_j . q_i
                kq_causal = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=kq_causal, data1=kq_ps, data2=utri, op=nl.multiply)
                del kq_ps
                for i_g in nl.affine_range(group):
                    i_hv = i_hk * group + i_g
                    _chunk_head(q_t, k_sb[:, i_hk, :], v_sb[:, i_hv, :], kk_ps, kq_causal,
                                g_sb[:, i_hv:i_hv + 1], beta_sb[:, i_hv:i_hv + 1],
                                exp_g[:, i_hv:i_hv + 1], beta_exp_g[:, i_hv:i_hv + 1],
                                exp_glast[:, i_hv:i_hv + 1], state_sb[:, i_hv, :], o_sb[:, i_hv, :],
                                consts_sb, chunk, dk, dv)
                del kk_ps
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


def _normalize(x_sb, valid, scale, use_l2norm):
    """In place per (token, head): x *= scale * rsqrt(sum x^2 + eps) (if use_l2norm) * valid."""
    chunk, n_h, d = x_sb.shape
    if not use_l2norm and valid is None and scale == 1.0:
        return
    factor = nl.ndarray((chunk, n_h), dtype=nl.float32, buffer=nl.sbuf)
    if use_l2norm:
        sq = nl.ndarray((chunk, n_h, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=sq, data1=x_sb, data2=x_sb, op=nl.multiply)
        nisa.tensor_reduce(dst=factor, op=nl.add, data=sq, axis=2)
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.add, operand0=_L2NORM_EPS, op1=nl.multiply,
                           operand1=_RSQRT_PRESCALE)
        nisa.activation(dst=factor, op=nl.rsqrt, data=factor)
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.multiply, operand0=float(scale) * _RSQRT_POSTSCALE)
    else:
        nisa.memset(dst=factor, value=float(scale))
    if valid is not None:
        nisa.tensor_scalar(dst=factor, data=factor, op0=nl.multiply, operand0=valid)
    for i_h in nl.affine_range(n_h):
        nisa.tensor_scalar(dst=x_sb[:, i_h, :], data=x_sb[:, i_h, :], op0=nl.multiply,
                           operand0=factor[:, i_h:i_h + 1])


def _transpose_to_sbuf(x_sb, rows, cols):
    """[cols, rows] fp32 SBUF copy of x_sb [rows, cols] (TensorE transpose through PSUM)."""
    t_ps = nl.ndarray((cols, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=t_ps, data=x_sb)
    t_sb = nl.ndarray((cols, rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=t_sb, src=t_ps)
    return t_sb


def _chunk_head(q_t, k_c, v_c, kk_ps, kq_causal, g_c, beta_c, exp_g, beta_exp_g, exp_glast, s_h, o_h,
                consts_sb, chunk, dk, dv):
    """One (chunk, v-head) step: output rows into o_h [C, Dv], state s_h [Dk, Dv] updated in place."""
    f32 = nl.float32
    utri = consts_sb[:, _C_UTRI, :]
    strict_after = consts_sb[:, _C_SL, :]
    # gU[k, i] = g_k [k <= i]; decays as exact partial sums of g over (j, i]
    g_u = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=g_u, data=utri, op0=nl.multiply, operand0=g_c)
    d_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(d_ps, g_u, strict_after)               # [i, j] = sum_{j<k<=i} g_k (0 for j >= i)
    decay = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=decay, op=nl.exp, data=d_ps)
    dt_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(dt_ps, strict_after, g_u)              # [j, i] = sum_{j<k<=i} g_k (0 for i <= j)
    decay_t = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=decay_t, op=nl.exp, data=dt_ps)
    del d_ps, dt_ps
    # A = beta_i (k_i . k_j) e^{G_i - G_j} (only the strictly lower part is ever read)
    a_sb = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=a_sb, data=decay, op0=nl.multiply, operand0=beta_c, op1=nl.multiply,
                              operand1=kk_ps)
    # P^T[j, i] = (k_j . q_i) e^{G_i - G_j} for j <= i
    p_t = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=p_t, data1=decay_t, data2=kq_causal, op=nl.multiply)
    t_t = _solve_unit_lower(a_sb, consts_sb, chunk)       # T^T, T = (I + A)^-1

    # W^T = (T (beta e^G K))^T, negated; V' = T (beta V) - W S
    xk = nl.ndarray((chunk, dk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=xk, data=k_c, op0=nl.multiply, operand0=beta_exp_g)
    xv = nl.ndarray((chunk, dv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=xv, data=v_c, op0=nl.multiply, operand0=beta_c)
    wt_ps = nl.ndarray((dk, chunk), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(wt_ps, xk, t_t)
    wt_neg = nl.ndarray((dk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=wt_neg, data=wt_ps, op0=nl.multiply, operand0=-1.0)
    del wt_ps
    vn_ps = nl.ndarray((chunk, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(vn_ps, t_t, xv)
    nisa.nc_matmul(vn_ps, wt_neg, s_h, accumulate=True)
    v_new = nl.ndarray((chunk, dv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=v_new, src=vn_ps)
    del vn_ps

    # O = e^G o (Q S) + P V'
    qs_ps = nl.ndarray((chunk, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(qs_ps, q_t, s_h)
    o_inter = nl.ndarray((chunk, dv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=o_inter, data=qs_ps, op0=nl.multiply, operand0=exp_g)
    del qs_ps
    pv_ps = nl.ndarray((chunk, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(pv_ps, p_t, v_new)
    nisa.tensor_tensor(dst=o_h, data1=pv_ps, data2=o_inter, op=nl.add)
    del pv_ps

    # S <- e^{G_C} S + (K o e^{G_C - G_j})^T V'   (decay_t[:, C-1] = e^{G_C - G_j})
    k_dec = nl.ndarray((chunk, dk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=k_dec, data=k_c, op0=nl.multiply, operand0=decay_t[:, chunk - 1:chunk])
    su_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(su_ps, k_dec, v_new)
    nisa.scalar_tensor_tensor(dst=s_h, data=s_h, op0=nl.multiply, operand0=exp_glast, op1=nl.add,
                              operand1=su_ps)


def _solve_unit_lower(a_sb, consts_sb, chunk):
    """T^T where T = (I + strict_lower(A))^-1, by recursive block doubling (exact, no growth).

    With T_s the inverse restricted to diagonal blocks of size s and A_s the entries of A in the
    (second half, first half) sub-blocks of each 2s block: T_2s = T_s - T_s A_s T_s. Each level computes
    M = A_s T_s, T_2s = T_s - T_s M and T_2s^T = T_s^T - M^T T_s^T (three fp32 matmuls).
    """
    f32 = nl.float32
    ident = consts_sb[:, _C_IDENT, :]
    at_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
    nisa.nc_transpose(dst=at_ps, data=a_sb)
    # level 0: blocks of 1 -> 2
    tmp = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=tmp, data1=a_sb, data2=consts_sb[:, _C_M1, :], op=nl.multiply)
    t_cur = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_cur, data1=ident, data2=tmp, op=nl.subtract)
    tmp_t = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=tmp_t, data1=at_ps, data2=consts_sb[:, _C_MT0, :], op=nl.multiply)
    t_t = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_t, data1=ident, data2=tmp_t, op=nl.subtract)
    n_lvl = _n_levels(chunk)
    for lvl in nl.sequential_range(1, n_lvl):
        a_off_t = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=a_off_t, data1=at_ps, data2=consts_sb[:, _C_MT0 + lvl, :], op=nl.multiply)
        m_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(m_ps, a_off_t, t_cur)                # M = A_s T_s
        m_sb = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=m_sb, src=m_ps)
        del m_ps
        if lvl + 1 < n_lvl:                                  # T itself is not needed after the last level
            x_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(x_ps, t_t, m_sb)                  # T_s M
            t_next = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=t_next, data1=t_cur, data2=x_ps, op=nl.subtract)
            del x_ps
            t_cur = t_next
        y_ps = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(y_ps, m_sb, t_t)                      # M^T T_s^T
        t_t_next = nl.ndarray((chunk, chunk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=t_t_next, data1=t_t, data2=y_ps, op=nl.subtract)
        del y_ps
        t_t = t_t_next
    return t_t


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


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
    for arg, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
        kernel_check(getattr(x, "ndim", None) == nd, f"{name}: {arg} must be {nd}-D, got "
                     f"{arg}.shape={tuple(getattr(x, 'shape', ()))}")
    bsz, seq, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    kernel_check(tuple(k.shape) == tuple(q.shape), f"{name}: k must match q [B, T, Hk, Dk], got "
                 f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    kernel_check(tuple(v.shape[:2]) == (bsz, seq), f"{name}: v must be [B={bsz}, T={seq}, Hv, Dv], "
                 f"got v.shape={tuple(v.shape)}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(tuple(x.shape) == (bsz, seq, n_hv), f"{name}: {arg} must be [B, T, Hv]="
                     f"{(bsz, seq, n_hv)}, got {arg}.shape={tuple(x.shape)}")
    kernel_check(seq >= 1, f"{name}: need at least one token, got T={seq}")
    kernel_check(n_hv % n_hk == 0, f"{name}: Hv must be a multiple of Hk, got Hv={n_hv}, Hk={n_hk}")
    kernel_check(1 <= dk <= _MAX_HEAD_DIM and 1 <= dv <= _MAX_HEAD_DIM,
                 f"{name}: head dims must be <= {_MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}")
    kernel_check(chunk_size in _CHUNK_SIZES, f"{name}: chunk_size must be one of {_CHUNK_SIZES}, "
                 f"got chunk_size={chunk_size}")
    dt = _dtype_name(q)
    kernel_check(dt in _FLOAT_DTYPES, f"{name}: q dtype must be one of {_FLOAT_DTYPES}, got {dt}")
    for arg, x in (("k", k), ("v", v)):
        kernel_check(_dtype_name(x) == dt, f"{name}: {arg} dtype must equal q's {dt}, got {_dtype_name(x)}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(_dtype_name(x) in _FLOAT_DTYPES, f"{name}: {arg} must be a float tensor, got "
                     f"{_dtype_name(x)}")
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
