"""roofline.png of a microbench run: where each case sits against the target's roofline (modeled, not measured).

Three panels:
* the roofline (log-log): cases that do matmul work, at (useful FLOPs / bytes that must cross HBM, modeled
  TFLOP/s), numbered; the ridge point labelled; memory-bound left of it, compute-bound right of it;
* bandwidth-only kernels (no useful FLOPs: softmax, RMSNorm, convs, ...): achieved HBM GB/s against the peak;
* the fraction of its roofline every case reaches (roofline µs / modeled µs), with the numbered legend as labels.
"""
from __future__ import annotations

import math


def _ok(r) -> bool:
    return r.ok and math.isfinite(r.modeled_us) and r.modeled_us > 0


def plot(results, target: str, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runner import peaks

    pe, bw = peaks(target)
    cases = [r for r in results if _ok(r)]
    number = {id(r): i + 1 for i, r in enumerate(cases)}
    compute = [r for r in cases if r.flops > 0 and r.min_hbm_bytes > 0]
    bandwidth = [r for r in cases if r.flops == 0]

    n = max(len(cases), 1)
    height = max(9.0, 0.22 * n + 2.0)
    fig = plt.figure(figsize=(14, height))
    grid = fig.add_gridspec(2, 2, width_ratios=[1.5, 1.0], height_ratios=[1.5, 1.0], wspace=0.12, hspace=0.3,
                            top=1.0 - 0.9 / height)
    ax = fig.add_subplot(grid[0, 0])
    ax_bw = fig.add_subplot(grid[1, 0])
    ax_fr = fig.add_subplot(grid[:, 1])
    fig.suptitle(f"Microbench cases against the {target} roofline (modeled with the cost model, not measured)",
                 fontsize=14, y=1.0 - 0.25 / height)
    _roofline_panel(ax, compute, number, pe, bw, target)
    _bandwidth_panel(ax_bw, bandwidth, number, bw, target)
    _fraction_panel(ax_fr, cases, number)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _cores(r) -> int:
    return max(int(getattr(r, "lnc", 1) or 1), 1)


def _roofline_panel(ax, cases, number, pe, bw, target):
    lo, hi = 0.1, 1e5
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ridge = pe * 1e12 / (bw * 1e9)
    ax.plot(xs, [min(pe, x * bw / 1e3) for x in xs], "k-", lw=2,
            label=f"roofline, one {target} core ({pe:.1f} TFLOP/s bf16, {bw:.0f} GB/s)")
    ax.axvspan(lo, ridge, color="tab:blue", alpha=0.06)
    ax.axvspan(ridge, hi, color="tab:red", alpha=0.06)
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ax.text(ridge * 1.1, pe * 0.012, f"ridge point\n{ridge:.0f} FLOP/B", fontsize=10, color="dimgrey")
    ax.text(lo * 1.3, pe * 1.5, "memory-bound", fontsize=12, color="tab:blue")
    ax.text(ridge * 1.3, pe * 1.5, "compute-bound", fontsize=12, color="tab:red")
    for r in cases:
        ai = r.flops / r.min_hbm_bytes
        tflops = r.tflops / _cores(r)              # per physical core, comparable with the one-core roofline
        ax.plot(ai, tflops, "o", color="tab:green" if r.roofline_ratio <= 1.5 else "tab:orange", ms=7)
        ax.annotate(str(number[id(r)]), (ai, tflops), xytext=(4, 3), textcoords="offset points", fontsize=9)
    ax.plot([], [], "o", color="tab:green", label="within 1.5x of its roofline")
    ax.plot([], [], "o", color="tab:orange", label="further than 1.5x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(1e-3, pe * 4)
    ax.set_xlabel("arithmetic intensity (useful FLOPs / bytes that must cross HBM)", fontsize=11)
    ax.set_ylabel("modeled TFLOP/s per core", fontsize=11)
    ax.set_title("Cases with matmul work (numbers: legend on the right)", fontsize=12)
    ax.legend(fontsize=9, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)


def _bandwidth_panel(ax, cases, number, bw, target):
    ax.set_title("Bandwidth-only cases (no useful FLOPs)", fontsize=12)
    if not cases:
        ax.text(0.5, 0.5, "none in this run", ha="center", va="center", transform=ax.transAxes, fontsize=11)
        ax.set_axis_off()
        return
    ys = range(len(cases))
    ax.barh(list(ys), [r.hbm_gbps / _cores(r) for r in cases], color="tab:blue")
    ax.axvline(bw, color="k", lw=2, label=f"HBM peak per core, {bw:.0f} GB/s")
    ax.legend(fontsize=9, loc="lower right")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{number[id(r)]}. {r.kernel}" for r in cases], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, bw * 1.2)
    ax.set_xlabel(f"modeled HBM GB/s per core ({target})", fontsize=11)


def _fraction_panel(ax, cases, number):
    ys = range(len(cases))
    fr = [min(1.0, 1.0 / r.roofline_ratio) if r.roofline_ratio and math.isfinite(r.roofline_ratio) else 0.0
          for r in cases]
    colors = ["tab:blue" if r.flops == 0 else "tab:green" for r in cases]
    ax.barh(list(ys), fr, color=colors)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{number[id(r)]}. {r.kernel} [{r.shape}]" for r in cases], fontsize=8)
    ax.yaxis.tick_right()                       # the long case names extend to the right, past the figure edge
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.axvline(1 / 1.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("fraction of roofline reached (roofline µs / modeled µs)", fontsize=11)
    ax.set_title("Every case (green: matmul work, blue: bandwidth-only; dotted: 1.5x the roofline)", fontsize=12)
    ax.grid(True, axis="x", alpha=0.3)


def plot_results_json(results_json: str, path: str):
    """Redraw roofline.png from a results.json (no emulation): `python -m microbench.plot [results.json] [png]`."""
    import json
    from types import SimpleNamespace

    with open(results_json, encoding="utf-8") as f:
        data = json.load(f)
    nan = float("nan")
    rs = [SimpleNamespace(**{k: (nan if v is None and k.endswith(("_us", "_ratio")) else v) for k, v in r.items()})
          for r in data["results"]]
    plot(rs, data.get("target", "trn2"), path)


if __name__ == "__main__":
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="python -m microbench.plot",
                                 description="Redraw the roofline plot from a results.json (no emulation).")
    ap.add_argument("results", nargs="?", default=os.path.join("microbench_out", "results.json"))
    ap.add_argument("png", nargs="?", default=None, help="output PNG (default: roofline.png beside results)")
    args = ap.parse_args()
    dst = args.png or os.path.join(os.path.dirname(args.results), "roofline.png")
    plot_results_json(args.results, dst)
    print(f"wrote {dst}")
