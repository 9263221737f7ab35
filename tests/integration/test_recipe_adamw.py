"""optim.name=adamw: torch AdamW's closed form on the engine's step (eq. 33-scaled adder gradients),
no weight decay on BN parameters and biases, eq. 33's constant cancelled by Adam's normalisation, and
an exact resume."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from addernet_dist import run as run_mod
from addernet_dist.build import build_model
from addernet_dist.checkpoint import load_file
from addernet_dist.config import load_config
from addernet_dist.nn import adder_modules
from tests.helpers import CPU_REFERENCE, SMALL_RUN, cpu_engine, preempt_after
from tests.train_helpers import DEBUG_CONFIG

ADAMW = [
    "optim.name=adamw",
    "optim.lr=0.01",
    "optim.weight_decay=0.05",
    "optim.adam_betas=[0.8,0.9]",
    "optim.adam_eps=1e-6",
    "optim.schedule=constant",
    "optim.warmup_epochs=0",
    *CPU_REFERENCE,
    "train.precision=fp32",
]


_engine = functools.partial(cpu_engine, ADAMW)


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.timeout(120)
def test_adamw_step_is_torchs_closed_form_without_decay_on_bn_and_bias():
    engine, model = _engine([])
    opt = engine.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.bn1.weight) in ids and id(model.bn1.bias) in ids and id(model.fc.bias) in ids
    wd = {p: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    seen: list[dict] = []  # the gradients AdamW steps with (after eq. 33)
    opt.register_step_pre_hook(lambda o, a, k: seen.append({p: p.grad.clone() for p in wd}))
    params = list(wd)
    theta = {p: p.detach().clone() for p in params}
    m = {p: torch.zeros_like(p) for p in params}
    v = {p: torch.zeros_like(p) for p in params}
    lr, (b1, b2), eps = 0.01, (0.8, 0.9), 1e-6
    for t, (x, y) in enumerate(_batches(2), start=1):
        engine.forward_backward(x, y)
        stats = engine.step()
        for p in params:
            g = seen[-1][p]
            theta[p] = theta[p] * (1 - lr * wd[p])
            m[p] = b1 * m[p] + (1 - b1) * g
            v[p] = b2 * v[p] + (1 - b2) * g * g
            denom = (v[p] / (1 - b2**t)).sqrt() + eps
            theta[p] = theta[p] - lr / (1 - b1**t) * m[p] / denom
    for p in params:
        torch.testing.assert_close(p.detach(), theta[p], rtol=1e-5, atol=1e-7)
    # eq. 33 still ran before the step: the gradients AdamW saw have norm eta * sqrt(k) per adder layer
    for mod in adder_modules(model):
        assert seen[-1][mod.weight].norm().item() == pytest.approx(0.1 * math.sqrt(mod.weight.numel()), rel=1e-4)
    assert torch.isfinite(stats.adder_alphas).all()


@pytest.mark.timeout(120)
def test_adamw_cancels_eq33s_constant_factor():
    """With AdamW, eta (eq. 33's constant) changes nothing but Adam's eps: eta 0.1 and 1.0 give the same
    first adder update (SGD's scales 10x). eps 1e-30: this model's shortcut adder layers have elements
    with |alpha g| ~ 1e-11, where torch's default 1e-8 (or 1e-12) does take part."""
    runs = []
    for eta in (0.1, 1.0):
        engine, model = _engine([f"adder.eta={eta}", "optim.adam_eps=1e-30"])
        engine.forward_backward(*_batches(1)[0])
        engine.step()
        runs.append([m.weight.detach().clone() for m in adder_modules(model)])
    torch.manual_seed(0)
    init = [m.weight.detach() for m in adder_modules(build_model(load_config(DEBUG_CONFIG, ADAMW), num_classes=10))]
    for a, b, w0 in zip(*runs, init):
        assert not torch.equal(a, w0)
        torch.testing.assert_close(a - w0, b - w0, rtol=1e-5, atol=1e-8)
    sgd = []
    for eta in (0.1, 1.0):
        engine, model = _engine([f"adder.eta={eta}", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0"])
        w0 = adder_modules(model)[0].weight.detach().clone()
        engine.forward_backward(*_batches(1)[0])
        engine.step()
        sgd.append((adder_modules(model)[0].weight.detach() - w0).norm().item())
    assert sgd[1] / sgd[0] == pytest.approx(10.0, rel=1e-4)


RUN = [*SMALL_RUN, *CPU_REFERENCE, "train.epochs=2", "train.precision=fp32", "optim.name=adamw", "optim.lr=0.01"]


@pytest.mark.timeout(600)
def test_adamw_run_resumes_exactly(tmp_path, monkeypatch):
    full, split = tmp_path / "full", tmp_path / "split"
    run_mod.train(load_config(DEBUG_CONFIG, [*RUN, f"output_dir={full}"]))
    preempt_after(monkeypatch, 1, tmp_path / "fired")
    assert run_mod.train(load_config(DEBUG_CONFIG, [*RUN, f"output_dir={split}"])) is None
    saved = load_file(split / "checkpoints" / "step_000000001.pt")["engine"]["optimizer"]
    assert {int(s["step"]) for s in saved["state"].values()} == {1} and "exp_avg_sq" in saved["state"][0]
    run_mod.train(load_config(DEBUG_CONFIG, [*RUN, f"output_dir={split}"]))
    a, b = (load_file(sorted((o / "checkpoints").glob("step_*.pt"))[-1])["engine"] for o in (full, split))
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[k], b["optimizer"]["state"][i][k]), (i, k)
