"""What a user plots from metrics.jsonl (docs/training.md "Logging"): wall-clock time and
step/total_steps in every record, epochs counted alike in train and eval records, grad_norm on
every train record (clipping off), step/total and ETA on console lines, the closing summary,
and a curves plot titled from the run's config.

In-process runs (world size 1) of the debug config on 32 samples: 2 steps per epoch.
"""

from __future__ import annotations

import logging

import pytest
import torch

from addernet_dist import build
from addernet_dist import run as run_mod
from addernet_dist.analyze.curves import plot_title, run_summary
from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.logging_utils import Progress, read_metrics
from tests.helpers import SMALL_RUN
from tests.train_helpers import DEBUG_CONFIG

RUN = [
    *SMALL_RUN,
    "train.precision=fp32",
    "adder.backend=reference",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(DEBUG_CONFIG, [*RUN, f"output_dir={out}", "train.epochs=3"])
    assert cfg.train.grad_clip is None  # grad_norm must be logged without clipping too
    run_mod.train(cfg)
    return out, read_metrics(out / "metrics.jsonl")


@pytest.mark.timeout(300)
def test_every_record_has_time_step_and_total_steps(run):
    _, recs = run
    assert {r["kind"] for r in recs} == {"train", "eval", "summary"}
    times = [r["time"] for r in recs]
    assert times == sorted(times) and times[0] > 1.7e9  # UNIX seconds, in write order
    assert all(r["total_steps"] == 6 for r in recs)  # 3 epochs x 2 steps
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(300)
def test_train_and_eval_records_count_epochs_alike(run):
    _, recs = run
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    evals = [r for r in recs if r["kind"] == "eval"]
    # epochs done: step / steps_per_epoch in train records; an eval at the end of epoch e says e
    assert [train[s]["epoch"] for s in sorted(train)] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [(e["step"], e["epoch"]) for e in evals] == [(2, 1), (4, 2), (6, 3)]
    for e in evals:
        assert train[e["step"]]["epoch"] == e["epoch"]


@pytest.mark.timeout(300)
def test_grad_norm_is_logged_on_every_train_record_without_clipping(run):
    _, recs = run
    norms = [r["grad_norm"] for r in recs if r["kind"] == "train"]
    assert len(norms) == 6 and all(isinstance(n, float) and n > 0 for n in norms)
    assert len(set(norms)) == 6  # each step's own norm


@pytest.mark.timeout(300)
def test_summary_names_best_top1_its_step_wall_time_and_checkpoint(run):
    out, recs = run
    summary = recs[-1]
    assert summary["kind"] == "summary"
    finals = [r for r in recs if r["kind"] == "eval"]  # p_decay_epochs=0.5: p=1 from step 1 on
    best = max(finals, key=lambda r: r["top1"])
    assert summary["best_top1"] == best["top1"]
    # the first eval reaching the best (a later tie is not a new best)
    assert summary["best_step"] == min(r["step"] for r in finals if r["top1"] == best["top1"])
    assert summary["checkpoint"] == str(out / "checkpoints" / "best.pt")
    assert 0 < summary["wall_time_s"] <= summary["time"] - recs[0]["time"] + 60


def test_engine_measures_grad_norm_only_when_asked():
    cfg = load_config(DEBUG_CONFIG, [*RUN, "data.image_size=8"])
    torch.manual_seed(0)
    model = build.build_model(cfg, 10)
    engine = DDPEngine(model, cfg, DistInfo(), steps_per_epoch=2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    engine.forward_backward(x, y)
    assert engine.step().grad_norm is None  # a non-log step: nothing computed, nothing to sync
    engine.forward_backward(x, y)
    # what the optimizer steps with: the gradient after the eq. 33 scaling
    seen = {}

    def keep_grads(opt, args, kwargs):
        seen["g"] = [p.grad.clone() for p in model.parameters()]

    engine.optimizer.register_step_pre_hook(keep_grads)
    norm = engine.step(want_grad_norm=True).grad_norm
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen["g"]]))
    torch.testing.assert_close(norm, want)


def test_plain_progress_lines_show_step_of_total_and_eta(caplog, monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr("addernet_dist.logging_utils.time.perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="addernet_dist")
    prog = Progress(enabled=True, mode=False, total=100).start(initial=20)  # resumed at step 20
    prog.update(10, {"loss": 2.0})  # 10 steps in 10 s -> 70 left: 70 s
    prog.update(10, {"loss": 1.5})  # 20 steps in 30 s -> 60 left: 90 s
    prog.close()
    assert "step=30/100 loss=2 eta=0:01:10" in caplog.text
    assert "step=40/100 loss=1.5 eta=0:01:30" in caplog.text


@pytest.mark.timeout(300)
def test_curves_plot_is_titled_from_the_run_config(run):
    out, _ = run
    s = run_summary(out)
    assert s["title"] == "resnet8 (AdderNet) on synthetic, 3 epochs"
    assert s["train_epochs"] == [0, 1, 2]  # epochs-done 0.5, 1.0 -> epoch 0, ...
    assert plot_title({"a": s, "b": s}) == "resnet8 (AdderNet) on synthetic, 3 epochs: learning curves"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("adaptive", [True, False])
def test_deepspeed_grad_processor_measures_the_total_norm_on_asked_steps_only(adaptive):
    # engine=deepspeed without clipping: the pre-step hook measures the total norm only on steps the
    # trainer asks (log steps), as the norm of the gradient SGD steps with (after eq. 33)
    from addernet_dist.adaptive_lr import AdaptiveLRScaler
    from addernet_dist.engine.deepspeed import _alpha_fn
    from addernet_dist.engine.zero_norms import ShardedGradProcessor
    from addernet_dist.nn import adder_modules
    from tests.helpers import OddAdderNet, random_grads

    torch.manual_seed(3)
    net = OddAdderNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scaler = AdaptiveLRScaler(adder_modules(net), eta=0.2)
    proc = ShardedGradProcessor(
        [m.weight for m in adder_modules(net)], alpha_fn=_alpha_fn(scaler) if adaptive else None, max_norm=None
    )
    proc.attach(opt, opt)
    seen = {}

    def keep_grads(o, args, kwargs):  # runs after the processor's hook: the scaled gradient
        seen["g"] = [p.grad.clone() for p in net.parameters()]

    opt.register_step_pre_hook(keep_grads)
    random_grads(net, 0)
    opt.step()
    assert proc.last_total_norm is None  # not asked: nothing measured
    proc.want_total_norm = True
    random_grads(net, 1)
    opt.step()
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen["g"]]))
    torch.testing.assert_close(proc.last_total_norm, want)
