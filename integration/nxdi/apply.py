"""`apply()`: install the nki-kernels adapters into NxDI classes, class-level, before compile.

NxDI traces in-process (``app.compile()`` -> NxD ``ModelBuilder.trace()`` instantiates ``model_cls(config)``
and again on the meta device for sharding), so the adapters go onto the *classes* before compile or load:
methods are replaced on the class that defines them, parameters and buffers are never touched (names and
shapes unchanged, checkpoints and sharding unaffected). Every change is recorded and `restore()`-able.

Families and what gets patched (see each adapter module for the contract):

=============== ======================================================================================
attention       ``perform_prefill`` of ``NeuronAttentionBase`` (NxDI 0.8-0.10, SDK 2.28-2.31) and of
                subclasses that override it (Qwen3.5 contrib ``NeuronQwen35Attention``)
moe             ``BlockwiseMatmulConfig`` (NxD 0.17-0.19): ``blockwise_nki_autograd_cls`` defaults to
                ``BlockwiseMatmulNKIKernelsFunc``; instances found in a model get it set directly;
                optionally (``relax_moe_gate=True``) ``expert_mlps_v2.can_use_blockwise_matmul_nki``
deltanet        ``NeuronGatedDeltaNet._fused_chunked_forward`` / ``_recurrent_step`` (+ ``_nki_recurrent_step``,
                ``_chunk_forward``, ``_sequential_forward`` when present) of the Qwen3.5 contribs
code_predictor  ``UnifiedNeuronCodePredictor.forward`` (Qwen3-Omni contrib, NxDI PR #167)
=============== ======================================================================================
"""
from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass, field

from .. import _patching
from .._patching import PatchSet
from . import attention as _attn
from . import code_predictor as _cp
from . import deltanet as _gdn
from . import moe as _moe
from ._common import ORIGINAL_PREFIX, kernel, param_names

FAMILIES = ("attention", "moe", "deltanet", "code_predictor")
KERNELS_OF = {
    "attention": (_attn.KERNEL_NAME,),
    "moe": (_moe.KERNEL_NAME,),
    "deltanet": (_gdn.PREFILL_KERNEL, _gdn.STEP_KERNEL),
    "code_predictor": (_cp.KERNEL_NAME,),
}
# NxDI 0.10 / NxD 0.19 (SDK 2.31, NKI 0.5.0) is the last release: SDK 2.32 / 2.33 ship none, and from 2.34 NxDI
# inference is unsupported on Trn2 / Trn3 (docs/integration.md, "SDK / NKI matrix").
SUPPORTED_VERSIONS = {
    "attention": "NxDI 0.8 (SDK 2.28) - 0.10 (SDK 2.31, the last): NeuronAttentionBase.perform_prefill(Q, K, V, "
                 "q_len, bsz, attention_mask), read at NxDI main @4bcdc54; Qwen3.5 contrib NeuronQwen35Attention",
    "moe": "NxD 0.17 (SDK 2.28) - 0.19 (SDK 2.31, the last): BlockwiseMatmulConfig.blockwise_nki_autograd_cls, "
           "21-argument BlockwiseMatmulNKIFunc.forward, can_use_blockwise_matmul_nki (read at NxD @fbac349)",
    "deltanet": "Qwen3.5 contribs (NxDI main @4bcdc54, SDK 2.29-2.31): NeuronGatedDeltaNet._fused_chunked_forward("
                "query, key, value, g, beta, output_final_state, initial_state) and _recurrent_step(query, key, value, "
                "g, beta, recurrent_state)",
    "code_predictor": "Qwen3-Omni contrib (NxDI PR #167): UnifiedNeuronCodePredictor.forward(past_hidden, "
                      "last_id_hidden)",
}
MARK = "__nki_kernels_adapter__"


class NxDIAdapterError(ValueError):
    """apply() could not find (or could not match) what it was asked to patch; the message lists it all."""


