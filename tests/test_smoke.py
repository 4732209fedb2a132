"""The fast subset's backbone (`python -m pytest -m fast`): every public function once, small shapes, LNC 1 and 2,
compared with its family's float64 NumPy reference (the kernels' own test folders sweep shapes and values)."""
from __future__ import annotations

import numpy as np
import pytest

import nki_kernels
from nki_kernels.attention import reference as attn_ref
from nki_kernels.deltanet import reference as gdn_ref
from nki_kernels.examples import reference as ex_ref
from nki_kernels.moe import reference as moe_ref
from nki_kernels.testing import assert_close

from _public_cases import case

pytestmark = pytest.mark.fast

# name -> float64 reference taking the wrapper's arguments (outputs in the wrapper's order)
REFERENCES = {
    "tiled_matmul": ex_ref.tiled_matmul_reference,
    "softmax": ex_ref.softmax_reference,
    "rmsnorm": ex_ref.rmsnorm_reference,
    "flash_attention": attn_ref.flash_attention_ref,
    "flash_attention_decode": attn_ref.flash_attention_decode_ref,
    "flash_attention_varlen": attn_ref.flash_attention_varlen_ref,
    "gated_delta_rule": gdn_ref.gated_delta_rule,
    "gated_delta_rule_step": lambda *a, **kw: gdn_ref.gated_delta_rule_step(*a, **kw)[0],
    "causal_conv1d": gdn_ref.causal_conv1d,
    "causal_conv1d_update": lambda *a, **kw: gdn_ref.causal_conv1d_update(*a, **kw)[0],
    "moe_route": moe_ref.moe_route_reference,
    "moe_blockwise": moe_ref.moe_blockwise_reference,
    "moe_decode": moe_ref.moe_decode_reference,
}
KERNELS = [n for n in nki_kernels.__all__ if n in REFERENCES]


def test_every_public_function_is_in_the_smoke_run():
    host_checked_below = {"moe_block_mapping", "code_predictor"}
    assert set(nki_kernels.__all__) == set(REFERENCES) | host_checked_below


def _copy(v):
    return v.copy() if isinstance(v, np.ndarray) else v


@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("name", KERNELS)
def test_public_function_matches_its_reference(name, lnc):
    args, kwargs, in_place = case(name, np.random.default_rng(7))
    inputs = {n: _copy(v) for n, v in args}
    fn = getattr(nki_kernels, name)
    if name not in ("moe_route",):
        kwargs = dict(kwargs, lnc=lnc)
    elif lnc == 2:
        pytest.skip("moe_route is a host function (no LNC)")
    out = fn(*inputs.values(), **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "lnc"}
    ref = REFERENCES[name](*(v for _, v in args), **ref_kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    assert len(outs) == len(refs), f"{name}: {len(outs)} outputs, reference {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if np.asarray(r).dtype.kind in "iu":
            np.testing.assert_array_equal(np.asarray(o), np.asarray(r), err_msg=f"{name} output {i}")
        else:
            assert_close(f"{name}[{i}] lnc={lnc}", r, o)
    originals = {n: v for n, v in args}
    for arg, expected in in_place.items():
        assert_close(f"{name}: {arg} updated in place", expected(originals), inputs[arg])


def test_moe_block_mapping_puts_every_routed_pair_in_its_experts_block():
    args, kwargs, _ = case("moe_block_mapping", np.random.default_rng(7))
    idx = dict(args)["top_k_index"]
    tpos, b2e = (np.asarray(a) for a in nki_kernels.moe_block_mapping(idx, **kwargs))
    bs = kwargs["block_size"]
    assert tpos.shape == (b2e.size * bs,)
    got = sorted((int(t), int(b2e[i // bs])) for i, t in enumerate(tpos) if t >= 0)
    want = sorted((t, int(e)) for t in range(idx.shape[0]) for e in idx[t])
    assert got == want
    assert list(b2e) == sorted(b2e)


@pytest.mark.parametrize("lnc", [1, 2])
def test_code_predictor_matches_its_reference(lnc):
    from nki_kernels.codepredictor.reference import code_predictor_reference
    args, kwargs, _ = case("code_predictor", np.random.default_rng(7))
    ph, c0 = (v for _, v in args)
    codes, embeds = nki_kernels.code_predictor(ph, c0, kwargs["weights"], lnc=lnc)
    ref_codes, _ = code_predictor_reference(ph, c0, kwargs["weights"], forced_codes=np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    table = np.asarray(kwargs["weights"].codec_embed, dtype=np.float32)
    rows = np.stack([table[j][np.asarray(codes)[:, j]] for j in range(table.shape[0])], axis=1)
    np.testing.assert_array_equal(np.asarray(embeds, dtype=np.float32), rows)


def test_moe_weight_converter_round_trip():
    """transformers' fused layout -> the kernels' layout, checked element by element."""
    from nki_kernels.moe import experts_from_transformers
    rng = np.random.default_rng(0)
    e, h, i = 3, 128, 16
    gate_up_proj = rng.standard_normal((e, 2 * i, h)).astype(np.float32)      # [E, 2I, H]: gate rows, then up
    down_proj = rng.standard_normal((e, h, i)).astype(np.float32)            # [E, H, I]
    gu, dn = experts_from_transformers(gate_up_proj, down_proj)
    assert gu.shape == (e, h, 2, i) and dn.shape == (e, i, h)
    assert gu[1, 5, 0, 7] == gate_up_proj[1, 7, 5] and gu[2, 9, 1, 3] == gate_up_proj[2, i + 3, 9]
    assert dn[0, 4, 100] == down_proj[0, 100, 4]
