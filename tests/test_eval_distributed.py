"""Distributed evaluation counts every validation sample exactly once: 2 ranks == 1 process on
the same weights, with a split size (37) divisible neither by the world size nor by
world size x batch (2 x 4), so the last batches are short and one rank gets a padded duplicate."""

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
from tests.train_helpers import DEBUG_CONFIG, launch_workers

VAL_SIZE, PER_RANK_BATCH = 37, 4


def _eval(dist: DistInfo) -> dict:
    cfg = load_config(
        DEBUG_CONFIG, [f"data.synthetic_val_size={VAL_SIZE}", "adder.backend=reference"]
    )
    loader = build_loader(
        cfg.data, "val", batch_size=PER_RANK_BATCH, rank=dist.rank,
        world_size=dist.world_size, seed=0, device="cpu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    # Give BN running stats from data so the random-init logits are spread (top-1 well off 0%).
    with torch.no_grad():
        for images, _ in build_loader(cfg.data, "train", batch_size=64, seed=0, device="cpu"):
            model.train()(images)
            break
    return evaluate(model, loader, dist).__dict__


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
    launch_workers("tests.test_eval_distributed", [str(tmp_path)], nproc=2)
    two = json.loads((tmp_path / "two_ranks.json").read_text())
    one = _eval(DistInfo())
    assert one["count"] == two["count"] == VAL_SIZE
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]  # exact
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)  # fp32 sums in another order
    assert 0 < one["top1"] < one["top5"] <= 100


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
def test_addernet_eval_cli_matches_in_process_eval(tmp_path, capsys):
    from addernet_dist import checkpoint
    from addernet_dist.evaluate import main

    cfg = load_config(
        DEBUG_CONFIG, [f"data.synthetic_val_size={VAL_SIZE}", "adder.backend=reference"]
    )
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
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
    # the CLI evaluates as the trainer does: train.bf16 (default true) is bf16 autocast, on CPU too
    assert cfg.train.bf16
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
