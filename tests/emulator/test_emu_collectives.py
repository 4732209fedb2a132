"""nki.collectives on the emulator: N rank programs run together and exchange data through HBM and SBUF tensors.

Every expected value is computed here with NumPy from the per-rank inputs (no emulator code)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from emu_kit import raises
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels.backend import nki, nisa, nl
from nki_kernels.emulator import record_launches, run_ranks
from nki_kernels.emulator.collectives import ReplicaGroup, rg_partition_op
from nki_kernels.emulator.costmodel import collective_us, model_launches
from nki_kernels.emulator.lnc import LNC_ENV


@pytest.fixture(autouse=True)
def _lnc1(monkeypatch):
    """These kernels are LNC=1 kernels: compile and launch them at LNC=1, as NEURON_LOGICAL_NC_CONFIG=1 does."""
    monkeypatch.setenv(LNC_ENV, "1")


BF16 = np.dtype(ml_dtypes.bfloat16)


def _private_copy(x):
    src = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.private_hbm)
    nisa.dma_copy(dst=src, src=x)
    return src


@nki.jit
def hbm_collective(x, kind, replica_group, op=None, dim=0, out_shape=None):
    src = _private_copy(x)
    out = nl.ndarray(out_shape or x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    cc = nki.collectives
    if kind == "all_reduce":
        cc.all_reduce(srcs=[src], dsts=[out], replica_group=replica_group, op=op)
    elif kind == "all_gather":
        cc.all_gather(srcs=[src], dsts=[out], replica_group=replica_group, collective_dim=dim)
    elif kind == "reduce_scatter":
        cc.reduce_scatter(srcs=[src], dsts=[out], replica_group=replica_group, collective_dim=dim, op=op)
    elif kind == "all_to_all":
        cc.all_to_all(srcs=[src], dsts=[out], replica_group=replica_group, collective_dim=dim)
    return out


def _run(kernel, xs, **static):
    return nki.multi_rank_simulate(kernel, world_size=len(xs), per_rank_inputs=[((x,), dict(static)) for x in xs])


def _inputs(rng, n, shape, dtype=np.float32):
    return [rng.standard_normal(shape).astype(np.float32).astype(dtype) for _ in range(n)]


# ============================================================== semantics


@settings(deadline=None, max_examples=10)
@given(n=st.sampled_from([2, 4]), op=st.sampled_from(["add", "maximum", "minimum"]), rows=st.integers(1, 9),
       seed=st.integers(0, 2 ** 31))
def test_all_reduce_over_every_rank_list(n, op, rows, seed):
    rng = np.random.default_rng(seed)
    xs = _inputs(rng, n, (rows, 5))
    groups = [[0, 1], [2, 3]] if n == 4 else [[0, 1]]
    outs = _run(hbm_collective, xs, kind="all_reduce", replica_group=ReplicaGroup(groups), op=getattr(nl, op))
    npop = {"add": np.add, "maximum": np.maximum, "minimum": np.minimum}[op]
    for g in groups:
        want = xs[g[0]].astype(np.float64)
        for r in g[1:]:
            want = npop(want, xs[r])
        for r in g:
            np.testing.assert_allclose(outs[r], want, rtol=1e-6, atol=1e-6)


def test_all_reduce_bf16_rounds_once():
    vals = [np.full((2, 4), v, np.float32).astype(BF16) for v in (1.0, 2 ** -8, 2 ** -8)]
    outs = _run(hbm_collective, vals, kind="all_reduce", replica_group=ReplicaGroup([[0, 1, 2]]), op=nl.add)
    # the fp32 sum 1 + 2^-7 is a bf16 value; rounding to bf16 after each add would tie to 1.0 twice
    assert float(outs[0][0, 0]) == 1.0 + 2 ** -7
    assert outs[0].dtype == BF16


def test_all_gather_and_reduce_scatter_and_all_to_all(rng):
    n = 4
    xs = _inputs(rng, n, (8, 3))
    g = ReplicaGroup([[0, 1, 2, 3]])
    ag = _run(hbm_collective, xs, kind="all_gather", replica_group=g, out_shape=(32, 3))
    for r in range(n):
        np.testing.assert_array_equal(ag[r], np.concatenate(xs, axis=0))
    rs = _run(hbm_collective, xs, kind="reduce_scatter", replica_group=g, op=nl.add, out_shape=(2, 3))
    total = sum(x.astype(np.float64) for x in xs)
    for r in range(n):
        np.testing.assert_allclose(rs[r], total[2 * r:2 * r + 2], rtol=1e-6)
    a2a = _run(hbm_collective, xs, kind="all_to_all", replica_group=g)
    for r in range(n):
        np.testing.assert_array_equal(a2a[r], np.concatenate([xs[s][2 * r:2 * r + 2] for s in range(n)]))


def test_rank_list_order_not_rank_order(rng):
    """all_gather concatenates in rank-list order: [[2, 0, 3, 1]] puts rank 2's data first."""
    xs = _inputs(rng, 4, (2, 2))
    outs = _run(hbm_collective, xs, kind="all_gather", replica_group=ReplicaGroup([[2, 0, 3, 1]]), out_shape=(8, 2))
    np.testing.assert_array_equal(outs[1], np.concatenate([xs[2], xs[0], xs[3], xs[1]]))


