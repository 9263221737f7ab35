"""Tile tuning (kernels/tile_tuner.py) under the Triton interpreter: once per layer shape, never per
batch size; the same tile on every rank; a tile cache written before the run replaces tuning.

The interpreter normally runs INTERPRETER_CONFIGS without tuning; these tests install a real TileTuner
over the kernel's own tuning list on the interpreted module, so the launcher → tuner → launch path is
the one a GPU runs (only the timing function is injected where a test needs a particular winner).
"""

from __future__ import annotations

import json

import pytest
import torch

from addernet_dist.kernels import tile_tuner
from addernet_dist.kernels.triton_testing import interpreted_modules
from addernet_dist.ops.reference import adder2d_reference

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


@pytest.fixture
def ta(monkeypatch):
    tile_tuner.clear()
    with interpreted_modules("addernet_dist.kernels.triton_adder") as (mod,):
        yield mod
    tile_tuner.clear()


def _install_fwd_tuner(ta, monkeypatch, configs, bench):
    tuner = tile_tuner.TileTuner("fwd", ta._adder_fwd_kernel, configs, ta._FWD_KEY)
    tuner.bench = bench
    monkeypatch.setattr(ta, "_adder_fwd_tuned", tuner)
    return tuner


def _fwd(ta, x, w, **kw):
    out_hw = (x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1)
    return ta.adder2d_forward(x, w, (1, 1), (0, 0), (1, 1), 1.0, out_hw, **kw)


@pytest.mark.timeout(120)
def test_tile_is_tuned_once_per_layer_shape_not_per_batch(ta, monkeypatch):
    configs = ta.FWD_CONFIGS[3:5]  # the two small tiles: cheap in the interpreter
    trials = []

    def bench(run):
        run()  # the real launch of the candidate tile
        trials.append(1)
        return 1.0 / len(trials)  # the later candidate wins: not the default config

    tuner = _install_fwd_tuner(ta, monkeypatch, configs, bench)
    w = torch.randn(5, 3, 3, 3)
    # training batch, evaluation batch, short last batch: same layer, three batch sizes
    for n in (4, 3, 1):
        x = torch.randn(n, 3, 6, 6)
        y, stats = _fwd(ta, x, w, bn_stats=True)
        torch.testing.assert_close(y, adder2d_reference(x, w), rtol=1e-5, atol=1e-4)
        # the BN partials are merged with the chosen tile's BLOCK_M
        torch.testing.assert_close(stats[0], y.mean((0, 2, 3)), rtol=1e-6, atol=1e-4)
    assert tuner.tunings == 1 and len(trials) == len(configs)
    (key,) = [k for k in tile_tuner.choices() if k.startswith("fwd|")]
    assert tile_tuner.choices()[key] == tile_tuner.config_dict(configs[1])
    assert "N=" not in key and "C=3" in key and "O=5" in key
    # a different layer shape is a different key: tuned once more
    _fwd(ta, torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3))
    assert tuner.tunings == 2


def test_a_batch_size_key_is_refused(ta):
    with pytest.raises(ValueError, match="batch size"):
        tile_tuner.TileTuner("fwd", ta._adder_fwd_kernel, ta.FWD_CONFIGS, ["C", "N"])


def test_atomic_dw_is_tuned_on_a_zeroed_buffer(ta, monkeypatch):
    # trials accumulate into the same atomic buffer: it must be zeroed between them and before the
    # real launch, or ∂F would come out (trials + 1)× too large
    tuner = tile_tuner.TileTuner("dw", ta._adder_bwd_dw_kernel, ta.DW_CONFIGS[:2], ta._DW_KEY)
    monkeypatch.setattr(ta, "_adder_bwd_dw_atomic_tuned", tuner)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    dw = ta.adder2d_grad_weight(g, x, w, (1, 1), (0, 0), (1, 1), "full", deterministic=False)
    adder2d_reference(x, w).backward(g)
    torch.testing.assert_close(dw, w.grad, rtol=1e-5, atol=1e-5)
    assert tuner.tunings == 1


