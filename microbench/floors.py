"""Lower bounds on modeled kernel time, from the cost model's own constants (`python -m microbench.floors`).

A goal stated as "<= x times the roofline" can sit below what the cost model allows *any* kernel to reach,
because the roofline counts only bytes and FLOPs while the model also charges DMA start latencies, the
efficiency of short contiguous runs, and the bytes a kernel must move between partition layouts. This module
derives such floors for the goals the performance round could not meet, so that the claim "not reachable
under this model" is a number anyone can recompute, not an opinion. Every floor ignores all compute and
assumes perfect overlap, so a kernel's modeled time can never be below it (tests/microbench/test_floors.py
checks that against the kernels).

Floors (all "modeled µs on trn2" by default; constants from nki_kernels.emulator.costmodel; bandwidth and roofline
of the default LNC, two cores on trn2, as the kernels launch):

* MoE prefill, any design: each routed (token, expert) row is computed on the partitions of its expert's
  block and must be summed into its token's output row. Without an on-chip scatter-add, that sum costs at
  least two DMA passes over the routed rows (write + read back, or one accumulating DMA, which the model
  charges for reading its destination too), unless every slot's output stays on chip (T * TOPK * H * 2 B
  within SBUF) so a GpSimd gather could sum it. Floor = roofline + passes * (routed rows at the DMA rate).
  (TensorE cannot stand in for the DMA passes: a one-hot matmul moving a block's rows between token order and
  expert order costs about T / (3 I) times that block's expert FLOPs, 3-11x at these shapes.)
* MoE prefill, this kernel's design: the rows also come in by DMA (three passes), or, where its DMA combine gathers
  x on chip (`blockwise.onchip_x_gather`: x loaded once, counted in the roofline's bytes), two.
* MoE decode, any design: the needed bytes (chosen + shared experts, x, routing inputs) over both cores' DMA
  pipes, one DMA latency, then the output write after the last byte (a DMA, or register stores for the
  columns whose down weights land last). No bound on when the ids arrive (a `register_load` from HBM is one
  GpSimd instruction in the model). This kernel's design: ids by DMA, then the dynamic weight DMAs (one
  DMA latency after the last is booked), then the output DMA (one more latency); the shared expert streams
  from t = 0.
* Gated DeltaNet decode step: no floor. Its goals are met (B=1 slot pool 8.30 µs at LNC=2), and the floor this
  module had (per-head state DMAs of 512 B rows, 9.2 µs) did not bound the current design, which moves all
  owned heads of a sequence in one DMA each way ([Dk, Hv / LNC, Dv], 2 KiB rows) and is modeled below it.

The latency-bound floor (MoE decode) is printed again with the documented low-end DMA latencies
(LOW_LATENCY), because the model's 1.3 µs / +0.6 µs (hardware DGE) were not measured on these kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap

from microbench.cases import moe as moe_cases
from microbench.shapes import CATALOGUE
from nki_kernels.emulator.costmodel import dma_efficiency as _cm_dma_efficiency
from nki_kernels.emulator.costmodel import hbm_bytes_per_s, params_for, roofline_us
from nki_kernels.emulator.targets import get_target
from nki_kernels.moe.blockwise import onchip_x_gather

_BF16_BYTES = 2


def dma_efficiency(run_bytes: int, target=None) -> float:
    """The cost model's DMA efficiency for contiguous runs of `run_bytes` (costmodel.dma_efficiency)."""
    return _cm_dma_efficiency(run_bytes, get_target(target))


def default_lnc(target=None) -> int:
    """The LNC kernels launch with by default on `target` (nki_kernels.lnc: 2 on trn2/trn3, 1 on trn1). Floors
    count that many cores' HBM bandwidth (a floor must hold for the kernel as the microbench runs it)."""
    return 2 if get_target(target).nc_version >= 3 else 1


def _bw(target) -> float:
    """HBM bytes/s of one launch at the default LNC."""
    return hbm_bytes_per_s(get_target(target)) * default_lnc(target)


def _transfer_us(nbytes: float, run_bytes: int, target) -> float:
    return nbytes / (_bw(target) * dma_efficiency(run_bytes, target)) * 1e6


def _sbuf_bytes(target) -> int:
    t = get_target(target)
    return t.sbuf_bytes_per_partition * t.pmax


