"""The fp8 weight study's quantizer (nki_kernels/codepredictor/fp8_study.py): one scale per output channel, the
largest magnitude of each channel mapped to the e4m3 maximum, relative error within e4m3's 3-bit mantissa."""
import ml_dtypes
import numpy as np

from nki_kernels.codepredictor import random_weights
from nki_kernels.codepredictor.fp8_study import FP8_MAX, fp8_weights, quantize_per_channel, resident_table


def test_per_channel_scales_and_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 40)).astype(np.float32) * rng.uniform(0.01, 10, size=(1, 1, 40)).astype(np.float32)
    q, s = quantize_per_channel(w)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3) and s.shape == (3, 1, 40)
    np.testing.assert_allclose(np.max(np.abs(q.astype(np.float32)), axis=1), FP8_MAX)
    deq = q.astype(np.float32) * s
    # normal range: |error| <= half a unit in the last place = 2^-4 relative; subnormals: absolute 2^-10 * scale
    err = np.abs(deq - w)
    assert np.all(err <= np.maximum(np.abs(w) * 2.0 ** -4, s * 2.0 ** -10) * 1.0001)


def test_fp8_weights_touch_only_the_matrices():
    w = random_weights(np.random.default_rng(1), hidden=128, n_q_heads=2, n_kv_heads=1, head_dim=64,
                       intermediate=128, n_layers=1, n_groups=2, vocab=64)
    w8 = fp8_weights(w)
    assert np.array_equal(w8.codec_embed, w.codec_embed) and np.array_equal(w8.input_norm, w.input_norm)
    assert not np.array_equal(w8.wqkv_t, np.asarray(w.wqkv_t, np.float32))
    np.testing.assert_allclose(w8.wqkv_t, np.asarray(w.wqkv_t, np.float32), rtol=0.07, atol=1e-2)


def test_resident_table_halves_bytes():
    w = random_weights(np.random.default_rng(2), hidden=256, n_q_heads=8, n_kv_heads=8, head_dim=32,
                       intermediate=1024, n_layers=2, n_groups=2, vocab=64)
    rows = resident_table(w, tps=(1, 2, 8))
    assert [r[1] for r in rows] == [rows[0][1], rows[0][1] // 2, rows[0][1] // 8]     # bf16 bytes split by TP
    for _, bf16, fp8, _ in rows:
        assert bf16 / 2 < fp8 < bf16 * 0.6                  # 1 byte per weight plus the per-channel fp32 scales
