"""The training loss (addernet_dist/loss.py) and the distillation teacher (addernet_dist/distill.py):
label smoothing, soft targets, the KD term and mixup/cutmix against closed forms on fixed inputs; the
teacher frozen, outside the optimizer and the adaptive-LR layers; teacher files read weights-only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from addernet_dist.build import build_model
from addernet_dist.checkpoint import save_file
from addernet_dist.config import ConfigError, load_config
from addernet_dist.distill import build_teacher, load_teacher
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.interop import export
from addernet_dist.loss import BatchMixer, MixDraw, kd_loss, mix_batch, training_loss
from addernet_dist.models import create_model
from tests.train_helpers import DEBUG_CONFIG

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.0, 0.3]])
TEACHER = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 0.5, 2.5, 0.0], [0.3, 2.0, -0.5, 0.0]])
LABELS = torch.tensor([0, 2, 3])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# ---- the loss on fixed logits -------------------------------------------------------------------


def test_label_smoothing_matches_closed_form():
    eps, c = 0.1, LOGITS.shape[1]
    logp = _log_softmax(LOGITS.double().numpy())
    nll = -logp[np.arange(3), LABELS.numpy()]
    want = np.mean((1 - eps) * nll + eps * (-logp.mean(axis=1)))
    got, parts = training_loss(LOGITS, LABELS, label_smoothing=eps)
    assert parts == {}
    assert float(got) == pytest.approx(want, rel=1e-6)
    plain, _ = training_loss(LOGITS, LABELS)
    assert float(plain) == pytest.approx(nll.mean(), rel=1e-6)
    # the smoothing changes the loss by eps * (mean over classes of -log p - nll), averaged
    assert float(got - plain) == pytest.approx(eps * np.mean(-logp.mean(axis=1) - nll), rel=1e-5)
    assert abs(float(got - plain)) > 0.05
    assert c == 4


def test_soft_targets_with_smoothing_match_closed_form():
    eps = 0.2
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6], [0.0, 0.0, 0.0, 1.0]])
    logp = _log_softmax(LOGITS.double().numpy())
    t = (1 - eps) * soft.double().numpy() + eps / 4
    want = np.mean(-(t * logp).sum(axis=1))
    got, _ = training_loss(LOGITS, soft, label_smoothing=eps)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # a one-hot soft row gives the class-index loss
    one_hot = torch.nn.functional.one_hot(LABELS, 4).float()
    a, _ = training_loss(LOGITS, one_hot, label_smoothing=eps)
    b, _ = training_loss(LOGITS, LABELS, label_smoothing=eps)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_closed_form(temperature):
    w, eps, t = 0.7, 0.1, temperature
    s_np, t_np = LOGITS.double().numpy(), TEACHER.double().numpy()
    log_ps, log_pt = _log_softmax(s_np / t), _log_softmax(t_np / t)
    kd = t * t * np.mean((np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1))
    ce, _ = training_loss(LOGITS, LABELS, label_smoothing=eps)
    got, parts = training_loss(
        LOGITS, LABELS, TEACHER, label_smoothing=eps, kd_weight=w, temperature=t
    )
    assert float(kd_loss(LOGITS, TEACHER, t)) == pytest.approx(kd, rel=1e-5)
    assert float(parts["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(float(ce), rel=1e-6)  # label smoothing in KD's CE
    assert float(got) == pytest.approx((1 - w) * float(ce) + w * kd, rel=1e-5)
    assert kd > 0.01
    # identical logits: no KD term
    assert float(kd_loss(TEACHER, TEACHER, t)) == pytest.approx(0.0, abs=1e-6)


def test_kd_term_sends_no_gradient_to_the_teacher_logits():
    s = LOGITS.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    loss, _ = training_loss(s, LABELS, t, kd_weight=0.5, temperature=2.0)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_bf16_logits_are_upcast():
    got, _ = training_loss(LOGITS.bfloat16(), LABELS, TEACHER.bfloat16(), kd_weight=0.5)
    assert got.dtype == torch.float32


# ---- mixup / cutmix ------------------------------------------------------------------------------


def test_mixup_produces_the_closed_form_batch_and_targets():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6)
    y = torch.tensor([0, 1, 2, 1])
    perm, lam = torch.tensor([2, 0, 3, 1]), 0.3
    mixed, targets = mix_batch(x, y, 3, MixDraw(perm, lam))
    torch.testing.assert_close(mixed, 0.3 * x + 0.7 * x[[2, 0, 3, 1]])
    want = torch.tensor(
        [[0.3, 0.0, 0.7], [0.7, 0.3, 0.0], [0.0, 0.7, 0.3], [0.0, 1.0, 0.0]]
    )
    torch.testing.assert_close(targets, want)


def test_cutmix_pastes_the_box_and_weights_targets_by_area():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    y = torch.tensor([0, 1])
    mixed, targets = mix_batch(x, y, 2, MixDraw(torch.tensor([1, 0]), 0.9, box=(1, 3, 0, 2)))
    want = x.clone()
    want[0, :, 1:3, 0:2] = x[1, :, 1:3, 0:2]
    want[1, :, 1:3, 0:2] = x[0, :, 1:3, 0:2]
    torch.testing.assert_close(mixed, want)
    lam = 1 - 4 / 20  # the box's area decides, not the drawn lambda
    torch.testing.assert_close(targets, torch.tensor([[lam, 1 - lam], [1 - lam, lam]]))


def test_mixer_draws_and_resumes_with_the_rng():
    x, y = torch.randn(8, 3, 6, 6), torch.arange(8) % 4
    assert BatchMixer(4)(x, y)[1] is y  # both alphas 0: off
    assert BatchMixer(4, mixup_alpha=1.0, prob=0.0)(x, y)[1] is y
    mixer = BatchMixer(4, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    draws = [mixer.draw(8, 6, 6) for _ in range(40)]
    kinds = {d.box is not None for d in draws}
    assert kinds == {True, False}  # both mixup and cutmix batches
    for d in draws:
        assert sorted(d.perm.tolist()) == list(range(8)) and 0 <= d.lam <= 1
        if d.box is not None:
            y0, y1, x0, x1 = d.box
            assert 0 <= y0 <= y1 <= 6 and 0 <= x0 <= x1 <= 6
    torch.set_rng_state(state)  # what a resume restores (checkpoint's per-rank RNG state)
    again = [mixer.draw(8, 6, 6) for _ in range(40)]
    assert [(d.lam, d.box, d.perm.tolist()) for d in draws] == [
        (d.lam, d.box, d.perm.tolist()) for d in again
    ]
    only_cutmix = BatchMixer(4, cutmix_alpha=1.0)
    assert all(only_cutmix.draw(8, 6, 6).box is not None for _ in range(10))
    mixed, targets = mixer(x, y)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))


def test_mixup_config_keys_reach_the_mixer():
    cfg = load_config(DEBUG_CONFIG, ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
                                     "train.mixup_prob=0.5", "train.mixup_switch_prob=0.25"])
    m = BatchMixer.from_config(cfg.train, 10)
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob) == (0.2, 1.0, 0.5, 0.25)


# ---- the teacher in the engine -------------------------------------------------------------------


PLAIN = ["adder.backend=reference", "train.precision=fp32", "optim.warmup_epochs=0"]


def _teacher(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(5)
    return create_model("resnet8", conv="conv", num_classes=num_classes).eval().requires_grad_(False)


def test_teacher_is_frozen_outside_optimizer_and_adaptive_lr():
    cfg = load_config(DEBUG_CONFIG, [*PLAIN, "train.label_smoothing=0.1", "distill.weight=0.6",
                                     "distill.temperature=2.0"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10)
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    engine = DDPEngine(model, cfg, DistInfo(), steps_per_epoch=4, teacher=teacher)
    optimized = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert {id(w) for w in engine.adaptive.weights} <= {id(p) for p in model.parameters()}
    engine.train()
    assert not teacher.training
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    with torch.no_grad():  # the closed form on this step's logits (train-mode BN, same batch)
        s_logits = model(x)
        t_logits = teacher(x)
    ce, _ = training_loss(s_logits, y, label_smoothing=0.1)
    kd = kd_loss(s_logits, t_logits, 2.0)
    for m in model.modules():  # undo the BN running-stat update of the reference forward
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    loss = engine.forward_backward(x, y)
    assert float(loss) == pytest.approx(0.4 * float(ce) + 0.6 * float(kd), rel=1e-5)
    assert float(engine.loss_parts["kd"]) == pytest.approx(float(kd), rel=1e-5)
    engine.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # eval-mode BN: running stats untouched too
        assert torch.equal(v, before[k]), k


def test_without_teacher_the_loss_is_the_plain_cross_entropy():
    cfg = load_config(DEBUG_CONFIG, PLAIN)
    torch.manual_seed(0)
    engine = DDPEngine(build_model(cfg, num_classes=10), cfg, DistInfo(), steps_per_epoch=4)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    loss = engine.forward_backward(x, y)
    assert engine.loss_parts == {}
    assert math.isfinite(float(loss))


# ---- loading the teacher ----------------------------------------------------------------------------


def _ours(path, model, conv="conv"):
    """A checkpoint file in the trainer's format (verified footer, numpy RNG state inside)."""
    state = {
        "engine": {"model": model.state_dict(), "optimizer": None, "lr_scheduler": {}},
        "client": {"config": {"model": {"name": "resnet8", "conv": conv}},
                   "rng": [{"numpy": np.random.get_state()}]},
    }
    save_file(state, path)
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


