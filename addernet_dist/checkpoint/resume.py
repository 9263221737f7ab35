"""What a resume needs besides the run folder: every rank's RNG state, the resumability check of a
checkpoint, the load that keeps this run's optimizer settings, and the config changes to report."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from addernet_dist.checkpoint import layout
from addernet_dist.runfolder import CheckpointError

# ---------------------------------------------------------------------------------------------
# RNG state of every rank
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Plain types and tensors only (a checkpoint may hold nothing else, runfolder.safe_torch_load):
    numpy's legacy tuple becomes a dict with its 624 uint32 words as an int64 tensor."""
    key, words, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = {
        "key": str(key),
        "words": torch.from_numpy(words.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, None)
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    ns = state["numpy"]
    if isinstance(ns, dict):
        words = ns["words"].numpy().astype(np.uint32)
        ns = (ns["key"], words, ns["pos"], ns["has_gauss"], ns["cached_gaussian"])
    np.random.set_state(ns)  # a dict, or the tuple checkpoints before the safe-loading rule hold
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _model_identity(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: model_cfg.get(k) for k in ("name", "conv", "num_classes", "kwargs")}


def _describe_model(model_cfg: dict[str, Any]) -> str:
    extra = f", kwargs {model_cfg['kwargs']}" if model_cfg.get("kwargs") else ""
    classes = model_cfg.get("num_classes") or "dataset's"
    return f"{model_cfg.get('name')} (conv={model_cfg.get('conv')}, {classes} classes{extra})"


def check_resumable(state: dict[str, Any], path: Path, cfg: Any) -> None:
    """Refuse, with what to do instead, a checkpoint file that cannot resume the run ``cfg``."""
    engine, client = layout.parts(state)
    if not isinstance(engine, dict) or not isinstance(client, dict):
        raise CheckpointError(f"'{path}' is not a training checkpoint written by addernet-train")
    if engine.get("optimizer") is None or "train_state" not in client:
        raise CheckpointError(
            f"'{path}' holds model weights only (e.g. converted from a DeepSpeed checkpoint by "
            "addernet-zero-to-state-dict): it has no optimizer state, so it cannot resume a run. "
            "Resume the DeepSpeed checkpoint folder itself with engine=deepspeed, or evaluate "
            "the file with addernet-eval"
        )
    saved = client.get("config", {}).get("model")
    if saved is not None:
        want = cfg.model.model_dump(mode="json")
        if _model_identity(saved) != _model_identity(want):
            raise CheckpointError(
                f"'{path}' holds model {_describe_model(saved)}, this run builds "
                f"{_describe_model(want)}; set model.* to match the checkpoint to resume it, or "
                "start the new model in another output_dir"
            )


# ---------------------------------------------------------------------------------------------
# Resume: load, keep this run's optimizer settings, say what changed
# ---------------------------------------------------------------------------------------------

# Optimizer hyperparameters a resumed run takes from ITS config (the checkpoint's momentum
# buffers and schedule position are kept): the user asked for them on the command line.
_NEW_HYPERPARAMETERS = ("momentum", "nesterov", "weight_decay", "dampening")


def load_for_resume(engine: Any, path: Path) -> dict[str, Any]:
    """Collective. ``engine.load(path)``, then this run's optimizer settings (optim.lr, momentum,
    nesterov, weight_decay) replace the checkpoint's: ``optimizer.load_state_dict`` would restore
    the saved ones and the run would silently train with them. The LR schedule keeps its
    position: lr = new base lr x the schedule's factor at the resumed step."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    sched = engine.lr_scheduler
    base_lrs = list(sched.base_lrs)
    try:
        client = engine.load(path)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(
            f"cannot resume from '{path}' with this config: {e}. Resume with the checkpoint's "
            "settings (see its config), or start the new run in another output_dir"
        ) from e
    sched.base_lrs = base_lrs
    lambdas = getattr(sched, "lr_lambdas", None)
    for i, (g, fresh) in enumerate(zip(engine.optimizer.param_groups, groups)):
        for k in _NEW_HYPERPARAMETERS:
            if k in fresh:
                g[k] = fresh[k]
        g["initial_lr"] = base_lrs[i]
        if lambdas is not None:
            g["lr"] = base_lrs[i] * lambdas[i](sched.last_epoch)
    sched._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
    return client


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_QUIET_KEYS = {"resume", "overwrite"}  # keys whose change on resume is expected, not worth a line


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{"optim.lr": [0.1, 0.05], ...}``: every key whose value differs between the
    checkpoint's config and this run's (keys only one side has count as changed)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if k not in _QUIET_KEYS and a.get(k) != b.get(k)}


def describe_changes(changes: dict[str, list[Any]]) -> list[str]:
    if not changes:
        return ["config unchanged since the checkpoint"]
    lines = [f"{k}: {old!r} -> {new!r} (this run's value applies)" for k, (old, new) in changes.items()]
    return [f"{len(changes)} config key(s) differ from the checkpoint's:", *lines]


# ---------------------------------------------------------------------------------------------
# The runtime a checkpoint was written under (docs/training.md "Reproducibility")
# ---------------------------------------------------------------------------------------------


def runtime_info() -> dict[str, Any]:
    """What a run's bits depend on besides its config, world size and machine: torch's intra-op
    thread count (on CPU, 2 threads instead of 1 gave 16% instead of 19% top-1 on configs/debug.yaml
    with 13 of 89 checkpoint tensors equal: torch's own reductions split by thread) and the torch
    version. The checkpoint's client state keeps it as ``runtime`` (the version as a str: a
    TorchVersion object is not something runfolder.safe_torch_load accepts)."""
    return {"torch_threads": torch.get_num_threads(), "torch_version": str(torch.__version__)}


def runtime_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, list[Any]]:
    """``{"torch_threads": [1, 2]}``: the keys of the checkpoint's ``runtime`` whose value differs
    now ({} for a checkpoint written before it was recorded)."""
    if not isinstance(saved, dict):
        return {}
    return {k: [v, now.get(k)] for k, v in sorted(saved.items()) if now.get(k) != v}


def describe_runtime_changes(changes: dict[str, list[Any]]) -> list[str]:
    if not changes:
        return []
    lines = [f"{k}: {old!r} when the checkpoint was written, {new!r} now" for k, (old, new) in changes.items()]
    return [
        *lines,
        "CPU results depend on torch's intra-op thread count and version (OMP_NUM_THREADS; torchrun "
        "sets 1 unless it is set): the resumed run continues with other bits than an uninterrupted one",
    ]
