"""The ``speed`` check (CUDA: the adder forward vs cuDNN conv2d on ResNet-50 layer shapes, and the two
∂F candidate tiles against each other) and the ``tiles`` check (every rank of a real process group
launches the tiles rank 0 timed; tuning runs as a phase of the stall watchdog; the choices survive a
checkpoint round trip), with the ``tiles`` worker each rank runs (``addernet-selftest --tiles-worker``)."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from addernet_dist.selftest.kernels import kernel_module
from addernet_dist.selftest.plan import CheckFailed, DeviceDescription, fp32_adder_roofline
from addernet_dist.selftest.smoke import launch


def check_speed(desc: DeviceDescription, params: dict) -> dict:
    """Forward of the adder kernel vs cuDNN conv2d (fp32, TF32 off) on ResNet-50 layer shapes."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from addernet_dist.kernels import triton_adder as ta
    from addernet_dist.layer_shapes import adder_layer_shapes

    shapes = adder_layer_shapes(params["model"])
    if params.get("shapes") == "representative":
        # the 3×3 stride-1 layer of each stage and the two 1×1 layers of stage 3 (the most numerous):
        # 6 of the 22 distinct shapes, 24 of the 52 layers; each is tuned (5 tiles × 2–6 s of ptxas)
        shapes = [s for s in shapes if s.k == 3 and s.stride == 1] + [
            s for s in shapes if s.k == 1 and s.h == 14 and s.count >= 5
        ]
    roof = fp32_adder_roofline(desc.sms, desc.clock_mhz) if desc.sms and desc.clock_mhz else None
    n = params["batch"]
    rows = []
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for s in shapes:
            x = torch.randn(n, s.c, s.h, s.h, device="cuda")
            w = torch.randn(s.o, s.c, s.k, s.k, device="cuda")
            args = ((s.stride,) * 2, (s.pad,) * 2, (1, 1), 1.0, (s.p, s.p))
            t_add, t_conv = (
                do_bench(fn, warmup=10, rep=50) * 1e-3
                for fn in (
                    partial(ta.adder2d_forward, x, w, *args),
                    partial(F.conv2d, x, w, stride=s.stride, padding=s.pad),
                )
            )
            macs = n * s.macs_per_image
            rows.append(
                dict(
                    layer=s.label,
                    count=s.count,
                    adder_ms=t_add * 1e3,
                    conv_ms=t_conv * 1e3,
                    adder_tmacs=macs / t_add / 1e12,
                    conv_over_adder=t_conv / t_add,
                    roofline_fraction=(macs / t_add / roof) if roof else None,
                )
            )
        dw_rows = time_dw_candidates(ta, shapes, n, "cuda", params.get("dw_candidates", ()))
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    return {
        "batch": n,
        "fp32_adder_roofline_tmacs": roof / 1e12 if roof else None,
        "rows": rows,
        "dw_rows": dw_rows,
    }


def _do_bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50) * 1e-3


def time_dw_candidates(ta, shapes, n: int, device: str, candidates, bench=_do_bench) -> list[dict]:
    """Seconds of deterministic ∂F per layer shape for each candidate tile (``ta.DW_CONFIGS`` indices):
    the default (247 registers × 128 threads on sm_90 → 8 warps per SM) against the low-register tile,
    whose occupancy the issue model cannot judge (its div/mod gathers are latency bound)."""
    rows = []
    for s in shapes:
        x = torch.randn(n, s.c, s.h, s.h, device=device)
        w = torch.randn(s.o, s.c, s.k, s.k, device=device)
        g = torch.randn(n, s.o, s.p, s.p, device=device)
        args = ((s.stride,) * 2, (s.pad,) * 2, (1, 1), "full")
        row = {"layer": s.label, "count": s.count}
        for i in candidates:
            cfg = ta.DW_CONFIGS[i]
            kw = cfg.kwargs
            label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}/w{cfg.num_warps}"
            fn = partial(ta.adder2d_grad_weight, g, x, w, *args, deterministic=True, config=cfg)
            row[f"dw_ms[{label}]"] = bench(fn) * 1e3
        times = {k: v for k, v in row.items() if k.startswith("dw_ms[")}
        if times:
            row["dw_fastest"] = min(times, key=times.get)[6:-1]
        rows.append(row)
    return rows