@pytest.mark.timeout(120)
def test_tile_cache_file_replaces_tuning(ta, monkeypatch, tmp_path):
    configs = ta.FWD_CONFIGS[3:5]
    tuner = _install_fwd_tuner(ta, monkeypatch, configs, lambda run: (run(), 1.0)[1])
    w = torch.randn(5, 3, 3, 3)
    _fwd(ta, torch.randn(2, 3, 6, 6), w)
    path = tmp_path / "tiles.json"
    assert tile_tuner.save_tile_cache(str(path)) == 1
    entries = json.loads(path.read_text())["entries"]
    assert list(entries.values()) == [tile_tuner.config_dict(configs[0])]
    # a fresh process (cleared choices) started with ADDERNET_TILE_CACHE never times anything
    tile_tuner.clear()
    # make the file choose the OTHER tile, to see that the file (not a re-tune) decides
    entries = {k: tile_tuner.config_dict(configs[1]) for k in entries}
    path.write_text(json.dumps({"version": 1, "device": "cpu", "entries": entries}))
    monkeypatch.setenv(tile_tuner.CACHE_ENV, str(path))

    def no_timing(run):
        raise AssertionError("a cached tile was re-tuned")

    tuner.bench = no_timing
    tuner.tunings = 0
    y, _ = _fwd(ta, torch.randn(3, 3, 6, 6), w)
    assert tuner.tunings == 0
    assert next(iter(tile_tuner.choices().values())) == tile_tuner.config_dict(configs[1])
    monkeypatch.setenv(tile_tuner.CACHE_ENV, str(tmp_path / "typo.json"))
    with pytest.raises(FileNotFoundError, match="addernet-warmup"):
        _fwd(ta, torch.randn(1, 3, 6, 6), w)


# ---- two ranks (gloo) ----------------------------------------------------------------------------------
_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from addernet_dist.kernels import tile_tuner
from addernet_dist.kernels.triton_testing import interpreted_modules

dist.init_process_group("gloo")
rank = dist.get_rank()
with interpreted_modules("addernet_dist.kernels.triton_adder") as (ta,):
    configs = ta.FWD_CONFIGS[3:5]
    # injected timing: rank 0 finds tile 0 faster, rank 1 finds tile 1 faster
    times = {0: [1.0, 2.0], 1: [2.0, 1.0]}[rank]
    calls = []
    def bench(run):
        run(); calls.append(1)
        return times[len(calls) - 1]
    tuner = tile_tuner.TileTuner("fwd", ta._adder_fwd_kernel, configs, ta._FWD_KEY)
    tuner.bench = bench
    ta._adder_fwd_tuned = tuner
    # what this rank would pick on its own
    own = tuner._time(configs, lambda cfg: None, [])
    calls.clear()
    tuner.tunings = 0
    torch.manual_seed(0)
    x, w = torch.randn(2 + rank, 3, 6, 6), torch.randn(5, 3, 3, 3)  # different batch per rank
    ta.adder2d_forward(x, w, (1, 1), (0, 0), (1, 1), 1.0, (4, 4), bn_stats=True)
    chosen = next(iter(tile_tuner.choices().values()))
    out = dict(rank=rank, own=own, chosen=chosen, timed=len(calls), tunings=tuner.tunings,
               cfg0=tile_tuner.config_dict(configs[0]))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_all_ranks_use_rank0s_tile(tmp_path):
    from tests.train_helpers import start_workers

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = start_workers([str(script), str(tmp_path)])
    for r, p in enumerate(procs):
        _, err = p.communicate(timeout=170)
        assert p.returncode == 0, f"rank {r}: {err[-3000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["own"], r1["own"]) == (0, 1)  # left alone, the ranks would disagree
    assert r0["chosen"] == r1["chosen"] == r0["cfg0"]  # both run rank 0's tile
    assert (r0["timed"], r1["timed"]) == (2, 0)  # only rank 0 timed (rank 1 compiles one tile)


def test_tuning_off_takes_the_first_tile_without_timing(ta, monkeypatch):
    # ADDERNET_TILE_TUNING=0 (addernet-selftest's correctness checks): no timing, the first tile of the
    # pruned list, nothing recorded (a later tuning run still times the key)
    def no_timing(run):
        raise AssertionError("timed with tuning off")

    tuner = _install_fwd_tuner(ta, monkeypatch, ta.FWD_CONFIGS[3:5], no_timing)
    monkeypatch.setattr(tile_tuner, "TUNING_ENABLED", False)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 3, 3)
    y, _ = _fwd(ta, x, w)
    torch.testing.assert_close(y, adder2d_reference(x, w), rtol=1e-5, atol=1e-4)
    assert tuner.tunings == 0 and tile_tuner.choices() == {}
