"""``addernet-data``: data tools.

addernet-data check ROOT [--splits train val] [--workers N] [--no-decode] [--json OUT]
    Scan an ImageNet-layout tree: classes and images per split, files that will not decode
    (exit code 1 when there is any), grayscale / CMYK / PNG-in-JPEG / odd-mode files.
addernet-data digits [ROOT]
    Write the bundled scikit-learn digits as a JPEG ImageFolder tree (once) and print its path.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from addernet_dist.runfolder import dumps_strict


def _check(args: argparse.Namespace) -> int:
    from .data.check import check_tree, format_report

    try:
        reports = check_tree(
            args.root, tuple(args.splits), workers=args.workers, decode=not args.no_decode
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(args.root, reports))
    if args.json:
        out = [
            {
                "split": r.name,
                "layout": r.layout,
                "num_classes": r.num_classes,
                "num_images": r.num_images,
                "corrupt": [asdict(f) for f in r.corrupt],
                "oddities": [asdict(f) for f in r.files if f.oddities],
                "non_images": r.ignored,
            }
            for r in reports
        ]
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            f.write(dumps_strict(out, indent=1))
        os.replace(tmp, args.json)
    return 1 if any(r.corrupt for r in reports) else 0


def _digits(args: argparse.Namespace) -> int:
    from .data.digits import ensure_digits_tree

    print(ensure_digits_tree(args.root))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="addernet-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="scan an image tree for problems before training")
    c.add_argument("root", help="dataset root holding train/ and val/")
    c.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to scan")
    c.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="decode processes (default: all cores)",
    )
    c.add_argument(
        "--no-decode",
        action="store_true",
        help="only read headers (fast; misses truncated files that a full decode finds)",
    )
    c.add_argument("--json", help="also write the findings as JSON to this file")
    c.set_defaults(func=_check)
    d = sub.add_parser("digits", help="write the bundled digits dataset as a JPEG tree")
    d.add_argument("root", nargs="?", default=None, help="target folder (default: cache dir)")
    d.set_defaults(func=_digits)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
