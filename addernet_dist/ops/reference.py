"""The pure-PyTorch adder operator: the specification every kernel is tested against.

Shape legend: N batch, C input channels, O output channels (Cout), kh×kw kernel, K = C·kh·kw patch length,
L = H'·W' output positions per image, M = N·L patches in the batch.

What is computed (paper eqs. 2, 26, 23, 27; ``d = x − w`` for one patch element and one filter element):

    forward           y[m, o]  = −Σ_k |x[m, k] − w[o, k]|^p
    grad_w="full"     ∂y/∂w    =  x − w                  (eq. 23, full-precision gradient, every p)
    grad_w="sign"     ∂y/∂w    =  sgn(x − w)             (eq. 22, the true ℓ1 gradient; the Table 4 ablation)
    grad_x="hardtanh" ∂y/∂x    =  HardTanh(w − x)        (the original AdderNet code)
    grad_x="lp"       ∂y/∂x    =  sgn(w − x)·|w − x|^(p−1)  (eq. 27)

Notes on ``grad_x="lp"``:
  * Eq. 27 prints ``[F − X]^(p−1)``, which is undefined for a negative base and non-integer p; we read it as
    the odd extension ``sgn(F−X)·|F−X|^(p−1)``, the exact derivative of ``−|X−F|^p`` divided by p. The
    factor p is dropped exactly as the paper prints it (it is ≤ 2, constant across a layer, and the BN that
    follows every adder layer makes the scale of upstream gradients irrelevant to the next layer's input).
  * At p = 1 it is ``sgn(F − X)`` (with sgn(0) = 0): the exact subgradient of the ℓ1 forward, and the limit of
    eq. 27 as p → 1⁺. We keep it rather than switching to HardTanh at p = 1 because (a) the ℓp→ℓ1 schedule
    then changes the backward continuously — swapping in HardTanh at p = 1 would be a jump the moment the
    schedule reaches 1 (|F−X| = 0.5 gives 0.5 under HardTanh vs ≈ 1 under eq. 27 at p = 1.0001); (b) the
    instability that motivated HardTanh in AdderNet v1 came from the *unbounded* full-precision gradient
    X − F, while sgn is bounded by 1 already. Users who want the v1 behaviour choose ``grad_x="hardtanh"``.

Memory: the forward is ``torch.cdist`` on the unfolded patches and the eq. 27 input gradient is ATen's
``_cdist_backward`` on the saved distances: neither materialises the (O × K × M) differences. Only the
``hardtanh`` input gradient and the ``sign`` filter gradient have no such form; they run over chunks of
patches whose largest temporary is an ``(O, chunk, K)`` block of at most ``max_chunk_bytes`` (default
2 MiB, ``ADDERNET_REF_CHUNK_MB``). With the unfolded input (``M·K`` elements, saved for backward anyway),
its gradient, the output and the saved distances, the extra memory is about ``2·M·K + 2·M·O`` elements
+ 2 MiB — for the ResNet-50 stage-1 3×3 layer at batch 8 that is ~0.2 GB (measured peak: 429 MiB with
allocator slack, tests/integration/test_memory_bound.py), where the original code's broadcast alone needs 3.7 GB.
The filter gradient needs no broadcast at all for ``grad_w="full"``:
``Σ_m g[m,o]·(x[m,k] − w[o,k]) = (gᵀx)[o,k] − w[o,k]·Σ_m g[m,o]`` — one GEMM.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from addernet_dist.ops.amp import autocast_off

GRAD_X_MODES = ("lp", "hardtanh")
GRAD_W_MODES = ("full", "sign")

# 2 MiB blocks stay in L2 (2 MiB per core here; 1-2 MiB on most server cores): the chunked gradient passes
# (subtract, clamp/sign, multiply, reduce) then run from cache. 64 MiB blocks measured ~2-4x slower on 2 cores.
_DEFAULT_CHUNK_BYTES = int(float(os.environ.get("ADDERNET_REF_CHUNK_MB", "2")) * 2**20)


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(e) for e in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v  # type: ignore[return-value]


def check_args(p: float, grad_x: str, grad_w: str) -> None:
    """Validate the operator's mode arguments (shared by every backend)."""
    if grad_x not in GRAD_X_MODES:
        raise ValueError(f"grad_x must be one of {GRAD_X_MODES}, got {grad_x!r}")
    if grad_w not in GRAD_W_MODES:
        raise ValueError(f"grad_w must be one of {GRAD_W_MODES}, got {grad_w!r}")
    if not (1.0 <= float(p) <= 2.0):
        raise ValueError(f"p must lie in [1, 2] (the paper's ℓp-AdderNet range), got {p}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32/fp64 compute in their own precision; 16-bit storage accumulates in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _chunk_rows(m: int, o: int, k: int, elem_bytes: int, max_chunk_bytes: int) -> int:
    return max(1, min(m, max_chunk_bytes // max(1, o * k * elem_bytes)))


def _distance(x_mk: torch.Tensor, w_ok: torch.Tensor, p: float) -> torch.Tensor:
    """D[m, o] = (Σ_k |x[m,k] − w[o,k]|^p)^(1/p), without materialising the (M, O, K) differences.

    The direct (non-GEMM) evaluation is forced for p = 2: ‖x‖² + ‖w‖² − 2x·w cancels catastrophically when
    x ≈ w.
    """
    return torch.cdist(x_mk, w_ok, p=p, compute_mode="donot_use_mm_for_euclid_dist")


def _output_from_distance(dist_mo: torch.Tensor, p: float) -> torch.Tensor:
    """y[m, o] = −Σ_k |x[m,k] − w[o,k]|^p = −D^p."""
    return dist_mo.neg() if p == 1.0 else dist_mo.pow(p).neg_()


def adder_grad_x_lp_rows(
    x_mk: torch.Tensor, w_ok: torch.Tensor, g_mo: torch.Tensor, p: float, dist_mo: torch.Tensor
) -> torch.Tensor:
    """gx[m, k] = Σ_o g[m,o]·sgn(w − x)|w − x|^(p−1) (eq. 27) from the saved distances D.

    Eq. 27 is exactly the gradient of −D^p / p, and ATen's ``_cdist_backward(G, x, w, p, D)`` returns
    Σ_o G[m,o]·sgn(x − w)|x − w|^(p−1) / D^(p−1) (0 where D = 0) without a broadcast, so
    G = −g·D^(p−1) gives eq. 27 at cdist's speed. tests/unit/test_ops_reference.py checks it, D = 0 included,
    against an explicit formula.
    """
    gd = g_mo.neg() if p == 1.0 else g_mo * dist_mo.pow(p - 1.0).neg_()
    return torch.ops.aten._cdist_backward(gd, x_mk, w_ok, p, dist_mo)


def adder_grad_x_hardtanh_rows(
    x_mk: torch.Tensor,
    w_ok: torch.Tensor,
    g_mo: torch.Tensor,
    max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """gx[m, k] = Σ_o g[m,o]·HardTanh(w[o,k] − x[m,k]), chunked over M (no cdist form exists)."""
    m, k = x_mk.shape
    o = w_ok.shape[0]
    gx = torch.empty_like(x_mk)
    step = _chunk_rows(m, o, k, x_mk.element_size(), max_chunk_bytes)
    for s in range(0, m, step):
        f = (w_ok[:, None, :] - x_mk[None, s : s + step, :]).clamp_(-1.0, 1.0)  # (O, c, K)
        f.mul_(g_mo[s : s + step].t()[:, :, None])
        gx[s : s + step] = f.sum(0)
        del f
    return gx


def adder_grad_w_rows(
    x_mk: torch.Tensor,
    w_ok: torch.Tensor,
    g_mo: torch.Tensor,
    mode: str,
    max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """gw[o, k] = Σ_m g[m,o]·(x − w) ("full", one GEMM) or Σ_m g[m,o]·sgn(x − w) ("sign", chunked)."""
    if mode == "full":
        return g_mo.t() @ x_mk - w_ok * g_mo.sum(0)[:, None]
    m, k = x_mk.shape
    o = w_ok.shape[0]
    gw = torch.zeros_like(w_ok)
    step = _chunk_rows(m, o, k, x_mk.element_size(), max_chunk_bytes)
    for s in range(0, m, step):
        d = (x_mk[None, s : s + step, :] - w_ok[:, None, :]).sign_()  # (O, c, K)
        gw += torch.einsum("ock,co->ok", d, g_mo[s : s + step])
        del d
    return gw


class AdderRowsFunction(torch.autograd.Function):
    """Autograd wrapper of the row form: x (M, K), w (O, K) → y (M, O)."""

    @staticmethod
    def forward(ctx, x_mk, w_ok, p, grad_x, grad_w, max_chunk_bytes):
        in_dtype = x_mk.dtype
        cdt = compute_dtype(in_dtype)
        xc, wc = x_mk.to(cdt).contiguous(), w_ok.to(cdt).contiguous()
        dist = _distance(xc, wc, p)
        y = _output_from_distance(dist, p)
        ctx.save_for_backward(xc, wc, dist if grad_x == "lp" else None)
        ctx.conf = (p, grad_x, grad_w, max_chunk_bytes, in_dtype, w_ok.dtype)
        return y.to(in_dtype)

    @staticmethod
    def backward(ctx, g_mo):
        xc, wc, dist = ctx.saved_tensors
        g = g_mo.to(xc.dtype).contiguous()
        # a backward called inside an autocast region stays fp32 (ops/amp.py)
        with autocast_off(g.device.type):
            return AdderRowsFunction._backward(ctx, xc, wc, dist, g)

    @staticmethod
    def _backward(ctx, xc, wc, dist, g):
        p, grad_x, grad_w, max_chunk_bytes, x_dtype, w_dtype = ctx.conf
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if grad_x == "lp":
                gx = adder_grad_x_lp_rows(xc, wc, g, p, dist)
            else:
                gx = adder_grad_x_hardtanh_rows(xc, wc, g, max_chunk_bytes)
            gx = gx.to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = adder_grad_w_rows(xc, wc, g, grad_w, max_chunk_bytes).to(w_dtype)
        return gx, gw, None, None, None, None


def adder_linear_args(p: float = 1.0, grad_x: str = "lp", grad_w: str = "full") -> tuple[float, str, str]:
    """The adder_linear calling convention after ``x, weight`` (``ops.adder_linear`` and
    ``adder_linear_reference`` take ``*args, **kwargs`` through it), validated; ``p`` as given."""
    check_args(p, grad_x, grad_w)
    return p, grad_x, grad_w


def adder_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, *args: Any, max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES, **kwargs: Any
) -> torch.Tensor:
    """Adder fully-connected layer: x (M, K), weight (O, K) → (M, O) = −Σ_k |x − w|^p; arguments
    ``adder_linear_args`` (p, grad_x, grad_w)."""
    p, grad_x, grad_w = adder_linear_args(*args, **kwargs)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"adder_linear expects x (M, K) and weight (O, K) with equal K, got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    return AdderRowsFunction.apply(x, weight, float(p), grad_x, grad_w, max_chunk_bytes)


def output_size(
    h: int, w: int, kernel: tuple[int, int], stride, padding, dilation
) -> tuple[int, int]:
    """conv2d output arithmetic: floor((H + 2p − d(k−1) − 1)/s) + 1."""
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def check_conv_args(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation):
    """Validate shapes and normalise stride/padding/dilation to pairs; returns them and (H', W')."""
    if input.dim() != 4:
        raise ValueError(f"adder2d expects NCHW input (4-D), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"adder2d expects weight (Cout, Cin, kh, kw), got shape {tuple(weight.shape)}"
        )
    if input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} channels but weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}"
        )
    ho, wo = output_size(
        input.shape[2], input.shape[3], weight.shape[2:], stride, padding, dilation
    )
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input {tuple(input.shape[2:])} is too small for kernel {tuple(weight.shape[2:])} with "
            f"padding {padding} and dilation {dilation} (output would be {ho}×{wo})"
        )
    return stride, padding, dilation, (ho, wo)


