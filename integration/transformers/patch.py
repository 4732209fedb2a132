"""`patch(model, kernels=..., backend=...)`: route a loaded transformers model to our kernels, reversibly.

    from integration.transformers import patch
    with patch(model, backend="emulator") as handle:     # or: handle = patch(model); ...; handle.restore()
        out = model.generate(**inputs)
    print(handle.report())

What is changed (and put back exactly by `restore()`):
  attention      `AttentionInterface` + `AttentionMaskInterface` key "nki_kernels" (sdpa_mask), selected by
                 setting `_attn_implementation` on the configs of the patched attention modules; the gated
                 attention of Qwen3.5 / Qwen3-Next also gets an instance-level forward that fuses the sigmoid
                 output gate into the kernel call.
  deltanet       the module-level gated-delta-rule and causal-conv1d functions in every modeling module that
                 defines them (process-wide, reference counted) + a forward pre-hook / forward hook pair on each
                 GDN layer of this model that activates our kernels while it runs (module hooks survive the
                 `kernelize` that transformers >= 5.25 re-runs on train() / eval(); deltanet.py).
  moe            `ExpertsInterface` key "nki_kernels", selected by `_experts_implementation` on the experts'
                 configs; the shared-expert blocks get an instance-level forward that fuses the shared expert
                 and its sigmoid gate into the kernel call.
  code_predictor the Qwen3-Omni talker's `code_predictor.generate` instance attribute.
  encoders       the Qwen3-Omni vision / audio encoder attention: `AttentionInterface` key "nki_flash_varlen"
                 selected on the encoder configs (transformers then passes the packed windows' cu_seqlens), one
                 `flash_attention_varlen` launch per encoder layer (encoder_attention.py).
"""
from __future__ import annotations

import inspect
import weakref

from . import attention as _attn
from . import code_predictor as _cp
from . import deltanet as _gdn
from . import encoder_attention as _enc
from . import moe as _moe
from ._common import BACKENDS, DEEPCOPY_REFUSED, Kernels, Stats

KERNEL_FAMILIES = ("attention", "deltanet", "moe", "code_predictor", "encoders")
SUPPORTED_FAMILIES = ("qwen3_5_moe", "qwen3_5", "qwen3_next", "qwen3_omni_moe")

# modeling module (family) -> class names of the modules each hook handles
_ATTENTION_CLASSES = {
    "Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention",                       # gated, head_dim 256
    "Qwen3OmniMoeThinkerTextAttention", "Qwen3OmniMoeTalkerCodePredictorAttention",       # plain
}
_GATED_ATTENTION_CLASSES = {"Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention"}
_GDN_CLASSES = {"Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet"}
_EXPERTS_CLASSES = {"Qwen3NextExperts", "Qwen3_5MoeExperts", "Qwen3OmniMoeThinkerTextExperts",
                    "Qwen3OmniMoeTalkerTextExperts"}
_SHARED_MOE_BLOCK_CLASSES = {"Qwen3NextSparseMoeBlock", "Qwen3_5MoeSparseMoeBlock",
                             "Qwen3OmniMoeTalkerTextSparseMoeBlock"}
_TALKER_CLASSES = {"Qwen3OmniMoeTalkerForConditionalGeneration"}
_ENCODER_CLASSES = set(_enc.ENCODER_MODULES)

_HANDLE_ATTR = "_nki_kernels_patch"
_ACTIVE_HANDLES: "weakref.WeakSet[PatchHandle]" = weakref.WeakSet()   # to find patches of overlapping modules


def _family(module) -> str | None:
    parts = type(module).__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models" and parts[2] in SUPPORTED_FAMILIES:
        return parts[2]
    return None


