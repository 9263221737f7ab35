"""The ``train`` and ``deepspeed`` checks: a multi-process training smoke (train, checkpoint, resume,
evaluation, ``addernet-eval`` on the checkpoint), and ``launch``, which runs a command and logs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from addernet_dist.selftest.plan import CheckFailed, DeviceDescription

_SMOKE_CONFIG = """\
# written by addernet-selftest
model: {{name: resnet8, conv: adder}}
data:
  dataset: imagefolder
  root: {root}
  image_size: 32
  num_workers: 1
  augment: random_resized_crop
optim: {{lr: 0.05, schedule: cosine}}
# p still above 1 at both evaluations: BN is recalibrated there and the checkpoint's logits vary across
# images (with p = 1 after 1 epoch, a few momentum-0.1 steps left every logit = fc.bias, and the
# fused-vs-unfused logit comparison compared nothing)
adder: {{p_schedule: true, p_start: 2.0, p_end: 1.0, p_decay_epochs: 4, adaptive_lr: true, eta: 0.1}}
train:
  epochs: 1
  global_batch_size: {batch}
  log_every: 1
  ckpt_every_steps: 2
  eval_every_epochs: 1
  bn_recalibration_batches: 2
  keep_last: 2
  progress_bar: false
wandb: {{enabled: false}}
output_dir: {out}
resume: auto
"""


def launch(
    cmd: list[str], env_extra: dict, timeout: float, log: Path
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDERNET_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update(env_extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\nrc={proc.returncode}\n")
    if proc.returncode != 0:
        raise CheckFailed(
            f"`{' '.join(cmd[-6:])}` exited {proc.returncode} (log: {log}): {proc.stderr[-1500:]}"
        )
    return proc


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"no metrics.jsonl in {out}")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def write_smoke_config(path: Path, data: Path, batch: int, out: Path) -> Path:
    """The smoke run's config file (a JPEG tree at ``data``, global batch ``batch``, run folder ``out``)."""
    path.write_text(_SMOKE_CONFIG.format(root=data, batch=batch, out=out))
    return path


def override_args(overrides: dict[str, Any]) -> list[str]:
    """A plan's config overrides as the trainer's ``key=value`` arguments (booleans as true/false)."""
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()]


