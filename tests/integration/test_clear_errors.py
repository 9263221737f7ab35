"""User errors of addernet-train and addernet-eval: exit 2, a message naming what is wrong, the
file or key and the fix, and nothing written."""

from __future__ import annotations

import re

import pytest
import torch

from addernet_dist import checkpoint
from addernet_dist.config import ConfigError, load_config
from addernet_dist.distributed import DistInfo
from tests.train_helpers import DEBUG_CONFIG, FAST

SMALL = ["data.synthetic_train_size=32", "data.synthetic_val_size=20", "train.epochs=1"]


def _train(capsys, overrides: list[str], want: int = 2) -> str:
    from addernet_dist.train import main

    capsys.readouterr()
    rc = main(["--config", str(DEBUG_CONFIG), *FAST, *SMALL, *overrides])
    err = capsys.readouterr().err
    assert rc == want, err[-5000:]
    return err


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.timeout(120)
def test_output_dir_that_is_a_file_or_inside_one(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    err = _train(capsys, [f"output_dir={f}"])
    assert f"output_dir '{f}' is a file, not a folder; set output_dir to a folder" in err, err
    err = _train(capsys, [f"output_dir={f}/run"])
    assert f"output_dir '{f}/run' is inside '{f}', which is a file" in err, err
    assert f.read_text() == "mine" and _tree(tmp_path) == ["notes.txt"]


@pytest.mark.timeout(60)
def test_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _train(capsys, ["output_dir="])
    assert "output_dir is empty; name the run's folder, e.g. output_dir=runs/my_run" in err, err
    assert _tree(tmp_path) == []  # was: .lock, config.yaml, metrics.jsonl, checkpoints/ here


@pytest.mark.timeout(120)
def test_resume_of_a_missing_file_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    err = _train(capsys, [f"output_dir={out}", f"resume={tmp_path}/nonexistent.pt"])
    assert f"resume={tmp_path}/nonexistent.pt:" in err and "pass resume=auto or resume=none" in err
    assert not out.exists()


@pytest.mark.timeout(60)
def test_wandb_online_without_a_key_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    out = tmp_path / "run"
    online = [f"output_dir={out}", "wandb.enabled=true", "wandb.mode=online"]
    err = _train(capsys, online)
    assert "wandb.mode=online but no W&B API key was found" in err and "wandb login" in err, err
    assert not out.exists()
    # A netrc entry for the W&B host is a key (what `wandb login` writes): the check passes.
    from addernet_dist.logging_utils import wandb_online_problem

    wcfg = load_config(DEBUG_CONFIG, online[1:]).wandb
    assert wandb_online_problem(wcfg) is not None
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40)
    assert wandb_online_problem(wcfg) is None
    monkeypatch.setenv("NETRC", str(tmp_path / "other"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_online_problem(wcfg) is None


def _build_data_error(n_train: int, world_size: int, batch: int) -> str:
    from addernet_dist.build import build_data

    cfg = load_config(
        DEBUG_CONFIG, [f"data.synthetic_train_size={n_train}", f"train.global_batch_size={batch}"]
    )
    with pytest.raises(ConfigError) as e:
        build_data(cfg, DistInfo(rank=0, world_size=world_size))
    return str(e.value)


@pytest.mark.timeout(60)
def test_the_batch_size_suggested_for_a_small_training_set_is_valid():
    from addernet_dist.build import build_data

    # 1 sample, 2 ranks: no global batch size works (was: "at most 1", refused as not divisible).
    msg = _build_data_error(1, 2, 16)
    assert "no batch size splits it over WORLD_SIZE=2 ranks; run at most 1 process(es)" in msg
    # 5 samples, 2 ranks: the suggestion (4) is accepted by the same checks.
    msg = _build_data_error(5, 2, 16)
    largest = int(re.search(r"\(largest: (\d+)\)", msg).group(1))
    assert largest == 4
    cfg = load_config(
        DEBUG_CONFIG, ["data.synthetic_train_size=5", f"train.global_batch_size={largest}"]
    )
    train, _ = build_data(cfg, DistInfo(rank=0, world_size=2))
    assert len(train) == 2  # ceil(5 / 4) steps per epoch
    assert "set train.global_batch_size to at most 5" in _build_data_error(5, 1, 16)


def _checkpoint(tmp_path, overrides: list[str], nan_key: str | None = None):
    from addernet_dist.build import build_model

    cfg = load_config(DEBUG_CONFIG, overrides)
    model = build_model(cfg, 10)
    sd = model.state_dict()
    if nan_key is not None:
        sd[nan_key] = sd[nan_key].clone()
        sd[nan_key].view(-1)[0] = float("nan")
    path = tmp_path / "step_000000001.pt"
    checkpoint.save_file(
        {"engine": {"model": sd}, "client": {"config": cfg.model_dump(mode="json")}}, path
    )
    return path


@pytest.mark.timeout(120)
def test_eval_of_a_non_finite_checkpoint_is_refused(tmp_path, capsys):
    from addernet_dist.evaluate import main

    path = _checkpoint(tmp_path, [], nan_key="fc.weight")
    capsys.readouterr()
    assert main(["--checkpoint", str(path), *FAST[:1]]) == 2
    out, err = capsys.readouterr()
    assert f"'{path}' holds non-finite values in fc.weight" in err, err
    assert "evaluate an earlier checkpoint" in err and out == ""


@pytest.mark.timeout(120)
def test_eval_with_a_config_that_does_not_fit_names_the_keys(tmp_path, capsys):
    from addernet_dist.evaluate import main

    path = _checkpoint(tmp_path, ["model.num_classes=5"])
    capsys.readouterr()
    assert main(["--config", str(DEBUG_CONFIG), "--checkpoint", str(path), *FAST[:1]]) == 2
    err = capsys.readouterr().err
    assert "do not fit model resnet8 (conv=adder, model.num_classes=None)" in err, err
    assert "shape differs (2): fc.weight: file (5, 64) vs model (10, 64)" in err, err
    assert "omit --config" in err
    assert torch.isfinite(checkpoint.load_file(path)["engine"]["model"]["fc.weight"]).all()
