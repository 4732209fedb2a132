"""Demo: a tiny random-weight Qwen3.5-MoE, patched with our kernels, generating; prints the kernels that ran.

    python -m integration.transformers.demo [--backend emulator|reference|nki] [--new-tokens 8]
    python -m integration.transformers.demo --model omni      # the whole Qwen3-Omni, speech generate()

Builds the model from a config (no download), runs greedy generate() stock and patched on a left-padded batch
of two prompts, and prints: what transformers itself said during the stock run (kept apart: it is not about our
kernels), the kernel launches and fallbacks of the patched run, the max |difference| of the logits, whether the
generated tokens are identical, and (emulator backend) the modeled time of the launches on trn2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings


@contextlib.contextmanager
def _captured():
    """Collect the warnings and transformers log records raised inside the block (printed later, apart)."""
    notes: list[str] = []
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    old_handlers, old_propagate = logger.handlers[:], logger.propagate
    logger.handlers = [handler]                     # transformers' own stderr handler would print them now
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:
        logger.handlers = old_handlers
        logger.propagate = old_propagate
        seen = set()
        for msg in [str(w.message) for w in caught] + stream.getvalue().splitlines():
            msg = " ".join(msg.split())
            if msg and msg not in seen:
                seen.add(msg)
                notes.append(msg)


def _nki_missing(backend: str) -> str | None:
    if backend != "nki":
        return None
    from nki_kernels import backend as nkb
    if nkb.ACTIVE == "nki":
        return None
    return ("demo: --backend nki needs the real NKI runtime (Neuron SDK 2.33+, the `nki` package from AWS's Neuron "
            "pip repository), which is not installed here; use --backend emulator")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="emulator", choices=("emulator", "reference", "nki"))
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="qwen3_5_moe", choices=("qwen3_5_moe", "omni"))
    args = ap.parse_args(argv)
    missing = _nki_missing(args.backend)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if args.model == "omni":
        return _omni(args)

    import torch

    from integration.transformers import patch, tiny

    torch.manual_seed(args.seed)
    model = tiny.qwen3_5_moe(seed=args.seed)
    cfg = model.config
    print(f"tiny Qwen3.5-MoE (random weights): {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
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
        with _captured() as stock_notes:
            stock_logits = model(input_ids=ids, attention_mask=am).logits
            stock_tokens = model.generate(ids, **gen)
        with _captured() as patched_notes, patch(model, backend=args.backend) as handle:
            logits = model(input_ids=ids, attention_mask=am).logits
            if args.backend == "emulator":
                handle.record_launches()            # model the launches of generate() on trn2
            tokens = model.generate(ids, **gen)
            modeled = handle.modeled() if args.backend == "emulator" else {}

    print("\n== stock run (transformers' own code, before patching)")
    if stock_notes:
        print("transformers' own messages (about its optional kernels such as flash-linear-attention; not about "
              "nki-kernels):")
        for n in stock_notes:
            print(f"  {n}")
    else:
        print("no messages")

    print(f"\n== patched run (backend={args.backend})")
    calls = handle.calls()
    print("kernel launches: " + (", ".join(f"{k} x{v}" for k, v in sorted(calls.items())) or "none"))
    fallbacks = handle.fallbacks()
    if fallbacks:
        print("fallbacks (the model's own code ran instead):")
        for (hook, why), n in sorted(fallbacks.items()):
            print(f"  {hook}: {why} x{n}")
    else:
        print("fallbacks: none (every supported module ran on the kernels)")
    for fam, why in sorted(handle.not_available.items()):
        print(f"not available: {fam} ({why})")
    for n in patched_notes:
        print(f"message during the patched run: {n}")

    valid = am.bool()
    diff = float((logits - stock_logits)[valid].abs().max())
    print("\n== patched vs stock")
    print(f"prefill logits: max |patched - stock| = {diff:.3e} over non-padding positions "
          f"(logit rms {float(stock_logits[valid].pow(2).mean().sqrt()):.3f})")
    same = torch.equal(tokens, stock_tokens)
    print(f"greedy generate ({args.new_tokens} new tokens, batch 2, left padding): "
          f"{'identical tokens' if same else 'DIFFERENT tokens'}")
    print(f"  stock:   {stock_tokens[:, ids.shape[1]:].tolist()}")
    print(f"  patched: {tokens[:, ids.shape[1]:].tolist()}")
    if modeled:
        _print_modeled(modeled)
    return 0 if same else 1


def _print_modeled(modeled):
    print("\n== modeled time of the kernel launches inside generate() (µs on trn2 from the cost model, not "
          "measured;\n   tiny shapes, so fixed costs dominate; launch overhead excluded)")
    total = 0.0
    for name, rep in modeled.items():
        total += rep.device_us
        print(f"  {name:24s} {rep.n_launches:4d} launches  {rep.device_us:9.1f} µs  "
              f"({rep.device_us / max(rep.n_launches, 1):.1f} µs per launch)")
    print(f"  {'total':24s} {sum(r.n_launches for r in modeled.values()):4d} launches  {total:9.1f} µs")


def _omni(args):
    """The whole tiny Qwen3-Omni (thinker + vision / audio encoders, talker, code predictor, code2wav): greedy
    speech generate() on an audio clip and an image, stock and patched; the text tokens and codec codes of both,
    the launches per patch family and (emulator) their modeled time."""
    import torch

    from integration.transformers import patch, tiny

    model = tiny.qwen3_omni_moe(seed=2)
    inputs = tiny.omni_inputs(seed=args.seed)
    print(f"tiny Qwen3-Omni (random weights): {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params; "
          f"prompt of {inputs['input_ids'].shape[1]} tokens with an audio clip and an image")
    gen = dict(thinker_max_new_tokens=args.new_tokens, thinker_eos_token_id=tiny.OMNI_TOKENS["im_end"],
               thinker_do_sample=False, talker_max_new_tokens=args.new_tokens, talker_do_sample=False)
    codes = []
    stock_decode = model.code2wav.chunked_decode

    def keep_codes(c, **kw):
        codes.append(c)
        return stock_decode(c, **kw)
    model.code2wav.chunked_decode = keep_codes
    try:
        with torch.no_grad(), _captured():
            text0, _ = model.generate(**inputs, **gen)
            with patch(model, backend=args.backend) as handle:
                if args.backend == "emulator":
                    handle.record_launches()
                text1, _ = model.generate(**inputs, **gen)
                modeled = handle.modeled() if args.backend == "emulator" else {}
    finally:
        del model.code2wav.chunked_decode
    n = inputs["input_ids"].shape[1]
    print(f"\n== patched run (backend={args.backend})")
    for fam, per in handle.family_calls().items():
        print(f"  {fam:15s} " + ", ".join(f"{k} x{v}" for k, v in per.items()))
    falls = handle.fallbacks()
    print("fallbacks: " + (", ".join(f"{h}: {w} x{c}" for (h, w), c in sorted(falls.items())) or "none"))
    same_text, same_codes = torch.equal(text0, text1), torch.equal(codes[0], codes[1])
    print("\n== patched vs stock (greedy; the code predictor kernel is bf16, so a stock near-tie may flip a code)")
    print(f"thinker text: {'identical' if same_text else 'DIFFERENT'}  stock {text0[0, n:].tolist()}  "
          f"patched {text1[0, n:].tolist()}")
    print(f"talker codec codes [groups x frames]: {'identical' if same_codes else 'DIFFERENT'}\n"
          f"  stock   {codes[0][0].tolist()}\n  patched {codes[1][0].tolist()}")
    if modeled:
        _print_modeled(modeled)
    return 0 if same_text and same_codes else 1


if __name__ == "__main__":
    raise SystemExit(main())
