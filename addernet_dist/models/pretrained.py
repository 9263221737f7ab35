"""Pretrained weights as model-zoo configs (timm's ``pretrained_cfg``): one :class:`PretrainedCfg` per
(model, tag), holding where the file comes from, the input pipeline the weights were trained behind,
the head they need, the key mapping onto our state dict and the class names.

    create_model("resnet20", pretrained="official_cifar10")   # a tag of this registry
    create_model("resnet20", pretrained=True)                 # the model's default tag
    create_model("resnet20", pretrained="runs/x/checkpoints/best.pt")   # or any weights file

Files are never downloaded: a tag's file is looked up by name in ``$ADDERNET_PRETRAINED_DIR``
(default ``~/.cache/addernet_dist/pretrained``), its sha256 checked where the registry pins one,
and read with ``torch.load(weights_only=True)`` (weights_io.read_official): nothing is unpickled.
A missing file is an error naming the directory, the file name and its source.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addernet_dist.data.config import IMAGENET_MEAN, IMAGENET_STD

PRETRAINED_DIR_ENV = "ADDERNET_PRETRAINED_DIR"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def official_key_to_ours(key: str) -> str:
    """The official huawei-noah ResNets' keys (``module.`` prefix removed) -> ours (interop.py's
    module table): ``bn2`` is the BN over the logits, ``fc`` a 1x1 conv, adder weights ``.adder``."""
    if key.startswith("bn2."):  # top-level bn2 is the BN over the logits (blocks' bn2 are nested)
        return "fc.1." + key[len("bn2.") :]
    if key in ("fc.weight", "fc.bias"):
        return "fc.0." + key[len("fc.") :]
    if key.endswith(".adder"):
        return key[: -len(".adder")] + ".weight"
    return key


# Key mappings by name (a config names its mapping; the function lives here, with the zoo).
KEY_MAPS: dict[str, Callable[[str], str]] = {"official_addernet": official_key_to_ours}


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in ImageFolder (sorted wnid) order, torchvision's list."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class PretrainedCfg:
    """One pretrained tag of one model: what the weights need to be used as published."""

    model: str  # the registered architecture
    tag: str
    source: str  # where the file is published (a person fetches it; nothing here downloads)
    file: str  # the file name looked up in the pretrained directory
    sha256: str | None  # pinned when the published file is known here; None: not checked
    dataset: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]  # (C, H, W)
    # Val geometry: resize the shorter side to round(H * val_resize_ratio), centre crop H (timm's
    # crop_pct = 1 / val_resize_ratio): 256/224 for ImageNet, 1.0 (no crop) for CIFAR.
    val_resize_ratio: float
    head: str  # model.head the weights need ("linear_bn": the official ResNets' classifier)
    head_bias: bool
    key_map: str  # a KEY_MAPS name
    class_names: tuple[str, ...] | Callable[[], tuple[str, ...]] = field(default=())
    config: str | None = None  # the shipped run config (configs/<config>.yaml) that evaluates / fine-tunes it

    @property
    def crop_pct(self) -> float:
        return 1.0 / self.val_resize_ratio

    @property
    def image_size(self) -> int:
        return self.input_size[1]

    def config_values(self) -> dict[str, dict[str, Any]]:
        """The run-config keys these weights fix, by section: the input pipeline they were trained
        behind and the classifier they need (what ``pretrained: <model>.<tag>`` fills in a config and
        what interop.official_config stores in an imported checkpoint)."""
        return {
            "model": {"head": self.head, "head_bias": self.head_bias},
            "data": {
                "image_size": self.image_size,
                "val_resize_ratio": self.val_resize_ratio,
                "mean": list(self.mean),
                "std": list(self.std),
            },
        }

    def key_fn(self) -> Callable[[str], str]:
        """The published file's key -> ours (``KEY_MAPS[key_map]``)."""
        return KEY_MAPS[self.key_map]

    def names(self) -> list[str]:
        names = self.class_names() if callable(self.class_names) else self.class_names
        return list(names)

    def as_dict(self) -> dict[str, Any]:
        """What a model built from these weights carries as ``model.pretrained_cfg``."""
        return {
            "model": self.model,
            "tag": self.tag,
            "source": self.source,
            "file": self.file,
            "sha256": self.sha256,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": list(self.input_size),
            "crop_pct": self.crop_pct,
            "head": self.head,
            "head_bias": self.head_bias,
            "class_names": self.names(),
        }


_PRETRAINED: dict[str, dict[str, PretrainedCfg]] = {}  # model -> tag -> cfg (first tag: default)


def register_pretrained(cfg: PretrainedCfg) -> PretrainedCfg:
    tags = _PRETRAINED.setdefault(cfg.model, {})
    if cfg.tag in tags:
        raise ValueError(f"pretrained tag {cfg.tag!r} of {cfg.model!r} registered twice")
    if cfg.key_map not in KEY_MAPS:
        raise ValueError(f"unknown key map {cfg.key_map!r}; known: {', '.join(KEY_MAPS)}")
    tags[cfg.tag] = cfg
    return cfg


def list_pretrained(model: str | None = None) -> list[str]:
    """``model.tag`` names (timm's ``list_pretrained``), of one model or all."""
    return sorted(f"{m}.{t}" for m, tags in _PRETRAINED.items() if model in (None, m) for t in tags)


