"""Helpers shared by the trainer tests: launch real training processes (python / torchrun).

Every launched process gets OMP_NUM_THREADS=1: on the 2-core CI machine two intra-op thread
pools per process oversubscribe the cores (a 12-step debug epoch took 87 s with the default
threads vs 15 s with one thread, measured under load on the dev box). The trainer tests pin the
reference adder operator (the specification) with ``adder.backend=reference``: which operator
backend runs is orthogonal to the trainer, and at the debug sizes the reference is the fastest
(4.5 s vs 9.0 s CPU time for one debug epoch against the C++ path, same numbers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from addernet_dist.checkpoint import load_file

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
FAST = ["adder.backend=reference", "train.progress_bar=false"]
# The DeepSpeed-vs-DDP engine comparisons (tests/integration/test_deepspeed_engine.py, the GPU tier):
# a tiny adder ResNet-8, 8 steps per epoch at global batch 8, eq. 33 and clipping acting.
TINY = [
    "data.image_size=8",
    "data.synthetic_train_size=64",  # 8 steps per epoch at global batch 8
    "data.synthetic_val_size=20",
    "train.global_batch_size=8",
    "train.grad_clip=2.0",  # below the post-eq.-33 norm (~5-10): clipping really acts
    "adder.p_decay_epochs=1",  # p moves every step: 2 -> 1 over 8 steps
    "optim.warmup_epochs=0",
    "wandb.enabled=false",
    # fp32: the CPU engine comparisons are about sharding, at fp32 tolerances (under bf16 autocast a
    # 1e-7 reduction-order difference can flip a bf16 rounding of the next step's activations)
    "train.precision=fp32",
]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("ADDERNET_FAULT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    e.pop("ADDERNET_BACKEND", None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(overrides: list[str], config: Path = DEBUG_CONFIG) -> list[str]:
    return ["-m", "addernet_dist.train", "--config", str(config), *FAST, *overrides]


def run_python(args: list[str], timeout: int = 240, **env_extra: str):
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env(**env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def script_json(script: str, *args: str, timeout: int = 300) -> Any:
    """Run ``python -c script *args`` in a fresh process (its own peak RSS, its own allocator) and
    return the JSON value printed on its last stdout line."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def torchrun_args(nproc: int, *extra: str) -> list[str]:
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra]


def final_model(output_dir: Path) -> dict[str, torch.Tensor]:
    """Model state of the newest step checkpoint of a finished run."""
    ckpts = sorted((output_dir / "checkpoints").glob("step_*.pt"))
    return load_file(ckpts[-1])["engine"]["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k], f"{k} differs"


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def start_workers(argv: list[str], nproc: int = 2, **extra_env: str) -> list[subprocess.Popen]:
    """Start ``python *argv`` as ``nproc`` ranks of one gloo group and return them running (no
    torchrun: the env:// rendezvous variables are set here, which saves an agent process per test)."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env=env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                **extra_env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]


def launch_workers(module: str, args: list[str], nproc: int = 2, timeout: int = 240) -> None:
    """Run ``python -m module *args`` as ``nproc`` ranks of one gloo group and check every rank exits 0."""
    procs = start_workers(["-m", module, *args], nproc)
    outs = [p.communicate(timeout=timeout) for p in procs]
    for r, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} rc={p.returncode}\n{err[-4000:]}"
