"""The code predictor's bench check (teacher-forced near-tie rule) on a tiny random config: it accepts the
float64 reference's own output and rejects a wrong code or a wrong embedding row."""
from __future__ import annotations

import numpy as np
import pytest

from microbench.cases.code_predictor import _check
from nki_kernels.codepredictor import random_weights
from nki_kernels.codepredictor.reference import code_predictor_reference


def _inputs(sample):
    rng = np.random.default_rng(7)
    w = random_weights(rng, hidden=64, n_q_heads=2, n_kv_heads=1, head_dim=32, intermediate=64, n_layers=1,
                       n_groups=4, vocab=64, lm_scale=3.0)
    ph, c0 = (rng.standard_normal((2, 64)).astype(np.float32) for _ in range(2))
    kw = dict(uniforms=rng.random((2, 4)).astype(np.float32), do_sample=True, temperature=0.9, top_k=5,
              top_p=0.8) if sample else {}
    return dict(past_hidden=ph, code0_embed=c0, weights=w, kw=kw)


def _reference_out(inp):
    return code_predictor_reference(inp["past_hidden"], inp["code0_embed"], inp["weights"], **inp["kw"])


@pytest.mark.parametrize("sample", [False, True])
def test_check_accepts_the_reference_and_rejects_a_bad_code(sample):
    inp = _inputs(sample)
    codes, emb = _reference_out(inp)
    _check({"inputs": inp}, (codes, emb))
    # the worst code at step 2 of row 1 (teacher forcing recomputes that step's logits from the same prefix)
    _, _, lg = code_predictor_reference(inp["past_hidden"], inp["code0_embed"], inp["weights"], forced_codes=codes,
                                        return_logits=True, **inp["kw"])
    bad = codes.copy()
    bad[1, 2] = int(np.argmin(lg[1, 2]))
    tables = np.asarray(inp["weights"].codec_embed)
    bad_emb = np.stack([tables[j][bad[:, j]] for j in range(bad.shape[1])], axis=1)
    with pytest.raises(AssertionError, match="row 1 step 2"):
        _check({"inputs": inp}, (bad, bad_emb))


def test_check_rejects_embeddings_that_are_not_the_table_rows():
    inp = _inputs(False)
    codes, emb = _reference_out(inp)
    emb = np.array(emb, copy=True)
    emb[0, 1, 0] += 0.5
    with pytest.raises(AssertionError, match="codec_embeds"):
        _check({"inputs": inp}, (codes, emb))
