"""The test tiers are folders with rules (docs/testing.md "Tiers"):

* ``tests/unit``: one process, no trainer or CLI run, no DALI pipeline: the operator, kernels (Triton
  interpreter, AOT), layers, models, configs, schedules, engines stepped by hand. ~430 tests, ~1-2 min
  on the 2-core CI machine: what a change to the library is checked against first.
* ``tests/integration``: real runs: torchrun/DeepSpeed processes, the train/evaluate CLIs, run
  folders, resume, DALI pipelines, packaging.
* ``tests/gpu``: needs CUDA; skipped on CPU-only machines (tests/conftest.py), run on a GPU node.

The rules are checked on the source, so a test that starts a process or a training run cannot land
in the unit tier by accident, and a CUDA-only test cannot hide in a CPU tier (where CI would skip it
without anyone noticing it is a GPU test)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import TIERS  # the tier folders, as conftest marks them

TESTS = Path(__file__).resolve().parents[1]

# What makes a test file integration: it starts processes or process groups, runs the trainer or a
# CLI that trains/evaluates, or builds DALI pipelines (a second runtime with its own threads).
NOT_UNIT = {
    r"\bsubprocess\b": "starts a process",
    r"\btorchrun\b": "starts a process",
    r"\b(launch|start)_workers\b": "starts worker processes",
    r"\brun_python\b|\btrain_cmd\b": "starts a training process",
    r"\bmultiprocessing\b|\bmp\.spawn\b": "starts a process",
    r"\btorch\.distributed\b|\binit_process_group\b": "joins a process group",
    r"addernet_dist\.(train|evaluate|run)\b": "runs the trainer or evaluator",
    r"from addernet_dist import ([\w ,]*\b)?(train|evaluate|run)\b": "runs the trainer or evaluator",
    r"\bTrainer\b": "runs the trainer",
    r"\bdali\b": "builds DALI pipelines",
}
# A CUDA-only test belongs to tests/gpu.
# A test module named by its dotted path (imported from, or run with python -m): helpers live in
# tests/helpers.py / train_helpers.py, a file that runs itself as workers passes its own __name__.
TEST_MODULE_NAME = r"\btests\.(\w+\.)?test_\w+"
GPU_ONLY = r"pytest\.mark\.gpu\b|skipif\(\s*not torch\.cuda\.is_available\(\)"


def tier_violations(tests: Path) -> list[str]:
    """Every break of the tier rules under ``tests``, one line each (file, rule, the fix)."""
    bad = []
    for path in sorted(tests.rglob("test_*.py")):
        rel = path.relative_to(tests)
        tier = rel.parts[0] if len(rel.parts) == 2 else None
        if tier not in TIERS:
            bad.append(f"{rel}: test files live in one of tests/{{{','.join(TIERS)}}}/; move it there")
            continue
        src = path.read_text()
        if path.resolve() == Path(__file__).resolve():
            continue  # this file spells the rules (and breaks them in its own test below)
        if tier == "unit":
            for pattern, why in NOT_UNIT.items():
                if m := re.search(pattern, src):
                    bad.append(f"{rel}: {m.group(0)!r} {why}; move the file to tests/integration/")
        if tier != "gpu" and re.search(GPU_ONLY, src):
            bad.append(f"{rel}: a CUDA-only test; move it to tests/gpu/")
        if m := re.search(TEST_MODULE_NAME, src):
            bad.append(
                f"{rel}: names the test module {m.group(0)!r}, which breaks when files move: share "
                "through tests/helpers.py or tests/train_helpers.py, launch workers with __name__"
            )
    return bad


def test_every_test_file_keeps_its_tiers_rules():
    assert tier_violations(TESTS) == []


class _Item:
    """What tests/conftest.py's hook reads and writes of a pytest item."""

    def __init__(self, path: Path):
        self.path, self.keywords, self.markers = path, {}, []

    def add_marker(self, mark):
        self.markers.append(mark.name)
        self.keywords[mark.name] = True


def test_conftest_marks_each_test_with_its_tier_and_skips_the_gpu_tier_without_cuda():
    import torch

    from tests.conftest import pytest_collection_modifyitems

    items = {t: _Item(TESTS / t / "test_x.py") for t in TIERS}
    pytest_collection_modifyitems(None, list(items.values()))
    no_cuda = not torch.cuda.is_available()
    assert items["unit"].markers == ["unit"] and items["integration"].markers == ["integration"]
    assert items["gpu"].markers == ["gpu", *(["skip"] if no_cuda else [])]


def test_the_rules_catch_a_misplaced_file(tmp_path):
    (tmp_path / "unit").mkdir()
    (tmp_path / "gpu").mkdir()
    (tmp_path / "test_loose.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "unit" / "test_runs.py").write_text(
        "import subprocess\nfrom addernet_dist import build, train\n"
    )
    (tmp_path / "gpu" / "test_peer.py").write_text("from tests.unit.test_runs import X\n")
    (tmp_path / "unit" / "test_cuda.py").write_text(
        "import pytest, torch\n@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\n"
    )
    (tmp_path / "gpu" / "test_ok.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    got = tier_violations(tmp_path)
    assert got == [
        "gpu/test_peer.py: names the test module 'tests.unit.test_runs', which breaks when files move: "
        "share through tests/helpers.py or tests/train_helpers.py, launch workers with __name__",
        "test_loose.py: test files live in one of tests/{unit,integration,gpu}/; move it there",
        "unit/test_cuda.py: a CUDA-only test; move it to tests/gpu/",
        "unit/test_runs.py: 'subprocess' starts a process; move the file to tests/integration/",
        "unit/test_runs.py: 'from addernet_dist import build, train' runs the trainer or evaluator; "
        "move the file to tests/integration/",
    ]
