"""Weights in and out: the official AdderNet checkpoints, safetensors export, ``train.init_from``.

    addernet-import-official ResNet50-AdderNet.pth official_r50.pt --model resnet50
    addernet-eval --config configs/official_resnet50_imagenet.yaml --checkpoint official_r50.pt \\
        data.root=/data/imagenet
    addernet-export runs/x/checkpoints/best.pt x.safetensors
    addernet-train --config configs/imagenet_resnet50.yaml train.init_from=x.safetensors

**The official files** (huawei-noah/AdderNet, ``test.py`` loads them into ``DataParallel(model)``):
a ``torch.save`` of a DataParallel ``state_dict`` in the legacy (pre-1.6, non-zip) format, every key
prefixed ``module.``. ``torch.load(weights_only=True)`` reads that format without unpickling
arbitrary objects, which is the only way a file a user downloaded is ever opened here. The layout
(read from the repository's resnet20.py / resnet50.py / adder.py and the ResNet-20 file itself):

=====================================  ==========================================================
official key                           ours (``create_model(name, head="linear_bn", ...)``)
=====================================  ==========================================================
``conv1.weight``, ``bn1.*``            the same (full-precision stem)
``layerX.Y.convN.adder``               ``layerX.Y.convN.weight`` (Adder2d, O×I×k×k, p = 1)
``layerX.Y.downsample.0.adder``        ``layerX.Y.downsample.0.weight`` (adder 1×1, stride 2)
``layerX.Y.bnN.*``, ``downsample.1.*`` the same
``fc.weight`` (C×F×1×1), ``fc.bias``   ``fc.0.weight`` (C×F), ``fc.0.bias`` (ResNet-50 only)
``bn2.*`` (top level: BN over logits)  ``fc.1.*``
=====================================  ==========================================================

The official adder forward is ``-cdist(W_col, unfold(X), p=1)``: −Σ|W − X| over C·k·k with zero
padding counted as inputs, exactly what our Adder2d computes at p = 1; the classifier is a 1×1
convolution on the 1×1 pooled map, i.e. a linear layer. ``tests/integration/test_interop.py`` checks the
imported model against a plain re-implementation of the official forward in fp64.

**Exported weights** (``addernet-export``): a safetensors file of the model's tensors (BN running
statistics included), with the model config as string metadata (name, conv, p, head, head_bias,
num_classes, kwargs, input normalisation and size, every adder layer's p/gradient modes), so
``load_exported(path)`` rebuilds the model bit for bit without this package's checkpoint format
or pickle. safetensors rather than a ``.pt``: it is read without unpickling (safe to share), and
other frameworks read it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from addernet_dist.checkpoint import atomic_write_bytes, layout, save_file
from addernet_dist.config import Config, ConfigError, ModelConfig
from addernet_dist.data.config import IMAGENET_MEAN, IMAGENET_STD
from addernet_dist.models import create_model
from addernet_dist.models.pretrained import (  # noqa: F401  (official_key_to_ours: re-exported)
    OFFICIAL_LAYOUTS,
    PretrainedCfg,
    official_key_to_ours,
)
from addernet_dist.runfolder import file_sha256
from addernet_dist.weights_io import (  # noqa: F401  (re-exported: interop's API before the split)
    _EXTRA,
    EXPORT_FORMAT,
    InteropError,
    _listing,
    _load_tensors,
    _read_checkpoint,
    _tensor_keys,
    _weights_and_config,
    check_finite,
    describe_mismatch,
    load_weights_into,
    map_official,
    read_checkpoint_weights,
    read_exported,
    read_official,
    read_weights,
)

# ---------------------------------------------------------------------------------------------
# The official models: which of ours they are and what input they expect. The zoo holds every value
# (models/pretrained.py: the tags' mean/std, input size, crop, head, key map, class names and which of
# our models share a published file's layout); this module reads it there at each call.
# ---------------------------------------------------------------------------------------------

# model -> the PretrainedCfg of the published file whose layout it has (a live view of the registry)
OFFICIAL_MODELS: Mapping[str, PretrainedCfg] = OFFICIAL_LAYOUTS


def official_config(model_name: str, num_classes: int, head_bias: bool) -> dict[str, Any]:
    """The run config (as a dict) that evaluates / fine-tunes an imported official model.

    Stored in the imported checkpoint so ``addernet-eval --checkpoint X data.root=...`` works
    without a config file; configs/official_*.yaml hold the same values (tested). The input pipeline
    and head are the zoo's (``OFFICIAL_MODELS[model_name]``)."""
    spec = _spec(model_name)
    cfg = Config().model_dump(mode="json")
    zoo = spec.config_values()  # the input pipeline and head of the published weights
    cfg["model"].update(zoo["model"], name=model_name, conv="adder", num_classes=num_classes, head_bias=head_bias)
    # root: validated when used (addernet-eval asks for data.root=...)
    cfg["data"].update(zoo["data"], dataset="imagefolder", root=None)
    # The weights were trained and evaluated in fp32 at p = 1: no bf16 autocast around the stem
    # and classifier, no ℓp schedule (it would restart at p = 2 and undo them).
    cfg["train"]["precision"] = "fp32"
    cfg["adder"]["p_schedule"] = False
    cfg["output_dir"] = f"runs/official_{model_name}"
    return cfg


