"""Containment checks shared by the prefill non-finite tests (test_attention_adversarial.py,
test_attention_short_tiles.py)."""
import numpy as np

from nki_kernels import flash_attention


def poison_one(rng, tensors, where, bad_b, value):
    """Put `value` at one random (head, position, column) of sequence bad_b in tensors[where] (in place); returns
    (head, position)."""
    arr = tensors[where]
    h, s = int(rng.integers(0, arr.shape[1])), int(rng.integers(0, arr.shape[2]))
    arr[bad_b, h, s, int(rng.integers(0, arr.shape[3]))] = value
    return h, s


def run_poisoned(tensors, **kw):
    return np.asarray(flash_attention(tensors["q"], tensors["k"], tensors["v"], gate=tensors["gate"], **kw),
                      np.float64)


def assert_contained(out, clean, where, bad_b, h, s):
    """Every other sequence bit-identical to the clean run; a q or gate value reaches only its own row (query head
    h, position s)."""
    others = [i for i in range(out.shape[0]) if i != bad_b]
    np.testing.assert_array_equal(out[others], clean[others])
    if where in ("q", "gate"):
        rows = np.ones(out.shape[:3], bool)
        rows[bad_b, h, s] = False
        np.testing.assert_array_equal(out[rows], clean[rows])
