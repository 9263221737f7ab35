"""addernet-selftest: the first command to run on a new GPU node (≤ 10 minutes), or on a CPU machine.

    addernet-selftest                      # full form for this machine; report in ./selftest/
    addernet-selftest --out /tmp/st        # report.json + report.md there
    addernet-selftest --quick              # reduced form (what CI runs on CPU, ~1 min)
    addernet-selftest --only env,kernels   # a subset of the checks
    addernet-selftest --plan               # print the checks this machine would run, run nothing

Checks (``plan_checks`` decides them from a ``DeviceDescription``; a pure function, so the GPU plan is
tested on CPU machines):

* ``env`` — GPU model, compute capability, driver, CUDA build, torch, Triton, DALI, NCCL, DeepSpeed;
  fails naming the driver if it is older than the installed CUDA build needs.
* ``kernels`` — every Triton adder code path against the pure-PyTorch reference (the specification):
  p = 1, 2 and general; ∂X lp and hardtanh; ∂F full and sign, deterministic and atomic; fp32 / bf16 /
  fp16; channels_last; the BN-statistics, affine and affine+residual+ReLU epilogues. On CUDA the
  compiled kernels; on CPU the same kernel code through the Triton interpreter.
* ``speed`` (CUDA) — the forward on ResNet-50 layer shapes against cuDNN ``conv2d`` (fp32, TF32 off),
  with the fraction of the FP32 issue roofline (an adder MAC is two FP32 instructions).
* ``tiles`` — the kernel-tile tuner over the real process group (NCCL on a GPU node): rank 0 times the
  tiles of a few layer shapes and broadcasts them; every rank must launch the same ones.
* ``train`` — a multi-process training smoke: DDP over NCCL (gloo on CPU), bf16, fused Adder+BN, DALI
  ``mixed`` decoding (DALI CPU on CPU) of a generated JPEG tree, a checkpoint, a resume that continues
  it, evaluation during training and ``addernet-eval`` on the checkpoint.
* ``deepspeed`` — the same trainer under DeepSpeed ZeRO-2 (``DS_ACCELERATOR=cpu`` and gloo on CPU).

Writes ``report.json`` and ``report.md`` and exits 1 if any check failed (2 on a usage error).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------------------------
# Device description and the pure decisions made from it
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDescription:
    kind: str  # "cuda" | "cpu"
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    count: int = 0  # GPUs on this node
    sms: int | None = None  # streaming multiprocessors per GPU
    clock_mhz: float | None = None  # max SM clock
    driver: str | None = None  # e.g. "550.54.15"
    cuda_build: str | None = None  # torch.version.cuda, e.g. "13.0"


def describe_device() -> DeviceDescription:
    """This machine (the only impure part of the planning)."""
    cuda_build = torch.version.cuda
    if not torch.cuda.is_available():
        return DeviceDescription("cpu", platform.processor() or "cpu", cuda_build=cuda_build)
    props = torch.cuda.get_device_properties(0)
    smi = _nvidia_smi(["driver_version", "clocks.max.sm"])
    clock = float(smi[1]) if smi and _is_number(smi[1]) else None
    return DeviceDescription(
        "cuda",
        props.name,
        (props.major, props.minor),
        torch.cuda.device_count(),
        props.multi_processor_count,
        clock,
        smi[0] if smi else None,
        cuda_build,
    )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _nvidia_smi(fields: list[str]) -> list[str] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [s.strip() for s in out.stdout.splitlines()[0].split(",")]


# Minimum Linux driver per CUDA major version under CUDA's minor-version compatibility (NVIDIA's CUDA
# compatibility guide, "CUDA Toolkit and Minimum Required Driver Version"): a CUDA 13.x build of torch
# needs ≥ 580.65.06, 12.x ≥ 525.60.13, 11.x ≥ 450.80.02.
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}


def driver_problem(driver: str | None, cuda_build: str | None) -> str | None:
    """A sentence naming the driver if it is too old for the CUDA build, else None."""
    if not driver or not cuda_build:
        return None
    major = int(cuda_build.split(".")[0])
    need = MIN_DRIVER.get(major)
    if need is None:
        return None
    have = tuple(int(v) for v in re.findall(r"\d+", driver)[:3])
    if have < need:
        return (
            f"NVIDIA driver {driver} is too old for this CUDA {cuda_build} build of torch (needs "
            f"≥ {'.'.join(map(str, need))}): upgrade the driver, or install a torch build for an older "
            "CUDA (e.g. the cu12x wheels)"
        )
    return None


def fp32_adder_roofline(sms: int, clock_mhz: float) -> float:
    """Adder MACs/s at the FP32 issue roofline: 128 FP32 lanes per SM, 2 instructions per adder MAC
    (``FADD d = x − w``, ``FADD acc += |d|``) — i.e. half the FP32 FMA rate."""
    return sms * 128 * clock_mhz * 1e6 / 2


@dataclass(frozen=True)
class Check:
    name: str  # env | kernels | speed | train | deepspeed
    params: dict[str, Any] = field(default_factory=dict)


CHECK_NAMES = ("env", "kernels", "speed", "tiles", "train", "deepspeed")


def kernel_cases(quick: bool = False) -> list[dict[str, Any]]:
    """Every code path of the Triton kernels once (quick: one per kernel family)."""
    base = dict(
        p=1.0,
        grad_x="lp",
        grad_w="full",
        deterministic=True,
        dtype="float32",
        channels_last=False,
        epilogue="none",
    )
    cases = []
    for p in (1.0, 2.0, 1.5):
        for gx in ("lp", "hardtanh"):
            cases.append({**base, "p": p, "grad_x": gx})
    for gw, det in (("sign", True), ("sign", False), ("full", False)):
        cases.append({**base, "grad_w": gw, "deterministic": det})
    for dt in ("bfloat16", "float16"):
        cases.append({**base, "dtype": dt})
        cases.append({**base, "dtype": dt, "p": 1.5, "channels_last": True})
    cases.append({**base, "channels_last": True, "p": 2.0})
    for epi in ("bn_stats", "affine", "affine_res_relu"):
        cases.append({**base, "epilogue": epi})
    cases.append({**base, "epilogue": "bn_stats", "p": 1.5, "dtype": "bfloat16"})
    if quick:
        keep = (
            0,
            5,
            6,
            9,
            len(cases) - 2,
        )  # p=1, general p hardtanh, ∂F sign, bf16, affine+res+relu
        cases = [cases[i] for i in keep]
    return cases


def train_smoke_overrides(desc: DeviceDescription, quick: bool = False) -> dict[str, Any]:
    """How the training smoke runs on this device: processes, backend, fusion, DALI device, ..."""
    if desc.kind == "cuda":
        return dict(
            nproc=max(1, min(desc.count, 8)),
            distributed_backend="nccl",
            overrides={
                "train.device": "cuda",
                "train.bf16": True,
                "train.channels_last": True,
                "adder.backend": "triton",
                "adder.fuse_bn": True,
                "data.loader": "dali",
                "data.dali.device": "gpu",  # DALI "mixed": nvJPEG decode on the GPU
            },
            # the first tile of each list, no timing: ResNet-8's shapes × three p code paths × 4-5
            # tiles would cost minutes of ptxas; the tile mechanism has its own tests and the speed check
            env={"ADDERNET_TILE_TUNING": "0"},
        )
    return dict(
        nproc=2,
        distributed_backend="gloo",
        overrides={
            "train.device": "cpu",
            "train.bf16": True,
            # quick (CI): the reference operator, whose cost at these sizes is negligible; the full
            # CPU form runs the compiled CPU fast path (its first build takes minutes on 2 cores).
            "adder.backend": "reference" if quick else "cpu",
            "adder.fuse_bn": True,
            "data.loader": "dali",
            "data.dali.device": "cpu",
        },
        env={},
    )


def plan_checks(desc: DeviceDescription, quick: bool = False) -> list[Check]:
    """The checks for a device description (pure: tests call it with a CUDA description on CPU)."""
    cuda = desc.kind == "cuda"
    checks = [Check("env")]
    checks.append(
        Check(
            "kernels",
            dict(
                mode="compiled" if cuda else "interpreter",
                device="cuda" if cuda else "cpu",
                # GPU: sizes with several tiles in every direction; interpreter: tiny (its cost is per op)
                shape=dict(n=4, c=19, o=35, h=15, k=3, stride=2, pad=1)
                if cuda
                else dict(n=2, c=6, o=5, h=7, k=3, stride=2, pad=1),
                cases=kernel_cases(quick),
            ),
        )
    )
    if cuda:
        checks.append(Check("speed", dict(model="resnet50", batch=64, shapes="representative")))
    if not quick:
        # the tile tuner's rank agreement over the real process group (NCCL on a GPU node)
        checks.append(
            Check(
                "tiles",
                dict(
                    nproc=max(2, min(desc.count, 8)) if cuda else 2,
                    mode="compiled" if cuda else "interpreter",
                    env={},
                ),
            )
        )
    smoke = train_smoke_overrides(desc, quick)
    checks.append(Check("train", dict(**smoke, epochs=1 if quick else 2, eval_cli=not quick)))
    if not quick:
        ds = train_smoke_overrides(desc, quick)
        ds["overrides"] = {
            **ds["overrides"],
            "engine": "deepspeed",
            "deepspeed.zero_stage": 2,
            "adder.fuse_bn": False if not cuda else True,
        }
        if not cuda:
            ds["env"] = {"DS_ACCELERATOR": "cpu"}
        checks.append(Check("deepspeed", dict(**ds, epochs=1, eval_cli=False)))
    return checks


# ------------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------------
class CheckFailed(AssertionError):
    pass


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 — a broken install is reported, not raised
        return f"not importable ({type(e).__name__}: {str(e)[:80]})"
    return getattr(m, "__version__", "?")


def check_env(desc: DeviceDescription, params: dict) -> dict:
    nccl = None
    with contextlib.suppress(Exception):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    info = {
        "device": desc.name,
        "gpus": desc.count,
        "compute_capability": ".".join(map(str, desc.capability)) if desc.capability else None,
        "sms": desc.sms,
        "max_sm_clock_mhz": desc.clock_mhz,
        "driver": desc.driver,
        "cuda_build": desc.cuda_build,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "nccl": nccl,
        "deepspeed": _version("deepspeed") if _importable_quietly("deepspeed") else None,
    }
    problem = driver_problem(desc.driver, desc.cuda_build)
    if problem:
        raise CheckFailed(problem + f" | {info}")
    if desc.kind == "cuda" and desc.capability and desc.capability < (8, 0):
        raise CheckFailed(
            f"{desc.name} has compute capability {desc.capability}; the Triton adder kernels are built "
            "and tested for sm_80 and newer (A100, H100)"
        )
    return info


def _importable_quietly(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Allowed error relative to the largest reference magnitude of each result: fp32 compute sums K ≤ ~200
# terms here (≈ 1e-6 relative); 16-bit storage rounds each stored result to 2^-8 (bf16) / 2^-11 (fp16).
_TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}


@contextlib.contextmanager
def _kernel_module(mode: str):
    if mode == "interpreter":
        from addernet_dist.kernels.triton_testing import interpreted_modules

        with interpreted_modules("addernet_dist.kernels.triton_adder") as (ta,):
            yield ta
    else:
        from addernet_dist.kernels import tile_tuner
        from addernet_dist.kernels import triton_adder as ta

        # correctness of every code path with the first tile of each list: timing tiles here would
        # cost minutes of ptxas; the speed check tunes
        saved = tile_tuner.TUNING_ENABLED
        tile_tuner.TUNING_ENABLED = False
        try:
            yield ta
        finally:
            tile_tuner.TUNING_ENABLED = saved


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    ref = ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def run_kernel_case(ta, case: dict, shape: dict, device: str) -> dict[str, float]:
    """One code path vs the reference on the same (16-bit-rounded) inputs, in fp64. Returns errors."""
    from addernet_dist.ops import reference

    g = torch.Generator().manual_seed(0)
    n, c, o, h, k = shape["n"], shape["c"], shape["o"], shape["h"], shape["k"]
    st, pad = shape["stride"], shape["pad"]
    dt = _DTYPES[case["dtype"]]
    x = torch.randn(n, c, h, h, generator=g).to(dt)
    w = (0.5 * torch.randn(o, c, k, k, generator=g)).to(dt)
    p_out = (h + 2 * pad - k) // st + 1
    gy = torch.randn(n, o, p_out, p_out, generator=g).to(dt)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    xd, wd, gd = (
        t.to(device).to(memory_format=fmt) if t.dim() == 4 else t.to(device) for t in (x, w, gy)
    )
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y_ref = reference.adder2d_reference(
        x64, w64, stride=st, padding=pad, p=case["p"], grad_x=case["grad_x"], grad_w=case["grad_w"]
    )
    errs: dict[str, float] = {}
    tol = _TOL[case["dtype"]]
    epi = case["epilogue"]
    if epi == "none":
        xk, wk = xd.clone().requires_grad_(True), wd.clone().requires_grad_(True)
        y = ta.adder2d_triton(
            xk,
            wk,
            stride=st,
            padding=pad,
            p=case["p"],
            grad_x=case["grad_x"],
            grad_w=case["grad_w"],
            deterministic=case["deterministic"],
        )
        y.backward(gd)
        y_ref.backward(gy.double())
        if case["channels_last"] and not y.is_contiguous(memory_format=torch.channels_last):
            raise CheckFailed("channels_last input gave a non-channels_last output")
        errs = {
            "y": _rel_err(y, y_ref),
            "dx": _rel_err(xk.grad, x64.grad),
            "dw": _rel_err(wk.grad, w64.grad),
        }
    else:
        conv = ((st, st), (pad, pad), (1, 1))
        y_ref = y_ref.detach()
        if epi == "bn_stats":
            y, (mean, var) = ta.adder2d_forward(
                xd, wd, *conv, case["p"], (p_out, p_out), bn_stats=True
            )
            errs = {
                "y": _rel_err(y, y_ref),
                # the statistics of what was stored (the kernel's promise), relative to their spread
                "mean": float(
                    (mean.double().cpu() - y.double().cpu().mean((0, 2, 3))).abs().max()
                    / y_ref.std()
                ),
                "var": _rel_err(var, y.double().cpu().var((0, 2, 3), unbiased=False)),
            }
        else:
            gen = torch.Generator().manual_seed(1)
            center = y_ref.mean((0, 2, 3)).float()
            scale = (torch.rand(o, generator=gen) + 0.5) / y_ref.std((0, 2, 3)).float()
            shift = torch.randn(o, generator=gen)
            res = (
                torch.randn(n, o, p_out, p_out, generator=gen).to(dt)
                if epi == "affine_res_relu"
                else None
            )
            kw = dict(scale=scale.to(device), shift=shift.to(device), center=center.to(device))
            if res is not None:
                kw.update(residual=res.to(device).to(memory_format=fmt), relu=True)
            y, _ = ta.adder2d_forward(xd, wd, *conv, case["p"], (p_out, p_out), **kw)
            ref = (y_ref - center.double()[None, :, None, None]) * scale.double()[
                None, :, None, None
            ]
            ref = ref + shift.double()[None, :, None, None]
            if res is not None:
                ref = torch.relu(ref + res.double())
            errs = {"y": _rel_err(y, ref)}
    bad = {key: v for key, v in errs.items() if not (v <= tol)}  # NaN fails too
    if bad:
        raise CheckFailed(
            f"{_case_label(case)}: errors {bad} exceed {tol:g} (relative to the reference)"
        )
    return errs


def _case_label(case: dict) -> str:
    parts = [
        f"p={case['p']:g}",
        case["grad_x"],
        f"dF={case['grad_w']}",
        "det" if case["deterministic"] else "atomic",
        case["dtype"],
    ]
    if case["channels_last"]:
        parts.append("channels_last")
    if case["epilogue"] != "none":
        parts.append(f"epi={case['epilogue']}")
    return " ".join(parts)


def check_kernels(desc: DeviceDescription, params: dict) -> dict:
    rows, failures = [], []
    with _kernel_module(params["mode"]) as ta:
        for case in params["cases"]:
            t0 = time.perf_counter()
            try:
                errs = run_kernel_case(ta, case, params["shape"], params["device"])
                rows.append(
                    dict(case=_case_label(case), ok=True, errors=errs, s=time.perf_counter() - t0)
                )
            except Exception as e:  # noqa: BLE001 — every case runs; the check fails at the end
                failures.append(f"{_case_label(case)}: {type(e).__name__}: {e}")
                rows.append(dict(case=_case_label(case), ok=False, error=str(e)[:500]))
    if failures:
        raise CheckFailed(
            f"{len(failures)} of {len(rows)} kernel cases failed: " + "; ".join(failures)
        )
    return {"mode": params["mode"], "cases": rows}


def check_speed(desc: DeviceDescription, params: dict) -> dict:
    """Forward of the adder kernel vs cuDNN conv2d (fp32, TF32 off) on ResNet-50 layer shapes."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from addernet_dist.kernels import triton_adder as ta
    from addernet_dist.layer_shapes import adder_layer_shapes

    shapes = adder_layer_shapes(params["model"])
    if params.get("shapes") == "representative":
        # the 3×3 stride-1 layer of each stage and the two 1×1 layers of stage 3 (the most numerous):
        # 6 of the 22 distinct shapes, 24 of the 52 layers; each is tuned (5 tiles × 2–6 s of ptxas)
        shapes = [s for s in shapes if s.k == 3 and s.stride == 1] + [
            s for s in shapes if s.k == 1 and s.h == 14 and s.count >= 5
        ]
    roof = fp32_adder_roofline(desc.sms, desc.clock_mhz) if desc.sms and desc.clock_mhz else None
    n = params["batch"]
    rows = []
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for s in shapes:
            x = torch.randn(n, s.c, s.h, s.h, device="cuda")
            w = torch.randn(s.o, s.c, s.k, s.k, device="cuda")
            args = ((s.stride,) * 2, (s.pad,) * 2, (1, 1), 1.0, (s.p, s.p))
            t_add, t_conv = (
                do_bench(fn, warmup=10, rep=50) * 1e-3
                for fn in (
                    partial(ta.adder2d_forward, x, w, *args),
                    partial(F.conv2d, x, w, stride=s.stride, padding=s.pad),
                )
            )
            macs = n * s.macs_per_image
            rows.append(
                dict(
                    layer=s.label,
                    count=s.count,
                    adder_ms=t_add * 1e3,
                    conv_ms=t_conv * 1e3,
                    adder_tmacs=macs / t_add / 1e12,
                    conv_over_adder=t_conv / t_add,
                    roofline_fraction=(macs / t_add / roof) if roof else None,
                )
            )
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    return {"batch": n, "fp32_adder_roofline_tmacs": roof / 1e12 if roof else None, "rows": rows}


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
adder: {{p_schedule: true, p_start: 2.0, p_end: 1.0, p_decay_epochs: 1, adaptive_lr: true, eta: 0.1}}
train:
  epochs: 1
  global_batch_size: {batch}
  log_every: 1
  ckpt_every_steps: 2
  eval_every_epochs: 1
  keep_last: 2
  progress_bar: false
