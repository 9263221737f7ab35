"""The run folder as the user's most valuable artifact (issue 12): retention by validity, one run
per folder, resume that says what changed, NaN stops the run, stalled ranks are named, preemption
is not success, and the error messages that say what to do.

Every case is a real debug-config run (12 steps per epoch, ~5 s per process on CPU) or an
in-process unit; faults come from train.py's ADDERNET_FAULT_* injection.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from addernet_dist import checkpoint, runfolder
from addernet_dist.checkpoint import Checkpointer, config_changes
from addernet_dist.config import ConfigError, load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.logging_utils import MetricsLogger, read_metrics
from addernet_dist.optim import LRLambda
from addernet_dist.runfolder import RunFolderError, RunLock
from tests.train_helpers import (
    DEBUG_CONFIG,
    FAST,
    REPO,
    env,
    run_python,
    start_workers,
    train_cmd,
)

# A small epoch: 96 training images, global batch 16 -> 6 steps; checkpoints at 2, 4 and 6 (the
# epoch end, after the evaluation on 20 images).
SMALL = ["data.synthetic_train_size=96", "data.synthetic_val_size=20"]
ONE_EPOCH = [*SMALL, "train.log_every=1", "train.ckpt_every_steps=2", "train.epochs=1"]


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _strict_lines(path: Path) -> list[dict]:
    return [_strict(line) for line in path.read_text().splitlines() if line.strip()]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").iterdir())


def _steps(folder: Path) -> list[int]:
    return [r["step"] for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "train"]


def _rc(proc, want: int) -> subprocess.CompletedProcess:
    assert proc.returncode == want, (
        f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _main(capsys, overrides: list[str], want: int) -> str:
    """``addernet-train`` in this process (no interpreter start-up): exit status, stderr."""
    from addernet_dist.train import main

    capsys.readouterr()
    rc = main(["--config", str(DEBUG_CONFIG), *FAST, *overrides])
    err = capsys.readouterr().err
    assert rc == want, err[-5000:]
    return err


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A finished 1-epoch debug run (checkpoints 2, 4, 6 and best.pt). Tests copy it."""
    from addernet_dist.train import main

    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["--config", str(DEBUG_CONFIG), *FAST, f"output_dir={out}", *ONE_EPOCH]) == 0
    assert _names(out) == ["best.pt", "step_000000002.pt", "step_000000004.pt", "step_000000006.pt"]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. retention --------------------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_retention_keeps_the_runs_valid_checkpoints_and_moves_corrupt_ones_aside(
    one_epoch, tmp_path, capsys
):
    # The reproduction, scaled: a run with checkpoints 2, 4, 6; delete 4 and best.pt,
    # truncate 6 to 1000 bytes, continue with keep_last=1 (today: 2 and the run's own new 4 were
    # deleted, then FileNotFoundError, leaving only the truncated file).
    out = _copy(one_epoch, tmp_path / "run")
    ck = out / "checkpoints"
    (ck / "step_000000004.pt").unlink()
    (ck / "best.pt").unlink()
    newest = ck / "step_000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    # ... and the temp file of a writer killed mid-save (its pid is gone): removed at start.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = ck / f".step_000000008.pt.tmp.{dead.pid}"
    stale.write_bytes(b"half a checkpoint")

    err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH, "train.epochs=2", "train.keep_last=1"], 0)
    assert f"removed {stale}, left by a killed writer" in err and not stale.exists()
    assert "skipping checkpoint step_000000006.pt" in err
    assert "moved checkpoint step_000000006.pt aside to step_000000006.pt.corrupt" in err
    assert "step_000000002.pt at step 2" in err
    # The run's own newest checkpoint and best.pt survive; the truncated file is kept aside.
    assert _names(out) == ["best.pt", "step_000000006.pt.corrupt", "step_000000012.pt"]
    assert checkpoint.verify(ck / "step_000000012.pt") is None
    assert (ck / "step_000000006.pt.corrupt").stat().st_size == 1000
    assert _steps(out) == list(range(1, 13))


