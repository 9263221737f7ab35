"""Kernel tiles in a training run (issue 21 items 1 and 2), under the Triton interpreter:

* every p code path is tuned before the first step (the first p = 1 step of ImageNet ResNet-50 comes
  ~1.1 M steps in, where tuning would stall every rank), leaving the model as it was;
* the tile choices go into the checkpoint and a resumed run launches them without timing anything;
* tuning is a phase of the stall watchdog (rank 0's per-tile progress keeps the waiting ranks alive),
  and a tuning failure on rank 0 reaches every rank as that error (2 gloo ranks).

The interpreter runs no tuner of its own (INTERPRETER_CONFIGS); these tests install real TileTuners
on the interpreted module, with injected timings, as tests/integration/test_tile_tuning.py does.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
import triton
from torch import nn

from addernet_dist.kernels import tile_tuner
from addernet_dist.kernels.triton_testing import interpreted_modules

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


def _big_tiles(ta, kind):
    """Two tiles the interpreter runs fast (few programs): its own config and a BLOCK_K variant."""
    a = ta.INTERPRETER_CONFIGS[kind]
    b = dict(a.kwargs)
    b["BLOCK_K"] = b["BLOCK_K"] // 2 if kind != "dw" else 32
    return [a, triton.Config(b)]


def _install_tuners(ta, bench):
    tuners = {
        "fwd": tile_tuner.TileTuner(
            "fwd", ta._adder_fwd_kernel, _big_tiles(ta, "fwd"), ta._FWD_KEY
        ),
        "dx": tile_tuner.TileTuner("dx", ta._adder_bwd_dx_kernel, _big_tiles(ta, "dx"), ta._DX_KEY),
    }
    for t in tuners.values():
        t.bench = bench
    ta._adder_fwd_tuned, ta._adder_bwd_dx_tuned = tuners["fwd"], tuners["dx"]
    return tuners


def _modes(keys, name):
    return {int(re.search(rf"\|{name}=(\d+)", k).group(1)) for k in keys}


@pytest.fixture
def ta():
    tile_tuner.clear()
    with interpreted_modules("addernet_dist.kernels.triton_adder") as (mod,):
        yield mod
    tile_tuner.clear()


@pytest.mark.timeout(300)
def test_tune_tiles_tunes_every_p_path_and_leaves_the_model_alone(ta):
    from addernet_dist.nn import Adder2d
    from addernet_dist.tiles import tune_tiles, tuners_active

    timings = []

    def bench(run):  # no launch: the second tile wins every key
        timings.append(1)
        return 2.0 if len(timings) % 2 else 1.0

    assert not tuners_active()  # the interpreter's own module has no tuners
    tuners = _install_tuners(ta, bench)
    assert tuners_active()
    torch.manual_seed(0)
    model = nn.Sequential(
        Adder2d(3, 4, 3, padding=1, backend="triton"),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Adder2d(4, 4, 3, backend="triton"),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model[1].running_mean.fill_(0.25)  # buffers a throw-away training forward would move
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    model.eval()
    rng = torch.get_rng_state()
    runs = tune_tiles(
        model, (2.0, 1.5, 1.0), (2,), 6, device=torch.device("cpu"), autocast_dtype=None
    )
    assert runs == 3
    keys = tile_tuner.choices()
    fwd = [k for k in keys if k.startswith("fwd|")]
    dx = [k for k in keys if k.startswith("dx|")]
    # 2 layers × 3 p code paths forward; ∂X only for the second layer (the images need no gradient)
    assert _modes(fwd, "P_MODE") == {ta.P_TWO, ta.P_GENERAL, ta.P_ONE} and len(fwd) == 6
    assert len(_modes(dx, "GX_MODE")) == 3 and len(dx) == 3
    assert all(
        v == tile_tuner.config_dict(tuners["fwd"].configs[1]) for k, v in keys.items() if k in fwd
    )
    # the model is as it was: BN statistics, p, mode, no gradients, and the RNG stream
    for k, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[k], rtol=0, atol=0)
    assert [m.p for m in (model[0], model[3])] == [1.0, 1.0] and not model.training
    assert all(q.grad is None for q in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # the training step at p = 1 (reached ~1.1 M steps into ImageNet) times nothing any more
    n = len(timings)
    for m in (model[0], model[3]):
        m.p = 1.0
    model.train()
    model(torch.randn(3, 3, 6, 6)).sum().backward()
    assert len(timings) == n and sum(t.tunings for t in tuners.values()) == 9


# ---- in a training run: tuned at startup, saved in the checkpoint, restored on resume -------------
TINY = [
    "model.kwargs.width=4",
    "data.image_size=8",
    "data.synthetic_train_size=8",  # 2 steps at global batch 4
    "data.synthetic_val_size=4",
    "train.global_batch_size=4",
    "train.log_every=1",
    "train.ckpt_every_steps=0",
    "train.bn_recalibration_batches=1",
    "train.progress_bar=false",
    "train.precision=fp32",
    "adder.backend=triton",
    "adder.fuse_bn=true",
    "adder.p_decay_epochs=1000",  # p = 1 only far beyond this run, as at ImageNet's decay_steps
]


@pytest.mark.timeout(900)
def test_run_tunes_all_p_paths_at_start_and_resume_reuses_the_checkpoints_tiles(ta, tmp_path):
    from addernet_dist import run as run_mod
    from addernet_dist.checkpoint import load_file
    from addernet_dist.config import load_config
    from tests.train_helpers import DEBUG_CONFIG

    out = tmp_path / "run"
    calls = []

    def first_wins(run):
        calls.append(1)
        return 1.0 if len(calls) % 2 else 2.0

    tuners = _install_tuners(ta, first_wins)
    run_mod.train(load_config(DEBUG_CONFIG, [*TINY, "train.epochs=1", f"output_dir={out}"]))
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert (
        min(r["p"] for r in metrics if r.get("kind") == "train") > 1.99
    )  # p = 1 far beyond the run
    client = load_file(out / "checkpoints" / "step_000000002.pt")["client"]
    saved = client["tiles"]["entries"]
    fwd = [k for k in saved if k.startswith("fwd|")]
    # tuned before the first step: every p code path of the schedule, not only p = 2
    assert _modes(fwd, "P_MODE") == {ta.P_TWO, ta.P_GENERAL, ta.P_ONE}
    assert (
        _modes([k for k in saved if k.startswith("dx|")], "GX_MODE")
        and saved == tile_tuner.choices()
    )
    assert all(isinstance(v, int) for e in saved.values() for v in e.values())  # plain types
    first = tile_tuner.config_dict(tuners["fwd"].configs[0])
    assert all(saved[k] == first for k in fwd)

    # a restarted process (choices forgotten) whose rank 0 would now time the OTHER tiles
    tile_tuner.clear()
    calls.clear()

    def second_wins(run):
        calls.append(1)
        return 2.0 if len(calls) % 2 else 1.0

    for t in tuners.values():
        t.bench, t.tunings = second_wins, 0
    run_mod.train(load_config(DEBUG_CONFIG, [*TINY, "train.epochs=2", f"output_dir={out}"]))
    assert calls == [] and sum(t.tunings for t in tuners.values()) == 0
    client = load_file(out / "checkpoints" / "step_000000004.pt")["client"]
    assert client["tiles"]["entries"] == saved == tile_tuner.choices()


def test_tile_choices_from_a_checkpoint_are_checked_and_win_over_a_tile_cache(tmp_path):
    from addernet_dist.tiles import TileChoices

    tile_tuner.clear()
    try:
        ck = {"fwd|float32|C=3": {"BLOCK_M": 256, "num_warps": 4}}
        TileChoices().load_state_dict({"entries": ck})
        path = tmp_path / "tiles.json"
        other = {"fwd|float32|C=3": {"BLOCK_M": 64, "num_warps": 2}, "dx|x": {"BLOCK_M": 128}}
        path.write_text(json.dumps({"version": 1, "device": "cpu", "entries": other}))
        with pytest.warns(RuntimeWarning, match="keeping the run's"):
            tile_tuner.load_tile_cache(str(path))
        assert tile_tuner.choices() == {**ck, "dx|x": {"BLOCK_M": 128}}
        assert TileChoices().state_dict() == {"entries": tile_tuner.choices()}
        with pytest.raises(ValueError, match="checkpoint 'tiles'.*not a map"):
            TileChoices().load_state_dict({"entries": {"fwd|k": {"BLOCK_M": [256]}}})
    finally:
        tile_tuner.clear()


# ---- two ranks: tuning is a watchdog phase; rank 0's failure reaches every rank -------------------
_WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from addernet_dist.distributed import DistInfo
from addernet_dist.guard import StallWatchdog
from addernet_dist.kernels import tile_tuner
from addernet_dist.kernels.triton_testing import interpreted_modules
from addernet_dist import trainer

out, scenario = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
res = {"rank": rank}
with interpreted_modules("addernet_dist.kernels.triton_adder") as (ta,):
    configs = ta.FWD_CONFIGS[:5]
    def bench(run):
        if scenario == "fail":
            raise RuntimeError("ptxas died")
        time.sleep(1.5)  # 5 tiles: 7.5 s of tuning, ~twice the tuning limit; progress every 1.5 s
        return 1.0
    tuner = tile_tuner.TileTuner("fwd", ta._adder_fwd_kernel, configs, ta._FWD_KEY)
    tuner.bench = bench
    ta._adder_fwd_tuned = tuner
    x, w = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 3, 3)
    args = (x, w, (1, 1), (0, 0), (1, 1), 1.0, (4, 4))
    ta.adder2d_forward(*args, bn_stats=True, config=configs[0])  # interpreter warm: launches < 1 s
    dist.barrier()
    # training limit 2 s, startup (and tuning) limit 4 s; the run is long past its startup steps
    wd = StallWatchdog(info, timeout_s=2.0, startup_timeout_s=4.0, startup_steps=0).start(first_step=1_100_000)
    trainer._tile_hooks(wd)  # what Trainer.fit installs
    try:
        ta.adder2d_forward(*args, bn_stats=True)
        res["choices"] = tile_tuner.choices()
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    wd.beat(1_100_001)
    res["phase_after"] = wd.phase
    wd.close()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(res, f)
dist.destroy_process_group()
"""


def _two_ranks(tmp_path, scenario):
    from tests.train_helpers import start_workers

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = start_workers([str(script), str(tmp_path), scenario])
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=150)[1])
        except subprocess.TimeoutExpired:
            p.kill()
            errs.append(p.communicate()[1] + "\n[killed after 150 s: hung]")
    return [p.returncode for p in procs], errs


@pytest.mark.timeout(400)
def test_tuning_longer_than_the_limits_is_not_a_stall_and_a_failure_reaches_every_rank(tmp_path):
    codes, errs = _two_ranks(tmp_path, "slow")
    assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["choices"] == r1["choices"] and len(r0["choices"]) == 1
    assert r0["phase_after"] == r1["phase_after"] == "train"

    for r in range(2):
        (tmp_path / f"rank{r}.json").unlink()
    codes, errs = _two_ranks(tmp_path, "fail")
    assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["error"] == "TileTuningError: no fwd tile config could run"
    # rank 1 raises rank 0's error (naming the layer key) instead of waiting for a tile
    assert re.fullmatch(
        r"TileTuningError: rank 0 failed to tune the tiles of fwd\|float32\|C=3\|O=5\|.*"
        r": TileTuningError: no fwd tile config could run",
        r1["error"],
    ), r1["error"]