def _spec(model_name: str) -> PretrainedCfg:
    if model_name not in OFFICIAL_MODELS:
        raise InteropError(
            f"model {model_name!r} has no official AdderNet layout; choose one of "
            f"{', '.join(OFFICIAL_MODELS)} (the published files are resnet20 and resnet50)"
        )
    return OFFICIAL_MODELS[model_name]


# ---------------------------------------------------------------------------------------------
# Reading an official file and mapping its keys onto ours
# ---------------------------------------------------------------------------------------------


def load_official(path: str | Path, model_name: str, **kw: Any) -> nn.Module:
    """An official AdderNet checkpoint as our model, in eval mode.

    ``model_name``: one of ``OFFICIAL_MODELS`` (``resnet20`` for ResNet20-AdderNet.pth, ``resnet50``
    for ResNet50-AdderNet.pth). The class count and the classifier bias come from the file. Any
    key the model lacks, any key of the model the file lacks, any shape difference is an
    InteropError listing them (official names first, ours after the arrow). ``kw``: create_model's."""
    return _import_official(path, model_name, **kw)[0]


def _import_official(path: str | Path, model_name: str, **kw: Any) -> tuple[nn.Module, dict[str, Any]]:
    spec = _spec(model_name)
    official = read_official(path)
    if "fc.weight" not in official:
        raise InteropError(
            f"'{path}' has no classifier weight 'fc.weight' (keys: {_listing(list(official))}); "
            "it is not an official AdderNet ResNet checkpoint"
        )
    fc = official["fc.weight"]
    if fc.dim() not in (2, 4):
        raise InteropError(f"'{path}': 'fc.weight' has shape {tuple(fc.shape)}; expected C×F×1×1")
    num_classes, head_bias = int(fc.shape[0]), "fc.bias" in official
    # Built on the meta device and materialised uninitialised: the key check below guarantees that
    # every tensor is overwritten (skips ResNet-50's 25 M-weight random init, ~0.5 s).
    with torch.device("meta"):
        model = create_model(
            model_name, conv="adder", num_classes=num_classes, head=spec.head, head_bias=head_bias, **kw
        )
    model = model.to_empty(device="cpu")
    ours, names = map_official(official, path, spec.key_fn())  # names: ours -> official
    problem = describe_mismatch(model.state_dict(), ours, names)
    if problem:
        other = _which_model_fits(ours, model_name, num_classes, head_bias)
        what = (
            f"is an official {other}, not a {model_name}: pass --model {other}"
            if other
            else (f"does not fit an official-layout {model_name}")
        )
        raise InteropError(f"'{path}' {what}\n{problem}")
    check_finite(ours, path)
    _load_tensors(model, ours)
    model.eval()
    meta = {"num_classes": num_classes, "head_bias": head_bias}
    return model, meta


