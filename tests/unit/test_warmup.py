"""addernet-warmup: its plan (pure), the GPU form's steps (run on CPU with the reference operator),
the CPU (AOT) form, and its errors. Its tile cache file is tested in tests/integration/test_tile_tuning.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from addernet_dist import warmup
from addernet_dist.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_plan_covers_every_p_code_path_and_both_batch_specialisations():
    cfg = load_config(str(CONFIGS / "imagenet_resnet50.yaml"), [])
    plan = warmup.warmup_plan(cfg, gpus=8)
    assert plan.p_values == (2.0, 1.5, 1.0)  # p = 2, general p, p = 1: three kernels each
    assert plan.batches == (32, 31)  # 256 / 8, and a batch not divisible by 16 (the short last one)
    assert plan.precision == "bf16" and not plan.channels_last and plan.image_size == 224  # NCHW: issue 21.3
    no_sched = load_config(str(CONFIGS / "imagenet_resnet50.yaml"), ["adder.p_schedule=false"])
    # without the schedule the run computes at p_end throughout (PSchedule), not p_start
    assert warmup.warmup_plan(no_sched, gpus=8).p_values == (1.0,)
    odd = warmup.warmup_plan(cfg, gpus=64)  # 4 per GPU → also a batch of 16
    assert odd.batches == (4, 16)
    with pytest.raises(ConfigError, match="does not split"):
        warmup.warmup_plan(cfg, gpus=3)


@pytest.mark.timeout(300)
def test_cpu_form_compiles_the_models_kernels_for_sm90(capsys):
    rc = warmup.main(["--config", str(CONFIGS / "debug.yaml"), "--gpus", "2", "--limit", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    # resnet8 has 3×3 and 1×1 (downsample) adder layers: both filter sizes compile for sm_90
    assert "sm_90 3×3" in out and "sm_90 1×1" in out and "regs=" in out
    assert (
        warmup.main(["--config", str(CONFIGS / "debug.yaml"), "--tile-cache", "/tmp/x.json"]) == 2
    )


def test_warm_model_runs_every_p_and_batch(monkeypatch):
    # the GPU form's steps, on CPU with the reference operator (the kernels themselves are not what is
    # tested here): every p code path × batch, a train step and an eval forward each
    cfg = load_config(
        str(CONFIGS / "debug.yaml"), ["adder.backend=reference", "train.global_batch_size=64"]
    )
    plan = warmup.warmup_plan(cfg, gpus=2)
    assert plan.batches == (32, 31) and plan.p_values == (2.0, 1.5, 1.0)
    seen = []
    import addernet_dist.nn as adder_nn

    real = adder_nn.set_p
    monkeypatch.setattr(adder_nn, "set_p", lambda m, p: (seen.append(p), real(m, p))[1])
    plan = warmup.WarmupPlan(plan.p_values, (3, 2), plan.image_size, plan.precision, plan.channels_last)
    assert warmup.warm_model(cfg, plan, 10, device="cpu", log=lambda *_: None) == 6
    assert seen == [2.0, 1.5, 1.0]


@pytest.mark.parametrize("bf16", [True, False])
def test_warm_model_forwards_run_under_the_trainers_autocast_dtype(bf16):
    # the warm-up must launch what the run launches: every forward (the train step's and the eval
    # forward) inside the trainer's autocast region, with the dtype the engines decide for train.precision
    # (engine.base.resolve_autocast_dtype: bf16 on CPU too), seen from inside the model's stem conv
    # and classifier; a bf16 warm-up of an fp32 run (or the reverse) compiles other kernels
    import torch

    from addernet_dist.engine.base import resolve_autocast_dtype

    cfg = load_config(
        str(CONFIGS / "debug.yaml"), ["adder.backend=reference", f"train.precision={'bf16' if bf16 else 'fp32'}"]
    )
    expected = resolve_autocast_dtype(cfg.train.precision, torch.device("cpu"))
    assert expected == (torch.bfloat16 if bf16 else None)
    seen = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            on = torch.is_autocast_enabled("cpu")
            seen.append(
                (
                    torch.is_grad_enabled(),
                    torch.get_autocast_dtype("cpu") if on else None,
                    output.dtype,
                )
            )

    plan = warmup.WarmupPlan((1.0,), (2,), cfg.data.image_size, cfg.train.precision, False)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        assert warmup.warm_model(cfg, plan, 10, device="cpu", log=lambda *_: None) == 1
    finally:
        handle.remove()
    out_dtype = expected or torch.float32
    # the stem conv and the classifier, in the training forward (grad on) and the eval forward
    assert sorted(set(seen), key=str) == sorted(
        {(True, expected, out_dtype), (False, expected, out_dtype)}, key=str
    )
    assert sum(grad for grad, _, _ in seen) == 2 and len(seen) == 4
