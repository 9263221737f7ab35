"""Resume restores the global RNG streams (Python ``random``, NumPy, torch), tested with a model
that consumes all three at every training forward.

Why this configuration: nothing in the shipped configs draws from the global RNGs during training
(loaders and DALI seed their own generators), so a resume that skipped ``set_rng_state`` kept every
other resume test green (issue 16). A user's model with dropout (torch) or a NumPy/Python-random
augmentation does draw from them; this test stands in for it with a forward pre-hook that scales
the input by noise from each stream. Without the restore the resumed epoch reuses the streams of a
fresh start (seed_everything) and its losses differ from the uninterrupted run's. The same
preempted run logs to W&B (offline) and checks that the resumed process continues the run id
stored in the checkpoint.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from addernet_dist import build
from addernet_dist import run as run_mod
from addernet_dist.checkpoint import load_file
from addernet_dist.config import load_config
from addernet_dist.logging_utils import read_metrics
from tests.helpers import FIXED_P_EPOCH, preempt_after
from tests.train_helpers import DEBUG_CONFIG, assert_same_state

# 32 samples / global batch 16 = 2 steps, one epoch (one evaluation per run); p fixed at 1 (a
# fractional p costs ~14x). The preemption after step 1 leaves one step for the resumed process: its
# loss needs the restored noise streams, the weights after it the restored momentum buffers.
RUN = FIXED_P_EPOCH


def _noisy_forward(module, args):
    if not module.training:
        return None
    (x,) = args
    noise = (
        torch.rand(()).item() + float(np.random.rand()) + random.random()
    )  # one draw from each global stream per step
    return (x * (1.0 + 0.2 * noise),)


def _build_model_consuming_rng(cfg, num_classes):
    model = _build_model(cfg, num_classes)
    model.register_forward_pre_hook(_noisy_forward)
    return model


_build_model = build.build_model


def _losses(out):
    return {
        r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"
    }


@pytest.mark.timeout(300)
def test_preempted_run_resumes_with_the_python_numpy_and_torch_rng_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "build_model", _build_model_consuming_rng)
    full, split = tmp_path / "full", tmp_path / "split"
    run_mod.train(load_config(DEBUG_CONFIG, [*RUN, f"output_dir={full}"]))
    # The same run preempted (SIGTERM, in this process, once) after step 1 of 2: it saves at that
    # logging step, returns, and the same call resumes mid-epoch. A new process would reseed
    # every stream the same way (seed_everything runs before the restore).
    # W&B (offline) on for the preempted run: the resumed run must continue the same W&B run id
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    preempt_after(monkeypatch, 1, tmp_path / "fired")
    cfg = load_config(DEBUG_CONFIG, [*RUN, f"output_dir={split}", "wandb.enabled=true"])
    assert run_mod.train(cfg) is None  # preempted
    assert (split / "checkpoints" / "step_000000001.pt").is_file()
    run_mod.train(cfg)
    a, b = _losses(full), _losses(split)
    assert sorted(a) == [1, 2]
    assert b == a  # exact: step 2 continues the noise streams of step 1
    # and the weights after step 2 (the update uses the restored momentum buffers): bit-identical
    final = [
        load_file(d / "checkpoints" / "step_000000002.pt")["engine"]["model"] for d in (full, split)
    ]
    assert_same_state(*final)
    # W&B run-id continuity: the id stored in the step-1 checkpoint is the one both the first
    # and the resumed process logged under (two offline run folders, one id)
    stored = load_file(split / "checkpoints" / "step_000000001.pt")["client"]["train_state"]
    run_id = stored["wandb_run_id"]
    assert run_id
    runs = sorted(p.name for p in (split / "wandb").glob("offline-run-*"))
    # offline-run-<time to the second>-<id>; wandb appends -1 to a second run in the same second
    # (the preempted and the resumed attempt here often start within one second)
    assert len(runs) == 2, runs
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in runs), runs
