"""trn1 (NeuronCore-v2): a NaN / Inf in one token or sequence never reaches another's output.

On NeuronCore-v2 the TensorE transpose is a matmul by the identity and is not bit-accurate with NaN / Inf (the
real `nki.isa.nc_transpose` docstring); the emulator computes those values on trn1
(tests/emulator/test_emu_pe_transpose_v2.py): a non-finite value at data[k, j] of a [P, F] transpose turns the
whole output row j NaN. Whenever a kernel PE-transposes a tile whose partitions are tokens (or sequences), a
non-finite value in one token spreads to every token of the tile. Each test below poisons one token / sequence
on trn1 and checks every other one against the family's NumPy reference on the clean inputs. Every kernel here is
contained (a kernel that mixed would carry a strict xfail naming the transpose; docs/platform.md, "trn1 audit").
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import nki_kernels as nk
from nki_kernels.attention.reference import flash_attention_decode_ref, flash_attention_ref, flash_attention_varlen_ref
from nki_kernels.deltanet import reference as gdn_ref
from nki_kernels.emulator import EmulatorCheckError, use_target
from nki_kernels.examples.reference import rmsnorm_reference, softmax_reference, tiled_matmul_reference
from nki_kernels.moe.reference import moe_decode_reference
from nki_kernels.testing import assert_close

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
VALUES = pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])


def _trn1(fn, *args, **kw):
    with use_target("trn1"):
        return fn(*args, **kw)


def _poison(arr, index, value):
    bad = arr.copy()
    bad[index] = value
    return bad


# ============================================================== examples


@VALUES
def test_softmax_row_stays_in_its_row(rng, value):
    x = rng.standard_normal((20, 33)).astype(F32)
    out = np.asarray(_trn1(nk.softmax, _poison(x, (3, 5), value), lnc=1))
    others = np.arange(20) != 3
    assert_close("softmax other rows", softmax_reference(x)[others], out[others])


@VALUES
def test_rmsnorm_row_stays_in_its_row(rng, value):
    x = rng.standard_normal((20, 40)).astype(F32)
    w = rng.standard_normal(40).astype(F32)
    out = np.asarray(_trn1(nk.rmsnorm, _poison(x, (3, 5), value), w, lnc=1))
    others = np.arange(20) != 3
    assert_close("rmsnorm other rows", rmsnorm_reference(x, w)[others], out[others])


@VALUES
def test_tiled_matmul_lhs_column_reaches_only_its_output_row(rng, value):
    lhsT = rng.standard_normal((200, 140)).astype(F32)
    rhs = rng.standard_normal((200, 48)).astype(F32)
    out = np.asarray(_trn1(nk.tiled_matmul, _poison(lhsT, (5, 3), value), rhs, lnc=1))
    others = np.arange(140) != 3
    assert_close("matmul other rows", tiled_matmul_reference(lhsT, rhs)[others], out[others])


# ============================================================== attention


def _qkv(rng, b, hq, hkv, sq, skv, d=64):
    return (rng.standard_normal((b, hq, sq, d)).astype(F32), rng.standard_normal((b, hkv, skv, d)).astype(F32),
            rng.standard_normal((b, hkv, skv, d)).astype(F32))


@VALUES
@pytest.mark.parametrize("s, d, bad, causal", [(16, 64, (0, 0, 3, 5), False), (300, 64, (1, 1, 200, 7), True),
                                               (700, 256, (0, 1, 130, 200), False)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_prefill_query_token_stays_in_its_row(rng, value, s, d, bad, causal, dtype):
    """A q value stays in its row: on trn1 the Q tiles and P of both bodies (short: S <= 512, pipelined: longer)
    are transposed by VectorE 32x32 blocks (_common.exact_transpose), not by the TensorE (an identity matmul)."""
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 2, 2, 1, s, s, d))
    out = np.asarray(_trn1(nk.flash_attention, _poison(q, bad, value), k, v, causal=causal, lnc=1)).astype(F32)
    rows = np.ones(out.shape[:3], bool)
    rows[bad[:3]] = False
    assert_close("prefill other rows", flash_attention_ref(q, k, v, causal=causal)[rows], out[rows],
                 dtype=np.dtype(dtype).name)


@VALUES
def test_prefill_key_stays_in_its_sequence(rng, value):
    q, k, v = _qkv(rng, 2, 2, 1, 16, 16)
    out = np.asarray(_trn1(nk.flash_attention, q, _poison(k, (0, 0, 5, 5), value), v, lnc=1))
    assert_close("prefill other sequence", flash_attention_ref(q, k, v)[1], out[1])


@VALUES
@pytest.mark.parametrize("s, lens, pos", [(16, (12,), (0, 0, 14, 5)), (300, (140, 300), (0, 0, 200, 5)),
                                          (700, (700, 260), (1, 0, 300, 9))])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_prefill_padding_key_reaches_nothing(rng, value, s, lens, pos, dtype):
    """A key past seq_lens reaches nothing: on trn1 those K rows are zeroed before their PE transposes (the short
    body's partition-major K, the long body's fp32 load_transposed; bf16 K arrives by DMA transpose)."""
    q, k, v = (a.astype(dtype) for a in _qkv(rng, len(lens), 2, 1, s, s))
    lens = np.array(lens, np.int32)
    out = np.asarray(_trn1(nk.flash_attention, q, _poison(k, pos, value), v, seq_lens=lens, lnc=1))
    assert_close("prefill padding key", flash_attention_ref(q, k, v, seq_lens=lens), out, dtype=np.dtype(dtype).name)


@VALUES
@pytest.mark.parametrize("hq, hkv, sq, s, d, bad", [(2, 1, 1, 32, 64, (0, 0, 0, 5)),
                                                   (8, 2, 2, 300, 256, (1, 5, 1, 200)),
                                                   (16, 1, 1, 700, 128, (0, 3, 0, 7))])
def test_decode_query_row_stays_in_its_row(rng, value, hq, hkv, sq, s, d, bad):
    """A q value stays in its (head, position) row: on trn1 the [rows, D] Q tile and the row maxima are transposed
    on the VectorE (32 x 32 blocks), not on the TensorE (an identity matmul there)."""
    q, kc, vc = _qkv(rng, 2, hq, hkv, sq, s, d)
    lens = np.array([s - 7, s], np.int32)
    out = np.asarray(_trn1(nk.flash_attention_decode, _poison(q, bad, value), kc, vc, lens, lnc=1))
    rows = np.ones(out.shape[:3], bool)
    rows[bad[:3]] = False
    assert_close("decode other rows", flash_attention_decode_ref(q, kc, vc, lens)[rows], out[rows])


@VALUES
def test_decode_cache_key_stays_in_its_sequence(rng, value):
    q, kc, vc = _qkv(rng, 2, 2, 1, 1, 32)
    lens = np.array([20, 32], np.int32)
    out = np.asarray(_trn1(nk.flash_attention_decode, q, _poison(kc, (0, 0, 3, 5), value), vc, lens, lnc=1))
    assert_close("decode other sequence", flash_attention_decode_ref(q, kc, vc, lens)[1], out[1])


@VALUES
@pytest.mark.parametrize("s, lens, pos", [(32, (20, 32), (0, 0, 25, 5)), (300, (130, 300), (0, 0, 140, 7)),
                                          (300, (257, 10), (1, 0, 100, 3))])
def test_decode_padding_cache_key_reaches_nothing(rng, value, s, lens, pos):
    """A cache row past cache_lens (a torch.empty cache) reaches nothing: on trn1 those K rows are zeroed before
    the PE transpose (decode.py zero_k), as V's are before P V."""
    q, kc, vc = _qkv(rng, 2, 4, 2, 1, s)
    lens = np.array(lens, np.int32)
    out = np.asarray(_trn1(nk.flash_attention_decode, q, _poison(kc, pos, value), vc, lens, lnc=1))
    assert_close("decode padding key", flash_attention_decode_ref(q, kc, vc, lens), out)


