"""Run microbench cases: make inputs, run on the emulator while recording launches, check against the
reference, model the recorded launches with the cost model (figures are modeled µs on a target, not measured).

Each case runs at the target's default LNC (the degree neuronx-cc uses: NEURON_LOGICAL_NC_CONFIG when set,
else 2 on trn2/trn3, 1 on trn1), chosen the documented way, by NEURON_LOGICAL_NC_CONFIG, which the public
wrappers' ``lnc=None`` resolves to; and, when that default is 2, again at LNC=1 for the second figure. The LNC
a case actually launched at is read from its recorded launches: a case whose kernel has no LNC=2 path yet (it
launches at LNC=1 whatever the variable says) gets no default-LNC figure ("-", with the reason), only its
LNC=1 one.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from nki_kernels.emulator import record_launches
from nki_kernels.emulator.costmodel import hbm_bytes_per_s, model_launches, pe_peak_flops, roofline_us
from nki_kernels.emulator.lnc import LNC_ENV, degree_in_force
from nki_kernels.emulator.targets import use_target
from nki_kernels.testing import assert_close


@dataclass
class CaseResult:
    kernel: str
    shape: str
    target: str
    ok: bool = False                      # output matched the reference (at every LNC run)
    error: str = ""                       # why not (check failure or exception)
    modeled_us: float = math.nan          # modeled device time (sum over launches) at default_lnc, µs on `target`
    launch_overhead_us: float = 0.0       # modeled per-launch overhead, reported separately
    n_launches: int = 0
    lnc: int = 1                          # the LNC the headline (modeled_us) run launched at
    default_lnc: int = 1                  # the degree in force on `target` (what the headline is meant to be at)
    lnc1_us: float = math.nan             # modeled device time at LNC=1 (second figure)
    lnc_note: str = ""                    # why a figure is missing ("-")
    flops: int = 0                        # useful FLOPs (case.flops, else counted matmul FLOPs)
    hbm_bytes: int = 0                    # bytes moved to/from HBM by the kernel (counted from the trace)
    min_hbm_bytes: int = 0                # roofline bytes (case.min_hbm_bytes, else counted)
    tensor_util: float = 0.0              # TensorE busy / device time (modeled)
    tflops: float = 0.0                   # useful FLOPs / modeled time
    hbm_gbps: float = 0.0                 # counted HBM bytes / modeled time
    roofline_us: float = math.nan
    roofline_ratio: float = math.nan      # modeled / roofline (>= 1; 1 = at the roofline)
    engine_busy_us: dict = field(default_factory=dict)
    baseline_name: str = ""
    baseline_us: float = math.nan
    baseline_ok: bool | None = None
    speedup: float = math.nan             # baseline_us / modeled_us (baseline checked too: baseline_ok)
    emulate_s: float = 0.0                # wall seconds spent emulating (not a performance figure)
    dtype: str = ""
    quick: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


def _to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):                       # torch tensor
        t = x.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _flatten(x) -> list:
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _flatten(x[k])]
    if isinstance(x, (tuple, list)):
        return [v for e in x for v in _flatten(e)]
    return [x]


def default_check(name: str, ref, out, dtype: str):
    refs, outs = _flatten(ref), _flatten(out)
    if len(refs) != len(outs):
        raise AssertionError(f"{name}: {len(outs)} outputs, reference has {len(refs)}")
    for i, (r, o) in enumerate(zip(refs, outs)):
        r, o = _to_numpy(r), _to_numpy(o)
        if r is None and o is None:
            continue
        assert_close(f"{name}[{i}]" if len(refs) > 1 else name, r, o, dtype=dtype)


@contextlib.contextmanager
def _lnc_env(lnc: int):
    """NEURON_LOGICAL_NC_CONFIG=lnc inside the block (how NKI 0.7 sets the degree of kernels and compiler)."""
    old = os.environ.get(LNC_ENV)
    os.environ[LNC_ENV] = str(lnc)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LNC_ENV, None)
        else:
            os.environ[LNC_ENV] = old


def _run_and_model(fn, inputs, target, lnc: int | None = None):
    with use_target(target), (_lnc_env(lnc) if lnc is not None else contextlib.nullcontext()):
        with record_launches() as runs:
            out = fn(inputs)
    rep = model_launches(list(runs), target=target) if runs else None
    return out, rep


def _launched_lnc(rep) -> int:
    return max((L.lnc for L in rep.launches), default=1)   # per rank for multi-rank runs


def _check(case, ref, out, label=""):
    if case.check is not None:
        case.check(ref, out)
    else:
        default_check(case.kernel + label, ref, out, case.dtype)


def run_case(case, target: str = "trn2", seed: int = 0, check_baseline: bool = True, lnc1: bool = True) -> CaseResult:
    """Run one BenchCase at the default LNC (and at LNC=1 when `lnc1` and the default is 2); exceptions and
    failed checks are captured in the result (never raised)."""
    default = degree_in_force(target)
    res = CaseResult(case.kernel, case.shape, target, dtype=case.dtype, quick=case.quick, lnc=default,
                     default_lnc=default, baseline_name=case.baseline_name or "")
    t0 = time.perf_counter()
    try:
        rng = np.random.default_rng(seed)
        inputs = case.make_inputs(rng)
        out, rep = _run_and_model(case.run, inputs, target, default)
        res.emulate_s = time.perf_counter() - t0
        if rep is None:
            raise RuntimeError("the case made no kernel launch (nothing to model)")
        ref = case.reference(inputs)
        try:
            _check(case, ref, out)
            res.ok = True
        except AssertionError as e:
            res.error = f"check failed: {e}"
        del out
        _fill(res, case, rep, target, inputs)
        if res.lnc != default:
            # the case fixes its LNC (an LNC=1 variant, a per-(b, h) baseline) or the kernel has no LNC=default
            # path: its figure is an LNC=1 figure, not the headline
            res.lnc_note = (f"launches at LNC={res.lnc} under {LNC_ENV}={default} (the case fixes its LNC): "
                            f"its figure is in the LNC={res.lnc} column")
            if res.lnc == 1:
                res.lnc1_us = res.modeled_us
            res.modeled_us = math.nan
        elif lnc1 and default != 1:
            _run_lnc1(case, inputs, ref, target, res)
        if case.baseline_run is not None:
            _run_baseline(case, inputs, ref, target, rep, res, check_baseline, default)
    except Exception as e:  # noqa: BLE001 - one broken case must not stop the run
        res.error = traceback.format_exception_only(type(e), e)[-1].strip()     # "ErrorClass: message"
        res.ok = False
    res.emulate_s = time.perf_counter() - t0
    return res


def _fill(res, case, rep, target, inputs):
    """The headline figures of `res` from the default-LNC run's report."""
    res.modeled_us = rep.device_us
    res.launch_overhead_us = rep.launch_overhead_us
    res.n_launches = rep.n_launches
    res.lnc = _launched_lnc(rep)
    res.flops = int(case.flops or rep.flops)
    res.hbm_bytes = int(rep.hbm_bytes)
    res.min_hbm_bytes = int(case.min_hbm_bytes or rep.hbm_bytes)
    res.tensor_util = rep.tensor_util
    res.engine_busy_us = {k: round(v, 3) for k, v in rep.engine_busy_us.items()}
    if rep.device_us > 0:
        res.tflops = res.flops / (rep.device_us * 1e6)
        res.hbm_gbps = rep.hbm_bytes / (rep.device_us * 1e3)
    # the honest roofline: useful FLOPs at the bf16 peak (fp8 peak for fp8 inputs), whatever precision the
    # kernel computes in (docs/cost-model.md)
    res.roofline_us = roofline_us(res.flops, res.min_hbm_bytes, target, cores=res.lnc, fp8=_fp8_inputs(inputs))
    res.roofline_ratio = rep.device_us / res.roofline_us if res.roofline_us > 0 else math.nan


