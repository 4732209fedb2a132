"""Gated delta rule decode step: B sequences x 1..4 tokens x all heads in one launch, state pool in place.

Each sequence b reads the state rows of the heads its core owns, `state_pool[slot_ids[b], h0:h1]` ([Dk, Hv / LNC,
Dv], one DMA per sequence, Dk on the partitions: each partition row moves Hv / LNC runs of Dv elements, where one
DMA per head would move one short Dv row; scalar_offset = the slot id, runtime data, or the static row b), runs
the token recurrence per head (TensorE/VectorE, fp32 state in SBUF) and writes the rows back in the pool's dtype
(fp32 or bf16) in one DMA as soon as the last head's last token is done; the next sequences' reads are in flight
meanwhile.

Per token and v-head, with k, q normalised/scaled and S the state before the token:
    delta = beta (v - e^g S^T k)   = S^T k' + beta v,              k'  = -beta e^g k
    o     = S_new^T q              = S^T q'' + (k . q) beta v,     q'' = e^g q + (k . q) k'
    S_new = e^g S + k delta^T      = e^g S + (k' k^T)^T S + beta k v^T
k', q'', k' k^T and beta k v^T depend on the inputs only, so they are ready before the state arrives.
bf16 inputs (the products use a bf16 copy of S, fp32 accumulation, as the prefill does): after S arrives a
head needs one copy, one matmul accumulating (k' k^T)^T S onto beta k v^T in PSUM and one fused decay + add;
the state write follows the last head, and o = S_new^T q comes after it (a bf16 copy of S_new, an M = 1 matmul
per head, off the state's path). fp32 inputs (fp32 matmuls, 4 passes): rows [S^T k' ; S^T q''] by one matmul,
one add giving delta and o, a K = 1 outer product, the decay + add.
LNC=2 splits the v heads between the two program instances (each has its own HBM bandwidth).
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import ALIGNED_START_PARTITION_TARGETS, P_MAX, PSUM_FMAX_FP32, TILE_ACTIVATION_BIAS_TARGETS
from ..lnc import current_target_name, resolve_lnc
from ..validation import check_bool, check_float, check_host_values, kernel_check
from ._checks import check_qkv_gate_layouts
from ._checks import dtype_name as _dtype_name

# ---------------------------------------------------------------- constraints
_MAX_DECODE_TOKENS = 4            # tokens per sequence per step (MTP / speculative verify up to 4)
_MAX_HEAD_DIM = P_MAX             # Dk <= 128 partitions of the state tile; Dv <= 128 (one PSUM row)
_MAX_V_HEADS = P_MAX // 2         # the (delta, o) row pair of every v head sits on 2 Hv <= 128 partitions
_L2NORM_EPS = 1e-6                # transformers' l2norm eps
# rsqrt is valid on [2^-87, 2^97] on the device; rsqrt(x) = rsqrt(x * 2^-40) * 2^-20 covers fp32 sums
_RSQRT_PRESCALE = 2.0 ** -40
_RSQRT_POSTSCALE = 2.0 ** -20
_EPS_BIAS = _L2NORM_EPS * _RSQRT_PRESCALE     # the rsqrt's bias (prescaled eps)
_STATE_DTYPES = ("float32", "bfloat16")
_STATE_BUFFERS = 8                # sequences whose state rows are in SBUF at once (prefetch depth + 1) ...
_STATE_INFLIGHT_BYTES = 2 << 20   # ... and at most this many state bytes per core (prefetched reads hold the DMA
                                  # pipe ahead of the write-backs: 8 sequences at the TP4 rank under LNC=2, 4 at LNC=1)
_STATE_SBUF_BYTES = 96 * 1024     # ... within this many bytes per partition, less the bf16 path's rank-1
                                  # stationaries [Dk, T, Hv, Dk] (64 KiB at T = 4, Hv = 64, Dk = 128)
_INPUT_SBUF_BYTES = 48 * 1024    # bytes per partition for the inputs of the sequences loaded at once
_PSUM_FMAX_FP32 = PSUM_FMAX_FP32     # fp32 elements per partition of one PSUM bank (one matmul output)
_RANK_BANK_HEADS = 4              # [Dk, Dk] fp32 rank-1 products per PSUM bank (4 x 512 B = 2 KiB)


@nki.jit
def gated_delta_rule_step_kernel(q, k, v, g, beta, state_pool, slot_ids, scale, use_l2norm, static_rows=False,
                                 free_heads=False, tile_bias=False):
    """Decode step for B sequences, all heads, updating `state_pool[slot_ids]` in place.

    Dimensions:
        B batch, T new tokens per sequence (1..4), Hk q/k heads, Hv v heads (Hv % Hk == 0, Hv <= 64),
        Dk key dim (<= 128), Dv value dim (<= 128), N_slots rows of the state pool.
    Args:
        q: [B, T, Hk, Dk] @ HBM; k: [B, T, Hk, Dk] @ HBM; v: [B, T, Hv, Dv] @ HBM (same float dtype).
        g: [B, T, Hv] @ HBM log-decay <= 0; beta: [B, T, Hv] @ HBM in [0, 1].
        state_pool: [N_slots, Hv, Dk, Dv] @ HBM, fp32 or bf16; rows slot_ids[b] are read and rewritten.
        slot_ids: [B] @ HBM int32, distinct, in [0, N_slots) (clamped to that range in-kernel before the
            dynamic DMAs); unread when static_rows.
        scale, use_l2norm: trace-time constants (q scale, in-kernel L2 norm of q and k).
        static_rows: trace-time; sequence b uses state row b (static DMAs, no slot ids: an aliased
            [max_bs, Hv, Dk, Dv] buffer as NxDI keeps it).
        free_heads: trace-time (trn1: NeuronCore-v2 instructions on <= 32 partitions start only at partition
            0 / 32 / 64 / 96): each (head, token)'s rows (k row, beta v row, addend rows) are copied from the
            row pair (2h, 2h + 1) to partitions 0 (and 1) of a small tile by SBUF -> SBUF DMAs, the
            [S^T k' ; S^T q''] rows of head h come from a [Dk, 2] stationary (head h's columns) and its o row
            goes to HBM by one DMA per (head, token).
        tile_bias: trace-time (trn1: no float activation bias on NeuronCore-v2): the rsqrt's eps bias is a
            [P, 1] tile.
    Returns:
        o: [B, T, Hv, Dv] @ HBM in q's dtype.
    Constraints:
        T <= _MAX_DECODE_TOKENS; Dk, Dv <= _MAX_HEAD_DIM; Hv <= _MAX_V_HEADS; T Hk <= 128.
    Pseudocode:
        slot ids of all B sequences; state rows of up to 8 sequences in flight
        for b:
          every n_grp sequences (as many as fit _INPUT_SBUF_BYTES): their inputs, one DMA per tensor (g, beta
            as rows, broadcast over Dk by a K = 1 matmul)
          S = state_pool[slot_ids[b], owned heads]   (one DMA -> SBUF [Dk, Hv / LNC, Dv] fp32)
          from the inputs only: k rows on partitions (2h, 2h + 1) (selected from the loaded rows by a 0/1 matmul,
            normalised); bf16: k' k^T [Dk, T, Hv, Dk], beta v rows; fp32: [k' q''] columns and the addend rows
            [beta v ; (k.q) beta v]
          for t:
            bf16: for each owned h: U = beta k v^T + (k' k^T)^T S_bf[h] (PSUM); S[h] = e^g S[h] + U
                  (last token: state_pool[slot_ids[b], owned heads] = S); o[b, t, h] = S[h]^T q_h per h
            fp32: rows (2h, 2h + 1) of [k' q'']^T S[h] (+ addend) -> delta_h, o_h; S[h] = e^g S[h] + k delta^T
          fp32: state_pool[slot_ids[b], owned heads] = S; o[b] = the o rows of the owned heads
    """
    bsz, n_tok, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    group = n_hv // n_hk
    f32 = nl.float32
    # q/k/v rows in SBUF, k rows and delta rows of the outer products, o rows: bf16 for bf16 inputs, else fp32
    cdt = q.dtype if q.dtype == nl.bfloat16 else f32
    n_th, n_r = n_tok * n_hv, 2 * n_hv
    o = nl.ndarray((bsz, n_tok, n_hv, dv), dtype=q.dtype, buffer=nl.shared_hbm)
    ones_sb = nl.ndarray((dk, dk), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    # 0/1 selection matrix: sel[j, hk, g, x] = [j == hk] turns one token's q/k rows [Hk, Dk] into per-v-head
    # columns [Dk, Hv] with one matmul (transpose + GVA expansion in one instruction; x = 0) and, as the
    # stationary, into k rows on the row pairs (2h, 2h + 1) of the v heads (no transpose). One matmul per token:
    # a contraction over every token's rows would carry a NaN of a later token into earlier ones (0 x NaN)
    ones_sel = nl.ndarray((n_hk, 2 * n_hv), dtype=cdt, buffer=nl.sbuf)
    nisa.memset(dst=ones_sel, value=1.0)
    sel = nl.ndarray((n_hk, n_hk, group, 2), dtype=cdt, buffer=nl.sbuf)
    nisa.affine_select(dst=sel, pattern=[[1, n_hk], [0, group], [0, 2]], offset=0,
                       channel_multiplier=-1, on_true_tile=ones_sel.reshape((n_hk, n_hk, group, 2)),
                       on_false_value=0.0, cmp_op=nl.equal)
    sel_cols = nl.ndarray((n_hk, n_hv), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=sel_cols.reshape((n_hk, n_hk, group)), src=sel[:, :, :, 0])
    # fp32 path: kqz[:, t, h] = [e_0 | k_h . q_h elementwise]: column sums give [1, k.q] (the addend factors)
    eps_bias = _EPS_BIAS
    if tile_bias:
        eps_bias = nl.ndarray((P_MAX, 1), dtype=f32, buffer=nl.sbuf)
        nisa.memset(dst=eps_bias, value=_EPS_BIAS)
    kqz = None
    if cdt == f32:
        kqz = nl.ndarray((dk, n_tok, n_hv, 2), dtype=f32, buffer=nl.sbuf)
        nisa.memset(dst=kqz, value=0.0)
        nisa.memset(dst=kqz[0:1, :, :, 0], value=1.0)

    # slot ids of all B sequences; the other inputs of up to n_grp sequences at a time (SBUF budget), one DMA
    # per tensor and group (few DMAs: each holds a DMA queue for its whole latency)
    slot_all = None
    if not static_rows:
        slot_all = nl.ndarray((1, bsz), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=slot_all, src=slot_ids.ap(pattern=[[bsz, 1], [1, bsz]], offset=0))
        # no data-driven DMA leaves the pool: ids clamped to [0, N_slots - 1] in-kernel
        nisa.tensor_scalar(dst=slot_all, data=slot_all, op0=nl.maximum, operand0=0, op1=nl.minimum,
                           operand1=state_pool.shape[0] - 1)

    def slot_of(i_seq):                 # the state row of sequence i_seq: runtime (slot pool) or static
        return i_seq if static_rows else slot_all[0:1, i_seq:i_seq + 1]
    isz = 2 if cdt == nl.bfloat16 else 4
    per_seq = (2 * n_tok * dk + n_tok * dv) * isz + 2 * (n_th + n_tok) * 4     # k, q rows: [Hk, T, Dk] per sequence
    n_grp = max(1, min(bsz, _INPUT_SBUF_BYTES // per_seq))
    ins = _load_inputs(q, k, v, g, beta, 0, n_grp, cdt, ones_sb)
    # state rows: up to _STATE_BUFFERS sequences in flight, so the reads of the next sequences stream in while b
    # runs and b's write-back (3 us of DMA latency) does not hold up the next reads
    # LNC=2: each program instance owns half of the v heads (their state rows, updates and o rows); the
    # inputs-only preparation is cheap and done for all heads by both
    n_prog = nl.num_programs(0)
    per_core = (n_hv + n_prog - 1) // n_prog                  # ceil: the last instance may own fewer heads
    own_lo = min(n_hv, nl.program_id(0) * per_core)
    n_own = min(n_hv, own_lo + per_core) - own_lo
    if n_own == 0:
        return o                                               # Hv = 1 at LNC=2: the second core has no head
    own = (own_lo, n_own)
    rank_pp = n_tok * n_hv * dk * 2 if cdt != f32 else 0
    n_buf = max(1, min(bsz, _STATE_BUFFERS, (_STATE_SBUF_BYTES - rank_pp) // (n_own * dv * 4),
                       _STATE_INFLIGHT_BYTES // (n_own * dk * dv * 4)))
    state_buf = nl.ndarray((dk, n_buf, n_own, dv), dtype=f32, buffer=nl.sbuf)     # the owned heads only
    for i_b in range(n_buf - 1):
        _load_state(state_pool, slot_of(i_b), state_buf[:, i_b], own)
    for i_b in range(bsz):
        if i_b > 0 and i_b % n_grp == 0:
            ins = _load_inputs(q, k, v, g, beta, i_b, min(n_grp, bsz - i_b), cdt, ones_sb)
        i_pre = i_b + n_buf - 1
        if i_pre < bsz:
            _load_state(state_pool, slot_of(i_pre), state_buf[:, i_pre % n_buf], own)
        slot = slot_of(i_b)
        state_sb = state_buf[:, i_b % n_buf]
        i_g = i_b % n_grp
        exp_g = nl.ndarray((dk, n_th), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=exp_g, op=nl.exp, data=ins["g_bc"][:, i_g, :])
        upd = _prepare_update(q.shape, ins, i_g, exp_g, sel, use_l2norm, cdt, own, eps_bias, free_heads)
        out = None
        if cdt == f32:          # the delta rows need the columns and addend rows before the state update
            out = _prepare_rows(q.shape, v.shape, ins, i_g, exp_g, upd["nbe"], sel_cols, ones_sb, kqz, scale,
                                use_l2norm, eps_bias, free_heads)
        dl_rows = None
        if cdt == f32 and not free_heads:
            dl_rows = nl.ndarray((n_r, n_tok, dv), dtype=cdt, buffer=nl.sbuf)    # rows 2h: delta_h, 2h + 1: o_h
        for i_t in range(n_tok):
            if cdt == f32:
                for i_o in range(n_own):
                    if free_heads:
                        _head_token_rows_free(state_sb[:, i_o, :], upd, out, exp_g, o, i_b, i_t, own[0] + i_o)
                    else:
                        _head_token_rows(state_sb[:, i_o, :], upd, out, exp_g, dl_rows, i_t, own[0] + i_o)
                continue
            # bf16: every owned head's update first (the state write waits for them), then the o rows
            s_bf = nl.ndarray((dk, n_own, dv), dtype=cdt, buffer=nl.sbuf)
            for i_o in range(n_own):
                _head_token_rank1(state_sb[:, i_o, :], s_bf[:, i_o, :], upd, exp_g, i_t, own[0] + i_o, free_heads)
            if i_t == n_tok - 1:
                nisa.dma_copy(dst=_state_rows(state_pool, slot, own), src=state_sb)
            if out is None:
                out = _q_columns(q.shape, ins, i_g, sel_cols, ones_sb, scale, use_l2norm, cdt, eps_bias)
            _token_out_rows(state_sb, out, o, i_b, i_t, own)
        if cdt == f32:
            nisa.dma_copy(dst=_state_rows(state_pool, slot, own), src=state_sb)
            if not free_heads:
                nisa.dma_copy(dst=o.ap(pattern=[[dv, n_own], [n_hv * dv, n_tok], [1, dv]],
                                       offset=(i_b * n_th + own[0]) * dv),
                              src=dl_rows[2 * own[0] + 1:2 * (own[0] + n_own):2, :, :])
    return o


def _head_token_rows(s_h, upd, out, exp_g, dl_rows, i_t, i_h):
    """fp32 inputs: one token of v head h on its state S = s_h ([Dk, Dv] fp32, SBUF), fp32 matmuls.

    rows (2h, 2h + 1) of [k' q'']^T S plus the addend are (delta_h, o_h); S = e^g S + k_h delta_h^T."""
    dk, dv = s_h.shape
    f32 = nl.float32
    kq_st, k_rows, addend = out["kq_st"], upd["k_rows"], out["addend"]
    n_r = kq_st.shape[2] * 2
    i_th = i_t * kq_st.shape[2] + i_h
    rows = slice(2 * i_h, 2 * i_h + 2)
    # rows (2h, 2h + 1) = [S^T k' ; S^T q''] (the other rows pair head h's S with other heads' columns)
    sk_ps = nl.ndarray((n_r, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(sk_ps, kq_st[:, i_t].reshape((dk, n_r)), s_h)
    nisa.tensor_tensor(dst=dl_rows[rows, i_t, :], data1=sk_ps[rows, :], data2=addend[rows, i_t, :], op=nl.add)
    del sk_ps
    # S = e^g S + k delta^T   (K = 1 outer product on partition 2h, decay fused into the add)
    outer_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(outer_ps, k_rows[2 * i_h:2 * i_h + 1, i_t, :], dl_rows[2 * i_h:2 * i_h + 1, i_t, :],
                   accumulate=False)
    nisa.scalar_tensor_tensor(dst=s_h, data=s_h, op0=nl.multiply, operand0=exp_g[:, i_th:i_th + 1], op1=nl.add,
                              operand1=outer_ps)


def _head_token_rows_free(s_h, upd, out, exp_g, o, i_b, i_t, i_h):
    """_head_token_rows with head h's rows at partitions 0 and 1 (free_heads, trn1): its k row and addend rows
    copied there from the row pair (2h, 2h + 1) by SBUF -> SBUF DMAs, its [S^T k' ; S^T q''] rows from its own
    [Dk, 2] columns as the stationary, its o row written to o[b, t, h] by one DMA."""
    dk, dv = s_h.shape
    f32 = nl.float32
    n_hv = out["kq_st"].shape[2]
    i_th = i_t * n_hv + i_h
    k_r = _row_at_zero(upd["k_rows"][2 * i_h:2 * i_h + 1, i_t, :])
    add_r = _row_at_zero(out["addend"][2 * i_h:2 * i_h + 2, i_t, :])
    sk_ps = nl.ndarray((2, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(sk_ps, out["kq_st"][:, i_t, i_h, :], s_h)
    dl_r = nl.ndarray((2, dv), dtype=f32, buffer=nl.sbuf)        # row 0: delta_h, row 1: o_h
    nisa.tensor_tensor(dst=dl_r, data1=sk_ps, data2=add_r, op=nl.add)
    del sk_ps
    outer_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(outer_ps, k_r, dl_r[0:1, :], accumulate=False)
    nisa.scalar_tensor_tensor(dst=s_h, data=s_h, op0=nl.multiply, operand0=exp_g[:, i_th:i_th + 1], op1=nl.add,
                              operand1=outer_ps)
    nisa.dma_copy(dst=o.ap(pattern=[[dv, 1], [1, dv]], offset=((i_b * o.shape[1] + i_t) * n_hv + i_h) * dv),
                  src=dl_r[1:2, :])


def _row_at_zero(rows):
    """A copy of the SBUF rows `rows` ([r, n], any start partition) on partitions 0 .. r - 1: one SBUF -> SBUF DMA
    (free_heads, trn1: no compute instruction may start on a partition like 2h there)."""
    dst = nl.ndarray(tuple(rows.shape), dtype=rows.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=dst, src=rows)
    return dst


def _head_token_rank1(s_h, s_bf, upd, exp_g, i_t, i_h, free_heads=False):
    """bf16 inputs: one token's update of v head h's state S = s_h ([Dk, Dv] fp32, SBUF), keeping the bf16 copy
    s_bf of S (before the update) used for the update's product (as the prefill does; fp32 accumulation, fp32
    state). The output is computed afterwards from the updated state (_token_out_rows).

    k delta^T = beta k v^T + (k k'^T) S, so the update needs one matmul after S arrives (the rank-1 stationary
    k' k^T and beta k v^T come from the inputs)."""
    dk, dv = s_h.shape
    f32 = nl.float32
    k_rows, rank, bv_rows = upd["k_rows"], upd["rank"], upd["bv_rows"]
    i_th = i_t * rank.shape[2] + i_h
    upd_ps = nl.ndarray((dk, dv), dtype=f32, buffer=nl.psum)
    if free_heads:
        nisa.nc_matmul(upd_ps, _row_at_zero(k_rows[2 * i_h:2 * i_h + 1, i_t, :]),
                       _row_at_zero(bv_rows[2 * i_h:2 * i_h + 1, i_t, :]), accumulate=False)
    else:
        nisa.nc_matmul(upd_ps, k_rows[2 * i_h:2 * i_h + 1, i_t, :], bv_rows[2 * i_h:2 * i_h + 1, i_t, :],
                       accumulate=False)
    nisa.tensor_copy(dst=s_bf, src=s_h, engine=nisa.engine.gpsimd)
    nisa.nc_matmul(upd_ps, rank[:, i_t, i_h, :], s_bf, accumulate=True)
    nisa.scalar_tensor_tensor(dst=s_h, data=s_h, op0=nl.multiply, operand0=exp_g[:, i_th:i_th + 1], op1=nl.add,
                              operand1=upd_ps)


def _select_columns(kq_ps, ins, i_b, sel_cols):
    """kq_ps [Dk, 2, T Hv] = the k (index 0) and q (1) columns per v head of sequence i_b: per token, its [Hk, Dk]
    rows transposed and expanded to the v heads by one matmul with the 0/1 selection (only that token's rows
    in the contraction)."""
    n_tok, n_hv = ins["k_rows"].shape[2], sel_cols.shape[1]
    for i_x, name in enumerate(("k_rows", "q_rows")):
        for i_t in range(n_tok):
            nisa.nc_matmul(kq_ps[:, i_x, i_t * n_hv:(i_t + 1) * n_hv], ins[name][:, i_b, i_t, :], sel_cols)


def _q_columns(q_shape, ins, i_b, sel_cols, ones_sb, scale, use_l2norm, cdt, eps_bias=_EPS_BIAS):
    """bf16 path: the normalised, scaled q columns [Dk, T, Hv] in the matmul dtype (the stationaries of o)."""
    _, n_tok, _, dk = q_shape
    n_th = n_tok * sel_cols.shape[1]
    f32 = nl.float32
    kq_ps = nl.ndarray((dk, 2, n_th), dtype=f32, buffer=nl.psum)
    _select_columns(kq_ps, ins, i_b, sel_cols)
    kqn = nl.ndarray((dk, n_tok, n_th // n_tok, 2), dtype=f32, buffer=nl.sbuf)
    _normalize_columns(kqn, kq_ps, ones_sb, scale, use_l2norm, eps_bias)
    del kq_ps
    q_st = nl.ndarray((dk, n_tok, n_th // n_tok), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=q_st, src=kqn[:, :, :, 1])
    return q_st


def _token_out_rows(state_sb, q_st, o, i_b, i_t, own):
    """bf16 path: o[b, t, h] = S_h^T q_h for the owned heads from their updated states S_h (state_sb [Dk, n_own,
    Dv] fp32; a bf16 copy of each by ScalarE), as rows on partition 0: one M = 1 matmul and eviction per head
    into a bank of heads, one contiguous DMA per bank."""
    dk, n_own, dv = state_sb.shape
    _, n_tok, n_hv, _ = o.shape
    per_bank = max(1, _PSUM_FMAX_FP32 // dv)
    for h0 in range(0, n_own, per_bank):
        nh = min(per_bank, n_own - h0)
        sn_bf = nl.ndarray((dk, per_bank, dv), dtype=q_st.dtype, buffer=nl.sbuf)
        o_ps = nl.ndarray((1, per_bank, dv), dtype=nl.float32, buffer=nl.psum)
        o_sb = nl.ndarray((1, per_bank, dv), dtype=o.dtype, buffer=nl.sbuf)
        for i_h in range(nh):
            i_v = own[0] + h0 + i_h
            nisa.activation(dst=sn_bf[:, i_h, :], op=nl.copy, data=state_sb[:, h0 + i_h, :])
            nisa.nc_matmul(o_ps[0:1, i_h, :], q_st[:, i_t, i_v:i_v + 1], sn_bf[:, i_h, :])
            nisa.tensor_copy(dst=o_sb[0:1, i_h], src=o_ps[0:1, i_h])
        nisa.dma_copy(dst=o.ap(pattern=[[nh * dv, 1], [1, nh * dv]],
                               offset=((i_b * n_tok + i_t) * n_hv + own[0] + h0) * dv), src=o_sb[0:1, 0:nh])


def _load_inputs(q, k, v, g, beta, b0, nb, cdt, ones_sb):
    """The inputs of sequences b0 .. b0 + nb - 1 in SBUF (index 1 = the sequence within the group): contiguous
    q/k rows, v rows and g/beta twice per v head (partitions 2h, 2h + 1), g/beta broadcast over the Dk
    partitions (loaded as one contiguous row each, broadcast by K = 1 matmuls with a ones row: a DMA
    broadcast would move one short row per partition)."""
    _, n_tok, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    n_th, n_tk = n_tok * n_hv, n_tok * n_hk
    f32 = nl.float32
    gb_bc = nl.ndarray((dk, 2, nb, n_th), dtype=f32, buffer=nl.sbuf)         # [:, 0] = g, [:, 1] = beta
    ins = dict(
        k_rows=nl.ndarray((n_hk, nb, n_tok, dk), dtype=cdt, buffer=nl.sbuf),
        q_rows=nl.ndarray((n_hk, nb, n_tok, dk), dtype=cdt, buffer=nl.sbuf),
        v_pairs=nl.ndarray((2 * n_hv, nb, n_tok, dv), dtype=cdt, buffer=nl.sbuf),
        g_bc=gb_bc[:, 0], beta_bc=gb_bc[:, 1],
        beta_pairs=nl.ndarray((2 * n_hv, nb, n_tok), dtype=f32, buffer=nl.sbuf))
    for name, x in (("k_rows", k), ("q_rows", q)):
        nisa.dma_copy(dst=ins[name], src=x.ap(pattern=[[dk, n_hk], [n_tk * dk, nb], [n_hk * dk, n_tok], [1, dk]],
                                              offset=b0 * n_tk * dk))
    _broadcast_rows(gb_bc, (g, beta), b0 * n_th, ones_sb)
    for i_x in range(2):
        nisa.dma_copy(dst=ins["v_pairs"][i_x:2 * n_hv:2], src=v.ap(
            pattern=[[dv, n_hv], [n_th * dv, nb], [n_hv * dv, n_tok], [1, dv]], offset=b0 * n_th * dv))
    nisa.dma_copy(dst=ins["beta_pairs"], src=beta.ap(pattern=[[1, n_hv], [0, 2], [n_th, nb], [n_hv, n_tok]],
                                                     offset=b0 * n_th))
    return ins


def _broadcast_rows(dst_bc, srcs, offset, ones_sb):
    """dst_bc [Dk, len(srcs), n...] fp32 = each of the HBM tensors srcs from element `offset` on (n elements each,
    one contiguous row DMA), copied to every one of the Dk partitions by K = 1 matmuls (ones row stationary),
    at most one PSUM bank (_PSUM_FMAX_FP32 fp32) per matmul."""
    dk, n_src = dst_bc.shape[0], dst_bc.shape[1]
    f32 = nl.float32
    flat = dst_bc.reshape((dk, n_src * (dst_bc.size // (dk * n_src))))
    width = flat.shape[1] // n_src
    row_sb = nl.ndarray((1, n_src * width), dtype=f32, buffer=nl.sbuf)
    for i_s, x in enumerate(srcs):
        nisa.dma_copy(dst=row_sb[0:1, i_s * width:(i_s + 1) * width],
                      src=x.ap(pattern=[[width, 1], [1, width]], offset=offset))
    for c0 in range(0, n_src * width, _PSUM_FMAX_FP32):
        cw = min(_PSUM_FMAX_FP32, n_src * width - c0)
        bc_ps = nl.ndarray((dk, _PSUM_FMAX_FP32), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(bc_ps[:, 0:cw], ones_sb[0:1, 0:dk], row_sb[0:1, c0:c0 + cw])
        nisa.tensor_copy(dst=flat[:, c0:c0 + cw], src=bc_ps[:, 0:cw])
        del bc_ps


def _load_state(state_pool, slot, state_sb, own):
    """state_sb [Dk, own[1], Dv] = heads own[0] .. own[0] + own[1] - 1 of state_pool[slot]: one DMA for all the
    owned heads (dynamic for a slot id in SBUF: scalar_offset), so each partition row moves own[1] x Dv
    elements (own[1] runs of Dv contiguous ones) instead of one short Dv row per DMA."""
    nisa.dma_copy(dst=state_sb, src=_state_rows(state_pool, slot, own))


def _state_rows(state_pool, slot, own):
    """[Dk, own[1], Dv] HBM view of heads own[0] .. own[0] + own[1] - 1 of state_pool[slot]: static when slot is
    an int (static rows), else a dynamic view whose row is the slot id in SBUF (scalar_offset)."""
    dk, dv = state_pool.shape[2], state_pool.shape[3]
    pattern = [[dv, dk], [dk * dv, own[1]], [1, dv]]
    if isinstance(slot, int):
        return state_pool.ap(pattern=pattern, offset=(slot * state_pool.shape[1] + own[0]) * dk * dv)
    return state_pool.ap(pattern=pattern, offset=own[0] * dk * dv, scalar_offset=slot, indirect_dim=0)


def _prepare_update(q_shape, ins, i_b, exp_g, sel_pairs, use_l2norm, cdt, own, eps_bias=_EPS_BIAS,
                    free_heads=False):
    """What the state update needs from the inputs (runs while the state rows are in flight).

    Returns a dict: k_rows [2 Hv, T, Dk] (rows 2h, 2h + 1 = normalised k of v head h), nbe [Dk, T, Hv] fp32
    (-beta e^g on every partition) and, for bf16 inputs, bv_rows and rank (see _prepare_rank1; the owned heads
    own = (first, count) only; free_heads, trn1: each k row copied to partition 0 for its K = 1 matmuls)."""
    _, n_tok, n_hk, dk = q_shape
    n_r = 2 * sel_pairs.shape[1] * sel_pairs.shape[2]              # 2 Hv rows: sel_pairs [Hk, Hk, G, 2]
    n_th = n_tok * n_r // 2
    f32 = nl.float32
    # k rows on the row pairs (2h, 2h + 1) (the stationary of the outer products): the loaded rows selected per
    # v head by one matmul per token, normalised in that layout (no transpose of the normalised columns)
    kr_ps = nl.ndarray((n_r, n_tok, dk), dtype=f32, buffer=nl.psum)
    for i_t in range(n_tok):
        nisa.nc_matmul(kr_ps[:, i_t, :], sel_pairs.reshape((n_hk, n_r)), ins["k_rows"][:, i_b, i_t, :])
    k_rows = nl.ndarray((n_r, n_tok, dk), dtype=cdt, buffer=nl.sbuf)
    _normalize_rows(k_rows, kr_ps, use_l2norm, eps_bias)
    del kr_ps
    nbe = nl.ndarray((dk, n_tok, n_r // 2), dtype=f32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=nbe.reshape((dk, n_th)), data=exp_g, op0=nl.multiply, operand0=-1.0,
                              op1=nl.multiply, operand1=ins["beta_bc"][:, i_b, :])
    upd = dict(k_rows=k_rows, nbe=nbe)
    if cdt != f32:
        upd.update(_prepare_rank1(k_rows, nbe, ins["v_pairs"][:, i_b], ins["beta_pairs"][:, i_b], own,
                                  free_heads))
    return upd


def _prepare_rows(q_shape, v_shape, ins, i_b, exp_g, nbe, sel_cols, ones_sb, kqz, scale, use_l2norm,
                  eps_bias=_EPS_BIAS, free_heads=False):
    """fp32 path: the stationary columns and addend rows (from the inputs only) of the (delta, o) row pairs.

    Returns a dict: kq_st [Dk, T, Hv, 2] fp32 (columns k' = -beta e^g k, q'' = e^g q + (k.q) k' per v head) and
    addend [2 Hv, T, Dv] fp32 (rows beta v, (k.q) beta v)."""
    _, n_tok, n_hk, dk = q_shape
    n_hv, dv = v_shape[2], v_shape[3]
    n_th, n_r = n_tok * n_hv, 2 * n_hv
    f32 = nl.float32
    # k, q columns per v head (Dk on partitions), transposed and head-expanded by one matmul each
    kq_ps = nl.ndarray((dk, 2, n_th), dtype=f32, buffer=nl.psum)
    _select_columns(kq_ps, ins, i_b, sel_cols)
    kqn = nl.ndarray((dk, n_tok, n_hv, 2), dtype=f32, buffer=nl.sbuf)     # [..., 0] = k, [..., 1] = q
    _normalize_columns(kqn, kq_ps, ones_sb, scale, use_l2norm, eps_bias)
    del kq_ps
    # k . q: column sums of kqz = [e_0 | k o q], broadcast to all partitions, and per row pair (2h, 2h + 1)
    nisa.tensor_tensor(dst=kqz[:, :, :, 1], data1=kqn[:, :, :, 0], data2=kqn[:, :, :, 1], op=nl.multiply,
                       engine=nisa.engine.gpsimd)
    kq_bc_ps = nl.ndarray((dk, n_tok, n_hv, 2), dtype=f32, buffer=nl.psum)
    nisa.nc_matmul(kq_bc_ps.reshape((dk, 2 * n_th)), ones_sb, kqz.reshape((dk, 2 * n_th)))
    fac_ps = nl.ndarray((n_r, n_tok), dtype=f32, buffer=nl.psum)
    for i_t in range(n_tok):
        nisa.nc_matmul(fac_ps[:, i_t:i_t + 1], kqz[:, i_t].reshape((dk, n_r)), ones_sb[:, 0:1])
    # addend rows: (2h, 2h + 1) = (beta v, (k.q) beta v)
    fac = nl.ndarray((n_r, n_tok), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=fac, data1=fac_ps, data2=ins["beta_pairs"][:, i_b, :], op=nl.multiply)
    del fac_ps
    addend = nl.ndarray((n_r, n_tok, dv), dtype=f32, buffer=nl.sbuf)
    for i_t in range(n_tok):
        nisa.tensor_scalar(dst=addend[:, i_t, :], data=ins["v_pairs"][:, i_b, i_t, :], op0=nl.multiply,
                           operand0=fac[:, i_t:i_t + 1], engine=nisa.engine.gpsimd)
    # stationary columns: k' = -beta e^g k, q'' = e^g q + (k.q) k'  (fp32, then in the matmul dtype)
    kq_f = nl.ndarray((dk, n_tok, n_hv, 2), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=kq_f[:, :, :, 0], data1=kqn[:, :, :, 0], data2=nbe, op=nl.multiply,
                       engine=nisa.engine.gpsimd)
    eq = nl.ndarray((dk, n_tok, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=eq, data1=kqn[:, :, :, 1], data2=exp_g.reshape((dk, n_tok, n_hv)), op=nl.multiply,
                       engine=nisa.engine.gpsimd)
    kqk = nl.ndarray((dk, n_tok, n_hv), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=kqk, data1=kq_bc_ps[:, :, :, 1], data2=kq_f[:, :, :, 0], op=nl.multiply)
    del kq_bc_ps
    nisa.tensor_tensor(dst=kq_f[:, :, :, 1], data1=eq, data2=kqk, op=nl.add, engine=nisa.engine.gpsimd)
    return dict(addend=addend, kq_st=kq_f)


def _prepare_rank1(k_rows, nbe, v_pairs, beta_pairs, own, free_heads=False):
    """bf16 path: bv_rows [2 Hv, T, Dv] (row 2h = beta v_h, bf16) and the rank-1 update stationaries
    rank [Dk, T, Hv, Dk] (rank[:, t, h][j, i] = k'_h[j] k_h[i] = -beta e^g k_h[j] k_h[i]: a K = 1 matmul of the
    k row on partition 2h with itself, the factor -beta e^g applied at the eviction) for the owned heads
    own = (first, count) only (LNC=2: each core its half), one eviction per head in head order, so the first
    head's update can start before the others are ready.

    k_rows [2 Hv, T, Dk] bf16; nbe [Dk, T, Hv] fp32 (-beta e^g on every partition); v_pairs [2 Hv, T, Dv];
    beta_pairs [2 Hv, T] fp32. free_heads (trn1): each k row is copied to partition 0 first (one DMA)."""
    n_r, n_tok, dk = k_rows.shape
    dv = v_pairs.shape[2]
    f32 = nl.float32
    bv_rows = nl.ndarray((n_r, n_tok, dv), dtype=k_rows.dtype, buffer=nl.sbuf)
    for i_t in range(n_tok):
        nisa.tensor_scalar(dst=bv_rows[:, i_t, :], data=v_pairs[:, i_t, :], op0=nl.multiply,
                           operand0=beta_pairs[:, i_t:i_t + 1], engine=nisa.engine.gpsimd)
    rank = nl.ndarray((dk, n_tok, n_r // 2, dk), dtype=k_rows.dtype, buffer=nl.sbuf)
    h_lo, n_own = own
    for i_t in range(n_tok):
        for i_h0 in range((n_own + _RANK_BANK_HEADS - 1) // _RANK_BANK_HEADS):
            h0 = h_lo + i_h0 * _RANK_BANK_HEADS
            nh = min(_RANK_BANK_HEADS, h_lo + n_own - h0)
            rank_ps = nl.ndarray((dk, _RANK_BANK_HEADS, dk), dtype=f32, buffer=nl.psum)
            for i_h in range(nh):
                r = 2 * (h0 + i_h)
                k_r = _row_at_zero(k_rows[r:r + 1, i_t, :]) if free_heads else k_rows[r:r + 1, i_t, :]
                nisa.nc_matmul(rank_ps[:, i_h, :], k_r, k_r, accumulate=False)
            for i_h in range(nh):
                nisa.activation(dst=rank[:, i_t, h0 + i_h, :], op=nl.copy, data=rank_ps[:, i_h, :],
                                scale=nbe[:, i_t, h0 + i_h:h0 + i_h + 1])
            del rank_ps
    return dict(bv_rows=bv_rows, rank=rank)


def _normalize_rows(k_rows, kr_ps, use_l2norm, eps_bias=_EPS_BIAS):
    """k_rows [R, T, Dk] (SBUF) = the rows kr_ps [R, T, Dk] (PSUM), L2-normalised along Dk if asked (the same
    prescaled rsqrt as _normalize_columns)."""
    n_r, n_tok, dk = k_rows.shape
    f32 = nl.float32
    if not use_l2norm:
        nisa.activation(dst=k_rows, op=nl.copy, data=kr_ps)
        return
    ss = nl.ndarray((n_r, n_tok), dtype=f32, buffer=nl.sbuf)
    sq = nl.ndarray((n_r, n_tok, dk), dtype=f32, buffer=nl.sbuf)
    for i_t in range(n_tok):
        nisa.activation_reduce(dst=sq[:, i_t, :], op=nl.square, data=kr_ps[:, i_t, :], reduce_op=nl.add,
                               reduce_res=ss[:, i_t:i_t + 1])
    rn = nl.ndarray((n_r, n_tok), dtype=f32, buffer=nl.sbuf)
    nisa.activation(dst=rn, op=nl.rsqrt, data=ss, scale=_RSQRT_PRESCALE, bias=_bias(eps_bias, n_r))
    for i_t in range(n_tok):
        nisa.tensor_scalar(dst=k_rows[:, i_t, :], data=kr_ps[:, i_t, :], op0=nl.multiply,
                           operand0=rn[:, i_t:i_t + 1], op1=nl.multiply, operand1=_RSQRT_POSTSCALE)


def _bias(eps_bias, parts):
    """The activation bias: the float eps_bias itself, or rows 0 .. parts - 1 of the [P, 1] tile (tile_bias)."""
    return eps_bias if isinstance(eps_bias, float) else eps_bias[0:parts]


def _normalize_columns(kqn, kq_ps, ones_sb, scale, use_l2norm, eps_bias=_EPS_BIAS):
    """kqn [Dk, T, H, 2] (SBUF; [..., 0] = k, [..., 1] = q) = the columns kq_ps [Dk, 2, T H] (PSUM; k then q),
    L2-normalised if asked, q scaled: x * rsqrt(sum x^2 + eps) = x * 2^-20 * rsqrt((sum x^2 + eps) 2^-40)."""
    dk, n_tok, n_h = kqn.shape[0], kqn.shape[1], kqn.shape[2]
    width = kq_ps.shape[2]
    f32 = nl.float32
    post = _RSQRT_POSTSCALE if use_l2norm else 1.0
    factors = ((0, post), (1, post * float(scale)))
    if use_l2norm:
        sq = nl.ndarray((dk, 2 * width), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=sq, op=nl.square, data=kq_ps.reshape((dk, 2 * width)))
        ss_ps = nl.ndarray((dk, 2 * width), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(ss_ps, ones_sb, sq)          # column sums, broadcast to all partitions
        rnorm = nl.ndarray((dk, 2, width), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=rnorm.reshape((dk, 2 * width)), op=nl.rsqrt, data=ss_ps, scale=_RSQRT_PRESCALE,
                        bias=_bias(eps_bias, dk))
        for i_x, factor in factors:
            nisa.scalar_tensor_tensor(dst=kqn[:, :, :, i_x], data=kq_ps[:, i_x, :].reshape((dk, n_tok, n_h)),
                                      op0=nl.multiply, operand0=factor, op1=nl.multiply,
                                      operand1=rnorm[:, i_x, :].reshape((dk, n_tok, n_h)))
    else:
        for i_x, factor in factors:
            nisa.activation(dst=kqn[:, :, :, i_x], op=nl.copy, data=kq_ps[:, i_x, :].reshape((dk, n_tok, n_h)),
                            scale=factor)



def gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False, scale=None,
                          lnc=None):
    """Decode step(s) for B sequences: returns o [B, T, Hv, Dv]; updates state_pool[slot_ids] in place.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state_pool [N_slots, Hv, Dk, Dv] fp32 or
    bf16 (NumPy array or torch CPU tensor, modified in place); slot_ids [B] distinct ints in [0, N_slots), or
    None for static rows: sequence b uses state_pool[b] (an aliased [max_bs, Hv, Dk, Dv] buffer, max_bs >= B;
    static DMAs, no slot-id load).
    lnc: 1 or 2 program instances (None: `resolve_lnc`, 2 on trn2); under LNC=2 each core owns ceil(Hv / 2)
    v heads (their state rows and outputs).
    """
    name = "gated_delta_rule_step"
    sc, use_l2norm, lnc = check_gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids,
                                                      use_qk_l2norm_in_kernel, scale, lnc)
    bsz, n_slots = q.shape[0], state_pool.shape[0]
    static_rows = slot_ids is None
    if static_rows:
        slot_ids = np.arange(bsz, dtype=np.int32)      # passed but unread by the kernel
    check_host_values(name, "slot_ids", slot_ids)
    slots = np.asarray(slot_ids.detach().cpu().numpy() if hasattr(slot_ids, "detach") else slot_ids)
    kernel_check(slots.shape == (bsz,) and np.issubdtype(slots.dtype, np.integer),
                 f"{name}: slot_ids must be [B]={bsz} integers, got shape {slots.shape} dtype {slots.dtype}")
    kernel_check(bool(np.all((slots >= 0) & (slots < n_slots))),
                 f"{name}: slot_ids must be in [0, N_slots={n_slots}), got {slots.tolist()}")
    kernel_check(np.unique(slots).size == slots.size,
                 f"{name}: slot_ids must be distinct (each sequence owns its state row), got {slots.tolist()}")
    return call(gated_delta_rule_step_kernel, q, k, v, g, beta, state_pool, slots.astype(np.int32),
                scale=sc, use_l2norm=use_l2norm, static_rows=static_rows, lnc=lnc,
                free_heads=current_target_name() in ALIGNED_START_PARTITION_TARGETS,
                tile_bias=current_target_name() in TILE_ACTIVATION_BIAS_TARGETS, inplace=("state_pool",))


def check_gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False,
                                scale=None, lnc=None):
    """`gated_delta_rule_step`'s checks that read no tensor values (shapes, dtypes, options), so that torch_ops'
    fake runs them at trace time; slot_ids' values are checked by the wrapper. Returns (scale, use_l2norm, lnc)."""
    name = "gated_delta_rule_step"
    lnc = resolve_lnc(lnc, name)
    bsz, n_tok, n_hk, dk, n_hv, dv = check_qkv_gate_layouts(name, q, k, v, g, beta,
                                                           extra=(("state_pool", state_pool, 4),))
    kernel_check(1 <= n_tok <= _MAX_DECODE_TOKENS, f"{name}: T must be in [1, {_MAX_DECODE_TOKENS}] tokens "
                 f"per step (use gated_delta_rule for prefill), got T={n_tok}")
    n_slots = state_pool.shape[0]
    kernel_check(tuple(state_pool.shape[1:]) == (n_hv, dk, dv), f"{name}: state_pool must be "
                 f"[N_slots, Hv, Dk, Dv]=[N, {n_hv}, {dk}, {dv}], got {tuple(state_pool.shape)}")
    kernel_check(_dtype_name(state_pool) in _STATE_DTYPES, f"{name}: state_pool dtype must be one of "
                 f"{_STATE_DTYPES}, got {_dtype_name(state_pool)}")
    if slot_ids is None:
        kernel_check(n_slots >= bsz, f"{name}: with slot_ids=None (static rows) state_pool must have at least B "
                     f"rows, got N_slots={n_slots}, B={bsz}")
    sc = dk ** -0.5 if scale is None else check_float(name, "scale", scale, positive=True)
    use_qk_l2norm_in_kernel = check_bool(name, "use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    kernel_check(n_hv <= _MAX_V_HEADS and n_tok * n_hk <= P_MAX, f"{name}: at most {_MAX_V_HEADS} v heads and "
                 f"T * Hk <= {P_MAX} per launch, got Hv={n_hv}, T={n_tok}, Hk={n_hk}")
    return float(sc), bool(use_qk_l2norm_in_kernel), lnc
