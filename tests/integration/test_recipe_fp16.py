"""train.precision=fp16 on CPU: fp16 autocast inside the model, a GradScaler unscaled before eq. 33 and
clipping, skipped overflow steps that leave weights and optimizer state alone without tripping the
divergence guard, the scaler as a checkpoint component that resumes exactly, and the refusals."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from addernet_dist import run as run_mod
from addernet_dist.checkpoint import load_file
from addernet_dist.config import ConfigError, load_config
from addernet_dist.engine.ddp import unscale_
from addernet_dist.guard import NonFiniteGuard
from addernet_dist.nn import adder_modules
from tests.helpers import CPU_REFERENCE, PLAIN_SGD, SMALL_RUN, cpu_engine, preempt_after
from tests.train_helpers import DEBUG_CONFIG

_engine = functools.partial(cpu_engine, [*PLAIN_SGD, *CPU_REFERENCE])


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(10, (8,), generator=g)


@pytest.mark.timeout(120)
def test_fp16_step_autocasts_in_fp16_and_unscales_before_eq33():
    engine, model = _engine(["train.precision=fp16"])
    assert engine.autocast_dtype == torch.float16 and engine.grad_scaler is not None
    seen = {}
    model.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", o.dtype))
    adders = adder_modules(model)
    adders[0].register_forward_hook(lambda m, i, o: seen.__setitem__("adder_out", o.dtype))
    before = [m.weight.detach().clone() for m in adders]
    loss = engine.forward_backward(*_batch())
    # the scaled backward: the adder grads hold 2^16 x the true gradient until step() unscales
    scaled = [m.weight.grad.norm().item() for m in adders]
    stats = engine.step()
    # fp16 autocast inside the model; the adder layers still return fp32 (never a 16-bit pre-BN output)
    assert seen == {"fc": torch.float16, "adder_out": torch.float32}, seen
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.bn1.running_mean.dtype == torch.float32
    assert float(stats.loss_scale) == 2.0**16 and not bool(stats.scaler_skip)
    # eq. 33 saw the TRUE gradient norms (scaled / 2^16), so with plain SGD at lr 1 each adder update
    # has norm eta * sqrt(k); scaling after eq. 33 would give eta * sqrt(k) / 2^16
    norms = stats.adder_grad_norms.tolist()
    for s, n in zip(scaled, norms):
        assert n == pytest.approx(s / 2.0**16, rel=1e-5)
    for m, b in zip(adders, before):
        step = (m.weight.detach() - b).norm().item()
        assert step == pytest.approx(0.1 * math.sqrt(m.weight.numel()), rel=1e-4)
    # the fp32 engine's eq. 33 norms of the same step agree to fp16 autocast precision
    ref, _ = _engine(["train.precision=fp32"])
    ref.forward_backward(*_batch())
    ref_norms = ref.step().adder_grad_norms.tolist()
    assert norms == pytest.approx(ref_norms, rel=2e-2)


@pytest.mark.timeout(120)
def test_grad_clip_sees_the_unscaled_norm():
    engine, model = _engine(["train.precision=fp16", "train.grad_clip=1.0", "adder.adaptive_lr=false"])
    before = [p.detach().clone() for p in model.parameters()]
    engine.forward_backward(*_batch())
    stats = engine.step()
    ref, _ = _engine(["train.precision=fp32", "train.grad_clip=1.0", "adder.adaptive_lr=false"])
    ref.forward_backward(*_batch())
    assert float(stats.grad_norm) == pytest.approx(float(ref.step().grad_norm), rel=2e-2)
    total = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)))
    assert total == pytest.approx(min(1.0, float(stats.grad_norm)), rel=1e-4)


@pytest.mark.timeout(120)
def test_overflow_step_is_skipped_without_touching_weights_momentum_or_the_guard():
    engine, model = _engine(["train.precision=fp16", "optim.momentum=0.9"])
    guard = NonFiniteGuard(limit=1, device=torch.device("cpu"))
    loss = engine.forward_backward(*_batch())
    stats = engine.step()
    guard.update(loss, [stats.grad_norm, stats.adder_grad_norms], stats.scaler_skip)
    weights = [p.detach().clone() for p in model.parameters()]
    momentum = [engine.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    lr_steps = engine.lr_scheduler.last_epoch
    engine.grad_scaler.update(new_scale=2.0**127)  # the scaled loss overflows: every grad is inf
    loss = engine.forward_backward(*_batch())
    stats = engine.step()
    assert torch.isfinite(loss) and bool(stats.scaler_skip) and float(stats.loss_scale) == 2.0**127
    assert not torch.isfinite(stats.adder_grad_norms).all()
    for p, w, m in zip(model.parameters(), weights, momentum):
        assert torch.equal(p.detach(), w) and torch.equal(engine.optimizer.state[p]["momentum_buffer"], m)
    assert engine.grad_scaler.get_scale() == 2.0**126  # halved
    assert engine.lr_scheduler.last_epoch == lr_steps + 1  # the schedule follows the batch count
    guard.update(loss, [stats.grad_norm, stats.adder_grad_norms], stats.scaler_skip)
    assert int(guard.streak) == 0  # limit 1: a counted step would already stop the run
    # the same inf gradient at a scale <= 1 is no scaling artefact: it counts
    guard.update(loss, [stats.adder_grad_norms], torch.tensor(False))
    assert int(guard.streak) == 1
    # and a non-finite loss counts even when the scaler skips
    guard.update(torch.tensor(float("nan")), [], torch.tensor(True))
    assert int(guard.streak) == 2


@pytest.mark.timeout(60)
def test_unscale_flags_an_overflow_at_scale_one_as_not_the_scalers():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(w.sum()).backward()
    scaler.update(new_scale=1.0)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    scale, skip = unscale_(scaler, opt)
    assert float(scale) == 1.0 and not bool(skip)
    scaler.update(new_scale=4.0)
    opt.zero_grad()
    scaler.scale(w.sum()).backward()
    w.grad[0] = float("inf")
    scale, skip = unscale_(scaler, opt)
    assert float(scale) == 4.0 and bool(skip)


def test_fp16_refusals_name_the_keys():
    with pytest.raises(ConfigError, match="train.precision=fp16 is not supported with engine=deepspeed"):
        load_config(DEBUG_CONFIG, ["train.precision=fp16", "engine=deepspeed"])
    with pytest.raises(ConfigError, match="adder.adaptive_scope=local .* train.precision=fp16"):
        load_config(DEBUG_CONFIG, ["train.precision=fp16", "adder.adaptive_scope=local"])
    with pytest.raises(ConfigError, match=r"train.bf16=true \(deprecated\) contradicts train.precision=fp16"):
        load_config(DEBUG_CONFIG, ["train.precision=fp16", "train.bf16=true"])
    with pytest.raises(ConfigError, match="distill.co_train=true with train.precision=fp16"):
        load_config(DEBUG_CONFIG, ["train.precision=fp16", "distill.teacher=resnet8", "distill.co_train=true"])
    # the deprecated alias still works
    assert load_config(DEBUG_CONFIG, ["train.bf16=false"]).train.precision == "fp32"
    assert load_config(DEBUG_CONFIG, ["train.bf16=true"]).train.precision == "bf16"


RUN = [*SMALL_RUN, *CPU_REFERENCE, "train.epochs=2"]


def _final(out):
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    return load_file(ckpts[-1])


@pytest.mark.timeout(600)
def test_fp16_run_checkpoints_the_scaler_and_resumes_exactly(tmp_path, monkeypatch):
    # growth_interval=1: the scale doubles after every finite step (and halves on overflow), so the
    # scale at resume differs from a fresh scaler's 2^16 and must come from the checkpoint
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=1))
    run = [*RUN, "train.precision=fp16"]
    full, split = tmp_path / "full", tmp_path / "split"
    run_mod.train(load_config(DEBUG_CONFIG, [*run, f"output_dir={full}"]))
    preempt_after(monkeypatch, 1, tmp_path / "fired")
    assert run_mod.train(load_config(DEBUG_CONFIG, [*run, f"output_dir={split}"])) is None
    saved = load_file(split / "checkpoints" / "step_000000001.pt")["client"]["grad_scaler"]
    assert saved["scale"] in (2.0**17, 2.0**15) and saved["growth_interval"] == 1
    run_mod.train(load_config(DEBUG_CONFIG, [*run, f"output_dir={split}"]))
    a, b = _final(full), _final(split)
    assert a["client"]["train_state"]["global_step"] == b["client"]["train_state"]["global_step"] == 4
    assert a["client"]["grad_scaler"] == b["client"]["grad_scaler"]
    assert a["client"]["grad_scaler"]["scale"] != 2.0**16
    for k, v in a["engine"]["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["engine"]["model"][k]), k
    import json

    recs = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in recs if r.get("kind") == "train"]
    assert scales[0] == 2.0**16 and len(scales) == 4
