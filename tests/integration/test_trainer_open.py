"""The trainer's run log components and its opening (addernet_dist/open_run.py): ``Trainer.from_config``
builds the metrics logger, progress display and stall watchdog without side effects, ``Trainer.train``
starts them at the resumed step; the checkpoint records the runtime (torch threads and version) and a
resume under another one says so (docs/training.md "Reproducibility").

In-process runs (world size 1) of the debug config on 32 samples: 2 steps per epoch.
"""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace

import pytest
import torch

from addernet_dist import build
from addernet_dist import run as run_mod
from addernet_dist import trainer as trainer_mod
from addernet_dist.checkpoint import load_file, release_run_locks, runtime_changes, runtime_info
from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.guard import StallWatchdog
from addernet_dist.logging_utils import MetricsLogger, Progress, read_metrics
from addernet_dist.nn import adder_modules
from addernet_dist.ops import dispatch
from tests.helpers import SMALL_RUN
from tests.train_helpers import DEBUG_CONFIG

RUN = [*SMALL_RUN, "train.precision=fp32"]


@pytest.fixture
def lines():
    """The messages of the ``addernet_dist`` logger (run.train's basicConfig(force=True) replaces the
    root handlers, caplog's among them)."""
    got: list[str] = []

    class _List(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    logger, handler = logging.getLogger("addernet_dist"), _List(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(level)


class RecordingLogger:
    """A logger injected into Trainer.__init__: keeps the records, writes no file."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.opened_with: list[str | None] = []
        self.wandb_run_id: str | None = None

    def open(self, *, wandb_run_id: str | None = None) -> RecordingLogger:
        self.opened_with.append(wandb_run_id)
        self.wandb_run_id = wandb_run_id or "injected-run-id"
        return self

    def write(self, record: dict) -> None:
        assert self.opened_with, "written before open()"
        self.records.append(dict(record))

    def close(self) -> None:
        pass


def _records(out) -> list[dict]:
    """Every line of metrics.jsonl (read_metrics drops the resume records)."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _train(trainer: trainer_mod.Trainer):
    try:
        return trainer.train()
    finally:
        release_run_locks()  # run.train's teardown


@pytest.mark.timeout(300)
def test_from_config_has_no_side_effects_and_a_save_before_train_works(tmp_path):
    out = tmp_path / "run"
    # W&B on (offline without a key): the old logger created the W&B run in its constructor
    cfg = load_config(DEBUG_CONFIG, [*RUN, f"output_dir={out}", "wandb.enabled=true", "wandb.mode=offline"])
    threads = {t.name for t in threading.enumerate()}
    trainer = trainer_mod.Trainer.from_config(cfg, DistInfo())
    assert not out.exists()  # no metrics.jsonl, no wandb/, no config.yaml
    assert {t.name for t in threading.enumerate()} == threads
    assert not trainer.logger.opened and trainer.logger.wandb_run_id is None
    assert not trainer.progress.started and trainer.watchdog.first_step is None
    with pytest.raises(RuntimeError, match=r"MetricsLogger.write\('eval' record\) before open\(\)"):
        trainer.logger.write({"kind": "eval", "step": 0})
    assert not out.exists()
    # a checkpoint before train(): the watchdog not yet started is inert (its "checkpoint" phase)
    path = trainer.save()
    assert path == out / "checkpoints" / "step_000000000.pt" and path.exists()
    assert trainer.watchdog.first_step is None and trainer.watchdog._thread is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


@pytest.mark.timeout(300)
def test_an_injected_logger_gets_the_runs_records_and_the_watchdog_starts_at_the_resumed_step(tmp_path):
    out = tmp_path / "run"
    base = [*RUN, "adder.p_schedule=false", f"output_dir={out}"]
    dist = DistInfo()
    # 1. one epoch with the default components: the watchdog and the progress start at step 0
    first = trainer_mod.Trainer.from_config(load_config(DEBUG_CONFIG, [*base, "train.epochs=1"]), dist)
    _train(first)
    assert (first.watchdog.first_step, first.progress.initial) == (0, 0)
    assert not first.logger.opened  # closed after the run
    # 2. resumed for a second epoch, with an injected logger: it gets the run's records, the file
    # metrics.jsonl is not written, and the watchdog starts at the resumed step 2
    cfg = load_config(DEBUG_CONFIG, [*base, "train.epochs=2"])
    written = (out / "metrics.jsonl").read_text()
    parts = build.build_components(cfg, dist)
    logger = RecordingLogger()
    trainer = trainer_mod.Trainer(cfg, dist, **{**parts, "logger": logger})
    result = _train(trainer)
    assert (out / "metrics.jsonl").read_text() == written
    assert logger.opened_with == [first.state.wandb_run_id]  # the checkpoint's W&B id (None: W&B off)
    assert [(r["kind"], r["step"]) for r in logger.records] == [
        ("resume", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
        ("summary", 4),
    ]
    resume, train3, train4, ev, summary = logger.records
    assert resume["changed"] == {"train.epochs": [1, 2]} and "runtime_changed" not in resume
    assert train3["epoch"] == 1.5 and train4["epoch"] == 2.0 and train3["p"] == 1.0
    assert ev["top1"] == result.top1 and ev["count"] == 16
    assert (summary["best_top1"], summary["best_step"]) == (trainer.state.best_top1, trainer.state.best_step)
    assert trainer.watchdog.first_step == 2
    assert trainer.watchdog.startup_until == 2 + cfg.train.stall_startup_steps
    assert trainer.progress.initial == 2 and trainer.progress.position == 4
    client = load_file(out / "checkpoints" / "step_000000004.pt")["client"]
    assert client["train_state"]["wandb_run_id"] == "injected-run-id"  # the logger's id is stored


def test_a_logger_or_progress_never_started_refuses_records(tmp_path):
    cfg = load_config(DEBUG_CONFIG, [f"output_dir={tmp_path / 'run'}"])
    for enabled in (True, False):  # on every rank: a rank-1 bug shows on rank 0's tests too
        log = MetricsLogger(cfg, enabled=enabled, total_steps=4)
        with pytest.raises(RuntimeError, match=r"write\('train' record\) before open\(\).*metrics.jsonl"):
            log.write({"kind": "train", "step": 1})
        log.open()
        log.write({"kind": "train", "step": 1})
        log.close()
        with pytest.raises(RuntimeError, match="after close"):
            log.write({"kind": "train", "step": 2})
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]  # rank 0's only
    prog = Progress(enabled=True, mode=False, total=4)
    with pytest.raises(RuntimeError, match=r"Progress.update before start\(\)"):
        prog.update(1, {})
    prog.start(initial=3).update(1, {})
    assert prog.position == 4


def test_the_watchdog_starts_its_thread_in_start_not_in_the_constructor(monkeypatch):
    store: dict[str, bytes] = {}
    fake = SimpleNamespace(
        set=lambda k, v: store.__setitem__(k, v.encode()), multi_get=lambda ks: [store[k] for k in ks]
    )
    monkeypatch.setattr("addernet_dist.guard._own_store_client", lambda: fake)
    dist = SimpleNamespace(initialized=True, rank=0, world_size=1)
    wd = StallWatchdog(dist, timeout_s=60.0, startup_timeout_s=60.0, startup_steps=5)
    assert wd._thread is None and store == {} and wd.first_step is None
    with wd.during("checkpoint"):  # what Trainer.save before train() does
        pass
    try:
        assert wd.start(first_step=7) is wd
        assert wd._thread is not None and wd._thread.is_alive()
        assert (wd.first_step, wd.step, wd.startup_until, wd.phase) == (7, 7, 12, "startup")
        assert store["addernet/heartbeat/attempt_0/rank_0"].decode().split(" ")[1:] == ["7", "startup"]
    finally:
        wd.close()


# ---- the runtime a checkpoint records (docs/training.md "Reproducibility") ------------------------


def test_runtime_changes_compares_what_the_checkpoint_recorded():
    now = {"torch_threads": 2, "torch_version": "2.14.1"}
    assert runtime_changes(None, now) == {}  # a checkpoint written before it was recorded
    assert runtime_changes(dict(now), now) == {}
    assert runtime_changes({"torch_threads": 1, "torch_version": "2.14.1"}, now) == {"torch_threads": [1, 2]}
    assert runtime_changes({"torch_version": "2.9.0"}, now) == {"torch_version": ["2.9.0", "2.14.1"]}


@pytest.fixture
def threads():
    """torch's intra-op thread count, restored after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.timeout(300)
def test_the_runtime_is_saved_logged_and_a_resume_under_another_thread_count_says_so(tmp_path, threads, lines):
    out = tmp_path / "run"
    base = [*RUN, f"output_dir={out}"]
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=1"]))
    client = load_file(out / "checkpoints" / "step_000000002.pt")["client"]
    assert client["runtime"] == {"torch_threads": threads, "torch_version": str(torch.__version__)}
    assert client["runtime"] == runtime_info()
    model = build.build_model(load_config(DEBUG_CONFIG, base), 10)
    backend = {dispatch.resolve_backend(torch.device("cpu"), m.backend) for m in adder_modules(model)}
    assert len(backend) == 1
    start = f"run: world size 1, device cpu, torch {torch.__version__} with {threads} intra-op threads, "
    assert start + f"adder backend {backend.pop()}" in lines
    lines.clear()
    torch.set_num_threads(threads + 1)
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=2"]))
    assert start.replace(f"with {threads} ", f"with {threads + 1} ") in " ".join(lines)
    assert f"resume: torch_threads: {threads} when the checkpoint was written, {threads + 1} now" in lines
    assert any("CPU results depend on torch's intra-op thread count" in m for m in lines)
    (resume,) = [r for r in _records(out) if r["kind"] == "resume"]
    assert resume["runtime_changed"] == {"torch_threads": [threads, threads + 1]}
    assert resume["changed"] == {"train.epochs": [1, 2]}
    client = load_file(out / "checkpoints" / "step_000000004.pt")["client"]
    assert client["runtime"]["torch_threads"] == threads + 1  # what this attempt ran with


@pytest.mark.timeout(300)
def test_a_checkpoint_without_runtime_resumes_without_a_word_about_it(tmp_path, threads, lines, monkeypatch):
    out = tmp_path / "run"
    base = [*RUN, f"output_dir={out}"]
    state_dict = trainer_mod.Trainer.state_dict

    def as_before(self):  # a checkpoint written before the runtime was recorded
        client = state_dict(self)
        del client["runtime"]
        return client

    monkeypatch.setattr(trainer_mod.Trainer, "state_dict", as_before)
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=1"]))
    assert "runtime" not in load_file(out / "checkpoints" / "step_000000002.pt")["client"]
    monkeypatch.setattr(trainer_mod.Trainer, "state_dict", state_dict)
    torch.set_num_threads(threads + 1)  # a change it cannot see
    lines.clear()
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=2"]))
    assert any(m.startswith("resumed from ") for m in lines)
    assert not [m for m in lines if "torch_threads" in m or "thread count" in m or "holds no" in m]
    (resume,) = [r for r in _records(out) if r["kind"] == "resume"]
    assert "runtime_changed" not in resume and resume["step"] == 2
    assert load_file(out / "checkpoints" / "step_000000004.pt")["client"]["runtime"]["torch_threads"] == threads + 1
