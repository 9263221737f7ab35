"""One rule for the loaders and `addernet-data check`: a symlink loop, a second link to one image
or folder, and an empty train class folder are errors naming the path in both."""

from __future__ import annotations

import os
import shutil

import pytest

from addernet_dist.data.check import check_tree, format_report
from addernet_dist.data.folder import scan_split
from addernet_dist.data.jpeg_tree import make_jpeg_tree
from addernet_dist.data_cli import main as data_main


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    # 3 classes x 8 train images: the 24.
    make_jpeg_tree(root, num_classes=3, train_per_class=8, val_per_class=2, odd=False)
    return root


def _both_refuse(root, capsys, *needles: str) -> None:
    with pytest.raises(ValueError) as e:
        scan_split(root, "train")
    for n in needles:
        assert n in str(e.value), str(e.value)
    capsys.readouterr()
    assert data_main(["check", str(root)]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


@pytest.mark.timeout(60)
def test_symlink_loop_is_refused_by_the_loader_and_the_check(tree, capsys):
    c0 = tree / "train" / sorted(os.listdir(tree / "train"))[0]
    assert len(scan_split(tree, "train")) == 24
    os.symlink("..", c0 / "loop")  # train/c0/loop -> train/
    _both_refuse(tree, capsys, f"'{c0 / 'loop'}' is the folder", "symlink loop")


@pytest.mark.timeout(60)
def test_a_second_link_to_one_image_or_folder_is_refused(tree, capsys):
    c0, c1, c2 = (tree / "train" / c for c in sorted(os.listdir(tree / "train")))
    first = sorted(os.listdir(c0))[0]
    os.symlink(c0 / first, c1 / "again.JPEG")  # the same image under another label
    _both_refuse(tree, capsys, f"'{c1 / 'again.JPEG'}' is the image '{c0 / first}' again")
    os.remove(c1 / "again.JPEG")
    os.symlink(c0, c2 / "sub")  # a second link to a whole folder
    _both_refuse(tree, capsys, f"'{c2 / 'sub'}' is the folder '{c0}' again")


@pytest.mark.timeout(60)
def test_a_symlinked_class_folder_elsewhere_still_loads(tree, tmp_path):
    c2 = tree / "train" / sorted(os.listdir(tree / "train"))[2]
    moved = tmp_path / "other_disk" / "c2"
    shutil.move(c2, moved)
    os.symlink(moved, c2)  # a dataset spread over disks
    samples = scan_split(tree, "train")
    assert len(samples) == 24 and samples.labels.count(2) == 8


@pytest.mark.timeout(60)
def test_empty_class_folder_is_one_rule_for_loader_and_check(tree, capsys):
    classes = sorted(os.listdir(tree / "train"))
    (tree / "train" / "zz_empty").mkdir()  # was: the model got 4 classes, the check said 3
    _both_refuse(tree, capsys, "class folder(s) of", "zz_empty", "hold no images")
    # An empty val class folder is fine (the classes are the train split's); the check counts the
    # model's classes and names the one without val images.
    shutil.rmtree(tree / "train" / "zz_empty")
    for f in os.listdir(tree / "val" / classes[1]):
        os.remove(tree / "val" / classes[1] / f)
    val = scan_split(tree, "val")
    assert len(val.classes) == 3 and sorted(set(val.labels)) == [0, 2]
    text = format_report(tree, check_tree(tree))
    assert "val: 3 classes, 4 images (class folders; 0-2 per class)" in text, text
    assert f"val: classes without images: 1\n  {classes[1]}" in text, text
