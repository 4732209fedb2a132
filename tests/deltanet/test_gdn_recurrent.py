"""gated_delta_rule_step (decode, state pool in place) against the reference and against prefill."""
import numpy as np
import pytest
from _gdn_inputs import BF16, DTYPES, gdn_inputs
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import gated_delta_rule, gated_delta_rule_step
from nki_kernels.deltanet import reference as ref
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


@given(b=st.integers(1, 3), t=st.integers(1, 4), hk=st.integers(1, 2), ratio=st.sampled_from([1, 2, 4]),
       dk=st.sampled_from([16, 32, 64, 128]), dv=st.sampled_from([16, 32, 64, 128]), l2norm=st.booleans(),
       dtype=st.sampled_from(["float32", "bfloat16"]), state_dtype=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 2 ** 16))
def test_matches_reference(b, t, hk, ratio, dk, dv, l2norm, dtype, state_dtype, seed):
    rng = np.random.default_rng(seed)
    hv = hk * ratio
    q, k, v, g, beta = gdn_inputs(rng, b, t, hk, hv, dk, dv, DTYPES[dtype])
    if not l2norm:
        k = (np.asarray(k, np.float32) / np.sqrt(dk)).astype(DTYPES[dtype])
    n_slots = b + 2
    pool = rng.standard_normal((n_slots, hv, dk, dv)).astype(DTYPES[state_dtype])
    slots = rng.permutation(n_slots)[:b]
    pool_before = pool.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=l2norm)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, pool_before, slots, use_qk_l2norm_in_kernel=l2norm)
    assert o.shape == (b, t, hv, dv) and o.dtype == q.dtype and pool.dtype == DTYPES[state_dtype]
    tol = "float32" if dtype == state_dtype == "float32" else "bfloat16"
    assert_close("o", ro, o, dtype=tol)
    assert_close("pool rows", rpool[slots], pool[slots], dtype=tol)
    others = np.setdiff1d(np.arange(n_slots), slots)
    np.testing.assert_array_equal(pool[others], pool_before[others])   # untouched rows stay bit-identical


@given(t1=st.integers(1, 130), steps=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       ratio=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2 ** 16))
def test_decode_after_prefill_equals_longer_prefill(t1, steps, ratio, seed):
    rng = np.random.default_rng(seed)
    total = t1 + sum(steps)
    q, k, v, g, beta = gdn_inputs(rng, 2, total, 1, ratio, 32, 32)
    o_all, s_all = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    _, s1 = gated_delta_rule(q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], beta[:, :t1],
                             use_qk_l2norm_in_kernel=True)
    pool = np.zeros((5, ratio, 32, 32), np.float32)
    slots = np.array([3, 1])
    pool[slots] = s1
    t = t1
    for n in steps:
        o = gated_delta_rule_step(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], g[:, t:t + n], beta[:, t:t + n],
                                  pool, slots, use_qk_l2norm_in_kernel=True)
        assert_close(f"decode o [{t}:{t + n}]", o_all[:, t:t + n], o)
        t += n
    assert_close("decode state", s_all, pool[slots])


@pytest.mark.parametrize("dtype, t, ratio", [("bfloat16", 1, 2), ("float32", 3, 1), ("bfloat16", 4, 4)])
def test_lnc2_matches_reference(dtype, t, ratio, rng):
    """LNC=2: each program instance owns Hv / 2 heads; together they give the same result."""
    q, k, v, g, beta = gdn_inputs(rng, 2, t, 2, 2 * ratio, 32, 64, DTYPES[dtype])
    pool = rng.standard_normal((4, 2 * ratio, 32, 64)).astype(np.float32)
    slots = np.array([3, 0])
    before = pool.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=True, lnc=2)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, slots, use_qk_l2norm_in_kernel=True)
    assert_close("o lnc2", ro, o, dtype=dtype)
    assert_close("pool lnc2", rpool, pool, dtype=dtype)


