"""Turn an ``engine: deepspeed`` checkpoint folder into a plain checkpoint file ``addernet-eval`` reads.

    addernet-zero-to-state-dict runs/x/checkpoints/step_000000016.pt model.pt
    addernet-eval --config runs/x/config.yaml --checkpoint model.pt

The output has the trainer's single-file format (checkpoint/store.py's FileStore: torch.save +
sha256 footer) in the layout of checkpoint/layout.py, with the engine part's optimizer None: the
model is complete (BN running stats and each adder layer's ``p`` included), the optimizer state is
dropped (it is sharded and only DeepSpeed can resume it).

Weights: under ``precision: autocast`` DeepSpeed's model file already holds every fp32 weight
(ZeRO-0/1/2 keep the full model on every rank). Under ``precision: bf16`` the model file holds
bf16 copies; the fp32 master weights are assembled from the optimizer shards with DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` (the function behind its ``zero_to_fp32.py``).
No DeepSpeed engine or process group is needed: this runs on a laptop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from addernet_dist.checkpoint import CheckpointError, layout, save_file
from addernet_dist.checkpoint.store import DEEPSPEED_FOLDER
from addernet_dist.engine import ds_checkpoint

_MODEL_FILE = "mp_rank_00_model_states.pt"


def load_zero_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A checkpoint state (checkpoint/layout.py) from a verified DeepSpeed checkpoint folder."""
    folder = Path(folder)
    if not DEEPSPEED_FOLDER.holds(folder):
        raise CheckpointError(
            f"'{folder}' is not a DeepSpeed checkpoint folder (engine=deepspeed writes "
            "checkpoints/step_<n>.pt folders); a file checkpoint needs no conversion"
        )
    problem = ds_checkpoint.verify_dir(folder)
    if problem is not None:
        raise CheckpointError(problem)
    # every shard, not only the model file: DeepSpeed's zero_to_fp32 below unpickles the others
    ds_checkpoint.check_loadable(folder)
    states = ds_checkpoint.load_shard(folder / _MODEL_FILE, "cpu")
    model = dict(states["module"])
    lowp = [k for k, v in model.items() if torch.is_tensor(v) and v.dtype == torch.bfloat16]
    if lowp:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        # DeepSpeed names masters and buffers by named_parameters()/named_buffers(); a fused model
        # saved its module under the unfused state_dict keys (the engine records the map).
        keys = states.get("addernet_state_keys") or {}
        fp32 = {keys.get(k, k): v for k, v in fp32.items()}
        buffers = {keys.get(b, b) for b in states.get("buffer_names", [])}
        for k in lowp:
            if k in fp32:
                model[k] = fp32[k].detach().to(torch.float32)
            elif k in buffers:  # no master copy exists for buffers: DeepSpeed upcasts them too
                model[k] = model[k].to(torch.float32)
            else:
                raise CheckpointError(f"'{folder}': no fp32 master copy of bf16 tensor '{k}'")
    engine = {"model": model, "optimizer": None, "lr_scheduler": states.get("addernet_lr_scheduler")}
    return layout.build(engine, states.get("addernet", {}))


def convert(folder: str | Path, out: str | Path) -> Path:
    """Write the plain checkpoint file; returns its path."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"output '{out}' is a folder; give a file name such as model.pt")
    save_file(load_zero_checkpoint(folder), out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="addernet-zero-to-state-dict",
        description="Convert an engine=deepspeed checkpoint folder into a checkpoint file.",
    )
    ap.add_argument("checkpoint", help="checkpoints/step_<n>.pt folder written by engine=deepspeed")
    ap.add_argument("output", help="file to write (the trainer's checkpoint format)")
    args = ap.parse_args(argv)
    try:
        path = convert(args.checkpoint, args.output)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
