"""Gated DeltaNet hook: replaces the module-level functions every GDN modeling module looks up at call time.

transformers' GDN layers call four module globals of their modeling file (shared/reference/transformers.md
section 4): `torch_chunk_gated_delta_rule` (prefill), `torch_recurrent_gated_delta_rule` (one cached token),
`causal_conv1d_fn` (prefill conv) and `causal_conv1d_update` (decode conv, updates the `[B, C, K]` conv state in
place). We assign our dispatchers to these names in EVERY `transformers.models.*.modeling_*` file that defines
them (pitfall P5) and put the originals back on restore.

The module globals are process-wide, but the patch is per model: `patch()` registers a forward pre-hook and an
always-called forward hook on each GDN layer of the patched model (`activate_during_forward`) so that, while the
layer runs, a context variable names the hook to use. Outside a patched layer (a stock model in the same process)
the dispatchers call the original functions. Module hooks, not an instance `forward`: transformers >= 5.25 loads
models with `use_kernels=True` by default and re-runs the `kernels` package's `kernelize` when `train()` / `eval()`
changes the mode, which deletes every instance-level `forward` of the hub-kernel layers (`Qwen3_5GatedDeltaNet`
is one) and would silently switch the kernels off; it leaves module hooks alone.

States stay where transformers keeps them: the recurrent state `[B, Hv, Dk, Dv]` fp32 and the conv state
`[B, conv_dim, K]` live in the model's cache object; the model reads them, passes them to these functions and
stores what they return (`update_recurrent_state`, in-place conv update), so generate() works unchanged.
"""
from __future__ import annotations

import contextvars
import importlib
import os
import threading

import numpy as np

from ._common import (DEEPCOPY_REFUSED, FORWARD_ONLY_REASON, kernel_input, kernel_refusals, needs_grad,
                      refusal_reason, to_torch)

FUNCTION_NAMES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                  "causal_conv1d_fn", "causal_conv1d_update")

# Chunk sizes the chunked kernel takes (issue 5); transformers asks for 64.
_CHUNK_SIZES = (64, 128)

_ACTIVE = contextvars.ContextVar("nki_kernels_gdn_hook", default=None)
_LOCK = threading.Lock()
_INSTALLED: dict[str, dict[str, object]] = {}   # module name -> {function name: original}
_REFCOUNT = [0]


def gdn_modules():
    """Names of the transformers modeling modules that define the gated-delta-rule functions (found by reading
    the source files, so no unrelated model gets imported)."""
    import transformers
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    names = []
    for fam in sorted(os.listdir(root)):
        path = os.path.join(root, fam, f"modeling_{fam}.py")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            src = f.read()
        if "def torch_chunk_gated_delta_rule" in src and "def torch_recurrent_gated_delta_rule" in src:
            names.append(f"transformers.models.{fam}.modeling_{fam}")
    return names


def _accepts(fn, name):
    import inspect
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _original(fn_name, module_name):
    return _INSTALLED[module_name][fn_name]