class PatchHandle:
    """What `patch()` changed on one model; `restore()` (or leaving the `with` block) undoes all of it."""

    def __init__(self, model, kernels, backend):
        self.model = model
        self.kernel_families = tuple(kernels)
        self.backend = backend
        self.kernels = Kernels(backend)
        self.stats = Stats()
        self.families = set()
        self.active = False
        self.not_available: dict[str, str] = {}     # kernel family -> why its hook keeps the model's own code
        self.patched: dict[str, int] = {}           # what -> number of modules patched
        self._undo = []                             # callables run in reverse order by restore()
        self._module_ids = frozenset(id(m) for m in model.modules())   # the modules this patch may touch
        self._claims = 1                            # patch() calls that returned this handle, minus `with` exits

    # --------------------------------------------------------------------------------------------------
    def _set_attr(self, obj, name, value):
        had = name in vars(obj)
        old = vars(obj).get(name)
        # plain attribute even on nn.Modules (bypasses their __setattr__ bookkeeping for modules/parameters)
        object.__setattr__(obj, name, value)

        def undo():
            if had:
                object.__setattr__(obj, name, old)
            else:
                try:
                    object.__delattr__(obj, name)
                except AttributeError:
                    pass
        self._undo.append(undo)

    def _set_config(self, config, name, value):
        old = getattr(config, name)
        setattr(config, name, value)
        self._undo.append(lambda: setattr(config, name, old))

    def _count(self, what, n=1):
        self.patched[what] = self.patched.get(what, 0) + n

    # --------------------------------------------------------------------------------------------------
    def restore(self):
        """Put back every function, config value and forward this handle changed. Safe to call twice."""
        if not self.active:
            return
        while self._undo:
            self._undo.pop()()
        self.active = False
        _ACTIVE_HANDLES.discard(self)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            object.__delattr__(self.model, _HANDLE_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # a `with patch(model)` on an already patched model got the active handle back: leaving the block
        # gives back that claim only, and the patch made before it stays
        self._claims -= 1
        if self._claims <= 0:
            self.restore()
        return False

    def __deepcopy__(self, memo):
        raise TypeError(DEEPCOPY_REFUSED)

    def calls(self) -> dict:
        """{kernel name: launches} since patching (or the last `reset_counts()`)."""
        return dict(self.stats.calls)

    def family_calls(self) -> dict:
        """{patch family: {kernel name: launches}}: which hook launched what (the encoders and the text
        attention's packed path both launch flash_attention_varlen)."""
        out: dict = {}
        for (fam, kernel), n in sorted(self.stats.family_calls.items()):
            out.setdefault(fam, {})[kernel] = n
        return out

    def fallbacks(self) -> dict:
        """{(hook, reason): times the model's own code ran instead}."""
        return dict(self.stats.fallbacks)

    def reset_counts(self):
        self.stats.reset()

    def record_launches(self, on: bool = True):
        """Keep every emulated launch (for `modeled()`); emulator backend only. Traces use memory: turn it off
        (`record_launches(False)`) after the part you want to model."""
        if self.backend != "emulator":
            raise RuntimeError(f"record_launches: needs backend='emulator', got {self.backend!r}")
        self.kernels.record = {} if on else None

    def modeled(self, target: str = "trn2") -> dict:
        """{kernel name: cost-model report (modeled, not measured) of the launches recorded since
        `record_launches()`}."""
        from nki_kernels.emulator.costmodel import model_launches
        rec = self.kernels.record or {}
        return {name: model_launches(runs, target=target) for name, runs in sorted(rec.items()) if runs}

    def report(self) -> str:
        lines = [f"nki-kernels patch of {type(self.model).__name__} (families: {', '.join(sorted(self.families))}; "
                 f"backend={self.backend}; {'active' if self.active else 'restored'})"]
        for what, n in sorted(self.patched.items()):
            lines.append(f"  patched {what}: {n}")
        for fam, why in sorted(self.not_available.items()):
            lines.append(f"  {fam}: not available ({why}); the model's own code runs")
        calls = self.calls()
        lines.append("  kernel calls: " + (", ".join(f"{k}={v}" for k, v in sorted(calls.items())) or "none"))
        for fam, per in self.family_calls().items():
            lines.append(f"    {fam}: " + ", ".join(f"{k}={v}" for k, v in per.items()))
        for (hook, why), n in sorted(self.fallbacks().items()):
            lines.append(f"  fallback {hook}: {why} x{n}")
        if not self.fallbacks():
            lines.append("  fallbacks: none")
        return "\n".join(lines)

    def __repr__(self):
        return self.report()


def _accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def patch(model, kernels=KERNEL_FAMILIES, backend="emulator") -> PatchHandle:
    """Route `model`'s attention, gated DeltaNet, MoE experts, (Qwen3-Omni talker) code predictor and (Qwen3-Omni)
    vision / audio encoder attention to our kernels.

    Args:
        model: a transformers model of family qwen3_5_moe, qwen3_5, qwen3_next or qwen3_omni_moe (a whole
            model, a text model, the Omni thinker or talker, ...).
        kernels: which hooks to install, any of "attention", "deltanet", "moe", "code_predictor", "encoders".
        backend: "emulator" (NumPy NKI emulator), "nki" (real NKI runtime) or "reference" (float64 NumPy
            references of the kernels).
    Returns:
        PatchHandle: `restore()`, context manager, `calls()`, `fallbacks()`, `report()`.
    Raises:
        ValueError: unknown kernel family or backend, or a model with none of the supported modules.
    Patching an already patched model with the same arguments returns the active handle (leaving a `with`
    block over that call keeps the earlier patch); with different arguments the previous patch is restored
    first. An active patch of a submodule of `model` is restored first too (this patch covers it); patching
    a module inside an already patched model raises ValueError (use or restore that model's handle).
    """
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    bad = [k for k in kernels if k not in KERNEL_FAMILIES]
    if bad:
        raise ValueError(f"patch: unknown kernels {bad}; choose from {KERNEL_FAMILIES}")
    if backend not in BACKENDS:
        raise ValueError(f"patch: backend must be one of {BACKENDS}, got backend={backend!r}")
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("patch: needs torch and transformers (pip install 'nki-kernels[hf]')") from exc
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"patch: expected a transformers model (torch.nn.Module), got {type(model).__name__}")

    prev = getattr(model, _HANDLE_ATTR, None)
    if prev is not None and prev.active:
        if prev.kernel_families == kernels and prev.backend == backend:
            prev._claims += 1
            return prev
        prev.restore()
    _release_overlapping(model)

    found = {}
    for m in model.modules():
        fam = _family(m)
        if fam is not None:
            found.setdefault(fam, set()).add(type(m).__name__)
    hookable = (_ATTENTION_CLASSES | _GDN_CLASSES | _EXPERTS_CLASSES | _TALKER_CLASSES | _ENCODER_CLASSES)
    if not any(names & hookable for names in found.values()):
        cfg = getattr(model, "config", None)
        raise ValueError(
            f"patch: unsupported model {type(model).__name__} (model_type={getattr(cfg, 'model_type', None)!r}, "
            f"module {type(model).__module__}); supported families are {SUPPORTED_FAMILIES} and no attention, "
            f"gated-DeltaNet, MoE-experts, talker or encoder-attention module of theirs was found in it")

    handle = PatchHandle(model, kernels, backend)
    handle.families = set(found)
    ks = handle.kernels
    try:
        if "attention" in kernels:
            _patch_attention(handle, model, ks)
        if "deltanet" in kernels:
            _patch_deltanet(handle, model, ks)
        if "moe" in kernels:
            _patch_moe(handle, model, ks)
        if "code_predictor" in kernels:
            _patch_code_predictor(handle, model, ks)
        if "encoders" in kernels:
            _patch_encoders(handle, model, ks)
    except BaseException:
        handle.active = True
        handle.restore()
        raise
    handle.active = True
    _ACTIVE_HANDLES.add(handle)
    object.__setattr__(model, _HANDLE_ATTR, handle)
    return handle


