"""Extract the public signatures of the real NKI API from the stubs of aws-neuron/aws-neuron-sdk.

The stubs (`nki/api/nki/{__init__,language/__init__,isa/__init__,collectives/__init__}.py`) are generated
from the real package (NKI 0.6.0 at the commit read); this script parses them with `ast` (nothing is
imported or copied) and writes, per module, every public function, class and value:

* function: its parameters in order, each [name, kind, default source or null];
* class: its kind ("enum" with member names and values, or "class" with its public methods' parameters);
* value: a module-level name (dtype, buffer, operator constant).

Then the NKI 0.7.0 changes (migration guide "Migrating from NKI 0.6.0 to NKI 0.7.0", 0.7.0 release notes)
listed in CHANGES_0_7 are applied. Run from the repository root:

    python tests/emulator/data/extract_nki_signatures.py [path/to/aws-neuron-sdk.git]
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_REPO = "/work/.mirror/aws-neuron+aws-neuron-sdk/repo"
MODULES = {"nki": "nki/api/nki/__init__.py", "nki.language": "nki/api/nki/language/__init__.py",
           "nki.isa": "nki/api/nki/isa/__init__.py", "nki.collectives": "nki/api/nki/collectives/__init__.py"}
OUT = Path(__file__).with_name("nki_0_7_0_signatures.json")
# What NKI 0.7.0 changed in these names, from its documentation (the stubs read are 0.6.0). "added" entries give
# the documented signature; an enum member whose value the docs do not give is recorded as null.
_DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en"
CHANGES_0_7 = [
    {"module": "nki.language", "name": "dynamic_range", "change": "removed",
     "source": "Migrating from NKI 0.6.0 to NKI 0.7.0: nl.dynamic_range and while loops on a register are "
               "removed; use nl.fori_loop / nl.while_loop"},
    {"module": "nki.collectives", "name": "rg_partition_op", "change": "added",
     "spec": {"kind": "enum", "members": {"bitwise_and": None, "div": None, "mod": None}},
     "source": f"{_DOCS}/v2.33.0/nki/api/generated/nki.collectives.ReplicaGroup.html (from_partition_op examples)"},
    {"module": "nki.collectives", "name": "ReplicaGroup", "change": "method added", "method": "from_partition_op",
     "params": [["world_size", "POSITIONAL_OR_KEYWORD", None], ["op", "POSITIONAL_OR_KEYWORD", None],
                ["operand", "POSITIONAL_OR_KEYWORD", None]],
     "source": f"{_DOCS}/v2.33.0/nki/api/generated/nki.collectives.ReplicaGroup.html (static method)"},
    {"module": "nki", "name": "multi_rank_simulate", "change": "added",
     "spec": {"kind": "function", "params": [["kernel", "POSITIONAL_OR_KEYWORD", None],
                                             ["world_size", "KEYWORD_ONLY", None],
                                             ["per_rank_inputs", "KEYWORD_ONLY", None]]},
     "source": f"{_DOCS}/latest/nki/api/generated/nki.multi_rank_simulate.html (experimental; the page is in the "
               "latest docs, its first release is not stated [U])"},
]

def _params(fn: ast.FunctionDef, drop_self: bool = False) -> list:
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append([arg.arg, kind, None if d is None else ast.unparse(d)])
    if a.vararg:
        out.append([a.vararg.arg, "VAR_POSITIONAL", None])
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append([arg.arg, "KEYWORD_ONLY", None if d is None else ast.unparse(d)])
    if a.kwarg:
        out.append([a.kwarg.arg, "VAR_KEYWORD", None])
    if drop_self and out and out[0][0] in ("self", "cls"):
        out = out[1:]
    return out


def _class(node: ast.ClassDef) -> dict:
    bases = [ast.unparse(b) for b in node.bases]
    if "Enum" in bases:
        members = {}
        for st in node.body:
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                members[st.targets[0].id] = ast.unparse(st.value)
        return {"kind": "enum", "members": members}
    methods = {}
    for st in node.body:
        if isinstance(st, ast.FunctionDef) and (not st.name.startswith("_") or st.name == "__init__"):
            is_prop = any(ast.unparse(d) == "property" for d in st.decorator_list)
            methods[st.name] = "property" if is_prop else _params(st, drop_self=True)
    return {"kind": "class", "bases": bases, "methods": methods}


def extract(source: str) -> dict:
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names[node.name] = {"kind": "function", "params": _params(node)}
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            names[node.name] = _class(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if not node.target.id.startswith("_") and node.target.id != "DType":
                names[node.target.id] = {"kind": "value"}
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if not node.targets[0].id.startswith("_") and node.targets[0].id != "DType":
                names[node.targets[0].id] = {"kind": "value"}
    return names


def main(repo: str = DEFAULT_REPO):
    git = ["git", "-C", repo]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    modules = {}
    for mod, path in MODULES.items():
        src = subprocess.run(git + ["show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout
        modules[mod] = extract(src)
    for ch in CHANGES_0_7:
        names = modules[ch["module"]]
        if ch["change"] == "removed":
            names.pop(ch["name"])
        elif ch["change"] == "added":
            names[ch["name"]] = ch["spec"]
        elif ch["change"] == "method added":
            names[ch["name"]]["methods"][ch["method"]] = ch["params"]
    data = {"nki_version": "0.7.0", "neuron_sdk": "2.33.0",
            "source": {"repository": "aws-neuron/aws-neuron-sdk", "commit": commit, "stubs_nki_version": "0.6.0",
                       "paths": MODULES},
            "changes_0_7": CHANGES_0_7, "modules": modules}
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({sum(len(m) for m in modules.values())} names)")


if __name__ == "__main__":
    main(*sys.argv[1:])