def pretrained_cfg(model: str, tag: str | bool) -> PretrainedCfg:
    """The config of ``tag`` (True: the model's default, its first registered tag)."""
    tags = _PRETRAINED.get(model, {})
    if tag is True:
        if not tags:
            raise ValueError(
                f"model {model!r} has no pretrained weights in the zoo (models with some: "
                f"{', '.join(list_pretrained()) or 'none'}); pass pretrained='path/to/weights'"
            )
        return next(iter(tags.values()))
    if tag not in tags:
        raise ValueError(
            f"model {model!r} has no pretrained tag {tag!r} (its tags: {', '.join(tags) or 'none'}; "
            f"all: {', '.join(list_pretrained())}), and no file {tag!r} exists to load instead"
        )
    return tags[tag]


def pretrained_cfg_by_name(name: str) -> PretrainedCfg:
    """``"<model>.<tag>"`` (a ``list_pretrained`` name, e.g. ``resnet20.official_cifar10``) -> its config."""
    model, dot, tag = name.partition(".")
    if not dot or not tag:
        raise ValueError(
            f"pretrained {name!r} is not '<model>.<tag>'; the zoo's: {', '.join(list_pretrained())}"
        )
    return pretrained_cfg(model, tag)


def is_tag(model: str, value: str | bool) -> bool:
    return value is True or (isinstance(value, str) and value in _PRETRAINED.get(model, {}))


# Our models with the layout of a published file -> (model, tag) of that file: the importer
# (interop.py, addernet-import-official) reads its input pipeline, head and key map from that tag.
# The authors published resnet20 (CIFAR-10) and resnet50 (ImageNet); the others share the layout of
# their family.
OFFICIAL_LAYOUT: dict[str, tuple[str, str]] = {
    "resnet8": ("resnet20", "official_cifar10"),
    "resnet20": ("resnet20", "official_cifar10"),
    "resnet32": ("resnet20", "official_cifar10"),
    "resnet18": ("resnet50", "official_imagenet"),
    "resnet50": ("resnet50", "official_imagenet"),
}


class _OfficialLayouts(Mapping[str, PretrainedCfg]):
    """``OFFICIAL_LAYOUTS[model]``: the registered ``PretrainedCfg`` whose layout ``model`` has, looked up
    in the registry at each access (a mapping over OFFICIAL_LAYOUT, not a copy of the entries)."""

    def __getitem__(self, model: str) -> PretrainedCfg:
        return pretrained_cfg(*OFFICIAL_LAYOUT[model])

    def __iter__(self) -> Iterator[str]:
        return iter(OFFICIAL_LAYOUT)

    def __len__(self) -> int:
        return len(OFFICIAL_LAYOUT)


OFFICIAL_LAYOUTS: Mapping[str, PretrainedCfg] = _OfficialLayouts()


def pretrained_dir() -> Path:
    return Path(os.environ.get(PRETRAINED_DIR_ENV) or Path.home() / ".cache" / "addernet_dist" / "pretrained")


def resolve_file(cfg: PretrainedCfg) -> Path:
    """The local file of ``cfg`` (checked against its pinned sha256); a clear error when absent."""
    path = pretrained_dir() / cfg.file
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained '{cfg.tag}' of {cfg.model}: '{path}' does not exist. Nothing is downloaded: "
            f"get {cfg.file} from {cfg.source} and put it in {path.parent} (or set "
            f"{PRETRAINED_DIR_ENV}), or pass pretrained='path/to/{cfg.file}'"
        )
    if cfg.sha256 is not None:
        from addernet_dist.runfolder import file_sha256

        got = file_sha256(path)
        if got != cfg.sha256:
            raise ValueError(
                f"'{path}' has sha256 {got}, not the published {cfg.file}'s {cfg.sha256}: a "
                "different or damaged file; fetch it again from " + cfg.source
            )
    return path


_OFFICIAL = "https://github.com/huawei-noah/AdderNet"
# tests/data/README.md: the authors' ResNet-20 (CIFAR-10, 91.8 % in their README), published in
# commit d94dc43 as models/ResNet20-AdderNet.pth. The CIFAR std is the official code's
# (0.2023, 0.1994, 0.2010), not CIFAR-10's per-pixel std: the weights were trained behind it.
register_pretrained(
    PretrainedCfg(
        model="resnet20",
        tag="official_cifar10",
        source=f"{_OFFICIAL} (commit d94dc43, models/ResNet20-AdderNet.pth)",
        file="ResNet20-AdderNet.pth",
        sha256="fe3ad7c15573d34cddd9b3ec2eed12d9c2c818e59cd7d0797a954d6f76ea375b",
        dataset="cifar10",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        input_size=(3, 32, 32),
        val_resize_ratio=1.0,
        head="linear_bn",
        head_bias=False,
        key_map="official_addernet",
        class_names=CIFAR10_CLASSES,
        config="official_resnet20_cifar10",
    )
)
# The authors' ResNet-50 (ImageNet, 74.9 / 91.7 %), on their drives (README); not pinned here.
register_pretrained(
    PretrainedCfg(
        model="resnet50",
        tag="official_imagenet",
        source=f"{_OFFICIAL} (README: ResNet50-AdderNet.pth)",
        file="ResNet50-AdderNet.pth",
        sha256=None,
        dataset="imagenet",
        num_classes=1000,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=(3, 224, 224),
        val_resize_ratio=256 / 224,  # test.py: Resize(256) + CenterCrop(224)
        head="linear_bn",
        head_bias=True,
        key_map="official_addernet",
        class_names=imagenet_class_names,
        config="official_resnet50_imagenet",
    )
)
