"""The config reference table in docs/training.md, generated from the pydantic models.

    python -m addernet_dist.config_doc --write docs/training.md   # regenerate between the markers
    python -m addernet_dist.config_doc --check docs/training.md   # exit 1 if the table is stale

One row per key (dotted, nested sections expanded): type with its bounds, default, and what it
does. "What it does" is the field's ``description`` if it has one, else the source comment of the
field (the ``#`` lines right above it and a trailing ``#`` comment on its line), so a key added
with a comment documents itself. tests/unit/test_config_doc.py fails when the table is stale.
"""

from __future__ import annotations

import argparse
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from addernet_dist.config import Config

BEGIN = (
    "<!-- config-table:begin (generated: python -m addernet_dist.config_doc --write "
    "docs/training.md; edit the comments in the config models, not this table) -->"
)
END = "<!-- config-table:end -->"

# Notes for keys whose definition carries no comment (a field's description or source comment
# wins when it has one).
NOTES = {
    "model.name": "a registered model: `addernet_dist.models.list_models()`",
    "model.conv": "adder: the AdderNet; conv: its CNN twin (same architecture)",
    "data.dataset": "docs/data.md",
    "data.image_size": "fashion_mnist: 32 unless given (DataConfig validation)",
    "data.mean": "per channel; fashion_mnist: the data set's 1-channel mean unless given",
    "data.std": "per channel; fashion_mnist: the data set's 1-channel std unless given",
    "adder.p_start": "p of the lp distance at step 0",
    "adder.p_end": "p after the decay (1: the AdderNet)",
    "adder.eta": "eta of eq. 33 (Table 5)",
    "adder.grad_x": "dY/dX: lp (eq. 27) or hardtanh (the original AdderNet code)",
    "engine": "parallelism backend (docs/deepspeed.md for deepspeed)",
    "deepspeed.overrides": "DeepSpeed config keys set last",
}


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """{field name: its source comment} for the fields defined in ``model``'s own class body."""
    try:
        src = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    body_indent: int | None = None
    tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    by_line: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokens:
        by_line.setdefault(tok.start[0], []).append(tok)
    for lineno, line in enumerate(src.splitlines(), start=1):
        stripped = line.strip()
        indent = len(line) - len(stripped) if stripped else None
        if body_indent is None and lineno > 1 and indent:
            body_indent = indent
        if stripped.startswith("#") and indent == body_indent:
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:", stripped)
        if m and indent == body_indent and not stripped.startswith(("def ", "class ")):
            trailing = [
                t.string.lstrip("#").strip()
                for t in by_line.get(lineno, [])
                if t.type == tokenize.COMMENT and t.start[1] > indent
            ]
            text = " ".join(above + trailing).strip()
            if text:
                comments[m.group(1)] = text
        above = []
    return comments


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " / ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _bounds(metadata: list[Any]) -> str:
    ops = {Ge: ("≥", "ge"), Gt: (">", "gt"), Le: ("≤", "le"), Lt: ("<", "lt")}
    parts = [
        f"{sym} {getattr(m, attr)}"
        for m in metadata
        for k, (sym, attr) in ops.items()
        if isinstance(m, k)
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _fmt_default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt_default(v) for v in value) + ")"
    if value is None:
        return "None"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every leaf key, in definition order."""
    out = []
    comments = {}
    for klass in reversed(model.__mro__):  # a subclass's comment wins over its base's
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            comments.update(_field_comments(klass))
    for name, field in model.model_fields.items():
        key = prefix + name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, key + ".")
            continue
        desc = field.description or comments.get(name) or NOTES.get(key, "")
        out.append(
            (key, _type_name(ann) + _bounds(field.metadata), _fmt_default(_default(field)), desc)
        )
    return out


def render() -> str:
    """The generated table, markers included."""
    lines = [BEGIN, "", "| key | type | default | what it does |", "|---|---|---|---|"]
    for key, tp, default, desc in rows():
        lines.append(f"| `{key}` | {_cell(tp)} | `{_cell(default)}` | {_cell(desc)} |")
    return "\n".join([*lines, "", END])


def splice(doc: str, table: str) -> str:
    """``doc`` with the text between the markers replaced by ``table``."""
    i, j = doc.find(BEGIN), doc.find(END)
    if i < 0 or j < i:
        raise ValueError(f"markers not found: put {BEGIN!r} ... {END!r} where the table goes")
    return doc[:i] + table + doc[j + len(END) :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m addernet_dist.config_doc", description=__doc__)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="MD", help="regenerate the table in this file")
    mode.add_argument("--check", metavar="MD", help="exit 1 if this file's table is stale")
    args = ap.parse_args(argv)
    path = Path(args.write or args.check)
    doc = path.read_text()
    new = splice(doc, render())
    if args.check:
        if new != doc:
            print(
                f"{path}: the config table is stale; run python -m addernet_dist.config_doc "
                f"--write {path}",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != doc:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
