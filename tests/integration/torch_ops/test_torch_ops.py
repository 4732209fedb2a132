"""torch.library custom ops: every public kernel traces into one torch.compile graph (aot_eager, fullgraph, CPU)
and gives exactly what the eager public wrapper gives; fake (meta) shapes and dtypes match the real outputs;
mutated arguments are declared in the schema (opcheck) and updated in place through the compiled graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nki_kernels
from nki_kernels import torch_ops


@pytest.fixture(scope="module", autouse=True)
def ops():
    yield torch_ops.register()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cp_weights(seed=0):
    """A small code predictor: H=128, I=128, 4 q / 2 kv heads of D=32, 2 layers, G1=4 groups, V=16."""
    from nki_kernels.codepredictor.weights import pack_weights
    rng = np.random.default_rng(seed)
    hidden, inter, d, hq, hkv, n_layers, g1, vocab = 128, 128, 32, 4, 2, 2, 4, 16
    n = lambda *s: rng.standard_normal(s).astype(np.float32) * s[-1] ** -0.5      # noqa: E731
    layers = [dict(input_norm=1 + 0.1 * n(hidden), post_norm=1 + 0.1 * n(hidden), q_norm=1 + 0.1 * n(d),
                   k_norm=1 + 0.1 * n(d), q=n(hq * d, hidden), k=n(hkv * d, hidden), v=n(hkv * d, hidden),
                   o=n(hidden, hq * d), gate=n(inter, hidden), up=n(inter, hidden), down=n(hidden, inter))
              for _ in range(n_layers)]
    w = pack_weights(layers, 1 + 0.1 * n(hidden), rng.standard_normal((g1, vocab, hidden)).astype(np.float32),
                     n(g1, vocab, hidden), n_q_heads=hq, n_kv_heads=hkv)
    from dataclasses import replace
    from nki_kernels.backend import _to_torch
    return replace(w, **{f: _to_torch(getattr(w, f)) for f in torch_ops._CP_FIELDS})


def _mapping_inputs(seed, t=10, n_exp=4, top_k=2):
    gen = _gen(seed)
    logits = torch.randn(t, n_exp, generator=gen)
    idx = logits.topk(top_k, -1).indices.to(torch.int32)
    return logits, idx


def _moe_weights(seed, n_exp=4, h=128, n_i=32, shared=False):
    gen = _gen(seed)
    gate_up = torch.randn(n_exp, h, 2, n_i, generator=gen) * h ** -0.5
    down = torch.randn(n_exp, n_i, h, generator=gen) * n_i ** -0.5
    sh = None
    if shared:
        sh = (torch.randn(h, 2, 64, generator=gen) * h ** -0.5, torch.randn(64, h, generator=gen) * 0.125,
              torch.randn(h, generator=gen) * h ** -0.5)
    return gate_up, down, sh


def _case(name):
    """(public kwargs/args builder) -> (args tuple, kwargs dict, indices of args mutated in place)."""
    gen = _gen(hash(name) % 1000)
    r = lambda *s: torch.randn(*s, generator=gen)                                        # noqa: E731
    if name == "tiled_matmul":
        return (r(128, 64), r(128, 96)), {}, ()
    if name == "softmax":
        return (r(8, 40) * 3,), {}, ()
    if name == "rmsnorm":
        return (r(8, 64), 1 + 0.1 * r(64)), {"eps": 1e-5}, ()
    if name == "flash_attention":
        q, k, v = r(1, 4, 24, 64), r(1, 2, 24, 64), r(1, 2, 24, 64)
        return (q, k, v), {"gate": r(1, 4, 24, 64), "seq_lens": torch.tensor([19], dtype=torch.int32),
                           "causal": True}, ()
    if name == "flash_attention_varlen":
        cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32)             # three sequences, one empty
        return (r(20, 4, 64), r(20, 2, 64), r(20, 2, 64), cu, cu.clone()), {
            "causal": True, "gate": r(20, 4, 64), "max_seqlen_q": 13, "max_seqlen_k": 13}, ()
    if name == "flash_attention_decode":
        return (r(2, 4, 1, 64), r(2, 2, 32, 64), r(2, 2, 32, 64), torch.tensor([9, 32], dtype=torch.int32)), {}, ()
    if name == "gated_delta_rule":
        g = -torch.rand(2, 20, 4, generator=gen)
        return (r(2, 20, 2, 32), r(2, 20, 2, 32), r(2, 20, 4, 32), g, torch.rand(2, 20, 4, generator=gen)), {
            "initial_state": r(2, 4, 32, 32) * 0.1, "use_qk_l2norm_in_kernel": True,
            "valid_lengths": torch.tensor([20, 13], dtype=torch.int32)}, ()
    if name == "gated_delta_rule_step":
        g = -torch.rand(2, 1, 4, generator=gen)
        args = (r(2, 1, 2, 32), r(2, 1, 2, 32), r(2, 1, 4, 32), g, torch.rand(2, 1, 4, generator=gen),
                r(3, 4, 32, 32) * 0.1, torch.tensor([2, 0], dtype=torch.int32))
        return args, {"use_qk_l2norm_in_kernel": True}, (5,)
    if name == "causal_conv1d":
        return (r(2, 64, 10), r(64, 4)), {"conv_state": r(2, 64, 4),
                                          "valid_lengths": torch.tensor([10, 6], dtype=torch.int32)}, ()
    if name == "causal_conv1d_update":
        return (r(2, 64, 2), r(2, 64, 4), r(64, 4)), {}, (1,)
    if name == "moe_route":
        return (r(10, 8),), {"top_k": 2, "normalize": True}, ()
    if name == "moe_block_mapping":
        _, idx = _mapping_inputs(1)
        return (idx,), {"num_experts": 4, "block_size": 4, "num_blocks": 9}, ()
    if name == "moe_blockwise":
        logits, idx = _mapping_inputs(2)
        aff = torch.zeros(10, 4).scatter(1, idx.long(), torch.softmax(logits, -1).gather(1, idx.long()))
        tok, blk = nki_kernels.moe_block_mapping(idx, 4, 4, num_blocks=9)
        gate_up, down, sh = _moe_weights(3, shared=True)
        return (r(10, 128), aff, gate_up, down, tok, blk, 4), {"shared": sh}, ()
    if name == "moe_decode":
        logits, idx = _mapping_inputs(4, t=2)
        gate_up, down, sh = _moe_weights(5, shared=True)
        return (r(2, 128), idx, torch.softmax(logits, -1).gather(1, idx.long()), gate_up, down), {"shared": sh}, ()
    if name == "code_predictor":
        w = _cp_weights()
        return (r(2, 128).bfloat16(), r(2, 128).bfloat16(), w), {
            "do_sample": True, "uniforms": torch.rand(2, 4, generator=gen), "top_k": 5, "top_p": 0.9,
            "return_sum": True}, ()
    raise KeyError(name)


def _clone_args(args, mutated):
    return tuple(a.clone() if i in mutated else a for i, a in enumerate(args))


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _assert_same(name, want, got):
    want, got = _as_tuple(want), _as_tuple(got)
    assert len(want) == len(got), name
    for i, (a, b) in enumerate(zip(want, got)):
        if a is None:
            assert b is None, f"{name}[{i}]"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}[{i}]: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a, b), f"{name}[{i}]: compiled output differs from eager"


def test_every_public_kernel_has_an_op(ops):
    assert sorted(spec.name for spec in torch_ops.OPS) == sorted(n for n in nki_kernels.__all__)
    for name in nki_kernels.__all__:
        assert hasattr(ops, name) and callable(getattr(torch_ops, name))


@pytest.mark.parametrize("name", sorted(nki_kernels.__all__))
def test_compiled_graph_equals_eager_without_breaks(name):
    """torch.compile(backend="aot_eager", fullgraph=True) of a function that calls the kernel between ordinary
    torch ops: one graph, the op inside it, outputs (and in-place state) identical to the eager public wrapper."""
    from torch._dynamo.testing import CompileCounterWithBackend

    args, kwargs, mutated = _case(name)
    public = getattr(nki_kernels, name)
    through_op = getattr(torch_ops, name)
    eager_args = _clone_args(args, mutated)
    want = public(*eager_args, **kwargs)

    def graph(*a):
        first = a[0] * 1.0 if a[0].is_floating_point() else a[0]          # ops before and after the kernel
        out = through_op(first, *a[1:], **kwargs)
        return tuple(o + 0 if o is not None and o.is_floating_point() else o for o in _as_tuple(out))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(graph, backend=counter, fullgraph=True)
    comp_args = _clone_args(args, mutated)
    got = compiled(*comp_args)
    assert counter.frame_count == 1                        # one frame, no graph break (fullgraph would raise)
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(f"nki_kernels.{name}" in t for t in targets), targets
    _assert_same(name, want, got)
    for i in mutated:                                      # the in-place update reached the caller's tensor
        assert torch.equal(eager_args[i], comp_args[i]), f"{name}: mutated argument {i} differs"
        assert not torch.equal(args[i], comp_args[i]), f"{name}: argument {i} was not updated"


@pytest.mark.parametrize("name", sorted(nki_kernels.__all__))
def test_fake_shapes_and_dtypes_match_real(name):
    """The meta implementation (what torch.compile / TorchNeuron trace with) agrees with the real outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs, mutated = _case(name)
    real = _as_tuple(getattr(torch_ops, name)(*_clone_args(args, mutated), **kwargs))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = _as_tuple(getattr(torch_ops, name)(*fake_args, **kwargs))
    assert len(real) == len(fake)
    for a, b in zip(real, fake):
        if a is None:
            assert b is None
            continue
        assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and a.stride() == b.stride(), name