def _varlen(rng, cu, d=64, dtype=F32):
    t = int(cu[-1])
    q = rng.standard_normal((t, 2, d)).astype(dtype)
    k, v = (rng.standard_normal((t, 1, d)).astype(dtype) for _ in range(2))
    return q, k, v, np.array(cu, np.int32)


VARLEN = pytest.mark.parametrize("cu, d, bad_tok, causal, dtype", [
    ((0, 5, 16), 64, 2, False, F32),
    ((0, 100, 101, 300, 700), 128, 150, True, F32),
    ((0, 100, 101, 300, 700), 128, 150, False, BF16)])


@VALUES
@VARLEN
def test_varlen_query_token_stays_in_its_row(rng, value, cu, d, bad_tok, causal, dtype):
    """A q value stays in its row although tokens of several sequences share a tile: on trn1 the packed Q tiles
    and P are transposed by VectorE 32x32 blocks (bf16 Q arrives by DMA transpose, exact everywhere)."""
    q, k, v, cu = _varlen(rng, cu, d, dtype)
    out = np.asarray(_trn1(nk.flash_attention_varlen, _poison(q, (bad_tok, 0, 5), value), k, v, cu, cu,
                           causal=causal, lnc=1)).astype(F32)
    rows = np.ones(out.shape[:2], bool)
    rows[bad_tok, 0] = False
    assert_close("varlen other rows", flash_attention_varlen_ref(q, k, v, cu, cu, causal=causal)[rows], out[rows],
                 dtype=np.dtype(dtype).name)


