"""The shared ``addernet-analyze`` command line: one sub-command per analysis module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from addernet_dist.analyze import ablation, curves, features, filters, table1, weights

DESCRIPTION = (
    "Analyses that reproduce the paper's tables and figures on LeNet-5-BN / Fashion-MNIST."
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="addernet-analyze", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, out):
        p.add_argument("--out", default=out, help="PNG to write (default: %(default)s)")
        p.add_argument("--json", default=None, help="also write the numbers as JSON here")
        p.add_argument("--data-root", default=None, help="IDX folder (default: Debian's path)")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("table1", help="Table 1: filter-gradient norms at the first iteration")
    common(p, "table1_grad_norms.png")
    p.add_argument("--model", default="lenet5_bn")
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(fn=table1._cmd_table1)

    p = sub.add_parser("weights", help="Figure 7: weight histograms, Laplace vs Gaussian")
    common(p, "fig7_weights.png")
    p.add_argument("--adder", help="AdderNet checkpoint")
    p.add_argument("--cnn", help="CNN checkpoint")
    p.add_argument("--model", default=None, help="model name if the checkpoint has no config")
    p.add_argument("--layer", type=int, default=3, help="1-based weight layer (paper: 3)")
    p.set_defaults(fn=weights._cmd_weights)

    p = sub.add_parser("filters", help="Figure 5: first-layer filters, AdderNet vs CNN")
    common(p, "fig5_filters.png")
    p.add_argument("--adder", required=True, help="AdderNet checkpoint")
    p.add_argument("--cnn", required=True, help="CNN checkpoint")
    p.add_argument("--model", default=None, help="model name if the checkpoint has no config")
    p.add_argument("--layer", type=int, default=1, help="1-based weight layer (paper: 1)")
    p.set_defaults(fn=filters._cmd_filters)

    p = sub.add_parser("features", help="Figure 1: LeNet++ feature visualisation")
    common(p, "fig1_features.png")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=2, choices=(2, 3))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    p.add_argument("--kernel", type=int, default=5, help="conv kernel size (LeNet++: 5)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.set_defaults(fn=features._cmd_features)

    p = sub.add_parser("ablation", help="Table 4: the three training techniques on/off")
    common(p, "table4_ablation.png")
    p.add_argument("--config", default="configs/fashion_mnist_lenet5_bn.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/ablation")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images")
    p.add_argument(
        "--only", nargs="+", default=None, help="arms as bit strings fp/lp/ad, e.g. 000 111"
    )
    p.add_argument("--set", nargs="*", default=[], help="extra trainer overrides key=value")
    p.add_argument("--reuse", action="store_true", help="skip arms whose run folder has metrics")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="resume=none overwrite=true: start over, the old runs move to <run>/old-<time>/ "
        "(default: resume=auto)",
    )
    p.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="also report top-1 with BN statistics recomputed at the final p",
    )
    p.set_defaults(fn=ablation._cmd_ablation)

    p = sub.add_parser("curves", help="learning curves + final accuracies from run folders")
    common(p, "lenet5_bn_curves.png")
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeatable)")
    p.set_defaults(fn=curves._cmd_curves)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Missing data / checkpoint / run folder, bad argument, failed trainer run: the message
        # names the problem and the fix; a traceback would bury it.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
