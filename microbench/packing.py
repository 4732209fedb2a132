"""Packing speed-ups: modeled µs on trn2 (default LNC) of each registered flash_attention_varlen case and of its
padded baseline (the same batch padded to its longest sequence, run by `flash_attention` with `seq_lens`), and of
gated_delta_rule with cu_seqlens against the padded batch with valid_lengths (`_deltanet_cases`), without the
float64 reference checks (tests/attention/test_attention_varlen.py and tests/deltanet/test_gdn_varlen.py check
correctness; `python -m microbench --kernels flash_attention_varlen` runs the full checked attention cases).

    python -m microbench.packing [substring ...]      # e.g. `audio`, `packed`, `gated_delta_rule`
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


def _deltanet_cases():
    """(shape, make_inputs, packed run, padded run) of gated_delta_rule at a Qwen3.5-35B-A3B TP4 rank (bf16, L2 norm
    in kernel, chunk 128, initial states): the 8 attention lengths in [64, 2048] packed with cu_seqlens, against
    the same batch padded to its longest sequence (B = 8, valid_lengths). tests/deltanet/test_gdn_varlen.py
    checks correctness."""
    from microbench.cases.attention import _VARLEN_LENS
    from microbench.cases.deltanet import _CHUNK, _DK, _DV, _HK, _HV, _LABEL, _gdn_inputs
    from nki_kernels import gated_delta_rule
    lens = np.array(_VARLEN_LENS)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    n, t, t_max = lens.size, int(cu[-1]), int(lens.max())

    def make(rng):
        packed = _gdn_inputs(rng, 1, t)
        padded = {k: np.zeros((n, t_max) + a.shape[2:], a.dtype) for k, a in packed.items()}
        for i in range(n):
            for k, a in packed.items():
                padded[k][i, :lens[i]] = a[0, cu[i]:cu[i + 1]]
        return dict(packed=packed, padded=padded, s0=np.zeros((n, _HV, _DK, _DV), np.float32))

    kw = dict(chunk_size=_CHUNK, use_qk_l2norm_in_kernel=True)
    yield (f"gated_delta_rule {_LABEL} Hk={_HK} Hv={_HV} D={_DK}: 8 packed in [64, 2048] (T={t})", make,
           lambda x: gated_delta_rule(**x["packed"], **kw, initial_state=x["s0"], cu_seqlens=cu),
           lambda x: gated_delta_rule(**x["padded"], **kw, initial_state=x["s0"], valid_lengths=lens))


def _attention_cases():
    from microbench.registry import cases
    for c in cases():
        if c.kernel == "flash_attention_varlen":
            yield c.shape, c.make_inputs, c.run, c.baseline_run


def main(argv=None) -> int:
    want = list(sys.argv[1:] if argv is None else argv)
    for shape, make, run, padded_run in list(_attention_cases()) + list(_deltanet_cases()):
        if want and not any(w in shape for w in want):
            continue
        inp = make(np.random.default_rng(0))
        packed_us, packed_note = _model(run, inp)
        padded_us, padded_note = _model(padded_run, inp)
        print(f"{shape}\n  packed {packed_us:.1f} modeled µs ({packed_note})\n  padded {padded_us:.1f} modeled µs "
              f"({padded_note})\n  packing speed-up {padded_us / packed_us:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
