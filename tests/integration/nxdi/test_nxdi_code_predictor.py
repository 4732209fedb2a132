"""UnifiedNeuronCodePredictor.forward adapter: the contrib's signature ([B, 1, H] in; codes [B, G1] int32 and
mid_hiddens [B, G1 - 1, H] out), weights read from the module's own parameters, against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nki_kernels

from nki_kernels.testing import assert_close
from integration.nxdi import AdapterInputError, apply, set_code_predictor_sampling
from integration.nxdi import code_predictor as nxcp

from nxdi_fakes import code_predictor_reference_weights, make_code_predictor_class

cp_ref = pytest.importorskip("nki_kernels.codepredictor.reference")


def _check_codes(codes, mod, past, last, **sampling):
    """Codes vs the float64 reference, teacher-forced on the adapter's codes so a single bf16 near-tie cannot
    cascade: each code is the reference's choice, or a candidate whose logit is within bf16 noise of it."""
    rcodes, _, logits = cp_ref.code_predictor_reference(past[:, 0].float().numpy(), last[:, 0].float().numpy(),
                                                        code_predictor_reference_weights(mod),
                                                        forced_codes=codes.numpy(), return_logits=True, **sampling)
    got = np.take_along_axis(logits, codes.numpy()[..., None].astype(np.int64), -1)[..., 0]
    want = np.take_along_axis(logits, rcodes[..., None].astype(np.int64), -1)[..., 0]
    tol = 1e-2 * np.abs(logits).max(-1)
    ok = (codes.numpy() == rcodes) | (np.abs(got - want) <= tol)
    assert ok.all(), (codes.numpy(), rcodes, got - want)
    assert np.mean(codes.numpy() == rcodes) >= 0.75, (codes.numpy(), rcodes)


def _inputs(mod, b, seed):
    gen = torch.Generator().manual_seed(seed)
    h = mod.norm.weight.shape[0]
    # bf16-representable values: the kernel computes in bf16, so the float64 reference sees the same inputs
    mk = lambda: torch.randn(b, 1, h, generator=gen).to(torch.bfloat16).to(mod.dtype)     # noqa: E731
    return mk(), mk()


@pytest.mark.parametrize("b", [1, 3])
def test_greedy_matches_reference(b):
    cls = make_code_predictor_class()
    mod = cls(seed=b)
    past, last = _inputs(mod, b, seed=10 + b)
    codes, mid = nxcp.code_predictor_forward(mod, past, last)
    g1 = mod.codec_embedding_stacked.shape[0]
    assert codes.dtype == torch.int32 and tuple(codes.shape) == (b, g1)
    assert tuple(mid.shape) == (b, g1 - 1, past.shape[-1]) and mid.dtype == past.dtype
    _check_codes(codes, mod, past, last)
    _, rembeds = cp_ref.code_predictor_reference(past[:, 0].numpy(), last[:, 0].numpy(),
                                                 code_predictor_reference_weights(mod), forced_codes=codes.numpy())
    assert_close("mid_hiddens", rembeds[:, :g1 - 1], mid.numpy(), dtype="bfloat16")
    # mid_hiddens are the talker's summands: codec_embedding[j](code j+1)
    emb = mod.codec_embedding_stacked.detach()
    for j in range(g1 - 1):
        assert_close(f"mid {j}", emb[j][codes[:, j].long()].numpy(), mid[:, j].numpy(), dtype="bfloat16")


def test_sampling_is_reproducible_from_uniforms():
    cls = make_code_predictor_class()
    mod = cls(seed=4)
    past, last = _inputs(mod, 2, seed=5)
    g1 = mod.codec_embedding_stacked.shape[0]
    u = torch.rand(2, g1, generator=torch.Generator().manual_seed(6))
    set_code_predictor_sampling(mod, temperature=0.9, top_k=8, top_p=0.8, uniforms=u)
    codes, _ = nxcp.code_predictor_forward(mod, past, last)
    _check_codes(codes, mod, past, last, uniforms=u.numpy(), do_sample=True, temperature=0.9, top_k=8, top_p=0.8)
    again, _ = nxcp.code_predictor_forward(mod, past, last)
    assert torch.equal(codes, again)                                         # same uniforms, same codes
    set_code_predictor_sampling(mod, do_sample=False)                        # back to greedy
    greedy, _ = nxcp.code_predictor_forward(mod, past, last)
    _check_codes(greedy, mod, past, last)


