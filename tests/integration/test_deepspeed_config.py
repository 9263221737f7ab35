"""Fast, single-process tests of the DeepSpeed engine's pieces (no DeepSpeed engine is started).

* the ``deepspeed:`` config section: every mis-configuration is a clear error naming the key;
* batch-size resolution (micro x accumulation x world == global) and its errors, also end to end
  through ``addernet-train`` (exit code 2, nothing written to output_dir);
* the generated DeepSpeed JSON;
* ShardedGradProcessor on replicated gradients == AdaptiveLRScaler + clip_grad_norm_ (the DDP
  engine's code path), and on hand-made shards == the unsharded result;
* checkpoint folders: MANIFEST verification catches truncation, corruption, missing shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from addernet_dist.adaptive_lr import AdaptiveLRScaler
from addernet_dist.config import ConfigError, load_config
from addernet_dist.engine import ds_checkpoint
from addernet_dist.engine.deepspeed import _alpha_fn
from addernet_dist.engine.deepspeed_config import DeepSpeedConfig, build_ds_config, resolve_batch
from addernet_dist.engine.zero_norms import ShardedGradProcessor
from addernet_dist.nn import adder_modules
from tests.helpers import OddAdderNet, random_grads

ROOT = Path(__file__).resolve().parents[2]


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override, needle",
    [
        ("deepspeed.zerostage=1", "unknown key 'deepspeed.zerostage'; valid keys in deepspeed:"),
        ("deepspeed.zero_stage=3", "ZeRO stage 3 is not supported"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("deepspeed.micro_batch_size=0", "deepspeed.micro_batch_size"),
        ("deepspeed.precision=fp16", "deepspeed.precision"),
        ("deepspeed.precision=bf16", "needs zero_stage 1 or 2"),
        ("deepspeed.overrides={optimizer: {type: Adam}}", "use the optim section"),
        ("deepspeed.overrides={gradient_clipping: 1.0}", "use train.grad_clip"),
        ("deepspeed.overrides={train_batch_size: 64}", "use train.global_batch_size"),
        ("deepspeed.overrides={bf16: {enabled: true}}", "use deepspeed.precision=bf16"),
        ("deepspeed.overrides={pipeline: {stages: 2}}", "unknown or unsupported DeepSpeed key"),
        ("deepspeed.overrides={zero_optimization: {stage: 2}}", "use deepspeed.zero_stage"),
        (
            "deepspeed.overrides={zero_optimization: {offload_optimizer: {device: cpu}}}",
            "offload is not supported",
        ),
        (
            "deepspeed.overrides={zero_optimization: {reduce_bucket_sise: 5}}",
            "zero_optimization.reduce_bucket_sise: Extra inputs are not permitted",
        ),
        (
            "deepspeed.overrides={zero_optimization: {reduce_bucket_size: lots}}",
            "zero_optimization.reduce_bucket_size",
        ),
        ("deepspeed.config_file=/nonexistent/ds.json", "'/nonexistent/ds.json' does not exist"),
    ],
)
def test_bad_deepspeed_section_is_a_clear_error(override, needle):
    assert needle in _error(["engine=deepspeed", override])


@pytest.mark.timeout(60)
def test_config_file_is_merged_under_overrides_and_validated(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(
        json.dumps(
            {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": False}, "timers": {}}
        )
    )
    cfg = load_config(
        None,
        [
            "engine=deepspeed",
            "deepspeed.zero_stage=2",
            f"deepspeed.config_file={ds_json}",
            "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 2000}}",
            "train.global_batch_size=48",
            "deepspeed.micro_batch_size=4",
        ],
    )
    ds = build_ds_config(cfg.deepspeed, global_batch=48, world_size=3)
    assert ds["train_batch_size"] == 48
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 48 / (4 x 3)
    assert ds["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 2000,
        "overlap_comm": False,
    }
    assert ds["gradient_clipping"] == 0.0  # clipping happens after eq. 33, in zero_norms
    assert ds["timers"] == {}
    assert "bf16" not in ds and "optimizer" not in ds
    ds_json.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    assert "use the optim section" in _error(
        ["engine=deepspeed", f"deepspeed.config_file={ds_json}"]
    )
    ds_json.write_text("{not json")
    assert "is not valid JSON" in _error([f"deepspeed.config_file={ds_json}"])


@pytest.mark.timeout(30)
def test_bf16_precision_enables_deepspeed_bf16():
    section = DeepSpeedConfig(zero_stage=1, precision="bf16")
    assert build_ds_config(section, global_batch=8, world_size=2)["bf16"] == {"enabled": True}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "global_batch, world, micro, accum, expected",
    [
        (256, 8, None, None, (32, 1)),
        (256, 8, 8, None, (8, 4)),
        (256, 8, None, 2, (16, 2)),
        (256, 8, 16, 2, (16, 2)),
        (7, 7, None, None, (1, 1)),
        (18, 3, 2, 3, (2, 3)),
    ],
)
def test_resolve_batch(global_batch, world, micro, accum, expected):
    got = resolve_batch(global_batch, world, micro, accum)
    assert got == expected
    assert got[0] * got[1] * world == global_batch


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, needle",
    [
        ((256, 3, None, None), "not divisible by the world size 3"),
        ((256, 8, 5, None), "micro_batch_size=5 does not divide the per-rank batch 32"),
        ((256, 8, None, 3), "gradient_accumulation_steps=3 does not divide the per-rank batch 32"),
        ((256, 8, 8, 2), "8 x gradient_accumulation_steps=2 x 8 ranks = 128 != "),
    ],
)
def test_resolve_batch_errors_name_the_numbers(args, needle):
    with pytest.raises(ValueError) as e:
        resolve_batch(*args)
    assert needle in str(e.value)


@pytest.mark.timeout(120)
def test_train_cli_rejects_non_dividing_batch_without_touching_output_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cmd = [
        sys.executable,
        "-m",
        "addernet_dist.train",
        "--config",
        str(ROOT / "configs" / "debug.yaml"),
        "engine=deepspeed",
        "train.global_batch_size=32",
        "deepspeed.micro_batch_size=5",  # 32 per rank (one process) is not a multiple of 5
        f"output_dir={out}",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "deepspeed.micro_batch_size=5 does not divide the per-rank batch 32" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


# -------------------------------------------------------------------------------------------------
# eq. 33 + clipping in the optimizer pre-hook
# -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "max_norm, adaptive", [(None, True), (0.5, True), (1e6, True), (0.5, False)]
)
def test_pre_hook_matches_ddp_engine_processing(max_norm, adaptive):
    """ZeRO-0 path (replicated grads): same updates as scale_() + clip_grad_norm_ + SGD-NAG.
    adaptive=False is the Table 4 "without adaptive LR" ablation: clipping only."""
    torch.manual_seed(3)
    ref, got = OddAdderNet(), OddAdderNet()
    got.load_state_dict(ref.state_dict())
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    opt_ref = torch.optim.SGD(ref.parameters(), **kw)
    opt_got = torch.optim.SGD(got.parameters(), **kw)
    scaler_ref = AdaptiveLRScaler(adder_modules(ref), eta=0.2)
    scaler_got = AdaptiveLRScaler(adder_modules(got), eta=0.2)
    proc = ShardedGradProcessor(
        [m.weight for m in adder_modules(got)],
        alpha_fn=_alpha_fn(scaler_got) if adaptive else None,
        max_norm=max_norm,
    )
    proc.attach(opt_got, opt_got)
    for step in range(3):
        random_grads(ref, step)
        if adaptive:
            norms, alphas = scaler_ref.scale_()
        else:
            norms = torch.stack([m.weight.grad.norm() for m in adder_modules(ref)])
        total = None
        if max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm)
        opt_ref.step()
        random_grads(got, step)
        opt_got.step()
        # Bit for bit, not just close: under bf16 autocast a last-bit difference in alpha_l grows to
        # 5e-4 in the loss by step 5 (issue 21.8, tests/integration/test_engine_bf16_agreement.py).
        assert torch.equal(proc.last_norms, norms)
        if adaptive:
            assert torch.equal(proc.last_alphas, alphas)
        else:
            assert proc.last_alphas is None
        if max_norm is not None:
            assert torch.equal(proc.last_total_norm, total)
        # no per-step host-to-device copy: the layer index and sqrt(k) are built once, then reused
        if step == 0:
            index = proc._layer_index[1] if proc._layer_index else None
        else:
            assert (proc._layer_index[1] if proc._layer_index else None) is index
        if adaptive:  # sqrt(k) on the device: built at the first step, the same tensor after
            sqrt_k_t = proc.alpha_fn.__self__._sqrt_k_t
            assert sqrt_k_t is not None and sqrt_k_t.device == norms.device
            if step == 0:
                first_sqrt_k_t = sqrt_k_t
            else:
                assert sqrt_k_t is first_sqrt_k_t
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(b, a), name
    if max_norm == 0.5:
        assert float(total) > 0.5  # clipping acted


class _FakeMapping:
    """What DeepSpeed's ``param._hp_mapping`` exposes: the fragment of a flat fp32 partition."""

    def __init__(self, flat: torch.Tensor, start: int, numel: int) -> None:
        from deepspeed.utils.tensor_fragment import fragment_address

        self._addr = fragment_address(numel=numel, start=start)
        self._frag = flat.narrow(0, start, numel)

    def get_hp_fragment_address(self):
        return self._addr

    def get_hp_fragment(self):
        return self._frag


