"""Every hardware check raises EmulatorCheckError naming the instruction, the operand and the limit."""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import BF16, hbm_out, jit, kernel_run, nisa, nl, on_chip, raises, rnd, run, sb_load

from nki_kernels.emulator import EmulatorCheckError, use_target

# ============================================================== partitions


def test_more_than_128_partitions():
    def k(a):
        t = nl.ndarray((129, 4), nl.float32, buffer=nl.sbuf, name="big")
        return hbm_out(t)
    with raises("ndarray", "'big'", "partition dim 129", "128"):
        kernel_run(k, np.zeros((1, 1), np.float32))

    def kp(a):
        t = nl.ndarray((200, 4), nl.float32, buffer=nl.psum)
        return hbm_out(t)
    with raises("partition dim 200", "128"):
        kernel_run(kp, np.zeros((1, 1), np.float32))


def test_dma_into_view_with_more_than_128_partitions_from_hbm_is_fine_but_compute_view_is_checked(rng):
    # HBM tensors may have any leading dim; only on-chip operands are limited.
    x = rnd(rng, (300, 4))

    def k(a):
        out = nl.ndarray((300, 4), nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=a)
        return out
    np.testing.assert_array_equal(kernel_run(k, x).outputs, x)


# ============================================================== PSUM


def test_matmul_result_crossing_a_psum_bank(rng):
    a, b = rnd(rng, (16, 16), BF16), rnd(rng, (16, 512), BF16)

    def step(x, y):
        ps = nl.ndarray((16, 1024), nl.float32, buffer=nl.psum)     # two banks
        nisa.nc_matmul(ps[:, 256:768], x, y)                        # bytes 1024..3071: crosses 2048
        return ps
    with raises("nc_matmul", "'dst'", "2048 B PSUM bank"):
        on_chip(step, a, b)

    def ok(x, y):
        ps = nl.ndarray((16, 1024), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps[:, 512:1024], x, y)                       # exactly the second bank
        return ps[:, 512:1024]
    np.testing.assert_allclose(on_chip(ok, a, b), a.astype(np.float32).T @ b.astype(np.float32), rtol=1e-4,
                               atol=1e-4)


def test_more_than_8_live_psum_banks():
    def k(a):
        big = nl.ndarray((128, 7 * 512), nl.float32, buffer=nl.psum)    # 7 banks
        one = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)        # 8th bank: fine
        extra = nl.ndarray((128, 1), nl.float32, buffer=nl.psum, name="ninth")    # any size takes a bank
        return big, one, extra
    with raises("ndarray", "'ninth'", "1 bank(s)", "8 of 8 banks"):
        kernel_run(k, np.zeros((1, 1), np.float32))


def test_psum_tensor_larger_than_16k_per_partition():
    def k(a):
        t = nl.ndarray((128, 4097), nl.float32, buffer=nl.psum, name="huge")
        return t
    with raises("'huge'", "16388 B", "16384 B per partition", "8 banks"):
        kernel_run(k, np.zeros((1, 1), np.float32))


def test_psum_free_size_per_instruction_limit(rng):
    def step(x):
        ps = nl.ndarray((2, 4100), nl.bfloat16, buffer=nl.psum)
        nisa.memset(ps, 0.0)
        return x
    with raises("memset", "'dst'", "4100 elements per partition", "4096"):
        on_chip(step, rnd(rng, (2, 2)))


# ============================================================== TensorE memory rules and limits


