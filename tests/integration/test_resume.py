"""Checkpoints and exact resume: SIGKILL mid-epoch + resume == uninterrupted run, bit for bit;
corrupt newest checkpoint -> previous one, with a warning naming the file."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch

from addernet_dist import checkpoint
from addernet_dist.checkpoint import Checkpointer, CheckpointError
from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.logging_utils import MetricsLogger, read_metrics
from tests.train_helpers import (
    DEBUG_CONFIG,
    assert_same_state,
    check,
    run_python,
    train_cmd,
)

# 12 steps per epoch, 2 epochs; checkpoints at steps 5, 10, 12 (epoch end), 15, 20, 24.
RUN = ["train.log_every=1", "train.ckpt_every_steps=5", "train.epochs=2", "train.keep_last=3"]


def _train_losses(out) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    return full, check(run_python(train_cmd([f"output_dir={full}", *RUN])))


def _assert_same_run(full, other) -> None:
    losses_full, losses_other = _train_losses(full), _train_losses(other)
    assert sorted(losses_full) == list(range(1, 25))
    assert losses_other == losses_full  # every step, exact float equality
    evals = [
        [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "eval"]
        for d in (full, other)
    ]
    assert evals[0] == evals[1] and len(evals[0]) == 2  # all but the wall-clock time
    # Final weights, BN statistics, momentum buffers and LR schedule: bit-identical.
    a = checkpoint.load_file(full / "checkpoints" / "step_000000024.pt")["engine"]
    b = checkpoint.load_file(other / "checkpoints" / "step_000000024.pt")["engine"]
    assert_same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["lr_scheduler"] == b["lr_scheduler"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(uninterrupted, tmp_path):
    full, ref = uninterrupted
    killed = tmp_path / "killed"

    # SIGKILL right after optimizer step 22 (epoch 2, mid-epoch); checkpoints 12, 15, 20 remain.
    proc = run_python(train_cmd([f"output_dir={killed}", *RUN]), ADDERNET_FAULT_STEP="22")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckdir = killed / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step_*.pt")) == [
        "step_000000012.pt",
        "step_000000015.pt",
        "step_000000020.pt",
    ]
    assert not list(ckdir.glob(".*tmp*"))
    # Damage the newest one the way a full disk would (truncated): resume must skip it and
    # continue from step 15, which is in the middle of epoch 2 (3 of 12 batches done).
    newest = ckdir / "step_000000020.pt"
    newest.write_bytes(newest.read_bytes()[:-1000])

    resumed = check(run_python(train_cmd([f"output_dir={killed}", *RUN])))
    assert "skipping checkpoint step_000000020.pt" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_000000015.pt at step 15" in resumed.stderr

    _assert_same_run(full, killed)
    final = [line for line in ref.stdout.splitlines() if line.startswith("final:")]
    assert final and final == [ln for ln in resumed.stdout.splitlines() if ln.startswith("final:")]
    # The resolved config was written once the run validated.
    assert load_config(killed / "config.yaml").train.ckpt_every_steps == 5


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_checkpoints_at_next_log_step_and_resumes_exactly(uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "preempted"
    run = [f"output_dir={out}", *RUN[1:], "train.log_every=3"]
    # SIGTERM after step 7: the run goes on to the next logging step (9), saves, exits 143
    # (EXIT_PREEMPTED: unfinished, run it again).
    proc = run_python(train_cmd(run), ADDERNET_FAULT_STEP="7", ADDERNET_FAULT_SIGNAL="TERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "preempted (SIGTERM): saved" in proc.stderr and "at step 9" in proc.stderr
    assert "final:" not in proc.stdout
    assert (out / "checkpoints" / "step_000000009.pt").is_file()
    check(run_python(train_cmd(run)))
    # log_every=3 logs steps 3, 6, ..., so compare those steps; weights must match exactly.
    losses = _train_losses(out)
    assert losses == {s: v for s, v in _train_losses(full).items() if s % 3 == 0 or s == 12}
    a = checkpoint.load_file(full / "checkpoints" / "step_000000024.pt")["engine"]["model"]
    assert_same_state(
        a, checkpoint.load_file(out / "checkpoints" / "step_000000024.pt")["engine"]["model"]
    )


# ---- in-process units ------------------------------------------------------------------------


def _write(ck: Checkpointer, step: int, value: float) -> None:
    checkpoint.save_file(
        {"engine": {"w": torch.full((3,), value)}, "client": {}}, ck.path_for(step)
    )


@pytest.mark.timeout(30)
def test_newest_valid_skips_corrupt_files_and_names_them(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=10, dist=DistInfo())
    for s in (4, 8, 12, 16):
        _write(ck, s, float(s))
    assert ck.newest_valid() == ck.path_for(16)
    # flipped byte in the payload (sha256 mismatch), truncation, and a non-checkpoint file
    data = bytearray(ck.path_for(16).read_bytes())
    data[100] ^= 0xFF
    ck.path_for(16).write_bytes(bytes(data))
    ck.path_for(12).write_bytes(ck.path_for(12).read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        assert ck.newest_valid() == ck.path_for(8)
    assert "step_000000016.pt: checkpoint" in caplog.text and "sha256 mismatch" in caplog.text
    assert "step_000000012.pt" in caplog.text and "truncated" in caplog.text
    assert checkpoint.load_file(ck.path_for(8))["engine"]["w"].tolist() == [8.0] * 3
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        checkpoint.load_file(ck.path_for(16))
    # resume=<path> of a truncated file is refused before anything is created (Checkpointer.open)
    with pytest.raises(CheckpointError, match="truncated"):
        ck.check_paths(str(ck.path_for(12)))


@pytest.mark.timeout(30)
def test_prune_keeps_last_k_and_best(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, dist=DistInfo())
    for s in (1, 2, 3, 10):
        _write(ck, s, float(s))
    ck.copy_to_best(ck.path_for(2))
    ck.prune()
    assert [p.name for p in ck.list()] == ["step_000000003.pt", "step_000000010.pt"]
    assert checkpoint.load_file(ck.best_path)["engine"]["w"].tolist() == [2.0] * 3


@pytest.mark.timeout(30)
def test_atomic_write_never_exposes_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "step_000000001.pt"
    checkpoint.atomic_write_bytes(b"old complete content", target)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # runfolder.atomic_write_bytes's rename
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write_bytes(b"new", target)
    assert target.read_bytes() == b"old complete content"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # tmp file cleaned up


@pytest.mark.timeout(30)
def test_metrics_log_survives_torn_line_and_resume(tmp_path):
    cfg = load_config(DEBUG_CONFIG, [f"output_dir={tmp_path}"])
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "step": 2, "lo')
    log = MetricsLogger(cfg, enabled=True).open()
    log.write({"kind": "resume", "step": 1})
    log.write({"kind": "train", "step": 2, "loss": 1.5})
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"kind": "train", "step": 1, "loss": 2.0}
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(path)[1]["loss"] == 1.5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fused_adder_bn_trains_the_same_model_with_the_same_checkpoint_keys(
    uninterrupted, tmp_path
):
    # adder.fuse_bn=true on CPU: the engine installs FusedAdderBN2d (8 pairs in ResNet-8); off the
    # Triton path each computes exactly the unfused pair, so the run equals the unfused one bit for
    # bit, and its checkpoints carry the unfused keys (evaluate/resume need not know about fusion).
    full, _ = uninterrupted
    out = tmp_path / "fused"
    proc = check(run_python(train_cmd([f"output_dir={out}", *RUN, "adder.fuse_bn=true"])))
    assert "fused 8 Adder2d+BatchNorm2d pairs" in proc.stderr
    _assert_same_run(full, out)
    # per-layer metrics keep their unfused names (adder_alpha/layer1.0.conv1, not .../conv1.adder)
    records = [
        [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"] for d in (full, out)
    ]
    assert [sorted(r) for r in records[0]] == [sorted(r) for r in records[1]]
    assert "adder_alpha/layer1.0.conv1" in records[1][0]
    keys = checkpoint.load_file(out / "checkpoints" / "step_000000024.pt")["engine"]["model"].keys()
    assert "layer1.0.bn1.running_mean" in keys and not any(".adder." in k for k in keys)
