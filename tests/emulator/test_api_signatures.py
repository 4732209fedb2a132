"""The emulated `nki`, `nki.language`, `nki.isa` and `nki.collectives` have the real NKI 0.7 signatures.

`data/nki_0_7_0_signatures.json` is extracted from the real API stubs by `data/extract_nki_signatures.py`
(SDK commit and the 0.7 changes recorded in it). Every public name of an emulated module must exist there
with the same parameter names, order, kinds (keyword-only markers included) and defaults; enums have the
same members and values. There is no exceptions list. A second test scans every kernel file for the
`nki.*` / `nl.*` / `nisa.*` names it uses: each must exist in the real API.
"""
from __future__ import annotations

import ast
import enum
import importlib
import inspect
import json
import types
from pathlib import Path

import numpy as np
import pytest

from nki_kernels.emulator import dtypes as _dt
from nki_kernels.emulator import ops as _ops
from nki_kernels.emulator.tensor import MemoryRegion

DATA = json.loads((Path(__file__).parent / "data" / "nki_0_7_0_signatures.json").read_text())
REPO = Path(__file__).resolve().parents[2]
EMULATED = {"nki": "nki_kernels.emulator.api", "nki.language": "nki_kernels.emulator.language",
            "nki.isa": "nki_kernels.emulator.isa", "nki.collectives": "nki_kernels.emulator.collectives"}


def _emulated_module(mod: str):
    try:
        return importlib.import_module(EMULATED[mod])
    except ModuleNotFoundError:
        return None


def _public_names(module, real: dict) -> dict:
    """The names of an emulated module that are part of its API: every non-underscore name that the real
    module has, every function or class defined in the module itself, and every value of an API type
    (operator, memory region, enum member, dtype). Helpers imported from elsewhere in the emulator (error
    helpers, trace records) are not API; a kernel that used one would fail the kernel-file scan below."""
    out = {}
    for k, v in vars(module).items():
        if k.startswith("_") or isinstance(v, types.ModuleType):
            continue
        defined_here = (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__
        api_value = isinstance(v, (_ops.Op, MemoryRegion, enum.Enum, np.dtype)) or \
            isinstance(v, type) and issubclass(v, np.generic)
        if k in real or defined_here or api_value:
            out[k] = v
    return out


def _default_source(value) -> str:
    """The stub's source text for an emulated default value."""
    if isinstance(value, MemoryRegion):         # nl.sbuf in the stubs
        return value.name
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, _ops.Op):
        return value.name
    if isinstance(value, np.dtype) or isinstance(value, type) and issubclass(value, np.generic):
        return _dt.name(value)
    return repr(value)


def _params(fn) -> list:
    sig = inspect.signature(fn)
    out = []
    for p in sig.parameters.values():
        default = None if p.default is inspect.Parameter.empty else _default_source(p.default)
        out.append([p.name, p.kind.name, default])
    return out


def _same_params(real: list, emulated: list) -> bool:
    if len(real) != len(emulated):
        return False
    for (rn, rk, rd), (en, ek, ed) in zip(real, emulated):
        if rn != en or rk != ek or (rd is None) != (ed is None):
            return False
        if rd is not None and rd != "..." and rd != ed:     # "..." : the stub elides the default
            return False
    return True


