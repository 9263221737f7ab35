"""best.pt is never lost (issue 20, part 2), and a full disk says what happened.

- a restart that finds no valid step checkpoint resumes from a valid best.pt instead of training
  from scratch over it (an unreadable best.pt is moved aside, never overwritten);
- SIGKILL during the copy to best.pt: the train state already names the best step, so the restart
  copies it again (before the fix the run ended with exit 0 and no best.pt);
- disk full (ENOSPC) and the file-size limit (EFBIG) end with a message naming the file, the
  space it needs, that earlier checkpoints are intact, and a non-zero exit, not a traceback.

Every case is a real debug-config run (1 epoch, 6 steps, checkpoints at steps 2, 4, 6).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from addernet_dist import checkpoint, runfolder
from addernet_dist.metrics import EvalResult
from tests.train_helpers import DEBUG_CONFIG, FAST, run_python

ONE_EPOCH = [
    "data.synthetic_train_size=96",
    "data.synthetic_val_size=20",
    "train.log_every=1",
    "train.ckpt_every_steps=2",
    "train.epochs=1",
]


def _args(out: Path, *extra: str) -> list[str]:
    return ["--config", str(DEBUG_CONFIG), *FAST, *ONE_EPOCH, f"output_dir={out}", *extra]


def _main(capsys, out: Path, *extra: str) -> tuple[int, str]:
    from addernet_dist.train import main

    capsys.readouterr()
    rc = main(_args(out, *extra))
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run (steps 2, 4, 6 and best.pt = step 6). Tests copy it."""
    from addernet_dist.train import main

    out = tmp_path_factory.mktemp("best") / "run"
    assert main(_args(out)) == 0
    ck = out / "checkpoints"
    assert (ck / "step_000000006.pt").read_bytes() == (ck / "best.pt").read_bytes()
    return out


