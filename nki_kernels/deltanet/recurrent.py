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

# ---------------------------------------------------------------- constraints
_MAX_DECODE_TOKENS = 4            # tokens per sequence per step (MTP / speculative verify up to 4)
_MAX_HEAD_DIM = P_MAX             # Dk <= 128 partitions of the state tile; Dv <= 128 (one PSUM row)
_L2NORM_EPS = 1e-6                # transformers' l2norm eps
# rsqrt is valid on [2^-87, 2^97] on the device; rsqrt(x) = rsqrt(x * 2^-40) * 2^-20 covers fp32 sums
_RSQRT_PRESCALE = 2.0 ** -40
_RSQRT_POSTSCALE = 2.0 ** -20
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_STATE_DTYPES = ("float32", "bfloat16")


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
        for b: S = state_pool[slot_ids[b]] (dynamic DMA -> SBUF [Dk, Hv, Dv] fp32)
          load q, k as columns [Dk, T, Hk, 2]; L2 norms by a ones-matmul (sums broadcast to all partitions)
          for t, h: kS, qS = S^T k, S^T q; delta = beta (v - e^g kS); o = e^g qS + (k.q) delta;
                    S = e^g S + k delta^T
          state_pool[slot_ids[b]] = S; o[b] = rows
    """
    bsz, n_tok, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    group = n_hv // n_hk
    f32 = nl.float32
    o = nl.ndarray((bsz, n_tok, n_hv, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    ones_sb = nl.ndarray((dk, dk), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    n_th = n_tok * n_hv
    n_tk = n_tok * n_hk

    cdt = q.dtype if q.dtype == nl.bfloat16 else f32              # matmul operand dtype of k and delta
    for i_b in nl.affine_range(bsz):
        slot = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=slot, src=slot_ids.ap(pattern=[[1, 1], [1, 1]], offset=i_b))
        # one dynamic DMA per head so head 0 computes while the other heads' rows stream in
        state_sb = nl.ndarray((dk, n_hv, dv), dtype=f32, buffer=nl.sbuf)
        for i_h in nl.affine_range(n_hv):
            nisa.dma_copy(dst=state_sb[:, i_h, :], src=state_pool.ap(
                pattern=[[dv, dk], [1, dv]], offset=i_h * dk * dv, scalar_offset=slot, indirect_dim=0))
        # q, k as columns (Dk on partitions): kq[:, t, h, 0] = k, kq[:, t, h, 1] = q
        kq = nl.ndarray((dk, n_tok, n_hk, 2), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=kq[:, :, :, 0], src=k[i_b].permute((2, 0, 1)))
        nisa.dma_copy(dst=kq[:, :, :, 1], src=q[i_b].permute((2, 0, 1)))
        _normalize_columns(kq, ones_sb, scale, use_l2norm)
        # k . q per (t, hk), broadcast to every partition by a ones-matmul
        prod = nl.ndarray((dk, n_tk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=prod.reshape((dk, n_tok, n_hk)), data1=kq[:, :, :, 0], data2=kq[:, :, :, 1],
                           op=nl.multiply)
        kdotq_ps = nl.ndarray((dk, n_tk), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(kdotq_ps, ones_sb, prod)
        kdotq = nl.ndarray((dk, n_tk), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=kdotq, src=kdotq_ps)
        del kdotq_ps
        # k rows (partition 0) for the outer products: transpose of the normalised columns
        k_rows = nl.ndarray((1, n_tk, dk), dtype=cdt, buffer=nl.sbuf)
        for i_j in nl.affine_range(n_tk):
            kr_ps = nl.ndarray((1, dk), dtype=f32, buffer=nl.psum)
            nisa.nc_transpose(dst=kr_ps, data=kq[:, i_j // n_hk, i_j % n_hk, 0:1])
            nisa.activation(dst=k_rows[:, i_j, :], op=nl.copy, data=kr_ps)
        # gates broadcast over the Dk partitions: e^g, -beta e^g; beta v rows on partition 0
        g_bc = nl.ndarray((dk, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=g_bc, src=g.ap(pattern=[[0, dk], [1, n_th]], offset=i_b * n_th))
        beta_bc = nl.ndarray((dk, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=beta_bc, src=beta.ap(pattern=[[0, dk], [1, n_th]], offset=i_b * n_th))
        exp_g = nl.ndarray((dk, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=exp_g, op=nl.exp, data=g_bc)
        neg_beg = nl.ndarray((dk, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=neg_beg, data=exp_g, op0=nl.multiply, operand0=-1.0, op1=nl.multiply,
                                  operand1=beta_bc)
        v_rows = nl.ndarray((1, n_th, dv), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=v_rows, src=v[i_b].reshape((1, n_th, dv)))
        o_rows = nl.ndarray((1, n_th, dv), dtype=q.dtype, buffer=nl.sbuf)

        for i_t in nl.sequential_range(n_tok):
            # phase 1 (TensorE): S^T k and S^T q for every head, into two PSUM rows [1, Hv * Dv]
            ks_ps = nl.ndarray((1, n_hv * dv), dtype=f32, buffer=nl.psum)
            qs_ps = nl.ndarray((1, n_hv * dv), dtype=f32, buffer=nl.psum)
            for i_h in nl.affine_range(n_hv):
                i_hk = i_h // group
                nisa.nc_matmul(ks_ps[:, i_h * dv:(i_h + 1) * dv], kq[:, i_t, i_hk, 0:1], state_sb[:, i_h, :])
                nisa.nc_matmul(qs_ps[:, i_h * dv:(i_h + 1) * dv], kq[:, i_t, i_hk, 1:2], state_sb[:, i_h, :])
            # phase 2 (Vector/GpSimd): delta = beta v - beta e^g kS; o = e^g qS + (k . q) delta
            delta = nl.ndarray((1, n_hv * dv), dtype=cdt, buffer=nl.sbuf)
            for i_h in nl.affine_range(n_hv):
                i_th = i_t * n_hv + i_h
                i_tk = i_t * n_hk + i_h // group
                cols = slice(i_h * dv, (i_h + 1) * dv)
                bv = nl.ndarray((1, dv), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=bv, data=v_rows[:, i_th, :], op0=nl.multiply,
                                   operand0=beta_bc[0:1, i_th:i_th + 1], engine=nisa.engine.gpsimd)
                nisa.scalar_tensor_tensor(dst=delta[:, cols], data=ks_ps[:, cols], op0=nl.multiply,
                                          operand0=neg_beg[0:1, i_th:i_th + 1], op1=nl.add, operand1=bv)
                kq_delta = nl.ndarray((1, dv), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=kq_delta, data=delta[:, cols], op0=nl.multiply,
                                   operand0=kdotq[0:1, i_tk:i_tk + 1], engine=nisa.engine.gpsimd)
                nisa.scalar_tensor_tensor(dst=o_rows[:, i_th, :], data=qs_ps[:, cols], op0=nl.multiply,
                                          operand0=exp_g[0:1, i_th:i_th + 1], op1=nl.add, operand1=kq_delta)
            del ks_ps, qs_ps
            # phase 3 (TensorE): outer products k delta^T (K = 1); phase 4 (Vector): S = e^g S + k delta^T
            outer_ps = nl.ndarray((dk, n_hv * dv), dtype=f32, buffer=nl.psum)
            for i_h in nl.affine_range(n_hv):
                i_tk = i_t * n_hk + i_h // group
                nisa.nc_matmul(outer_ps[:, i_h * dv:(i_h + 1) * dv], k_rows[:, i_tk, :],
                               delta[:, i_h * dv:(i_h + 1) * dv])
            for i_h in nl.affine_range(n_hv):
                i_th = i_t * n_hv + i_h
                s_h = state_sb[:, i_h, :]
                nisa.scalar_tensor_tensor(dst=s_h, data=s_h, op0=nl.multiply, operand0=exp_g[:, i_th:i_th + 1],
                                          op1=nl.add, operand1=outer_ps[:, i_h * dv:(i_h + 1) * dv])
                if i_t == n_tok - 1:
                    nisa.dma_copy(dst=state_pool.ap(pattern=[[dv, dk], [1, dv]], offset=i_h * dk * dv,
                                                    scalar_offset=slot, indirect_dim=0), src=s_h)
            del outer_ps
        nisa.dma_copy(dst=o[i_b].reshape((1, n_th, dv)), src=o_rows)
    return o


def _normalize_columns(kq, ones_sb, scale, use_l2norm):
    """In place: k, q columns [Dk, T, Hk, 2] L2-normalised (if asked) and q scaled."""
    dk, n_tok, n_hk, _ = kq.shape
    f32 = nl.float32
    flat = kq.reshape((dk, n_tok * n_hk * 2))
    if use_l2norm:
        sq = nl.ndarray((dk, n_tok * n_hk * 2), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=sq, data1=flat, data2=flat, op=nl.multiply)
        ss_ps = nl.ndarray((dk, n_tok * n_hk * 2), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(ss_ps, ones_sb, sq)                  # column sums, broadcast to all partitions
        rnorm = nl.ndarray((dk, n_tok * n_hk * 2), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=rnorm, data=ss_ps, op0=nl.add, operand0=_L2NORM_EPS, op1=nl.multiply,
                           operand1=_RSQRT_PRESCALE)
        nisa.activation(dst=rnorm, op=nl.rsqrt, data=rnorm)
        nisa.tensor_tensor(dst=flat, data1=flat, data2=rnorm, op=nl.multiply)
    post = float(scale) * (_RSQRT_POSTSCALE if use_l2norm else 1.0)
    k_post = _RSQRT_POSTSCALE if use_l2norm else 1.0
    if post != 1.0:
        nisa.tensor_scalar(dst=kq[:, :, :, 1], data=kq[:, :, :, 1], op0=nl.multiply, operand0=post)
    if k_post != 1.0:
        nisa.tensor_scalar(dst=kq[:, :, :, 0], data=kq[:, :, :, 0], op0=nl.multiply, operand0=k_post)


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


def gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids, use_qk_l2norm_in_kernel=False, scale=None,
                          **kwargs):
    """Decode step(s) for B sequences: returns o [B, T, Hv, Dv]; updates state_pool[slot_ids] in place.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state_pool [N_slots, Hv, Dk, Dv] fp32 or
    bf16 (NumPy array or torch CPU tensor, modified in place); slot_ids [B] distinct ints in [0, N_slots).
    """
    name = "gated_delta_rule_step"
    for arg, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3),
                       ("state_pool", state_pool, 4)):
        kernel_check(getattr(x, "ndim", None) == nd, f"{name}: {arg} must be {nd}-D, got "
                     f"{arg}.shape={tuple(getattr(x, 'shape', ()))}")
    bsz, n_tok, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    kernel_check(tuple(k.shape) == tuple(q.shape), f"{name}: k must match q [B, T, Hk, Dk], got "
                 f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    kernel_check(tuple(v.shape[:2]) == (bsz, n_tok), f"{name}: v must be [B={bsz}, T={n_tok}, Hv, Dv], "
                 f"got v.shape={tuple(v.shape)}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(tuple(x.shape) == (bsz, n_tok, n_hv), f"{name}: {arg} must be [B, T, Hv]="
                     f"{(bsz, n_tok, n_hv)}, got {arg}.shape={tuple(x.shape)}")
    kernel_check(1 <= n_tok <= _MAX_DECODE_TOKENS, f"{name}: T must be in [1, {_MAX_DECODE_TOKENS}] tokens "
                 f"per step (use gated_delta_rule for prefill), got T={n_tok}")
    kernel_check(n_hv % n_hk == 0, f"{name}: Hv must be a multiple of Hk, got Hv={n_hv}, Hk={n_hk}")
    kernel_check(1 <= dk <= _MAX_HEAD_DIM and 1 <= dv <= _MAX_HEAD_DIM,
                 f"{name}: head dims must be <= {_MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}")
    dt = _dtype_name(q)
    kernel_check(dt in _FLOAT_DTYPES, f"{name}: q dtype must be one of {_FLOAT_DTYPES}, got {dt}")
    for arg, x in (("k", k), ("v", v)):
        kernel_check(_dtype_name(x) == dt, f"{name}: {arg} dtype must equal q's {dt}, got {_dtype_name(x)}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(_dtype_name(x) in _FLOAT_DTYPES, f"{name}: {arg} must be a float tensor, got "
                     f"{_dtype_name(x)}")
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
