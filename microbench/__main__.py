"""`python -m microbench [--target trn2] [--kernels a,b] [--quick] [--no-lnc1] [--out microbench_out/]`

Runs every registered case on the emulator at the target's default LNC (2 on trn2/trn3: the degree neuronx-cc
uses; NEURON_LOGICAL_NC_CONFIG overrides it) and again at LNC=1, checks both against the NumPy reference,
models their time with the cost model (modeled µs on the target per logical core, device time without launch
overhead), prints a table and writes results.json, results.md and roofline.png to --out. Exit code 1 if any
kernel or baseline failed its check or raised (all cases still run; the table says which).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time

from . import registry
from .plot import plot
from .runner import peaks, run_case, select


def _f(v, fmt="{:.2f}", none="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


COLUMNS = ("kernel", "shape", "check", "modeled µs", "LNC", "LNC=1 µs", "TensorE util", "TFLOP/s", "HBM GB/s",
           "roofline ratio", "baseline", "baseline µs", "speed-up")

# What each column of results.md means (written under the table).
COLUMN_DEFINITIONS = (
    ("kernel, shape", "the registered case (`microbench/cases/<family>.py`)"),
    ("check", "`ok`: the output matches the NumPy reference at every LNC run; `FAIL`: it does not, or the case "
              "raised (reason under Failures); `ok, baseline FAIL`: the kernel is fine, its baseline is not"),
    ("modeled µs", "modeled device time of the case's launches at the target's default LNC (launch overhead "
                   "excluded), µs on the target; not measured"),
    ("LNC", "the LNC the case launched at (read from its trace)"),
    ("LNC=1 µs", "the same case at LNC=1"),
    ("TensorE util", "TensorE busy time / modeled time"),
    ("TFLOP/s", "useful FLOPs (the case's count, not the kernel's) / modeled time"),
    ("HBM GB/s", "bytes the kernel moved to or from HBM / modeled time"),
    ("roofline ratio", "modeled µs / roofline µs, where roofline µs = max(useful FLOPs at the TensorE bf16 peak, bytes "
                       "that must cross HBM once at the HBM bandwidth) for the cores used; 1.00 is the bound"),
    ("baseline, baseline µs", "the implementation the case compares with, and its modeled µs at the same LNC"),
    ("speed-up", "baseline µs / modeled µs"),
    ("-", "no figure: the case failed before it was modeled, has no baseline, or has no run at that LNC (see "
          "Missing figures)"),
)

CONSOLE_WIDTH = 120


def _check_text(r) -> str:
    check = "ok" if r.ok else "FAIL"
    if r.baseline_ok is False:
        check += ", baseline FAIL"
    return check


def rows(results):
    """One row per case: `modeled µs` at the default LNC ("-" when the kernel has no path at that degree yet;
    the reason is listed under the table), the LNC it launched at, and the LNC=1 figure."""
    out = []
    for r in results:
        headline = math.isfinite(r.modeled_us)
        out.append((r.kernel, r.shape, _check_text(r), _f(r.modeled_us), str(r.lnc if headline else "-"),
                    _f(r.lnc1_us), _f(r.tensor_util * 100, "{:.1f}%") if headline else "-",
                    _f(r.tflops, "{:.1f}") if headline else "-", _f(r.hbm_gbps, "{:.0f}") if headline else "-",
                    _f(r.roofline_ratio) if headline else "-", r.baseline_name or "-",
                    _f(r.baseline_us), _f(r.speedup, "{:.2f}x")))
    return out


def notes(results) -> list[str]:
    """Why a figure is missing, one line per case that has a reason."""
    return [f"{r.kernel} [{r.shape}]: {r.lnc_note}" for r in results if r.lnc_note]


def _console_rows(results, default_lnc):
    for r in results:
        headline = math.isfinite(r.modeled_us)
        yield (r.shape, _check_text(r), _f(r.modeled_us), _f(r.lnc1_us), _f(r.roofline_ratio) if headline else "-",
               _f(r.tensor_util * 100, "{:.0f}%") if headline else "-", _f(r.baseline_us), _f(r.speedup, "{:.2f}x"))


def text_table(results, width: int = CONSOLE_WIDTH) -> str:
    """The console table: grouped by kernel, case names wrapped (never cut) to fit `width` columns. Baseline names
    and the throughput columns are in results.md."""
    default = results[0].default_lnc if results else 1
    head = ("case", "check", f"LNC={default} µs", "LNC=1 µs", "roofline", "TensorE", "base µs", "speed-up")
    body = list(_console_rows(results, default))
    num_w = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(1, len(head))]
    case_w = max(24, width - sum(num_w) - 2 * len(num_w) - 2)

    def line(cells, case_text):
        return ("  " + case_text.ljust(case_w) + "".join("  " + c.rjust(w) for c, w in zip(cells, num_w))).rstrip()

    out = [line(head[1:], head[0]), "  " + "-" * (case_w + sum(num_w) + 2 * len(num_w))]
    kernel = None
    for r, row in zip(results, body):
        if r.kernel != kernel:
            kernel = r.kernel
            out.append(kernel)
        wrapped = textwrap.wrap(row[0], case_w) or [""]
        out.append(line(row[1:], wrapped[0]) if len(wrapped) == 1 else "  " + wrapped[0])
        for i, part in enumerate(wrapped[1:], start=1):
            last = i == len(wrapped) - 1
            out.append(line(row[1:], "  " + part) if last else "    " + part)
    return "\n".join(out)


def markdown(results, target: str, cmd: str) -> str:
    pe, bw = peaks(target)
    default = results[0].default_lnc if results else 1
    lines = [f"# Microbenchmark results (modeled on {target})", "",
             f"Produced by `{cmd}`. All times are **modeled µs on {target}** by `nki_kernels.emulator.costmodel` "
             f"(device time of the logical core, launch overhead excluded), not measured. `modeled µs` is at the "
             f"default LNC={default} ({target}'s, as neuronx-cc compiles); `LNC=1 µs` is the same case at LNC=1. "
             f"Roofline per physical core: TensorE {pe:.1f} TFLOP/s bf16, HBM {bw:.0f} GB/s (x LNC cores).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(results):
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in row) + " |")
    lines += ["", "## Columns", ""] + [f"- **{name}**: {text}" for name, text in COLUMN_DEFINITIONS]
    if notes(results):
        lines += ["", "## Missing figures", ""] + [f"- {n}" for n in notes(results)]
    fails = [r for r in results if not r.ok or r.baseline_ok is False]
    if fails:
        lines += ["", "## Failures", ""]
        lines += [f"- {r.kernel} [{r.shape}]: {r.error}" for r in fails]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microbench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--target", default="trn2", choices=["trn1", "trn2", "trn3"])
    ap.add_argument("--kernels", default=None, help="comma list of kernel names (exact, else substring)")
    ap.add_argument("--quick", action="store_true", help="only cases marked quick=True")
    ap.add_argument("--out", default="microbench_out", help="output folder (default microbench_out/)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--params", default="default",
                    help="cost-model preset (docs/cost-model.md): default, low, high, or <constant>-low/-high, "
                         "e.g. dma-latency-high")
    ap.add_argument("--no-lnc1", action="store_true", help="only the default-LNC run (no LNC=1 second figure)")
    args = ap.parse_args(argv)
    from nki_kernels.emulator.costmodel import PRESETS, use_params
    if args.params not in PRESETS:
        print(f"unknown --params {args.params!r}; presets: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    with use_params(args.params):
        return _main(args, argv)


def _main(args, argv) -> int:

    cmd = "python -m microbench " + " ".join(argv if argv is not None else sys.argv[1:])
    all_cases = registry.cases()
    chosen = select(all_cases, args.kernels, args.quick)
    if not chosen:
        print(f"no microbench case matches (kernels={args.kernels!r}, quick={args.quick}); "
              f"registered kernels: {sorted({c.kernel for c in all_cases})}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    results = []
    t0 = time.perf_counter()
    bar = None
    if not args.no_progress and len(chosen) > 1:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(chosen), desc="microbench", unit="case", file=sys.stderr)
        except ImportError:      # pragma: no cover
            bar = None
    for case in chosen:
        if bar is not None:
            bar.write(f"running {case.key}", file=sys.stderr)
        r = run_case(case, args.target, lnc1=not args.no_lnc1)
        results.append(r)
        if bar is not None:
            bar.write(f"  {_check_text(r)}: {_f(r.modeled_us)} µs modeled ({r.emulate_s:.0f} s to emulate)",
                      file=sys.stderr)
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0

    default = results[0].default_lnc
    preset = "" if args.params == "default" else f", cost-model preset {args.params}"
    intro = (f"Modeled on {args.target} at its default LNC={default} (device µs of the logical core, launch overhead "
             f"excluded; not measured{preset}), LNC=1 as the second figure. roofline = modeled / roofline µs; "
             "TensorE = TensorE busy / modeled time; speed-up = base µs / modeled µs. All columns: results.md.")
    print("\n" + textwrap.fill(intro, CONSOLE_WIDTH) + "\n")
    print(text_table(results))
    for n in notes(results):
        print(textwrap.fill(n, CONSOLE_WIDTH, initial_indent="- ", subsequent_indent="  "))
    for r in results:
        if not r.ok or r.baseline_ok is False:
            print(textwrap.fill(f"{r.kernel} [{r.shape}]: {r.error}", CONSOLE_WIDTH, initial_indent="FAIL ",
                                subsequent_indent="  "))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"target": args.target, "command": cmd, "modeled": True, "default_lnc": default,
                   "wall_seconds": round(wall, 2),
                   "results": [r.to_json() for r in results]}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results, args.target, cmd))
    written = "results.json, results.md"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\nroofline.png not written: matplotlib is not installed (pip install -e '.[bench]')")
    else:
        plot(results, args.target, os.path.join(args.out, "roofline.png"))
        written += ", roofline.png"
    n_fail = sum(not r.ok or r.baseline_ok is False for r in results)
    print(f"\n{len(results)} cases, {n_fail} failed, {wall:.1f} s wall; wrote {written} to {args.out}/")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