@pytest.mark.timeout(60)
def test_prune_deletes_only_verified_files_older_than_keep_last_valid_ones(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=2, dist=DistInfo())
    for s in (3, 6, 9, 20):
        checkpoint.save_file({"engine": {"w": torch.full((2,), float(s))}}, ck.path_for(s))
    # A higher-numbered unreadable file (a foreign or truncated one) and a corrupt older one.
    ck.path_for(20).write_bytes(b"garbage")
    data = bytearray(ck.path_for(3).read_bytes())
    data[50] ^= 0xFF
    ck.path_for(3).write_bytes(bytes(data))
    ck.prune()
    names = sorted(p.name for p in ck.dir.iterdir())
    # 9 and 6 are the newest valid pair: kept; 3 is corrupt: moved aside, not deleted, not counted.
    assert names == [
        "step_000000003.pt.corrupt",
        "step_000000006.pt",
        "step_000000009.pt",
        "step_000000020.pt.corrupt",
    ]
    checkpoint.save_file({"engine": {"w": torch.zeros(2)}}, ck.path_for(12))
    ck.verify_written(ck.path_for(12))
    ck.prune()
    assert [p.name for p in ck.list()] == ["step_000000009.pt", "step_000000012.pt"]
    # keep_last=1 never deletes the newest valid one, whatever is numbered above it.
    ck.keep_last = 1
    ck.path_for(30).write_bytes(b"x" * 100)
    ck.prune()
    assert [p.name for p in ck.list()] == ["step_000000012.pt"]
    assert checkpoint.load_file(ck.path_for(12))["engine"]["w"].tolist() == [0.0, 0.0]


# ---- 2. resume=none into a folder holding a run ----------------------------------------------------


@pytest.mark.timeout(200)
def test_fresh_start_in_a_folder_holding_a_run_is_refused_or_moves_the_old_run_aside(
    one_epoch, tmp_path, capsys
):
    out = _copy(one_epoch, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH, "resume=none"], 2)
    assert "already holds a run" in err and "overwrite=true" in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # config.yaml, metrics.jsonl, every checkpoint untouched

    # overwrite=true: the old run moves to old-<time>/, the new one starts from step 0 alone.
    new = [f"output_dir={out}", *ONE_EPOCH, "resume=none", "overwrite=true", "optim.lr=0.05"]
    _main(capsys, new, 0)
    (old,) = [p for p in out.iterdir() if p.name.startswith("old-")]
    assert (old / "metrics.jsonl").read_bytes() == before[out / "metrics.jsonl"]
    assert (old / "checkpoints" / "step_000000006.pt").read_bytes() == before[
        out / "checkpoints" / "step_000000006.pt"
    ]
    assert _steps(out) == list(range(1, 7))
    assert load_config(out / "config.yaml").optim.lr == 0.05
    state = checkpoint.load_file(out / "checkpoints" / "step_000000006.pt")
    assert state["client"]["config"]["optim"]["lr"] == 0.05


# ---- 3. one run per folder -------------------------------------------------------------------------


def _wait_stopped(pid: int, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.1)
    raise AssertionError("process never stopped")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    # Run A stops itself (SIGSTOP) after step 3, holding the folder (checkpoint 2 written).
    a = subprocess.Popen(
        [sys.executable, *train_cmd([f"output_dir={out}", *ONE_EPOCH])],
        cwd=REPO,
        env=env(ADDERNET_FAULT_STEP="3", ADDERNET_FAULT_SIGNAL="STOP"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_stopped(a.pid)
        before = (out / "metrics.jsonl").read_bytes()
        err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH], 2)
        assert "is in use by another run" in err
        assert f"pid {a.pid} on host {socket.gethostname()}" in err
        assert (out / "metrics.jsonl").read_bytes() == before  # nothing written by the refused run
        assert _names(out) == ["step_000000002.pt"]
    finally:
        a.kill()
        a.wait()
    # The holder died (SIGKILL): its lock went with it; the next run resumes from step 2.
    err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH], 0)
    assert "step_000000002.pt at step 2" in err
    assert _steps(out) == list(range(1, 7))


