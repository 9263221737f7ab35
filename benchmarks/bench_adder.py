"""Adder operator benchmark: fast path vs the original AdderNet unfold code, torch.cdist and the reference.

Per layer shape of a model, forward and forward+backward time (best of interleaved repeats, so a
noisy shared machine slows every method alike), adder-MAC/s and the ratio of every method to the fast path.

    # CPU (the compiled fast path; also prints its first-call compile time with an empty cache):
    python benchmarks/bench_adder.py --device cpu --shapes resnet20 --batch 32
    # GPU (Triton kernels; adds cuDNN conv2d fp32 with TF32 off and bf16, peak memory, roofline fraction):
    python benchmarks/bench_adder.py --device cuda --shapes resnet50 --batch 64
    # CPU against the physical bar, F.conv2d (oneDNN) of the same shapes, one and two threads:
    python benchmarks/bench_adder.py --device cpu --vs-conv resnet20:32,resnet50:2 --repeat 5
    # eval-mode images/s of an adder ResNet-50 (BN folded into the CPU epilogue) vs its CNN twin:
    python benchmarks/bench_adder.py --device cpu --eval resnet50 --eval-batches 1,32 --threads 1 --clock cpu
    # end-to-end CPU training images/s of an adder ResNet-20, fast path vs reference:
    python benchmarks/bench_adder.py --device cpu --train resnet20 --batch 32

Methods:
  fast       adder2d with the device's fast backend ("cpu" or "triton")
  reference  addernet_dist.ops.reference.adder2d_reference (chunked pure PyTorch)
  original   the algorithm of the original AdderNet code, re-implemented: unfold X, materialise the
             (Cout × K × M) broadcast |W − X| and sum it; its backward materialises the same broadcast
             twice (X − W for the filter gradient, HardTanh(W − X) for the input gradient)
  cdist      torch.cdist(p=1) between unfolded patches (N, L, K) and filters (O, K), autograd backward
  conv_fp32 / conv_bf16 (GPU only)  F.conv2d of the same shape: cuDNN, TF32 off / bf16
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from addernet_dist.ops import adder2d
from addernet_dist.ops.reference import adder2d_reference


@dataclass(frozen=True)
class Shape:
    name: str
    cin: int
    cout: int
    hw: int  # input height = width
    k: int
    stride: int
    pad: int
    count: int = 0  # 3×3 adder layers of this shape in the network (0: not tallied)


def _resnet_cifar(widths=(16, 32, 64), hw=32, blocks=3) -> list[Shape]:
    # ResNet-20: 3 stages × 3 blocks × 2 convs; a stage's first conv is strided after stage 1
    out = []
    for i, c in enumerate(widths):
        s = hw >> i
        if i:
            out.append(Shape(f"stage{i + 1}.down", c // 2, c, s * 2, 3, 2, 1, 1))
        out.append(Shape(f"stage{i + 1}", c, c, s, 3, 1, 1, 2 * blocks - (1 if i else 0)))
    return out


def _resnet18() -> list[Shape]:
    out = []
    for i, c in enumerate((64, 128, 256, 512)):
        s = 56 >> i
        if i:
            out.append(Shape(f"layer{i + 1}.0.conv1", c // 2, c, s * 2, 3, 2, 1))
        out.append(Shape(f"layer{i + 1}.conv3x3", c, c, s, 3, 1, 1))
    return out


def _resnet50() -> list[Shape]:
    out = []
    for i, (mid, c_out) in enumerate(((64, 256), (128, 512), (256, 1024), (512, 2048))):
        s = 56 >> i
        c_in = c_out if i == 0 else c_out // 2
        out.append(Shape(f"layer{i + 1}.conv1x1a", c_in, mid, s, 1, 1, 0))
        out.append(Shape(f"layer{i + 1}.conv3x3", mid, mid, s, 3, 1, 1))
        out.append(Shape(f"layer{i + 1}.conv1x1b", mid, c_out, s, 1, 1, 0))
    return out


SHAPES = {"resnet20": _resnet_cifar, "resnet18": _resnet18, "resnet50": _resnet50}


# ---- baselines -------------------------------------------------------------------------------------------


class _OriginalAdder(torch.autograd.Function):
    """The original AdderNet algorithm on columns: W (O, K), X (K, M) → (O, M) via the full broadcast."""

    @staticmethod
    def forward(ctx, w_ok, x_km):
        ctx.save_for_backward(w_ok, x_km)
        return -(w_ok.unsqueeze(2) - x_km.unsqueeze(0)).abs().sum(1)

    @staticmethod
    def backward(ctx, g_om):
        w_ok, x_km = ctx.saved_tensors
        d = x_km.unsqueeze(0) - w_ok.unsqueeze(2)  # (O, K, M), as the original builds it
        gw = (d * g_om.unsqueeze(1)).sum(2)
        # the original code rescales the filter gradient inside backward (its adaptive learning rate)
        gw = gw / gw.norm(p=2).clamp(min=1e-12) * math.sqrt(w_ok.numel()) / 5
        gx = (-d.clamp(-1, 1) * g_om.unsqueeze(1)).sum(0)
        return gw, gx


def original_adder2d(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h - kh + 2 * padding) // stride + 1
    wo = (wd - kw + 2 * padding) // stride + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, K, L)
    x_km = cols.permute(1, 2, 0).reshape(cols.shape[1], -1)  # (K, L·N): the original's column order
    y = _OriginalAdder.apply(w.reshape(o, -1), x_km)
    return y.reshape(o, ho, wo, n).permute(3, 0, 1, 2).contiguous()


def cdist_adder2d(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h - kh + 2 * padding) // stride + 1
    wo = (wd - kw + 2 * padding) // stride + 1
    rows = F.unfold(x, (kh, kw), padding=padding, stride=stride).transpose(1, 2)  # (N, L, K)
    y = -torch.cdist(rows, w.reshape(1, o, -1).expand(n, o, -1), p=1)  # (N, L, O)
    return y.transpose(1, 2).reshape(n, o, ho, wo)


# ---- timing ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(
    fns: dict, repeat: int, device: torch.device, clock=time.perf_counter
) -> dict:
    """Best-of-n seconds per call, methods interleaved round by round.

    On a shared machine the minimum is the least disturbed run, and interleaving spreads slow phases of
    background load over all methods. Each round gives every method about the same wall time (at least one
    call, up to 20 for a method 20x faster than the slowest), so the fast methods — whose short runs are
    the easiest to disturb — get as many chances as the slow ones get seconds. ``clock``:
    ``time.perf_counter`` (wall) or ``time.process_time`` (CPU seconds of this process: with one thread,
    the work itself, immune to other processes time-slicing the cores).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    first = {}
    for k, fn in fns.items():  # warm-up (compile, autotune, allocator); also sizes the rounds
        fn()
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        first[k] = clock() - t0
    slowest = max(first.values())
    calls = {k: max(1, min(20, round(slowest / max(t, 1e-9)))) for k, t in first.items()}
    for _ in range(repeat):
        for k, fn in fns.items():
            for _ in range(calls[k]):
                _sync(device)
                t0 = clock()
                fn()
                _sync(device)
                times[k].append(clock() - t0)
    return {k: min(v) for k, v in times.items()}


