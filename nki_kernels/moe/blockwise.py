"""Blockwise MoE (prefill / context encoding) for many small experts, with the fused sigmoid-gated shared expert.

Consumes NxDI's blockwise contract (`moe_block_mapping`): block b holds up to B token ids of one local expert
`block_to_expert[b]`; every block loads its expert's weights once by dynamic DMA, gathers its tokens, runs
gate/up + SiLU + down, scales by the routing weight and scatter-adds into the token's output row.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..validation import kernel_check
from ._tiles import (TOK_TILE, down_proj, intermediate_split, load_down, load_gate_up, load_gate_vector,
                     shared_rows, swiglu, transpose_tokens)

# ---- constraints
_MAX_BLOCK = 512            # tokens per block (NxDI's largest tested block is 1024; 512 keeps SBUF small)
_MIN_H, _MAX_H = P_MAX, 8192   # H must be a multiple of 128 (hidden rows split over the partitions)
_MAX_EXPERTS = 1024         # local experts (ids are int32; 512 is the largest model: Qwen3-Next)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# SBUF budget of one expert's weights (bytes per partition): gate_up n_h * 2I + down n_i * H elements, kept under
# half the trn2 partition so the next block's weights can stream in while this one computes.
_MAX_WEIGHT_BYTES_PP = 96 * 1024


@nki.jit
def moe_blockwise_kernel(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert,
                         shared_gate_up, shared_down, shared_gate, top_k_index, block_size, expert_offset):
    """Blockwise expert MLPs + fused shared expert; returns per-core partial outputs.

    Dimensions:
        T tokens, H hidden (multiple of 128), E local experts, I expert intermediate, Is shared intermediate,
        TOPK experts per token, B = block_size, N blocks, C = number of programs (LNC).
    Args:
        hidden: [T, H] @ HBM, bf16/fp16/fp32.
        expert_affinities: [T * E, 1] @ HBM (dense affinities, row-major [T, E]) when top_k_index is None,
            else the top-k weights [T, TOPK] @ HBM.
        gate_up: [E, H, 2, I] @ HBM (gate columns then up columns), hidden's dtype.
        down: [E, I, H] @ HBM.
        token_position_to_id: [N * B] int32 @ HBM, token id per block slot, -1 for padding.
        block_to_expert: [N] int32 @ HBM, local expert of each block.
        shared_gate_up: [H, 2, Is] @ HBM or None; shared_down: [Is, H] @ HBM; shared_gate: [H] @ HBM.
        top_k_index: [T, TOPK] int32 @ HBM (global expert ids) or None.
        block_size: B (trace-time constant). expert_offset: global id of local expert 0 (constant).
    Returns:
        out: [T, C, H] @ HBM in hidden's dtype (NxD's [T, 2, H] accumulation layout); program c writes only
            out[:, c]; the output is the sum over c.
    Constraints:
        H % 128 == 0; I = ic * ceil(I / 128) (ic <= 128); B <= _MAX_BLOCK; token ids in a block are distinct.
    Pseudocode:
        for each row chunk r (128 tokens): out[r, c] = shared(x[r]) if r % C == c (and a shared expert) else 0
        for each block b with b % C == c:
            e = block_to_expert[b]                                       # runtime value, SBUF int32
            Wgu = gate_up[e], Wd = down[e]                               # 2 dynamic DMAs (scalar_offset)
            for each chunk of <= 128 slots: ids = token_position_to_id[slots]
                x = hidden[ids]                                          # gather, -1 skipped
                a = affinity(ids, e)                                     # gather from dense / top-k rows
                xT = PE transposes of x; h = a * silu(xT.T Wg) * (xT.T Wu); y = h Wd
                out[ids, c] += y                                         # dma_compute scatter-add, -1 skipped
    """
    n_tokens, h_total = hidden.shape
    n_local = gate_up.shape[0]
    n_blocks = block_to_expert.shape[0]
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    n_h = h_total // P_MAX
    out = nl.ndarray((n_tokens, n_prog, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)

    # ---- phase 1: this core's partial starts as the shared-expert term on its row chunks, zero elsewhere
    n_row_chunks = (n_tokens + TOK_TILE - 1) // TOK_TILE
    zero_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.memset(dst=zero_sb, value=0.0)
    if shared_gate_up is not None:
        s_wgu_sb = load_gate_up(shared_gate_up)
        s_wd_sb = load_down(shared_down)
        s_wsg_sb = load_gate_vector(shared_gate)
    for i_r in range(n_row_chunks):
        t0 = i_r * TOK_TILE
        n_tok = min(TOK_TILE, n_tokens - t0)
        if shared_gate_up is not None and i_r % n_prog == pid:
            y_sb = shared_rows(hidden, t0, n_tok, s_wgu_sb, s_wd_sb, s_wsg_sb, hidden.dtype)
            nisa.dma_copy(dst=out[t0:t0 + n_tok, pid, :], src=y_sb[0:n_tok, :])
        else:
            nisa.dma_copy(dst=out[t0:t0 + n_tok, pid, :], src=zero_sb[0:n_tok, :])

    # ---- phase 2: the blocks of this core
    for i_b in range(pid, n_blocks, n_prog):
        _one_block(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, top_k_index,
                   out, pid, i_b, block_size, expert_offset, n_local, n_h)
    return out


def _one_block(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, top_k_index,
               out, pid, i_b, block_size, expert_offset, n_local, n_h):
    n_tokens, h_total = hidden.shape
    # the block's expert id, broadcast to every partition (stride-0 partition read of one int32)
    e_sb = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=e_sb, src=block_to_expert.ap(pattern=[[0, P_MAX], [1, 1]], offset=i_b))
    wgu_sb = load_gate_up(gate_up, e_sb[0:1, 0:1])
    wd_sb = load_down(down, e_sb[0:1, 0:1])
    if top_k_index is not None and expert_offset != 0:
        eg_sb = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=eg_sb, data=e_sb, op0=nl.add, operand0=expert_offset)
    else:
        eg_sb = e_sb
    for s0 in range(0, block_size, TOK_TILE):
        n_tok = min(TOK_TILE, block_size - s0)
        ids_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=ids_sb[0:n_tok, :],
                      src=token_position_to_id.ap(pattern=[[1, n_tok], [1, 1]], offset=i_b * block_size + s0))
        x_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb[0:n_tok, :],
                      src=hidden.ap(pattern=[[h_total, n_tok], [1, h_total]], offset=0,
                                    vector_offset=ids_sb[0:n_tok, :], indirect_dim=0),
                      oob_mode=nisa.oob_mode.skip)
        if top_k_index is None:
            aff_sb = _dense_affinity(expert_affinities, ids_sb, e_sb, n_tok, n_local)
        else:
            aff_sb = _topk_affinity(expert_affinities, top_k_index, ids_sb, eg_sb, n_tok)
        xT_sb = transpose_tokens(x_sb, n_tok, n_h)
        h_sb = swiglu(xT_sb, n_tok, wgu_sb, aff_sb)
        y_sb = down_proj(h_sb, n_tok, wd_sb, hidden.dtype)
        # row id of token t in this core's partial: t * C + pid (a -1 id lands below 0 and is skipped)
        rows = out.ap(pattern=[[out.shape[1] * h_total, n_tok], [1, h_total]], offset=pid * h_total,
                      vector_offset=ids_sb[0:n_tok, :], indirect_dim=0)
        nisa.dma_compute(dst=rows, srcs=(rows, y_sb[0:n_tok, :]), reduce_op=nl.add, oob_mode=nisa.oob_mode.skip)


def _dense_affinity(aff_flat, ids_sb, e_sb, n_tok, n_local):
    """(n_tok, 1) fp32: aff[id * E + e] gathered by DMA; -1 ids give a negative index and are skipped."""
    flat_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=flat_sb[0:n_tok, :], data=ids_sb[0:n_tok, :], op0=nl.multiply, operand0=n_local)
    nisa.tensor_tensor(dst=flat_sb[0:n_tok, :], data1=flat_sb[0:n_tok, :], data2=e_sb[0:n_tok, :], op=nl.add)
    aff_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=aff_sb[0:n_tok, :],
                  src=aff_flat.ap(pattern=[[1, n_tok], [1, 1]], offset=0, vector_offset=flat_sb[0:n_tok, :],
                                  indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    return aff_sb


def _topk_affinity(top_k_weights, top_k_index, ids_sb, eg_sb, n_tok):
    """(n_tok, 1) fp32: sum_j w[id, j] * (idx[id, j] == e_global), from the gathered top-k rows."""
    top_k = top_k_index.shape[1]
    idx_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx_sb[0:n_tok, :],
                  src=top_k_index.ap(pattern=[[top_k, n_tok], [1, top_k]], offset=0,
                                     vector_offset=ids_sb[0:n_tok, :], indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    w_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb[0:n_tok, :],
                  src=top_k_weights.ap(pattern=[[top_k, n_tok], [1, top_k]], offset=0,
                                       vector_offset=ids_sb[0:n_tok, :], indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    sel_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb[0:n_tok, :], data=idx_sb[0:n_tok, :], op0=nl.equal, operand0=eg_sb[0:n_tok, :])
    nisa.tensor_tensor(dst=sel_sb[0:n_tok, :], data1=sel_sb[0:n_tok, :], data2=w_sb[0:n_tok, :], op=nl.multiply)
    aff_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=aff_sb[0:n_tok, :], op=nl.add, data=sel_sb[0:n_tok, :], axis=1)
    return aff_sb


@nki.jit
def moe_combine_kernel(partials):
    """out [T, H] = partials[:, 0] + partials[:, 1] (the two LNC=2 partial outputs); program c sums row chunks
    r with r % C == c.

    Args:
        partials: [T, 2, H] @ HBM.
    Returns:
        out: [T, H] @ HBM, partials' dtype.
    """
    n_tokens, _, h_total = partials.shape
    out = nl.ndarray((n_tokens, h_total), dtype=partials.dtype, buffer=nl.shared_hbm)
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    n_row_chunks = (n_tokens + TOK_TILE - 1) // TOK_TILE
    for i_r in range(pid, n_row_chunks, n_prog):
        t0 = i_r * TOK_TILE
        n_tok = min(TOK_TILE, n_tokens - t0)
        a_sb = nl.ndarray((TOK_TILE, h_total), dtype=partials.dtype, buffer=nl.sbuf)
        b_sb = nl.ndarray((TOK_TILE, h_total), dtype=partials.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_sb[0:n_tok, :], src=partials[t0:t0 + n_tok, 0, :])
        nisa.dma_copy(dst=b_sb[0:n_tok, :], src=partials[t0:t0 + n_tok, 1, :])
        nisa.tensor_tensor(dst=a_sb[0:n_tok, :], data1=a_sb[0:n_tok, :], data2=b_sb[0:n_tok, :], op=nl.add)
        nisa.dma_copy(dst=out[t0:t0 + n_tok, :], src=a_sb[0:n_tok, :])
    return out


# ---------------------------------------------------------------------------------------------- host wrapper


def _np(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def _dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "")


def _shape(x):
    return tuple(int(s) for s in x.shape)


def check_weights(kname, hidden, gate_up, down, shared):
    """Shared validation of hidden / expert weights / shared expert (moe_blockwise and moe_decode)."""
    kernel_check(getattr(hidden, "ndim", 0) == 2, f"{kname}: hidden must be [T, H], got shape={_shape(hidden)}")
    n_tokens, h_total = _shape(hidden)
    kernel_check(n_tokens >= 1, f"{kname}: need at least one token, got T={n_tokens}")
    kernel_check(h_total % P_MAX == 0 and _MIN_H <= h_total <= _MAX_H,
                 f"{kname}: H must be a multiple of {P_MAX} in [{_MIN_H}, {_MAX_H}], got H={h_total}")
    kernel_check(_dtype_name(hidden) in _FLOAT_DTYPES,
                 f"{kname}: hidden dtype must be one of {_FLOAT_DTYPES}, got dtype={hidden.dtype}")
    kernel_check(getattr(gate_up, "ndim", 0) == 4 and _shape(gate_up)[1:3] == (h_total, 2),
                 f"{kname}: gate_up must be [E, H={h_total}, 2, I], got shape={_shape(gate_up)}")
    n_local, _, _, n_inter = _shape(gate_up)
    kernel_check(1 <= n_local <= _MAX_EXPERTS, f"{kname}: E must be in [1, {_MAX_EXPERTS}], got E={n_local}")
    kernel_check(_shape(down) == (n_local, n_inter, h_total),
                 f"{kname}: down must be [E={n_local}, I={n_inter}, H={h_total}], got shape={_shape(down)}")
    for name, w in (("gate_up", gate_up), ("down", down)):
        kernel_check(w.dtype == hidden.dtype, f"{kname}: {name} dtype must equal hidden's {hidden.dtype}, "
                     f"got {w.dtype}")
    _check_inter(kname, "I", n_inter, h_total, hidden)
    if shared is not None:
        kernel_check(isinstance(shared, (tuple, list)) and len(shared) == 3,
                     f"{kname}: shared must be (gate_up [H, 2, Is], down [Is, H], gate [H]), got {type(shared)}")
        s_gu, s_dn, s_g = shared
        kernel_check(getattr(s_gu, "ndim", 0) == 3 and _shape(s_gu)[:2] == (h_total, 2),
                     f"{kname}: shared gate_up must be [H={h_total}, 2, Is], got shape={_shape(s_gu)}")
        n_sh = _shape(s_gu)[2]
        kernel_check(_shape(s_dn) == (n_sh, h_total),
                     f"{kname}: shared down must be [Is={n_sh}, H={h_total}], got shape={_shape(s_dn)}")
        kernel_check(_shape(s_g) == (h_total,), f"{kname}: shared gate must be [H={h_total}], got shape={_shape(s_g)}")
        for name, w in (("shared gate_up", s_gu), ("shared down", s_dn), ("shared gate", s_g)):
            kernel_check(w.dtype == hidden.dtype, f"{kname}: {name} dtype must equal hidden's {hidden.dtype}, "
                         f"got {w.dtype}")
        _check_inter(kname, "Is", n_sh, h_total, hidden)


def _check_inter(kname, label, n_inter, h_total, hidden):
    ic, n_i = intermediate_split(n_inter)
    kernel_check(n_inter >= 1 and ic is not None,
                 f"{kname}: {label} must split into ceil({label}/128) equal chunks of <= 128 rows "
                 f"({label} % ceil({label}/128) == 0), got {label}={n_inter}")
    item = 4 if _dtype_name(hidden) == "float32" else 2
    per_pp = (h_total // P_MAX * 2 * n_inter + n_i * h_total) * item
    kernel_check(per_pp <= _MAX_WEIGHT_BYTES_PP,
                 f"{kname}: one expert's weights take {per_pp} B per partition (H={h_total}, {label}={n_inter}), "
                 f"above {_MAX_WEIGHT_BYTES_PP} B; shard {label} further (tensor parallelism)")


def moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
                  shared=None, top_k_index=None, expert_offset: int = 0, lnc: int = 1):
    """Blockwise MoE on NxDI's mapping, with the optional fused sigmoid-gated shared expert.

    Dimensions:
        T tokens, H hidden, E local experts, I expert intermediate, Is shared intermediate, TOPK, B = block_size,
        N blocks.
    Args:
        hidden: [T, H] @ HBM, bf16/fp16/fp32.
        expert_affinities: dense [T, E] (local expert columns), or the top-k weights [T, TOPK] when top_k_index
            is given.
        gate_up: [E, H, 2, I] @ HBM (NxDI per-rank layout; gate then up). down: [E, I, H] @ HBM.
        token_position_to_id: [N * B] int32, -1 padding; block_to_expert: [N] int32 local ids
            (from `moe_block_mapping`).
        block_size: B, 1 <= B <= 512.
        shared: optional (gate_up [H, 2, Is], down [Is, H], gate vector [H]) of the shared expert, applied to
            every token: y += sigmoid(x . w_sg) * down_s(silu(gate_s x) * up_s x).
        top_k_index: [T, TOPK] int global expert ids (selects the top-k affinity form).
        expert_offset: expert parallelism; local expert l holds global expert expert_offset + l (the top-k ids
            are compared against expert_offset + l; the mapping must use the same offset).
        lnc: 1, or 2 (blocks alternate between the two cores, each writes its own partial [T, H]; a second
            LNC=2 launch adds the partials).
    Returns:
        [T, H] in hidden's dtype (NumPy or torch like the inputs).
    Constraints:
        H % 128 == 0 and 128 <= H <= 8192; I and Is split into ceil(I/128) equal chunks; one expert's weights
        <= 96 KiB per partition; mapping ids in range, each token at most once per block.
    Pseudocode:
        see moe_blockwise_kernel.
    """
    kname = "moe_blockwise"
    check_weights(kname, hidden, gate_up, down, shared)
    n_tokens, h_total = _shape(hidden)
    n_local = _shape(gate_up)[0]
    kernel_check(isinstance(block_size, (int, np.integer)) and 1 <= block_size <= _MAX_BLOCK,
                 f"{kname}: block_size must be an int in [1, {_MAX_BLOCK}], got block_size={block_size!r}")
    kernel_check(lnc in (1, 2), f"{kname}: lnc must be 1 or 2, got lnc={lnc}")
    kernel_check(isinstance(expert_offset, (int, np.integer)) and expert_offset >= 0,
                 f"{kname}: expert_offset must be a non-negative int, got expert_offset={expert_offset!r}")
    tpos, b2e = _np(token_position_to_id), _np(block_to_expert)
    kernel_check(tpos.ndim == 1 and np.issubdtype(tpos.dtype, np.integer),
                 f"{kname}: token_position_to_id must be a 1-D int array, got shape={tpos.shape}, dtype={tpos.dtype}")
    kernel_check(b2e.ndim == 1 and b2e.size >= 1 and np.issubdtype(b2e.dtype, np.integer),
                 f"{kname}: block_to_expert must be a non-empty 1-D int array, got shape={b2e.shape}")
    n_blocks = b2e.size
    kernel_check(tpos.size == n_blocks * block_size,
                 f"{kname}: token_position_to_id must hold N*B = {n_blocks}*{block_size} = {n_blocks * block_size} "
                 f"slots, got {tpos.size}")
    kernel_check(bool(np.all((b2e >= 0) & (b2e < n_local))),
                 f"{kname}: block_to_expert ids must be local expert ids in [0, E={n_local}), got "
                 f"min={int(b2e.min())}, max={int(b2e.max())}")
    kernel_check(bool(np.all((tpos >= -1) & (tpos < n_tokens))),
                 f"{kname}: token_position_to_id entries must be -1 or token ids in [0, T={n_tokens}), got "
                 f"min={int(tpos.min())}, max={int(tpos.max())}")
    blocks = tpos.reshape(n_blocks, block_size)
    for i_b in range(n_blocks):
        ids = blocks[i_b][blocks[i_b] >= 0]
        kernel_check(np.unique(ids).size == ids.size,
                     f"{kname}: block {i_b} lists a token more than once (ids {np.sort(ids).tolist()[:8]}...)")
    if top_k_index is None:
        kernel_check(_shape(expert_affinities) == (n_tokens, n_local),
                     f"{kname}: dense expert_affinities must be [T={n_tokens}, E={n_local}], got "
                     f"shape={_shape(expert_affinities)} (pass top_k_index for the [T, TOPK] form)")
        aff = expert_affinities.reshape(n_tokens * n_local, 1)
        idx = None
    else:
        kernel_check(getattr(top_k_index, "ndim", 0) == 2 and _shape(top_k_index)[0] == n_tokens,
                     f"{kname}: top_k_index must be [T={n_tokens}, TOPK], got shape={_shape(top_k_index)}")
        kernel_check(_shape(expert_affinities) == _shape(top_k_index),
                     f"{kname}: top-k expert_affinities must be [T, TOPK]={_shape(top_k_index)}, got "
                     f"shape={_shape(expert_affinities)}")
        aff, idx = expert_affinities, _as_int32(top_k_index)
    tpos32 = _as_int32(token_position_to_id)
    b2e32 = _as_int32(block_to_expert)
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    partials = call(moe_blockwise_kernel, hidden, aff, gate_up, down, tpos32, b2e32, s_gu, s_dn, s_g, idx,
                    int(block_size), int(expert_offset), lnc=lnc)
    if lnc == 1:
        return partials[:, 0]
    return call(moe_combine_kernel, partials, lnc=lnc)


def _as_int32(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.to(torch.int32).contiguous()
    except ImportError:  # pragma: no cover
        pass
    return np.ascontiguousarray(np.asarray(x).astype(np.int32))