class Adder2dArgs(NamedTuple):
    """The arguments of one adder2d call after ``adder2d_args``: pairs normalised, modes checked."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    p: float
    grad_x: str
    grad_w: str
    out_hw: tuple[int, int]


def adder2d_args(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    p: float = 1.0,
    grad_x: str = "lp",
    grad_w: str = "full",
) -> Adder2dArgs:
    """The adder2d calling convention, its one home: ``ops.adder2d``, ``adder2d_reference`` and the backends
    (``kernels.cpu_adder.adder2d_cpu``, ``kernels.triton_adder.adder2d_triton``) take ``(input, weight,
    *args, **kwargs)`` with these arguments (positional or by name, these defaults) and validate them here
    (``check_args``, ``check_conv_args``). ``p`` is returned as given (the callers take ``float(p)``)."""
    check_args(p, grad_x, grad_w)
    stride, padding, dilation, out_hw = check_conv_args(input, weight, stride, padding, dilation)
    return Adder2dArgs(stride, padding, dilation, p, grad_x, grad_w, out_hw)


def adder2d_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    *args: Any,
    max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
    **kwargs: Any,
) -> torch.Tensor:
    """Adder 2-D "convolution": (N, C, H, W) × (O, C, kh, kw) → (N, O, H', W'), autograd-aware.

    Arguments: ``adder2d_args`` (stride, padding, dilation, p, grad_x, grad_w). Zero padding is real padding:
    a padded tap contributes |0 − w|^p (as the original unfold code does). Gradients: see the module
    docstring. dtypes: fp32/fp64 compute in place; fp16/bf16 accumulate in fp32 and return the input dtype.
    """
    stride, padding, dilation, p, grad_x, grad_w, (ho, wo) = adder2d_args(input, weight, *args, **kwargs)
    n = input.shape[0]
    o = weight.shape[0]
    # (N, K, L) → (N·L, K); F.unfold's autograd (fold) scatters the patch gradients back to the image.
    cols = F.unfold(input, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    x_mk = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    y_mo = AdderRowsFunction.apply(
        x_mk, weight.reshape(o, -1), float(p), grad_x, grad_w, max_chunk_bytes
    )
    return y_mo.reshape(n, ho * wo, o).transpose(1, 2).reshape(n, o, ho, wo)
