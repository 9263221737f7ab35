"""Triton adder convolution: forward (with fused BN epilogues), ∂L/∂X and ∂L/∂F, no im2col anywhere.

Shape legend: N batch, C input channels, O output channels, H×W input, P×Q output (H', W'), R×S kernel,
M = N·P·Q output positions. x_nchw / y_nopq / g_nopq take arbitrary strides (NCHW and channels_last
run the same kernel); the filters are re-laid out on the host (tiny) as w_rsco (R, S, C, O) for the
forward — a row of O filters per tap is one contiguous load — and w_rsoc (R, S, O, C) for ∂L/∂X.

Semantics are those of ``addernet_dist.ops.reference.adder2d_reference`` (the specification):
    y = −Σ |x − w|^p   (zero padding is real: a padded tap contributes |0 − w|^p)
    ∂L/∂F = Σ g·(x − w)        grad_w="full"  (eq. 23)     | Σ g·sgn(x − w)          grad_w="sign"
    ∂L/∂X = Σ g·HardTanh(w − x) grad_x="hardtanh"           | Σ g·sgn(w−x)|w−x|^(p−1)  grad_x="lp"

Hot-loop structure (all three kernels): an outer-product ("rank-1 update") loop. Each program owns a
BLOCK_M × BLOCK_N tile of accumulators in registers; per reduction step it loads one column of BLOCK_M
values and one row of BLOCK_N values and updates every accumulator. Each thread therefore reuses every
loaded x across all its output channels, and the per-MAC work is the arithmetic only: for the p=1
forward `FADD d = x − w; FADD acc += |d|` (abs folded as an operand modifier) — see
benchmarks/kernel_report.py for the SASS count per MAC. Index math (tap position, padding masks) is
hoisted out of the channel loop; the channel loop is unrolled BLOCK_K times so its loop overhead and
pointer bumps are amortised.

General p (1 < p < 2): |d|^p = exp2(p·log2|d|) on the approximate SFU instructions (MUFU.LG2, MUFU.EX2;
|d| folded into LG2's operand). Both are accurate to ~2^-22 relative (PTX ISA: lg2.approx max abs error
2^-22.6 for the mantissa part, ex2.approx max rel error 2^-22.5), so |d|^p is within ~p·2^-22·ln2·|log2|d||
≈ 3e-6 relative for |d| ∈ [2^-8, 2^8], i.e. at the level of fp32 rounding of the K-term sum itself.
docs/kernels.md discusses the throughput (two SFU ops per MAC) and why we did not go polynomial.

Files (one direction of imports): ``triton_math.py`` (mode constants, the |d|^p helpers) -> ``triton_kernels.py``
(the three @triton.jit kernels) -> ``triton_tiles.py`` (tuning lists, keys, TileTuners, ``_launch``) -> this file
(launchers, autograd Function, ``adder2d_triton``). The names of the lower files stay importable from here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from addernet_dist.kernels.triton_kernels import _adder_bwd_dw_kernel, _adder_bwd_dx_kernel, _adder_fwd_kernel
from addernet_dist.kernels.triton_math import (
    _DX_O_PAD,
    _INT32_MAX,
    _W_PAD,
    EPI_AFFINE,
    EPI_BN_STATS,
    EPI_NONE,
    GX_HARDTANH,
    GX_LINEAR,
    GX_POW,
    GX_SIGN,
    P_GENERAL,
    P_ONE,
    P_TWO,
)
from addernet_dist.kernels.triton_tiles import (
    _DW_KEY,
    _DX_KEY,
    _FWD_KEY,
    DW_CONFIGS,
    DW_SELFTEST_CONFIGS,
    DX_CONFIGS,
    FWD_CONFIGS,
    INTERPRETER_CONFIGS,
    _adder_bwd_dw_atomic_tuned,
    _adder_bwd_dx_tuned,
    _adder_fwd_tuned,
    _default_config,
    _interpreting,
    _launch,
    _prune_dx_configs,
    _prune_fwd_configs,
    _tile_config,
    _tuned,
)
from addernet_dist.ops.reference import adder2d_args, compute_dtype

# re-exported: tests, tiles.py, aot.py and the selftest reach the kernels, tile tables and launch helpers
# through this module (and monkeypatch _launch / the tuners here, where the launchers look them up)
__all__ = [
    "DW_CONFIGS", "DW_SELFTEST_CONFIGS", "DX_CONFIGS", "EPI_AFFINE", "EPI_BN_STATS", "EPI_NONE", "FWD_CONFIGS",
    "GX_HARDTANH", "GX_LINEAR", "GX_POW", "GX_SIGN", "INTERPRETER_CONFIGS", "P_GENERAL", "P_ONE", "P_TWO",
    "_DW_KEY", "_DX_KEY", "_DX_O_PAD", "_FWD_KEY", "_INT32_MAX", "_W_PAD", "_adder_bwd_dw_atomic_tuned",
    "_adder_bwd_dw_kernel", "_adder_bwd_dx_kernel", "_adder_bwd_dx_tuned", "_adder_fwd_kernel", "_adder_fwd_tuned",
    "_default_config", "_interpreting", "_launch", "_prune_dx_configs", "_prune_fwd_configs", "_tile_config",
    "_tuned", "AdderTritonFunction", "adder2d_forward", "adder2d_grad_input", "adder2d_grad_weight",
    "adder2d_triton", "resolve_deterministic",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"the triton adder backend needs CUDA tensors, got a tensor on {t.device}; use "
                "backend='cpu' or 'reference' on CPU (or set TRITON_INTERPRET=1 before importing "
                "triton to run the kernels in the interpreter, which is slow and meant for tests)"
            )
        if t.numel() > _INT32_MAX:
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} has more than 2^31-1 elements; the triton adder "
                "kernels index with int32 — split the batch"
            )


def _hot_loop_layout(t: torch.Tensor) -> torch.Tensor:
    """NCHW-contiguous view or copy of the tensor that the forward / ∂X hot loop streams (x / g).

    Those loops load one channel at a time across a warp's 32 consecutive positions: for NCHW that is one
    128-byte line (fp32), for channels_last 32 lines C elements apart, i.e. 32 L1 wavefronts per load
    instead of 1. Model for the default forward tile (M=256, N=16, w=4): a warp issues ~80 cycles of
    FP32 work per channel step against 2 x loads; with the four sub-partitions sharing one L1, the
    uncoalesced loads need ~4 × 64 = 256 L1 cycles per ~80 issue cycles, an L1 bound ~3× slower than
    NCHW. The copy instead costs one read + write of the tensor at memory bandwidth: ~1 % of a 3×3
    ResNet-50 stage-3 layer's modelled time (12.8 MB of x vs 7.4 G adder-MACs at batch 64), up to ~40 %
    for the thinnest 1×1 layers (64 outputs per input element), still under the ~3× it replaces.
    Outputs (y, dx) keep the caller's memory format: each is stored once per element, not per MAC.
    """
    return t if t.is_contiguous() else t.contiguous()


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _fast_math(dtype: torch.dtype) -> bool:
    """The SFU approximations on CUDA for fp32 compute; fp64 keeps exact exp2/log2, the interpreter has no PTX."""
    return not _interpreting() and compute_dtype(dtype) == torch.float32


def _p_mode(p: float) -> int:
    return P_ONE if p == 1.0 else P_TWO if p == 2.0 else P_GENERAL


def adder2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    p: float,
    out_hw: tuple[int, int],
    *,
    bn_stats: bool = False,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward launcher. x (N, C, H, W) any strides × weight (O, C, R, S) → y (N, O, P, Q).

    y keeps x's memory format and dtype. ``bn_stats``: also return per-channel (mean, var) fp32 (O,)
    pair — biased batch variance — computed in the kernel's epilogue. ``scale``/``shift`` (O,) fp32:
    inference epilogue (y − center)·scale + shift (center (O,) defaults to 0) (+ residual (N, O, P, Q))
    (then ReLU if ``relu``).
    """
    _check_device(x, weight)
    n, c, h, w_ = x.shape
    o, _, r, s = weight.shape
    pp, qq = out_hw
    fmt = (
        torch.channels_last
        if x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
        else torch.contiguous_format
    )
    y = torch.empty((n, o, pp, qq), device=x.device, dtype=x.dtype, memory_format=fmt)
    _check_device(y)  # the output can be larger than the input (int32 indexing)
    # The hot loop reads x one channel at a time across a warp's 32 consecutive output positions; see
    # _hot_loop_layout for why it gets an NCHW copy of a channels_last x (y still comes out channels_last).
    x = _hot_loop_layout(x)
    o_pad = triton.cdiv(o, _W_PAD) * _W_PAD
    # fp32 (fp64) filters whatever the storage dtype: each thread converts every filter value it loads, so
    # bf16 filters cost one extra instruction per MAC (3.94 vs 2.5 SASS/MAC); the copy is tiny anyway.
    w_rsco = torch.zeros((r, s, c, o_pad), device=weight.device, dtype=compute_dtype(weight.dtype))
    w_rsco[..., :o] = weight.permute(2, 3, 1, 0)
    m = n * pp * qq
    epilogue = EPI_NONE
    part = y  # placeholder pointer for unused arguments
    if bn_stats:
        epilogue = EPI_BN_STATS
        # One row of partials per BLOCK_M: allocate for the smallest BLOCK_M of the tuning list.
        min_bm = min(cfg.kwargs["BLOCK_M"] for cfg in FWD_CONFIGS)
        part = torch.empty((triton.cdiv(m, min_bm), 2, o), device=x.device, dtype=torch.float32)
    if scale is not None:
        if bn_stats:
            raise ValueError(
                "bn_stats and the affine epilogue are exclusive (training vs inference)"
            )
        epilogue = EPI_AFFINE
        if shift is None:
            raise ValueError("the affine epilogue needs both scale and shift")
        scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
        shift = shift.to(device=x.device, dtype=torch.float32).contiguous()
        if center is None:
            center = torch.zeros_like(scale)
        center = center.to(device=x.device, dtype=torch.float32).contiguous()
        for nm, t in (("scale", scale), ("shift", shift), ("center", center)):
            if t.shape != (o,):
                raise ValueError(
                    f"{nm} must have shape ({o},) (one value per output channel), got {tuple(t.shape)}"
                )
    if residual is not None:
        if scale is None:
            raise ValueError("a residual is only fused with the affine (inference) epilogue")
        if residual.shape != y.shape:
            raise ValueError(
                f"residual shape {tuple(residual.shape)} != output shape {tuple(y.shape)}"
            )
        _check_device(residual)
    res = residual if residual is not None else y
    used_bm = {}

    def grid(meta):
        used_bm["BLOCK_M"] = meta["BLOCK_M"]
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(o, meta["BLOCK_N"]))

    args = (
        x,
        w_rsco,
        y,
        part,
        center if center is not None else y,
        scale if scale is not None else y,
        shift if shift is not None else y,
        res,
        float(p),
        n,
        c,
        h,
        w_,
        o,
        o_pad,
        pp,
        qq,
        *x.stride(),
        *y.stride(),
        *res.stride(),
        *stride,
        *padding,
        *dilation,
    )
    consts = dict(
        R=r,
        S=s,
        P_MODE=_p_mode(p),
        FAST_MATH=_fast_math(x.dtype),
        FMA_EXP2_OK=compute_dtype(x.dtype) == torch.float32,
        EPILOGUE=epilogue,
        HAS_RES=residual is not None,
        RELU=bool(relu),
        ACC_DTYPE=_acc_dtype(x.dtype),
    )
    _launch(_adder_fwd_kernel, _adder_fwd_tuned, "fwd", FWD_CONFIGS, grid, args, consts, config)
    if not bn_stats:
        return y, None
    return y, _combine_bn_partials(part, m, used_bm["BLOCK_M"])


