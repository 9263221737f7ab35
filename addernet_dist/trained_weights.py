"""The one reader of the trainer's checkpoint layout for tools that only need the weights.

``addernet-eval`` and ``addernet-analyze`` read a trained model through ``read_trained_weights``;
resume (train.py, the engines) restores the full state through ``checkpoint/``. A trainer
checkpoint file (checkpoint/store.py's FileStore: ``torch.save`` + sha256 footer) holds the layout
of checkpoint/layout.py (the engine part's model, the client part's config).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from addernet_dist import checkpoint, runfolder
from addernet_dist.checkpoint import layout


@dataclass(frozen=True)
class TrainedWeights:
    """model: the state_dict (keys without the ``_orig_mod.`` / ``module.`` prefixes that compiled
    or DDP-wrapped models add). config: the run's resolved config as a dict, or None for a bare
    ``state_dict`` file (or a checkpoint written without one)."""

    model: dict[str, torch.Tensor]
    config: dict[str, Any] | None


def read_trained_weights(
    path: str | os.PathLike, *, allow_state_dict: bool = False, ema: bool = False
) -> TrainedWeights:
    """The model weights and run config of a trainer checkpoint (``step_*.pt``, ``best.pt``, the
    output of ``addernet-zero-to-state-dict``).

    allow_state_dict: also accept a plain ``torch.save(model.state_dict())`` file (config None);
    otherwise a file that is not a verified trainer checkpoint raises ``checkpoint.CheckpointError``
    naming the problem (missing, truncated, corrupt).
    ema: the EMA of the weights (``train.ema_decay``, the checkpoint's ``client["ema"]["model"]``)
    instead of the model; a checkpoint without one raises ``checkpoint.CheckpointError``.
    """
    path = Path(path)
    try:
        body = checkpoint.read_verified(path)
    except checkpoint.CheckpointError:
        if not allow_state_dict:
            raise
        state = runfolder.safe_torch_load(path, path)  # a bare state_dict: never unpickled either
    else:
        state = runfolder.safe_torch_load(io.BytesIO(body), path)
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' is not a checkpoint or state_dict file")
    engine, client = layout.parts(state)
    cfg = client.get("config") if isinstance(client, dict) else None
    sd = engine.get("model") if isinstance(engine, dict) and "model" in engine else state
    if ema:
        held = client.get("ema") if isinstance(client, dict) else None
        if not isinstance(held, dict) or "model" not in held:
            raise checkpoint.CheckpointError(
                f"'{path}' holds no EMA of the weights (the run was trained without "
                "train.ema_decay); evaluate it without --ema"
            )
        sd = held["model"]
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    return TrainedWeights(model=sd, config=cfg if isinstance(cfg, dict) else None)
