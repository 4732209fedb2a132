"""`python -m microbench.calibration [--points A1,A5] [--split fit|held-out|sealed] [--out file.md]`: modeled vs
published table with a summary per split (fit: constants may have been chosen looking at these points;
held-out: never; sealed: never modeled yet, so skipped unless asked for by --split sealed or --points)."""
from __future__ import annotations

import argparse
import sys
import textwrap
import time

from .points import BY_ID, POINTS, SEALED, model_point, split_summary, table


def console_table(results, width: int = 120) -> str:
    """The calibration table for a terminal (<= `width` columns); the markdown table (`table`) has every column."""
    head = f"{'id':<13}{'split':<10}{'kernel':<28}{'target':<8}{'measured µs':>14}{'modeled µs':>14}{'error':>9}"
    out = [head, "-" * len(head)]
    for r in results:
        out.append(f"{r.id:<13}{r.split:<10}{r.name[:27]:<28}{r.target:<8}{r.measured_us:>14,.1f}"
                   f"{r.modeled_us:>14,.1f}{r.error:>+9.1%}")
    if results:
        out.append("")
        for split in ("fit", "held-out") + ((SEALED,) if any(r.split == SEALED for r in results) else ()):
            out += textwrap.wrap(split_summary(results, split), width, initial_indent="- ", subsequent_indent="  ")
    return "\n".join(out)


def select_points(points: str | None = None, split: str | None = None):
    """(points to model, sealed points skipped). Sealed points are modeled only when asked for by id or by
    `split="sealed"`; the default run skips them (points.py docstring, "v8 sealed points")."""
    pts = [BY_ID[p.strip()] for p in points.split(",")] if points else POINTS
    if split:
        pts = [p for p in pts if p.split == split]
    skipped = [] if points or split == SEALED else [p for p in pts if p.split == SEALED]
    return [p for p in pts if p not in skipped], skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microbench.calibration")
    ap.add_argument("--points", default=None, help="comma list of point ids (default: all)")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--split", default=None, choices=["fit", "held-out", SEALED],
                    help="only this split (sealed points are modeled only with --split sealed or --points)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--markdown", action="store_true", help="print the full markdown table instead")
    args = ap.parse_args(argv)
    pts, sealed = select_points(args.points, args.split)
    if sealed:
        print(f"{len(sealed)} sealed points not modeled: {', '.join(p.id for p in sealed)}", file=sys.stderr)
    results = []
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(pts), desc="calibration", unit="point", file=sys.stderr)
    for p in pts:
        if bar is not None:
            bar.set_postfix_str(f"{p.id} {p.name}")
        t0 = time.perf_counter()
        r = model_point(p)
        results.append(r)
        msg = (f"{p.id} [{p.split}] {p.name}: modeled {r.modeled_us:,.3f} us vs measured {p.measured_us:,.3f} us "
               f"({r.error:+.1%}) [{time.perf_counter() - t0:.1f} s emulation]")
        if bar is not None:
            bar.write(msg)
            bar.update(1)
        else:
            print(msg, file=sys.stderr)
    if bar is not None:
        bar.close()
    text = table(results)
    print("Cost model vs published device times (modeled µs, not measured; the fit split may have informed the "
          "constants, the held-out split never did):\n")
    print(text if args.markdown else console_table(results))
    if sealed:
        print(f"\n{len(sealed)} sealed points not modeled: {', '.join(p.id for p in sealed)}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
