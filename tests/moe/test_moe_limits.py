"""Exact limit checks: every shape the MoE wrappers accept fits the kernels' SBUF/PSUM plans (the emulator
raises on any overflow), swept at the accepted boundary for every dtype, with and without the shared expert;
one step past the boundary is a clear KernelInputError naming the limit. Includes the issue's repro (fp32
Qwen3.5-35B-A3B widths H=2048, I=Is=512, 33-128 tokens with the shared expert)."""
import itertools

import ml_dtypes
import numpy as np
import pytest

from nki_kernels import moe_block_mapping, moe_blockwise, moe_decode
from nki_kernels.moe import blockwise as bw
from nki_kernels.moe import decode as dec
from nki_kernels.moe.reference import moe_decode_reference
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

DT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_VALID_I = [i for i in range(1, 4097) if bw.intermediate_split(i)[0] is not None]


def _arrays(dt, t, h, e, i, k, shared, seed=0, zeros=False):
    rng = np.random.default_rng(seed)
    mk = (lambda *s: np.zeros(s, dt)) if zeros else (lambda *s: (rng.standard_normal(s) * 0.05).astype(dt))
    x = np.zeros((t, h), dt) if zeros else rng.standard_normal((t, h)).astype(dt)
    sh = (mk(h, 2, i), mk(i, h), mk(h)) if shared else None
    idx = np.stack([(np.arange(k) + j) % e for j in range(t)]).astype(np.int32)
    return x, mk(e, h, 2, i), mk(e, i, h), sh, np.full((t, k), 0.5, dt), idx


def _blockwise_accepts(monkeypatch, dt, h, i, shared, bs, t=3, e=2, k=2):
    monkeypatch.setattr(bw, "call", lambda *a, **kw: None)
    x, gu, dn, sh, w, idx = _arrays(dt, t, h, e, i, k, shared, zeros=True)
    tpos, b2e = moe_block_mapping(idx, e, bs)
    try:
        moe_blockwise(x, w, gu, dn, tpos, b2e, bs, shared=sh, top_k_index=idx, lnc=1)
        return True, ""
    except KernelInputError as err:
        return False, str(err)
    finally:
        monkeypatch.undo()


def _max_accepted(monkeypatch, dt, h, shared, bs):
    """(largest accepted I, the next valid I) by bisection (acceptance is monotone in I: gate_up_parts keeps the
    64-partition layout only where it fits, test_small_i_fp32_wide_h_is_accepted_and_exact)."""
    lo, hi = 0, len(_VALID_I)      # _VALID_I[:lo] accepted ... _VALID_I[hi:] refused
    while lo < hi:
        mid = (lo + hi) // 2
        if _blockwise_accepts(monkeypatch, dt, h, _VALID_I[mid], shared, bs)[0]:
            lo = mid + 1
        else:
            hi = mid
    return (_VALID_I[lo - 1] if lo else None), (_VALID_I[lo] if lo < len(_VALID_I) else None)


_GRID = list(itertools.product(("float32", "bfloat16"), (1024, 2048, 4096), (False, True), (32, 512)))
_FAST = {("float32", 2048, True, 32), ("bfloat16", 4096, True, 512)}


@pytest.mark.parametrize("dtype,h,shared,bs", [pytest.param(*g, marks=() if g in _FAST else pytest.mark.slow)
                                               for g in _GRID])
def test_blockwise_boundary_fits(monkeypatch, dtype, h, shared, bs):
    dt = DT[dtype]
    i_max, i_next = _max_accepted(monkeypatch, dt, h, shared, bs)
    assert i_max is not None
    if i_next is not None:
        ok, why = _blockwise_accepts(monkeypatch, dt, h, i_next, shared, bs)
        assert not ok and ("SBUF" in why or "B per partition" in why), why
    for t, lnc in ((130, 1), (3, 2)):
        x, gu, dn, sh, w, idx = _arrays(dt, t, h, 2, i_max, 2, shared, seed=t)
        tpos, b2e = moe_block_mapping(idx, 2, bs)
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, shared=sh, top_k_index=idx, lnc=lnc)
        assert out.shape == (t, h) and np.all(np.isfinite(np.asarray(out, np.float32)))


@pytest.mark.parametrize("dtype,h,shared,bs", sorted(_FAST))
def test_blockwise_boundary_fits_on_trn1(monkeypatch, dtype, h, shared, bs):
    """trn1 has the smallest SBUF, and there the x / h transposes are VectorE 32x32 blocks written straight to
    SBUF (exact with NaN / Inf): the largest I the wrapper accepts under trn1 runs at 130 tokens (LNC=1, the
    only degree there; the emulator raises on any SBUF overflow) and matches the reference; one valid I more is
    refused."""
    from nki_kernels.emulator import use_target
    dt = DT[dtype]
    with use_target("trn1"):
        i_max, i_next = _max_accepted(monkeypatch, dt, h, shared, bs)
        assert i_max is not None
        if i_next is not None:
            ok, why = _blockwise_accepts(monkeypatch, dt, h, i_next, shared, bs)
            assert not ok and ("SBUF" in why or "B per partition" in why), why
        x, gu, dn, sh, w, idx = _arrays(dt, 130, h, 2, i_max, 2, shared, seed=3)
        tpos, b2e = moe_block_mapping(idx, 2, bs)
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, shared=sh, top_k_index=idx, lnc=1)
    assert_close(f"trn1 boundary I={i_max}", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype=dtype)


