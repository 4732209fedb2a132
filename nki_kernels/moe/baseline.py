"""MoE token-generation baseline: NxD-style selective expert loading, what NxD runs when T * TOPK / E < 1.

Re-written from its public description (NxD `ExpertMLPsV2.forward`: with perc = T * k / E below 1.0, token
generation takes `forward_selective_loading`; only the routed experts' weights are read): every (token, choice)
pair reads its expert's weights and runs that expert on its token; no de-duplication across the batch (two
tokens that chose one expert read it twice), no cross-token batching. Kept beside the kernel it is measured
against (`moe_decode`), with the same validation and the same clamped on-device ids (no value can read outside
the weight tensors).

LNC=2: the tokens alternate between the two cores (core c runs tokens c, c + 2, ...); at T = 1 core 1 is idle.
"""
from __future__ import annotations

from ..backend import call, nki, nl
from ..lnc import resolve_lnc
from ..validation import kernel_check
from ._tiles import load_gate_up
from .blockwise import _as_int32, _shape, check_expert_offset, check_top_k, check_weights
from .decode import (_H_TILE, _alloc_hT, _down_T, _load_down_cols, _load_xT, _row_slots, _shared_first,
                     _store_out, _swiglu_T, check_decode_sbuf)


@nki.jit
def moe_selective_loading_kernel(hidden, top_k_index, top_k_weights, gate_up, down, shared_gate_up, shared_down,
                                 shared_gate, expert_offset):
    """Per token t (program t % C), per choice j: Wgu, Wd = gate_up[e], down[e] for e = idx[t, j] (made local
    and clamped to [0, E - 1]; a non-local id weighs 0), h = w[t, j] * silu(Wg^T x_t) * (Wu^T x_t),
    accT += Wd^T h (PSUM, fp32), plus the shared expert; out[t] = accT.

    Dimensions: T tokens, H hidden, E local experts, I, TOPK. Args as `moe_decode_kernel` (decode.py).
    Returns: out [T, H] @ HBM in hidden's dtype (each program writes its tokens' rows)."""
    n_tokens, h_total = hidden.shape
    n_local = gate_up.shape[0]
    top_k = top_k_index.shape[1]
    n_hc = h_total // _H_TILE
    out = nl.ndarray((n_tokens, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)
    for t in range(nl.program_id(0), n_tokens, nl.num_programs(0)):
        e_sb, w_all = _row_slots(top_k_index, top_k_weights, n_local, expert_offset, t)
        xT_sb, _ = _load_xT(hidden, 1, t, 1)
        acc_psum = nl.ndarray((_H_TILE, n_hc, 1), dtype=nl.float32, buffer=nl.psum)
        if shared_gate_up is not None:
            _shared_first(1, xT_sb, shared_gate_up, shared_down, shared_gate, acc_psum, 0, h_total, True,
                          (0, shared_down.shape[0]))
        for j in range(top_k):
            wgu_sb = load_gate_up(gate_up, e_sb[0:1, j:j + 1])
            wd_sb = _load_down_cols(down, e_sb[0:1, j:j + 1], 0, h_total)
            hT_sb = _alloc_hT(down, 1, 1)
            _swiglu_T(xT_sb, wgu_sb, w_all[:, j:j + 1], hT_sb, 0, 1)
            _down_T(hT_sb, 0, wd_sb, acc_psum, 1, True)
        _store_out(out, acc_psum, t, 1, 0, h_total, True)
    return out


def moe_selective_loading(hidden, top_k_index, top_k_weights, gate_up, down, shared=None, expert_offset: int = 0,
                          lnc=None):
    """Baseline MoE for token generation (T * TOPK / E < 1 in NxD): every (token, choice) reads its expert.

    Dimensions / Args / Returns as `nki_kernels.moe_decode` (same validation; T <= 32)."""
    kname = "moe_selective_loading"
    check_weights(kname, hidden, gate_up, down, shared)
    n_tokens = _shape(hidden)[0]
    check_top_k(kname, top_k_index, top_k_weights, n_tokens, hidden)
    check_expert_offset(kname, expert_offset, _shape(gate_up)[0])
    lnc = resolve_lnc(lnc, kname)
    kernel_check(n_tokens <= 32, f"{kname}: T must be <= 32 (token generation), got T={n_tokens}")
    check_decode_sbuf(kname, hidden, gate_up, down, shared, _shape(top_k_index)[1], 1)
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    return call(moe_selective_loading_kernel, hidden, _as_int32(top_k_index), top_k_weights, gate_up, down, s_gu,
                s_dn, s_g, int(expert_offset), lnc=lnc)
