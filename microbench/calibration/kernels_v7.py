"""v7 held-out calibration points: the selection rule, committed before any of these kernels was re-written or
modeled (the published latencies were known, no modeled figure was). The kernels follow in a later commit, from
the published code (read for data flow, never copied); the choices the published code leaves to the compiler are
written here before anything is modeled. Nobody has modeled these points; the v6 points' modeled errors were not
looked at.

Search record (from 00:36 UTC, 2026-12-07 [review correction: this commit is stamped 00:36:39, so "00:36-00:50"
was an estimate written before the search ended; the kernels landed at 00:47:50 (d3f2e03), after this commit,
and nothing was modeled before then]; `find_repos` "asst4", "trainium", "cs149"; `find_files` / `read_file`
on the repositories below; `fetch` of Jerry2423/kda-for-trainium@90770f2):
  * CS149 F25 asst4-trainium2 (trn2): `find_repos` "asst4" / "trainium" list the same 13 student repositories
    *asst4-trainium2* that kernels_v6.py records (xaviergonzalez, chenhzhu, rishic3, chengli2003, EtashGuha, a-argy,
    nriedman, Ni2002ka, msthaniana, juntongshi48, tianyeeT, rajajisai, Kelvinthedrugger) and no other; their
    published measurements are the v6 points (or were excluded by the v6 rule); conv2d publishes MFU % only.
    "cs149" finds no further trainium repository (the 2024 trn1 edition, *asst4-trainium*, stays out for the v6
    reason: nl.* programs without skip_middle_end_transformations).                               -> nothing new
  * Jerry2423/kda-for-trainium@90770f2 ("KDA on NKIBench"): an agent-driven optimisation of the 14 AccelOpt
    NKIBench operators, scored on a remote Trainium profiler, **trn2, single core, compiled with
    `--disable-dge --logical-nc-config=1`** (RESULTS.md; adapter/nkibench_case.py NKIBENCH_COMPILER_FLAGS).
    workspaces/<op>/benchmark.csv holds one row per measured candidate (candidate path, passed, latency_ms, notes
    with per-engine active % and HBM bytes); the candidate's exact code is workspaces/<op>/runs/<file>.py at the
    same commit. About 150 rows with passed=true and a latency over 14 operators.              -> qualifies
  * Listed by `find_repos` "trainium" but not examined within this round's time box (recorded for a later round,
    not used): allenkchau/trainium-kernel-fusion (neuron-profile json reports of attention / MLP kernels),
    Willy-Chan/trainium-linear-attention, yohan278/io-aware-attention-trainium.

Timing convention, decided from published evidence only. KDA's latency_ms is "p50 on-device latency" (verify.py,
the backend's documented output contract) of a profiler run that also yields per-engine utilisation, HBM
read/write bytes and DMA active time (summary_metrics; the benchmark.csv notes quote them, e.g. silu "DMA=97%
Scl=34% ... HBMrd=117MB HBMwr=117MB"), with AccelOpt's compile flags ("match them so speedups are comparable to
the paper's methodology"); AccelOpt's own figures are neuron-profile device times (`prof`, calibration.md S3).
So these points are `prof`: device time of the kernel, **no launch term**. Target trn2, LNC=1 (the flag is
published), one physical core.

The rule. A point is a published latency of an NKI kernel, not yet a point, not reserved (AWS matmul / Mamba
tutorial kernels and their derivatives, nki-autotune's GEMMs), with the hardware stated and the exact code the
device ran published, subject to (a) and (b) of points.py (the program runs as written: every SBUF / PSUM tensor
it allocates fits the core, one instruction per nisa / nl compute call, one DMA per nl.load / nl.store; one point
per distinct instruction stream). From KDA every benchmark.csv row with passed=true, a latency, and a candidate
file under runs/ qualifies, except: (i) the NKIBench baseline kernels (their streams are the AccelOpt S3 points,
whose re-writes were chosen looking at their trn1 errors), (ii) the mamba workspace (derived from the reserved
Mamba tutorial kernel), (iii) probe / diagnostic files that are not an op kernel (names *probe*, *diag*,
*offline*). Several rows of one stream (the same file measured again, or two files with the same instruction
stream by (b)) -> the median of their latency_ms (mean of the two middle values for an even count); the notes'
extra figures are not used.

This round re-writes the two pure element-wise streaming operators, **silu** (x: 4096 x 7168 fp32, NKIBench's
tiled view [128, 32, 7168]) and **adamw** (theta, g, m, v: 10944 x 2048 fp32), because their kernels are a few
instructions per tile and can be re-written and reference-checked within this round; every other qualifying
KDA row (add_rmsnorm_matmul, bmm, bmm_softmax, gqa_full, lora, matmul, matmul_add_rmsnorm, rmsnorm_matmul,
rope_single_freq_apply, swiglu, transpose_matmul) stays unused and un-modeled, reserved as held-out for a later
round by this same rule. The points (published latency_ms, every report):
  KS.v1    silu_v1: 32 x ([128, 7168] load, ScalarE silu, store)                     0.3009 ms
  KS.k2    silu_v2_k2: 16 x ([128, 2, 7168] load, silu, store)                       0.3350 ms
  KS.k3    silu_v2_k3: 10 x [128, 3, 7168] + tail [128, 2, 7168]                     0.7729 ms
  KS.k4    silu_v2_k4: 8 x [128, 4, 7168], silu in place (dst = src tile)           0.3971 ms
  KS.pp    silu_v2_pingpong: manual 2-deep prefetch, sequential_range                0.5889 ms
  KS.s2    silu_v3_s2: 64 x [128, 3584] (flat reshape view)                          0.3001 ms
  KS.s4    silu_v3_s4: 128 x [128, 1792]                                             0.2981 ms
  KS.s7    silu_v3_s7 (224 x [128, 1024], flat) and silu_v3_s7_nested (32 x 7 nested, same stream by (b)):
           median of 0.2940, 0.2938 = 0.2939 ms
  KS.s8    silu_v3_s8: 256 x [128, 896]                                              0.3105 ms
  KA.v1    adamw_v1: 86 row tiles [128, 2048] (last 64 rows, masked): 4 loads, ScalarE square, VectorE
           scalar_tensor_tensor, ScalarE rsqrt, 3 VectorE scalar_tensor_tensor, store      0.6180 ms
  KA.ch<CH> adamw_v2_ch<CH>: v1's chain, mask-free, over the (128, 175104 / CH, CH) view, one tile per
           iteration: CH = 512 0.7768, 576 0.5839, 608 0.5860, 684 0.6390, 768 0.7517, 912 0.5606,
           1024 0.5921, 1152 0.6834, 1216 median(0.5614, 0.5601) = 0.56075, 1368 0.5825,
           1536 0.6515, 1824 median(0.5478, 0.5474) = 0.5476, 2304 0.6105 ms
All 23 (9 KS, 14 KA) are held out, `prof`, trn2, LNC=1. If a kernel fails (a) when it is re-written, it is
dropped and the reason written here.

Choices the published code leaves to the compiler or to the emulator's API, fixed here before any v7 kernel is
modeled:
- NKI 0.7 form (`nisa.<op>(dst=..., ...)`); nl.affine_range / nl.sequential_range loops as Python `range` (the
  trace-time unrolled loop; the emulator's scheduler overlaps independent iterations as their dependencies and
  buffers allow); a 0.6-style `t = nisa.<op>(...)` / `t = nl.load(...)` allocates its SBUF tile at that point of
  the loop body, as written. nl.load / nl.store = one nisa.dma_copy of the whole tile.
- nisa.activation runs on ScalarE, nisa.scalar_tensor_tensor on VectorE, as the published comments say.
  The fp32 scalars of the adamw chain are immediate operands.
- HBM views: the published reshapes ((128, ITERS, CH) of the contiguous buffers) are reshapes of the HBM tensor,
  no data movement; silu's input and output are [128, 32, 7168] as NKIBench presents them.
- adamw_v1's masked last tile (rows 10880..10943 valid) loads, computes and stores the 64 valid rows; the
  compute instructions' cost depends on the free size, which is the same.
- silu_v2_pingpong's xbuf (2, par_dim(128), 7168) is one [128, 2, 7168] SBUF tile indexed [:, i % 2, :].
Added with the kernels (commit after the rule, before any modeling):
- every point is modeled at the published shape (no slice extrapolation); inputs standard normal fp32 (v = |normal|
  for adamw), as NKIBench draws them in distribution; values do not change the instruction stream.
- DMAs keep dma_copy's default dge_mode (static, host-built descriptors), matching `--disable-dge`.
- adamw_v2's (128, ITERS, CH) output buffer is the (128, FLAT) tensor viewed the same way (the same bytes); the
  inputs are passed as their (128, FLAT) view of the (10944, 2048) buffers.
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import P_MAX

# Published latency_ms of every benchmark.csv report, as the rule above lists them.
KDA_REPORTS_MS = {
    "KS.v1": (0.3009,), "KS.k2": (0.3350,), "KS.k3": (0.7729,), "KS.k4": (0.3971,), "KS.pp": (0.5889,),
    "KS.s2": (0.3001,), "KS.s4": (0.2981,), "KS.s7": (0.2940, 0.2938), "KS.s8": (0.3105,),
    "KA.v1": (0.6180,),
    "KA.ch512": (0.7768,), "KA.ch576": (0.5839,), "KA.ch608": (0.5860,), "KA.ch684": (0.6390,),
    "KA.ch768": (0.7517,), "KA.ch912": (0.5606,), "KA.ch1024": (0.5921,), "KA.ch1152": (0.6834,),
    "KA.ch1216": (0.5614, 0.5601), "KA.ch1368": (0.5825,), "KA.ch1536": (0.6515,), "KA.ch1824": (0.5478, 0.5474),
    "KA.ch2304": (0.6105,),
}


def median(values) -> float:
    """The rule's figure for several reports: the median (mean of the two middle values for an even count)."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