def moe_prefill_floor(model: str, n_tokens: int, target=None) -> dict:
    """Floors of moe_blockwise at `n_tokens` for a per-rank model shape of microbench.shapes.CATALOGUE."""
    s = CATALOGUE[model]
    flops, nbytes = moe_cases._costs(s, n_tokens)
    roof = roofline_us(flops, nbytes, get_target(target), cores=default_lnc(target))
    row_bytes = s.hidden * _BF16_BYTES
    rows_us = _transfer_us(n_tokens * s.top_k * row_bytes, row_bytes, target)
    all_slots_on_chip = n_tokens * s.top_k * row_bytes <= _sbuf_bytes(target)
    passes_any = 0 if all_slots_on_chip else 2
    assumes = ("every slot's output on chip, summed by a GpSimd gather" if all_slots_on_chip else
               "any design: 2 DMA passes over the routed rows")
    # this kernel's design: its slot-row store and read-back, plus the x row gathers unless its DMA combine gathers
    # x on chip (shapes only), passes over the routed rows counted at full DMA efficiency (its DMAs may coalesce
    # rows into longer runs than one row, so the per-row efficiency is not a bound for it)
    block = moe_cases.prefill_block_size(n_tokens, s.top_k, s.experts)
    x_on_chip = onchip_x_gather(n_tokens, s.hidden, s.expert_inter, block, s.top_k, _BF16_BYTES,
                                get_target(target).name)
    passes_design = 2 if x_on_chip else 3
    rows_full_us = n_tokens * s.top_k * row_bytes / _bw(target) * 1e6
    return dict(kernel="moe_blockwise", model=model, shape=f"T={n_tokens}", roofline_us=roof, assumes=assumes,
                routed_rows_pass_us=rows_us, passes_any=passes_any,
                floor_any_us=roof + passes_any * rows_us, floor_design_us=roof + passes_design * rows_full_us)


# the low ends of the DMA latencies (docs/cost-model.md): 1.0 µs trigger-to-data, and the hardware DGE's ~600 ns
# hidden behind earlier ScalarE work (nki-dge.rst: "can overlap with earlier compute"); the model uses 1.3 + 0.6 µs
LOW_LATENCY = dict(dma_fixed_us=1.0, hwdge_us=0.0)


def _params(target, latency):
    p = params_for(get_target(target))
    return dataclasses.replace(p, **latency) if latency else p


def _latency_note(p, latency) -> str:
    """What the `assumes` column adds when the DMA latencies were overridden."""
    return "" if not latency else f"; DMA latency {p.dma_fixed_us} µs, hardware DGE +{p.hwdge_us} µs"


def moe_decode_floor(model: str, n_tokens: int = 1, target=None, latency: dict | None = None) -> dict:
    """Floors of moe_decode at T = n_tokens (distinct experts assumed = T * TOPK, capped at E); `latency`
    overrides the DMA latency constants (e.g. LOW_LATENCY) to show how much the floors depend on them.

    floor_any_us, every design (docs/moe.md "moe_decode floor"): a launch starts with nothing on chip, so the
    chosen experts' weights, the shared expert, x and the routing inputs (`need` bytes) cross the DMA pipes of
    the `cores` cores at <= B bytes/s each (any packet shape: efficiency <= 1; collectives use the same pipe), or
    <= 4 B per GpSimd `register_load` (`t_reg` µs each). Every DMA lands >= L (dma_fixed_us) after it is booked,
    so the busier core's last byte lands >= L + its bytes / B after the start, whatever the ids path (DMA,
    register_load, routing in the kernel), prefetching, split, exchange or packet shape. That byte feeds some
    output column, and an HBM write is a DMA (>= L more) or a `register_store` (a register_load from SBUF + a
    store per 32 bits). Bytes landing in the last L can only feed register-stored columns (col_bytes of down
    weights each: a gate_up byte feeds every column); their stores fit in L only for B * t_col / col_bytes of
    bandwidth, so the tail after the last byte is >= L * (1 - col_bytes / (B * t_col)).

    floor_design_us, the family that reads the ids by DMA, streams the routed weights by dynamic DMA after them
    and writes the output by DMA (this kernel): ids (L), the routed bytes booked from then on, the last landing
    L later (software DGE: no hardware DGE latency at the end), the output DMA (L); the shared expert's weights
    stream from t = 0."""
    s = CATALOGUE[model]
    t = get_target(target)
    p = _params(t, latency)
    cores = default_lnc(t)
    flops, nbytes = moe_cases._costs(s, n_tokens)
    roof = roofline_us(flops, nbytes, t, cores=cores)
    n_exp = min(s.experts, n_tokens * s.top_k)
    routed = n_exp * 3 * s.hidden * s.expert_inter * _BF16_BYTES
    shared = (3 * s.hidden * s.shared_inter + s.hidden) * _BF16_BYTES if s.shared_inter else 0
    inputs = n_tokens * s.hidden * _BF16_BYTES + n_tokens * s.top_k * 8       # x, top-k ids + weights
    need = routed + shared + inputs
    b_core = hbm_bytes_per_s(t) * 1e-6                                         # bytes per µs, one core
    lat = p.dma_fixed_us
    t_reg = p.min_ii / (t.pool_ghz * 1e3)                                      # µs per GpSimd register op
    # per output column (T elements): one register_load + one register_store per 32 bits = T / 2 of each
    t_col = n_tokens * t_reg / cores
    col_bytes = (n_exp * s.expert_inter + s.shared_inter) * _BF16_BYTES     # down weights feeding one column
    tail = lat * max(0.0, 1.0 - col_bytes / (b_core * t_col))
    # F >= L + (need - cores * 4 B * F / t_reg) / (cores * B) + tail, solved for F
    floor_any = (lat + need / (cores * b_core) + tail) / (1.0 + 4.0 / (t_reg * b_core))
    bw_us = 1.0 / (cores * b_core)
    weights_in = max(lat + lat + routed * bw_us, lat + (routed + shared) * bw_us)
    lat_note = _latency_note(p, latency)
    return dict(kernel="moe_decode", model=model, shape=f"T={n_tokens}", roofline_us=roof,
                assumes="any design: the needed bytes over both cores' DMA pipes, one DMA latency, then the "
                        "output write (DMA, or register stores for the last-landing columns)" + lat_note,
                floor_any_us=floor_any, tail_us=tail, floor_design_us=weights_in + lat,
                fixed_latency_us=3 * lat)


