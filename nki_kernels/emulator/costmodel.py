"""Cost model: an emulator instruction trace -> modeled time on a Trainium target.

Everything this module returns is *modeled*, not measured. The model (v2; every constant with its source and
uncertainty in docs/cost-model.md):

* per-instruction engine time from the NC-v2 cycle table in ../shared/reference/nki-api.md section 4
  (TensorE by moving/stationary size, fp32 at quarter rate, 64-cycle minimum issue; VectorE / ScalarE /
  GpSimd by elements per partition with minimum issue and fixed latency; bf16 performance mode on v3+, which
  shares a port with GpSimd; fp8 double_row and PE tiles (tile_position / tile_size); GpSimd gathers);
* DMA by bytes at the per-core bandwidth, on ceil(partitions / 8) of the 16 engines, with a fixed latency, a
  packet-rate floor for short packets (a partition row; on NeuronCore-v2 one engine's rows where HBM is contiguous
  across them), a per-element rate for element-strided (transposing) access,
  hardware DGE latency or software DGE GpSimd time for dynamic transfers, at most `dma_queues` transfers in
  flight sharing the bandwidth; collectives by a Mesh/Ring latency-bandwidth model (`collective_cost`, and
  `collective_us` between launches);
* a list schedule: each engine takes its instructions in program order (with a reorder window, as the
  compiler's scheduler does); an instruction starts when its engine has room and the producers of what it
  reads (RAW) and the readers/writers of what it overwrites (WAR/WAW) are done, using the (sid, lo, hi)
  spans of the trace; a tile allocated in a loop body rotates through `tile_buffers` buffers;
* LNC=2: each program instance on its own core (HBM bandwidth per core as documented), time = slower core;
* a per-launch overhead, reported separately (`launch_overhead_us`) from device time (`device_us`).

API (stable): ``model_launches(run_results, target=None) -> ModelReport`` and
``model_trace(trace, target=None) -> TraceReport``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

from .targets import Target, get_target
from .trace import ACT, DMA, DVE, ENGINES, PE, POOL

# ----------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CostParams:
    """Cost-model constants per target. Sources and uncertainty ranges in docs/cost-model.md."""
    min_ii: int = 64                      # minimum cycles per compute instruction (nki-api.md s4, MIN_II)
    pe_stationary_load_div: int = 4       # LoadStationary up to 4x faster than the matmul (s4)
    pe_fp32_pass_overhead: int = 64       # fp32 matmul = 4 PE passes, each paying MM_INIT_LATENCY (64 cycles);
                                          # fitted assumption: A2/A5 (PE-bound fp32) ran ~20% under the plain 4x
    pe_fixed_latency: int = 64            # cycles from matmul issue to PSUM result visible to others
    act_fixed_latency: int = 200          # ScalarE: 264 cycles per dependent 1-element op measured (s4) - 64
    dve_fixed_latency: int = 160          # VectorE: ~100 static + ~60 SBUF access start (s4)
    pool_fixed_latency: int = 160         # GpSimd: same as VectorE
    act_elems_pp_per_cycle: float = 1.0   # ScalarE elements per partition per cycle
    act_bf16_elems_pp_per_cycle: float = 1.0
    dve_elems_pp_per_cycle: float = 1.0   # VectorE base rate (NC-v2 table: max(64, N)). NeuronCore-v3/v4: 2.0, the
                                          # datapath of "256 input/output for other data types" per cycle over
                                          # 128 partitions (trainium2_arch.rst, Compute Engine Specifications);
                                          # performance mode lifts a rate to max(this, perf factor x the v2 rate)
    dve_one_pass: bool = False            # NeuronCore-v3/v4 only, preset `dve-one-pass-low`: a two-input VectorE
                                          # instruction (tensor_tensor, select, scalar_tensor_tensor) in one pass,
                                          # N / rate cycles, instead of the isa's 2N. v9 fitted it on the KDA adamw
                                          # points read as one core; as two cores (v10) the documented 2N fits them
    dve_perf_mode: bool = False           # v3+: bf16 copy / tensor_scalar 4x, tensor_tensor 2x from SBUF
    range_select_passes: float = 1.0      # nisa.range_select (VectorE, v3+): passes over its N elements. Nothing
                                          # published; one, like a copy from the same source [U: 1-2, preset
                                          # `range-select-high`: a select pass plus a reduce pass]
    dve_min_ii: float = 64.0              # VectorE minimum cycles of an instruction (per pass, see below). Documented:
                                          # MIN_II ~64 (isa cost table), ~60 of it the tensor access start that
                                          # "compute engines can typically hide ... through instruction level
                                          # parallelism" (trainium_inferentia2_arch.rst). NeuronCore-v2: 32, fitted
                                          # on U5.5 (one-column conv1d, filter in PSUM: 84 measured cycles per 2
                                          # instructions, which the model's schedule stretches with its 160-cycle
                                          # result latency) with U5 / U5.3 (below); v3 / v4: nothing published, the
                                          # documented 64 stays; the low preset carries the v2 fit over [U: 24-64]
    dve_two_pass_min: bool = False        # NeuronCore-v2: a tensor_tensor reading both inputs from SBUF (the isa's
                                          # two-pass 2N case) pays the minimum per pass, 2 x dve_min_ii. Fitted with
                                          # dve_min_ii (U5 / U5.3: 135 cycles per column for the two-pass multiply
                                          # and a reduce); not published for v3 / v4
    pool_elems_pp_per_cycle: float = 1.0  # GpSimd: 8 cores x 512 bit, 16 partitions each -> 1 fp32/partition/cycle
    dma_fixed_us: float = 1.3             # DMA trigger -> data: "~1300 ns cross-engine" descriptor / semaphore-to-start
                                          # latency (nki-dma-bandwidth-guide.rst) [U: 1.0-2.0]
    dma_knee_bytes: float = 2560.0        # packet-rate limit: a descriptor of `run` contiguous bytes keeps its engine
                                          # busy at least as long as `dma_knee_bytes` at the engine's peak rate, so
                                          # efficiency = run / max(run, knee): 256 B 10%, 512 B 20%, 1 KiB 40%,
                                          # 2 KiB 80%, >= 2.5 KiB 100%. Read off the published throughput-vs-bytes-
                                          # per-partition figure (p_dim = 128) of nki-dma-overview.rst: throughput is
                                          # proportional to bytes up to 1 KiB (a fixed time per packet) and the
                                          # knee is 2.4-2.6 KiB; the bandwidth guide states the same thresholds in
                                          # bytes for every generation. v2: 40 ns added per descriptor [U: 2048-3072]
                                          # on NeuronCore-v2. v11: 512 B on NeuronCore-v3 (and v4, assumed like
                                          # v3): published trn2 kernels move 512 B and 1 KiB rows as fast as 2 KiB
                                          # and longer ones (KDA rope: 128-, 256- and 512-column fp32 tiles within
                                          # 2% of each other, 0.687-0.699 ms), which a 2560 B floor models 2-4x
                                          # too slow (docs/cost-model.md, "v11 round") [U: 256-1024 on v3 / v4]
    dma_elem_ns: float = 0.5              # element-strided DMA (a transposing load: load_transpose2d, a permuted
                                          # view): the descriptor carries the access pattern ("shape, and stride
                                          # pattern", nki-dge.rst), so a partition row is one packet, not one per
                                          # element, and the engines walk it (all 16, like a DMA transpose) at
                                          # this many ns per element on top of the packet floor. A long fp32 row
                                          # then runs at ~30% of a copy: "much lower DMA bandwidth compared to
                                          # nl.load" (nki_perf_guide.rst Opt #8 / #10; no figure published).
                                          # Low end: trn2's hardware DMA transpose (<= 90% of copy, 2- and
                                          # 4-byte elements, trainium2_arch.rst) ~0.25 ns per 4 B [U: 0.25-1.0]
    dma_partitions_per_engine: int = 8    # each of the 16 DMA engines serves 8 SBUF partitions (nki-dma-overview.rst):
                                          # a transfer touching P partitions runs on ceil(P / 8) engines
    dma_packet_spans_rows: bool = False   # v13 (NeuronCore-v2 only): a packet is one engine's group of partition
                                          # rows where the HBM side is contiguous across them ("packets, one per
                                          # engine per group of SBUF partitions", Neuron Explorer guide "How to
                                          # identify and reduce inefficient DMA transfers"; nki-dma-overview.rst
                                          # examples 1 / 2: one 32 KiB operation for 4 rows on one engine, one
                                          # 2 KiB operation of 8 rows x 256 B per engine), else one partition row
    hwdge_us: float = 0.6                 # hardware DGE: ~600 ns per DMA instruction (nki-dge.rst); 2 DGE per core
    dge_instances: int = 2
    swdge_min_cycles: int = 600           # software DGE on GpSimd: max(600, N) cycles per dynamic DMA (NC-v2 cost
                                          # table, "dynamic-address copies"), N = elements per partition
    dma_transpose_eff_hbm: float = 0.9    # DMA transpose throughput vs copy, HBM -> SBUF (v3 doc: ~90%)
    dma_transpose_eff_sbuf: float = 0.5   # ... SBUF -> SBUF (v3 doc: ~50%)
    launch_overhead_us: float = 30.0      # per-launch host/runtime floor (bench floors of 25-55 us); kept separate
    # Fixed device time a published single-kernel figure includes besides the kernel's own schedule (calibration
    # only; never added to a microbench figure). `bench`: nki.benchmark / neuron-bench NCL percentiles; NeuronCore-
    # v2 (v13): fitted on CS24.stream200 (one [128, 200] fp32 tile: 19 us P99 against 4.23 us of schedule: 14.8;
    # CS24's other streams of 800 B+ rows imply 12.2-15.1 [U]; v2-v12: the 30 us launch floor); trn2: fitted on
    # CS.stream200 (one [128, 200] fp32 tile: 15 us P99 against 3.8 us of one-core schedule: 11.2; v10: 12.2
    # against half of it).
    # `profile`: neuron-profile total_time ("total on-device execution time", neuron-explorer glossary); trn2:
    # fitted on CS.fd2k / CS.fd1k (28.4 / 26.4 us against 13.3 / 14.6 us of one-core schedule with one buffer
    # per loop tile: 15.0 / 11.8, mean 13.4; v10: 21.0). Neither is published as a constant
    bench_fixed_us: float | None = None   # None: launch_overhead_us
    profile_fixed_us: float = 0.0
    reorder_window: int = 256             # an engine may start an instruction before up to this many earlier
                                          # ones of its own (the compiler's list scheduling); 0 = program order.
                                          # Iterations of a loop without carried dependencies "could be
                                          # parallelized/pipelined on different compute engines ... depending on
                                          # the invoked instructions and data dependency" (nl.affine_range, NKI 0.6
                                          # docs): overlap is bounded by dependencies and `tile_buffers`, not by an
                                          # instruction count; v1/v2 used 16, which serialised the U4 q tiles
                                          # [U: 16-1024]
    tile_buffers: int = 3                 # buffers the compiler rotates for a tile allocated in a loop body
                                          # (the k-th allocation from one site reuses the (k-D)-th's memory)
    # GpSimd gathers (no published cycle counts; modeled like iota/affine_select: ~150 cycles + streaming)
    gather_fixed_cycles: int = 150        # per ISA instruction (nc_n_gather = ceil(N / 512) of them)
    local_gather_bytes_per_cycle: float = 64.0   # per GpSimd core: 512-bit datapath
    # Collectives (neuron-runtime/explore/intranode-collective-comm.rst: latency term 10^0-10^1 us,
    # per-hop 1-2 us for Ring/KangaRing; Mesh is one step)
    cc_hop_us: float = 1.5                # per algorithm step (hop) [U: 1.0-2.0]
    cc_intra_chip_gbps: float = 180.0     # per rank, ranks on one chip: through HBM, each byte read and written
                                          # (half the ~360 GB/s per-core HBM share) [U: 90-360]
    cc_inter_chip_gbps: float = 128.0     # per rank across chips: NeuronLink-v3 1024 GB/s per chip (trn2-arch.rst),
                                          # 512 per direction over 4 LNC=2 ranks [U: 64-256]
    # nisa.core_barrier (LNC=2): each core writes a semaphore of the other and waits on its own (isa stub
    # docstring); modeled as one cross-core semaphore latency after the later core arrives. Source: "semaphore-
    # to-start latency (~1300 ns cross-engine)", nki/deep-dives/nki-dma-bandwidth-guide.rst [U: 0.65-2.6]
    core_barrier_us: float = 1.3
    # nisa.sendrecv (LNC=2 SBUF-to-SBUF exchange). dma_engine.dma: "standard DMA engine with CoreBarrier
    # synchronization" (isa stub), modeled as core_barrier_us + dma_fixed_us + bytes at one DMA queue's rate.
    # The trigger engine (GpSimd in the model) is busy for one issue only: sendrecvs on different pipe_ids
    # "progress independently" (isa stub), so they may overlap.
    # dma_engine.gpsimd_dma: "low-latency SB-to-SB swaps" (isa stub); no latency is published, so it is bounded
    # between GpSimd's own instruction latency (~0.2 us) and the standard DMA's fixed latency (1.3 us, which it
    # is documented to beat) and modeled at half the latter, plus bytes at one DMA queue's rate [U: 0.2-1.3]
    sendrecv_gpsimd_us: float = 0.65


PARAMS: dict[str, CostParams] = {
    "trn1": CostParams(dve_min_ii=32.0, dve_two_pass_min=True, dma_packet_spans_rows=True, bench_fixed_us=14.8),
    "trn2": CostParams(dve_perf_mode=True, dve_elems_pp_per_cycle=2.0, bench_fixed_us=11.2, profile_fixed_us=13.4,
                       dma_knee_bytes=512.0),
    "trn3": CostParams(dve_perf_mode=True, act_bf16_elems_pp_per_cycle=2.0, dve_elems_pp_per_cycle=2.0,
                       dma_knee_bytes=512.0),
}


def params_for(target: Target) -> CostParams:
    return PARAMS.get(target.name, CostParams())


# Sensitivity presets: the low-cost ("-low") and high-cost ("-high") ends of each uncertain constant (ranges and
# sources in docs/cost-model.md); "low" / "high" move every one of them together.
_UNCERTAIN = {
    "dma-latency": ({"dma_fixed_us": 1.0}, {"dma_fixed_us": 2.0}),
    "dge": ({"hwdge_us": 0.0, "swdge_min_cycles": 300}, {"hwdge_us": 1.0, "swdge_min_cycles": 1200}),
    # per-target values: {target name: value}
    "dma-eff": ({"dma_knee_bytes": {"trn1": 2048.0, "trn2": 256.0, "trn3": 256.0}},
                {"dma_knee_bytes": {"trn1": 3072.0, "trn2": 1024.0, "trn3": 1024.0}}),
    "dma-elem": ({"dma_elem_ns": 0.25}, {"dma_elem_ns": 1.0}),
    # v13, NeuronCore-v2: packets spanning one engine's rows over contiguous HBM (high end: one packet per row, v12)
    "dma-span": ({}, {"dma_packet_spans_rows": False}),
    "dve-min-ii": ({"dve_min_ii": 24.0}, {"dve_min_ii": 64.0}),
    "engine-latency": ({"act_fixed_latency": 100, "dve_fixed_latency": 100, "pool_fixed_latency": 100},
                       {"act_fixed_latency": 264, "dve_fixed_latency": 220, "pool_fixed_latency": 220}),
    "pe-fp32": ({"pe_fp32_pass_overhead": 0}, {"pe_fp32_pass_overhead": 128}),
    "collectives": ({"cc_hop_us": 1.0, "cc_intra_chip_gbps": 360.0, "cc_inter_chip_gbps": 256.0},
                    {"cc_hop_us": 2.0, "cc_intra_chip_gbps": 90.0, "cc_inter_chip_gbps": 64.0}),
    "reorder": ({"reorder_window": 1024, "tile_buffers": 4}, {"reorder_window": 16, "tile_buffers": 2}),
    "dve-one-pass": ({"dve_one_pass": True}, {}),
    "range-select": ({}, {"range_select_passes": 2.0}),
    "core-barrier": ({"core_barrier_us": 0.65}, {"core_barrier_us": 2.6}),
    "sendrecv": ({"sendrecv_gpsimd_us": 0.2}, {"sendrecv_gpsimd_us": 1.3}),
}
PRESETS: dict[str, dict] = {"default": {}}
for _name, (_lo, _hi) in _UNCERTAIN.items():
    PRESETS[f"{_name}-low"] = _lo
    PRESETS[f"{_name}-high"] = _hi
PRESETS["low"] = {k: v for lo, _ in _UNCERTAIN.values() for k, v in lo.items()}
PRESETS["high"] = {k: v for _, hi in _UNCERTAIN.values() for k, v in hi.items()}


def preset_params(name: str, target) -> CostParams:
    """The CostParams of `target` with preset `name` applied (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown cost-model preset {name!r}; presets: {', '.join(PRESETS)}")
    import dataclasses
    tname = _tgt(target).name
    values = {k: (v[tname] if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    return dataclasses.replace(_BASE_PARAMS.get(tname, CostParams()), **values)


_BASE_PARAMS = dict(PARAMS)


@contextmanager
def use_params(name: str):
    """Model every target with preset `name` inside the block (``python -m microbench --params NAME``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown cost-model preset {name!r}; presets: {', '.join(PRESETS)}")
    saved = dict(PARAMS)
    try:
        for tname in list(PARAMS):
            PARAMS[tname] = preset_params(name, tname)
        yield
    finally:
        PARAMS.clear()
        PARAMS.update(saved)


def _tgt(target) -> Target:
    return get_target(target)


def pe_peak_flops(target, fp8: bool = False) -> float:
    """TensorE peak FLOP/s of one core: 128 x 128 MACs per cycle (bf16/fp16); fp8=True: twice that on
    NeuronCore-v3+ (double_row: 158 TF on trn2, trainium2_arch.rst), the same on v2 (fp8 at the bf16 rate)."""
    t = _tgt(target)
    peak = 2.0 * t.pmax * t.gemm_stationary_fmax * t.pe_ghz * 1e9
    return peak * (2.0 if fp8 and t.nc_version >= 3 else 1.0)


def hbm_bytes_per_s(target) -> float:
    """HBM bandwidth one core can use: min(per-core HBM share, DMA queues x per-queue rate)."""
    t = _tgt(target)
    return min(t.hbm_gbps_per_chip / t.cores_per_chip, t.hbm_gbps_per_core,
               t.dma_queues * t.dma_bytes_per_ns_per_queue) * 1e9


def dma_bytes_per_s(target) -> float:
    """Aggregate DMA rate of one core for on-chip to on-chip transfers (queues only)."""
    t = _tgt(target)
    return t.dma_queues * t.dma_bytes_per_ns_per_queue * 1e9


# ----------------------------------------------------------------------------------------------- reports


@dataclass
class TraceReport:
    """Modeled schedule of one trace (one program instance on one core). Times in µs, modeled."""
    target: str
    total_us: float                       # end of the schedule (device time of this core)
    engine_busy_us: dict                  # engine -> µs the engine (or DMA pipe) was occupied
    engine_util: dict                     # engine -> busy / total
    n_instr: int
    n_instr_by_engine: dict
    flops: int
    fp32_flops: int
    hbm_read_bytes: int
    hbm_write_bytes: int
    dma_bytes: int
    critical_engine: str
    timeline: list | None = None          # with timeline=True: (idx, name, engine, ready, start, end) in µs

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes


@dataclass
class LaunchReport:
    """One kernel launch: its cores (one TraceReport per program instance)."""
    lnc: int
    device_us: float                      # slower core
    cores: list


@dataclass
class ModelReport:
    """Modeled time of a sequence of launches on one target (all figures modeled, not measured)."""
    target: str
    device_us: float                      # sum of launches' device time
    launch_overhead_us: float             # n_launches x per-launch overhead, kept separate
    engine_busy_us: dict                  # summed over launches, max over the cores of a launch
    engine_util: dict
    tensor_util: float
    flops: int
    hbm_read_bytes: int
    hbm_write_bytes: int
    roofline_us: float
    launches: list = field(default_factory=list)
    n_launches: int = 0

    @property
    def total_us(self) -> float:
        """Device time (the microbench figure). Use `total_with_launch_us` to include launch overhead."""
        return self.device_us

    @property
    def total_with_launch_us(self) -> float:
        return self.device_us + self.launch_overhead_us

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def roofline_ratio(self) -> float:
        return self.device_us / self.roofline_us if self.roofline_us > 0 else float("inf")

    @property
    def hbm_gbps(self) -> float:
        return self.hbm_bytes / (self.device_us * 1e3) if self.device_us > 0 else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / (self.device_us * 1e6) if self.device_us > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.device_us:.2f} us modeled on {self.target} (+{self.launch_overhead_us:.1f} us launch), "
                f"TensorE util {self.tensor_util:.1%}, {self.hbm_gbps:.0f} GB/s HBM, "
                f"roofline ratio {self.roofline_ratio:.2f}")


# ----------------------------------------------------------------------------------------------- per-instruction cost


def _is_2byte(acc) -> bool:
    return acc.dtype in ("bfloat16", "float16", "float8_e4m3", "float8_e5m2", "float8e4", "float8e5", "int8",
                         "uint8", "int16", "uint16") or acc.dtype.startswith("float8")


def _contig(acc) -> bool:
    """Innermost run covers the whole per-partition footprint (or at least 16 B stride rule holds)."""
    item = max(1, acc.nbytes // max(1, acc.partitions * acc.elems_pp))
    return acc.contig_bytes >= acc.elems_pp * item or acc.contig_bytes >= 512


def _strided_penalty(accs) -> float:
    """A stride above 16 B halves an engine's SBUF/PSUM bandwidth (s4): single-element runs."""
    for a in accs:
        if a.buffer == "hbm" or a.elems_pp <= 1:
            continue
        item = max(1, a.nbytes // max(1, a.partitions * a.elems_pp))
        if a.contig_bytes <= item and item < 16:
            return 2.0
    return 1.0


def _half(acc, target: Target) -> bool:
    """A VectorE performance-mode dtype: bf16 / fp16 (NeuronCore-v3), plus fp8 on v4 (nki-api.md s4)."""
    if acc.dtype in ("bfloat16", "float16"):
        return True
    return target.nc_version >= 4 and acc.dtype.startswith("float8")


def dve_perf_factor(ins, target: Target, p: CostParams) -> float:
    """VectorE performance-mode speed-up of one instruction (trainium2_arch.rst, "Vector Engine Performance Mode"):
    tensor_copy / tensor_scalar 4x with every tensor bf16/fp16, in SBUF and contiguous in the inner free dim, 2x
    when one side is in PSUM (contiguous) or the SBUF data is strided; tensor_tensor 2x with both inputs in SBUF
    and every tensor bf16/fp16. 1 otherwise (and on NeuronCore-v2)."""
    if not p.dve_perf_mode or ins.engine != DVE:
        return 1.0
    accs = ins.reads + ins.writes
    if not accs or not all(_half(a, target) for a in accs):
        return 1.0
    if ins.name in ("tensor_copy", "tensor_scalar"):
        in_psum = sum(a.buffer == "psum" for a in accs)
        contig = all(_contig(a) for a in accs)
        if in_psum == 0:
            return 4.0 if contig else 2.0
        return 2.0 if (contig and in_psum == 1) else 1.0
    if ins.name == "tensor_tensor":
        return 2.0 if all(a.buffer == "sbuf" for a in ins.reads) else 1.0
    return 1.0


def _perf_lift(ins, target: Target, p: CostParams, rate: float) -> float:
    """Speed-up of a VectorE instruction over `rate` from performance mode: the mode's factor is relative to the
    NeuronCore-v2 rate (1 element per partition per cycle), so on NeuronCore-v3 (rate 2) a 4x instruction runs at
    4 / cycle (the documented 512 bf16 elements per cycle) and a 2x one gains nothing over the 2 / cycle base."""
    if ins.engine != DVE:
        return 1.0
    return max(1.0, dve_perf_factor(ins, target, p) / rate)


def shared_ports(ins, target: Target, p: CostParams) -> tuple:
    """Memory ports an instruction holds exclusively besides its engine. NeuronCore-v2: VectorE and GpSimd do not
    access SBUF in parallel, nor VectorE and ScalarE PSUM. NeuronCore-v3+: they do, except that VectorE's
    performance mode borrows the bus it shares with GpSimd (trainium2_arch.rst), so a perf-mode VectorE
    instruction and a GpSimd SBUF access exclude each other."""
    eng = ins.engine
    accs = ins.reads + ins.writes
    ports = []
    sbuf = any(a.buffer == "sbuf" for a in accs)
    if target.nc_version <= 2:
        if eng in (DVE, POOL) and sbuf:
            ports.append("sbuf_dve_pool")
        if eng in (DVE, ACT) and any(a.buffer == "psum" for a in accs):
            ports.append("psum_dve_act")
    elif (eng == POOL and sbuf) or (eng == DVE and _perf_lift(ins, target, p, p.dve_elems_pp_per_cycle) > 1.0):
        ports.append("sbuf_dve_pool")
    return tuple(ports)


def compute_cycles(ins, target: Target, p: CostParams) -> tuple[float, float]:
    """(occupancy cycles, extra latency cycles) of one compute instruction on its engine."""
    name, eng = ins.name, ins.engine
    accs = ins.reads + ins.writes
    n = max((a.elems_pp for a in accs), default=1)
    mi = p.min_ii
    if eng == PE:
        if name == "nc_matmul":
            m = ins.meta
            cyc = max(min(mi, m.get("M", mi)), m.get("N", 1))
            if m.get("fp32"):
                cyc = 4 * (cyc + p.pe_fp32_pass_overhead)
            cyc = float(max(mi, cyc))
            # a PE tile of rows x cols (tile_position / tile_size) leaves the rest of the array to other
            # matmuls: it occupies the engine for its share of the array and takes its full time to finish
            rows, cols = m.get("tile", (target.pmax, target.gemm_stationary_fmax))
            share = (rows / target.pmax) * (cols / target.gemm_stationary_fmax)
            return cyc * share, float(p.pe_fixed_latency) + cyc * (1.0 - share)
        # TensorE transpose: max(P, min(64, F)); fp32 data at quarter rate
        pp, ff = ins.meta.get("P", 1), ins.meta.get("F", 1)
        cyc = max(pp, min(mi, ff))
        if ins.reads and ins.reads[0].dtype == "float32":
            cyc *= 4
        return float(max(mi, cyc)), float(p.pe_fixed_latency)
    if eng == ACT:
        rate = p.act_bf16_elems_pp_per_cycle if all(_is_2byte(a) for a in ins.reads if a.buffer != "hbm") \
            and ins.reads else p.act_elems_pp_per_cycle
        cyc = max(mi, n / rate)
        if ins.meta.get("reduce") or name == "activation_reduce":
            cyc += mi
        cyc *= _strided_penalty(accs)
        return cyc, float(p.act_fixed_latency)
    if eng == DVE:
        mi = p.dve_min_ii
    lat = float(p.pool_fixed_latency if eng == POOL else p.dve_fixed_latency)
    rate = p.pool_elems_pp_per_cycle if eng == POOL else p.dve_elems_pp_per_cycle
    in_psum = any(a.buffer == "psum" for a in ins.reads)
    all_bf16_sbuf = bool(accs) and all(_is_2byte(a) and a.buffer == "sbuf" and _contig(a) for a in accs)
    op = str(ins.meta.get("op", ""))
    if name in ("iota", "affine_select"):
        cyc = 150 + n / rate
    elif name == "nc_n_gather":
        n_out = ins.writes[0].elems_pp if ins.writes else n
        cyc = p.gather_fixed_cycles * ins.meta.get("groups", 1) + n_out / rate
    elif name == "local_gather":
        m = ins.meta
        item = max(1, ins.writes[0].nbytes // max(1, ins.writes[0].partitions * ins.writes[0].elems_pp))
        per_core_bytes = 16 * m.get("indices", 1) * m.get("elem_per_idx", 1) * item
        cyc = p.gather_fixed_cycles + max(m.get("indices", 1), per_core_bytes / p.local_gather_bytes_per_cycle)
    elif name in ("tensor_tensor", "select", "scalar_tensor_tensor"):
        two_pass = not (in_psum or (all_bf16_sbuf and op in ("add", "multiply", "subtract"))
                        or (p.dve_one_pass and eng == DVE and target.nc_version >= 3))
        if two_pass and p.dve_two_pass_min and eng == DVE and name == "tensor_tensor":
            mi = 2 * mi                   # two SBUF inputs read in two passes, each with its own minimum
        cyc = max(mi, (2 * n if two_pass else n) / rate)
        if name == "scalar_tensor_tensor":
            one = in_psum or (p.dve_one_pass and eng == DVE and target.nc_version >= 3)
            cyc = max(mi, (n if one else 2 * n) / rate)
        if name == "tensor_tensor":
            cyc = max(mi, cyc / _perf_lift(ins, target, p, rate))
    elif name == "tensor_tensor_scan":
        cyc = max(mi, 2 * n / rate)
    elif name == "reciprocal":
        cyc = max(mi, 8 * n / rate)
    elif name == "tensor_reduce":
        n_in = ins.reads[0].elems_pp if ins.reads else n
        half = ins.reads and _is_2byte(ins.reads[0]) and op in ("add", "maximum", "max")
        cyc = max(mi, (n_in / 2 if half else n_in) / rate)
    elif name == "bn_aggr":               # isa: max(MIN_II, 13 N / 3), N = input elements per partition
        n_in = ins.reads[0].elems_pp if ins.reads else n
        cyc = max(mi, 13 * n_in / 3 / rate)
    elif name == "range_select":          # `range_select_passes` passes (default one, like a copy from the source)
        cyc = max(mi, p.range_select_passes * n / rate)
    elif name in ("max8", "nc_find_index8"):
        n_in = ins.reads[0].elems_pp if ins.reads else n
        cyc = max(mi, n_in / rate)
    elif name in ("tensor_copy", "tensor_scalar", "memset", "broadcast", "activation", "nc_transpose"):
        cyc = max(mi, n / rate)
        cyc = max(mi, cyc / _perf_lift(ins, target, p, rate))
    else:
        cyc = max(mi, n / rate)
    cyc *= _strided_penalty(accs)
    return float(cyc), lat


def _engine_ghz(eng: str, t: Target) -> float:
    return {PE: t.pe_ghz, ACT: t.act_ghz, DVE: t.dve_ghz, POOL: t.pool_ghz}[eng]


def dma_efficiency(run_bytes: float, target, p: CostParams | None = None, chunks: float = 1.0) -> float:
    """Fraction of an engine's peak rate a DMA reaches when each descriptor (packet) moves `run_bytes` bytes
    gathered from `chunks` contiguous pieces: the packet keeps its engine busy for
    max(run, dma_knee_bytes) / rate + chunks x dma_elem_ns. Contiguous rows (chunks = 1) on trn1 (knee 2560 B):
    256 B 10%, 512 B 20%, 1 KiB 40%, 2 KiB 80%, >= 2.5 KiB 100%; on trn2 / trn3 (knee 512 B, v11): 256 B 50%,
    >= 512 B 100%. An element-strided row (one chunk per element) pays the per-element rate on top."""
    t = _tgt(target)
    p = p or params_for(t)
    run = max(1.0, float(run_bytes))
    rate = t.dma_bytes_per_ns_per_queue
    extra = max(0.0, float(chunks) - 1.0) * p.dma_elem_ns
    return (run / rate) / (max(run, p.dma_knee_bytes) / rate + extra)


def _packet_shape(ins) -> tuple[float, float]:
    """(bytes, contiguous chunks) of one DMA packet: on chip a packet is one partition row (partitions are
    separate address ranges); when a side is strided within that row it is gathered in chunks of that side's
    innermost contiguous run (HBM to HBM: the shorter contiguous run)."""
    sides = [a for a in ins.reads + ins.writes if a.contig_bytes > 0]
    if not sides:
        return 512.0, 1.0
    rows = [(a.nbytes // a.partitions, a) for a in sides if a.buffer != "hbm" and a.partitions > 0]
    if not rows:
        return float(max(1, min(a.contig_bytes for a in sides))), 1.0
    row_bytes, ref = max(rows, key=lambda r: r[0])
    elems = max(1, row_bytes // max(1, _itemsize(ref)))
    chunks = 1.0
    for a in sides:
        run_elems = max(1, a.contig_bytes // max(1, _itemsize(a)))
        chunks = max(chunks, elems / min(elems, run_elems))
    return float(max(1, row_bytes)), chunks


def _rows_per_packet(ins, target: Target, p: CostParams, row: float, chunks: float) -> int:
    """Partition rows one packet carries: 1, or with `dma_packet_spans_rows` (NeuronCore-v2) up to the rows of one
    engine's partition group (ceil(P / engines)) that the HBM side holds in one contiguous run, for a static copy
    between HBM and one on-chip side whose rows are contiguous (chunks = 1; no transpose)."""
    if not p.dma_packet_spans_rows or chunks > 1 or ins.meta.get("transpose"):
        return 1
    sides = ins.reads + ins.writes
    hbm = [a for a in sides if a.buffer == "hbm"]
    chip = [a for a in sides if a.buffer != "hbm"]
    if not hbm or len(chip) != 1 or any(a.dynamic for a in sides) or row <= 0:
        return 1
    per_engine = -(-chip[0].partitions // dma_engines(ins, target, p))
    return max(1, min(per_engine, int(min(a.contig_bytes for a in hbm) // row)))


def _element_strided(ins) -> bool:
    """Some side of the transfer moves one element per contiguous run while a partition row holds several."""
    row, chunks = _packet_shape(ins)
    sides = [a for a in ins.reads + ins.writes if a.contig_bytes > 0]
    return chunks > 1 and any(a.contig_bytes <= _itemsize(a) for a in sides)


def _itemsize(a) -> int:
    return max(1, a.nbytes // max(1, math.prod(a.shape))) if a.shape else max(1, a.nbytes)


@dataclass
class DmaCost:
    """One DMA instruction as the scheduler books it (µs unless noted)."""
    occupancy: float        # share of the core's DMA bandwidth it uses (the pipe is booked for this long)
    min_duration: float     # at least this long: its bytes at the rate of the engines it runs on
    latency: float          # fixed trigger-to-data latency (+ hardware DGE time)
    dge: str                # none | hwdge | swdge
    pool_cycles: float      # GpSimd cycles spent generating descriptors (software DGE)
    engines: int


def dma_engines(ins, target: Target, p: CostParams) -> int:
    """DMA engines a transfer runs on: one per 8 SBUF partitions it touches (all 16 for HBM->HBM or a DMA
    transpose, which uses the engines cooperatively; an element-strided copy is a transpose done by the DMA
    engines, nki_perf_guide.rst Opt #8 / #10)."""
    if ins.meta.get("transpose") or _element_strided(ins):
        return target.dma_queues
    parts = [a.partitions for a in ins.reads + ins.writes if a.buffer != "hbm" and not a.dynamic]
    if not parts:
        return target.dma_queues
    return max(1, min(target.dma_queues, -(-max(parts) // max(1, p.dma_partitions_per_engine))))


def dma_transfer(ins, target: Target, p: CostParams, hbm_bw: float, dma_bw: float) -> DmaCost:
    nbytes = ins.meta.get("bytes")
    if nbytes is None:
        nbytes = sum(a.nbytes for a in ins.writes)
    if ins.meta.get("collective"):
        m = ins.meta
        occ, lat = collective_cost(m["collective"], nbytes, m.get("ranks", 1), m.get("chips", 1), target, p)
        return DmaCost(occ, 0.0, lat, "none", 0.0, target.dma_queues)
    touches_hbm = any(a.buffer == "hbm" for a in ins.reads + ins.writes)
    bw = hbm_bw if touches_hbm else dma_bw
    row, chunks = _packet_shape(ins)
    eff = dma_efficiency(row * _rows_per_packet(ins, target, p, row, chunks), target, p, chunks)
    if ins.meta.get("transpose"):
        from_hbm = any(a.buffer == "hbm" for a in ins.reads)
        eff *= p.dma_transpose_eff_hbm if from_hbm else p.dma_transpose_eff_sbuf
    occ = nbytes / (bw * eff) * 1e6
    engines = dma_engines(ins, target, p)
    engine_bw = engines * target.dma_bytes_per_ns_per_queue * 1e9
    min_dur = nbytes / (min(bw, engine_bw) * eff) * 1e6
    dge = ins.meta.get("dge") or ("swdge" if ins.meta.get("dynamic") else "none")
    lat = p.dma_fixed_us
    pool = 0.0
    if dge == "hwdge":
        lat += p.hwdge_us
    elif dge == "swdge":
        n = max((a.elems_pp for a in ins.reads + ins.writes if a.buffer != "hbm"), default=1)
        pool = float(max(p.swdge_min_cycles, n))
    return DmaCost(occ, min_dur, lat, dge, pool, engines)


def dma_cost(ins, target: Target, p: CostParams, hbm_bw: float, dma_bw: float) -> tuple[float, float]:
    """(pipe occupancy µs at the core's bandwidth, fixed latency µs) of one DMA instruction."""
    c = dma_transfer(ins, target, p, hbm_bw, dma_bw)
    return c.occupancy, c.latency


def collective_cost(kind: str, nbytes: int, ranks: int, chips: int, target, p: CostParams | None = None):
    """(transfer µs, latency µs) of one collective as one rank sees it (modeled).

    nbytes: all_reduce / reduce_scatter: bytes of one rank's input; all_gather: bytes of one rank's output;
    all_to_all: bytes one rank sends to others; collective_permute: bytes sent. The runtime picks the faster of
    a one-step Mesh and a Ring (intranode-collective-comm.rst); transfer time is the bytes crossing this rank's
    links at the intra- or inter-chip rate."""
    t = _tgt(target)
    p = p or params_for(t)
    n = max(1, int(ranks))
    if n == 1 or nbytes <= 0:
        return 0.0, (p.cc_hop_us if n > 1 else 0.0)
    gbps = p.cc_intra_chip_gbps if chips <= 1 else p.cc_inter_chip_gbps
    us_per_byte = 1.0 / (gbps * 1e3)
    frac = (n - 1) / n
    if kind == "all_reduce":
        mesh = (p.cc_hop_us, (n - 1) * nbytes * us_per_byte)          # single-step mesh: everyone gets everything
        ring = (2 * (n - 1) * p.cc_hop_us, 2 * frac * nbytes * us_per_byte)
    elif kind in ("all_gather", "reduce_scatter"):
        mesh = (p.cc_hop_us, frac * nbytes * us_per_byte)
        ring = ((n - 1) * p.cc_hop_us, frac * nbytes * us_per_byte)
    else:                                                               # all_to_all, collective_permute
        mesh = ring = (p.cc_hop_us, nbytes * us_per_byte)
    best = min((mesh, ring), key=lambda c: c[0] + c[1])
    return best[1], best[0]


def collective_us(kind: str, nbytes: int, ranks: int, target=None, *, chips: int | None = None,
                  lnc: int | None = None, params: CostParams | None = None) -> float:
    """Modeled µs of a collective between launches (host level, e.g. the all-reduce after a TP-sharded layer).

    kind: all_reduce | all_gather | reduce_scatter | all_to_all | collective_permute; nbytes as in
    `collective_cost`; ranks: the rank-list size; chips: chips spanned (default: as few as hold `ranks` ranks of
    `lnc` cores each on `target`)."""
    t = _tgt(target)
    if chips is None:
        per_chip = max(1, t.cores_per_chip // max(1, lnc or (2 if t.nc_version >= 3 else 1)))
        chips = -(-int(ranks) // per_chip)
    occ, lat = collective_cost(kind, nbytes, ranks, chips, t, params)
    return occ + lat


# ----------------------------------------------------------------------------------------------- schedule


def _region(a):
    """(lo, hi, P, run, cnt, dense_flat) of an access: flat span, partitions (0 for HBM / dynamic), and the
    per-partition layout as `cnt` teeth of `run` contiguous elements at a uniform stride (cnt = 1: a dense window;
    cnt = -1: unknown layout, use the bounding window). dense_flat: the whole access is one contiguous block."""
    P = 0 if a.buffer == "hbm" or a.dynamic else a.partitions
    per = a.elems_pp if P else max(1, a.elems_pp)
    item = max(1, a.nbytes // max(1, (a.partitions if P else 1) * per))
    dense_flat = (not a.dynamic) and a.contig_bytes >= a.nbytes
    run = min(per, max(1, a.contig_bytes // item))
    if run >= per:
        cnt = 1
    else:
        free = [d for d in (a.shape[1:] if P else a.shape) if d != 1]
        if P == 0:
            free = [d for d in a.shape if d != 1]
            free = free[1:] if len(free) > 2 else free
        cnt = per // run if (len(free) == 2 and free[-1] == run and free[0] * run == per) else -1
    return (a.lo, a.hi, P, run, cnt, dense_flat)


def _teeth_hit(f0a, wa, ra, ca, f0b, wb, rb, cb) -> bool:
    """Do two per-partition layouts (window start, width, run, count) share an element? Conservative."""
    if ca < 0 or cb < 0:
        return True
    if ca == 1 and cb == 1:
        return True                       # dense windows that overlap
    sa = (wa - ra) // (ca - 1) if ca > 1 else 0
    sb = (wb - rb) // (cb - 1) if cb > 1 else 0
    if ca > 1 and cb > 1:
        if sa != sb or sa <= 0:
            return True
        s = sa
        da, db = f0a % s, f0b % s
        return (db - da) % s < ra or (da - db) % s < rb
    if ca == 1:                           # interval [x0, x1) against comb b
        x0, x1, f0, st, r, c = f0a, f0a + wa, f0b, sb, rb, cb
    else:
        x0, x1, f0, st, r, c = f0b, f0b + wb, f0a, sa, ra, ca
    if st <= 0:
        return True
    i_min = max(0, (x0 - r - f0) // st + 1)
    i_max = min(c - 1, -((f0 - x1) // st) - 1)
    return i_min <= i_max


class _Spans:
    """Per storage id: recent write and read accesses with their finish times (µs).

    On-chip tensors are [partition, free] row-major, so a flat span [lo, hi) of a P-partition view is a
    partition range and a per-partition free window once the storage's row size F is known; inside the window
    a 2-level view ([P, c, r] slices of a bigger tile) is `c` teeth of `r` elements. F is inferred from accesses
    that are contiguous within each partition (then hi - lo = (P - 1) F + elems_pp). Without F, flat bounding
    spans are compared (conservative). HBM is flat.
    """
    __slots__ = ("writes", "reads", "F")
    CAP = 64

    def __init__(self):
        self.writes: list = []
        self.reads: list = []
        self.F = 0

    def learn(self, a):
        if self.F or a.dynamic or a.buffer == "hbm" or a.partitions <= 1:
            return
        item = max(1, a.nbytes // max(1, a.partitions * a.elems_pp))
        if a.contig_bytes >= a.nbytes:
            self.F = a.elems_pp
        elif a.contig_bytes >= a.elems_pp * item:
            span = a.hi - a.lo - a.elems_pp
            if span > 0 and span % (a.partitions - 1) == 0:
                self.F = span // (a.partitions - 1)

    def _rect(self, lo, hi, P):
        F = self.F
        if not F or P <= 0:
            return None
        p0 = lo // F
        if P > 1:
            w = hi - lo - (P - 1) * F
            f0 = lo - p0 * F
            if w <= 0 or f0 + w > F:
                return (p0, (hi - 1) // F + 1, 0, F, False)
            return (p0, p0 + P, f0, f0 + w, True)
        p1 = (hi - 1) // F
        if p1 == p0:
            return (p0, p0 + 1, lo - p0 * F, hi - p0 * F, True)
        return (p0, p1 + 1, 0, F, False)

    def _overlap(self, g, e) -> bool:
        lo, hi = g[0], g[1]
        if not (e[0] < hi and lo < e[1]):
            return False
        r = self._rect(lo, hi, g[2])
        if r is None:
            return True
        q = self._rect(e[0], e[1], e[2])
        if q is None:
            return True
        if not (q[0] < r[1] and r[0] < q[1] and q[2] < r[3] and r[2] < q[3]):
            return False
        if r[4] and q[4]:
            return _teeth_hit(r[2], r[3] - r[2], g[3], g[4], q[2], q[3] - q[2], e[3], e[4])
        return True

    def max_overlap(self, lst, g, eng=None) -> float:
        """Latest finish among entries overlapping region g; entries of engine `eng` count at their engine-done
        time (an in-order engine keeps its own write order without waiting for the result latency)."""
        best = 0.0
        for e in lst:
            t = e[7] if e[6] == eng else e[5]
            if t <= best:
                continue
            if self._overlap(g, e):
                best = t
        return best

    @staticmethod
    def _add(lst, g, t, eng, t_eng, cap):
        lst.append((g[0], g[1], g[2], g[3], g[4], t, eng, t_eng))
        if len(lst) > cap:
            half = len(lst) // 2
            old = lst[:half]
            tm = max(x[5] for x in old)
            lst[:half] = [(min(x[0] for x in old), max(x[1] for x in old), 0, 1, -1, tm, None, tm)]

    def _covers(self, g, e) -> bool:
        """Does dense write g cover entry e entirely (so e no longer matters)?"""
        if g[4] != 1:
            return False
        if g[5]:                                   # one contiguous block: flat containment
            return g[0] <= e[0] and e[1] <= g[1]
        r = self._rect(g[0], g[1], g[2])
        q = self._rect(e[0], e[1], e[2])
        if r is None or q is None or not r[4]:
            return False
        return r[0] <= q[0] and q[1] <= r[1] and r[2] <= q[2] and q[3] <= r[3]

    def add_write(self, g, t, eng, t_eng):
        if (self.writes or self.reads) and g[4] == 1:
            self.writes = [w for w in self.writes if not self._covers(g, w)]
            self.reads = [x for x in self.reads if not self._covers(g, x)]
        self._add(self.writes, g, t, eng, t_eng, self.CAP)

    def add_read(self, g, t, eng):
        self._add(self.reads, g, t, eng, t, self.CAP)


class _Pipe:
    """A bandwidth resource booked as busy intervals. A transfer fills the free time at or after its start,
    across gaps if needed (the bandwidth is shared, not reserved), and ends when it has had `dur` µs."""
    __slots__ = ("busy",)

    def __init__(self):
        self.busy: list = []     # sorted, disjoint [s, e)

    def book(self, start: float, dur: float) -> float:
        b = self.busy
        lo, hi = 0, len(b)
        while lo < hi:                    # first interval ending after start
            mid = (lo + hi) // 2
            if b[mid][1] <= start:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        t = start
        need = dur
        pieces = []
        while need > 1e-15:
            if i < len(b) and b[i][0] <= t:
                t = max(t, b[i][1])
                i += 1
                continue
            gap_end = b[i][0] if i < len(b) else math.inf
            take = min(need, gap_end - t)
            pieces.append((t, t + take))
            need -= take
            t += take
        end = t
        # merge the pieces into the interval list
        if pieces:
            merged = sorted(b[lo:i] + pieces)
            out = []
            for s0, e0 in merged:
                if out and s0 <= out[-1][1] + 1e-12:
                    out[-1] = (out[-1][0], max(out[-1][1], e0))
                else:
                    out.append((s0, e0))
            # join with neighbours
            if lo > 0 and out and abs(b[lo - 1][1] - out[0][0]) < 1e-12:
                out[0] = (b[lo - 1][0], out[0][1])
                lo -= 1
            if i < len(b) and out and abs(b[i][0] - out[-1][1]) < 1e-12:
                out[-1] = (out[-1][0], b[i][1])
                i += 1
            b[lo:i] = out
        if len(b) > 4096:       # bounded: forget the oldest gaps
            b[:2048] = [(b[0][0], b[2047][1])]
        return end


class _Slots:
    """Busy intervals of one compute engine; an instruction takes the earliest free gap that fits it."""
    __slots__ = ("busy",)

    def __init__(self):
        self.busy: list = []

    def earliest(self, start: float, dur: float) -> float:
        """The earliest time >= start at which a gap of `dur` is free."""
        b = self.busy
        lo, hi = 0, len(b)
        while lo < hi:
            mid = (lo + hi) // 2
            if b[mid][1] <= start:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        t = start
        while i < len(b) and b[i][0] < t + dur - 1e-12:
            t = max(t, b[i][1])
            i += 1
        return t

    def place(self, start: float, dur: float) -> float:
        t = self.earliest(start, dur)
        self.insert(t, dur)
        return t

    def insert(self, t: float, dur: float):
        b = self.busy
        lo, hi = 0, len(b)
        while lo < hi:
            mid = (lo + hi) // 2
            if b[mid][1] <= t:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        while i < len(b) and b[i][0] < t + dur - 1e-12:
            i += 1
        s0, e0 = t, t + dur
        j = i
        if j > 0 and b[j - 1][1] >= s0 - 1e-12:
            s0 = b[j - 1][0]
            j -= 1
            b.pop(j)
        if j < len(b) and b[j][0] <= e0 + 1e-12:
            e0 = b[j][1]
            b.pop(j)
        b.insert(j, (s0, e0))
        if len(b) > 2048:
            b[:1024] = [(b[0][0], b[1023][1])]
        return t


def _joint_place(resources, start: float, dur: float) -> float:
    """The earliest start >= `start` at which every resource (engine, shared port) has `dur` free; books them."""
    t = start
    for _ in range(10000):
        t2 = t
        for r in resources:
            t2 = r.earliest(t2, dur)
        if t2 <= t + 1e-12:
            break
        t = t2
    for r in resources:
        r.insert(t, dur)
    return t


def model_trace(trace, target=None, *, params: CostParams | None = None, hbm_share: float = 1.0,
                timeline: bool = False) -> TraceReport:
    """Schedule one trace (one program instance) on one core of `target`. Returns a TraceReport (modeled).

    A `core_barrier` (`sendrecv`) in a trace modeled alone is released `core_barrier_us` (the sendrecv's
    transfer time, `sync_us`) after it starts, as if the other core arrived at the same time; `model_launches`
    schedules the cores of an LNC=2 launch together."""
    t = _tgt(target if target is not None else getattr(trace, "target", None))
    p = params or params_for(t)
    return _run_cores([_schedule(trace, t, p, hbm_share, timeline)], p)[0]


def _run_cores(schedules: list, p: CostParams) -> list:
    """Drive the `_schedule` generators of the cores of one launch together: at each synchronisation point
    (core barrier, sendrecv) every core goes on after the last one arrived plus the point's cost (`sync_us`:
    `core_barrier_us`, or the sendrecv's transfer). Returns their TraceReports."""
    reports: list = [None] * len(schedules)
    arrivals: dict = {}
    for i, g in enumerate(schedules):
        try:
            arrivals[i] = next(g)
        except StopIteration as stop:
            reports[i] = stop.value
    while arrivals:
        if len(arrivals) != len(schedules):
            raise ValueError("core_barrier: the cores of a launch reach different numbers of barriers")
        release = max(a for a, _ in arrivals.values()) + max(c for _, c in arrivals.values())
        nxt = {}
        for i in arrivals:
            try:
                nxt[i] = schedules[i].send(release)
            except StopIteration as stop:
                reports[i] = stop.value
        arrivals = nxt
    return reports


def sync_us(ins, t: Target, p: CostParams) -> float:
    """Time from the later core's arrival at a synchronisation point to its release (modeled): a core barrier
    costs `core_barrier_us`; a sendrecv its mode's latency plus its bytes at one DMA queue's rate."""
    mode = ins.meta.get("sendrecv")
    if mode is None:
        return p.core_barrier_us
    stream_us = ins.meta.get("bytes", 0) / (t.dma_bytes_per_ns_per_queue * 1e3)
    if mode == "gpsimd_dma":
        return p.sendrecv_gpsimd_us + stream_us
    return p.core_barrier_us + p.dma_fixed_us + stream_us


def _schedule(trace, t: Target, p: CostParams, hbm_share: float, timeline: bool):
    """Generator scheduling one trace (see `model_trace`); yields (the time it reaches each synchronisation
    point, that point's `sync_us`) and is sent the time it is released; returns the TraceReport."""
    hbm_bw = hbm_bytes_per_s(t) * hbm_share
    dma_bw = dma_bytes_per_s(t)
    eng_free = {e: 0.0 for e in ENGINES}
    busy = {e: 0.0 for e in ENGINES}
    counts = {e: 0 for e in ENGINES}
    pipe = _Pipe()
    queue_free = [0.0] * max(1, t.dma_queues)
    dge_free = [0.0] * max(1, p.dge_instances)
    spans: dict[int, _Spans] = {}
    flops = fp32_flops = 0
    hbm_r = hbm_w = dma_bytes = 0
    end = 0.0
    last_stationary = None
    last_mov_cycles = 0.0
    tl = [] if timeline else None
    alloc = getattr(trace, "alloc_sites", None) or {}
    site_seq: dict = {}
    for sid, (site, k) in alloc.items():
        site_seq[(site, k)] = sid
    site_free = getattr(trace, "site_free", None) or {}
    last_use: dict = {}
    touched: set = set()
    nbuf = max(1, p.tile_buffers)
    window = max(0, p.reorder_window)
    slots = {e: _Slots() for e in ENGINES}
    port_slots = {"sbuf_dve_pool": _Slots(), "psum_dve_act": _Slots()}
    starts = {e: [] for e in ENGINES}
    eng_fence = {e: 0.0 for e in ENGINES}    # a core barrier blocks its engine until it is released

    for ins in trace:
        eng = ins.engine
        counts[eng] = counts.get(eng, 0) + 1
        # dependencies
        ready = 0.0
        if alloc:
            for a in ins.reads + ins.writes:
                if a.sid in touched:
                    continue
                touched.add(a.sid)
                sk = alloc.get(a.sid)
                if sk is not None and sk[1] >= nbuf and site_free.get((sk[0], sk[1] - nbuf), True):
                    prev = site_seq.get((sk[0], sk[1] - nbuf))
                    if prev is not None:
                        ready = max(ready, last_use.get(prev, 0.0))
        rrects = []
        for a in ins.reads:
            s = spans.get(a.sid)
            if s is None:
                s = spans[a.sid] = _Spans()
            s.learn(a)
            r = _region(a)
            rrects.append((a, s, r))
            if s.writes:
                ready = max(ready, s.max_overlap(s.writes, r))
        wrects = []
        for a in ins.writes:
            s = spans.get(a.sid)
            if s is None:
                s = spans[a.sid] = _Spans()
            s.learn(a)
            r = _region(a)
            wrects.append((a, s, r))
            if a.buffer == "hbm" and eng == DMA:
                continue   # DMA writes to HBM are not ordered against each other (no WAW/WAR on HBM)
            if s.writes:
                ready = max(ready, s.max_overlap(s.writes, r, eng=eng))
            if s.reads:
                ready = max(ready, s.max_overlap(s.reads, r))
        ready = max(ready, eng_fence[eng])
        if ins.meta.get("barrier"):
            # the barrier waits for the writes to its tensor, then for the other core; only its engine blocks,
            # and later accesses of the tensor wait for its release (its "write")
            arrive = max(ready, eng_free[eng])
            release = yield arrive, sync_us(ins, t, p)
            if ins.meta.get("sendrecv") is None:
                eng_fence[eng] = release
                eng_free[eng] = max(eng_free[eng], release)
            else:
                # a sendrecv is a DMA its engine triggers: the engine is busy for the issue only (sendrecvs of
                # different pipe_ids "progress independently", isa stub); dst's readers wait for the release
                issue = p.min_ii / _engine_ghz(eng, t) * 1e-3
                eng_free[eng] = max(eng_free[eng], arrive + issue)
                busy[eng] += issue
            for a, s, r in wrects:
                s.add_write(r, release, eng, release)
            for a, s, r in rrects:
                if a.buffer != "hbm":
                    s.add_read(r, release, eng)      # sendrecv: src may be overwritten once it has been sent
            end = max(end, release)
            if tl is not None:
                tl.append((ins.idx, ins.name, eng, ready, arrive, release))
            continue
        if eng == DMA:
            c = dma_transfer(ins, t, p, hbm_bw, dma_bw)
            occ = c.occupancy
            qi = min(range(len(queue_free)), key=queue_free.__getitem__)
            start = max(ready, queue_free[qi])
            if c.pool_cycles:            # software DGE: GpSimd writes the descriptors first
                dur = c.pool_cycles / t.pool_ghz * 1e-3
                s0 = slots[POOL].place(start, dur)
                eng_free[POOL] = max(eng_free[POOL], s0 + dur)
                busy[POOL] += dur
                start = s0 + dur
            elif c.dge == "hwdge":       # one of the core's hardware DGE blocks, ~600 ns per instruction
                di = min(range(len(dge_free)), key=dge_free.__getitem__)
                start = max(start, dge_free[di])
                dge_free[di] = start + p.hwdge_us
            finish = max(pipe.book(start, occ), start + c.min_duration) + c.latency
            queue_free[qi] = finish
            busy[DMA] += occ
            nb = ins.meta.get("bytes") or sum(a.nbytes for a in ins.writes)
            dma_bytes += nb
            for a in ins.reads:
                if a.buffer == "hbm":
                    hbm_r += a.nbytes
            for a in ins.writes:
                if a.buffer == "hbm":
                    hbm_w += a.nbytes
                    if ins.name == "dma_compute":
                        hbm_r += a.nbytes
            done_for_readers = finish
            done_engine = finish
        else:
            cyc, lat_cyc = compute_cycles(ins, t, p)
            ghz = _engine_ghz(eng, t)
            if eng == PE and ins.name == "nc_matmul":
                m = ins.meta
                flops += 2 * m.get("K", 0) * m.get("M", 0) * m.get("N", 0)
                if m.get("fp32"):
                    fp32_flops += 2 * m.get("K", 0) * m.get("M", 0) * m.get("N", 0)
                st = ins.reads[0] if ins.reads else None
                key = (st.sid, st.lo, st.hi) if st is not None else None
                if key != last_stationary:
                    # loading new weights overlaps the previous matmul's streaming
                    load = max(1.0, m.get("M", 1) / p.pe_stationary_load_div) * (4 if m.get("fp32") else 1)
                    cyc += max(0.0, load - last_mov_cycles)
                last_stationary = key
                last_mov_cycles = cyc
            elif eng == PE:
                last_stationary = None
                last_mov_cycles = cyc
            occ = cyc / ghz * 1e-3
            ports = shared_ports(ins, t, p)
            if window > 0:
                hist = starts[eng]
                floor = hist[-window] if len(hist) >= window else 0.0
                start = _joint_place([slots[eng]] + [port_slots[x] for x in ports], max(ready, floor), occ)
                hist.append(start)
                if len(hist) > window:
                    del hist[0]
            else:
                start = max(ready, eng_free[eng])
                if ports:
                    start = _joint_place([port_slots[x] for x in ports], start, occ)
            eng_free[eng] = max(eng_free[eng], start + occ)
            busy[eng] += occ
            done_engine = start + occ
            done_for_readers = done_engine + lat_cyc / ghz * 1e-3
        if alloc:
            for a in ins.reads + ins.writes:
                if a.buffer != "hbm" and last_use.get(a.sid, 0.0) < done_engine:
                    last_use[a.sid] = done_engine
        for a, s, r in wrects:
            s.add_write(r, done_for_readers, eng, done_engine)
        for a, s, r in rrects:
            if a.buffer == "hbm":
                continue   # nothing orders HBM writes after reads in our kernels' model
            s.add_read(r, done_engine, eng)
        end = max(end, done_for_readers)
        if tl is not None:
            tl.append((ins.idx, ins.name, eng, ready, start, done_for_readers))

    util = {e: (busy[e] / end if end > 0 else 0.0) for e in busy}
    crit = max(busy, key=busy.get) if busy else PE
    return TraceReport(t.name, end, busy, util, len(trace), counts, flops, fp32_flops, hbm_r, hbm_w,
                       dma_bytes, crit, tl)


def _launch_report(res, t: Target, p: CostParams) -> LaunchReport:
    """The cores of each rank (traces are rank-major, `lnc` per rank) are scheduled together: their core
    barriers synchronise them."""
    lnc = max(1, getattr(res, "lnc", 1))
    cores = []
    for i in range(0, len(res.traces), lnc):
        group = res.traces[i:i + lnc]
        cores.extend(_run_cores([_schedule(tr, t, p, 1.0, False) for tr in group], p))
    return LaunchReport(getattr(res, "lnc", len(cores)), max((c.total_us for c in cores), default=0.0), cores)


def roofline_us(flops: int, hbm_bytes: int, target, fp32_flops: int = 0, cores: int = 1, *,
                fp8: bool = False) -> float:
    """max(TensorE time of the useful `flops` at the bf16 peak (the fp8 peak when the kernel's inputs are fp8),
    HBM time of `hbm_bytes` at the per-core bandwidth), over `cores` cores.

    The roofline does not depend on the precision a kernel picks for its matmuls: `fp32_flops` is accepted for
    compatibility and ignored (v1 charged it at 1/4 rate, which let an fp32 choice raise the bound)."""
    t = _tgt(target)
    peak = pe_peak_flops(t, fp8=fp8) * cores
    pe_us = flops / peak * 1e6
    hbm_us = hbm_bytes / (hbm_bytes_per_s(t) * cores) * 1e6
    return max(pe_us, hbm_us)


def model_launches(run_results, target=None, *, params: CostParams | None = None,
                   min_hbm_bytes: int | None = None, flops: int | None = None) -> ModelReport:
    """Model a list of RunResult (e.g. from `record_launches()`) on `target` (default: each run's own target).

    Launches run back to back: device time is the sum of their device times (each launch = slower core);
    launch overhead is reported separately. `flops` / `min_hbm_bytes` override the counted figures for the
    roofline (useful when a kernel re-reads data: the roofline is then about the minimum traffic).
    """
    if not isinstance(run_results, (list, tuple)):
        run_results = [run_results]
    if target is None:
        t = run_results[0].target if run_results else get_target()
    else:
        t = _tgt(target)
    p = params or params_for(t)
    launches = [_launch_report(r, t, p) for r in run_results]
    busy = {e: 0.0 for e in ENGINES}
    dev = 0.0
    fl = f32 = hr = hw = 0
    max_cores = 1
    for L in launches:
        dev += L.device_us
        max_cores = max(max_cores, len(L.cores))
        for e in ENGINES:
            busy[e] += max((c.engine_busy_us.get(e, 0.0) for c in L.cores), default=0.0)
        for c in L.cores:
            fl += c.flops
            f32 += c.fp32_flops
            hr += c.hbm_read_bytes
            hw += c.hbm_write_bytes
    util = {e: (busy[e] / dev if dev > 0 else 0.0) for e in busy}
    roof_flops = fl if flops is None else flops
    roof_bytes = hr + hw if min_hbm_bytes is None else min_hbm_bytes
    roof = roofline_us(roof_flops, roof_bytes, t, cores=max_cores)
    return ModelReport(t.name, dev, p.launch_overhead_us * len(launches), busy, util, util[PE], fl, hr, hw,
                       roof, launches, len(launches))


__all__ = ["CostParams", "PARAMS", "params_for", "ModelReport", "LaunchReport", "TraceReport", "model_trace",
           "model_launches", "roofline_us", "pe_peak_flops", "hbm_bytes_per_s", "compute_cycles", "dma_cost",
           "collective_cost", "collective_us", "PRESETS", "preset_params", "use_params", "dma_efficiency",
           "dma_transfer", "dma_engines", "DmaCost", "sync_us"]
