"""Static report of the Triton adder kernels from their compiled cubins — no GPU needed.

For every kernel × tuning config (as in ``addernet_dist.kernels.aot``, 3×3 filters): registers per
thread, spill (stack) bytes, shared memory, and the SASS of the hot loop (the innermost channel loop of
the forward/∂X kernels, the per-position loop of ∂F): its instruction count, the MACs one thread does per
iteration (BLOCK_M·BLOCK_N·BLOCK_K / threads), and instructions per adder-MAC broken down into FP32
arithmetic, MUFU (SFU), loads and the rest (integer/address/predicate/move). The ideal forward is 2 per
MAC (``FADD d = x − w``; ``FADD acc += |d|``, the abs folded as an operand modifier).

    python benchmarks/kernel_report.py                 # sm_90, markdown table on stdout
    python benchmarks/kernel_report.py --cc 80 --full  # sm_80, every code path × every config
    python benchmarks/kernel_report.py --dump /tmp/sass # also write each kernel's SASS
    python benchmarks/kernel_report.py --sfu-probe      # MUFUs per result of the f32 / packed 16-bit SFU forms
    python benchmarks/kernel_report.py --layers         # every ResNet-18/50 layer shape + modelled images/s
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from addernet_dist.kernels import aot

_LABEL = re.compile(r"^(\.L_x_\d+):")
_INSTR = re.compile(
    r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)(.*);"
)
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")

FP32_ARITH = {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSET"}
LOADS = {"LDG", "LDS", "LDC", "LDL", "ULDC", "LDSM"}


def disassemble(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [aot.nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
    return out.splitlines()


@dataclass
class Loop:
    start: int  # line index of the label
    end: int  # line index of the backward branch
    ops: list[str]  # opcodes (without modifiers) in the loop body

    def count(self, names: set[str] | str) -> int:
        names = {names} if isinstance(names, str) else names
        return sum(op in names for op in self.ops)


def find_loops(lines: list[str]) -> list[Loop]:
    """Innermost-first list of loops: a backward branch to a label defines [label, branch]."""
    labels = {}
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln)
        if m:
            labels[m.group(1)] = i
    loops = []
    for j, ln in enumerate(lines):
        m = _INSTR.match(ln)
        if not m or m.group(2) != "BRA":
            continue
        t = _BRANCH_TARGET.search(ln)
        if t and labels.get(t.group(1), j + 1) < j:
            i = labels[t.group(1)]
            ops = [mm.group(2) for mm in map(_INSTR.match, lines[i : j + 1]) if mm]
            loops.append(Loop(i, j, ops))
    # Innermost: no other loop strictly inside it.
    inner = [
        lp
        for lp in loops
        if not any(o is not lp and lp.start < o.start and o.end < lp.end for o in loops)
    ]
    return inner


def hot_loop(lines: list[str]) -> Loop | None:
    """The innermost loop doing the most FP32/MUFU work (the unrolled channel loop of one tap)."""
    loops = find_loops(lines)
    if not loops:
        return None
    return max(loops, key=lambda lp: lp.count(FP32_ARITH | {"MUFU"}))


def report(cc: int, full: bool, dump: str | None, only: str | None = None) -> list[dict]:
    rows = []
    for spec in aot.kernel_specs(r=3, s=3, full=full):
        if only and only not in spec.label:
            continue
        k = aot.compile_spec(spec, cc)
        use = aot.resource_usage(k.asm["cubin"])
        lines = disassemble(k.asm["cubin"])
        if dump:
            os.makedirs(dump, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.label)
            with open(os.path.join(dump, f"sm{cc}_{safe}.sass"), "w") as f:
                f.write("\n".join(lines))
        lp = hot_loop(lines)
        row = dict(
            kernel=spec.label, regs=use["registers"], stack=use["stack"], smem=k.metadata.shared
        )
        if lp is not None:
            macs = spec.macs_per_iter
            n = len(lp.ops)
            row.update(
                loop_instrs=n,
                macs=macs,
                per_mac=n / macs,
                fp32=lp.count(FP32_ARITH) / macs,
                mufu=lp.count("MUFU") / macs,
                loads=lp.count(LOADS) / macs,
                other=(n - lp.count(FP32_ARITH | {"MUFU"} | LOADS)) / macs,
            )
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], cc: int) -> str:
    head = (
        f"| kernel (sm_{cc}, 3×3) | regs | spill B | smem B | hot-loop instrs | MACs/iter/thread "
        "| **SASS / MAC** | FP32 | MUFU | loads | other |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = ""
    for r in rows:
        if "per_mac" in r:
            body += (
                f"| {r['kernel']} | {r['regs']} | {r['stack']} | {r['smem']} | {r['loop_instrs']} "
                f"| {r['macs']} | **{r['per_mac']:.2f}** | {r['fp32']:.2f} | {r['mufu']:.2f} "
                f"| {r['loads']:.2f} | {r['other']:.2f} |\n"
            )
        else:
            dashes = " – |" * 7
            body += f"| {r['kernel']} | {r['regs']} | {r['stack']} | {r['smem']} |{dashes}\n"
    return head + body


# ---- SFU probe: does a packed 16-bit SFU instruction do two results per MUFU? -------------------------
# The general-p forward is MUFU-bound (two per MAC at 16/clk/SM, docs/kernels.md). PTX has packed
# `ex2.approx.f16x2` (sm_75+) and `ex2.approx.ftz.bf16x2` (sm_90); if ptxas lowered either to one MUFU per
# two results, a 16-bit exp2 would halve that cost. The probe compiles each form and counts MUFUs per result.
_SFU_FORMS = {
    # name: (PTX body on $1 → $0, element dtype, results per asm call, minimum cc)
    "lg2.approx.ftz.f32": ("lg2.approx.ftz.f32 $0, $1;", "fp32", 1, 80),
    "ex2.approx.ftz.f32": ("ex2.approx.ftz.f32 $0, $1;", "fp32", 1, 80),
    "ex2.approx.f16x2": ("ex2.approx.f16x2 $0, $1;", "fp16", 2, 80),
    "ex2.approx.ftz.bf16x2": ("ex2.approx.ftz.bf16x2 $0, $1;", "bf16", 2, 90),
}
_PROBE_BLOCK, _PROBE_WARPS = 1024, 4  # 8 results per thread


def _sfu_probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, y_ptr, BLOCK: tl.constexpr, ASM: tl.constexpr, PACK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + o)
        y = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=x.dtype, is_pure=True, pack=PACK)
        tl.store(y_ptr + o, y)

    return probe


def sfu_probe(cc: int) -> list[dict]:
    """MUFU instructions per result for each SFU form (whole kernel SASS; the probe does nothing else)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, (body, dtype, pack, min_cc) in _SFU_FORMS.items():
        if cc < min_cc:
            continue
        ptr = aot._PTR[dtype]
        sig = {
            "x_ptr": ptr,
            "y_ptr": ptr,
            "BLOCK": "constexpr",
            "ASM": "constexpr",
            "PACK": "constexpr",
        }
        const = {"BLOCK": _PROBE_BLOCK, "ASM": "{ " + body + " }", "PACK": pack}
        src = ASTSource(_sfu_probe_kernel(), sig, const)
        k = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options={"num_warps": _PROBE_WARPS}
        )
        mufu = [ln for ln in disassemble(k.asm["cubin"]) if re.search(r"\bMUFU\.", ln)]
        per_thread = _PROBE_BLOCK // (32 * _PROBE_WARPS)
        ops = sorted({re.search(r"MUFU\.[A-Z0-9.]+", ln).group(0) for ln in mufu})
        rows.append(dict(form=name, mufu_per_result=len(mufu) / per_thread, sass=" ".join(ops)))
    return rows