@nki.jit
def sbuf_gather(x, replica_group, dim):
    n = len(replica_group.rank_lists[0])
    p, f = x.shape
    sb = nl.ndarray((p, f), x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=sb, src=x)
    shape = (p * n, f) if dim == 0 else (p, f * n)
    gathered = nl.ndarray(shape, x.dtype, buffer=nl.sbuf)
    nki.collectives.all_gather(srcs=[sb], dsts=[gathered], replica_group=replica_group, collective_dim=dim)
    out = nl.ndarray(shape, x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=gathered)
    return out


@pytest.mark.parametrize("dim", [0, 1])
def test_sbuf_all_gather_on_partitions_or_free_dim(rng, dim):
    xs = _inputs(rng, 2, (16, 6))
    outs = _run(sbuf_gather, xs, replica_group=ReplicaGroup([[0, 1]]), dim=dim)
    for o in outs:
        np.testing.assert_array_equal(o, np.concatenate(xs, axis=dim))


@nki.jit
def permute_kernel(x, pairs):
    src = _private_copy(x)
    out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=x)                 # ranks that receive nothing keep their own data
    nki.collectives.collective_permute(srcs=[src], dsts=[out], source_target_pairs=pairs)
    return out


def test_collective_permute_ring_shift(rng):
    xs = _inputs(rng, 4, (3, 4))
    pairs = [(0, 1), (1, 2), (2, 3)]              # rank 0 receives nothing
    outs = _run(permute_kernel, xs, pairs=pairs)
    np.testing.assert_array_equal(outs[0], xs[0])
    for s, t in pairs:
        np.testing.assert_array_equal(outs[t], xs[s])


@nki.jit
def rank_slice_kernel(table):
    """Each rank copies row `rank_id` of the table: rank_id as a DMA scalar_offset."""
    rid = nki.collectives.rank_id()
    row = nl.ndarray((1, table.shape[1]), table.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=row, src=table.ap(pattern=[[table.shape[1], 1], [1, table.shape[1]]], scalar_offset=rid))
    out = nl.ndarray((1, table.shape[1]), table.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=row)
    return out


def test_rank_id_selects_each_ranks_row(rng):
    table = rng.standard_normal((4, 7)).astype(np.float32)
    outs = nki.multi_rank_simulate(rank_slice_kernel, world_size=4, per_rank_inputs=[((table,), {})] * 4)
    for r in range(4):
        np.testing.assert_array_equal(outs[r], table[r:r + 1])


