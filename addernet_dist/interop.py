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
convolution on the 1×1 pooled map, i.e. a linear layer. ``tests/test_interop.py`` checks the
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
import fnmatch
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from addernet_dist.checkpoint import CheckpointError, atomic_write_bytes, load_file, save_file
from addernet_dist.config import Config, ConfigError, ModelConfig
from addernet_dist.data.config import IMAGENET_MEAN, IMAGENET_STD
from addernet_dist.models import create_model
from addernet_dist.runfolder import file_sha256

EXPORT_FORMAT = "addernet-dist/weights-v1"
_EXTRA = "._extra_state"  # Adder2d/AdderLinear keep p and the gradient modes there (nn.py)
_MAX_LISTED = 20  # keys listed per kind of mismatch in an error; the rest are counted


class InteropError(ValueError):
    """A weights file that does not fit the model it is meant for (the message names the keys)."""


# ---------------------------------------------------------------------------------------------
# The official models: which of ours they are and what input they expect
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialSpec:
    """Input pipeline of an official model (its test.py): normalisation and the val geometry."""

    dataset: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    val_resize_ratio: float  # shorter side resized to round(image_size * ratio), centre crop
    root: str  # placeholder shown in the stored config; the user passes data.root=...


# The CIFAR std is the one the official code normalises with, (0.2023, 0.1994, 0.2010) — not the
# per-pixel std of CIFAR-10 (0.2470, 0.2435, 0.2616, configs/cifar10_resnet20.yaml). The weights
# were trained behind it, so evaluating them with any other std shifts every input ~20 %.
CIFAR_SPEC = OfficialSpec(
    "cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 32, 1.0, "/data/cifar10"
)
# test.py: Resize(256) + CenterCrop(224) + the usual ImageNet normalisation.
IMAGENET_SPEC = OfficialSpec(
    "imagenet",
    IMAGENET_MEAN,
    IMAGENET_STD,
    224,
    256 / 224,
    "/data/imagenet",  # type: ignore[arg-type]
)
# Our ResNets with the official code's layout. The authors published resnet20 (CIFAR-10, 91.8 %)
# and resnet50 (ImageNet, 74.9 / 91.7 %); the others share the layout of their family.
OFFICIAL_MODELS: dict[str, OfficialSpec] = {
    "resnet8": CIFAR_SPEC,
    "resnet20": CIFAR_SPEC,
    "resnet32": CIFAR_SPEC,
    "resnet18": IMAGENET_SPEC,
    "resnet50": IMAGENET_SPEC,
}


def official_config(model_name: str, num_classes: int, head_bias: bool) -> dict[str, Any]:
    """The run config (as a dict) that evaluates / fine-tunes an imported official model.

    Stored in the imported checkpoint so ``addernet-eval --checkpoint X data.root=...`` works
    without a config file; configs/official_*.yaml hold the same values (tested)."""
    spec = _spec(model_name)
    cfg = Config().model_dump(mode="json")
    cfg["model"].update(
        name=model_name,
        conv="adder",
        num_classes=num_classes,
        head="linear_bn",
        head_bias=head_bias,
    )
    cfg["data"].update(
        dataset="imagefolder",
        root=None,  # validated when used: addernet-eval asks for data.root=...
        image_size=spec.image_size,
        val_resize_ratio=spec.val_resize_ratio,
        mean=list(spec.mean),
        std=list(spec.std),
    )
    # The weights were trained and evaluated in fp32 at p = 1: no bf16 autocast around the stem
    # and classifier, no ℓp schedule (it would restart at p = 2 and undo them).
    cfg["train"]["precision"] = "fp32"
    cfg["adder"]["p_schedule"] = False
    cfg["output_dir"] = f"runs/official_{model_name}"
    return cfg


def _spec(model_name: str) -> OfficialSpec:
    if model_name not in OFFICIAL_MODELS:
        raise InteropError(
            f"model {model_name!r} has no official AdderNet layout; choose one of "
            f"{', '.join(OFFICIAL_MODELS)} (the published files are resnet20 and resnet50)"
        )
    return OFFICIAL_MODELS[model_name]


