"""NeuronGatedDeltaNet hook adapters: the contrib's layouts ([B, H, S, D] fp32, K heads expanded, g/beta zeroed on
padding, state [B, H, Dk, Dv]) against the float64 token-by-token reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels.testing import assert_close
from integration.nxdi import apply, AdapterInputError
from integration.nxdi import deltanet as nxgdn

from nxdi_fakes import make_deltanet_class

ref = pytest.importorskip("nki_kernels.deltanet.reference")


def _inputs(b, hk, group, s, d, seed=0, g_scale=1.0):
    """Contrib-side tensors: q/k with hk heads expanded to hv = hk * group *consecutive* heads, as forward does."""
    gen = torch.Generator().manual_seed(seed)
    hv = hk * group
    q = torch.randn(b, s, hk, d, generator=gen)
    k = torch.randn(b, s, hk, d, generator=gen)
    v = torch.randn(b, s, hv, d, generator=gen)
    g = -torch.rand(b, s, hv, generator=gen) * g_scale
    beta = torch.rand(b, s, hv, generator=gen)
    expand = lambda x: x.unsqueeze(3).expand(-1, -1, -1, group, -1).reshape(b, s, hv, d)   # noqa: E731
    hook = dict(query=expand(q).transpose(1, 2).contiguous(), key=expand(k).transpose(1, 2).contiguous(),
                value=v.transpose(1, 2).contiguous(), g=g.transpose(1, 2).contiguous(),
                beta=beta.transpose(1, 2).contiguous())
    return hook, (q, k, v, g, beta)


def _ref(fla, initial_state=None, valid_lengths=None):
    q, k, v, g, beta = (x.numpy() for x in fla)
    o, s = ref.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, use_qk_l2norm_in_kernel=True,
                                valid_lengths=valid_lengths)
    return o.transpose(0, 2, 1, 3), s            # -> [B, H, S, Dv]


@settings(max_examples=5)
@given(b=st.integers(1, 2), hk=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]), s=st.integers(1, 100),
       d=st.sampled_from([32, 64]), with_init=st.booleans())
def test_fused_chunked_forward_matches_reference(b, hk, group, s, d, with_init):
    hook, fla = _inputs(b, hk, group, s, d, seed=s)
    init = None
    if with_init:
        init = torch.randn(b, hk * group, d, d, generator=torch.Generator().manual_seed(1)) * 0.1
    out, state = nxgdn.chunked_forward(**hook, output_final_state=True, initial_state=init)
    ro, rs = _ref(fla, None if init is None else init.numpy())
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(hook["value"].shape)
    assert_close("o", ro, out.numpy())
    assert_close("state", rs, state.numpy())
    _, none_state = nxgdn.chunked_forward(**hook, output_final_state=False, initial_state=init)
    assert none_state is None


def test_padding_mask_convention_leaves_state_untouched():
    """forward zeroes g and beta on right-padded positions; the final state then equals the unpadded run."""
    hook, fla = _inputs(2, 2, 2, 90, 32, seed=4)
    lengths = [90, 57]
    valid = (torch.arange(90)[None, :] < torch.tensor(lengths)[:, None]).float()       # [B, S]
    hook["g"] = hook["g"] * valid[:, None, :]
    hook["beta"] = hook["beta"] * valid[:, None, :]
    out, state = nxgdn.chunked_forward(**hook, output_final_state=True)
    ro, rs = _ref(fla, valid_lengths=np.array(lengths))
    assert_close("state", rs, state.numpy())
    assert_close("valid rows b1", ro[1, :, :57], out[1, :, :57].numpy())
    assert_close("b0", ro[0], out[0].numpy())


def test_prefill_then_steps_equals_longer_prefill():
    hook, fla = _inputs(2, 2, 2, 67, 32, seed=9)
    n_pre = 64
    pre = {k: v[:, :, :n_pre] for k, v in hook.items()}
    _, state = nxgdn.chunked_forward(**pre, output_final_state=True)
    outs = []
    for t in range(n_pre, 67):
        step = {k: v[:, :, t:t + 1] for k, v in hook.items()}
        o, state = nxgdn.recurrent_step(**step, recurrent_state=state)
        assert tuple(o.shape) == (2, 4, 1, 32)
        outs.append(o)
    ro, rs = _ref(fla)
    assert_close("steps o", ro[:, :, n_pre:], torch.cat(outs, 2).numpy())
    assert_close("steps state", rs, state.numpy())


def test_step_accepts_speculative_tokens_and_rejects_more():
    hook, fla = _inputs(1, 1, 2, 4, 32, seed=2)
    state0 = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.2
    o, st_ = nxgdn.recurrent_step(**hook, recurrent_state=state0)
    ro, rs = _ref(fla, state0.numpy())
    assert_close("spec o", ro, o.numpy())
    assert_close("spec state", rs, st_.numpy())
    hook5, _ = _inputs(1, 1, 2, 5, 32)
    with pytest.raises(AdapterInputError, match="at most 4 tokens"):
        nxgdn.recurrent_step(**hook5, recurrent_state=state0)


def test_decay_to_zero_and_beta_extremes():
    hook, fla = _inputs(1, 2, 1, 40, 32, seed=6, g_scale=80.0)       # exp(g) underflows to 0
    hook["beta"][..., ::3] = 1.0
    hook["beta"][..., 1::3] = 0.0
    fla = list(fla)
    fla[4] = hook["beta"].transpose(1, 2).contiguous()
    out, state = nxgdn.chunked_forward(**hook, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    ro, rs = _ref(fla)
    assert_close("o", ro, out.numpy())
    assert_close("state", rs, state.numpy())


def test_repeated_identical_tokens():
    hook, fla = _inputs(1, 1, 1, 70, 32, seed=8)
    rep = {k: v[:, :, :1].expand_as(v).contiguous() for k, v in hook.items()}
    fla_rep = tuple(x[:, :1].expand_as(x).contiguous() for x in fla)
    out, state = nxgdn.chunked_forward(**rep, output_final_state=True)
    ro, rs = _ref(fla_rep)
    assert_close("o", ro, out.numpy())
    assert_close("state", rs, state.numpy())


def test_bad_shapes_raise():
    hook, _ = _inputs(1, 1, 1, 8, 32)
    bad = dict(hook, g=hook["g"][:, :, :4])
    with pytest.raises(AdapterInputError, match="g/beta"):
        nxgdn.chunked_forward(**bad)
    with pytest.raises(AdapterInputError, match="state"):
        nxgdn.recurrent_step(**{k: v[:, :, :1] for k, v in hook.items()}, recurrent_state=torch.zeros(1, 1, 32, 16))


def test_installed_hooks_and_fallback_for_wide_heads():
    cls = make_deltanet_class()
    with apply([cls], kernels=["deltanet"]) as inst:
        assert set(inst.installed["deltanet"]) == {f"NeuronGatedDeltaNet.{h}" for h in (
            "_fused_chunked_forward", "_recurrent_step", "_nki_recurrent_step", "_chunk_forward",
            "_sequential_forward")}
        mod = cls()
        hook, fla = _inputs(2, 2, 2, 20, 32, seed=1)
        out, state = mod._fused_chunked_forward(hook["query"], hook["key"], hook["value"], hook["g"], hook["beta"],
                                                output_final_state=True)
        o1, s1 = mod._recurrent_step(*(x[:, :, :1] for x in hook.values()), state)
        assert cls.calls == 0
        ro, rs = _ref(fla)
        assert_close("hook o", ro, out.numpy())
        # Dk = 256 is beyond the kernels: the contrib's own implementation runs instead
        wide, _ = _inputs(1, 1, 1, 3, 256)
        mod._fused_chunked_forward(*wide.values(), output_final_state=True)
        assert cls.calls == 1
        # and the recurrent_state_buffer parameter is untouched
        assert [n for n, _ in mod.named_parameters()] == ["recurrent_state_buffer"]


def test_signature_mismatch_is_reported():
    from integration.nxdi import NxDIAdapterError
    cls = make_deltanet_class(bad_signature=True)
    with pytest.raises(NxDIAdapterError, match=r"_recurrent_step\('q', 'k', 'v', 'state'\) does not match"):
        apply([cls], kernels=["deltanet"])
    assert "__nki_kernels_adapter__" not in dir(cls._fused_chunked_forward)      # nothing installed


def test_tp_sharded_heads_concatenate_to_full_layer():
    """TP shards the GDN heads (rank r: k heads [r*Hk/tp, ...) and their Hv/Hk v heads); heads are independent, so
    the ranks' outputs and states stacked along H are the full layer's."""
    hook, fla = _inputs(1, 2, 2, 45, 32, seed=12)          # Hk=2, Hv=4 -> TP=2: Hk=1, Hv=2 per rank
    outs, states = [], []
    for r in range(2):
        shard = {k: v[:, 2 * r:2 * r + 2] for k, v in hook.items()}
        o, s = nxgdn.chunked_forward(**shard, output_final_state=True)
        outs.append(o)
        states.append(s)
    ro, rs = _ref(fla)
    assert_close("tp o", ro, torch.cat(outs, 1).numpy())
    assert_close("tp state", rs, torch.cat(states, 1).numpy())


def test_state_carry_from_context_encoding_to_token_generation():
    """The contrib's carry: CTE writes each sequence's final state into recurrent_state_buffer[seq_ids]; TKG reads
    those rows, runs _recurrent_step and writes them back. Right-padded prompts (g, beta zeroed on padding) then
    one new token each must equal each sequence run alone on its valid tokens plus the new token."""
    hook, fla = _inputs(2, 1, 2, 30, 32, seed=21)
    lengths = [30, 19]
    valid = (torch.arange(30)[None, :] < torch.tensor(lengths)[:, None]).float()
    hook["g"] = hook["g"] * valid[:, None, :]
    hook["beta"] = hook["beta"] * valid[:, None, :]
    buffer = torch.zeros(4, 2, 32, 32)                       # max_batch_size 4 slots
    seq_ids = torch.tensor([3, 1])
    _, final = nxgdn.chunked_forward(**hook, output_final_state=True)
    buffer = buffer.index_copy(0, seq_ids, final)
    new_tok, new_fla = _inputs(2, 1, 2, 1, 32, seed=22)
    o, new_state = nxgdn.recurrent_step(**new_tok, recurrent_state=torch.index_select(buffer, 0, seq_ids))
    buffer = buffer.index_copy(0, seq_ids, new_state)
    for b in range(2):
        seq = tuple(torch.cat([x[b:b + 1, :lengths[b]], y[b:b + 1]], dim=1) for x, y in zip(fla, new_fla))
        ro, rs = _ref(seq)
        assert_close(f"tkg o {b}", ro[:, :, -1:], o[b:b + 1].numpy())
        assert_close(f"buffer row {b}", rs[0], buffer[int(seq_ids[b])].numpy())
    assert torch.all(buffer[0] == 0) and torch.all(buffer[2] == 0)     # other slots untouched


def test_kernel_limit_falls_back_to_original(monkeypatch):
    from nki_kernels.validation import KernelInputError

    def limited(*a, **k):
        raise KernelInputError("gated_delta_rule: Hv must be <= 512")
    monkeypatch.setattr(nxgdn, "kernel", lambda name, family: limited)
    cls = make_deltanet_class()
    with apply([cls], kernels="deltanet"):
        hook, fla = _inputs(1, 1, 2, 6, 32, seed=3)
        out, state = cls()._fused_chunked_forward(*hook.values(), output_final_state=True)
    assert cls.calls == 1
    ro, rs = _ref(fla)
    assert_close("fallback o", ro, out.numpy())


def test_every_hook_matches_the_unpatched_contrib():
    """Each hook the contrib routes through (CTE: _fused_chunked_forward, _chunk_forward, _sequential_forward; TKG:
    _recurrent_step with state.float(), _nki_recurrent_step with the bf16 buffer rows) gives, patched, what the
    unpatched class gives; the state round-trips through the bf16 recurrent_state_buffer as the contrib stores it."""
    cls = make_deltanet_class()
    hook, _ = _inputs(2, 1, 2, 21, 32, seed=31)
    step, _ = _inputs(2, 1, 2, 1, 32, seed=32)
    mod = cls(max_bs=2, num_v_heads=2)
    assert mod.recurrent_state_buffer.dtype == torch.bfloat16

    def run():
        res = {}
        for name in ("_fused_chunked_forward", "_chunk_forward", "_sequential_forward"):
            out, final = getattr(mod, name)(*hook.values(), output_final_state=True)
            res[name] = (out, final)
        buf = res["_fused_chunked_forward"][1].to(mod.recurrent_state_buffer.dtype)   # the contrib's stored rows
        res["_recurrent_step"] = mod._recurrent_step(*step.values(), buf.float())
        res["_nki_recurrent_step"] = mod._nki_recurrent_step(*step.values(), buf)
        return res

    before = run()
    calls = cls.calls
    with apply([cls], kernels="deltanet"):
        after = run()
    assert cls.calls == calls                          # every hook ran our kernels
    for name in before:
        (o0, s0), (o1, s1) = before[name], after[name]
        assert o1.shape == o0.shape and o1.dtype == o0.dtype
        tol = "bfloat16" if s0.dtype == torch.bfloat16 else "float32"    # the unpatched NKI step returns bf16 state
        assert_close(f"{name} o", o0.double().numpy(), o1.double().numpy())
        assert_close(f"{name} state", s0.double().numpy(), s1.double().numpy(), dtype=tol)


def test_drifted_optional_hook_is_refused():
    """An optional hook whose signature drifted is no longer skipped silently: apply() names class, method and
    difference, and installs nothing."""
    from integration.nxdi import NxDIAdapterError
    cls = make_deltanet_class(drifted_optional=True)
    with pytest.raises(NxDIAdapterError) as err:
        apply([cls], kernels="deltanet")
    assert ("NeuronGatedDeltaNet._sequential_forward('query', 'key', 'value', 'g', 'beta', 'initial_state', "
            "'output_final_state') does not match") in str(err.value)
    assert "parameter 6 is 'initial_state', expected 'output_final_state'" in str(err.value)
    assert not hasattr(cls._fused_chunked_forward, "__nki_kernels_adapter__")
    with apply([cls], kernels="deltanet", strict=False) as inst:     # non-strict: the rest, and the reason recorded
        assert "NeuronGatedDeltaNet._fused_chunked_forward" in inst.installed["deltanet"]
        assert any("_sequential_forward" in r for r in inst.skipped["deltanet"])


def test_decode_slot_ids_live_with_the_state(monkeypatch):
    """The decode adapter's slot_ids are created on the state's device (no host constant in a traced graph)."""
    seen = {}

    def fake_step(q, k, v, g, beta, pool, slot_ids, **kw):
        seen["device"], seen["dtype"] = slot_ids.device, slot_ids.dtype
        return torch.zeros(v.shape, dtype=q.dtype)
    monkeypatch.setattr(nxgdn, "kernel", lambda name, family: fake_step)
    step, _ = _inputs(2, 1, 1, 1, 32)
    state = torch.zeros(2, 1, 32, 32, device="meta")
    nxgdn.recurrent_step(**{k: v.to("meta") for k, v in step.items()}, recurrent_state=state)
    assert seen["device"].type == "meta" and seen["dtype"] == torch.int32


def test_nki_05_stack_keeps_the_contrib_prefill(monkeypatch):
    """On NxDI's last stack (SDK 2.31, NKI 0.5.0) gated_delta_rule cannot trace (trace-time generators need NKI
    0.7): apply() leaves the prefill hooks to the contrib, says so, and still installs the decode steps."""
    import sys
    apply_mod = sys.modules["integration.nxdi.apply"]
    monkeypatch.setattr(apply_mod, "nki_version", lambda: (0, 5))
    cls = make_deltanet_class()
    with apply([cls], kernels="deltanet") as inst:
        assert sorted(inst.installed["deltanet"]) == ["NeuronGatedDeltaNet._nki_recurrent_step",
                                                      "NeuronGatedDeltaNet._recurrent_step"]
        assert any("_fused_chunked_forward left to the contrib" in n and "NKI 0.5" in n
                   for n in inst.skipped["deltanet"])
    monkeypatch.setattr(apply_mod, "nki_version", lambda: (0, 7))
    with apply([cls], kernels="deltanet") as inst:
        assert "NeuronGatedDeltaNet._fused_chunked_forward" in inst.installed["deltanet"]
