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


def pytest_collection_modifyitems(config, items):
    # GPU-tier tests: skipped on CPU-only machines (CI); they run wherever CUDA is present.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tier); runs on GPU machines")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