@dataclass
class Installation(PatchSet):
    """What apply() changed; `restore()` (or leaving the `with` block) undoes it, last change first."""
    skipped: dict = field(default_factory=dict)      # family -> [reason, ...] (non-strict mode)


# ----------------------------------------------------------------------------------------------- discovery


def _nxdi_default_targets():
    """NxDI / NxD classes apply() patches when called without explicit targets."""
    try:
        from neuronx_distributed_inference.modules.attention.attention_base import NeuronAttentionBase
    except Exception as exc:
        raise NxDIAdapterError(
            "apply(): neuronx_distributed_inference is not importable "
            f"({type(exc).__name__}: {exc}); pass the model, its modeling module or the classes to patch "
            "explicitly, e.g. apply([NeuronAttentionBase, NeuronGatedDeltaNet])") from exc
    targets = [NeuronAttentionBase]
    try:
        from neuronx_distributed.modules.moe.expert_mlps_v2 import ExpertMLPsV2
        from neuronx_distributed.modules.moe.moe_configs import BlockwiseMatmulConfig
        targets += [BlockwiseMatmulConfig, ExpertMLPsV2]
    except Exception:
        pass
    return targets


def _check_not_compiled(obj):
    if getattr(obj, "is_loaded_to_neuron", False) or getattr(obj, "traced_model", None) is not None:
        raise NxDIAdapterError(
            f"apply(): {type(obj).__name__} is already compiled/loaded (traced_model is set); call "
            "nki_kernels' apply() before app.compile() / app.load(), the traced graph keeps the old kernels")