def test_teacher_loads_from_our_checkpoint_export_and_plain_state_dict(tmp_path):
    src = _teacher(7)
    ours = _ours(tmp_path / "best.pt", src)
    plain = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, plain)
    for path in (ours, plain):
        t = load_teacher("resnet8", path, 7)
        assert _same(t, src) and not t.training
        assert not any(p.requires_grad for p in t.parameters())
    cfg = load_config(DEBUG_CONFIG, [f"distill.teacher_checkpoint={ours}", "distill.teacher=resnet8"])
    assert _same(build_teacher(cfg, 7, torch.device("cpu")), src)
    exported = export(_ours(tmp_path / "step_000000001.pt", src), tmp_path / "t.safetensors")
    # export() reads the checkpoint's config: give it a data section like the trainer's
    assert _same(load_teacher("resnet8", exported, 7), src)


def test_teacher_checkpoint_mismatch_is_a_clear_error(tmp_path):
    path = _ours(tmp_path / "best.pt", _teacher(7))
    with pytest.raises(ConfigError, match=r"(?s)does not match the teacher model .resnet8.*shape differs"):
        load_teacher("resnet8", path, 10)  # 7 classes in the file
    adder = _ours(tmp_path / "adder.pt", create_model("resnet8", conv="adder", num_classes=7), "adder")
    with pytest.raises(ConfigError, match=r"holds model.conv='adder'"):
        load_teacher("resnet8", adder, 7)
    with pytest.raises(ConfigError, match="is not a file"):
        load_teacher("resnet8", tmp_path / "nope.pt", 7)
    with pytest.raises(ConfigError, match="distill.teacher and distill.teacher_checkpoint"):
        load_config(DEBUG_CONFIG, ["distill.teacher=resnet8"])


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_teacher_file_is_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _teacher(7).state_dict(), "x": _Evil()}, path)
    with pytest.raises(ConfigError, match=r"weights_only=True"):
        load_teacher("resnet8", path, 7)
    assert "unpickled!" not in capsys.readouterr().out