def _make_dispatchers(module_name):
    """Four functions with the stock signatures (explicit names, pitfall P3) bound to one modeling module."""

    def torch_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None,
                                     **kwargs):
        hook = _ACTIVE.get()
        orig = _original("torch_chunk_gated_delta_rule", module_name)
        if hook is not None:
            out = hook.guard("deltanet", hook.chunk, query, key, value, g, beta, chunk_size, initial_state,
                             output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, kwargs)
            if out is not None:
                return out
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        return orig(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=initial_state,
                    output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)

    def torch_recurrent_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                                         use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
        hook = _ACTIVE.get()
        orig = _original("torch_recurrent_gated_delta_rule", module_name)
        if hook is not None:
            out = hook.guard("deltanet", hook.step, query, key, value, g, beta, initial_state,
                             output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, kwargs)
            if out is not None:
                return out
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        return orig(query, key, value, g=g, beta=beta, initial_state=initial_state,
                    output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        hook = _ACTIVE.get()
        if hook is not None:
            out = hook.guard("conv1d", hook.conv, hidden_states, weight, bias, activation, kwargs)
            if out is not None:
                return out
        return _original("causal_conv1d_fn", module_name)(hidden_states, weight, bias, activation, **kwargs)

    def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
        hook = _ACTIVE.get()
        if hook is not None:
            out = hook.guard("conv1d", hook.conv_update, hidden_states, conv_state, weight, bias, activation,
                             kwargs)
            if out is not None:
                return out
        return _original("causal_conv1d_update", module_name)(hidden_states, conv_state, weight, bias, activation,
                                                              **kwargs)

    fns = dict(torch_chunk_gated_delta_rule=torch_chunk_gated_delta_rule,
               torch_recurrent_gated_delta_rule=torch_recurrent_gated_delta_rule,
               causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update)
    for f in fns.values():
        f._nki_kernels_dispatcher = True
    return fns


def install():
    """Assign the dispatchers in every GDN modeling module (reference counted: nested patches are harmless)."""
    with _LOCK:
        _REFCOUNT[0] += 1
        if _REFCOUNT[0] > 1:
            return
        for name in gdn_modules():
            mod = importlib.import_module(name)
            originals = {fn: getattr(mod, fn) for fn in FUNCTION_NAMES if hasattr(mod, fn)}
            _INSTALLED[name] = originals
            for fn, disp in _make_dispatchers(name).items():
                if fn in originals:
                    setattr(mod, fn, disp)


def uninstall():
    """Put the original functions back once the last active patch is restored."""
    with _LOCK:
        if _REFCOUNT[0] == 0:
            return
        _REFCOUNT[0] -= 1
        if _REFCOUNT[0] > 0:
            return
        for name, originals in _INSTALLED.items():
            mod = importlib.import_module(name)
            for fn, orig in originals.items():
                setattr(mod, fn, orig)
        _INSTALLED.clear()


def originals():
    """{module name: {function name: original}} while installed (for tests)."""
    return {k: dict(v) for k, v in _INSTALLED.items()}


class _LayerActivation:
    """The pair of module hooks that names `hook` in the context variable while one GDN layer's forward runs.

    The pre-hook sets it, the forward hook (registered with `always_call=True`, so it also runs when the forward
    raises) resets it; tokens are kept per thread, so concurrent forwards of the same layer do not mix."""

    def __init__(self, hook):
        self.hook = hook
        self._local = threading.local()

    def _tokens(self):
        tokens = getattr(self._local, "tokens", None)
        if tokens is None:
            tokens = self._local.tokens = []
        return tokens

    def before(self, module, args):
        self._tokens().append(_ACTIVE.set(self.hook))

    def after(self, module, args, output):
        tokens = self._tokens()
        if tokens:
            _ACTIVE.reset(tokens.pop())

    def __deepcopy__(self, memo):
        # reached through the hooks of a patched model's GDN layers
        raise TypeError(DEEPCOPY_REFUSED)


def activate_during_forward(layer, hook):
    """Register the hooks that activate `hook` while `layer` runs; returns their removable handles (the caller
    removes them on restore)."""
    act = _LayerActivation(hook)
    pre = layer.register_forward_pre_hook(act.before)
    post = layer.register_forward_hook(act.after, always_call=True)
    return pre, post


class DeltaNetHook:
    """Runs the gated-delta-rule and conv kernels on the tensors transformers hands over."""

    def __init__(self, kernels, stats):
        self.kernels = kernels
        self.stats = stats

    def guard(self, hook_name, fn, *args):
        """fn(*args), or None (the original function runs) when a kernel wrapper refuses the inputs."""
        if needs_grad(*args[:5]):
            self.stats.fell_back(hook_name, FORWARD_ONLY_REASON)
            return None
        try:
            return fn(*args)
        except kernel_refusals() as exc:
            self.stats.fell_back(hook_name, refusal_reason(exc))
            return None

    def _k(self, name, hook_name):
        fn = self.kernels.get(name)
        if fn is None:
            self.stats.fell_back(hook_name, f"{name} not available")
        return fn

    # prefill ------------------------------------------------------------------------------------------------
    def chunk(self, query, key, value, g, beta, chunk_size, initial_state, output_final_state, l2norm, cu_seqlens,
              kwargs):
        import torch
        if cu_seqlens is not None:
            return self._packed_chunk(query, key, value, g, beta, chunk_size, initial_state, output_final_state,
                                      l2norm, cu_seqlens)
        B, T, Hk, Dk = key.shape
        Hv, Dv = value.shape[-2:]
        if T == 0:
            return _empty_chunk(query, B, Hv, Dk, Dv, initial_state, output_final_state)
        fn = self._k("gated_delta_rule", "deltanet")
        if fn is None:
            return None
        be = self.kernels.backend
        init = None
        if initial_state is not None:
            init = initial_state.to(torch.float32)
        o, final = fn(kernel_input(query, be), kernel_input(key, be), kernel_input(value, be),
                      kernel_input(g.to(torch.float32), be), kernel_input(beta, be),
                      chunk_size=chunk_size if chunk_size in _CHUNK_SIZES else _CHUNK_SIZES[0],
                      initial_state=None if init is None else kernel_input(init, be), output_final_state=True,
                      use_qk_l2norm_in_kernel=bool(l2norm))
        self.stats.called("gated_delta_rule")
        o = to_torch(o, like=query)
        final = to_torch(final, dtype=torch.float32) if output_final_state else None
        return o, final

    def _packed_chunk(self, query, key, value, g, beta, chunk_size, initial_state, output_final_state, l2norm,
                      cu_seqlens):
        """Packed prefill (transformers passes `cu_seq_lens_q` as cu_seqlens, B = 1): one launch of
        `gated_delta_rule(..., cu_seqlens=)` on the packed row as it is (each sequence from a zero state, nothing
        leaks between sequences; stock's torch function cannot keep them apart). A function without `cu_seqlens`
        (the float64 references) or a refused packed launch (recorded in fallbacks) runs the sequences unpacked
        to a right-padded [N, Lmax] batch with valid_lengths instead."""
        import torch
        why = _packed_unsupported(query, cu_seqlens, initial_state, output_final_state)
        if why is not None:
            self.stats.fell_back("deltanet", why)
            return None
        fn = self._k("gated_delta_rule", "deltanet")
        if fn is None:
            return None
        be = self.kernels.backend
        args = dict(chunk_size=chunk_size if chunk_size in _CHUNK_SIZES else _CHUNK_SIZES[0],
                    output_final_state=False, use_qk_l2norm_in_kernel=bool(l2norm))
        if _accepts(fn, "cu_seqlens"):
            cu = torch.as_tensor(cu_seqlens).detach().cpu().to(torch.int32)
            try:
                o, _ = fn(kernel_input(query, be), kernel_input(key, be), kernel_input(value, be),
                          kernel_input(g.to(torch.float32), be), kernel_input(beta, be),
                          cu_seqlens=kernel_input(cu, be), **args)
                self.stats.called("gated_delta_rule")
                return to_torch(o, like=query), None
            except kernel_refusals() as exc:
                self.stats.fell_back("deltanet", f"packed launch: {refusal_reason(exc)}; ran unpacked")
        index, lens = _unpack_index(cu_seqlens)
        unpack = lambda t: t[0][index]                  # noqa: E731  [1, T, ...] -> [N, Lmax, ...] (pads: token 0)
        o, _ = fn(kernel_input(unpack(query), be), kernel_input(unpack(key), be), kernel_input(unpack(value), be),
                  kernel_input(unpack(g.to(torch.float32)), be), kernel_input(unpack(beta), be),
                  valid_lengths=kernel_input(lens, be), **args)
        self.stats.called("gated_delta_rule")
        o = to_torch(o, like=query)
        return _repack(o, index, lens, query.shape[1]), None

    # decode step --------------------------------------------------------------------------------------------
    def step(self, query, key, value, g, beta, initial_state, output_final_state, l2norm, cu_seqlens, kwargs):
        import torch
        if cu_seqlens is not None:
            self.stats.fell_back("deltanet", "packed (varlen) sequences")
            return None
        fn = self._k("gated_delta_rule_step", "deltanet")
        if fn is None:
            return None
        be = self.kernels.backend
        B = key.shape[0]
        Hv, Dv = value.shape[-2:]
        Dk = key.shape[-1]
        if initial_state is None:
            pool = torch.zeros((B, Hv, Dk, Dv), dtype=torch.float32)
        else:
            pool = initial_state.detach().to(torch.float32).clone().contiguous()
        slots = torch.arange(B, dtype=torch.int32)
        if be == "reference":
            pool_np = pool.numpy().astype(np.float64)
            o = fn(kernel_input(query, be), kernel_input(key, be), kernel_input(value, be),
                   kernel_input(g.to(torch.float32), be), kernel_input(beta, be), pool_np, slots.numpy(),
                   use_qk_l2norm_in_kernel=bool(l2norm))
            if isinstance(o, tuple):
                o, pool_np = o[0], o[1] if o[1] is not None and np.shape(o[1]) == pool_np.shape else pool_np
            pool = torch.from_numpy(np.asarray(pool_np, dtype=np.float32))
        else:
            o = fn(query.contiguous(), key.contiguous(), value.contiguous(), g.to(torch.float32).contiguous(),
                   beta.contiguous(), pool, slots, use_qk_l2norm_in_kernel=bool(l2norm))
            if isinstance(o, tuple):
                o = o[0]
        self.stats.called("gated_delta_rule_step")
        return to_torch(o, like=query), (pool if output_final_state else None)

    # conv ---------------------------------------------------------------------------------------------------
    def _conv_supported(self, bias, activation):
        if bias is not None:
            return "conv1d with bias"
        if activation not in ("silu", "swish", None):
            return f"conv1d activation {activation!r}"
        return None

    def conv(self, x, weight, bias, activation, kwargs):
        why = self._conv_supported(bias, activation)
        cu = kwargs.get("cu_seq_lens_q")
        if why is None and kwargs.get("seq_idx") is not None:
            why = "packed sequences given as seq_idx"
        if why is None and cu is not None:
            why = _packed_unsupported(x.transpose(1, 2), cu, None, False)
        if why is not None:
            self.stats.fell_back("conv1d", why)
            return None
        fn = self._k("causal_conv1d", "conv1d")
        if fn is None:
            return None
        be = self.kernels.backend
        act = None if activation is None else "silu"
        w = kernel_input(weight.detach().to(x.dtype), be)
        if cu is None:
            y = fn(kernel_input(x, be), w, activation=act)
        else:
            y = self._packed_conv(fn, x, w, act, cu)
        if isinstance(y, tuple):
            y = y[0]
        self.stats.called("causal_conv1d")
        return to_torch(y, like=x)

    def _packed_conv(self, fn, x, w, act, cu):
        """Packed conv x [1, C, T]: `causal_conv1d(..., cu_seqlens=)` on the packed row (each sequence from a zero
        conv state); a function without `cu_seqlens` (the references) or a refused packed launch (recorded)
        runs the sequences unpacked to [N, C, Lmax] with valid lengths, packed back."""
        import torch
        be = self.kernels.backend
        if _accepts(fn, "cu_seqlens"):
            cu32 = torch.as_tensor(cu).detach().cpu().to(torch.int32)
            try:
                return fn(kernel_input(x, be), w, activation=act, cu_seqlens=kernel_input(cu32, be))
            except kernel_refusals() as exc:
                self.stats.fell_back("conv1d", f"packed launch: {refusal_reason(exc)}; ran unpacked")
        index, lens = _unpack_index(cu)
        y = fn(kernel_input(x[0][:, index].permute(1, 0, 2).contiguous(), be), w, activation=act,
               valid_lengths=kernel_input(lens, be))
        y = to_torch(y[0] if isinstance(y, tuple) else y, like=x)
        return _repack(y.transpose(1, 2), index, lens, x.shape[2]).transpose(1, 2)

    def conv_update(self, x, conv_state, weight, bias, activation, kwargs):
        import torch
        why = self._conv_supported(bias, activation)
        if why is not None:
            self.stats.fell_back("conv1d", why)
            return None
        fn = self._k("causal_conv1d_update", "conv1d")
        if fn is None:
            return None
        be = self.kernels.backend
        state = conv_state.detach().clone().contiguous()
        if be == "reference":
            st = state.float().numpy().astype(np.float64)
            res = fn(kernel_input(x, be), st, kernel_input(weight.detach(), be),
                     activation=None if activation is None else "silu")
        else:
            st = state
            res = fn(x.contiguous(), st, weight.detach().to(x.dtype).contiguous(),
                     activation=None if activation is None else "silu")
        if isinstance(res, tuple):
            y, new_state = res[0], res[1]
        else:
            y, new_state = res, st
        with torch.no_grad():
            conv_state.copy_(to_torch(new_state, like=conv_state))
        self.stats.called("causal_conv1d_update")
        return to_torch(y, like=x)


def _empty_chunk(query, B, Hv, Dk, Dv, initial_state, output_final_state):
    """A chunk call with no tokens: nothing to launch. The output is [B, 0, Hv, Dv] in the query dtype and the state
    goes through unchanged (fp32; zeros without an initial state), as transformers' torch function returns it.

    transformers >= 5.25 makes this call when a cache records its past for assisted decoding: the GDN forward runs
    its last `recurrent_states_to_keep` tokens one step at a time (to keep every intermediate state for a later
    `crop`) and only the tokens before them through the chunked function, which can be none of them."""
    import torch
    out = query.new_zeros((B, 0, Hv, Dv))
    if not output_final_state:
        return out, None
    if initial_state is None:
        return out, torch.zeros((B, Hv, Dk, Dv), dtype=torch.float32, device=query.device)
    return out, initial_state.detach().to(torch.float32).clone()


# ------------------------------------------------------------------ packed sequences (cu_seq_lens_q)


def _packed_unsupported(x, cu_seqlens, initial_state, output_final_state):
    """Why a packed call ([1, T, ...] with cu_seqlens) cannot go to the kernels, or None."""
    import torch
    if x.shape[0] != 1:
        return f"packed sequences need batch 1, got B={x.shape[0]}"
    if initial_state is not None or output_final_state:
        return "packed sequences with a cache (one state per sequence is not what the cache holds)"
    cu = torch.as_tensor(cu_seqlens).detach().cpu().to(torch.int64)
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != x.shape[1] or bool((cu.diff() < 0).any()):
        return f"cu_seq_lens_q {cu.tolist()} does not describe the {x.shape[1]} packed tokens"
    return None


def _unpack_index(cu_seqlens):
    """(index [N, Lmax] into the packed tokens, pads pointing at their sequence's first token (or token 0),
    lens [N] int32) for a valid cu_seqlens."""
    import torch
    cu = torch.as_tensor(cu_seqlens).detach().cpu().to(torch.int64)
    lens = cu.diff()
    lmax = max(1, int(lens.max()))
    pos = torch.arange(lmax)[None, :]
    index = torch.where(pos < lens[:, None], cu[:-1, None] + pos, cu[:-1, None].clamp(max=int(cu[-1]) - 1))
    return index, lens.to(torch.int32)


def _repack(y, index, lens, total):
    """[N, Lmax, ...] outputs back to [1, T, ...] at the packed positions (the padded rows dropped)."""
    import torch
    keep = torch.arange(index.shape[1])[None, :] < lens[:, None].to(torch.int64)
    out = y.new_zeros((total,) + tuple(y.shape[2:]))
    out[index[keep]] = y[keep]
    return out[None]
