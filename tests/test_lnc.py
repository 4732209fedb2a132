"""LNC resolution: explicit lnc wins, then NEURON_LOGICAL_NC_CONFIG, then the target's default."""
from __future__ import annotations

import pytest

from nki_kernels.emulator import use_target
from nki_kernels.lnc import LNC_ENV, default_lnc, resolve_lnc
from nki_kernels.validation import KernelInputError


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(LNC_ENV, raising=False)


@pytest.mark.parametrize("target,expected", [("trn1", 1), ("trn2", 2), ("trn3", 2)])
def test_target_default(target, expected):
    with use_target(target):
        assert default_lnc() == expected
        assert resolve_lnc(None, "k") == expected


def test_env_then_explicit(monkeypatch):
    monkeypatch.setenv(LNC_ENV, "1")
    with use_target("trn2"):
        assert resolve_lnc(None, "k") == 1
        assert resolve_lnc(2, "k") == 2


@pytest.mark.parametrize("raw", ["two", "1.5", "3", "0"])
def test_bad_env_value(monkeypatch, raw):
    monkeypatch.setenv(LNC_ENV, raw)
    with pytest.raises(KernelInputError, match=LNC_ENV):
        resolve_lnc(None, "k")


@pytest.mark.parametrize("bad", [0, 3, -1, 1.0, "2", True])
def test_bad_lnc(bad):
    with pytest.raises(KernelInputError, match=r"k: lnc must be one of \(1, 2\)"):
        resolve_lnc(bad, "k")


def test_lnc_the_target_lacks():
    with use_target("trn1"), pytest.raises(KernelInputError, match="lnc=2 is not available on trn1"):
        resolve_lnc(2, "k")
