"""One training run in this process: the process group, ``Trainer.from_config(cfg, dist).train()``,
the run-folder lock released and the group destroyed after it (``addernet-train``'s main calls it;
tests call it in-process)."""

from __future__ import annotations

from addernet_dist.checkpoint import release_run_locks
from addernet_dist.config import Config
from addernet_dist.distributed import destroy_distributed, init_distributed
from addernet_dist.logging_utils import setup_console_logging
from addernet_dist.metrics import EvalResult
from addernet_dist.trainer import Preempted, Trainer


def train(cfg: Config, *, raise_on_preempt: bool = False) -> EvalResult | None:
    """Run (or continue) the training described by ``cfg``; returns the last evaluation.

    Preempted (SIGTERM/SIGINT): returns None after the checkpoint, or raises :class:`Preempted` when
    ``raise_on_preempt`` (the CLI does, to exit with EXIT_PREEMPTED)."""
    dist = init_distributed(cfg.train.device)
    setup_console_logging(dist.rank)
    ok = False
    try:
        result = Trainer.from_config(cfg, dist).train()
        if dist.is_main and result is not None:
            print(
                f"final: top1={result.top1:.2f}% top5={result.top5:.2f}% "
                f"loss={result.loss:.4f} ({result.count} val images)",
                flush=True,
            )
        ok = True
        return result
    except Preempted:
        ok = True  # every rank agreed on it: a clean shutdown
        if raise_on_preempt:
            raise
        return None
    finally:
        release_run_locks()  # the run folder's lock (checkpoint.Checkpointer.open)
        destroy_distributed(dist, ok)
