"""`addernet-data check ROOT`: counts, corrupt files by path, oddities, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from addernet_dist.data.check import check_tree
from addernet_dist.data.jpeg_tree import corrupt_file, make_jpeg_tree
from addernet_dist.data_cli import main


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    files = make_jpeg_tree(root, num_classes=3, train_per_class=4, val_per_class=2, flat_val=True)
    bad = files["train"][6][0]
    corrupt_file(bad)
    (root / "train" / "n01000000" / "notes.txt").write_text("not an image")
    return root, files, bad


@pytest.mark.timeout(60)
def test_check_report_counts_corrupt_and_oddities(bad_tree, capsys, tmp_path):
    root, files, bad = bad_tree
    out_json = tmp_path / "report.json"
    rc = main(["check", str(root), "--workers", "1", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "train: 3 classes, 12 images (class folders; 4-4 per class)" in out
    assert "val: 3 classes, 6 images (flat + ground-truth file; 2-2 per class)" in out
    assert "train: CORRUPT / unreadable: 1" in out and bad in out
    assert "FAILED: 1 file(s) cannot be decoded" in out
    # make_jpeg_tree(odd=True): per split one grayscale, one CMYK, one PNG named .JPEG.
    for split in ("train", "val"):
        assert f"{split}: grayscale (mode L), converted to 3 identical channels: 1" in out
        assert f"{split}: CMYK JPEG, converted to RGB: 1" in out
        assert f"{split}: content format differs from the file extension" in out
    assert "notes.txt" in out
    report = json.loads(out_json.read_text())
    assert [r["split"] for r in report] == ["train", "val"]
    assert [f["path"] for f in report[0]["corrupt"]] == [bad]
    png = [f for f in report[1]["oddities"] if "format_mismatch" in f["oddities"]]
    assert len(png) == 1 and png[0]["format"] == "PNG" and png[0]["path"].endswith(".JPEG")


@pytest.mark.timeout(60)
def test_check_parallel_matches_serial(bad_tree):
    root, _, _ = bad_tree
    serial = check_tree(root, workers=1)
    parallel = check_tree(root, workers=2)
    assert [f.__dict__ for r in serial for f in r.files] == [
        f.__dict__ for r in parallel for f in r.files
    ]


@pytest.mark.timeout(60)
def test_check_clean_tree_and_bad_root(tmp_path, capsys):
    make_jpeg_tree(tmp_path / "ok", num_classes=2, train_per_class=2, val_per_class=1, odd=False)
    assert main(["check", str(tmp_path / "ok"), "--workers", "1"]) == 0
    assert "OK: every image decodes" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert f"'{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_check_runs_as_a_module(bad_tree):
    root, _, bad = bad_tree
    p = subprocess.run(
        [sys.executable, "-m", "addernet_dist.data_cli", "check", str(root), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert p.returncode == 1 and bad in p.stdout


@pytest.mark.timeout(60)
def test_digits_command_writes_the_tree(tmp_path, capsys):
    assert main(["digits", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d")
    assert main(["check", str(tmp_path / "d"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 10 classes, 1437 images" in out and "val: 10 classes, 360 images" in out
    assert "grayscale (mode L), converted to 3 identical channels: 1437" in out
