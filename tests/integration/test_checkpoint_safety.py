"""A loaded checkpoint is input from a stranger (issue 20, part 1): no entry point unpickles it.

The attack: a real pickle whose ``__reduce__`` runs a shell command (``touch MARKER``), saved with
``torch.save`` and wrapped in the package's own sha256 footer (the footer checks integrity, not
trust), or planted as a DeepSpeed checkpoint folder with a valid MANIFEST. Every entry point that
reads a checkpoint gets it: the marker file must never appear, and the error names the file.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from addernet_dist import checkpoint, runfolder
from addernet_dist.engine import ds_checkpoint
from tests.train_helpers import DEBUG_CONFIG, FAST, REPO, env

TINY = ["data.synthetic_train_size=96", "data.synthetic_val_size=20", "train.epochs=1"]


class _Payload:
    """Unpickling this runs ``touch <marker>`` through the shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _evil_state(marker: Path) -> dict:
    """A trainer checkpoint's shape with the payload where the model's weights go."""
    return {"engine": {"model": _Payload(marker), "optimizer": {}}, "client": {"train_state": {}}}


def _evil_bytes(marker: Path, obj=None) -> bytes:
    buf = io.BytesIO()
    torch.save(_evil_state(marker) if obj is None else obj, buf)
    return buf.getvalue()


@pytest.fixture
def evil(tmp_path):
    """(footer-wrapped malicious file, bare malicious torch.save file, marker path)."""
    marker = tmp_path / "PWNED"
    wrapped = tmp_path / "evil.pt"
    runfolder.save_file(_evil_state(marker), wrapped)
    bare = tmp_path / "evil_bare.pt"
    bare.write_bytes(_evil_bytes(marker))
    return wrapped, bare, marker


def test_the_payload_really_runs_when_unpickled(evil):
    """The precondition: the file is a working exploit for any loader that unpickles it."""
    wrapped, _, marker = evil
    torch.load(io.BytesIO(runfolder.read_verified(wrapped)), weights_only=False)
    assert marker.exists()


def _train(capsys, overrides: list[str]) -> tuple[int, str]:
    from addernet_dist.train import main

    capsys.readouterr()
    rc = main(["--config", str(DEBUG_CONFIG), *FAST, *TINY, *overrides])
    return rc, capsys.readouterr().err


def _refused(rc: int, err: str, path: Path, marker: Path, read: bool = True) -> None:
    """Exit 2, the file named, no payload run; ``read``: the file was opened as a torch.save file
    and the message names the refused object (os.system is posix.system on Linux)."""
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert rc == 2, err[-3000:]
    assert str(path) in err, err[-3000:]
    assert not read or "weights_only=True" in err and "posix.system" in err, err[-3000:]


@pytest.mark.timeout(120)
def test_resume_path_refuses_a_pickled_payload(evil, tmp_path, capsys):
    wrapped, _, marker = evil
    rc, err = _train(capsys, [f"output_dir={tmp_path / 'run'}", f"resume={wrapped}"])
    _refused(rc, err, wrapped, marker)


@pytest.mark.timeout(120)
def test_resume_auto_refuses_a_planted_step_file(evil, tmp_path, capsys):
    wrapped, _, marker = evil
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    planted = ckdir / "step_000000099.pt"
    planted.write_bytes(wrapped.read_bytes())
    rc, err = _train(capsys, [f"output_dir={tmp_path / 'run'}", "resume=auto"])
    _refused(rc, err, planted, marker)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["wrapped", "bare"])
def test_init_from_refuses_a_pickled_payload(evil, tmp_path, capsys, which):
    wrapped, bare, marker = evil
    src = wrapped if which == "wrapped" else bare
    rc, err = _train(capsys, [f"output_dir={tmp_path / 'run'}", f"train.init_from={src}"])
    # init_from reads a bare .pt only as a footer-less file of ours: refused before any load
    _refused(rc, err, src, marker, read=which == "wrapped")


def test_eval_refuses_a_pickled_payload(evil, capsys):
    from addernet_dist.evaluate import main

    wrapped, _, marker = evil
    rc = main(["--checkpoint", str(wrapped)])
    _refused(rc, capsys.readouterr().err, wrapped, marker)


def test_export_refuses_a_pickled_payload(evil, tmp_path, capsys):
    from addernet_dist.interop import main_export

    wrapped, _, marker = evil
    rc = main_export([str(wrapped), str(tmp_path / "x.safetensors")])
    _refused(rc, capsys.readouterr().err, wrapped, marker)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("which", ["wrapped", "bare"])
