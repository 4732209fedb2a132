"""Demo: a tiny random-weight Qwen3.5-MoE, patched with our kernels, generating; prints the kernels that ran.

    python -m integration.transformers.demo [--backend emulator|reference|nki] [--new-tokens 8]

Builds the model from a config (no download), runs greedy generate() stock and patched on a left-padded batch
of two prompts, and prints the kernel launch counts, any fallbacks, and the max |difference| of the logits
and whether the generated tokens are identical.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="emulator", choices=("emulator", "reference", "nki"))
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from integration.transformers import patch, tiny

    torch.manual_seed(args.seed)
    model = tiny.qwen3_5_moe(seed=args.seed)
    cfg = model.config
    print(f"tiny Qwen3.5-MoE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
          f"{cfg.num_hidden_layers} layers {cfg.layer_types}, hidden {cfg.hidden_size}, "
          f"attention {cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv x {cfg.head_dim}, "
          f"GDN Hk={cfg.linear_num_key_heads} Hv={cfg.linear_num_value_heads}, "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok} + shared")

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, cfg.vocab_size, (2, 12), generator=g)
    am = torch.ones_like(ids)
    am[1, :4] = 0                                   # the second prompt is 4 tokens shorter, left-padded
    ids = ids.masked_fill(am == 0, 0)
    gen = dict(attention_mask=am, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        stock_logits = model(input_ids=ids, attention_mask=am).logits
        stock_tokens = model.generate(ids, **gen)
        with patch(model, backend=args.backend) as handle:
            logits = model(input_ids=ids, attention_mask=am).logits
            if args.backend == "emulator":
                handle.record_launches()            # model the launches of generate() on trn2
            tokens = model.generate(ids, **gen)
            modeled = handle.modeled() if args.backend == "emulator" else {}

    valid = am.bool()
    diff = float((logits - stock_logits)[valid].abs().max())
    print(handle.report())
    print(f"prefill logits: max |patched - stock| = {diff:.3e} over non-padding positions "
          f"(logit rms {float(stock_logits[valid].pow(2).mean().sqrt()):.3f})")
    print(f"greedy generate ({args.new_tokens} new tokens, batch 2, left padding): "
          f"{'identical tokens' if torch.equal(tokens, stock_tokens) else 'DIFFERENT tokens'}")
    print(f"  stock:   {stock_tokens[:, ids.shape[1]:].tolist()}")
    print(f"  patched: {tokens[:, ids.shape[1]:].tolist()}")
    if modeled:
        print("cost model of the kernel launches inside generate() (modeled us on trn2, tiny shapes, "
              "launch overhead excluded):")
        total = 0.0
        for name, rep in modeled.items():
            total += rep.device_us
            print(f"  {name:24s} {rep.n_launches:4d} launches  {rep.device_us:9.1f} us modeled  "
                  f"({rep.device_us / max(rep.n_launches, 1):.1f} us/launch)")
        print(f"  {'total':24s} {sum(r.n_launches for r in modeled.values()):4d} launches  {total:9.1f} us modeled")
    return 0 if torch.equal(tokens, stock_tokens) else 1


if __name__ == "__main__":
    raise SystemExit(main())
