"""engine=deepspeed against engine=ddp on 2 CPU processes (DS_ACCELERATOR=cpu, gloo).

DeepSpeed's import + initialize costs ~5-10 s per process, so ONE torchrun runs every scenario
(this file executed as a script, see ``_worker``) and writes what it measured; the tests below only
read and assert. Scenarios, all on a tiny adder ResNet-8 (8x8 synthetic images, global batch 8,
eq. 33 on, clipping ACTIVE, lp schedule moving):

* ddp, z0, z1, z2: 3 steps each from the same init and batches -> losses, eq. 33 norms/alphas,
  total grad norm, final weights on both ranks;
* z2_gas: ZeRO-2 with micro-batch 2 x 2 accumulation steps, against ``manual_gas``: the same
  algorithm written out by hand with the trainer's own components (backward of each global
  micro-batch, AdaptiveLRScaler, clip_grad_norm_, SGD-NAG, LambdaLR);
* resume: ZeRO-1, save after 2 steps, 2 more steps; a FRESH engine (other init) loads and runs the
  same 2 steps -> identical losses and weights; the folder is converted with zero_to_state_dict;
* train: the real trainer (train.py) with engine=deepspeed, uninterrupted; the test then runs it
  again with a SIGKILL injected into rank 1 after step 5, relaunches it (resume=auto) and compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from addernet_dist.models import create_model
from tests.train_helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "debug.yaml"
STEPS = 3
TRAIN_RUN = [
    *TINY,
    "train.precision=bf16",  # the trainer runs (DeepSpeed, ZeRO-2) under bf16 autocast, on CPU too
    "train.epochs=1",
    "train.log_every=1",
    "train.ckpt_every_steps=2",
    "train.keep_last=2",
    # The run ends mid-decay (p = 1.5) so its evaluation recalibrates BN first: the evaluated and
    # saved model has logits that vary across images (after 8 steps with momentum 0.1 the running
    # statistics zero every feature and the logits equal fc.bias for every image, which makes the
    # converted-checkpoint comparison blind to the weights; asserted in the test).
    "adder.p_decay_epochs=2",
    "train.bn_recalibration_batches=2",
    "engine=deepspeed",
    "deepspeed.zero_stage=2",
]
FAULT_STEP = 5


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # The pure-PyTorch reference operator: what is compared here is the engines, and the compiled
    # CPU kernel's first-use build (minutes on a loaded 2-core machine) must not eat the timeout.
    env["ADDERNET_BACKEND"] = "reference"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: float, env=None, extra=()) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",  # rendezvous on a free localhost port
        *extra,
        *args,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


# -------------------------------------------------------------------------------------------------
# The worker (runs inside torchrun)
# -------------------------------------------------------------------------------------------------


def _snapshot(model: torch.nn.Module) -> dict:
    """state_dict copy (tensors cloned; adder layers' extra state is a plain dict)."""
    return {
        k: v.detach().clone() if torch.is_tensor(v) else dict(v)
        for k, v in model.state_dict().items()
    }


def _bf16_vs_fp32_eval(engine, cfg, base, val_loader, dist) -> dict:
    """The trainer's evaluation of DeepSpeed's bf16 model (bf16 weights, fp32 BN statistics, fed
    through engine.autocast_dtype) and the fp32 evaluation of the same weights (an fp32 twin holding
    the bf16 values, exactly), plus both models' logits on the 20 val images.

    After 2 steps with BN momentum 0.1 the running statistics zero every feature and the logits
    equal fc.bias for every image (top-1/top-5/loss then count labels and cannot tell the two
    evaluations apart), so the model first gets data-set BN statistics and off-init BN affine
    parameters (tests/logit_checks.spread_model, under the same autocast; identical on both ranks)."""
    from addernet_dist.build import build_model
    from addernet_dist.data import build_loader
    from addernet_dist.device_policy import autocast
    from addernet_dist.metrics import evaluate
    from tests.logit_checks import spread_model

    model = engine.unwrap()
    images, _ = next(iter(build_loader(base.data, "val", batch_size=20)))  # all 20, on every rank
    with autocast(dist.device.type, engine.autocast_dtype):
        spread_model(model, images)
    twin = build_model(cfg, val_loader.num_classes)
    fp32 = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    twin.load_state_dict(fp32)
    twin.eval()
    with torch.no_grad():
        with autocast(dist.device.type, engine.autocast_dtype):
            logits_bf16 = model(images).float()
        logits_fp32 = twin(images)
    try:  # the trainer's eval feeds the bf16 model through engine.autocast_dtype
        ev = evaluate(model, val_loader, dist, autocast_dtype=engine.autocast_dtype).as_dict()
    except RuntimeError as e:  # both ranks raise alike; recorded so that the test fails, not the worker
        ev = {"error": f"{type(e).__name__}: {e}"}
    return {
        "eval": ev,
        "eval_fp32": evaluate(twin, val_loader, dist).as_dict(),
        "logits_bf16": logits_bf16,
        "logits_fp32": logits_fp32,
    }


def _worker(out: Path) -> None:
    from addernet_dist.adaptive_lr import AdaptiveLRScaler
    from addernet_dist.build import build_data, build_engine, build_model, seed_everything
    from addernet_dist.config import load_config
    from addernet_dist.device_policy import autocast
    from addernet_dist.distributed import init_distributed
    from addernet_dist.nn import adder_modules, set_p
    from addernet_dist.optim import PSchedule, build_lr_scheduler, build_optimizer
    from addernet_dist.run import train

    dist = init_distributed("cpu")
    results: dict[str, dict] = {}

    def cfg_for(*extra: str):
        return load_config(CONFIG, [*TINY, f"output_dir={out / 'unused'}", *extra])

    base = cfg_for()
    loader, val_loader = build_data(base, dist)
    loader.set_epoch(0)
    batches = [b for _, b in zip(range(4), loader)]
    steps_per_epoch = len(loader)
    p_sched = PSchedule.from_config(
        base.adder, decay_epochs=base.p_decay_epochs(), steps_per_epoch=steps_per_epoch
    )

    def fresh_model(cfg, seed_shift=0):
        seed_everything(cfg.train.seed + seed_shift)
        return build_model(cfg, loader.num_classes)

    def run(engine, first: int, last: int, data=None) -> dict:
        rec: dict = {"loss": [], "norms": [], "alphas": [], "grad_norm": [], "p": [], "parts": []}
        for step in range(first, last):
            p = p_sched.value(step)
            set_p(engine.unwrap(), p)
            images, labels = (data or batches)[step]
            loss = engine.forward_backward(images, labels)
            stats = engine.step()
            rec["loss"].append(float(loss))
            rec["parts"].append({k: float(v) for k, v in engine.loss_parts.items()})
            rec["norms"].append(stats.adder_grad_norms.tolist())
            rec["alphas"].append(stats.adder_alphas.tolist())
            rec["grad_norm"].append(float(stats.grad_norm))
            rec["p"].append(p)
        rec["state"] = _snapshot(engine.unwrap())
        rec["lr"] = engine.lr
        return rec

    for name, extra in [
        ("ddp", ["engine=ddp"]),
        ("z0", ["engine=deepspeed", "deepspeed.zero_stage=0"]),
        ("z1", ["engine=deepspeed", "deepspeed.zero_stage=1"]),
        ("z2", ["engine=deepspeed", "deepspeed.zero_stage=2"]),
        # the original per-rank normalisation (scope=local) behaves the same under both engines
        ("ddp_local", ["engine=ddp", "adder.adaptive_scope=local"]),
        ("z2_local", ["engine=deepspeed", "deepspeed.zero_stage=2", "adder.adaptive_scope=local"]),
    ]:
        cfg = cfg_for(*extra)
        engine = build_engine(cfg, fresh_model(cfg), dist, steps_per_epoch)
        results[name] = run(engine, 0, STEPS)

    # The one loss (loss.py) with every term on: label smoothing, mixed (soft) targets, a frozen KD
    # teacher (never handed to DDP/DeepSpeed) -> the same losses, terms and weights under both engines.
    from addernet_dist.loss import BatchMixer
    from addernet_dist.models import create_model as _create

    torch.manual_seed(100 + dist.rank)
    mixer = BatchMixer(loader.num_classes, mixup_alpha=0.4, cutmix_alpha=1.0)
    mixed = [mixer(x, y) for x, y in batches]
    seed_everything(123)
    teacher = _create("resnet8", conv="conv", num_classes=loader.num_classes).eval().requires_grad_(False)
    for name, extra in [("ddp_kd", ["engine=ddp"]), ("z2_kd", ["engine=deepspeed", "deepspeed.zero_stage=2"])]:
        cfg = cfg_for(*extra, "train.label_smoothing=0.1", "distill.weight=0.7", "distill.temperature=3.0")
        engine = build_engine(cfg, fresh_model(cfg), dist, steps_per_epoch, teacher)
        results[name] = run(engine, 0, STEPS, mixed)
    results["teacher_grads"] = [p.grad is None for p in teacher.parameters()]

    # Gradient accumulation: ZeRO-2, micro 2 x 2 accumulation steps per rank.
    cfg = cfg_for("engine=deepspeed", "deepspeed.zero_stage=2", "deepspeed.micro_batch_size=2")
    engine = build_engine(cfg, fresh_model(cfg), dist, steps_per_epoch)
    results["z2_gas"] = run(engine, 0, STEPS)
    results["z2_gas"]["accum"] = engine.accum_steps

    # ... and the same algorithm spelled out by hand on the global batch (identical on each rank).
    model = fresh_model(cfg)
    adders = adder_modules(model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_lr_scheduler(
        opt, cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs
    )
    scaler = AdaptiveLRScaler(adders, cfg.adder.eta)
    manual: dict = {"loss": []}
    for step in range(STEPS):
        set_p(model, p_sched.value(step))
        images, labels = batches[step]
        gathered = [torch.empty_like(images) for _ in range(dist.world_size)]
        gathered_y = [torch.empty_like(labels) for _ in range(dist.world_size)]
        torch.distributed.all_gather(gathered, images)
        torch.distributed.all_gather(gathered_y, labels)
        micro = [
            (x, y) for gx, gy in zip(gathered, gathered_y) for x, y in zip(gx.split(2), gy.split(2))
        ]
        own = []
        for i, (x, y) in enumerate(micro):
            with autocast(dist.device.type, engine.autocast_dtype):  # train.precision=bf16: on CPU too
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            (loss / len(micro)).backward()
            if i // 2 == dist.rank:
                own.append(float(loss))
        scaler.scale_()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        manual["loss"].append(sum(own) / len(own))
    manual["state"] = _snapshot(model)
    results["manual_gas"] = manual

    # Save / load: ZeRO-1, 2 steps, save, 2 more; a fresh engine loads and repeats the last 2.
    cfg = cfg_for("engine=deepspeed", "deepspeed.zero_stage=1")
    engine = build_engine(cfg, fresh_model(cfg), dist, steps_per_epoch)
    first = run(engine, 0, 2)
    ckpt = out / "ckpt" / "step_000000002.pt"
    client = {"marker": "resume-test", "rank_of_saver": dist.rank, "tensor": torch.arange(3)}
    engine.save(ckpt, client)
    saved_state = _snapshot(engine.unwrap())
    cont = run(engine, 2, 4)
    engine2 = build_engine(cfg, fresh_model(cfg, seed_shift=17), dist, steps_per_epoch)
    loaded_client = engine2.load(ckpt)
    resumed = run(engine2, 2, 4)
    results["resume"] = {
        "first": first,
        "cont": cont,
        "resumed": resumed,
        "saved_state": saved_state,
        "client": loaded_client,
        "lr_at_save": first["lr"],
    }

    # DeepSpeed's bf16 weights (precision=bf16), ZeRO-2: close to fp32 DDP, checkpoint converts.
    cfg = cfg_for("engine=deepspeed", "deepspeed.zero_stage=2", "deepspeed.precision=bf16")
    engine = build_engine(cfg, fresh_model(cfg), dist, steps_per_epoch)
    results["bf16"] = run(engine, 0, 2)
    engine.save(out / "bf16ck" / "step_000000002.pt", {"config": cfg.model_dump(mode="json")})
    results["bf16"].update(_bf16_vs_fp32_eval(engine, cfg, base, val_loader, dist))

    torch.save(results, out / f"rank{dist.rank}.pt")
    # Last: the real trainer, uninterrupted (train() tears the process group down at its end).
    train(load_config(CONFIG, [*TRAIN_RUN, f"output_dir={out / 'train_ref'}", "resume=none"]))


# -------------------------------------------------------------------------------------------------
# Tests
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds_worker")
    proc = _torchrun([str(Path(__file__).resolve()), str(out)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"out": out, "rank0": ranks[0], "rank1": ranks[1]}


def _weights(state: dict) -> dict:
    """Parameters and adder extra state, without BN running statistics."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def _assert_states_close(a: dict, b: dict, rtol=1e-5, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            torch.testing.assert_close(
                a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
            )
        else:
            assert a[k] == b[k] if not torch.is_tensor(a[k]) else torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("stage", ["z0", "z1", "z2"])
def test_zero_stage_matches_ddp(worker, stage):
    for rank in ("rank0", "rank1"):
        ref, got = worker[rank]["ddp"], worker[rank][stage]
        assert got["p"] == ref["p"] and ref["p"][0] == 2.0 and ref["p"][-1] < 2.0
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        # eq. 33 norms are the GLOBAL gradient's, measured on sharded grads under ZeRO-1/2.
        torch.testing.assert_close(got["norms"], ref["norms"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got["alphas"], ref["alphas"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["grad_norm"], ref["grad_norm"], rtol=1e-4, atol=1e-6)
        assert min(ref["grad_norm"]) > 2.0  # clipping was active in every step
        assert got["lr"] == pytest.approx(ref["lr"])
        _assert_states_close(got["state"], ref["state"])
    # DeepSpeed all-gathers the updated partitions: both ranks hold the same weights (BN running
    # stats differ after the last forward, as under DDP: each rank saw its own batch).
    _assert_states_close(
        _weights(worker["rank0"][stage]["state"]), _weights(worker["rank1"][stage]["state"]), 0, 0
    )
    # The ranks saw different batches, so losses differ: the comparison above is not vacuous.
    assert worker["rank0"][stage]["loss"] != worker["rank1"][stage]["loss"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_distillation_smoothing_soft_targets_match_ddp(worker):
    """The shared loss (loss.Criterion) under both engines: KD from a frozen teacher, label smoothing
    0.1, mixup/cutmix soft targets -> same loss, CE and KD terms, weights; the teacher gets no grad."""
    for rank in ("rank0", "rank1"):
        ref, got = worker[rank]["ddp_kd"], worker[rank]["z2_kd"]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        for a, b in zip(got["parts"], ref["parts"], strict=True):
            assert a.keys() == {"ce", "kd"}
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert a["kd"] > 0
        # loss = (1 - w) CE + w KD with distill.weight=0.7
        for loss, parts in zip(ref["loss"], ref["parts"], strict=True):
            assert loss == pytest.approx(0.3 * parts["ce"] + 0.7 * parts["kd"], rel=1e-5)
        _assert_states_close(got["state"], ref["state"])
        assert all(worker[rank]["teacher_grads"])
    assert worker["rank0"]["z2_kd"]["loss"] != worker["rank0"]["z2"]["loss"]  # the terms acted


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_local_adaptive_scope_matches_ddp(worker):
    for rank in ("rank0", "rank1"):
        ref, got = worker[rank]["ddp_local"], worker[rank]["z2_local"]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["norms"], ref["norms"], rtol=1e-4, atol=1e-9)
        _assert_states_close(_weights(got["state"]), _weights(ref["state"]))
    # ... and is a different algorithm from the global one (the point of scope=global)
    local, glob = worker["rank0"]["z2_local"]["state"], worker["rank0"]["z2"]["state"]
    assert not torch.allclose(local["layer1.0.conv1.weight"], glob["layer1.0.conv1.weight"])
    # per-rank norms: the ranks see different local gradients
    assert worker["rank0"]["z2_local"]["norms"] != worker["rank1"]["z2_local"]["norms"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_single_process_run_without_torchrun(tmp_path):
    """python -m addernet_dist.train with engine=deepspeed and no launcher (world size 1). With
    adder.fuse_bn=true and bf16 weights: the engine fuses the Adder2d+BN pairs before ZeRO wraps the
    model, and the converter still rebuilds every fp32 master under the unfused keys (DeepSpeed names
    the masters by named_parameters(), i.e. the fused names)."""
    from addernet_dist.zero_to_state_dict import load_zero_checkpoint

    out = tmp_path / "single"
    cmd = [sys.executable, "-m", "addernet_dist.train", "--config", str(CONFIG), *TINY]
    cmd += ["data.synthetic_train_size=16", "engine=deepspeed", "deepspeed.zero_stage=2"]
    cmd += ["deepspeed.micro_batch_size=4", f"output_dir={out}", "train.epochs=1"]
    cmd += ["adder.fuse_bn=true", "deepspeed.precision=bf16"]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "fused 8 Adder2d+BatchNorm2d pairs" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("kind") == "train"] == [2]
    assert (out / "checkpoints" / "step_000000002.pt" / "MANIFEST").is_file()
    plain = load_zero_checkpoint(out / "checkpoints" / "step_000000002.pt")["engine"]["model"]
    unfused = create_model("resnet8", num_classes=10)
    assert plain.keys() == unfused.state_dict().keys()
    floats = [v for v in plain.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    unfused.load_state_dict(plain, strict=True)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_gradient_accumulation_matches_manual_reference(worker):
    for rank in ("rank0", "rank1"):
        got, ref = worker[rank]["z2_gas"], worker[rank]["manual_gas"]
        assert got["accum"] == 2
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        # Weights only: BN running stats legitimately differ (the manual reference runs every
        # rank's micro-batches through one model, so it updates them 4x per step, not 2x).
        _assert_states_close(_weights(got["state"]), _weights(ref["state"]))
    # micro-batch BN statistics make it a different run from the un-accumulated one
    assert worker["rank0"]["z2_gas"]["loss"][1:] != worker["rank0"]["z2"]["loss"][1:]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_save_load_continues_identically(worker):
    for rank in ("rank0", "rank1"):
        r = worker[rank]["resume"]
        assert r["resumed"]["loss"] == r["cont"]["loss"]  # bit-identical
        _assert_states_close(r["resumed"]["state"], r["cont"]["state"], 0, 0)
        assert r["resumed"]["lr"] == r["cont"]["lr"]
        client = r["client"]
        assert client["marker"] == "resume-test" and client["rank_of_saver"] == 0
        assert torch.equal(client["tensor"], torch.arange(3))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_checkpoint_folder_is_verified_and_converts_to_a_state_dict(worker):
    from addernet_dist import checkpoint
    from addernet_dist.zero_to_state_dict import main as convert_main

    folder = worker["out"] / "ckpt" / "step_000000002.pt"
    assert folder.is_dir() and checkpoint.verify(folder) is None
    assert not list(folder.parent.glob(".*tmp*"))  # the temp folder was renamed away
    out = worker["out"] / "plain.pt"
    assert convert_main([str(folder), str(out)]) == 0
    plain = checkpoint.load_file(out)
    saved = worker["rank0"]["resume"]["saved_state"]
    _assert_states_close(plain["engine"]["model"], saved, 0, 0)
    assert plain["client"]["marker"] == "resume-test"
    # p (extra state of every adder layer) travels with the weights.
    p_saved = [v["p"] for k, v in saved.items() if k.endswith("_extra_state")]
    assert p_saved and all(v == 2.0 - 1 / 8 for v in p_saved)


def _assert_converted_logits_vary(path) -> None:
    """The precondition of comparing evaluations: the converted model's val logits depend on the
    image (tests/logit_checks.py)."""
    from tests.logit_checks import assert_logits_vary, checkpoint_val_logits

    # After 8 steps fc.bias still picks one class for most images, so top-1 here counts labels;
    # the loss (compared at rel 1e-5) is what depends on the weights, and it does only if the
    # logits vary across images (relative spread measured 0.45 with the recalibrated BN).
    assert_logits_vary(checkpoint_val_logits(path), min_distinct_top1=1)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_converted_checkpoint_evaluates_like_the_training_run(worker, capsys):
    """addernet-eval on the converted final folder reproduces the trainer's last evaluation."""
    from addernet_dist.evaluate import main as eval_main
    from addernet_dist.zero_to_state_dict import convert

    run = worker["out"] / "train_ref"
    plain = convert(run / "checkpoints" / "step_000000008.pt", worker["out"] / "final.pt")
    assert eval_main(["--checkpoint", str(plain)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("kind") == "eval"][-1]
    assert last["step"] == 8
    _assert_converted_logits_vary(plain)
    assert (got["top1"], got["top5"], got["count"]) == (last["top1"], last["top5"], last["count"])
    assert got["loss"] == pytest.approx(last["loss"], rel=1e-5)


def _assert_bf16_eval_close_to_fp32(got: dict) -> None:
    """The trainer's bf16 evaluation (DeepSpeed bf16 weights under engine.autocast_dtype) against
    the fp32 evaluation of the same weights, on logits that vary across images.

    What may differ: under bf16 autocast the stem convolution and the classifier run in bf16, the
    adder layers and BN in fp32 (ops/amp.py). Measured on this tiny ResNet-8 (4 seeds, in-process):
    mean |logit difference| = 0.004-0.007 of the logits' std across images; rounding every pre-BN
    adder output to bf16 (forbidden, ops/amp.py) makes it 0.012-0.023, so 0.01 separates them."""
    from tests.logit_checks import assert_logits_vary

    lb, lf = got["logits_bf16"], got["logits_fp32"]
    assert_logits_vary(lf, min_distinct_top1=2)
    assert_logits_vary(lb, min_distinct_top1=2)
    err = float((lb - lf).abs().mean() / lf.std(0).mean())
    # > 0: the bf16 path really ran in bf16 (an evaluation in fp32 gives the twin's logits)
    assert 0 < err < 1e-2, err
    ev, ref = got["eval"], got["eval_fp32"]
    assert "error" not in ev, ev["error"]
    assert ev["val/count"] == ref["val/count"] == 20
    # the loss moves by 0.2-4e-4 relative; top-1/top-5: a near-tie may flip one image of 20
    assert ev["val/loss"] == pytest.approx(ref["val/loss"], rel=2e-3)
    assert abs(ev["val/top1"] - ref["val/top1"]) <= 5 and abs(ev["val/top5"] - ref["val/top5"]) <= 5


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bf16_precision_trains_close_to_fp32_and_converts_to_fp32_masters(worker):
    from addernet_dist.zero_to_state_dict import load_zero_checkpoint

    ref, got = worker["rank0"]["ddp"], worker["rank0"]["bf16"]
    # bf16 forward/backward: percent-level agreement, not float tolerance.
    torch.testing.assert_close(got["loss"], ref["loss"][:2], rtol=2e-2, atol=0)
    torch.testing.assert_close(got["norms"][0], ref["norms"][0], rtol=0.1, atol=0)
    assert got["grad_norm"][0] == pytest.approx(ref["grad_norm"][0], rel=1e-2)
    _assert_bf16_eval_close_to_fp32(got)
    weights = _weights(got["state"])
    assert weights["layer1.0.conv1.weight"].dtype == torch.bfloat16
    # BN statistics never in 16 bits (issue 11): fp32 buffers next to bf16 weights, and they moved
    stats = {k: v for k, v in got["state"].items() if "running_" in k}
    assert stats and all(v.dtype == torch.float32 for v in stats.values()), stats.keys()
    assert not torch.equal(stats["bn1.running_mean"], torch.zeros_like(stats["bn1.running_mean"]))
    plain = load_zero_checkpoint(worker["out"] / "bf16ck" / "step_000000002.pt")["engine"]["model"]
    for k, v in weights.items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert plain[k].dtype == torch.float32, k
            # the fp32 master rounds to the bf16 weight the model ran with ...
            torch.testing.assert_close(plain[k].to(torch.bfloat16), v, rtol=0, atol=0)
    w = plain["layer1.0.conv1.weight"]
    # ... and carries more bits than it: it comes from the optimizer shards, not the bf16 copy.
    assert not torch.equal(w, w.to(torch.bfloat16).float())


def _losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigkill_and_auto_resume_continues_with_same_losses(worker, tmp_path):
    ref_dir = worker["out"] / "train_ref"
    ref = _losses(ref_dir / "metrics.jsonl")
    assert sorted(ref) == list(range(1, 9))
    run_dir = tmp_path / "killed"
    env = _env()
    env.update(
        ADDERNET_FAULT_STEP=str(FAULT_STEP),
        ADDERNET_FAULT_RANK="1",
        ADDERNET_FAULT_MARKER=str(tmp_path / "fault_fired"),
    )
    args = ["-m", "addernet_dist.train", "--config", str(CONFIG), *TRAIN_RUN]
    args += [f"output_dir={run_dir}", "resume=auto"]
    killed = _torchrun(args, 400, env)
    assert killed.returncode != 0 and (tmp_path / "fault_fired").exists()  # rank 1 really died
    # Relaunched (resume=auto picks the step-4 folder up by itself), this time with DeepSpeed's
    # own launcher through launch/deepspeed.sh. (A separate launch, not --max-restarts: torchrun's
    # restart of a --standalone gloo group fails to reconnect on this torch version whatever the
    # engine, see docs/deepspeed.md.)
    env.update(NPROC="2", MASTER_PORT=str(_free_port()))
    script = [str(ROOT / "launch" / "deepspeed.sh"), str(CONFIG), *TRAIN_RUN[:-2]]
    script += ["deepspeed.zero_stage=2", f"output_dir={run_dir}", "resume=auto"]
    proc = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "spawned with command" in proc.stdout + proc.stderr  # DeepSpeed's launch.py ran it
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [r["step"] for r in records if r.get("kind") == "resume"]
    assert resumes == [4]  # resumed once, from the step-4 folder (saved before the kill at 5)
    got = _losses(run_dir / "metrics.jsonl")  # steps 5 appear twice: last write wins
    assert sorted(got) == sorted(ref)
    assert got == ref  # bit-identical per-step losses after the resume
    # keep_last=2 pruned the older folders; best.pt is a verified folder copy
    from addernet_dist import checkpoint

    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_000000006.pt", "step_000000008.pt"]
    assert checkpoint.verify(run_dir / "checkpoints" / "best.pt") is None


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
