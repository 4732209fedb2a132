"""Baseline for the microbench: the token-sequential gated delta rule, one launch per (batch, v-head).

This is the approach of the existing Neuron kernels (anchors.md section 3: one (B, H) pair per call,
token by token, fp32 state in SBUF). It serves both as the prefill baseline (T tokens from a zero or given
state) and, with T = 1 and the state row passed in, as the per-(batch, head) decode-step baseline.
Not a public entry point; the optimised kernels are `gated_delta_rule` and `gated_delta_rule_step`.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl

_TOKEN_BLOCK = 128            # tokens whose v / o rows are staged on partition 0 at a time (SBUF budget)
_NORM_BLOCK = 512             # columns per ones-matmul of the L2 norm (one fp32 PSUM bank)
_L2NORM_EPS = 1e-6
_RSQRT_PRESCALE = 2.0 ** -40  # rsqrt valid range, see chunk.py
_RSQRT_POSTSCALE = 2.0 ** -20


@nki.jit
def gdn_token_sequential_kernel(q, k, v, g, beta, state, scale, use_l2norm):
    """One (batch, v-head) pair, token by token.

    Dimensions: T tokens, Dk, Dv <= 128.
    Args:
        q, k: [T, Dk] @ HBM; v: [T, Dv] @ HBM; g, beta: [T] @ HBM; state: [Dk, Dv] @ HBM fp32.
    Returns:
        o: [T, Dv] @ HBM (q's dtype); final_state: [Dk, Dv] @ HBM fp32.
    Constraints: Dk, Dv <= 128.
    Pseudocode:
        for t: S = e^g S; kS = S^T k; delta = beta (v - kS); S += k delta^T; o_t = S^T q
    """
    seq, dk = q.shape
    dv = v.shape[1]
    f32 = nl.float32
    o = nl.ndarray((seq, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    final_state = nl.ndarray((dk, dv), dtype=f32, buffer=nl.shared_hbm)
    s_sb = nl.ndarray((dk, dv), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=s_sb, src=state)
    ones_sb = nl.ndarray((dk, dk), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    k_cols = nl.ndarray((dk, seq), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=k_cols, src=k.permute((1, 0)))
    q_cols = nl.ndarray((dk, seq), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=q_cols, src=q.permute((1, 0)))
    for x_cols, post in ((k_cols, 1.0), (q_cols, float(scale))):
        for c0 in range(0, seq, _NORM_BLOCK):
            n = min(_NORM_BLOCK, seq - c0)
            blk = x_cols[:, c0:c0 + n]
            if use_l2norm:
                sq = nl.ndarray((dk, _NORM_BLOCK), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=sq[:, 0:n], data1=blk, data2=blk, op=nl.multiply)
                ss_ps = nl.ndarray((dk, _NORM_BLOCK), dtype=f32, buffer=nl.psum)
                nisa.nc_matmul(ss_ps[:, 0:n], ones_sb, sq[:, 0:n])
                rn = nl.ndarray((dk, _NORM_BLOCK), dtype=f32, buffer=nl.sbuf)
                nisa.activation(dst=rn[:, 0:n], op=nl.rsqrt, data=ss_ps[:, 0:n], scale=_RSQRT_PRESCALE,
                                bias=_L2NORM_EPS * _RSQRT_PRESCALE)
                nisa.scalar_tensor_tensor(dst=blk, data=blk, op0=nl.multiply, operand0=post * _RSQRT_POSTSCALE,
                                          op1=nl.multiply, operand1=rn[:, 0:n])
            elif post != 1.0:
                nisa.tensor_scalar(dst=blk, data=blk, op0=nl.multiply, operand0=post)
    eg = nl.ndarray((dk, seq), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=eg, src=g.ap(pattern=[[0, dk], [1, seq]], offset=0))
    nisa.activation(dst=eg, op=nl.exp, data=eg)
    beta_row = nl.ndarray((1, seq), dtype=f32, buffer=nl.sbuf)
    nisa.dma_copy(dst=beta_row, src=beta.ap(pattern=[[0, 1], [1, seq]], offset=0))

    for t0 in range(0, seq, _TOKEN_BLOCK):
        n_blk = min(_TOKEN_BLOCK, seq - t0)
        v_blk = nl.ndarray((1, _TOKEN_BLOCK * dv), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=v_blk[:, 0:n_blk * dv], src=v[t0:t0 + n_blk].reshape((1, n_blk * dv)))
        o_blk = nl.ndarray((1, _TOKEN_BLOCK * dv), dtype=q.dtype, buffer=nl.sbuf)
        for i in range(n_blk):
            t = t0 + i
            nisa.tensor_scalar(dst=s_sb, data=s_sb, op0=nl.multiply, operand0=eg[:, t:t + 1])
            ks_ps = nl.ndarray((1, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(ks_ps, k_cols[:, t:t + 1], s_sb)
            resid = nl.ndarray((1, dv), dtype=f32, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=resid, data=ks_ps, op0=nl.multiply, operand0=-1.0, op1=nl.add,
                                      operand1=v_blk[:, i * dv:(i + 1) * dv])
            delta = nl.ndarray((1, dv), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=delta, data=resid, op0=nl.multiply, operand0=beta_row[:, t:t + 1])
            dbc_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(dbc_ps, ones_sb[0:1, :], delta)                 # delta broadcast to Dk rows
            nisa.scalar_tensor_tensor(dst=s_sb, data=dbc_ps, op0=nl.multiply, operand0=k_cols[:, t:t + 1],
                                      op1=nl.add, operand1=s_sb)
            o_ps = nl.ndarray((1, dv), dtype=f32, buffer=nl.psum)
            nisa.nc_matmul(o_ps, q_cols[:, t:t + 1], s_sb)
            nisa.activation(dst=o_blk[:, i * dv:(i + 1) * dv], op=nl.copy, data=o_ps)
        nisa.dma_copy(dst=o[t0:t0 + n_blk].reshape((1, n_blk * dv)), src=o_blk[:, 0:n_blk * dv])
    nisa.dma_copy(dst=final_state, src=s_sb)
    return o, final_state


def per_head_launches(kernel, q, k, v, g, beta, initial_state, use_qk_l2norm_in_kernel, scale, extra_args=()):
    """Host loop shared by the per-(b, h) baselines: one `kernel` launch per (batch, v-head) pair at LNC=1, with
    q/k of that v-head's q/k head, the pair's fp32 initial state and `extra_args` after it.
    Same layouts as `gated_delta_rule`; returns (o, final_state)."""
    bsz, seq, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    group = n_hv // n_hk
    sc = float(dk ** -0.5 if scale is None else scale)
    o = np.zeros((bsz, seq, n_hv, dv), dtype=q.dtype)
    final = np.zeros((bsz, n_hv, dk, dv), dtype=np.float32)
    for i_b in range(bsz):
        for i_h in range(n_hv):
            s0 = (np.zeros((dk, dv), np.float32) if initial_state is None
                  else np.ascontiguousarray(initial_state[i_b, i_h], dtype=np.float32))
            ob, sb = call(kernel, np.ascontiguousarray(q[i_b, :, i_h // group]),
                          np.ascontiguousarray(k[i_b, :, i_h // group]), np.ascontiguousarray(v[i_b, :, i_h]),
                          np.ascontiguousarray(g[i_b, :, i_h]), np.ascontiguousarray(beta[i_b, :, i_h]), s0,
                          *extra_args, scale=sc, use_l2norm=bool(use_qk_l2norm_in_kernel), lnc=1)
            o[i_b, :, i_h] = ob
            final[i_b, i_h] = sb
    return o, final


def gdn_per_head_sequential(q, k, v, g, beta, initial_state=None, use_qk_l2norm_in_kernel=False, scale=None):
    """Baseline host loop: one `gdn_token_sequential_kernel` launch per (batch, v-head) pair.
    Same layouts as `gated_delta_rule`; returns (o, final_state)."""
    return per_head_launches(gdn_token_sequential_kernel, q, k, v, g, beta, initial_state,
                             use_qk_l2norm_in_kernel, scale)


def gdn_per_head_decode_step(q, k, v, g, beta, state_pool, slot_ids, use_qk_l2norm_in_kernel=False, scale=None):
    """Decode baseline: one launch per (batch, v-head), the state row passed in and written back by the host
    (the existing NxDI step kernel loops over B*H rows the same way). Updates state_pool; returns o."""
    slots = np.asarray(slot_ids)
    o, final = gdn_per_head_sequential(q, k, v, g, beta, initial_state=np.asarray(state_pool)[slots],
                                       use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, scale=scale)
    state_pool[slots] = final.astype(state_pool.dtype)
    return o