def test_matmul_operand_in_psum(rng):
    def step(x):
        ps = nl.ndarray((8, 8), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        ps2 = nl.ndarray((8, 8), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps2, ps, x)
        return ps2
    with raises("nc_matmul", "'stationary'", "psum", "sbuf"):
        on_chip(step, rnd(rng, (8, 8)))


def test_matmul_result_not_in_psum(rng):
    def step(x):
        o = nl.ndarray((8, 8), nl.float32, buffer=nl.sbuf)
        nisa.nc_matmul(o, x, x)
        return o
    with raises("nc_matmul", "'dst'", "sbuf", "only to psum"):
        on_chip(step, rnd(rng, (8, 8)))


@pytest.mark.parametrize("m,n,frag", [(129, 64, "M=129 exceeds the limit 128"),
                                      (64, 513, "N=513 exceeds the limit 512")])
def test_matmul_m_n_limits(rng, m, n, frag):
    a, b = rnd(rng, (32, m), BF16), rnd(rng, (32, n), BF16)

    def step(x, y):
        ps = nl.ndarray((min(m, 128), n), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps[0:min(m, 128), :] if m <= 128 else ps, x, y)
        return ps
    with raises("nc_matmul", frag, "trn2"):
        on_chip(step, a, b)


def test_matmul_k_limit_and_mismatch(rng):
    # K > 128 cannot even be placed on the partitions; a K mismatch is caught by the instruction.
    def k(a):
        t = nl.ndarray((256, 64), nl.bfloat16, buffer=nl.sbuf, name="stationary_k256")
        return hbm_out(t)
    with raises("'stationary_k256'", "partition dim 256", "128"):
        kernel_run(k, np.zeros((1, 1), np.float32))

    def step(x, y):
        ps = nl.ndarray((16, 16), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, y)
        return ps
    with raises("nc_matmul", "'moving'", "contraction", "32", "64"):
        on_chip(step, rnd(rng, (64, 16), BF16), rnd(rng, (32, 16), BF16))


def test_matmul_dtype_pairing_and_result_dtype(rng):
    def step(x, y):
        ps = nl.ndarray((8, 8), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, y)
        return ps
    with raises("nc_matmul", "'moving'", "fp32 inputs must be paired with fp32"):
        on_chip(step, rnd(rng, (8, 8)), rnd(rng, (8, 8), BF16))

    def bf16_psum(x):
        ps = nl.ndarray((8, 8), nl.bfloat16, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        return ps
    with raises("nc_matmul", "'dst'", "bfloat16", "trn2"):
        on_chip(bf16_psum, rnd(rng, (8, 8), BF16))
    with use_target("trn3"):                      # v4 may write bf16 PSUM
        out = on_chip(bf16_psum, rnd(rng, (8, 8), BF16))
        assert out.dtype == BF16


# ============================================================== engines and memories


def test_compute_instruction_reading_hbm(rng):
    def k(a):
        o = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=a, data2=a, op=nl.add)
        return hbm_out(o)
    with raises("tensor_tensor", "'data1'", "hbm", "sbuf/psum"):
        kernel_run(k, rnd(rng, (4, 4)))

    def k2(a):
        o = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=nl.exp, data=a)
        return hbm_out(o)
    with raises("activation", "'data'", "hbm"):
        kernel_run(k2, rnd(rng, (4, 4)))

    def k3(a):
        out = nl.ndarray(a.shape, nl.float32, buffer=nl.shared_hbm)
        t = sb_load(a)
        nisa.tensor_copy(dst=out, src=t)
        return out
    with raises("tensor_copy", "'dst'", "hbm"):
        kernel_run(k3, rnd(rng, (4, 4)))


def test_dma_from_or_to_psum(rng):
    def k(a):
        t = sb_load(a)
        ps = nl.ndarray((4, 4), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, t, t)
        out = nl.ndarray((4, 4), nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=ps)
        return out
    with raises("dma_copy", "'src'", "psum", "dma cannot"):
        kernel_run(k, rnd(rng, (4, 4)))

    def k_store(a):
        t = sb_load(a)
        ps = nl.ndarray((4, 4), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, t, t)
        out = nl.ndarray((4, 4), nl.float32, buffer=nl.shared_hbm)
        nl.store(out, ps)
        return out
    with raises("store", "'value'", "psum"):
        kernel_run(k_store, rnd(rng, (4, 4)))


