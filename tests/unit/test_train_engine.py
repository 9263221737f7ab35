"""DDP engine options on one process: gradient clipping after eq. 33, channels_last, the Table 4
ablation switches (sign gradient, grad_x mode, no lp schedule, no adaptive LR)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from addernet_dist.build import build_model
from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.models import create_model
from addernet_dist.nn import adder_modules
from tests.helpers import CPU_REFERENCE, PLAIN_SGD, cpu_engine
from tests.train_helpers import DEBUG_CONFIG

_engine = functools.partial(cpu_engine, [*PLAIN_SGD, *CPU_REFERENCE])


def _step(engine: DDPEngine, model: torch.nn.Module):
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    engine.forward_backward(x, y)
    stats = engine.step()
    deltas = [p.detach() - b for p, b in zip(model.parameters(), before)]
    return stats, deltas


@pytest.mark.timeout(60)
def test_grad_clip_bounds_the_update_after_adaptive_scaling():
    engine, model = _engine(["train.grad_clip=1.0"])
    stats, deltas = _step(engine, model)
    # eq. 33 makes each adder layer's gradient norm eta * sqrt(k); clipping sees those norms
    adder_sq = sum(0.01 * m.weight.numel() for m in adder_modules(model))
    assert stats.grad_norm.item() ** 2 >= adder_sq * (1 - 1e-5)
    # plain SGD with lr 1: the update IS the clipped gradient, whose total norm is the clip value
    total = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
    assert total == pytest.approx(1.0, rel=1e-4)
    assert all(g is None for g in (p.grad for p in model.parameters()))  # zeroed for next step


@pytest.mark.timeout(60)
def test_without_adaptive_lr_the_raw_gradient_is_applied():
    engine, model = _engine(["adder.adaptive_lr=false"])
    stats, deltas = _step(engine, model)
    assert stats.adder_alphas is None
    on, model_on = _engine([])
    stats_on, deltas_on = _step(on, model_on)
    names = [n for n, _ in model.named_parameters()]
    adder_names = {f"{n}.weight" for n, m in model.named_modules() if m in adder_modules(model)}
    for n, d, d_on in zip(names, deltas, deltas_on):
        if n in adder_names:
            assert not torch.allclose(d, d_on)  # eq. 33 changed the adder update
        else:
            torch.testing.assert_close(d, d_on)  # and nothing else


@pytest.mark.timeout(60)
def test_channels_last_engine_trains():
    engine, model = _engine(["train.channels_last=true"])
    conv = model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    _, deltas = _step(engine, model)
    assert all(torch.isfinite(d).all() for d in deltas)


@pytest.mark.timeout(60)
def test_ablation_switches_reach_every_adder_layer():
    cfg = load_config(DEBUG_CONFIG, ["adder.full_precision_grad=false", "adder.grad_x=hardtanh"])
    model = build_model(cfg, num_classes=10)
    layers = adder_modules(model)
    assert len(layers) == 8
    assert {(m.grad_w, m.grad_x) for m in layers} == {("sign", "hardtanh")}
    default = build_model(load_config(DEBUG_CONFIG), num_classes=10)
    assert {(m.grad_w, m.grad_x) for m in adder_modules(default)} == {("full", "lp")}
    # conv twin: no adder layers, and the adder options are simply not applicable
    cnn = build_model(load_config(DEBUG_CONFIG, ["model.conv=conv"]), num_classes=10)
    assert adder_modules(cnn) == [] and isinstance(cnn, type(create_model("resnet8", conv="conv")))


@pytest.mark.timeout(60)
def test_resume_keeps_position_but_takes_schedule_shape_from_new_config():
    engine, model = _engine(["optim.schedule=cosine", "train.epochs=2"])
    for _ in range(3):
        _step(engine, model)
    saved = engine.state_dict()
    longer, _ = _engine(["optim.schedule=cosine", "train.epochs=4"])
    longer.load_state_dict(saved)
    fn = longer.lr_scheduler.lr_lambdas[0]
    assert fn.total_steps == 16 and longer.lr_scheduler.last_epoch == 3
    assert engine.lr_scheduler.lr_lambdas[0].total_steps == 8  # the source is untouched
    _step(longer, longer.unwrap())
    assert longer.lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 16)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_autocast_step_on_cpu(bf16):
    """train.precision=bf16 means bf16 autocast on CPU too: the classifier runs in bf16, every adder layer returns
    fp32 (the dtype policy), BN buffers and master weights stay fp32; the Engine declares its
    autocast dtype and how many Adder+BN pairs it fused."""
    cfg = load_config(DEBUG_CONFIG, [*PLAIN_SGD, f"train.precision={'bf16' if bf16 else 'fp32'}", "train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10)
    engine = DDPEngine(model, cfg, DistInfo(device=torch.device("cpu")), steps_per_epoch=4)
    assert engine.autocast_dtype == (torch.bfloat16 if bf16 else None)
    assert engine.fused_adder_bn == 0  # auto: the cpu backend has no fused kernels
    seen = {}
    model.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", o.dtype))
    adders = adder_modules(model)
    adders[0].register_forward_hook(lambda m, i, o: seen.__setitem__("adder_in", i[0].dtype))
    adders[0].register_forward_hook(lambda m, i, o: seen.__setitem__("adder_out", o.dtype))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    loss = engine.forward_backward(x, y)
    stats = engine.step()
    low = torch.bfloat16 if bf16 else torch.float32
    assert seen == {"fc": low, "adder_in": low, "adder_out": torch.float32}, seen
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.conv1.weight.dtype == model.bn1.running_mean.dtype == torch.float32
    assert torch.isfinite(stats.adder_alphas).all()


def test_prepare_model_builds_what_both_engines_share():
    """engine/prepare.py, the one preparation of both engines: fusion forced on (adder.fuse_bn=true)
    fuses every Adder+BN pair, train.sync_bn converts every BN layer instead; DeepSpeed's bf16
    weights mean bf16 autocast whatever train.precision, and fp32 BatchNorm; fp16 adds the GradScaler;
    the optimizer holds every parameter of the prepared module; the LR schedule spans epochs x steps."""
    from addernet_dist.engine.prepare import prepare_model
    from addernet_dist.models.fusion import FusedAdderBN2d
    from addernet_dist.ops.amp import FP32BatchNorm2d
    from addernet_dist.sync_bn import SyncBatchNorm2d

    cpu = torch.device("cpu")

    def prep(*overrides, bf16_weights=False):
        cfg = load_config(DEBUG_CONFIG, [*PLAIN_SGD, *CPU_REFERENCE, "adder.fuse_bn=true", *overrides])
        torch.manual_seed(0)
        return prepare_model(build_model(cfg, 10), cfg, cpu, steps_per_epoch=3, bf16_weights=bf16_weights)

    p = prep("train.precision=fp32", "train.channels_last=true")
    # resnet8: 8 adder layers, each followed by its BN
    assert p.fused_adder_bn == 8 == sum(isinstance(m, FusedAdderBN2d) for m in p.module.modules())
    assert p.sync_bn_layers == 0 and p.autocast_dtype is None and p.grad_scaler is None
    assert p.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert p.adaptive is not None and [m.weight for m in p.adders] == p.adaptive.weights
    assert {id(q) for g in p.optimizer.param_groups for q in g["params"]} == {id(q) for q in p.module.parameters()}
    sched = p.build_lr_scheduler(p.optimizer)
    assert sched.lr_lambdas[0].total_steps == 2 * 3  # train.epochs=2 x steps_per_epoch

    s = prep("train.precision=fp32", "train.sync_bn=true", "adder.fuse_bn=auto")  # config: no forced fusion
    assert s.fused_adder_bn == 0 and s.sync_bn_layers == 9  # 8 after adders + the stem's
    assert sum(isinstance(m, SyncBatchNorm2d) for m in s.module.modules()) == 9

    b = prep("train.precision=fp32", bf16_weights=True)
    assert b.autocast_dtype == torch.bfloat16
    bns = [m for m in b.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 9 and all(type(m) is FP32BatchNorm2d for m in bns)

    h = prep("train.precision=fp16", "adder.adaptive_scope=global")
    assert h.autocast_dtype == torch.float16 and isinstance(h.grad_scaler, torch.amp.GradScaler)