@pytest.mark.timeout(60)
def test_run_lock_is_exclusive_and_released(tmp_path):
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on host"):
        b.acquire()
    a.release()
    b.acquire()
    assert _strict((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    b.release()


@pytest.mark.timeout(60)
def test_run_lock_without_flock_detects_stale_holders_by_pid_and_host(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / ".lock"
    host = socket.gethostname()
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": host, "started": 0}))
    lock = RunLock(tmp_path)
    lock.acquire()  # stale: dead pid on this host
    assert _strict(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match="in use by another run"):
        RunLock(tmp_path).acquire()  # live holder (this process)
    lock.release()
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunFolderError, match="if it is dead, delete"):
        RunLock(tmp_path).acquire()


@pytest.mark.timeout(60)
def test_temp_files_of_dead_writers_are_cleaned_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    gone = ck / f".step_000000005.pt.tmp.{dead.pid}"
    mine = ck / f".step_000000005.pt.tmp.{os.getpid()}"
    ds_tmp = ck / ".step_000000010.pt.tmp"
    keep = ck / "step_000000005.pt"
    for p in (gone, mine, keep):
        p.write_bytes(b"x")
    ds_tmp.mkdir()
    (ds_tmp / "shard.pt").write_bytes(b"x")
    removed = checkpoint.clean_stale_temp(ck)
    assert sorted(removed) == sorted([gone, ds_tmp])
    assert sorted(p.name for p in ck.iterdir()) == sorted([mine.name, keep.name])


# ---- 4. a rejected resume leaves config.yaml alone; errors that say what to do ----------------------


@pytest.mark.timeout(300)
def test_rejected_resumes_leave_the_folder_untouched_and_say_what_to_do(
    one_epoch, tmp_path, capsys
):
    out = _copy(one_epoch, tmp_path / "run")
    config_before = (out / "config.yaml").read_bytes()
    names_before = _names(out)
    mid = out / "checkpoints" / "step_000000004.pt"
    cases = [
        # another model: both named
        (["model.name=resnet20"], "holds model resnet8 (conv=adder", "this run builds resnet20"),
        # a batch-size change mid-epoch
        ([f"resume={mid}", "train.global_batch_size=32"], "batch_size=16", "epoch boundary"),
    ]
    for overrides, *needles in cases:
        err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH, *overrides], 2)
        for n in needles:
            assert n in err, err[-3000:]
        assert (out / "config.yaml").read_bytes() == config_before, overrides
        assert _names(out) == names_before, overrides

    # Another engine: a DDP checkpoint file cannot resume engine=deepspeed (the real engine, on
    # CPU through gloo, in its own process).
    proc = run_python(
        train_cmd([f"output_dir={out}", *ONE_EPOCH, "engine=deepspeed"]), DS_ACCELERATOR="cpu"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "a DDP checkpoint file cannot resume a DeepSpeed run: resume it with engine=ddp" in (
        proc.stderr
    )
    assert (out / "config.yaml").read_bytes() == config_before
    assert _names(out) == names_before

    # A DeepSpeed checkpoint folder given to the DDP engine, a converted (weights-only) file.
    ds = tmp_path / "ds" / "checkpoints" / "step_000000005.pt"
    ds.mkdir(parents=True)
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    from addernet_dist.engine import ds_checkpoint

    ds_checkpoint.write_manifest(ds, {"zero_stage": 1, "world_size": 2})
    state = checkpoint.load_file(mid)
    state["engine"]["optimizer"] = None
    converted = tmp_path / "converted.pt"
    checkpoint.save_file(state, converted)
    fresh = tmp_path / "fresh"
    for path, needle in [
        (ds, "addernet-zero-to-state-dict"),
        (converted, "holds model weights only"),
    ]:
        err = _main(capsys, [f"output_dir={fresh}", *ONE_EPOCH, f"resume={path}"], 2)
        assert needle in err, err[-3000:]
        assert not (fresh / "config.yaml").exists()
    from addernet_dist.evaluate import main as eval_main

    assert eval_main(["--checkpoint", str(ds)]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed checkpoint" in err and "addernet-zero-to-state-dict" in err
    # addernet-eval with a config of another model names both.
    args = ["--config", str(DEBUG_CONFIG), "--checkpoint", str(mid), "model.name=resnet20"]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "holds model resnet8 (conv=adder), the config builds resnet20" in err, err

    # A batch-size change at an epoch boundary is fine (was: "resume at an epoch boundary").
    run = [f"output_dir={out}", *SMALL, "train.log_every=1", "train.epochs=2"]
    err = _main(capsys, [*run, "train.global_batch_size=32"], 0)
    assert "train.global_batch_size: 16 -> 32" in err
    assert _steps(out) == list(range(1, 10))  # 6 steps of 16, then 3 of 32


@pytest.mark.timeout(200)
def test_resume_applies_new_optimizer_settings_and_says_what_changed(one_epoch, tmp_path, capsys):
    out = _copy(one_epoch, tmp_path / "run")
    # The finished 1-epoch run continues to 2 epochs with another LR, momentum, decay, nesterov.
    new = [
        "optim.lr=0.05",
        "optim.momentum=0.8",
        "optim.weight_decay=0.001",
        "optim.nesterov=false",
    ]
    err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH, "train.epochs=2", *new], 0)
    for line in (
        "optim.lr: 0.1 -> 0.05",
        "optim.momentum: 0.9 -> 0.8",
        "optim.weight_decay: 0.0005 -> 0.001",
        "optim.nesterov: True -> False",
        "train.epochs: 1 -> 2",
    ):
        assert line in err, err[-3000:]
    (resume,) = [r for r in _strict_lines(out / "metrics.jsonl") if r["kind"] == "resume"]
    assert resume["changed"]["optim.lr"] == [0.1, 0.05]
    # The LR actually used: the new base LR times the schedule of the (2-epoch) run.
    fn = LRLambda("cosine", total_steps=2 * 6, warmup_steps=2)
    records = read_metrics(out / "metrics.jsonl")
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train" and r["step"] > 6}
    assert sorted(lrs) == list(range(7, 13))
    assert all(math.isclose(lr, 0.05 * fn(s), rel_tol=1e-9) for s, lr in lrs.items()), lrs
    final = checkpoint.load_file(out / "checkpoints" / "step_000000012.pt")["engine"]
    group = final["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 0.001, False)
    assert group["initial_lr"] == 0.05
    assert load_config(out / "config.yaml").optim.lr == 0.05


def test_config_changes_lists_every_differing_key():
    a = {"optim": {"lr": 0.1, "momentum": 0.9}, "model": {"kwargs": {}}, "resume": "auto"}
    b = {"optim": {"lr": 0.05, "momentum": 0.9}, "model": {"kwargs": {"p": 2}}, "resume": "x"}
    assert config_changes(a, b) == {"model.kwargs": [{}, {"p": 2}], "optim.lr": [0.1, 0.05]}


# ---- 6. divergence; strict JSON ----------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_divergence_stops_the_run_without_saving_a_nonfinite_model(tmp_path, capsys):
    out = tmp_path / "run"
    # optim.lr=1e6: the loss overflows to NaN within a few steps; checkpoints every 2 steps.
    err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH, "optim.lr=1e6"], 1)
    records = _strict_lines(out / "metrics.jsonl")  # strict JSON: NaN/inf values are null
    train = [r for r in records if r["kind"] == "train"]
    # The first step whose loss or a gradient norm is non-finite (written as null).
    first_bad = next(r["step"] for r in train if None in r.values())
    # max_nonfinite_steps=3 in a row, checked on every (log_every=1) step.
    assert f"training diverged at step {first_bad + 2}" in err
    assert f"non-finite for 3 consecutive steps (since step {first_bad})" in err
    assert train[-1]["step"] == first_bad + 2
    assert any(r["loss"] is None for r in train)
    # No checkpoint of a non-finite model or from a non-finite step, no best.pt: only the
    # checkpoints from before the divergence exist.
    assert _names(out) == [f"step_{s:09d}.pt" for s in range(2, first_bad, 2)] != []
    for name in _names(out):
        engine = checkpoint.load_file(out / "checkpoints" / name)["engine"]
        for k, v in engine["model"].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all(), (name, k)
    assert not any(r["kind"] == "eval" for r in records)