def _collect(model_or_classes):
    """(classes, instances) to consider. Accepts None, a class, a module object, an nn.Module, an NxDI
    application (NeuronApplicationBase: its model classes and their modeling modules), or an iterable."""
    classes, instances, seen = [], [], set()

    def add_class(c):
        if isinstance(c, type) and c not in seen:
            seen.add(c)
            classes.append(c)

    def visit(obj):
        if obj is None:
            return
        if isinstance(obj, type):
            add_class(obj)
        elif isinstance(obj, types.ModuleType):
            for v in vars(obj).values():
                if isinstance(v, type) and getattr(v, "__module__", None) == obj.__name__:
                    add_class(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for o in obj:
                visit(o)
        elif hasattr(obj, "_model_cls") or hasattr(obj, "get_model_wrapper_cls"):
            # an NxDI application (NeuronBaseForCausalLM, itself an nn.Module): its model class is only
            # instantiated at compile/load, so patch the classes of the modeling modules it comes from
            _check_not_compiled(obj)
            mcls = getattr(obj, "_model_cls", None)
            if isinstance(mcls, type):
                visit(sys.modules.get(mcls.__module__))
            visit(sys.modules.get(type(obj).__module__))
            try:
                visit(_nxdi_default_targets())
            except NxDIAdapterError:
                pass
            ncfg = getattr(getattr(obj, "config", None), "neuron_config", None)
            if ncfg is not None:
                instances.append(ncfg)
        elif hasattr(obj, "modules") and callable(obj.modules):          # torch.nn.Module
            _check_not_compiled(obj)
            for m in obj.modules():
                add_class(type(m))
                instances.append(m)
        else:
            raise NxDIAdapterError(f"apply(): cannot take {type(obj).__name__!r}; pass a model (nn.Module), an "
                                   "NxDI application, a modeling module, a class or a list of them")

    if model_or_classes is None:
        visit(_nxdi_default_targets())
    else:
        visit(model_or_classes)
    return classes, instances


def _defining_class(cls, attr):
    for k in cls.__mro__:
        if attr in vars(k):
            return k
    return None


def _signature_ok(fn, expected):
    names = param_names(fn)
    return names is not None and tuple(names[:len(expected)]) == tuple(expected), names


signature_difference = _patching.signature_difference


def _mismatch(family, owner, method, names, expected, exact=False):
    cls = getattr(owner, "__name__", type(owner).__name__)
    return (f"{family}: {cls}.{method}{tuple(names or ())} does not match the supported {method}{tuple(expected)}: "
            f"{signature_difference(names, expected, exact)}")


# ----------------------------------------------------------------------------------------------- families


def _plan_attention(classes, layout, problems, missing):
    plan, already = [], False
    try:
        from neuronx_distributed_inference.modules.attention.attention_base import NeuronAttentionBase
    except Exception:
        NeuronAttentionBase = None
    for c in classes:
        if not hasattr(c, "perform_prefill"):
            continue
        if NeuronAttentionBase is not None and not issubclass(c, NeuronAttentionBase):
            continue
        owner = _defining_class(c, "perform_prefill")
        fn = vars(owner)["perform_prefill"]
        if getattr(fn, MARK, None):
            already = True
            continue
        ok, names = _signature_ok(fn, _attn.EXPECTED_PARAMS)
        if not ok:
            problems.append(_mismatch("attention", owner, "perform_prefill", names, _attn.EXPECTED_PARAMS))
            continue
        contrib = owner.__name__ in _attn.ALWAYS_CAUSAL_CLASSES
        mode = "always" if contrib else "mask"
        lay = "BHSD" if contrib else layout      # the contrib's forward only accepts BHSD
        if owner not in [p[0] for p in plan]:
            plan.append((owner, "perform_prefill", _attn.make_perform_prefill(fn, layout=lay, causal_mode=mode)))
    if not plan and not problems and not already:
        missing.append("attention: no class with perform_prefill(Q, K, V, q_len, bsz, attention_mask) "
                        "(NeuronAttentionBase or a subclass) was found")
    return plan


# NKI version from which gated_delta_rule traces: its chunk loop is a trace-time generator pipeline, and NKI
# specializes kernels by Python tracing (generators allowed) only from 0.7.0 (SDK 2.33); NxDI's last stack
# (SDK 2.31) ships NKI 0.5.0. See docs/integration.md, "SDK / NKI matrix".
PREFILL_MIN_NKI = (0, 7)
PREFILL_HOOKS = ("_fused_chunked_forward", "_chunk_forward", "_sequential_forward")


def nki_version():
    """(major, minor) of the real NKI in use, or None on the emulator (which implements the 0.7 API)."""
    from nki_kernels import backend
    if backend.is_emulated():
        return None
    return backend._version_tuple(getattr(backend.nki, "__version__", "0"))


def _plan_deltanet(classes, problems, missing, notes):
    plan = []
    version = nki_version()
    old_nki = version is not None and version < PREFILL_MIN_NKI
    candidates = [c for c in classes if any(hasattr(c, h) for h, spec in _gdn.HOOKS.items() if spec[2])]
    for c in candidates:
        local = []
        for hook, (expected, _impl, required) in _gdn.HOOKS.items():
            if not hasattr(c, hook):
                if required:
                    problems.append(f"deltanet: {c.__name__} has no {hook} (expected {hook}{expected})")
                continue
            owner = _defining_class(c, hook)
            fn = vars(owner)[hook]
            if getattr(fn, MARK, None):
                continue
            if old_nki and hook in PREFILL_HOOKS:
                note = (f"deltanet: {owner.__name__}.{hook} left to the contrib: gated_delta_rule needs NKI >= "
                        f"{PREFILL_MIN_NKI[0]}.{PREFILL_MIN_NKI[1]} (trace-time generators), this stack runs NKI "
                        f"{version[0]}.{version[1]}")
                if note not in notes:
                    notes.append(note)
                continue
            ok, names = _signature_ok(fn, expected)
            if not ok:
                # optional hooks too: a drifted hook left unpatched would silently keep the slow path
                problems.append(_mismatch("deltanet", owner, hook, names, expected))
                continue
            local.append((owner, hook, _gdn.make_hook(fn, hook)))
        for item in local:
            if (item[0], item[1]) not in [(p[0], p[1]) for p in plan]:
                plan.append(item)
    if not candidates:
        missing.append("deltanet: no class with _fused_chunked_forward / _recurrent_step (the Qwen3.5 contrib's "
                        "NeuronGatedDeltaNet) was found; pass the contrib's modeling module or class")
    return plan


def _plan_code_predictor(classes, problems, missing):
    plan = []
    already = False
    candidates = [c for c in classes if c.__name__ in _cp.CLASS_NAMES or (
        "forward" in vars(c) and tuple((param_names(vars(c)["forward"]) or ())[:2]) == _cp.EXPECTED_PARAMS)]
    for c in candidates:
        fn = vars(c).get("forward")
        if fn is not None and getattr(fn, MARK, None):
            already = True
            continue
        ok, names = _signature_ok(fn, _cp.EXPECTED_PARAMS)
        if not ok or len(names) != len(_cp.EXPECTED_PARAMS):
            problems.append(_mismatch("code_predictor", c, "forward", names, _cp.EXPECTED_PARAMS, exact=True))
            continue
        plan.append((c, "forward", _cp.make_forward(fn)))
    if not candidates and not already:
        missing.append("code_predictor: no UnifiedNeuronCodePredictor (forward(past_hidden, last_id_hidden)) "
                        "was found; pass the Qwen3-Omni contrib's code-predictor module or class")
    return plan


def _stock_blockwise_classes(classes):
    """NxD's own BlockwiseMatmulNKIFunc: among the targets, in the modules of the NxD classes found (expert_mlps_v2
    imports it from blockwise.py), or from NxD itself when importable."""
    found = [c for c in classes if c.__name__ == "BlockwiseMatmulNKIFunc"]
    for c in classes:
        if c.__name__ in ("ExpertMLPsV2", "BlockwiseMatmulConfig"):
            stock = getattr(sys.modules.get(c.__module__), "BlockwiseMatmulNKIFunc", None)
            if isinstance(stock, type):
                found.append(stock)
    try:
        from neuronx_distributed.modules.moe.blockwise import BlockwiseMatmulNKIFunc
        found.append(BlockwiseMatmulNKIFunc)
    except Exception:
        pass
    return [c for i, c in enumerate(found) if c not in found[:i] and c is not _moe.BlockwiseMatmulNKIKernelsFunc]


def _check_moe_contract(classes, relax_gate, problems):
    """Verify, before installing anything, the contracts the MoE adapter relies on: the 21-argument order of NxD's
    BlockwiseMatmulNKIFunc.forward (our class receives the same positional arguments) and, with relax_gate, the
    parameters of can_use_blockwise_matmul_nki (our gate replaces it and is called by keyword)."""
    stocks = _stock_blockwise_classes(classes)
    if not stocks:
        problems.append("moe: cannot verify the 21-argument contract of BlockwiseMatmulNKIFunc.forward: NxD's class "
                        "was not found (NxD not importable, none among the targets); pass "
                        "neuronx_distributed.modules.moe.blockwise and expert_mlps_v2, or their classes")
    for stock in stocks:
        names = param_names(vars(stock).get("forward", getattr(stock, "forward", None)))
        if names is None or tuple(names) != _moe.APPLY_ARGS:
            problems.append(_mismatch("moe", stock, "forward", names, _moe.APPLY_ARGS, exact=True))
    if relax_gate:
        ours = tuple(param_names(_moe.can_use_blockwise_matmul_nki))
        for c in classes:
            if c.__name__ != "ExpertMLPsV2":
                continue
            gate = getattr(sys.modules.get(c.__module__), "can_use_blockwise_matmul_nki", None)
            if gate is None:
                problems.append(f"moe: {c.__module__} has no can_use_blockwise_matmul_nki to relax "
                                "(relax_moe_gate=True)")
                continue
            names = param_names(gate)
            if names is None or tuple(names) != ours:
                problems.append(_mismatch("moe", sys.modules.get(c.__module__), "can_use_blockwise_matmul_nki",
                                          names, ours, exact=True))


def _plan_moe(classes, instances, relax_gate, problems, missing):
    plan, sets = [], []
    cfg_classes = [c for c in classes if c.__name__ == "BlockwiseMatmulConfig"]
    for c in cfg_classes:
        init = vars(c).get("__init__")
        if init is None or getattr(init, MARK, None):
            continue
        names = param_names(init) or ()
        absent = [p for p in ("block_size", "logical_nc_config", "blockwise_nki_autograd_cls") if p not in names]
        if absent:
            problems.append(f"moe: {c.__name__}.__init__{tuple(names)} has no parameter(s) {absent} "
                            f"(supported: {SUPPORTED_VERSIONS['moe']})")
            continue
        plan.append((c, "__init__", _moe_init(init)))
    for inst in instances:
        cfg = getattr(inst, "blockwise_matmul_config", None)
        if cfg is None:
            continue
        if isinstance(cfg, dict):          # MoENeuronConfig keeps a dict until ExpertMLPsV2 is built
            if cfg.get("blockwise_nki_autograd_cls") is None:
                sets.append((cfg, "blockwise_nki_autograd_cls", dict(_moe.BLOCKWISE_AUTOGRAD_CLS_SPEC)))
        elif hasattr(cfg, "blockwise_nki_autograd_cls"):
            if cfg.blockwise_nki_autograd_cls is None:
                sets.append((cfg, "blockwise_nki_autograd_cls", _moe.BlockwiseMatmulNKIKernelsFunc))
    if relax_gate:
        mlp_classes = [c for c in classes if c.__name__ == "ExpertMLPsV2"]
        for c in mlp_classes:
            mod = sys.modules.get(c.__module__)
            if mod is not None and hasattr(mod, "can_use_blockwise_matmul_nki"):
                plan.append((mod, "can_use_blockwise_matmul_nki", _moe.can_use_blockwise_matmul_nki))
    if not cfg_classes and not sets:
        missing.append("moe: neither NxD's BlockwiseMatmulConfig class nor a module with a blockwise_matmul_config "
                        "was found; pass the NxD class, the model, or set blockwise_matmul_config="
                        "integration.nxdi.moe.blockwise_matmul_config_kwargs() in MoENeuronConfig")
    if plan or sets:
        _check_moe_contract(classes, relax_gate, problems)
    return plan, sets


def _moe_init(original):
    import functools

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "blockwise_nki_autograd_cls", None) is None:
            self.blockwise_nki_autograd_cls = _moe.BlockwiseMatmulNKIKernelsFunc

    setattr(__init__, MARK, "moe")
    setattr(__init__, ORIGINAL_PREFIX + "__init__", original)
    return __init__