# ---------------------------------------------------------------------------------------------
# Reading an official file and mapping its keys onto ours
# ---------------------------------------------------------------------------------------------


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The official state dict with the ``module.`` (DataParallel) prefix removed.

    ``weights_only=True`` reads both the legacy and the zip format and refuses any pickled object
    other than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"official checkpoint '{path}' does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors, or objects weights_only refuses
        raise InteropError(
            f"'{path}' is not a state_dict torch.load(weights_only=True) can read ({e}); "
            "expected the official ResNet20-AdderNet.pth / ResNet50-AdderNet.pth. A whole "
            "pickled model (the official main.py's torch.save(net)) is never unpickled here: "
            "load it with the official code and torch.save(net.state_dict(), path)"
        ) from e
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise InteropError(f"'{path}' does not hold a state_dict (a mapping of name -> tensor)")
    keys = list(obj)
    prefixed = [k.startswith("module.") for k in keys]
    if any(prefixed) and not all(prefixed):
        odd = [k for k, p in zip(keys, prefixed) if not p]
        raise InteropError(f"'{path}': only some keys carry the 'module.' prefix: {_listing(odd)}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def official_key_to_ours(key: str) -> str:
    """Our state_dict key for one official key (prefix already removed); see the module table."""
    if key.startswith("bn2."):  # top-level bn2 is the BN over the logits (blocks' bn2 are nested)
        return "fc.1." + key[len("bn2.") :]
    if key in ("fc.weight", "fc.bias"):
        return "fc.0." + key[len("fc.") :]
    if key.endswith(".adder"):
        return key[: -len(".adder")] + ".weight"
    return key


def load_official(path: str | Path, model_name: str) -> nn.Module:
    """An official AdderNet checkpoint as our model, in eval mode.

    ``model_name``: one of ``OFFICIAL_MODELS`` (``resnet20`` for ResNet20-AdderNet.pth, ``resnet50``
    for ResNet50-AdderNet.pth). The class count and the classifier bias come from the file. Any
    key the model lacks, any key of the model the file lacks, any shape difference is an
    InteropError listing them (official names first, ours after the arrow)."""
    return _import_official(path, model_name)[0]


def _import_official(path: str | Path, model_name: str) -> tuple[nn.Module, dict[str, Any]]:
    _spec(model_name)
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
            model_name, conv="adder", num_classes=num_classes, head="linear_bn", head_bias=head_bias
        )
    model = model.to_empty(device="cpu")
    ours: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}  # ours -> official, for messages
    for k, v in official.items():
        ok = official_key_to_ours(k)
        if ok == "fc.0.weight" and v.dim() == 4:
            if v.shape[2:] != (1, 1):
                raise InteropError(f"'{path}': 'fc.weight' is {tuple(v.shape)}, not a 1×1 conv")
            v = v.flatten(1)  # 1×1 conv on a 1×1 map == linear
        ours[ok], names[ok] = v, k
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
    for name in OFFICIAL_MODELS:
        if name == asked:
            continue
        with torch.device("meta"):
            m = create_model(name, num_classes=num_classes, head="linear_bn", head_bias=head_bias)
        if not describe_mismatch(m.state_dict(), ours, {}):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Key checks shared by every way weights come in
# ---------------------------------------------------------------------------------------------


def _tensor_keys(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(_EXTRA) and torch.is_tensor(v)}


