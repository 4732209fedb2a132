"""causal_conv1d / causal_conv1d_update against the reference and transformers' semantics."""
import numpy as np
import pytest
from _gdn_inputs import BF16, DTYPES
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import causal_conv1d, causal_conv1d_update
from nki_kernels.deltanet import reference as ref
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


@given(b=st.integers(1, 3), c=st.sampled_from([1, 8, 130, 256]), t=st.integers(1, 70),
       with_state=st.booleans(), with_lens=st.booleans(), act=st.sampled_from(["silu", None]),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2 ** 16))
def test_matches_reference(b, c, t, with_state, with_lens, act, dtype, seed):
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    x = rng.standard_normal((b, c, t)).astype(dt)
    w = rng.standard_normal((c, 4)).astype(dt)
    state = rng.standard_normal((b, c, 4)).astype(dt) if with_state else None
    lens = rng.integers(0, t + 1, b) if with_lens else None
    y, new_state = causal_conv1d(x, w, conv_state=state, valid_lengths=lens, activation=act)
    ry, rstate = ref.causal_conv1d(x, w, conv_state=state, valid_lengths=lens, activation=act)
    assert y.shape == x.shape and y.dtype == x.dtype and new_state.shape == (b, c, 4)
    assert_close("y", ry, y, dtype=dtype)
    assert_close("new conv state", rstate, new_state, dtype=dtype)


@given(t1=st.integers(1, 40), steps=st.lists(st.integers(1, 3), min_size=1, max_size=4), seed=st.integers(0, 2 ** 16))
def test_update_after_prefill_equals_longer_prefill(t1, steps, seed):
    rng = np.random.default_rng(seed)
    total = t1 + sum(steps)
    x = rng.standard_normal((2, 136, total)).astype(np.float32)
    w = rng.standard_normal((136, 4)).astype(np.float32)
    y_all, s_all = causal_conv1d(x, w)
    _, state = causal_conv1d(x[:, :, :t1], w)
    t = t1
    for n in steps:
        y = causal_conv1d_update(x[:, :, t:t + n], state, w)
        assert_close(f"update y [{t}:{t + n}]", y_all[:, :, t:t + n], y)
        t += n
    np.testing.assert_array_equal(state, s_all)      # the state is a copy of inputs: exact


def test_padding_state_is_last_valid_inputs(rng):
    x = rng.standard_normal((3, 16, 10)).astype(np.float32)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    prev = rng.standard_normal((3, 16, 4)).astype(np.float32)
    _, s = causal_conv1d(x, w, conv_state=prev, valid_lengths=np.array([10, 2, 0]))
    np.testing.assert_array_equal(s[0], x[0, :, 6:10])
    np.testing.assert_array_equal(s[1], np.concatenate([prev[1, :, 2:], x[1, :, :2]], axis=1))
    np.testing.assert_array_equal(s[2], prev[2])


