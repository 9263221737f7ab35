"""What one rank sees, every rank acts on (2 gloo ranks, one launch for the module):

- the non-finite guard stops every rank when only one rank's loss went non-finite, and when only
  one rank's BN buffer did (its all-reduce takes the MAX of the streaks and bad-tensor counts: MIN
  would let the healthy rank's zeros win and the run would save the bad model);
- an evaluation without BN recalibration first broadcasts rank 0's BN buffers (each rank's running
  statistics drift apart with its own batches): every rank evaluates, and the checkpoint holds,
  the statistics one process with rank 0's model evaluates with.

The single-process guard paths are in tests/integration/test_runfolder.py (divergence) and
tests/integration/test_saved_models.py (a NaN running_var is never saved).
"""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch import nn

from addernet_dist.config import load_config
from addernet_dist.data import build_loader
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.evaluator import BNRecalibrator, Evaluator
from addernet_dist.guard import DivergedError, NonFiniteGuard
from addernet_dist.metrics import evaluate
from addernet_dist.models import create_model
from tests.logit_checks import assert_logits_vary, set_bn_stats_from
from tests.train_helpers import DEBUG_CONFIG, launch_workers

VAL_SIZE, PER_RANK_BATCH = 37, 4  # uneven: rank 1 gets a padded duplicate


def _cfg():
    return load_config(DEBUG_CONFIG, [f"data.synthetic_val_size={VAL_SIZE}", "adder.backend=reference"])


def _model(cfg, rank: int) -> nn.Module:
    """resnet8 with eval-mode logits that vary across images; its BN running statistics come from
    train batch ``rank`` (a different batch per rank, as after each rank's last training forward)."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    loader = build_loader(cfg.data, "train", batch_size=32, seed=0, device="cpu")
    images = next(islice(iter(loader), rank, None))[0]
    with torch.no_grad():
        set_bn_stats_from(model, images)
        model.fc.bias.mul_(0.05)
    return model


def _guard_outcome(dist: DistInfo, guard: NonFiniteGuard, step: int, model=None) -> dict:
    try:
        finite = guard.check(dist, step, model, before="checkpoint" if model is not None else "")
        return {"raised": False, "finite": finite}
    except DivergedError as e:
        return {"raised": True, "message": str(e)}


def _worker(out: str) -> None:
    dist = init_distributed("cpu")
    res: dict = {}
    try:
        # 1. only rank 1's loss is non-finite (limit 2): after one such step no rank may
        # checkpoint (check returns False everywhere); after the second every rank stops.
        guard = NonFiniteGuard(limit=2, device=dist.device)
        bad = torch.tensor(float("nan") if dist.rank == 1 else 1.5)
        guard.update(bad, [torch.tensor(0.3)])
        res["loss_step1"] = _guard_outcome(dist, guard, 1)
        guard.update(bad, [torch.tensor(0.3)])
        res["loss_step2"] = _guard_outcome(dist, guard, 2)

        # 2. finite losses everywhere, only rank 1's BN running_var holds a NaN.
        guard = NonFiniteGuard(limit=3, device=dist.device)
        guard.update(torch.tensor(1.0), [])
        net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        if dist.rank == 1:
            net[1].running_var[1] = float("nan")
        res["buffer"] = _guard_outcome(dist, guard, 7, net)

        # 3. evaluation at the final p without recalibration: rank 0's BN buffers everywhere.
        cfg = _cfg()
        model = _model(cfg, dist.rank)

        def no_loader():
            raise AssertionError("no recalibration at p = final p: its loader must not be built")

        val = build_loader(
            cfg.data, "val", batch_size=PER_RANK_BATCH, rank=dist.rank,
            world_size=dist.world_size, seed=0, device="cpu",
        )  # fmt: skip
        evaluator = Evaluator(val, dist, BNRecalibrator(3, no_loader), final_p=1.0, autocast_dtype=None)
        result, extra = evaluator(model, epoch=1, p=1.0)
        buffers = {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}
        res["eval"] = {"result": result.__dict__, "extra": extra, "buffers": buffers}
        Path(out, f"rank{dist.rank}.json").write_text(json.dumps(res))
    finally:
        destroy_distributed(dist)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    launch_workers(__name__, [str(out)], nproc=2, timeout=200)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_ranks_nonfinite_loss_stops_every_rank(ranks):
    for r, res in enumerate(ranks):
        # after the first non-finite step on rank 1: no rank writes a checkpoint of that step
        assert res["loss_step1"] == {"raised": False, "finite": False}, r
        assert res["loss_step2"]["raised"], r
        assert "non-finite for 2 consecutive steps (since step 1)" in res["loss_step2"]["message"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_ranks_nonfinite_bn_buffer_stops_every_rank(ranks):
    for r, res in enumerate(ranks):
        assert res["buffer"]["raised"], (r, res["buffer"])
        msg = res["buffer"]["message"]
        assert "the loss was finite but the model holds non-finite values" in msg
        assert "1 parameter/buffer tensors are non-finite" in msg and "before the checkpoint" in msg


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_evaluation_without_recalibration_uses_rank0_bn_buffers_everywhere(ranks):
    cfg = _cfg()
    rank0, rank1 = _model(cfg, 0), _model(cfg, 1)
    own = {k: v.tolist() for k, v in rank1.state_dict().items() if "running" in k}
    want = {k: v.tolist() for k, v in rank0.state_dict().items() if "running" in k}
    assert own != want  # the ranks' statistics really differ before the evaluation
    e0, e1 = ranks[0]["eval"], ranks[1]["eval"]
    assert e0["extra"] == e1["extra"] == {}  # no recalibration ran
    assert e1["buffers"] == e0["buffers"] == want  # exact: broadcast copies
    # the 2-rank result is one process's evaluation of rank 0's model
    val = build_loader(cfg.data, "val", batch_size=PER_RANK_BATCH, seed=0, device="cpu")
    with torch.no_grad():
        assert_logits_vary(torch.cat([rank0.eval()(x) for x, _ in val]), min_distinct_top1=3)
    one = evaluate(rank0, val, DistInfo()).__dict__
    two = e0["result"]
    assert two == e1["result"]
    assert (two["top1"], two["top5"], two["count"]) == (one["top1"], one["top5"], VAL_SIZE)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)  # fp32 sums in another order
    # rank 1's own statistics give another evaluation: the comparison above can tell them apart
    other = evaluate(rank1, val, DistInfo()).__dict__
    assert other["loss"] != pytest.approx(one["loss"], rel=1e-3)


if __name__ == "__main__":
    _worker(sys.argv[1])
