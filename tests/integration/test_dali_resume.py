"""Trainer + DALI: a run killed mid-epoch and resumed equals the uninterrupted run bit for bit, random
crops and flips included (the DALI pipeline checkpoint travels in the training checkpoint)."""

from __future__ import annotations

import signal

import pytest

from addernet_dist import checkpoint
from addernet_dist.data.jpeg_tree import make_jpeg_tree
from addernet_dist.logging_utils import read_metrics
from tests.train_helpers import assert_same_state, check, run_python, train_cmd

# 48 train images, global batch 16: 3 steps per epoch, 2 epochs; checkpoints at steps 2, 3, 4, 6.
RUN = [
    "data.dataset=imagefolder",
    "data.loader=dali",
    "data.image_size=16",
    "data.augment=random_resized_crop",
    "data.hflip=true",
    "data.num_workers=1",
    "train.epochs=2",
    "train.log_every=1",
    "train.ckpt_every_steps=2",
    "train.keep_last=4",
    "adder.p_decay_epochs=0.34",
]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dali_run_killed_mid_epoch_resumes_bit_identical(tmp_path):
    root = tmp_path / "tree"
    make_jpeg_tree(root, num_classes=3, train_per_class=16, val_per_class=4)
    data = [f"data.root={root}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    check(run_python(train_cmd([f"output_dir={full}", *data, *RUN])))
    # SIGKILL after step 5; the newest checkpoint is step 4: epoch 2 with 1 of 3 batches done.
    proc = run_python(train_cmd([f"output_dir={killed}", *data, *RUN]), ADDERNET_FAULT_STEP="5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    client = checkpoint.load_file(killed / "checkpoints" / "step_000000004.pt")["client"]
    (loader_state,) = client["loader"]
    assert loader_state["batches_done"] == 1 and "dali_checkpoint" in loader_state
    resumed = check(run_python(train_cmd([f"output_dir={killed}", *data, *RUN])))
    assert "step_000000004.pt at step 4" in resumed.stderr

    def losses(d):
        return {
            r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"
        }

    assert sorted(losses(full)) == list(range(1, 7))
    assert losses(killed) == losses(full)  # every step, exact float equality
    a = checkpoint.load_file(full / "checkpoints" / "step_000000006.pt")["engine"]["model"]
    b = checkpoint.load_file(killed / "checkpoints" / "step_000000006.pt")["engine"]["model"]
    assert_same_state(a, b)
