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


TIERS = ("unit", "integration", "gpu")  # the folders under tests/ (rules: tests/unit/test_tiers.py)


def pytest_collection_modifyitems(config, items):
    # Each test is marked with its folder's tier, so `-m unit`, `-m "not integration"` select as the
    # folders do. GPU-tier tests are skipped on CPU-only machines (CI); they run wherever CUDA is.
    skip = None if torch.cuda.is_available() else pytest.mark.skip(
        reason="needs a CUDA device (GPU tier); runs on GPU machines"
    )
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