def test_gpsimd_on_psum(rng):
    def iota_psum(x):
        ps = nl.ndarray((4, 4), nl.float32, buffer=nl.psum)
        nisa.iota(ps, pattern=[[1, 4]], offset=0)
        return ps
    with raises("iota", "'dst'", "psum", "sbuf"):
        on_chip(iota_psum, rnd(rng, (4, 4)))

    def copy_gpsimd(x):
        ps = nl.ndarray((4, 4), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        o = nl.ndarray((4, 4), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=ps, engine=nisa.gpsimd_engine)
        return o
    with raises("tensor_copy", "'src'", "psum", "gpsimd"):
        on_chip(copy_gpsimd, rnd(rng, (4, 4)))

    def power_psum(x):
        ps = nl.ndarray((4, 4), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        o = nl.ndarray((4, 4), nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=ps, data2=x, op=nl.power)
        return o
    with raises("tensor_tensor", "power", "psum"):
        on_chip(power_psum, rnd(rng, (4, 4)))


def test_int_tensor_tensor_with_psum_falls_back_to_vector(rng):
    # NKI 0.6: the automatic GpSimd choice for int32 falls back to VectorE when an operand is in PSUM.
    def k(a):
        t = sb_load(a)
        ps = nl.ndarray((4, 4), nl.int32, buffer=nl.psum)
        nisa.tensor_copy(dst=ps, src=t)
        o = nl.ndarray((4, 4), nl.int32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=ps, data2=t, op=nl.add)
        return hbm_out(o)
    r = kernel_run(k, np.arange(16, dtype=np.int32).reshape(4, 4))
    np.testing.assert_array_equal(r.outputs, 2 * np.arange(16).reshape(4, 4))
    assert [i.engine for i in r.trace if i.name == "tensor_tensor"] == ["dve"]


# ============================================================== bounds, shapes, dtypes


def test_out_of_bounds_static_slices_and_indices(rng):
    def k(a):
        t = sb_load(a)
        return hbm_out(t[0:4, 2:9])
    with raises("index", "slice [2:9]", "dim 1 of size 8"):
        kernel_run(k, rnd(rng, (4, 8)))

    def k2(a):
        return hbm_out(sb_load(a[5]))
    with raises("index", "index 5", "dim 0 of size 4"):
        kernel_run(k2, rnd(rng, (4, 8)))

    def k3(a):
        t = sb_load(a)
        return hbm_out(t.ap(pattern=[[8, 4], [1, 9]]))
    with raises("ap", "outside"):
        kernel_run(k3, rnd(rng, (4, 8)))


def test_out_of_bounds_dynamic_accesses(rng):
    def k(a, idx):
        i_sb = sb_load(idx)
        t = nl.ndarray((2, 8), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=a.ap(pattern=[[8, 2], [1, 8]], vector_offset=i_sb, indirect_dim=0))
        return hbm_out(t)
    with raises("dma_copy", "'a'", "outside the tensor's 32 elements"):
        kernel_run(k, rnd(rng, (4, 8)), np.array([[1], [4]], np.int32))

    def ks(a, e):
        e_sb = sb_load(e)
        t = nl.ndarray((4, 8), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=a.ap(pattern=[[8, 4], [1, 8]], scalar_offset=e_sb, indirect_dim=0))
        return hbm_out(t)
    with raises("dma_copy", "outside"):
        kernel_run(ks, rnd(rng, (3, 4, 8)), np.array([[3]], np.int32))

    def kc(a, idx):
        i_sb = sb_load(idx)
        t = sb_load(a)
        o = nl.ndarray((2, 8), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=t.ap(pattern=[[8, 2], [1, 8]], vector_offset=i_sb, indirect_dim=0))
        return hbm_out(o)
    with raises("tensor_copy", "'src'", "only valid in dma"):
        kernel_run(kc, rnd(rng, (4, 8)), np.array([[1], [2]], np.int32))


def test_shape_mismatch_no_broadcasting(rng):
    def tt(x, y):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=x, data2=y, op=nl.add)
        return o
    with raises("tensor_tensor", "'data2'", "32 elements per partition do not match", "64", "no broadcasting"):
        on_chip(tt, rnd(rng, (16, 64)), rnd(rng, (16, 32)))
    with raises("tensor_tensor", "'data2'", "partition dim 8 does not match", "16"):
        on_chip(tt, rnd(rng, (16, 4)), rnd(rng, (8, 8)))
    with raises("nl.add", "'y'", "do not broadcast"):
        on_chip(lambda x, y: nl.add(x, y), rnd(rng, (16, 4)), rnd(rng, (16, 1)))

    def dma_count(x):
        o = nl.ndarray((16, 5), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=o, src=x)
        return o
    with raises("dma_copy", "'dst'", "80 elements do not match src's 64"):
        on_chip(dma_count, rnd(rng, (16, 4)))

    def scalar_op(x, c):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=o, data=x, op0=nl.add, operand0=c)
        return o
    with raises("tensor_scalar", "'operand0'", "(16, 1)"):
        on_chip(scalar_op, rnd(rng, (16, 4)), rnd(rng, (16, 2)))


