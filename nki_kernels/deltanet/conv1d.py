"""Causal depthwise conv1d (+ SiLU) before the gated delta rule: prefill and single-step update forms.

transformers layout: x [B, C, T] channels first, weight [C, K] (K = 4, `conv1d.weight.squeeze(1)`),
conv state [B, C, K] holding the last K inputs (transformers keeps K columns, not K - 1). Channels go on
the partitions (tiles of 128), time along the free dim; each tap is one VectorE instruction over the whole
row: y[c, t] = sum_i w[c, i] * in[c, t - (K - 1) + i], in = [conv_state | x].
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..validation import kernel_check

# ---------------------------------------------------------------- constraints
_MAX_KERNEL_WIDTH = 8             # taps K (Qwen3.5/Next use 4)
_MAX_SEQ = 16384                  # T: the whole [128, K + T] history row lives in SBUF (<= 32 KiB bf16)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_ACTIVATIONS = (None, "silu", "swish")


@nki.jit
def causal_conv1d_kernel(x, weight, conv_state, lengths, has_state, in_place, apply_silu):
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
    Returns:
        y: [B, C, T] @ HBM in x's dtype; new_state: [B, C, K] @ HBM in conv_state's dtype (omitted when in_place).
    Constraints:
        T <= _MAX_SEQ, K <= _MAX_KERNEL_WIDTH.
    Pseudocode:
        for b, channel tile: hist = [conv_state | x] ([P, K + T] SBUF)
          acc = sum_i w[:, i] * hist[:, 1 + i : 1 + i + T]; y = silu(acc)
          new_state = hist[:, L_b : L_b + K]   (dynamic DMA, L_b runtime)
    """
    bsz, n_ch, seq = x.shape
    kw = weight.shape[1]
    f32 = nl.float32
    y = nl.ndarray((bsz, n_ch, seq), dtype=x.dtype, buffer=nl.shared_hbm)
    new_state = conv_state if in_place else nl.ndarray((bsz, n_ch, kw), dtype=conv_state.dtype,
                                                       buffer=nl.shared_hbm)
    n_ct = (n_ch + P_MAX - 1) // P_MAX
    for i_b in nl.affine_range(bsz):
        len_i = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=len_i, src=lengths.ap(pattern=[[1, 1], [1, 1]], offset=i_b))
        for i_ct in nl.affine_range(n_ct):
            c0 = i_ct * P_MAX
            pc = min(P_MAX, n_ch - c0)
            w_sb = nl.ndarray((P_MAX, kw), dtype=f32, buffer=nl.sbuf)
            nisa.dma_copy(dst=w_sb[0:pc], src=weight[c0:c0 + pc])
            hist = nl.ndarray((P_MAX, kw + seq), dtype=x.dtype, buffer=nl.sbuf)
            if has_state:
                nisa.dma_copy(dst=hist[0:pc, 0:kw], src=conv_state[i_b, c0:c0 + pc])
            else:
                nisa.memset(dst=hist[0:pc, 0:kw], value=0.0)
            nisa.dma_copy(dst=hist[0:pc, kw:kw + seq], src=x[i_b, c0:c0 + pc])
            acc = nl.ndarray((P_MAX, seq), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=acc[0:pc], data=hist[0:pc, 1:1 + seq], op0=nl.multiply,
                               operand0=w_sb[0:pc, 0:1])
            for i_k in nl.static_range(1, kw):
                nisa.scalar_tensor_tensor(dst=acc[0:pc], data=hist[0:pc, 1 + i_k:1 + i_k + seq], op0=nl.multiply,
                                          operand0=w_sb[0:pc, i_k:i_k + 1], op1=nl.add, operand1=acc[0:pc])
            y_sb = nl.ndarray((P_MAX, seq), dtype=x.dtype, buffer=nl.sbuf)
            nisa.activation(dst=y_sb[0:pc], op=nl.silu if apply_silu else nl.copy, data=acc[0:pc])
            nisa.dma_copy(dst=y[i_b, c0:c0 + pc], src=y_sb[0:pc])
            # new state: inputs L_b - K .. L_b - 1 = hist columns L_b .. L_b + K - 1
            tail = hist[0:pc].ap(pattern=[[kw + seq, pc], [1, kw]], offset=0, scalar_offset=len_i,
                                 indirect_dim=1)
            nisa.dma_copy(dst=new_state[i_b, c0:c0 + pc], src=tail)
    if in_place:
        return y
    return y, new_state


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