# ---- every ResNet-18/50 layer shape and the modelled training throughput ------------------------------
# Stated assumptions of the model (BENCHMARKS.md repeats them):
#  * issue-bound: a warp instruction issues per cycle per SM sub-partition (4 per SM); the hot loop's
#    SASS per MAC (this report) sets the cost; loads hit L1/L2 (the loops reuse every loaded x across
#    BLOCK_N channels and every filter across BLOCK_M positions);
#  * per program, the straight-line code (the static SASS outside every innermost loop: tap setup,
#    prologue, epilogue, BN partials) runs once; the tap loops are unrolled at compile time, so that
#    count already holds every tap's setup;
#  * tile waste: positions and channels padded up to the tile; the tail wave: programs spread evenly
#    over the SMs, the last round partially idle;
#  * the tile is the one with the lowest modelled time among the tuning list (a GPU times them);
#  * fp32 operands (the bf16 policy stores adder outputs in fp32, issue 11); the forward carries the
#    fused BN-statistics epilogue, ∂X the ℓp mode at p = 1 (sgn), ∂F the full-precision gradient,
#    deterministic (DW_CONFIGS[0]);
#  * outside the adder kernels: BN-normalise/ReLU/residual passes are memory-bound at HBM bandwidth
#    with ELEMENTWISE_BYTES per adder-output element and step; the stem conv and the classifier run on
#    cuDNN/cuBLAS tensor cores and are neglected (118 M of 4.1 G MACs per image, on 16-bit tensor
#    cores); the optimizer step is neglected (25.6 M parameters, ~1 ms).
H100_SXM = dict(
    name="H100 SXM5",
    sms=132,
    clock_ghz=1.98,
    regs_per_sm=65536,
    threads_per_sm=2048,
    smem_per_sm=227 * 1024,
    hbm_tb_s=3.35,
)
# fp32 y written by the kernel (4) and read by BN-normalise (4), its 16-bit output written (2) and read
# by the next layer's copy/ReLU (2); backward: g read (2), y re-read (4), g_y written (4) for ∂X/∂F:
# 22 bytes per adder-output element and training step.
ELEMENTWISE_BYTES = 22
# 16 MUFU (SFU) lanes per SM and clock = 4 per quadrant: a warp instruction takes 8 of the quadrant's
# issue cycles on that pipe (docs/kernels.md, "General p").
MUFU_ISSUE_SLOTS = 8


