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
  with the fraction of the FP32 issue roofline (an adder MAC is two FP32 instructions); deterministic
  ∂F with its default tile against the low-register candidate (``DW_SELFTEST_CONFIGS``).
* ``tiles`` — the kernel-tile tuner over the real process group (NCCL on a GPU node): rank 0 times the
  tiles of a few layer shapes and broadcasts them; every rank must launch the same ones. It runs under
  the stall watchdog with a 5 s training limit and tuning as the watchdog's phase (as the trainer does),
  then round-trips the choices through a ``weights_only`` checkpoint file: the same launches must time
  nothing afterwards (a resumed run keeps its tiles).
* ``train`` — a multi-process training smoke: DDP over NCCL (gloo on CPU), bf16, fused Adder+BN, DALI
  ``mixed`` decoding (DALI CPU on CPU) of a generated JPEG tree, a checkpoint, a resume that continues
  it, evaluation during training and ``addernet-eval`` on the checkpoint; the checkpoint's logits from
  the fused model (as the trainer evaluates) against the unfused one (as ``addernet-eval``), to 2 % of
  their scale (not top-1 equality: on 12 images one near-tie flipped by a bf16 rounding is 8 %).
* ``deepspeed`` — the same trainer under DeepSpeed ZeRO-2 (``DS_ACCELERATOR=cpu`` and gloo on CPU).

Writes ``report.json`` and ``report.md`` and exits 1 if any check failed (2 on a usage error).

Layout: ``plan`` (device description, pure decisions, the plan), one module per check group (``env``,
``kernels``, ``speed`` with ``tiles``, ``smoke`` with ``train`` and ``deepspeed``), ``report`` (Markdown);
this module runs the checks and is the CLI (``addernet-selftest``, ``python -m addernet_dist.selftest``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from addernet_dist.selftest.env import check_env
from addernet_dist.selftest.kernels import check_kernels, run_kernel_case
from addernet_dist.selftest.plan import (
    CHECK_NAMES,
    MIN_DRIVER,
    Check,
    CheckFailed,
    DeviceDescription,
    describe_device,
    driver_problem,
    fp32_adder_roofline,
    kernel_cases,
    plan_checks,
    train_smoke_overrides,
)
from addernet_dist.selftest.report import to_markdown
from addernet_dist.selftest.smoke import check_deepspeed, check_train, compare_logits, logits_worker
from addernet_dist.selftest.speed import check_speed, check_tiles, tiles_worker

__all__ = [
    "CHECK_NAMES",
    "MIN_DRIVER",
    "Check",
    "CheckFailed",
    "DeviceDescription",
    "check_deepspeed",
    "check_env",
    "check_kernels",
    "check_speed",
    "check_tiles",
    "compare_logits",
    "logits_worker",
    "check_train",
    "describe_device",
    "driver_problem",
    "fp32_adder_roofline",
    "kernel_cases",
    "main",
    "plan_checks",
    "run_checks",
    "run_kernel_case",
    "to_markdown",
    "train_smoke_overrides",
]


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
    # fused vs unfused logits of a checkpoint (`train`)
    ap.add_argument("--logits-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--logits-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiles_worker:
        tiles_worker(args.tiles_worker, args.tiles_mode)
        return 0
    if args.logits_worker:
        logits_worker(args.logits_worker, args.logits_out)
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
