"""SIGINT (Ctrl-C) checkpoints like SIGTERM: the ranks agree at the next log step, save, exit 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from addernet_dist import checkpoint
from addernet_dist.logging_utils import read_metrics
from addernet_dist.trainer import _Stop
from tests.train_helpers import REPO, env, run_python, train_cmd


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_checkpoints_at_next_log_step(tmp_path):
    out = tmp_path / "run"
    run = [f"output_dir={out}", "train.log_every=3", "train.ckpt_every_steps=0"]
    proc = run_python(train_cmd(run), ADDERNET_FAULT_STEP="7", ADDERNET_FAULT_SIGNAL="INT")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "preempted (SIGINT): saved" in proc.stderr and "at step 9" in proc.stderr
    assert "KeyboardInterrupt" not in proc.stderr
    state = checkpoint.load_file(out / "checkpoints" / "step_000000009.pt")
    assert state["client"]["train_state"]["global_step"] == 9


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_to_the_process_group_spares_the_loader_workers(tmp_path):
    """A terminal's Ctrl-C signals every process of the group, DataLoader workers included: a
    worker killed by it would leave the epoch without batches long before the next log step
    (here up to 50 steps later; the worker prefetches 4). Forked workers inherit the trainer's
    handler, so the first Ctrl-C only asks for the checkpoint there too."""
    out = tmp_path / "run"
    data = tmp_path / "digits"
    overrides = [
        f"output_dir={out}", "train.log_every=50", "train.ckpt_every_steps=0", "train.epochs=3",
        "data.dataset=digits", f"data.root={data}", "data.image_size=8", "data.num_workers=1",
        "adder.p_schedule=false", "train.global_batch_size=8",  # 180 steps per epoch
    ]
    p = subprocess.Popen(
        [sys.executable, *train_cmd(overrides)], cwd=REPO, env=env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and p.poll() is None:
        if metrics.is_file() and any(r["kind"] == "train" for r in read_metrics(metrics)):
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    stdout, stderr = p.communicate(timeout=200)
    assert p.returncode == 143, stderr[-3000:]
    assert "preempted (SIGINT): saved" in stderr
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    step = checkpoint.load_file(saved[-1])["client"]["train_state"]["global_step"]
    assert saved[-1].name == f"step_{step:09d}.pt" and step % 50 == 0 and 50 < step < 3 * 180


@pytest.mark.timeout(30)
def test_a_second_ctrl_c_interrupts_at_once():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = _Stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; never reached
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