def resident_programs(regs: int, threads: int, smem: int, gpu: dict) -> int:
    """Programs (thread blocks) one SM holds at once, from registers, threads and shared memory."""
    by_regs = gpu["regs_per_sm"] // max(1, regs * threads)
    by_threads = gpu["threads_per_sm"] // threads
    by_smem = gpu["smem_per_sm"] // smem if smem else by_threads
    return max(1, min(by_regs, by_threads, by_smem))


def model_kernel_time(
    kind: str, shape, batch: int, cfg_kwargs: dict, warps: int, cost: dict, gpu: dict = H100_SXM
) -> dict:
    """Modelled seconds of one adder kernel (fwd | dx | dw) on one layer shape (see the assumptions).

    ``cost``: {"per_mac": hot-loop SASS per MAC, "other_instrs": straight-line SASS per program, "regs",
    "smem"}.
    """
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    bm, bn, bk = cfg_kwargs["BLOCK_M"], cfg_kwargs["BLOCK_N"], cfg_kwargs["BLOCK_K"]
    taps = shape.k * shape.k
    m_out = batch * shape.p * shape.p
    macs = m_out * shape.o * shape.c * taps
    if kind == "fwd":
        programs = cdiv(m_out, bm) * cdiv(shape.o, bn)
        padded = programs * bm * bn * cdiv(shape.c, bk) * bk * taps
    elif kind == "dx":
        # one stride phase per program; per phase, the taps that read it (uniform skip of the rest)
        phases = shape.stride * shape.stride
        m_phase = batch * cdiv(shape.h, shape.stride) ** 2
        hits = (
            taps / phases if shape.k > 1 else 1.0 / phases
        )  # 1×1 stride 2: only phase (0, 0) works
        programs = cdiv(m_phase, bm) * cdiv(shape.c, bn) * phases
        padded = programs * bm * bn * cdiv(shape.o, bk) * bk * hits
    else:  # dw: (O tile × C tile) per tap, the positions split to fill the GPU (the launcher's rule)
        tiles = cdiv(shape.o, bm) * cdiv(shape.c, bn)
        split = max(1, min(batch * shape.p, (gpu["sms"] * 4) // max(1, tiles * taps)))
        programs = tiles * taps * split
        per_split = cdiv(m_out, split)
        padded = programs * bm * bn * cdiv(per_split, bk) * bk
    threads = 32 * warps
    # Issue slots per MAC: the SASS, or the MUFU pipe where it binds (general p: 16 MUFU lanes per SM
    # and clock, i.e. a warp's MUFU instruction holds its quadrant's pipe MUFU_ISSUE_SLOTS = 8 cycles).
    slots_per_mac = max(cost["per_mac"], MUFU_ISSUE_SLOTS * cost.get("mufu", 0.0))
    instr_warp = padded * slots_per_mac / 32 + programs * cost["other_instrs"] * warps
    resident = resident_programs(cost["regs"], threads, cost["smem"], gpu)
    slots = gpu["sms"]
    waves = cdiv(programs, slots)
    tail_eff = programs / (waves * slots)
    issue_per_s = gpu["sms"] * 4 * gpu["clock_ghz"] * 1e9
    t = instr_warp / issue_per_s / tail_eff
    return dict(
        seconds=t,
        macs=macs,
        programs=programs,
        waste=padded / macs,
        tail_eff=tail_eff,
        resident=resident,
        tmacs=macs / t / 1e12,
    )


# The ℓp schedule's code paths: p = 1 (exact: |d|, sgn), general 1 < p < 2 (|d|^p via MUFU lg2/ex2; ∂X
# |d|^(p-1)); p = 2 (exact, squares) is met at step 0 only and costs as p = 1 (2.56 vs 2.52 SASS/MAC,
# table above), so it is modelled with the p = 1 kernels. ∂F (full precision X - F) does not depend on p.
_PATH_CONSTS = {
    "p1": {"fwd": dict(P_MODE=1), "dx": dict(GX_MODE=1)},  # P_ONE, GX_SIGN (ℓp mode at p = 1)
    "general": {"fwd": dict(P_MODE=0), "dx": dict(GX_MODE=3)},  # P_GENERAL, GX_POW
}
_LAYER_KERNELS = {
    # kind: (kernel, tuning list, constexprs of the modelled code path but the p mode, divisible-16 args)
    "fwd": (
        "_adder_fwd_kernel",
        "FWD_CONFIGS",
        dict(EPILOGUE=1, HAS_RES=False, RELU=False, FAST_MATH=True, FMA_EXP2_OK=True),
        ("OP",),
    ),
    "dx": (
        "_adder_bwd_dx_kernel",
        "DX_CONFIGS",
        dict(FAST_MATH=True, FMA_EXP2_OK=True),
        ("CP",),
    ),
    "dw": ("_adder_bwd_dw_kernel", "DW_CONFIGS", dict(SIGN=False, ATOMIC=False), ()),
}


def tile_costs(cc: int, ks: tuple[int, ...], paths=("p1",)) -> dict[tuple, dict]:
    """Compile every (path, kernel, filter size, tile) of the modelled paths once; their SASS costs.
    Keys (path, kind, k, tile index); ∂F once, under "p1" (the same kernel at every p)."""
    import triton.language as tl

    from addernet_dist.kernels import triton_adder as ta

    out = {}
    for path in paths:
        for kind, (kname, lname, consts, div16) in _LAYER_KERNELS.items():
            if kind == "dw" and path != "p1":
                continue
            configs = getattr(ta, lname)
            for i, cfg in enumerate(configs):
                if kind == "dw" and i > 0:
                    continue  # ∂F deterministic (the default) runs DW_CONFIGS[0] only
                if cfg.kwargs.get("EXP2_FMA", 0) and path != "general":
                    continue  # the EXP2_FMA tiles exist for general p only (pruned elsewhere)
                for k in ks:
                    out[(path, kind, k, i)] = _compiled_cost(
                        cc,
                        kind,
                        getattr(ta, kname),
                        cfg,
                        k,
                        {**consts, **_PATH_CONSTS[path].get(kind, {})},
                        div16,
                        tl.float32,
                    )
    return out


def _compiled_cost(cc, kind, kernel, cfg, k, consts, div16, acc_dtype) -> dict:
    kw = cfg.kwargs
    macs = kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"] // (32 * cfg.num_warps)
    spec = aot.KernelSpec(
        kind, kernel, cfg, dict(R=k, S=k, ACC_DTYPE=acc_dtype, **consts), "fp32", macs, div16
    )
    compiled = aot.compile_spec(spec, cc)
    use = aot.resource_usage(compiled.asm["cubin"])
    lines = disassemble(compiled.asm["cubin"])
    lp = hot_loop(lines)
    static = sum(1 for ln in lines if _INSTR.match(ln))
    in_loops = sum(len(loop.ops) for loop in find_loops(lines))
    return dict(
        per_mac=len(lp.ops) / macs,
        mufu=lp.count("MUFU") / macs,
        other_instrs=static - in_loops,
        regs=use["registers"],
        smem=compiled.metadata.shared,
        spill=use["stack"],
    )


def _best_tiles(s, path: str, costs: dict, batch: int, gpu: dict, ta) -> tuple[dict, float]:
    """{kind: the modelled-fastest tile's numbers} and the step's seconds of one layer shape at ``path``."""
    kinds, layer_t = {}, 0.0
    for kind, (_, lname, _, _) in _LAYER_KERNELS.items():
        configs = getattr(ta, lname)
        cost_path = "p1" if kind == "dw" else path
        best = None
        for (pa, kd, k, i), cost in costs.items():
            if pa != cost_path or kd != kind or k != s.k:
                continue
            cfg = configs[i]
            r = model_kernel_time(kind, s, batch, cfg.kwargs, cfg.num_warps, cost, gpu)
            if best is None or r["seconds"] < best[1]["seconds"]:
                best = (i, r, cost)
        i, r, cost = best
        kw = configs[i].kwargs
        fma = f",E{kw['EXP2_FMA']}" if kw.get("EXP2_FMA") else ""
        kinds[kind] = dict(
            tile=f"{kw['BLOCK_M']}×{kw['BLOCK_N']}×{kw['BLOCK_K']}{fma}/w{configs[i].num_warps}",
            per_mac=cost["per_mac"],
            mufu=cost["mufu"],
            regs=cost["regs"],
            spill=cost["spill"],
            us=r["seconds"] * 1e6,
            tmacs=r["tmacs"],
            waste=r["waste"],
            tail=r["tail_eff"],
        )
        layer_t += r["seconds"]
    return kinds, layer_t


def layer_report(
    models=("resnet18", "resnet50"),
    cc: int = 90,
    batch: int = 128,
    gpu: dict = H100_SXM,
    paths: tuple[str, ...] = ("p1", "general"),
) -> dict:
    """Per distinct layer shape: the modelled tile, SASS/MAC and time of fwd / ∂X / ∂F at p = 1 (and the
    step at general p); per model and p code path the modelled training images/s. One GPU, per-GPU
    batch ``batch``."""
    from addernet_dist.kernels import triton_adder as ta
    from addernet_dist.layer_shapes import adder_layer_shapes

    shapes = {m: adder_layer_shapes(m) for m in models}
    ks = tuple(sorted({s.k for ss in shapes.values() for s in ss}))
    costs = tile_costs(cc, ks, paths)
    result = {"gpu": gpu, "cc": cc, "batch": batch, "models": {}}
    for m, ss in shapes.items():
        rows, total = [], dict.fromkeys(paths, 0.0)
        out_elems = sum(s.o * s.p * s.p * s.count for s in ss)
        mem_t = batch * out_elems * ELEMENTWISE_BYTES / (gpu["hbm_tb_s"] * 1e12)
        for s in ss:
            row = dict(layer=s.label, count=s.count, mmacs=s.macs_per_image / 1e6)
            for path in paths:
                kinds, layer_t = _best_tiles(s, path, costs, batch, gpu, ta)
                if path == "p1":
                    row.update(kinds, step_us=layer_t * 1e6)
                else:
                    row[f"{path}_step_us"] = layer_t * 1e6
                    row[f"{path}_tiles"] = {k: v["tile"] for k, v in kinds.items()}
                total[path] += layer_t * s.count
            rows.append(row)
        by_path = {
            path: dict(adder_s=t, images_s=batch / (t + mem_t), adder_images_s=batch / t)
            for path, t in total.items()
        }
        result["models"][m] = dict(
            rows=rows,
            adder_s=total["p1"],
            elementwise_s=mem_t,
            adder_images_s=batch / total["p1"],
            images_s=by_path["p1"]["images_s"],
            paths=by_path,
            adder_gmacs_per_image=sum(s.macs_per_image * s.count for s in ss) / 1e9,
        )
    return result


IMAGENET_TRAIN_IMAGES = 1_281_167


def schedule_time(
    cfg, images_s_by_path: dict[str, float], gpus: int = 8, images: int = IMAGENET_TRAIN_IMAGES
) -> dict:
    """Modelled node-hours of a whole run of ``cfg`` (its epochs and ℓp schedule): every step is costed
    at its p code path (p = 1 for p ∈ {1, 2}, "general" otherwise), ``images_s_by_path`` per GPU."""
    from addernet_dist.optim import PSchedule

    steps_per_epoch = -(-images // cfg.train.global_batch_size)
    total = cfg.train.epochs * steps_per_epoch
    a = cfg.adder
    sched = PSchedule.from_config(
        a, decay_epochs=cfg.p_decay_epochs(), steps_per_epoch=steps_per_epoch
    )
    # p is linear from p_start at step 0 to p_end at decay_steps: exact values only at the two ends
    if not sched.enabled or sched.p_start == sched.p_end:
        exact = total if sched.p_end in (1.0, 2.0) else 0
    else:
        first_end = min(total, sched.decay_steps)
        exact = (total - first_end) * (sched.p_end in (1.0, 2.0)) + (sched.p_start in (1.0, 2.0))
    steps = {"p1": exact, "general": total - exact}
    per_step = {k: cfg.train.global_batch_size / (gpus * images_s_by_path[k]) for k in steps}
    hours = {k: steps[k] * per_step[k] / 3600 for k in steps}
    return dict(
        steps=steps,
        hours=hours,
        total_hours=sum(hours.values()),
        p1_only_hours=total * per_step["p1"] / 3600,
        gpus=gpus,
        epochs=cfg.train.epochs,
        decay_epochs=cfg.p_decay_epochs(),
    )


def layers_markdown(rep: dict) -> str:
    g = rep["gpu"]
    out = []
    for m, d in rep["models"].items():
        out.append(
            f"\n**{m}** (sm_{rep['cc']}, {g['name']} at {g['clock_ghz']} GHz, per-GPU batch {rep['batch']}, "
            f"fp32, p = 1, fused BN statistics; modelled, not measured)\n\n"
        )
        out.append(
            "| layer (Cin→Cout k×k/stride @H²) | ×model | M MAC/img | fwd tile | fwd SASS/MAC | fwd µs "
            "| ∂X tile | ∂X SASS/MAC | ∂X µs | ∂F SASS/MAC | ∂F µs | step µs | T MAC/s (3 kernels) |\n"
            "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|\n"
        )
        for r in d["rows"]:
            f, x, w = r["fwd"], r["dx"], r["dw"]
            tm = 3 * r["mmacs"] * 1e6 * rep["batch"] / (r["step_us"] * 1e-6) / 1e12
            out.append(
                f"| {r['layer']} | {r['count']} | {r['mmacs']:.1f} | {f['tile']} | {f['per_mac']:.2f} "
                f"| {f['us']:.0f} | {x['tile']} | {x['per_mac']:.2f} | {x['us']:.0f} | {w['per_mac']:.2f} "
                f"| {w['us']:.0f} | {r['step_us']:.0f} | {tm:.1f} |\n"
            )
        out.append(
            f"\n{m}: {d['adder_gmacs_per_image']:.2f} G adder-MACs per image (×3 for fwd + ∂X + ∂F); adder "
            f"kernels {1e3 * d['adder_s']:.1f} ms per step of {rep['batch']} → {d['adder_images_s']:.0f} "
            f"images/s; with the memory-bound BN/ReLU passes ({1e3 * d['elementwise_s']:.1f} ms) "
            f"**{d['images_s']:.0f} images/s per GPU**.\n"
        )
        for path, v in d.get("paths", {}).items():
            if path != "p1":
                out.append(
                    f"At {path} p (the ℓp schedule's decay phase; ∂F unchanged): adder kernels "
                    f"{1e3 * v['adder_s']:.1f} ms per step ({v['adder_s'] / d['adder_s']:.2f}× p = 1) → "
                    f"**{v['images_s']:.0f} images/s per GPU**.\n"
                )
        if "schedule" in d:
            sc = d["schedule"]
            out.append(
                f"Whole schedule ({sc['config']}: {sc['epochs']} epochs, p decaying over {sc['decay_epochs']:g}, "
                f"{sc['gpus']} GPUs): {sc['steps']['general']} steps at general p "
                f"({sc['hours']['general']:.1f} h) + {sc['steps']['p1']} at p ∈ {{1, 2}} ({sc['hours']['p1']:.1f} h) "
                f"= **{sc['total_hours']:.1f} node-hours** (all at p = 1: {sc['p1_only_hours']:.1f}).\n"
            )
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, default=90, help="compute capability (80, 90)")
    ap.add_argument("--full", action="store_true", help="every code path × every tuning config")
    ap.add_argument("--dump", default=None, help="directory to write each kernel's SASS into")
    ap.add_argument("--only", default=None, help="only kernels whose label contains this string")
    ap.add_argument(
        "--sfu-probe",
        action="store_true",
        help="only count MUFU instructions per result of the f32 and packed 16-bit SFU forms",
    )
    ap.add_argument(
        "--layers",
        action="store_true",
        help="every ResNet-18/50 layer shape: modelled tiles, SASS/MAC, times, training images/s (H100)",
    )
    ap.add_argument("--batch", type=int, default=128, help="per-GPU batch of --layers")
    ap.add_argument("--json", default=None, help="--layers: also write the numbers here")
    ap.add_argument(
        "--schedule",
        default="configs/imagenet_resnet50.yaml",
        help="--layers: model the whole run of this config (epochs, ℓp schedule) on --gpus GPUs",
    )
    ap.add_argument("--gpus", type=int, default=8, help="--layers --schedule: GPUs of the node")
    args = ap.parse_args(argv)
    if args.layers:
        rep = layer_report(cc=args.cc, batch=args.batch)
        if args.schedule:
            from addernet_dist.config import load_config

            cfg = load_config(args.schedule, [])
            m = rep["models"].get(cfg.model.name)
            if m is not None:
                by_path = {k: v["images_s"] for k, v in m["paths"].items()}
                m["schedule"] = {**schedule_time(cfg, by_path, args.gpus), "config": args.schedule}
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(rep, f, indent=1)
        sys.stdout.write(layers_markdown(rep))
        return
    if args.sfu_probe:
        sys.stdout.write(f"| SFU form (sm_{args.cc}) | MUFU / result | SASS |\n|---|---:|---|\n")
        for r in sfu_probe(args.cc):
            sys.stdout.write(f"| {r['form']} | {r['mufu_per_result']:.2f} | {r['sass']} |\n")
        return
    rows = report(args.cc, args.full, args.dump, args.only)
    sys.stdout.write(to_markdown(rows, args.cc))


if __name__ == "__main__":
    main()