def test_dtype_mismatches(rng):
    def tr(x):
        t = nl.ndarray((x.shape[1], x.shape[0]), nl.bfloat16, buffer=nl.psum)
        nisa.nc_transpose(t, x)
        return t
    with raises("nc_transpose", "'dst'", "dtype bfloat16 must equal", "float32"):
        on_chip(tr, rnd(rng, (8, 8)))

    def bitwise_float(x):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=x, data2=x, op=nl.bitwise_and)
        return o
    with raises("bitwise", "integer"):
        on_chip(bitwise_float, rnd(rng, (4, 4)))

    def int_matmul(x):
        ps = nl.ndarray((4, 4), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        return ps
    with raises("nc_matmul", "int32", "not a matmul input dtype"):
        on_chip(int_matmul, np.ones((4, 4), np.int32))


def test_reducing_over_the_partition_axis(rng):
    with raises("nl.add", "axis", "partition"):
        on_chip(lambda x: nl.sum(x, axis=0), rnd(rng, (8, 4)))
    with raises("nl.maximum", "partition"):
        on_chip(lambda x: nl.max(x, axis=(0, 1)), rnd(rng, (8, 4)))


def test_api_misuse_messages(rng):
    with raises("nl.divide", "not supported", "reciprocal"):
        on_chip(lambda x: nl.divide(x, x), rnd(rng, (4, 4)))
    with raises("nl.matmul", "transpose_x"):
        on_chip(lambda x: nl.matmul(x, x), rnd(rng, (4, 4)))

    def numpy_op(x):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=x, data2=x, op=np.add)
        return o
    with raises("tensor_tensor", "'op'", "nl.*"):
        on_chip(numpy_op, rnd(rng, (4, 4)))

    def string_buffer(a):
        return nl.ndarray((4, 4), nl.float32, buffer="sbuf")
    with raises("ndarray", "objects, not strings"):
        kernel_run(string_buffer, rnd(rng, (4, 4)))

    def setitem(x):
        x[0, 0] = 1.0
        return x
    with raises("tensor", "item assignment"):
        on_chip(setitem, rnd(rng, (4, 4)))

    def psum_output(a):
        return nl.ndarray((4, 4), nl.float32, buffer=nl.sbuf)
    with raises("return", "shared_hbm"):
        kernel_run(psum_output, rnd(rng, (4, 4)))

    with pytest.raises(EmulatorCheckError, match="only valid inside a running kernel"):
        nl.ndarray((4, 4), nl.float32, buffer=nl.sbuf)