@pytest.mark.parametrize("t", [33, 128])
def test_issue_repro_fp32_qwen35_widths_with_shared_expert(rng, t):
    """H=2048, I=Is=512 fp32 with the shared expert at 33-128 tokens (before: SBUF overflow in the one-pass
    path after the checks passed), against the float64 reference."""
    x, gu, dn, sh, w, idx = _arrays(np.float32, t, 2048, 4, 512, 2, True, seed=t)
    tpos, b2e = moe_block_mapping(idx, 4, 32)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 32, shared=sh, top_k_index=idx, lnc=1)
    assert_close("fp32 qwen3.5 widths", moe_decode_reference(x, idx, w, gu, dn, sh), out)


def _decode_accepts(monkeypatch, dt, t, h, i, k, e, shared):
    monkeypatch.setattr(dec, "call", lambda *a, **kw: None)
    x, gu, dn, sh, w, idx = _arrays(dt, t, h, e, i, k, shared, zeros=True)
    try:
        moe_decode(x, idx, w, gu, dn, shared=sh, lnc=1)
        return True
    except KernelInputError:
        return False
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("dtype,h,i", [("float32", 2048, 512), ("bfloat16", 2048, 1024),
                                       pytest.param("bfloat16", 8192, 256, marks=pytest.mark.slow),
                                       pytest.param("float32", 8192, 128, marks=pytest.mark.slow)])
def test_decode_largest_experts_fit(monkeypatch, dtype, h, i):
    """The largest experts check_weights accepts (96 KiB per partition), routed and shared, at T=32 and the
    largest TOPK the SBUF plan accepts: the kernel fits at LNC=1 and 2; one TOPK more is refused or fits."""
    dt = DT[dtype]
    k_max = max(k for k in (1, 2, 4, 8, 16, 32) if _decode_accepts(monkeypatch, dt, 32, h, i, k, 4, True))
    x, gu, dn, sh, w, idx = _arrays(dt, 32, h, 4, i, k_max, True, seed=1)
    for lnc in (1, 2):
        out = moe_decode(x, idx, w, gu, dn, shared=sh, lnc=lnc)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close("largest decode", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype=dtype)


@pytest.mark.parametrize("h,i,bs", [(8192, 4, 128), (4992, 4, 512), (8192, 1, 128)])
def test_small_i_fp32_wide_h_is_accepted_and_exact(monkeypatch, h, i, bs):
    """Tiny experts (I <= 4) at wide fp32 H: where a 128-partition gate/up run is below the target's DMA packet knee,
    the 64-partition layout (x.T twice as long per partition) would not fit SBUF, so the blocks phase keeps 128
    partitions. Before: the wrapper sized the plan with 64 and refused shapes it had run before (while a larger I,
    with 128 partitions, was accepted); the I = 1..16 range is now accepted at every I. On trn2 (512 B knee) the
    three runs below (2048, 1248, 512 B) take 128 partitions by the knee alone; the sweep's H = 4992, I = 1 (312 B)
    still goes through the fit fallback."""
    assert all(_blockwise_accepts(monkeypatch, np.float32, h, ii, False, bs)[0] for ii in (1, 2, 4, 8, 16))
    x, gu, dn, _, w, idx = _arrays(np.float32, 3, h, 2, i, 2, False, seed=i)
    tpos, b2e = moe_block_mapping(idx, 2, bs)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx, lnc=2)
    assert_close("fp32 wide H, tiny I", moe_decode_reference(x, idx, w, gu, dn, None), out)


def test_refusals_name_the_limit(monkeypatch):
    ok, why = _blockwise_accepts(monkeypatch, np.float32, 8192, 128, True, 512)
    assert not ok and "SBUF" in why and "block_size" in why


@pytest.mark.slow
def test_onchip_combine_boundary_fits_at_talker_widths():
    """Qwen3-Omni talker widths (bf16, H=1024, I=48, Is=96, TOPK=6), T=1024, blocks of 512: the largest static N
    whose on-chip plan fits runs at LNC=2 (the emulator raises on any SBUF overflow) and matches the reference;
    one block more is refused with combine="onchip" and runs the DMA combine under "auto"."""
    t, h, i, si, k, e, bs = 1024, 1024, 48, 96, 6, 16, 512
    fits = [n for n in range(8, 200) if bw.choose_combine(t, h, i, si, n, bs, k, 2, 2, combine="onchip") is not None]
    n_max = max(fits)
    assert bw.choose_combine(t, h, i, si, n_max + 1, bs, k, 2, 2, combine="onchip") is None
    x, gu, dn, _, w, idx = _arrays(DT["bfloat16"], t, h, e, i, k, False, seed=4)
    sh = _arrays(DT["bfloat16"], 1, h, 1, si, 1, True, seed=5)[3]   # the talker's shared expert: Is=96
    tpos, b2e = moe_block_mapping(idx, e, bs, num_blocks=n_max)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, shared=sh, top_k_index=idx, lnc=2, combine="onchip")
    assert_close("on-chip at its SBUF limit", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, e, bs, num_blocks=n_max + 1)
    with pytest.raises(KernelInputError, match="does not fit SBUF"):
        moe_blockwise(x, w, gu, dn, tpos, b2e, bs, shared=sh, top_k_index=idx, lnc=2, combine="onchip")