def test_bad_sampling_arguments_raise():
    mod = make_code_predictor_class()()
    with pytest.raises(AdapterInputError, match="temperature must be > 0"):
        set_code_predictor_sampling(mod, temperature=0.0)
    with pytest.raises(AdapterInputError, match="temperature must be >= 1e-30"):
        set_code_predictor_sampling(mod, temperature=1e-40)
    with pytest.raises(AdapterInputError, match="top_p must be in"):
        set_code_predictor_sampling(mod, top_p=1.5)
    with pytest.raises(AdapterInputError, match="top_k must be"):
        set_code_predictor_sampling(mod, top_k=0)
    set_code_predictor_sampling(mod, uniforms=torch.rand(2, 3))
    past, last = _inputs(mod, 2, seed=0)
    with pytest.raises(AdapterInputError, match="uniforms must be"):
        nxcp.code_predictor_forward(mod, past, last)


def test_installed_forward_and_tp_fallback():
    cls = make_code_predictor_class()
    names_shapes = {n: tuple(p.shape) for n, p in cls(seed=1).named_parameters()}
    with apply([cls], kernels=["code_predictor"]) as inst:
        assert inst.installed["code_predictor"] == ["UnifiedNeuronCodePredictor.forward"]
        mod = cls(seed=1)
        past, last = _inputs(mod, 1, seed=2)
        codes, mid = mod(past, last)
        assert cls.calls == 0 and codes.shape == (1, 4)
        # weights are repacked when a parameter changes
        with torch.no_grad():
            mod.lm_head_stacked.mul_(-1.0)
        codes2, _ = mod(past, last)
        _check_codes(codes2, mod, past, last)
        # TP > 1: the one-core kernel cannot all-reduce partial sums -> the original forward
        sharded = cls(tp_degree=8)
        assert sharded(past, last) == "original" and cls.calls == 1
        assert {n: tuple(p.shape) for n, p in mod.named_parameters()} == names_shapes
    assert mod(past, last) == "original"


def test_bf16_module():
    cls = make_code_predictor_class()
    mod = cls(dtype=torch.bfloat16, seed=7)
    past, last = _inputs(mod, 2, seed=8)
    codes, mid = nxcp.code_predictor_forward(mod, past, last)
    assert mid.dtype == torch.bfloat16 and codes.dtype == torch.int32
    emb = mod.codec_embedding_stacked.detach()
    for j in range(mid.shape[1]):
        assert torch.equal(mid[:, j], emb[j][codes[:, j].long()])   # a bf16 table row goes through unchanged
    _check_codes(codes, mod, past, last)


def test_default_sampling_uses_hf_knobs_with_generator():
    """set_code_predictor_sampling() defaults: top_k=50 (clipped to V=16 here), top_p=0.8, temperature 1; the
    uniforms come from the generator, so two runs with equally seeded generators agree with the reference."""
    mod = make_code_predictor_class()(seed=9)
    past, last = _inputs(mod, 2, seed=9)
    set_code_predictor_sampling(mod, generator=torch.Generator().manual_seed(123))
    codes, _ = nxcp.code_predictor_forward(mod, past, last)
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(123))
    _check_codes(codes, mod, past, last, uniforms=u.numpy(), do_sample=True, temperature=1.0, top_k=16, top_p=0.8)


