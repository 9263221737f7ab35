"""Adaptive learning-rate scaling for adder filters (paper eq. 32-33), made world-size invariant.

    grad F_l  <-  alpha_l * grad F_l,    alpha_l = eta * sqrt(k_l) / ||grad F_l||_2

with k_l the number of elements of F_l. The norm must be that of the GLOBAL gradient (the
gradient of the whole global batch). The paper's code applies the scaling inside the adder
layer's backward, i.e. on each rank's LOCAL gradient before DDP averages them; the averaged
result then is mean_r(g_r / ||g_r||), which depends on how the batch is split over GPUs (with
N ranks the update's norm shrinks as the rank gradients disagree). ``scope="global"`` (default)
scales the all-reduced ``.grad`` between backward and ``optimizer.step``, so N ranks x batch B
update exactly like 1 rank x batch N*B; ``scope="local"`` reproduces the original behaviour with a
gradient hook that runs before DDP's all-reduce, only to demonstrate the difference.

No host syncs: norms and factors stay device tensors; the trainer reads them on log steps only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

# Floor of ||grad F_l|| so an all-zero gradient (e.g. a layer cut off by a dead ReLU branch)
# gives alpha * 0 = 0 instead of 0 * inf = NaN.
_NORM_FLOOR = 1e-12


def _norm_dtype(grad: torch.Tensor) -> torch.dtype:
    # fp32 at least (a bf16 sum of squares over 2M elements loses ~3 digits); fp64 stays fp64.
    return torch.promote_types(grad.dtype, torch.float32)


def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """(L,) ``||g||_2`` of each tensor, in fp32 at least: the one reduction eq. 33's norms use, in both
    engines (here and engine/zero_norms.py). Two reductions of the same gradient (``_foreach_norm`` vs
    ``square().sum().sqrt()``) differ in the last bit for 2 of 4 random ResNet-8-shaped tensors; under bf16
    autocast that one ulp in alpha_l grew to 5e-4 in the loss by step 5 (issue 21.8)."""
    dtype = _norm_dtype(grads[0])
    return torch.stack([n.to(dtype) for n in torch._foreach_norm(grads)])


def adaptive_alpha(
    eta: float, sqrt_k: float | torch.Tensor, norms: torch.Tensor
) -> torch.Tensor:
    """Eq. 33's factor ``alpha_l = eta * sqrt(k_l) / ||grad F_l||_2``: the one place it is computed
    (both engines, both scopes, the analysis tools).

    sqrt_k: sqrt of each layer's weight count, a float (one layer) or a tensor shaped like
    ``norms``; norms: the gradient norms (device tensor, floored at 1e-12 so an all-zero gradient
    gives 0, not NaN). Returns a tensor of ``norms``' shape; no host sync.
    """
    return eta * sqrt_k / norms.clamp_min(_NORM_FLOOR)


class AdaptiveLRScaler:
    """Applies eq. 33 to the weights of the given adder modules.

    modules: the adder layers in order (``addernet_dist.nn.adder_modules(model)``), of the
    UNWRAPPED model, so the parameters are the very tensors DDP reduces.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        eta: float,
        scope: Literal["global", "local"] = "global",
    ) -> None:
        if scope not in ("global", "local"):
            raise ValueError(f"adaptive LR scope must be 'global' or 'local', got {scope!r}")
        self.weights = [m.weight for m in modules]
        self.eta = float(eta)
        self.scope = scope
        self.sqrt_k = [math.sqrt(w.numel()) for w in self.weights]
        self._sqrt_k_t: torch.Tensor | None = None
        self._handles = []
        # Per-rank norms seen by the local hooks in the last backward (logging only).
        self._local_norms: list[torch.Tensor | None] = [None] * len(self.weights)
        if scope == "local":
            for i, w in enumerate(self.weights):
                self._handles.append(w.register_hook(self._make_local_hook(i)))

    def _make_local_hook(self, i: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # A tensor hook on a leaf runs before AccumulateGrad, hence before DDP's reducer
            # sees the gradient: this is the original, world-size dependent, normalisation.
            norm = torch.linalg.vector_norm(grad, dtype=_norm_dtype(grad))
            self._local_norms[i] = norm.detach()
            alpha = adaptive_alpha(self.eta, self.sqrt_k[i], norm)
            return grad * alpha.to(grad.dtype)

        return hook

    def _sqrt_k_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Built once: a fresh torch.tensor(list) every step is a host-to-device copy on GPU.
        t = self._sqrt_k_t
        if t is None or t.device != device or t.dtype != dtype:
            t = self._sqrt_k_t = torch.tensor(self.sqrt_k, device=device, dtype=dtype)
        return t

    def alphas(self, norms: torch.Tensor) -> torch.Tensor:
        """(L,) eq. 33 factors of these layers for (L,) gradient norms (``adaptive_alpha``)."""
        return adaptive_alpha(self.eta, self._sqrt_k_on(norms.device, norms.dtype), norms)

    @torch.no_grad()
    def scale_(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scale ``.grad`` in place (scope="global"). Returns (norms, alphas) as (L,) fp32 device
        tensors, or the per-rank local norms for scope="local" (then scaling already happened)."""
        if not self.weights:
            return None, None
        if self.scope == "local":
            norms = [n for n in self._local_norms if n is not None]
            if len(norms) != len(self.weights):
                return None, None
            stacked = torch.stack(norms)
            return stacked, self.alphas(stacked)
        grads = [w.grad for w in self.weights]
        if any(g is None for g in grads):
            missing = [i for i, g in enumerate(grads) if g is None]
            raise RuntimeError(
                f"adder layers {missing} have no gradient at step time; call backward first "
                "(or the layers are unused in forward, which eq. 33 cannot scale)"
            )
        norms = grad_norms(grads)
        alphas = self.alphas(norms)
        # One fused multiply over all layers; unbind gives 0-d tensor scalars (no host sync).
        torch._foreach_mul_(grads, [a.to(g.dtype) for a, g in zip(alphas.unbind(), grads)])
        return norms, alphas

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
