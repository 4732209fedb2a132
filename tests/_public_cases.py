"""Valid small inputs for every public function of nki_kernels (shared by the cross-kernel tests; not a test
module). `case(name, rng)` returns (positional (name, value) pairs, keyword arguments, {in-place argument:
expected(inputs as float64) -> its reference update})."""
from __future__ import annotations

import numpy as np

import nki_kernels
from nki_kernels.deltanet import reference as gdn_ref

F32 = np.float32


def _gdn(rng, b, t, hk=1, hv=2, dk=32, dv=32):
    q = rng.standard_normal((b, t, hk, dk)).astype(F32)
    k = rng.standard_normal((b, t, hk, dk)).astype(F32)
    v = rng.standard_normal((b, t, hv, dv)).astype(F32)
    g = (-rng.uniform(0.0, 0.5, (b, t, hv))).astype(F32)
    beta = rng.uniform(0.0, 1.0, (b, t, hv)).astype(F32)
    return dict(q=q, k=k, v=v, g=g, beta=beta)


def _moe(rng, t=8, h=128, e=4, inter=64, top_k=2):
    x = rng.standard_normal((t, h)).astype(F32)
    gu = (rng.standard_normal((e, h, 2, inter)) / np.sqrt(h)).astype(F32)
    dn = (rng.standard_normal((e, inter, h)) / np.sqrt(inter)).astype(F32)
    w, idx = nki_kernels.moe_route(rng.standard_normal((t, e)).astype(F32), top_k, True)
    return x, gu, dn, np.asarray(w).astype(F32), np.asarray(idx).astype(np.int32)


def case(name, rng):
    if name == "tiled_matmul":
        return [("lhsT", rng.standard_normal((64, 32)).astype(F32)),
                ("rhs", rng.standard_normal((64, 48)).astype(F32))], {}, {}
    if name == "softmax":
        return [("x", rng.standard_normal((20, 33)).astype(F32))], {}, {}
    if name == "rmsnorm":
        return [("x", rng.standard_normal((20, 40)).astype(F32)),
                ("weight", rng.standard_normal(40).astype(F32))], {"eps": 1e-6}, {}
    if name == "flash_attention":
        q = rng.standard_normal((1, 2, 16, 64)).astype(F32)
        k, v = (rng.standard_normal((1, 1, 16, 64)).astype(F32) for _ in range(2))
        return [("q", q), ("k", k), ("v", v), ("gate", rng.standard_normal(q.shape).astype(F32)),
                ("seq_lens", np.array([12], np.int32))], {}, {}
    if name == "flash_attention_decode":
        q = rng.standard_normal((2, 2, 1, 64)).astype(F32)
        kc, vc = (rng.standard_normal((2, 1, 32, 64)).astype(F32) for _ in range(2))
        return [("q", q), ("k_cache", kc), ("v_cache", vc), ("cache_lens", np.array([20, 32], np.int32))], {}, {}
    if name == "flash_attention_varlen":
        cu = np.array([0, 5, 16], np.int32)                       # two packed sequences of 5 and 11 tokens
        q = rng.standard_normal((16, 2, 64)).astype(F32)
        k, v = (rng.standard_normal((16, 1, 64)).astype(F32) for _ in range(2))
        return [("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu), ("cu_seqlens_k", cu.copy())], {}, {}
    if name == "gated_delta_rule":
        d = _gdn(rng, 1, 16)
        d["initial_state"] = rng.standard_normal((1, 2, 32, 32)).astype(F32) * F32(0.1)
        return [(n, d[n]) for n in ("q", "k", "v", "g", "beta")], {"initial_state": d["initial_state"]}, {}
    if name == "gated_delta_rule_step":
        d = _gdn(rng, 2, 1)
        d["state_pool"] = rng.standard_normal((4, 2, 32, 32)).astype(F32) * F32(0.1)
        d["slot_ids"] = np.array([3, 1], np.int32)
        names = ("q", "k", "v", "g", "beta", "state_pool", "slot_ids")

        def new_pool(inp):
            return gdn_ref.gated_delta_rule_step(*(inp[n] for n in names))[1]
        return [(n, d[n]) for n in names], {}, {"state_pool": new_pool}
    if name == "causal_conv1d":
        return [("x", rng.standard_normal((2, 136, 8)).astype(F32)),
                ("weight", rng.standard_normal((136, 4)).astype(F32)),
                ("conv_state", rng.standard_normal((2, 136, 4)).astype(F32))], {}, {}
    if name == "causal_conv1d_update":
        names = ("x", "conv_state", "weight")

        def new_state(inp):
            return gdn_ref.causal_conv1d_update(*(inp[n] for n in names))[1]
        return [("x", rng.standard_normal((2, 136, 1)).astype(F32)),
                ("conv_state", rng.standard_normal((2, 136, 4)).astype(F32)),
                ("weight", rng.standard_normal((136, 4)).astype(F32))], {}, {"conv_state": new_state}
    if name == "moe_route":
        return [("router_logits", rng.standard_normal((8, 4)).astype(F32))], {"top_k": 2, "normalize": True}, {}
    if name == "moe_block_mapping":
        _, _, _, _, idx = _moe(rng)
        return [("top_k_index", idx)], {"num_experts": 4, "block_size": 8}, {}
    if name == "moe_blockwise":
        x, gu, dn, w, idx = _moe(rng)
        tpos, b2e = nki_kernels.moe_block_mapping(idx, 4, 8)
        return [("hidden", x), ("expert_affinities", w), ("gate_up", gu), ("down", dn),
                ("token_position_to_id", np.asarray(tpos)), ("block_to_expert", np.asarray(b2e))], \
            {"block_size": 8, "top_k_index": idx}, {}
    if name == "moe_decode":
        x, gu, dn, w, idx = _moe(rng, t=4)
        return [("hidden", x), ("top_k_index", idx), ("top_k_weights", w), ("gate_up", gu), ("down", dn)], {}, {}
    if name == "code_predictor":
        from nki_kernels.codepredictor import random_weights
        w = random_weights(rng, hidden=128, n_q_heads=2, n_kv_heads=1, head_dim=64, intermediate=128, n_layers=1,
                           n_groups=2, vocab=16)
        return [("past_hidden", rng.standard_normal((2, 128)).astype(F32)),
                ("code0_embed", rng.standard_normal((2, 128)).astype(F32))], {"weights": w}, {}
    raise AssertionError(f"no immutability case for {name}: add one")