def _fits(shape: Shape, batch: int, elem: int, limit_bytes: float) -> bool:
    """Whether the original code's (Cout × K × M) broadcast (built twice in its backward) fits."""
    ho = (shape.hw + 2 * shape.pad - shape.k) // shape.stride + 1
    m = batch * ho * ho
    return 3 * shape.cout * shape.cin * shape.k**2 * m * elem < limit_bytes


try:  # the roofline kernel needs Triton; the CPU benchmark does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a dependency, but keep the CPU path importable
    triton = None

if triton is not None:

    @triton.jit
    def _fma_chain_kernel(
        out_ptr,  # (grid · BLOCK,) fp32, written once so the chains are not dead code
        iters,  # FMA steps per chain
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = offs.to(tl.float32) * 1e-9
        b0 = a + 1.0
        b1 = a + 2.0
        b2 = a + 3.0
        b3 = a + 4.0
        for _ in range(iters):  # 4 independent chains per thread hide the 4-cycle FMA latency
            b0 = b0 * 0.999 + 0.5
            b1 = b1 * 0.999 + 0.5
            b2 = b2 * 0.999 + 0.5
            b3 = b3 * 0.999 + 0.5
        tl.store(out_ptr + offs, b0 + b1 + b2 + b3)


def measure_fp32_vector_roofline() -> float:
    """Measured FP32 FMA instructions/s of this GPU (register-resident FMA chains, ``_fma_chain_kernel``).

    An adder-MAC needs at least two FP32 instructions (d = x − w; acc += |d|), so the adder roofline in
    adder-MAC/s is half of this number.
    """
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block, iters = 1024, 4096
    out = torch.empty(sms * 16 * block, device="cuda")
    grid = (out.numel() // block,)
    _fma_chain_kernel[grid](out, iters, BLOCK=block)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        _fma_chain_kernel[grid](out, iters, BLOCK=block)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    return out.numel() * iters * 4 / dt


def _methods(device: torch.device, fast_backend: str, shape: Shape, args) -> dict:
    s, pd, p = shape.stride, shape.pad, args.p
    methods = {
        "fast": lambda x, w: adder2d(x, w, s, pd, 1, p, backend=fast_backend),
        "reference": lambda x, w: adder2d_reference(x, w, s, pd, 1, p),
    }
    if p == 1.0:  # both baselines compute the ℓ1 forward only
        methods["cdist"] = lambda x, w: cdist_adder2d(x, w, s, pd)
        if _fits(shape, args.batch, 4, args.original_limit_gb * 2**30):
            methods["original"] = lambda x, w: original_adder2d(x, w, s, pd)
    if device.type == "cuda":
        methods["conv_fp32"] = lambda x, w: F.conv2d(x, w, None, s, pd)
        methods["conv_bf16"] = lambda x, w: F.conv2d(x.bfloat16(), w.bfloat16(), None, s, pd)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods.split(",")}
    return methods


def _fwd_runner(f, x, w):
    def run():
        with torch.no_grad():
            f(x, w)

    return run


def _fwd_bwd_runner(f, xg, wg, gy):
    def run():
        y = f(xg, wg)
        torch.autograd.grad(y, (xg, wg), gy.to(y.dtype))

    return run


def bench_layers(args) -> None:
    device = torch.device(args.device)
    fast_backend = "triton" if device.type == "cuda" else "cpu"
    if device.type == "cpu" and not args.skip_compile_time:
        from addernet_dist.kernels import cpu_adder

        with (
            tempfile.TemporaryDirectory() as tmp
        ):  # an empty cache: the first-call cost a fresh CI pays
            os.environ["ADDERNET_CACHE_DIR"] = tmp
            t0 = time.perf_counter()
            cpu_adder.build(force=True)
            print(f"# CPU fast path first-call compile: {time.perf_counter() - t0:.1f} s (wall)")
            os.environ.pop("ADDERNET_CACHE_DIR")
    roof = measure_fp32_vector_roofline() / 2 if device.type == "cuda" else None
    if roof:
        print(f"# measured FP32 vector roofline: {roof / 1e12:.2f} T adder-MAC/s")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    if clock is time.process_time:
        print("# times are CPU seconds of this process (--clock cpu), best of the interleaved runs")
    cols = ["method", "fwd ms", "fwd+bwd ms", "G adder-MAC/s fwd", "x fast (fwd+bwd)"]
    if device.type == "cuda":
        cols += ["peak MiB", "% roofline fwd"]
    print(f"# {args.shapes} shapes, batch {args.batch}, p={args.p}, device {device}")
    ratios: dict[str, list[float]] = {}
    totals: dict[str, float] = {}  # Σ count × fwd+bwd time, when every shape has a count
    shapes = SHAPES[args.shapes]()
    for shape in shapes:
        ho = (shape.hw + 2 * shape.pad - shape.k) // shape.stride + 1
        macs = args.batch * ho * ho * shape.cin * shape.k**2 * shape.cout
        x = torch.randn(args.batch, shape.cin, shape.hw, shape.hw, device=device)
        w = torch.randn(shape.cout, shape.cin, shape.k, shape.k, device=device)
        s, pd = shape.stride, shape.pad
        methods = _methods(device, fast_backend, shape, args)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        gy = torch.randn(args.batch, shape.cout, ho, ho, device=device)
        fwd = {k: _fwd_runner(f, x, w) for k, f in methods.items()}
        fwd_bwd = {k: _fwd_bwd_runner(f, xg, wg, gy) for k, f in methods.items()}
        t_f = _time_interleaved(fwd, args.repeat, device, clock)
        peak = {}
        if device.type == "cuda":
            for k, run in fwd_bwd.items():
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                peak[k] = (torch.cuda.max_memory_allocated() - base) / 2**20
        t_fb = _time_interleaved(fwd_bwd, args.repeat, device, clock)
        print(
            f"\n## {shape.name}: {shape.cin}->{shape.cout} {shape.hw}x{shape.hw} k{shape.k} s{s} p{pd}"
        )
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for k in methods:
            ratio = t_fb[k] / t_fb["fast"] if "fast" in t_fb else float("nan")
            ratios.setdefault(k, []).append(ratio)
            totals[k] = totals.get(k, 0.0) + shape.count * t_fb[k]
            row = [k, f"{t_f[k] * 1e3:.2f}", f"{t_fb[k] * 1e3:.2f}", f"{macs / t_f[k] / 1e9:.2f}"]
            row.append(f"{ratio:.1f}")
            if device.type == "cuda":
                frac = (
                    100 * macs / t_f[k] / roof
                    if k not in ("conv_fp32", "conv_bf16")
                    else float("nan")
                )
                row += [f"{peak[k]:.0f}", f"{frac:.0f}"]
            print("| " + " | ".join(row) + " |")
    print("\n## geometric mean over shapes of (method fwd+bwd time) / (fast fwd+bwd time)")
    for k, r in ratios.items():
        print(f"- {k}: {math.exp(sum(map(math.log, r)) / len(r)):.1f}x  (shapes: {len(r)})")
    if all(sh.count for sh in shapes) and "fast" in totals:
        n = sum(sh.count for sh in shapes)
        print(f"\n## the network's {n} 3x3 adder layers (shape x count), fwd+bwd ms and / fast")
        for k, t in totals.items():
            print(f"- {k}: {t * 1e3:.1f} ms  {t / totals['fast']:.1f}x")


# ---- against the physical bar: a convolution of the same shape (oneDNN on CPU) ---------------------------


def model_layer_shapes(name: str) -> list[Shape]:
    """Every distinct adder-layer shape of a zoo model with its multiplicity (stem and classifier excluded).

    Read off the model itself (a forward of its CNN twin with hooks), so 1×1 layers, the strided first
    blocks and the downsample projections are all there: 22 shapes / 52 layers for ResNet-50,
    7 / 20 for ResNet-20.
    """
    from collections import Counter

    from torch import nn

    from addernet_dist.models import create_model
    from addernet_dist.models.registry import model_info

    model = create_model(name, conv="conv").eval()
    seen: Counter = Counter()
    hooks = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod_name != "conv1":  # conv1: the full-precision stem

            def hook(m, inp):
                key = (m.in_channels, m.out_channels, inp[0].shape[-1], m.kernel_size[0])
                seen[(*key, m.stride[0], m.padding[0])] += 1

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, *model_info(name).input_shape))
    for h in hooks:
        h.remove()
    return [
        Shape(f"{cin}->{cout} {hw}x{hw} k{k} s{s}", cin, cout, hw, k, s, pd, n)
        for (cin, cout, hw, k, s, pd), n in seen.items()
    ]


