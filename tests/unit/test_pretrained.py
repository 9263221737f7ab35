"""The pretrained registry (models/pretrained.py): ``create_model(name, pretrained=tag | True | path)``
with each tag a model-zoo config (source, mean, std, input size, crop, head, key mapping, class
names), files looked up locally (never downloaded), sha256-pinned, read with weights_only=True.
Class names go into imported checkpoints and the addernet-export metadata.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from addernet_dist import interop
from addernet_dist.checkpoint import load_file
from addernet_dist.config import ConfigError, load_config
from addernet_dist.models import create_model, list_pretrained, pretrained_cfg
from addernet_dist.models.pretrained import PRETRAINED_DIR_ENV
from tests.train_helpers import REPO

DATA = REPO / "tests" / "data"
OFFICIAL_R20 = DATA / "ResNet20-AdderNet.pth"


@pytest.fixture
def zoo_dir(monkeypatch):
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(DATA))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]) if torch.is_tensor(v) else v == sb[k], k


def test_tag_builds_the_official_model_with_its_zoo_config(zoo_dir):
    assert list_pretrained("resnet20") == ["resnet20.official_cifar10"]
    model = create_model("resnet20", pretrained="official_cifar10")
    _same(model, interop.load_official(OFFICIAL_R20, "resnet20"))  # the importer's model, bit for bit
    assert not model.training
    cfg = model.pretrained_cfg
    assert (cfg["mean"], cfg["std"]) == ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    assert (cfg["input_size"], cfg["crop_pct"], cfg["head"], cfg["head_bias"]) == ([3, 32, 32], 1.0, "linear_bn", False)
    assert cfg["class_names"][:2] == ["airplane", "automobile"] and len(cfg["class_names"]) == 10
    # the interop importer takes its input pipeline from the same zoo entry
    spec = interop.OFFICIAL_MODELS["resnet20"]
    assert (list(spec.mean), list(spec.std), spec.image_size) == (cfg["mean"], cfg["std"], 32)
    # True: the model's default (first) tag
    _same(create_model("resnet20", pretrained=True), model)


def test_pretrained_true_without_weights_and_unknown_tags_are_clear_errors(zoo_dir):
    with pytest.raises(ValueError, match="resnet8' has no pretrained weights in the zoo"):
        create_model("resnet8", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained tag 'official_imagenet'.*its tags: official_cifar10"):
        create_model("resnet20", pretrained="official_imagenet")
    with pytest.raises(ValueError, match="AdderNet resnet20 with 10 classes.*got conv='conv'"):
        create_model("resnet20", conv="conv", pretrained="official_cifar10")
    with pytest.raises(ValueError, match="100 classes|num_classes=100"):
        create_model("resnet20", num_classes=100, pretrained="official_cifar10")
    assert pretrained_cfg("resnet50", True).val_resize_ratio == pytest.approx(256 / 224)


def test_missing_or_different_file_names_the_directory_and_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ResNet20-AdderNet.pth' does not exist. Nothing is downloaded"):
        create_model("resnet20", pretrained="official_cifar10")
    torch.save({"fc.weight": torch.zeros(10, 64)}, tmp_path / "ResNet20-AdderNet.pth")
    with pytest.raises(ValueError, match="not the published ResNet20-AdderNet.pth's fe3ad7c1"):
        create_model("resnet20", pretrained="official_cifar10")


def test_a_path_loads_our_weights_and_class_names_travel_to_the_export(tmp_path, zoo_dir):
    imported = interop.import_official(OFFICIAL_R20, tmp_path / "r20.pt", "resnet20")
    assert load_file(imported)["client"]["class_names"][-1] == "truck"
    ref = create_model("resnet20", pretrained="official_cifar10")
    kw = dict(num_classes=10, head="linear_bn", head_bias=False)
    from_file = create_model("resnet20", pretrained=str(imported), **kw)
    _same(from_file, ref)
    out = interop.export(imported, tmp_path / "r20.safetensors")
    _, meta = interop.read_exported(out)
    assert json.loads(meta["class_names"]) == ref.pretrained_cfg["class_names"]
    _same(create_model("resnet20", pretrained=out, **kw), ref)
    # a file that does not fit the model built from the other arguments: every key must match
    with pytest.raises(interop.InteropError, match="does not match the model"):
        create_model("resnet20", pretrained=str(imported))  # the default linear head


def test_the_official_file_copied_elsewhere_is_found_there(tmp_path, monkeypatch):
    shutil.copy(OFFICIAL_R20, tmp_path / OFFICIAL_R20.name)
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path))
    assert create_model("resnet20", pretrained="official_cifar10").pretrained_cfg["file"] == OFFICIAL_R20.name


def test_the_importer_and_create_model_read_the_same_zoo_entry(tmp_path, zoo_dir, monkeypatch):
    # One home for the official weights' metadata: change the registry entry and both the importer
    # (interop: addernet-import-official, official_config) and create_model(pretrained=tag) follow.
    from dataclasses import replace

    from addernet_dist.models import pretrained as zoo

    seen: list[str] = []

    def spy(key: str) -> str:
        seen.append(key)
        return zoo.official_key_to_ours(key)

    monkeypatch.setitem(zoo.KEY_MAPS, "spy", spy)
    entry = replace(
        pretrained_cfg("resnet20", "official_cifar10"),
        std=(0.25, 0.5, 0.75),
        mean=(0.125, 0.25, 0.375),
        val_resize_ratio=1.25,
        key_map="spy",
        class_names=tuple(f"c{i}" for i in range(10)),
    )
    monkeypatch.setitem(zoo._PRETRAINED["resnet20"], "official_cifar10", entry)

    cfg = create_model("resnet20", pretrained="official_cifar10").pretrained_cfg
    assert (cfg["std"], cfg["mean"], cfg["crop_pct"]) == ([0.25, 0.5, 0.75], [0.125, 0.25, 0.375], 0.8)
    n_model = len(seen)
    assert n_model > 0 and "fc.weight" in seen  # the tag's key map
    client = load_file(interop.import_official(OFFICIAL_R20, tmp_path / "r20.pt", "resnet20"))["client"]
    assert len(seen) == 2 * n_model  # the importer mapped the same keys with the same function
    data = client["config"]["data"]
    assert (data["std"], data["mean"], data["val_resize_ratio"]) == ([0.25, 0.5, 0.75], [0.125, 0.25, 0.375], 1.25)
    assert client["class_names"] == list(entry.class_names)
    # the family members (same layout, no published file) follow the same entry
    assert interop.official_config("resnet8", 10, False)["data"]["std"] == [0.25, 0.5, 0.75]
    assert interop.OFFICIAL_MODELS["resnet32"] is entry
    # and so does the shipped run config, which names the tag instead of copying its values
    run = load_config(REPO / "configs" / "official_resnet20_cifar10.yaml")
    assert (run.data.std, run.data.mean, run.data.val_resize_ratio) == (entry.std, entry.mean, 1.25)


def test_a_config_key_that_contradicts_its_pretrained_tag_is_an_error():
    cfg = load_config(None, ["pretrained=resnet50.official_imagenet", "model.name=resnet50"])
    assert (cfg.model.head, cfg.model.head_bias, cfg.data.image_size) == ("linear_bn", True, 224)
    assert cfg.data.resolved_val_resize_ratio == pytest.approx(256 / 224)
    same = load_config(REPO / "configs" / "official_resnet20_cifar10.yaml", ["data.std=[0.2023, 0.1994, 0.2010]"])
    assert same.data.std == (0.2023, 0.1994, 0.2010)  # the tag's own value may be repeated
    with pytest.raises(ConfigError, match=r"data.std=\[0.247.*differs from \[0.2023.*resnet20.official_cifar10"):
        load_config(REPO / "configs" / "official_resnet20_cifar10.yaml", ["data.std=[0.2470, 0.2435, 0.2616]"])
    with pytest.raises(ConfigError, match="model.head='linear' differs"):
        load_config(REPO / "configs" / "official_resnet20_cifar10.yaml", ["model.head=linear"])
    with pytest.raises(ConfigError, match="not '<model>.<tag>'.*resnet20.official_cifar10"):
        load_config(REPO / "configs" / "debug.yaml", ["pretrained=official_cifar10"])
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        load_config(REPO / "configs" / "debug.yaml", ["pretrained=resnet20.nope"])
