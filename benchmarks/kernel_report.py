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
            body += f"| {r['kernel']} | {r['regs']} | {r['stack']} | {r['smem']} | – | – | – | – | – | – | – |\n"
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
    args = ap.parse_args(argv)
    if args.sfu_probe:
        sys.stdout.write(f"| SFU form (sm_{args.cc}) | MUFU / result | SASS |\n|---|---:|---|\n")
        for r in sfu_probe(args.cc):
            sys.stdout.write(f"| {r['form']} | {r['mufu_per_result']:.2f} | {r['sass']} |\n")
        return
    rows = report(args.cc, args.full, args.dump, args.only)
    sys.stdout.write(to_markdown(rows, args.cc))


if __name__ == "__main__":
    main()
