import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Fixed seeds: hypothesis derandomized, NumPy generators seeded per test.
settings.register_profile(
    "default", derandomize=True, deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.load_profile("default")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
