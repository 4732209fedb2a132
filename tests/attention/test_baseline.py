"""The microbench baselines compute the same attention as the float64 references: the headline one (one LNC=1
launch per (b, KV head), K DMA-transposed on load, as the NxDI d=256 kernel is launched) and the extra rows (host
KV expansion + BHSD->BHDS permute launches)."""
import ml_dtypes
import numpy as np

from nki_kernels.attention.baseline import (baseline_flash_attention, baseline_flash_attention_decode,
                                            nxdi_style_flash_attention, nxdi_style_flash_attention_decode)
from nki_kernels.attention.reference import flash_attention_decode_ref, flash_attention_ref
from nki_kernels.emulator import record_launches
from nki_kernels.testing import assert_close

BF16 = ml_dtypes.bfloat16


def test_nxdi_style_prefill_matches_reference_one_launch_per_kv_head():
    rng = np.random.default_rng(22)
    q = rng.standard_normal((2, 4, 150, 256)).astype(BF16)
    k = rng.standard_normal((2, 2, 180, 256)).astype(BF16)
    v = rng.standard_normal((2, 2, 180, 256)).astype(BF16)
    g = rng.standard_normal(q.shape).astype(BF16)
    with record_launches() as runs:
        out = nxdi_style_flash_attention(q, k, v, gate=g, causal=True)
    assert [r.lnc for r in runs] == [1, 1, 1, 1]                  # B * Hkv launches, one core each
    assert_close("nxdi-style prefill", flash_attention_ref(q, k, v, gate=g, causal=True), out, dtype="bfloat16")


def test_nxdi_style_decode_matches_reference():
    rng = np.random.default_rng(23)
    q = rng.standard_normal((2, 4, 1, 256)).astype(BF16)
    k = rng.standard_normal((2, 1, 2304, 256)).astype(BF16)
    v = rng.standard_normal((2, 1, 2304, 256)).astype(BF16)
    lens = np.array([2304, 1000], np.int32)
    with record_launches() as runs:
        out = nxdi_style_flash_attention_decode(q, k, v, lens)
    assert [r.lnc for r in runs] == [1, 1]
    assert_close("nxdi-style decode", flash_attention_decode_ref(q, k, v, lens), out, dtype="bfloat16")


def test_baseline_prefill_matches_reference():
    rng = np.random.default_rng(20)
    q = rng.standard_normal((1, 4, 200, 256)).astype(BF16)
    k = rng.standard_normal((1, 1, 330, 256)).astype(BF16)
    v = rng.standard_normal((1, 1, 330, 256)).astype(BF16)
    g = rng.standard_normal(q.shape).astype(BF16)
    out = baseline_flash_attention(q, k, v, gate=g, causal=True)
    assert_close("baseline prefill", flash_attention_ref(q, k, v, gate=g, causal=True), out, dtype="bfloat16")


def test_baseline_decode_matches_reference():
    rng = np.random.default_rng(21)
    q = rng.standard_normal((2, 4, 2, 128)).astype(BF16)
    k = rng.standard_normal((2, 1, 2304, 128)).astype(BF16)     # a 2048-key piece and a 256-key piece
    v = rng.standard_normal((2, 1, 2304, 128)).astype(BF16)
    lens = np.array([2304, 1000], np.int32)
    out = baseline_flash_attention_decode(q, k, v, lens)
    assert_close("baseline decode", flash_attention_decode_ref(q, k, v, lens), out, dtype="bfloat16")