def check_train(desc: DeviceDescription, params: dict, workdir: Path, name: str = "train") -> dict:
    """Train → checkpoint → resume (one more epoch) → evaluation, multi-process."""
    from addernet_dist.data.jpeg_tree import make_jpeg_tree

    work = workdir / name
    work.mkdir(parents=True, exist_ok=True)
    data = work / "jpegs"
    if not data.exists():
        make_jpeg_tree(data, num_classes=4, train_per_class=4 * params["nproc"], val_per_class=3)
    out = work / "run"
    nproc = params["nproc"]
    batch = 4 * nproc
    cfg_path = write_smoke_config(work / "smoke.yaml", data, batch, out)
    ov = override_args(params["overrides"])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    log = workdir / f"{name}.log"
    t0 = time.perf_counter()
    launch(
        [*torchrun, "-m", "addernet_dist.train", "--config", str(cfg_path), *ov],
        params["env"],
        600,
        log,
    )
    first = _metrics(out)
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    if not ckpts:
        raise CheckFailed(f"the first run wrote no checkpoint in {out / 'checkpoints'}")
    steps1 = max(r["step"] for r in first if r.get("kind") == "train")
    # resume: the same folder, one more epoch
    epochs = params["epochs"] + 1
    launch(
        [
            *torchrun,
            "-m",
            "addernet_dist.train",
            "--config",
            str(cfg_path),
            *ov,
            f"train.epochs={epochs}",
        ],
        params["env"],
        600,
        log,
    )
    recs = _metrics(out)
    resumes = [r for r in recs if r.get("kind") == "resume"]
    if not resumes or resumes[-1]["step"] != steps1:
        raise CheckFailed(f"the second run did not resume at step {steps1}: {resumes}")
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not train or not all(math.isfinite(r["loss"]) for r in train):
        raise CheckFailed(
            f"non-finite or missing training losses: {[r.get('loss') for r in train]}"
        )
    if max(r["step"] for r in train) <= steps1:
        raise CheckFailed("the resumed run did not train past the checkpoint")
    if len(evals) < 2 or not all(0.0 <= r["top1"] <= 100.0 for r in evals):
        raise CheckFailed(f"expected an evaluation after each run, got {evals}")
    result = dict(
        nproc=nproc,
        steps=max(r["step"] for r in train),
        resumed_at=steps1,
        final_loss=train[-1]["loss"],
        eval_top1=evals[-1]["top1"],
        overrides=params["overrides"],
    )
    if params.get("eval_cli"):
        ck = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
        proc = launch(
            [*torchrun, "-m", "addernet_dist.evaluate", "--checkpoint", str(ck)],
            params["env"],
            300,
            log,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        res = json.loads(line)
        if res["count"] != evals[-1]["count"]:
            raise CheckFailed(
                f"addernet-eval counted {res['count']} images, the run's evaluation {evals[-1]['count']}"
            )
        result["eval_cli_top1"] = res["top1"]
        # Not top-1 equality: on 12 images one near-tie that a bf16 rounding flips moves top-1 by 8 %.
        # The logits of the fused model (the trainer's evaluation) against the unfused one (addernet-eval)
        logits_json = out / "logits.json"
        launch(
            [
                sys.executable,
                "-m",
                "addernet_dist.selftest",
                "--logits-worker",
                str(ck),
                "--logits-out",
                str(logits_json),
            ],
            params["env"],
            300,
            log,
        )
        result["logits"] = compare_logits(json.loads(logits_json.read_text()))
    result["seconds"] = time.perf_counter() - t0
    return result


# Fused (Adder+BN epilogue) vs unfused logits: the adder outputs are fp32 in both, but under bf16 autocast
# each layer's input is rounded to bf16 (2^-8 = 0.4 % steps), and a 1e-6 difference in the fused BN
# affine can move an element by one step; through ResNet-8's 8 fused layers we allow 2 % of the logit
# scale (an estimate: not measured on a GPU yet; the CPU smoke's reference backend gives 0). A wrong
# fusion (a negated BN scale) moves logits by their own scale (tests/integration/test_selftest.py).
LOGIT_RTOL = 2e-2
# Relative spread across images below which logits are constant (fc.bias for every image): a
# comparison would then compare nothing (tests/logit_checks.py).
MIN_LOGIT_SPREAD = 1e-3


def compare_logits(d: dict) -> dict:
    """Judge the logits worker's numbers (``logits_worker``); raises CheckFailed, returns ``d``."""
    if d["relative_spread"] <= MIN_LOGIT_SPREAD:
        raise CheckFailed(
            f"the checkpoint's logits are constant across the {d['images']} images (relative spread "
            f"{d['relative_spread']:.1e}): the fused/unfused comparison would compare nothing"
        )
    if d["max_abs_diff"] > LOGIT_RTOL * d["scale"]:
        raise CheckFailed(
            f"fused and unfused logits differ by {d['max_abs_diff']:.4g} on {d['images']} images, more than "
            f"{LOGIT_RTOL:g} × their scale {d['scale']:.4g} (the Adder+BN fusion computes another model)"
        )
    return d


def logits_worker(checkpoint: str, out: str) -> None:
    """One process: the val-split logits of ``checkpoint`` from the unfused model (as addernet-eval builds
    it) and from the same model with its Adder+BN pairs fused (as the trainer evaluates), under the run's
    autocast; writes their largest difference, scale and spread to ``out`` (JSON)."""
    import copy

    import torch

    from addernet_dist.config import config_from_dict
    from addernet_dist.data.base import IGNORE_LABEL
    from addernet_dist.device_policy import autocast
    from addernet_dist.distributed import destroy_distributed, init_distributed
    from addernet_dist.engine.base import maybe_fuse_adder_bn
    from addernet_dist.evaluate import build_eval_model
    from addernet_dist.trained_weights import read_trained_weights

    weights = read_trained_weights(Path(checkpoint))
    cfg = config_from_dict(weights.config)
    dist = init_distributed(cfg.train.device)
    model, loader, dtype = build_eval_model(cfg, weights.model, dist)
    fused = copy.deepcopy(model)
    pairs = maybe_fuse_adder_bn(fused, True, dist.device)
    logits: dict[str, list] = {"unfused": [], "fused": []}
    with torch.no_grad():
        for m in (model, fused):
            m.eval()
        for images, labels in loader:
            keep = (labels != IGNORE_LABEL).cpu()
            for name, m in (("unfused", model), ("fused", fused)):
                with autocast(dist.device.type, dtype):
                    y = m(images)
                logits[name].append(y.float().cpu()[keep])
    u, f = (torch.cat(logits[k]).double() for k in ("unfused", "fused"))
    res = dict(
        images=u.shape[0],
        fused_pairs=pairs,
        max_abs_diff=float((u - f).abs().max()),
        scale=float(u.abs().max()),
        relative_spread=float(u.std(0).mean() / u.abs().mean().clamp_min(1e-12)),
        top1_agree=int((u.argmax(1) == f.argmax(1)).sum()),
    )
    destroy_distributed(dist, True)
    Path(out).write_text(json.dumps(res))


def check_deepspeed(desc: DeviceDescription, params: dict, workdir: Path) -> dict:
    return check_train(desc, params, workdir, name="deepspeed")
