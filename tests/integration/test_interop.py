"""The official AdderNet checkpoints in, our weights out, ``train.init_from``.

The reference every import is checked against is ``official_forward`` below: the forward of the
official code (huawei-noah/AdderNet adder.py, resnet20.py, resnet50.py), re-implemented here in
plain fp64 functional PyTorch on the official state dict — unfold, −Σ|W − X| over C·k·k with zero
padding counted, BN, the 1×1-conv classifier and the BN over the logits — and nothing of
addernet_dist.

tests/data/ResNet20-AdderNet.pth is the authors' published ResNet-20 (CIFAR-10): repository
huawei-noah/AdderNet, commit d94dc43a0f2a7448c8c38bcf638062de89f2d34d, path
models/ResNet20-AdderNet.pth (removed in the next commit), BSD 3-Clause licence (Copyright (C) 2020
Huawei Technologies Co., Ltd.; tests/data/LICENSE-huawei-noah-AdderNet.txt, tests/data/README.md).
The ResNet-50 file is only on the authors' drives: its layout is built from the description in
the official resnet50.py (``official_resnet50_state``) and saved in the same legacy format.
"""

from __future__ import annotations

import argparse
import copy
import json
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from addernet_dist import checkpoint, interop
from addernet_dist.config import ConfigError, load_config
from addernet_dist.interop import InteropError
from addernet_dist.models import create_model
from addernet_dist.nn import adder_modules
from addernet_dist.ops import dispatch
from tests.logit_checks import assert_logits_vary

DATA = Path(__file__).resolve().parents[1] / "data"
OFFICIAL_R20 = DATA / "ResNet20-AdderNet.pth"
REPO = Path(__file__).resolve().parents[2]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # official test.py


@pytest.fixture(autouse=True)
def _reset_backend():
    # the trainer and addernet-eval set a process-wide adder backend; later tests must not inherit it
    yield
    dispatch.set_default_backend(None)


# ---------------------------------------------------------------------------------------------
# The official forward, fp64, functional (the specification of every import)
# ---------------------------------------------------------------------------------------------