@pytest.mark.timeout(120)
def test_every_json_written_is_strict(tmp_path, one_epoch, capsys):
    assert runfolder.dumps_strict({"a": [1.0, float("nan")], "b": float("-inf")}) == (
        '{"a": [1.0, null], "b": null}'
    )
    cfg = load_config(DEBUG_CONFIG, [f"output_dir={tmp_path}"])
    log = MetricsLogger(cfg, enabled=True).open()
    log.write({"kind": "train", "step": 1, "loss": float("nan"), "lr": float("inf")})
    log.close()
    (rec,) = _strict_lines(tmp_path / "metrics.jsonl")
    assert isinstance(rec.pop("time"), float)  # every record's wall clock (finite: strict too)
    assert rec == {"kind": "train", "step": 1, "loss": None, "lr": None}
    # addernet-eval of finite weights whose logits overflow (an old or foreign file): the loss is
    # not finite and prints as null. (NaN weights are refused: tests/integration/test_clear_errors.py.)
    from addernet_dist.evaluate import main as eval_main

    state = checkpoint.load_file(one_epoch / "checkpoints" / "step_000000006.pt")
    bias = state["engine"]["model"]["fc.bias"]
    bias.fill_(-3e38)
    bias[0] = 3e38  # loss of a non-0 label: 3e38 - (-3e38) = inf in fp32
    bad = tmp_path / "huge.pt"
    checkpoint.save_file(state, bad)
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(bad)]) == 0
    line = _strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["loss"] is None and line["count"] == 20


