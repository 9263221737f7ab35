"""train.sync_bn: BN layers become SyncBatchNorm2d, whose 2-rank (gloo) statistics, outputs and
gradients equal one process's over the full batch; with it, and only with it, a DDP step on 2 ranks
x batch B in TRAIN mode equals 1 rank x batch 2B (the README's world-size claim)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from addernet_dist.config import ConfigError, load_config
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.models import create_model
from addernet_dist.nn import set_p
from addernet_dist.ops.amp import FP32BatchNorm2d
from addernet_dist.sync_bn import SyncBatchNorm2d, convert_sync_bn
from tests.train_helpers import DEBUG_CONFIG, launch_workers

GLOBAL_BATCH = 12


def _bn_data():
    g = torch.Generator().manual_seed(7)
    # adder-like: large offset, small spread (-4000 +- 37), per channel
    x = -4000.0 + 37.0 * torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=g, dtype=torch.float64)
    r = torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=g, dtype=torch.float64)
    return x, r


def _bn_pass(rank: int, world: int) -> dict:
    """One training-mode forward/backward of a SyncBatchNorm2d on this rank's slice."""
    torch.manual_seed(0)
    bn = SyncBatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x, r = _bn_data()
    per = GLOBAL_BATCH // world
    xs = x[rank * per : (rank + 1) * per].clone().requires_grad_(True)
    y = bn.train()(xs)
    (y * r[rank * per : (rank + 1) * per]).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": xs.grad,
        "w_grad": bn.weight.grad,
        "b_grad": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def _train_step_state(sync_bn: bool, dist: DistInfo) -> dict[str, torch.Tensor]:
    """Weights and BN buffers after 2 DDP steps in TRAIN mode on this rank's slice (fp64)."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).double()
    set_p(model, 2.0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(10, (GLOBAL_BATCH,), generator=g)
    cfg = load_config(
        DEBUG_CONFIG, ["adder.backend=reference", "train.precision=fp32", f"train.sync_bn={sync_bn}"]
    )
    engine = DDPEngine(model, cfg, dist, steps_per_epoch=12)
    engine.train()
    per = GLOBAL_BATCH // dist.world_size
    sl = slice(dist.rank * per, (dist.rank + 1) * per)
    for _ in range(2):
        engine.forward_backward(x[sl], y[sl])
        engine.step()
    state = engine.unwrap().state_dict()
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _worker(out: str) -> None:
    dist = init_distributed("cpu")
    try:
        res = {"bn": _bn_pass(dist.rank, dist.world_size)}
        res["train"] = {s: _train_step_state(s, dist) for s in (True, False)}
        torch.save(res, Path(out) / f"rank{dist.rank}.pt")
    finally:
        destroy_distributed(dist)


@pytest.mark.timeout(60)
def test_sync_bn_converts_every_batchnorm_and_is_refused_with_forced_fusion():
    model = create_model("resnet8", num_classes=10)
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    keys = list(model.state_dict())
    assert convert_sync_bn(model) == n_bn > 0
    assert all(type(m) is SyncBatchNorm2d for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert list(model.state_dict()) == keys
    cfg = load_config(DEBUG_CONFIG, ["adder.backend=reference", "train.device=cpu", "train.sync_bn=true"])
    engine = DDPEngine(create_model("resnet8", num_classes=10), cfg, DistInfo(), steps_per_epoch=4)
    assert engine.sync_bn_layers == n_bn and engine.fused_adder_bn == 0
    with pytest.raises(ConfigError, match="train.sync_bn=true with adder.fuse_bn=true"):
        load_config(DEBUG_CONFIG, ["train.sync_bn=true", "adder.fuse_bn=true"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_rank_sync_bn_equals_one_process_over_the_full_batch(tmp_path):
    launch_workers(__name__, [str(tmp_path)], nproc=2, timeout=360)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = _bn_pass(0, 1)
    # the layer: outputs and input gradients are the full batch's halves; the parameter gradients
    # sum (DDP averages them, as it averages the per-rank losses); running statistics of the full batch
    for key in ("y", "x_grad"):
        torch.testing.assert_close(torch.cat([r["bn"][key] for r in ranks]), one[key], rtol=1e-10, atol=1e-9)
    for key in ("w_grad", "b_grad"):
        torch.testing.assert_close(ranks[0]["bn"][key] + ranks[1]["bn"][key], one[key], rtol=1e-10, atol=1e-9)
    for key in ("running_mean", "running_var"):
        for r in ranks:
            torch.testing.assert_close(r["bn"][key], one[key], rtol=1e-12, atol=1e-9)
    assert abs(float(one["running_mean"].mean()) + 400.0) < 5.0  # 0.1 * -4000: not a vacuous comparison

    # the trainer's DDP engine in train mode: 2 ranks x 6 == 1 rank x 12 with sync_bn, not without
    ref = _train_step_state(True, DistInfo())
    plain_ref = _train_step_state(False, DistInfo())
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(ranks[0]["train"][True][k], v, rtol=1e-9, atol=1e-9, msg=k)
            torch.testing.assert_close(plain_ref[k], v)  # one process: sync_bn changes nothing
    diffs = [
        (ranks[0]["train"][False][k] - ref[k]).abs().max().item()
        for k in ref
        if k.endswith("running_mean") or k.endswith("running_var")
    ]
    assert max(diffs) > 1e-3, diffs


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.parametrize("cls", [FP32BatchNorm2d, SyncBatchNorm2d])
def test_bn_with_bf16_affine_parameters_normalises_in_fp32(cls):
    """DeepSpeed's bf16 weights: FP32BatchNorm2d and (on one process) SyncBatchNorm2d upcast the bf16
    weight and bias, so an adder-like fp32 input (-4000 +- 37) gets the output and fp32 running
    statistics of an fp32 BatchNorm2d with the same affine values, to the bit, in train and eval mode."""
    import copy

    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():  # bf16-representable values: the upcast is exact
        ref.weight.copy_(torch.tensor([0.5, 1.25, -2.0]))
        ref.bias.copy_(torch.tensor([0.125, -0.375, 3.0]))
    bn = copy.deepcopy(ref)
    bn.__class__ = cls
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    g = torch.Generator().manual_seed(3)
    for train in (True, True, False):
        ref.train(train), bn.train(train)
        x = -4000.0 + 37.0 * torch.randn(4, 3, 5, 5, generator=g)
        y = bn(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    for name in ("running_mean", "running_var"):
        assert getattr(bn, name).dtype == torch.float32
        torch.testing.assert_close(getattr(bn, name), getattr(ref, name), rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2