# ------------------------------------------------------------------------------------------------ silu (trn2)
# x is NKIBench's tiled view [P, MID, F] of the 4096 x 7168 input: P = 128 partitions, MID = 32 rows per partition,
# F = 7168 columns; every kernel computes out = x * sigmoid(x) with one ScalarE activation per tile.

SILU_MID, SILU_F = 32, 7168
KS_CHUNK = {"KS.v1": 7168, "KS.s2": 3584, "KS.s4": 1792, "KS.s7": 1024, "KS.s8": 896}   # free-axis chunk
KS_GROUP = {"KS.k2": (2, False), "KS.k3": (3, False), "KS.k4": (4, True)}               # (rows per tile, in place)


@nki.jit
def kda_silu_chunks(x, chunk):
    """KS.v1 / KS.s*: the [P, MID * F] rows viewed as (P, MID * F / chunk, chunk); per chunk one load, one ScalarE
    silu into a new tile, one store."""
    p, mid, f = x.shape
    iters = mid * f // chunk
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    x_v, out_v = x.reshape((p, iters, chunk)), out.reshape((p, iters, chunk))
    for j in range(iters):
        x_sb = nl.ndarray((p, chunk), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x_v[:, j, :])
        y_sb = nl.ndarray((p, chunk), dtype=x.dtype, buffer=nl.sbuf)
        nisa.activation(dst=y_sb, op=nl.silu, data=x_sb)
        nisa.dma_copy(dst=out_v[:, j, :], src=y_sb)
    return out


