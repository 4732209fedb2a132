"""`python -m microbench.tables [--results microbench_out/results.json]`: regenerate the performance tables.

Reads the results of a `python -m microbench` run and rewrites, between their `BEGIN GENERATED` / `END GENERATED`
markers:

* docs/performance.md: one table per kernel family (every case: default-LNC modeled µs, LNC=1 µs, roofline µs
  and ratio, TensorE utilisation, baseline and speed-up) and the goals table (each goal of
  `microbench.goals.GOALS` evaluated on the same results, default cost-model constants). When
  `microbench_out/goals.md` exists (`python -m microbench.goals --out microbench_out/goals.md`), its table of
  verdicts across the cost model's uncertainty is included too.
* KERNELS.md: the headline figure of every kernel (one case per kernel, `HEADLINE`) and the same goals table.

Nothing is emulated: regenerating takes a second. `--check` exits 1 when a file is not up to date.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

# Family of each kernel, in the order the tables appear.
FAMILIES = (
    ("Attention", ("flash_attention", "flash_attention_decode", "flash_attention_varlen")),
    ("Gated DeltaNet", ("gated_delta_rule", "gated_delta_rule_fused", "gated_delta_rule_step", "causal_conv1d",
                        "causal_conv1d_update")),
    ("MoE", ("moe_blockwise", "moe_decode")),
    ("Code predictor", ("code_predictor",)),
    ("Example kernels", ("tiled_matmul", "softmax", "rmsnorm")),
)

# The case whose figure stands for each kernel in KERNELS.md (the shape of its performance goal where it has one).
# A kernel whose case is missing from the results falls back to its first case in the results.
HEADLINE = {
    "flash_attention": "qwen3.5-35b-a3b tp4 Sq=Skv=8192 causal gated D=256",
    "flash_attention_decode": "qwen3.5-35b-a3b tp4 B=8 S=8192 Sq=1 D=256",
    "flash_attention_varlen": "qwen3.5-35b-a3b tp4 8 packed in [64, 2048] N=8 T=7820 causal gated D=256 max_seqlen",
    "gated_delta_rule": "qwen3.5-35b-a3b tp4 B=1 T=2048 Hk=4 Hv=8 D=128 l2norm",
    "gated_delta_rule_fused": ("qwen3.5-35b-a3b tp4 B=1 T=2048 Hk=4 Hv=8 D=128 l2norm conv1d K=4 + "
                               "gated_delta_rule (fused)"),
    "gated_delta_rule_step": "qwen3.5-35b-a3b tp4 B=1 T=1 Hk=4 Hv=8 D=128 fp32 state",
    "causal_conv1d": "qwen3.5-35b-a3b tp4 B=1 C=2048 T=2048 K=4 silu",
    "causal_conv1d_update": "qwen3.5-35b-a3b tp4 B=8 C=2048 T=1 K=4 silu",
    "moe_blockwise": "qwen3.5-35b-a3b tp4 T=1024 E=256 TOPK=8 H=2048 I=128 Is=128 B=48",
    "moe_decode": "qwen3.5-35b-a3b tp4 T=1 E=256 TOPK=8 H=2048 I=128 Is=128",
    "code_predictor": "qwen3-omni code predictor tp8 all ranks + collectives, LM heads vocab-sharded B=1 greedy",
    "tiled_matmul": "K=1024 M=1024 N=1024 bf16",
    "softmax": "R=4096 C=2048 bf16",
    "rmsnorm": "R=4096 H=2048 bf16",
}

PERF_DOC = os.path.join("docs", "performance.md")
CARD = "KERNELS.md"
PERF_BLOCK = "performance"
HEADLINE_BLOCK = "headline"


def _num(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _f(v, fmt="{:.1f}"):
    v = _num(v)
    return "-" if v is None else fmt.format(v)


def _cell(s) -> str:
    return str(s).replace("|", "/")


def _check(r) -> str:
    if r.get("ok") and r.get("baseline_ok") is not False:
        return "ok"
    if r.get("ok"):
        return "ok, baseline FAIL"
    return "FAIL"


def _families(results):
    known = {k for _, ks in FAMILIES for k in ks}
    fams = [(name, [r for r in results if r["kernel"] in ks]) for name, ks in FAMILIES]
    other = [r for r in results if r["kernel"] not in known]
    if other:
        fams.append(("Other", other))
    return [(name, rs) for name, rs in fams if rs]


def _provenance(data) -> str:
    d = data.get("default_lnc", "?")
    return (f"From `{data.get('command', 'python -m microbench')}` on target {data.get('target', 'trn2')} "
            f"({len(data['results'])} cases), rendered by `python -m microbench.tables`. **Modeled µs on "
            f"{data.get('target', 'trn2')}**, device time of one launch (launch overhead excluded), not measured. "
            f"`modeled µs` is at the target's default LNC={d}; `LNC=1 µs` is the same case at LNC=1.")


PERF_COLUMNS = ("kernel", "shape", "check", "modeled µs", "LNC=1 µs", "roofline µs", "roofline ratio",
                "TensorE util", "baseline", "baseline µs", "speed-up")


def perf_rows(results):
    for r in results:
        yield (f"`{r['kernel']}`", r["shape"], _check(r), _f(r.get("modeled_us")), _f(r.get("lnc1_us")),
               _f(r.get("roofline_us")), _f(r.get("roofline_ratio"), "{:.2f}x"),
               _f(None if _num(r.get("modeled_us")) is None else r.get("tensor_util", 0) * 100, "{:.0f}%"),
               r.get("baseline_name") or "-", _f(r.get("baseline_us")), _f(r.get("speedup"), "{:.2f}x"))


def _table(columns, rows) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def _goal_us(r) -> float:
    """The case's figure: the default-LNC one, or the LNC=1 one for a case that fixes LNC=1 (an LNC=1 variant, an
    old per-(b, h) baseline row), which `python -m microbench` puts only in the LNC=1 column."""
    for key in ("modeled_us", "lnc1_us"):
        v = _num(r.get(key))
        if v is not None and math.isfinite(v):
            return v
    return math.nan


def goal_rows(results):
    """Each goal of microbench.goals.GOALS evaluated on `results` (default cost-model constants)."""
    from .goals import GOALS, _fmt, _holds
    by_key = {f"{r['kernel']} [{r['shape']}]": r for r in results}
    out = []
    for g in GOALS:
        rs = [by_key.get(k) for k in g.cases]
        if any(r is None for r in rs):
            out.append((g.name, "-", "not in this run"))
            continue
        d = [dict(us=_goal_us(r),
                  roofline_us=_num(r.get("roofline_us")) or math.nan, pe_util=r.get("tensor_util", 0.0),
                  baseline_us=_num(r.get("baseline_us")) if _num(r.get("baseline_us")) is not None else math.nan)
             for r in rs]
        try:
            v = g.metric(d)
        except (ZeroDivisionError, KeyError, TypeError):
            v = math.nan
        if not math.isfinite(v):
            out.append((g.name, "-", "no figure"))
        else:
            out.append((g.name, _fmt(g, v), "met" if _holds(g, v) else "**not met**"))
    return out


def render_performance(data, goals_md: str | None = None) -> str:
    results = data["results"]
    lines = [_provenance(data), "",
             "Columns: `check` is the output compared with the NumPy reference (both LNC runs); `roofline µs` is "
             "max(useful FLOPs at the TensorE bf16 peak, bytes that must cross HBM once at the HBM bandwidth) for the "
             "cores the case ran on; `roofline ratio` = modeled µs / roofline µs (1.00x is the bound); `TensorE "
             "util` = TensorE busy time / modeled time; `speed-up` = baseline µs / modeled µs. \"-\": no figure "
             "(the reason is in results.md)."]
    for name, rs in _families(results):
        lines += ["", f"### {name}", ""] + _table(PERF_COLUMNS, perf_rows(rs))
    lines += ["", "### Goals", "", "Each goal of `microbench/goals.py`, evaluated on the figures above (default "
              "cost-model constants).", ""]
    lines += _table(("goal", "modeled", "verdict"), goal_rows(results))
    if goals_md:
        lines += ["", "Across the cost model's uncertainty (`python -m microbench.goals --out "
                  "microbench_out/goals.md`):", "", goals_md.strip()]
    return "\n".join(lines)


def headline_rows(results):
    by_kernel = {}
    for r in results:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for _, kernels in FAMILIES:
        for k in kernels:
            rs = by_kernel.get(k)
            if not rs:
                continue
            pick = next((r for r in rs if r["shape"] == HEADLINE.get(k)), None)
            shape = pick["shape"] if pick else rs[0]["shape"] + " *"
            pick = pick or rs[0]
            base = "-" if _num(pick.get("speedup")) is None else (
                f"{_f(pick.get('speedup'), '{:.2f}x')} vs {pick.get('baseline_name')}")
            yield (f"`{k}`", shape, _f(pick.get("modeled_us")), _f(pick.get("lnc1_us")),
                   _f(pick.get("roofline_ratio"), "{:.2f}x"), base)


def render_headline(data) -> str:
    cmd = "python -m microbench --kernels <kernel>"
    lines = [_provenance(data) + f" One kernel alone: `{cmd}`.", ""]
    rows = list(headline_rows(data["results"]))
    lines += _table(("kernel", "case", "modeled µs", "LNC=1 µs", "roofline ratio", "speed-up vs baseline"), rows)
    if any(r[1].endswith(" *") for r in rows):
        lines += ["", "\\* this run did not include the kernel's headline case (`microbench/tables.py`, `HEADLINE`); "
                  "its first case stands in."]
    lines += ["", "Goals (`microbench/goals.py`) on the same run, default cost-model constants; whether each verdict "
              "holds across the constants' uncertainty: [docs/performance.md](docs/performance.md), \"Goals\".", ""]
    lines += _table(("goal", "modeled", "verdict"), goal_rows(data["results"]))
    return "\n".join(lines)


def _markers(name):
    return (f"<!-- BEGIN GENERATED: {name} (python -m microbench.tables) -->", f"<!-- END GENERATED: {name} -->")


def replace_block(text: str, name: str, body: str) -> str:
    """Replace what lies between the `name` markers of `text` with `body` (markers kept)."""
    begin, end = _markers(name)
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise ValueError(f"no '{begin}' ... '{end}' block")
    return pat.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text, count=1)


def update_file(path: str, name: str, body: str, check: bool) -> bool:
    """Rewrite the block in `path`; returns whether the file changed (with `check`, only whether it would)."""
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = replace_block(old, name, body)
    if new != old and not check:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microbench.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join("microbench_out", "results.json"))
    ap.add_argument("--goals-md", default=None,
                    help="goals table of `python -m microbench.goals --out FILE` (default: goals.md beside results)")
    ap.add_argument("--root", default=".", help="repository root holding KERNELS.md and docs/ (default: .)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not up to date")
    args = ap.parse_args(argv)
    if not os.path.exists(args.results):
        print(f"{args.results} not found: run `python -m microbench` first", file=sys.stderr)
        return 2
    with open(args.results, encoding="utf-8") as f:
        data = json.load(f)
    goals_path = args.goals_md or os.path.join(os.path.dirname(args.results), "goals.md")
    goals_md = None
    if os.path.exists(goals_path):
        with open(goals_path, encoding="utf-8") as f:
            goals_md = f.read()
    changed = []
    for rel, name, body in ((PERF_DOC, PERF_BLOCK, render_performance(data, goals_md)),
                            (CARD, HEADLINE_BLOCK, render_headline(data))):
        path = os.path.join(args.root, rel)
        if update_file(path, name, body, args.check):
            changed.append(rel)
    verb = "out of date" if args.check else "updated"
    print(f"{verb}: {', '.join(changed)}" if changed else "up to date: " + ", ".join((PERF_DOC, CARD)))
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
