"""train.bn_recalibration_final: BN statistics recomputed before evaluations at the final p too,
said in the eval record, and the recalibrated statistics are what gets evaluated and saved.

In-process runs (world size 1) of the debug config on 32 samples, p = 1 throughout
(adder.p_schedule=false: every evaluation is at the final p).
"""

from __future__ import annotations

import pytest
import torch

from addernet_dist import build
from addernet_dist import run as run_mod
from addernet_dist.checkpoint import load_file
from addernet_dist.config import ConfigError, load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.logging_utils import read_metrics
from tests.train_helpers import DEBUG_CONFIG

RUN = [
    "train.progress_bar=false",
    "data.synthetic_train_size=32",
    "data.synthetic_val_size=16",
    "train.ckpt_every_steps=0",
    "train.precision=fp32",  # fp32: the recalibration is redone below in fp32
    "adder.backend=reference",
    "adder.p_schedule=false",
    "train.bn_recalibration_batches=2",
]


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    cfg = load_config(DEBUG_CONFIG, [*RUN, f"output_dir={out}", *extra])
    run_mod.train(cfg)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    return cfg, out, evals


def _bn_stats(state):
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.timeout(300)
def test_final_p_evaluations_are_recalibrated_and_saved_as_evaluated(tmp_path):
    cfg, out, evals = _run(tmp_path, "train.bn_recalibration_final=true")
    assert [(e["epoch"], e["bn_recalibration_batches"], e["p"]) for e in evals] == [(1, 2, 1.0), (2, 2, 1.0)]
    assert all(e["bn_recalibration_final"] is True for e in evals)
    # The saved statistics ARE a recalibration at the saved weights (recalibrate_bn resets them
    # first, so the redo does not depend on the statistics loaded); without the recalibration the
    # checkpoint holds the momentum-averaged training statistics, which differ.
    saved = load_file(out / "checkpoints" / f"step_{evals[-1]['step']:09d}.pt")["engine"]["model"]
    model = build.build_model(cfg, 10)
    model.load_state_dict(saved)
    assert build.recalibrate_bn(cfg, DistInfo(), model, evals[-1]["epoch"], None) == 2
    redone = _bn_stats(model.state_dict())
    assert len(redone) == 2 * 9
    for k, v in redone.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.timeout(300)
def test_without_the_switch_final_p_evaluations_use_the_running_statistics(tmp_path):
    cfg, out, evals = _run(tmp_path)
    assert len(evals) == 2 and not any("bn_recalibration_batches" in e for e in evals)
    saved = load_file(out / "checkpoints" / f"step_{evals[-1]['step']:09d}.pt")["engine"]["model"]
    model = build.build_model(cfg, 10)
    model.load_state_dict(saved)
    build.recalibrate_bn(cfg, DistInfo(), model, evals[-1]["epoch"], None)
    redone = _bn_stats(model.state_dict())
    assert any(not torch.allclose(saved[k], v, rtol=1e-4, atol=1e-5) for k, v in redone.items())


def test_the_switch_needs_recalibration_batches():
    with pytest.raises(ConfigError, match=r"bn_recalibration_final=true needs train.bn_recalibration_batches > 0"):
        load_config(DEBUG_CONFIG, ["train.bn_recalibration_final=true"])
