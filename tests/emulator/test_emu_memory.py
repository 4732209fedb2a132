"""SBUF/PSUM accounting: per-target capacity, the same-site retirement rule, and genuinely live tensors."""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import hbm_out, kernel_run, nisa, nl, raises

from nki_kernels.emulator import get_target, use_target

ONE = np.zeros((1, 1), np.float32)


def _alloc_bytes(a, n_bytes):
    t = nl.ndarray((128, n_bytes), nl.uint8, buffer=nl.sbuf, name="blob")
    nisa.memset(t[0:1, 0:1], 1)
    return hbm_out(t[0:1, 0:1])


@pytest.mark.parametrize("target,cap", [("trn1", 180224), ("trn2", 212984), ("trn3", 245752)])
def test_sbuf_capacity_per_target_with_use_target(target, cap):
    with use_target(target):
        assert kernel_run(_alloc_bytes, ONE, n_bytes=cap).outputs[0, 0] == 1
        with raises("ndarray", "'blob'", f"{cap + 1} B per partition exceeds capacity", f"{cap} B", target):
            kernel_run(_alloc_bytes, ONE, n_bytes=cap + 1)


def test_sbuf_capacity_follows_the_env_override(monkeypatch):
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")
    assert get_target().name == "trn1"
    with raises("exceeds capacity", "180224 B", "trn1"):
        kernel_run(_alloc_bytes, ONE, n_bytes=200000)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn3")
    kernel_run(_alloc_bytes, ONE, n_bytes=240000)
    monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE")
    assert get_target().name == "trn2"                        # our default
    with use_target("trn1"):                                  # use_target wins over the env
        monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn3")
        assert get_target().name == "trn1"
    with pytest.raises(ValueError, match="unknown target"):
        get_target("trn9")


def test_loop_allocations_are_retired_each_iteration():
    def k(a):
        acc = nl.ndarray((1, 1), nl.float32, buffer=nl.sbuf)
        nisa.memset(acc, 0.0)
        for i in nl.affine_range(6):
            t = nl.ndarray((128, 40000), nl.float32, buffer=nl.sbuf)     # 160000 B; 6 of them would not fit
            nisa.memset(t, float(i))
            nisa.tensor_tensor(dst=acc, data1=acc, data2=t[0:1, 0:1], op=nl.add)
        return hbm_out(acc)
    r = kernel_run(k, ONE)
    assert r.outputs[0, 0] == sum(range(6))
    assert r.sbuf_peak_bytes == [4 + 160000]          # acc + one loop tile at a time


def test_helper_allocations_retire_per_call_site_but_both_live_when_kept():
    def helper(v):
        t = nl.ndarray((128, 30000), nl.float32, buffer=nl.sbuf, name="block")    # 120000 B
        nisa.memset(t, v)
        return t

    def loop_ok(a):
        for i in range(5):
            t = helper(float(i))           # same call stack each iteration: the previous block is retired
        return hbm_out(t[0:1, 0:1])
    assert kernel_run(loop_ok, ONE).outputs[0, 0] == 4.0

    def two_live(a):
        x = helper(1.0)                    # different lines: both are genuinely live
        y = helper(2.0)
        return hbm_out(x[0:1, 0:1]), hbm_out(y[0:1, 0:1])
    with raises("ndarray", "'block'", "120000 B live + 120000 B", "212984"):
        kernel_run(two_live, ONE)

    def freed_by_del(a):
        x = helper(1.0)
        out = hbm_out(x[0:1, 0:1])
        del x                              # the tensor's lifetime ends: its bytes are released
        y = helper(2.0)
        return out, hbm_out(y[0:1, 0:1])
    assert [float(v[0, 0]) for v in kernel_run(freed_by_del, ONE).outputs] == [1.0, 2.0]


def test_psum_banks_are_retired_in_loops_but_counted_when_live():
    def loop_ok(a):
        for i in range(20):
            ps = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
            nisa.memset(ps, float(i))
        return hbm_out(ps[0:1, 0:1])
    r = kernel_run(loop_ok, ONE)
    assert r.outputs[0, 0] == 19.0 and r.psum_peak_banks == [1]

    def live(a):
        ps = [None] * 9
        ps[0] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[1] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[2] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[3] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[4] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[5] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[6] = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
        ps[7] = nl.ndarray((128, 256), nl.float32, buffer=nl.psum)       # half a bank still takes a bank
        ps[8] = nl.ndarray((128, 2), nl.float32, buffer=nl.psum, name="ninth")
        return None
    with raises("'ninth'", "8 of 8 banks"):
        kernel_run(live, ONE)


def test_two_allocations_on_one_line_are_both_live():
    def k(a):
        x, y = nl.ndarray((128, 30000), nl.float32, buffer=nl.sbuf), nl.ndarray((128, 30000), nl.float32,
                                                                                 buffer=nl.sbuf, name="second")
        return x, y
    with raises("'second'", "120000 B live"):
        kernel_run(k, ONE)


def _pipelined(depth):
    """A software pipeline: each iteration allocates a 60000 B tile from one call site and reads it `depth`
    iterations later, so `depth + 1` of those tiles are in use at once."""
    def k(a):
        acc = nl.ndarray((1, 1), nl.float32, buffer=nl.sbuf)
        nisa.memset(acc, 0.0)
        in_flight = []
        for i in range(6):
            t = nl.ndarray((128, 15000), nl.float32, buffer=nl.sbuf, name="stage")
            nisa.memset(t, float(i))
            in_flight.append(t)
            if len(in_flight) > depth:
                old = in_flight.pop(0)
                nisa.tensor_tensor(dst=acc, data1=acc, data2=old[0:1, 0:1], op=nl.add)
        for old in in_flight:
            nisa.tensor_tensor(dst=acc, data1=acc, data2=old[0:1, 0:1], op=nl.add)
        return hbm_out(acc)
    return k


def test_liveness_counts_every_pipelined_tile_of_one_call_site():
    # depth 2: 3 tiles of 60000 B in use at once fit in 212984 B (the call-site rule alone counts one)
    r = kernel_run(_pipelined(2), ONE)
    assert r.outputs[0, 0] == sum(range(6))
    assert r.sbuf_peak_bytes == [4 + 3 * 60000]
    # depth 3: 4 x 60000 B = 240004 B in use at once cannot fit, although each allocation passed
    with raises("SBUF overflow by liveness", "240004 B per partition", "212984", "stage 60000"):
        kernel_run(_pipelined(3), ONE)


def test_liveness_counts_psum_banks_in_use_at_once():
    def k(a):
        tiles = []
        for i in range(9):
            ps = nl.ndarray((128, 512), nl.float32, buffer=nl.psum, name="acc_bank")
            nisa.memset(ps, float(i))
            tiles.append(ps)
        out = nl.ndarray((1, 1), nl.float32, buffer=nl.sbuf)
        nisa.memset(out, 0.0)
        for ps in tiles:                    # all nine banks are read after all were written
            nisa.tensor_tensor(dst=out, data1=out, data2=ps[0:1, 0:1], op=nl.add)
        return hbm_out(out)
    with raises("PSUM overflow by liveness", "9 PSUM banks", "8 PSUM banks"):
        kernel_run(k, ONE)
