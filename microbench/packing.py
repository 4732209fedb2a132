"""Packing speed-up of `flash_attention_varlen`: modeled µs on trn2 (default LNC) of each registered
flash_attention_varlen case and of its padded baseline (the same batch padded to its longest sequence, run by
`flash_attention` with `seq_lens`), without the float64 reference checks (tests/attention/test_attention_varlen.py
checks correctness; `python -m microbench --kernels flash_attention_varlen` runs the full checked cases).

    python -m microbench.packing [substring ...]      # e.g. `audio`, `packed`
"""
from __future__ import annotations

import sys
import time

import numpy as np


def _model(fn, inp):
    from nki_kernels.emulator.costmodel import model_launches
    from nki_kernels.emulator.runtime import record_launches
    t0 = time.time()
    with record_launches() as runs:
        fn(inp)
    rep = model_launches(list(runs))
    lnc = max(len(L.cores) for L in rep.launches)
    busy = " ".join(f"{e} {rep.engine_busy_us[e]:.0f}" for e in ("pe", "act", "dve", "pool", "dma"))
    return rep.device_us, f"LNC={lnc}, busy µs: {busy}, emulated in {time.time() - t0:.0f} s"


def main(argv=None) -> int:
    from microbench.registry import cases
    want = list(sys.argv[1:] if argv is None else argv)
    for c in cases():
        if c.kernel != "flash_attention_varlen" or (want and not any(w in c.shape for w in want)):
            continue
        inp = c.make_inputs(np.random.default_rng(0))
        packed_us, packed_note = _model(c.run, inp)
        padded_us, padded_note = _model(c.baseline_run, inp)
        print(f"{c.shape}\n  packed {packed_us:.1f} modeled µs ({packed_note})\n  padded {padded_us:.1f} modeled µs "
              f"({padded_note})\n  packing speed-up {padded_us / packed_us:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
