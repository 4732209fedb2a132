"""Project conventions as tests: import boundaries, reference modules beside kernels, public exports."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

import nki_kernels

PKG = Path(nki_kernels.__file__).parent
NOT_FAMILIES = {"emulator", "__pycache__"}


def _py_files():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "emulator" or rel.as_posix() == "backend.py":
            continue
        yield path, rel


def _imported_modules(path: Path, rel: Path):
    """Absolute dotted names a file imports (relative imports resolved; `from X import y` gives X.y too)."""
    package = ["nki_kernels", *rel.parts[:-1]]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:
                yield f"{mod}.{alias.name}"


def test_only_backend_and_emulator_import_the_emulator():
    offenders = []
    for path, rel in _py_files():
        for mod in _imported_modules(path, rel):
            if mod == "nki_kernels.emulator" or mod.startswith("nki_kernels.emulator."):
                offenders.append(f"{rel}: imports {mod}")
    assert not offenders, ("kernels take nki/nl/nisa from nki_kernels.backend, never the emulator:\n"
                           + "\n".join(offenders))


def test_the_import_scan_catches_each_spelling(tmp_path):
    samples = ["from ..emulator import isa", "import nki_kernels.emulator.isa", "from nki_kernels import emulator",
               "from .. import emulator", "from ..emulator.isa import nc_matmul"]
    for src in samples:
        f = tmp_path / "k.py"
        f.write_text(src + "\n")
        mods = list(_imported_modules(f, Path("fam") / "k.py"))
        assert any(m == "nki_kernels.emulator" or m.startswith("nki_kernels.emulator.") for m in mods), src


def _families():
    return sorted(p for p in PKG.iterdir()
                  if p.is_dir() and p.name not in NOT_FAMILIES and any(p.glob("*.py")))


def test_every_family_folder_has_a_reference_module():
    missing = [f.name for f in _families() if not (f / "reference.py").exists()]
    assert not missing, f"family folders without reference.py: {missing}"


def _exports_with_modules():
    out = []
    for name in nki_kernels.__all__:
        module = nki_kernels._EXPORTS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out.append((name, module))
    return out


def test_examples_are_exported():
    names = {n for n, _ in _exports_with_modules()}
    assert {"tiled_matmul", "softmax", "rmsnorm"} <= names


@pytest.mark.parametrize("name,module", _exports_with_modules())
def test_public_exports_import(name, module):
    importlib.import_module(module)              # as any caller may have done before using the export
    obj = getattr(nki_kernels, name)
    assert callable(obj), (f"nki_kernels.{name} is {obj!r}, not the kernel entry point: the export is shadowed "
                           "(a subpackage with the same name becomes an attribute of nki_kernels once imported)")
    assert obj is getattr(importlib.import_module(module), name)


# host-side helpers that are plain NumPy/torch code, not kernels
_HOST_SIDE_ONLY = {"moe_route", "moe_block_mapping"}


@pytest.mark.parametrize("name,module", _exports_with_modules())
def test_references_use_the_wrapper_parameter_names(name, module):
    family = module.split(".")[1]
    ref_path = PKG / family / "reference.py"
    if not ref_path.exists():
        pytest.skip(f"{family} has no reference.py yet (checked above)")
    ref_mod = importlib.import_module(f"nki_kernels.{family}.reference")
    candidates = [f"{name}_reference", f"{name}_ref", name]
    ref = next((getattr(ref_mod, c) for c in candidates if hasattr(ref_mod, c)), None)
    if ref is None and name in _HOST_SIDE_ONLY:
        pytest.skip(f"{name} runs on the host (no kernel), so it has no separate reference")
    assert ref is not None, f"{family}/reference.py has no reference for {name} (expected one of {candidates})"
    wrapper_params = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                      if p != "lnc"]
    ref_sig = inspect.signature(ref).parameters
    ref_params = [p for p in ref_sig if p != "lnc"]
    # The reference takes the wrapper's parameters, by the same names and in the same order; it may leave out
    # wrapper-only knobs (lnc, tiling or residency switches). Parameters of its own (e.g. teacher forcing for
    # tests) must come after the shared ones and have defaults, so a call with the wrapper's arguments works.
    shared = [p for p in ref_params if p in wrapper_params]
    extra = ref_params[len(shared):]
    assert ref_params[:len(shared)] == shared and shared == [p for p in wrapper_params if p in shared], (
        f"{ref.__name__}{tuple(ref_params)} must take the wrapper's parameters {tuple(wrapper_params)} "
        "first, by the same names and in the same order")
    no_default = [p for p in extra if ref_sig[p].default is inspect.Parameter.empty]
    assert not no_default, f"{ref.__name__}: parameters not in the wrapper need defaults: {no_default}"


def test_test_module_basenames_are_unique():
    """pytest imports test files by basename (rootdir mode, no packages): two equal names break collection."""
    tests_dir = Path(__file__).resolve().parent
    seen: dict = {}
    for f in tests_dir.rglob("*.py"):
        if f.name == "conftest.py" or f.name == "__init__.py":
            continue
        seen.setdefault(f.name, []).append(str(f.relative_to(tests_dir)))
    dups = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dups, f"test modules with the same basename: {dups}"


def test_ruff_lint_is_clean():
    """The lint rules of pyproject.toml (incl. S101: no bare assert in library code) hold for the whole tree."""
    import shutil
    import subprocess
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([ruff, "check", "--no-cache", str(root)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:]