def test_replica_group_from_partition_op():
    assert ReplicaGroup.from_partition_op(8, rg_partition_op.bitwise_and, 0).rank_lists == [list(range(8))]
    assert ReplicaGroup.from_partition_op(8, rg_partition_op.div, 4).rank_lists == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ReplicaGroup.from_partition_op(8, rg_partition_op.mod, 4).rank_lists == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with raises("more than one place"):
        ReplicaGroup([[0, 1], [1, 2]])


# ============================================================== worked example: tensor-parallel matmul


@nki.jit
def tp_row_parallel_matmul(x_shard_t, w_shard, replica_group):
    """y = x @ w with the contraction split across ranks: each rank multiplies its K-shard, then all_reduce.

    x_shard_t: [K/n, M] (this rank's rows of x.T), w_shard: [K/n, N]; returns y [M, N] (fp32) on every rank."""
    k, m = x_shard_t.shape
    n = w_shard.shape[1]
    xs = nl.ndarray((k, m), x_shard_t.dtype, buffer=nl.sbuf)
    ws = nl.ndarray((k, n), w_shard.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xs, src=x_shard_t)
    nisa.dma_copy(dst=ws, src=w_shard)
    ps = nl.ndarray((m, n), nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=xs, moving=ws)
    part_sb = nl.ndarray((m, n), nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=part_sb, src=ps)
    sum_sb = nl.ndarray((m, n), nl.float32, buffer=nl.sbuf)
    nki.collectives.all_reduce(srcs=[part_sb], dsts=[sum_sb], replica_group=replica_group, op=nl.add)
    y = nl.ndarray((m, n), nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=y, src=sum_sb)
    return y


def test_worked_example_tp_matmul_with_sbuf_all_reduce(rng):
    tp, K, M, N = 4, 256, 16, 64
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    kk = K // tp
    inputs = [((np.ascontiguousarray(x[:, r * kk:(r + 1) * kk].T), w[r * kk:(r + 1) * kk]),
               {"replica_group": ReplicaGroup([list(range(tp))])}) for r in range(tp)]
    with record_launches() as launches:
        res = run_ranks(tp_row_parallel_matmul, world_size=tp, per_rank_inputs=inputs)
    assert len(launches) == 1 and launches[0] is res and res.ranks == tp and len(res.traces) == tp
    for y in res.outputs:
        np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-3)
    rep = model_launches([res])
    cc_us = collective_us("all_reduce", M * N * 4, tp, chips=1)
    assert rep.device_us > cc_us > 0
    assert any(ins.meta.get("collective") == "all_reduce" and ins.meta["ranks"] == tp for ins in res.traces[0])


# ============================================================== checks


def _my_rank():
    """The emulator's rank of the calling thread: a test-only shortcut to make ranks diverge (a real kernel is
    traced once, so its ranks cannot)."""
    from nki_kernels.emulator.collectives import _ctx
    return _ctx.rank


def test_static_arguments_must_match(rng):
    xs = _inputs(rng, 2, (2, 2))
    with raises("static and must be equal"):
        nki.multi_rank_simulate(hbm_collective, world_size=2, per_rank_inputs=[
            ((xs[0],), {"kind": "all_reduce", "replica_group": ReplicaGroup([[0, 1]]), "op": nl.add}),
            ((xs[1],), {"kind": "all_reduce", "replica_group": ReplicaGroup([[0, 1]]), "op": nl.maximum})])


def test_ranks_issuing_different_collectives_fail(rng):
    g = ReplicaGroup([[0, 1]])

    def body(x):
        kind = "all_reduce" if _my_rank() == 0 else "all_gather"
        return hbm_collective.fn(x, kind, g, op=nl.add, out_shape=x.shape if kind == "all_reduce" else (4, 2))

    with raises("same collectives with the same shapes"):
        nki.multi_rank_simulate(body, world_size=2, per_rank_inputs=[((x,), {}) for x in _inputs(rng, 2, (2, 2))])


