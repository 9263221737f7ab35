"""deepspeed.precision=bf16 relies on DeepSpeed casting the parameters only (issue 21 item 7): the BN
statistics of adder outputs (-4000 ± 37) must stay fp32. DeepSpeed 0.15.0-0.19.1 called
``module.bfloat16()`` (buffers too); 0.19.2 on cast parameters only. The engine checks the behaviour on
the run's model right after ``deepspeed.initialize``: here once with the installed DeepSpeed (passes)
and once with an ``initialize`` that casts the whole module first, as 0.19.1 did (a clear error).

One process (gloo, world size 1, DS_ACCELERATOR=cpu), both scenarios in one subprocess: DeepSpeed's
import + initialize costs ~5-10 s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train_helpers import DEBUG_CONFIG, REPO, env, free_port

_SCRIPT = r"""
import json, sys
import deepspeed, torch
from addernet_dist.config import ConfigError, load_config
from addernet_dist.distributed import init_distributed
from addernet_dist.engine.deepspeed import DeepSpeedEngine
from addernet_dist.models import create_model

cfg = load_config(sys.argv[1], ["engine=deepspeed", "deepspeed.precision=bf16", "deepspeed.zero_stage=2",
                                "train.global_batch_size=4", "deepspeed.micro_batch_size=4"])
dist = init_distributed("cpu")
out = {}
real = deepspeed.initialize
for scenario in ("installed", "casts_buffers"):
    if scenario == "casts_buffers":
        def initialize(model, **kw):
            model.bfloat16()  # deepspeed/runtime/engine.py of 0.15.0-0.19.1: self.module.bfloat16()
            return real(model=model, **kw)
        deepspeed.initialize = initialize
    torch.manual_seed(0)
    try:
        eng = DeepSpeedEngine(create_model("resnet8", num_classes=10), cfg, dist, steps_per_epoch=2)
        m = eng.unwrap()
        out[scenario] = {"weight": str(m.conv1.weight.dtype), "running_mean": str(m.bn1.running_mean.dtype)}
    except ConfigError as e:
        out[scenario] = {"error": str(e)}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_deepspeed_bf16_must_keep_bn_buffers_fp32(tmp_path):
    script = tmp_path / "ds_cast.py"
    script.write_text(_SCRIPT)
    e = env(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        ADDERNET_BACKEND="reference",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(DEBUG_CONFIG)],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    # the installed DeepSpeed: bf16 weights, fp32 statistics
    assert res["installed"] == {"weight": "torch.bfloat16", "running_mean": "torch.float32"}
    err = res["casts_buffers"]["error"]
    assert "buffers of the model to torch.bfloat16" in err and "bn1.running_mean" in err
    assert "pip install 'deepspeed>=0.19.2'" in err and "deepspeed.precision=autocast" in err
