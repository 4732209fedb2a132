"""Flash attention decode (token generation) for head_dim up to 256 over a BHSD KV cache, GQA, Sq <= 8 new tokens.

Convention: `cache_lens[b]` counts the valid cache positions of sequence b *including* the Sq new tokens, which
the caller has already written to the cache at positions cache_lens[b] - Sq .. cache_lens[b] - 1 (as vLLM /
NxDI do before attention). New token i sits at position cache_lens[b] - Sq + i and, with causal=True, sees keys
j <= cache_lens[b] - Sq + i; keys >= cache_lens[b] are never attended.

Loop nest (per program instance):

    rows r = g * Sq + i of one KV-head group (G query heads x Sq tokens) share one set of tiles
    for each (b, kv head) this core owns:
        Q^T [D, R] (DMA transpose); per-row key limit from cache_lens[b] (runtime data)
        for each key section (4096 keys):
            K^T [D, sec] (DMA transpose) and V [sec, D] streamed in 2048-key DMAs
            S = Q K^T (4-bank PSUM blocks) + length/causal bias -> SBUF [R, sec]
            m = rowmax S; P = exp(scale*(S - m)) with row sums; P^T by DMA transpose; PV in one PSUM bank
            combine with previous sections (online softmax)
        out = O / l
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..lnc import resolve_lnc
from ..validation import kernel_check
from ._common import (D_CHUNK, FLOAT_DTYPES, K_CHUNK, KV_BLOCK, MASK_BIAS, MAX_HEAD_DIM, MM_KEYS, load_len_broadcast,
                      load_transposed, n_tiles, pe_transpose_group, transpose_probs, zero_rows_past_length)
from .prefill import _as_int32_lens, _check_array, _check_scale, _dtype_name, _read_only, _shape

MAX_NEW_TOKENS = 8                # Sq limit (speculative decoding); G * Sq rows must fit the 128 partitions
_SECTION = 2 * KV_BLOCK           # keys per softmax section: S [R, 4096] fp32 + K^T, V of the section in SBUF
_KV_LOAD_KEYS = KV_BLOCK          # keys per K / V DMA (16 x 512 B = 8 KiB per partition for bf16, D=256)
_S_BLOCK = 2 * MM_KEYS            # keys per score PSUM buffer (2 banks; two buffers so QK overlaps the bias add)


def _owner(b, kvh, n_kv, n_prog):
    return (b * n_kv + kvh) % n_prog


@nki.jit
def flash_attention_decode_kernel(q, k_cache, v_cache, cache_lens, softmax_scale, causal):
    """Decode attention: out = softmax(scale * Q K^T + mask) V over the valid part of a KV cache.

    Dimensions:
        B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0, (Hq / Hkv) * Sq <= 128), Sq new tokens (1..8),
        S cache capacity (S_max), D head dim (1..256).
    Args:
        q: [B, Hq, Sq, D] @ HBM, bf16/fp16/fp32.
        k_cache: [B, Hkv, S, D] @ HBM, q's dtype (new tokens already written).
        v_cache: [B, Hkv, S, D] @ HBM, q's dtype.
        cache_lens: [B] int32 @ HBM, Sq <= cache_lens[b] <= S (runtime data: masks, not loop bounds).
        softmax_scale: float (trace-time). causal: bool (trace-time), causal among the new tokens.
    Returns:
        out: [B, Hq, Sq, D] @ HBM, q's dtype.
    Constraints:
        D <= MAX_HEAD_DIM; Sq <= MAX_NEW_TOKENS; (Hq / Hkv) * Sq <= 128. Cache positions >= cache_lens[b]
        may hold anything (NaN, Inf): their scores are selected to MASK_BIAS and their V rows zeroed in SBUF,
        so the output equals the output with zeros there, bit for bit.
    Pseudocode:
        for b, kvh: rows r = (g, i); limit_r = len_b - Sq + i (causal) or len_b - 1
            for section: S = Q K^T + MASK * [j > limit_r]; m' = max(m, rowmax S); P = exp(scale (S - m'))
                         l = l e^(scale (m - m')) + rowsum P; O = O e^(scale (m - m')) + P V
            out = O / l
    """
    out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    decode_body(q, k_cache, v_cache, cache_lens, out, softmax_scale, causal)
    return out


def decode_body(q, k_cache, v_cache, cache_lens, out, softmax_scale, causal, k_is_bhds=False):
    """The kernel body. k_is_bhds=True is only for the microbench baseline (k_cache host-permuted to
    [B, Hkv, D, S])."""
    n_b, n_hq, sq, d = q.shape
    n_kv = k_cache.shape[1]
    s_max = k_cache.shape[3] if k_is_bhds else k_cache.shape[2]
    group = n_hq // n_kv
    rows = group * sq
    dtype = q.dtype
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    n_d = n_tiles(d, D_CHUNK)
    row_tok = _row_token_index(rows, sq, group)          # i(r) = r mod Sq, fp32 (rows, 1)
    key_pos = {}                                         # section length -> key position of each score column
    units = [(b, kvh, i_sec, s0, min(_SECTION, s_max - s0)) for b in range(n_b) for kvh in range(n_kv)
             if _owner(b, kvh, n_kv, n_prog) == pid for i_sec, s0 in enumerate(range(0, s_max, _SECTION))]
    n_sec = n_tiles(s_max, _SECTION)
    pending = None
    head = None
    for b, kvh, i_sec, s0, sn in units:
        if i_sec == 0:
            head = _start_head(q, cache_lens, row_tok, b, kvh, group, sq, rows, d, n_d, n_sec, dtype, causal)
        if sn not in key_pos:
            key_pos[sn] = _key_positions(rows, sn, k_is_bhds)
        # stage 1 of this section, then stage 2 of the previous one: the TensorE multiplies P V of section
        # u-1 while section u's P^T is still in flight, and the next section's loads are already queued
        staged = _section_scores(k_cache, v_cache, head, key_pos[sn], b, kvh, s0, sn, i_sec, rows, d, n_d, dtype,
                                 softmax_scale, k_is_bhds)
        if pending is not None:
            _section_pv(out, *pending)
        pending = (head, staged, b, kvh, i_sec, n_sec, sn, rows, sq, group, d, dtype)
    if pending is not None:
        _section_pv(out, *pending)


def _start_head(q, cache_lens, row_tok, b, kvh, group, sq, rows, d, n_d, n_sec, dtype, causal):
    """Per (b, KV head): Q^T of its G*Sq rows, the per-row key limit, and the online-softmax state."""
    h0 = kvh * group
    len_f = load_len_broadcast(cache_lens, b, P_MAX)       # all partitions: V rows are keys (zeroing past it)
    limit = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)   # last visible key per row
    if causal:
        nisa.tensor_scalar(dst=limit[0:rows], data=row_tok[0:rows], op0=nl.add, operand0=len_f[0:rows],
                           op1=nl.add, operand1=float(-sq), engine=nisa.engine.gpsimd)
    else:
        nisa.tensor_scalar(dst=limit[0:rows], data=len_f[0:rows], op0=nl.add, operand0=-1.0,
                           engine=nisa.engine.gpsimd)
    qT_sb = nl.ndarray((P_MAX, n_d, P_MAX), dtype=dtype, buffer=nl.sbuf)
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        src = q[b, h0:h0 + group, 0:sq, d0:d0 + dn].reshape((rows, dn))
        load_transposed(qT_sb[0:dn, i_d, 0:rows], src, rows, dn, dtype)
    return dict(limit=limit, qT=qT_sb, len=len_f,
                neg_m=nl.ndarray((P_MAX, n_sec), dtype=nl.float32, buffer=nl.sbuf),    # -scale * running max
                alpha=nl.ndarray((P_MAX, n_sec), dtype=nl.float32, buffer=nl.sbuf),
                row_sum=nl.ndarray((P_MAX, n_sec), dtype=nl.float32, buffer=nl.sbuf),
                o=nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf),
                l=nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf))


def _key_positions(rows, sn, k_is_bhds):
    """(rows, sn) int32: the section-relative key position held by each score column. Pieces of a whole number
    of 128-key chunks are loaded partition-major (column c*128 + p of a piece at j0 holds key j0 + p*n + c);
    a ragged last piece is chunk-major (column j holds key j)."""
    pos = nl.ndarray((P_MAX, _SECTION), dtype=nl.int32, buffer=nl.sbuf)
    for j0 in range(0, sn, _KV_LOAD_KEYS):
        jn = min(_KV_LOAD_KEYS, sn - j0)
        if jn % K_CHUNK == 0 and not k_is_bhds:
            n = jn // K_CHUNK
            nisa.iota(pos[0:rows, j0:j0 + jn], pattern=[[1, n], [n, K_CHUNK]], offset=j0, channel_multiplier=0)
        else:
            nisa.iota(pos[0:rows, j0:j0 + jn], pattern=[[1, jn]], offset=j0, channel_multiplier=0)
    return pos


def _row_token_index(rows, sq, group):
    """(rows, 1) fp32 holding i(r) = r mod Sq for rows r = g * Sq + i, from iota and compares (no modulo op)."""
    r_i = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(r_i[0:rows], pattern=[[1, 1]], offset=0, channel_multiplier=1)
    r_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=r_f[0:rows], src=r_i[0:rows])
    if group == 1:
        return r_f
    # g(r) = #{t in 1..G-1 : r - t*Sq >= 0}
    diff_i = nl.ndarray((P_MAX, group - 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(diff_i[0:rows], pattern=[[-sq, group - 1]], offset=-sq, channel_multiplier=1)
    ge_f = nl.ndarray((P_MAX, group - 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=ge_f[0:rows], data=diff_i[0:rows], op0=nl.greater_equal, operand0=0.0)
    g_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=g_f[0:rows], op=nl.add, data=ge_f[0:rows], axis=1)
    tok_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=tok_f[0:rows], data=g_f[0:rows], op0=nl.multiply, operand0=float(-sq),
                              op1=nl.add, operand1=r_f[0:rows])
    return tok_f


def _section_scores(k_cache, v_cache, head, key_pos, b, kvh, s0, sn, i_sec, rows, d, n_d, dtype, softmax_scale,
                    k_is_bhds=False):
    """Stage 1 of one key section [s0, s0 + sn): K/V loads, K^T, scores + mask, running max, P and P^T.

    K and V stream in with plain 2048-key DMAs (full HBM bandwidth); K^T is made on the TensorE (128x128
    transposes into one PSUM bank per 8 chunks, evicted by the Scalar engine), because a DMA transpose would
    read K at half the bandwidth. k_is_bhds=True (baseline only): k_cache is [B, Hkv, D, S], copied as is.
    """
    kT_sb = nl.ndarray((P_MAX, n_d, _SECTION), dtype=dtype, buffer=nl.sbuf)
    v_sb = nl.ndarray((P_MAX, _SECTION // K_CHUNK, d), dtype=dtype, buffer=nl.sbuf)
    k_sb = nl.ndarray((P_MAX, _SECTION // K_CHUNK, d), dtype=dtype, buffer=nl.sbuf)
    group = pe_transpose_group(dtype)
    t_psum = nl.ndarray((P_MAX, 2, group, P_MAX), dtype=dtype, buffer=nl.psum)
    n_t = 0
    for j0 in range(0, sn, _KV_LOAD_KEYS):
        jn = min(_KV_LOAD_KEYS, sn - j0)
        c0 = j0 // K_CHUNK
        full = jn // K_CHUNK
        rem = jn - full * K_CHUNK
        for src_hbm, dst_sb in ((k_cache, k_sb), (v_cache, v_sb)):
            if src_hbm is k_cache and k_is_bhds:
                for i_d in range(n_d):
                    d0 = i_d * D_CHUNK
                    dn = min(D_CHUNK, d - d0)
                    nisa.dma_copy(dst=kT_sb[0:dn, i_d, j0:j0 + jn],
                                  src=k_cache[b, kvh, d0:d0 + dn, s0 + j0:s0 + j0 + jn])
                continue
            if rem == 0 and not k_is_bhds:
                # partition-major: partition p holds keys j0 + p*full .. + full - 1, one contiguous run of
                # full * D elements (8 KiB for bf16, D=256) per partition; chunk c = keys {j0 + p*full + c}
                src = src_hbm[b, kvh, s0 + j0:s0 + j0 + jn, 0:d].reshape((K_CHUNK, full * d))
                nisa.dma_copy(dst=dst_sb[0:K_CHUNK, c0:c0 + full, 0:d], src=src)
                continue
            if full:
                src = src_hbm[b, kvh, s0 + j0:s0 + j0 + full * K_CHUNK, 0:d].reshape((full, K_CHUNK, d))
                nisa.dma_copy(dst=dst_sb[0:K_CHUNK, c0:c0 + full, 0:d], src=src.permute((1, 0, 2)))
            if rem:
                nisa.dma_copy(dst=dst_sb[0:rem, c0 + full, 0:d],
                              src=src_hbm[b, kvh, s0 + j0 + full * K_CHUNK:s0 + j0 + jn, 0:d])
        _zero_v_past_length(v_sb, head["len"], s0 + j0, c0, full, rem, k_is_bhds)
        if k_is_bhds:
            continue
        for i_d in range(n_d):          # K^T of this piece: PE transposes, one PSUM bank per `group` chunks
            d0 = i_d * D_CHUNK
            dn = min(D_CHUNK, d - d0)
            for g0 in range(0, full + (1 if rem else 0), group):
                gn = min(group, full + (1 if rem else 0) - g0)
                slot = n_t % 2
                n_t += 1
                for i_c in range(gn):
                    c = c0 + g0 + i_c
                    cn = min(K_CHUNK, jn - (g0 + i_c) * K_CHUNK)
                    nisa.nc_transpose(dst=t_psum[0:dn, slot, i_c, 0:cn], data=k_sb[0:cn, c, d0:d0 + dn])
                keys0 = j0 + g0 * K_CHUNK
                keys = min(gn * K_CHUNK, jn - g0 * K_CHUNK)
                nisa.activation(dst=kT_sb[0:dn, i_d, keys0:keys0 + keys].reshape((dn, keys)), op=nl.copy,
                                data=t_psum[0:dn, slot, 0:gn, 0:P_MAX].reshape((dn, gn * P_MAX))[:, 0:keys])
    # ---- S with keys past limit_r selected to MASK_BIAS (a select: a NaN / Inf score of a padded key is replaced)
    local_limit = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=local_limit[0:rows], data=head["limit"][0:rows], op0=nl.add, operand0=float(-s0),
                       engine=nisa.engine.gpsimd)
    s_sb = nl.ndarray((P_MAX, _SECTION), dtype=nl.float32, buffer=nl.sbuf)
    s_psum = nl.ndarray((P_MAX, 2, _S_BLOCK), dtype=nl.float32, buffer=nl.psum)     # double-buffered scores
    for i_blk, k0 in enumerate(range(0, sn, _S_BLOCK)):
        kn = min(_S_BLOCK, sn - k0)
        sp = s_psum[0:rows, i_blk % 2, 0:kn]
        for i_d in range(n_d):
            dn = min(D_CHUNK, d - i_d * D_CHUNK)
            for j0 in range(0, kn, MM_KEYS):
                jn = min(MM_KEYS, kn - j0)
                nisa.nc_matmul(s_psum[0:rows, i_blk % 2, j0:j0 + jn], head["qT"][0:dn, i_d, 0:rows],
                               kT_sb[0:dn, i_d, k0 + j0:k0 + j0 + jn], accumulate=i_d > 0)
        vis_sb = nl.ndarray((P_MAX, _S_BLOCK), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=vis_sb[0:rows, 0:kn], data=key_pos[0:rows, k0:k0 + kn], op0=nl.less_equal,
                           operand0=local_limit[0:rows], engine=nisa.engine.gpsimd)
        masked = nl.where(vis_sb[0:rows, 0:kn], sp, MASK_BIAS)
        nisa.tensor_copy(dst=s_sb[0:rows, k0:k0 + kn], src=masked, engine=nisa.engine.gpsimd)
    # ---- running max in the negated, scaled domain: neg_m = min(neg_m_prev, -scale * rowmax)
    neg_m, m_sec = head["neg_m"], nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=m_sec[0:rows], op=nl.maximum, data=s_sb[0:rows, 0:sn], axis=1, negate=True)
    nm = neg_m[0:rows, i_sec:i_sec + 1]
    if i_sec == 0:
        nisa.tensor_scalar(dst=nm, data=m_sec[0:rows], op0=nl.multiply, operand0=softmax_scale,
                           engine=nisa.engine.gpsimd)
    else:
        nisa.tensor_scalar(dst=nm, data=m_sec[0:rows], op0=nl.multiply, operand0=softmax_scale, op1=nl.minimum,
                           operand1=neg_m[0:rows, i_sec - 1:i_sec], engine=nisa.engine.gpsimd)
        nisa.activation(dst=head["alpha"][0:rows, i_sec:i_sec + 1], op=nl.exp, data=neg_m[0:rows, i_sec - 1:i_sec],
                        bias=nm, scale=-1.0)
    p_sb = nl.ndarray((P_MAX, _SECTION), dtype=dtype, buffer=nl.sbuf)
    nisa.activation(dst=p_sb[0:rows, 0:sn], op=nl.exp, data=s_sb[0:rows, 0:sn], bias=nm, scale=softmax_scale,
                    reduce_op=nl.add, reduce_res=head["row_sum"][0:rows, i_sec:i_sec + 1],
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)
    pT_sb = nl.ndarray((P_MAX, _SECTION // K_CHUNK, P_MAX), dtype=dtype, buffer=nl.sbuf)
    transpose_probs(pT_sb, p_sb, rows, sn, dtype)
    return pT_sb, v_sb


def _zero_v_past_length(v_sb, len_f, key0, c0, full, rem, k_is_bhds):
    """Zero the V rows of one loaded piece (keys key0 ..) at positions >= the cache length, in the piece's layout:
    partition-major (chunk c0 + c, partition p holds key key0 + p * full + c) or chunk-major (key0 + c * 128 + p)."""
    if rem == 0 and not k_is_bhds:
        zero_rows_past_length(v_sb[0:K_CHUNK, c0:c0 + full], len_f, key0, 1, channel_multiplier=full)
    else:
        n_c = full + (1 if rem else 0)
        zero_rows_past_length(v_sb[0:K_CHUNK, c0:c0 + n_c], len_f, key0, K_CHUNK)


def _section_pv(out, head, staged, b, kvh, i_sec, n_sec, sn, rows, sq, group, d, dtype):
    """Stage 2 of a section: P V (fp32 PSUM, D split in two alternating halves so consecutive matmuls write
    different PSUM regions), merged into the running output; the last section normalises and stores."""
    pT_sb, v_sb = staged
    pv_psum = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.psum)
    halves = [(0, d)] if d <= D_CHUNK else [(0, d // 2), (d // 2, d)]
    for i_c in range(n_tiles(sn, K_CHUNK)):
        cn = min(K_CHUNK, sn - i_c * K_CHUNK)
        for h0, h1 in halves:
            nisa.nc_matmul(pv_psum[0:rows, h0:h1], pT_sb[0:cn, i_c, 0:rows], v_sb[0:cn, i_c, h0:h1],
                           accumulate=i_c > 0)
    o_acc, l_sb, row_sum = head["o"], head["l"], head["row_sum"]
    if i_sec == 0:
        nisa.tensor_copy(dst=o_acc[0:rows, 0:d], src=pv_psum[0:rows, 0:d])
        nisa.tensor_copy(dst=l_sb[0:rows], src=row_sum[0:rows, 0:1], engine=nisa.engine.gpsimd)
    else:
        a_s = head["alpha"][0:rows, i_sec:i_sec + 1]
        nisa.scalar_tensor_tensor(dst=o_acc[0:rows, 0:d], data=o_acc[0:rows, 0:d], op0=nl.multiply, operand0=a_s,
                                  op1=nl.add, operand1=pv_psum[0:rows, 0:d])
        nisa.scalar_tensor_tensor(dst=l_sb[0:rows], data=l_sb[0:rows], op0=nl.multiply, operand0=a_s, op1=nl.add,
                                  operand1=row_sum[0:rows, i_sec:i_sec + 1])
    if i_sec == n_sec - 1:
        inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(dst=inv_l[0:rows], data=l_sb[0:rows])
        o_sb = nl.ndarray((P_MAX, d), dtype=dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=o_sb[0:rows, 0:d], data=o_acc[0:rows, 0:d], op0=nl.multiply, operand0=inv_l[0:rows],
                           engine=nisa.engine.gpsimd)
        h0 = kvh * group
        nisa.dma_copy(dst=out[b, h0:h0 + group, 0:sq, 0:d].reshape((rows, d)), src=o_sb[0:rows, 0:d])


# ============================================================================ host wrapper


def flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=None):
    """Decode attention over a BHSD KV cache (GQA, 1..8 new tokens, D <= 256).

    Args:
        q: [B, Hq, Sq, D] bf16/fp16/fp32 (Sq <= 8), NumPy or torch CPU.
        k_cache, v_cache: [B, Hkv, S, D], q's dtype; the Sq new tokens already written at
            positions cache_lens[b] - Sq .. cache_lens[b] - 1.
        cache_lens: [B] integers in [Sq, S]: valid positions per sequence, new tokens included.
        causal: new token i sees keys <= cache_lens[b] - Sq + i (else all keys < cache_lens[b]).
        softmax_scale: default D ** -0.5, must be > 0.
        lnc: 1, 2 or None (default: NEURON_LOGICAL_NC_CONFIG, else the target's default, 2 on trn2); the
            program instances split the (b, KV head) pairs in one launch.
    Returns:
        out: [B, Hq, Sq, D], q's dtype.
    """
    name = "flash_attention_decode"
    _check_array(name, "q", q, 4, "[B, Hq, Sq, D]")
    _check_array(name, "k_cache", k_cache, 4, "[B, Hkv, S, D]")
    _check_array(name, "v_cache", v_cache, 4, "[B, Hkv, S, D]")
    n_b, n_hq, sq, d = _shape(q)
    kernel_check(_shape(k_cache) == _shape(v_cache), f"{name}: k_cache and v_cache shapes differ, got "
                 f"{_shape(k_cache)} and {_shape(v_cache)}")
    kb, n_kv, s_max, kd = _shape(k_cache)
    kernel_check(kb == n_b, f"{name}: batch differs, got q B={n_b}, k_cache B={kb}")
    kernel_check(kd == d, f"{name}: head dim differs, got q D={d}, k_cache D={kd}")
    kernel_check(1 <= d <= MAX_HEAD_DIM, f"{name}: head dim D must be in [1, {MAX_HEAD_DIM}], got D={d}")
    kernel_check(n_kv >= 1 and n_hq % n_kv == 0,
                 f"{name}: Hq must be a multiple of Hkv, got Hq={n_hq}, Hkv={n_kv}")
    kernel_check(1 <= sq <= MAX_NEW_TOKENS, f"{name}: Sq (new tokens) must be in [1, {MAX_NEW_TOKENS}], got Sq={sq}")
    kernel_check((n_hq // max(n_kv, 1)) * sq <= P_MAX,
                 f"{name}: (Hq / Hkv) * Sq rows must be <= {P_MAX}, got {n_hq // max(n_kv, 1)} * {sq}")
    kernel_check(sq <= s_max, f"{name}: Sq must be <= the cache length S, got Sq={sq}, S={s_max}")
    kernel_check(_dtype_name(q) in FLOAT_DTYPES, f"{name}: dtype must be one of {FLOAT_DTYPES}, got "
                 f"q.dtype={q.dtype}")
    kernel_check(q.dtype == k_cache.dtype == v_cache.dtype,
                 f"{name}: q, k_cache, v_cache dtypes differ, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    lens = _as_int32_lens(name, "cache_lens", cache_lens, n_b, sq, s_max)
    scale = _check_scale(name, softmax_scale, d)
    kernel_check(isinstance(causal, bool), f"{name}: causal must be a bool, got causal={causal!r}")
    lnc = resolve_lnc(lnc, name)
    q, k_cache, v_cache = (_read_only(x) for x in (q, k_cache, v_cache))
    return call(flash_attention_decode_kernel, q, k_cache, v_cache, lens, scale, causal, lnc=lnc)