@nki.jit
def kda_silu_groups(x, group, in_place):
    """KS.k*: `group` MID rows per [P, group, F] tile (a last tile of MID % group rows), one load, one ScalarE silu
    (into the loaded tile itself when in_place), one store."""
    p, mid, f = x.shape
    tail = mid % group
    spans = [(s, group) for s in range(0, mid - tail, group)] + ([(mid - tail, tail)] if tail else [])
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    for start, rows in spans:
        x_sb = nl.ndarray((p, rows, f), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x[:, start:start + rows, :])
        y_sb = x_sb if in_place else nl.ndarray((p, rows, f), dtype=x.dtype, buffer=nl.sbuf)
        nisa.activation(dst=y_sb, op=nl.silu, data=x_sb)
        nisa.dma_copy(dst=out[:, start:start + rows, :], src=y_sb)
    return out


@nki.jit
def kda_silu_pingpong(x):
    """KS.pp: a [P, 2, F] buffer; row 0 loaded first, then per row i: load row i + 1 into slot (i + 1) % 2, ScalarE
    silu of slot i % 2 into a new tile, store row i; the last row's silu and store after the loop."""
    p, mid, f = x.shape
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    x_buf = nl.ndarray((p, 2, f), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_buf[:, 0, :], src=x[:, 0, :])
    for i in range(mid - 1):
        nisa.dma_copy(dst=x_buf[:, (i + 1) % 2, :], src=x[:, i + 1, :])
        _silu_store(x_buf[:, i % 2, :], out[:, i, :])
    _silu_store(x_buf[:, (mid - 1) % 2, :], out[:, mid - 1, :])
    return out


