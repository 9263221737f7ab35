"""Class names travel with the model (issue 22.3): a run on a folder tree stores the label -> class
folder list in every checkpoint, `addernet-export` writes it into the safetensors metadata, and a
resume whose tree names other classes is refused before anything is written (the labels would
mean other classes from then on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from addernet_dist import checkpoint
from addernet_dist.data.jpeg_tree import make_jpeg_tree
from tests.train_helpers import DEBUG_CONFIG, FAST

RUN = [
    "data.dataset=imagefolder",
    "data.loader=torchvision",
    "data.image_size=16",
    "data.num_workers=0",
    "train.global_batch_size=8",
    "train.epochs=1",
    "train.ckpt_every_steps=2",
    "train.log_every=1",
    "train.precision=fp32",
    "wandb.enabled=false",
]


def _main(capsys, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    from addernet_dist.train import main

    capsys.readouterr()
    rc = main(["--config", str(DEBUG_CONFIG), *FAST, *RUN, f"data.root={root}", f"output_dir={out}", *extra])
    return rc, capsys.readouterr().err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(300)
def test_checkpoints_and_exports_name_the_classes_and_a_renamed_class_refuses_resume(tmp_path, capsys):
    root = tmp_path / "tree"
    make_jpeg_tree(root, num_classes=3, train_per_class=4, val_per_class=2)
    wnids = sorted(p.name for p in (root / "train").iterdir())
    out = tmp_path / "run"
    rc, err = _main(capsys, root, out)
    assert rc == 0, err[-3000:]
    ck = out / "checkpoints"
    steps = sorted(ck.glob("step_*.pt"))
    assert steps
    for f in [*steps, ck / "best.pt"]:
        assert checkpoint.load_file(f)["client"]["class_names"] == wnids, f

    from addernet_dist.interop import export

    exported = export(ck / "best.pt", tmp_path / "model.safetensors")
    with safe_open(str(exported), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == wnids

    # the same number of classes, one folder renamed (sorts last now): every label from 1 on shifts
    (root / "train" / wnids[1]).rename(root / "train" / "n99999999")
    (root / "val" / wnids[1]).rename(root / "val" / "n99999999")
    before = _snapshot(out)
    rc, err = _main(capsys, root, out, "train.epochs=2")
    assert rc == 2, err[-3000:]
    assert "the training data's classes changed since the checkpoint" in err
    assert f"label 1 was class '{wnids[1]}', data.root now has '{wnids[2]}' there" in err
    assert "Traceback" not in err
    assert _snapshot(out) == before

    # a class added: the classifier's shape already refuses it (fc 3 -> 4 outputs)
    (root / "train" / "n99999999").rename(root / "train" / wnids[1])
    (root / "val" / "n99999999").rename(root / "val" / wnids[1])
    make_jpeg_tree(tmp_path / "four", num_classes=4, train_per_class=4, val_per_class=2)
    rc, err = _main(capsys, tmp_path / "four", out, "train.epochs=2")
    assert rc == 2 and "size mismatch for fc.weight" in err and "Traceback" not in err, err[-3000:]
    assert _snapshot(out) == before
    # the original tree resumes
    rc, err = _main(capsys, root, out, "train.epochs=2")
    assert rc == 0, err[-3000:]
    assert checkpoint.load_file(ck / "best.pt")["client"]["class_names"] == wnids


def test_synthetic_data_has_no_class_names():
    from addernet_dist.trainer import _check_same_classes

    _check_same_classes(None, ["a"])  # an older checkpoint, or synthetic data: nothing to compare
    _check_same_classes(["a", "b"], None)
    with pytest.raises(ValueError, match="label 0 was class 'a'"):
        _check_same_classes(["a", "b"], ["c", "b"])
