"""The README's python examples run as written (extracted from README.md and executed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _params():
    out = []
    for i, src in enumerate(_blocks()):
        marks = []
        if "import torch" in src:
            marks.append(pytest.mark.needs_torch)
        if "integration.transformers" in src:
            marks += [pytest.mark.needs_transformers, pytest.mark.slow]
        else:
            marks.append(pytest.mark.fast)
        out.append(pytest.param(src, marks=marks, id=f"block{i}"))
    return out


def test_the_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("src", _params())
def test_readme_python_block_runs(src):
    if "import torch" in src:
        pytest.importorskip("torch")
    if "integration.transformers" in src:
        pytest.importorskip("transformers")
    exec(compile(src, str(README), "exec"), {"__name__": "readme_example"})   # noqa: S102 - our own README
