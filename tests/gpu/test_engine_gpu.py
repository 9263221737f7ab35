"""GPU tier of the engines: a bf16-autocast DDP step on CUDA and ZeRO-2 against DDP on one GPU.
Their CPU counterparts (bf16 autocast on CPU, ZeRO under gloo) are in tests/integration/
(test_train_engine.py, test_deepspeed_engine.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from addernet_dist.build import build_model
from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.logging_utils import read_metrics
from tests.helpers import PLAIN_SGD
from tests.train_helpers import DEBUG_CONFIG, REPO, TINY


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA only")
@pytest.mark.timeout(120)
def test_bf16_autocast_step_on_gpu():
    cfg = load_config(DEBUG_CONFIG, [*PLAIN_SGD, "train.precision=bf16", "train.device=cuda"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10)
    dist = DistInfo(device=torch.device("cuda", 0))
    engine = DDPEngine(model, cfg, dist, steps_per_epoch=4)
    assert engine.autocast_dtype == torch.bfloat16
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(10, (8,), device="cuda")
    loss = engine.forward_backward(x, y)
    stats = engine.step()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.conv1.weight.dtype == torch.float32  # fp32 master weights
    assert torch.isfinite(stats.adder_alphas).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL, bf16)")
@pytest.mark.timeout(600)
def test_gpu_zero2_bf16_autocast_tracks_ddp(tmp_path):
    """One GPU, train.precision=bf16 autocast: ZeRO-2 follows the DDP engine step by step (bf16 tolerance)."""
    losses = {}
    for engine in ("ddp", "deepspeed"):
        out = tmp_path / engine
        cmd = [sys.executable, "-m", "addernet_dist.train", "--config", str(DEBUG_CONFIG), *TINY]
        cmd += ["train.device=cuda", "train.precision=bf16", "train.epochs=1", "train.log_every=1"]
        cmd += [f"engine={engine}", "deepspeed.zero_stage=2", f"output_dir={out}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.pop("DS_ACCELERATOR", None)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        train = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
        losses[engine] = {r["step"]: r["loss"] for r in train}
    assert sorted(losses["deepspeed"]) == sorted(losses["ddp"]) == list(range(1, 9))
    for step, ref in losses["ddp"].items():
        assert losses["deepspeed"][step] == pytest.approx(ref, rel=2e-2), step