def _release_overlapping(model):
    """Restore active patches of submodules of `model`; refuse when `model` sits inside a patched model.

    Two handles over overlapping modules would each record the other's changes as the state to put back, so
    restoring them out of order would leave the model half patched (configs pointing at an unregistered
    attention key: silently wrong masks)."""
    ids = {id(m) for m in model.modules()}
    for other in list(_ACTIVE_HANDLES):
        if not other.active or other.model is model or not (other._module_ids & ids):
            continue
        if id(other.model) in ids:
            other.restore()
        else:
            raise ValueError(f"patch: this {type(model).__name__} is part of a {type(other.model).__name__} that is "
                             f"already patched; use that patch, or restore() it before patching a part of it")


# ------------------------------------------------------------------ per-hook installation


def _patch_attention(handle, model, ks):
    mods = [m for m in model.modules() if type(m).__name__ in _ATTENTION_CLASSES and _family(m)]
    if not mods:
        return
    if ks.get("flash_attention") is None:
        handle.not_available["attention"] = ks.missing.get("flash_attention", "flash_attention missing")
        return
    _attn.register()
    handle._undo.append(_attn.unregister)
    hook = _attn.AttentionHook(ks, handle.stats)
    configs = {}
    for m in mods:
        handle._set_attr(m, "_nki_attention_hook", hook)
        configs[id(m.config)] = m.config
        if type(m).__name__ in _GATED_ATTENTION_CLASSES and hook.fuse_gate:
            handle._set_attr(m, "_nki_stock_forward", m.forward)
            handle._set_attr(m, "forward", _attn.gated_attention_forward.__get__(m, type(m)))
            handle._count("gated attention forward (fused output gate)")
    # the configs the decoder models build their masks from are the same objects as their layers' configs
    for cfg in configs.values():
        handle._set_config(cfg, "_attn_implementation_internal", _attn.ATTN_KEY)
    handle._count("attention modules", len(mods))