# ---- the trainer: mixing of each batch, the CE and KD terms logged ---------------------------------


def _first_record(tmp_path, name: str, extra: list[str]) -> dict:
    import json

    from tests.train_helpers import run_python, train_cmd

    out = tmp_path / name
    args = ["train.epochs=1", "data.synthetic_train_size=32", "train.log_every=1", "train.precision=fp32",
            f"output_dir={out}", *extra]
    proc = run_python(train_cmd(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in recs if r.get("kind") == "train")


@pytest.mark.timeout(300)
def test_trainer_mixes_batches_and_logs_ce_and_kd_terms(tmp_path):
    teacher = _ours(tmp_path / "teacher.pt", _teacher(10))
    kd = [f"distill.teacher_checkpoint={teacher}", "distill.teacher=resnet8", "distill.weight=0.25"]
    plain = _first_record(tmp_path, "plain", kd)
    mixed = _first_record(tmp_path, "mixed", [*kd, "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0"])
    for rec in (plain, mixed):  # the step's loss is the logged terms' mix
        assert rec["loss"] == pytest.approx(0.75 * rec["loss_ce"] + 0.25 * rec["loss_kd"], rel=1e-5)
        assert rec["loss_kd"] > 0
    # same init, same first batch: only the mixing differs (the trainer applies it)
    assert abs(mixed["loss_ce"] - plain["loss_ce"]) > 1e-3
    assert "loss_ce" not in _first_record(tmp_path, "nokd", [])


# ---- distill.co_train: the teacher learns on the labels in the student's step ----------------------

CO = [*PLAIN, "distill.teacher=resnet8", "distill.co_train=true", "distill.weight=0.5",
      "train.label_smoothing=0.1"]


def _co_engine(seed: int):
    from addernet_dist.distill import build_teacher

    cfg = load_config(DEBUG_CONFIG, CO)
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=10)
    teacher = build_teacher(cfg, 10, torch.device("cpu"))
    return DDPEngine(model, cfg, DistInfo(), steps_per_epoch=4, teacher=teacher), model, teacher


def _batches(n: int):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(10, (8,), generator=g)) for _ in range(n)]