def floor_table(target=None) -> list[dict]:
    """The floors for the issue goals that were not met (MoE prefill and decode)."""
    rows = []
    for model in ("qwen3.5-35b-a3b tp4", "qwen3-omni thinker tp8", "qwen3-omni talker tp8"):
        for n in (1024, 4096):
            rows.append(moe_prefill_floor(model, n, target))
    for model in ("qwen3.5-35b-a3b tp4", "qwen3-omni thinker tp8", "qwen3-omni talker tp8"):
        rows.append(moe_decode_floor(model, 1, target))
    # sensitivity: the latency-bound floor with the documented low-end DMA latencies
    rows.append(moe_decode_floor("qwen3-omni talker tp8", 1, target, latency=LOW_LATENCY))
    return rows


_GOALS = {"moe_blockwise": ("x roofline", 1.5), "moe_decode": ("x roofline", 1.3)}


def _fmt(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def render(rows, target_name: str) -> str:
    out = [f"Floors on modeled time ({target_name}; `python -m microbench.floors`): no kernel can be modeled "
           "faster. Compute is ignored and overlap assumed perfect.", "",
           "| kernel | model | shape | roofline µs | floor µs | floor / roofline | goal | floor assumes | "
           "floor µs (this kernel's design) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit, goal = _GOALS[r["kernel"]]
        roof = r.get("roofline_us")
        ratio = r["floor_any_us"] / roof if roof else None
        goal_s = f"<= {goal:g}{unit if unit == 'µs' else 'x'}"
        if unit == "µs":
            meets = r["floor_any_us"] <= goal
        else:
            meets = ratio <= goal
        verdict = "reachable" if meets else "**not reachable**"
        out.append(f"| {r['kernel']} | {r['model']} | {r['shape']} | {_fmt(roof)} | {_fmt(r['floor_any_us'])} | "
                   f"{'-' if ratio is None else f'{ratio:.2f}x'} | {goal_s}: {verdict} | {r['assumes']} | "
                   f"{_fmt(r.get('floor_design_us'))} |")
    return "\n".join(out)


_GOAL_TEXT = {"moe_blockwise": "modeled time <= 1.5x its roofline (prefill)",
              "moe_decode": "modeled time <= 1.3x the time to stream the chosen + shared experts' weights"}


def render_text(rows, target_name: str, width: int = 120) -> str:
    """The console form of `render`: one block per goal, the assumption wrapped under its row, <= `width` columns."""
    out = textwrap.wrap(f"Floors on modeled time ({target_name}): no kernel can be modeled faster than the floor. "
                        "Compute is ignored and overlap assumed perfect. Markdown table: python -m microbench.floors "
                        "--markdown", width)
    head = f"  {'model':<24}{'shape':<16}{'roofline µs':>12}{'floor µs':>10}{'floor/roof':>11}  goal reachable?"
    kernel = None
    for r in rows:
        if r["kernel"] != kernel:
            kernel = r["kernel"]
            unit, goal = _GOALS[kernel]
            out += ["", f"{kernel}: goal {_GOAL_TEXT.get(kernel, '')}", head]
        unit, goal = _GOALS[r["kernel"]]
        roof = r.get("roofline_us")
        ratio = r["floor_any_us"] / roof if roof else None
        meets = r["floor_any_us"] <= goal if unit == "µs" else ratio <= goal
        out.append(f"  {r['model']:<24}{r['shape']:<16}{_fmt(roof):>12}{_fmt(r['floor_any_us']):>10}"
                   f"{'-' if ratio is None else f'{ratio:.2f}x':>11}  {'yes' if meets else 'NO'}")
        design = r.get("floor_design_us")
        note = "assumes " + r["assumes"] + ("" if design is None else f"; this kernel's design: {_fmt(design)} µs")
        out += textwrap.wrap(note, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microbench.floors", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="trn1, trn2 (default) or trn3")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table (for docs) instead")
    args = ap.parse_args(argv)
    t = get_target(args.target)
    rows = floor_table(t)
    print(render(rows, t.name) if args.markdown else render_text(rows, t.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