def official_adder(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """adder.py: unfold the (zero-padded) input, out[o, l] = −Σ_{c,i,j} |W[o,c,i,j] − X_col[c·i·j, l]|."""
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    ho, wo = (h - k + 2 * padding) // stride + 1, (wd - k + 2 * padding) // stride + 1
    cols = F.unfold(x, k, padding=padding, stride=stride)  # N × C·k·k × L
    w_col = w.reshape(o, 1, -1)
    out = torch.stack([-(w_col - c.T.unsqueeze(0)).abs_().sum(2) for c in cols])  # per image: O × L
    return out.view(n, o, ho, wo)


def official_bn(x: torch.Tensor, sd: dict, name: str, calibrate: bool) -> torch.Tensor:
    """nn.BatchNorm2d in eval mode; ``calibrate``: first set the running statistics to this
    batch's (so random weights get meaningful BN statistics, as a trained file has)."""
    if calibrate:
        dims = [d for d in range(x.dim()) if d != 1]
        sd[name + ".running_mean"] = x.mean(dims)
        sd[name + ".running_var"] = x.var(dims) + 1e-3
    return F.batch_norm(
        x,
        sd[name + ".running_mean"],
        sd[name + ".running_var"],
        sd[name + ".weight"],
        sd[name + ".bias"],
        training=False,
        eps=1e-5,
    )


def official_forward(sd: dict, x: torch.Tensor, calibrate: bool = False) -> torch.Tensor:
    """resnet20.py / resnet50.py forward over an official state dict (keys without 'module.')."""
    bottleneck = "layer1.0.conv3.adder" in sd
    if bottleneck:  # resnet50.py: 7×7/2 conv, BN, ReLU, 3×3/2 max-pool
        x = F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)
        x = F.max_pool2d(F.relu(official_bn(x, sd, "bn1", calibrate)), 3, 2, 1)
    else:  # resnet20.py: 3×3 conv, BN, ReLU
        x = F.relu(official_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1", calibrate))
    stage = 1
    while f"layer{stage}.0.conv1.adder" in sd:
        b = 0
        while f"layer{stage}.{b}.conv1.adder" in sd:
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            if bottleneck:  # stride on conv2 (3×3, padding 1); conv1/conv3 1×1
                out = F.relu(
                    official_bn(
                        official_adder(x, sd[p + ".conv1.adder"], 1, 0), sd, p + ".bn1", calibrate
                    )
                )
                out = F.relu(
                    official_bn(
                        official_adder(out, sd[p + ".conv2.adder"], stride, 1),
                        sd,
                        p + ".bn2",
                        calibrate,
                    )
                )
                out = official_bn(
                    official_adder(out, sd[p + ".conv3.adder"], 1, 0), sd, p + ".bn3", calibrate
                )
            else:  # stride on conv1; both 3×3, padding 1
                out = F.relu(
                    official_bn(
                        official_adder(x, sd[p + ".conv1.adder"], stride, 1),
                        sd,
                        p + ".bn1",
                        calibrate,
                    )
                )
                out = official_bn(
                    official_adder(out, sd[p + ".conv2.adder"], 1, 1), sd, p + ".bn2", calibrate
                )
            if p + ".downsample.0.adder" in sd:  # adder 1×1 (stride of the block, no padding) + BN
                x = official_bn(
                    official_adder(x, sd[p + ".downsample.0.adder"], stride, 0),
                    sd,
                    p + ".downsample.1",
                    calibrate,
                )
            x = F.relu(out + x)
            b += 1
        stage += 1
    # resnet20.py: AvgPool2d(8) on the 8×8 map; resnet50.py: AdaptiveAvgPool2d(1): the same here
    x = F.adaptive_avg_pool2d(x, 1)
    x = F.conv2d(x, sd["fc.weight"], sd.get("fc.bias"))  # the 1×1 convolution classifier
    return official_bn(x, sd, "bn2", calibrate).flatten(1)  # BN over the logits


def _official_sd(path: Path = OFFICIAL_R20) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _fp64(sd: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# The real ResNet-20 file
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_official_resnet20_file_imports_and_matches_the_official_forward():
    raw = OFFICIAL_R20.read_bytes()
    assert not zipfile.is_zipfile(OFFICIAL_R20)  # the legacy format, as published
    model = interop.load_official(OFFICIAL_R20, "resnet20")
    assert not model.training
    official = _official_sd()
    ours = model.state_dict()
    # every tensor copied bit for bit under its mapped name
    for k, v in official.items():
        mapped = ours[interop.official_key_to_ours(k)]
        assert torch.equal(mapped, v.flatten(1) if k == "fc.weight" else v), k
    assert isinstance(model.fc[1], torch.nn.BatchNorm1d) and model.fc[0].bias is None
    assert all(m.p == 1.0 for m in adder_modules(model))

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # CIFAR-normalised scale
    ref = official_forward(_fp64(official), x)
    # A trained network: the logits are spread, not a degenerate constant.
    assert ref.std(1).min() > 1.0
    with torch.no_grad():
        model32 = copy.deepcopy(model)
        got64 = model.double()(x)
        torch.testing.assert_close(got64, ref, rtol=1e-9, atol=1e-9)
        # fp32, as it is evaluated: adder sums of ~576 terms at |y| ~ 1e3 carry ~1e-4 rounding
        # per layer; measured max |Δlogit| 3e-3 on logits of scale ~5
        got32 = model32(x.float())
    torch.testing.assert_close(got32.double(), ref, rtol=0, atol=2e-2)
    assert torch.equal(got32.argmax(1), ref.argmax(1))
    assert OFFICIAL_R20.read_bytes() == raw  # reading never writes


@pytest.mark.timeout(60)
def test_import_errors_name_the_keys(tmp_path):
    official = _official_sd()

    def save(sd: dict, name: str, prefix: str = "module.") -> Path:
        path = tmp_path / name
        torch.save(OrderedDict((prefix + k, v) for k, v in sd.items()), path)
        return path

    # a model the file is not: the missing keys are named and the right model suggested
    with pytest.raises(InteropError) as e:
        interop.load_official(OFFICIAL_R20, "resnet32")
    msg = str(e.value)
    assert "missing from the file" in msg and "layer1.3.conv1.weight" in msg
    assert "is an official resnet20, not a resnet32: pass --model resnet20" in msg
    with pytest.raises(InteropError, match=r"--model resnet20\n[\s\S]*layer1\.0\.conv3\.weight"):
        interop.load_official(OFFICIAL_R20, "resnet50")
    # an unknown key, by its official name and ours
    extra = save({**official, "layer1.0.conv9.adder": torch.zeros(16, 16, 3, 3)}, "extra.pth")
    with pytest.raises(
        InteropError,
        match=r"not in the model \(1\): layer1\.0\.conv9\.adder -> layer1\.0\.conv9\.weight",
    ):
        interop.load_official(extra, "resnet20")
    # a wrong shape
    bad = dict(official)
    bad["layer2.1.conv2.adder"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(
        InteropError,
        match=r"layer2\.1\.conv2\.adder -> layer2\.1\.conv2\.weight: file \(32, 32, 1, 1\) vs model \(32, 32, 3, 3\)",
    ):
        interop.load_official(save(bad, "shape.pth"), "resnet20")
    # a missing key
    short = {k: v for k, v in official.items() if k != "layer3.2.bn2.running_var"}
    with pytest.raises(
        InteropError, match=r"missing from the file \(1\): layer3\.2\.bn2\.running_var"
    ):
        interop.load_official(save(short, "short.pth"), "resnet20")
    # only some keys prefixed
    mixed = tmp_path / "mixed.pth"
    torch.save(
        {"module.conv1.weight": official["conv1.weight"], "bn1.weight": official["bn1.weight"]},
        mixed,
    )
    with pytest.raises(InteropError, match="only some keys carry the 'module.' prefix: bn1.weight"):
        interop.load_official(mixed, "resnet20")
    # non-finite weights are refused
    nan = dict(official)
    nan["layer1.0.conv1.adder"] = torch.full((16, 16, 3, 3), float("nan"))
    with pytest.raises(InteropError, match=r"non-finite values in layer1\.0\.conv1\.weight"):
        interop.load_official(save(nan, "nan.pth"), "resnet20")
    # a pickle with an arbitrary object is never unpickled
    evil = tmp_path / "evil.pth"
    torch.save({"x": argparse.Namespace(a=1)}, evil)
    with pytest.raises(InteropError, match="weights_only"):
        interop.load_official(evil, "resnet20")
    with pytest.raises(InteropError, match="no official AdderNet layout"):
        interop.load_official(OFFICIAL_R20, "vgg_small")
    # un-prefixed state dicts (a user's own re-save) import the same
    plain = interop.load_official(save(official, "plain.pth", prefix=""), "resnet20")
    ref = interop.load_official(OFFICIAL_R20, "resnet20")
    for (k, a), b in zip(plain.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, k


# ---------------------------------------------------------------------------------------------
# ResNet-50: a legacy-format, module.-prefixed state dict built from the official layout
# ---------------------------------------------------------------------------------------------


def official_resnet50_state(num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """Every key and shape of the official resnet50.py state dict, written from its layout
    (not from our model): 7×7 stem, bottlenecks [3, 4, 6, 3] with widths 64..512 ×4, adder 1×1
    downsample + BN where stride ≠ 1 or the width changes, fc = 1×1 conv with bias, bn2."""
    sd: dict[str, torch.Tensor] = {}

    def bn(name: str, c: int) -> None:
        sd[name + ".weight"] = 1 + 0.1 * torch.randn(c)
        sd[name + ".bias"] = 0.1 * torch.randn(c)
        sd[name + ".running_mean"] = torch.zeros(c)  # set by the calibration pass
        sd[name + ".running_var"] = torch.ones(c)
        sd[name + ".num_batches_tracked"] = torch.tensor(123, dtype=torch.int64)

    sd["conv1.weight"] = 0.1 * torch.randn(64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            sd[p + ".conv1.adder"] = torch.randn(planes, inplanes, 1, 1)
            bn(p + ".bn1", planes)
            sd[p + ".conv2.adder"] = torch.randn(planes, planes, 3, 3)
            bn(p + ".bn2", planes)
            sd[p + ".conv3.adder"] = torch.randn(planes * 4, planes, 1, 1)
            bn(p + ".bn3", planes * 4)
            if b == 0:
                sd[p + ".downsample.0.adder"] = torch.randn(planes * 4, inplanes, 1, 1)
                bn(p + ".downsample.1", planes * 4)
            inplanes = planes * 4
    sd["fc.weight"] = 0.05 * torch.randn(num_classes, 2048, 1, 1)
    sd["fc.bias"] = 0.1 * torch.randn(num_classes)
    bn("bn2", num_classes)
    return sd


@pytest.mark.timeout(120)
def test_official_layout_resnet50_legacy_file_imports_and_matches_the_official_forward(tmp_path):
    sd = official_resnet50_state()
    assert sum(
        v.numel()
        for k, v in sd.items()
        if not k.endswith(("running_mean", "running_var", "tracked"))
    ) == pytest.approx(25.6e6, rel=0.01)
    # BN statistics from a calibration batch through the official forward (fp64), as a trained
    # file has them; then the file is stored in fp32 like the published one.
    sd64 = _fp64(sd)
    with torch.no_grad():
        official_forward(sd64, torch.randn(2, 3, 17, 15, dtype=torch.float64), calibrate=True)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd64.items()}
    path = tmp_path / "ResNet50-AdderNet.pth"
    torch.save(
        OrderedDict(("module." + k, v) for k, v in sd.items()),
        path,
        _use_new_zipfile_serialization=False,
    )
    assert not zipfile.is_zipfile(path)

    model = interop.load_official(path, "resnet50")
    assert model.fc[0].bias is not None and model.fc[0].out_features == 1000
    # odd sizes, small to keep the fp64 reference fast: 9×8 → 5×4 → 3×2 → 2×1 → 1×1
    x = torch.randn(2, 3, 17, 15, dtype=torch.float64)
    with torch.no_grad():
        ref = official_forward(_fp64(sd), x)
        got = model.double()(x)
    assert ref.std(1).min() > 0.1  # not a degenerate constant
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    # the file of another model is named as such
    with pytest.raises(InteropError, match="--model resnet50"):
        interop.load_official(path, "resnet18")


# ---------------------------------------------------------------------------------------------
# addernet-import-official -> addernet-eval, with the official input pipeline
# ---------------------------------------------------------------------------------------------


def _png_tree(root: Path, per_class: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    files: dict[str, list[Path]] = {}
    for split in ("val",):
        files[split] = []
        for c in range(10):
            d = root / split / str(c)
            d.mkdir(parents=True)
            for i in range(per_class):
                # smooth-ish images so the network's outputs are not all one class
                img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = np.kron(img, np.ones((4, 4, 1), dtype=np.uint8))
                f = d / f"{i}.png"
                Image.fromarray(img).save(f)
                files[split].append(f)
    return files


@pytest.mark.timeout(120)
def test_import_cli_and_addernet_eval_use_the_official_pipeline(tmp_path, capsys):
    from addernet_dist.evaluate import main as eval_main

    dst = tmp_path / "official_r20.pt"
    assert interop.main_import([str(OFFICIAL_R20), str(dst), "--model", "resnet20"]) == 0
    assert "wrote" in capsys.readouterr().out
    state = checkpoint.load_file(dst)
    stored = state["client"]["config"]
    assert stored["model"]["head"] == "linear_bn" and stored["model"]["num_classes"] == 10
    assert state["client"]["imported_from"]["sha256"].startswith("fe3ad7c15573d34c")
    # never overwrite what exists
    before = dst.read_bytes()
    assert interop.main_import([str(OFFICIAL_R20), str(dst), "--model", "resnet20"]) == 2
    assert "exists" in capsys.readouterr().err and dst.read_bytes() == before
    assert (
        interop.main_import([str(OFFICIAL_R20), str(tmp_path / "x.pt"), "--model", "resnet50"]) == 2
    )
    assert "--model resnet20" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()

    # Reference: test.py's pipeline (ToTensor + Normalize with the official CIFAR mean/std) on 20
    # PNG files read back from disk, into the imported model (equal to the official forward, first
    # test above), in-process: addernet-eval must see the same inputs.
    files = _png_tree(tmp_path / "cifar", per_class=2)["val"]
    pixels = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files]
    images = torch.stack(pixels).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    labels = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        model = interop.load_official(OFFICIAL_R20, "resnet20")
        logits = model((images - mean[:, None, None]) / std[:, None, None])
    ref_loss = float(F.cross_entropy(logits, labels))
    ref_top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    assert_logits_vary(logits)

    # a test-set-only folder, as the README's CIFAR-10 command: data.train_split=val
    common = [
        f"data.root={tmp_path / 'cifar'}",
        "data.train_split=val",
        "data.num_workers=0",
        "train.global_batch_size=20",
        "train.device=cpu",
    ]
    results = []
    for extra in (["--config", str(REPO / "configs/official_resnet20_cifar10.yaml")], []):
        # with the shipped config, and with the config stored in the checkpoint
        assert eval_main([*extra, "--checkpoint", str(dst), *common]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for r in results:
        assert r["count"] == 20
        assert r["top1"] == pytest.approx(ref_top1)
        # the same fp32 model on the same inputs; a wrong normalisation (e.g. CIFAR's per-pixel
        # std 0.247 instead of 0.2023) or any resize/crop moves this loss by far more
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "name, model",
    [
        ("official_resnet20_cifar10.yaml", "resnet20"),
        ("official_resnet50_imagenet.yaml", "resnet50"),
    ],
)
def test_official_configs_match_what_the_importer_stores(name, model):
    cfg = load_config(REPO / "configs" / name)
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    n, bias = (10, False) if model == "resnet20" else (1000, True)
    stored = interop.official_config(model, n, bias)
    assert cfg.model.model_dump(mode="json") == stored["model"]
    for key in ("image_size", "val_resize_ratio", "mean", "std"):
        # the YAML holds no copy: its `pretrained` zoo tag fills them (models/pretrained.py)
        assert key not in raw["data"], key
        assert list(np.atleast_1d(getattr(cfg.data, key))) == pytest.approx(
            list(np.atleast_1d(stored["data"][key]))
        ), key
    assert "head" not in raw["model"] and "head_bias" not in raw["model"]
    assert raw["pretrained"] == f"{model}.{'official_cifar10' if model == 'resnet20' else 'official_imagenet'}"
    assert cfg.train.precision == "fp32" and cfg.adder.p_schedule is False and cfg.adder.p_end == 1.0
    assert round(cfg.data.image_size * cfg.data.resolved_val_resize_ratio) == (
        32 if model == "resnet20" else 256
    )


# ---------------------------------------------------------------------------------------------
# Export to safetensors, init_from
# ---------------------------------------------------------------------------------------------


SOURCE_P = 1.875  # p of the last step taken (step 1 of the 8-step decay 2 -> 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real trainer checkpoint: ResNet-8 (debug config), 2 steps, stopped mid-way through the
    ℓp decay (p = 1.875) so the export has to carry a p that is not the default."""
    from addernet_dist.run import train

    out = tmp_path_factory.mktemp("source_run")
    cfg = load_config(
        REPO / "configs/debug.yaml",
        [
            "adder.backend=reference",
            "train.progress_bar=false",
            "train.epochs=1",
            "data.synthetic_train_size=32",
            "data.synthetic_val_size=16",
            "adder.p_decay_epochs=4",  # 8 steps from 2 to 1: the checkpoint holds p = 1.875
            f"output_dir={out}",
        ],
    )
    try:
        train(cfg)
    finally:
        dispatch.set_default_backend(None)
    path = out / "checkpoints" / "step_000000002.pt"
    p = {m.p for m in adder_modules(_model_of(path))}
    assert p == {SOURCE_P}
    return path


def _model_of(ckpt: Path) -> torch.nn.Module:
    state = checkpoint.load_file(ckpt)
    m = create_model("resnet8", num_classes=10)
    m.load_state_dict(state["engine"]["model"])
    return m


def _assert_bit_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


@pytest.mark.timeout(60)
def test_export_carries_the_runs_normalisation(trained, tmp_path):
    """mean and std in the export metadata are the run's data.mean / data.std, not ImageNet's
    defaults: a run whose config holds other values (here Fashion-MNIST-like, per channel
    distinct) exports them as they are."""
    state = checkpoint.load_file(trained)
    mean, std = [0.286, 0.311, 0.297], [0.353, 0.332, 0.371]
    state["client"]["config"]["data"].update(mean=mean, std=std)
    src = tmp_path / "other_norm.pt"
    checkpoint.save_file(state, src)
    out = tmp_path / "other_norm.safetensors"
    interop.export(src, out)
    _, meta = interop.read_exported(out)
    assert json.loads(meta["mean"]) == mean
    assert json.loads(meta["std"]) == std


@pytest.mark.timeout(60)
def test_export_then_load_is_bit_for_bit(trained, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "r8.safetensors"
    assert interop.main_export([str(trained), str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert (meta["name"], meta["conv"], meta["head"], meta["num_classes"]) == (
        "resnet8",
        "adder",
        "linear",
        "10",
    )
    assert json.loads(meta["p"]) == SOURCE_P
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert json.loads(meta["image_size"]) == 8
    loaded = interop.load_exported(out)
    original = _model_of(trained).eval()
    _assert_bit_equal(loaded, original)
    x = torch.randn(3, 3, 8, 8)
    # The forward in train mode (batch statistics): in eval mode this 2-step checkpoint's running
    # statistics zero every feature, so the logits are fc.bias for every image and would match
    # whatever the weights and p; the running statistics are covered by the bit-equality above.
    with torch.no_grad():
        want = original.train()(x)
        assert_logits_vary(want, min_distinct_top1=1)
        assert torch.equal(loaded.train()(x), want)
    # the imported official model too (head linear_bn without bias, p = 1)
    imported = tmp_path / "r20.pt"
    interop.import_official(OFFICIAL_R20, imported, "resnet20")
    interop.export(imported, tmp_path / "r20.safetensors")
    _assert_bit_equal(
        interop.load_exported(tmp_path / "r20.safetensors"),
        interop.load_official(OFFICIAL_R20, "resnet20"),
    )
    # errors: existing output, a DeepSpeed folder, not a checkpoint
    assert interop.main_export([str(trained), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    ds = tmp_path / "step_000000016.pt"
    ds.mkdir()
    assert interop.main_export([str(ds), str(tmp_path / "ds.safetensors")]) == 2
    assert "addernet-zero-to-state-dict" in capsys.readouterr().err
    assert interop.main_export([str(OFFICIAL_R20), str(tmp_path / "o.safetensors")]) == 2
    assert "addernet-import-official first" in capsys.readouterr().err


def _finetune(out: Path, *extra: str):
    from addernet_dist.run import train

    cfg = load_config(
        REPO / "configs/debug.yaml",
        [
            "adder.backend=reference",
            "train.progress_bar=false",
            "train.epochs=1",
            "data.synthetic_train_size=32",
            "data.synthetic_val_size=16",
            "data.synthetic_num_classes=5",  # a new task: 5 classes instead of the source's 10
            "adder.p_schedule=false",  # p = 1 from step 0 (the source stopped at 1.75)
            "optim.lr=1e-6",  # small steps: what came from the file is still visible after them
            "optim.weight_decay=0",
            f"output_dir={out}",
            *extra,
        ],
    )
    train(cfg)
    return checkpoint.load_file(out / "checkpoints" / "step_000000002.pt")


@pytest.mark.timeout(120)
def test_init_from_fine_tunes_from_weights_only(trained, tmp_path):
    src_path = tmp_path / "src.safetensors"
    interop.export(trained, src_path)
    src = _model_of(trained).state_dict()
    tuned = _finetune(tmp_path / "ft", f"train.init_from={src_path}", "train.init_from_ignore=fc.*")
    fresh = _finetune(tmp_path / "fresh")
    t, f = tuned["engine"]["model"], fresh["engine"]["model"]
    params = {n for n, _ in create_model("resnet8", num_classes=5).named_parameters()}
    body = [k for k in params if not k.startswith("fc.")]
    for k in body:
        # two steps of lr 1e-6 from the source's weights; the fresh run is far from them
        d_tuned, d_fresh = (t[k] - src[k]).abs().max(), (f[k] - src[k]).abs().max()
        assert d_tuned < 1e-4 and d_fresh > 100 * d_tuned, (k, d_tuned, d_fresh)
    # the new 5-class classifier is the fresh model's, not the file's (which has 10 classes)
    assert t["fc.weight"].shape == (5, 64)
    assert (t["fc.weight"] - f["fc.weight"]).abs().max() < 1e-4
    # weights only: p, step count, LR schedule and optimizer start fresh in the new run
    assert {v["p"] for k, v in t.items() if k.endswith("_extra_state")} == {1.0}
    assert tuned["client"]["train_state"]["global_step"] == 2
    assert tuned["engine"]["lr_scheduler"]["last_epoch"] == 2
    assert tuned["client"]["config"]["train"]["init_from"] == str(src_path)


@pytest.mark.timeout(60)
def test_init_from_strict_key_check_lists_the_differences(trained, tmp_path, capsys):
    cfg_args = ["train.init_from=" + str(trained)]

    def load(name: str, n: int, *extra: str, **kw):
        model = create_model(name, num_classes=n, **kw)
        cfg = load_config(REPO / "configs/debug.yaml", [*cfg_args, f"model.name={name}", *extra])
        return interop.init_from_config(model, cfg)

    # a checkpoint file of ours (the safetensors path runs in the fine-tuning test above)
    loaded, kept = load("resnet8", 10)
    assert (
        kept == [] and "fc.weight" in loaded and not any(k.endswith("_extra_state") for k in loaded)
    )
    src = checkpoint.load_file(trained)["engine"]["model"]
    model = create_model("resnet8", num_classes=5)
    cfg = load_config(
        REPO / "configs/debug.yaml", [*cfg_args, "train.init_from_ignore=[fc.weight, fc.bias]"]
    )
    fc_before = model.fc.weight.detach().clone()
    loaded, kept = interop.init_from_config(model, cfg)
    assert (
        kept == ["fc.weight", "fc.bias"] and len(loaded) == len(src) - 8 - 2
    )  # 8 adder layers' extra state
    for k, v in model.state_dict().items():
        if k in loaded:
            assert torch.equal(v, src[k]), k
    assert torch.equal(model.fc.weight, fc_before)
    assert {m.p for m in adder_modules(model)} == {1.0}  # p is the run's, not the file's
    with pytest.raises(
        ConfigError,
        match=r"shape differs \(2\): fc\.weight: file \(10, 64\) vs model \(5, 64\), fc\.bias[\s\S]*init_from_ignore",
    ):
        load("resnet8", 5)
    with pytest.raises(
        ConfigError,
        match=r"missing from the file \(7\): fc\.0\.weight, fc\.0\.bias, fc\.1\.weight[\s\S]*"
        r"not in the model \(2\): fc\.weight, fc\.bias",
    ):
        load("resnet8", 10, "model.head=linear_bn", head="linear_bn")
    with pytest.raises(ConfigError, match="model.name='resnet8', but this run builds 'resnet20'"):
        load("resnet20", 10)
    with pytest.raises(ConfigError, match="model.conv='adder', but this run builds 'conv'"):
        model = create_model("resnet8", conv="conv", num_classes=10)
        interop.init_from_config(
            model, load_config(REPO / "configs/debug.yaml", [*cfg_args, "model.conv=conv"])
        )
    # an imported official checkpoint with the shipped config: what fine-tuning from it loads
    from addernet_dist.build import build_model

    imported = tmp_path / "r20.pt"
    interop.import_official(OFFICIAL_R20, imported, "resnet20")
    cfg = load_config(
        REPO / "configs/official_resnet20_cifar10.yaml",
        [f"train.init_from={imported}", "model.num_classes=null", "train.init_from_ignore=[fc.*]"],
    )
    model = build_model(cfg, num_classes=7)  # a 7-class task
    loaded, kept = interop.init_from_config(model, cfg)
    assert (
        kept == [k for k in model.state_dict() if k.startswith("fc.")]
        and model.fc[0].out_features == 7
    )
    official = interop.load_official(OFFICIAL_R20, "resnet20").state_dict()
    assert loaded and all(torch.equal(model.state_dict()[k], official[k]) for k in loaded)
    assert len(loaded) == len([k for k in official if not k.endswith("_extra_state")]) - 6

    # through the CLI: exit code 2, a readable error, and the run folder never created
    from addernet_dist.train import main as train_main

    out = tmp_path / "never"
    argv = ["--config", str(REPO / "configs/debug.yaml"), *cfg_args, "data.synthetic_num_classes=5"]
    assert train_main([*argv, f"output_dir={out}", "adder.backend=reference"]) == 2
    assert "error: train.init_from:" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match=r"pattern\(s\) \['classifier\.\*'\] match no key"):
        load("resnet8", 10, "train.init_from_ignore=classifier.*")
    with pytest.raises(ConfigError, match="addernet-import-official first"):
        m = create_model("resnet20", num_classes=10)
        interop.init_from_config(
            m,
            load_config(
                REPO / "configs/debug.yaml",
                [f"train.init_from={OFFICIAL_R20}", "model.name=resnet20"],
            ),
        )


@pytest.mark.timeout(30)
def test_official_head_is_a_resnet_option():
    m = create_model("resnet20", num_classes=7, head="linear_bn", head_bias=False)
    assert [type(c) for c in m.fc] == [torch.nn.Linear, torch.nn.BatchNorm1d]
    assert m.fc[0].bias is None and m.fc[1].num_features == 7
    assert create_model("resnet20", head="linear", head_bias=False).fc.bias is None
    with pytest.raises(ValueError, match="head must be one of"):
        create_model("resnet20", head="conv")
    with pytest.raises(
        ConfigError, match="model.head / model.head_bias are options of the ResNets"
    ):
        load_config(None, ["model.name=vgg_small", "model.head=linear_bn"])