@VALUES
@VARLEN
def test_varlen_key_stays_in_its_sequence(rng, value, cu, d, bad_tok, causal, dtype):
    """A key stays in its sequence: on trn1 the packed K tiles are transposed by VectorE blocks
    (pe_transpose_keys / load_transposed through _common.exact_transpose)."""
    q, k, v, cu = _varlen(rng, cu, d, dtype)
    out = np.asarray(_trn1(nk.flash_attention_varlen, q, _poison(k, (bad_tok, 0, 5), value), v, cu, cu,
                           causal=causal, lnc=1)).astype(F32)
    seq = int(np.searchsorted(cu, bad_tok, side="right")) - 1
    others = np.ones(out.shape[0], bool)
    others[cu[seq]:cu[seq + 1]] = False
    assert_close("varlen other sequences", flash_attention_varlen_ref(q, k, v, cu, cu, causal=causal)[others],
                 out[others], dtype=np.dtype(dtype).name)


# ============================================================== gated DeltaNet


def _gdn(rng, b=2, t=16, hk=1, hv=2, d=32):
    return dict(q=rng.standard_normal((b, t, hk, d)).astype(F32), k=rng.standard_normal((b, t, hk, d)).astype(F32),
                v=rng.standard_normal((b, t, hv, d)).astype(F32),
                g=(-rng.uniform(0.0, 0.5, (b, t, hv))).astype(F32), beta=rng.uniform(0.0, 1.0, (b, t, hv)).astype(F32))


def _gdn_run(x):
    return _trn1(nk.gated_delta_rule, x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True, lnc=1)


def _gdn_ref(x):
    return gdn_ref.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True)


@VALUES
@pytest.mark.parametrize("t, tok, dtype, l2norm", [(16, 3, F32, True), (150, 70, F32, False), (150, 130, BF16, True),
                                                    (20, 5, BF16, False)])
def test_gdn_chunk_query_token_stays_in_its_token(rng, value, t, tok, dtype, l2norm):
    """A q value stays in its token: on trn1 the [chunk tokens, Dk] q / k tiles are transposed on the VectorE
    (32 x 32 blocks, exact), not on the TensorE (an identity matmul there)."""
    x = {n: a.astype(dtype) if n in ("q", "k", "v") else a for n, a in _gdn(rng, t=t).items()}
    xb = dict(x, q=_poison(x["q"], (0, tok, 0, 5), value))
    o, _ = _trn1(nk.gated_delta_rule, xb["q"], xb["k"], xb["v"], xb["g"], xb["beta"],
                 use_qk_l2norm_in_kernel=l2norm, lnc=1)
    ro, _ = gdn_ref.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=l2norm)
    rows = np.ones(o.shape[:2], bool)
    rows[0, tok] = False
    assert_close("gdn other tokens", ro[rows], np.asarray(o)[rows], dtype=np.dtype(dtype).name)


@pytest.mark.parametrize("name", ["k", "v", "beta"])
@VALUES
def test_gdn_chunk_token_reaches_no_earlier_token_nor_other_sequence(rng, name, value):
    x = _gdn(rng)
    idx = (0, 8, 0, 5) if x[name].ndim == 4 else (0, 8, 0)
    o, final = _gdn_run(dict(x, **{name: _poison(x[name], idx, value)}))
    ro, rfinal = _gdn_ref(x)
    o, final = np.asarray(o), np.asarray(final)
    assert_close("gdn earlier tokens", ro[0, :8], o[0, :8])
    assert_close("gdn other sequence", ro[1], o[1])
    assert_close("gdn other final state", rfinal[1], final[1])