def _silu_store(x_row, out_row):
    y_sb = nl.ndarray(x_row.shape, dtype=x_row.dtype, buffer=nl.sbuf)
    nisa.activation(dst=y_sb, op=nl.silu, data=x_row)
    nisa.dma_copy(dst=out_row, src=y_sb)


# ------------------------------------------------------------------------------------------------ adamw (trn2)
# One AdamW step (t = 1, lr 1e-3, betas 0.9 / 0.999, decoupled weight decay 0.01, eps dropped as published) over
# theta, g, m, v [M, N] fp32, in the published folded form
#   new_theta = 0.99999 * theta - 0.001 * (9 m + g) * rsqrt(999 v + g^2):
# per tile ScalarE g^2, VectorE (v * 999) + g^2, ScalarE rsqrt, VectorE (m * 9) + g, (.. * 0.001) * rsqrt,
# (theta * 0.99999) - term.

ADAMW_M, ADAMW_N = 10944, 2048
ADAMW_FLAT = ADAMW_M * ADAMW_N // P_MAX          # 175104 elements per partition in the (128, FLAT) view
KA_CHUNKS = (512, 576, 608, 684, 768, 912, 1024, 1152, 1216, 1368, 1536, 1824, 2304)
THETA_DECAY, VHAT_SCALE, M_SCALE, LR_FOLD = 0.99999, 999.0, 9.0, 0.001


def _adamw_chain(theta_sb, g_sb, m_sb, v_sb):
    """The six-instruction fused update of one tile; returns the new-theta tile."""
    def tile():
        return nl.ndarray(theta_sb.shape, dtype=nl.float32, buffer=nl.sbuf)
    g2, vhat, rden, mm, term, new = tile(), tile(), tile(), tile(), tile(), tile()
    nisa.activation(dst=g2, op=nl.square, data=g_sb)
    nisa.scalar_tensor_tensor(dst=vhat, data=v_sb, op0=nl.multiply, operand0=VHAT_SCALE, op1=nl.add, operand1=g2)
    nisa.activation(dst=rden, op=nl.rsqrt, data=vhat)
    nisa.scalar_tensor_tensor(dst=mm, data=m_sb, op0=nl.multiply, operand0=M_SCALE, op1=nl.add, operand1=g_sb)
    nisa.scalar_tensor_tensor(dst=term, data=mm, op0=nl.multiply, operand0=LR_FOLD, op1=nl.multiply,
                              operand1=rden)
    nisa.scalar_tensor_tensor(dst=new, data=theta_sb, op0=nl.multiply, operand0=THETA_DECAY, op1=nl.subtract,
                              operand1=term)
    return new


def _load_four(srcs, shape):
    tiles = []
    for src in srcs:
        t = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=src)
        tiles.append(t)
    return tiles


@nki.jit
def kda_adamw_rows(theta, g, m, v):
    """KA.v1: 128-row tiles of [M, N] (the last one M % 128 rows): four loads, the chain, one store."""
    rows, cols = theta.shape
    out = nl.ndarray((rows, cols), dtype=theta.dtype, buffer=nl.shared_hbm)
    for r0 in range(0, rows, P_MAX):
        n = min(P_MAX, rows - r0)
        ins = _load_four([t[r0:r0 + n, :] for t in (theta, g, m, v)], (n, cols))
        nisa.dma_copy(dst=out[r0:r0 + n, :], src=_adamw_chain(*ins))
    return out


@nki.jit
def kda_adamw_chunks(theta, g, m, v, chunk):
    """KA.ch*: the buffers' (P, FLAT) view walked as (P, FLAT / chunk, chunk): per [P, chunk] tile four loads, the
    chain, one store."""
    p, flat = theta.shape
    iters = flat // chunk
    out = nl.ndarray((p, flat), dtype=theta.dtype, buffer=nl.shared_hbm)
    views = [t.reshape((p, iters, chunk)) for t in (theta, g, m, v, out)]
    for j in range(iters):
        ins = _load_four([vw[:, j, :] for vw in views[:4]], (p, chunk))
        nisa.dma_copy(dst=views[4][:, j, :], src=_adamw_chain(*ins))
    return out


# ------------------------------------------------------------------------------------------------ point specs
# Each spec is a calibration Point's fields (points.py adds split="held-out"). make(k, rng) -> (args, kwargs).
# silu: k = MID rows per partition (published 32); adamw v1: k = row tiles (published 86, the last of 64 rows);
# adamw ch: k = chunks per partition (published FLAT / CH). Every point is modeled at the published shape
# (k_model = (k_full,), no extrapolation): each emulates in seconds and under 1 GB.


