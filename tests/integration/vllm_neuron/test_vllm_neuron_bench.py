"""The modeled-cost command of the vLLM Neuron adapters runs and prints one row per replaced path."""
from __future__ import annotations


def test_bench_prints_a_row_per_replaced_path(capsys):
    from integration.vllm_neuron import bench
    bench.main(["--tokens", "64"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line
            and not line.startswith("|---")]
    assert len(rows) == 5
    for row in rows:
        us = float(row.rstrip(" |").split("|")[-1])
        assert us > 0