def _which_model_fits(ours, asked: str, num_classes: int, head_bias: bool) -> str | None:
    """The official-layout model (other than ``asked``) whose keys and shapes ``ours`` has."""
    for name, spec in OFFICIAL_MODELS.items():
        if name == asked:
            continue
        with torch.device("meta"):
            m = create_model(name, num_classes=num_classes, head=spec.head, head_bias=head_bias)
        if not describe_mismatch(m.state_dict(), ours, {}):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Key checks shared by every way weights come in
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Export to safetensors and back
# ---------------------------------------------------------------------------------------------


def _num_classes_of(name: str, conv: str, kw: dict[str, Any], state: Mapping[str, Any]) -> int:
    """The class count of a state dict: the classifier keys are the ones whose shapes move with
    num_classes (found on two meta-device models, so it holds for every registered model)."""
    with torch.device("meta"):
        a = create_model(name, conv=conv, num_classes=3, **kw).state_dict()
        b = create_model(name, conv=conv, num_classes=5, **kw).state_dict()
    for k, va in a.items():
        if torch.is_tensor(va) and va.shape != b[k].shape and k in state:
            dim = next(i for i, (x, y) in enumerate(zip(va.shape, b[k].shape)) if x != y)
            return int(state[k].shape[dim])
    raise InteropError(f"cannot find the classifier of model {name!r} in the checkpoint")


