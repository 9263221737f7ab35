"""``addernet-analyze``: every sub-command on tiny models and generated IDX data writes a valid PNG
and the numbers it prints are the ones the analysis defines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from addernet_dist import checkpoint
from addernet_dist.analyze import (
    LeNetPP,
    bn_recalibrated_top1,
    feature_geometry,
    filter_match,
    filter_smoothness,
    final_checkpoint,
    fit_laplace_gaussian,
    load_trained_model,
    main,
    weight_layers,
)
from addernet_dist.config import Config
from addernet_dist.data.idx import IdxLoader, write_idx
from addernet_dist.models import create_model
from addernet_dist.nn import AdderLinear
from addernet_dist.ops import adder_linear, adder_linear_reference
from tests.logit_checks import assert_logits_vary


@pytest.fixture
def idx_root(tmp_path):
    """48 train / 40 test 28x28 images whose brightness encodes the class (learnable)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fm"
    root.mkdir()
    for prefix, n in (("train", 48), ("t10k", 40)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        images[:, 8:20, 8:20] += (labels * 20)[:, None, None].astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def assert_png(path, min_w=400, min_h=250):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.mode in ("RGB", "RGBA")
    assert img.width >= min_w and img.height >= min_h
    arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.std() > 10  # not blank
    assert (arr < 128).mean() > 0.005  # some dark ink (text, bars, points)


@pytest.mark.timeout(60)
def test_table1_adder_gradients_are_orders_smaller(idx_root, tmp_path, capsys):
    png, js = tmp_path / "t1.png", tmp_path / "t1.json"
    main(
        [
            "table1",
            "--data-root",
            str(idx_root),
            "--batch",
            "16",
            "--out",
            str(png),
            "--json",
            str(js),
        ]
    )
    out = capsys.readouterr().out
    assert "paper CNN (MNIST) | 0.2261 | 0.2990 | 0.4646" in out
    norms = json.loads(js.read_text())
    assert set(norms) == {"AdderNet (p=1)", "AdderNet (p=2)", "CNN"}
    layers = ["features.0", "features.4", "fc.0", "fc.3", "classifier.0"]
    assert list(norms["AdderNet (p=1)"]) == layers
    assert list(norms["CNN"]) == layers[:4] + ["classifier"]  # the CNN's head is a bare Linear
    # Paper Table 1 / eq. 31: BN behind an adder layer divides by a much larger sigma, so the
    # filter gradients are far smaller than the CNN's (the paper: 100-300x on MNIST).
    for a, c in zip(norms["AdderNet (p=1)"].values(), norms["CNN"].values()):
        assert 0 < a < c / 10
    assert_png(png)


@pytest.mark.timeout(30)
def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["table1", "--data-root", str(tmp_path)]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["weights", "--adder", str(tmp_path / "none.pt")]) == 2
    assert "does not exist; train one first" in capsys.readouterr().err
    assert main(["curves", "--run", f"x={tmp_path}"]) == 2
    assert "metrics.jsonl' does not exist" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_fit_picks_the_generating_distribution():
    rng = np.random.default_rng(0)
    lap = fit_laplace_gaussian(rng.laplace(0.1, 0.5, size=40_000))
    assert lap["better"] == "Laplace"
    assert lap["laplace_b"] == pytest.approx(0.5, rel=0.02)
    assert lap["laplace_mu"] == pytest.approx(0.1, abs=0.01)
    # Expected log-likelihood of a Laplace under its own fit: -1 - log(2b).
    assert lap["ll_laplace"] == pytest.approx(-1 - math.log(2 * 0.5), abs=0.02)
    assert lap["excess_kurtosis"] == pytest.approx(3.0, abs=0.4)
    gau = fit_laplace_gaussian(rng.normal(-0.2, 2.0, size=40_000))
    assert gau["better"] == "Gaussian"
    assert gau["gauss_sigma"] == pytest.approx(2.0, rel=0.02)
    assert gau["ll_gauss"] == pytest.approx(-0.5 * math.log(2 * math.pi * math.e * 4.0), abs=0.02)
    assert abs(gau["excess_kurtosis"]) < 0.2


