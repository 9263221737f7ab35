"""addernet-warmup: compile (and tune) every Triton adder kernel a config's run will launch, before the run.

A cold Triton cache costs minutes in the first steps of a large job: each layer shape × code path
compiles its tiles (2–6 s of ptxas each) and the tuner times them. Run this once per config on one GPU
of the cluster, with the same ``TRITON_CACHE_DIR`` the job will use (a shared filesystem), then launch:

    addernet-warmup --config configs/imagenet_resnet50.yaml --gpus 8 --tile-cache runs/r50/tiles.json
    export ADDERNET_TILE_CACHE=runs/r50/tiles.json   # every rank reads the same tiles: no tuning at all
    torchrun --nproc_per_node=8 -m addernet_dist.train --config configs/imagenet_resnet50.yaml

**On a GPU** it builds the config's model exactly as the trainer does (backend, Adder+BN fusion,
channels_last, bf16 autocast) and runs, for every adder exponent the ℓp schedule will use (p_start,
a fractional p, p_end: three code paths), a training step (forward + ∂X + ∂F) and an evaluation forward
(the fused inference epilogue), at the per-GPU batch and at a short batch (a batch size that is not a
multiple of 16 is a separate Triton specialisation). That fills Triton's on-disk cache with exactly what
the run will request and writes the tile choices to ``--tile-cache`` (kernels/tile_tuner.py). The
tiles do not depend on the batch size, so evaluation and the last short batch reuse them.

**Without a GPU** (a login node) it ahead-of-time compiles every kernel × tile the model needs (each
filter size of the model × code path) for ``--cc`` with Triton's bundled ptxas, and reports registers,
spills and compile time. That proves the kernels build for the target and shows the cold-start cost,
but it does NOT fill the runtime cache: Triton's runtime cache key includes the argument
specialisation (alignment and divisibility of every pointer and integer), which only a launch on the
GPU determines. Run the GPU form on a compute node for that.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from addernet_dist.config import ConfigError, load_config
from addernet_dist.tiles import WarmupPlan, tune_tiles, warmup_plan  # shared with the trainer

__all__ = ["WarmupPlan", "aot_compile", "main", "warm_model", "warmup_plan"]


def warm_model(cfg, plan: WarmupPlan, num_classes: int, device: str = "cuda", log=print) -> int:
    """Run the model's kernels for every (p, batch) of the plan — a training step and an evaluation
    forward each — on ``device`` (the GPU; tests run the same steps on CPU). Returns the steps run."""
    from addernet_dist.build import build_model
    from addernet_dist.engine.base import maybe_fuse_adder_bn, resolve_autocast_dtype

    device = torch.device(device)
    model = build_model(cfg, num_classes).to(device)  # its adder layers carry adder.backend
    fused = maybe_fuse_adder_bn(model, cfg.adder.fuse_bn, device)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the trainer's autocast dtype for train.precision on this device (the engines' decision, e.g. a
    # ConfigError for bf16 on a pre-Ampere GPU), under the trainer's one autocast helper
    dtype = resolve_autocast_dtype(plan.precision, device)
    log(
        f"warm-up: {cfg.model.name}, {fused} fused Adder+BN pairs, p {plan.p_values}, batches {plan.batches}"
    )
    # the trainer's own startup tuning steps (tiles.tune_tiles), at every batch of the plan
    return tune_tiles(
        model,
        plan.p_values,
        plan.batches,
        plan.image_size,
        device=device,
        autocast_dtype=dtype,
        channels_last=plan.channels_last,
        log_fn=log,
    )


def aot_compile(model_name: str, ccs: list[int], limit: int | None = None, log=print) -> list[dict]:
    """Compile every kernel × tile for each filter size of ``model_name`` (no GPU); one row per compile."""
    from addernet_dist.kernels import aot
    from addernet_dist.layer_shapes import adder_layer_shapes

    sizes = sorted({s.k for s in adder_layer_shapes(model_name)})
    rows = []
    for k in sizes:
        specs = aot.kernel_specs(r=k, s=k)
        for spec in specs[:limit] if limit else specs:
            for cc in ccs:
                t0 = time.perf_counter()
                compiled = aot.compile_spec(spec, cc)
                use = aot.resource_usage(compiled.asm["cubin"])
                rows.append(
                    dict(
                        kernel=f"{k}x{k} {spec.label}",
                        cc=cc,
                        seconds=time.perf_counter() - t0,
                        **use,
                    )
                )
                log(
                    f"  sm_{cc} {k}×{k} {spec.label:60s} regs={use['registers']:3d} "
                    f"spill={use['stack']:3d} B {rows[-1]['seconds']:.1f} s"
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="addernet-warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the run's YAML config")
    ap.add_argument("overrides", nargs="*", help="the run's dotted overrides")
    ap.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs of the run (per-GPU batch); default: this node's",
    )
    ap.add_argument("--tile-cache", default=None, help="write the tile choices here (GPU form)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--cc", type=int, nargs="+", default=[90], help="targets of the CPU (AOT) form")
    ap.add_argument(
        "--limit", type=int, default=None, help="CPU form: first N kernel specs per filter size"
    )
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        gpus = args.gpus or max(1, torch.cuda.device_count())
        plan = warmup_plan(cfg, gpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        from addernet_dist.kernels import tile_tuner

        try:
            warm_model(cfg, plan, args.num_classes)
        except ConfigError as e:  # e.g. train.precision=bf16 on a GPU older than Ampere, as the trainer says
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.tile_cache:
            n = tile_tuner.save_tile_cache(args.tile_cache)
            print(
                f"wrote {n} tile choices to {args.tile_cache}; launch with "
                f"ADDERNET_TILE_CACHE={args.tile_cache}"
            )
    else:
        if args.tile_cache:
            print(
                "error: --tile-cache needs a GPU (tiles are chosen by timing them)", file=sys.stderr
            )
            return 2
        print(
            f"no GPU: ahead-of-time compile for sm_{args.cc} (checks the build; does not fill the "
            "runtime cache, see --help)"
        )
        aot_compile(cfg.model.name, args.cc, args.limit)
    print(f"warm-up done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