def test_many_sequences_load_inputs_in_groups(rng):
    """B=20 sequences of T=4 tokens and Hv=64 heads: their inputs exceed the SBUF input budget, so they are
    loaded in two groups; every sequence still matches the reference."""
    q, k, v, g, beta = gdn_inputs(rng, 20, 4, 4, 64, 32, 32, DTYPES["bfloat16"])
    pool = rng.standard_normal((23, 64, 32, 32)).astype(np.float32)
    slots = rng.permutation(23)[:20]
    before = pool.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=True)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, slots, use_qk_l2norm_in_kernel=True)
    assert_close("o groups", ro, o, dtype="bfloat16")
    assert_close("pool groups", rpool, pool, dtype="bfloat16")


def test_largest_heads_and_tokens_fit_in_sbuf(rng):
    """B=12, T=4 tokens, Hk=32, Hv=64 heads of Dk=Dv=128, bf16: the rank-1 stationaries take 64 KiB per
    partition, so fewer state rows are prefetched (this shape overflowed SBUF before); results match the
    reference."""
    q, k, v, g, beta = gdn_inputs(rng, 12, 4, 32, 64, 128, 128, DTYPES["bfloat16"])
    pool = (rng.standard_normal((13, 64, 128, 128)) * 0.1).astype(np.float32)
    slots = rng.permutation(13)[:12]
    before = pool.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=True)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, slots, use_qk_l2norm_in_kernel=True)
    assert_close("o largest", ro, o, dtype="bfloat16")
    assert_close("pool largest", rpool[slots], pool[slots], dtype="bfloat16")


def test_edge_values(rng):
    """Decay to zero, beta 0 and 1, repeated tokens, huge q/k with the L2 norm."""
    q, k, v, g, beta = gdn_inputs(rng, 4, 4, 1, 2, 64, 64)
    g[0] = -1e4
    beta[1] = 0.0
    beta[2] = 1.0
    q[3], k[3], v[3] = q[3, 0], k[3, 0] * 1e15, v[3, 0]
    pool = (rng.standard_normal((4, 2, 64, 64)) * 10).astype(np.float32)
    before = pool.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, np.arange(4), use_qk_l2norm_in_kernel=True)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, np.arange(4), use_qk_l2norm_in_kernel=True)
    assert_close("o edges", ro, o)
    assert_close("pool edges", rpool, pool)


def test_torch_pool_updated_in_place(rng):
    torch = pytest.importorskip("torch")
    q, k, v, g, beta = gdn_inputs(rng, 2, 1, 1, 2, 32, 32)
    pool = torch.from_numpy(rng.standard_normal((3, 2, 32, 32)).astype(np.float32))
    before = pool.numpy().copy()
    ptr = pool.data_ptr()
    o = gated_delta_rule_step(*(torch.from_numpy(x) for x in (q, k, v, g, beta)), pool, torch.tensor([2, 0]),
                              use_qk_l2norm_in_kernel=True)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, np.array([2, 0]), use_qk_l2norm_in_kernel=True)
    assert isinstance(o, torch.Tensor) and pool.data_ptr() == ptr
    assert_close("o torch", ro, o.numpy())
    assert_close("pool torch", rpool, pool.numpy())


