"""BN recalibration (metrics.recalibrate_bn, train.bn_recalibration_batches): the statistics it
computes, their average over ranks, and the trainer's use of them before mid-decay evaluations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.checkpoint import load_file
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.metrics import recalibrate_bn
from tests.logit_checks import assert_logits_vary, checkpoint_val_logits
from tests.train_helpers import check, launch_workers, run_python, train_cmd


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
    )


def _batches(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 9, 9, generator=g) * 2 + 1, torch.zeros(6)) for _ in range(n)]


def _expected_stats(model: nn.Sequential, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cumulative average of per-batch mean and unbiased variance, written out by hand: BN2's input
    is computed with BN1 normalising by its batch statistics, as in train mode."""
    conv1, bn1, _, conv2, bn2 = model
    s1, s2 = [], []
    with torch.no_grad():
        for x, _ in batches:
            h = conv1(x)
            s1.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
            h = F.relu(F.batch_norm(h, None, None, bn1.weight, bn1.bias, training=True))
            h = conv2(h)
            s2.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
    return [
        (torch.stack([m for m, _ in s]).mean(0), torch.stack([v for _, v in s]).mean(0))
        for s in (s1, s2)
    ]


@pytest.mark.timeout(60)
def test_statistics_are_the_cumulative_average_over_the_batches():
    model = _model()
    model[1].momentum = 0.3
    model.eval()
    batches = _batches(1)
    want = _expected_stats(model, batches)
    used = recalibrate_bn(model, iter(batches + _batches(2)), DistInfo(), num_batches=3)
    assert used == 3
    for bn, (mean, var) in zip((model[1], model[4]), want):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    # the BN settings and the mode are restored
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1 and not model.training


def _worker(out: str) -> None:
    dist = init_distributed("cpu")
    try:
        model = _model()
        recalibrate_bn(model, _batches(10 + dist.rank), dist, num_batches=3)
        stats = {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}
        Path(out, f"rank{dist.rank}.json").write_text(json.dumps(stats))
    finally:
        destroy_distributed(dist)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_average_their_statistics(tmp_path):
    launch_workers(__name__, [str(tmp_path)], nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with the same statistics
    singles = []
    for r in range(2):
        model = _model()
        recalibrate_bn(model, _batches(10 + r), DistInfo(), num_batches=3)
        singles.append(model.state_dict())
    for k, got in ranks[0].items():
        want = (singles[0][k] + singles[1][k]) / 2
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_recalibrates_before_mid_decay_evaluations_and_saves_what_it_evaluated(tmp_path):
    # p decays over 1.5 of 2 epochs: the epoch-1 evaluation runs at p ≈ 1.33 (recalibrated), the
    # epoch-2 one at p = 1 (not). addernet-eval of the epoch-1 checkpoint, which has no
    # recalibration of its own, must reproduce the logged evaluation exactly: the statistics that
    # were evaluated are the ones saved.
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        # 4 steps per epoch (global batch 16), 40 val images: a third of the debug config's
        # fractional-p steps (~14x the CPU time of p = 1 each); still 4 batches for 3 recalibrations
        "data.synthetic_train_size=64",
        "data.synthetic_val_size=40",
        "adder.p_decay_epochs=1.5",
        "train.bn_recalibration_batches=3",
        "train.ckpt_every_steps=0",
        "train.precision=fp32",  # fp32: the recalibration is redone below in this process in fp32
    ]
    check(run_python(train_cmd(overrides), timeout=280))
    evals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"kind": "eval"' in line
    ]
    assert [e["epoch"] for e in evals] == [1, 2]
    assert evals[0]["bn_recalibration_batches"] == 3 and 1.0 < evals[0]["p"] < 2.0
    assert "bn_recalibration_batches" not in evals[1]
    # best.pt only holds a model at the p the run ends with: the mid-decay evaluation was not a
    # candidate (best top-1 still unset in the epoch-1 checkpoint), epoch 2's is best.pt
    ckpt = out / "checkpoints" / f"step_{evals[0]['step']:09d}.pt"
    first = load_file(ckpt)["client"]["train_state"]
    assert first["best_top1"] == -1.0
    best = load_file(out / "checkpoints" / "best.pt")["engine"]["model"]
    last = load_file(out / "checkpoints" / f"step_{evals[1]['step']:09d}.pt")["engine"]["model"]
    assert all(torch.equal(best[k], last[k]) for k in best if isinstance(best[k], torch.Tensor))
    # The statistics saved (and evaluated) ARE a recalibration at the saved weights and p: redo it
    # here from the checkpoint with the trainer's recalibration batches (recalibrate_bn resets the
    # statistics first, so the result does not depend on the ones loaded). A trainer that skipped
    # it (still logging that it ran) saves momentum-averaged training statistics instead.
    from addernet_dist.build import build_model, recalibrate_bn
    from addernet_dist.config import load_config
    from addernet_dist.ops import dispatch

    cfg = load_config(out / "config.yaml")
    dispatch.set_default_backend(cfg.adder.backend)
    saved = load_file(ckpt)["engine"]["model"]
    model = build_model(cfg, 10)
    model.load_state_dict(saved)
    assert recalibrate_bn(cfg, DistInfo(), model, evals[0]["epoch"], None) == 3
    redone = model.state_dict()
    keys = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert len(keys) == 2 * 9  # the stem BN and 8 adder layers' BNs
    for k in keys:
        torch.testing.assert_close(saved[k], redone[k], rtol=1e-4, atol=1e-5, msg=k)
    # the two evaluations compared below see logits that depend on the image (tests/logit_checks.py)
    assert_logits_vary(checkpoint_val_logits(ckpt), min_distinct_top1=1)
    proc = check(
        run_python(["-m", "addernet_dist.evaluate", "--checkpoint", str(ckpt)], timeout=120)
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["top1"] == evals[0]["top1"] and got["count"] == evals[0]["count"]
    assert got["loss"] == pytest.approx(evals[0]["loss"], rel=1e-6)


if __name__ == "__main__":
    _worker(sys.argv[1])
