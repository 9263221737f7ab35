"""Kernel tiles in a training run: every p code path tuned before the first step, the choices in the
checkpoint.

Why at startup: the tuner times a layer shape the first time it is launched, and the ℓp schedule
reaches p = 1 (its own code path, P_MODE) only at ``adder.decay_steps`` — ~1.1 M steps into
configs/imagenet_resnet50.yaml — where rank 0 would time ~36 tiles (minutes of ptxas) in the middle of
the run while the other ranks wait. :func:`tune_tiles` runs one training step (forward, ∂X, ∂F) and one
evaluation forward per p code path of the schedule (``warmup_plan``: p_start, a general p, p_end) on
throw-away inputs, inside the stall watchdog's "tuning" phase, and leaves the model as it was (BN
statistics, gradients, RNG states). A run started from a full ``ADDERNET_TILE_CACHE`` times nothing.

Why in the checkpoint (:class:`TileChoices`): tile choices live in process memory, and after a restart
rank 0 may time other winners; the tile changes result bits (the EXP2_FMA split, the BN-partials merge
order), so a resumed run restores the tiles it ran with. The state is ``{"entries": {key: {name: int}}}``,
plain strings and ints (``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from addernet_dist.config import ConfigError

log = logging.getLogger("addernet_dist")


@dataclass(frozen=True)
class WarmupPlan:
    p_values: tuple[float, ...]  # one per code path the ℓp schedule reaches (p = 2, general, 1)
    batches: tuple[int, ...]  # per-GPU training batch and a short one (another specialisation)
    image_size: int
    precision: str  # train.precision: fp32 / bf16 / fp16
    channels_last: bool


def warmup_plan(cfg, gpus: int) -> WarmupPlan:
    """What the warm-up launches for a config (pure)."""
    a = cfg.adder
    if a.p_schedule and a.p_start != a.p_end:
        ps = (a.p_start, (a.p_start + a.p_end) / 2, a.p_end)
    else:  # no schedule: p = p_end throughout (optim.PSchedule), whatever p_start says
        ps = (a.p_end,)
    # p = 1 and p = 2 are their own code paths; any other value is the general path
    paths = {1.0: 1.0, 2.0: 2.0}
    seen, p_values = set(), []
    for p in ps:
        key = paths.get(float(p), "general")
        if key not in seen:
            seen.add(key)
            p_values.append(float(p))
    if cfg.train.global_batch_size % gpus:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} does not split over --gpus {gpus}"
        )
    per_gpu = cfg.train.global_batch_size // gpus
    # Triton specialises an integer argument by divisibility by 16 (and == 1): the per-GPU batch and a
    # batch of another class (the last, short batch of an epoch or of the evaluation set)
    short = per_gpu - 1 if per_gpu % 16 == 0 else per_gpu + (16 - per_gpu % 16)
    batches = (per_gpu, max(2, short)) if per_gpu > 2 else (per_gpu,)
    return WarmupPlan(
        tuple(p_values), batches, cfg.data.image_size, cfg.train.precision, cfg.train.channels_last
    )


def _tile_tuner():
    """addernet_dist/kernels/tile_tuner.py, or None where Triton is not installed (nothing to tune or restore)."""
    try:
        return importlib.import_module("addernet_dist.kernels.tile_tuner")
    except ImportError:
        return None


class TileChoices:
    """The checkpoint's ``tiles``: every kernel tile this process chose (tuned, cached or restored)."""

    def state_dict(self) -> dict[str, Any]:
        tt = _tile_tuner()
        return {"entries": tt.choices() if tt is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entries = state.get("entries") if isinstance(state, dict) else None
        tt = _tile_tuner()
        if tt is None or not entries:
            return
        n = tt.restore_choices(entries, source="checkpoint 'tiles'")
        log.info("resume: %d kernel tile choices restored from the checkpoint", n)


def tuners_active() -> bool:
    """Whether a launch of the Triton adder kernels can time tiles (compiled kernels, tuning on)."""
    tt = _tile_tuner()
    if tt is None or not tt.TUNING_ENABLED:
        return False
    try:
        ta = importlib.import_module("addernet_dist.kernels.triton_adder")
    except ImportError:
        return False
    return any(
        t is not None
        for t in (ta._adder_fwd_tuned, ta._adder_bwd_dx_tuned, ta._adder_bwd_dw_atomic_tuned)
    )


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 4:
            return int(w.shape[1])
    raise ValueError(
        "the model has no 4-d (convolution / adder) weight to take the input channels from"
    )


def tune_tiles(
    model: nn.Module,
    p_values: tuple[float, ...],
    batches: tuple[int, ...],
    image_size: int,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    input_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    log_fn=log.info,
) -> int:
    """For every p and batch: a training step (forward, ∂X, ∂F) and an evaluation forward of ``model``
    on random images, so every kernel × layer shape × p code path is launched (and tuned) now.
    ``model`` is left as it was: its BN buffers, p, train/eval mode, ``.grad`` and the RNG states
    (gradients are taken with ``autograd.grad``, so DDP / DeepSpeed reduction hooks do not run).
    Returns the steps run."""
    from addernet_dist.device_policy import autocast
    from addernet_dist.nn import adder_modules, set_p

    adders = adder_modules(model)
    if not adders:
        return 0
    saved_p = [m.p for m in adders]
    was_training = model.training
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    params = [q for q in model.parameters() if q.requires_grad]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c = _in_channels(model)
    devices = [device] if device.type == "cuda" else []
    runs = 0
    with torch.random.fork_rng(devices=devices):
        try:
            for p in p_values:
                set_p(model, p)
                for n in batches:
                    t0 = time.perf_counter()
                    x = torch.randn(n, c, image_size, image_size, device=device)
                    x = x.to(dtype=input_dtype or x.dtype, memory_format=fmt)
                    model.train()
                    with autocast(device.type, autocast_dtype):
                        loss = model(x).float().logsumexp(1).mean()
                    torch.autograd.grad(loss, params, allow_unused=True)
                    model.eval()
                    with torch.no_grad(), autocast(device.type, autocast_dtype):
                        model(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    runs += 1
                    log_fn(f"  tiles: p={p:g} batch {n}: {time.perf_counter() - t0:.1f} s")
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
            for m, p in zip(adders, saved_p):
                m.p = p
            model.train(was_training)
    return runs
