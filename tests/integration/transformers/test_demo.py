"""`python -m integration.transformers.demo`: its output separates the stock run's messages from the patch."""
from __future__ import annotations

import pytest

from integration.transformers import demo


def test_backend_nki_without_nki_is_a_one_line_error(capsys):
    assert demo.main(["--backend", "nki"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and "--backend emulator" in out.err


@pytest.mark.slow
@pytest.mark.needs_transformers
def test_demo_reports_stock_messages_apart_and_no_fallbacks(capsys):
    pytest.importorskip("transformers")
    assert demo.main(["--new-tokens", "2"]) == 0
    out = capsys.readouterr()
    stock, patched = out.out.split("== stock run")[1].split("== patched run")
    assert "fallbacks: none" in patched and "identical tokens" in patched
    assert "falling back" not in patched and "falling back" not in out.err   # upstream notes only in the stock part


@pytest.mark.slow
@pytest.mark.needs_transformers
def test_omni_demo_runs_every_family(capsys):
    pytest.importorskip("transformers")
    assert demo.main(["--model", "omni", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for fam in ("encoders", "attention", "moe", "code_predictor"):
        assert f"\n  {fam} " in out, out
    assert "fallbacks: none" in out and "thinker text: identical" in out and "codes [groups x frames]: identical" in out
    assert "modeled time" in out