@pytest.mark.timeout(60)
def test_bn_recalibration_restores_stats_of_the_current_p(idx_root, tmp_path):
    # A model whose BN running statistics are garbage (as after a p change) is judged on
    # statistics recomputed from training batches: the same top-1 as with statistics that were
    # accumulated by running the data through it.
    torch.manual_seed(0)
    net = create_model("lenet5_bn", conv="adder")
    cfg = Config.model_validate(
        {
            "model": {"name": "lenet5_bn"},
            "data": {"dataset": "fashion_mnist", "root": str(idx_root)},
        }
    )
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.fill_(1e3)
            m.running_var.fill_(1e-6)
    ck = tmp_path / "checkpoints" / "step_000000003.pt"
    state = {
        "engine": {"model": net.state_dict()},
        "client": {"config": cfg.model_dump(mode="json")},
    }
    checkpoint.save_file(state, ck)
    assert final_checkpoint(tmp_path) == ck
    top1 = bn_recalibrated_top1(ck, batches=3, batch_size=16)
    # Reference by hand: cumulative BN statistics over the same 3 shuffled training batches.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for x, _ in IdxLoader(idx_root, "train", batch_size=16, seed=0):
            net(x)
        net.eval()
        x, y = zip(*IdxLoader(idx_root, "val", batch_size=100))
        logits = net(torch.cat(x))
        assert_logits_vary(logits)  # else both top-1s only count labels
        expected = 100.0 * float((logits.argmax(1) == torch.cat(y)).float().mean())
    assert top1 == pytest.approx(expected)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        final_checkpoint(tmp_path / "nothing")


@pytest.mark.timeout(60)
def test_weights_from_trainer_checkpoint_and_plain_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    adder = create_model("lenet5_bn", conv="adder")
    cfg = Config.model_validate({"model": {"name": "lenet5_bn", "conv": "adder"}})
    ck = tmp_path / "step_000000001.pt"
    checkpoint.save_file(
        {
            "engine": {"model": adder.state_dict()},
            "client": {"config": cfg.model_dump(mode="json")},
        },
        ck,
    )
    cnn = create_model("lenet5_bn", conv="conv")
    sd = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), sd)
    loaded = load_trained_model(ck)
    assert torch.equal(weight_layers(loaded)[2][1].weight, adder.fc[0].weight)

    png, js = tmp_path / "w.png", tmp_path / "w.json"
    main(
        ["weights", "--adder", str(ck), "--cnn", str(sd), "--model", "lenet5_bn"]
        + ["--out", str(png), "--json", str(js)]
    )
    res = json.loads(js.read_text())
    # Layer 3 of LeNet-5-BN (the paper's choice) is the 400 -> 120 layer.
    assert res["AdderNet"]["layer"] == "fc.0" and res["AdderNet"]["n"] == 400 * 120
    expected = fit_laplace_gaussian(adder.fc[0].weight.detach().double().numpy())
    assert res["AdderNet"]["ll_laplace"] == pytest.approx(expected["ll_laplace"])
    # Untrained: adder filters are N(0, 1) and CNN weights uniform, both lighter-tailed than a
    # Laplace, so the Gaussian must win; sigma of N(0, 1) is recovered.
    assert res["AdderNet"]["better"] == "Gaussian" and res["CNN"]["better"] == "Gaussian"
    assert res["AdderNet"]["gauss_sigma"] == pytest.approx(1.0, rel=0.02)
    assert "| AdderNet | fc.0 | 48000 |" in capsys.readouterr().out
    assert_png(png)
    with pytest.raises(FileNotFoundError, match="addernet-train"):
        load_trained_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="--model NAME"):
        load_trained_model(sd)


