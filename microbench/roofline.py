"""Useful-FLOP counts for rooflines that must not depend on a kernel's own choices (docs/cost-model.md).

The roofline charges these FLOPs at the TensorE bf16 peak (fp8 peak for fp8 inputs) whatever precision or
chunk size the kernel picks.
"""
from __future__ import annotations

GDN_FLOP_CHUNK = 64     # chunk of the reference chunked algorithm (flash-linear-attention's default), fixed


def gdn_chunked_flops(b: int, t: int, hv: int, dk: int, dv: int, chunk: int = GDN_FLOP_CHUNK) -> int:
    """Minimal matmul FLOPs of chunked gated DeltaNet (WY form) for B sequences of T tokens and Hv value heads.

    Per chunk of C tokens and head (2 FLOPs per multiply-add; triangular products count only their nonzero
    half, C(C+1)/2 ~ C^2/2 entries):
      A = strictly-lower(beta K K^T)          C^2/2 x Dk MACs
      W = T (beta K), U = T (beta V), with T = (I + A)^-1 lower-triangular (the solve is forward substitution,
        its own C^3/6 MACs are O(C/D) of the rest and left out)     C^2/2 x (Dk + Dv) MACs
      P = lower(Q K^T) (causal, with the diagonal)                  C^2/2 x Dk MACs
      V' = U - W S; O = Q S + P V'; S += K^T V'   C Dk Dv each for W S, Q S, K^T V' and C^2/2 x Dv for P V'
    MACs per token: (C/2)(Dk + Dk + Dv + Dk + Dv) + 3 Dk Dv = (C/2)(3 Dk + 2 Dv) + 3 Dk Dv, i.e.
    FLOPs per token = C (3 Dk + 2 Dv) + 6 Dk Dv (half of v1's count for the C-wide terms, which ignored the
    triangles).
    """
    per_token = chunk * (3 * dk + 2 * dv) + 6 * dk * dv
    return b * t * hv * per_token
