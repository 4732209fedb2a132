"""Input checks shared by the gated-delta-rule wrappers (prefill and decode take the same q/k/v/g/beta layouts)."""
from __future__ import annotations


import numpy as np

from ..hw import P_MAX
from ..validation import check_array, check_same_kind, index_array, kernel_check

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
MAX_HEAD_DIM = P_MAX             # Dk, Dv <= 128: Dk is the partition dim of the state tile


def dtype_name(x) -> str:
    """'bfloat16', 'float32', ... for NumPy arrays and torch tensors alike."""
    return str(x.dtype).replace("torch.", "")


def check_qkv_gate_layouts(name: str, q, k, v, g, beta, extra=()):
    """q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g, beta [B, T, Hv]; `extra` adds (arg, tensor, ndim) triples.

    Also: all NumPy arrays or all torch tensors, Hv a multiple of Hk, head dims <= MAX_HEAD_DIM, float dtypes with
    k and v in q's dtype. Returns (B, T, Hk, Dk, Hv, Dv)."""
    arrays = (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)) + tuple(extra)
    for arg, x, nd in arrays:
        check_tensor(name, arg, x)
        kernel_check(x.ndim == nd, f"{name}: {arg} must be {nd}-D, got {arg}.shape={tuple(x.shape)}")
        kernel_check(0 not in tuple(x.shape), f"{name}: {arg} must not be empty (every dimension >= 1; B=0 or "
                     f"T=0 launches nothing), got {arg}.shape={tuple(x.shape)}")
    check_same_kind(name, {arg: x for arg, x, _ in arrays})
    bsz, seq, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    kernel_check(tuple(k.shape) == tuple(q.shape), f"{name}: k must match q [B, T, Hk, Dk], got "
                 f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    kernel_check(tuple(v.shape[:2]) == (bsz, seq), f"{name}: v must be [B={bsz}, T={seq}, Hv, Dv], "
                 f"got v.shape={tuple(v.shape)}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(tuple(x.shape) == (bsz, seq, n_hv), f"{name}: {arg} must be [B, T, Hv]="
                     f"{(bsz, seq, n_hv)}, got {arg}.shape={tuple(x.shape)}")
    kernel_check(n_hv % n_hk == 0, f"{name}: Hv must be a multiple of Hk, got Hv={n_hv}, Hk={n_hk}")
    kernel_check(1 <= dk <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM,
                 f"{name}: head dims must be <= {MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}")
    for arg, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_dtype(name, arg, x)
    dt = dtype_name(q)
    for arg, x in (("k", k), ("v", v)):
        kernel_check(dtype_name(x) == dt, f"{name}: {arg} dtype must equal q's {dt}, got {dtype_name(x)}")
    return bsz, seq, n_hk, dk, n_hv, dv


def check_tensor(name: str, arg: str, x):
    """x must be a NumPy array or a torch CPU tensor (not a list, scalar, meta / device tensor, nor a tensor that
    requires grad under grad mode): the shared `validation.check_array` rules; shapes and dtypes are checked by
    the callers."""
    check_array(name, arg, x, dtypes=None, allow_empty=True)


def check_lengths(name: str, valid_lengths, bsz: int, seq: int):
    """valid_lengths [B] integers in [0, T] (list, NumPy array or torch tensor) -> int32 NumPy array, by the
    shared `validation.index_array` rules: floats (7.9, also 8.0) and bools are refused, lengths are counts."""
    return index_array(name, "valid_lengths", valid_lengths, shape=(bsz,), lo=0, hi=seq, allow_none=False)


def check_cu_seqlens(name: str, cu_seqlens, total: int, max_seqs: int):
    """cu_seqlens [N+1] integers (list, NumPy array or torch tensor; floats and bools refused), 1 <= N <= max_seqs,
    0 = cu[0] <= cu[1] <= ... <= cu[N] = total -> int32 NumPy array.

    Input validation on the host before the launch, not specialisation: the kernels read the values on device
    and their traces depend on N only."""
    cu = index_array(name, "cu_seqlens", cu_seqlens, allow_none=False)
    cu_seqlens_count(name, cu, max_seqs)
    kernel_check(int(cu[0]) == 0, f"{name}: cu_seqlens must start at 0, got cu_seqlens[0]={int(cu[0])}")
    drop = np.flatnonzero(np.diff(cu.astype(np.int64)) < 0)
    kernel_check(drop.size == 0, f"{name}: cu_seqlens must be non-decreasing, got "
                 + (f"cu_seqlens[{drop[0]}]={int(cu[drop[0]])} > cu_seqlens[{drop[0] + 1}]={int(cu[drop[0] + 1])}"
                    if drop.size else ""))
    kernel_check(int(cu[-1]) == total, f"{name}: cu_seqlens must end at T={total} (the packed length), got "
                 f"cu_seqlens[-1]={int(cu[-1])}")
    return cu


def cu_seqlens_count(name: str, cu_seqlens, max_seqs: int) -> int:
    """N of cu_seqlens [N+1] (1 <= N <= max_seqs) from an array's or tensor's shape alone (no values: torch_ops'
    fake runs it on a fake tensor); anything else (a list) goes through `index_array` first."""
    if not hasattr(cu_seqlens, "shape"):
        cu_seqlens = index_array(name, "cu_seqlens", cu_seqlens, allow_none=False)
    shape = tuple(int(s) for s in cu_seqlens.shape)
    kernel_check(len(shape) == 1 and 2 <= shape[0] <= max_seqs + 1, f"{name}: cu_seqlens must be [N+1] with "
                 f"1 <= N <= {max_seqs}, got shape {shape}")
    return shape[0] - 1


def check_dtype(name: str, arg: str, x, allowed=FLOAT_DTYPES):
    """x's dtype in `allowed`; float64 (NumPy's default) is refused, never cast silently."""
    dt = dtype_name(x)
    hint = " (NumPy's default float64: convert with .astype(np.float32))" if dt == "float64" else ""
    kernel_check(dt in allowed, f"{name}: {arg} dtype must be one of {allowed}{hint}, got {dt}")


def initial_state_arg(name: str, initial_state, n_states: int, n_hv: int, dk: int, dv: int, lead: str = "B",
                      q_like=None):
    """(has_init, the tensor to pass): a given initial_state must be float32 [n_states, Hv, Dk, Dv] (`lead` names
    its first dim in the message) and of q_like's kind (NumPy or torch); None becomes a 1-element placeholder the
    kernel does not read."""
    if initial_state is None:
        return False, np.zeros((1, 1, 1, 1), dtype=np.float32)
    check_tensor(name, "initial_state", initial_state)
    check_same_kind(name, {"q": q_like, "initial_state": initial_state})
    kernel_check(tuple(initial_state.shape) == (n_states, n_hv, dk, dv), f"{name}: initial_state must be "
                 f"[{lead}, Hv, Dk, Dv]={(n_states, n_hv, dk, dv)}, got {tuple(initial_state.shape)}")
    kernel_check(dtype_name(initial_state) == "float32",
                 f"{name}: initial_state must be float32, got {dtype_name(initial_state)}")
    return True, initial_state
