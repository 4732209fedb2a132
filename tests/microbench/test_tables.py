"""`python -m microbench.tables`: renders the performance tables from a results.json (a synthetic one here)."""
import json

import pytest

from microbench import tables
from microbench.goals import GOALS

_QWEN = "qwen3.5-35b-a3b tp4"


def _result(kernel, shape, us, lnc1=None, roof=None, base=None, base_name="", ok=True, base_ok=None, util=0.5):
    return dict(kernel=kernel, shape=shape, ok=ok, modeled_us=us, lnc1_us=lnc1, roofline_us=roof,
                roofline_ratio=(us / roof if (us is not None and roof) else None), tensor_util=util,
                baseline_name=base_name, baseline_us=base, baseline_ok=base_ok,
                speedup=(base / us if (base and us) else None), lnc=2, default_lnc=2)


def _data():
    res = [
        _result("flash_attention", f"{_QWEN} Sq=Skv=8192 causal gated D=256", 2000.0, 3900.0, 1600.0, 2600.0,
                "host permute + expanded KV", base_ok=True, util=0.9),
        _result("flash_attention", f"{_QWEN} Sq=Skv=512 causal gated D=256", 30.0, 55.0, 10.0),
        _result("gated_delta_rule_step", f"{_QWEN} B=1 T=1 Hk=4 Hv=8 D=128 fp32 state", 12.5, 11.0, 3.0),
        _result("moe_decode", f"{_QWEN} T=1 E=256 TOPK=8 H=2048 I=128 Is=128", None, 40.0, None, ok=False),
        _result("softmax", "R=4096 C=2048 bf16", 50.0, 100.0, 46.0, 70.0, "x | y", base_ok=False),
        _result("my_new_kernel", "S=1", 1.0),
    ]
    return {"target": "trn2", "command": "python -m microbench", "default_lnc": 2, "results": res}


def test_performance_tables_have_every_case_and_dash_for_missing(tmp_path):
    text = tables.render_performance(_data())
    assert "### Attention" in text and "### Gated DeltaNet" in text and "### Other" in text
    row = next(ln for ln in text.splitlines() if "Sq=Skv=8192" in ln and ln.startswith("| `flash_attention`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["ok", "2000.0", "3900.0", "1600.0", "1.25x", "90%", "host permute + expanded KV", "2600.0",
                         "1.30x"]
    failed = next(ln for ln in text.splitlines() if ln.startswith("| `moe_decode`"))
    fcells = [c.strip() for c in failed.strip("|").split("|")]
    assert fcells[2] == "FAIL" and fcells[3] == "-" and fcells[4] == "40.0" and fcells[7] == "-"
    soft = next(ln for ln in text.splitlines() if ln.startswith("| `softmax`"))
    assert "ok, baseline FAIL" in soft and "x / y" in soft      # a "|" in a name cannot break the table
    assert "nan" not in text.lower()


def test_goals_are_evaluated_on_the_results():
    rows = {name: (v, verdict) for name, v, verdict in tables.goal_rows(_data()["results"])}
    assert len(rows) == len(GOALS)
    assert rows["flash_attention Sq=Skv=8192: time <= 1.3x roofline"] == ("1.25x", "met")
    assert rows["flash_attention Sq=Skv=8192: TensorE busy >= 80%"] == ("90%", "met")
    assert rows["gated_delta_rule_step B=1: <= 10 us"] == ("12.5 µs", "**not met**")
    assert rows["moe_decode Qwen3.5 T=1: <= 1.3x weight stream"] == ("-", "no figure")
    assert rows["code_predictor B=1 TP=8: <= 1 ms per frame"] == ("-", "not in this run")
    card = tables.render_headline(_data())       # KERNELS.md shows every goal with its figure and verdict too
    assert "| flash_attention Sq=Skv=8192: time <= 1.3x roofline | 1.25x | met |" in card
    assert "| gated_delta_rule_step B=1: <= 10 us | 12.5 µs | **not met** |" in card
    assert all(f"| {g.name} |" in card for g in GOALS)


def test_headline_picks_the_named_case_else_the_first():
    rows = list(tables.headline_rows(_data()["results"]))
    fa = next(r for r in rows if r[0] == "`flash_attention`")
    assert fa[1].endswith("Sq=Skv=8192 causal gated D=256") and fa[2] == "2000.0" and fa[5].startswith("1.30x vs")
    assert [r[0] for r in rows] == ["`flash_attention`", "`gated_delta_rule_step`", "`moe_decode`", "`softmax`"]
    assert not fa[1].endswith(" *") and next(r for r in rows if r[0] == "`softmax`")[1] == "R=4096 C=2048 bf16"
    data = _data()
    data["results"][0]["shape"] = "another shape"
    assert "another shape *" in tables.render_headline(data) and "stands in" in tables.render_headline(data)


def test_command_rewrites_only_the_marked_blocks(tmp_path):
    (tmp_path / "docs").mkdir()
    begin_p, end_p = tables._markers(tables.PERF_BLOCK)
    begin_h, end_h = tables._markers(tables.HEADLINE_BLOCK)
    (tmp_path / "docs" / "performance.md").write_text(f"intro\n{begin_p}\nold\n{end_p}\noutro\n")
    (tmp_path / "KERNELS.md").write_text(f"card\n{begin_h}\nold\n{end_h}\nrest\n")
    res = tmp_path / "results.json"
    res.write_text(json.dumps(_data()))
    assert tables.main(["--results", str(res), "--root", str(tmp_path), "--check"]) == 1
    assert tables.main(["--results", str(res), "--root", str(tmp_path)]) == 0
    perf = (tmp_path / "docs" / "performance.md").read_text()
    card = (tmp_path / "KERNELS.md").read_text()
    assert perf.startswith("intro\n") and perf.endswith(f"{end_p}\noutro\n") and "old" not in perf
    assert card.startswith("card\n") and card.endswith(f"{end_h}\nrest\n") and "| `moe_decode` |" in card
    assert tables.main(["--results", str(res), "--root", str(tmp_path), "--check"]) == 0   # idempotent
    (tmp_path / "goals.md").write_text("| goal | low |\n|---|---|\n| x | met |\n")
    assert tables.main(["--results", str(res), "--root", str(tmp_path)]) == 0
    assert "| x | met |" in (tmp_path / "docs" / "performance.md").read_text()


def test_missing_markers_or_results_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="BEGIN GENERATED: performance"):
        tables.replace_block("no markers", tables.PERF_BLOCK, "x")
    assert tables.main(["--results", str(tmp_path / "none.json"), "--root", str(tmp_path)]) == 2


def test_repository_files_have_the_markers():
    for path, name in ((tables.PERF_DOC, tables.PERF_BLOCK), (tables.CARD, tables.HEADLINE_BLOCK)):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "SENTINEL" in tables.replace_block(text, name, "SENTINEL")     # raises when the markers are missing


def test_roofline_plot_redraws_from_results_json_with_failed_and_bandwidth_only_cases(tmp_path):
    pytest.importorskip("matplotlib")
    from microbench.plot import plot_results_json
    data = _data()
    for r in data["results"]:
        r.update(flops=0 if r["kernel"] == "softmax" else 10 ** 9, min_hbm_bytes=10 ** 7, hbm_gbps=100.0,
                 tflops=1.0)
    res = tmp_path / "results.json"
    res.write_text(json.dumps(data))
    plot_results_json(str(res), str(tmp_path / "roofline.png"))
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