def test_start_partition_rule_only_on_trn1(rng):
    def step(x):
        o = nl.ndarray((128, 8), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o[16:56, :], src=x[16:56, :])      # 40 partitions starting at 16
        return o[16:56, :]
    x = rnd(rng, (128, 8))
    np.testing.assert_array_equal(on_chip(step, x), x[16:56])  # trn2: no documented rule
    with use_target("trn1"):
        with raises("tensor_copy", "40 partitions may not start at partition 16", "trn1"):
            on_chip(step, x)


# ============================================================== launch


def test_launch_lnc_must_be_1_or_2(rng):
    @jit
    def k(a):
        return hbm_out(sb_load(a))
    x = rnd(rng, (4, 4))
    with raises("launch", "lnc must be one of (1, 2)", "3"):
        k[3](x)
    with raises("launch", "exactly one number"):
        k[1, 2](x)
    with raises("launch", "0"):
        run(k, x, lnc=0)
    with raises("dma_copy", "'dst'", "program 1 writes shared-hbm elements", "program 0"):
        k[2](x)                                   # both programs write the whole output


def test_float_activation_bias_needs_v3(rng):
    def step(x):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=nl.exp, data=x, bias=1.0)
        return o
    x = rnd(rng, (4, 4))
    np.testing.assert_allclose(on_chip(step, x), np.exp(x + 1.0), rtol=1e-6)
    with use_target("trn1"):
        with raises("activation", "'bias'", "(p,1) tile on trn1"):
            on_chip(step, x)


def test_dma_scatter_with_oob_skip_drops_padded_ids(rng):
    rows = rnd(rng, (4, 8))
    ids = np.array([[1], [-1], [6], [99]], np.int32)

    def k(u, idx):
        out = nl.ndarray((7, 8), nl.float32, buffer=nl.shared_hbm)
        z = nl.zeros((7, 8), nl.float32)
        nisa.dma_copy(dst=out, src=z)
        nisa.dma_copy(dst=out.ap(pattern=[[8, 4], [1, 8]], vector_offset=sb_load(idx), indirect_dim=0),
                      src=sb_load(u), oob_mode=nisa.oob_mode.skip)
        return out
    out = kernel_run(k, rows, ids).outputs
    want = np.zeros((7, 8), np.float32)
    want[1], want[6] = rows[0], rows[2]
    np.testing.assert_array_equal(out, want)


def test_partition_striding_and_free_pattern_crossing_partitions(rng):
    def strided(x):
        o = nl.ndarray((4, 16), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=x[0:8:2, :])
        return o
    with raises("tensor_copy", "'src'", "one partition at a time"):
        on_chip(strided, rnd(rng, (8, 16)))

    def crossing(x):
        o = nl.ndarray((4, 20), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=x.ap(pattern=[[16, 4], [1, 20]]))
        return o
    with raises("tensor_copy", "'src'", "crosses into another partition"):
        on_chip(crossing, rnd(rng, (8, 16)))

    def reshape_partitions(x):
        return x.reshape((4, 32))
    with raises("reshape", "partition dim 8"):
        on_chip(reshape_partitions, rnd(rng, (8, 16)))


def test_enum_arguments_take_members_not_ints(rng):
    def k(a):
        t = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=a, oob_mode=1)
        return hbm_out(t)
    with raises("dma_copy", "'oob_mode'", "nisa.oob_mode member"):
        kernel_run(k, rnd(rng, (2, 2)))

    def k2(x):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        r = nl.ndarray((2, 1), nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=nl.exp, data=x, reduce_op=nl.add, reduce_res=r, reduce_cmd=3)
        return r
    with raises("activation", "'reduce_cmd'", "nisa.reduce_cmd member"):
        on_chip(k2, rnd(rng, (2, 2)))


def test_dma_copy_third_positional_argument_is_priority(rng):
    def k(a):
        t = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(t, a, nisa.oob_mode.skip)          # NKI 0.6: the third parameter is `priority`
        return hbm_out(t)
    with raises("dma_copy", "'priority'", "neuroncore-v4"):
        kernel_run(k, rnd(rng, (2, 2)))
