"""Backend selection for the adder operator (first version: reference only; the CPU/Triton paths extend it)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def resolve_backend(device: torch.device, requested: str | None) -> str:
    return "reference"


def get_impl(name: str) -> Callable:
    from addernet_dist.ops.reference import adder2d_reference

    return adder2d_reference
