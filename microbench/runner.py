"""Run microbench cases: make inputs, run on the emulator while recording launches, check against the
reference, model the recorded launches with the cost model (figures are modeled µs on a target, not measured).
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from nki_kernels.emulator import record_launches
from nki_kernels.emulator.costmodel import hbm_bytes_per_s, model_launches, pe_peak_flops, roofline_us
from nki_kernels.emulator.targets import use_target
from nki_kernels.testing import assert_close


@dataclass
class CaseResult:
    kernel: str
    shape: str
    target: str
    ok: bool = False                      # output matched the reference
    error: str = ""                       # why not (check failure or exception)
    modeled_us: float = math.nan          # modeled device time (sum over launches), µs on `target`
    launch_overhead_us: float = 0.0       # modeled per-launch overhead, reported separately
    n_launches: int = 0
    lnc: int = 1
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


def _run_and_model(fn, inputs, target):
    with use_target(target):
        with record_launches() as runs:
            out = fn(inputs)
    rep = model_launches(list(runs), target=target) if runs else None
    return out, rep


def run_case(case, target: str = "trn2", seed: int = 0, check_baseline: bool = True) -> CaseResult:
    """Run one BenchCase; exceptions and failed checks are captured in the result (never raised)."""
    res = CaseResult(case.kernel, case.shape, target, dtype=case.dtype, quick=case.quick, lnc=case.lnc,
                     baseline_name=case.baseline_name or "")
    t0 = time.perf_counter()
    try:
        rng = np.random.default_rng(seed)
        inputs = case.make_inputs(rng)
        out, rep = _run_and_model(case.run, inputs, target)
        res.emulate_s = time.perf_counter() - t0
        if rep is None:
            raise RuntimeError("the case made no kernel launch (nothing to model)")
        ref = case.reference(inputs)
        try:
            if case.check is not None:
                case.check(ref, out)
            else:
                default_check(case.kernel, ref, out, case.dtype)
            res.ok = True
        except AssertionError as e:
            res.error = f"check failed: {e}"
        res.modeled_us = rep.device_us
        res.launch_overhead_us = rep.launch_overhead_us
        res.n_launches = rep.n_launches
        res.lnc = max((len(L.cores) for L in rep.launches), default=1)
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
        res.roofline_us = roofline_us(res.flops, res.min_hbm_bytes, target, cores=res.lnc,
                                      fp8=_fp8_inputs(inputs))
        res.roofline_ratio = rep.device_us / res.roofline_us if res.roofline_us > 0 else math.nan
        del out
        if case.baseline_run is not None:
            _run_baseline(case, inputs, ref, target, rep, res, check_baseline)
    except Exception as e:  # noqa: BLE001 - one broken case must not stop the run
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        res.error = f"{type(e).__name__}: {tb}"
        res.ok = False
    res.emulate_s = time.perf_counter() - t0
    return res


def _run_baseline(case, inputs, ref, target, rep, res, check_baseline):
    """Model the case's baseline; its failures are recorded on the result (baseline_ok=False), never raised."""
    try:
        b_out, b_rep = _run_and_model(case.baseline_run, inputs, target)
        if b_rep is not None:
            res.baseline_us = b_rep.device_us
            res.speedup = b_rep.device_us / rep.device_us if rep.device_us > 0 else math.nan
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
