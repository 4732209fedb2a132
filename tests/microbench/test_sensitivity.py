"""`python -m microbench --params NAME` and `python -m microbench.goals` on tiny registered cases."""
from __future__ import annotations

import json

import numpy as np
import pytest

import microbench.__main__ as cli
from microbench import goals, registry
from microbench.registry import BenchCase
from nki_kernels.emulator import isa as nisa
from nki_kernels.emulator import jit
from nki_kernels.emulator import language as nl
from nki_kernels.emulator.costmodel import PARAMS


@jit
def _copy_kernel(x):
    """Each program instance copies its share of the rows (LNC=1 and 2)."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    rows = x.shape[0] // nl.num_programs(0)
    r0 = nl.program_id(0) * rows
    t = nl.ndarray((rows, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[r0:r0 + rows, :])
    nisa.dma_copy(dst=out[r0:r0 + rows, :], src=t)
    return out


_CASE = BenchCase(kernel="tiny_copy", shape="128x64 fp32",
                  make_inputs=lambda rng: {"x": rng.standard_normal((128, 64)).astype(np.float32)},
                  run=lambda inp: _copy_kernel(inp["x"]), reference=lambda inp: inp["x"].astype(np.float64),
                  min_hbm_bytes=2 * 128 * 64 * 4, dtype="float32", quick=True)


@pytest.fixture
def tiny_registry(monkeypatch):
    monkeypatch.setattr(registry, "cases", lambda: [_CASE])


def _modeled(path):
    return json.loads((path / "results.json").read_text())["results"][0]["modeled_us"]


def test_params_preset_changes_the_latency_bound_figure_by_the_constant(tiny_registry, tmp_path):
    base = PARAMS["trn2"]
    assert cli.main(["--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert cli.main(["--out", str(tmp_path / "h"), "--no-progress", "--params", "dma-latency-high"]) == 0
    # two DMAs in sequence, each paying the fixed latency once more
    assert _modeled(tmp_path / "h") == pytest.approx(_modeled(tmp_path / "d") + 2 * (2.0 - base.dma_fixed_us))
    assert PARAMS["trn2"] == base                               # restored after the run


def test_unknown_preset_is_an_error(tiny_registry, tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), "--params", "nope"]) == 2
    assert "unknown --params" in capsys.readouterr().err


def test_goals_table_says_whether_a_verdict_survives_the_presets(tiny_registry):
    g_latency = goals.Goal("tiny copy <= 4 us", (_CASE.key,), lambda d: d[0]["us"], 4.0, unit="us")
    g_always = goals.Goal("tiny copy <= 100 us", (_CASE.key,), lambda d: d[0]["us"], 100.0, unit="us")
    rows = goals.evaluate([g_latency, g_always], ["low", "default", "high"], progress=False)
    by = {r["goal"].name: r for r in rows}
    lat = by["tiny copy <= 4 us"]
    assert lat["values"]["low"] < lat["values"]["default"] < lat["values"]["high"]
    assert lat["verdicts"]["low"] and not lat["verdicts"]["high"] and not lat["robust"]
    assert by["tiny copy <= 100 us"]["robust"]
    text = goals.render(rows, ["low", "default", "high"])
    assert "**depends on the constants**" in text and "robust: met under every preset" in text


def test_goal_cases_are_registered():
    keys = {c.key for c in registry.cases()}
    for g in goals.GOALS:
        assert set(g.cases) <= keys, g.name
