"""The trainer's structure (addernet_dist/trainer.py): the checkpoint is the dict of its components,
BN recalibration builds its loader once, and the p in the log is the schedule's.

In-process runs (world size 1) of the debug config on 32 samples: 2 steps per epoch.
"""

from __future__ import annotations

import pytest
import torch

from addernet_dist import build
from addernet_dist import run as run_mod
from addernet_dist import trainer as trainer_mod
from addernet_dist.checkpoint import load_file
from addernet_dist.config import load_config
from addernet_dist.evaluator import RECALIBRATION_SEED_OFFSET
from addernet_dist.logging_utils import read_metrics
from addernet_dist.optim import PSchedule
from tests.helpers import SMALL_RUN, preempt_after
from tests.train_helpers import DEBUG_CONFIG

RUN = [*SMALL_RUN, "train.precision=fp32"]
CLIENT_KEYS = {
    "train_state",
    "p_schedule",
    "loader",
    "rng",
    "last_eval",
    "tiles",
    "world_size",
    "runtime",  # torch threads and version (docs/training.md "Reproducibility")
    "config",
}


class Toy:
    """A component added to the checkpoint with one line."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"token": self.token}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def _add_toy(monkeypatch, toys: list[Toy], token: str) -> None:
    init = trainer_mod.Trainer.__init__

    def init_with_toy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        toys.append(Toy(token))
        self.components["toy"] = toys[-1]  # the one line

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init_with_toy)


@pytest.mark.timeout(300)
def test_checkpoint_is_the_dict_of_components_and_a_new_one_round_trips(tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = [*RUN, "adder.p_schedule=false", f"output_dir={out}"]
    # 1. a run without the toy: the on-disk client state keeps its keys (old checkpoints resume)
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=1"]))
    client = load_file(out / "checkpoints" / "step_000000002.pt")["client"]
    assert set(client) == CLIENT_KEYS
    assert client["p_schedule"]["step"] == client["train_state"]["global_step"] == 2
    assert client["last_eval"]["val/count"] == 16 and client["world_size"] == 1
    # 2. resumed with the toy added: a checkpoint written before it existed leaves it fresh
    toys: list[Toy] = []
    _add_toy(monkeypatch, toys, "first")
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=2"]))
    assert toys[-1].loaded is None
    client = load_file(out / "checkpoints" / "step_000000004.pt")["client"]
    assert set(client) == CLIENT_KEYS | {"toy"} and client["toy"] == {"token": "first"}
    # 3. resumed again: the toy's saved state comes back through load_state_dict
    _add_toy(monkeypatch, toys, "second")
    run_mod.train(load_config(DEBUG_CONFIG, [*base, "train.epochs=3"]))
    assert toys[-1].loaded == {"token": "first"}
    client = load_file(out / "checkpoints" / "step_000000006.pt")["client"]
    assert client["toy"] == {"token": "second"}
    assert client["train_state"]["global_step"] == 6 and client["train_state"]["epoch"] == 3


@pytest.mark.timeout(300)
def test_recalibration_loader_is_built_once_and_logged_p_is_the_schedules(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(
        DEBUG_CONFIG,
        [
            *RUN,
            f"output_dir={out}",
            "train.epochs=3",
            "adder.p_decay_epochs=2.5",  # 5 steps: p > 1 at the evaluations of epochs 1 and 2
            "train.bn_recalibration_batches=1",
        ],
    )
    builds: list[tuple[str, int]] = []
    build_loader = build.build_loader

    def counting_build_loader(data_cfg, split, **kwargs):
        builds.append((split, kwargs["seed"]))
        return build_loader(data_cfg, split, **kwargs)

    monkeypatch.setattr(build, "build_loader", counting_build_loader)
    run_mod.train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e.get("bn_recalibration_batches") for e in evals] == [1, 1, None]
    recal_seed = cfg.train.seed + RECALIBRATION_SEED_OFFSET
    assert builds.count(("train", recal_seed)) == 1  # two recalibrations, one loader
    assert builds.count(("train", cfg.train.seed)) == 1 and builds.count(("val", cfg.train.seed)) == 1

    # p in the log is the schedule's at the step taken (step s of the log ran at value(s - 1)),
    # and it is the p the checkpointed adder layers hold
    p_sched = PSchedule.from_config(cfg.adder, decay_epochs=cfg.p_decay_epochs(), steps_per_epoch=2)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 7))
    assert [r["p"] for r in train_recs] == [p_sched.value(s - 1) for s in range(1, 7)]
    assert [r["p"] for r in train_recs] == pytest.approx([2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    assert [e["p"] for e in evals[:2]] == [p_sched.value(e["step"] - 1) for e in evals[:2]]
    for e in evals:
        model = load_file(out / "checkpoints" / f"step_{e['step']:09d}.pt")["engine"]["model"]
        layer_p = {v["p"] for k, v in model.items() if k.endswith("_extra_state")}
        assert layer_p == {p_sched.value(e["step"] - 1)}


@pytest.mark.timeout(300)
def test_preempted_on_an_epochs_last_step_evaluates_at_the_same_p_after_resume(tmp_path, monkeypatch):
    # SIGTERM after the last step of epoch 1 while p still decays: the checkpoint is written before
    # the evaluation, so the resumed run evaluates first. It must evaluate the model at the p of the
    # last step taken, value(step - 1), as the uninterrupted run does (not value(step)).
    # p: 2, 5/3, 4/3, 1; the recalibration logs the p it ran at (this tiny model's evaluation
    # alone hardly depends on p: its loss is ~ln 10)
    run = [*RUN, "train.epochs=2", "adder.p_decay_epochs=1.5", "train.bn_recalibration_batches=1"]
    full, split = tmp_path / "full", tmp_path / "split"
    run_mod.train(load_config(DEBUG_CONFIG, [*run, f"output_dir={full}"]))
    preempt_after(monkeypatch, 2, tmp_path / "fired")
    cfg = load_config(DEBUG_CONFIG, [*run, f"output_dir={split}"])
    assert run_mod.train(cfg) is None  # preempted at step 2, before epoch 1's evaluation
    run_mod.train(cfg)

    def records(out):
        return [
            {k: v for k, v in r.items() if k not in ("images_per_s", "time")}  # wall clock
            for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] in ("train", "eval")
        ]

    assert [(r["step"], r.get("p")) for r in records(split) if r["kind"] == "eval"] == [(2, 5 / 3), (4, None)]
    assert records(split) == records(full)
    last = [load_file(d / "checkpoints" / "step_000000004.pt")["engine"]["model"] for d in (full, split)]
    assert all(torch.equal(a, last[1][k]) for k, a in last[0].items() if isinstance(a, torch.Tensor))


@pytest.mark.timeout(300)
def test_the_adder_backend_is_the_layers_argument_not_process_state(tmp_path, monkeypatch):
    # adder.backend=reference reaches every adder op through the layers' backend= argument: each op
    # runs the reference (the CPU default would be the compiled fast path, 'cpu') while dispatch's
    # process-wide default stays unset, during the training steps and after the run.
    from addernet_dist.nn import adder_modules
    from addernet_dist.ops import dispatch

    assert "cpu" in dispatch.available_backends(torch.device("cpu"))  # else the default is the reference
    calls: list[tuple[str, str | None]] = []
    get_impl = dispatch.get_impl

    def recording_get_impl(name):
        calls.append((name, dispatch.get_default_backend()))
        return get_impl(name)

    models = []
    build_model = build.build_model

    def recording_build_model(cfg, num_classes):
        models.append(build_model(cfg, num_classes))
        return models[-1]

    monkeypatch.setattr(dispatch, "get_impl", recording_get_impl)
    monkeypatch.setattr(build, "build_model", recording_build_model)
    out = tmp_path / "run"
    overrides = [*RUN, "adder.backend=reference", "train.epochs=1", f"output_dir={out}"]
    run_mod.train(load_config(DEBUG_CONFIG, overrides))
    assert dispatch.get_default_backend() is None
    assert {m.backend for m in adder_modules(models[0])} == {"reference"}
    assert len(calls) > 0 and set(calls) == {("reference", None)}
