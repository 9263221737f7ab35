"""Device decisions (addernet_dist/device_policy.py) for hand-written CUDA device descriptions: what a GPU
node decides, checked on a CPU machine."""

from __future__ import annotations

import pytest
import torch

from addernet_dist import device_policy as dp
from addernet_dist.config import ConfigError
from addernet_dist.engine.base import check_adder_backend, resolve_autocast_dtype

H100 = dp.DeviceInfo("cuda", (9, 0), "NVIDIA H100 80GB HBM3")
A100 = dp.DeviceInfo("cuda", (8, 0), "NVIDIA A100-SXM4-80GB")
V100 = dp.DeviceInfo("cuda", (7, 0), "Tesla V100-SXM2-32GB")
CPU = dp.DeviceInfo("cpu")
CPU_INTERP = dp.DeviceInfo("cpu", triton_interpreter=True)


@pytest.mark.timeout(30)
def test_backend_by_device():
    assert dp.adder_backend("auto", H100) == "triton"
    assert dp.adder_backend("auto", CPU) == "cpu"
    assert dp.adder_backend("auto", CPU_INTERP) == "cpu"  # the interpreter is opt-in, never auto
    assert dp.adder_backend("triton", CPU_INTERP) == "triton"
    assert dp.adder_backend("reference", H100) == "reference"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dp.adder_backend("triton", CPU)
    with pytest.raises(ValueError, match="adder.backend=cpu needs train.device=cpu"):
        dp.adder_backend("cpu", H100)
    with pytest.raises(ValueError, match="not a backend"):
        dp.adder_backend("cuda", H100)


@pytest.mark.timeout(30)
def test_fusion_follows_the_backend():
    assert dp.fuse_adder_bn("auto", dp.adder_backend("auto", H100)) is True
    assert dp.fuse_adder_bn("auto", dp.adder_backend("auto", CPU)) is False
    assert dp.fuse_adder_bn("auto", dp.adder_backend("triton", CPU_INTERP)) is True
    assert dp.fuse_adder_bn(False, "triton") is False
    assert dp.fuse_adder_bn(True, "cpu") is True  # allowed: the fused module runs the unfused pair


@pytest.mark.timeout(30)
def test_autocast_dtype():
    assert dp.autocast_dtype(True, H100) == torch.bfloat16
    assert dp.autocast_dtype(True, A100) == torch.bfloat16
    assert dp.autocast_dtype(True, CPU) == torch.bfloat16  # train.bf16 means autocast on CPU too
    assert dp.autocast_dtype(False, H100) is None
    assert dp.autocast_dtype(False, V100) is None
    with pytest.raises(ValueError, match=r"V100.*7\.0: set train.precision=fp16 \(with loss scaling\) or fp32"):
        dp.autocast_dtype(True, V100)
    # train.precision: fp16 autocast from Volta on (V100 is what it is for), on CPU too
    assert dp.autocast_dtype("fp16", V100) == dp.autocast_dtype("fp16", CPU) == torch.float16
    assert dp.autocast_dtype("bf16", H100) == torch.bfloat16 and dp.autocast_dtype("fp32", H100) is None
    with pytest.raises(ValueError, match=r"fp16 needs .* >= 7\.0; .* 6\.0: set train.precision=fp32"):
        dp.autocast_dtype("fp16", dp.DeviceInfo("cuda", (6, 0), "P100"))
    assert dp.grad_scaling("fp16") and not dp.grad_scaling("bf16") and not dp.grad_scaling("fp32")
    # the trainer's wrapper turns it into a config error on this machine's CPU device
    assert resolve_autocast_dtype(True, torch.device("cpu")) == torch.bfloat16
    assert resolve_autocast_dtype(False, torch.device("cpu")) is None


@pytest.mark.timeout(30)
def test_dali_placement_and_dist_backend():
    assert dp.dali_device("auto", H100) == "gpu"
    assert dp.dali_device("auto", CPU) == "cpu"
    assert dp.dali_device("cpu", H100) == "cpu"
    assert dp.dali_device("gpu", H100) == "gpu"
    with pytest.raises(ValueError, match="needs a CUDA training device"):
        dp.dali_device("gpu", CPU)
    assert dp.dist_backend(H100) == "nccl"
    assert dp.dist_backend(CPU) == "gloo"
    assert dp.dist_backend(CPU_INTERP) == "gloo"


@pytest.mark.timeout(30)
def test_deterministic_grad_weight():
    assert dp.deterministic_grad_weight(True, False) is True
    assert dp.deterministic_grad_weight(False, True) is False
    assert dp.deterministic_grad_weight(None, True) is True
    assert dp.deterministic_grad_weight(None, False) is False


@pytest.mark.timeout(30)
def test_probe_describes_this_process(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dp.DeviceInfo.probe(torch.device("cpu")) == dp.DeviceInfo("cpu", None, "cpu", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dp.DeviceInfo.probe(torch.device("cpu")).triton_interpreter is True
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        dp.DeviceInfo("mps")


@pytest.mark.timeout(30)
def test_trainer_refuses_triton_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        check_adder_backend("triton", torch.device("cpu"))
    assert check_adder_backend("auto", torch.device("cpu")) == "cpu"
