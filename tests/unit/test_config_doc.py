"""The config table in docs/training.md is generated from the pydantic models and never stale."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from addernet_dist import config_doc
from addernet_dist.config import Config
from tests.train_helpers import REPO

DOC = REPO / "docs" / "training.md"


def test_docs_training_config_table_is_current():
    doc = DOC.read_text()
    assert config_doc.splice(doc, config_doc.render()) == doc, (
        "docs/training.md's config table is stale: "
        "python -m addernet_dist.config_doc --write docs/training.md"
    )


def test_every_config_key_has_a_row():
    def leaves(model, prefix=""):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from leaves(ann, prefix + name + ".")
            else:
                yield prefix + name

    keys = [k for k, *_ in config_doc.rows()]
    assert keys == list(leaves(Config))
    table = config_doc.render()
    # the two keys the hand-written table had lost
    assert "| `train.bn_recalibration_batches` | int (≥ 0) | `0` |" in table
    assert "| `optim.name` | sgd / adamw | `sgd` |" in table


class _Inner(BaseModel):
    # Two lines of comment
    # above the key.
    depth: int = Field(default=3, ge=1)


class _Toy(BaseModel):
    mode: Literal["a", "b"] = "a"  # trailing comment
    rate: float | None = Field(default=None, gt=0, description="from the description")
    inner: _Inner = Field(default_factory=_Inner)


def test_rows_take_types_bounds_defaults_and_comments():
    assert config_doc.rows(_Toy) == [
        ("mode", "a / b", "a", "trailing comment"),
        ("rate", "float or None (> 0)", "None", "from the description"),
        ("inner.depth", "int (≥ 1)", "3", "Two lines of comment above the key."),
    ]


def test_check_fails_on_a_stale_table_and_write_fixes_it(tmp_path, capsys):
    stale = tmp_path / "training.md"
    doc = DOC.read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `train.keep_last`"))
    stale.write_text(doc.replace(row + "\n", ""))
    assert config_doc.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert config_doc.main(["--write", str(stale)]) == 0
    assert stale.read_text() == doc
    assert config_doc.main(["--check", str(stale)]) == 0