# ---- 7. only corrupt checkpoints left ------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_only_corrupt_checkpoints_left_says_so_and_keeps_one_history(one_epoch, tmp_path, capsys):
    out = _copy(one_epoch, tmp_path / "run")
    (out / "checkpoints" / "best.pt").unlink()
    for p in (out / "checkpoints").glob("step_*.pt"):
        p.write_bytes(p.read_bytes()[:-10])
    err = _main(capsys, [f"output_dir={out}", *ONE_EPOCH], 0)
    assert "no valid checkpoint" in err and "starting from scratch" in err
    lines = _strict_lines(out / "metrics.jsonl")
    marks = [{k: v for k, v in r.items() if k != "time"} for r in lines if r["kind"] == "resume"]  # wall clock
    assert marks == [{"kind": "resume", "step": 0, "epoch": 0, "restart": "no valid checkpoint", "total_steps": 6}]
    assert _steps(out) == list(range(1, 7))  # one history, not 1..6 twice
    assert len([r for r in lines if r["kind"] == "train"]) == 12
    assert sum(n.endswith(".corrupt") for n in _names(out)) == 3


# ---- 8. batch larger than the dataset; model input size ---------------------------------------------


@pytest.mark.timeout(120)
def test_batch_larger_than_training_set_and_wrong_input_size_are_refused(tmp_path):
    from addernet_dist.build import build_data, build_model

    cfg = load_config(DEBUG_CONFIG, ["train.global_batch_size=256", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"larger than the training set \(192 samples\)"):
        build_data(cfg, DistInfo())
    cfg = load_config(DEBUG_CONFIG, ["model.name=vgg_small", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="vgg_small takes 32x32 inputs only.*image_size=8"):
        build_model(cfg, 10)
    cfg = load_config(DEBUG_CONFIG, ["model.name=vgg_small", "data.image_size=32"])
    assert build_model(cfg, 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# ---- 9. a stalled rank (10, preemption: tests/integration/test_resume.py, exit status 143) ------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stalled_rank_is_named_within_the_timeout_and_a_restart_resumes(tmp_path):
    out = tmp_path / "run"
    run = train_cmd(
        [
            f"output_dir={out}",
            *ONE_EPOCH,
            "train.stall_timeout_s=4",
            "train.stall_timeout_startup_s=120",
            "train.stall_startup_steps=2",
        ]
    )
    marker = tmp_path / "fault"
    r0, r1 = start_workers(
        run,
        ADDERNET_FAULT_STEP="3",
        ADDERNET_FAULT_RANK="1",
        ADDERNET_FAULT_SIGNAL="STOP",
        ADDERNET_FAULT_MARKER=str(marker),
    )
    try:
        _, err0 = r0.communicate(timeout=120)  # fails long before the 30-min group timeout
    finally:
        r1.kill()  # torchrun does this to the stopped peer before it restarts the group
        r1.communicate()
    assert r0.returncode == 1, err0[-3000:]
    assert "stalled run: rank 0 has waited" in err0 and "since it finished step 3" in err0
    # The fault waits until rank 1's heartbeat carries step 3 (3 steps of ~0.1 s fit in one 0.4 s
    # heartbeat interval, which reported step 0): the message names the stopped rank and its step.
    assert "rank 1 (last reported step 3, train) stopped responding" in err0, err0
    assert "train.stall_timeout_s=4" in err0
    # The restart (same command, as torchrun --max-restarts runs it) resumes from step 2.
    procs = start_workers(run, ADDERNET_FAULT_MARKER=str(marker))
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
    assert "step_000000002.pt at step 2" in outs[0][1]
    assert _steps(out) == list(range(1, 7))


def test_file_sha256_hashes_every_block(tmp_path):
    """runfolder.file_sha256 (DeepSpeed MANIFESTs, interop's provenance): the digest of the whole file,
    read in 4 MiB blocks, so a byte past the first block changes it."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert runfolder.file_sha256(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    body = bytes(range(256)) * ((1 << 22) // 256) + b"abc"  # one full block + 3 bytes
    f = tmp_path / "two_blocks"
    f.write_bytes(body)
    import hashlib

    assert runfolder.file_sha256(f) == hashlib.sha256(body).hexdigest()
    f.write_bytes(body[:-1] + b"d")
    assert runfolder.file_sha256(f) != hashlib.sha256(body).hexdigest()
