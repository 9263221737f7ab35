"""Run logging on rank 0: ``metrics.jsonl``, Weights & Biases, and a console progress view.

metrics.jsonl: one JSON object per line, appended and flushed per record (a crash loses at most
the line being written; a torn last line is cut off when the log is reopened, so earlier lines
are never damaged). Every record has ``time`` (wall clock, UNIX seconds) and ``total_steps`` next
to its ``step``. Train records: ``{"kind": "train", "step", "epoch", "loss", "lr", "p",
"grad_norm", "images_per_s", ...}``; eval records: ``{"kind": "eval", "step", "epoch", "top1",
"top5", "loss", "count"}``, ``epoch`` being epochs done in both (a fraction in train records); a
resumed run first writes ``{"kind": "resume", "step": s}`` (with ``changed`` / ``runtime_changed``
when the config / torch threads or version changed): records with a step above s written
before it belong to the abandoned attempt (``read_metrics`` drops them); a finished run ends with
``{"kind": "summary", "best_top1", "best_step", "wall_time_s", "checkpoint", ...}``.
"""

from __future__ import annotations

import configparser
import json
import logging
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from addernet_dist.config import Config, WandbConfig
from addernet_dist.runfolder import NO_ROOM, dumps_strict, no_room_error

log = logging.getLogger("addernet_dist")


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stderr`` is at emit time. basicConfig(stream=
    sys.stderr) keeps the object of the moment: a caller that swaps stderr around train.main()
    (pytest's capsys, a notebook's redirect) closes it afterwards, and every later log record then
    ends in "--- Logging error --- ValueError: I/O operation on closed file"."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; always follow sys.stderr
        pass


def setup_console_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere, one format for every module."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_CurrentStderr()],
        force=True,
    )


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash mid-write) so appends start on a clean line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of the run's final history: drops records a later resume superseded."""
    records: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "resume":
            s = rec["step"]
            records = [r for r in records if r.get("step", 0) <= s]
            continue
        records.append(rec)
    return records


def wandb_online_problem(wcfg: WandbConfig) -> str | None:
    """Why ``wandb.mode=online`` cannot log in (None when it can, or W&B is off or not online).

    Where wandb.init looks for a key (wandb 0.31, sdk/lib/wbauth): WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, the netrc file ($NETRC, ~/.netrc, ~/_netrc) entry for the W&B host,
    the api_key of its settings file. Checked before the run writes anything: without a key,
    wandb.init fails only after the run folder, config.yaml and metrics.jsonl exist."""
    if not wcfg.enabled or wcfg.mode != "online":
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlsplit(base_url).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for name in candidates:
        try:
            if netrc.netrc(os.path.expanduser(name)).authenticators(host):
                return None
        except (OSError, netrc.NetrcParseError):
            pass
    settings = configparser.ConfigParser()
    config_dir = os.environ.get("WANDB_CONFIG_DIR", os.path.expanduser("~/.config/wandb"))
    try:
        settings.read(os.path.join(config_dir, "settings"))
    except configparser.Error:
        pass
    if settings.get("default", "api_key", fallback=None):
        return None
    return (
        f"wandb.mode=online but no W&B API key was found (WANDB_API_KEY is unset and no netrc "
        f"entry for {host}); run `wandb login` or export WANDB_API_KEY, or set wandb.mode=auto "
        "(offline without a key; `wandb sync` later) or wandb.enabled=false"
    )