def _patch_deltanet(handle, model, ks):
    layers = [m for m in model.modules() if type(m).__name__ in _GDN_CLASSES]
    if not layers:
        return
    names = ("gated_delta_rule", "gated_delta_rule_step", "causal_conv1d", "causal_conv1d_update")
    missing = [n for n in names if ks.get(n) is None]
    if missing:
        handle.not_available["deltanet"] = "; ".join(dict.fromkeys(ks.missing.get(n, n) for n in missing))
        if len(missing) == len(names):
            return
    _gdn.install()
    handle._undo.append(_gdn.uninstall)
    hook = _gdn.DeltaNetHook(ks, handle.stats)
    for layer in layers:
        for hook_handle in _gdn.activate_during_forward(layer, hook):
            handle._undo.append(hook_handle.remove)
    handle._count("gated-DeltaNet layers", len(layers))


def _patch_moe(handle, model, ks):
    experts = [m for m in model.modules() if type(m).__name__ in _EXPERTS_CLASSES]
    if not experts:
        return
    if ks.get("moe_decode") is None and ks.get("moe_blockwise") is None:
        handle.not_available["moe"] = "; ".join(dict.fromkeys(ks.missing.get(n, n)
                                                              for n in ("moe_decode", "moe_blockwise")))
        return
    _moe.register()
    handle._undo.append(_moe.unregister)
    hook = _moe.MoEHook(ks, handle.stats)
    configs = {}
    for e in experts:
        handle._set_attr(e, "_nki_moe_hook", hook)
        configs[id(e.config)] = e.config
    for cfg in configs.values():
        handle._set_config(cfg, "_experts_implementation_internal", _moe.EXPERTS_KEY)
    handle._count("experts modules", len(experts))
    fuse = all(_accepts(ks.get(n), "shared") for n in ("moe_decode", "moe_blockwise") if ks.get(n) is not None)
    if fuse:
        for blk in model.modules():
            if type(blk).__name__ in _SHARED_MOE_BLOCK_CLASSES:
                handle._set_attr(blk, "_nki_stock_forward", blk.forward)
                handle._set_attr(blk, "_nki_moe_hook", hook)
                handle._set_attr(blk, "forward", _moe.shared_expert_block_forward.__get__(blk, type(blk)))
                handle._count("sparse-MoE blocks (fused shared expert)")


def _patch_code_predictor(handle, model, ks):
    talkers = [m for m in model.modules() if type(m).__name__ in _TALKER_CLASSES]
    if not talkers:
        return
    if ks.get("code_predictor") is None:
        handle.not_available["code_predictor"] = ks.missing.get("code_predictor", "code_predictor missing")
        return
    for t in talkers:
        cp = t.code_predictor
        hook = _cp.CodePredictorHook(ks, handle.stats, cp)
        handle._set_attr(cp, "generate", hook)
        handle._count("talker code predictors")


def _patch_encoders(handle, model, ks):
    mods = [m for m in model.modules() if type(m).__name__ in _ENCODER_CLASSES and _family(m)]
    if not mods:
        return
    if ks.get("flash_attention_varlen") is None:
        handle.not_available["encoders"] = ks.missing.get("flash_attention_varlen", "flash_attention_varlen missing")
        return
    _enc.register()
    hook = _enc.EncoderAttentionHook(ks, handle.stats)
    configs = {}
    for m in mods:
        handle._set_attr(m, _enc.HOOK_ATTR, hook)
        configs[id(m.config)] = m.config
    for cfg in configs.values():
        handle._set_config(cfg, "_attn_implementation_internal", _enc.ENCODER_ATTN_KEY)
    handle._count("encoder attention modules (vision / audio)", len(mods))
