"""Fused gated DeltaNet front end: causal conv1d + SiLU + q/k/v split + L2 norm + the chunked delta rule, one launch.

The Qwen3.5 / Qwen3-Next GatedDeltaNet layer (transformers 5.24) projects `mixed_qkv [B, T, conv_dim]`
(conv_dim = 2 Hk Dk + Hv Dv, channels [q | k | v]), runs a causal depthwise conv (K = 4 taps) + SiLU over time,
splits the result into q [B, T, Hk, Dk], k, v [B, T, Hv, Dv], and calls the chunked delta rule with the L2 norm
of q and k in the kernel. Unfused, the conv output makes a round trip through HBM (written by causal_conv1d, read
back by gated_delta_rule). Here each chunk of C tokens is loaded once, token-major as the projection writes it,
and the conv runs on chip (loop nest and costs in docs/deltanet.md, "Fused front end"):

    xin [C, ch] (tokens on partitions)  --TensorE transpose-->  hist [128 ch, K + C] (channels on partitions,
    the K inputs before the chunk in columns 0 .. K-1, from the conv state or the previous chunk)
    y [C, 128 ch] = sum_i hist[:, 1 + i : 1 + i + C]^T diag(w[:, i])    (K matmuls: back to tokens on partitions)
    q | k | v tiles = silu(y)  (ScalarE, the PSUM eviction), then the unfused kernel's chunk pipeline
    (chunk.run_pipeline: L2 norm, decays, solve, state recurrence) on those tiles.

The new conv state (the last K inputs, `[B, conv_dim, K]`, the project's conv-state layout) is written from hist.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX, PSUM_FMAX_FP32
from ..lnc import current_target_name, resolve_lnc
from ..transpose import mixing_pe_transpose, vector_transpose
from ..validation import check_bool, check_float, check_int, kernel_check
from . import chunk as _chunk
from ._checks import check_dtype, check_tensor, initial_state_arg
from ._checks import dtype_name as _dtype_name
from .conv1d import _identity

# ---------------------------------------------------------------- constraints
_MAX_KERNEL_WIDTH = 8             # conv taps K (Qwen3.5 / Next use 4), as causal_conv1d
# PSUM: a tap result [C, 128] fp32 is a quarter bank; 4 channel tiles share one bank per eviction
_TILES_PER_BANK = PSUM_FMAX_FP32 // P_MAX
# the tap matmuls contract over channels with a diagonal moving operand: each 32-channel block only meets its own
# 32 x 32 diagonal block, so they run on 32-row PE tiles (tile_position; NeuronCore-v3+), four at a time
_PE_ROW_TILE = 32
# 2-byte inputs reach the channel-major history by DMA transposes from HBM (TensorE stays free), else (and fp32
# inputs always) by a token-major load and TensorE transposes; modeled choice, docs/deltanet.md "Fused front end"
_DMA_TRANSPOSE = True
# SBUF per partition of the front end (diag(w) per tile and tap, the history row, the loaded chunk), per core: on
# top of the unfused kernel's tiles, whose owned-head limit is halved to leave room for it (the unfused kernel's
# lifetime upper bound at Hv * C = 1024 with 3 chunks in flight is 167.5 KB; + 40 KiB stays within trn2's 212984 B)
_MAX_FRONT_BYTES = 40 * 1024
# ceil(Hv / lnc) * C per core (bf16 / fp32 compute) by target (None: any other). trn1 (180224 B, LNC=1), measured on
# the emulator at Dk = Dv = 128, Hk = Hv, K = 4, bf16 inputs, T = C + 2: fp32 compute Hv = 7 at C = 128 fits, 8
# overflowed; bf16 compute Hv = 8 at C = 128 fits (fp32 inputs are held lower by _MAX_FRONT_BYTES)
_MAX_HV_CHUNK = {"bfloat16": {None: 1024}, "float32": {"trn1": 896, None: 1024}}


def _segments(n_hk, dk, n_hv, dv, kh_lo, kh_hi, hv_lo, hv_hi):
    """Owned channel ranges of mixed_qkv: [(global lo, hi)] for q, k, v (channels [q | k | v])."""
    q0, k0, v0 = 0, n_hk * dk, 2 * n_hk * dk
    return [(q0 + kh_lo * dk, q0 + kh_hi * dk), (k0 + kh_lo * dk, k0 + kh_hi * dk), (v0 + hv_lo * dv, v0 + hv_hi * dv)]


def _channel_tiles(segments):
    """Tiles of <= 128 channels, none straddling a segment: dicts seg, off (column in the segment), col (column in
    the loaded row, segments end to end), pc (channels), c0 (global channel)."""
    tiles, col = [], 0
    for i_s, (lo, hi) in enumerate(segments):
        for off in range(0, hi - lo, P_MAX):
            pc = min(P_MAX, hi - lo - off)
            tiles.append(dict(seg=i_s, off=off, col=col + off, pc=pc, c0=lo + off))
        col += hi - lo
    return tiles


def _groups(tiles):
    """Runs of <= _TILES_PER_BANK consecutive tiles of one segment with the same width (one PSUM bank, one
    eviction each): lists of tile indices."""
    groups = []
    for j, t in enumerate(tiles):
        last = groups[-1] if groups else None
        if (last and len(last) < _TILES_PER_BANK and tiles[last[0]]["seg"] == t["seg"]
                and tiles[last[0]]["pc"] == t["pc"]):
            last.append(j)
        else:
            groups.append([j])
    return groups


@nki.jit
def gated_delta_rule_fused_kernel(mixed_qkv, conv_weight, conv_state, g, beta, initial_state, consts, n_hk, dk,
                                  chunk, scale, use_l2norm, has_conv_state, has_initial_state, bf16_compute,
                                  row_tiles=False):
    """conv1d + SiLU + split + L2 norm + chunked gated delta rule over all (batch, head) pairs, one launch.

    Dimensions:
        B batch, T tokens, Hk q/k heads, Hv v heads, Dk (<= 128), Dv (<= 128), K taps,
        CH = conv_dim = 2 Hk Dk + Hv Dv (channels [q | k | v]), C chunk (64 or 128).
    Args:
        mixed_qkv: [B, T, CH] @ HBM, fp32/bf16/fp16 (the in_proj_qkv output, before the conv).
        conv_weight: [CH, K] @ HBM (any float dtype; rounded to mixed_qkv's dtype for the tap matmuls).
        conv_state: [B, CH, K] @ HBM in mixed_qkv's dtype, the K inputs before x (read when has_conv_state).
        g, beta: [B, T, Hv] @ HBM (any float dtype). initial_state: [B, Hv, Dk, Dv] fp32 (when has_initial_state).
        consts: [n_const, C, C] fp32, chunk._host_constants(C).
        n_hk, dk, chunk, scale, use_l2norm, has_conv_state, has_initial_state, bf16_compute: trace-time.
        row_tiles: trace-time; the target has 32-row PE tiles (NeuronCore-v3+: trn2, trn3).
    Returns:
        o [B, T, Hv, Dv] in mixed_qkv's dtype; final_state [B, Hv, Dk, Dv] fp32; new_conv_state [B, CH, K] in
        mixed_qkv's dtype (the last K inputs of each sequence, the conv state before it when T < K).
    LNC=2: each program instance owns a contiguous range of v heads (chunk._owned_heads) and loads the channels of
    its q/k heads and v heads; of a q/k head shared by both (a GVA group straddling the split) the conv state is
    written by the instance that owns the head's first v head.
    Pseudocode (per sequence b, per chunk; the rest is chunk.run_pipeline):
        xin = mixed_qkv[b, chunk rows, owned channels]          (one DMA per segment, rows contiguous)
        for each 128-channel tile: hist[:, j, K:K+C] = transpose(xin[:, tile])   (TensorE, ScalarE eviction)
        hist[:, :, 0:K] = conv_state[b] (first chunk) or the previous chunk's last K columns
        y[:, j] = sum_i hist[:, j, 1+i : 1+i+C]^T diag(w_j[:, i]);  q | k | v = silu(y)  (zero past T)
        last chunk: new_conv_state[b] = hist[:, :, n_tok : n_tok + K]
    """
    bsz, seq, conv_dim = mixed_qkv.shape
    kw = conv_weight.shape[1]
    n_hv_all = g.shape[2]
    dv = (conv_dim - 2 * n_hk * dk) // n_hv_all
    group = n_hv_all // n_hk
    n_chunks = (seq + chunk - 1) // chunk
    io_dt = mixed_qkv.dtype
    f32 = nl.float32
    o_all = nl.ndarray((bsz, seq, n_hv_all, dv), dtype=io_dt, buffer=nl.shared_hbm)
    final_all = nl.ndarray((bsz, n_hv_all, dk, dv), dtype=f32, buffer=nl.shared_hbm)
    conv_out = nl.ndarray((bsz, conv_dim, kw), dtype=io_dt, buffer=nl.shared_hbm)
    outs = (o_all, final_all, conv_out)
    hv_lo, hv_hi = _chunk._owned_heads(n_hv_all, nl.program_id(0), nl.num_programs(0))
    if hv_hi == hv_lo:
        return outs
    kh_lo, kh_hi = hv_lo // group, (hv_hi - 1) // group + 1
    g, beta = g[:, :, hv_lo:hv_hi], beta[:, :, hv_lo:hv_hi]
    if has_initial_state:
        initial_state = initial_state[:, hv_lo:hv_hi]
    segs = _segments(n_hk, dk, n_hv_all, dv, kh_lo, kh_hi, hv_lo, hv_hi)
    # conv-state rows this instance writes: its v channels, and the q/k heads whose first v head it owns
    own_kh = [kh for kh in range(kh_lo, kh_hi) if hv_lo <= kh * group < hv_hi]
    front = _FrontEnd(mixed_qkv, conv_weight, conv_state, g, beta, conv_out, segs, own_kh, kh_lo, dk, chunk,
                      has_conv_state, bf16_compute, row_tiles)
    dims = dict(n_hv=hv_hi - hv_lo, dk=dk, dv=dv, bsz=bsz, seq=seq, n_chunks=n_chunks, group=group,
                head_base=hv_lo, n_hk_all=n_hk, n_hv_all=n_hv_all, io_dtype=io_dt)
    opts = dict(chunk=chunk, scale=scale, use_l2norm=use_l2norm, has_initial_state=has_initial_state,
                checkpoint_every=0, n_ckpt=0, has_lengths=False, bf16_compute=bf16_compute, varlen=False,
                row_tiles=row_tiles)
    _chunk.run_pipeline((None, None, None, g, beta), None, None, consts, initial_state,
                        (o_all[:, :, hv_lo:hv_hi, :], final_all[:, hv_lo:hv_hi], None), dims, opts, loader=front.load)
    return outs


class _FrontEnd:
    """The on-chip conv front end of one program instance (trace-time helper; `load` is the pipeline's loader)."""

    def __init__(self, mixed_qkv, conv_weight, conv_state, g, beta, conv_out, segs, own_kh, kh_lo, dk, chunk,
                 has_conv_state, bf16_compute, row_tiles):
        self.x, self.state, self.g, self.beta, self.conv_out = mixed_qkv, conv_state, g, beta, conv_out
        self.segs, self.own_kh, self.kh_lo, self.dk, self.chunk = segs, own_kh, kh_lo, dk, chunk
        self.has_conv_state = has_conv_state
        self.seq = mixed_qkv.shape[1]
        self.kw = conv_weight.shape[1]
        self.io_dt = mixed_qkv.dtype
        # trn1: the TensorE transpose is an identity matmul (0 * NaN would reach every token of the chunk)
        self.vec_transpose = mixing_pe_transpose()
        self.cdt = nl.bfloat16 if self.io_dt == nl.bfloat16 and bf16_compute else nl.float32
        self.tiles = _channel_tiles(segs)
        self.groups = _groups(self.tiles)
        self.n_ch = sum(hi - lo for lo, hi in segs)
        n_t = len(self.tiles)
        self.conv_weight = conv_weight
        # compact: block g of a 128-channel tile at partitions 32g.., columns 0..31 (row-tiled taps), else full
        self.row_tiled = row_tiles and all(t["pc"] % _PE_ROW_TILE == 0 for t in self.tiles)
        width = _PE_ROW_TILE if self.row_tiled else P_MAX
        self.diag = nl.ndarray((P_MAX, n_t, self.kw, width), dtype=self.io_dt, buffer=nl.sbuf)
        self.diag_ready = False
        # the channel-major history row of a chunk: [the K inputs before it | its C inputs]; for 2-byte inputs two,
        # alternating by chunk, so the next chunk's DMA transposes need not wait for this chunk's tap matmuls
        n_hist = 2 if self.io_dt != nl.float32 and _DMA_TRANSPOSE else 1
        self.hists = [nl.ndarray((P_MAX, n_t, self.kw + chunk), dtype=self.io_dt, buffer=nl.sbuf)
                      for _ in range(n_hist)]
        self.hist = self.hists[0]
        self.len_f = None

    def _make_diag(self):
        """diag(w[:, i]) per channel tile and tap (the tap matmuls' moving operands), made once, at the first
        chunk's load: after the pipeline's constants, the gates and the first chunk's transposes (the DMA queue
        serves them first, so the first chunk's front end is not behind the weights). The weights come in one DMA
        per run of full 128-channel tiles of a segment (one per tile otherwise); row-tiled, diag(w) of a tile is
        E32 * w per tap, E32[p, c] = [p % 32 == c] (one instruction per tile and tap over all partitions)."""
        n_t, kw = len(self.tiles), self.kw
        w_sb = nl.ndarray((P_MAX, n_t, kw), dtype=nl.float32, buffer=nl.sbuf)
        j = 0
        while j < n_t:                        # runs of consecutive full tiles of one segment: one DMA each
            t = self.tiles[j]
            run = 1
            while (t["pc"] == P_MAX and j + run < n_t and self.tiles[j + run]["seg"] == t["seg"]
                   and self.tiles[j + run]["pc"] == P_MAX):
                run += 1
            pc = t["pc"]
            src = self.conv_weight[t["c0"]:t["c0"] + run * pc, :]
            if run > 1:
                src = src.reshape((run, pc, kw)).permute((1, 0, 2))
            nisa.dma_copy(dst=w_sb[0:pc, j:j + run, :], src=src)
            j += run
        ident = _identity(self.io_dt)
        if self.row_tiled:
            e32 = nl.ndarray((P_MAX, _PE_ROW_TILE), dtype=self.io_dt, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=e32, data1=ident[:, 0:_PE_ROW_TILE], data2=ident[:, _PE_ROW_TILE:2 * _PE_ROW_TILE],
                               op=nl.add, engine=nisa.engine.gpsimd)
            for p0 in range(2 * _PE_ROW_TILE, P_MAX, _PE_ROW_TILE):
                nisa.tensor_tensor(dst=e32, data1=e32, data2=ident[:, p0:p0 + _PE_ROW_TILE], op=nl.add,
                                   engine=nisa.engine.gpsimd)
            i_n = 0
            for j, t in enumerate(self.tiles):
                pc = t["pc"]
                for i_k in range(kw):
                    eng = nisa.engine.gpsimd if i_n % 2 == 0 else nisa.engine.vector
                    nisa.tensor_scalar(dst=self.diag[0:pc, j, i_k, :], data=e32[0:pc, :], op0=nl.multiply,
                                       operand0=w_sb[0:pc, j, i_k:i_k + 1], engine=eng)
                    i_n += 1
        else:
            for j, t in enumerate(self.tiles):
                pc = t["pc"]
                for i_k in range(kw):
                    nisa.tensor_scalar(dst=self.diag[0:pc, j, i_k, 0:pc], data=ident[0:pc, 0:pc], op0=nl.multiply,
                                       operand0=w_sb[0:pc, j, i_k:i_k + 1], engine=nisa.engine.gpsimd)
        self.diag_ready = True

    def load(self, i_b, i_c, t0, n_tok, per_seq):
        """(q, k [C, Hk_own, Dk] (bf16 for bf16 inputs, else the compute dtype), v [C, Hv_own, Dv] in the compute dtype,
        g, beta [C, Hv_own] fp32) of one chunk."""
        self.hist = self.hists[i_c % len(self.hists)]
        chunk, kw, hist = self.chunk, self.kw, self.hist
        f32 = nl.float32
        n_hv = self.g.shape[2]
        g_sb, beta_sb = _chunk._load_gates(self.g, self.beta, i_b, i_c, chunk, self.seq, per_seq)
        # the K inputs before the chunk: the conv state (or zeros) at a sequence's first chunk, else the previous
        # chunk's last K (a full chunk: only a sequence's last chunk is partial)
        if i_c == 0:
            if self.has_conv_state:
                for j, t in enumerate(self.tiles):
                    pc = t["pc"]
                    nisa.dma_copy(dst=hist[0:pc, j, 0:kw], src=self.state[i_b, t["c0"]:t["c0"] + pc, :])
            else:
                nisa.memset(dst=hist[:, :, 0:kw], value=0.0)
        else:
            prev = self.hists[(i_c - 1) % len(self.hists)]
            nisa.tensor_copy(dst=hist[:, :, 0:kw], src=prev[:, :, chunk:chunk + kw], engine=nisa.engine.gpsimd)
        self._transpose_in(i_b, t0, n_tok)
        if not self.diag_ready:
            self._make_diag()
        outs = self._taps(n_hv)
        if n_tok < chunk:                      # rows past T: q = k = v = 0 (by select: NaN-safe), as unfused
            if self.len_f is None:
                self.len_f = nl.ndarray((chunk, 1), dtype=f32, buffer=nl.sbuf)
                nisa.memset(dst=self.len_f, value=float(self.seq))
            _chunk._zero_pad_rows(outs, _chunk._valid_mask(self.len_f, t0, chunk))
        if t0 + n_tok == self.seq:
            self._store_state(i_b, n_tok)
        q_sb, k_sb, v_sb = outs
        return q_sb, k_sb, v_sb, g_sb, beta_sb

    def _transpose_in(self, i_b, t0, n_tok):
        """hist[:, :, K : K + n_tok] = the chunk's inputs, channels on the partitions. 2-byte inputs: DMA transposes
        from HBM (one per run of full 128-channel tiles; TensorE stays free); fp32: a token-major load, TensorE
        transposes (data moves: a NaN stays in its element) and ScalarE evictions. Columns past n_tok are zero."""
        chunk, kw, hist = self.chunk, self.kw, self.hist
        if n_tok < chunk:
            nisa.memset(dst=hist[:, :, kw:kw + chunk], value=0.0)
        if self.io_dt != nl.float32 and _DMA_TRANSPOSE:
            for grp, k_grp in self._transpose_runs():
                first = self.tiles[grp[0]]
                pc, c0, n_g = first["pc"], first["c0"], len(grp)
                if k_grp is None:
                    src = self.x[i_b, t0:t0 + n_tok, c0:c0 + n_g * pc].reshape((n_tok, n_g, pc))
                    nisa.dma_transpose(dst=hist[0:pc, grp[0]:grp[-1] + 1, kw:kw + n_tok], src=src, axes=(2, 1, 0))
                    continue
                # a q run and the k run of the same heads in one transpose: [tokens, (q, k), tiles, channels]
                k_first = self.tiles[k_grp[0]]
                conv_dim = self.x.shape[2]
                # .ap without offset= starts at the view's own offset (x[i_b, t0, c0]): "When None (the default),
                # the new view inherits the current view's storage offset" (aws-neuron-sdk nki/deep-dives/nki-aps.rst
                # and the NkiTensor.ap stub); an explicit offset= reads differently in the two, so none is passed
                src = self.x[i_b, t0:t0 + n_tok, c0:c0 + 1].ap(
                    pattern=[[conv_dim, n_tok], [k_first["c0"] - c0, 2], [pc, n_g], [1, pc]])
                step = k_grp[0] - grp[0]
                pair = hist[:, grp[0]:grp[0] + 2 * step, :].reshape((P_MAX, 2, step, kw + self.chunk))
                nisa.dma_transpose(dst=pair[0:pc, :, 0:n_g, kw:kw + n_tok], src=src, axes=(3, 1, 2, 0))
            return
        xin = nl.ndarray((chunk, self.n_ch), dtype=self.io_dt, buffer=nl.sbuf)
        if n_tok < chunk:
            nisa.memset(dst=xin, value=0.0)
        col = 0
        for lo, hi in self.segs:
            nisa.dma_copy(dst=xin[0:n_tok, col:col + hi - lo], src=self.x[i_b, t0:t0 + n_tok, lo:hi])
            col += hi - lo
        for grp in self.groups:
            pc = self.tiles[grp[0]]["pc"]
            tp_ps = nl.ndarray((P_MAX, _TILES_PER_BANK, chunk), dtype=self.io_dt, buffer=nl.psum)
            for i_g, j in enumerate(grp):
                c = self.tiles[j]["col"]
                if self.vec_transpose:
                    vector_transpose(tp_ps[0:pc, i_g, :], xin[:, c:c + pc])
                else:
                    nisa.nc_transpose(dst=tp_ps[0:pc, i_g, :], data=xin[:, c:c + pc])
            nisa.activation(dst=hist[0:pc, grp[0]:grp[-1] + 1, kw:kw + chunk], op=nl.copy,
                            data=tp_ps[0:pc, 0:len(grp), :])
            del tp_ps

    def _transpose_runs(self):
        """The DMA transposes of a chunk: (tile run, None) per run of tiles, except that a q run and the k run of the
        same heads (same widths) go as one (q run, k run): twice the bytes per partition row, and a DMA transpose's
        time is set by its row count at these row lengths (docs/deltanet.md "Fused front end")."""
        q_runs = [g for g in self.groups if self.tiles[g[0]]["seg"] == 0]
        k_runs = [g for g in self.groups if self.tiles[g[0]]["seg"] == 1]
        rest = [(g, None) for g in self.groups if self.tiles[g[0]]["seg"] == 2]
        same = len(q_runs) == len(k_runs) and all(
            len(a) == len(b) and all(self.tiles[x]["pc"] == self.tiles[y]["pc"] for x, y in zip(a, b))
            for a, b in zip(q_runs, k_runs))
        if not same:
            return [(g, None) for g in self.groups]
        runs = []
        for a, b in zip(q_runs, k_runs):      # the pair as a [P, 2, step, K + C] view of hist: inside its tiles
            runs.extend([(a, b)] if a[0] + 2 * (b[0] - a[0]) <= len(self.tiles) else [(a, None), (b, None)])
        return runs + rest

    def _taps(self, n_hv):
        """silu(causal conv) of the chunk in hist, tokens on the partitions: (q, k, v) tiles in the compute dtype."""
        chunk, kw, hist, dk = self.chunk, self.kw, self.hist, self.dk
        n_kh = (self.segs[0][1] - self.segs[0][0]) // dk
        dv = (self.segs[2][1] - self.segs[2][0]) // n_hv
        # bf16 inputs: q and k rounded to bf16 at the SiLU eviction (as the layer's bf16 conv output, and the unfused
        # pair's), so that with fp32 compute the prefill's products over Dk take them as exact bf16 operands
        # (chunk._raw_scalings); v stays in the compute dtype
        qk_dt = nl.bfloat16 if self.io_dt == nl.bfloat16 else self.cdt
        outs = (nl.ndarray((chunk, n_kh, dk), dtype=qk_dt, buffer=nl.sbuf),
                nl.ndarray((chunk, n_kh, dk), dtype=qk_dt, buffer=nl.sbuf),
                nl.ndarray((chunk, n_hv, dv), dtype=self.cdt, buffer=nl.sbuf))
        flat = [t.reshape((chunk, t.shape[1] * t.shape[2])) for t in outs]
        for grp in self.groups:
            first = self.tiles[grp[0]]
            pc = first["pc"]
            y_ps = nl.ndarray((chunk, _TILES_PER_BANK, P_MAX), dtype=nl.float32, buffer=nl.psum)
            for i_g, j in enumerate(grp):
                for i_k in range(kw):            # y[t, c] += x[t - K + 1 + i_k, c] w[c, i_k]
                    window = hist[:, j, 1 + i_k:1 + i_k + chunk]
                    if not self.row_tiled:
                        nisa.nc_matmul(y_ps[:, i_g, 0:pc], window[0:pc], self.diag[0:pc, j, i_k, 0:pc],
                                       accumulate=i_k > 0)
                        continue
                    for p0 in range(0, pc, _PE_ROW_TILE):     # 32-channel blocks on their own PE row tiles
                        rows = slice(p0, p0 + _PE_ROW_TILE)
                        nisa.nc_matmul(y_ps[:, i_g, rows], window[rows], self.diag[rows, j, i_k, :],
                                       accumulate=i_k > 0, tile_position=(p0, 0), tile_size=(_PE_ROW_TILE, chunk))
            off = first["off"]
            dst = flat[first["seg"]][:, off:off + len(grp) * pc].reshape((chunk, len(grp), pc))
            nisa.activation(dst=dst, op=nl.silu, data=y_ps[:, 0:len(grp), 0:pc])
            del y_ps
        return outs

    def _store_state(self, i_b, n_tok):
        """new_conv_state[b] = hist[:, :, n_tok : n_tok + K] (the last K inputs) for the channels this instance
        writes: every v tile, and the q / k rows of the heads in own_kh."""
        kw, dk = self.kw, self.dk
        for j, t in enumerate(self.tiles):
            pc, c0 = t["pc"], t["c0"]
            if t["seg"] == 2:
                nisa.dma_copy(dst=self.conv_out[i_b, c0:c0 + pc, :], src=self.hist[0:pc, j, n_tok:n_tok + kw])
                continue
            for kh in self.own_kh:               # rows of head kh inside this tile
                lo = max(t["off"], (kh - self.kh_lo) * dk)
                hi = min(t["off"] + pc, (kh - self.kh_lo + 1) * dk)
                if hi > lo:
                    p0 = lo - t["off"]
                    nisa.dma_copy(dst=self.conv_out[i_b, c0 + p0:c0 + p0 + hi - lo, :],
                                  src=self.hist[p0:p0 + hi - lo, j, n_tok:n_tok + kw])


def _owned_k_heads(n_hv, group, pid, n_prog):
    """q/k heads program instance `pid` loads (those of its v heads)."""
    lo, hi = _chunk._owned_heads(n_hv, pid, n_prog)
    return 0 if hi == lo else (hi - 1) // group - lo // group + 1


def front_end_bytes(n_ch, kw, chunk, io_bytes, row_tiles):
    """SBUF bytes per partition of the front end of one instance owning n_ch channels: diag(w) per 128-channel tile
    and tap (its 32 x 32 diagonal blocks with row tiles, else 128 x 128), the fp32 weights, the history rows (two
    when DMA transposes fill them) and the token-major chunk the TensorE transposes read (otherwise)."""
    n_t = -(-n_ch // P_MAX)
    width = _PE_ROW_TILE if row_tiles else P_MAX
    by_dma = io_bytes == 2 and _DMA_TRANSPOSE
    xin = 0 if by_dma else n_ch * io_bytes
    n_hist = 2 if by_dma else 1
    return n_t * (kw * width + n_hist * (kw + chunk)) * io_bytes + n_t * kw * 4 + xin


def gated_delta_rule_fused(mixed_qkv, conv_weight, g, beta, num_k_heads, head_k_dim, conv_state=None,
                           initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True, chunk_size=64,
                           scale=None, compute_dtype=None, valid_lengths=None, cu_seqlens=None, lnc=None):
    """conv1d + SiLU + q/k/v split + L2 norm + chunked gated delta rule in one launch (the conv output stays on chip).

    mixed_qkv [B, T, conv_dim] as the layer's in_proj_qkv writes it (channels [q | k | v], conv_dim = 2 Hk Dk +
    Hv Dv); conv_weight [conv_dim, K] (`conv1d.weight.squeeze(1)`, no bias); g, beta [B, T, Hv]; num_k_heads Hk and
    head_k_dim Dk split the channels (Hv from g, Dv = (conv_dim - 2 Hk Dk) / Hv); conv_state [B, conv_dim, K] in
    mixed_qkv's dtype (the K inputs before x; zeros when None); initial_state [B, Hv, Dk, Dv] fp32.
    Same as `causal_conv1d(mixed_qkv^T, conv_weight, conv_state)` (SiLU), split, then `gated_delta_rule(q, k, v, g,
    beta, ...)`. Returns (o [B, T, Hv, Dv] in mixed_qkv's dtype, final_state fp32 or None, new_conv_state
    [B, conv_dim, K] in mixed_qkv's dtype). valid_lengths and cu_seqlens are refused (use the unfused pair).
    lnc: 1 or 2 program instances (None: `resolve_lnc`, 2 on trn2); under LNC=2 each core owns half the v heads.
    """
    name = "gated_delta_rule_fused"
    lnc = resolve_lnc(lnc, name)
    for arg, x, nd in (("mixed_qkv", mixed_qkv, 3), ("conv_weight", conv_weight, 2), ("g", g, 3), ("beta", beta, 3)):
        check_tensor(name, arg, x)
        kernel_check(x.ndim == nd, f"{name}: {arg} must be {nd}-D, got {arg}.shape={tuple(x.shape)}")
        kernel_check(0 not in tuple(x.shape), f"{name}: {arg} must not be empty, got {arg}.shape={tuple(x.shape)}")
        check_dtype(name, arg, x)
    kernel_check(valid_lengths is None, f"{name}: valid_lengths is not supported by the fused front end (use "
                 f"causal_conv1d + gated_delta_rule), got valid_lengths={valid_lengths!r}")
    kernel_check(cu_seqlens is None, f"{name}: cu_seqlens is not supported by the fused front end (use "
                 f"causal_conv1d + gated_delta_rule, which take packed sequences), got cu_seqlens")
    bsz, seq, conv_dim = (int(s) for s in mixed_qkv.shape)
    n_hv = int(g.shape[2])
    hk = check_int(name, "num_k_heads", num_k_heads, lo=1)
    dk = check_int(name, "head_k_dim", head_k_dim, lo=1)
    kernel_check(hk >= 1 and n_hv % hk == 0, f"{name}: Hv (g.shape[2]) must be a multiple of num_k_heads, got "
                 f"Hv={n_hv}, num_k_heads={hk}")
    kernel_check(1 <= dk <= _chunk._MAX_HEAD_DIM, f"{name}: head_k_dim must be in [1, {_chunk._MAX_HEAD_DIM}], "
                 f"got head_k_dim={dk}")
    rest = conv_dim - 2 * hk * dk
    kernel_check(rest >= n_hv and rest % n_hv == 0, f"{name}: conv_dim - 2 num_k_heads head_k_dim must be a "
                 f"positive multiple of Hv (Hv Dv channels of v), got conv_dim={conv_dim}, num_k_heads={hk}, "
                 f"head_k_dim={dk}, Hv={n_hv}")
    dv = rest // n_hv
    kernel_check(dv <= _chunk._MAX_HEAD_DIM, f"{name}: Dv = (conv_dim - 2 Hk Dk) / Hv must be <= "
                 f"{_chunk._MAX_HEAD_DIM}, got Dv={dv}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(tuple(x.shape) == (bsz, seq, n_hv), f"{name}: {arg} must be [B, T, Hv]={(bsz, seq, n_hv)}, "
                     f"got {arg}.shape={tuple(x.shape)}")
    kw = int(conv_weight.shape[1])
    kernel_check(tuple(conv_weight.shape) == (conv_dim, kw) and 2 <= kw <= _MAX_KERNEL_WIDTH,
                 f"{name}: conv_weight must be [conv_dim={conv_dim}, K] with 2 <= K <= {_MAX_KERNEL_WIDTH}, got "
                 f"conv_weight.shape={tuple(conv_weight.shape)}")
    chunk_size = check_int(name, "chunk_size", chunk_size)
    kernel_check(chunk_size in _chunk._CHUNK_SIZES, f"{name}: chunk_size must be one of {_chunk._CHUNK_SIZES}, "
                 f"got chunk_size={chunk_size}")
    use_qk_l2norm_in_kernel = check_bool(name, "use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    output_final_state = check_bool(name, "output_final_state", output_final_state)
    if scale is not None:
        scale = check_float(name, "scale", scale, positive=True)
    kernel_check(compute_dtype in _chunk._COMPUTE_DTYPES, f"{name}: compute_dtype must be one of "
                 f"{_chunk._COMPUTE_DTYPES}, got compute_dtype={compute_dtype!r}")
    io = _dtype_name(mixed_qkv)
    bf16_compute = compute_dtype == "bfloat16" and io == "bfloat16"
    n_own = -(-n_hv // lnc)
    target = current_target_name()
    limit = _chunk.target_limit(_MAX_HV_CHUNK["bfloat16" if bf16_compute else "float32"], target)
    kernel_check(n_own * chunk_size <= limit, f"{name}: ceil(Hv / lnc) * chunk_size must be <= {limit} with "
                 f"{'bf16' if bf16_compute else 'fp32'} compute on {target} (SBUF per partition), got Hv={n_hv}, "
                 f"lnc={lnc}, chunk_size={chunk_size}; {_chunk.hv_chunk_advice(chunk_size, lnc, target)}")
    group = n_hv // hk
    n_ch_own = max(2 * _owned_k_heads(n_hv, group, pid, lnc) * dk + n_own * dv for pid in range(lnc))
    io_bytes = 4 if io == "float32" else 2
    row_tiles = target != "trn1"
    need = front_end_bytes(n_ch_own, kw, chunk_size, io_bytes, row_tiles)
    kernel_check(need <= _MAX_FRONT_BYTES, f"{name}: the conv front end needs {need} B of SBUF per partition for "
                 f"{n_ch_own} channels per core (diag(w) per 128 channels and tap), more than {_MAX_FRONT_BYTES}; "
                 f"got conv_dim={conv_dim}, K={kw}, lnc={lnc}, dtype {io}: "
                 f"{_chunk.hv_chunk_advice(None, lnc, target, 'heads')}")
    has_conv = conv_state is not None
    if has_conv:
        check_tensor(name, "conv_state", conv_state)
        kernel_check(tuple(conv_state.shape) == (bsz, conv_dim, kw), f"{name}: conv_state must be [B, conv_dim, K]="
                     f"{(bsz, conv_dim, kw)}, got {tuple(conv_state.shape)}")
        kernel_check(_dtype_name(conv_state) == io, f"{name}: conv_state dtype must equal mixed_qkv's {io}, got "
                     f"{_dtype_name(conv_state)}")
        cstate = conv_state
    else:
        cstate = np.zeros((1, 1, 1), dtype=np.float32)
    has_init, init = initial_state_arg(name, initial_state, bsz, n_hv, dk, dv)
    sc = float(dk ** -0.5 if scale is None else scale)
    o, final, new_conv = call(gated_delta_rule_fused_kernel, mixed_qkv, conv_weight, cstate, g, beta, init,
                              _chunk._host_constants(chunk_size), n_hk=hk, dk=dk, chunk=int(chunk_size), scale=sc,
                              use_l2norm=bool(use_qk_l2norm_in_kernel), has_conv_state=has_conv,
                              has_initial_state=has_init, bf16_compute=bf16_compute,
                              row_tiles=row_tiles, lnc=lnc)
    return o, (final if output_final_state else None), new_conv