def _op_arguments(name, args, kwargs):
    """The public wrapper's arguments in the op's schema form (structured arguments split into tensors)."""
    kwargs = dict(kwargs)
    if name in ("moe_blockwise", "moe_decode") and kwargs.get("shared") is not None:
        sh = kwargs.pop("shared")
        kwargs.update(shared_gate_up=sh[0], shared_down=sh[1], shared_gate=sh[2])
    if name == "code_predictor":
        w = args[2]
        args = args[:2] + tuple(getattr(w, f) for f in torch_ops._CP_FIELDS)
        kwargs.pop("return_sum", None)
        kwargs.update(n_q_heads=w.n_q_heads, n_kv_heads=w.n_kv_heads, eps=w.eps)
    return args, kwargs


@pytest.mark.parametrize("name", sorted(nki_kernels.__all__))
def test_opcheck_schema_and_fake(name, ops):
    """torch.library.opcheck on every op: the schema's mutation annotations match what the kernel writes (only
    gated_delta_rule_step's state_pool and causal_conv1d_update's conv_state are written), and the fake kernel
    agrees with the real one, also under AOT dispatch."""
    args, kwargs, mutated = _case(name)
    args, kwargs = _op_arguments(name, args, kwargs)
    spec = {s.name: s for s in torch_ops.OPS}[name]
    torch.library.opcheck(getattr(ops, name).default, _clone_args(args, mutated), kwargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert ("(a!)" in spec.schema) == bool(mutated)


def test_block_mapping_without_num_blocks_is_data_dependent_but_traces():
    """Without num_blocks the block count depends on the routing: the fake gives an unbacked size and the graph
    still compiles in one piece; the outputs equal the eager wrapper's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        _, idx = _mapping_inputs(7)
        want = nki_kernels.moe_block_mapping(idx, 4, 4)
        counter = CompileCounterWithBackend("aot_eager")
        got = torch.compile(lambda i: torch_ops.moe_block_mapping(i, 4, 4), backend=counter, fullgraph=True)(idx)
        assert counter.frame_count == 1
        _assert_same("mapping", want, got)
    finally:
        torch._dynamo.config.capture_dynamic_output_shape_ops = False


def test_register_is_explicit_and_idempotent():
    torch_ops.unregister()
    assert not torch_ops.registered()
    assert not hasattr(torch.ops.nki_kernels, "softmax") or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "nki_kernels::softmax", "CompositeExplicitAutograd")
    a = torch_ops.register()
    b = torch_ops.register()
    assert a is b and torch_ops.registered()
    x = torch.randn(4, 8, generator=_gen(0))
    assert torch.equal(a.softmax(x), nki_kernels.softmax(x))


def test_gated_delta_rule_output_final_state_false_drops_the_state():
    args, kwargs, _ = _case("gated_delta_rule")
    o, final = torch_ops.gated_delta_rule(*args, **dict(kwargs, output_final_state=False))
    assert final is None
    assert torch.equal(o, nki_kernels.gated_delta_rule(*args, **kwargs)[0])


def test_decode_step_static_rows_mode_through_the_op():
    """slot_ids=None (sequence b updates state_pool[b]) traces and equals the eager wrapper, in place."""
    from torch._dynamo.testing import CompileCounterWithBackend
    args, kwargs, _ = _case("gated_delta_rule_step")
    q, k, v, g, beta, pool = args[:6]
    pool = pool[:2].clone()
    want_pool = pool.clone()
    want = nki_kernels.gated_delta_rule_step(q, k, v, g, beta, want_pool, None, **kwargs)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(lambda *a: torch_ops.gated_delta_rule_step(*a, None, **kwargs), backend=counter,
                        fullgraph=True)(q, k, v, g, beta, pool)
    assert counter.frame_count == 1 and torch.equal(want, got) and torch.equal(want_pool, pool)


def _refused(name):
    """(args, kwargs) of `_case(name)` with one shape (or option) the eager wrapper refuses."""
    args, kwargs, _ = _case(name)
    r = lambda *s: torch.randn(*s, generator=_gen(11))                                   # noqa: E731
    if name == "tiled_matmul":
        return (args[0], r(100, 96)), kwargs                           # contraction dims differ
    if name == "softmax":
        return (r(2, 8, 40),), kwargs                                  # 3-D
    if name == "rmsnorm":
        return (args[0], r(63)), kwargs                                # weight [H - 1]
    if name == "flash_attention":
        return (r(1, 4, 24, 257), r(1, 2, 24, 257), r(1, 2, 24, 257)), {"seq_lens": kwargs["seq_lens"]}   # D = 257
    if name == "flash_attention_decode":
        return (r(2, 4, 9, 64),) + args[1:], kwargs                    # Sq = 9 new tokens
    if name == "flash_attention_varlen":
        return (r(20, 4, 257), r(20, 2, 257), r(20, 2, 257)) + args[3:], {k: v for k, v in kwargs.items()
                                                                           if k != "gate"}
    if name == "gated_delta_rule":
        return args[:4] + (args[4][:, :, :2],), kwargs                 # beta [B, T, Hv / 2]
    if name == "gated_delta_rule_step":
        return args[:5] + (r(3, 4, 16, 32),) + args[6:], kwargs        # state_pool Dk = 16
    if name == "causal_conv1d":
        return (args[0], r(64, 1)), {}                                 # kernel width K = 1
    if name == "causal_conv1d_update":
        return (args[0], r(2, 64, 5), args[2]), kwargs                 # conv_state K = 5, weight K = 4
    if name == "moe_route":
        return args, {**kwargs, "top_k": 9}                            # top_k > E = 8
    if name == "moe_block_mapping":
        return args, {**kwargs, "block_size": 513}
    if name == "moe_blockwise":
        return args[:4] + (args[4][:-1],) + args[5:], kwargs           # token_position_to_id: N * B - 1 slots
    if name == "moe_decode":
        return (r(33, 128), args[1].repeat(17, 1)[:33], args[2].repeat(17, 1)[:33]) + args[3:], kwargs   # T = 33
    if name == "code_predictor":
        return (r(2, 64).bfloat16(), r(2, 64).bfloat16()) + args[2:], kwargs     # H = 64, the weights' 128
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(nki_kernels.__all__))
def test_fake_refuses_what_the_eager_wrapper_refuses(name, ops):
    """Each op's fake runs the public wrapper's own value-free checks (`check_<name>`): a shape the eager wrapper
    refuses raises the same KernelInputError from the fake, i.e. at trace time (the fakes checked nothing before:
    flash_attention at D = 257 traced and failed only when the graph ran)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nki_kernels.validation import KernelInputError

    args, kwargs = _refused(name)
    with pytest.raises(KernelInputError) as eager:
        getattr(nki_kernels, name)(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        if name == "code_predictor":
            from dataclasses import replace
            w = fake_args[2]
            fake_args = fake_args[:2] + (replace(w, **{f: mode.from_tensor(getattr(w, f))
                                                      for f in torch_ops._CP_FIELDS}),)
        with pytest.raises(KernelInputError) as fake:
            getattr(torch_ops, name)(*fake_args, **kwargs)
    assert str(fake.value) == str(eager.value)


def test_refused_shape_fails_at_trace_time_under_compile():
    """torch.compile of flash_attention at D = 257: the error comes while tracing (no graph compiled, no launch),
    with the wrapper's message."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from nki_kernels.emulator import record_launches

    args, kwargs = _refused("flash_attention")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, v: torch_ops.flash_attention(q, k, v, **kwargs), backend=counter,
                             fullgraph=True)
    with record_launches() as runs, pytest.raises(Exception, match=r"flash_attention: head dim D must be in "
                                                                   r"\[1, 256\], got D=257"):
        compiled(*args)
    assert counter.frame_count == 0 and not runs


def test_every_public_wrapper_shares_its_checks_with_the_fake():
    """`check_<name>` beside each public wrapper takes the wrapper's parameters (one rule for eager and fake)."""
    import importlib
    import inspect

    for name in nki_kernels.__all__:
        check = getattr(importlib.import_module(nki_kernels._EXPORTS[name]), "check_" + name)
        assert list(inspect.signature(check).parameters) == list(inspect.signature(getattr(nki_kernels, name))
                                                                 .parameters), name


def test_fake_checks_keep_dynamic_shapes_dynamic():
    """The fakes' checks read a dynamic size at its traced value without a guard: a graph with a dynamic sequence
    length (mark_dynamic) compiles once and serves another length (a guard would specialize it: a constraint
    violation), while a refused static size (D = 257) is still refused at trace time."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def dynamic(*shapes):
        out = [torch.randn(*s, generator=_gen(3)) for s in shapes]
        for t in out:
            torch._dynamo.mark_dynamic(t, 2)
        return out

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, v: torch_ops.flash_attention(q, k, v) * 1.0, backend=counter,
                             fullgraph=True)
    for s in (24, 40):
        q, k, v = dynamic((1, 4, s, 64), (1, 2, s, 64), (1, 2, s, 64))
        assert torch.equal(compiled(q, k, v), nki_kernels.flash_attention(q, k, v))
    assert counter.frame_count == 1
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"head dim D must be in \[1, 256\], got D=257"):
        compiled(*dynamic((1, 4, 24, 257), (1, 2, 24, 257), (1, 2, 24, 257)))