@pytest.mark.timeout(60)
def test_sharded_layout_reads_and_scales_the_right_slices():
    """A flat partition holding [other(4) | a1 tail(7) | other(3) | a2 head(10)]: the hook must
    scale exactly the adder slices by alpha and clip everything with the right total norm."""
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(3, 3))  # 9 elements, this rank holds elements 2..8
    w2 = nn.Parameter(torch.randn(4, 4))  # 16 elements, this rank holds elements 0..9
    flat = nn.Parameter(torch.zeros(24))
    w1._hp_mapping = _FakeMapping(flat.data, 4, 7)
    w2._hp_mapping = _FakeMapping(flat.data, 14, 10)
    grad = torch.randn(24)
    opt = torch.optim.SGD([flat], lr=1.0)
    alpha_fn = lambda norms: 2.0 / norms  # noqa: E731
    proc = ShardedGradProcessor([w1, w2], alpha_fn=alpha_fn, max_norm=1.5)
    proc.attach(opt, object())
    assert proc._sharded
    flat.grad = grad.clone()
    opt.step()  # flat -= processed grad
    n1, n2 = grad[4:11].norm(), grad[14:24].norm()  # single rank: the shard IS the global grad
    torch.testing.assert_close(proc.last_norms, torch.stack([n1, n2]))
    expect = grad.clone()
    expect[4:11] *= 2.0 / n1
    expect[14:24] *= 2.0 / n2
    total = expect.norm()
    torch.testing.assert_close(proc.last_total_norm, total)
    torch.testing.assert_close(-flat.detach(), expect * (1.5 / (total + 1e-6)))


