"""Rank-0 logging: W&B offline run continued under the same id on resume, progress output."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from addernet_dist.config import load_config
from addernet_dist.logging_utils import MetricsLogger, Progress
from tests.train_helpers import DEBUG_CONFIG


@pytest.mark.timeout(180)
def test_wandb_offline_run_is_continued_with_the_stored_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        DEBUG_CONFIG,
        [f"output_dir={tmp_path}", "wandb.enabled=true", "wandb.tags=[ci]", "wandb.name=t"],
    )
    first = MetricsLogger(cfg, enabled=True).open(wandb_run_id=None)
    run_id = first.wandb_run_id
    assert run_id  # generated, and what the checkpoint stores
    first.write({"kind": "train", "step": 1, "epoch": 0, "loss": 2.5, "lr": 0.1, "p": 2.0})
    first.close()
    # the resumed run gets the id back from the checkpoint
    second = MetricsLogger(cfg, enabled=True).open(wandb_run_id=run_id)
    assert second.wandb_run_id == run_id
    second.write({"kind": "eval", "step": 2, "epoch": 1, "top1": 50.0})
    second.close()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time to the second>-<id>; wandb appends -1 to a second run in the same second
    assert len(runs) == 2, runs
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in runs), runs
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["train", "eval"]


@pytest.mark.timeout(30)
def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path):
    cfg = load_config(DEBUG_CONFIG, [f"output_dir={tmp_path}", "wandb.enabled=true"])
    log = MetricsLogger(cfg, enabled=False).open()
    log.write({"kind": "train", "step": 1})
    log.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(30)
def test_progress_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="addernet_dist")
    prog = Progress(enabled=True, mode="auto", total=10).start(initial=0)  # pytest's stderr: no TTY
    prog.update(2, {"epoch": 0, "loss": 2.30259, "lr": 0.1, "p": 1.75, "images_per_s": 812.4})
    prog.close()
    assert "epoch=0 loss=2.303 lr=0.1 p=1.75 images_per_s=812.4" in caplog.text


def test_console_logging_follows_sys_stderr_after_it_is_replaced(monkeypatch):
    """A caller that swaps sys.stderr around train.main() (pytest's capsys, a notebook) and closes the
    swapped stream must not turn every later log record into "Logging error ... closed file"."""
    import io

    from addernet_dist.logging_utils import setup_console_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    try:
        setup_console_logging(0)
        logging.getLogger("addernet_dist").warning("one")
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("addernet_dist").warning("two")
        assert "WARNING two" in second.getvalue()
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
