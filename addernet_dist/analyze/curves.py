"""Learning curves (train loss, val top-1) and final accuracies side by side from run folders'
metrics.jsonl."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from addernet_dist.analyze.common import _dump, _pct, _plt, _save_figure


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Per-epoch train loss / val top-1 and the final top-1 of a trainer run folder."""
    from addernet_dist.logging_utils import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"'{path}' does not exist: is '{run_dir}' an addernet-train output_dir?"
        )
    recs = read_metrics(path)
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not evals:
        raise ValueError(f"'{path}' has no eval record; the run did not finish an epoch")
    train = [r for r in recs if r.get("kind") == "train"]
    by_epoch: dict[int, list[float]] = {}
    for r in train:
        by_epoch.setdefault(_train_epoch_index(r), []).append(float(r["loss"]))
    return {
        "title": run_title(run_dir),
        "train_epochs": sorted(by_epoch),
        "train_loss": [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)],
        "eval_epochs": [int(r["epoch"]) for r in evals],
        "top1": [float(r["top1"]) for r in evals],
        "final_top1": float(evals[-1]["top1"]),
        "best_top1": max(float(r["top1"]) for r in evals),
    }


def _train_epoch_index(rec: dict[str, Any]) -> int:
    """The 0-based epoch a train record was logged in. Records with ``total_steps`` carry epochs
    done (1.0 = the last step of the first epoch); older ones the 0-based epoch itself."""
    if "total_steps" in rec:
        return max(math.ceil(float(rec["epoch"])) - 1, 0)
    return int(rec["epoch"])


def run_title(run_dir: str | os.PathLike) -> str | None:
    """"<model> (<conv>) on <dataset>, <epochs> epochs" from the run's config.yaml (None without one)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    model, data, train = cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})
    conv = "AdderNet" if model.get("conv", "adder") == "adder" else "CNN"
    return f"{model.get('name', '?')} ({conv}) on {data.get('dataset', '?')}, {train.get('epochs', '?')} epochs"


def plot_title(runs: dict[str, dict[str, Any]]) -> str:
    """The figure title: the runs' distinct config titles (in run order), or a generic one."""
    titles = list(dict.fromkeys(s["title"] for s in runs.values() if s.get("title")))
    return " vs ".join(titles) + ": learning curves" if titles else "learning curves"


def plot_curves(runs: dict[str, dict[str, Any]], path: str) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, s in runs.items():
        a1.plot([e + 1 for e in s["train_epochs"]], s["train_loss"], marker=".", label=label)
        # Train records carry the 0-based epoch being trained, eval records the number of
        # completed epochs: both end up at "epochs done".
        a2.plot(s["eval_epochs"], [_pct(v) for v in s["top1"]], marker=".", label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss (mean over logged steps)")
    a1.set_yscale("log")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test top-1 (%)")
    a2.set_ylim(bottom=max(0.0, min(_pct(v) for s in runs.values() for v in s["top1"]) - 2))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    _save_figure(fig, path, plot_title(runs))


def _cmd_curves(args) -> None:
    runs = {}
    for item in args.run:
        label, sep, d = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {item!r}: expected LABEL=RUN_DIR")
        runs[label] = run_summary(d)
    print("| model | epochs | final test top-1 | best test top-1 |")
    print("|---|---|---|---|")
    for label, s in runs.items():
        print(
            f"| {label} | {len(s['eval_epochs'])} | {_pct(s['final_top1']):.2f}% | "
            f"{_pct(s['best_top1']):.2f}% |"
        )
    plot_curves(runs, args.out)
    _dump(args, runs)
