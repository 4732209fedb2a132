"""Index tiles of dynamic DMAs: recorded as reads (ordering) but not as data runs (descriptor efficiency)."""
import numpy as np

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.emulator import run
from nki_kernels.emulator.costmodel import dma_cost, hbm_bytes_per_s, params_for
from nki_kernels.emulator.targets import get_target


@nki.jit
def _expert_rows(weights, expert_id):
    """out [128, F] = weights[expert_id[0]] viewed [128, F] (scalar_offset DMA)."""
    n_e, rows, f = weights.shape
    out = nl.ndarray((rows, f), dtype=weights.dtype, buffer=nl.shared_hbm)
    e_sb = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=e_sb, src=expert_id.ap(pattern=[[1, 1], [1, 1]], offset=0))
    w_sb = nl.ndarray((rows, f), dtype=weights.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb, src=weights.ap(pattern=[[f, rows], [1, f]], offset=0, scalar_offset=e_sb, indirect_dim=0))
    nisa.dma_copy(dst=out, src=w_sb)
    return out


def test_dynamic_dma_index_tile_is_a_read_but_not_a_data_run():
    w = np.arange(3 * 128 * 1024, dtype=np.float32).reshape(3, 128, 1024)
    res = run(_expert_rows, w, np.array([2], dtype=np.int32), lnc=1)
    np.testing.assert_array_equal(res.outputs, w[2])
    ins = [i for i in res.traces[0] if i.name == "dma_copy"][1]
    idx_reads = [a for a in ins.reads if a.dtype == "int32"]
    assert len(idx_reads) == 1 and idx_reads[0].contig_bytes == 0       # ordered after the id load ...
    tgt = get_target("trn2")
    occ, _ = dma_cost(ins, tgt, params_for(tgt), hbm_bytes_per_s(tgt), hbm_bytes_per_s(tgt))
    ideal = w[2].nbytes / hbm_bytes_per_s(tgt) * 1e6
    assert occ < 1.5 * ideal                                            # ... but costed at its 4 KiB data rows
