"""Helpers shared by several test files: one-process engines and in-process runs of the debug config,
the benchmarks' kernel report module, and the adder op forward/backward probe. The subprocess and
torchrun helpers (workers, final models) are in train_helpers.py."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch
from torch import nn

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
