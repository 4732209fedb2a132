"""The float64 references: same parameter names as the public wrappers, and hand-checkable values."""
import inspect

import numpy as np
import pytest

import nki_kernels
from nki_kernels.deltanet import reference as ref


@pytest.mark.parametrize("name", ["gated_delta_rule", "gated_delta_rule_step", "causal_conv1d",
                                  "causal_conv1d_update"])
def test_reference_parameter_names_match_wrapper(name):
    wrapper = inspect.signature(getattr(nki_kernels, name)).parameters
    reference = inspect.signature(getattr(ref, name)).parameters
    for p in reference:
        assert p in wrapper, f"{name}: reference parameter {p!r} is not a wrapper parameter"
    shared = [p for p in wrapper if p in reference]
    assert shared == list(reference), f"{name}: parameter order differs: {shared} vs {list(reference)}"


def test_single_token_by_hand():
    """One token, Dk = Dv = 1, S0 = 2: S = e^g S0 + k beta (v - k e^g S0); o = S q * Dk^-0.5 (= 1)."""
    q, k, v = (np.full((1, 1, 1, 1), x) for x in (3.0, 0.5, 4.0))
    g, beta = np.full((1, 1, 1), np.log(0.5)), np.full((1, 1, 1), 0.25)
    s0 = np.full((1, 1, 1, 1), 2.0)
    o, s = ref.gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    s_expect = 1.0 + 0.5 * 0.25 * (4.0 - 0.5 * 1.0)
    assert s[0, 0, 0, 0] == pytest.approx(s_expect)
    assert o[0, 0, 0, 0] == pytest.approx(3.0 * s_expect)


def test_beta_one_writes_value_exactly():
    """beta = 1 with a unit key: S^T k = v after the update (the delta rule's defining property)."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 1, 1, 8))
    k /= np.linalg.norm(k)
    v = rng.standard_normal((1, 1, 1, 8))
    s0 = rng.standard_normal((1, 1, 8, 8))
    _, s = ref.gated_delta_rule(k, k, v, np.zeros((1, 1, 1)), np.ones((1, 1, 1)), initial_state=s0)
    np.testing.assert_allclose(s[0, 0].T @ k[0, 0, 0], v[0, 0, 0], rtol=1e-12)


def test_conv_by_hand():
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)
    w = np.array([[1.0, 10.0, 100.0, 1000.0]])
    y, s = ref.causal_conv1d(x, w, activation=None)
    np.testing.assert_allclose(y[0, 0], [1000, 2100, 3210, 4321, 5432])
    np.testing.assert_allclose(s[0, 0], [2, 3, 4, 5])