def test_analyze_weights_refuses_a_pickled_payload(evil, tmp_path, capsys, which):
    from addernet_dist.analyze import main

    wrapped, bare, marker = evil
    src = wrapped if which == "wrapped" else bare
    rc = main(["weights", "--adder", str(src), "--out", str(tmp_path / "w.png")])
    _refused(rc, capsys.readouterr().err, src, marker)


def _plant_ds_folder(folder: Path, marker: Path, evil_file: str) -> Path:
    """A DeepSpeed checkpoint folder (ZeRO-2, 1 rank) with a valid MANIFEST; ``evil_file`` holds the
    payload, the other shard is harmless."""
    folder.mkdir(parents=True)
    harmless = {"module": {"w": torch.zeros(2)}, "buffer_names": []}
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        body = _evil_bytes(marker, {"module": _Payload(marker)}) if name == evil_file else None
        if body is None:
            buf = io.BytesIO()
            torch.save(harmless, buf)
            body = buf.getvalue()
        (folder / name).write_bytes(body)
    ds_checkpoint.write_manifest(folder, {"zero_stage": 2, "world_size": 1})
    assert checkpoint.verify(folder) is None  # integrity is fine: only trust is missing
    return folder / evil_file


@pytest.mark.parametrize(
    "evil_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_zero_to_state_dict_refuses_pickled_shards(tmp_path, capsys, evil_file):
    from addernet_dist.zero_to_state_dict import main

    marker = tmp_path / "PWNED"
    shard = _plant_ds_folder(tmp_path / "step_000000002.pt", marker, evil_file)
    rc = main([str(shard.parent), str(tmp_path / "out.pt")])
    _refused(rc, capsys.readouterr().err, shard, marker)


def test_zero_to_state_dict_refuses_a_pickled_manifest(tmp_path, capsys):
    from addernet_dist.zero_to_state_dict import main

    marker = tmp_path / "PWNED"
    folder = tmp_path / "step_000000002.pt"
    _plant_ds_folder(folder, tmp_path / "unused", "none")
    runfolder.save_file({"format": _Payload(marker), "files": {}}, folder / ds_checkpoint.MANIFEST)
    rc = main([str(folder), str(tmp_path / "out.pt")])
    _refused(rc, capsys.readouterr().err, folder / ds_checkpoint.MANIFEST, marker)


def _ds_train(run: Path, patch_check: bool) -> subprocess.CompletedProcess:
    """engine=deepspeed, resume=auto, one process. ``patch_check``: without the up-front shard check,
    so DeepSpeed's own loader (the engine hands it ds_checkpoint.load_shard) meets the payload."""
    args = [*FAST, *TINY, "data.image_size=8", "train.global_batch_size=8", "engine=deepspeed"]
    args += ["deepspeed.zero_stage=2", "deepspeed.micro_batch_size=4", f"output_dir={run}"]
    args += ["resume=auto", "wandb.enabled=false"]
    code = (
        "import sys\n"
        "from addernet_dist.engine import ds_checkpoint\n"
        + ("ds_checkpoint.check_loadable = lambda folder: None\n" if patch_check else "")
        + "from addernet_dist.train import main\n"
        f"sys.exit(main({['--config', str(DEBUG_CONFIG), *args]!r}))\n"
    )
    e = {k: v for k, v in env(DS_ACCELERATOR="cpu").items() if k not in ("RANK", "WORLD_SIZE")}
    e["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.timeout(700)
@pytest.mark.parametrize("patch_check", [False, True], ids=["checked", "deepspeed-loader"])
def test_deepspeed_resume_refuses_a_planted_checkpoint_folder(tmp_path, patch_check):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    shard = _plant_ds_folder(
        run / "checkpoints" / "step_000000099.pt", marker, "mp_rank_00_model_states.pt"
    )
    proc = _ds_train(run, patch_check)
    _refused(proc.returncode, proc.stderr, shard, marker)


def test_checkpoints_written_before_the_rule_still_load(tmp_path):
    """The old client state (numpy's RNG tuple with a uint32 array) loads with weights_only and
    restores the numpy stream; the new one holds only tensors and plain types."""
    np.random.seed(3)
    old = {"client": {"rng": [{"python": (3, tuple(range(625)), None), "numpy": np.random.get_state()}]}}
    runfolder.save_file(old, tmp_path / "old.pt")
    want = np.random.rand(4)
    got = checkpoint.load_file(tmp_path / "old.pt")["client"]["rng"][0]["numpy"]
    np.random.set_state(got)
    assert np.array_equal(np.random.rand(4), want)
    # the new format: no numpy object at all, and the same stream back
    state = checkpoint.rng_state()
    want = np.random.rand(4)
    buf = io.BytesIO()
    torch.save(state, buf)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(buf.getvalue())) == []
    checkpoint.set_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert np.array_equal(np.random.rand(4), want)