class MetricsLogger:
    """Rank-0 sink for metrics (jsonl + optional W&B). On other ranks every write is a no-op.

    Built without side effects (``Trainer.from_config``); :meth:`open` creates metrics.jsonl and the
    W&B run once the run folder is validated (open_run.py). A write before :meth:`open` raises."""

    def __init__(self, cfg: Config, *, enabled: bool, total_steps: int | None = None) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.total_steps = total_steps  # written into every record (plots need the x range)
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self._wandb = None
        self._file = None
        self.opened = False
        self.wandb_run_id: str | None = None

    def open(self, *, wandb_run_id: str | None = None) -> MetricsLogger:
        """Start appending to metrics.jsonl (and the W&B run ``wandb_run_id``, the checkpoint's; a
        fresh one when None: :attr:`wandb_run_id` then names it)."""
        self.opened, self.wandb_run_id = True, wandb_run_id
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._file = open(self.path, "a", buffering=1)
        if self.cfg.wandb.enabled:
            self._wandb = self._init_wandb(self.cfg.wandb, self.cfg)
        return self

    def _init_wandb(self, wcfg: WandbConfig, cfg: Config):
        import wandb

        mode = wcfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run = wandb.init(
            project=wcfg.project,
            entity=wcfg.entity,
            name=wcfg.name,
            tags=wcfg.tags,
            id=self.wandb_run_id,  # None on a fresh run: W&B generates one
            # "allow": a resumed run (same id, read from the checkpoint) continues the same run.
            resume="allow",
            mode=mode,
            dir=str(Path(cfg.output_dir)),
            config=cfg.model_dump(mode="json"),
        )
        self.wandb_run_id = run.id  # a fresh id on the first start; stored in checkpoints
        log.info("W&B run %s (%s mode)", run.id, mode)
        return run

    def write(self, record: dict[str, Any]) -> None:
        if not self.opened:  # on every rank: a record written too early would vanish silently
            raise RuntimeError(
                f"MetricsLogger.write({record.get('kind', 'train')!r} record) before open() or after close(): the "
                f"logger of {self.path} starts after the run folder was opened (open_run.open_run)"
            )
        if not self.enabled:
            return
        stamp: dict[str, Any] = {"time": round(time.time(), 3)}
        if self.total_steps is not None:
            stamp["total_steps"] = self.total_steps
        record = {**record, **stamp}
        # Strict JSON (a NaN loss is written as null; strict parsers reject NaN tokens).
        line = dumps_strict(record) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            if e.errno in NO_ROOM:  # disk full / file-size limit: say so, not a traceback
                raise no_room_error(self.path, len(line.encode()), e, appending=True) from None
            raise
        if self._wandb is not None:
            kind = record.get("kind", "train")
            if kind == "resume":
                return
            skip = ("kind", "step", "time", "total_steps")
            data = {f"{kind}/{k}": v for k, v in record.items() if k not in skip}
            self._wandb.log(data, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file, self._wandb, self.opened = None, None, False


def format_duration(seconds: float | None) -> str:
    """``1:02:03`` (h:mm:ss), ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """tqdm on an interactive terminal (rank 0), plain log lines otherwise. Built without side
    effects; :meth:`start` (at the resumed step) opens the bar and the ETA clock."""

    def __init__(self, *, enabled: bool, mode: bool | str, total: int) -> None:
        self.enabled, self.mode, self.total = enabled, mode, total
        self._bar = None
        self.started, self.initial, self.position = False, 0, 0

    def start(self, initial: int = 0) -> Progress:
        use_tqdm = self.mode is True or (self.mode == "auto" and sys.stderr.isatty())
        if self.enabled and use_tqdm:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=initial, dynamic_ncols=True, unit="step")
        self.initial, self.position, self.started = initial, initial, True
        self._t0 = time.perf_counter()
        return self

    def eta_s(self) -> float | None:
        """Seconds left at this process's pace so far (evaluations and checkpoints included)."""
        done = self.position - self.initial
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * (self.total - self.position)

    def update(self, n: int, fields: dict[str, Any]) -> None:
        """``n`` more steps done; ``fields`` shown (plain lines also get step/total and the ETA,
        which the tqdm bar shows itself)."""
        if not self.started:
            raise RuntimeError("Progress.update before start(): the progress display starts at the resumed step")
        if not self.enabled:
            return
        self.position += n
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self._bar is None:
            eta = self.eta_s()
            text = {"step": f"{self.position}/{self.total}", **text, "eta": format_duration(eta)}
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(text, refresh=False)
        else:
            log.info(" ".join(f"{k}={v}" for k, v in text.items()))

    def message(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