def _differences(mod: str) -> list[str]:
    real = DATA["modules"][mod]
    module = _emulated_module(mod)
    if module is None:
        return []
    problems = []
    for name, value in sorted(_public_names(module, real).items()):
        spec = real.get(name)
        where = f"{mod}.{name}"
        if spec is None:
            problems.append(f"{where}: not in the real API")
            continue
        kind = spec["kind"]
        if kind == "function":
            if not callable(value):
                problems.append(f"{where}: a function in the real API, not callable here")
                continue
            got = _params(value)
            if not _same_params(spec["params"], got):
                problems.append(f"{where}: signature {got} != real {spec['params']}")
        elif kind == "enum":
            if not (isinstance(value, type) and issubclass(value, enum.Enum)):
                problems.append(f"{where}: an enum in the real API")
                continue
            got = {m.name: repr(m.value) for m in value}
            want = spec["members"]                   # a value the docs do not give is null: any value matches
            if set(got) != set(want) or any(v is not None and got[k] != v for k, v in want.items()):
                problems.append(f"{where}: members {got} != real {spec['members']}")
        elif kind == "class":
            if not isinstance(value, type):
                problems.append(f"{where}: a class in the real API")
                continue
            for meth, mspec in spec["methods"].items():
                attr = inspect.getattr_static(value, meth, None)
                if attr is None:
                    continue                     # a method the emulator does not provide
                if mspec == "property":
                    if not isinstance(attr, property):
                        problems.append(f"{where}.{meth}: a property in the real API")
                    continue
                got = _params(getattr(value, meth))[1:] if not isinstance(attr, staticmethod) else \
                    _params(getattr(value, meth))
                if not _same_params(mspec, got):
                    problems.append(f"{where}.{meth}: signature {got} != real {mspec}")
    return problems


@pytest.mark.parametrize("mod", sorted(EMULATED))
def test_emulated_names_have_the_real_signatures(mod):
    problems = _differences(mod)
    assert not problems, "\n".join(problems)


def test_signature_data_records_its_source():
    src = DATA["source"]
    assert DATA["nki_version"] == "0.7.0" and src["repository"] == "aws-neuron/aws-neuron-sdk"
    assert len(src["commit"]) == 40
    assert "dynamic_range" not in DATA["modules"]["nki.language"]     # removed in 0.7
    assert DATA["modules"]["nki.language"]["fori_loop"]["kind"] == "function"


def test_the_comparison_can_fail():
    """The checker itself: a wrong order, a missing default or an extra keyword are differences."""
    real = [["dst", "POSITIONAL_OR_KEYWORD", None], ["offset", "POSITIONAL_OR_KEYWORD", "0"]]
    assert _same_params(real, [list(p) for p in real])
    assert not _same_params(real, [real[1], real[0]])
    assert not _same_params(real, [real[0], ["offset", "POSITIONAL_OR_KEYWORD", None]])
    assert not _same_params(real, real + [["kwargs", "VAR_KEYWORD", None]])


# ---------------------------------------------------------------- kernel files use only real names

_ALIASES = {"nl": "nki.language", "nisa": "nki.isa", "nki": "nki", "ncc": "nki.collectives"}


def _kernel_files():
    """nki_kernels/** except the emulator, and the calibration kernels of the microbench."""
    root = REPO / "nki_kernels"
    files = [p for p in root.rglob("*.py") if "emulator" not in p.relative_to(root).parts]
    return sorted(files + list((REPO / "microbench" / "calibration").glob("*.py")))


def _api_uses(path: Path):
    """(line, module, name) for every `nl.x`, `nisa.x`, `nki.x`, `nki.isa.x`, ... attribute use."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("backend"):
            imported |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in _ALIASES and base.id in imported:
            mod = _ALIASES[base.id]
            if mod == "nki" and node.attr in ("language", "isa", "collectives"):
                continue
            yield node.lineno, mod, node.attr
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "nki" \
                and base.attr in ("language", "isa", "collectives") and "nki" in imported:
            yield node.lineno, f"nki.{base.attr}", node.attr


def test_kernel_files_call_only_real_api_names():
    files = _kernel_files()
    assert files, "no kernel files found"
    missing, seen = [], set()
    for path in files:
        for line, mod, name in _api_uses(path):
            seen.add(f"{mod}.{name}")
            if name not in DATA["modules"][mod]:
                missing.append(f"{path.relative_to(REPO)}:{line}: {mod}.{name}")
    assert {"nki.jit", "nki.language.ndarray", "nki.isa.nc_matmul", "nki.isa.dma_copy"} <= seen   # the scan works
    assert not missing, "names not in the real NKI 0.7 API:\n" + "\n".join(missing)