def test_filter_statistics_tell_structure_from_noise():
    yy, xx = np.mgrid[0:5, 0:5] / 4.0
    # smooth first-layer-like filters: ramps and a blob
    smooth = np.stack([xx, yy, xx + yy, np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 8)])[:, None]
    noise = np.random.default_rng(101).standard_normal((4, 1, 5, 5))  # not filter_match's stream
    assert filter_smoothness(smooth) > 0.5
    assert abs(filter_smoothness(noise)) < 0.2
    # the same patterns, rescaled, shifted and sign-flipped, match perfectly; noise only by chance
    same = filter_match(smooth, -3.0 * smooth[::-1] + 1.0, trials=50)
    assert same["mean_best_abs_corr"] == pytest.approx(1.0)
    assert same["mean_best_abs_corr"] > same["chance_p95"]
    vs_noise = filter_match(smooth, noise, trials=200)
    assert vs_noise["mean_best_abs_corr"] < vs_noise["chance_p95"]


@pytest.mark.timeout(60)
def test_filters_command_reads_both_checkpoints_and_plots(tmp_path, capsys):
    torch.manual_seed(0)
    adder = create_model("lenet5_bn", conv="adder")
    cnn = create_model("lenet5_bn", conv="conv")
    with torch.no_grad():  # give the CNN the adder's first-layer patterns, sign-flipped
        cnn.features[0].weight.copy_(-2.0 * adder.features[0].weight)
    paths = []
    for name, net in (("adder", adder), ("cnn", cnn)):
        paths.append(tmp_path / f"{name}.pt")
        torch.save(net.state_dict(), paths[-1])
    png, js = tmp_path / "f.png", tmp_path / "f.json"
    main(
        ["filters", "--adder", str(paths[0]), "--cnn", str(paths[1]), "--model", "lenet5_bn"]
        + ["--out", str(png), "--json", str(js)]
    )
    res = json.loads(js.read_text())
    assert res["AdderNet"]["layer"] == res["CNN"]["layer"] == "features.0"
    w = adder.features[0].weight.detach().double().numpy()
    assert res["AdderNet"]["smoothness"] == pytest.approx(filter_smoothness(w))
    assert res["adder_matched_by_cnn"]["mean_best_abs_corr"] == pytest.approx(1.0)
    assert (
        len(res["adder_matched_by_cnn"]["best_abs_corr"]) == 6
    )  # LeNet-5-BN: 6 first-layer filters
    assert "smoothness (adjacent-tap correlation)" in capsys.readouterr().out
    assert_png(png)
    base = ["filters", "--adder", str(paths[0]), "--cnn", str(paths[1]), "--model", "lenet5_bn"]
    with pytest.raises(SystemExit, match="fc.0.*is not a convolution"):
        main([*base, "--layer", "3", "--out", str(png)])
    with pytest.raises(SystemExit, match="weight layers 1..5"):
        main([*base, "--layer", "9", "--out", str(png)])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dim", [2, 3])
def test_features_trains_both_nets_and_plots(idx_root, tmp_path, dim):
    net = LeNetPP("adder", width=0.125, dim=dim, kernel=3)
    assert isinstance(net.classifier[0], AdderLinear) and isinstance(net.feature[0], AdderLinear)
    assert net.features(torch.randn(4, 1, 32, 32)).shape == (4, dim)
    png, js = tmp_path / "f.png", tmp_path / "f.json"
    main(
        ["features", "--data-root", str(idx_root), "--epochs", "1", "--batch", "16"]
        + [
            "--width",
            "0.125",
            "--kernel",
            "3",
            "--dim",
            str(dim),
            "--out",
            str(png),
            "--json",
            str(js),
        ]
    )
    res = json.loads(js.read_text())
    for label in ("CNN", "AdderNet"):
        assert 0.0 <= res[label]["top1"] <= 1.0
        assert len(res[label]["train_loss"]) == 1 and np.isfinite(res[label]["train_loss"][0])
        assert set(res[label]["geometry"]) == {"angle", "l1_centre"}
    assert_png(png)
    with pytest.raises(ValueError, match="feature dim must be 2 or 3"):
        LeNetPP("conv", dim=4)