def _normal(rng, *shape):
    import numpy as np
    return rng.standard_normal(shape).astype(np.float32)


def _silu_make(k, rng):
    return (_normal(rng, P_MAX, k, SILU_F),), {}


def _silu_args(extra):
    def make(k, rng):
        (x,), _ = _silu_make(k, rng)
        return (x, *extra), {}
    return make


def _adamw_inputs(rng, *shape):
    import numpy as np
    theta, g, m = (_normal(rng, *shape) for _ in range(3))
    return theta, g, m, np.abs(_normal(rng, *shape))


def _adamw_rows_make(k, rng, n=ADAMW_N):
    return _adamw_inputs(rng, P_MAX * (k - 1) + ADAMW_M % P_MAX, n), {}


def _adamw_chunks_make(chunk):
    def make(k, rng):
        return (*_adamw_inputs(rng, P_MAX, k * chunk), chunk), {}
    return make


def ref_silu(x, *_consts):
    import numpy as np
    x64 = x.astype(np.float64)
    return x64 / (1.0 + np.exp(-x64))


def ref_adamw(theta, g, m, v, *_consts, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01):
    """torch.optim.AdamW's first step (eps omitted, as the published kernel), float64."""
    import numpy as np
    theta, g, m, v = (t.astype(np.float64) for t in (theta, g, m, v))
    m1 = beta1 * m + (1 - beta1) * g
    v1 = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m1 / (1 - beta1), v1 / (1 - beta2)
    return theta * (1 - lr * weight_decay) - lr * m_hat / np.sqrt(v_hat)


_KDA_SRC = "Jerry2423/kda-for-trainium@90770f2 (trn2, 1 core, LNC=1), p50 on-device latency (prof): "


def _ks(pid, kernel, make, notes, name="silu"):
    return dict(id=pid, name=name, shape="4096 x 7168 fp32 (tiled [128, 32, 7168])", target="trn2",
                measured_us=1000.0 * median(KDA_REPORTS_MS[pid]), source=_KDA_SRC + "workspaces/silu",
                kernel=kernel, make=make, k_full=SILU_MID, k_model=(SILU_MID,), reference=ref_silu, timing="prof",
                time_cores=2,
                notes=notes + "; k = MID rows per partition")


def _ka_chunk(chunk):
    pid = f"KA.ch{chunk}"
    return dict(id=pid, name="adamw", shape="10944 x 2048 fp32 (view (128, 175104))", target="trn2",
                measured_us=1000.0 * median(KDA_REPORTS_MS[pid]), source=_KDA_SRC + "workspaces/adamw",
                kernel=kda_adamw_chunks, make=_adamw_chunks_make(chunk), k_full=ADAMW_FLAT // chunk,
                k_model=(ADAMW_FLAT // chunk,),
                reference=ref_adamw, timing="prof", time_cores=2,
                notes=f"adamw_v2_ch{chunk}: [128, {chunk}] tiles, 4 loads + 6-op chain + store; k = chunks")


POINT_SPECS = (
    *[_ks(pid, kda_silu_chunks, _silu_args((chunk,)), f"[128, {chunk}] tiles: load, ScalarE silu, store")
      for pid, chunk in KS_CHUNK.items()],
    *[_ks(pid, kda_silu_groups, _silu_args((group, in_place)),
          f"[128, {group}, 7168] tiles{' (silu in place)' if in_place else ''}"
          f"{f', last tile {SILU_MID % group} rows' if SILU_MID % group else ''}")
      for pid, (group, in_place) in KS_GROUP.items()],
    _ks("KS.pp", kda_silu_pingpong, _silu_make, "2-slot prefetch buffer, loads one row ahead"),
    dict(id="KA.v1", name="adamw", shape="10944 x 2048 fp32", target="trn2",
         measured_us=1000.0 * median(KDA_REPORTS_MS["KA.v1"]), source=_KDA_SRC + "workspaces/adamw",
         kernel=kda_adamw_rows, make=_adamw_rows_make, k_full=-(-ADAMW_M // P_MAX), k_model=(-(-ADAMW_M // P_MAX),),
         reference=ref_adamw, timing="prof", time_cores=2,
         notes="adamw_v1: 128-row tiles (last 64 rows), 4 loads + 6-op chain + store; k = row tiles"),
    *[_ka_chunk(c) for c in KA_CHUNKS],
)
