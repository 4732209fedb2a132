"""Modeled cost of the kernel launches the vLLM Neuron adapters make, at the plugin's own reference shapes.

``python -m integration.vllm_neuron.bench`` runs each replaced path's kernels once on the emulator (random inputs
in the plugin's layouts and dtypes, as the adapters pass them) and prints the cost model's time: modeled µs on
trn2 (the default target), not a measurement. Shapes: the plugin's DeltaNet docstring case (4 heads on one rank,
1024 tokens, Dk = Dv = 128; its own figures are 0.81 ms for its torch path and 1.86 ms for its vendored fused NKI
kernel, measured on a device), Qwen3.5-35B-A3B per rank at TP=4 for attention (2 query heads and 1 KV head of
D = 256) and, with ``--moe``, MoE (256 experts top-8, H = 2048, I_r = 128, shared expert S_r = 128; routing,
mapping and routed + shared experts counted, as the adapter launches them).
"""
from __future__ import annotations

import argparse

import torch


def _model(fn, target):
    from nki_kernels.emulator import record_launches, use_target
    from nki_kernels.emulator.costmodel import model_launches
    with use_target(target), record_launches() as runs:
        fn()
    rep = model_launches(list(runs), target=target)
    return rep.device_us, len(runs)


def cases(tokens=1024, decode_batch=8):
    from nki_kernels import torch_ops as ops

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)                                     # noqa: E731
    h, dk = 4, 128
    q, k, v = (torch.nn.functional.normalize(r(1, tokens, h, dk), dim=-1) for _ in range(3))
    gate, beta = -torch.rand(1, tokens, h, generator=g), torch.rand(1, tokens, h, generator=g)
    yield "deltanet prefill (chunk_gated_delta_rule)", f"B=1 T={tokens} H={h} Dk=Dv={dk} fp32", \
        lambda: ops.gated_delta_rule(q, k, v, gate, beta, chunk_size=64, initial_state=torch.zeros(1, h, dk, dk))
    conv_dim = 2 * 4 * 128 + 8 * 128
    xc, wc = r(1, conv_dim, tokens).bfloat16(), r(conv_dim, 4).bfloat16()
    yield "deltanet conv (_causal_conv)", f"T={tokens} conv_dim={conv_dim} K=4 bf16", \
        lambda: ops.causal_conv1d(xc, wc, activation=None)
    b = decode_batch
    qs, ks, vs = r(b, 1, 8, dk), r(b, 1, 8, dk), r(b, 1, 8, dk)
    pool = torch.zeros(b, 8, dk, dk)
    window, xu = r(b, conv_dim, 4).bfloat16(), r(b, conv_dim, 1).bfloat16()
    yield "deltanet decode (forward_decode: conv update + step)", f"B={b} Hv=8 Dk=Dv={dk}", lambda: (
        ops.causal_conv1d_update(xu, window, wc, activation="silu"),
        ops.gated_delta_rule_step(qs, ks, vs, -torch.rand(b, 1, 8, generator=g), torch.rand(b, 1, 8, generator=g),
                                  pool, torch.arange(b, dtype=torch.int32), use_qk_l2norm_in_kernel=True))
    qa, ka, va, ga = r(1, 2, tokens, 256).bfloat16(), r(1, 1, tokens, 256).bfloat16(), \
        r(1, 1, tokens, 256).bfloat16(), r(1, 2, tokens, 256).bfloat16()
    yield "attention prefill (forward_prefill, gate fused)", f"Hq=2 Hkv=1 T={tokens} D=256 bf16", \
        lambda: ops.flash_attention(qa, ka, va, gate=ga, causal=True)
    qd, kd, vd = r(b, 2, 1, 256).bfloat16(), r(b, 1, tokens, 256).bfloat16(), r(b, 1, tokens, 256).bfloat16()
    lens = torch.full((b,), tokens, dtype=torch.int32)
    yield "attention decode (forward_decode)", f"B={b} Hq=2 Hkv=1 ctx={tokens} D=256 bf16", \
        lambda: ops.flash_attention_decode(qd, kd, vd, lens, causal=True)


def moe_cases(tokens=256, decode_batch=8):
    """Qwen3.5-35B-A3B MoE per rank at TP=4: 256 experts top-8, H=2048, I_r=128, shared S_r=128, block 128 (the
    plugin's BLOCK_SIZE) with NxD's static worst-case block count, as the adapter launches them."""
    from nki_kernels import torch_ops as ops

    from .moe import static_num_blocks

    g = torch.Generator().manual_seed(1)
    n_exp, top_k, hidden, inter, shared_i, block = 256, 8, 2048, 128, 128, 128
    r = lambda *s: torch.randn(*s, generator=g)                                     # noqa: E731
    x = r(tokens, hidden).bfloat16()
    router = (r(n_exp, hidden) * hidden ** -0.5).bfloat16()
    gate_up = (r(n_exp, hidden, 2, inter) * hidden ** -0.5).bfloat16()
    down = (r(n_exp, inter, hidden) * inter ** -0.5).bfloat16()
    shared = ((r(hidden, 2, shared_i) * hidden ** -0.5).bfloat16(), (r(shared_i, hidden) * shared_i ** -0.5).bfloat16(),
              (r(hidden) * hidden ** -0.5).bfloat16())

    def route(h):
        return ops.moe_route((h.float() @ router.float().T).contiguous(), top_k, True)

    def prefill():
        w, i = route(x)
        tok, blk = ops.moe_block_mapping(i, n_exp, block, num_blocks=static_num_blocks(tokens, top_k, n_exp, block))
        return ops.moe_blockwise(x, w.bfloat16(), gate_up, down, tok, blk, block, shared=shared, top_k_index=i)

    def decode():
        xd = x[:decode_batch].contiguous()
        w, i = route(xd)
        return ops.moe_decode(xd, i, w.bfloat16(), gate_up, down, shared=shared)

    yield ("moe prefill (Qwen3_5SparseMoeBlock.forward_prefill, shared fused)",
           f"T={tokens} E=256 top-8 H=2048 I_r=128 B=128 bf16", prefill)
    yield ("moe decode (Qwen3_5SparseMoeBlock.forward_decode, shared fused)",
           f"B={decode_batch} E=256 top-8 H=2048 I_r=128 bf16", decode)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="trn2")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--moe", action="store_true", help="also the MoE rows (T=256; about 4 minutes on the emulator)")
    args = ap.parse_args(argv)
    print(f"| replaced path | shape | launches | modeled µs on {args.target} |")
    print("|---|---|---|---|")
    rows = list(cases(args.tokens)) + (list(moe_cases()) if args.moe else [])
    for name, shape, fn in rows:
        us, n = _model(fn, args.target)
        print(f"| {name} | {shape} | {n} | {us:.1f} |")


if __name__ == "__main__":
    main()
