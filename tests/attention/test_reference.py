"""The references themselves: hand-computable cases and the signature contract with the public wrappers."""
import inspect
import math

import numpy as np

from nki_kernels import flash_attention, flash_attention_decode
from nki_kernels.attention.reference import flash_attention_decode_ref, flash_attention_ref


def test_signatures_match_wrappers():
    assert list(inspect.signature(flash_attention_ref).parameters) == \
        list(inspect.signature(flash_attention).parameters)
    assert list(inspect.signature(flash_attention_decode_ref).parameters) == \
        list(inspect.signature(flash_attention_decode).parameters)


def test_two_keys_by_hand():
    q = np.array([[[[1.0, 0.0]]]])                    # [1, 1, 1, 2]
    k = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])        # logits 1 and 0, scale 1/sqrt(2)
    v = np.array([[[[2.0, 0.0], [0.0, 4.0]]]])
    w1 = math.exp(1 / math.sqrt(2))
    expect = (w1 * np.array([2.0, 0.0]) + np.array([0.0, 4.0])) / (w1 + 1)
    out = flash_attention_ref(q, k, v, causal=False)
    np.testing.assert_allclose(out[0, 0, 0], expect, rtol=1e-12)
    # causal, Sq=1 < Skv=2: the query is the last position and sees both keys
    np.testing.assert_allclose(flash_attention_ref(q, k, v, causal=True)[0, 0, 0], expect, rtol=1e-12)
    # gate: out * sigmoid(g)
    gate = np.full((1, 1, 1, 2), 0.5)
    np.testing.assert_allclose(flash_attention_ref(q, k, v, gate=gate, causal=False)[0, 0, 0],
                               expect / (1 + math.exp(-0.5)), rtol=1e-12)


def test_causal_first_query_sees_only_first_key():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 4, 8)) for _ in range(3))
    out = flash_attention_ref(q, k, v, causal=True)
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0], rtol=1e-12)


def test_lengths_pad_keys_and_zero_queries():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 1, 3, 4)) for _ in range(3))
    out = flash_attention_ref(q, k, v, seq_lens=np.array([1, 3]), causal=False)
    assert np.all(out[0, 0, 1:] == 0)                  # rows at positions >= 1 are padding
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0], rtol=1e-12)


def test_decode_reference_convention():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 2, 4))
    kc, vc = rng.standard_normal((1, 1, 6, 4)), rng.standard_normal((1, 1, 6, 4))
    out = flash_attention_decode_ref(q, kc, vc, np.array([4]), causal=True)
    # token 0 sits at position 2 (sees keys 0..2), token 1 at position 3 (keys 0..3)
    for i, n in ((0, 3), (1, 4)):
        logits = q[0, :, i] @ kc[0, 0, :n].T / 2.0
        w = np.exp(logits - logits.max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(out[0, :, i], w @ vc[0, 0, :n], rtol=1e-12)
