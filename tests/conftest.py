"""Shared test fixtures. Every test starts from the same RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_default_backend():
    # Tests that call dispatch.set_default_backend (train() no longer does: build_model gives the
    # layers adder.backend) would otherwise leak it: a later test that expects the device default
    # (the CPU fast path) fails or passes depending on the order the tests run in. Reset to the
    # process's initial value (unset), not to the value at the test's start.
    from addernet_dist.ops import dispatch

    dispatch.set_default_backend(None)
    yield
    dispatch.set_default_backend(None)


def pytest_collection_modifyitems(config, items):
    # GPU-tier tests: skipped on CPU-only machines (CI); they run wherever CUDA is present.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tier); runs on GPU machines")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
