"""Resume at an epoch boundary with another train.global_batch_size: the LR and p schedules
continue from the same fraction of the run (epochs done x the new steps per epoch), not from the
checkpoint's step count (which made lr = 0 for the rest of the run)."""

from __future__ import annotations

import pytest

from addernet_dist.config import load_config
from addernet_dist.logging_utils import read_metrics
from addernet_dist.optim import LRLambda
from tests.train_helpers import DEBUG_CONFIG, check, run_python, train_cmd


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_batch_size_change_at_epoch_boundary_keeps_the_schedules_position(tmp_path):
    out = tmp_path / "run"
    run = [f"output_dir={out}", "train.log_every=1", "train.ckpt_every_steps=0"]
    # configs/debug.yaml: 192 samples, batch 16 -> 12 steps per epoch, 2 epochs. SIGTERM after
    # step 12 (the end of epoch 0, a log step): checkpoint at step 12, exit 143.
    proc = run_python(train_cmd(run), ADDERNET_FAULT_STEP="12", ADDERNET_FAULT_SIGNAL="TERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    # Epoch 1 with batch 32: 6 steps per epoch, so the schedules have 12 steps and epoch 1 is
    # their steps 6..11; global_step goes on from 12 (steps 13..18).
    # p_decay_epochs=1.5 here (0.5 before: fractional-p steps cost ~14x on CPU): p is still
    # decaying where the resumed run starts, schedule step 6 of its 9 decay steps.
    resumed = [*run, "train.global_batch_size=32", "adder.p_decay_epochs=1.5"]
    # Preempted again mid-epoch, after step 15 (schedule step 9): the offset is derived again
    # from the loader's position (epoch 1, batch 3) on the next resume.
    proc = run_python(train_cmd(resumed), ADDERNET_FAULT_STEP="15", ADDERNET_FAULT_SIGNAL="TERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "the LR and p schedules continue at step 6 of 12" in proc.stderr, proc.stderr[-3000:]
    proc = check(run_python(train_cmd(resumed)))
    assert "continue at step 9 of 12 (epoch 1, batch 3" in proc.stderr, proc.stderr[-3000:]
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    after = {r["step"]: r for r in recs if r["step"] > 12}
    assert sorted(after) == [13, 14, 15, 16, 17, 18]
    cfg = load_config(DEBUG_CONFIG).optim
    fn = LRLambda("cosine", total_steps=12, warmup_steps=round(0.25 * 6), min_factor=0.0)
    for step, r in after.items():
        s = step - 6  # the schedule step after this optimizer step
        assert r["lr"] == pytest.approx(cfg.lr * fn(s), rel=1e-9, abs=1e-12), step
        # The step's p is p_sched.value(schedule step before it): 2 -> 1 over 9 steps.
        assert r["p"] == pytest.approx(max(1.0, 2.0 - (s - 1) / 9), rel=1e-12), step
    assert after[13]["lr"] > 0.04  # 0.1 x (1 + cos(pi * 5/10)) / 2 = 0.05, not min_lr = 0
    assert (out / "checkpoints" / "step_000000018.pt").is_file()
