"""`python -m microbench.calibration [--points A1,A5] [--out file.md]`: modeled vs published table (trn1)."""
from __future__ import annotations

import argparse
import sys
import time

from .points import BY_ID, POINTS, model_point, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microbench.calibration")
    ap.add_argument("--points", default=None, help="comma list of point ids (default: all)")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    pts = [BY_ID[p.strip()] for p in args.points.split(",")] if args.points else POINTS
    results = []
    for p in pts:
        t0 = time.perf_counter()
        r = model_point(p)
        results.append(r)
        print(f"{p.id} {p.name}: modeled {r.modeled_us:,.0f} us vs measured {p.measured_us:,.0f} us "
              f"({r.error:+.1%}) [{time.perf_counter() - t0:.1f} s emulation]", file=sys.stderr)
    text = table(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
