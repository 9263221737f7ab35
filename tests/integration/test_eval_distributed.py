"""Distributed evaluation counts every validation sample exactly once: 2 ranks == 1 process ==
an independent computation (a plain loop over the samples, top-k by sorting, the loss from
logsumexp) on the same weights, with a split size (37) divisible neither by the world size nor by
world size x batch (2 x 4), so the last batches are short and one rank gets a padded duplicate.
The model's logits vary across images (asserted): on constant logits top-1/top-5/loss depend only
on the label counts and a label shift would go unnoticed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from addernet_dist.config import load_config
from addernet_dist.data import IGNORE_LABEL, build_loader
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.metrics import evaluate, topk_correct
from addernet_dist.models import create_model
from tests.logit_checks import assert_logits_vary, set_bn_stats_from
from tests.train_helpers import DEBUG_CONFIG, launch_workers

VAL_SIZE, PER_RANK_BATCH = 37, 4


def _cfg():
    return load_config(
        DEBUG_CONFIG, [f"data.synthetic_val_size={VAL_SIZE}", "adder.backend=reference"]
    )


def _eval(dist: DistInfo) -> dict:
    cfg = _cfg()
    loader = build_loader(
        cfg.data, "val", batch_size=PER_RANK_BATCH, rank=dist.rank,
        world_size=dist.world_size, seed=0, device="cpu",
    )  # fmt: skip
    return evaluate(_model(cfg), loader, dist).__dict__


def _model(cfg):
    """resnet8 whose eval-mode logits vary across images and predict several classes: BN running
    statistics = exact statistics of a train batch (one train forward with momentum 0.1 leaves
    every feature at 0 after the ReLUs), fc.bias scaled by 0.05 (at init it alone picks the top-1; zeroed, an image
    with all-zero features ties all classes)."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    images, _ = next(iter(build_loader(cfg.data, "train", batch_size=64, seed=0, device="cpu")))
    with torch.no_grad():
        set_bn_stats_from(model, images)
        model.fc.bias.mul_(0.05)
    return model


def _independent(cfg) -> dict:
    """The split's metrics without metrics.evaluate or the loader: one image at a time in sample
    order, the label's rank among the logits by sorting, the loss as logsumexp - logit[label]."""
    ds = build_loader(cfg.data, "val", batch_size=1, seed=0, device="cpu").dataset
    model = _model(cfg)
    top1 = top5 = 0
    loss = 0.0
    logits_all = []
    with torch.no_grad():
        for i in range(len(ds)):
            logits = model(ds.images(torch.tensor([i])))[0].double()
            label = int(ds.labels[i])
            order = sorted(range(len(logits)), key=lambda c: -float(logits[c]))
            top1 += order[0] == label
            top5 += label in order[:5]
            loss += float(torch.logsumexp(logits, 0) - logits[label])
            logits_all.append(logits)
    stacked = torch.stack(logits_all)
    assert_logits_vary(stacked, min_distinct_top1=3)
    # No near-ties around ranks 1..6: batched fp32 differs from this by ~5e-6, so the top-k
    # counts must agree exactly (a tie would make them depend on topk's tie-breaking).
    gaps = stacked.sort(1, descending=True).values[:, :6].diff(dim=1).abs()
    assert gaps.min() > 1e-4, gaps.min()
    n = len(ds)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "count": n}


def _worker(out: str) -> None:
    dist = init_distributed("cpu")
    try:
        res = _eval(dist)
        if dist.rank == 0:
            Path(out, "two_ranks.json").write_text(json.dumps(res))
    finally:
        destroy_distributed(dist)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_on_uneven_split(tmp_path):
    launch_workers(__name__, [str(tmp_path)], nproc=2)
    two = json.loads((tmp_path / "two_ranks.json").read_text())
    one = _eval(DistInfo())
    want = _independent(_cfg())
    assert one["count"] == two["count"] == want["count"] == VAL_SIZE
    assert (one["top1"], one["top5"]) == (want["top1"], want["top5"])  # exact counts
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]  # exact
    assert one["loss"] == pytest.approx(want["loss"], rel=1e-5)  # fp32 batched vs fp64 per image
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)  # fp32 sums in another order
    assert 0 < one["top1"] < one["top5"] < 100


