"""Reading and checking weight files, below the model zoo (no model is built here): the official
AdderNet ``.pth`` (``torch.load(weights_only=True)`` only), our checkpoints, ``addernet-export``
safetensors, and the strict key/shape/finiteness checks with errors that list the keys.

interop.py (import/export tools, above models/) and the pretrained registry (models/registry.py,
``create_model(pretrained=...)``) both use these; interop re-exports every name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from addernet_dist.checkpoint import CheckpointError, layout, load_file
from addernet_dist.checkpoint.store import DEEPSPEED_FOLDER

EXPORT_FORMAT = "addernet-dist/weights-v1"


_EXTRA = "._extra_state"  # Adder2d/AdderLinear keep p and the gradient modes there (nn.py)


_MAX_LISTED = 20  # keys listed per kind of mismatch in an error; the rest are counted


class InteropError(ValueError):
    """A weights file that does not fit the model it is meant for (the message names the keys)."""


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


def read_checkpoint_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state_dict, stored run config) of a checkpoint file of ours; a DeepSpeed folder is
    an error that names the converter."""
    return _weights_and_config(_read_checkpoint(path), path)


def _weights_and_config(state: dict[str, Any], path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return layout.weights_and_config(state)
    except (KeyError, TypeError) as e:
        raise InteropError(f"'{path}' has no model weights and run config ({e!r} missing)") from e


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if DEEPSPEED_FOLDER.holds(path):
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
    return state


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


def map_official(
    official: Mapping[str, torch.Tensor], path: str | Path, key_map: Callable[[str], str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(our state dict, ours -> official names for messages) of an official state dict: keys
    through ``key_map``, the 1×1-conv classifier (C×F×1×1) as a linear layer's C×F weight."""
    ours: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for k, v in official.items():
        ok = key_map(k)
        if ok == "fc.0.weight" and v.dim() == 4:
            if v.shape[2:] != (1, 1):
                raise InteropError(f"'{path}': 'fc.weight' is {tuple(v.shape)}, not a 1×1 conv")
            v = v.flatten(1)  # 1×1 conv on a 1×1 map == linear
        ours[ok], names[ok] = v, k
    return ours, names


def load_official_into(model: nn.Module, path: str | Path, key_map: Callable[[str], str]) -> nn.Module:
    """Official file ``path`` into ``model`` (built as the weights need), strictly; eval mode."""
    ours, names = map_official(read_official(path), path, key_map)
    problem = describe_mismatch(model.state_dict(), ours, names)
    if problem:
        raise InteropError(f"'{path}' does not fit {type(model).__name__}:\n{problem}")
    check_finite(ours, path)
    _load_tensors(model, ours)
    return model.eval()
