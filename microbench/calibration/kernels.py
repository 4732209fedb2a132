"""Calibration kernels: published NKI kernels (AccelOpt NKIBench baselines, ../shared/reference/calibration.md,
table S3) re-written from their published descriptions as emulator kernels, fp32 in/out like the originals.

They exist to time the cost model against published trn1 profiles, not to be fast. Each follows its published
description (tile sizes, engines, HBM traffic); the notes say where we had to choose.
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import GEMM_MOVING_FMAX, GEMM_STATIONARY_FMAX, P_MAX

_N_TILE = GEMM_MOVING_FMAX          # matmul moving free size (one fp32 PSUM bank)
_M_TILE = GEMM_STATIONARY_FMAX      # matmul stationary free size
_MM_N_BLOCK = 2 * GEMM_MOVING_FMAX  # A1: output columns per block (1024; A is re-read once per block)
_A2_M_BLOCK = 4 * GEMM_STATIONARY_FMAX   # A2: output rows whose aT block stays in SBUF (b re-read per block)
_SILU_F = 512                       # A12: free tile of the published silu kernel
_ADAMW_F = 1024                     # A13: free tile of the published adamw kernel


def _transpose_to_sbuf(dst_sb, src_sb):
    """dst_sb[F, P] = src_sb[P, F].T through PSUM with a TensorE (identity-matmul) transpose."""
    p, f = src_sb.shape[0], src_sb.shape[1]
    t_ps = nl.ndarray((f, p), dtype=src_sb.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=t_ps, data=src_sb)
    nisa.tensor_copy(dst=dst_sb, src=t_ps)


@nki.jit
def matmul_a1(a, b):
    """A1: c[M, N] = a[M, K] @ b[K, N], fp32. For each 128-row M tile and each 1024-column N block: load the
    a rows (re-read per block), transpose them on TensorE, stream b's K tiles, accumulate two PSUM banks.
    HBM reads: a x N/1024 + b x M/128 (9.06 GB at the published shape, as published)."""
    m_total, k_total = a.shape
    n_total = b.shape[1]
    c = nl.ndarray((m_total, n_total), dtype=a.dtype, buffer=nl.shared_hbm)
    n_k = k_total // P_MAX
    n_sub = _MM_N_BLOCK // _N_TILE
    for i_m in range(m_total // _M_TILE):
        m0 = i_m * _M_TILE
        for i_n in range(n_total // _MM_N_BLOCK):
            n0 = i_n * _MM_N_BLOCK
            a_sb = nl.ndarray((_M_TILE, k_total), dtype=a.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=a_sb, src=a[m0:m0 + _M_TILE, :])
            aT = nl.ndarray((P_MAX, n_k, _M_TILE), dtype=a.dtype, buffer=nl.sbuf)
            for i_k in range(n_k):
                _transpose_to_sbuf(aT[:, i_k, :], a_sb[:, i_k * P_MAX:(i_k + 1) * P_MAX])
            acc = [nl.ndarray((_M_TILE, _N_TILE), dtype=nl.float32, buffer=nl.psum) for _ in range(n_sub)]
            for i_k in range(n_k):
                b_sb = nl.ndarray((P_MAX, _MM_N_BLOCK), dtype=b.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=b_sb, src=b[i_k * P_MAX:(i_k + 1) * P_MAX, n0:n0 + _MM_N_BLOCK])
                for j in range(n_sub):
                    nisa.nc_matmul(acc[j], aT[:, i_k, :], b_sb[:, j * _N_TILE:(j + 1) * _N_TILE],
                                   accumulate=i_k > 0)
            c_sb = nl.ndarray((_M_TILE, _MM_N_BLOCK), dtype=a.dtype, buffer=nl.sbuf)
            for j in range(n_sub):
                nisa.tensor_copy(dst=c_sb[:, j * _N_TILE:(j + 1) * _N_TILE], src=acc[j])
            nisa.dma_copy(dst=c[m0:m0 + _M_TILE, n0:n0 + _MM_N_BLOCK], src=c_sb)
    return c


@nki.jit
def transpose_matmul_a2(aT, b):
    """A2: c[M, N] = aT[K, M].T @ b[K, N], fp32 (the left operand arrives transposed). A 512-column block of aT
    stays in SBUF (4 M tiles); b is streamed in 512-wide column tiles (the last one partial) and re-read once
    per M block; each b tile feeds 4 x K/128 matmuls into 4 PSUM banks."""
    k_total, m_total = aT.shape
    n_total = b.shape[1]
    n_k = k_total // P_MAX
    c = nl.ndarray((m_total, n_total), dtype=aT.dtype, buffer=nl.shared_hbm)
    for i_mb in range(m_total // _A2_M_BLOCK):
        mb0 = i_mb * _A2_M_BLOCK
        a_sb = nl.ndarray((P_MAX, n_k, _A2_M_BLOCK), dtype=aT.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_sb, src=aT[:, mb0:mb0 + _A2_M_BLOCK].reshape((n_k, P_MAX, _A2_M_BLOCK)).permute((1, 0, 2)))
        for i_n in range((n_total + _N_TILE - 1) // _N_TILE):
            n0 = i_n * _N_TILE
            nsz = min(_N_TILE, n_total - n0)
            b_sb = nl.ndarray((P_MAX, n_k, _N_TILE), dtype=b.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=b_sb[:, :, 0:nsz], src=b[:, n0:n0 + nsz].reshape((n_k, P_MAX, nsz)).permute((1, 0, 2)))
            for j in range(_A2_M_BLOCK // _M_TILE):
                acc = nl.ndarray((_M_TILE, _N_TILE), dtype=nl.float32, buffer=nl.psum)
                for i_k in range(n_k):
                    nisa.nc_matmul(acc[:, 0:nsz], a_sb[:, i_k, j * _M_TILE:(j + 1) * _M_TILE], b_sb[:, i_k, 0:nsz],
                                   accumulate=i_k > 0)
                c_sb = nl.ndarray((_M_TILE, _N_TILE), dtype=aT.dtype, buffer=nl.sbuf)
                nisa.tensor_copy(dst=c_sb[:, 0:nsz], src=acc[:, 0:nsz])
                m0 = mb0 + j * _M_TILE
                nisa.dma_copy(dst=c[m0:m0 + _M_TILE, n0:n0 + nsz], src=c_sb[:, 0:nsz])
    return c


@nki.jit
def rmsnorm_matmul_a5(x, gamma, w, eps):
    """A5: y[M, N] = (rmsnorm(x[M, K]) * gamma[K]) @ w[K, N], fp32. w (scaled by gamma along K) stays in SBUF;
    per 128-row tile: sum of squares on ScalarE, rsqrt, scale on VectorE, TensorE transposes, K-accumulated
    matmuls into PSUM, one store per row tile."""
    return _rmsnorm_matmul(x, None, gamma, w, eps)


@nki.jit
def add_rmsnorm_matmul_a6(x, residual, gamma, w, eps):
    """A6: y = (rmsnorm(x + residual) * gamma) @ w, fp32; A5 with the residual added on VectorE first."""
    return _rmsnorm_matmul(x, residual, gamma, w, eps)


def _rmsnorm_matmul(x, residual, gamma, w, eps):
    m_total, k_total = x.shape
    n_total = w.shape[1]
    n_k = k_total // P_MAX
    y = nl.ndarray((m_total, n_total), dtype=x.dtype, buffer=nl.shared_hbm)
    w_sb = nl.ndarray((P_MAX, n_k, n_total), dtype=w.dtype, buffer=nl.sbuf)
    g_sb = nl.ndarray((P_MAX, n_k), dtype=gamma.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=g_sb, src=gamma.reshape((n_k, P_MAX)).permute((1, 0)))
    for i_k in range(n_k):
        nisa.dma_copy(dst=w_sb[:, i_k, :], src=w[i_k * P_MAX:(i_k + 1) * P_MAX, :])
        nisa.tensor_scalar(dst=w_sb[:, i_k, :], data=w_sb[:, i_k, :], op0=nl.multiply, operand0=g_sb[:, i_k:i_k + 1])
    eps_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_sb, value=eps)
    for i_m in range(m_total // P_MAX):
        m0 = i_m * P_MAX
        x_sb = nl.ndarray((P_MAX, k_total), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x[m0:m0 + P_MAX, :])
        if residual is not None:
            r_sb = nl.ndarray((P_MAX, k_total), dtype=residual.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=r_sb, src=residual[m0:m0 + P_MAX, :])
            nisa.tensor_tensor(dst=x_sb, data1=x_sb, data2=r_sb, op=nl.add)
        sq = nl.ndarray((P_MAX, k_total), dtype=nl.float32, buffer=nl.sbuf)
        ss = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation_reduce(dst=sq, op=nl.square, data=x_sb, reduce_op=nl.add, reduce_res=ss)
        rstd = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=1.0 / k_total, bias=eps_sb)
        xn = nl.ndarray((P_MAX, k_total), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=xn, data=x_sb, op0=nl.multiply, operand0=rstd)
        xT = nl.ndarray((P_MAX, n_k, P_MAX), dtype=x.dtype, buffer=nl.sbuf)
        for i_k in range(n_k):
            _transpose_to_sbuf(xT[:, i_k, :], xn[:, i_k * P_MAX:(i_k + 1) * P_MAX])
        y_sb = nl.ndarray((P_MAX, n_total), dtype=x.dtype, buffer=nl.sbuf)
        for i_n in range(n_total // _N_TILE):
            acc = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            for i_k in range(n_k):
                nisa.nc_matmul(acc, xT[:, i_k, :], w_sb[:, i_k, i_n * _N_TILE:(i_n + 1) * _N_TILE],
                               accumulate=i_k > 0)
            nisa.tensor_copy(dst=y_sb[:, i_n * _N_TILE:(i_n + 1) * _N_TILE], src=acc)
        nisa.dma_copy(dst=y[m0:m0 + P_MAX, :], src=y_sb)
    return y


@nki.jit
def bmm_a8(a, b):
    """A8: c[B, M, N] = a[B, M, K] @ b[B, K, N] with K=64 (half the PE rows), fp32. Per batch: b[b] stays in
    SBUF; per 128-row tile: transpose a's tile on TensorE, 512-wide matmuls, one full-row store."""
    n_b, m_total, k_total = a.shape
    n_total = b.shape[2]
    c = nl.ndarray((n_b, m_total, n_total), dtype=a.dtype, buffer=nl.shared_hbm)
    for i_b in range(n_b):
        b_sb = nl.ndarray((k_total, n_total), dtype=b.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=b_sb, src=b[i_b])
        for i_m in range(m_total // _M_TILE):
            m0 = i_m * _M_TILE
            a_sb = nl.ndarray((_M_TILE, k_total), dtype=a.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=a_sb, src=a[i_b, m0:m0 + _M_TILE, :])
            aT = nl.ndarray((k_total, _M_TILE), dtype=a.dtype, buffer=nl.sbuf)
            _transpose_to_sbuf(aT, a_sb)
            c_sb = nl.ndarray((_M_TILE, n_total), dtype=a.dtype, buffer=nl.sbuf)
            for i_n in range(n_total // _N_TILE):
                acc = nl.ndarray((_M_TILE, _N_TILE), dtype=nl.float32, buffer=nl.psum)
                nisa.nc_matmul(acc, aT, b_sb[:, i_n * _N_TILE:(i_n + 1) * _N_TILE])
                nisa.tensor_copy(dst=c_sb[:, i_n * _N_TILE:(i_n + 1) * _N_TILE], src=acc)
            nisa.dma_copy(dst=c[i_b, m0:m0 + _M_TILE, :], src=c_sb)
    return c


@nki.jit
def silu_a12(x):
    """A12: y = x * sigmoid(x) = x * 1 / (1 + exp(-x)), fp32, on 128 x 512 tiles: exp (ScalarE), +1 (VectorE),
    reciprocal (ScalarE activation), multiply (VectorE)."""
    m_total, n_total = x.shape
    y = nl.ndarray((m_total, n_total), dtype=x.dtype, buffer=nl.shared_hbm)
    for i_m in range(m_total // P_MAX):
        for i_n in range(n_total // _SILU_F):
            rows = slice(i_m * P_MAX, (i_m + 1) * P_MAX)
            cols = slice(i_n * _SILU_F, (i_n + 1) * _SILU_F)
            x_sb = nl.ndarray((P_MAX, _SILU_F), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=x_sb, src=x[rows, cols])
            e = nl.ndarray((P_MAX, _SILU_F), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=e, op=nl.exp, data=x_sb, scale=-1.0)
            nisa.tensor_scalar(dst=e, data=e, op0=nl.add, operand0=1.0)
            r = nl.ndarray((P_MAX, _SILU_F), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=r, op=nl.reciprocal, data=e)
            y_sb = nl.ndarray((P_MAX, _SILU_F), dtype=x.dtype, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=y_sb, data1=x_sb, data2=r, op=nl.multiply)
            nisa.dma_copy(dst=y[rows, cols], src=y_sb)
    return y


@nki.jit
def adamw_a13(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """A13: one AdamW step, returns the new parameters (4 inputs, 1 output, fp32), 128 x 1024 tiles, the last
    row tile masked (partial). Moments are updated on chip (not written back), as in the published kernel's
    HBM traffic (5 arrays)."""
    m_total, n_total = param.shape
    out = nl.ndarray((m_total, n_total), dtype=param.dtype, buffer=nl.shared_hbm)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    for i_m in range((m_total + P_MAX - 1) // P_MAX):
        p = min(P_MAX, m_total - i_m * P_MAX)
        rows = slice(i_m * P_MAX, i_m * P_MAX + p)
        for i_n in range(n_total // _ADAMW_F):
            cols = slice(i_n * _ADAMW_F, (i_n + 1) * _ADAMW_F)
            tiles = []
            for src in (param, grad, exp_avg, exp_avg_sq):
                t = nl.ndarray((P_MAX, _ADAMW_F), dtype=src.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=t[0:p], src=src[rows, cols])
                tiles.append(t)
            p_sb, g_sb, m_sb, v_sb = tiles
            tmp = nl.ndarray((P_MAX, _ADAMW_F), dtype=nl.float32, buffer=nl.sbuf)
            # m' = beta1 m + (1 - beta1) g
            nisa.tensor_scalar(dst=tmp[0:p], data=m_sb[0:p], op0=nl.multiply, operand0=beta1)
            nisa.scalar_tensor_tensor(dst=m_sb[0:p], data=g_sb[0:p], op0=nl.multiply, operand0=1.0 - beta1,
                                      op1=nl.add, operand1=tmp[0:p])
            # v' = beta2 v + (1 - beta2) g^2
            nisa.tensor_tensor(dst=g_sb[0:p], data1=g_sb[0:p], data2=g_sb[0:p], op=nl.multiply)
            nisa.tensor_scalar(dst=tmp[0:p], data=v_sb[0:p], op0=nl.multiply, operand0=beta2)
            nisa.scalar_tensor_tensor(dst=v_sb[0:p], data=g_sb[0:p], op0=nl.multiply, operand0=1.0 - beta2,
                                      op1=nl.add, operand1=tmp[0:p])
            # 1 / (sqrt(v' / bc2) + eps)
            nisa.activation(dst=v_sb[0:p], op=nl.sqrt, data=v_sb[0:p], scale=1.0 / bc2)
            nisa.tensor_scalar(dst=v_sb[0:p], data=v_sb[0:p], op0=nl.add, operand0=eps)
            nisa.activation(dst=v_sb[0:p], op=nl.reciprocal, data=v_sb[0:p])
            # p' = p (1 - lr wd) - lr / bc1 * m' / denom
            nisa.tensor_tensor(dst=m_sb[0:p], data1=m_sb[0:p], data2=v_sb[0:p], op=nl.multiply)
            nisa.tensor_scalar(dst=p_sb[0:p], data=p_sb[0:p], op0=nl.multiply, operand0=1.0 - lr * weight_decay)
            o_sb = nl.ndarray((P_MAX, _ADAMW_F), dtype=param.dtype, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=o_sb[0:p], data=m_sb[0:p], op0=nl.multiply, operand0=-lr / bc1,
                                      op1=nl.add, operand1=p_sb[0:p])
            nisa.dma_copy(dst=out[rows, cols], src=o_sb[0:p])
    return out


# ------------------------------------------------------------------------------------------------ cost model v2 points
_ROPE_SEQ_TILE = 4 * P_MAX          # A11: positions per tile (published "seq tiles of 512"), 4 rows per partition
_CONV_TAPS_MAX = 8


@nki.jit
def rope_a11(x, cos, sin):
    """A11: rotate-half RoPE on x[B=1, H, S, D] fp32 with cos/sin [S, D/2] re-read for every head (HBM traffic
    x + out + H x (cos + sin) = 402 MB at the published shape, as published). Per head and 512-position tile:
    x as [128 partitions, 4 positions, D] (one 512 B row per partition and position), out1 = x1 cos - x2 sin,
    out2 = x2 cos + x1 sin on VectorE."""
    _, n_h, seq, d = x.shape
    half = d // 2
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    per = _ROPE_SEQ_TILE // P_MAX
    for h in range(n_h):
        for i_s in range(seq // _ROPE_SEQ_TILE):
            s0 = i_s * _ROPE_SEQ_TILE
            x_sb = nl.ndarray((P_MAX, per, d), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=x_sb, src=x[0, h, s0:s0 + _ROPE_SEQ_TILE, :].reshape((per, P_MAX, d)).permute((1, 0, 2)))
            c_sb = nl.ndarray((P_MAX, per, half), dtype=cos.dtype, buffer=nl.sbuf)
            s_sb = nl.ndarray((P_MAX, per, half), dtype=sin.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=c_sb, src=cos[s0:s0 + _ROPE_SEQ_TILE, :].reshape((per, P_MAX, half)).permute((1, 0, 2)))
            nisa.dma_copy(dst=s_sb, src=sin[s0:s0 + _ROPE_SEQ_TILE, :].reshape((per, P_MAX, half)).permute((1, 0, 2)))
            o_sb = nl.ndarray((P_MAX, per, d), dtype=x.dtype, buffer=nl.sbuf)
            t_sb = nl.ndarray((P_MAX, per, half), dtype=nl.float32, buffer=nl.sbuf)
            x1, x2 = x_sb[:, :, 0:half], x_sb[:, :, half:d]
            nisa.tensor_tensor(dst=o_sb[:, :, 0:half], data1=x1, data2=c_sb, op=nl.multiply)
            nisa.tensor_tensor(dst=t_sb, data1=x2, data2=s_sb, op=nl.multiply)
            nisa.tensor_tensor(dst=o_sb[:, :, 0:half], data1=o_sb[:, :, 0:half], data2=t_sb, op=nl.subtract)
            nisa.tensor_tensor(dst=o_sb[:, :, half:d], data1=x2, data2=c_sb, op=nl.multiply)
            nisa.tensor_tensor(dst=t_sb, data1=x1, data2=s_sb, op=nl.multiply)
            nisa.tensor_tensor(dst=o_sb[:, :, half:d], data1=o_sb[:, :, half:d], data2=t_sb, op=nl.add)
            nisa.dma_copy(dst=out[0, h, s0:s0 + _ROPE_SEQ_TILE, :].reshape((per, P_MAX, d)).permute((1, 0, 2)),
                          src=o_sb)
    return out


@nki.jit
def swiglu_a3(x, w_gate, w_up, w_down):
    """A3: y = (silu(x @ Wg) * (x @ Wu)) @ Wd, fp32 (3 GEMMs + SiLU * mul). Per 128-row tile: x transposed on
    TensorE; gate and up in 512-wide PSUM tiles (SiLU on ScalarE, product on VectorE); h transposed; down
    projection K-accumulated. Weights do not fit SBUF next to each other in fp32, so they stream from HBM for
    every row tile (K-tile by K-tile)."""
    m_total, k_total = x.shape
    n_inter = w_gate.shape[1]
    n_out = w_down.shape[1]
    n_k, n_i = k_total // P_MAX, n_inter // P_MAX
    y = nl.ndarray((m_total, n_out), dtype=x.dtype, buffer=nl.shared_hbm)
    for i_m in range(m_total // P_MAX):
        m0 = i_m * P_MAX
        x_sb = nl.ndarray((P_MAX, k_total), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x[m0:m0 + P_MAX, :])
        xT = nl.ndarray((P_MAX, n_k, P_MAX), dtype=x.dtype, buffer=nl.sbuf)
        for i_k in range(n_k):
            _transpose_to_sbuf(xT[:, i_k, :], x_sb[:, i_k * P_MAX:(i_k + 1) * P_MAX])
        h_sb = nl.ndarray((P_MAX, n_inter), dtype=nl.float32, buffer=nl.sbuf)
        for i_n in range(n_inter // _N_TILE):
            cols = slice(i_n * _N_TILE, (i_n + 1) * _N_TILE)
            g_ps = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            u_ps = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            for i_k in range(n_k):
                wg = nl.ndarray((P_MAX, _N_TILE), dtype=w_gate.dtype, buffer=nl.sbuf)
                wu = nl.ndarray((P_MAX, _N_TILE), dtype=w_up.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=wg, src=w_gate[i_k * P_MAX:(i_k + 1) * P_MAX, cols])
                nisa.dma_copy(dst=wu, src=w_up[i_k * P_MAX:(i_k + 1) * P_MAX, cols])
                nisa.nc_matmul(g_ps, xT[:, i_k, :], wg, accumulate=i_k > 0)
                nisa.nc_matmul(u_ps, xT[:, i_k, :], wu, accumulate=i_k > 0)
            g_sb = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=g_sb, op=nl.silu, data=g_ps)
            nisa.tensor_tensor(dst=h_sb[:, cols], data1=g_sb, data2=u_ps, op=nl.multiply)
        hT = nl.ndarray((P_MAX, n_i, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
        for i_k in range(n_i):
            _transpose_to_sbuf(hT[:, i_k, :], h_sb[:, i_k * P_MAX:(i_k + 1) * P_MAX])
        y_sb = nl.ndarray((P_MAX, n_out), dtype=x.dtype, buffer=nl.sbuf)
        for i_n in range(n_out // _N_TILE):
            cols = slice(i_n * _N_TILE, (i_n + 1) * _N_TILE)
            acc = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            for i_k in range(n_i):
                wd = nl.ndarray((P_MAX, _N_TILE), dtype=w_down.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=wd, src=w_down[i_k * P_MAX:(i_k + 1) * P_MAX, cols])
                nisa.nc_matmul(acc, hT[:, i_k, :], wd, accumulate=i_k > 0)
            nisa.tensor_copy(dst=y_sb[:, cols], src=acc)
        nisa.dma_copy(dst=y[m0:m0 + P_MAX, :], src=y_sb)
    return y


@nki.jit
def matmul_add_rmsnorm_a7(x, w, residual, gamma, eps):
    """A7: y = rmsnorm(x @ w + residual) * gamma, fp32. w stays in SBUF; per 128-row tile: x transposed on TensorE,
    K-accumulated 512-wide matmuls, PSUM evicted with the residual add on VectorE, sum of squares on ScalarE,
    rsqrt, scale (VectorE), one store."""
    m_total, k_total = x.shape
    n_total = w.shape[1]
    n_k = k_total // P_MAX
    y = nl.ndarray((m_total, n_total), dtype=x.dtype, buffer=nl.shared_hbm)
    w_sb = nl.ndarray((P_MAX, n_k, n_total), dtype=w.dtype, buffer=nl.sbuf)
    for i_k in range(n_k):
        nisa.dma_copy(dst=w_sb[:, i_k, :], src=w[i_k * P_MAX:(i_k + 1) * P_MAX, :])
    g_sb = nl.ndarray((P_MAX, n_total), dtype=gamma.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=g_sb, src=gamma.reshape((1, n_total)).ap(pattern=[[0, P_MAX], [1, n_total]]))
    eps_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_sb, value=eps)
    for i_m in range(m_total // P_MAX):
        m0 = i_m * P_MAX
        x_sb = nl.ndarray((P_MAX, k_total), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x[m0:m0 + P_MAX, :])
        r_sb = nl.ndarray((P_MAX, n_total), dtype=residual.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=r_sb, src=residual[m0:m0 + P_MAX, :])
        xT = nl.ndarray((P_MAX, n_k, P_MAX), dtype=x.dtype, buffer=nl.sbuf)
        for i_k in range(n_k):
            _transpose_to_sbuf(xT[:, i_k, :], x_sb[:, i_k * P_MAX:(i_k + 1) * P_MAX])
        for i_n in range(n_total // _N_TILE):      # z = x @ w + residual, in place of the residual
            cols = slice(i_n * _N_TILE, (i_n + 1) * _N_TILE)
            acc = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            for i_k in range(n_k):
                nisa.nc_matmul(acc, xT[:, i_k, :], w_sb[:, i_k, cols], accumulate=i_k > 0)
            nisa.tensor_tensor(dst=r_sb[:, cols], data1=acc, data2=r_sb[:, cols], op=nl.add)
        y_sb = nl.ndarray((P_MAX, n_total), dtype=x.dtype, buffer=nl.sbuf)
        ss = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation_reduce(dst=y_sb, op=nl.square, data=r_sb, reduce_op=nl.add, reduce_res=ss)
        rstd = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=1.0 / n_total, bias=eps_sb)
        nisa.scalar_tensor_tensor(dst=y_sb, data=r_sb, op0=nl.multiply, operand0=rstd, op1=nl.multiply,
                                  operand1=g_sb)
        nisa.dma_copy(dst=y[m0:m0 + P_MAX, :], src=y_sb)
    return y


@nki.jit
def conv1d_naive_u5(img, filt):
    """U5 (first search step): depthwise conv1d, img [N, C, 1, W] fp32, filter [C, 1, 1, Wf], padding 1 each
    side. Image rows prefetched (zero-padded) per (n, 128-channel tile); then for every output column one
    VectorE multiply of the [128, Wf] window by the filter and one reduce over Wf; one store per (n, tile)."""
    n_img, c_total, _, w_in = img.shape
    taps = filt.shape[3]
    pad = (taps - 1) // 2
    w_out = w_in + 2 * pad - taps + 1
    out = nl.ndarray((n_img, c_total, 1, w_out), dtype=img.dtype, buffer=nl.shared_hbm)
    n_c = c_total // P_MAX
    f_sb = nl.ndarray((P_MAX, n_c, taps), dtype=filt.dtype, buffer=nl.sbuf)
    for c in range(n_c):
        nisa.dma_copy(dst=f_sb[:, c, :], src=filt[c * P_MAX:(c + 1) * P_MAX, 0, 0, :])
    for i_n in range(n_img):
        for c in range(n_c):
            img_sb = nl.ndarray((P_MAX, w_in + 2 * pad), dtype=img.dtype, buffer=nl.sbuf)
            nisa.memset(dst=img_sb, value=0.0)
            nisa.dma_copy(dst=img_sb[:, pad:pad + w_in], src=img[i_n, c * P_MAX:(c + 1) * P_MAX, 0, :])
            o_sb = nl.ndarray((P_MAX, w_out), dtype=img.dtype, buffer=nl.sbuf)
            for j in range(w_out):
                prod = nl.ndarray((P_MAX, taps), dtype=img.dtype, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=prod, data1=img_sb[:, j:j + taps], data2=f_sb[:, c, :], op=nl.multiply)
                nisa.tensor_reduce(dst=o_sb[:, j:j + 1], op=nl.add, data=prod, axis=1)
            nisa.dma_copy(dst=out[i_n, c * P_MAX:(c + 1) * P_MAX, 0, :], src=o_sb)
    return out


@nki.jit
def dma_one_engine(x):
    """DMA overview example 1 (trn2): a [4, 4096] bf16 tensor from HBM into 4 SBUF partitions, one DMA engine."""
    x_sb = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb, src=x)
    return None


@nki.jit
def act_dependent_chain(x, n_ops):
    """nki_perf_guide Opt #5a (trn1): back-to-back dependent ScalarE instructions on one element per partition."""
    t = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    for _ in range(n_ops):
        nisa.activation(dst=t, op=nl.exp, data=t, scale=0.0)
    return None