def test_weight_packing_never_reads_values_on_the_host():
    """extract_weights packs with torch ops on the parameters' device: on the meta device (no values at all) it
    still builds every field, with the kernel's layouts and dtypes, so under NxDI's trace it is graph ops."""
    from integration.nxdi.code_predictor import extract_weights
    cls = make_code_predictor_class()
    mod = cls(dtype=torch.bfloat16).to("meta")
    w = extract_weights(mod)
    fields = ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm", "wqkv_t", "wo_t", "wgu_t", "wd_t",
              "lm_head_t", "codec_embed", "rope_cos", "rope_sin")
    assert all(getattr(w, f).device.type == "meta" for f in fields)
    assert w.wqkv_t.dtype == torch.bfloat16 and w.q_norm.dtype == torch.float32
    assert tuple(w.wqkv_t.shape) == (2, 128, (4 + 2 * 2) * 32) and tuple(w.wo_t.shape) == (2, 4 * 32, 128)
    assert tuple(w.lm_head_t.shape) == (4, 128, 16) and tuple(w.rope_cos.shape) == (5, 32)
    # and on CPU the torch packing equals the NumPy packing of the same parameters
    ref = code_predictor_reference_weights(cls(dtype=torch.bfloat16))
    got = extract_weights(cls(dtype=torch.bfloat16))
    for f in fields:
        assert np.allclose(np.asarray(getattr(ref, f), np.float32), getattr(got, f).float().numpy(), atol=1e-6,
                           rtol=1e-2), f


def test_sampling_uniforms_are_drawn_on_the_activations_device():
    """Uniforms drawn per call come from the activations' device (a host draw would be a constant in a trace)."""
    cls = make_code_predictor_class()
    mod = cls()
    set_code_predictor_sampling(mod, temperature=0.9)
    got = nxcp._sampling_inputs(mod, 2, 4, device=torch.device("meta"))
    assert got["uniforms"].device.type == "meta" and tuple(got["uniforms"].shape) == (2, 4)
    set_code_predictor_sampling(mod, generator=torch.Generator().manual_seed(0))
    got = nxcp._sampling_inputs(mod, 2, 4, device=torch.device("cpu"))
    again = nxcp._sampling_inputs(mod, 2, 4, device=torch.device("cpu"))
    assert got["uniforms"].shape == (2, 4) and not torch.equal(got["uniforms"], again["uniforms"])


