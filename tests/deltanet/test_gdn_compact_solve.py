"""The compact block-doubling levels (chunk._compact_level: 2s <= 32 on 32 x 32 PE tiles, tile_position) are off by
default (modeled slower, docs/deltanet.md "Compact solve"); kept correct: forced on, the prefill matches the float64
reference and equals the default path's result to fp32 rounding."""
import numpy as np
import pytest
from _gdn_inputs import DTYPES, gdn_inputs

from nki_kernels import gated_delta_rule
from nki_kernels.deltanet import chunk as chunk_mod
from nki_kernels.deltanet import reference as ref
from nki_kernels.testing import assert_close


@pytest.mark.parametrize("dtype,compute,chunk,lnc", [("bfloat16", "bfloat16", 128, 2), ("float32", None, 64, 1),
                                                     ("bfloat16", None, 128, 1)])
def test_compact_solve_matches_reference(monkeypatch, dtype, compute, chunk, lnc):
    rng = np.random.default_rng(3)
    q, k, v, g, beta = gdn_inputs(rng, 2, 2 * chunk + 9, 2, 4, 32, 32, DTYPES[dtype])
    k[0, 5:40] = k[0, 5:6]                           # repeated keys in a chunk: the solve's hard case
    default = gated_delta_rule(q, k, v, g, beta, chunk_size=chunk, use_qk_l2norm_in_kernel=True,
                               compute_dtype=compute, lnc=lnc)
    monkeypatch.setattr(chunk_mod, "_COMPACT_SOLVE", {False: True, True: True})
    o, s = gated_delta_rule(q, k, v, g, beta, chunk_size=chunk, use_qk_l2norm_in_kernel=True,
                            compute_dtype=compute, lnc=lnc)
    ro, rs = ref.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    tol = "bfloat16" if dtype == "bfloat16" else "float32"
    assert_close("o", ro, o, dtype=tol)
    assert_close("final_state", rs, s, dtype=tol)
    assert_close("o vs default path", np.asarray(default[0], np.float64), o, dtype=tol)
