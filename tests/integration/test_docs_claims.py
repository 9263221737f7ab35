"""Capabilities the docs claim, each run for real: launch/torchrun.sh (a 2-process launch), the DeepSpeed hostfile path,
the tqdm progress bar on a terminal, devkit meta.mat / wnids.txt labelling of a flat val folder
through the loader, and a DDP resume with another world size at an epoch boundary."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
import torch

from addernet_dist import checkpoint
from addernet_dist.data import DataConfig, build_loader
from addernet_dist.data.jpeg_tree import make_jpeg_tree
from addernet_dist.logging_utils import read_metrics
from tests.train_helpers import DEBUG_CONFIG, FAST, REPO, env

# 32 samples / global batch 16: 2 steps per epoch; p fixed (a fractional p costs ~14x CPU time).
SHORT = [
    "data.synthetic_train_size=32",
    "data.synthetic_val_size=10",
    "adder.p_schedule=false",
    "train.log_every=1",
    "train.ckpt_every_steps=0",
    "train.precision=fp32",  # fp32: the world-size test recomputes a loss in this process in fp32
]


# ---- launch/torchrun.sh ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_torchrun_sh_names_a_missing_rendezvous():
    # several nodes without the rendezvous endpoint: refused before anything starts (the
    # script's real 2-process launch is the first half of the world-size resume test below)
    bad = subprocess.run(
        [str(REPO / "launch" / "torchrun.sh"), str(REPO / "configs" / "debug.yaml")],
        cwd=REPO,
        env=env(NNODES="2", NPROC_PER_NODE="1"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "set RDZV_ENDPOINT=host:port" in bad.stderr


# ---- DeepSpeed hostfile --------------------------------------------------------------------


# The variables launch/deepspeed.sh reads: the caller's (e.g. DS_ACCELERATOR=cpu exported for the
# DeepSpeed tests, which makes the script demand NPROC) must not decide what a test sees.
DEEPSPEED_SH_VARS = ("HOSTFILE", "NPROC", "DS_ACCELERATOR", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN")


def _deepspeed_sh_env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in env().items() if k not in DEEPSPEED_SH_VARS}
    e.update(extra)
    return e


@pytest.mark.timeout(60)
def test_deepspeed_sh_passes_the_hostfile_and_its_first_host(tmp_path):
    script = str(REPO / "launch" / "deepspeed.sh")
    config = str(REPO / "configs" / "debug.yaml")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\n\n  nodeA slots=8\nnodeB slots=8\n")
    e = _deepspeed_sh_env(HOSTFILE=str(hostfile), DRY_RUN="1")
    proc = subprocess.run(
        [script, config, "deepspeed.zero_stage=1"], cwd=REPO, env=e, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[0] == "deepspeed"
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--master_addr") + 1] == "nodeA"  # first host, comments skipped
    assert cmd[-2:] == ["engine=deepspeed", "deepspeed.zero_stage=1"]
    # The hostfile DeepSpeed's own runner reads: the same hosts and slots (DeepSpeed's parser).
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(hostfile))) == {"nodeA": 8, "nodeB": 8}
    assert "--num_gpus" not in cmd  # every visible GPU
    missing = subprocess.run(
        [script, config],
        cwd=REPO,
        env=_deepspeed_sh_env(HOSTFILE=str(tmp_path / "nope")),
        capture_output=True,
        text=True,
    )
    assert (
        missing.returncode == 2 and "HOSTFILE" in missing.stderr and "not found" in missing.stderr
    )
    # A CPU run needs NPROC (no GPUs to count): refused without it, passed on with it.
    cpu = _deepspeed_sh_env(DS_ACCELERATOR="cpu", DRY_RUN="1")
    no_nproc = subprocess.run([script, config], cwd=REPO, env=cpu, capture_output=True, text=True)
    assert no_nproc.returncode == 2 and "set NPROC" in no_nproc.stderr, no_nproc
    two = subprocess.run(
        [script, config], cwd=REPO, env={**cpu, "NPROC": "2"}, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr
    cmd = two.stdout.split()
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--hostfile" not in cmd


# ---- progress bar on a terminal --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_progress_bar_draws_on_a_tty():
    """mode=auto on a real pseudo-terminal: tqdm draws (carriage returns, the step counter and the
    postfix), no plain log lines."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from addernet_dist.logging_utils import Progress\n"
        "p = Progress(enabled=True, mode='auto', total=4).start(initial=1)\n"
        "p.update(3, {'epoch': 0, 'loss': 2.30259})\n"
        "p.message('epoch 1: val top1 12.00%')\n"
        "p.close()\n"
    )
    leader, follower = pty.openpty()
    # a terminal 120 columns wide (a fresh pty is 0x0, where dynamic_ncols draws an empty bar)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
        stdout=follower, stderr=follower, env=env(),
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=30) == 0
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "4/4" in text and "loss=2.303" in text, text
    assert "epoch 1: val top1 12.00%" in text
    assert "INFO" not in text  # the bar, not the plain-line fallback


# ---- devkit flat val through the loader ------------------------------------------------------