def _time_both_clocks(fns: dict, repeat: int) -> dict:
    """Best-of-``repeat`` (process CPU seconds, wall seconds) per call, one phase per thread count.

    Each entry of ``fns`` is (threads, fn). Within a phase (one thread count) every method runs once per
    round, so methods interleave and share the machine's slow phases. The thread counts get separate
    phases, with a pause between them: after a two-thread torch op, torch's OpenMP (libgomp) worker keeps
    spin-waiting for a while, and ``time.process_time`` charged that spin to the next one-thread call
    (a one-thread adder call right after a two-thread conv read 17.6 ms CPU for 8.5 ms wall; alone it
    reads 10.1 / 10.1), which made the interleaved one-thread numbers up to ~2x too high.
    """
    best = {k: [math.inf, math.inf] for k in fns}
    for phase in sorted({t for t, _ in fns.values()}):
        torch.set_num_threads(phase)
        time.sleep(0.2)  # let any spinning OpenMP worker of the previous phase go to sleep
        mine = {k: fn for k, (t, fn) in fns.items() if t == phase}
        for fn in mine.values():  # warm-up: allocator, oneDNN primitive cache, thread pools
            fn()
        for _ in range(repeat):
            for k, fn in mine.items():
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                c1, w1 = time.process_time(), time.perf_counter()
                best[k][0] = min(best[k][0], c1 - c0)
                best[k][1] = min(best[k][1], w1 - w0)
    return best