def test_a_written_checkpoint_holds_only_tensors_and_plain_types(finished):
    """What the trainer writes loads with the strictest torch.load: no allowlisted type needed
    (docs/training.md, 'What a checkpoint may contain')."""
    body = runfolder.read_verified(finished / "checkpoints" / "step_000000006.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(body)) == []
    state = torch.load(io.BytesIO(body), weights_only=True)
    assert state["client"]["train_state"]["best_step"] == 6


# ---- 1. no valid step checkpoint left, best.pt valid ------------------------------------------------


@pytest.mark.timeout(200)
def test_restart_without_valid_step_files_resumes_from_best_and_keeps_it(finished, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    best = out / "checkpoints" / "best.pt"
    before, inode = best.read_bytes(), best.stat().st_ino
    for p in (out / "checkpoints").glob("step_*.pt"):
        p.write_bytes(p.read_bytes()[:-10])  # all truncated
    rc, err = _main(capsys, out, "optim.lr=0.05")  # another lr: a fresh start would differ
    assert rc == 0, err[-3000:]
    assert "resuming from best.pt" in err
    assert best.stat().st_ino == inode and best.read_bytes() == before  # not rewritten
    lines = (out / "metrics.jsonl").read_text().splitlines()
    marks = [r for r in map(json.loads, lines) if r["kind"] == "resume"]
    assert [r["step"] for r in marks] == [6] and "restart" not in marks[0]


@pytest.mark.timeout(200)
def test_unreadable_best_is_moved_aside_not_overwritten_by_a_fresh_start(finished, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    best = out / "checkpoints" / "best.pt"
    for p in [*(out / "checkpoints").glob("step_*.pt"), best]:
        p.write_bytes(p.read_bytes()[:-10])
    corrupt = best.read_bytes()
    rc, err = _main(capsys, out)
    assert rc == 0, err[-3000:]
    assert "starting from scratch" in err
    assert (out / "checkpoints" / "best.pt.corrupt").read_bytes() == corrupt
    assert checkpoint.verify(best) is None  # the new run's best


# ---- 2. killed while copying to best.pt -------------------------------------------------------------


_KILL_DURING_BEST_COPY = """
import os, signal, sys
from addernet_dist.checkpoint import store  # FileStore.copy, the copy to best.pt
real = store.atomic_write_bytes
def write(data, path):
    if path.name == "best.pt":  # half of the temp file written, then SIGKILL
        path.with_name(".best.pt.tmp.%d" % os.getpid()).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(data, path)
store.atomic_write_bytes = write
from addernet_dist.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_sigkill_during_the_copy_to_best_is_repaired_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_python(["-c", _KILL_DURING_BEST_COPY, *_args(out)])
    assert proc.returncode == -9, proc.stderr[-3000:]
    ck = out / "checkpoints"
    assert not (ck / "best.pt").exists() and (ck / "step_000000006.pt").is_file()
    state = checkpoint.load_file(ck / "step_000000006.pt")["client"]["train_state"]
    rc, err = _main(capsys, out)
    assert rc == 0, err[-3000:]
    assert "copying step_000000006.pt to best.pt again" in err
    assert checkpoint.verify(ck / "best.pt") is None
    assert (ck / "step_000000006.pt").read_bytes() == (ck / "best.pt").read_bytes()
    assert not list(ck.glob(".best.pt.tmp.*"))  # the killed writer's temp file is cleaned
    assert state.get("best_step") == 6 and state["best_top1"] >= 0  # recorded before the copy


# ---- 3. disk full, file-size limit ------------------------------------------------------------------


def _fill_disk(monkeypatch, name: str) -> list[Path]:
    """``open`` in runfolder: writing ``name`` writes half the bytes, then fails with ENOSPC."""
    real_open = open
    hits: list[Path] = []

    class Full:
        def __init__(self, f, path):
            self.f, self.path = f, path

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            hits.append(self.path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f, Path(path)) if "w" in mode and f".{name}.tmp." in str(path) else f

    monkeypatch.setattr(runfolder, "open", fake_open, raising=False)
    return hits


def _says_no_room(err: str, path: Path) -> None:
    assert "Traceback" not in err and "OSError" not in err, err[-3000:]
    assert f"cannot write '{path}'" in err, err[-3000:]
    assert "every earlier checkpoint of the run are intact" in err
    assert "bytes" in err and "MiB" in err


@pytest.mark.timeout(200)
def test_disk_full_names_the_file_and_the_space_and_keeps_earlier_checkpoints(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    hits = _fill_disk(monkeypatch, "step_000000004.pt")
    rc, err = _main(capsys, out)
    target = out / "checkpoints" / "step_000000004.pt"
    assert hits == [runfolder.tmp_path_for(target)]
    assert rc == 2, err[-3000:]
    _says_no_room(err, target)
    size = (out / "checkpoints" / "step_000000002.pt").stat().st_size  # same model, same size
    m = re.search(r"the file needs (\d+) bytes \([\d.]+ MiB\), (\d+) bytes \([\d.]+ MiB\) are free", err)
    assert m and abs(int(m.group(1)) - size) < 1000 and int(m.group(2)) > 0, err[-2000:]
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000000002.pt"]  # no temp file left
    assert checkpoint.verify(ck / "step_000000002.pt") is None


@pytest.mark.timeout(300)
def test_disk_full_during_the_copy_to_best_then_a_restart_makes_best(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fill_disk(monkeypatch, "best.pt")
    rc, err = _main(capsys, out)
    assert rc == 2, err[-3000:]
    _says_no_room(err, out / "checkpoints" / "best.pt")
    monkeypatch.undo()  # room again
    rc, err = _main(capsys, out)
    assert rc == 0, err[-3000:]
    ck = out / "checkpoints"
    assert (ck / "step_000000006.pt").read_bytes() == (ck / "best.pt").read_bytes()


_FILE_SIZE_LIMIT = """
import os, resource, signal, sys
# The limit is for the run's own writes: build the compiled code it loads on first use (our CPU
# kernels, DeepSpeed's CPU comm op, ~0.5-2 MB each) before it, or on a fresh machine the compiler
# dies of SIGXFSZ first (seen: cc1plus 'File size limit exceeded' for deepspeed_shm_comm).
from addernet_dist.kernels import cpu_build
cpu_build.is_available()  # builds, or falls back to the reference operator as the run would
if os.environ.get("DS_ACCELERATOR") == "cpu":
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    ShareMemCommBuilder().load()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from addernet_dist.train import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.timeout(200)
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE/SIGXFSZ semantics are Linux's")
def test_file_size_limit_names_the_file_and_the_limit(tmp_path):
    out = tmp_path / "run"
    # 300 kB: above metrics.jsonl and config.yaml, below a checkpoint (~670 kB for resnet8)
    proc = run_python(["-c", _FILE_SIZE_LIMIT, "300000", *_args(out)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    _says_no_room(proc.stderr, out / "checkpoints" / "step_000000002.pt")
    assert "file-size limit (300000 bytes, `ulimit -f`)" in proc.stderr
    assert not list((out / "checkpoints").iterdir())  # the partial temp file is removed


# ---- 4. the best marker --------------------------------------------------------------------------


def test_best_top1_is_the_maximum_over_evaluations_at_the_final_p():
    from addernet_dist.evaluator import Evaluator
    from addernet_dist.trainer import TrainState

    ev = Evaluator.__new__(Evaluator)
    ev.final_p = 1.0
    state = TrainState()
    seq = [(1.5, 40.0), (1.0, 10.0), (1.0, 15.0), (1.2, 90.0), (1.0, 13.0), (1.0, 15.0), (1.0, 20.0)]
    got = []
    for step, (p, top1) in enumerate(seq, start=1):
        state.global_step = step
        r = EvalResult(top1=top1, top5=0.0, loss=1.0, count=1)
        got.append((ev.is_new_best(r, p, state), state.best_top1, state.best_step))
    assert got == [
        (False, -1.0, None),  # p above the final p: not a candidate, nothing recorded
        (True, 10.0, 2),
        (True, 15.0, 3),
        (False, 15.0, 3),
        (False, 15.0, 3),  # lower
        (False, 15.0, 3),  # a tie keeps the earlier best.pt
        (True, 20.0, 7),
    ]


def test_an_evaluation_whose_checkpoint_is_not_saved_does_not_become_the_best():
    """Trainer._evaluate: a non-finite model is not saved (Trainer.save returns None), so best.pt
    keeps the previous best and the train state must not name the unsaved step."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from addernet_dist.evaluator import Evaluator
    from addernet_dist.trainer import Trainer, TrainState

    ev = Evaluator.__new__(Evaluator)
    ev.final_p = 1.0
    result = EvalResult(top1=30.0, top5=0.0, loss=1.0, count=1)

    class _Evaluator(SimpleNamespace):  # the evaluation itself is not what is tested here
        def __call__(self, model, epoch, p):
            return result, {}

    t = Trainer.__new__(Trainer)
    t.state, t.p, t.model = TrainState(global_step=8, best_top1=20.0, best_step=4), 1.0, None
    t.evaluator = _Evaluator(is_new_best=ev.is_new_best)
    t.guard = SimpleNamespace(check=lambda *a, **k: True)
    t.watchdog = SimpleNamespace(during=lambda phase: nullcontext())
    t.engine = SimpleNamespace(train=lambda: None)
    t.logger = SimpleNamespace(write=lambda rec: None)
    t.progress = SimpleNamespace(message=lambda m: None)
    t.dist, t.ema = None, None
    saved: list[bool] = []
    for outcome in (None, "step_000000008.pt"):  # not saved (non-finite), then saved
        t.save = lambda best, best_ema=False, outcome=outcome: saved.append(best) or outcome
        t._evaluate()
        got = (t.state.best_top1, t.state.best_step)
        assert got == ((20.0, 4) if outcome is None else (30.0, 8))
    assert saved == [True, True]


@pytest.mark.timeout(200)
def test_disk_full_while_appending_metrics_names_the_log(tmp_path, capsys, monkeypatch):
    from addernet_dist import logging_utils

    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 3:  # the third record: disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def __getattr__(self, k):
            return getattr(self.f, k)

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(logging_utils, "open", fake_open, raising=False)
    out = tmp_path / "run"
    rc, err = _main(capsys, out)
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and f"cannot write '{out / 'metrics.jsonl'}'" in err, err[-3000:]
    assert "Every checkpoint of the run is intact" in err
    assert checkpoint.verify(out / "checkpoints" / "step_000000002.pt") is None


# ---- 5. the same for engine=deepspeed checkpoint folders ---------------------------------------


def _ds_folder(folder: Path, fill: int) -> Path:
    from addernet_dist.engine import ds_checkpoint

    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (folder / name).write_bytes(bytes([fill]) * 5000)
    ds_checkpoint.write_manifest(folder, {"zero_stage": 2, "world_size": 1})
    return folder


def test_deepspeed_best_copy_on_a_full_disk_keeps_the_old_best(tmp_path, monkeypatch):
    from addernet_dist.engine import ds_checkpoint

    old = _ds_folder(tmp_path / "best.pt", 1)
    new = _ds_folder(tmp_path / "step_000000008.pt", 2)
    assert not checkpoint.same_checkpoint(new, old)
    real_copy2, calls = shutil.copy2, []

    def copy2(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second shard: disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy2(src, dst)

    monkeypatch.setattr(ds_checkpoint.shutil, "copy2", copy2)
    with pytest.raises(runfolder.CheckpointWriteError, match="cannot write '.*best.pt'.*are intact"):
        ds_checkpoint.copy(new, old)
    assert len(calls) == 2 and not (tmp_path / ".best.pt.tmp").exists()
    assert checkpoint.verify(old) is None and (old / "mp_rank_00_model_states.pt").read_bytes()[0] == 1
    monkeypatch.undo()
    ds_checkpoint.copy(new, old)
    assert checkpoint.same_checkpoint(new, old) and checkpoint.verify(old) is None


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE/SIGXFSZ semantics are Linux's")
def test_deepspeed_checkpoint_over_the_file_size_limit_names_the_folder(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    args = ["--config", str(DEBUG_CONFIG), *FAST, "data.image_size=8", "data.synthetic_train_size=16"]
    args += ["data.synthetic_val_size=20", "train.global_batch_size=8", "train.epochs=1"]
    args += ["engine=deepspeed", "deepspeed.zero_stage=2", "deepspeed.micro_batch_size=4"]
    args += [f"output_dir={out}", "wandb.enabled=false"]
    # 100 kB: above DeepSpeed's zero_to_fp32.py copy (~35 kB), below each shard (>= 190 kB)
    proc = run_python(["-c", _FILE_SIZE_LIMIT, "100000", *args], timeout=360, DS_ACCELERATOR="cpu")
    assert proc.returncode == 2, proc.stderr[-3000:]
    target = out / "checkpoints" / "step_000000002.pt"
    assert f"cannot write DeepSpeed checkpoint '{target}'" in proc.stderr, proc.stderr[-3000:]
    assert "file-size limit: 100000 bytes" in proc.stderr and "Traceback" not in proc.stderr
    assert not target.exists()


@pytest.mark.parametrize("which", ["best.pt", "best_ema.pt"])
def test_restore_best_copies_the_named_step_only_when_best_is_missing_or_stale(tmp_path, which):
    """Checkpointer.restore_best over every case: the resumed step is the best (stale best.pt:
    copied again; an unreadable one moved aside first), an older best step (copied only when
    best.pt is missing), and both gone (reported, so the run forgets the best)."""
    from addernet_dist.checkpoint import Checkpointer
    from addernet_dist.distributed import DistInfo

    ck = Checkpointer(tmp_path, keep_last=3, dist=DistInfo())
    for step in (4, 8):
        runfolder.save_file({"step": torch.tensor(step)}, ck.path_for(step))
    s4, s8, best = ck.path_for(4), ck.path_for(8), ck.dir / which
    assert best in (ck.best_path, ck.best_ema_path)
    ck.copy_to_best(s4, best)
    inode = best.stat().st_ino
    # best.pt is the copy of step 4 = best_step: untouched, whichever step resumes
    assert ck.restore_best(s8, 4, best) is False and best.stat().st_ino == inode
    # resumed step 8 is the best one, best.pt still holds step 4's: copied again, step 4's kept
    assert ck.restore_best(s8, 8, best) is False and best.read_bytes() == s8.read_bytes()
    aside = ck.dir / f"{which}.superseded"
    assert aside.read_bytes() == s4.read_bytes()
    aside.unlink()
    # unreadable best.pt: kept aside as best.pt.corrupt, then replaced
    best.write_bytes(best.read_bytes()[:-5])
    torn = best.read_bytes()
    assert ck.restore_best(s8, 8, best) is False and best.read_bytes() == s8.read_bytes()
    assert (ck.dir / f"{which}.corrupt").read_bytes() == torn
    # best.pt missing, the best step (4) older than the resumed one: copied from step 4's file
    best.unlink()
    assert ck.restore_best(s8, 4, best) is False and best.read_bytes() == s4.read_bytes()
    # resume= an older step (4, the best of that history) while best.pt is another future's best
    # (step 8's): step 4's file becomes best.pt, step 8's valid best is kept aside, not overwritten
    ck.copy_to_best(s8, best)
    assert ck.restore_best(s4, 4, best) is False and best.read_bytes() == s4.read_bytes()
    assert aside.read_bytes() == s8.read_bytes()
    # best.pt and step 4 both gone: reported (the caller resets best_top1)
    best.unlink()
    s4.unlink()
    assert ck.restore_best(s8, 4, best) is True and not best.exists()
    assert ck.restore_best(s8, None, best) is False  # a checkpoint from before best_step existed


@pytest.mark.timeout(200)
def test_resume_from_an_older_step_keeps_the_abandoned_future_and_its_best(finished, tmp_path, capsys):
    """resume= an older checkpoint of the same folder: the newer step files AND the best.pt of that
    future move to checkpoints/superseded-<time>/ (best.pt as a hard link), so the resumed run's next
    best cannot destroy the only copy of the old one."""
    out = shutil.copytree(finished, tmp_path / "run")
    ck = out / "checkpoints"
    old_best = (ck / "best.pt").read_bytes()
    s6 = (ck / "step_000000006.pt").read_bytes()
    (ck / "step_000000006.pt").unlink()  # retention had pruned the best step's own file
    rc, err = _main(capsys, out, f"resume={ck / 'step_000000002.pt'}", "optim.lr=0.05")
    assert rc == 0, err[-3000:]
    assert "resumed from an older checkpoint: the newer ones moved to" in err
    (sup,) = ck.glob("superseded-*")
    assert sorted(p.name for p in sup.iterdir()) == ["best.pt", "step_000000004.pt"]
    assert (sup / "best.pt").read_bytes() == old_best == s6
    # the new history (another lr) made its own best.pt; the old one is intact beside it
    assert (ck / "best.pt").read_bytes() != old_best