def check_tiles(desc: DeviceDescription, params: dict, workdir: Path) -> dict:
    """Every rank of a real process group launches the same tiles (rank 0 times and broadcasts)."""
    out = workdir / "tiles"
    out.mkdir(parents=True, exist_ok=True)
    nproc = params["nproc"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "addernet_dist.selftest",
        "--tiles-worker",
        str(out),
        "--tiles-mode",
        params["mode"],
    ]
    launch(cmd, params["env"], 600, workdir / "tiles.log")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    if not ranks[0]["choices"]:
        raise CheckFailed("rank 0 tuned nothing")
    for r, d in enumerate(ranks[1:], 1):
        if d["choices"] != ranks[0]["choices"]:
            raise CheckFailed(
                f"rank {r} launched other tiles than rank 0: {d['choices']} vs {ranks[0]['choices']}"
            )
    for r, d in enumerate(ranks):
        if not d["restored_same"] or d["retimed_after_restore"]:
            raise CheckFailed(
                f"rank {r}: the tile choices did not survive the checkpoint round trip "
                f"(same: {d['restored_same']}, keys timed again: {d['retimed_after_restore']})"
            )
    return {
        "nproc": nproc,
        "keys": len(ranks[0]["choices"]),
        "timed_by_rank": [d["tunings"] for d in ranks],
        "retimed_after_restore": [d["retimed_after_restore"] for d in ranks],
    }


def tiles_worker(out: str, mode: str) -> None:
    """One rank of the ``tiles`` check: tune a few layer shapes under the process group, with the stall
    watchdog's short training limit (5 s; a tile's ptxas alone takes 2–6 s on a GPU) and tuning as its
    phase, as the trainer runs it; then the checkpoint round trip of the choices (``torch.save`` /
    ``torch.load(weights_only=True)``), after which the same launches must time nothing."""
    import torch.distributed as dist

    from addernet_dist.distributed import DistInfo
    from addernet_dist.guard import StallWatchdog
    from addernet_dist.kernels import tile_tuner
    from addernet_dist.tiles import TileChoices
    from addernet_dist.trainer import _tile_hooks

    cuda = mode == "compiled"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    dev = "cuda" if cuda else "cpu"
    info = DistInfo(
        rank, dist.get_world_size(), rank, torch.device(dev), "nccl" if cuda else "gloo"
    )
    tile_tuner.clear()
    with kernel_module(mode) as ta:
        tile_tuner.TUNING_ENABLED = True
        tuner = ta._adder_fwd_tuned
        if tuner is None:  # the interpreter: install a real tuner over the two small tiles
            tuner = tile_tuner.TileTuner(
                "fwd", ta._adder_fwd_kernel, ta.FWD_CONFIGS[3:5], ta._FWD_KEY
            )
            ta._adder_fwd_tuned = tuner
        shapes = [(64, 64, 3, 14), (256, 64, 1, 14)] if cuda else [(3, 5, 3, 6), (4, 6, 1, 5)]
        inputs = []
        for c, o, k, h in shapes:
            x = torch.randn(8 if cuda else 2, c, h, h, device=dev)
            inputs.append((x, torch.randn(o, c, k, k, device=dev), h - k + 1))
        watchdog = StallWatchdog(info, timeout_s=5.0, startup_timeout_s=600.0, startup_steps=0).start()
        tile_tuner_mod = _tile_hooks(watchdog)
        try:
            for x, w, p in inputs:
                ta.adder2d_forward(x, w, (1, 1), (0, 0), (1, 1), 1.0, (p, p), bn_stats=True)
                watchdog.beat(0)
            res = {"choices": tile_tuner.choices(), "tunings": tuner.tunings}
            # the checkpoint's "tiles" component, through a file as a resumed run reads it
            path = os.path.join(out, f"tiles_rank{rank}.pt")
            torch.save(TileChoices().state_dict(), path)
            tile_tuner.clear()
            TileChoices().load_state_dict(torch.load(path, weights_only=True))
            tuner.tunings = 0
            for x, w, p in inputs:
                ta.adder2d_forward(x, w, (1, 1), (0, 0), (1, 1), 1.0, (p, p), bn_stats=True)
            res["retimed_after_restore"] = tuner.tunings
            res["restored_same"] = tile_tuner.choices() == res["choices"]
        finally:
            tile_tuner_mod.set_phase_hooks(None, None)
            watchdog.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