def _fused(rng, b=2, t=40, hk=1, hv=2, d=32, kw=4):
    cd = 2 * hk * d + hv * d
    return dict(mixed_qkv=rng.standard_normal((b, t, cd)).astype(F32),
                conv_weight=(rng.standard_normal((cd, kw)) * 0.5).astype(F32),
                g=(-rng.uniform(0.0, 0.5, (b, t, hv))).astype(F32), beta=rng.uniform(0.0, 1.0, (b, t, hv)).astype(F32),
                conv_state=rng.standard_normal((b, cd, kw)).astype(F32))


def _fused_run(x, hk=1, d=32):
    from nki_kernels.deltanet.fused import gated_delta_rule_fused
    o, _, _ = _trn1(gated_delta_rule_fused, x["mixed_qkv"], x["conv_weight"], x["g"], x["beta"], hk, d,
                    conv_state=x["conv_state"], chunk_size=64, lnc=1)
    return np.asarray(o)


def _fused_ref(x, hk=1, d=32):
    """float64: silu(causal conv) of mixed_qkv, split [q | k | v], then the delta rule with the L2 norm."""
    b, t, _ = x["mixed_qkv"].shape
    y, _ = gdn_ref.causal_conv1d(x["mixed_qkv"].transpose(0, 2, 1), x["conv_weight"], conv_state=x["conv_state"])
    y = y.transpose(0, 2, 1)
    n = hk * d
    q, k, v = y[..., :n].reshape(b, t, hk, d), y[..., n:2 * n].reshape(b, t, hk, d), y[..., 2 * n:].reshape(b, t, -1, d)
    return gdn_ref.gated_delta_rule(q, k, v, x["g"], x["beta"], use_qk_l2norm_in_kernel=True)[0]


@VALUES
def test_gdn_fused_token_stays_in_its_sequence(rng, value):
    x = _fused(rng)
    o = _fused_run(dict(x, mixed_qkv=_poison(x["mixed_qkv"], (0, 20, 40), value)))
    assert_close("fused other sequence", _fused_ref(x)[1], o[1])


@VALUES
@pytest.mark.parametrize("t, tok, ch", [(40, 20, 40), (150, 100, 5), (150, 70, 100)])
def test_gdn_fused_token_reaches_no_earlier_token(rng, value, t, tok, ch):
    """fp32 io: on trn1 the [chunk tokens, channels] mixed_qkv tile is transposed on the VectorE (32 x 32 blocks),
    so a value reaches no earlier token of its chunk (the TensorE transpose, an identity matmul there, did)."""
    x = _fused(rng, t=t)
    o = _fused_run(dict(x, mixed_qkv=_poison(x["mixed_qkv"], (0, tok, ch), value)))
    assert_close("fused earlier tokens", _fused_ref(x)[0, :tok], o[0, :tok])