def _listing(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def describe_mismatch(
    target: Mapping[str, Any], source: Mapping[str, torch.Tensor], names: Mapping[str, str]
) -> str:
    """'' when ``source`` holds exactly the tensors of ``target`` with their shapes, else a
    readable list of the differences (``names`` maps our key to the file's, for messages)."""
    t, s = _tensor_keys(target), _tensor_keys(source)

    def show(k: str) -> str:
        return f"{names[k]} -> {k}" if k in names and names[k] != k else k

    missing = [k for k in t if k not in s]
    unexpected = [show(k) for k in s if k not in t]
    shapes = [
        f"{show(k)}: file {tuple(s[k].shape)} vs model {tuple(t[k].shape)}"
        for k in t
        if k in s and s[k].shape != t[k].shape
    ]
    lines = []
    if missing:
        lines.append(f"  missing from the file ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        lines.append(f"  shape differs ({len(shapes)}): {_listing(shapes)}")
    return "\n".join(lines)


def check_finite(state: Mapping[str, torch.Tensor], path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InteropError(f"'{path}' holds non-finite values in {_listing(bad)}")


def _load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model`` (strict; keys already checked); adder extra state is the
    model's own unless ``tensors`` carries it."""
    full = dict(model.state_dict())
    full.update(tensors)
    model.load_state_dict(full, strict=True)


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


def read_checkpoint_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state_dict, stored run config) of a checkpoint file of ours; a DeepSpeed folder is
    an error that names the converter."""
    path = Path(path)
    if path.is_dir():
        raise InteropError(
            f"'{path}' is a DeepSpeed checkpoint folder (engine=deepspeed); convert it to a file "
            f"first: addernet-zero-to-state-dict {path} model.pt, then use model.pt"
        )
    try:
        state = load_file(path)
    except CheckpointError as e:
        raise InteropError(
            f"{e}; expected a step_*.pt / best.pt of addernet-train, an "
            "addernet-import-official output, or an addernet-export .safetensors file "
            "(an official AdderNet .pth goes through addernet-import-official first)"
        ) from e
    try:
        return state["engine"]["model"], state["client"]["config"]
    except (KeyError, TypeError) as e:
        raise InteropError(f"'{path}' has no model weights and run config ({e!r} missing)") from e


def export(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model of checkpoint ``ckpt`` to ``out`` (.safetensors, atomically); returns it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InteropError(f"output '{out}' must end in .safetensors")
    if out.exists() and not overwrite:
        raise InteropError(f"'{out}' exists; pass --force to replace it")
    state, cfg = read_checkpoint_weights(ckpt)
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
    from safetensors.torch import save

    # save() refuses views of shared storage; state_dict tensors share none once contiguous.
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(data, out)
    return out


def read_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an addernet-export file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as st_load

    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = st_load(str(path))
    except (SafetensorError, OSError) as e:
        raise InteropError(f"cannot read '{path}' as safetensors: {e}") from e
    if meta.get("format") != EXPORT_FORMAT:
        raise InteropError(
            f"'{path}' is a safetensors file but not an addernet-export one (metadata format="
            f"{meta.get('format')!r}, expected {EXPORT_FORMAT!r})"
        )
    return tensors, meta


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


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, {"name", "conv"}) of any weights file ``init_from`` accepts."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"'{path}' does not exist")
    if path.suffix == ".safetensors":
        tensors, meta = read_exported(path)
        return tensors, {"name": meta["name"], "conv": meta["conv"]}
    state, cfg = read_checkpoint_weights(path)
    return _tensor_keys(state), {"name": cfg["model"]["name"], "conv": cfg["model"]["conv"]}


def load_weights_into(
    model: nn.Module,
    path: str | Path,
    ignore: Iterable[str] = (),
    name: str | None = None,
    conv: str | None = None,
) -> tuple[list[str], list[str]]:
    """Copy the weights of ``path`` into ``model``; returns (loaded keys, kept keys).

    Keys matching an fnmatch pattern of ``ignore`` keep the model's fresh values (a new
    classifier). Every other tensor of the model must be in the file with its shape and vice
    versa. The adder layers' p and gradient modes stay the model's (run settings, not weights).
    ``name``/``conv``: the model the caller built; a file of another model or variant is an error
    (an AdderNet's and its CNN twin's keys are identical, only this check tells them apart)."""
    tensors, info = read_weights(path)
    for what, want in (("name", name), ("conv", conv)):
        if want is not None and info[what] != want:
            raise InteropError(
                f"'{path}' holds model.{what}={info[what]!r}, but this run builds {want!r}"
            )
    target = _tensor_keys(model.state_dict())
    patterns = list(ignore)
    unused = [
        p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in {*target, *tensors})
    ]
    if unused:
        raise InteropError(
            f"init_from_ignore pattern(s) {unused} match no key of the model or the file "
            f"(model keys look like: {_listing(list(target)[-4:])})"
        )

    def ignored(k: str) -> bool:
        return any(fnmatch.fnmatchcase(k, p) for p in patterns)

    kept = [k for k in target if ignored(k)]
    src = {k: v for k, v in tensors.items() if not ignored(k)}
    problem = describe_mismatch({k: v for k, v in target.items() if not ignored(k)}, src, {})
    if problem:
        raise InteropError(
            f"'{path}' does not match the model:\n{problem}\n"
            '(a new classifier: train.init_from_ignore=["fc.*"] keeps the model\'s own)'
        )
    check_finite(src, path)
    _load_tensors(model, src)
    return list(src), kept


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
    state = {
        "engine": {"model": model.state_dict(), "optimizer": None, "lr_scheduler": None},
        "client": {
            "config": official_config(model_name, meta["num_classes"], meta["head_bias"]),
            "imported_from": {"path": str(src), "sha256": file_sha256(src), "model": model_name},
        },
    }
    save_file(state, dst)
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
    shipped = {"resnet20": "official_resnet20_cifar10", "resnet50": "official_resnet50_imagenet"}
    if args.model in shipped:
        split = " data.train_split=val" if args.model == "resnet20" else ""
        print(
            f"evaluate: addernet-eval --config configs/{shipped[args.model]}.yaml "
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