@pytest.mark.timeout(30)
def test_feature_geometry_tells_rays_from_blobs():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 300)
    ang = y * np.pi / 4 + rng.normal(0, 0.02, y.size)
    r = rng.uniform(0.5, 40, y.size)
    rays = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
    geo = feature_geometry(rays, y)
    assert geo["angle"] == 1.0 and geo["l1_centre"] < 0.95
    centres = np.arange(1, 9)[:, None] * np.array([[3.0, 3.0]])  # all on one ray
    blobs = centres[y] + rng.normal(0, 0.3, (y.size, 2))
    geo = feature_geometry(blobs, y)
    assert geo["l1_centre"] > 0.99 and geo["angle"] < 0.3


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ablation_runs_each_arm_through_the_trainer_and_curves(idx_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    png, js = tmp_path / "a.png", tmp_path / "a.json"
    main(
        ["ablation", "--only", "000", "111", "--epochs", "1", "--runs-dir", str(runs), "--fresh"]
        + ["--recalibrate-bn"]
        + ["--out", str(png), "--json", str(js), "--set", f"data.root={idx_root}"]
        + ["train.global_batch_size=16", "train.device=cpu", "train.log_every=1"]
    )
    rows = json.loads(js.read_text())
    assert [(r["fp_grad"], r["lp"], r["adaptive"]) for r in rows] == [
        (False, False, False),
        (True, True, True),
    ]
    assert all(0.0 <= r["top1"] <= 100.0 for r in rows)
    assert all(0.0 <= r["top1_bn_recalibrated"] <= 100.0 for r in rows)
    # The arms really ran with the switches the table claims.
    for arm, flag in (("fp0_lp0_ad0", False), ("fp1_lp1_ad1", True)):
        saved = yaml.safe_load((runs / arm / "config.yaml").read_text())
        assert saved["adder"]["full_precision_grad"] is flag
        assert saved["adder"]["p_schedule"] is flag and saved["adder"]["adaptive_lr"] is flag
        assert saved["train"]["epochs"] == 1
    assert_png(png)

    curves, cj = tmp_path / "c.png", tmp_path / "c.json"
    main(
        [
            "curves",
            "--run",
            f"plain={runs / 'fp0_lp0_ad0'}",
            "--run",
            f"full={runs / 'fp1_lp1_ad1'}",
        ]
        + ["--out", str(curves), "--json", str(cj)]
    )
    summ = json.loads(cj.read_text())
    assert summ["full"]["eval_epochs"] == [0] or summ["full"]["eval_epochs"] == [1]
    assert summ["full"]["final_top1"] == pytest.approx(
        rows[1]["top1"] if summ["full"]["final_top1"] > 1 else rows[1]["top1"] / 100
    )
    assert "| plain | 1 |" in capsys.readouterr().out
    assert_png(curves)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("modes", [("lp", "full"), ("hardtanh", "sign")])
def test_adder_linear_fast_route_matches_reference(p, modes):
    # ops.adder_linear runs as a 1x1 adder conv on the fast backend (the speed-up the LeNet
    # runs here rely on); the reference is the spec.
    for m, k, o in ((1, 1, 1), (7, 13, 5), (123, 40, 17)):
        x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
        w = torch.randn(o, k, dtype=torch.float64, requires_grad=True)
        g = torch.randn(m, o, dtype=torch.float64)
        y = adder_linear(x, w, p, *modes)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        y_ref = adder_linear_reference(x, w, p, *modes)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), g)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref)
        torch.testing.assert_close(gw, gw_ref)