@pytest.mark.parametrize("b", range(1, 9))
@pytest.mark.parametrize("static_rows", [False, True], ids=["slot_pool", "static_rows"])
def test_gdn_step_runs_on_trn1_for_every_batch(rng, b, static_rows):
    """On trn1 (NeuronCore-v2: an instruction on <= 32 partitions starts at partition 0/32/64/96 only; no float
    activation bias) the step keeps its per-head rows on partition 0, heads on the free axis: it launches for
    every B, Hv > 1, T > 1, fp32 / bf16 inputs and the in-kernel L2 norm, and matches the reference."""
    t, hv = (1, 2) if b % 2 else (2, 3)
    dtype = F32 if b <= 4 else BF16
    x = _gdn(rng, b=b, t=t, hk=1, hv=hv)
    q, k, v = (x[n].astype(dtype) for n in ("q", "k", "v"))
    n_slots = b if static_rows else b + 3
    pool = (rng.standard_normal((n_slots, hv, 32, 32)) * 0.1).astype(F32)
    slots = None if static_rows else rng.permutation(n_slots)[:b].astype(np.int32)
    l2 = b % 3 != 0
    new_pool = pool.copy()
    try:
        o = _trn1(nk.gated_delta_rule_step, q, k, v, x["g"], x["beta"], new_pool, slots,
                  use_qk_l2norm_in_kernel=l2, lnc=1)
    except EmulatorCheckError as e:
        pytest.fail(f"gated_delta_rule_step on trn1: {e}")
    ro, rpool = gdn_ref.gated_delta_rule_step(q, k, v, x["g"], x["beta"], pool, slots, use_qk_l2norm_in_kernel=l2)
    tol = "bfloat16" if dtype is BF16 else "float32"
    assert_close("step o", ro, np.asarray(o), dtype=tol)
    assert_close("step state", rpool, new_pool, dtype=tol)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_gdn_step_widest_shape_fits_on_trn1(rng, dtype):
    """The widest shape the wrapper accepts (Hv = 64 v heads, T = 4 tokens, Dk = Dv = 128) fits trn1's smaller SBUF
    with the per-(head, token) rows copied to partition 0 (small tiles, not [Hv, T, D] ones) and matches."""
    b, t, hk, hv, d = 2, 4, 16, 64, 128
    q, k = (rng.standard_normal((b, t, hk, d)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((b, t, hv, d)).astype(dtype)
    g = (-rng.uniform(0.0, 0.5, (b, t, hv))).astype(F32)
    beta = rng.uniform(0.0, 1.0, (b, t, hv)).astype(F32)
    pool = (rng.standard_normal((b + 1, hv, d, d)) * 0.1).astype(F32)
    slots = np.array([2, 0], np.int32)
    new_pool = pool.copy()
    o = _trn1(nk.gated_delta_rule_step, q, k, v, g, beta, new_pool, slots, use_qk_l2norm_in_kernel=True, lnc=1)
    ro, rpool = gdn_ref.gated_delta_rule_step(q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=True)
    tol = "bfloat16" if dtype is BF16 else "float32"
    assert_close("step o", ro, np.asarray(o), dtype=tol)
    assert_close("step state", rpool, new_pool, dtype=tol)


@VALUES
def test_gdn_step_value_stays_in_its_sequence(rng, value):
    """trn1 NaN audit of the decode step: a non-finite k value of sequence 0 reaches no other sequence's output
    or state row (the rows moved to partition 0 by DMA carry one head of one sequence each)."""
    x = _gdn(rng, b=3, t=1, hk=1, hv=3)
    pool = (rng.standard_normal((5, 3, 32, 32)) * 0.1).astype(F32)
    slots = np.array([4, 0, 2], np.int32)
    new_pool = pool.copy()
    o = _trn1(nk.gated_delta_rule_step, x["q"], _poison(x["k"], (0, 0, 0, 3), value), x["v"], x["g"], x["beta"],
              new_pool, slots, use_qk_l2norm_in_kernel=True, lnc=1)
    ro, rpool = gdn_ref.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], pool, slots,
                                              use_qk_l2norm_in_kernel=True)
    assert_close("step other sequences", ro[1:], np.asarray(o)[1:])
    assert_close("step other state rows", rpool[[0, 2]], new_pool[[0, 2]])
    assert_close("step untouched rows", pool[[1, 3]], new_pool[[1, 3]])


@VALUES
def test_conv1d_value_stays_in_its_sequence_and_channel(rng, value):
    x = rng.standard_normal((2, 136, 8)).astype(F32)
    w = rng.standard_normal((136, 4)).astype(F32)
    y, _ = _trn1(nk.causal_conv1d, _poison(x, (0, 7, 3), value), w, lnc=1)
    ry, _ = gdn_ref.causal_conv1d(x, w)
    keep = np.ones(y.shape, bool)
    keep[0, 7, 3:] = False
    assert_close("conv others", ry[keep], np.asarray(y)[keep])


@VALUES
def test_conv1d_update_value_stays_in_its_sequence_and_channel(rng, value):
    x = rng.standard_normal((2, 136, 1)).astype(F32)
    state = rng.standard_normal((2, 136, 4)).astype(F32)
    w = rng.standard_normal((136, 4)).astype(F32)
    ry, _ = gdn_ref.causal_conv1d_update(x, state.copy(), w)
    y = _trn1(nk.causal_conv1d_update, _poison(x, (0, 7, 0), value), state.copy(), w, lnc=1)
    y = np.asarray(y[0] if isinstance(y, tuple) else y)
    keep = np.ones(y.shape, bool)
    keep[0, 7] = False
    assert_close("conv update others", ry[keep], y[keep])


