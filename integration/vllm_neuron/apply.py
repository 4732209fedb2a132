"""`apply()` / `restore()`: install our kernels into the vLLM Neuron plugin's Qwen3.5 and Qwen3-MoE models.

The plugin builds its models from its own registry (``vllm_neuron.model.registry.get_models()``) and traces them
with torch.compile, so the replacements go onto the *classes* (and, for the DeltaNet prefill functional op, the
module attribute the layer looks up by name) before the model is built or compiled. Parameters and buffers are
never touched: checkpoint loading, weight loaders and TP/EP sharding are unchanged. Every change is recorded and
`Installation.restore()` undoes it, last change first.

=============== ==========================================================================================
family          what is replaced (plugin source: see each adapter module)
=============== ==========================================================================================
deltanet        module function ``chunk_gated_delta_rule`` of ``Qwen3_5GatedDeltaNet``'s module (prefill),
                ``Qwen3_5GatedDeltaNet._causal_conv`` (prefill conv1d), ``Qwen3_5GatedDeltaNet.forward_decode``
attention       ``Qwen3_5Attention.forward_prefill`` / ``forward_decode`` (gated attention, head_dim 256)
moe             ``Qwen3_5SparseMoeBlock.forward_prefill`` / ``forward_decode`` (shared expert fused),
                ``Qwen3MoeExperts.forward_prefill`` / ``forward_decode``
=============== ==========================================================================================

Before installing anything, apply() checks every replaced method's and function's parameter list (exactly), the
methods the replacements call (their leading parameters) and, on model instances, the attributes they read; a
difference refuses the whole installation with one error naming class, method and difference. Installed on
classes (the registry path: no instance exists yet), each replacement checks its instance's attributes when
called and runs the plugin's own code, recorded in `fallbacks()`, when one is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field

from .._patching import PatchSet
from . import attention as _attn
from . import deltanet as _gdn
from . import moe as _moe
from ._common import MARK, VllmNeuronAdapterError, difference, logger, missing_attrs, param_names

FAMILIES = ("deltanet", "attention", "moe")
PLUGIN_COMMITS = ("vllm-project/vllm-neuron: model/qwen3_5/deltanet.py @b3a5a71, model/qwen3_5/model.py @aa9b76b "
                  "(rechecked @cb27dd0), model/qwen3_moe/model_bf16.py @5f54272 (rechecked @c9e06d0), "
                  "model/qwen3_moe/factory.py @b1873d6, nki/nki_hop.py; whn09/vllm-neuron @3de9ea3: "
                  "model/qwen3_5/moe.py, model/qwen3_5/model.py (attention without query-head replication), "
                  "model/qwen3_5/factory.py, model/registry.py")


@dataclass(frozen=True)
class Target:
    family: str
    class_name: str
    methods: dict              # replaced method -> exact parameter names (after self)
    makers: dict               # replaced method -> factory(original) -> replacement
    used: dict                 # methods the replacement calls -> leading parameter names
    attrs: tuple               # instance attributes the replacement reads
    functions: dict = field(default_factory=dict)        # module function -> exact parameter names
    function_makers: dict = field(default_factory=dict)
    attr_group: tuple = ()     # instance attributes read when present: all of them or none (an older contract)


TARGETS = (
    Target("deltanet", "Qwen3_5GatedDeltaNet", _gdn.METHOD_PARAMS, _gdn.METHOD_MAKERS, _gdn.USED_METHODS,
           _gdn.INSTANCE_ATTRS, _gdn.FUNCTION_PARAMS, _gdn.FUNCTION_MAKERS),
    Target("attention", "Qwen3_5Attention", _attn.METHOD_PARAMS, _attn.METHOD_MAKERS, _attn.USED_METHODS,
           _attn.INSTANCE_ATTRS, attr_group=_attn.REPLICATION_ATTRS),
    Target("moe", "Qwen3_5SparseMoeBlock", _moe.QWEN35_METHOD_PARAMS, _moe.QWEN35_MAKERS, _moe.QWEN35_USED_METHODS,
           _moe.QWEN35_ATTRS),
    Target("moe", "Qwen3MoeExperts", _moe.QWEN3_METHOD_PARAMS, _moe.QWEN3_MAKERS, {}, _moe.QWEN3_ATTRS),
)


# The modules that define the hookable layers, per model package of the plugin. The registry does not reach them:
# it registers a factory (whn09/vllm-neuron @3de9ea3: ``qwen3_5/factory.py`` ``Qwen3_5ForConditionalGeneration``
# / ``Qwen3_5MoeForConditionalGeneration``; vllm-project/vllm-neuron @b1873d6: ``qwen3_moe/factory.py``
# ``Qwen3MoeForCausalLM``) that imports its modeling module only when the engine builds the model, so apply()
# imports them itself (the factory later gets the same, patched, module objects).
MODELING_MODULES = {"qwen3_5": ("model", "deltanet", "moe"), "qwen3_moe": ("model_bf16",)}


def _modeling_modules(cls):
    """The modeling modules of the plugin package that registers `cls` (see MODELING_MODULES), imported."""
    module = sys.modules.get(cls.__module__)
    package = cls.__module__ if hasattr(module, "__path__") else cls.__module__.rpartition(".")[0]
    found = []
    for name in MODELING_MODULES.get(package.rpartition(".")[2], ()):
        try:
            if importlib.util.find_spec(f"{package}.{name}") is None:
                continue
            found.append(importlib.import_module(f"{package}.{name}"))
        except Exception as exc:         # noqa: BLE001 - any import-time failure of the plugin's module (its NKI /
            # nkilib imports, a RuntimeError at import): its layers are not hooked, and the factory's own import
            # fails the same way when the model is built; the entry point runs in every vLLM process and must not
            # stop it
            logger.warning("nki-kernels: %s.%s could not be imported (%s: %s); its layers are left alone",
                           package, name, type(exc).__name__, exc)
            continue
    return found


@dataclass
class Installation(PatchSet):
    """What apply() changed; `restore()` (or leaving the `with` block) undoes it."""
    skipped: list = field(default_factory=list)       # problems of the classes left alone (strict=False)


def _plugin_default():
    try:
        from vllm_neuron.model import registry
    except Exception as exc:
        raise VllmNeuronAdapterError(
            "apply(): the vLLM Neuron plugin is not importable "
            f"({type(exc).__name__}: {exc}); pass the model, its modeling modules or the classes explicitly") from exc
    return registry


def _collect(target):
    """(classes, instances): model instances give their submodules; modules give the classes they hold (defined
    or imported); the plugin registry gives its models' modeling modules."""
    classes, instances, seen = [], [], set()

    def add(c):
        if c not in seen:
            seen.add(c)
            classes.append(c)

    def visit(obj):
        if obj is None:
            return
        if isinstance(obj, type):
            add(obj)
        elif isinstance(obj, types.ModuleType):
            if callable(getattr(obj, "get_models", None)):          # vllm_neuron.model.registry
                for _name, cls in obj.get_models():
                    visit(sys.modules.get(cls.__module__))
                    for module in _modeling_modules(cls):
                        visit(module)
                    add(cls)
            for v in list(vars(obj).values()):
                if isinstance(v, type):
                    add(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for o in obj:
                visit(o)
        elif hasattr(obj, "modules") and callable(obj.modules):    # torch.nn.Module
            for m in obj.modules():
                add(type(m))
                instances.append(m)
        else:
            raise VllmNeuronAdapterError(f"apply(): cannot take {type(obj).__name__!r}; pass a model (nn.Module), "
                                         "the plugin's registry or modeling module, a class, or a list of them")

    visit(_plugin_default() if target is None else target)
    return classes, instances


def _matches(cls, name):
    return any(k.__name__ == name for k in cls.__mro__)


def _defining(cls, attr):
    for k in cls.__mro__:
        if attr in vars(k):
            return k
    return None


def _check_class(t, cls, problems):
    """Plan (owner, attr, replacement) for one class, or record why not."""
    plan = []
    for method, expected in t.methods.items():
        owner = _defining(cls, method)
        if owner is None:
            problems.append(f"{t.family}: {cls.__name__} has no method {method}{expected}")
            continue
        fn = vars(owner)[method]
        if getattr(fn, MARK, None):
            continue                                   # already installed
        diff = difference(param_names(fn), expected)
        names = param_names(fn) or ()
        if diff is None and len(names) != len(expected):
            diff = f"extra parameter(s) {tuple(names[len(expected):])}"
        if diff:
            problems.append(f"{t.family}: {owner.__name__}.{method}{tuple(names)} differs from the supported "
                            f"{method}{expected}: {diff}")
            continue
        plan.append((owner, method, t.makers[method](fn)))
    for method, expected in t.used.items():
        fn = getattr(cls, method, None)
        if fn is None:
            problems.append(f"{t.family}: {cls.__name__} has no method {method}{expected}, which the adapter calls")
            continue
        diff = difference(param_names(fn), expected)
        if diff:
            problems.append(f"{t.family}: {cls.__name__}.{method}{tuple(param_names(fn) or ())} differs from the "
                            f"{method}{expected} the adapter calls: {diff}")
    module = sys.modules.get(cls.__module__)
    for fname, expected in t.functions.items():
        fn = getattr(module, fname, None)
        if fn is None:
            problems.append(f"{t.family}: module {cls.__module__} (of {cls.__name__}) has no function "
                            f"{fname}{expected}")
            continue
        if getattr(fn, MARK, None):
            continue
        names = param_names(fn) or ()
        diff = difference(names, expected) or (
            f"extra parameter(s) {tuple(names[len(expected):])}" if len(names) != len(expected) else None)
        if diff:
            problems.append(f"{t.family}: {cls.__module__}.{fname}{tuple(names)} differs from the supported "
                            f"{fname}{expected}: {diff}")
            continue
        plan.append((module, fname, t.function_makers[fname](fn)))
    return plan


def apply(target=None, families=None, *, strict=True):
    """Install our kernels into the plugin's model classes.

    Args:
        target: None (the installed plugin's registry, ``vllm_neuron.model.registry``), a model instance
            (nn.Module), the registry or a modeling module (e.g. ``vllm_neuron.model.qwen3_5.model``), a class,
            or a list of these.
        families: subset of ("deltanet", "attention", "moe"); None: every family with a hookable class.
        strict: raise VllmNeuronAdapterError on any contract difference (nothing installed); False installs the
            classes that match and skips the rest (listed in the returned Installation's ``skipped``).
    Returns:
        Installation (``.installed``, ``.restore()``, usable as a context manager).
    """
    if isinstance(families, str):
        families = (families,)
    unknown = [f for f in (families or ()) if f not in FAMILIES]
    if unknown:
        raise VllmNeuronAdapterError(f"apply(): unknown families {unknown}; choose from {FAMILIES}")
    wanted = tuple(families) if families is not None else FAMILIES
    classes, instances = _collect(target)

    problems, plans, found = [], [], set()
    for t in TARGETS:
        if t.family not in wanted:
            continue
        for cls in [c for c in classes if _matches(c, t.class_name)]:
            found.add(t.family)
            local = []
            plan = _check_class(t, cls, local)
            for inst in instances:
                if isinstance(inst, cls):
                    missing = missing_attrs(inst, t.attrs, t.attr_group)
                    if missing:
                        local.append(f"{t.family}: {cls.__name__} instance has no attribute(s) {missing} that the "
                                     "adapter reads")
                        break
            problems += local
            if not local or not strict:
                plans += [p for p in plan if (p[0], p[1]) not in [(q[0], q[1]) for q in plans]]
    names = sorted({t.class_name for t in TARGETS if t.family in wanted})
    if not found:
        raise VllmNeuronAdapterError(
            f"apply(): no hookable layer found (looked for {names} and their subclasses) in "
            f"{type(target).__name__ if target is not None else 'the plugin registry'}; supported: {PLUGIN_COMMITS}")
    missing_families = [f for f in wanted if f not in found and families is not None]
    if missing_families:
        problems.append(f"no hookable layer for {missing_families} (looked for {names})")
    inst = Installation(skipped=list(problems))
    if problems and strict:
        raise VllmNeuronAdapterError("apply() refused, nothing was installed:\n  - " + "\n  - ".join(problems)
                                     + f"\nSupported plugin source: {PLUGIN_COMMITS}")
    from nki_kernels import torch_ops
    torch_ops.register()
    try:
        for owner, attr, value in plans:
            inst._set(owner, attr, value)
            fam = getattr(value, MARK)
            inst.installed.setdefault(fam, []).append(f"{getattr(owner, '__name__', owner)}.{attr}")
    except BaseException:
        inst.restore()                   # all or nothing
        raise
    return inst
