"""The trainer's GPU code path on CPU (issue 11 part 3): the Triton backend with fused Adder2d+BN modules,
run through Triton's interpreter (``TRITON_INTERPRET=1``) under torchrun with 2 gloo processes, fp32 and
bf16 autocast; its losses match the C++ ``cpu`` backend's run.

What runs per step in the interpreted runs: the fused forward kernel with its BN-statistics epilogue (the
8 adder layers of ResNet-8 are fused), BN's backward, both backward kernels (∂X, ∂F with the
fixed-order split reduction), the DDP all-reduce, eq. 33; at the epoch end BN recalibration (p = 2 > 1),
the fused inference epilogue in the evaluation, a checkpoint, which ``addernet-eval`` then loads into an
unfused model and evaluates under the same autocast.

Cost: the interpreter takes ~0.2 CPU-s per kernel launch at these shapes, so the model is ResNet-8 at
width 4 (channels 4/8/16) on 8×8 images, 2 steps of 2 images per rank, p fixed at 2 (the exact fast
paths; the general-p path is covered kernel by kernel in tests/unit/test_triton_adder.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from addernet_dist.logging_utils import read_metrics
from tests.logit_checks import assert_logits_vary, checkpoint_val_logits
from tests.train_helpers import REPO, check, env, torchrun_args, train_cmd

TINY = [
    "model.kwargs.width=4",
    "data.image_size=8",
    "data.synthetic_train_size=8",  # 2 steps at global batch 4
    "data.synthetic_val_size=6",
    "train.global_batch_size=4",
    "train.epochs=1",
    "train.log_every=1",
    "train.ckpt_every_steps=0",
    "train.bn_recalibration_batches=1",
    "adder.p_start=2",
    "adder.p_end=2",  # p = 2 > 1 at the evaluation: BN recalibration runs
]
# The interpreted runs: the whole GPU path of the trainer. This is the documented way to run it on CPU.
INTERP = ["adder.backend=triton", "adder.fuse_bn=true"]
# Tolerances on losses, interpreted triton vs the C++ cpu backend (same data, same initial weights):
# fp32 — both sum each output's K ≤ 144 terms in fp32 in different orders (~1e-6 relative per layer);
# two SGD steps with eq. 33 (alpha = eta·sqrt(k)/||g||) carry that to ~1e-5 of the loss: 1e-4 bounds it.
# bf16 autocast — the adder layers are fp32 in both, but the classifier's input is rounded to bf16:
# an fp32 difference of 1e-6 can move an element by one bf16 step (2^-8 = 0.4%), so 1e-2.
RTOL = {"fp32": 1e-4, "bf16": 1e-2}


def _launch(out, backend_args, precision, interp):
    extra = {"TRITON_INTERPRET": "1"} if interp else {}
    cmd = [sys.executable, *torchrun_args(2, "--standalone")]
    cmd += train_cmd(
        [*TINY, *backend_args, f"train.precision={precision}", f"output_dir={out}"]
    )
    return subprocess.Popen(
        cmd, cwd=REPO, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(proc, timeout=600):
    stdout, stderr = proc.communicate(timeout=timeout)
    return check(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    done = {}
    for precision in ("fp32", "bf16"):
        # the interpreted run and its cpu-backend twin side by side (the twin takes a few seconds)
        procs = {
            ("triton", precision): _launch(root / f"triton_{precision}", INTERP, precision, True),
            ("cpu", precision): _launch(
                root / f"cpu_{precision}", ["adder.backend=cpu"], precision, False
            ),
        }
        for key, proc in procs.items():
            done[key] = (root / f"{key[0]}_{precision}", _wait(proc))
    return done


def _records(out, kind):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interpreted_triton_trainer_matches_cpu_backend(runs, precision):
    out, proc = runs[("triton", precision)]
    ref_out, _ = runs[("cpu", precision)]
    # the GPU path really ran: all 8 adder layers fused, no backend fallback
    assert "fused 8 Adder2d+BatchNorm2d pairs" in proc.stdout + proc.stderr
    assert "is unavailable" not in proc.stderr
    got, ref = _records(out, "train"), _records(ref_out, "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL[precision]), (a["step"], precision)
    ev, ev_ref = _records(out, "eval"), _records(ref_out, "eval")
    assert len(ev) == len(ev_ref) == 1
    assert ev[0]["bn_recalibration_batches"] == ev_ref[0]["bn_recalibration_batches"] == 1
    assert ev[0]["count"] == ev_ref[0]["count"] == 6
    # the evaluated model's logits depend on the image, else both losses only count labels
    assert_logits_vary(checkpoint_val_logits(out / "checkpoints" / "best.pt", batch_size=6), min_distinct_top1=1)
    assert ev[0]["loss"] == pytest.approx(ev_ref[0]["loss"], rel=RTOL[precision])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bf16_means_autocast_on_cpu(runs):
    """train.precision=bf16 runs the forward passes under bf16 autocast on CPU: the stem convolution and the
    classifier round to bf16, so the losses move off the fp32 run's, by bf16-sized amounts."""
    for backend in ("triton", "cpu"):
        f32 = [r["loss"] for r in _records(runs[(backend, "fp32")][0], "train")]
        b16 = [r["loss"] for r in _records(runs[(backend, "bf16")][0], "train")]
        assert f32 != b16, backend
        assert b16 == pytest.approx(f32, rel=2e-2), backend


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoint_round_trip_through_addernet_eval(runs):
    """The fused, interpreted bf16 run's best.pt, evaluated by addernet-eval (unfused model, triton
    backend in the interpreter, bf16 autocast from the stored config): the trainer's last evaluation."""
    out, _ = runs[("triton", "bf16")]
    proc = check(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "addernet_dist.evaluate",
                "--checkpoint",
                str(out / "checkpoints" / "best.pt"),
            ],
            cwd=REPO,
            env=env(TRITON_INTERPRET="1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    last = _records(out, "eval")[-1]
    assert result["count"] == last["count"] == 6
    # the same weights and recalibrated BN statistics; unfused vs fused inference differ in fp32 order,
    # which the bf16 classifier input can turn into one bf16 step (see RTOL)
    assert result["loss"] == pytest.approx(last["loss"], rel=RTOL["bf16"])
    assert "is unavailable" not in proc.stderr
