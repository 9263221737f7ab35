"""Train an AdderNet (paper Algorithm 1) with torchrun/DDP (or DeepSpeed), resumable to the bit.

Launch commands (every form takes dotted overrides after the config, e.g. ``optim.lr=0.05``)::

    # 1 process (CPU or one GPU)
    addernet-train --config configs/debug.yaml output_dir=runs/debug
    python -m addernet_dist.train --config configs/debug.yaml

    # 1 node x N processes (N GPUs; on CPU, gloo processes)
    torchrun --standalone --nproc_per_node=N -m addernet_dist.train --config configs/imagenet_resnet18.yaml

    # M nodes x N processes: run on EVERY node (same command; HOST0 = first node's address)
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \\
        --rdzv_id=JOB --max-restarts=3 -m addernet_dist.train --config configs/imagenet_resnet50.yaml

    (launch/torchrun.sh and launch/slurm.sbatch wrap these.)

``resume=auto`` (default) continues from the newest valid checkpoint in ``output_dir``, so a
restarted torchrun group (``--max-restarts``) or a requeued Slurm job picks up by itself.
SIGTERM (Slurm preemption) or SIGINT (Ctrl-C): the ranks agree on it at the next logging step,
write a checkpoint and exit with status 143 (EXIT_PREEMPTED, 128+SIGTERM: "not finished, run me
again") without a final evaluation; the same command continues from there. A second Ctrl-C stops
at once (KeyboardInterrupt, no checkpoint).
Exit status: 0 finished; 1 failed (diverged, a stalled peer, a crash); 2 bad config, checkpoint
or run folder (the message says what to do); 143 preempted.
Fault injection for tests: ADDERNET_FAULT_STEP=s [ADDERNET_FAULT_RANK=r]
[ADDERNET_FAULT_MARKER=file] [ADDERNET_FAULT_SIGNAL=KILL|TERM|STOP] signals the process right after
optimizer step s (once, if a marker file is given: it is created first and disables later faults).
"""

from __future__ import annotations

import argparse
import sys

from addernet_dist.checkpoint import CheckpointError
from addernet_dist.config import ConfigError, load_config
from addernet_dist.guard import DivergedError
from addernet_dist.run import train
from addernet_dist.trainer import Preempted

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a shell reports for a job killed by SIGTERM


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    ap.add_argument(
        "overrides", nargs="*", help="dotted overrides: optim.lr=0.05 output_dir=runs/x"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "addernet-train", "Train an AdderNet (see module docstring).")
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, raise_on_preempt=True)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except DivergedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Preempted:
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