# ----------------------------------------------------------------------------------------------- entry point


def apply(model_or_classes=None, kernels=None, *, layout="BHSD", relax_moe_gate=False, strict=True):
    """Install the nki-kernels adapters into NxDI, class-level, before compile.

    Args:
        model_or_classes: None (NxDI's own classes, needs neuronx_distributed_inference importable), a model
            (nn.Module: its module classes, plus MoE configs set on its instances), an NxDI application
            (NeuronBaseForCausalLM: its model classes' modeling modules), a modeling module (e.g. a contrib's
            ``modeling_qwen35``), a class, or a list of these.
        kernels: families to install, a subset of ("attention", "moe", "deltanet", "code_predictor"); each one
            named must be found. None: every family that has a candidate among the targets.
        layout: "BHSD" (default, returns (BHSD, NONE)) or "BHDS" (stock kernel convention) for stock
            NeuronAttentionBase prefill.
        relax_moe_gate: also replace NxD's ``can_use_blockwise_matmul_nki`` so that block sizes, hidden and
            intermediate sizes our kernel supports (but the stock kernels do not) take the kernel path.
        strict: raise NxDIAdapterError listing every problem (nothing installed); False installs what matched
            and records the problems in ``Installation.skipped``.
    Returns:
        Installation (``.installed``, ``.restore()``, usable as a context manager).
    """
    if layout not in _attn.LAYOUTS:
        raise NxDIAdapterError(f"apply(): layout must be one of {_attn.LAYOUTS}, got layout={layout!r}")
    if isinstance(kernels, str):
        kernels = (kernels,)
    unknown = [k for k in (kernels or ()) if k not in FAMILIES]
    if unknown:
        raise NxDIAdapterError(f"apply(): unknown kernel families {unknown}; choose from {FAMILIES}")
    explicit = kernels is not None
    families = tuple(kernels) if explicit else FAMILIES
    classes, instances = _collect(model_or_classes)

    inst = Installation()
    problems = {}
    plans = {}
    kernel_missing = set()
    for fam in families:
        probs, missing = [], []
        if fam == "attention":
            plans[fam] = (_plan_attention(classes, layout, probs, missing), [])
        elif fam == "moe":
            plans[fam] = _plan_moe(classes, instances, relax_moe_gate, probs, missing)
        elif fam == "deltanet":
            notes = []
            plans[fam] = (_plan_deltanet(classes, probs, missing, notes), [])
            if notes:
                inst.skipped.setdefault(fam, []).extend(notes)
        else:
            plans[fam] = (_plan_code_predictor(classes, probs, missing), [])
        patch, sets = plans[fam]
        if patch or sets:
            for name in KERNELS_OF[fam]:
                try:
                    kernel(name, fam)
                except NotImplementedError as exc:
                    probs.append(f"{fam}: {exc}")
                    kernel_missing.add(fam)
        if probs or (missing and explicit):
            problems[fam] = probs + missing
        elif missing:
            inst.skipped[fam] = missing        # auto mode: a family with no candidate is just not there
    if not explicit and not problems and set(inst.skipped) == set(families):
        problems = dict(inst.skipped)              # auto mode and not one family found: say what was looked for
    if problems and strict:
        lines = [p for fam in problems for p in problems[fam]]
        versions = "\n".join(f"  {f}: {SUPPORTED_VERSIONS[f]}" for f in families)
        raise NxDIAdapterError("apply() found problems, nothing was installed:\n  - " + "\n  - ".join(lines)
                               + "\nSupported versions:\n" + versions)
    for fam in families:
        if fam in problems:
            inst.skipped[fam] = problems[fam]
            if fam in kernel_missing:
                continue                       # non-strict: install what matched, but never a kernel-less adapter
        patch, sets = plans[fam]
        done = []
        for owner, attr, value in patch:
            inst._set(owner, attr, value)
            done.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}")
        for obj, key, value in sets:
            if isinstance(obj, dict):
                inst.patches.append((_DictSlot(obj), key, key in obj, obj.get(key)))
                obj[key] = value
            else:
                inst._set(obj, key, value)
            done.append(f"{type(obj).__name__}.{key}")
        if done:
            inst.installed[fam] = done
    return inst


class _DictSlot:
    """Lets Installation.restore() undo a dict entry with setattr/delattr."""

    def __init__(self, d):
        self.__dict__["_d"] = d

    def __setattr__(self, key, value):
        self._d[key] = value

    def __delattr__(self, key):
        self._d.pop(key, None)


def installed_families(cls) -> list:
    """Families whose adapters are installed on `cls` (for diagnostics)."""
    out = []
    for k in inspect.getmro(cls):
        for v in vars(k).values():
            fam = getattr(v, MARK, None)
            if fam and fam not in out:
                out.append(fam)
    return out