def _tp_modules(tp, dtype=torch.bfloat16):
    """A full (tp_degree=1) fake predictor and its tp rank modules, each holding the contrib's per-rank shard:
    q/k/v rows of its heads, gate/up rows of its intermediate slice, the matching o_proj / down_proj columns;
    norms, embeddings and LM heads replicated."""
    cls = make_code_predictor_class()
    full = cls(dtype=dtype, inter=256)
    ranks = []
    for r in range(tp):
        m = cls(tp_degree=tp, dtype=dtype, n_q=4 // tp, n_kv=2 // tp, inter=256 // tp)
        with torch.no_grad():
            for lf, lr in zip(full.layers, m.layers):
                d = 32
                for name, heads in (("q_proj", 4 // tp), ("k_proj", 2 // tp), ("v_proj", 2 // tp)):
                    rows = slice(r * heads * d, (r + 1) * heads * d)
                    getattr(lr.self_attn, name).weight.copy_(getattr(lf.self_attn, name).weight[rows])
                cols = slice(r * (4 // tp) * d, (r + 1) * (4 // tp) * d)
                lr.self_attn.o_proj.weight.copy_(lf.self_attn.o_proj.weight[:, cols])
                inter = slice(r * 256 // tp, (r + 1) * 256 // tp)
                lr.mlp.gate_proj.weight.copy_(lf.mlp.gate_proj.weight[inter])
                lr.mlp.up_proj.weight.copy_(lf.mlp.up_proj.weight[inter])
                lr.mlp.down_proj.weight.copy_(lf.mlp.down_proj.weight[:, inter])
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    getattr(lr, norm).weight.copy_(getattr(lf, norm).weight)
                lr.self_attn.q_norm.weight.copy_(lf.self_attn.q_norm.weight)
                lr.self_attn.k_norm.weight.copy_(lf.self_attn.k_norm.weight)
            m.norm.weight.copy_(full.norm.weight)
            m.codec_embedding_stacked.copy_(full.codec_embedding_stacked)
            m.lm_head_stacked.copy_(full.lm_head_stacked)
        ranks.append(m)
    return cls, full, ranks


def test_rank_shards_match_shard_weights_and_the_tp_kernel_matches_tp1():
    """At tp_degree=2 each rank module packs exactly shard_weights(full, 2, rank), and the TP kernel on those
    shards (all ranks together, as the emulator runs them) gives the TP=1 codes and embeddings."""
    from nki_kernels.codepredictor.unrolled import code_predictor_tp
    from nki_kernels.codepredictor.weights import shard_weights
    from integration.nxdi import set_code_predictor_replica_group

    _, full, ranks = _tp_modules(2)
    w_full = nxcp.extract_weights(full)
    w_np = type(w_full)(**{f: (getattr(w_full, f).float().numpy() if hasattr(getattr(w_full, f), "numpy")
                               else getattr(w_full, f)) for f in w_full.__dataclass_fields__})
    shards = []
    for r, m in enumerate(ranks):
        set_code_predictor_replica_group(m, object(), r)
        got = nxcp.rank_weights(m)
        want = shard_weights(w_np, 2, r)
        assert (got.tp, got.rank, got.n_q_heads, got.n_kv_heads) == (want.tp, want.rank, want.n_q_heads,
                                                                      want.n_kv_heads)
        for f in ("wqkv_t", "wo_t", "wgu_t", "wd_t", "lm_head_t", "codec_embed", "q_norm", "input_norm"):
            assert np.array_equal(getattr(got, f).float().numpy(), np.asarray(getattr(want, f), np.float32)), f
        shards.append(got)
    g = torch.Generator().manual_seed(3)
    x0, x1 = (torch.randn(2, 128, generator=g).bfloat16() for _ in range(2))
    codes1, emb1 = nki_kernels.code_predictor(x0, x1, w_full)
    codes2, emb2 = code_predictor_tp(x0, x1, shards)
    assert torch.equal(codes1, codes2)
    assert_close("tp embeds", emb1.float().numpy(), emb2.float().numpy(), dtype="bfloat16")


def test_tp_forward_launches_one_rank_with_the_replica_group(monkeypatch):
    """Patched forward at tp_degree=2: without a replica group it defers to the contrib; with one it launches
    code_predictor_rank on the rank's shard and group (emulated here by the all-ranks TP launch)."""
    from nki_kernels.codepredictor.unrolled import code_predictor_tp
    from integration.nxdi import set_code_predictor_replica_group

    cls, full, ranks = _tp_modules(2)
    g = torch.Generator().manual_seed(4)
    past, last = (torch.randn(1, 1, 128, generator=g).bfloat16() for _ in range(2))
    with apply([cls], kernels=["code_predictor"]):
        assert ranks[0].forward(past, last) == "original" and cls.calls == 1       # no replica group: deferred
        group = object()
        for r, m in enumerate(ranks):
            set_code_predictor_replica_group(m, group, r)
        shards = [nxcp.rank_weights(m) for m in ranks]
        seen = []

        def launch(x0, x1, shard, replica_group, sampling):
            seen.append((shard.tp, shard.rank, replica_group))
            return code_predictor_tp(x0, x1, shards, **sampling)
        monkeypatch.setattr(nxcp, "_tp_launch_available", lambda: True)
        monkeypatch.setattr(nxcp, "_launch_rank", launch)
        codes, mids = ranks[1].forward(past, last)
        want_codes, want_mids = nxcp.code_predictor_forward(full, past, last)
    assert seen == [(2, 1, group)] and cls.calls == 1
    assert torch.equal(codes, want_codes)
    assert_close("tp mids", want_mids.float().numpy(), mids.float().numpy(), dtype="bfloat16")
    with pytest.raises(AdapterInputError, match="rank must be an int"):
        set_code_predictor_replica_group(ranks[0], group, 2)