def test_co_trained_teacher_learns_on_its_own_cross_entropy_only():
    import copy

    engine, model, teacher = _co_engine(0)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}  # its own optimizer
    assert {id(p) for g in engine.co_teacher.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in teacher.parameters()
    }
    x, y = _batches(1)[0]
    ref = copy.deepcopy(teacher)
    ref_ce = torch.nn.functional.cross_entropy(ref(x), y, label_smoothing=0.1)
    ref_ce.backward()
    loss = engine.forward_backward(x, y)
    # the teacher's gradient is exactly its own CE's: the KD term does not reach it
    for (name, p), q in zip(teacher.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    parts = engine.loss_parts
    assert float(parts["teacher_ce"]) == pytest.approx(float(ref_ce.detach()), rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * float(parts["ce"]) + 0.5 * float(parts["kd"])
                                        + float(parts["teacher_ce"]), rel=1e-5)
    before = [p.detach().clone() for p in teacher.parameters()]
    engine.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, teacher.parameters(), strict=True))


def test_co_train_resume_is_exact():
    import copy

    batches = _batches(4)
    engine, model, teacher = _co_engine(0)
    for x, y in batches[:2]:
        engine.forward_backward(x, y)
        engine.step()
    saved = copy.deepcopy(engine.state_dict())
    assert set(saved) == {"model", "optimizer", "lr_scheduler", "teacher"}
    want = []
    for x, y in batches[2:]:
        want.append(float(engine.forward_backward(x, y)))
        engine.step()
    engine2, model2, teacher2 = _co_engine(1)  # other initial weights, student and teacher
    engine2.load_state_dict(saved)
    got = []
    for x, y in batches[2:]:
        got.append(float(engine2.forward_backward(x, y)))
        engine2.step()
    assert got == want
    for a, b in ((model, model2), (teacher, teacher2)):
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
    # a checkpoint without the teacher cannot resume a co-training run
    with pytest.raises(ValueError, match="no co-trained teacher"):
        engine2.load_state_dict({k: v for k, v in saved.items() if k != "teacher"})


def test_co_train_config_rules():
    with pytest.raises(ConfigError, match="co_train=true needs distill.teacher"):
        load_config(DEBUG_CONFIG, ["distill.co_train=true"])
    from addernet_dist.engine.deepspeed import DeepSpeedEngine

    cfg = load_config(DEBUG_CONFIG, [*CO, "engine=deepspeed"])
    with pytest.raises(ConfigError, match="engine=ddp only"):
        DeepSpeedEngine(build_model(cfg, 10), cfg, DistInfo(), steps_per_epoch=4)


def test_frozen_teacher_runs_under_the_students_autocast():
    cfg = load_config(DEBUG_CONFIG, [*PLAIN[:1], "train.precision=bf16", "distill.weight=0.5"])
    torch.manual_seed(0)
    teacher = _teacher()
    seen = []
    teacher.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    engine = DDPEngine(build_model(cfg, num_classes=10), cfg, DistInfo(), steps_per_epoch=4, teacher=teacher)
    loss = engine.forward_backward(torch.randn(8, 3, 8, 8), torch.randint(10, (8,)))
    assert seen == [torch.bfloat16] and engine.autocast_dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and engine.loss_parts["kd"].dtype == torch.float32


@pytest.mark.timeout(300)
def test_preempted_mixup_co_train_run_resumes_exactly(tmp_path, monkeypatch):
    """The real trainer, preempted after step 1 of 2 and resumed: mixup/cutmix draw the same lambdas
    and partners (the RNG state), and the co-trained teacher continues from the checkpoint (its
    weights, momentum and LR schedule), so step 2's loss and both final models are bit-identical."""
    from addernet_dist import run as run_mod
    from addernet_dist.checkpoint import load_file
    from addernet_dist.logging_utils import read_metrics
    from tests.helpers import FIXED_P_EPOCH as RUN
    from tests.helpers import preempt_after
    from tests.train_helpers import assert_same_state

    run = [*RUN, "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.label_smoothing=0.1",
           "distill.teacher=resnet8", "distill.co_train=true"]
    full, split = tmp_path / "full", tmp_path / "split"
    run_mod.train(load_config(DEBUG_CONFIG, [*run, f"output_dir={full}"]))
    preempt_after(monkeypatch, 1, tmp_path / "fired")
    cfg = load_config(DEBUG_CONFIG, [*run, f"output_dir={split}"])
    assert run_mod.train(cfg) is None  # preempted after step 1
    run_mod.train(cfg)

    def records(out):
        return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}

    a, b = records(full), records(split)
    assert sorted(a) == [1, 2]
    for key in ("loss", "loss_ce", "loss_kd", "loss_teacher_ce"):
        assert [a[s][key] for s in (1, 2)] == [b[s][key] for s in (1, 2)], key
    final = [load_file(d / "checkpoints" / "step_000000002.pt")["engine"] for d in (full, split)]
    assert_same_state(final[0]["model"], final[1]["model"])
    assert_same_state(final[0]["teacher"]["model"], final[1]["teacher"]["model"])
