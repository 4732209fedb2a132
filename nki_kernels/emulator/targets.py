"""Per-target hardware constants (NeuronCore v2/v3/v4 = trn1/trn2/trn3).

Figures come from ../shared/reference/nki-api.md sections 0, 3 and 4. Items marked [U] there are
uncertain; the usable SBUF bytes per partition are one of them (documented as such in docs/platform.md).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

TARGET_ENV = "NEURON_PLATFORM_TARGET_OVERRIDE"
DEFAULT_TARGET = "trn2"


@dataclass(frozen=True)
class Target:
    name: str
    nc_version: int                 # NeuronCore generation (2, 3, 4)
    pmax: int                       # partitions of SBUF / PSUM
    sbuf_bytes_per_partition: int   # usable SBUF bytes per partition [U]
    psum_bank_bytes: int            # bytes per partition of one PSUM bank
    psum_num_banks: int             # PSUM banks
    gemm_stationary_fmax: int       # matmul stationary free size (M)
    gemm_moving_fmax_fp32: int      # matmul moving free size (N) for an fp32 PSUM result
    gemm_moving_fmax_bf16: int      # ... for a bf16 PSUM result (v4 only)
    psum_result_dtypes: tuple       # dtypes a matmul may write to PSUM
    sbuf_free_elems_max: int        # elements per partition an instruction may read from SBUF
    psum_free_elems_max: int        # elements per partition an instruction may read from PSUM
    activation_scalar_bias: bool    # activation bias may be a Python float (v3+)
    checks_start_partition: bool    # enforce the documented v2 start-partition rule
    # Performance figures for the cost model (per NeuronCore)
    pe_ghz: float
    dve_ghz: float
    act_ghz: float
    pool_ghz: float
    dve_elems_per_cycle: int        # non-bf16 throughput
    dve_bf16_elems_per_cycle: int   # bf16 "performance mode" throughput
    act_elems_per_cycle: int
    dma_queues: int
    dma_bytes_per_ns_per_queue: float
    hbm_gbps_per_core: float
    hbm_gbps_per_chip: float
    cores_per_chip: int


TARGETS: dict[str, Target] = {
    "trn1": Target(
        name="trn1", nc_version=2, pmax=128, sbuf_bytes_per_partition=180224,
        psum_bank_bytes=2048, psum_num_banks=8, gemm_stationary_fmax=128,
        gemm_moving_fmax_fp32=512, gemm_moving_fmax_bf16=512, psum_result_dtypes=("float32",),
        sbuf_free_elems_max=65536, psum_free_elems_max=4096, activation_scalar_bias=False,
        checks_start_partition=True,
        pe_ghz=2.8, dve_ghz=1.12, act_ghz=1.4, pool_ghz=1.4, dve_elems_per_cycle=128,
        dve_bf16_elems_per_cycle=128, act_elems_per_cycle=128, dma_queues=16,
        dma_bytes_per_ns_per_queue=17.0, hbm_gbps_per_core=410.0, hbm_gbps_per_chip=820.0,
        cores_per_chip=2),
    "trn2": Target(
        name="trn2", nc_version=3, pmax=128, sbuf_bytes_per_partition=212984,
        psum_bank_bytes=2048, psum_num_banks=8, gemm_stationary_fmax=128,
        gemm_moving_fmax_fp32=512, gemm_moving_fmax_bf16=512, psum_result_dtypes=("float32",),
        sbuf_free_elems_max=65536, psum_free_elems_max=4096, activation_scalar_bias=True,
        checks_start_partition=False,
        pe_ghz=2.4, dve_ghz=0.96, act_ghz=1.2, pool_ghz=1.2, dve_elems_per_cycle=256,
        dve_bf16_elems_per_cycle=512, act_elems_per_cycle=128, dma_queues=16,
        dma_bytes_per_ns_per_queue=23.0, hbm_gbps_per_core=362.5, hbm_gbps_per_chip=2900.0,
        cores_per_chip=8),
    "trn3": Target(
        name="trn3", nc_version=4, pmax=128, sbuf_bytes_per_partition=245752,
        psum_bank_bytes=2048, psum_num_banks=8, gemm_stationary_fmax=128,
        gemm_moving_fmax_fp32=512, gemm_moving_fmax_bf16=512,
        psum_result_dtypes=("float32", "bfloat16"),
        sbuf_free_elems_max=65536, psum_free_elems_max=4096, activation_scalar_bias=True,
        checks_start_partition=False,
        pe_ghz=2.4, dve_ghz=1.2, act_ghz=1.2, pool_ghz=1.2, dve_elems_per_cycle=256,
        dve_bf16_elems_per_cycle=512, act_elems_per_cycle=128, dma_queues=16,
        dma_bytes_per_ns_per_queue=33.0, hbm_gbps_per_core=612.5, hbm_gbps_per_chip=4900.0,
        cores_per_chip=8),
}

_override: list[str] = []


def get_target(name: "str | Target | None" = None) -> Target:
    """The target named (a Target passes through), else the one set by `use_target`, else
    $NEURON_PLATFORM_TARGET_OVERRIDE, else trn2."""
    if isinstance(name, Target):
        return name
    if name is None:
        name = _override[-1] if _override else os.environ.get(TARGET_ENV, "") or DEFAULT_TARGET
    key = str(name).lower()
    if key not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {sorted(TARGETS)}")
    return TARGETS[key]


@contextlib.contextmanager
def use_target(name: str):
    """Run emulated kernels against another target inside a `with` block."""
    get_target(name)
    _override.append(name)
    try:
        yield get_target(name)
    finally:
        _override.pop()