# ============================================================== MoE


def _moe(rng, t):
    x = rng.standard_normal((t, 128)).astype(F32)
    gu = (rng.standard_normal((4, 128, 2, 64)) / np.sqrt(128)).astype(F32)
    dn = (rng.standard_normal((4, 64, 128)) / 8.0).astype(F32)
    w, idx = nk.moe_route(rng.standard_normal((t, 4)).astype(F32), 2, True)
    return x, gu, dn, np.asarray(w, F32), np.asarray(idx, np.int32)


def _moe_problem(rng, t, h, e, inter, k, s_inter):
    x = rng.standard_normal((t, h)).astype(F32)
    gu = (rng.standard_normal((e, h, 2, inter)) / np.sqrt(h)).astype(F32)
    dn = (rng.standard_normal((e, inter, h)) / np.sqrt(inter)).astype(F32)
    sh = None
    if s_inter:
        sh = ((rng.standard_normal((h, 2, s_inter)) / np.sqrt(h)).astype(F32),
              (rng.standard_normal((s_inter, h)) / np.sqrt(s_inter)).astype(F32),
              (rng.standard_normal(h) / np.sqrt(h)).astype(F32))
    w, idx = nk.moe_route(rng.standard_normal((t, e)).astype(F32), k, True)
    return x, gu, dn, sh, np.asarray(w, F32), np.asarray(idx, np.int32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("combine, x_gather, s_inter, dense", [
    ("dma", "rows", 0, False), ("dma", "rows", 48, True), ("dma", "resident", 48, False),
    ("onchip", "rows", 0, True), ("onchip", "rows", 48, False), ("onchip", "resident", 48, True)])
def test_moe_blockwise_token_stays_in_its_token(rng, monkeypatch, value, combine, x_gather, s_inter, dense):
    """On trn1 moe_blockwise transposes its [tokens, H] x tiles (per block chunk, or once into the resident x.T of
    the on-chip x gather) and [tokens, I] h tiles (routed blocks and the shared expert) on the VectorE (32 x 32
    blocks, `_tiles.exact_rows_to_columns`), not on the TensorE (an identity matmul there): a non-finite hidden
    value (column 77: partition 38, hidden chunk 1) of a token that shares each of its blocks with several other
    tokens reaches only that token's output row, through either combine and either x gather, with and without
    the shared expert, in the top-k and dense forms."""
    from nki_kernels.moe import blockwise
    t, h, e, inter, k, bs, tok, col = 40, 256, 4, 64, 2, 32, 13, 77
    x, gu, dn, sh, w, idx = _moe_problem(rng, t, h, e, inter, k, s_inter)
    tpos, b2e = nk.moe_block_mapping(idx, e, bs)
    blocks = tpos.reshape(-1, bs)
    mates = blocks[(blocks == tok).any(axis=1)]
    assert len(mates) == k and all(((b >= 0) & (b != tok)).sum() >= 5 for b in mates)   # several block mates
    with use_target("trn1"):
        assert blockwise.onchip_x_gather(t, h, inter, bs, k, 4)
    if x_gather == "rows":   # either combine's per-slot row gather (what shapes beyond the resident x.T take)
        monkeypatch.setattr(blockwise, "resident_xT_bytes", lambda *a: None)
    if combine == "onchip":   # the on-chip combine's phase A takes the x path under test
        plan = blockwise.choose_combine(t, h, inter, s_inter, len(b2e), bs, k, 4, 1, combine="onchip", target="trn1")
        assert plan.x_gather == ("onchip" if x_gather == "resident" else "dma")
    if dense:
        aff = np.zeros((t, e), F32)
        np.put_along_axis(aff, idx.astype(np.int64), w, axis=1)
        kw = dict(shared=sh, combine=combine, lnc=1)
    else:
        aff, kw = w, dict(shared=sh, top_k_index=idx, combine=combine, lnc=1)
    out = np.asarray(_trn1(nk.moe_blockwise, _poison(x, (tok, col), value), aff, gu, dn, tpos, b2e, bs, **kw),
                     np.float64)
    assert not np.isfinite(out[tok]).all()
    others = np.arange(t) != tok
    assert np.isfinite(out[others]).all()
    assert_close("blockwise other tokens", moe_decode_reference(x, idx, w, gu, dn, sh)[others], out[others])


@VALUES
def test_moe_decode_token_stays_in_its_token(rng, value):
    x, gu, dn, w, idx = _moe(rng, 4)
    out = np.asarray(_trn1(nk.moe_decode, _poison(x, (1, 5), value), idx, w, gu, dn, lnc=1))
    others = np.arange(4) != 1
    assert_close("decode other tokens", moe_decode_reference(x, idx, w, gu, dn)[others], out[others])


# ============================================================== code predictor


_CP_DELTA_REL = 0.03     # greedy near-tie margin, relative to the RMS logit (tests/codepredictor/test_unrolled.py)


def _cp(rng, b, vocab=64):
    from nki_kernels.codepredictor import random_weights
    w = random_weights(rng, hidden=128, n_q_heads=2, n_kv_heads=1, head_dim=64, intermediate=128, n_layers=1,
                       n_groups=3, vocab=vocab, lm_scale=3.0)
    return w, rng.standard_normal((b, 128)).astype(F32), rng.standard_normal((b, 128)).astype(F32)


def _cp_check_reference(ph, c0, w, codes, emb, rows):
    """codes / embeddings of `rows` against the float64 reference (teacher-forced with the kernel's codes): a
    differing greedy code is a near-tie of the reference logits; embeddings are the tables' rows."""
    from nki_kernels.codepredictor.reference import code_predictor_reference
    rc, re, lg = code_predictor_reference(ph, c0, w, forced_codes=codes, return_logits=True)
    for b in rows:
        for j in range(w.n_groups):
            lgt = lg[b, j]
            gap = lgt.max() - lgt[codes[b, j]]
            assert codes[b, j] == rc[b, j] or gap <= _CP_DELTA_REL * np.sqrt(np.mean(lgt * lgt)), (b, j, gap)
    assert_close("code predictor embeddings", re[rows], np.asarray(emb, F32)[rows], dtype="bfloat16")


@pytest.mark.parametrize("b, vocab", [(2, 64), (5, 256)])
def test_code_predictor_runs_on_trn1(rng, b, vocab):
    """On trn1 the RMSNorms' eps bias is a [128, 1] tile (NeuronCore-v2 has no float activation bias): the frame
    launches (V=64: logits rows argmax; V=256: vocab on partitions), equals the trn2 result bit for bit and
    matches the reference."""
    w, ph, c0 = _cp(rng, b, vocab)
    try:
        codes, emb, csum = _trn1(nk.code_predictor, ph, c0, w, return_sum=True, lnc=1)
    except EmulatorCheckError as e:
        pytest.fail(f"code_predictor on trn1: {e}")
    with use_target("trn2"):
        codes2, emb2, csum2 = nk.code_predictor(ph, c0, w, return_sum=True, lnc=1)
    np.testing.assert_array_equal(codes, codes2)
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(emb2))
    np.testing.assert_array_equal(np.asarray(csum), np.asarray(csum2))
    _cp_check_reference(ph, c0, w, codes, emb, np.arange(b))


