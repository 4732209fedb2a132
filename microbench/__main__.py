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
import time

from . import registry
from .runner import peaks, run_case, select


def _f(v, fmt="{:.2f}", none="-"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


_QUICK_CASE_BUDGET_S = 10.0      # emulation seconds one quick case may take (quick run < 2 min for all kernels)

COLUMNS = ("kernel", "shape", "check", "modeled µs", "LNC", "LNC=1 µs", "TensorE util", "TFLOP/s", "HBM GB/s",
           "roofline ratio", "baseline", "baseline µs", "speed-up")


def rows(results):
    """One row per case: `modeled µs` at the default LNC ("-" when the kernel has no path at that degree yet;
    the reason is listed under the table), the LNC it launched at, and the LNC=1 figure."""
    out = []
    for r in results:
        check = "ok" if r.ok else "FAIL"
        if r.baseline_ok is False:
            check += ", baseline FAIL"
        headline = math.isfinite(r.modeled_us)
        out.append((r.kernel, r.shape, check, _f(r.modeled_us), str(r.lnc if headline else "-"), _f(r.lnc1_us),
                    _f(r.tensor_util * 100, "{:.1f}%") if headline else "-",
                    _f(r.tflops, "{:.1f}") if headline else "-", _f(r.hbm_gbps, "{:.0f}") if headline else "-",
                    _f(r.roofline_ratio) if headline else "-", r.baseline_name or "-",
                    _f(r.baseline_us), _f(r.speedup, "{:.2f}x")))
    return out


def notes(results) -> list[str]:
    """Why a figure is missing, one line per case that has a reason."""
    return [f"{r.kernel} [{r.shape}]: {r.lnc_note}" for r in results if r.lnc_note]


def text_table(results) -> str:
    rs = rows(results)
    widths = [max(len(c), *(len(str(x[i])) for x in rs)) if rs else len(c) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rs]
    return "\n".join([line, sep, *body])


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
    if notes(results):
        lines += ["", "## Missing figures", ""] + [f"- {n}" for n in notes(results)]
    fails = [r for r in results if not r.ok or r.baseline_ok is False]
    if fails:
        lines += ["", "## Failures", ""]
        lines += [f"- {r.kernel} [{r.shape}]: {r.error}" for r in fails]
    return "\n".join(lines) + "\n"


def plot(results, target: str, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pe, bw = peaks(target)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 6))
    ridge = pe * 1e12 / (bw * 1e9)
    xs = [10 ** (i / 20) for i in range(-40, 101)]
    ax.plot(xs, [min(pe, x * bw / 1e3) for x in xs], "k-", label=f"roofline {target} (1 core)")
    ax.axvline(ridge, color="grey", ls=":", lw=0.8)
    pts = [r for r in results if r.ok and r.flops > 0 and r.min_hbm_bytes > 0 and r.modeled_us == r.modeled_us]
    for r in pts:
        ai = r.flops / r.min_hbm_bytes
        ax.plot(ai, r.tflops, "o")
        ax.annotate(f"{r.kernel}\n{r.shape}"[:60], (ai, r.tflops), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / min HBM byte)")
    ax.set_ylabel("modeled TFLOP/s")
    ax.set_title(f"Roofline, modeled on {target}")
    ax.legend(fontsize=7)
    ok = [r for r in results if r.ok and r.roofline_ratio == r.roofline_ratio]
    labels = [f"{r.kernel} [{r.shape}]"[:50] for r in ok]
    ax2.barh(range(len(ok)), [1.0 / r.roofline_ratio if r.roofline_ratio else 0 for r in ok])
    ax2.set_yticks(range(len(ok)))
    ax2.set_yticklabels(labels, fontsize=6)
    ax2.set_xlim(0, 1.05)
    ax2.set_xlabel("fraction of roofline (roofline µs / modeled µs)")
    ax2.set_title("Fraction of roofline reached (modeled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
            bar.set_postfix_str(case.key[:50])
        results.append(run_case(case, args.target, lnc1=not args.no_lnc1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0

    default = results[0].default_lnc
    preset = "" if args.params == "default" else f", cost-model preset {args.params}"
    print(f"\nModeled on {args.target} at its default LNC={default} (device µs of the logical core, launch overhead "
          f"excluded; not measured{preset}), LNC=1 as the second figure:\n")
    print(text_table(results))
    for n in notes(results):
        print(f"- {n}")
    for r in results:
        if not r.ok or r.baseline_ok is False:
            print(f"FAIL {r.kernel} [{r.shape}]: {r.error}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"target": args.target, "command": cmd, "modeled": True, "default_lnc": default,
                   "wall_seconds": round(wall, 2),
                   "results": [r.to_json() for r in results]}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results, args.target, cmd))
    plot(results, args.target, os.path.join(args.out, "roofline.png"))
    slow = sorted((r for r in results if r.quick and r.emulate_s > _QUICK_CASE_BUDGET_S), key=lambda r: -r.emulate_s)
    if args.quick and slow:
        print(f"\nquick-mode budget: {len(slow)} case(s) took more than {_QUICK_CASE_BUDGET_S:.0f} s of emulation "
              "(the whole --quick run should stay under 2 minutes): "
              + ", ".join(f"{r.kernel} [{r.shape}] {r.emulate_s:.0f} s" for r in slow))
    n_fail = sum(not r.ok or r.baseline_ok is False for r in results)
    print(f"\n{len(results)} cases, {n_fail} failed, {wall:.1f} s wall; wrote results.json, results.md, roofline.png "
          f"to {args.out}/")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