def test_matches_transformers_semantics(rng):
    """transformers: y = silu(conv1d(x, padding=K-1)[..., :T]); state = F.pad(x, (K - T, 0)) (last K inputs);
    update: cat(state, x) -> conv over the window, state <- last K columns."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    b, c, t, kw = 2, 40, 7, 4
    x = rng.standard_normal((b, c, t)).astype(np.float32)
    w = rng.standard_normal((c, kw)).astype(np.float32)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    y_hf = F.silu(F.conv1d(tx, tw.unsqueeze(1), padding=kw - 1, groups=c)[..., :t])
    state_hf = F.pad(tx, (kw - t, 0)) if t < kw else tx[..., -kw:]
    y, s = causal_conv1d(x, w)
    assert_close("y vs transformers", y_hf.numpy(), y)
    np.testing.assert_array_equal(s, state_hf.numpy())
    x1 = rng.standard_normal((b, c, 1)).astype(np.float32)
    cat = torch.cat([torch.from_numpy(s), torch.from_numpy(x1)], dim=-1)
    y1_hf = F.silu(F.conv1d(cat, tw.unsqueeze(1), groups=c)[..., -1:])
    y1 = causal_conv1d_update(x1, s, w)
    assert_close("update y vs transformers", y1_hf.numpy(), y1)
    np.testing.assert_array_equal(s, cat[..., -kw:].numpy())


def test_bf16_torch_in_place_update(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((1, 24, 1)).astype(np.float32)).to(torch.bfloat16)
    w = torch.from_numpy(rng.standard_normal((24, 4)).astype(np.float32)).to(torch.bfloat16)
    state = torch.from_numpy(rng.standard_normal((1, 24, 4)).astype(np.float32)).to(torch.bfloat16)
    before = state.float().numpy().copy()
    y = causal_conv1d_update(x, state, w)
    ry, rs = ref.causal_conv1d_update(x.float().numpy(), before, w.float().numpy())
    assert y.dtype == torch.bfloat16
    assert_close("y", ry, y.float().numpy(), dtype="bfloat16")
    assert_close("state", rs, state.float().numpy(), dtype="bfloat16")


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.zeros((2, 8), np.float32)), r"x must be \[B, C, T\]"),
    (dict(weight=np.zeros((7, 4), np.float32)), "weight must be"),
    (dict(weight=np.zeros((8, 9), np.float32)), "kernel width K"),
    (dict(x=np.zeros((2, 8, 5), np.int32)), "x dtype"),
    (dict(conv_state=np.zeros((2, 8, 3), np.float32)), "conv_state must be"),
    (dict(valid_lengths=np.array([6, 1])), "valid_lengths must be in"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(bias=np.zeros(8, np.float32)), "bias is not supported"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(x=np.zeros((2, 8, 5), np.float32), weight=np.zeros((8, 4), np.float32))
    args.update(kwargs)
    with pytest.raises(KernelInputError, match=match):
        causal_conv1d(**args)


def test_update_bad_state_raises():
    with pytest.raises(KernelInputError, match="conv_state must be"):
        causal_conv1d_update(np.zeros((2, 8, 1), np.float32), np.zeros((2, 8, 3), np.float32),
                             np.zeros((8, 4), np.float32))
    with pytest.raises(KernelInputError, match=r"T must be in \[1, 16384\]"):
        causal_conv1d(np.zeros((1, 8, 16385), BF16), np.zeros((8, 4), BF16))


@pytest.mark.parametrize("b, c, t, kw, dtype", [
    (1, 8192, 1, 4, BF16),          # full-size Qwen3.5 conv (TP=1): refused by the first update kernel
    (3, 10000, 3, 8, np.float16),   # 78 channels per partition plus a 16-channel remainder group
    (130, 300, 2, 4, np.float32),   # 2 channels per partition + 44 remainder, sequences in SBUF chunks
    (1, 1000, 1, 4, BF16),          # short state rows: 64 partitions x 7 channels + a 52-channel remainder per core
    (2, 136, 2, 4, np.float32),     # 64 partitions x 1 channel + 4 remainder per core
])
def test_update_channel_blocks(b, c, t, kw, dtype, rng):
    """The update form keeps channels on the partitions in contiguous blocks (remainder one per partition)."""
    x = rng.standard_normal((b, c, t)).astype(dtype)
    w = rng.standard_normal((c, kw)).astype(dtype)
    state = rng.standard_normal((b, c, kw)).astype(dtype)
    before = state.copy()
    y = causal_conv1d_update(x, state, w)
    ry, rs = ref.causal_conv1d_update(x, before, w)
    name = np.dtype(dtype).name
    assert_close("update y", ry, y, dtype=name)
    assert_close("update state", rs, state, dtype=name)


@pytest.mark.parametrize("target, lnc, c, parts", [("trn2", 2, 2048, 128), ("trn3", 2, 2048, 128),
                                                    ("trn1", 1, 1024, 64)])
def test_update_partitions_follow_the_targets_dma_knee(target, lnc, c, parts, rng):
    """B=8, bf16, 1024 channels per core (Qwen3.5 TP4's conv at LNC=2): 512 B conv-state rows at 128 partitions, the
    full-rate packet on trn2 / trn3 (512 B knee), so the channels stay on 128 partitions there; on trn1 (2560 B
    knee) they go on 64 (fewer packets). Either layout matches the reference; at B=1 (64 B rows) every target
    takes 64."""
    from nki_kernels.deltanet import conv1d
    from nki_kernels.emulator import use_target
    b = 8
    x = rng.standard_normal((b, c, 1)).astype(BF16)
    w = rng.standard_normal((c, 4)).astype(BF16)
    state = rng.standard_normal((b, c, 4)).astype(BF16)
    before = state.copy()
    with use_target(target):
        assert conv1d._update_partitions(c // lnc, b, 4, 1, True) == parts
        assert conv1d._update_partitions(c // lnc, 1, 4, 1, True) == 64
        y = causal_conv1d_update(x, state, w, lnc=lnc)
    ry, rs = ref.causal_conv1d_update(x, before, w)
    assert_close(f"update y {target}", ry, y, dtype="bfloat16")
    assert_close(f"update state {target}", rs, state, dtype="bfloat16")


def test_update_too_many_channels_for_sbuf_raises():
    with pytest.raises(KernelInputError, match=r"max\(1, C // 128\) \* \(4 \(5 K \+ 3 T\) \+ 4\) must be <= 65536"):
        causal_conv1d_update(np.zeros((1, 128 * 800, 1), BF16), np.zeros((1, 128 * 800, 4), BF16),
                             np.zeros((128 * 800, 4), BF16))


@pytest.mark.parametrize("c, t, lnc, hist_bytes, dtype", [
    (2 * (3 * 128 + 50), 40, 2, None, BF16),        # 3 full tiles + 50 per core: one block, one x DMA
    (3 * 128 + 50, 1100, 1, None, BF16),            # 2 tiles per x / y DMA (2 KiB rows): sub-blocks 2 + 1
    (4 * 128 + 7, 30, 1, 3 * 2 * 2 * 34, BF16),     # blocks of 3 tiles (history budget): 3 + 1 + remainder
    (2 * (3 * 128 + 7), 30, 2, 2 * 2 * 4 * 34, np.float32),   # fp32 (VectorE taps): 2 + 1 + remainder per core
])
def test_prefill_channel_blocks(c, t, lnc, hist_bytes, dtype, rng, monkeypatch):
    """The prefill moves several 128-channel tiles per DMA (x, y, weights, states) and keeps them in blocks of
    tiles sized by the history budget; every block shape matches the reference, with states and valid lengths."""
    from nki_kernels.deltanet import conv1d
    if hist_bytes is not None:
        monkeypatch.setattr(conv1d, "_HIST_SBUF_BYTES", hist_bytes)
    b = 2
    x = rng.standard_normal((b, c, t)).astype(dtype)
    w = rng.standard_normal((c, 4)).astype(dtype)
    state = rng.standard_normal((b, c, 4)).astype(dtype)
    lens = np.array([t, 2])
    y, new_state = causal_conv1d(x, w, conv_state=state, valid_lengths=lens, lnc=lnc)
    ry, rstate = ref.causal_conv1d(x, w, conv_state=state, valid_lengths=lens)
    name = np.dtype(dtype).name
    assert_close("y", ry, y, dtype=name)
    np.testing.assert_array_equal(np.asarray(new_state, np.float32), np.asarray(rstate, np.float32))


@pytest.mark.parametrize("lnc", [1, 2])
def test_packed_channel_blocks(lnc, rng):
    """Packed sequences (cu_seqlens) over several tiles per block: each sequence matches the reference run alone."""
    c, cu = 2 * (2 * 128 + 20), np.array([0, 2, 9, 9, 30], np.int32)
    x = rng.standard_normal((1, c, 30)).astype(BF16)
    w = (rng.standard_normal((c, 4)) * 0.5).astype(BF16)
    s0 = rng.standard_normal((4, c, 4)).astype(BF16)
    y, s = causal_conv1d(x, w, conv_state=s0, cu_seqlens=cu, lnc=lnc)
    for i in range(4):
        a, e = int(cu[i]), int(cu[i + 1])
        if a == e:
            np.testing.assert_array_equal(np.asarray(s[i], np.float32), np.asarray(s0[i], np.float32))
            continue
        ry, rs = ref.causal_conv1d(x[:, :, a:e], w, conv_state=s0[i:i + 1])
        assert_close(f"y[seq {i}]", ry[0], y[0, :, a:e], dtype="bfloat16")
        np.testing.assert_array_equal(np.asarray(s[i], np.float32), np.asarray(rs[0], np.float32))


@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_prefill_longest_sequence_fits(dtype, rng):
    """T = _MAX_SEQ (16384) runs within SBUF (one tile per block there) and matches the reference."""
    from nki_kernels.deltanet.conv1d import _MAX_SEQ
    c, t = 300, _MAX_SEQ
    x = rng.standard_normal((1, c, t)).astype(dtype)
    w = rng.standard_normal((c, 4)).astype(dtype)
    lens = np.array([t - 5])
    y, new_state = causal_conv1d(x, w, valid_lengths=lens, lnc=1)
    ry, rstate = ref.causal_conv1d(x, w, valid_lengths=lens)
    assert_close("y", ry, y, dtype=np.dtype(dtype).name)
    np.testing.assert_array_equal(np.asarray(new_state, np.float32), np.asarray(rstate, np.float32))


@pytest.mark.parametrize("target, lnc", [("trn1", 1), ("trn2", 2)])
def test_bf16_prefill_taps_on_each_target(target, lnc, rng):
    """bf16 taps run on 32 x 32 PE tiles where the target has them (NeuronCore-v3+) and as one full-array matmul on
    trn1, whose PE tiles are 64 / 128 rows only (a 32-row tile there is an invalid matmul): both match the
    reference."""
    from nki_kernels.emulator.targets import use_target
    x = rng.standard_normal((2, 160, 40)).astype(BF16)
    w = rng.standard_normal((160, 4)).astype(BF16)
    state = rng.standard_normal((2, 160, 4)).astype(BF16)
    with use_target(target):
        y, new_state = causal_conv1d(x, w, conv_state=state, lnc=lnc)
    ry, rstate = ref.causal_conv1d(x, w, conv_state=state)
    assert_close("y", ry, y, dtype="bfloat16")
    assert_close("new conv state", rstate, new_state, dtype="bfloat16")