@VALUES
def test_code_predictor_row_stays_in_its_row(rng, value):
    """trn1 NaN audit: a non-finite past_hidden value of row 1 reaches no other row (codes, embeddings and sum of
    the other rows bit-identical to a clean trn1 run and matching the reference); row 1 is flagged, codes 0."""
    w, ph, c0 = _cp(rng, 4)
    bad_ph = _poison(ph, (1, 5), value)
    codes, emb, csum, bad = _trn1(nk.code_predictor, bad_ph, c0, w, return_sum=True, return_bad_rows=True, lnc=1)
    codes_ok, emb_ok, csum_ok = _trn1(nk.code_predictor, ph, c0, w, return_sum=True, lnc=1)
    np.testing.assert_array_equal(np.asarray(bad), [0, 1, 0, 0])
    np.testing.assert_array_equal(codes[1], 0)
    others = np.array([0, 2, 3])
    np.testing.assert_array_equal(codes[others], codes_ok[others])
    np.testing.assert_array_equal(np.asarray(emb)[others], np.asarray(emb_ok)[others])
    np.testing.assert_array_equal(np.asarray(csum)[others], np.asarray(csum_ok)[others])
    assert np.all(np.isfinite(np.asarray(emb, F32))) and np.all(np.isfinite(np.asarray(csum, F32)))
    _cp_check_reference(ph, c0, w, codes_ok, emb_ok, others)
