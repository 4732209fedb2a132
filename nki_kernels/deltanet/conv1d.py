"""Causal depthwise conv1d (+ SiLU) before the gated delta rule: prefill and single-step update forms.

transformers layout: x [B, C, T] channels first, weight [C, K] (K = 4, `conv1d.weight.squeeze(1)`),
conv state [B, C, K] holding the last K inputs (transformers keeps K columns, not K - 1):
y[c, t] = sum_i w[c, i] * in[c, t - (K - 1) + i], in = [conv_state | x]. Channels go on the partitions.
Prefill: tiles of 128 channels, time along the free dim; each tap is one TensorE matmul of diag(w[:, i])
against the shifted row (2-byte inputs) or one VectorE multiply-add (fp32); the DMAs move several tiles at a
time (partition rows past the DMA packet knee; weights and states of a block in one DMA). Update: contiguous blocks of
C / 128 channels per partition, the sequences along the free dim.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import DMA_FULL_RATE_ROW_BYTES, NO_PE_TILE32_TARGETS, P_MAX, PSUM_FMAX_FP32
from ..lnc import current_target_name, for_target, resolve_lnc
from ..validation import check_same_kind, kernel_check
from ._checks import FLOAT_DTYPES as _FLOAT_DTYPES
from ._checks import check_cu_seqlens, check_lengths, check_tensor, cu_seqlens_count
from ._checks import dtype_name as _dtype_name

# ---------------------------------------------------------------- constraints
_MAX_KERNEL_WIDTH = 8             # taps K (Qwen3.5/Next use 4)
_MAX_SEQ = 16384                  # T: the whole [128, K + T] history row lives in SBUF (<= 32 KiB bf16)
_MAX_ROW_ELEMS = 8192             # free elements per partition of one [P, n_b, K + T] history tile
_UPDATE_SBUF_BYTES = 64 * 1024   # update form: SBUF per partition for one chunk of sequences (all its tiles)
_UPDATE_ROW_BYTES = 1024          # update form: below this many conv-state bytes per partition row at 128 partitions
                                  # (and below the target's DMA packet knee) the channels go on 64 partitions
                                  # (see _update_partitions)
_ACTIVATIONS = (None, "silu", "swish")
_MAX_SEQS = 1024                  # packed sequences per launch (cu_seqlens): 3 small DMAs each per channel tile
_HIST_SBUF_BYTES = 40 * 1024      # prefill: bytes per partition of one block's history (the tiles of one state DMA);
                                  # with its y tile and 3 rotating buffers the worst case (T = 16384, one
                                  # tile per block) needs what the one-tile-per-DMA kernel needed
_PE_TILE = 32                     # prefill taps: 32 x 32 PE tiles (NeuronCore-v3+ row / column tiling) on the diagonal
_DMA_ROW_BYTES = 2560             # prefill: x / y DMAs move >= this many bytes per partition row (past the DMA
                                  # engines' packet knee: trn1 ~2.5 KiB; trn2 / trn3 512 B under cost model v11)
                                  # by grouping channel tiles


@nki.jit
def causal_conv1d_kernel(x, weight, conv_state, lengths, cu_seqlens, has_state, in_place, apply_silu, varlen=False):
    """Causal depthwise conv over time for every (batch, channel), one launch.

    Dimensions:
        B batch, C channels (conv_dim = 2 Hk Dk + Hv Dv), T tokens, K taps.
    Args:
        x: [B, C, T] @ HBM, float dtype.
        weight: [C, K] @ HBM.
        conv_state: [B, C, K] @ HBM, the K inputs before x (read only when has_state); written in place
            with the new state when in_place.
        lengths: [B] @ HBM int32, valid tokens of each sequence (the new state ends at input L_b - 1).
        has_state, in_place, apply_silu: trace-time constants.
        cu_seqlens: [N+1] @ HBM int32 (varlen, trace-time: B = 1, sequence n is tokens cu[n] .. cu[n+1] - 1;
            conv_state and new_state are [N, C, K]); see _varlen_boundaries.
    Returns:
        y: [B, C, T] @ HBM in x's dtype; new_state: [B, C, K] @ HBM in conv_state's dtype (omitted when in_place).
    Constraints:
        T <= _MAX_SEQ, K <= _MAX_KERNEL_WIDTH.
    Pseudocode:
        for block of n_t channel tiles (tile j: channels c0 + j 128 + p on partition p; as many tiles as fit
                _HIST_SBUF_BYTES; a C % 128 remainder is its own block):
          w = weight[block] (one DMA)
          for a group of sequences (free dim):
            hist[:, b, j] = [conv_state[b] | x[b]] ([P, n_b, n_t, K + T] SBUF; x by DMAs of g tiles, each
                partition row g T elements >= _DMA_ROW_BYTES: the DMA engines' packet knee)
            new_state[b] = hist[:, b, :, L_b : L_b + K]   (one dynamic DMA per sequence and block, L_b runtime)
            per g tiles: acc = sum_i w[:, j, i] * hist[:, :, j, 1 + i : 1 + i + T]; y = silu(acc) (one DMA out)
        2-byte inputs: the taps run on TensorE, acc[:, cols] = sum_i diag(w[:, i]) hist[:, b, 1 + i + cols]
          (K matmuls into one PSUM bank per 512 columns; bf16 x bf16 products are exact in fp32), and ScalarE
          applies SiLU while evicting; fp32 inputs use one VectorE multiply-add per tap.
    """
    bsz, n_ch, seq = x.shape
    kw = weight.shape[1]
    f32 = nl.float32
    y = nl.ndarray((bsz, n_ch, seq), dtype=x.dtype, buffer=nl.shared_hbm)
    n_states = cu_seqlens.shape[0] - 1 if varlen else bsz
    new_state = conv_state if in_place else nl.ndarray((n_states, n_ch, kw), dtype=conv_state.dtype,
                                                       buffer=nl.shared_hbm)
    outs = y if in_place else (y, new_state)
    # LNC=2: each program instance owns a contiguous half of the channels (reads and writes only those rows)
    c_lo, c_hi = _owned_channels(n_ch, nl.program_id(0), nl.num_programs(0))
    if c_hi == c_lo:
        return outs
    len_i = None
    bounds = _sequence_bounds(cu_seqlens, seq, kw) if varlen else None
    if not in_place and not varlen:
        len_i = _clamped_lengths(lengths, bsz, seq)
    margin = kw if varlen else 0             # zero columns after the history / y rows for the boundary windows
    on_pe = x.dtype in (nl.bfloat16, nl.float16)
    ident = _identity(x.dtype) if on_pe else None
    act = nl.silu if apply_silu else nl.copy
    isz = 2 if on_pe else 4
    width = kw + seq + margin                # history columns of one (channel tile, sequence)
    nb = max(1, min(bsz, _MAX_ROW_ELEMS // (kw + seq)))          # sequences per block (free dim)
    for c0, n_t, pc in _channel_blocks(c_lo, c_hi, nb * width * isz):
        # the weights of the block's n_t tiles (channel c0 + j 128 + p on partition p), one DMA
        w_sb = nl.ndarray((P_MAX, n_t, kw), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_sb[0:pc], src=weight.ap(pattern=[[kw, pc], [P_MAX * kw, n_t], [1, kw]], offset=c0 * kw))
        g = max(1, min(n_t, -(-_DMA_ROW_BYTES // (seq * isz))))   # tiles per x / y DMA: rows >= the DMA knee
        for b0 in range(0, bsz, nb):
            n_b = min(nb, bsz - b0)
            # hist[:, b, j] = [conv_state[b] | x[b]] of tile j: input t of sequence b at column K + t
            hist = nl.ndarray((P_MAX, nb, n_t, width), dtype=x.dtype, buffer=nl.sbuf)
            view = (c0, pc, b0, n_b)
            if varlen:                        # every sequence's history is fixed by _varlen_boundaries
                nisa.memset(dst=hist[0:pc, 0:n_b, :, 0:kw], value=0.0)
                nisa.memset(dst=hist[0:pc, 0:n_b, :, kw + seq:width], value=0.0)
            elif has_state:
                nisa.dma_copy(dst=hist[0:pc, 0:n_b, :, 0:kw], src=_tile_rows(conv_state, *view, 0, n_t))
            else:
                nisa.memset(dst=hist[0:pc, 0:n_b, :, 0:kw], value=0.0)
            for j0, ng in _x_pieces(n_t, g):
                nisa.dma_copy(dst=hist[0:pc, 0:n_b, j0:j0 + ng, kw:kw + seq], src=_tile_rows(x, *view, j0, ng))
            if not varlen:
                _write_new_state(hist, new_state, len_i, view, n_t, seq, in_place)
            for j0 in range(0, n_t, g):
                ng = min(g, n_t - j0)
                y_sb = nl.ndarray((P_MAX, nb, g, seq + margin), dtype=x.dtype, buffer=nl.sbuf)
                for i_j in range(ng):
                    j = j0 + i_j
                    if on_pe:
                        diag = _diag_weights(ident, w_sb[:, j], pc, x.dtype)
                        _taps_on_pe(hist[:, :, j], diag, y_sb[:, :, i_j, 0:seq], pc, n_b, act)
                    else:
                        _taps_on_dve(hist[:, :, j], w_sb[:, j], y_sb[:, :, i_j, 0:seq], pc, n_b, act)
                    if varlen:
                        rows = (nb * n_t * width, nb * g * (seq + margin))
                        _varlen_boundaries(hist[:, :, j], y_sb[:, :, i_j], rows, conv_state, new_state, w_sb[:, j],
                                           bounds, c0 + j * P_MAX, pc, has_state, act)
                nisa.dma_copy(dst=_tile_rows(y, *view, j0, ng), src=y_sb[0:pc, 0:n_b, 0:ng, 0:seq])
    return outs


def _channel_blocks(c_lo, c_hi, tile_bytes):
    """[(c0, n_t, pc)]: the owned channels [c_lo, c_hi) as blocks of n_t tiles of pc channels (tile j of a block:
    channels c0 + j 128 .. + pc - 1 on partitions 0 .. pc - 1). Full tiles go in blocks of at most
    _HIST_SBUF_BYTES // tile_bytes (the block's history in SBUF); a remainder of C % 128 channels is its own block."""
    n_full = (c_hi - c_lo) // P_MAX
    per = max(1, _HIST_SBUF_BYTES // max(1, tile_bytes))
    blocks = [(c_lo + i * P_MAX, min(per, n_full - i), P_MAX) for i in range(0, n_full, per)]
    if (c_hi - c_lo) % P_MAX:
        blocks.append((c_lo + n_full * P_MAX, 1, (c_hi - c_lo) % P_MAX))
    return blocks


def _x_pieces(n_t, g):
    """[(j0, ng)]: the x DMAs of a block of n_t tiles, g tiles each after a first piece of one tile (the first
    taps start after a one-tile transfer instead of a g-tile one)."""
    pieces = [(0, 1)] if n_t > 1 and g > 1 else []
    j = pieces[0][1] if pieces else 0
    return pieces + [(j0, min(g, n_t - j0)) for j0 in range(j, n_t, g)]


def _tile_rows(t, c0, pc, b0, n_b, j0, ng):
    """View [pc, n_b, ng, L] of t [B, C, L] (HBM): channel c0 + (j0 + j) 128 + p of sequence b0 + b at [p, b, j]."""
    _, n_ch, n_l = t.shape
    return t.ap(pattern=[[n_l, pc], [n_ch * n_l, n_b], [P_MAX * n_l, ng], [1, n_l]],
                offset=(b0 * n_ch + c0 + j0 * P_MAX) * n_l)


def _write_new_state(hist, new_state, len_i, view, n_t, seq, in_place):
    """new_state[b] = inputs L_b - K .. L_b - 1 = hist columns L_b .. L_b + K - 1 of every tile of the block:
    static (L_b = T) in the update form, else one dynamic read per sequence (offset L_b, clamped, from a
    register loaded from SBUF)."""
    c0, pc, b0, n_b = view
    kw = new_state.shape[2]
    if in_place:
        nisa.dma_copy(dst=_tile_rows(new_state, *view, 0, n_t), src=hist[0:pc, 0:n_b, :, seq:seq + kw])
        return
    row = hist.shape[1] * hist.shape[2] * hist.shape[3]
    n_ch = new_state.shape[1]
    for i_b in range(n_b):
        tail = hist[0:pc, i_b].ap(pattern=[[row, pc], [hist.shape[3], n_t], [1, kw]], offset=0,
                                  scalar_offset=_reg(len_i, b0 + i_b), indirect_dim=3)
        nisa.dma_copy(dst=new_state.ap(pattern=[[kw, pc], [P_MAX * kw, n_t], [1, kw]],
                                       offset=((b0 + i_b) * n_ch + c0) * kw), src=tail)


def _diag_weights(ident, w_sb, pc, dtype):
    """diag(w[:, i]) [128, K, 128] per tap (the stationaries of the tap matmuls) from w_sb [128, K] fp32."""
    kw = w_sb.shape[1]
    diag = nl.ndarray((P_MAX, kw, P_MAX), dtype=dtype, buffer=nl.sbuf)
    for i_k in range(kw):
        nisa.tensor_scalar(dst=diag[0:pc, i_k, 0:pc], data=ident[0:pc, 0:pc], op0=nl.multiply,
                           operand0=w_sb[0:pc, i_k:i_k + 1])
    return diag


def _taps_on_dve(hist, w_sb, y_sb, pc, n_b, act):
    """fp32: y_sb[:, b] = act(sum_i w[:, i] hist[:, b, 1 + i : 1 + i + T]), one VectorE multiply-add per tap."""
    seq = y_sb.shape[2]
    kw = w_sb.shape[1]
    acc = nl.ndarray((P_MAX, hist.shape[1], seq), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=acc[0:pc, 0:n_b], data=hist[0:pc, 0:n_b, 1:1 + seq], op0=nl.multiply,
                       operand0=w_sb[0:pc, 0:1])
    for i_k in range(1, kw):
        nisa.scalar_tensor_tensor(dst=acc[0:pc, 0:n_b], data=hist[0:pc, 0:n_b, 1 + i_k:1 + i_k + seq],
                                  op0=nl.multiply, operand0=w_sb[0:pc, i_k:i_k + 1], op1=nl.add,
                                  operand1=acc[0:pc, 0:n_b])
    nisa.activation(dst=y_sb[0:pc, 0:n_b], op=act, data=acc[0:pc, 0:n_b])


def _owned_channels(n_ch, pid, n_prog):
    """[lo, hi) of the channels program instance `pid` of `n_prog` owns: contiguous, ceil(C / n_prog) each."""
    per = (n_ch + n_prog - 1) // n_prog
    lo = min(n_ch, pid * per)
    return lo, min(n_ch, lo + per)


def _sequence_bounds(cu_seqlens, seq, kw):
    """cu_seqlens [N+1] (HBM int32) -> on-chip bounds of the packed sequences, every value clamped in-kernel
    (cu to [0, T] and non-decreasing) so the dynamic accesses they drive stay inside their tiles:
    start [1, N] int32 (s_n), end [1, N] int32 (e_n = s_n + L_n), short [1, N] int32 (min(L_n, K)) on partition 0
    (DMA offsets), and long [P, N] uint8 (L_n >= K) on every partition (predicates)."""
    f32, i32 = nl.float32, nl.int32
    n_seq = cu_seqlens.shape[0] - 1
    n1 = n_seq + 1
    cu_i = nl.ndarray((P_MAX, n1), dtype=i32, buffer=nl.sbuf)
    nisa.dma_copy(dst=cu_i, src=cu_seqlens.ap(pattern=[[0, P_MAX], [1, n1]], offset=0))   # on every partition
    nisa.tensor_scalar(dst=cu_i, data=cu_i, op0=nl.maximum, operand0=0, op1=nl.minimum, operand1=seq)
    cu_f = nl.ndarray((P_MAX, n1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cu_f, src=cu_i)
    ones = nl.ndarray((P_MAX, n1), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    cu_m = nl.ndarray((P_MAX, n1), dtype=f32, buffer=nl.sbuf)    # running max: non-decreasing
    nisa.tensor_tensor_scan(dst=cu_m, data0=ones, data1=cu_f, initial=0.0, op0=nl.multiply, op1=nl.maximum)
    length = nl.ndarray((P_MAX, n_seq), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=length, data1=cu_m[:, 1:n1], data2=cu_m[:, 0:n_seq], op=nl.subtract)
    long = nl.ndarray((P_MAX, n_seq), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=long, data=length, op0=nl.greater_equal, operand0=float(kw))
    start = nl.ndarray((1, n_seq), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=start, src=cu_m[0:1, 0:n_seq])
    end = nl.ndarray((1, n_seq), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=end, src=cu_m[0:1, 1:n1])
    short = nl.ndarray((1, n_seq), dtype=i32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=short, data=length[0:1, :], op0=nl.minimum, operand0=float(kw))
    return dict(start=start, end=end, short=short, long=long)


def _varlen_boundaries(hist, y_sb, rows, conv_state, new_state, w_sb, bounds, c0, pc, has_state, act):
    """Packed sequences (B = 1) of one channel tile, after the taps ran over the whole packed row: the first K - 1
    outputs of each sequence n are recomputed from its own history, and its new state is written.

    hist [P, 1, K + T + K]: input t at column K + t (zeros before and after); y_sb [P, 1, T + K]; both views of
    one tile of 4-D block tiles whose partition strides (elements) are rows = (hist row, y row). Per sequence
    (static loop; s_n, e_n, L_n from `bounds`, read on device into registers):
        win[:, n] = [conv_state[n] (zeros without a state) | inputs s_n .. s_n + K - 1]    ([P, N, 2K])
        y[s_n + t] = act(sum_i w_i win[:, n, 1 + t + i]) for t < K - 1, written over y_sb[:, s_n : s_n + K - 1] in
            the order n = 0 .. N - 1: a short sequence's extra columns belong to the next sequences, which write
            theirs after it (the last one's go to the K margin columns)
        new_state[n] = inputs e_n - K .. e_n - 1 = hist[:, e_n : e_n + K] when L_n >= K, else
            win[:, n, L_n : L_n + K] (part state, part inputs), chosen by select.
    Every dynamic offset is a clamped bound in [0, T] (or [0, K]) inside its tile."""
    kw = w_sb.shape[1]
    n_seq = bounds["start"].shape[1]
    row, y_row = rows
    win = nl.ndarray((P_MAX, n_seq, 2 * kw), dtype=hist.dtype, buffer=nl.sbuf)
    if has_state:
        nisa.dma_copy(dst=win[0:pc, :, 0:kw], src=conv_state[:, c0:c0 + pc].permute((1, 0, 2)))
    else:
        nisa.memset(dst=win[0:pc, :, 0:kw], value=0.0)
    for n in range(n_seq):
        nisa.dma_copy(dst=win[0:pc, n, kw:2 * kw],
                      src=hist[0:pc, 0].ap(pattern=[[row, pc], [1, kw]], offset=kw,
                                           scalar_offset=_reg(bounds["start"], n), indirect_dim=3))
    f32 = nl.float32
    acc = nl.ndarray((P_MAX, n_seq, kw - 1), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=acc[0:pc], data=win[0:pc, :, 1:kw], op0=nl.multiply, operand0=w_sb[0:pc, 0:1])
    for i_k in range(1, kw):
        nisa.scalar_tensor_tensor(dst=acc[0:pc], data=win[0:pc, :, 1 + i_k:kw + i_k], op0=nl.multiply,
                                  operand0=w_sb[0:pc, i_k:i_k + 1], op1=nl.add, operand1=acc[0:pc])
    y_b = nl.ndarray((P_MAX, n_seq, kw - 1), dtype=y_sb.dtype, buffer=nl.sbuf)
    nisa.activation(dst=y_b[0:pc], op=act, data=acc[0:pc])
    st_sb = nl.ndarray((P_MAX, n_seq, kw), dtype=hist.dtype, buffer=nl.sbuf)
    tail = nl.ndarray((P_MAX, n_seq, kw), dtype=hist.dtype, buffer=nl.sbuf)
    for n in range(n_seq):
        nisa.dma_copy(dst=y_sb[0:pc, 0].ap(pattern=[[y_row, pc], [1, kw - 1]], offset=0,
                                           scalar_offset=_reg(bounds["start"], n), indirect_dim=3),
                      src=y_b[0:pc, n])
        nisa.dma_copy(dst=st_sb[0:pc, n], src=hist[0:pc, 0].ap(pattern=[[row, pc], [1, kw]], offset=0,
                                                               scalar_offset=_reg(bounds["end"], n),
                                                               indirect_dim=3))
        nisa.dma_copy(dst=tail[0:pc, n], src=win[0:pc, n].ap(pattern=[[n_seq * 2 * kw, pc], [1, kw]], offset=0,
                                                             scalar_offset=_reg(bounds["short"], n),
                                                             indirect_dim=2))
    pred = bounds["long"].ap(pattern=[[n_seq, pc], [1, n_seq], [0, kw]], offset=0)
    nisa.tensor_copy_predicated(dst=tail[0:pc], src=st_sb[0:pc], predicate=pred)
    out = tail
    if new_state.dtype != hist.dtype:
        out = nl.ndarray((P_MAX, n_seq, kw), dtype=new_state.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out[0:pc], src=tail[0:pc])
    nisa.dma_copy(dst=new_state[:, c0:c0 + pc].permute((1, 0, 2)), src=out[0:pc])


def _reg(vals, n):
    """A register holding vals[0, n] (an int32 [1, N] SBUF tile): the scalar offset of one dynamic DMA."""
    r = nisa.register_alloc()
    nisa.register_load(r, vals[0:1, n:n + 1])
    return r


def _clamped_lengths(lengths, bsz, seq):
    """lengths [B] (HBM int32) -> SBUF [1, B] int32 clamped to [0, T] in-kernel: the dynamic state reads they
    drive stay inside each sequence's history row whatever the values."""
    len_i = nl.ndarray((1, bsz), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=len_i, src=lengths.ap(pattern=[[bsz, 1], [1, bsz]], offset=0))
    nisa.tensor_scalar(dst=len_i, data=len_i, op0=nl.maximum, operand0=0, op1=nl.minimum, operand1=seq)
    return len_i


def _identity(dtype):
    """I [128, 128] in `dtype` (GpSimd: ones, then keep the diagonal p == f)."""
    ones = nl.ndarray((P_MAX, P_MAX), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ident = nl.ndarray((P_MAX, P_MAX), dtype=dtype, buffer=nl.sbuf)
    nisa.affine_select(dst=ident, pattern=[[1, P_MAX]], offset=0, channel_multiplier=-1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.equal)
    return ident


def _taps_on_pe(hist, diag, y_sb, pc, n_b, act):
    """y_sb[:, b, cols] = act(sum_i w[:, i] hist[:, b, 1 + i + cols]) for the n_b sequences of hist: per PSUM bank of
    columns, K accumulating matmuls of diag(w[:, i]) against the shifted history, evicted through `act` by ScalarE.
    diag(w) is block diagonal: each 32-channel block runs on its own 32 x 32 PE tile (tile_position on the
    diagonal of the array), so the four blocks of a tile stream concurrently instead of through the full array
    (NeuronCore-v3+; on trn1, whose PE tiles are 64 / 128 rows, one full-array matmul per tap)."""
    seq = y_sb.shape[2]
    kw = diag.shape[1]
    tiles32 = current_target_name() not in NO_PE_TILE32_TARGETS
    for i_b in range(n_b):
        for i_j in range((seq + PSUM_FMAX_FP32 - 1) // PSUM_FMAX_FP32):
            j0 = i_j * PSUM_FMAX_FP32
            n = min(PSUM_FMAX_FP32, seq - j0)
            ps = nl.ndarray((P_MAX, PSUM_FMAX_FP32), dtype=nl.float32, buffer=nl.psum)
            for i_k in range(kw):
                if not tiles32:   # NeuronCore-v2: one matmul over the whole array per tap
                    nisa.nc_matmul(ps[0:pc, 0:n], diag[0:pc, i_k, 0:pc], hist[0:pc, i_b, 1 + i_k + j0:1 + i_k + j0 + n],
                                   accumulate=i_k > 0)
                    continue
                for r0 in range(0, pc, _PE_TILE):
                    r1 = min(pc, r0 + _PE_TILE)
                    nisa.nc_matmul(ps[r0:r1, 0:n], diag[r0:r1, i_k, r0:r1],
                                   hist[r0:r1, i_b, 1 + i_k + j0:1 + i_k + j0 + n], accumulate=i_k > 0,
                                   tile_position=(r0, r0), tile_size=(_PE_TILE, _PE_TILE))
            nisa.activation(dst=y_sb[0:pc, i_b, j0:j0 + n], op=act, data=ps[0:pc, 0:n])


@nki.jit
def causal_conv1d_update_kernel(x, conv_state, weight, apply_silu):
    """Decode form: channels on the partitions in contiguous blocks, (sequence, channel, tap) on the free dim.

    Dimensions:
        B batch, C channels, T new tokens (small), K taps; P = 128 partitions (64 when the state rows would be
        short, _update_partitions), CPP = C // P channels per partition (the C % P remainder channels go one
        per partition in a second group), NB sequences per chunk.
    Args:
        x: [B, C, T] @ HBM; conv_state: [B, C, K] @ HBM, updated in place to the last K inputs;
        weight: [C, K] @ HBM (broadcast over the sequences of a chunk by DMA).
    Returns:
        y: [B, C, T] @ HBM in x's dtype.
    Constraints:
        CPP * _update_bytes_per_channel(K, T) <= _UPDATE_SBUF_BYTES (checked by the wrapper).
    Pseudocode:
        for channel group (P partitions x CPP channels, then the remainder), for chunk of NB sequences:
          hist = [conv_state | x] ([P, NB, CPP, K + T]); w = weight[group] repeated NB times
          for t: y[..., t] = act(sum_i w[..., i] * hist[..., t + 1 + i]); conv_state = hist[..., T:T+K]
    Partition p of a group holds channels c0 + p CPP .. c0 + (p + 1) CPP - 1, so each DMA moves runs of
    CPP * K (state) or CPP * T (x, y) contiguous elements per (partition, sequence). With B on the free dim a
    B = 1 step uses 64 or 128 partitions (sequences on the partitions would use one).
    """
    bsz, n_ch, seq = x.shape
    kw = weight.shape[1]
    f32 = nl.float32
    y = nl.ndarray((bsz, n_ch, seq), dtype=x.dtype, buffer=nl.shared_hbm)
    cdt = x.dtype if x.dtype == nl.bfloat16 else f32     # bf16 rows run VectorE in its fast mode
    # LNC=2: each program instance owns a contiguous half of the channels (their x, y and state rows)
    c_lo, c_hi = _owned_channels(n_ch, nl.program_id(0), nl.num_programs(0))
    n_own = c_hi - c_lo
    n_p = _update_partitions(n_own, bsz, kw, seq, x.dtype == nl.bfloat16)
    groups = []
    if n_own >= n_p:
        groups.append((c_lo, n_p, n_own // n_p))
    if n_own % n_p:
        groups.append((c_hi - n_own % n_p, n_own % n_p, 1))
    for c0, n_p, cpp in groups:
        nb_max = max(1, min(bsz, _UPDATE_SBUF_BYTES // (cpp * _update_bytes_per_channel(kw, seq))))
        w_sb = nl.ndarray((n_p, nb_max, cpp, kw), dtype=cdt, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_sb, src=weight.ap(pattern=[[cpp * kw, n_p], [0, nb_max], [kw, cpp], [1, kw]],
                                              offset=c0 * kw))
        for i_b in range((bsz + nb_max - 1) // nb_max):
            _update_chunk(x, conv_state, y, w_sb, c0, n_p, cpp, i_b * nb_max, min(nb_max, bsz - i_b * nb_max),
                          apply_silu, cdt)
    return y


def _update_partitions(n_own, bsz, kw, seq, bf16):
    """Partitions the update form spreads its n_own channels over (shapes and target only): 128, or half of them
    when the conv-state rows would stay short at 128 (fewer, longer DMA packets: every DMA of the step touches each
    partition once, and the DMA engines take a fixed time per partition row below the target's packet knee,
    `hw.DMA_FULL_RATE_ROW_BYTES`; the VectorE work per partition doubles, so rows at or past the knee, which move at
    the full rate either way, stay on 128; below it, only under _UPDATE_ROW_BYTES) and one sequence's channels
    still fit _UPDATE_SBUF_BYTES."""
    isz = 2 if bf16 else 4
    row_bytes = bsz * max(1, n_own // P_MAX) * kw * isz
    knee = for_target(DMA_FULL_RATE_ROW_BYTES)
    fits = (n_own // (P_MAX // 2)) * _update_bytes_per_channel(kw, seq) <= _UPDATE_SBUF_BYTES
    return P_MAX // 2 if row_bytes < min(_UPDATE_ROW_BYTES, knee) and fits else P_MAX


def _update_chunk(x, conv_state, y, w_sb, c0, n_p, cpp, b0, nb, apply_silu, cdt):
    """Sequences b0 .. b0 + nb - 1 of one channel group (see causal_conv1d_update_kernel)."""
    seq = x.shape[2]
    kw = w_sb.shape[3]
    f32 = nl.float32
    rows = (c0, n_p, cpp, b0, nb)
    st = nl.ndarray((n_p, nb, cpp, kw), dtype=cdt, buffer=nl.sbuf)
    nisa.dma_copy(dst=st, src=_group_rows(conv_state, *rows))
    xt = nl.ndarray((n_p, nb, cpp, seq), dtype=cdt, buffer=nl.sbuf)
    nisa.dma_copy(dst=xt, src=_group_rows(x, *rows))
    hist = nl.ndarray((n_p, nb, cpp, kw + seq), dtype=cdt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=hist[:, :, :, 0:kw], src=st, engine=nisa.engine.gpsimd)
    nisa.tensor_copy(dst=hist[:, :, :, kw:kw + seq], src=xt)
    y_sb = nl.ndarray((n_p, nb, cpp, seq), dtype=x.dtype, buffer=nl.sbuf)
    for i_t in range(seq):
        prod = nl.ndarray((n_p, nb, cpp, kw), dtype=cdt, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=prod, data1=hist[:, :, :, 1 + i_t:1 + i_t + kw], data2=w_sb[:, 0:nb], op=nl.multiply)
        acc = nl.ndarray((n_p, nb, cpp), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=acc, op=nl.add, data=prod, axis=3)
        nisa.activation(dst=y_sb[:, :, :, i_t], op=nl.silu if apply_silu else nl.copy, data=acc)
    nisa.dma_copy(dst=_group_rows(y, *rows), src=y_sb)
    st_new = nl.ndarray((n_p, nb, cpp, kw), dtype=conv_state.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=st_new, src=hist[:, :, :, seq:seq + kw], engine=nisa.engine.gpsimd)
    nisa.dma_copy(dst=_group_rows(conv_state, *rows), src=st_new)


def _group_rows(t, c0, n_p, cpp, b0, nb):
    """View [n_p, nb, cpp, L] of t [B, C, L] (HBM): partition p holds channels c0 + p cpp .. + cpp - 1 of
    sequences b0 .. b0 + nb - 1 (cpp * L contiguous elements per partition and sequence)."""
    _, n_ch, n_l = t.shape
    return t.ap(pattern=[[cpp * n_l, n_p], [n_ch * n_l, nb], [n_l, cpp], [1, n_l]], offset=(b0 * n_ch + c0) * n_l)


def _update_bytes_per_channel(kw: int, seq: int) -> int:
    """SBUF bytes per (sequence, channel) of one update chunk, fp32 upper bound: w, state, new state and
    product (K each), x and y (T each), history (K + T), accumulator."""
    return 4 * (5 * kw + 3 * seq) + 4


def _check_common(name, x, weight, activation, bias):
    check_tensor(name, "x", x)
    check_tensor(name, "weight", weight)
    check_same_kind(name, {"x": x, "weight": weight})
    kernel_check(x.ndim == 3, f"{name}: x must be [B, C, T], got x.shape={tuple(x.shape)}")
    kernel_check(weight.ndim == 2, f"{name}: weight must be [C, K], got weight.shape={tuple(weight.shape)}")
    bsz, n_ch, seq = x.shape
    kernel_check(bsz >= 1 and n_ch >= 1, f"{name}: x must not be empty (B, C >= 1), got x.shape={tuple(x.shape)}")
    kw = weight.shape[1]
    kernel_check(weight.shape[0] == n_ch, f"{name}: weight must be [C={n_ch}, K], got {tuple(weight.shape)}")
    kernel_check(2 <= kw <= _MAX_KERNEL_WIDTH, f"{name}: kernel width K must be in [2, {_MAX_KERNEL_WIDTH}], "
                 f"got K={kw}")
    kernel_check(1 <= seq <= _MAX_SEQ, f"{name}: T must be in [1, {_MAX_SEQ}], got T={seq}")
    for arg, t in (("x", x), ("weight", weight)):
        kernel_check(_dtype_name(t) in _FLOAT_DTYPES, f"{name}: {arg} dtype must be one of {_FLOAT_DTYPES}, "
                     f"got {_dtype_name(t)}")
    kernel_check(activation in _ACTIVATIONS, f"{name}: activation must be one of {_ACTIVATIONS}, "
                 f"got activation={activation!r}")
    kernel_check(bias is None, f"{name}: bias is not supported (Qwen3.5/Next convs have none), got a bias")
    return bsz, n_ch, seq, kw


def causal_conv1d(x, weight, conv_state=None, valid_lengths=None, activation="silu", bias=None, cu_seqlens=None,
                  lnc=None):
    """Prefill: y = act(causal depthwise conv(x)), and the new conv state (the last K valid inputs).

    x [B, C, T]; weight [C, K]; conv_state [B, C, K] (the K inputs before x; zeros when None);
    valid_lengths [B] (right padding: the new state ends at input valid_lengths[b] - 1).
    cu_seqlens [N+1] ints (0 = cu[0] <= ... <= cu[N] = T): B = 1 and x holds N sequences end to end; conv_state
    and the new state are then [N, C, K] (the project's conv-state layout, one row per sequence); validated on
    the host before the launch (input validation only: the kernel reads the values on device).
    Returns (y [B, C, T] in x's dtype, new_conv_state [B or N, C, K] in conv_state's dtype, else x's).
    lnc: 1 or 2 program instances (None: `resolve_lnc`, 2 on trn2); under LNC=2 each core owns half the channels.
    """
    name = "causal_conv1d"
    lnc = check_causal_conv1d(x, weight, conv_state, valid_lengths, activation, bias, cu_seqlens, lnc)
    bsz, n_ch, seq = x.shape
    varlen = cu_seqlens is not None
    cu_arg = check_cu_seqlens(name, cu_seqlens, seq, max_seqs=_MAX_SEQS) if varlen else np.zeros(2, dtype=np.int32)
    has_state = conv_state is not None
    state = conv_state if has_state else _zeros_like(x, ((cu_arg.size - 1) if varlen else bsz, n_ch, weight.shape[1]))
    if valid_lengths is None:
        lengths = np.full(bsz, seq, dtype=np.int32)
    else:
        lengths = check_lengths(name, valid_lengths, bsz, seq)
    return call(causal_conv1d_kernel, x, weight, state, lengths, cu_arg, has_state=has_state, in_place=False,
                apply_silu=activation is not None, varlen=varlen, lnc=lnc)


def check_causal_conv1d(x, weight, conv_state=None, valid_lengths=None, activation="silu", bias=None,
                        cu_seqlens=None, lnc=None) -> int:
    """`causal_conv1d`'s checks that read no tensor values (shapes, dtypes, options, N from cu_seqlens' shape),
    so that torch_ops' fake runs them at trace time; the values of valid_lengths and cu_seqlens are checked by
    the wrapper. Returns the resolved lnc."""
    name = "causal_conv1d"
    lnc = resolve_lnc(lnc, name)
    bsz, n_ch, seq, kw = _check_common(name, x, weight, activation, bias)
    n_states, lead = bsz, "B"
    if cu_seqlens is not None:
        n_states, lead = cu_seqlens_count(name, cu_seqlens, _MAX_SEQS), "N"
        kernel_check(bsz == 1, f"{name}: with cu_seqlens the sequences are packed along T and B must be 1, "
                     f"got B={bsz}")
        kernel_check(valid_lengths is None, f"{name}: valid_lengths and cu_seqlens are exclusive (packed "
                     f"sequences have no padding), got valid_lengths={valid_lengths!r}")
    if conv_state is not None:
        check_tensor(name, "conv_state", conv_state)
        check_same_kind(name, {"x": x, "weight": weight, "conv_state": conv_state})
        kernel_check(tuple(conv_state.shape) == (n_states, n_ch, kw), f"{name}: conv_state must be [{lead}, C, K]="
                     f"{(n_states, n_ch, kw)}, got {tuple(conv_state.shape)}")
        kernel_check(_dtype_name(conv_state) in _FLOAT_DTYPES, f"{name}: conv_state must be a float tensor, "
                     f"got {_dtype_name(conv_state)}")
    return lnc


def causal_conv1d_update(x, conv_state, weight, activation="silu", bias=None, lnc=None):
    """Decode form (transformers' causal_conv1d_update): y for the T new inputs; conv_state [B, C, K]
    is updated in place to the last K inputs. Returns y [B, C, T] in x's dtype.
    lnc: 1 or 2 program instances (None: `resolve_lnc`, 2 on trn2); under LNC=2 each core owns half the channels.
    """
    lnc = check_causal_conv1d_update(x, conv_state, weight, activation, bias, lnc)
    return call(causal_conv1d_update_kernel, x, conv_state, weight, apply_silu=activation is not None, lnc=lnc,
                inplace=("conv_state",))


def check_causal_conv1d_update(x, conv_state, weight, activation="silu", bias=None, lnc=None) -> int:
    """`causal_conv1d_update`'s checks (shapes, dtypes, options, the SBUF fit; no values), which torch_ops' fake
    runs too. Returns the resolved lnc."""
    name = "causal_conv1d_update"
    lnc = resolve_lnc(lnc, name)
    bsz, n_ch, seq, kw = _check_common(name, x, weight, activation, bias)
    check_tensor(name, "conv_state", conv_state)
    check_same_kind(name, {"x": x, "weight": weight, "conv_state": conv_state})
    kernel_check(getattr(conv_state, "ndim", None) == 3 and tuple(conv_state.shape) == (bsz, n_ch, kw),
                 f"{name}: conv_state must be [B, C, K]={(bsz, n_ch, kw)}, got "
                 f"{tuple(getattr(conv_state, 'shape', ()))}")
    kernel_check(_dtype_name(conv_state) in _FLOAT_DTYPES, f"{name}: conv_state must be a float tensor, "
                 f"got {_dtype_name(conv_state)}")
    cpp = max(1, n_ch // P_MAX)
    kernel_check(cpp * _update_bytes_per_channel(kw, seq) <= _UPDATE_SBUF_BYTES,
                 f"{name}: max(1, C // 128) * (4 (5 K + 3 T) + 4) must be <= {_UPDATE_SBUF_BYTES} bytes (one "
                 f"sequence's channels per partition), got C={n_ch}, K={kw}, T={seq}; "
                 + ("use causal_conv1d for long T" if seq > 1 else "use fewer channels per launch"))
    return lnc


def _zeros_like(x, shape):
    if isinstance(x, np.ndarray):
        return np.zeros(shape, dtype=x.dtype)
    import torch
    return torch.zeros(shape, dtype=x.dtype)