def _run_lnc1(case, inputs, ref, target, res):
    """The second figure: the same case under NEURON_LOGICAL_NC_CONFIG=1 (checked too)."""
    try:
        out1, rep1 = _run_and_model(case.run, inputs, target, 1)
        if _launched_lnc(rep1) != 1:
            res.lnc_note = f"launches at LNC={_launched_lnc(rep1)} under {LNC_ENV}=1 (the case fixes its lnc)"
            return
        res.lnc1_us = rep1.device_us
        _check(case, ref, out1, " (LNC=1)")
    except Exception as e:  # noqa: BLE001 - recorded on the result
        what = "check failed" if isinstance(e, AssertionError) else type(e).__name__
        msg = traceback.format_exception_only(type(e), e)[-1].strip()
        res.ok = False
        res.error = (res.error + "; " if res.error else "") + f"LNC=1 {what}: {msg}"


def _run_baseline(case, inputs, ref, target, rep, res, check_baseline, lnc):
    """Model the case's baseline (under the same NEURON_LOGICAL_NC_CONFIG as the headline run); its failures are
    recorded on the result (baseline_ok=False), never raised. The speed-up compares with the headline figure,
    else (no default-LNC path yet) with the LNC=1 one."""
    try:
        b_out, b_rep = _run_and_model(case.baseline_run, inputs, target, lnc)
        if b_rep is not None:
            res.baseline_us = b_rep.device_us
            ours = res.modeled_us if math.isfinite(res.modeled_us) else res.lnc1_us
            res.speedup = b_rep.device_us / ours if ours > 0 else math.nan
        if check_baseline:
            if case.check is not None:
                case.check(ref, b_out)
            else:
                default_check(case.kernel + " baseline", ref, b_out, case.dtype)
        res.baseline_ok = True
    except Exception as e:  # noqa: BLE001 - a broken baseline must not hide the kernel's own result
        res.baseline_ok = False
        what = "check failed" if isinstance(e, AssertionError) else type(e).__name__
        msg = traceback.format_exception_only(type(e), e)[-1].strip()
        res.error = (res.error + "; " if res.error else "") + f"baseline {what}: {msg}"


def select(cases, kernels: str | None = None, quick: bool = False):
    """Filter cases: `kernels` is a comma list of kernel names (exact match, or substring if no exact match)."""
    out = list(cases)
    if quick:
        out = [c for c in out if c.quick]
    if kernels:
        wanted = [k.strip() for k in kernels.split(",") if k.strip()]
        names = {c.kernel for c in out}
        keep = set()
        for w in wanted:
            if w in names:
                keep.add(w)
            else:
                keep |= {n for n in names if w in n}
        out = [c for c in out if c.kernel in keep]
    return out


def _fp8_inputs(inputs) -> bool:
    """The case's floating-point array inputs are all fp8 (then the roofline uses the fp8 TensorE peak)."""
    vals = inputs.values() if isinstance(inputs, dict) else (inputs if isinstance(inputs, (list, tuple)) else [inputs])
    dts = [str(getattr(v, "dtype", "")) for v in vals if hasattr(v, "dtype")]
    floats = [d for d in dts if "float" in d]
    return bool(floats) and all(d.startswith("float8") for d in floats)


def peaks(target: str) -> tuple[float, float]:
    """(TensorE bf16 peak TFLOP/s, HBM GB/s) of one core of `target`, as used by the roofline."""
    return pe_peak_flops(target) / 1e12, hbm_bytes_per_s(target) / 1e9
