"""KERNELS.md stays a true reference card: every public function is there with all its current parameters."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import nki_kernels

ROOT = Path(__file__).resolve().parents[1]
CARD = (ROOT / "KERNELS.md").read_text(encoding="utf-8")

EXTRA = {  # public functions outside nki_kernels.__all__ that the card documents: name -> module
    "code_predictor_tp": "nki_kernels.codepredictor", "code_predictor_rank": "nki_kernels.codepredictor",
    "shard_weights": "nki_kernels.codepredictor",
    "weights_from_transformers": "nki_kernels.moe", "weights_from_state_dict": "nki_kernels.moe",
    "experts_from_transformers": "nki_kernels.moe", "shared_from_transformers": "nki_kernels.moe",
    "gated_delta_rule_fused": "nki_kernels.deltanet",
}


def _function(name):
    if name in EXTRA:
        import importlib
        return getattr(importlib.import_module(EXTRA[name]), name)
    return getattr(nki_kernels, name)


def _calls(name: str):
    """The text of every `name(...)` in KERNELS.md (parentheses balanced, across lines)."""
    for m in re.finditer(r"(?<![\w.])" + re.escape(name) + r"\(", CARD):
        depth, i = 0, m.end() - 1
        for j in range(i, len(CARD)):
            depth += {"(": 1, ")": -1}.get(CARD[j], 0)
            if depth == 0:
                yield CARD[i:j + 1]
                break


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(nki_kernels.__all__) + sorted(EXTRA))
def test_card_shows_every_parameter(name):
    params = list(inspect.signature(_function(name)).parameters)
    texts = list(_calls(name))
    assert texts, f"KERNELS.md has no signature `{name}(...)`"
    best = min(texts, key=lambda t: sum(p not in set(re.findall(r"\w+", t)) for p in params))
    missing = [p for p in params if p not in set(re.findall(r"\w+", best))]
    assert not missing, f"KERNELS.md's `{name}(...)` lacks parameters {missing}: {best}"


@pytest.mark.fast
def test_card_stays_short():
    assert len(CARD) < 40_000, "KERNELS.md is the reference card: move depth to docs/<topic>.md"
