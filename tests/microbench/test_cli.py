"""The microbench CLI on tiny registered cases: table, exit code, the three output files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import microbench.__main__ as cli
from microbench import registry
from microbench.registry import BenchCase
from microbench.runner import run_case, select
from nki_kernels.backend import call
from nki_kernels.emulator import isa as nisa
from nki_kernels.emulator import jit
from nki_kernels.emulator import language as nl


@jit
def _scale_kernel(x, factor):
    """x * factor; each program instance scales its share of the rows (LNC=1 and 2)."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    rows = x.shape[0] // nl.num_programs(0)
    r0 = nl.program_id(0) * rows
    t = nl.ndarray((rows, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[r0:r0 + rows, :])
    nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=factor)
    nisa.dma_copy(dst=out[r0:r0 + rows, :], src=t)
    return out


@jit
def _scale_kernel_lnc1(x, factor):
    """x * factor by one core only (a kernel without an LNC=2 path: its wrapper launches it at LNC=1)."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=factor)
    nisa.dma_copy(dst=out, src=t)
    return out


def _case(name, factor_ref=2.0, quick=True, baseline=False):
    return BenchCase(
        kernel=name, shape="128x256 fp32",
        make_inputs=lambda rng: {"x": rng.standard_normal((128, 256)).astype(np.float32)},
        run=lambda inp: _scale_kernel(inp["x"], 2.0),
        reference=lambda inp: inp["x"].astype(np.float64) * factor_ref,
        flops=0, min_hbm_bytes=2 * 128 * 256 * 4, dtype="float32", quick=quick,
        baseline_name="two launches" if baseline else None,
        baseline_run=(lambda inp: _scale_kernel(_scale_kernel(inp["x"], 1.0), 2.0)) if baseline else None)


@pytest.fixture
def fake_registry(monkeypatch):
    cases = [_case("tiny_scale", baseline=True), _case("tiny_wrong", factor_ref=3.0),
             _case("tiny_slow", quick=False)]
    monkeypatch.setattr(registry, "cases", lambda: list(cases))
    return cases


def test_run_case_models_and_checks(fake_registry):
    r = run_case(fake_registry[0], "trn2")
    assert r.ok, r.error
    assert r.modeled_us > 0 and r.n_launches == 1
    assert r.hbm_bytes == 2 * 128 * 256 * 4
    assert r.baseline_ok and r.baseline_us > r.modeled_us and r.speedup > 1
    bad = run_case(fake_registry[1], "trn2")
    assert not bad.ok and "check failed" in bad.error
    assert bad.modeled_us > 0            # still modeled


def test_select_filters_by_name_and_quick(fake_registry):
    assert [c.kernel for c in select(fake_registry, "tiny_scale")] == ["tiny_scale"]
    assert {c.kernel for c in select(fake_registry, "tiny")} == {"tiny_scale", "tiny_wrong", "tiny_slow"}
    assert "tiny_slow" not in {c.kernel for c in select(fake_registry, None, quick=True)}


def test_cli_writes_three_files_and_fails_on_bad_check(fake_registry, tmp_path, capsys):
    out = tmp_path / "mb"
    rc = cli.main(["--quick", "--out", str(out), "--target", "trn1", "--no-progress"])
    assert rc == 1                                           # tiny_wrong fails its check
    text = capsys.readouterr().out
    assert "tiny_scale" in text and "FAIL" in text and "modeled" in text.lower()
    for f in ("results.json", "results.md", "roofline.png"):
        assert os.path.getsize(out / f) > 0
    data = json.loads((out / "results.json").read_text())
    assert data["target"] == "trn1" and data["modeled"] is True
    names = {r["kernel"]: r for r in data["results"]}
    assert set(names) == {"tiny_scale", "tiny_wrong"}
    assert names["tiny_scale"]["ok"] and not names["tiny_wrong"]["ok"]
    assert "modeled" in (out / "results.md").read_text()


def test_cli_exit_zero_when_all_pass(fake_registry, tmp_path):
    assert cli.main(["--kernels", "tiny_scale", "--out", str(tmp_path), "--no-progress"]) == 0


def test_cli_no_match_is_an_error(fake_registry, tmp_path, capsys):
    assert cli.main(["--kernels", "does_not_exist", "--out", str(tmp_path)]) == 2
    assert "no microbench case matches" in capsys.readouterr().err


def _broken_baseline(inp):
    raise RuntimeError("baseline exploded")


def test_broken_baseline_is_reported_but_kernel_result_kept(monkeypatch, tmp_path, capsys):
    case = _case("tiny_bad_baseline")
    case.baseline_name = "broken"
    case.baseline_run = _broken_baseline
    r = run_case(case, "trn2")
    assert r.ok and r.modeled_us > 0                       # the kernel itself is fine and modeled
    assert r.baseline_ok is False and "baseline exploded" in r.error
    monkeypatch.setattr(registry, "cases", lambda: [case])
    assert cli.main(["--out", str(tmp_path), "--no-progress"]) == 1
    assert "baseline FAIL" in capsys.readouterr().out


def test_cases_run_at_the_default_lnc_with_lnc1_second(fake_registry, monkeypatch):
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    r = run_case(fake_registry[0], "trn2")
    assert r.ok and r.default_lnc == 2 and r.lnc == 2 and r.modeled_us > 0
    assert r.lnc1_us > r.modeled_us                     # two cores share the rows
    r1 = run_case(fake_registry[0], "trn1")
    assert r1.default_lnc == 1 and r1.lnc == 1 and r1.lnc1_us != r1.lnc1_us      # no second run on trn1
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    assert run_case(fake_registry[0], "trn2").default_lnc == 1


def test_a_kernel_without_an_lnc2_path_gets_no_headline_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    case = _case("tiny_lnc1_only")
    case.run = lambda inp: call(_scale_kernel_lnc1, inp["x"], 2.0, lnc=1)
    r = run_case(case, "trn2")
    assert r.ok and r.lnc == 1 and r.modeled_us != r.modeled_us and r.lnc1_us > 0
    assert "the case fixes its LNC" in r.lnc_note and "LNC=1 column" in r.lnc_note
    monkeypatch.setattr(registry, "cases", lambda: [case, _case("tiny_scale")])
    assert cli.main(["--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "tiny_lnc1_only [128x256 fp32]: launches at LNC=1" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["default_lnc"] == 2
    by = {r["kernel"]: r for r in data["results"]}
    assert by["tiny_lnc1_only"]["modeled_us"] is None and by["tiny_lnc1_only"]["lnc"] == 1
    assert by["tiny_scale"]["lnc"] == 2 and by["tiny_scale"]["lnc1_us"] > by["tiny_scale"]["modeled_us"]
    assert "Missing figures" in (tmp_path / "results.md").read_text()


def test_console_table_fits_120_columns_with_full_case_names(fake_registry, tmp_path, capsys):
    long = _case("tiny_scale")
    long.shape = "a very long shape label " * 8 + "END"
    monkey_cases = [long, _case("tiny_wrong", factor_ref=3.0)]
    results = [run_case(c, "trn2") for c in monkey_cases]
    table = cli.text_table(results)
    assert max(len(line) for line in table.splitlines()) <= 120
    assert "END" in table and " ".join(table.split()).count("a very long shape label") == 8   # wrapped, not cut
    assert "FAIL" in table and "0.0%" not in table
    md = cli.markdown(results, "trn2", "python -m microbench")
    assert "## Columns" in md and "**roofline ratio**" in md


def test_an_exception_is_reported_with_one_error_class_name(tmp_path):
    case = _case("tiny_raises")
    case.run = _broken_baseline
    r = run_case(case, "trn2")
    assert not r.ok and r.error == "RuntimeError: baseline exploded"
    row = cli.rows([r])[0]
    assert row[3] == "-" and row[6] == "-"          # no figure, no utilisation for a case that never ran


def test_without_matplotlib_the_tables_are_still_written(fake_registry, tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["--kernels", "tiny_scale", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "results.md").exists() and not (tmp_path / "roofline.png").exists()
