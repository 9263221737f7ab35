"""Model registry: one-line registered constructors (timm style) with their default input shape."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from addernet_dist.nn import Adder2d, AdderLinear

CONV_KINDS = ("adder", "conv")


@dataclass(frozen=True)
class ModelInfo:
    fn: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W) the model is defined for
    num_classes: int
    # True: only input_shape's H x W works (a classifier sized for a fixed feature map).
    fixed_size: bool = False


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, *, fixed_size: bool = False
):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(fn, input_shape, num_classes, fixed_size)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def check_input_size(name: str, image_size: int) -> None:
    """Raise ValueError (with the fix) when model ``name`` cannot take ``image_size`` inputs."""
    info = model_info(name)
    _, h, w = info.input_shape
    if info.fixed_size and (image_size, image_size) != (h, w):
        raise ValueError(
            f"model {name} takes {h}x{w} inputs only (its classifier is sized for the feature map "
            f"of a {h}x{w} image), but data.image_size={image_size}; set data.image_size={h} or "
            "choose a model with global pooling (resnet*)"
        )


def layer_types(conv: str, **adder_kw) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(conv_layer, linear_layer) for a variant: Adder2d/AdderLinear, or nn.Conv2d/nn.Linear."""
    if conv == "adder":
        return partial(Adder2d, **adder_kw), partial(AdderLinear, **adder_kw)
    if conv == "conv":
        if adder_kw:
            raise ValueError(f"adder options {sorted(adder_kw)} make no sense with conv='conv'")
        return nn.Conv2d, nn.Linear
    raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")


def create_model(
    name: str,
    conv: str = "adder",
    num_classes: int | None = None,
    pretrained: bool | str | os.PathLike = False,
    **kw,
) -> nn.Module:
    """Build a registered model. ``conv="adder"`` → AdderNet, ``"conv"`` → its CNN twin.

    Extra keyword arguments go to the constructor: ``adder_stem`` / ``adder_head`` (make the first
    convolution / final classifier adder layers too), and adder layer options ``p``, ``grad_x``,
    ``grad_w``, ``backend``.

    ``pretrained`` (timm's): a tag of the model zoo (models/pretrained.py, e.g.
    ``"official_cifar10"`` for resnet20; ``True``: the model's default tag) builds the model the
    weights need (head, class count) and loads them, read with weights_only=True and mapped by the
    tag's key mapping; the model carries ``pretrained_cfg`` (mean, std, input size, crop, class
    names). A path loads a weights file of ours (a trainer checkpoint, an addernet-import-official
    output, an addernet-export .safetensors) into the model built from the other arguments; every
    key must match. Loaded models are returned in eval mode.
    """
    info = model_info(name)
    if conv not in CONV_KINDS:
        raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")
    if pretrained is False or pretrained is None:
        return info.fn(conv=conv, num_classes=num_classes or info.num_classes, **kw)
    return _create_pretrained(name, conv, num_classes, pretrained, kw)


def _create_pretrained(name: str, conv: str, num_classes: int | None, pretrained, kw: dict) -> nn.Module:
    from addernet_dist import weights_io
    from addernet_dist.models import pretrained as zoo

    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be a bool, a tag or a path, got {type(pretrained).__name__}")
    if zoo.is_tag(name, pretrained) or (isinstance(pretrained, str) and not Path(pretrained).exists()):
        cfg = zoo.pretrained_cfg(name, pretrained)  # an unknown tag (and no such file): the error
        clash = {k: kw[k] for k in ("head", "head_bias") if k in kw and kw[k] != getattr(cfg, k)}
        if conv != "adder" or (num_classes not in (None, cfg.num_classes)) or clash:
            raise ValueError(
                f"pretrained '{cfg.tag}' is an AdderNet {name} with {cfg.num_classes} classes and "
                f"head={cfg.head}, head_bias={cfg.head_bias}; got conv={conv!r}, "
                f"num_classes={num_classes}, {clash or ''}. For another head or class count, build "
                "it and load the weights with train.init_from (+ init_from_ignore)"
            )
        path = zoo.resolve_file(cfg)
        kw = {**kw, "head": cfg.head, "head_bias": cfg.head_bias}
        model = create_model(name, conv=conv, num_classes=cfg.num_classes, **kw)
        weights_io.load_official_into(model, path, cfg.key_fn())
        model.pretrained_cfg = cfg.as_dict()
        return model
    model = create_model(name, conv=conv, num_classes=num_classes, **kw)
    weights_io.load_weights_into(model, pretrained, name=name, conv=conv)
    model.pretrained_cfg = {"model": name, "file": str(pretrained)}
    return model.eval()