def test_rank_that_never_arrives_is_reported(rng):
    g = ReplicaGroup([[0, 1]])

    def body(x):
        src = _private_copy(x)
        out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
        for _ in range(1 + _my_rank()):           # rank 1 issues a second all_reduce that rank 0 never does
            nki.collectives.all_reduce(srcs=[src], dsts=[out], replica_group=g, op=nl.add)
        return out

    with raises("finished its kernel without reaching it"):
        nki.multi_rank_simulate(body, world_size=2, per_rank_inputs=[((x,), {}) for x in _inputs(rng, 2, (2, 2))])


def test_operand_rules(rng):
    x = np.ones((4, 4), np.float32)
    g = ReplicaGroup([[0, 1]])

    @nki.jit
    def shared_src(x):
        out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
        nki.collectives.all_reduce(srcs=[x], dsts=[out], replica_group=g, op=nl.add)
        return out

    with raises("private_hbm"):
        nki.multi_rank_simulate(shared_src, world_size=2, per_rank_inputs=[((x,), {})] * 2)

    @nki.jit
    def bad_op(x):
        src = _private_copy(x)
        out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
        nki.collectives.all_reduce(srcs=[src], dsts=[out], replica_group=g, op=nl.multiply)
        return out

    with raises("nl.add, nl.minimum or nl.maximum"):
        nki.multi_rank_simulate(bad_op, world_size=2, per_rank_inputs=[((x,), {})] * 2)

    @nki.jit
    def sbuf_a2a(x):
        sb = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=sb, src=x)
        o = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
        nki.collectives.all_to_all(srcs=[sb], dsts=[o], replica_group=g, collective_dim=0)
        return x

    with raises("must reside on HBM"):
        nki.multi_rank_simulate(sbuf_a2a, world_size=2, per_rank_inputs=[((x,), {})] * 2)

    @nki.jit
    def sbuf_3d(x):
        sb = nl.ndarray((4, 2, 2), x.dtype, buffer=nl.sbuf)
        o = nl.ndarray((4, 2, 2), x.dtype, buffer=nl.sbuf)
        nki.collectives.all_reduce(srcs=[sb], dsts=[o], replica_group=g, op=nl.add)
        return x

    with raises("2-D tensors with one free dim"):
        nki.multi_rank_simulate(sbuf_3d, world_size=2, per_rank_inputs=[((x,), {})] * 2)

    with raises("rank 2 does not exist"):
        nki.multi_rank_simulate(hbm_collective, world_size=2, per_rank_inputs=[
            ((x,), {"kind": "all_reduce", "replica_group": ReplicaGroup([[0, 2]]), "op": nl.add})] * 2)
    with raises("collectives need several ranks"):
        hbm_collective(x, "all_reduce", g, nl.add)
    with raises("same shape and dtype"):
        nki.multi_rank_simulate(hbm_collective, world_size=2, per_rank_inputs=[
            ((x,), {"kind": "all_reduce", "replica_group": g, "op": nl.add}),
            ((x[:2],), {"kind": "all_reduce", "replica_group": g, "op": nl.add})])


# ============================================================== cost


def test_collective_cost_latency_and_bandwidth_terms():
    small = collective_us("all_reduce", 1024, 4, chips=1)
    big = collective_us("all_reduce", 64 << 20, 4, chips=1)
    assert 1.0 <= small <= 10.0                     # latency-bound: 10^0-10^1 us (intranode-collective-comm.rst)
    assert big > 100 * small                        # bandwidth-bound
    assert collective_us("all_reduce", 1024, 1) == 0.0
    # a ring needs (n-1) steps per phase: more ranks, more latency for small messages or more bytes moved
    assert collective_us("all_gather", 1 << 20, 8, chips=2) >= collective_us("all_gather", 1 << 20, 2, chips=1)