@pytest.mark.timeout(60)
def test_single_process_evaluate_matches_a_plain_loop():
    """Cheap (no second process): catches a label/logit misalignment in evaluate() in CI's fast
    path too; batch 4 over 37 samples leaves a short last batch."""
    cfg = _cfg()
    got = evaluate(
        _model(cfg), build_loader(cfg.data, "val", batch_size=PER_RANK_BATCH, seed=0, device="cpu"),
        DistInfo(),
    ).__dict__  # fmt: skip
    want = _independent(cfg)
    assert (got["top1"], got["top5"], got["count"]) == (want["top1"], want["top5"], want["count"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.timeout(30)
def test_topk_correct_ignores_padding_and_caps_k():
    logits = torch.tensor(
        [[5.0, 4.0, 3.0], [1.0, 2.0, 3.0], [0.0, 9.0, 1.0], [3.0, 2.0, 1.0]]
    )  # top order per row: [0,1,2], [2,1,0], [1,2,0], [0,1,2]
    labels = torch.tensor([0, 1, 0, IGNORE_LABEL])
    # top-1: row 0 only; top-2: rows 0 and 1; top-5 capped at 3 classes: rows 0, 1, 2
    assert topk_correct(logits, labels, (1, 2, 5)).tolist() == [1, 2, 3]


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.timeout(120)
def test_addernet_eval_cli_matches_in_process_eval(tmp_path, capsys, monkeypatch):
    from addernet_dist import checkpoint
    from addernet_dist.evaluate import main
    from addernet_dist.ops import dispatch

    cfg = load_config(
        DEBUG_CONFIG, [f"data.synthetic_val_size={VAL_SIZE}", "adder.backend=reference"]
    )
    model = _model(cfg)  # logits that vary across images: the CLI must load the BN statistics too
    path = tmp_path / "best.pt"
    # the layout addernet-train writes: engine state + the resolved config in the client state
    checkpoint.save_file(
        {
            "engine": {"model": model.state_dict()},
            "client": {"config": cfg.model_dump(mode="json")},
        },
        path,
    )
    loader = build_loader(cfg.data, "val", batch_size=8, seed=0, device="cpu")
    with torch.no_grad():
        assert_logits_vary(model.eval()(torch.cat([x for x, _ in loader])), min_distinct_top1=3)
    # the CLI evaluates as the trainer does: train.precision (default bf16) is bf16 autocast, on CPU too,
    # with the config's backend (under autocast the bf16 classifier input turns a 1e-6 backend
    # difference into ~1e-5 of the loss, so the same backend, not just an equivalent one)
    assert cfg.train.precision == "bf16"
    monkeypatch.setattr(dispatch, "_default", None)
    dispatch.set_default_backend(cfg.adder.backend)
    expected = evaluate(model, loader, DistInfo(), autocast_dtype=torch.bfloat16)
    # no --config: the checkpoint's config is used; overrides still apply on top
    assert main(["--checkpoint", str(path), "train.global_batch_size=8"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["count"] == VAL_SIZE
    assert (out["top1"], out["top5"]) == (expected.top1, expected.top5)
    assert out["loss"] == pytest.approx(expected.loss, rel=1e-6)
    # a damaged checkpoint is a clear error, not a traceback
    path.write_bytes(path.read_bytes()[:-5])
    assert main(["--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "truncated" in err and "Traceback" not in err


@pytest.mark.timeout(120)
def test_addernet_eval_builds_only_the_val_loader(tmp_path, capsys, monkeypatch):
    # On ImageNet a train loader scans 1.28M files; evaluation must not build one it discards.
    from addernet_dist import build, checkpoint
    from addernet_dist.evaluate import main

    cfg = load_config(DEBUG_CONFIG, ["adder.backend=reference", "train.global_batch_size=8"])
    torch.manual_seed(0)
    path = tmp_path / "best.pt"
    checkpoint.save_file(
        {
            "engine": {"model": create_model("resnet8", num_classes=10).state_dict()},
            "client": {"config": cfg.model_dump(mode="json")},
        },
        path,
    )
    splits = []
    real = build.build_loader

    def recording(data_cfg, split, **kw):
        splits.append(split)
        return real(data_cfg, split, **kw)

    monkeypatch.setattr(build, "build_loader", recording)
    assert main(["--checkpoint", str(path)]) == 0
    assert splits == ["val"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 100
