"""The shared input validators: every refusal is a KernelInputError naming the kernel and the argument."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels.validation import (KernelInputError, check_array, check_bool, check_choice, check_float,
                                    check_int, index_array)

torch = pytest.importorskip("torch")


def test_kernel_input_error_is_a_value_error_and_a_type_error():
    assert issubclass(KernelInputError, ValueError) and issubclass(KernelInputError, TypeError)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], (1.0, 2.0), 3.0, None, "x"])
def test_check_array_refuses_non_arrays(bad):
    with pytest.raises(KernelInputError, match=r"^k: q must be a NumPy array or a torch CPU tensor, got "):
        check_array("k", "q", bad)


def test_check_array_refuses_empty_float64_meta_and_grad():
    with pytest.raises(KernelInputError, match=r"k: q must not be empty .*q.shape=\(0, 4\)"):
        check_array("k", "q", np.zeros((0, 4), np.float32))
    with pytest.raises(KernelInputError, match=r"q dtype must be one of \('float32', 'bfloat16', 'float16'\).*"
                                               r"astype\(np.float32\).*got q.dtype=float64"):
        check_array("k", "q", np.zeros((2, 4)))
    with pytest.raises(KernelInputError, match="CPU tensor.*meta"):
        check_array("k", "q", torch.zeros(2, 4, device="meta"))
    with pytest.raises(KernelInputError, match="forward-only.*q requires grad"):
        check_array("k", "q", torch.zeros(2, 4, requires_grad=True))
    with torch.no_grad():
        check_array("k", "q", torch.zeros(2, 4, requires_grad=True))
    with pytest.raises(KernelInputError, match=r"q must be 3-D, got q.shape=\(2, 4\)"):
        check_array("k", "q", np.zeros((2, 4), np.float32), ndim=3)
    with pytest.raises(KernelInputError, match=r"q must have shape \(\*, 5\), got q.shape=\(2, 4\)"):
        check_array("k", "q", np.zeros((2, 4), np.float32), shape=(None, 5))
    with pytest.raises(KernelInputError, match="must hold numbers"):
        check_array("k", "q", np.array([["a"]]), dtypes=None)


def test_check_array_returns_its_input_unchanged():
    x = torch.zeros(2, 3).t()
    assert check_array("k", "q", x, ndim=2, shape=(3, 2)) is x
    assert check_array("k", "e", np.zeros((0, 3), np.float32), allow_empty=True).shape == (0, 3)


@given(st.lists(st.integers(-2 ** 40, 2 ** 40), min_size=1, max_size=6))
def test_index_array_accepts_exactly_the_int32_values_in_range(values):
    ok = all(0 <= v <= 1000 for v in values)
    for kind in (list, np.array, torch.tensor):
        x = kind(values)
        if ok:
            out = index_array("k", "lens", x, shape=(len(values),), lo=0, hi=1000)
            assert out.dtype == np.int32 and out.tolist() == values
        else:
            with pytest.raises(KernelInputError, match=r"k: lens must be in \[0, 1000\], got"):
                index_array("k", "lens", x, shape=(len(values),), lo=0, hi=1000)


def test_index_array_refuses_beyond_int32_floats_and_bools():
    with pytest.raises(KernelInputError, match=r"ids must be in \[-2147483648, 2147483647\], got \[2147483648\]"):
        index_array("k", "ids", np.array([2 ** 31], np.int64))
    for bad in ([7.9], [8.0], np.array([1.0]), torch.tensor([2.0]), [True], "7"):
        with pytest.raises(KernelInputError, match="k: lens must be integers"):
            index_array("k", "lens", bad)
    with pytest.raises(KernelInputError, match=r"lens must have shape \(2,\), got shape \(3,\)"):
        index_array("k", "lens", [1, 2, 3], shape=(2,))
    assert index_array("k", "lens", None) is None
    with pytest.raises(KernelInputError, match="lens is required"):
        index_array("k", "lens", None, allow_none=False)


@pytest.mark.parametrize("good", [0.1, 1, np.float32(0.1), np.float64(0.1), np.int64(3), np.array(0.5),
                                  torch.tensor(0.25)])
def test_check_float_accepts_numpy_and_python_numbers(good):
    out = check_float("k", "softmax_scale", good)
    assert type(out) is float and out == pytest.approx(float(np.asarray(good)))


@pytest.mark.parametrize("bad,match", [("1", "must be a real number"), (True, "must be a real number"),
                                       (None, "must be a real number"), (float("nan"), "must be finite"),
                                       (float("inf"), "must be finite"), (1 + 2j, "must be a real number"),
                                       ([1.0], "must be a real number")])
def test_check_float_refuses_non_numbers(bad, match):
    with pytest.raises(KernelInputError, match=f"k: temperature {match}"):
        check_float("k", "temperature", bad)


def test_check_float_bounds_and_default():
    assert check_float("k", "s", None, default=0.5) == 0.5
    with pytest.raises(KernelInputError, match="s must be > 0, got s=0.0"):
        check_float("k", "s", 0.0, positive=True)
    with pytest.raises(KernelInputError, match="s must be <= 1.0"):
        check_float("k", "s", 1.5, hi=1.0)


def test_check_int_bool_choice():
    assert check_int("k", "top_k", np.int64(5), lo=1) == 5
    for bad in (5.0, 7.9, "5", True, None):
        with pytest.raises(KernelInputError, match="k: top_k must be an integer"):
            check_int("k", "top_k", bad)
    with pytest.raises(KernelInputError, match="top_k must be >= 1, got top_k=0"):
        check_int("k", "top_k", 0, lo=1)
    assert check_bool("k", "causal", np.bool_(True)) is True
    for bad in (1, "True", None):
        with pytest.raises(KernelInputError, match="causal must be True or False"):
            check_bool("k", "causal", bad)
    assert check_choice("k", "activation", "silu", ("silu", None)) == "silu"
    with pytest.raises(KernelInputError, match=r"activation must be one of \('silu', None\), got str 'gelu'"):
        check_choice("k", "activation", "gelu", ("silu", None))