def bench_vs_conv(args) -> None:
    """Adder fast path / F.conv2d (oneDNN) per layer shape and per network, p given, fwd and fwd+bwd.

    One thread: process CPU time (immune to other processes time-slicing the cores). Two threads: wall
    time (CPU time would count the helpers' spin-waiting); the scaling column is best one-thread wall /
    best two-thread wall of the same method, measured in the one- and two-thread phases of the same run
    (see _time_both_clocks: separate phases, methods interleaved within each).
    """
    nets = [tuple(item.split(":")) for item in args.vs_conv.split(",")]
    p = args.p
    for net, batch in nets:
        batch = int(batch)
        shapes = model_layer_shapes(net)
        print(f"\n# {net}: {len(shapes)} distinct adder-layer shapes, "
              f"{sum(s.count for s in shapes)} layers, batch {batch}, p={p}")  # fmt: skip
        print("| layer | × | conv fwd ms | adder fwd / conv | conv f+b ms | adder f+b / conv "
              "| 2T/1T conv | 2T/1T adder | 2T adder / 2T conv |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        tot: dict[str, float] = {}
        for sh in shapes:
            s, pd = sh.stride, sh.pad
            ho = (sh.hw + 2 * pd - sh.k) // s + 1
            x = torch.randn(batch, sh.cin, sh.hw, sh.hw)
            w = torch.randn(sh.cout, sh.cin, sh.k, sh.k)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            gy = torch.randn(batch, sh.cout, ho, ho)
            methods = {
                "adder": lambda x, w, s=s, pd=pd: adder2d(x, w, s, pd, 1, p, backend="cpu"),
                "conv": lambda x, w, s=s, pd=pd: F.conv2d(x, w, None, s, pd),
            }
            fns = {}
            for t in (1, 2):
                for m, f in methods.items():
                    fns[(m, "f", t)] = (t, _fwd_runner(f, x, w))
                    fns[(m, "fb", t)] = (t, _fwd_bwd_runner(f, xg, wg, gy))
            best = _time_both_clocks(fns, args.repeat)
            cpu1 = {k[:2]: v[0] for k, v in best.items() if k[2] == 1}
            wall = {k: v[1] for k, v in best.items()}
            for m in methods:
                for kind in ("f", "fb"):
                    key = f"{m} {kind}"
                    tot[key + " 1T cpu"] = (
                        tot.get(key + " 1T cpu", 0.0) + sh.count * cpu1[(m, kind)]
                    )
                    for t in (1, 2):
                        k2 = f"{key} {t}T wall"
                        tot[k2] = tot.get(k2, 0.0) + sh.count * wall[(m, kind, t)]
            row = [
                sh.name,
                str(sh.count),
                f"{cpu1[('conv', 'f')] * 1e3:.2f}",
                f"{cpu1[('adder', 'f')] / cpu1[('conv', 'f')]:.2f}",
                f"{cpu1[('conv', 'fb')] * 1e3:.2f}",
                f"**{cpu1[('adder', 'fb')] / cpu1[('conv', 'fb')]:.2f}**",
                f"{wall[('conv', 'fb', 1)] / wall[('conv', 'fb', 2)]:.2f}",
                f"{wall[('adder', 'fb', 1)] / wall[('adder', 'fb', 2)]:.2f}",
                f"{wall[('adder', 'fb', 2)] / wall[('conv', 'fb', 2)]:.2f}",
            ]
            print("| " + " | ".join(row) + " |", flush=True)
        print(f"\n## {net} network total (Σ count × best time), batch {batch}, p={p}")
        for kind, label in (("f", "forward"), ("fb", "forward+backward")):
            a1, c1 = tot[f"adder {kind} 1T cpu"], tot[f"conv {kind} 1T cpu"]
            a2, c2 = tot[f"adder {kind} 2T wall"], tot[f"conv {kind} 2T wall"]
            aw1, cw1 = tot[f"adder {kind} 1T wall"], tot[f"conv {kind} 1T wall"]
            print(
                f"- {label}: 1 thread (CPU time) adder {a1 * 1e3:.1f} ms / conv {c1 * 1e3:.1f} ms = "
                f"**{a1 / c1:.2f}x conv**; 2 threads (wall) adder {a2 * 1e3:.1f} ms / conv "
                f"{c2 * 1e3:.1f} ms = {a2 / c2:.2f}x; 2T speed-up (wall 1T / wall 2T): adder "
                f"**{aw1 / a2:.2f}x**, conv {cw1 / c2:.2f}x"
            )


def bench_eval(args) -> None:
    """Eval-mode images/s of an adder model (BN folded into the CPU epilogue, and unfused) vs its CNN twin.

    Same threads for all three, methods interleaved, best of ``--steps`` forwards (process CPU time with
    ``--clock cpu``, else wall). Random weights, BN at its initial statistics (speed does not depend on
    the values).
    """
    from addernet_dist.models import create_model
    from addernet_dist.models.fusion import fuse_adder_bn
    from addernet_dist.models.registry import model_info

    info = model_info(args.eval)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    adder = create_model(args.eval, conv="adder").eval()
    cnn = create_model(args.eval, conv="conv").eval()
    fused = fuse_adder_bn(create_model(args.eval, conv="adder")).eval()
    fused.load_state_dict(adder.state_dict())
    models = {"adder (BN folded)": fused, "adder (unfused)": adder, "CNN twin": cnn}
    if args.methods:
        models = {k: v for k, v in models.items() if k.split()[0] in args.methods.split(",")}
    print(
        f"# {args.eval} eval forward, {torch.get_num_threads()} thread(s), best of {args.steps} "
        f"({'CPU' if clock is time.process_time else 'wall'} seconds), images/s"
    )
    print("| batch | " + " | ".join(models) + " | adder folded / CNN |")
    print("|---|" + "---|" * (len(models) + 1))
    for batch in (int(b) for b in args.eval_batches.split(",")):
        x = torch.randn(batch, *info.input_shape)
        best = dict.fromkeys(models, math.inf)
        with torch.no_grad():
            for m in models.values():
                m(x)  # warm-up
            for _ in range(args.steps):
                for k, m in models.items():
                    t0 = clock()
                    m(x)
                    best[k] = min(best[k], clock() - t0)
        ips = {k: batch / t for k, t in best.items()}
        row = [str(batch), *(f"{v:.2f}" for v in ips.values())]
        ratio = (
            ips["adder (BN folded)"] / ips["CNN twin"]
            if {"adder (BN folded)", "CNN twin"} <= ips.keys()
            else float("nan")
        )
        print("| " + " | ".join(row) + f" | {ratio:.2f} |", flush=True)


def bench_train(args) -> None:
    """End-to-end training images/s of an adder model on random data: fast backend vs reference."""
    from addernet_dist.models import create_model
    from addernet_dist.models.registry import model_info
    from addernet_dist.ops import dispatch

    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    info = model_info(args.train)
    x = torch.randn(args.batch, *info.input_shape, device=device)
    y = torch.randint(0, info.num_classes, (args.batch,), device=device)
    results = {}
    for backend in ("fast", "reference"):
        dispatch.set_default_backend(
            ("triton" if device.type == "cuda" else "cpu") if backend == "fast" else "reference"
        )
        torch.manual_seed(0)
        model = create_model(args.train, conv="adder", p=args.p).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up
        _sync(device)
        times = []
        for _ in range(args.steps):
            t0 = clock()
            step()
            _sync(device)
            times.append(clock() - t0)
        results[backend] = args.batch / min(times)
    dispatch.set_default_backend(None)
    print(
        f"# {args.train} adder training, batch {args.batch}, p={args.p}, best of {args.steps} steps "
        f"({'CPU' if clock is time.process_time else 'wall'} seconds)"
    )
    for k, v in results.items():
        print(f"- {k}: {v:.1f} images/s")
    print(f"- speed-up: {results['fast'] / results['reference']:.1f}x")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="resnet20")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--methods", default="", help="comma list to restrict (default: all that fit)")
    ap.add_argument(
        "--original-limit-gb",
        type=float,
        default=8.0,
        help="skip the original code when its broadcasts would exceed this",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: time.process_time (use with --threads 1 on a machine shared with other jobs)",
    )
    ap.add_argument(
        "--skip-compile-time", action="store_true", help="CPU: don't time a from-scratch build"
    )
    ap.add_argument("--train", default="", help="model name: end-to-end training images/s instead")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--eval", default="", help="model name: eval-mode images/s, adder vs CNN twin")
    ap.add_argument("--eval-batches", default="1,32", help="--eval: comma list of batch sizes")
    ap.add_argument(
        "--vs-conv",
        default="",
        help="CPU: adder / F.conv2d per layer and network total, one and two threads, for "
        "'net:batch,...' (e.g. resnet20:32,resnet50:2); every distinct layer shape of each net",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = (
        ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        if hasattr(os, "getloadavg")
        else ""
    )
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_cpu_name()}{load}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"command: python {' '.join(sys.argv)}"
    )
    if args.device == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name(0)}")
    if args.vs_conv:
        bench_vs_conv(args)
    elif args.eval:
        bench_eval(args)
    elif args.train:
        bench_train(args)
    else:
        bench_layers(args)


if __name__ == "__main__":
    main()
