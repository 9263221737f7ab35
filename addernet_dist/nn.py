"""Adder layers: drop-in replacements for ``nn.Conv2d`` / ``nn.Linear``.

Weight initialisation: i.i.d. N(0, 1), as the original AdderNet code does, not the Kaiming fan-in scaling of
conv layers. The reason is the output variance of an adder layer (paper eq. 29):
Var[Y] ≈ √(π/2)·K·(Var[X] + Var[F]) — the filter enters additively, not multiplicatively. Adder layers sit
behind BatchNorm, so Var[X] ≈ 1; a template must live on the same scale as the inputs to measure anything
(§4.3: "the magnitude of filters and inputs are better to be similar"). With Kaiming's Var[F] = 1/K
(≈ 0.002 for a 3×3×64 layer) every filter would sit at ≈ 0 and all output channels would compute nearly the
same −Σ|X|, i.e. no symmetry breaking. N(0, 1) puts templates on the input scale; the BN after the layer
absorbs the resulting O(K) output scale.

``p`` is a plain Python float (read on every forward; a tensor buffer would cost a host sync per layer per
step on GPU). It is saved in ``state_dict`` through ``get_extra_state``/``set_extra_state`` together with the
gradient modes, so a checkpoint restores the ℓp schedule position of every layer.

Under ``torch.compile`` the adder layers' ``forward`` is not traced (``_NOT_TRACED``): Dynamo would bake
``p`` into the graph as a constant and guard on it, so the ℓp schedule, which moves p every step,
recompiled the whole model each step until Dynamo's recompile limit (8) sent it back to eager for good.
The adder operator itself is opaque to Dynamo anyway (Triton launches, the C++ CPU path), so the
layer call is a graph break either way; BN, ReLU and the residual adds between layers still compile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from addernet_dist.ops import adder2d, adder_linear
from addernet_dist.ops.reference import GRAD_W_MODES, GRAD_X_MODES, _pair, check_args

_NOT_TRACED = torch.compiler.disable(
    recursive=True,
    reason="adder layer: p changes every step of the lp schedule; the op is opaque (Triton / C++)",
)


class _AdderMixin:
    p: float
    grad_x: str
    grad_w: str

    def _init_modes(self, p: float, grad_x: str, grad_w: str) -> None:
        check_args(p, grad_x, grad_w)
        self.p = float(p)
        self.grad_x = grad_x
        self.grad_w = grad_w

    def get_extra_state(self) -> dict[str, Any]:
        return {"p": self.p, "grad_x": self.grad_x, "grad_w": self.grad_w}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._init_modes(state["p"], state["grad_x"], state["grad_w"])

    def _init_adder(
        self,
        weight_shape: tuple[int, ...],
        bias: bool = False,
        p: float = 1.0,
        grad_x: str = "lp",
        grad_w: str = "full",
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        """What both adder layers do with their constructor arguments after the shape ones (one body: a
        second copy once dropped ``backend``); ``weight_shape[0]``: the outputs. The layers keep explicit
        signatures (``help()``, IDE completion and type checkers see them, as for ``nn.Conv2d``)."""
        self.backend = backend
        self._init_modes(p, grad_x, grad_w)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(weight_shape[0], **factory)) if bias else None
        self._reset_adder_parameters()

    def _reset_adder_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Adder2d(_AdderMixin, nn.Module):
    """Adder convolution with ``nn.Conv2d``'s constructor shape. Input (N, Cin, H, W) → (N, Cout, H', W').

    ``weight``: (Cout, Cin, kh, kw). ``p`` ∈ [1, 2] is settable at any time (the ℓp schedule does it).
    ``backend``: None (by device) or an operator backend name, see ``addernet_dist.ops.adder2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        p: float = 1.0,
        grad_x: str = "lp",
        grad_w: str = "full",
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be >= 1, got in={in_channels}, out={out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self._init_adder(
            (out_channels, in_channels, *self.kernel_size), bias, p, grad_x, grad_w, backend, device, dtype
        )

    def reset_parameters(self) -> None:
        self._reset_adder_parameters()

    @_NOT_TRACED
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = adder2d(
            x,
            self.weight,
            self.stride,
            self.padding,
            self.dilation,
            p=self.p,
            grad_x=self.grad_x,
            grad_w=self.grad_w,
            backend=self.backend,
        )
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", p={self.p:g}, grad_x={self.grad_x}, grad_w={self.grad_w}"


class AdderLinear(_AdderMixin, nn.Module):
    """Adder fully-connected layer (paper §5.2): (*, in_features) → (*, out_features) = −Σ|x − w|^p."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        p: float = 1.0,
        grad_x: str = "lp",
        grad_w: str = "full",
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_adder((out_features, in_features), bias, p, grad_x, grad_w, backend, device, dtype)

    def reset_parameters(self) -> None:
        self._reset_adder_parameters()

    @_NOT_TRACED
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = adder_linear(
            x.reshape(-1, self.in_features), self.weight, self.p, self.grad_x, self.grad_w,
            backend=self.backend,
        )
        y = y.reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, p={self.p:g}, grad_x={self.grad_x}, grad_w={self.grad_w}"
        )


def adder_modules(model: nn.Module) -> list[nn.Module]:
    """Every adder layer of ``model`` (Adder2d, AdderLinear and fused adder modules), in module order."""
    return [m for m in model.modules() if isinstance(m, _AdderMixin)]


def adder_layer_names(model: nn.Module) -> list[str]:
    """Names of ``adder_modules(model)`` as in the unfused model: a wrapper that declares
    ``layer_alias = "<child>"`` (FusedAdderBN2d: "adder") lends its own name to that child, so logged
    per-layer metrics keep their keys whether or not the run fused its layers."""
    alias = {
        f"{n}.{m.layer_alias}": n
        for n, m in model.named_modules()
        if getattr(m, "layer_alias", None)
    }
    return [alias.get(n, n) for n, m in model.named_modules() if isinstance(m, _AdderMixin)]


def set_p(model: nn.Module, p: float) -> None:
    """Set the ℓp exponent of every adder layer (the ℓp → ℓ1 schedule calls this each iteration)."""
    if not (1.0 <= float(p) <= 2.0):
        raise ValueError(f"p must lie in [1, 2], got {p}")
    for m in adder_modules(model):
        m.p = float(p)


def set_grad_modes(model: nn.Module, grad_x: str | None = None, grad_w: str | None = None) -> None:
    """Set the input-/filter-gradient modes of every adder layer (``None`` leaves a mode unchanged)."""
    if grad_x is not None and grad_x not in GRAD_X_MODES:
        raise ValueError(f"grad_x must be one of {GRAD_X_MODES}, got {grad_x!r}")
    if grad_w is not None and grad_w not in GRAD_W_MODES:
        raise ValueError(f"grad_w must be one of {GRAD_W_MODES}, got {grad_w!r}")
    for m in adder_modules(model):
        if grad_x is not None:
            m.grad_x = grad_x
        if grad_w is not None:
            m.grad_w = grad_w