def test_matches_transformers_recurrent(rng):
    torch = pytest.importorskip("torch")
    m = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta = gdn_inputs(rng, 2, 1, 2, 4, 32, 32)
    s0 = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    tq, tk = (torch.from_numpy(np.repeat(x, 2, axis=2)) for x in (q, k))
    ho, hs = m.torch_recurrent_gated_delta_rule(tq, tk, torch.from_numpy(v), torch.from_numpy(g),
                                                torch.from_numpy(beta), initial_state=torch.from_numpy(s0),
                                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    pool = s0.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, np.array([0, 1]), use_qk_l2norm_in_kernel=True)
    assert_close("o vs transformers", ho.numpy(), o)
    assert_close("state vs transformers", hs.numpy(), pool)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(slot_ids=np.array([0, 5])), r"slot_ids must be in \[0, N_slots=5\)"),
    (lambda a: a.update(slot_ids=np.array([-1, 2])), "slot_ids must be in"),
    (lambda a: a.update(slot_ids=np.array([1, 1])), "slot_ids must be distinct"),
    (lambda a: a.update(slot_ids=np.array([1])), "slot_ids must be"),
    (lambda a: a.update(state_pool=a["state_pool"].astype(np.float16)), "state_pool dtype"),
    (lambda a: a.update(state_pool=a["state_pool"][:, :1]), "state_pool must be"),
    (lambda a: a.update(q=np.zeros((2, 5, 1, 16), np.float32), k=np.zeros((2, 5, 1, 16), np.float32),
                        v=np.zeros((2, 5, 2, 16), np.float32), g=np.zeros((2, 5, 2), np.float32),
                        beta=np.zeros((2, 5, 2), np.float32)), r"T must be in \[1, 4\]"),
    (lambda a: a.update(v=a["v"].astype(BF16)), "v dtype must equal"),
    (lambda a: a.update(g=a["g"][:, :, :1]), "g must be"),
    (lambda a: a.update(k=a["k"][..., :8]), "k must match q"),
    (lambda a: a.update(lnc=3), r"lnc must be one of \(1, 2\)"),
    (lambda a: a.update(scale=float("nan")), "scale must be finite"),
    (lambda a: a.update(scale=0.0), "scale must be > 0"),
    (lambda a: a.update(use_qk_l2norm_in_kernel="yes"), "use_qk_l2norm_in_kernel must be True or False"),
])
def test_bad_inputs_raise(mutate, match, rng):
    q, k, v, g, beta = gdn_inputs(rng, 2, 1, 1, 2, 16, 16)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, state_pool=np.zeros((5, 2, 16, 16), np.float32),
                slot_ids=np.array([0, 3]))
    mutate(args)
    with pytest.raises(KernelInputError, match=match):
        gated_delta_rule_step(**args)


@pytest.mark.parametrize("dtype, t, lnc, pool_rows", [("bfloat16", 1, 2, 3), ("float32", 2, 1, 5),
                                                      ("bfloat16", 4, 2, 6)])
def test_static_rows_mode(dtype, t, lnc, pool_rows, rng):
    """slot_ids=None: sequence b updates row b of an aliased [max_bs, Hv, Dk, Dv] buffer (max_bs >= B) with
    static DMAs; rows >= B untouched; same result as the slot pool with slot_ids = 0 .. B-1."""
    q, k, v, g, beta = gdn_inputs(rng, 3, t, 2, 4, 32, 16, DTYPES[dtype])
    pool = rng.standard_normal((pool_rows, 4, 32, 16)).astype(np.float32)
    before = pool.copy()
    o = gated_delta_rule_step(q, k, v, g, beta, pool, None, use_qk_l2norm_in_kernel=True, lnc=lnc)
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, None, use_qk_l2norm_in_kernel=True)
    assert_close("o static rows", ro, o, dtype=dtype)
    assert_close("pool static rows", rpool, pool, dtype=dtype)
    np.testing.assert_array_equal(pool[3:], before[3:])
    pool2 = before.copy()
    o2 = gated_delta_rule_step(q, k, v, g, beta, pool2, np.arange(3), use_qk_l2norm_in_kernel=True, lnc=lnc)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o2, np.float32))
    np.testing.assert_array_equal(pool, pool2)


def test_static_rows_needs_b_rows(rng):
    q, k, v, g, beta = gdn_inputs(rng, 3, 1, 1, 2, 16, 16)
    with pytest.raises(KernelInputError, match="at least B rows"):
        gated_delta_rule_step(q, k, v, g, beta, np.zeros((2, 2, 16, 16), np.float32))


def test_static_rows_issue_no_dynamic_dma(rng):
    """Static rows: the trace has no dynamic DMA (the slot pool mode has one read and one write per head)."""
    from nki_kernels.emulator import runtime
    q, k, v, g, beta = gdn_inputs(rng, 2, 1, 1, 2, 16, 16)
    for slots, want_dynamic in ((None, False), (np.array([1, 0]), True)):
        with runtime.record_launches() as rec:
            gated_delta_rule_step(q, k, v, g, beta, np.zeros((2, 2, 16, 16), np.float32), slots, lnc=1)
        dyn = [i for i in rec[0].trace if i.meta.get("dynamic")]
        assert bool(dyn) == want_dynamic
