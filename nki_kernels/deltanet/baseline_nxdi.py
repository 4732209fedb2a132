"""Baselines for the microbench: what Neuron users run today for Gated DeltaNet (issue 18, item 5).

Re-written from the public descriptions only (/work/shared/reference/anchors.md section 3, nxdi.md
`NeuronGatedDeltaNet`, calibration.md D1 / D2); no source was copied.

* `gdn_fused_chunked_per_head`: NxDI's default context-encoding path (`_fused_chunked_forward` calling
  `deltanet_fused_chunked_fwd` once per (batch, head)): all chunks of one (b, h) pair in one launch, chunk 128,
  the 128 x 128 fp32 state kept in SBUF across chunks, fp32 throughout, in-kernel cumsum of g by
  `tensor_tensor_scan`, the intra-chunk inverse (I + A)^-1 by a 6-round Neumann (power-doubling) product,
  lower / identity masks passed in from the host.
* `gdn_batched_decode_step`: NxDI's `deltanet_recurrent_step_batched`: one launch for all B x Hv rows, looping
  over the rows inside the kernel, each row's fp32 state read from / written to `state_pool[slot]`, the
  token update done with K = 1 outer products (the recurrent kernel's per-token column form).

Not public entry points; the optimised kernels are `gated_delta_rule` and `gated_delta_rule_step`.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..validation import kernel_check
from .baseline_sequential import per_head_launches

_CHUNK = 128                  # NxDI's fused kernel chunk (tokens on the partitions of every chunk tile)
_NEUMANN_ROUNDS = 6           # powers N^2 .. N^64 of the strictly lower N: exact inverse for a 128-token chunk
_L2NORM_EPS = 1e-6
_RSQRT_PRESCALE = 2.0 ** -40  # rsqrt valid range, see chunk.py
_RSQRT_POSTSCALE = 2.0 ** -20


def _host_masks(chunk):
    """[3, C, C] fp32: lower mask with the diagonal [j <= i], strict lower [j < i], identity (row i, col j)."""
    i, j = np.arange(chunk)[:, None], np.arange(chunk)[None, :]
    return np.stack([(j <= i), (j < i), (i == j)]).astype(np.float32)


def _rownorm(x_sb, scale, use_l2norm):
    """x [C, D] fp32 rows scaled in place by scale / ||x_row|| (eps 1e-6 on the sum of squares) or by scale."""
    rows = x_sb.shape[0]
    f32 = nl.float32
    if use_l2norm:
        sq = nl.ndarray(x_sb.shape, dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=sq, data1=x_sb, data2=x_sb, op=nl.multiply)
        ss = nl.ndarray((rows, 1), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=ss, op=nl.add, data=sq, axis=1)
        nisa.activation(dst=ss, op=nl.rsqrt, data=ss, scale=_RSQRT_PRESCALE, bias=_L2NORM_EPS * _RSQRT_PRESCALE)
        nisa.tensor_scalar(dst=x_sb, data=x_sb, op0=nl.multiply, operand0=ss, op1=nl.multiply,
                           operand1=float(scale) * _RSQRT_POSTSCALE)
    elif scale != 1.0:
        nisa.tensor_scalar(dst=x_sb, data=x_sb, op0=nl.multiply, operand0=float(scale))


def _load_f32(src, rows, shape):
    """[rows of src] -> SBUF fp32 tile of `shape` (rows beyond src are zero)."""
    f32 = nl.float32
    out = nl.ndarray(shape, dtype=f32, buffer=nl.sbuf)
    if rows < shape[0]:
        nisa.memset(dst=out, value=0.0)
    if src.dtype == f32:
        nisa.dma_copy(dst=out[0:rows], src=src)
    else:
        raw = nl.ndarray((rows,) + tuple(shape[1:]), dtype=src.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=raw, src=src)
        nisa.tensor_copy(dst=out[0:rows], src=raw)
    return out


def _transpose(x_sb):
    """[P, F] fp32 SBUF -> [F, P] fp32 SBUF (TensorE transpose, evicted by ScalarE)."""
    p, f = x_sb.shape
    t_ps = nl.ndarray((f, p), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=t_ps, data=x_sb)
    t_sb = nl.ndarray((f, p), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=t_sb, op=nl.copy, data=t_ps)
    del t_ps
    return t_sb


def _mm(st, mv, shape):
    """SBUF fp32 [M, N] = st^T @ mv (one fp32 matmul, evicted by VectorE)."""
    ps = nl.ndarray(shape, dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(ps, st, mv)
    out = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=out, src=ps)
    del ps
    return out


@nki.jit
def gdn_fused_chunked_kernel(q, k, v, g, beta, state, masks, scale, use_l2norm):
    """One (batch, v-head) pair, all chunks in one launch, fp32.

    Dimensions: T tokens, C = 128 chunk, Dk, Dv <= 128.
    Args:
        q, k: [T, Dk] @ HBM; v: [T, Dv] @ HBM; g, beta: [T] @ HBM; state: [Dk, Dv] @ HBM fp32;
        masks: [3, C, C] @ HBM fp32 (`_host_masks`).
    Returns:
        o: [T, Dv] @ HBM (q's dtype); final_state: [Dk, Dv] @ HBM fp32.
    Pseudocode, per chunk (tokens i, j on partitions / free dim, G = inclusive cumsum of g in the chunk):
        L[i, j] = e^{G_i - G_j} [j <= i];  A = strict_lower(diag(beta) (K K^T o L))
        T = (I + A)^-1 = (I - A)(I + A^2)(I + A^4) ... (I + A^64)
        W = T (beta e^G o K);  U = T (beta o V);  V' = U - W S
        O = e^G o (Q S) + (Q K^T o L) V';  S = e^{G_C} S + (K o e^{G_C - G_j})^T V'
    """
    seq, dk = q.shape
    dv = v.shape[1]
    c = _CHUNK
    f32 = nl.float32
    o = nl.ndarray((seq, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    final_state = nl.ndarray((dk, dv), dtype=f32, buffer=nl.shared_hbm)
    s_sb = nl.ndarray((dk, dv), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=s_sb, src=state)
    masks_sb = nl.ndarray((c, 3, c), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=masks_sb, src=masks.permute((1, 0, 2)))
    lower, strict, ident = masks_sb[:, 0, :], masks_sb[:, 1, :], masks_sb[:, 2, :]
    ones_sb = nl.ndarray((1, c), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    for t0 in range(0, seq, c):
        n = min(c, seq - t0)
        q_sb = _load_f32(q[t0:t0 + n], n, (c, dk))
        k_sb = _load_f32(k[t0:t0 + n], n, (c, dk))
        v_sb = _load_f32(v[t0:t0 + n], n, (c, dv))
        beta_col = _load_f32(beta[t0:t0 + n].reshape((n, 1)), n, (c, 1))
        g_row = nl.ndarray((1, c), dtype=f32, buffer=nl.sbuf)     # g along the free dim of one partition
        if n < c:
            nisa.memset(dst=g_row, value=0.0)
        nisa.tensor_copy(dst=g_row[:, 0:n], src=_load_f32(g[t0:t0 + n].reshape((1, n)), 1, (1, n)))
        _rownorm(q_sb, scale, use_l2norm)
        _rownorm(k_sb, 1.0, use_l2norm)
        # inclusive cumsum of g along the chunk (free dim of one partition), as a column and broadcast rows
        zero_row = nl.ndarray((1, c), dtype=f32, buffer=nl.sbuf)
        nisa.memset(dst=zero_row, value=0.0)
        cum_row = nl.ndarray((1, c), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst=cum_row, data0=zero_row, data1=g_row, initial=0.0, op0=nl.add, op1=nl.add)
        gbc = _mm(ones_sb, cum_row, (c, c))                      # gbc[i, j] = G_j
        gcol = _mm(cum_row, ones_sb[:, 0:1], (c, 1))             # gcol[i] = G_i
        dmat = nl.ndarray((c, c), dtype=f32, buffer=nl.sbuf)     # min(G_i - G_j, 0), then e^ and the mask
        nisa.tensor_scalar(dst=dmat, data=gbc, op0=nl.subtract, operand0=gcol, reverse0=True, op1=nl.minimum,
                           operand1=0.0)
        nisa.activation(dst=dmat, op=nl.exp, data=dmat)
        decay = nl.ndarray((c, c), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=decay, data1=dmat, data2=lower, op=nl.multiply)
        exp_g = nl.ndarray((c, 1), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=exp_g, op=nl.exp, data=gcol)
        dec_last = nl.ndarray((c, 1), dtype=f32, buffer=nl.sbuf)   # e^{G_C - G_j}
        nisa.tensor_tensor(dst=dec_last, data1=gbc[:, c - 1:c], data2=gcol, op=nl.subtract)
        nisa.activation(dst=dec_last, op=nl.exp, data=dec_last)
        exp_glast = nl.ndarray((dk, 1), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=exp_glast, op=nl.exp, data=gbc[0:dk, c - 1:c])
        k_t, q_t = _transpose(k_sb), _transpose(q_sb)            # [Dk, C]
        # A = strict_lower(beta_i (K K^T)_ij L_ij); N = -A
        kk_ps = nl.ndarray((c, c), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(kk_ps, k_t, k_t)
        neg_a = nl.ndarray((c, c), dtype=f32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=neg_a, data=kk_ps, op0=nl.multiply, operand0=beta_col, op1=nl.multiply,
                                  operand1=decay)
        del kk_ps
        nisa.scalar_tensor_tensor(dst=neg_a, data=neg_a, op0=nl.multiply, operand0=-1.0, op1=nl.multiply,
                                  operand1=strict)
        t_row = _neumann_inverse(neg_a, ident, c)                # T^T, [C, C]
        # W^T-free form: V' = T (beta V) - T (beta e^G K) S, with T applied once: V' = T (beta V - (beta e^G K) S)
        xk = nl.ndarray((c, dk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=xk, data=k_sb, op0=nl.multiply, operand0=beta_col, op1=nl.multiply,
                           operand1=exp_g)
        xv = nl.ndarray((c, dv), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=xv, data=v_sb, op0=nl.multiply, operand0=beta_col)
        w_sb = _mm(t_row, xk, (c, dk))                           # W = T xk
        u_sb = _mm(t_row, xv, (c, dv))                           # U = T xv
        w_t = _transpose(w_sb)                                   # [Dk, C]
        ws_ps = nl.ndarray((c, dv), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(ws_ps, w_t, s_sb)
        v_new = nl.ndarray((c, dv), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=v_new, data1=u_sb, data2=ws_ps, op=nl.subtract)
        del ws_ps
        # O = e^G o (Q S) + (Q K^T o L) V'
        qs_ps = nl.ndarray((c, dv), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(qs_ps, q_t, s_sb)
        qs_sb = nl.ndarray((c, dv), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=qs_sb, data=qs_ps, op0=nl.multiply, operand0=exp_g)
        del qs_ps
        qk_ps = nl.ndarray((c, c), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(qk_ps, q_t, k_t)
        p_sb = nl.ndarray((c, c), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=p_sb, data1=qk_ps, data2=decay, op=nl.multiply)
        del qk_ps
        p_t = _transpose(p_sb)
        pv_ps = nl.ndarray((c, dv), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(pv_ps, p_t, v_new)
        o_sb = nl.ndarray((c, dv), dtype=q.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o_sb, data1=pv_ps, data2=qs_sb, op=nl.add)
        del pv_ps
        nisa.dma_copy(dst=o[t0:t0 + n], src=o_sb[0:n])
        # S = e^{G_C} S + (K o e^{G_C - G_j})^T V'
        k_dec = nl.ndarray((c, dk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=k_dec, data=k_sb, op0=nl.multiply, operand0=dec_last)
        su_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(su_ps, k_dec, v_new)
        nisa.scalar_tensor_tensor(dst=s_sb, data=s_sb, op0=nl.multiply, operand0=exp_glast, op1=nl.add,
                                  operand1=su_ps)
        del su_ps
    nisa.dma_copy(dst=final_state, src=s_sb)
    return o, final_state


def _neumann_inverse(neg_a, ident, c):
    """T^T for T = (I + A)^-1 = (I + N)(I + N^2)(I + N^4) ... (N = -A strictly lower, nilpotent: exact after
    _NEUMANN_ROUNDS squarings for C = 128). Keeps N^p and its transpose, T and its transpose (out = st^T mv)."""
    f32 = nl.float32
    p_row, p_t = neg_a, _transpose(neg_a)
    t_row = nl.ndarray((c, c), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_row, data1=ident, data2=neg_a, op=nl.add)          # T = I + N
    t_t = nl.ndarray((c, c), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=t_t, data1=ident, data2=p_t, op=nl.add)
    for _ in range(_NEUMANN_ROUNDS):
        p_row, p_t = _mm(p_t, p_row, (c, c)), _mm(p_row, p_t, (c, c))           # N^2p and its transpose
        tp_ps = nl.ndarray((c, c), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(tp_ps, t_t, p_row)                                       # T N^2p
        tpt_ps = nl.ndarray((c, c), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(tpt_ps, p_row, t_t)                                      # (T N^2p)^T
        nisa.tensor_tensor(dst=t_row, data1=t_row, data2=tp_ps, op=nl.add)
        nisa.tensor_tensor(dst=t_t, data1=t_t, data2=tpt_ps, op=nl.add)
        del tp_ps, tpt_ps
    return t_t


def gdn_fused_chunked_per_head(q, k, v, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False, scale=None):
    """Baseline host loop: one `gdn_fused_chunked_kernel` launch per (batch, v-head) pair (NxDI's CTE default).
    Same layouts as `gated_delta_rule`; returns (o, final_state)."""
    return per_head_launches(gdn_fused_chunked_kernel, q, k, v, g, beta, initial_state, use_qk_l2norm_in_kernel,
                             scale, extra_args=(_host_masks(_CHUNK),))


@nki.jit
def gdn_batched_decode_step_kernel(q, k, v, g, beta, state_pool, slot_ids, scale, use_l2norm):
    """All B x Hv rows of one decode token in one launch, looping over the rows (fp32).

    Dimensions: B batch, Hk q/k heads, Hv v heads (v head h reads q/k head h // (Hv / Hk)), Dk, Dv <= 128.
    Args:
        q, k: [B, Hk, Dk] @ HBM; v: [B, Hv, Dv] @ HBM; g, beta: [B, Hv] @ HBM;
        state_pool: [N, Hv, Dk, Dv] @ HBM fp32, rows slot_ids[b] read and rewritten in place;
        slot_ids: [B] @ HBM int32 in [0, N) (clamped in-kernel).
    Returns:
        o: [B, Hv, Dv] @ HBM (q's dtype).
    Pseudocode, per (b, h): S = state_pool[slot_b, h]; S = e^g S; delta = beta (v - S^T k); S += k delta^T;
        o = S^T q; state_pool[slot_b, h] = S.
    """
    bsz, n_hk, dk = q.shape
    n_hv, dv = v.shape[1], v.shape[2]
    group = n_hv // n_hk
    f32 = nl.float32
    o = nl.ndarray((bsz, n_hv, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    ones_sb = nl.ndarray((dk, dk), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    slot_sb = nl.ndarray((1, bsz), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=slot_sb, src=slot_ids.ap(pattern=[[bsz, 1], [1, bsz]], offset=0))
    nisa.tensor_scalar(dst=slot_sb, data=slot_sb, op0=nl.maximum, operand0=0, op1=nl.minimum,
                       operand1=state_pool.shape[0] - 1)
    for i_b in range(bsz):
        for i_h in range(n_hv):
            i_k = i_h // group
            rows = state_pool.ap(pattern=[[dv, dk], [1, dv]], offset=i_h * dk * dv,
                                 scalar_offset=slot_sb[0:1, i_b:i_b + 1], indirect_dim=0)
            s_sb = nl.ndarray((dk, dv), dtype=f32, buffer=nl.sbuf)
            nisa.dma_copy(dst=s_sb, src=rows)
            # k, q as columns [Dk, 2] (fp32), k also as a row [1, Dk]; g, beta broadcast to the Dk partitions
            kq_col = nl.ndarray((dk, 2), dtype=f32, buffer=nl.sbuf)
            for i_x, x in enumerate((k, q)):
                raw = nl.ndarray((dk, 1), dtype=x.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=raw, src=x.ap(pattern=[[1, dk], [1, 1]], offset=(i_b * n_hk + i_k) * dk))
                nisa.tensor_copy(dst=kq_col[:, i_x:i_x + 1], src=raw)
            k_row = _load_f32(k[i_b, i_k].reshape((1, dk)), 1, (1, dk))
            v_row = _load_f32(v[i_b, i_h].reshape((1, dv)), 1, (1, dv))
            gb = nl.ndarray((dk, 2), dtype=f32, buffer=nl.sbuf)
            for i_x, x in enumerate((g, beta)):
                raw = nl.ndarray((dk, 1), dtype=x.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=raw, src=x.ap(pattern=[[0, dk], [1, 1]], offset=i_b * n_hv + i_h))
                nisa.tensor_copy(dst=gb[:, i_x:i_x + 1], src=raw)
            fac = nl.ndarray((dk, 2), dtype=f32, buffer=nl.sbuf)              # (k, q) scale factors
            if use_l2norm:
                sq = nl.ndarray((dk, 2), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=sq, data1=kq_col, data2=kq_col, op=nl.multiply)
                ss_ps = nl.ndarray((dk, 2), dtype=f32, buffer=nl.psum)
                nisa.nc_matmul(ss_ps, ones_sb, sq)                            # column sums on every partition
                nisa.activation(dst=fac, op=nl.rsqrt, data=ss_ps, scale=_RSQRT_PRESCALE,
                                bias=_L2NORM_EPS * _RSQRT_PRESCALE)
                nisa.tensor_scalar(dst=fac, data=fac, op0=nl.multiply, operand0=_RSQRT_POSTSCALE)
                del ss_ps
            else:
                nisa.memset(dst=fac, value=1.0)
            nisa.tensor_scalar(dst=fac[:, 1:2], data=fac[:, 1:2], op0=nl.multiply, operand0=float(scale))
            nisa.tensor_tensor(dst=kq_col, data1=kq_col, data2=fac, op=nl.multiply)
            nisa.tensor_scalar(dst=k_row, data=k_row, op0=nl.multiply, operand0=fac[0:1, 0:1])
            eg = nl.ndarray((dk, 1), dtype=f32, buffer=nl.sbuf)
            nisa.activation(dst=eg, op=nl.exp, data=gb[:, 0:1])
            nisa.tensor_scalar(dst=s_sb, data=s_sb, op0=nl.multiply, operand0=eg)
            ks_ps = nl.ndarray((1, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(ks_ps, kq_col[:, 0:1], s_sb)                       # S^T k
            delta = nl.ndarray((1, dv), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=delta, data1=v_row, data2=ks_ps, op=nl.subtract)
            nisa.tensor_scalar(dst=delta, data=delta, op0=nl.multiply, operand0=gb[0:1, 1:2])
            del ks_ps
            outer_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(outer_ps, k_row, delta)                            # k delta^T (K = 1)
            nisa.tensor_tensor(dst=s_sb, data1=s_sb, data2=outer_ps, op=nl.add)
            del outer_ps
            o_ps = nl.ndarray((1, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(o_ps, kq_col[:, 1:2], s_sb)                        # S^T q
            o_sb = nl.ndarray((1, dv), dtype=q.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=o_sb, src=o_ps)
            del o_ps
            nisa.dma_copy(dst=o[i_b, i_h:i_h + 1], src=o_sb)
            nisa.dma_copy(dst=rows, src=s_sb)
    return o


def gdn_batched_decode_step(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False,
                            scale=None):
    """Decode baseline: one launch for all (b, h) rows of one token (NxDI's batched recurrent step).
    q, k [B, 1, Hk, Dk]; v [B, 1, Hv, Dv]; g, beta [B, 1, Hv]; state_pool [N, Hv, Dk, Dv] fp32 updated in place
    at rows slot_ids (None: rows 0 .. B-1). Returns o [B, 1, Hv, Dv]."""
    bsz, n_tok, n_hk, dk = q.shape
    kernel_check(n_tok == 1, f"gdn_batched_decode_step: T must be 1 (one token per sequence), got T={n_tok}")
    slots = np.arange(bsz, dtype=np.int32) if slot_ids is None else np.asarray(slot_ids, dtype=np.int32)
    sc = float(dk ** -0.5 if scale is None else scale)
    pool = np.ascontiguousarray(state_pool, dtype=np.float32)
    o = call(gdn_batched_decode_step_kernel, np.ascontiguousarray(q[:, 0]), np.ascontiguousarray(k[:, 0]),
             np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(g[:, 0]), np.ascontiguousarray(beta[:, 0]), pool,
             slots, scale=sc, use_l2norm=bool(use_qk_l2norm_in_kernel), lnc=1, inplace=("state_pool",))
    state_pool[...] = pool.astype(state_pool.dtype)
    return np.asarray(o)[:, None]
