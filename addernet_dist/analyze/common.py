"""What every analysis shares: matplotlib set-up, the paper's "weight layers", percentages and
the --json dump."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from addernet_dist.nn import Adder2d, AdderLinear
from addernet_dist.runfolder import dumps_strict

WEIGHT_TYPES = (nn.Conv2d, nn.Linear, Adder2d, AdderLinear)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path, title: str | None = None) -> None:
    """Every analysis figure's ending: the title, a tight layout, a 90-dpi file, the figure closed."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv/linear/adder layer with a weight, in module order (the paper's "layer l")."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]


def _pct(v: float) -> float:
    """top-1 as a percentage whether the trainer logs a fraction or a percentage."""
    return 100.0 * v if v <= 1.0 else v


def _dump(args, obj: Any) -> None:
    print(f"wrote {args.out}")
    if args.json:
        # Strict JSON: non-finite values as null (default=float first turns numpy/torch scalars into floats).
        Path(args.json).write_text(
            dumps_strict(json.loads(json.dumps(obj, default=float)), indent=1)
        )