wandb: {{enabled: false}}
output_dir: {out}
resume: auto
"""


def _launch(
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
    cfg_path = work / "smoke.yaml"
    cfg_path.write_text(_SMOKE_CONFIG.format(root=data, batch=batch, out=out))
    ov = [
        f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in params["overrides"].items()
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    log = workdir / f"{name}.log"
    t0 = time.perf_counter()
    _launch(
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
    _launch(
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
        proc = _launch(
            [*torchrun, "-m", "addernet_dist.evaluate", "--checkpoint", str(ck)],
            params["env"],
            300,
            log,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        res = json.loads(line)
        if abs(res["top1"] - evals[-1]["top1"]) > 1e-6:
            raise CheckFailed(
                f"addernet-eval top-1 {res['top1']} != the run's last eval {evals[-1]['top1']}"
            )
        result["eval_cli_top1"] = res["top1"]
    result["seconds"] = time.perf_counter() - t0
    return result


def check_deepspeed(desc: DeviceDescription, params: dict, workdir: Path) -> dict:
    return check_train(desc, params, workdir, name="deepspeed")


def check_tiles(desc: DeviceDescription, params: dict, workdir: Path) -> dict:
    """Every rank of a real process group launches the same tiles (rank 0 times and broadcasts)."""
    out = workdir / "tiles"
    out.mkdir(parents=True, exist_ok=True)
    nproc = params["nproc"]
    if desc.kind == "cuda" and desc.count < 2:
        return {"skipped": "one GPU: nothing to agree on"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "addernet_dist.selftest",
        "--tiles-worker",
        str(out),
        "--tiles-mode",
        params["mode"],
    ]
    _launch(cmd, params["env"], 600, workdir / "tiles.log")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    if not ranks[0]["choices"]:
        raise CheckFailed("rank 0 tuned nothing")
    for r, d in enumerate(ranks[1:], 1):
        if d["choices"] != ranks[0]["choices"]:
            raise CheckFailed(
                f"rank {r} launched other tiles than rank 0: {d['choices']} vs {ranks[0]['choices']}"
            )
    return {
        "nproc": nproc,
        "keys": len(ranks[0]["choices"]),
        "timed_by_rank": [d["tunings"] for d in ranks],
    }


def _tiles_worker(out: str, mode: str) -> None:
    """One rank of the ``tiles`` check: tune a few layer shapes under the process group."""
    import torch.distributed as dist

    from addernet_dist.kernels import tile_tuner

    cuda = mode == "compiled"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    tile_tuner.clear()
    with _kernel_module(mode) as ta:
        tile_tuner.TUNING_ENABLED = True
        tuner = ta._adder_fwd_tuned
        if tuner is None:  # the interpreter: install a real tuner over the two small tiles
            tuner = tile_tuner.TileTuner(
                "fwd", ta._adder_fwd_kernel, ta.FWD_CONFIGS[3:5], ta._FWD_KEY
            )
            ta._adder_fwd_tuned = tuner
        dev = "cuda" if cuda else "cpu"
        shapes = [(64, 64, 3, 14), (256, 64, 1, 14)] if cuda else [(3, 5, 3, 6), (4, 6, 1, 5)]
        for c, o, k, h in shapes:
            x = torch.randn(8 if cuda else 2, c, h, h, device=dev)
            w = torch.randn(o, c, k, k, device=dev)
            p = h - k + 1
            ta.adder2d_forward(x, w, (1, 1), (0, 0), (1, 1), 1.0, (p, p), bn_stats=True)
        res = {"choices": tile_tuner.choices(), "tunings": tuner.tunings}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------
# Runner and reports
# ------------------------------------------------------------------------------------------------------
def run_checks(desc: DeviceDescription, checks: list[Check], workdir: Path) -> list[dict]:
    results = []
    for chk in checks:
        t0 = time.perf_counter()
        try:
            if chk.name == "env":
                details = check_env(desc, chk.params)
            elif chk.name == "kernels":
                details = check_kernels(desc, chk.params)
            elif chk.name == "speed":
                details = check_speed(desc, chk.params)
            elif chk.name == "train":
                details = check_train(desc, chk.params, workdir)
            elif chk.name == "tiles":
                details = check_tiles(desc, chk.params, workdir)
            elif chk.name == "deepspeed":
                details = check_deepspeed(desc, chk.params, workdir)
            else:
                raise CheckFailed(f"unknown check {chk.name!r}")
            results.append(
                dict(name=chk.name, ok=True, seconds=time.perf_counter() - t0, details=details)
            )
        except Exception as e:  # noqa: BLE001 — a failed check is reported and the rest still run
            results.append(
                dict(
                    name=chk.name,
                    ok=False,
                    seconds=time.perf_counter() - t0,
                    error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc()[-3000:],
                )
            )
        r = results[-1]
        print(
            f"[selftest] {r['name']:10s} {'ok' if r['ok'] else 'FAILED'} ({r['seconds']:.1f} s)"
            + ("" if r["ok"] else f": {r['error'][:300]}"),
            flush=True,
        )
    return results


def to_markdown(report: dict) -> str:
    lines = ["# addernet-selftest report", ""]
    lines.append(
        f"{report['date']} · {report['device']['name']} · "
        f"{'PASSED' if report['ok'] else 'FAILED'} · {report['seconds']:.0f} s"
    )
    lines += ["", "| check | result | seconds |", "|---|---|---:|"]
    for r in report["checks"]:
        res = (
            "ok"
            if r["ok"]
            else "**FAILED**: " + r["error"][:200].replace("|", "\\|").replace("\n", " ")
        )
        lines.append(f"| {r['name']} | {res} | {r['seconds']:.1f} |")
    by = {r["name"]: r for r in report["checks"]}
    if "env" in by and by["env"]["ok"]:
        lines += ["", "## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in by["env"]["details"].items()]
    if "kernels" in by and by["kernels"]["ok"]:
        d = by["kernels"]["details"]
        lines += [
            "",
            f"## Kernels vs the reference ({d['mode']})",
            "",
            "| code path | max error / max \\|reference\\| |",
            "|---|---|",
        ]
        for row in d["cases"]:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
            lines.append(f"| {row['case']} | {errs} |")
    if "speed" in by and by["speed"]["ok"]:
        d = by["speed"]["details"]
        lines += [
            "",
            f"## Forward vs cuDNN conv2d (fp32, TF32 off), batch {d['batch']}",
            "",
            "| layer | ×model | adder ms | conv ms | conv/adder time | adder T MAC/s | of FP32 roofline |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in d["rows"]:
            frac = f"{100 * r['roofline_fraction']:.0f} %" if r["roofline_fraction"] else "–"
            lines.append(
                f"| {r['layer']} | {r['count']} | {r['adder_ms']:.3f} | {r['conv_ms']:.3f} | "
                f"{r['conv_over_adder']:.2f} | {r['adder_tmacs']:.2f} | {frac} |"
            )
    for nm in ("train", "deepspeed"):
        if nm in by and by[nm]["ok"]:
            d = by[nm]["details"]
            lines += ["", f"## {nm} smoke", "", "```", json.dumps(d, indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="addernet-selftest", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default="selftest", help="report folder (report.json, report.md, logs)"
    )
    ap.add_argument("--quick", action="store_true", help="reduced form (CI)")
    ap.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(CHECK_NAMES)}"
    )
    ap.add_argument("--plan", action="store_true", help="print the plan as JSON and exit")
    ap.add_argument("--tiles-worker", default=None, help=argparse.SUPPRESS)  # one rank of `tiles`
    ap.add_argument("--tiles-mode", default="interpreter", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiles_worker:
        _tiles_worker(args.tiles_worker, args.tiles_mode)
        return 0
    desc = describe_device()
    checks = plan_checks(desc, quick=args.quick)
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in CHECK_NAMES]
        if unknown:
            print(
                f"error: --only {unknown} unknown; choose from {', '.join(CHECK_NAMES)}",
                file=sys.stderr,
            )
            return 2
        missing = [w for w in want if w not in {c.name for c in checks}]
        if missing:
            print(
                f"error: --only {missing}: not run on this machine ({desc.kind}"
                f"{', --quick' if args.quick else ''}); the speed check needs CUDA, deepspeed is not in --quick",
                file=sys.stderr,
            )
            return 2
        checks = [c for c in checks if c.name in want]
    if args.plan:
        print(json.dumps({"device": asdict(desc), "checks": [asdict(c) for c in checks]}, indent=1))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selftest_", dir=out) as work:
        results = run_checks(desc, checks, Path(work))
        for log in Path(work).glob("*.log"):
            (out / log.name).write_text(log.read_text())
    report = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=asdict(desc),
        quick=args.quick,
        ok=all(r["ok"] for r in results),
        seconds=time.perf_counter() - t0,
        checks=results,
    )
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(to_markdown(report))
    print(
        f"[selftest] {'PASSED' if report['ok'] else 'FAILED'}; report: {out / 'report.md'}",
        flush=True,
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
