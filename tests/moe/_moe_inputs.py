"""Random MoE problems for the moe tests (seeded by the caller's generator)."""
import ml_dtypes
import numpy as np

from nki_kernels import moe_route

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def moe_problem(rng, n_tokens, hidden, n_experts, inter, top_k, shared_inter=0, normalize=True, dtype="float32",
                n_global=None):
    """(x, gate_up, down, shared or None, top_k_weights, top_k_index); routing over n_global experts
    (default n_experts) by moe_route on random logits."""
    dt = DTYPES[dtype]
    n_global = n_experts if n_global is None else n_global
    x = rng.standard_normal((n_tokens, hidden)).astype(dt)
    gate_up = (rng.standard_normal((n_experts, hidden, 2, inter)) / np.sqrt(hidden)).astype(dt)
    down = (rng.standard_normal((n_experts, inter, hidden)) / np.sqrt(inter)).astype(dt)
    shared = None
    if shared_inter:
        shared = ((rng.standard_normal((hidden, 2, shared_inter)) / np.sqrt(hidden)).astype(dt),
                  (rng.standard_normal((shared_inter, hidden)) / np.sqrt(shared_inter)).astype(dt),
                  (rng.standard_normal(hidden) / np.sqrt(hidden)).astype(dt))
    w, idx = moe_route(rng.standard_normal((n_tokens, n_global)) * 2.0, top_k, normalize)
    return x, gate_up, down, shared, w.astype(dt), idx


def dense_affinities(w, idx, n_experts, expert_offset=0):
    """[T, E_local] dense affinities from the top-k form (0 where not selected or not local)."""
    out = np.zeros((idx.shape[0], n_experts), dtype=np.float64)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j]) - expert_offset
            if 0 <= e < n_experts:
                out[t, e] = float(w[t, j])
    return out.astype(w.dtype)
