"""Helpers shared by several test files: one-process engines and in-process runs of the debug config,
the benchmarks' kernel report module, and the adder op forward/backward probe. The subprocess and
torchrun helpers (workers, final models) are in train_helpers.py."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch
from torch import nn

from addernet_dist.nn import Adder2d
from tests.train_helpers import DEBUG_CONFIG, REPO

# One SGD step is w -= 1.0 * grad exactly: no momentum, no weight decay, a constant LR of 1.
PLAIN_SGD = [
    "optim.momentum=0",
    "optim.weight_decay=0",
    "optim.lr=1.0",
    "optim.schedule=constant",
    "optim.warmup_epochs=0",
]
# The reference adder backend (the plain eq. 1 forward) on the CPU.
CPU_REFERENCE = ["adder.backend=reference", "train.device=cpu"]
# An in-process debug-config run on 32 samples: 2 steps per epoch (global batch 16), a log record
# every step, a checkpoint at each epoch end only.
SMALL_RUN = [
    "train.progress_bar=false",
    "data.synthetic_train_size=32",
    "data.synthetic_val_size=16",
    "train.log_every=1",
    "train.ckpt_every_steps=0",
]
# SMALL_RUN for one epoch on the reference operator at a fixed p (no lp schedule).
FIXED_P_EPOCH = [*SMALL_RUN, "adder.backend=reference", "adder.p_schedule=false", "train.epochs=1"]


def module_jpeg_tree(name: str, **layout):
    """A module-scoped fixture: ``(root, make_jpeg_tree(root, **layout))`` in a fresh temp folder."""

    @pytest.fixture(scope="module")
    def jpeg_tree(tmp_path_factory):
        from addernet_dist.data.jpeg_tree import make_jpeg_tree

        root = tmp_path_factory.mktemp(name)
        return root, make_jpeg_tree(root, **layout)

    return jpeg_tree


def preempt_after(monkeypatch, step: int, marker) -> None:
    """The next in-process run (``run.train``) is preempted as by SIGTERM after ``step``: it saves a
    checkpoint there and returns None; the fault fires once (``marker`` is written), so the same call
    again resumes and finishes."""
    monkeypatch.setenv("ADDERNET_FAULT_STEP", str(step))
    monkeypatch.setenv("ADDERNET_FAULT_SIGNAL", "TERM")
    monkeypatch.setenv("ADDERNET_FAULT_MARKER", str(marker))


def cpu_engine(base: list[str], overrides: list[str]) -> tuple[nn.Module, nn.Module]:
    """A one-process DDPEngine on the CPU for the debug config with ``base`` then ``overrides``
    (4 steps per epoch), and its bare model (built after ``torch.manual_seed(0)``)."""
    # Imported here: the kernel tests import this module and need none of the training stack.
    from addernet_dist.build import build_model
    from addernet_dist.config import load_config
    from addernet_dist.distributed import DistInfo
    from addernet_dist.engine.ddp import DDPEngine

    cfg = load_config(DEBUG_CONFIG, [*base, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10)
    return DDPEngine(model, cfg, DistInfo(device=torch.device("cpu")), steps_per_epoch=4), model


def kernel_report() -> ModuleType:
    """benchmarks/kernel_report.py as the module ``kernel_report`` (benchmarks/ is no package)."""
    path = REPO / "benchmarks" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def run_adder(fn, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, **kw):
    """``y = fn(x, w, **kw)`` on fresh leaf copies and ``y.backward(g)``: returns (y, dL/dx, dL/dw)."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, **kw)
    y.backward(g)
    return y.detach(), x.grad, w.grad


class OddAdderNet(nn.Module):
    """Odd sizes on purpose: 3x5x3x3=135 and 7x3x1x1=21 adder elements, a conv and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.a1 = Adder2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.a2 = Adder2d(5, 7, 1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        x = self.a2(self.bn(self.a1(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def random_grads(model: nn.Module, seed: int) -> None:
    """Fill ``model``'s gradients with those of a cross-entropy loss on a seeded random batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 5, 5, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
