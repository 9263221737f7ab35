"""Typed config: loading, dotted overrides, precise errors, and CLI failures that leave
output_dir untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from addernet_dist.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    save_resolved,
)
from addernet_dist.train import main
from tests.train_helpers import DEBUG_CONFIG, REPO, run_python

ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1
    from addernet_dist.models import list_models

    assert cfg.model.name in list_models()


@pytest.mark.timeout(30)
def test_overrides_are_typed_and_nested():
    cfg = load_config(
        DEBUG_CONFIG,
        [
            "optim.lr=0.05",
            "train.bf16=false",
            "wandb.tags=[a, b]",
            "output_dir=/x/y",
            "resume=none",
        ],
    )
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.train.precision == "fp32" and cfg.train.bf16 is None
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.output_dir == "/x/y" and cfg.resume == "none"
    # untouched keys keep the file's values
    assert cfg.train.global_batch_size == 16
    # a section absent from the file is created by the override
    raw = apply_overrides({}, ["adder.eta=0.2"])
    assert raw == {"adder": {"eta": 0.2}}


@pytest.mark.timeout(30)
def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG_CONFIG, ["optim.learning_rate=0.1"])
    msg = str(e.value)
    assert "unknown key 'optim.learning_rate'" in msg
    for valid in ("lr", "momentum", "nesterov", "weight_decay", "schedule"):
        assert valid in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; valid keys in top level: .*train"):
        load_config(bad)


@pytest.mark.timeout(30)
def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: .*integer.*'ten'"):
        load_config(DEBUG_CONFIG, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"adder\.adaptive_scope: .*'global'.*'local'"):
        load_config(DEBUG_CONFIG, ["adder.adaptive_scope=rank"])
    with pytest.raises(ConfigError, match=r"'optim.lr' is a value"):
        load_config(DEBUG_CONFIG, ["optim.lr.base=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DEBUG_CONFIG, ["optim.lr"])
    with pytest.raises(ConfigError, match="p_end=2.0 must be <= adder.p_start=1.5"):
        load_config(DEBUG_CONFIG, ["adder.p_start=1.5", "adder.p_end=2"])


@pytest.mark.timeout(30)
def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEBUG_CONFIG, ["optim.lr=0.02"])
    path = save_resolved(cfg, tmp_path / "run")
    assert Config.model_validate(yaml.safe_load(path.read_text())) == cfg
    assert cfg.p_decay_epochs() == 0.5
    assert load_config(None, ["train.epochs=8"]).p_decay_epochs() == 6.0  # Table 6: 3/4


def _snapshot(d: Path) -> dict[str, bytes]:
    # .lock: the run-folder lock (runfolder.RunLock) a launch takes before it looks at the
    # checkpoints; it records the holder and is no part of the run.
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """An output_dir holding files of an earlier run that no failed launch may touch."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_000000005.pt").write_bytes(b"\x00earlier checkpoint")
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.3}\n')
    (out / "config.yaml").write_text("earlier: config\n")
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.epochs=ten"], "train.epochs"),
        (["optim.momentun=0.9"], "unknown key 'optim.momentun'"),
        (["data.dataset=imagefolder", "data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),
        (["resume=/nonexistent/ckpt.pt"], "resume=/nonexistent/ckpt.pt"),
    ],
    ids=["wrong-type", "unknown-key", "missing-data-folder", "missing-resume-file"],
)
def test_cli_errors_exit_nonzero_and_leave_output_dir_untouched(
    existing_run, capsys, overrides, expected
):
    before = _snapshot(existing_run)
    rc = main(["--config", str(DEBUG_CONFIG), f"output_dir={existing_run}", *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and expected in err
    assert _snapshot(existing_run) == before


@pytest.mark.timeout(60)
def test_half_written_digits_root_is_a_user_error(existing_run, tmp_path, capsys):
    # The data layer refuses a non-empty root without its completion marker (FileExistsError);
    # the trainer must report it like any other data error: rc 2, nothing written.
    root = tmp_path / "digits"
    (root / "train").mkdir(parents=True)
    (root / "train" / "partial.jpg").write_bytes(b"")
    before = _snapshot(existing_run)
    rc = main(
        ["--config", str(DEBUG_CONFIG), f"output_dir={existing_run}", "data.dataset=digits",
         f"data.root={root}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: data: ") and str(root) in err
    assert _snapshot(existing_run) == before


@pytest.mark.timeout(120)
def test_cli_process_exit_code(existing_run):
    before = _snapshot(existing_run)
    proc = run_python(
        ["-m", "addernet_dist.train", "--config", str(DEBUG_CONFIG), f"output_dir={existing_run}",
         "data.dataset=imagefolder", "data.root=/nonexistent/imagenet"]
    )  # fmt: skip
    assert proc.returncode == 2
    assert "data.root '/nonexistent/imagenet' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(existing_run) == before


def test_adder_configs_keep_nchw_for_the_adder_kernels():
    """Issue 21.3: the Triton adder hot loops stream NCHW, so a channels_last AdderNet pays an fp32 copy of x
    and of dY per adder layer (ResNet-50, batch 128: 21.3 GB = ~4 % of the modelled step; ResNet-18 3.8 GB)
    for a gain on the stem conv alone (<= 0.9 GB). benchmarks/layout_copy_model.py has the numbers."""
    adder = [p for p in ALL_CONFIGS if load_config(str(p), []).model.conv == "adder"]
    assert len(adder) >= 8  # the glob found the shipped configs
    offenders = [p.name for p in adder if load_config(str(p), []).train.channels_last]
    assert offenders == [], f"adder configs with train.channels_last=true: {offenders}"


def test_kd_recipe_is_the_base_recipe_plus_distillation():
    """configs/imagenet_resnet50_kd.yaml says "everything but the distill section and the train.* loss
    keys is configs/imagenet_resnet50.yaml": a copy that drifts (it once kept channels_last=true and
    the deprecated train.bf16 after the base moved on) fails here."""
    root = Path(__file__).resolve().parents[2] / "configs"
    base = load_config(str(root / "imagenet_resnet50.yaml"), []).model_dump()
    kd = load_config(str(root / "imagenet_resnet50_kd.yaml"), []).model_dump()
    loss_keys = {"label_smoothing", "mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_switch_prob"}
    flat = {
        name: {
            f"{s}.{k}" if isinstance(v, dict) else s: (v[k] if isinstance(v, dict) else v)
            for s, v in cfg.items()
            for k in (v if isinstance(v, dict) else [None])
        }
        for name, cfg in (("base", base), ("kd", kd))
    }
    differ = {k for k in flat["base"].keys() | flat["kd"].keys() if flat["base"].get(k) != flat["kd"].get(k)}
    allowed = {f"train.{k}" for k in loss_keys} | {"wandb.tags", "output_dir"}
    assert {d for d in differ if not d.startswith("distill.")} <= allowed, differ - allowed
    assert kd["distill"]["teacher"] == "resnet50" and kd["distill"]["weight"] > 0
