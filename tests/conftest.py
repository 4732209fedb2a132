import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Fixed seeds: hypothesis derandomized, NumPy generators seeded per test.
_COMMON = dict(derandomize=True, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20")), **_COMMON)
# `python -m pytest -m fast`: property tests run 3 examples unless HYPOTHESIS_MAX_EXAMPLES says otherwise.
settings.register_profile("fast", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "3")), **_COMMON)
settings.load_profile("default")

# The fast subset (`-m fast`, README "Tests"): tests/test_smoke.py runs every public function against its reference
# (marked there); these cheap modules and tests join it. A path selects a whole module, "path::name" one test
# function (all its parametrizations).
FAST = (
    "tests/test_lnc.py",
    "tests/test_validation.py",
    "tests/test_conventions.py",
    "tests/microbench/test_tables.py",
    "tests/moe/test_moe_routing.py",
    # one property sweep against the float64 reference per kernel (3 hypothesis examples under -m fast)
    "tests/examples/test_examples.py::test_tiled_matmul_matches_reference",
    "tests/examples/test_examples.py::test_softmax_matches_reference",
    "tests/examples/test_examples.py::test_rmsnorm_matches_reference",
    "tests/attention/test_attention_prefill.py::test_matches_reference",
    "tests/attention/test_attention_adversarial.py::test_decode_lnc1_and_lnc2_match_reference",
    "tests/attention/test_attention_varlen.py::test_matches_per_sequence_reference",
    "tests/deltanet/test_gdn_chunk.py::test_matches_reference",
    "tests/deltanet/test_gdn_recurrent.py::test_matches_reference",
    "tests/deltanet/test_gdn_conv1d.py::test_matches_reference",
    "tests/moe/test_moe_blockwise.py::test_matches_reference",
    "tests/moe/test_moe_decode.py::test_matches_reference",
    "tests/codepredictor/test_codepredictor_lnc.py::test_lnc2_matches_reference_and_lnc1",
    "tests/codepredictor/test_codepredictor_tp.py::test_tp_matches_reference_on_every_rank",   # code_predictor_tp
)


def pytest_configure(config):
    if "fast" in (config.getoption("markexpr", "") or ""):
        settings.load_profile("fast")


def _is_fast(nodeid: str) -> bool:
    path, _, rest = nodeid.partition("::")
    func = rest.split("[", 1)[0]
    return any(f == path or f == f"{path}::{func}" for f in FAST)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_fast(item.nodeid):
            item.add_marker(pytest.mark.fast)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