def _check_common(name, x, weight, activation, bias):
    kernel_check(getattr(x, "ndim", None) == 3, f"{name}: x must be [B, C, T], got "
                 f"x.shape={tuple(getattr(x, 'shape', ()))}")
    kernel_check(getattr(weight, "ndim", None) == 2, f"{name}: weight must be [C, K], got "
                 f"weight.shape={tuple(getattr(weight, 'shape', ()))}")
    bsz, n_ch, seq = x.shape
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


def causal_conv1d(x, weight, conv_state=None, valid_lengths=None, activation="silu", bias=None, **kwargs):
    """Prefill: y = act(causal depthwise conv(x)), and the new conv state (the last K valid inputs).

    x [B, C, T]; weight [C, K]; conv_state [B, C, K] (the K inputs before x; zeros when None);
    valid_lengths [B] (right padding: the new state ends at input valid_lengths[b] - 1).
    Returns (y [B, C, T] in x's dtype, new_conv_state [B, C, K] in conv_state's dtype, else x's).
    """
    name = "causal_conv1d"
    bsz, n_ch, seq, kw = _check_common(name, x, weight, activation, bias)
    has_state = conv_state is not None
    if has_state:
        kernel_check(tuple(conv_state.shape) == (bsz, n_ch, kw), f"{name}: conv_state must be [B, C, K]="
                     f"{(bsz, n_ch, kw)}, got {tuple(conv_state.shape)}")
        kernel_check(_dtype_name(conv_state) in _FLOAT_DTYPES, f"{name}: conv_state must be a float tensor, "
                     f"got {_dtype_name(conv_state)}")
        state = conv_state
    else:
        state = _zeros_like(x, (bsz, n_ch, kw))
    if valid_lengths is None:
        lengths = np.full(bsz, seq, dtype=np.int32)
    else:
        lengths = np.asarray(valid_lengths.cpu() if hasattr(valid_lengths, "cpu") else valid_lengths)
        kernel_check(lengths.shape == (bsz,), f"{name}: valid_lengths must be [B]={bsz}, got shape {lengths.shape}")
        kernel_check(bool(np.all((lengths >= 0) & (lengths <= seq))),
                     f"{name}: valid_lengths must be in [0, T={seq}], got {lengths.tolist()}")
        lengths = lengths.astype(np.int32)
    return call(causal_conv1d_kernel, x, weight, state, lengths, has_state=has_state, in_place=False,
                apply_silu=activation is not None)


def causal_conv1d_update(x, conv_state, weight, activation="silu", bias=None, **kwargs):
    """Decode form (transformers' causal_conv1d_update): y for the T new inputs; conv_state [B, C, K]
    is updated in place to the last K inputs. Returns y [B, C, T] in x's dtype."""
    name = "causal_conv1d_update"
    bsz, n_ch, seq, kw = _check_common(name, x, weight, activation, bias)
    kernel_check(getattr(conv_state, "ndim", None) == 3 and tuple(conv_state.shape) == (bsz, n_ch, kw),
                 f"{name}: conv_state must be [B, C, K]={(bsz, n_ch, kw)}, got "
                 f"{tuple(getattr(conv_state, 'shape', ()))}")
    kernel_check(_dtype_name(conv_state) in _FLOAT_DTYPES, f"{name}: conv_state must be a float tensor, "
                 f"got {_dtype_name(conv_state)}")
    lengths = np.full(bsz, seq, dtype=np.int32)
    return call(causal_conv1d_kernel, x, weight, conv_state, lengths, has_state=True, in_place=True,
                apply_silu=activation is not None)


def _zeros_like(x, shape):
    if isinstance(x, np.ndarray):
        return np.zeros(shape, dtype=x.dtype)
    import torch
    return torch.zeros(shape, dtype=x.dtype)