def export(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model of checkpoint ``ckpt`` to ``out`` (.safetensors, atomically); returns it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InteropError(f"output '{out}' must end in .safetensors")
    if out.exists() and not overwrite:
        raise InteropError(f"'{out}' exists; pass --force to replace it")
    (state, cfg), client = _weights_and_config(whole := _read_checkpoint(ckpt), ckpt), layout.client_part(whole)
    model_cfg, data_cfg = cfg["model"], cfg.get("data", {})
    adder_state = {k[: -len(_EXTRA)]: v for k, v in state.items() if k.endswith(_EXTRA)}
    tensors = _tensor_keys(state)
    odd = [k for k in state if k not in tensors and k[: -len(_EXTRA)] not in adder_state]
    if odd:
        raise InteropError(f"'{ckpt}': entries that are neither tensors nor adder state: {odd}")
    check_finite(tensors, ckpt)
    kw = ModelConfig.model_validate(model_cfg).create_kwargs()
    ps = sorted({float(s["p"]) for s in adder_state.values()})
    meta = {
        "format": EXPORT_FORMAT,
        "name": model_cfg["name"],
        "conv": model_cfg["conv"],
        # one p when every adder layer has the same (always, for a trainer checkpoint)
        "p": json.dumps(ps[0] if len(ps) == 1 else ps),
        "head": model_cfg.get("head", "linear"),
        "head_bias": json.dumps(bool(model_cfg.get("head_bias", True))),
        "num_classes": str(_num_classes_of(model_cfg["name"], model_cfg["conv"], kw, state)),
        "kwargs": json.dumps(model_cfg.get("kwargs") or {}),
        "mean": json.dumps(list(data_cfg.get("mean", IMAGENET_MEAN))),
        "std": json.dumps(list(data_cfg.get("std", IMAGENET_STD))),
        "image_size": json.dumps(data_cfg.get("image_size")),
        "adder_state": json.dumps(adder_state),
    }
    if client.get("class_names"):  # an imported pretrained checkpoint (the zoo's class names)
        meta["class_names"] = json.dumps(list(client["class_names"]))
    from safetensors.torch import save

    # save() refuses views of shared storage; state_dict tensors share none once contiguous.
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(data, out)
    return out


def _model_from_meta(meta: Mapping[str, str]) -> nn.Module:
    cfg = ModelConfig(
        name=meta["name"],
        conv=meta["conv"],
        head=meta["head"],
        head_bias=json.loads(meta["head_bias"]),
        kwargs=json.loads(meta["kwargs"]),
    )
    return create_model(
        cfg.name, conv=cfg.conv, num_classes=int(meta["num_classes"]), **cfg.create_kwargs()
    )


def load_exported(path: str | Path) -> nn.Module:
    """The model of an ``addernet-export`` file, in eval mode, equal bit for bit to the exported
    one (weights, BN statistics, every adder layer's p and gradient modes)."""
    tensors, meta = read_exported(path)
    model = _model_from_meta(meta)
    problem = describe_mismatch(model.state_dict(), tensors, {})
    if problem:
        raise InteropError(f"'{path}' does not fit the model its metadata names:\n{problem}")
    adder_state = json.loads(meta["adder_state"])
    _load_tensors(model, {**tensors, **{k + _EXTRA: v for k, v in adder_state.items()}})
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# train.init_from: weights (not a training state) into a freshly built model
# ---------------------------------------------------------------------------------------------


def init_from_config(model: nn.Module, cfg: Config) -> tuple[list[str], list[str]]:
    """``train.init_from`` for the trainer: ``load_weights_into`` with config errors."""
    try:
        return load_weights_into(
            model,
            cfg.train.init_from,
            cfg.train.init_from_ignore,
            name=cfg.model.name,
            conv=cfg.model.conv,
        )
    except InteropError as e:
        raise ConfigError(f"train.init_from: {e}") from None


# ---------------------------------------------------------------------------------------------
# CLIs
# ---------------------------------------------------------------------------------------------


def import_official(src: str | Path, dst: str | Path, model_name: str, overwrite=False) -> Path:
    """Write official checkpoint ``src`` as a checkpoint file of ours that addernet-eval reads."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise InteropError(f"'{dst}' exists; pass --force to replace it")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InteropError("the output would replace the official file; choose another name")
    model, meta = _import_official(src, model_name)
    client = {
        "config": official_config(model_name, meta["num_classes"], meta["head_bias"]),
        "imported_from": {"path": str(src), "sha256": file_sha256(src), "model": model_name},
    }
    spec = _spec(model_name)
    if spec.model == model_name:  # the published files (not a family member): the zoo's class names
        names = spec.names()
        if len(names) == meta["num_classes"]:
            client["class_names"] = names
    engine = {"model": model.state_dict(), "optimizer": None, "lr_scheduler": None}
    save_file(layout.build(engine, client), dst)
    return dst


def main_import(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="addernet-import-official",
        description="Convert an official huawei-noah AdderNet checkpoint (ResNet20-AdderNet.pth, "
        "ResNet50-AdderNet.pth) into a checkpoint addernet-eval / train.init_from read.",
    )
    ap.add_argument("src", help="the official .pth file")
    ap.add_argument("dst", help="checkpoint file to write (e.g. official_resnet50.pt)")
    ap.add_argument("--model", required=True, choices=list(OFFICIAL_MODELS))
    ap.add_argument("--force", action="store_true", help="replace dst if it exists")
    args = ap.parse_args(argv)
    try:
        out = import_official(args.src, args.dst, args.model, overwrite=args.force)
    except InteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    spec = OFFICIAL_MODELS[args.model]
    if spec.model == args.model and spec.config:  # the published files have a shipped config
        split = " data.train_split=val" if spec.dataset == "cifar10" else ""  # CIFAR: the test set only
        print(
            f"evaluate: addernet-eval --config configs/{spec.config}.yaml "
            f"--checkpoint {out} data.root=/path/to/data{split}"
        )
    return 0


def main_export(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="addernet-export",
        description="Write the model of a checkpoint as .safetensors with its config as metadata "
        "(load with interop.load_exported or train.init_from).",
    )
    ap.add_argument(
        "checkpoint", help="a step_*.pt / best.pt file (DeepSpeed folders: convert first)"
    )
    ap.add_argument("output", help="OUT.safetensors")
    ap.add_argument("--force", action="store_true", help="replace the output if it exists")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, overwrite=args.force)
    except InteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