def _combine_bn_partials(
    part: torch.Tensor, m: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-block (mean, M2) into the batch mean and biased variance, in a fixed order (deterministic).

    Chan et al.: M2 = Σ_b M2_b + Σ_b n_b (mean_b − mean)²; done in fp64 because it is tiny ((M/BLOCK_M) × O).
    """
    nb = triton.cdiv(m, block_m)
    counts = torch.full((nb, 1), float(block_m), dtype=torch.float64, device=part.device)
    counts[-1] = m - (nb - 1) * block_m
    means = part[:nb, 0].double()
    m2 = part[:nb, 1].double()
    mean = (counts * means).sum(0) / m
    var = (m2.sum(0) + (counts * (means - mean) ** 2).sum(0)) / m
    return mean.float(), var.float()


def _grad_dims(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    """Both gradient launchers' prologue: the device check, then (N, C, H, W, O, R, S, P, Q)."""
    _check_device(g, x, weight)
    return (*x.shape, weight.shape[0], *weight.shape[2:], *g.shape[2:])


def adder2d_grad_input(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    p: float,
    grad_x: str,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """∂L/∂X launcher: g (N, O, P, Q) → dx (N, C, H, W), same strides and dtype as x."""
    n, c, h, w_, o, r, s, pp, qq = _grad_dims(g, x, weight)
    dx = torch.empty_like(x)  # keeps x's strides: the kernel writes dx with x's strides
    # g is the hot-loop operand here (x is loaded once per program and dx stored once): see
    # _hot_loop_layout. dx keeps x's memory format.
    g = _hot_loop_layout(g)
    c_pad = triton.cdiv(c, _W_PAD) * _W_PAD
    if grad_x == "hardtanh":
        mode = GX_HARDTANH
    else:
        mode = GX_SIGN if p == 1.0 else GX_LINEAR if p == 2.0 else GX_POW
    o_pad = triton.cdiv(o, _DX_O_PAD) * _DX_O_PAD
    w_rsoc = torch.zeros(
        (r, s, o_pad, c_pad), device=weight.device, dtype=compute_dtype(weight.dtype)
    )
    w_t = weight.permute(2, 3, 0, 1).to(w_rsoc.dtype)
    if mode == GX_HARDTANH:
        w_t = w_t * 0.5 + 0.5  # see the hot-loop forms in _adder_bwd_dx_kernel
    elif mode == GX_SIGN:
        w_t = w_t * 2.0**64
    w_rsoc[:, :, :o, :c] = w_t
    sh, sw = stride
    m = n * triton.cdiv(h, sh) * triton.cdiv(w_, sw)  # positions of the largest stride phase (0, 0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]), sh * sw)

    args = (
        g,
        x,
        w_rsoc,
        dx,
        float(p),
        n,
        c,
        c_pad,
        h,
        w_,
        o,
        o_pad,
        pp,
        qq,
        *g.stride(),
        *x.stride(),
    )
    args = args + (*stride, *padding, *dilation)
    consts = dict(
        R=r,
        S=s,
        GX_MODE=mode,
        FAST_MATH=_fast_math(x.dtype),
        FMA_EXP2_OK=compute_dtype(x.dtype) == torch.float32,
        ACC_DTYPE=_acc_dtype(x.dtype),
    )
    _launch(_adder_bwd_dx_kernel, _adder_bwd_dx_tuned, "dx", DX_CONFIGS, grid, args, consts, config)
    return dx


# Enough programs to fill an H100 (132 SMs × a few resident programs) before splitting the reduction.
_DW_TARGET_PROGRAMS = 132 * 4
# The interpreter runs programs one after another, ~0.1 s each at 64×64 tiles: 528 programs made one
# ∂F of a 16-channel 3×3 layer take 29 s (vs 2 s). 18 still splits 3×3 layers in two and 1×1 layers
# further, so the partial-sum path stays exercised on CPU.
_DW_TARGET_PROGRAMS_INTERPRETER = 18


def adder2d_grad_weight(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    grad_w: str,
    deterministic: bool = True,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """∂L/∂F launcher: → dw (O, C, R, S) in weight's dtype.

    The reduction over the N·P output rows is split across programs. ``deterministic``: each split writes
    its own fp32 partial and the partials are summed in a fixed order (bitwise reproducible; extra memory
    ≤ ~_DW_TARGET_PROGRAMS tiles) with the fixed config DW_CONFIGS[0]. Otherwise the splits
    ``atomic_add`` into one buffer and the tile is autotuned over DW_CONFIGS per shape (on a GPU).
    """
    n, c, h, w_, o, r, s, pp, qq = _grad_dims(g, x, weight)
    rows = n * pp
    acc_dt = torch.float64 if compute_dtype(x.dtype) == torch.float64 else torch.float32
    atomic = not deterministic

    def split_for(bm: int, bn: int) -> int:
        # enough programs to fill the GPU (~_DW_TARGET_PROGRAMS), never more splits than rows
        tiles = triton.cdiv(o, bm) * triton.cdiv(c, bn)
        target = _DW_TARGET_PROGRAMS_INTERPRETER if _interpreting() else _DW_TARGET_PROGRAMS
        return max(1, min(rows, target // max(1, tiles * r * s)))

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        return (triton.cdiv(o, bm) * triton.cdiv(c, bn), r * s, split_for(bm, bn))

    w_c = weight.contiguous()
    args = (g, x, w_c)
    sizes = (n, c, h, w_, o, pp, qq, *g.stride(), *x.stride(), *stride, *padding, *dilation)
    consts = dict(R=r, S=s, SIGN=grad_w == "sign", ATOMIC=atomic, ACC_DTYPE=_acc_dtype(x.dtype))
    if atomic:
        buf = torch.zeros((r * s, o, c), device=x.device, dtype=torch.float32)
        _launch(
            _adder_bwd_dw_kernel,
            _adder_bwd_dw_atomic_tuned,
            "dw",
            DW_CONFIGS,
            grid,
            (*args, buf, *sizes),
            consts,
            config,
            reset=(buf,),
        )
    else:
        cfg = config if config is not None else _default_config("dw", DW_CONFIGS)
        split = split_for(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])
        buf = torch.empty((split, r * s, o, c), device=x.device, dtype=acc_dt)
        _launch(
            _adder_bwd_dw_kernel, None, "dw", DW_CONFIGS, grid, (*args, buf, *sizes), consts, cfg
        )
    dw = buf if atomic else buf.sum(0)
    return dw.reshape(r, s, o, c).permute(2, 3, 0, 1).to(weight.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
class AdderTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, stride, padding, dilation, p, grad_x, grad_w, deterministic, out_hw
    ):
        y, _ = adder2d_forward(x, weight, stride, padding, dilation, p, out_hw)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, p, grad_x, grad_w, deterministic)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, p, grad_x, grad_w, deterministic = ctx.conf
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = adder2d_grad_input(g, x, weight, stride, padding, dilation, p, grad_x)
        if ctx.needs_input_grad[1]:
            dw = adder2d_grad_weight(g, x, weight, stride, padding, dilation, grad_w, deterministic)
        return dx, dw, None, None, None, None, None, None, None, None


def resolve_deterministic(deterministic: bool | None) -> bool:
    """None → follow ``torch.use_deterministic_algorithms``; float atomics are the only nondeterminism."""
    from addernet_dist.device_policy import deterministic_grad_weight

    return deterministic_grad_weight(deterministic, torch.are_deterministic_algorithms_enabled())


def adder2d_triton(
    input: torch.Tensor, weight: torch.Tensor, *args: Any, deterministic: bool | None = True, **kwargs: Any
) -> torch.Tensor:
    """Adder convolution on the Triton kernels; same arguments (``ops.reference.adder2d_args``) and results
    as ``adder2d_reference``.

    input (N, C, H, W) in NCHW or channels_last, fp32/fp64/fp16/bf16 (16-bit accumulates in fp32);
    weight (O, C, R, S). ``deterministic`` (∂L/∂F only): True (default) reduces fixed-order partials,
    False uses float atomics, None follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    stride, padding, dilation, p, grad_x, grad_w, out_hw = adder2d_args(input, weight, *args, **kwargs)
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)):
        # The kernels take any strides, but ∂L/∂X is written with x's strides into empty_like(x), which
        # only keeps strides for dense tensors: make sliced/overlapping views dense first.
        input = input.contiguous()
    if input.dtype != weight.dtype:
        raise TypeError(
            f"input dtype {input.dtype} != weight dtype {weight.dtype}; cast one of them"
        )
    if not math.isfinite(float(p)):
        raise ValueError(f"p must be finite, got {p}")
    return AdderTritonFunction.apply(
        input,
        weight,
        stride,
        padding,
        dilation,
        float(p),
        grad_x,
        grad_w,
        resolve_deterministic(deterministic),
        out_hw,
    )
