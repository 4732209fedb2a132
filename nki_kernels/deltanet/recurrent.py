"""Gated delta rule decode step: B sequences x 1..4 tokens x all heads in one launch, state pool in place.

Each sequence b reads its state rows `state_pool[slot_ids[b]]` ([Hv, Dk, Dv]) with one dynamic DMA
(scalar_offset = the slot id, runtime data), runs the token recurrence on TensorE/VectorE with an fp32
state in SBUF (Dk on the partitions), and writes the rows back in the pool's dtype (fp32 or bf16).

Per token and v-head (S [Dk, Dv] before the token, k, q already normalised/scaled):
    kS = S^T k, qS = S^T q                       (two 1-row matmuls)
    delta = beta (v - e^g kS)
    o = e^g qS + (k . q) delta                   (= S_new^T q)
    S = e^g S + k delta^T                        (outer product by a K=1 matmul, fused decay + add)
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..validation import kernel_check
from ._checks import check_qkv_gate_layouts
from ._checks import dtype_name as _dtype_name

# ---------------------------------------------------------------- constraints
_MAX_DECODE_TOKENS = 4            # tokens per sequence per step (MTP / speculative verify up to 4)
_MAX_HEAD_DIM = P_MAX             # Dk <= 128 partitions of the state tile; Dv <= 128 (one PSUM row)
_L2NORM_EPS = 1e-6                # transformers' l2norm eps
# rsqrt is valid on [2^-87, 2^97] on the device; rsqrt(x) = rsqrt(x * 2^-40) * 2^-20 covers fp32 sums
_RSQRT_PRESCALE = 2.0 ** -40
_RSQRT_POSTSCALE = 2.0 ** -20
_STATE_DTYPES = ("float32", "bfloat16")
_OUTER_BANK_HEADS = 4             # [Dk, Dv] fp32 outer products per PSUM bank (4 x 512 B = 2 KiB)


@nki.jit
def gated_delta_rule_step_kernel(q, k, v, g, beta, state_pool, slot_ids, scale, use_l2norm):
    """Decode step for B sequences, all heads, updating `state_pool[slot_ids]` in place.

    Dimensions:
        B batch, T new tokens per sequence (1..4), Hk q/k heads, Hv v heads (Hv % Hk == 0),
        Dk key dim (<= 128), Dv value dim (<= 128), N_slots rows of the state pool.
    Args:
        q: [B, T, Hk, Dk] @ HBM; k: [B, T, Hk, Dk] @ HBM; v: [B, T, Hv, Dv] @ HBM (same float dtype).
        g: [B, T, Hv] @ HBM log-decay <= 0; beta: [B, T, Hv] @ HBM in [0, 1].
        state_pool: [N_slots, Hv, Dk, Dv] @ HBM, fp32 or bf16; rows slot_ids[b] are read and rewritten.
        slot_ids: [B] @ HBM int32, distinct, in [0, N_slots).
        scale, use_l2norm: trace-time constants (q scale, in-kernel L2 norm of q and k).
    Returns:
        o: [B, T, Hv, Dv] @ HBM in q's dtype.
    Constraints:
        T <= _MAX_DECODE_TOKENS; Dk, Dv <= _MAX_HEAD_DIM.
    Pseudocode:
        for b (inputs double-buffered: b + 1's loads are issued before b computes):
          S[h] = state_pool[slot_ids[b], h] (one dynamic DMA per head -> SBUF [Dk, Hv, Dv] fp32)
          k, q as columns [Dk, T, Hv, 2] (k/q head h // (Hv/Hk) per v head); L2 norms by a ones-matmul
          for t: [S^T k | S^T q] columns for all heads (S stationary, [k q] moving) -> PSUM [Dv, Hv, 2]
                 delta = beta (v - e^g S^T k), o = e^g S^T q + (k.q) delta   (all heads, [Dv, Hv] tiles)
                 S[h] = e^g S[h] + k_h delta_h^T   (K = 1 matmul from the transposed rows, fused decay + add)
          state_pool[slot_ids[b]] = S (per head, as soon as it is final); o[b] = columns
    """
    bsz, n_tok, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    group = n_hv // n_hk
    f32 = nl.float32
    cdt = q.dtype if q.dtype == nl.bfloat16 else f32              # outer-product operand dtype
    n_th = n_tok * n_hv
    pmax = max(dk, dv)
    o = nl.ndarray((bsz, n_tok, n_hv, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    ones_sb = nl.ndarray((dk, pmax), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    # 0/1 selection matrices: sel[j, t, hk, g] = [j == t Hk + hk] turns contiguous q/k rows [T Hk, Dk] into
    # per-v-head columns [Dk, T Hv] with one matmul; ident_v turns v rows [T Hv, Dv] into columns
    ldt = q.dtype if q.dtype == nl.bfloat16 else f32
    n_tk = n_tok * n_hk
    ones_sel = nl.ndarray((n_th, n_th), dtype=ldt, buffer=nl.sbuf)
    nisa.memset(dst=ones_sel, value=1.0)
    sel = nl.ndarray((n_tk, n_tok, n_hk, group), dtype=ldt, buffer=nl.sbuf)
    nisa.affine_select(dst=sel, pattern=[[n_hk, n_tok], [1, n_hk], [0, group]], offset=0, channel_multiplier=-1,
                       on_true_tile=ones_sel[0:n_tk].reshape((n_tk, n_tok, n_hk, group)), on_false_value=0.0,
                       cmp_op=nl.equal)
    ident_v = nl.ndarray((n_th, n_th), dtype=ldt, buffer=nl.sbuf)
    nisa.affine_select(dst=ident_v, pattern=[[1, n_th]], offset=0, channel_multiplier=-1, on_true_tile=ones_sel,
                       on_false_value=0.0, cmp_op=nl.equal)

    # double-buffered inputs: the loads of sequence b + 1 are issued before sequence b computes, so its
    # state rows stream in while b runs and b's write-back does not hold up b + 1's loads
    n_buf = 2 if bsz > 1 else 1
    slot2 = nl.ndarray((1, n_buf), dtype=nl.int32, buffer=nl.sbuf)
    k_rows2 = nl.ndarray((n_tk, n_buf, dk), dtype=ldt, buffer=nl.sbuf)
    q_rows2 = nl.ndarray((n_tk, n_buf, dk), dtype=ldt, buffer=nl.sbuf)
    v_rows2 = nl.ndarray((n_th, n_buf, dv), dtype=ldt, buffer=nl.sbuf)
    g_bc2 = nl.ndarray((pmax, n_buf, n_th), dtype=f32, buffer=nl.sbuf)
    beta_bc2 = nl.ndarray((pmax, n_buf, n_th), dtype=f32, buffer=nl.sbuf)
    state2 = nl.ndarray((dk, n_buf, n_hv, dv), dtype=f32, buffer=nl.sbuf)
    bufs = (slot2, k_rows2, q_rows2, v_rows2, g_bc2, beta_bc2, state2)
    _load_sequence(q, k, v, g, beta, state_pool, slot_ids, 0, 0, bufs)
    for i_b in nl.sequential_range(bsz):
        if i_b + 1 < bsz:
            _load_sequence(q, k, v, g, beta, state_pool, slot_ids, i_b + 1, (i_b + 1) % n_buf, bufs)
        j = i_b % n_buf
        slot = slot2[0:1, j:j + 1]
        k_rows_in, q_rows_in, v_rows_in = k_rows2[:, j, :], q_rows2[:, j, :], v_rows2[:, j, :]
        g_bc, beta_bc, state_sb = g_bc2[:, j, :], beta_bc2[:, j, :], state2[:, j]
        # k, q columns per v head (Dk on partitions), transposed and head-expanded by one matmul each
        kq_ps = nl.ndarray((dk, 2, n_th), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(kq_ps[:, 0, :], k_rows_in, sel.reshape((n_tk, n_th)))
        nisa.nc_matmul(kq_ps[:, 1, :], q_rows_in, sel.reshape((n_tk, n_th)))
        kq = nl.ndarray((dk, 2, n_tok, n_hv), dtype=f32, buffer=nl.sbuf)    # [:, 0] = k, [:, 1] = q
        _normalize_columns(kq, kq_ps, ones_sb, scale, use_l2norm)
        del kq_ps
        vcol_ps = nl.ndarray((dv, n_th), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(vcol_ps, v_rows_in, ident_v)
        exp_g = nl.ndarray((pmax, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=exp_g, op=nl.exp, data=g_bc)
        beta_exp_g = nl.ndarray((dv, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=beta_exp_g, data1=exp_g[0:dv], data2=beta_bc[0:dv], op=nl.multiply,
                           engine=nisa.engine.gpsimd)
        beta_v = nl.ndarray((dv, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=beta_v, data1=vcol_ps, data2=beta_bc[0:dv], op=nl.multiply)
        del vcol_ps
        # k . q per (t, h), broadcast to every partition by a ones-matmul
        prod = nl.ndarray((dk, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=prod.reshape((dk, n_tok, n_hv)), data1=kq[:, 0], data2=kq[:, 1],
                           op=nl.multiply, engine=nisa.engine.gpsimd)
        kdotq_ps = nl.ndarray((dv, n_th), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(kdotq_ps, ones_sb[:, 0:dv], prod)
        kdotq = nl.ndarray((dv, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=kdotq, op=nl.copy, data=kdotq_ps)
        del kdotq_ps
        o_cols = nl.ndarray((dv, n_th), dtype=q.dtype, buffer=nl.sbuf)

        for i_t in nl.sequential_range(n_tok):
            ths = slice(i_t * n_hv, (i_t + 1) * n_hv)
            # k rows of this token (v head h on partition h), for the K = 1 outer products
            kr_ps = nl.ndarray((n_hv, dk), dtype=f32, buffer=nl.psum)
            nisa.nc_transpose(dst=kr_ps, data=kq[:, 0, i_t, :])
            k_rows = nl.ndarray((n_hv, dk), dtype=cdt, buffer=nl.sbuf)
            nisa.activation(dst=k_rows, op=nl.copy, data=kr_ps)
            del kr_ps
            # [S^T k | S^T q] for every head: S stationary (M = Dv), [k q] moving (N = 2)
            sk_ps = nl.ndarray((dv, n_hv, 2), dtype=f32, buffer=nl.psum)
            for i_h in nl.affine_range(n_hv):
                nisa.nc_matmul(sk_ps[:, i_h, :], state_sb[:, i_h, :], kq[:, :, i_t, i_h])
            # delta = beta v - beta e^g S^T k;  o = e^g S^T q + (k . q) delta   ([Dv, Hv] tiles, all heads)
            dec_ks = nl.ndarray((dv, n_hv), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=dec_ks, data1=sk_ps[:, :, 0], data2=beta_exp_g[:, ths], op=nl.multiply)
            delta = nl.ndarray((dv, n_hv), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=delta, data1=beta_v[:, ths], data2=dec_ks, op=nl.subtract)
            dec_qs = nl.ndarray((dv, n_hv), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=dec_qs, data1=sk_ps[:, :, 1], data2=exp_g[0:dv, ths], op=nl.multiply)
            del sk_ps
            kq_delta = nl.ndarray((dv, n_hv), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=kq_delta, data1=delta, data2=kdotq[:, ths], op=nl.multiply,
                               engine=nisa.engine.gpsimd)
            nisa.tensor_tensor(dst=o_cols[:, ths], data1=dec_qs, data2=kq_delta, op=nl.add,
                               engine=nisa.engine.gpsimd)
            # delta rows (head h on partition h) for the outer products
            dr_ps = nl.ndarray((n_hv, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_transpose(dst=dr_ps, data=delta)
            d_rows = nl.ndarray((n_hv, dv), dtype=cdt, buffer=nl.sbuf)
            nisa.activation(dst=d_rows, op=nl.copy, data=dr_ps)
            del dr_ps
            # S[h] = e^g S[h] + k_h delta_h^T; each head's rows written back as soon as they are final
            outer_ps = nl.ndarray((dk, _OUTER_BANK_HEADS, dv), dtype=f32, buffer=nl.psum)
            for i_h in nl.affine_range(n_hv):
                i_th = i_t * n_hv + i_h
                slot_ps = outer_ps[:, i_h % _OUTER_BANK_HEADS, :]
                nisa.nc_matmul(slot_ps, k_rows[i_h:i_h + 1, :], d_rows[i_h:i_h + 1, :], accumulate=False)
                s_h = state_sb[:, i_h, :]
                nisa.scalar_tensor_tensor(dst=s_h, data=s_h, op0=nl.multiply, operand0=exp_g[0:dk, i_th:i_th + 1],
                                          op1=nl.add, operand1=slot_ps)
                if i_t == n_tok - 1:
                    nisa.dma_copy(dst=state_pool.ap(pattern=[[dv, dk], [1, dv]], offset=i_h * dk * dv,
                                                    scalar_offset=slot, indirect_dim=0), src=s_h)
            del outer_ps
        nisa.dma_copy(dst=o.ap(pattern=[[1, dv], [dv, n_th]], offset=i_b * n_th * dv), src=o_cols)
    return o


def _load_sequence(q, k, v, g, beta, state_pool, slot_ids, i_b, j, bufs):
    """Issue the loads of sequence i_b into buffer j: slot id, contiguous q/k/v rows, g/beta broadcast over
    the partitions, then one dynamic DMA per head of state_pool[slot_ids[i_b]]."""
    slot2, k_rows2, q_rows2, v_rows2, g_bc2, beta_bc2, state2 = bufs
    n_tok, n_hk, dk = q.shape[1], q.shape[2], q.shape[3]
    n_hv, dv = v.shape[2], v.shape[3]
    n_th, n_tk = n_tok * n_hv, n_tok * n_hk
    pmax = g_bc2.shape[0]
    slot = slot2[0:1, j:j + 1]
    nisa.dma_copy(dst=slot, src=slot_ids.ap(pattern=[[1, 1], [1, 1]], offset=i_b))
    nisa.dma_copy(dst=k_rows2[:, j, :], src=k[i_b].reshape((n_tk, dk)))
    nisa.dma_copy(dst=q_rows2[:, j, :], src=q[i_b].reshape((n_tk, dk)))
    nisa.dma_copy(dst=v_rows2[:, j, :], src=v[i_b].reshape((n_th, dv)))
    nisa.dma_copy(dst=g_bc2[:, j, :], src=g.ap(pattern=[[0, pmax], [1, n_th]], offset=i_b * n_th))
    nisa.dma_copy(dst=beta_bc2[:, j, :], src=beta.ap(pattern=[[0, pmax], [1, n_th]], offset=i_b * n_th))
    for i_h in nl.affine_range(n_hv):
        nisa.dma_copy(dst=state2[:, j, i_h, :], src=state_pool.ap(
            pattern=[[dv, dk], [1, dv]], offset=i_h * dk * dv, scalar_offset=slot, indirect_dim=0))


def _normalize_columns(kq, kq_ps, ones_sb, scale, use_l2norm):
    """kq [Dk, 2, T, H] (SBUF) = the columns kq_ps [Dk, 2, T H] (PSUM; k then q), L2-normalised if asked,
    q scaled: x * rsqrt(sum x^2 + eps) = x * 2^-20 * rsqrt((sum x^2 + eps) 2^-40)."""
    dk = kq.shape[0]
    width = kq_ps.shape[2]
    f32 = nl.float32
    post = _RSQRT_POSTSCALE if use_l2norm else 1.0
    if use_l2norm:
        sq = nl.ndarray((dk, 2 * width), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=sq, op=nl.square, data=kq_ps.reshape((dk, 2 * width)))
        ss_ps = nl.ndarray((dk, 2 * width), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(ss_ps, ones_sb[:, 0:dk], sq)          # column sums, broadcast to all partitions
        rnorm = nl.ndarray((dk, 2, width), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=rnorm.reshape((dk, 2 * width)), op=nl.rsqrt, data=ss_ps, scale=_RSQRT_PRESCALE,
                        bias=_L2NORM_EPS * _RSQRT_PRESCALE)
        for i_x, factor in ((0, post), (1, post * float(scale))):
            nisa.scalar_tensor_tensor(dst=kq[:, i_x].reshape((dk, width)), data=kq_ps[:, i_x, :], op0=nl.multiply,
                                      operand0=factor, op1=nl.multiply, operand1=rnorm[:, i_x, :])
    else:
        nisa.activation(dst=kq[:, 0].reshape((dk, width)), op=nl.copy, data=kq_ps[:, 0, :])
        nisa.activation(dst=kq[:, 1].reshape((dk, width)), op=nl.copy, data=kq_ps[:, 1, :], scale=float(scale))



def gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids, use_qk_l2norm_in_kernel=False, scale=None,
                          **kwargs):
    """Decode step(s) for B sequences: returns o [B, T, Hv, Dv]; updates state_pool[slot_ids] in place.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state_pool [N_slots, Hv, Dk, Dv] fp32 or
    bf16 (NumPy array or torch CPU tensor, modified in place); slot_ids [B] distinct ints in [0, N_slots).
    """
    name = "gated_delta_rule_step"
    bsz, n_tok, n_hk, dk, n_hv, dv = check_qkv_gate_layouts(name, q, k, v, g, beta,
                                                           extra=(("state_pool", state_pool, 4),))
    kernel_check(1 <= n_tok <= _MAX_DECODE_TOKENS, f"{name}: T must be in [1, {_MAX_DECODE_TOKENS}] tokens "
                 f"per step (use gated_delta_rule for prefill), got T={n_tok}")
    n_slots = state_pool.shape[0]
    kernel_check(tuple(state_pool.shape[1:]) == (n_hv, dk, dv), f"{name}: state_pool must be "
                 f"[N_slots, Hv, Dk, Dv]=[N, {n_hv}, {dk}, {dv}], got {tuple(state_pool.shape)}")
    kernel_check(_dtype_name(state_pool) in _STATE_DTYPES, f"{name}: state_pool dtype must be one of "
                 f"{_STATE_DTYPES}, got {_dtype_name(state_pool)}")
    slots = np.asarray(slot_ids.cpu() if hasattr(slot_ids, "cpu") else slot_ids)
    kernel_check(slots.shape == (bsz,) and np.issubdtype(slots.dtype, np.integer),
                 f"{name}: slot_ids must be [B]={bsz} integers, got shape {slots.shape} dtype {slots.dtype}")
    kernel_check(bool(np.all((slots >= 0) & (slots < n_slots))),
                 f"{name}: slot_ids must be in [0, N_slots={n_slots}), got {slots.tolist()}")
    kernel_check(np.unique(slots).size == slots.size,
                 f"{name}: slot_ids must be distinct (each sequence owns its state row), got {slots.tolist()}")
    sc = float(dk ** -0.5 if scale is None else scale)
    return call(gated_delta_rule_step_kernel, q, k, v, g, beta, state_pool, slots.astype(np.int32),
                scale=sc, use_l2norm=bool(use_qk_l2norm_in_kernel))
