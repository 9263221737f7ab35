"""LR schedules (cosine + warmup, polynomial) and the lp schedule, per iteration."""

from __future__ import annotations

import math

import pytest
import torch

from addernet_dist.config import AdderConfig, OptimConfig
from addernet_dist.optim import LRLambda, PSchedule, build_lr_scheduler, build_optimizer


def _lrs(cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> list[float]:
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
    out = []
    for _ in range(steps_per_epoch * epochs + 2):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.timeout(30)
def test_cosine_with_warmup_values():
    cfg = OptimConfig(lr=0.4, schedule="cosine", warmup_epochs=1, warmup_start_factor=0.25)
    lrs = _lrs(cfg, steps_per_epoch=4, epochs=3)  # 12 steps, 4 of warmup
    # warmup: 0.25 -> 1 linearly over 4 steps (factor at step s: 0.25 + 0.75 * s / 4)
    assert lrs[:5] == pytest.approx([0.1, 0.175, 0.25, 0.325, 0.4])
    # cosine over the remaining 8 steps: step 8 is half-way -> lr / 2
    assert lrs[8] == pytest.approx(0.2)
    assert lrs[6] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)
    assert lrs[13] == pytest.approx(0.0, abs=1e-12)  # clamped past the end


@pytest.mark.timeout(30)
def test_cosine_floor_and_poly_and_constant():
    lrs = _lrs(OptimConfig(lr=1.0, schedule="cosine", min_lr=0.1), 5, 2)
    assert lrs[0] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.55)
    lrs = _lrs(OptimConfig(lr=0.1, schedule="poly", poly_power=2.0), 5, 2)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5**2)
    assert lrs[9] == pytest.approx(0.1 * 0.1**2)
    assert _lrs(OptimConfig(lr=0.3, schedule="constant"), 3, 1) == pytest.approx([0.3] * 5)


@pytest.mark.timeout(30)
def test_lr_schedule_survives_state_dict_round_trip():
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=0.5)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=10, epochs=2)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model, cfg)
    sched2 = build_lr_scheduler(opt2, cfg, steps_per_epoch=10, epochs=2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(3):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        opt.step(), sched.step(), opt2.step(), sched2.step()
    assert isinstance(sched.lr_lambdas[0], LRLambda)


@pytest.mark.timeout(30)
def test_warmup_longer_than_run_is_an_error():
    cfg = OptimConfig(warmup_epochs=3)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    with pytest.raises(ValueError, match="warmup_epochs=3.0 covers the whole run"):
        build_lr_scheduler(opt, cfg, steps_per_epoch=4, epochs=3)


@pytest.mark.timeout(30)
def test_nag_optimizer_settings():
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(weight_decay=1e-4))
    g = opt.param_groups[0]
    assert g["nesterov"] is True and g["momentum"] == 0.9 and g["weight_decay"] == 1e-4


@pytest.mark.timeout(30)
def test_p_schedule_values():
    # Paper Table 6 setting scaled down: 800 epochs, p reaches 1 at epoch 600.
    s = PSchedule.from_config(AdderConfig(), decay_epochs=600, steps_per_epoch=7)
    assert s.decay_steps == 4200
    assert s.value(0) == 2.0
    assert s.value(2100) == pytest.approx(1.5)
    assert s.value(1050) == pytest.approx(1.75)
    assert s.value(4199) == pytest.approx(1 + 1 / 4200)
    assert s.value(4200) == 1.0 and s.value(10**6) == 1.0
    # monotone non-increasing per iteration
    vals = [s.value(i) for i in range(0, 4300, 13)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.timeout(30)
def test_p_schedule_off_and_custom_range():
    off = PSchedule.from_config(AdderConfig(p_schedule=False), decay_epochs=5, steps_per_epoch=4)
    assert [off.value(i) for i in (0, 10, 100)] == [1.0, 1.0, 1.0]
    s = PSchedule(1.8, 1.2, decay_steps=6)
    assert [round(s.value(i), 10) for i in range(8)] == [1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.2]
    # no position of its own (global_step is the one): an old checkpoint's p_schedule state, which
    # held a "step", loads without error and changes nothing; the shape comes from the config
    t = PSchedule(1.8, 1.2, decay_steps=6)
    t.load_state_dict({"step": 5, "p_start": 2.0, "p_end": 1.0, "decay_steps": 99, "enabled": True})
    assert [t.value(i) for i in range(8)] == [s.value(i) for i in range(8)]
    assert t.state_dict() == {"p_start": 1.8, "p_end": 1.2, "decay_steps": 6, "enabled": True}
    # zero-length decay: l1 from the first step
    assert PSchedule(2.0, 1.0, decay_steps=0).value(0) == 1.0
