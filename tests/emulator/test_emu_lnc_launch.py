"""NKI 0.7 launch semantics: a kernel's LNC must equal the degree neuronx-cc uses (NCC_EVRF066).

Degree in force: `compiler_lnc` / `run(compile_lnc=)`, else NEURON_LOGICAL_NC_CONFIG, else the target's default
(2 on trn2/trn3, 1 on trn1). A kernel's own degree: `kernel[n]`, else NEURON_LOGICAL_NC_CONFIG, else 1.
"""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import jit, nisa, nl, raises, rnd, run

from nki_kernels import backend
from nki_kernels.emulator import (EmulatorCheckError, compiler_lnc, degree_in_force, record_launches, simulate,
                                  use_target)
from nki_kernels.emulator.lnc import LNC_ENV
from nki_kernels.validation import KernelInputError


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(LNC_ENV, raising=False)


@jit
def _halves(x):
    """out = x + 1, rows split in two halves by program id (works at LNC=1 and 2)."""
    n, f = x.shape
    out = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    n_prog, pid = nl.num_programs(), nl.program_id(0)
    rows = n // n_prog
    t = nl.ndarray((rows, f), nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[pid * rows:(pid + 1) * rows, :])
    nisa.tensor_scalar(dst=t, data=t, op0=nl.add, operand0=1.0)
    nisa.dma_copy(dst=out[pid * rows:(pid + 1) * rows, :], src=t)
    return out


def _x(rng):
    return rnd(rng, (8, 4))


@pytest.mark.parametrize("target,expected", [("trn1", 1), ("trn2", 2), ("trn3", 2)])
def test_degree_in_force_is_the_target_default(target, expected):
    with use_target(target):
        assert degree_in_force() == expected


def test_plain_call_on_trn2_is_refused_like_neuronx_cc(rng):
    x = _x(rng)
    with raises("NCC_EVRF066", "'_halves'", "configured with LNC=1", "neuronx-cc is using LNC=2", LNC_ENV):
        _halves(x)
    with raises("NCC_EVRF066", "LNC=1", "LNC=2"):
        simulate(_halves)(x)
    with raises("NCC_EVRF066", "LNC=1", "LNC=2"):
        _halves[1](x)
    np.testing.assert_array_equal(_halves[2](x), x + 1)        # the bracket at the degree in force


def test_env_sets_both_degrees(rng, monkeypatch):
    x = _x(rng)
    monkeypatch.setenv(LNC_ENV, "2")
    with record_launches() as runs:
        np.testing.assert_array_equal(_halves(x), x + 1)
    assert runs[0].lnc == 2 and len(runs[0].traces) == 2
    monkeypatch.setenv(LNC_ENV, "1")
    with record_launches() as runs:
        np.testing.assert_array_equal(simulate(_halves)(x), x + 1)
    assert runs[0].lnc == 1
    with raises("NCC_EVRF066", "configured with LNC=2", "using LNC=1"):
        _halves[2](x)


def test_trn1_default_and_missing_lnc2(rng):
    x = _x(rng)
    with use_target("trn1"):
        np.testing.assert_array_equal(_halves(x), x + 1)
        with raises("launch", "lnc=2 is not available on trn1", "(1,)"):
            _halves[2](x)
        with raises("launch", "lnc=2 is not available on trn1"):
            run(_halves, x, lnc=2)


@pytest.mark.parametrize("raw", ["two", "1.5", "3", "0"])
def test_bad_env_value_is_a_clear_error(rng, monkeypatch, raw):
    monkeypatch.setenv(LNC_ENV, raw)
    with raises("launch", LNC_ENV, "(1, 2)", repr(raw)):
        _halves(_x(rng))
    with raises("launch", LNC_ENV):
        _halves[2](_x(rng))


def test_run_lnc_models_the_env_and_compile_lnc_the_compiler(rng):
    x = _x(rng)
    for lnc in (1, 2):
        res = run(_halves, x, lnc=lnc)
        assert res.lnc == lnc and len(res.traces) == lnc
        np.testing.assert_array_equal(res.outputs, x + 1)
    with raises("NCC_EVRF066", "configured with LNC=1", "using LNC=2"):
        run(_halves, x, lnc=1, compile_lnc=2)
    with raises("NCC_EVRF066", "configured with LNC=1", "using LNC=2"):
        run(_halves, x)                                 # plain launch at LNC=1 on trn2
    assert run(_halves[2], x).lnc == 2
    with raises("launch", "compile_lnc must be one of (1, 2)", "3"):
        run(_halves, x, lnc=2, compile_lnc=3)


def test_compiler_lnc_context(rng):
    x = _x(rng)
    with compiler_lnc(1):
        assert degree_in_force() == 1
        np.testing.assert_array_equal(_halves(x), x + 1)
        with raises("NCC_EVRF066", "configured with LNC=2", "using LNC=1"):
            _halves[2](x)
    assert degree_in_force() == 2
    for bad in (0, 3, 1.0, "2", True):
        with pytest.raises(EmulatorCheckError, match=r"lnc must be one of \(1, 2\)"):
            with compiler_lnc(bad):
                pass


def test_backend_call_resolves_lnc(rng, monkeypatch):
    x = _x(rng)
    with record_launches() as runs:
        np.testing.assert_array_equal(backend.call(_halves, x), x + 1)           # trn2 default: 2
        monkeypatch.setenv(LNC_ENV, "1")
        np.testing.assert_array_equal(backend.call(_halves, x), x + 1)           # the variable: 1
        np.testing.assert_array_equal(backend.call(_halves, x, lnc=2), x + 1)    # explicit wins
    assert [r.lnc for r in runs] == [2, 1, 2]
    with use_target("trn1"):
        monkeypatch.delenv(LNC_ENV)
        backend.call(_halves, x)
    with pytest.raises(KernelInputError, match=r"lnc must be one of \(1, 2\)"):
        backend.call(_halves, x, lnc=3)
    monkeypatch.setenv(LNC_ENV, "x")
    with pytest.raises(KernelInputError, match=LNC_ENV):
        backend.call(_halves, x)
