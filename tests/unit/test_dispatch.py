"""Backend selection: argument > set_default_backend > ADDERNET_BACKEND > auto by device; one-warning fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from addernet_dist.kernels import cpu_adder, cpu_build
from addernet_dist.ops import adder2d, dispatch
from addernet_dist.ops.reference import adder2d_reference

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


@pytest.fixture(autouse=True)
def _clean_dispatch_state(monkeypatch):
    """Every test starts with no preference, no env override and no fallback warned yet."""
    monkeypatch.setattr(dispatch, "_default", None)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _backend_of(y: torch.Tensor) -> str:
    # the fast path's output comes straight from its autograd Function; the reference ends in views
    return "cpu" if type(y.grad_fn).__name__ == "AdderCPUFunctionBackward" else "other"


@pytest.mark.timeout(120)
def test_auto_picks_by_device():
    assert dispatch.auto_backend(CPU) == "cpu"
    assert dispatch.auto_backend(CUDA) == "triton"
    assert dispatch.auto_backend(META) == "reference"
    assert dispatch.resolve_backend(CPU, None) == "cpu"
    assert dispatch.resolve_backend(META, None) == "reference"
    assert dispatch.available_backends(CPU) == ["cpu", "reference"]


@pytest.mark.timeout(120)
def test_precedence_argument_then_default_then_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve_backend(CPU, None) == "reference"  # env beats auto
    dispatch.set_default_backend("cpu")
    assert dispatch.get_default_backend() == "cpu"
    assert dispatch.resolve_backend(CPU, None) == "cpu"  # config hook beats env
    assert dispatch.resolve_backend(CPU, "reference") == "reference"  # argument beats all
    dispatch.set_default_backend("auto")  # "auto" clears the hook: env applies again
    assert dispatch.get_default_backend() is None
    assert dispatch.resolve_backend(CPU, " AUTO ") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "")
    assert dispatch.resolve_backend(CPU, None) == "cpu"


@pytest.mark.timeout(120)
def test_adder2d_routes_to_the_resolved_backend(monkeypatch):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    y_fast = adder2d(x, w, padding=1)
    assert _backend_of(y_fast) == "cpu"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    y_ref = adder2d(x, w, padding=1)
    assert _backend_of(y_ref) == "other"
    assert _backend_of(adder2d(x, w, padding=1, backend="cpu")) == "cpu"
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y_ref, adder2d_reference(x, w, padding=1), rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_adder_linear_module_passes_its_backend(monkeypatch):
    # AdderLinear stored backend= but never handed it to adder_linear (issue 23): backend="reference"
    # ran the CPU fast path anyway. Record what each forward asks the dispatcher for.
    from addernet_dist.nn import AdderLinear

    asked = []
    resolve = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend", lambda dev, req=None: asked.append(req) or resolve(dev, req))
    x = torch.randn(5, 7)
    fast, ref = AdderLinear(7, 3, backend="cpu"), AdderLinear(7, 3, backend="reference")
    ref.load_state_dict(fast.state_dict())
    y_fast = fast(x)
    assert asked and set(asked) == {"cpu"}
    asked.clear()
    y_ref = ref(x)
    assert asked == ["reference"]
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["argument", "env", "set_default_backend"])
def test_unknown_backend_names_the_choices(monkeypatch, where):
    with pytest.raises(
        ValueError, match=r"not an adder backend; choose one of reference, cpu, triton"
    ):
        if where == "argument":
            dispatch.resolve_backend(CPU, "cuda")
        elif where == "env":
            monkeypatch.setenv(dispatch.ENV_VAR, "fast")
            dispatch.resolve_backend(CPU, None)
        else:
            dispatch.set_default_backend("tritonn")
    with pytest.raises(ValueError, match="unknown adder backend"):
        dispatch.get_impl("nope")
    with pytest.raises(TypeError, match="backend name"):
        dispatch.resolve_backend(CPU, 3)


@pytest.mark.timeout(120)
def test_unavailable_backend_falls_back_with_one_warning():
    with pytest.warns(
        RuntimeWarning, match="'triton' is unavailable: it runs on CUDA tensors only"
    ):
        assert dispatch.resolve_backend(CPU, "triton") == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never a warning per call
        for _ in range(3):
            assert dispatch.resolve_backend(CPU, "triton") == "cpu"
    # a different (backend, device) pair is reported once too
    triton_ok = dispatch.unavailable_reason("triton", CUDA) is None
    with pytest.warns(RuntimeWarning, match="'cpu' is unavailable: it runs on CPU tensors only"):
        assert dispatch.resolve_backend(CUDA, "cpu") == ("triton" if triton_ok else "reference")
    with pytest.warns(RuntimeWarning, match="'cpu' is unavailable"):
        assert dispatch.resolve_backend(META, "cpu") == "reference"


@pytest.mark.timeout(120)
def test_broken_cpu_build_routes_auto_to_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_build, "_lib", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setenv("ADDERNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="'cpu' is unavailable: its build failed"):
        assert dispatch.resolve_backend(CPU, None) == "reference"
    assert dispatch.available_backends(CPU) == ["reference"]
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(adder2d(x, w), adder2d_reference(x, w), rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_get_impl_returns_each_backend():
    assert dispatch.get_impl("reference") is adder2d_reference
    assert dispatch.get_impl("cpu") is cpu_adder.adder2d_cpu
    if dispatch.unavailable_reason("triton", CUDA) is None:
        from addernet_dist.kernels.triton_adder import adder2d_triton

        assert dispatch.get_impl("triton") is adder2d_triton
    else:
        with pytest.raises(RuntimeError, match="'triton' is not importable"):
            dispatch.get_impl("triton")


@pytest.mark.timeout(120)
def test_adder_resnet8_trains_identically_on_fast_path_and_reference():
    from addernet_dist.models import create_model

    x = torch.randn(2, 3, 16, 16)  # global pooling: any size works, 16x16 keeps the reference cheap
    y = torch.tensor([1, 7])
    results = []
    for backend in ("cpu", "reference"):
        dispatch.set_default_backend(backend)
        torch.manual_seed(0)
        model = create_model("resnet8", conv="adder", p=1.5).double()
        loss = torch.nn.functional.cross_entropy(model(x.double()), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    (l_fast, g_fast), (l_ref, g_ref) = results
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-9, atol=1e-9)
    assert len(g_fast) == len(g_ref) > 0
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
