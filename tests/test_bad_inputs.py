"""Bad inputs to every public function end in a clear error naming the argument (issue 16, item 4).

Generic sweeps over every function of `nki_kernels.__all__` and each of its array arguments (lists, float64,
meta tensors, tensors requiring grad, empty batches), then the issue's individual examples. A refusal is a
`KernelInputError` (a ValueError and a TypeError) whose message names the argument; a misspelt keyword is a
TypeError from Python. Where a function may accept an input instead (an index list, a float64 array cast
where the dtype rule allows), the result must equal the one from the canonical input.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nki_kernels
from _public_cases import case
from nki_kernels.validation import KernelInputError

torch = pytest.importorskip("torch")


def _run(name, pos, kw):
    with torch.no_grad():
        return getattr(nki_kernels, name)(*(v for _, v in pos), **kw)


def _array_args(name):
    """(arg name, is positional) for every array argument of a case."""
    pos, kw, _ = case(name, np.random.default_rng(0))
    return [(n, True) for n, v in pos if isinstance(v, np.ndarray)] + \
           [(n, False) for n, v in kw.items() if isinstance(v, np.ndarray)]


def _replace(pos, kw, arg, fn):
    pos = [(n, fn(v) if n == arg else v) for n, v in pos]
    kw = {n: fn(v) if n == arg else v for n, v in kw.items()}
    return pos, kw


def _fresh(name):
    pos, kw, _ = case(name, np.random.default_rng(7))
    return [(n, v.copy() if isinstance(v, np.ndarray) else v) for n, v in pos], dict(kw)


def _outputs(out):
    out = out if isinstance(out, tuple) else (out,)
    return [np.asarray(o.float() if isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 else o,
                       dtype=np.float64) for o in out if o is not None]


def _same_result(name, got, pos, kw):
    """`got` (from an accepted non-canonical input) equals the run on the canonical input."""
    want = _run(name, pos, kw)
    for g, w in zip(_outputs(got), _outputs(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=name)


def _refused_or_same(name, arg, pos, kw, bad_pos, bad_kw, state_args=()):
    try:
        got = _run(name, bad_pos, bad_kw)
    except KernelInputError as exc:
        assert f"{name}" in str(exc) or name.replace("_", "") in str(exc), str(exc)
        assert arg in str(exc), f"{name}: the message does not name {arg}: {exc}"
        return "refused"
    _same_result(name, got, *_fresh(name))
    return "accepted"


ALL_ARRAY_ARGS = [(name, arg) for name in nki_kernels.__all__ for arg, _ in _array_args(name)]
# arguments whose in-place update would differ between two runs: compare outputs on fresh copies
_IN_PLACE = {"gated_delta_rule_step": "state_pool", "causal_conv1d_update": "conv_state"}


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_a_python_list_is_refused_naming_the_argument_or_accepted(name, arg):
    pos, kw = _fresh(name)
    if _IN_PLACE.get(name) == arg:
        bad_pos, bad_kw = _replace(pos, kw, arg, lambda v: v.tolist())
        with pytest.raises(KernelInputError, match=arg):
            _run(name, bad_pos, bad_kw)
        return
    bad_pos, bad_kw = _replace(pos, kw, arg, lambda v: v.astype(np.float32).tolist()
                               if v.dtype.kind == "V" else v.tolist())
    _refused_or_same(name, arg, pos, kw, bad_pos, bad_kw)


def _is_float(name, arg):
    pos, kw = _fresh(name)
    v = dict(pos).get(arg, kw.get(arg))
    return v.dtype.kind == "f"


FLOAT_ARRAY_ARGS = [(n, a) for n, a in ALL_ARRAY_ARGS if _is_float(n, a)]


@pytest.mark.parametrize("name,arg", FLOAT_ARRAY_ARGS)
def test_float64_is_refused_naming_the_argument_or_cast(name, arg):
    """e.g. float64 affinities, top_k_weights, past_hidden (issue 16)."""
    pos, kw = _fresh(name)
    bad_pos, bad_kw = _replace(pos, kw, arg, lambda v: v.astype(np.float64))
    _refused_or_same(name, arg, pos, kw, bad_pos, bad_kw)


@pytest.mark.parametrize("name", nki_kernels.__all__)
def test_numpy_default_dtypes_everywhere_are_refused_or_accepted(name):
    """np.random.randn / np.arange give float64 / int64 for every argument at once."""
    pos, kw = _fresh(name)
    widen = lambda v: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else (  # noqa
        v.astype(np.int64) if isinstance(v, np.ndarray) and v.dtype.kind in "iu" else v)
    bad_pos = [(n, widen(v)) for n, v in pos]
    bad_kw = {n: widen(v) for n, v in kw.items()}
    try:
        got = _run(name, bad_pos, bad_kw)
    except KernelInputError as exc:
        assert "float64" in str(exc), str(exc)
        return
    _same_result(name, got, *_fresh(name))


def _torch_args(pos, kw, arg, make):
    conv = lambda n, v: make(v) if n == arg else (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)  # noqa
    return [(n, conv(n, v)) for n, v in pos], {n: conv(n, v) for n, v in kw.items()}


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_a_meta_tensor_is_refused_naming_the_argument(name, arg):
    pos, kw = _fresh(name)
    meta = lambda v: torch.empty(v.shape, dtype=torch.from_numpy(np.zeros(1, v.dtype)).dtype, device="meta")  # noqa
    bad_pos, bad_kw = _torch_args(pos, kw, arg, meta)
    with pytest.raises(KernelInputError, match=arg):
        _run(name, bad_pos, bad_kw)


@pytest.mark.parametrize("name,arg", FLOAT_ARRAY_ARGS)
def test_a_tensor_requiring_grad_is_refused_as_forward_only(name, arg):
    pos, kw = _fresh(name)
    bad_pos, bad_kw = _torch_args(pos, kw, arg, lambda v: torch.from_numpy(v).requires_grad_(True))
    with pytest.raises(KernelInputError, match=f"forward-only.*{arg}"):
        getattr(nki_kernels, name)(*(v for _, v in bad_pos), **bad_kw)


# (function, label, {arg: axis to empty}): every batch / token / sequence dimension at zero
EMPTY = [
    ("tiled_matmul", "K=0", {"lhsT": 0, "rhs": 0}), ("tiled_matmul", "M=0", {"lhsT": 1}),
    ("softmax", "R=0", {"x": 0}), ("rmsnorm", "R=0", {"x": 0}),
    ("flash_attention", "B=0", {"q": 0, "k": 0, "v": 0, "gate": 0, "seq_lens": 0}),
    ("flash_attention", "Sq=0", {"q": 2, "gate": 2}),
    ("flash_attention_varlen", "T=0", {"q": 0, "k": 0, "v": 0}),
    ("flash_attention_decode", "B=0", {"q": 0, "k_cache": 0, "v_cache": 0, "cache_lens": 0}),
    ("gated_delta_rule", "B=0", {"q": 0, "k": 0, "v": 0, "g": 0, "beta": 0, "initial_state": 0}),
    ("gated_delta_rule", "T=0", {"q": 1, "k": 1, "v": 1, "g": 1, "beta": 1}),
    ("gated_delta_rule_step", "B=0", {"q": 0, "k": 0, "v": 0, "g": 0, "beta": 0, "slot_ids": 0}),
    ("causal_conv1d", "B=0", {"x": 0, "conv_state": 0}), ("causal_conv1d", "T=0", {"x": 2}),
    ("causal_conv1d_update", "B=0", {"x": 0, "conv_state": 0}), ("causal_conv1d_update", "T=0", {"x": 2}),
    ("moe_route", "T=0", {"router_logits": 0}), ("moe_block_mapping", "T=0", {"top_k_index": 0}),
    ("moe_blockwise", "T=0", {"hidden": 0, "expert_affinities": 0, "top_k_index": 0}),
    ("moe_decode", "T=0", {"hidden": 0, "top_k_index": 0, "top_k_weights": 0}),
    ("code_predictor", "B=0", {"past_hidden": 0, "code0_embed": 0}),
]


def test_every_public_function_has_an_empty_case():
    assert {n for n, _, _ in EMPTY} == set(nki_kernels.__all__)


@pytest.mark.parametrize("name,label,axes", EMPTY, ids=[f"{n}-{lbl}" for n, lbl, _ in EMPTY])
def test_empty_inputs_are_refused(name, label, axes):
    """The project rule (docs/inputs.md): a zero-size batch / token / sequence dimension is a KernelInputError."""
    pos, kw = _fresh(name)
    empty = lambda ax: lambda v: np.take(v, np.arange(0), axis=ax)  # noqa: E731
    for arg, ax in axes.items():
        pos, kw = _replace(pos, kw, arg, empty(ax))
    with pytest.raises(KernelInputError):
        _run(name, pos, kw)


# ---------------------------------------------------------------- the individual examples


def test_unknown_keywords_are_type_errors():
    for name, typo in (("gated_delta_rule", "initial_sate"), ("gated_delta_rule_step", "use_qk_l2norm"),
                       ("causal_conv1d", "conv_sate"), ("causal_conv1d_update", "activaton")):
        pos, kw = _fresh(name)
        with pytest.raises(TypeError, match=typo):
            _run(name, pos, {**kw, typo: None})


@pytest.mark.parametrize("name,arg", [("gated_delta_rule", "valid_lengths"), ("causal_conv1d", "valid_lengths"),
                                      ("flash_attention", "seq_lens"), ("flash_attention_decode", "cache_lens"),
                                      ("gated_delta_rule_step", "slot_ids")])
@pytest.mark.parametrize("values", [[7.9], [8.0]])
def test_integer_arguments_given_as_floats_are_refused(name, arg, values):
    pos, kw = _fresh(name)
    batch = dict(pos).get("q", dict(pos).get("x"))
    bad = np.array(values * batch.shape[0], dtype=np.float64)
    if arg in dict(pos):
        pos = [(n, bad if n == arg else v) for n, v in pos]
    else:
        kw = {**kw, arg: bad.tolist()}
    with pytest.raises(KernelInputError, match=arg):
        _run(name, pos, kw)


@given(scale=st.floats(0.01, 2.0), kind=st.sampled_from([np.float32, np.float64, float]))
def test_numpy_scalars_are_accepted_for_float_arguments(scale, kind):
    pos, kw = _fresh("flash_attention")
    want = _run("flash_attention", pos, {**kw, "softmax_scale": float(kind(scale))})
    got = _run("flash_attention", pos, {**kw, "softmax_scale": kind(scale)})
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name,arg,value", [("flash_attention_decode", "softmax_scale", np.float32(0.1)),
                                            ("gated_delta_rule", "scale", np.float32(0.1)),
                                            ("gated_delta_rule_step", "scale", np.float64(0.1)),
                                            ("rmsnorm", "eps", np.float32(1e-5))])
def test_numpy_scalar_float_arguments(name, arg, value):
    pos, kw = _fresh(name)
    want = _run(name, *_fresh_with(name, arg, float(value)))
    got = _run(name, pos, {**kw, arg: value})
    for g, w in zip(_outputs(got), _outputs(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def _fresh_with(name, arg, value):
    pos, kw = _fresh(name)
    pos = [(n, value if n == arg else v) for n, v in pos]
    if arg not in dict(pos):
        kw = {**kw, arg: value}
    return pos, kw


@pytest.mark.parametrize("arg,value", [("temperature", "1"), ("temperature", None), ("top_k", 5.0),
                                       ("top_p", "0.9"), ("do_sample", "yes")])
def test_code_predictor_non_numeric_sampling_arguments(arg, value):
    pos, kw = _fresh("code_predictor")
    u = np.random.default_rng(0).uniform(size=(2, 2)).astype(np.float32)
    with pytest.raises(KernelInputError, match=arg):
        _run("code_predictor", pos, {**kw, "do_sample": True, "uniforms": u, "top_k": 5, arg: value})


@pytest.mark.parametrize("temperature", [1e-40, 3e-39, 1e-31, 1e-300])
def test_code_predictor_temperature_below_the_fp32_floor_is_refused(temperature):
    """The kernel scales fp32 logits by 1 / temperature: such values overflowed it and gave wrong codes (every code
    Vh - 1 at 1e-40); they are refused naming the floor, and the floor itself runs."""
    pos, kw = _fresh("code_predictor")
    u = np.random.default_rng(0).uniform(size=(2, 2)).astype(np.float32)
    kw = {**kw, "do_sample": True, "uniforms": u, "top_k": 5}
    with pytest.raises(KernelInputError, match="temperature must be >= 1e-30"):
        _run("code_predictor", pos, {**kw, "temperature": temperature})
    _run("code_predictor", pos, {**kw, "temperature": 1e-30})


def test_code_predictor_numpy_temperature_is_accepted():
    pos, kw = _fresh("code_predictor")
    u = np.random.default_rng(0).uniform(size=(2, 2)).astype(np.float32)
    kw = {**kw, "do_sample": True, "uniforms": u, "top_k": 5}
    want = _run("code_predictor", pos, {**kw, "temperature": 0.75})
    got = _run("code_predictor", pos, {**kw, "temperature": np.float32(0.75)})
    for g, w in zip(_outputs(got), _outputs(want)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name,arg", [("moe_decode", "top_k_index"), ("moe_blockwise", "top_k_index"),
                                      ("moe_block_mapping", "top_k_index")])
@pytest.mark.parametrize("offset", [2 ** 31, 2 ** 32])
def test_ids_beyond_int32_are_refused(name, arg, offset):
    pos, kw = _fresh(name)
    big = lambda v: v.astype(np.int64) + offset  # noqa: E731
    pos, kw = _replace(pos, kw, arg, big)
    with pytest.raises(KernelInputError, match=arg):
        _run(name, pos, kw)


def test_moe_blockwise_mapping_must_match_top_k_index():
    pos, kw = _fresh("moe_blockwise")
    n_exp = dict(pos)["gate_up"].shape[0]
    wrong = (kw["top_k_index"] + 1) % n_exp                    # a valid routing, not the one the mapping encodes
    with pytest.raises(KernelInputError, match="top_k_index"):
        _run("moe_blockwise", pos, {**kw, "top_k_index": wrong})
