"""CPU fast path of the adder operator: direct (im2col-free) C++ kernels, compiled once per machine.

Shape legend: N batch, C in-channels, O out-channels, kh×kw kernel, K = C·kh·kw taps, Ho×Wo output,
L = Ho·Wo positions, s stride, d dilation. ``P`` is the *phased padded input*: x zero-padded, then split into
s_h×s_w stride phases, layout (N, C, s_h, s_w, Hq, Wq). In P, tap k = (c, i, j) of output (oh, ow) sits at
``P[n, c, (i·d_h) % s_h, (j·d_w) % s_w, oh + (i·d_h)//s_h, ow + (j·d_w)//s_w]`` — consecutive ``ow`` are
consecutive in memory for every stride, so every kernel loads whole vectors along ``ow`` with no im2col.

Vectors run along ``ow``: 16 fp32 lanes (AVX-512), or two output rows per vector when a row is at most 8
wide (``wide = 2``: ResNet-20 stage 3, ResNet stage 4), so narrow late-stage layers still use full
64-byte instructions.

Kernels (all compute exactly what ``addernet_dist.ops.reference`` computes; see the contract there):
  _fwd     y[n,o,oh,ow]  = −Σ_k |x − w[o,k]|^p            tile: 16 filters × one vector of ow, loop over k
  _gx      gx[n,k,pos]   = Σ_o g[n,o,pos]·f(w[o,k] − x)    tile: 8 taps × one vector of ow, loop over o;
                           scattered into the padded-phase gradient buffer (col2im fused, no column tensor)
  _gw      gw[o,k]       = Σ_{n,pos} g·sgn(x − w)  (the "sign" ablation)  tile: 4 filters × 4 taps
The "full" filter gradient Σ g·(x − w) = Σ g·x − w·Σ g is a convolution's filter gradient plus a rank-1
term, so it runs in aten (oneDNN), not here.
The C++ sources are next to this file (package data): ``cpu_adder.h`` (common: vectors, math, geometry,
threads) and one translation unit per kernel, ``cpu_fwd.cpp``, ``cpu_gx.cpp``, ``cpu_gw.cpp``;
``cpu_build.py`` compiles each once per dtype (6 objects, one cached .so), declares the entry points and
runs job lists on threads; this file keeps the launchers and the autograd Function.
Why C++ and not torch.compile: ``F.unfold`` alone takes 250 ms for a 32×16×32×32 input on this machine (the
fast path's whole forward is ~5 ms), and inductor recompiles per layer shape/p; this file compiles in ~3 s once
per machine (cached on disk), takes p as a runtime argument and every shape as runtime sizes.

Memory: no im2col. Extra memory is P (the padded input, saved for backward instead of the input), the
gradient buffer of the same size in backward, and one O×K filter-gradient buffer per thread.

Threads: each launcher splits its work into ``torch.get_num_threads()`` jobs (rows for the forward and the
filter gradient, images or channel ranges for the input gradient, whose scatter would race between
neighbouring rows) and passes the job list to one C call, which runs it on OpenMP threads of torch's own
libgomp (``for_jobs`` in cpu_adder.h: one runtime, one pool; the Python thread pool this replaced fought
torch's spinning OpenMP worker for the second core, and two threads ran ResNet-50 only 1.03-1.08x faster than
one). Without OpenMP (non-GCC compilers, forked children) the jobs run as one call each on Python threads
(ctypes drops the GIL). A job's result depends only on its range, and the per-job filter-gradient buffers
are summed in a fixed order, so results are deterministic for a given thread count.

If no C++ compiler is found or compilation fails, ``is_available()`` says so and ``unavailable_reason()`` says
why; the dispatcher (``addernet_dist.ops.dispatch``) then routes to the reference with one warning. The
fallback lives there only: ``adder2d_cpu`` called directly raises a RuntimeError naming the cause and the fix.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
import torch.nn.functional as F

from addernet_dist.kernels import cpu_build
from addernet_dist.kernels.cpu_build import (
    _launch,
    _lib_or_raise,
    _split,
    _suffix,
    build,
    is_available,
    unavailable_reason,
)
from addernet_dist.ops.reference import (
    adder2d_args,
    compute_dtype,
)

__all__ = ["adder2d_cpu", "adder2d_forward_cpu", "is_available", "unavailable_reason", "build"]

# ---- launchers -----------------------------------------------------------------------------------------

_MODE_FWD = {1.0: 1, 2.0: 2}
_FLAT_CHUNK_BYTES = 64 << 10  # anything else: general p (mode 0)


class _Geom:
    """Sizes of one call plus the phased padded layout; ``arr`` is what the C side reads."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, out_hw, dtype):
        n, c, h, w = x_shape
        o, _, kh, kw = w_shape
        (sh, sw), (dh, dw) = stride, dilation
        ho, wo = out_hw
        # padded extent actually read: last output's last tap, rounded up to whole stride phases
        hq = -(-((ho - 1) * sh + (kh - 1) * dh + 1) // sh)
        wq = -(-((wo - 1) * sw + (kw - 1) * dw + 1) // sw)
        self.n, self.c, self.h, self.w, self.o, self.kh, self.kw = n, c, h, w, o, kh, kw
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.hq, self.wq, self.ho, self.wo = hq, wq, ho, wo
        self.arr = torch.tensor(
            [n, c, o, kh, kw, sh, sw, dh, dw, hq, wq, ho, wo], dtype=torch.int64
        )
        self.k = c * kh * kw
        # 64-byte vectors (16 fp32 lanes) unless a row is too short to fill them; 32-byte vectors
        # then waste fewer lanes (ResNet-20 stage 3 has 8-wide rows: 100% vs 50% lane use).
        esize = self.esize = 4 if dtype == torch.float32 else 8
        self.wide = int(wo * esize > 32)
        # Forward and ∂X: rows of at most half a 64-byte vector go two to a vector (wide = 2): stage 3
        # of ResNet-20 (8 fp32) then uses 16-lane instead of 8-lane instructions.
        self.vec = 2 if 2 * wo * esize <= 64 and ho >= 2 else self.wide
        # Without AVX-512 a 64-byte vector is two 32-byte registers and the kernels' tiles are sized
        # for 16 of those (FWD_OB / GX_KB in cpu_adder.h): fp32 p = 1, p = 2 and HardTanh use plain
        # 32-byte vectors there (rows of 8 fill one exactly)
        self.narrow_isa = esize == 4 and _lib_or_raise().adder_vector_bytes() == 32
        self.off = torch.empty(self.k, dtype=torch.int64)
        _lib_or_raise().adder_tap_offsets(self.arr.data_ptr(), self.off.data_ptr())

    def wide_for(self, mode: int) -> int:
        # General p (mode 0) always takes 64-byte vectors: the fp32 power (pow16) exists only for
        # them, and for fp64 GCC maps only those onto libmvec's vector exp/log (_ZGVeN8v_*); an
        # 8-lane fp32 loop called scalar expf/logf, 10x slower (ResNet-20 stage 3, p = 1.5: 0.14 vs
        # 1.5 G adder-MAC/s), far worse than half-empty lanes. Narrow rows pair up anyway (vec = 2).
        if mode == 0:
            return 1 if self.vec == 0 else self.vec
        return 0 if self.narrow_isa else self.vec

    def flat_for(self, mode: int) -> bool:
        # One flat position range per image (fwd_flat in cpu_fwd.cpp, gx_flat in cpu_gx.cpp) where rows would end
        # in a partial vector and the flat range wastes no more lanes than those tails: ResNet-50's 28-,
        # 14- and 7-wide layers; not 8/16/32-wide rows (whole vectors), nor paired rows (wide = 2) where
        # pairs need fewer vectors
        wide = self.wide_for(mode)
        if wide == 2:
            # row pairs (rows of <= half a 64-byte vector) vs the flat range: flat where it needs no
            # more vectors per image (7×7: 4 either way, and flat reads P rows once per tap, not twice)
            lv = (self.ho - 1) * self.wq + self.wo
            return -(-lv // (64 // self.esize)) <= -(-self.ho // 2)
        if self.ho * self.wo > 32 * 32 and self.wq != self.wo:
            # (large planes keep rows when Wq > Wo: flat needs an output-sized y with the extra columns
            # plus its compacting copy and a zero-padded copy of g, +3.4 MB on the batch-8 56×56 layer
            # of test_extra_memory_is_a_few_inputs_not_an_im2col. With Wq = Wo (1×1, stride 1, no
            # padding) y and g are used as they are: ResNet-50's 56-wide 1×1 layers go flat on AVX-512,
            # whose rows end in half a 16-lane vector)
            return False
        lanes = (32 if wide == 0 else 64) // self.esize
        return self.wo % lanes != 0 and self.wq <= -(-self.wo // lanes) * lanes

    def _layout_call(self, kind: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        fn = getattr(_lib_or_raise(), f"adder_{kind}_{_suffix(src.dtype)}")
        (ph, pw), a = self.padding, (self.arr.data_ptr(), self.h, self.w)
        jobs = _split(self.n, torch.get_num_threads())
        _launch(fn, jobs, lambda j, nj, _: (*a, ph, pw, src.data_ptr(), dst.data_ptr(), j, nj))
        return dst

    def phase_pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → P (N, C, s_h, s_w, Hq, Wq), zeros outside the image (C++, one pass)."""
        (sh, sw) = self.stride
        P = x.new_empty(self.n, self.c, sh, sw, self.hq, self.wq)
        return self._layout_call("phase_pad", x.contiguous(), P)

    def phase_unpad(self, gp: torch.Tensor) -> torch.Tensor:
        """Inverse of phase_pad for gradients: P-layout (N, C, s_h, s_w, Hq, Wq) → (N, C, H, W).

        Image pixels no tap reads (the floor in the output size) get 0."""
        out = gp.new_empty(self.n, self.c, self.h, self.w)
        return self._layout_call("phase_unpad", gp, out)


def _forward(g: _Geom, P: torch.Tensor, w_ok: torch.Tensor, p: float, epi=None) -> torch.Tensor:
    """y = −Σ|x − w|^p; ``epi`` = (center, scale, shift, residual or None, relu): the inference
    epilogue relu?((y − center)·scale + shift (+ residual)) applied in the kernel (see cpu_fwd.cpp)."""
    lib = _lib_or_raise()
    fn = getattr(lib, f"adder_fwd_{_suffix(P.dtype)}")
    mode = _MODE_FWD.get(p, 0)
    rows = _split(g.n * g.ho, torch.get_num_threads())
    cx = None
    if mode == 1:
        # the min form of p = 1 (see fwd_tile): centre each input channel by its filters' mean
        # (in P's dtype: the fp64 copies and fp64-accumulating reductions this used to do took 31 of
        # the 48 ms of a batch-1 3×3 512→512 forward; the centre is an offset that only needs to be
        # near the mean, and w − c is one correctly rounded subtraction in either precision)
        c = w_ok.view(g.o, g.c, g.kh * g.kw).sum(0).double().sum(1) / (g.o * g.kh * g.kw)
        # rounded to 8 significant bits: an offset shrinks >= 256x, and x − c stays exact for
        # integer or other coarse data (then every sum is exact, as the direct one is)
        mant, expo = torch.frexp(c)
        c = torch.ldexp(torch.round(mant * 256) / 256, expo)
        # the kernel packs w − cx and sums it per filter (fwd_pack in cpu_fwd.cpp)
        cx = c.to(P.dtype).repeat_interleave(g.kh * g.kw)
    extra = (cx.data_ptr() if mode == 1 else None,)
    if epi is None:
        extra += (None, None, None, None, 0)
    else:
        center, scale, shift, res, relu = epi
        ptr = [t.data_ptr() if t is not None else None for t in (center, scale, shift, res)]
        extra += (*ptr, int(relu))
    if g.flat_for(mode):
        # (N, O, Ho, Wq): the Wq − Wo columns between rows are thrown away below
        yf = P.new_empty(g.n, g.o, g.ho, g.wq)
        t = torch.get_num_threads()
        wide = g.wide_for(mode)
        # images, or for small batches filter ranges, so both threads have work on batch-1 inference
        # and the 14×14 / 7×7 layers; the ranges split at whole tiles (adder_fwd_ob), so a filter's
        # result does not depend on the split
        ob = lib.adder_fwd_ob(32 if wide == 0 else 64)
        units = g.o // ob
        if g.n >= t or units < 2:
            jobs = [(n0, n1, 0, g.o) for n0, n1 in _split(g.n, t)]
        else:
            jobs = [(0, g.n, ob * a, ob * b if b < units else g.o) for a, b in _split(units, t)]
        a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), yf.data_ptr())
        fn = getattr(lib, f"adder_fwd_flat_{_suffix(P.dtype)}")
        # taps per chunk: the chunk's slice of one image's P within ~_FLAT_CHUNK_BYTES (L2)
        plane = g.stride[0] * g.stride[1] * g.hq * g.wq * g.esize
        kc = max(16, (_FLAT_CHUNK_BYTES // plane) * g.kh * g.kw)
        _launch(fn, jobs, lambda j, nj, _: (*a, j, nj, p, mode, wide, g.off.data_ptr(), *extra, kc))
        return yf if g.wq == g.wo else yf[..., : g.wo].contiguous()
    y = P.new_empty(g.n, g.o, g.ho, g.wo)
    a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), y.data_ptr())
    wide = g.wide_for(mode)
    _launch(fn, rows, lambda j, nj, _: (*a, j, nj, p, mode, wide, g.off.data_ptr(), *extra))
    return y


_scratch = threading.local()


def _zeroed_scratch(like: torch.Tensor) -> torch.Tensor:
    """A zeroed tensor shaped like ``like``, carved from this thread's reusable buffer.

    ∂X scatters into a P-layout buffer that lives only until phase_unpad has read it. A fresh
    zeros_like page-faults all of it on every call (glibc returns big blocks to the OS on free): on the
    stride-2 ResNet-20 layers, batch 32, that was ~7 % of the layer's forward+backward (4.79 vs 5.25 ms).
    One buffer per thread (autograd may run backward on several threads), grown to the largest P seen.
    """
    n = like.numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(like.shape).zero_()


def _grad_input(g: _Geom, P, w_ok, g_out, p: float, grad_x: str) -> torch.Tensor:
    lib = _lib_or_raise()
    gp = _zeroed_scratch(P)
    fn = getattr(lib, f"adder_gx_{_suffix(P.dtype)}")
    mode = 3 if grad_x == "hardtanh" else _MODE_FWD.get(p, 0)
    t = torch.get_num_threads()
    # neighbouring rows of one image scatter into overlapping input pixels: split by image, or (for
    # batches smaller than the thread count) by input channel, whose taps never overlap
    if g.n >= t or g.c == 1:
        jobs = [(n0, n1, 0, g.c) for n0, n1 in _split(g.n, t)]
    else:
        jobs = [(0, g.n, c0, c1) for c0, c1 in _split(g.c, t)]
    if g.flat_for(mode):  # see flat_for: g in (N, O, Ho, Wq) with zeros in the thrown-away columns
        fn = getattr(lib, f"adder_gx_flat_{_suffix(P.dtype)}")
        if g.wq != g.wo:
            gf = g_out.new_zeros(g.n, g.o, g.ho, g.wq)
            gf[..., : g.wo] = g_out
            g_out = gf
    a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), g_out.data_ptr(), gp.data_ptr())
    wide = g.wide_for(mode)
    _launch(fn, jobs, lambda j, nj, _: (*a, j, nj, p, mode, wide, g.off.data_ptr()))
    return g.phase_unpad(gp)


# Largest per-image column matrix (K × Ho·Wo) _gw_gemm builds; one image's at a time, so this bounds its
# extra memory (ResNet-50's 3×3 256-channel 14×14 layer: 1.8 MiB)
_GW_GEMM_COL_BYTES = 2 << 20
_GW_GEMM_MIN_CHANNELS = 256


def _gw_by_gemm(g: _Geom) -> bool:
    # oneDNN's filter gradient is slow on ResNet-50's many-channel 3×3 and strided layers: one thread,
    # batch 2, oneDNN / GEMM time: 3×3 512→512 7×7 1.5-1.6x, 3×3 s2 512→512 14×14 1.7x, 3×3 256→256 14×14
    # 1.2x, 3×3 s2 256→256 28×28 1.4x, 1×1 s2 1024→2048 1.4x. It wins on few channels (ResNet-20, batch 32:
    # GEMM 1.3-1.8x slower) and ties on 1×1 stride-1 layers (0.95-1.07x), which keep it.
    strided_or_spatial = g.kh * g.kw > 1 or g.stride != (1, 1)
    return g.c >= _GW_GEMM_MIN_CHANNELS and strided_or_spatial and g.k * g.ho * g.wo * g.esize <= _GW_GEMM_COL_BYTES


def _gw_gemm(g: _Geom, P: torch.Tensor, x: torch.Tensor | None, g_out: torch.Tensor) -> torch.Tensor:
    """Σ_m g·x (a convolution's filter gradient, O × K) as one GEMM per image, g[n] (O × L) @ cols[n]ᵀ,
    cols[n] (K × L) a copy of an as_strided window view of the padded image; images added in order."""
    (sh, sw), (dh, dw), (ph, pw) = g.stride, g.dilation, g.padding
    go = g_out.reshape(g.n, g.o, g.ho * g.wo)
    out = None
    for i in range(g.n):
        # stride 1: P holds the padded image (Hq × Wq covers every tap read); else pad the saved input
        xp = P[i].view(g.c, g.hq, g.wq) if x is None else F.pad(x[i], (pw, pw, ph, ph))
        hp, wp = xp.shape[1:]
        view = xp.as_strided((g.c, g.kh, g.kw, g.ho, g.wo), (hp * wp, dh * wp, dw, sh * wp, sw))
        cols = view.reshape(g.k, g.ho * g.wo)
        out = torch.mm(go[i], cols.t()) if out is None else out.addmm_(go[i], cols.t())
    return out


def _grad_weight(g: _Geom, P, w_ok, g_out, grad_w: str, x=None) -> torch.Tensor:
    if grad_w == "full":
        # Σ_m g·(x − w) = (Σ_m g·x) − w·Σ_m g. The first term is exactly a convolution's filter
        # gradient, so it goes to aten (oneDNN on x86): 2.0-5.8x faster than the direct kernel below on
        # the ResNet-20 layers (one thread, e.g. stage 3: 1.1 vs 6.5 ms at batch 32), same fp32 rounding
        # size (max rel. difference 0.5-2.7e-6). Stride 1 reads the padded input P directly (a valid
        # convolution over it gives exactly Ho × Wo); strided layers pass the saved input and padding.
        # − w·Σ g in place: two fresh O × K temporaries page-fault ~9 MiB each on a 3×3 512→512 layer,
        # which took longer than the GEMM (27 vs 7 ms, one thread)
        gsum = g_out.sum((0, 2, 3))[:, None]
        if _gw_by_gemm(g):
            return _gw_gemm(g, P, x, g_out).addcmul_(w_ok, gsum, value=-1)
        if x is None:
            xin, stride, padding = P.view(g.n, g.c, g.hq, g.wq), (1, 1), (0, 0)
        else:
            xin, stride, padding = x, g.stride, g.padding
        # oneDNN keeps reordered copies of its input and g (~2 images' worth of scratch per image;
        # 12.8 MiB for a batch-8 ResNet-50 stage-1 layer): chunks of <= 2 MiB of (input + g) bound
        # that scratch whatever the batch, at no cost in time here (ResNet-20 layers, batch 32:
        # 0.85-1.15x the one-call time, faster on the largest where a chunk stays in L2)
        per_image = (xin[0].numel() + g_out[0].numel()) * xin.element_size()
        chunk = max(1, (2 << 20) // per_image)
        w4 = w_ok.view(g.o, g.c, g.kh, g.kw)
        gxw = None
        for i in range(0, g.n, chunk):
            part = torch.ops.aten.convolution_backward(
                *(g_out[i : i + chunk], xin[i : i + chunk], w4, None),
                *(stride, padding, g.dilation, False, (0, 0), 1, (False, True, False)),
            )[1]
            gxw = part if gxw is None else gxw.add_(part)
        return gxw.reshape(g.o, g.k).addcmul_(w_ok, gsum, value=-1)
    lib = _lib_or_raise()
    fn = getattr(lib, f"adder_gw_{_suffix(P.dtype)}")
    rows = _split(g.n * g.ho, torch.get_num_threads())
    parts = w_ok.new_zeros(len(rows), g.o, g.k)
    a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), g_out.data_ptr())
    _launch(fn, rows, lambda j, nj, i: (*a, parts[i].data_ptr(), j, nj, g.wide, g.off.data_ptr()))
    return parts.sum(0)


# ---- autograd ------------------------------------------------------------------------------------------


class AdderCPUFunction(torch.autograd.Function):
    """adder2d on CPU tensors; same arguments and semantics as ``adder2d_reference``."""

    @staticmethod
    def forward(ctx, input, weight, stride, padding, dilation, p, grad_x, grad_w, out_hw):
        cdt = compute_dtype(input.dtype)
        g = _Geom(input.shape, weight.shape, stride, padding, dilation, out_hw, cdt)
        x = input.to(cdt)
        P = g.phase_pad(x)
        w_ok = weight.to(cdt).reshape(g.o, g.k).contiguous()
        # the "full" filter gradient of a strided layer convolves the input itself (see _grad_weight);
        # stride 1 reads P, so nothing more is kept
        strided = g.stride != (1, 1) and grad_w == "full"
        ctx.save_for_backward(P, w_ok, x.contiguous() if strided else None)
        ctx.conf = (g, p, grad_x, grad_w, input.dtype, weight.dtype)
        if g.n == 0 or g.o == 0:
            return input.new_zeros(g.n, g.o, g.ho, g.wo)
        return _forward(g, P, w_ok, p).to(input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        P, w_ok, x = ctx.saved_tensors
        g, p, grad_x, grad_w, x_dtype, w_dtype = ctx.conf
        g_out = grad_out.to(P.dtype).contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if g.n == 0 or g.o == 0:
                gx = torch.zeros(g.n, g.c, g.h, g.w, dtype=x_dtype)
            else:
                gx = _grad_input(g, P, w_ok, g_out, p, grad_x).to(x_dtype)
        if ctx.needs_input_grad[1]:
            if g.n == 0 or g.o == 0:
                gw = torch.zeros(g.o, g.k, dtype=w_dtype)
            else:
                gw = _grad_weight(g, P, w_ok, g_out, grad_w, x).to(w_dtype)
            gw = gw.reshape(g.o, g.c, g.kh, g.kw)
        return gx, gw, None, None, None, None, None, None, None


def _check_cpu(input: torch.Tensor, weight: torch.Tensor, what: str, hint: str = "") -> None:
    if input.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"{what} needs CPU tensors, got input on {input.device} and weight on {weight.device}{hint}")


def adder2d_forward_cpu(
    input: torch.Tensor,
    weight: torch.Tensor,
    *args: Any,
    scale: torch.Tensor,
    shift: torch.Tensor,
    center: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Inference forward with a folded BatchNorm (+ residual, + ReLU) in the kernel's epilogue, no autograd.

    Arguments after ``input, weight``: stride, padding, dilation, p of ``ops.reference.adder2d_args``
    (no grad_x/grad_w: nothing is differentiated).

    ``relu?((adder2d(x, w) − center)·scale + shift (+ residual))`` with ``scale``/``shift``/``center``
    of shape (O,) (center defaults to 0; for an eval-mode BN: center = running_mean,
    scale = γ/√(running_var + ε), shift = β) and ``residual`` shaped like the output. The CPU twin of
    ``triton_adder.adder2d_forward``'s epilogue arguments; computed in fp32 (fp64 for fp64 inputs) and
    returned in the input's dtype. Needs the compiled kernels (``is_available()``).
    """
    if len(args) > 4 or {"grad_x", "grad_w"} & kwargs.keys():
        raise TypeError("adder2d_forward_cpu takes stride, padding, dilation, p: no gradient modes (no autograd)")
    stride, padding, dilation, p, _, _, out_hw = adder2d_args(input, weight, *args, **kwargs)
    _check_cpu(input, weight, "adder2d_forward_cpu")
    cdt = compute_dtype(input.dtype)
    g = _Geom(input.shape, weight.shape, stride, padding, dilation, out_hw, cdt)
    o = g.o
    if center is None:
        center = torch.zeros(o, dtype=cdt)
    vecs = []
    for name, t in (("scale", scale), ("shift", shift), ("center", center)):
        if t.shape != (o,):
            raise ValueError(
                f"{name} must have shape ({o},) (one per output channel), got {tuple(t.shape)}"
            )
        vecs.append(t.detach().to(device="cpu", dtype=cdt).contiguous())
    scale, shift, center = vecs
    if residual is not None:
        want = (g.n, o, g.ho, g.wo)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual shape {tuple(residual.shape)} != output shape {want}")
        residual = residual.detach().to(cdt).contiguous()
    x, stride, dilation = _strided_1x1_as_dense(input.detach(), weight, stride, padding, dilation, out_hw)
    g = _Geom(x.shape, weight.shape, stride, padding, dilation, out_hw, cdt)
    with torch.no_grad():
        P = g.phase_pad(x.to(cdt))
        w_ok = weight.detach().to(cdt).reshape(o, g.k).contiguous()
        if g.n == 0 or o == 0:
            return input.new_zeros(g.n, o, g.ho, g.wo)
        y = _forward(g, P, w_ok, float(p), (center, scale, shift, residual, relu))
    return y.to(input.dtype)


def adder2d_cpu(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Adder convolution on CPU: (N, C, H, W) × (O, C, kh, kw) → (N, O, H', W'), = ``adder2d_reference``.

    Arguments after ``input, weight``: ``ops.reference.adder2d_args``. fp32/fp64 compute in their own dtype;
    fp16/bf16 compute in fp32 and return the input dtype. Raises
    RuntimeError when the kernels cannot be compiled (``adder2d(..., backend=None)`` falls back instead).
    """
    stride, padding, dilation, p, grad_x, grad_w, out_hw = adder2d_args(input, weight, *args, **kwargs)
    _check_cpu(input, weight, "the 'cpu' adder backend", "; use backend=None (auto) or 'triton' for CUDA tensors")
    if not is_available():
        raise RuntimeError(
            f"the addernet CPU fast path is unavailable ({cpu_build._error}). Install a C++ compiler (g++, or set "
            "CXX), or call addernet_dist.ops.adder2d(..., backend=None), which falls back to the reference "
            "operator with one warning"
        )
    input, stride, dilation = _strided_1x1_as_dense(input, weight, stride, padding, dilation, out_hw)
    return AdderCPUFunction.apply(
        input, weight, stride, padding, dilation, float(p), grad_x, grad_w, out_hw
    )


def _strided_1x1_as_dense(input, weight, stride, padding, dilation, out_hw):
    """A strided 1×1 layer without padding reads only x[:, :, ::s_h, ::s_w]: take that (autograd scatters the
    input gradient back) and run a stride-1 layer on it, exactly the same operator. Strided, the kernels build
    and read a phase-split P of which they use one phase in s_h·s_w, and ∂X scatters into all of it. One
    thread, fwd+bwd: ResNet-50's 1×1 s2 1024→2048 (batch 2) 51.8 → 46.4 ms, 512→1024 39.2 → 36.6 ms,
    ResNet-20's 16→32 (batch 32) 3.14 → 2.42 ms; forward alone unchanged within noise."""
    if weight.shape[-2:] != (1, 1) or padding != (0, 0) or stride == (1, 1):
        return input, stride, dilation
    (sh, sw), (ho, wo) = stride, out_hw
    return input[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw], (1, 1), (1, 1)


if __name__ == "__main__":  # `python -m addernet_dist.kernels.cpu_adder`: build and report
    print("available:", is_available(), unavailable_reason() or "", file=sys.stderr)