@pytest.mark.timeout(30)
def test_sharded_layout_with_two_param_groups_scales_the_adder_slice_in_its_own_group():
    """AdamW's decay / no-decay groups (optim.py) are two flat partitions under ZeRO-1/2: an adder
    fragment at offset 2 of the SECOND partition is scaled there, the first partition untouched."""
    w = nn.Parameter(torch.randn(5))
    first, second = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(9))
    w._hp_mapping = _FakeMapping(second.data, 2, 5)
    opt = torch.optim.SGD([{"params": [first]}, {"params": [second]}], lr=1.0)
    proc = ShardedGradProcessor([w], alpha_fn=lambda n: 3.0 / n, max_norm=None)
    proc.attach(opt, object())
    g1, g2 = torch.randn(6), torch.randn(9)
    first.grad, second.grad = g1.clone(), g2.clone()
    opt.step()
    expect = g2.clone()
    expect[2:7] *= 3.0 / g2[2:7].norm()
    torch.testing.assert_close(proc.last_norms, g2[2:7].norm().reshape(1))
    torch.testing.assert_close(-second.detach(), expect)
    torch.testing.assert_close(-first.detach(), g1)


@pytest.mark.timeout(30)
def test_sharded_layout_refuses_a_fragment_outside_the_stepped_tensor():
    w = nn.Parameter(torch.randn(4))
    flat = nn.Parameter(torch.zeros(8))
    elsewhere = torch.zeros(8)
    w._hp_mapping = _FakeMapping(elsewhere, 0, 4)
    proc = ShardedGradProcessor([w], alpha_fn=lambda n: n, max_norm=None)
    with pytest.raises(RuntimeError, match="does not lie in a flat partition"):
        proc.attach(torch.optim.SGD([flat], lr=1.0), object())
    w._hp_mapping = _FakeMapping(flat.data, 0, 4)
    two_tensors = torch.optim.SGD([flat, nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(NotImplementedError, match="one flat partition per param group"):
        proc.attach(two_tensors, object())
    plain = nn.Parameter(torch.randn(4))
    with pytest.raises(RuntimeError, match="not linked to DeepSpeed's fp32 partition"):
        ShardedGradProcessor([plain], alpha_fn=None, max_norm=1.0).attach(
            torch.optim.SGD([flat], lr=1.0), object()
        )


# -------------------------------------------------------------------------------------------------
# Checkpoint folders
# -------------------------------------------------------------------------------------------------


def _fake_ds_folder(root: Path, name: str = "step_000000004.pt") -> Path:
    tmp = ds_checkpoint.tmp_name(root / name)
    tmp.mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(10.0)}}, tmp / "mp_rank_00_model_states.pt")
    (tmp / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    ds_checkpoint.write_manifest(tmp, {"zero_stage": 2, "world_size": 4})
    ds_checkpoint.publish(tmp, root / name)
    return root / name


@pytest.mark.timeout(60)
def test_checkpoint_folder_verification(tmp_path):
    from addernet_dist import checkpoint

    folder = _fake_ds_folder(tmp_path)
    assert not ds_checkpoint.tmp_name(folder).exists()
    assert checkpoint.verify(folder) is None
    shard = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    assert "is truncated (100 of 4096 bytes)" in checkpoint.verify(folder)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "is corrupt (sha256 mismatch)" in checkpoint.verify(folder)
    shard.unlink()
    assert "is missing shard" in checkpoint.verify(folder)
    (folder / ds_checkpoint.MANIFEST).unlink()
    assert "has no valid MANIFEST" in checkpoint.verify(folder)


@pytest.mark.timeout(30)
def test_resume_needs_the_same_zero_stage_and_world_size(tmp_path):
    folder = _fake_ds_folder(tmp_path)  # ZeRO-2 on 4 ranks
    assert ds_checkpoint.check_compatible(folder, zero_stage=2, world_size=4) is None
    msg = ds_checkpoint.check_compatible(folder, zero_stage=2, world_size=2)
    assert "ZeRO-2 optimizer shards of 4 ranks, this run has 2" in msg
    assert "addernet-zero-to-state-dict" in msg
    msg = ds_checkpoint.check_compatible(folder, zero_stage=1, world_size=4)
    assert "written with zero_stage=2, this run uses 1" in msg


@pytest.mark.timeout(60)
def test_resume_auto_skips_a_corrupt_newest_folder_and_prune_removes_folders(tmp_path, caplog):
    from addernet_dist.checkpoint import Checkpointer
    from addernet_dist.distributed import DistInfo

    ckpt = Checkpointer(tmp_path, keep_last=2, dist=DistInfo())
    for step in (4, 8, 12):
        _fake_ds_folder(ckpt.dir, ckpt.path_for(step).name)
    newest = ckpt.path_for(12)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    assert ckpt.newest_valid() == ckpt.path_for(8)
    assert "step_000000012.pt" in caplog.text
    ckpt.prune()
    # Retention by validity: the corrupt folder is moved aside (not deleted, not counted as kept),
    # so the two valid folders 4 and 8 stay.
    assert [p.name for p in ckpt.list()] == ["step_000000004.pt", "step_000000008.pt"]
    assert (ckpt.dir / "step_000000012.pt.corrupt").is_dir()
    ckpt.keep_last = 1
    ckpt.prune()
    assert [p.name for p in ckpt.list()] == ["step_000000008.pt"]
    ckpt.copy_to_best(ckpt.path_for(8))
    assert ckpt.best_path.is_dir() and ds_checkpoint.verify_dir(ckpt.best_path) is None
    # Re-publishing over an existing folder replaces it whole ...
    ckpt.copy_to_best(ckpt.path_for(8))
    assert ds_checkpoint.verify_dir(ckpt.best_path) is None
    # ... and over a file checkpoint of the same name (a DDP run's best.pt) as well.
    ds_checkpoint.remove(ckpt.best_path)
    ckpt.best_path.write_bytes(b"a ddp checkpoint")
    ckpt.copy_to_best(ckpt.path_for(8))
    assert ckpt.best_path.is_dir() and ds_checkpoint.verify_dir(ckpt.best_path) is None
    assert not list(ckpt.dir.glob(".*"))  # no temp or trash left behind


@pytest.mark.timeout(60)
def test_zero_to_state_dict_refuses_bad_input(tmp_path, capsys):
    from addernet_dist.zero_to_state_dict import main

    assert main([str(tmp_path / "nope.pt"), str(tmp_path / "out.pt")]) == 2
    assert "is not a DeepSpeed checkpoint folder" in capsys.readouterr().err
    folder = _fake_ds_folder(tmp_path)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert main([str(folder), str(tmp_path / "out.pt")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
