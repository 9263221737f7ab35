"""Step time of engine=deepspeed (ZeRO-0/1/2) against engine=ddp, and the cost of the eq. 33 hook.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node=2 benchmarks/bench_deepspeed.py \
        --config configs/debug.yaml --steps 10 [key=value ...]

Every engine runs in the same processes on the same batches, interleaved round-robin (one timed
step of each engine per round) so that machine load drifts hit all of them alike. Reported: median
step time per engine, its ratio to DDP, and the median time spent inside the eq. 33 + clipping
pre-hook (the per-layer norms, the one (L+1)-float all-reduce, the scaling) as a fraction of the
DeepSpeed step. Rank 0 prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

from addernet_dist.build import build_data, build_engine, build_model, seed_everything
from addernet_dist.config import load_config
from addernet_dist.distributed import init_distributed

ENGINES = {
    "ddp": ["engine=ddp"],
    "zero0": ["engine=deepspeed", "deepspeed.zero_stage=0"],
    "zero1": ["engine=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["engine=deepspeed", "deepspeed.zero_stage=2"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/debug.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    dist = init_distributed("auto")
    engines, hook_times = {}, {}
    for name, extra in ENGINES.items():
        cfg = load_config(args.config, [*args.overrides, *extra])
        seed_everything(cfg.train.seed)
        loader, _ = build_data(cfg, dist)
        engine = build_engine(cfg, build_model(cfg, loader.num_classes), dist, len(loader))
        engines[name] = engine
        proc = getattr(engine, "grad_processor", None)
        if proc is not None:
            hook_times[name] = []
            inner = proc._pre_step

            def timed(opt, a, kw, inner=inner, out=hook_times[name]):
                t = time.perf_counter()
                inner(opt, a, kw)
                out.append(time.perf_counter() - t)

            proc._pre_step = timed
            proc.detach()
            engine.optimizer.register_step_pre_hook(timed)
    batches = [b for _, b in zip(range(args.steps + args.warmup), loader)]
    times = {name: [] for name in engines}
    for i, (images, labels) in enumerate(batches):
        for name, engine in engines.items():
            dist.barrier()
            t = time.perf_counter()
            engine.forward_backward(images, labels)
            engine.step()
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    if not dist.is_main:
        return
    base = statistics.median(times["ddp"])
    print(f"world size {dist.world_size}, {args.steps} timed steps, overrides {args.overrides}")
    print("| engine | median step (ms) | vs DDP | eq. 33 + clip hook (ms) | hook share |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        hook = hook_times.get(name, [])[args.warmup :]
        h = statistics.median(hook) if hook else None
        hook_s = f"{h * 1e3:.2f}" if h is not None else "- (in DDP step)"
        share = f"{h / med:.1%}" if h is not None else "-"
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}x | {hook_s} | {share} |")


if __name__ == "__main__":
    main()
