"""Calibration: the published-kernel re-writes compute the right thing, and the cost model's modeled time for
each published point stays inside the stated error band (modeled vs measured on trn1)."""
from __future__ import annotations

import numpy as np
import pytest

from microbench.calibration.points import BY_ID, POINTS, model_point
from nki_kernels.emulator import run
from nki_kernels.testing import assert_close

# Stated band for modeled vs published device time (trn1, AccelOpt S3 profiles); docs/cost-model.md, "Calibration".
ERROR_BAND = 0.25

_SMALL = {     # small shapes with the same tiling, for the correctness check
    "A1": lambda rng: BY_ID["A1"].make(2, rng, kk=384, n=2048),
    "A2": lambda rng: BY_ID["A2"].make(1, rng, kk=256, n=704),
    "A5": lambda rng: BY_ID["A5"].make(2, rng, kk=256, n=1024),
    "A6": lambda rng: BY_ID["A6"].make(2, rng, kk=256, n=1024),
    "A8": lambda rng: BY_ID["A8"].make(2, rng, m=256, n=1024),
    "A12": lambda rng: BY_ID["A12"].make(2, rng, n=1024),
    "A13": lambda rng: BY_ID["A13"].make(2, rng),
    "A11": lambda rng: BY_ID["A11"].make(2, rng),
    "A3": lambda rng: BY_ID["A3"].make(1, rng, kk=512, n=1024),
    "A7": lambda rng: BY_ID["A7"].make(1, rng, kk=256, n=1024),
    "U5": lambda rng: BY_ID["U5"].make(1, rng, c=128, w=64),
    "A9": lambda rng: BY_ID["A9"].make(1, rng, m=1280, n=2048),
    "A10": lambda rng: BY_ID["A10"].make(1, rng, s=512),
    "A4": lambda rng: BY_ID["A4"].make(1, rng, m=512, kk=1024),
    "U4.0": lambda rng: BY_ID["U4.0"].make(1, rng, n=512),
    "U4.5": lambda rng: BY_ID["U4.5"].make(1, rng, n=512),
}


@pytest.mark.parametrize("pid", sorted(_SMALL))
def test_calibration_kernel_matches_reference(pid):
    p = BY_ID[pid]
    args, kw = _SMALL[pid](np.random.default_rng(3))
    res = run(p.kernel, *args, target=p.target, **{"lnc": 1, **kw})
    dtype = "bfloat16" if pid.startswith("U4") else "float32"     # U4 runs its matmuls in bf16, as published
    assert_close(pid, p.reference(*args, **kw), res.outputs, dtype=dtype)


def test_adamw_extreme_values():
    """Zero second moments (eps guards the reciprocal) and huge gradients stay finite and correct."""
    p = BY_ID["A13"]
    rng = np.random.default_rng(5)
    args, kw = p.make(2, rng)
    param, grad, m, v = args
    v[:] = 0.0
    grad[:3] = 1e6
    res = run(p.kernel, param, grad, m, v, target="trn1", **{"lnc": 1, **kw})
    assert_close("adamw", p.reference(param, grad, m, v, **kw), res.outputs, dtype="float32")


def test_published_points_cover_kernels_targets_and_a_held_out_third():
    assert len({p.name for p in POINTS}) >= 10
    assert all(p.measured_us > 0 and p.split in ("fit", "held-out") for p in POINTS)
    assert {p.target for p in POINTS} == {"trn1", "trn2"}
    held = [p for p in POINTS if p.split == "held-out"]
    assert 3 * len(held) >= len(POINTS)
    assert {p.timing for p in POINTS} >= {"prof", "bench", "dma-engine", "marginal"}


@pytest.mark.parametrize("pid", ["ACT1", "DMA1"])
def test_micro_points_within_band(pid):
    """The two single-instruction points (dependent ScalarE chain on trn1, one-engine DMA on trn2)."""
    r = model_point(BY_ID[pid])
    assert abs(r.error) <= ERROR_BAND, f"{pid}: modeled {r.modeled_us:.3f} us vs measured {r.measured_us:.3f} us"


@pytest.mark.parametrize("pid", ["A12", "A13"])
def test_cheap_points_within_band(pid):
    r = model_point(BY_ID[pid])
    assert abs(r.error) <= ERROR_BAND, f"{pid}: modeled {r.modeled_us:.0f} us vs measured {r.measured_us:.0f} us"


def test_slice_extrapolation_is_linear():
    """The k-slices the calibration extrapolates from really are linear in k (steady state)."""
    p = BY_ID["A12"]
    t = {k: model_point(p, k_model=(k,)).modeled_us * k / p.k_full for k in (2, 4, 6)}
    assert (t[6] - t[4]) == pytest.approx(t[4] - t[2], rel=0.05)


# Fit points the model misses, with the reason (docs/cost-model.md, "Calibration"); they stay in the table.
KNOWN_MISSES = {
    "A11": "VectorE-bound in the model (3.1 ms, as the published 72% VectorE busy); the published run is 28% "
           "slower, consistent with its un-pipelined NKI 0.6 sequential loop, which the model does not capture",
}


@pytest.mark.slow
@pytest.mark.parametrize("pid", [pytest.param(p.id, marks=pytest.mark.xfail(reason=KNOWN_MISSES[p.id], strict=True))
                                 if p.id in KNOWN_MISSES else p.id for p in POINTS if p.split == "fit"])
def test_fit_points_within_band(pid):
    """The fit split stays inside the band (held-out results are reported by `python -m microbench.calibration`,
    not asserted: they are the model's honest test)."""
    r = model_point(BY_ID[pid])
    assert abs(r.error) <= ERROR_BAND, f"{pid}: modeled {r.modeled_us:.0f} us vs measured {r.measured_us:.0f} us"


def test_console_table_fits_120_columns():
    from microbench.calibration.__main__ import console_table
    from microbench.calibration.points import PointResult
    rs = [PointResult("A1", "a kernel with a rather long published name", "[4096, 8192]", "trn1", 1234.5, 1300.0,
                      0.053, split="fit"),
          PointResult("H2", "held-out kernel", "[1, 2]", "trn1", 10.0, 13.0, 0.3, split="held-out")]
    text = console_table(rs)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "+5.3%" in text and "+30.0%" in text and "held-out: 1 points" in text
