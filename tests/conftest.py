"""Shared test set-up: the backend first, fixed seeds, the `gpu` marker, hypothesis profiles."""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import mlsys_ref  # noqa: F401  (decides CUDA or interpreter before any kernel is defined)
from mlsys_ref.backend import default_device

# `ci`: few examples, no deadline (the interpreter is slow and timing varies on 2 cores).
settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Under pytest-xdist each worker is its own process: one intra-op thread each, or the
# workers oversubscribe the cores and tiny-model tests run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not mlsys_ref.is_interpreter():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """Where kernels run: CUDA when present, else the CPU under the Triton interpreter."""
    return default_device()
