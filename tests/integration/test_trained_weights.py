"""The one reader of a trainer checkpoint's weights and config (addernet-eval, addernet-analyze)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from addernet_dist import checkpoint
from addernet_dist.analyze import load_trained_model
from addernet_dist.config import Config
from addernet_dist.models import create_model
from addernet_dist.trained_weights import read_trained_weights
from tests.train_helpers import REPO, assert_same_state


@pytest.mark.timeout(60)
def test_reads_trainer_checkpoints_and_bare_state_dicts(tmp_path):
    torch.manual_seed(0)
    net = create_model("lenet5_bn", conv="adder")
    cfg = Config.model_validate({"model": {"name": "lenet5_bn"}}).model_dump(mode="json")
    ck = tmp_path / "step_000000001.pt"
    checkpoint.save_file({"engine": {"model": net.state_dict()}, "client": {"config": cfg}}, ck)
    w = read_trained_weights(ck)
    assert w.config == cfg
    assert_same_state(w.model, net.state_dict())

    # a bare state_dict of a compiled DDP-wrapped model: prefixes go, no config
    bare = tmp_path / "bare.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in net.state_dict().items()}, bare)
    with pytest.raises(checkpoint.CheckpointError, match="not an addernet checkpoint"):
        read_trained_weights(bare)
    w = read_trained_weights(bare, allow_state_dict=True)
    assert w.config is None and w.model.keys() == net.state_dict().keys()
    # analyze reads through the same function
    loaded = load_trained_model(bare, "lenet5_bn", "adder")
    assert torch.equal(loaded.fc[0].weight, net.fc[0].weight)


@pytest.mark.timeout(120)
def test_eval_without_a_stored_config_asks_for_one(tmp_path):
    ck = tmp_path / "best.pt"
    checkpoint.save_file({"engine": {"model": create_model("resnet8").state_dict()}}, ck)
    proc = subprocess.run(
        [sys.executable, "-m", "addernet_dist.evaluate", "--checkpoint", str(ck)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 2
    assert "holds no run config; pass --config" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_analyze_runs_as_a_module_with_all_subcommands():
    proc = subprocess.run(
        [sys.executable, "-m", "addernet_dist.analyze", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0
    assert "{table1,weights,filters,features,ablation,curves}" in proc.stdout
