"""Which models a run saves: best.pt is the best final-p evaluation (the maximum, not the latest
improvement over the previous one), and a model whose BN buffers went non-finite is never saved,
however finite its loss, gradients and weights are. Both are debug-config runs in this process
(6 steps per epoch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from addernet_dist import checkpoint
from addernet_dist.logging_utils import read_metrics
from tests.train_helpers import DEBUG_CONFIG, FAST

# 96 training images, global batch 16: 6 steps per epoch; p fixed at 1, so every evaluation is a
# best.pt candidate (the final-p rule itself is tests/integration/test_bn_recalibration.py's).
SMALL = ["data.synthetic_train_size=96", "data.synthetic_val_size=20", "adder.p_schedule=false"]


def _main(capsys, out: Path, overrides: list[str]) -> tuple[int, str]:
    from addernet_dist.train import main

    capsys.readouterr()
    rc = main(["--config", str(DEBUG_CONFIG), *FAST, f"output_dir={out}", *SMALL, *overrides])
    return rc, capsys.readouterr().err


def _client(path: Path) -> dict:
    return checkpoint.load_file(path)["client"]


@pytest.mark.timeout(200)
def test_best_pt_is_the_maximum_of_the_final_p_evaluations(tmp_path, capsys, monkeypatch):
    # Real evaluations with their top-1 replaced by a scripted sequence: 50, 30, 40. The third
    # beats the second but not the first, so a best that follows the latest evaluation (instead
    # of the maximum) would replace best.pt by epoch 3's model.
    from addernet_dist import evaluator, metrics

    scripted = iter([50.0, 30.0, 40.0])
    real = metrics.evaluate

    def scripted_evaluate(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), top1=next(scripted))

    monkeypatch.setattr(metrics, "evaluate", scripted_evaluate)
    monkeypatch.setattr(evaluator, "evaluate", scripted_evaluate, raising=False)
    out = tmp_path / "run"
    rc, err = _main(capsys, out, ["train.epochs=3", "train.ckpt_every_steps=0"])
    assert rc == 0, err[-4000:]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [(e["epoch"], e["top1"]) for e in evals] == [(1, 50.0), (2, 30.0), (3, 40.0)]
    best_step = evals[0]["step"]
    ck = out / "checkpoints"
    best = _client(ck / "best.pt")
    # best.pt is epoch 1's checkpoint: its step, its evaluation, its weights
    assert best["train_state"]["global_step"] == best_step
    assert best["last_eval"]["val/top1"] == 50.0
    want = checkpoint.load_file(ck / f"step_{best_step:09d}.pt")["engine"]["model"]
    got = checkpoint.load_file(ck / "best.pt")["engine"]["model"]
    assert all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))
    # the best recorded in every later checkpoint is still the maximum (best.pt's own record is
    # not asserted: whether it is written before or after the best is recorded is not the point)
    for e in evals[1:]:
        assert _client(ck / f"step_{e['step']:09d}.pt")["train_state"]["best_top1"] == 50.0


@pytest.mark.timeout(200)
def test_a_nan_bn_running_var_is_never_saved(tmp_path, capsys, monkeypatch):
    # A forward pre-hook puts a NaN into the first BN's running_var in the forward of step 3. The
    # training forward normalises with the batch statistics, so the loss, the gradients and every
    # weight stay finite: only the buffer check can stop the step-4 checkpoint.
    from addernet_dist import build

    build_model = build.build_model
    calls = {"n": 0}

    def poison(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                module.running_var[0] = float("nan")

    def build_with_fault(cfg, num_classes):
        model = build_model(cfg, num_classes)
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.register_forward_pre_hook(poison)
        return model

    monkeypatch.setattr(build, "build_model", build_with_fault)
    out = tmp_path / "run"
    rc, err = _main(capsys, out, ["train.epochs=1", "train.ckpt_every_steps=2", "train.log_every=1"])
    assert calls["n"] >= 3
    assert rc == 1, err[-4000:]
    assert "training diverged at step 4" in err
    # nothing ran the model before step 1: a reference-backend run has no Triton tiles to tune (the
    # tuning step is a training forward, which counted as step 1 here and moved the NaN to step 2)
    assert "kernel tiles" not in err
    assert "the loss was finite but the model holds non-finite values" in err
    assert "before the checkpoint" in err
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # only step 2 (before the NaN) was saved; no best.pt (no evaluation ran)
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000000002.pt"]
    model = checkpoint.load_file(ck / "step_000000002.pt")["engine"]["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if torch.is_tensor(v) and v.is_floating_point())