def _devkit_tree(tmp_path, kind: str):
    """Flat val named ILSVRC2012_val_<i>.JPEG with the devkit's ground truth (1-based devkit IDs)
    and the devkit's class list as ``kind`` ("meta.mat": 1000 leaf synsets with IDs 1..1000 plus
    non-leaf ones above, as shipped; "wnids.txt": line i = wnid of ID i)."""
    files = make_jpeg_tree(
        tmp_path, num_classes=3, train_per_class=1, val_per_class=2, flat_val=True, odd=False
    )
    (tmp_path / "LOC_val_solution.csv").unlink()
    wnids = sorted(os.listdir(tmp_path / "train"))
    # our three classes at devkit IDs far from their sorted positions
    id_of = {wnids[0]: 1000, wnids[1]: 17, wnids[2]: 512}
    order = [f"n{9000000 + i:08d}" for i in range(1, 1001)]  # filler wnids, not train classes
    for w, i in id_of.items():
        order[i - 1] = w
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    gt = []
    for i, (path, label) in enumerate(files["val"], start=1):
        os.rename(path, tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
        gt.append(str(id_of[wnids[label]]))
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(gt) + "\n")
    if kind == "wnids.txt":
        (data / "wnids.txt").write_text("\n".join(order) + "\n")
    else:
        from scipy.io import savemat

        dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        rows = [(i, w, f"class {i}", 0) for i, w in enumerate(order, start=1)]
        rows += [(1000 + j, f"n{8000000 + j:08d}", "a non-leaf synset", 3) for j in range(1, 6)]
        synsets = np.array(rows[::-1], dtype=dt)  # file order is not ID order
        savemat(str(data / "meta.mat"), {"synsets": synsets.reshape(-1, 1)})
    return [label for _, label in files["val"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["meta.mat", "wnids.txt"])
@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_devkit_flat_val_labels_through_the_loader(tmp_path, kind, loader):
    want = _devkit_tree(tmp_path, kind)
    cfg = DataConfig(
        dataset="imagefolder", root=tmp_path, image_size=16, num_workers=1, loader=loader
    )
    got = torch.cat([y for _, y in build_loader(cfg, "val", batch_size=4)])
    assert got.tolist() == want and len(set(want)) == 3


# ---- DDP resume with another world size ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_resume_with_another_world_size_at_an_epoch_boundary(tmp_path, capsys, monkeypatch):
    """Epoch 1 on 2 processes launched by launch/torchrun.sh, epoch 2 on 1 process (same global
    batch): the resumed run starts from the epoch-1 weights at step 2 / epoch 1, says that the
    world size changed, and reads epoch 1's full permutation (the sampler's, for its own world
    size). The 1-process half runs in this process (train() without a launcher is world size 1):
    one interpreter start fewer (~5 s idle, 10-20 s on a loaded machine)."""
    from addernet_dist import build
    from addernet_dist import run as run_mod
    from addernet_dist.config import load_config

    out = tmp_path / "run"
    base = [f"output_dir={out}", *SHORT, "train.ckpt_every_steps=1", "train.keep_last=5"]
    launched = subprocess.run(
        [str(REPO / "launch" / "torchrun.sh"), str(DEBUG_CONFIG), *FAST, *base, "train.epochs=1"],
        cwd=REPO,
        env=env(NPROC_PER_NODE="2", MAX_RESTARTS="0"),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    epoch1 = checkpoint.load_file(out / "checkpoints" / "step_000000002.pt")
    assert epoch1["client"]["world_size"] == 2  # both processes joined one group
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ADDERNET_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    run_mod.train(load_config(DEBUG_CONFIG, [*FAST, *base, "train.epochs=2"]))
    err = capsys.readouterr().err  # the trainer's console log (stderr)
    assert "resuming with WORLD_SIZE=1 from a checkpoint written with 2" in err
    assert "step_000000002.pt at step 2" in err
    raw = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in ln]
    # the resume record also says what changed in the config (issue 12), and in the runtime: torchrun
    # ran epoch 1 with OMP_NUM_THREADS=1, this process has torch's default (docs/training.md
    # "Reproducibility")
    threads = [epoch1["client"]["runtime"]["torch_threads"], torch.get_num_threads()]
    runtime = {"runtime_changed": {"torch_threads": threads}} if threads[0] != threads[1] else {}
    assert ("torch_threads: {} when the checkpoint was written, {} now".format(*threads) in err) == bool(runtime)
    assert [{k: v for k, v in json.loads(ln).items() if k != "time"} for ln in raw] == [
        {"kind": "resume", "step": 2, "epoch": 1, "changed": {"train.epochs": [1, 2]}, **runtime, "total_steps": 4}
    ]
    records = read_metrics(out / "metrics.jsonl")
    train = [r["step"] for r in records if r["kind"] == "train"]
    assert train == [1, 2, 3, 4]
    final = checkpoint.load_file(out / "checkpoints" / "step_000000004.pt")
    assert final["client"]["world_size"] == 1
    assert final["client"]["train_state"]["epoch"] == 2
    (loader_state,) = final["client"]["loader"]
    assert (loader_state["epoch"], loader_state["batches_done"], loader_state["world_size"]) == (
        2,
        0,
        1,
    )
    # the 1-process run trained from the 2-process weights (not from a fresh init): step 3's loss
    # is the loss of the epoch-1 weights on epoch 1's first global batch
    cfg = load_config(DEBUG_CONFIG, [*FAST, *SHORT])
    model = build.build_model(cfg, 10)
    model.load_state_dict(epoch1["engine"]["model"])
    loader = build_loader(cfg.data, "train", batch_size=16, seed=cfg.train.seed)
    loader.set_epoch(1)
    images, labels = next(iter(loader))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.train()(images), labels)
    step3 = next(r for r in records if r["kind"] == "train" and r["step"] == 3)
    assert step3["loss"] == pytest.approx(float(loss), rel=1e-5)
