"""Every Triton kernel × tuning config compiles ahead of time for sm_80 and sm_90, with no GPU.

Compiled with a 1×1 filter: the tap loops are unrolled at compile time, so 3×3 only repeats the same code
nine times (benchmarks/kernel_report.py compiles the 3×3 versions) and costs 9× the ptxas time.
"""

from __future__ import annotations

import pytest
import torch

from addernet_dist.kernels import aot
from addernet_dist.kernels import triton_adder as ta
from tests.helpers import kernel_report

SPECS = aot.kernel_specs(r=1, s=1)


def test_every_config_is_listed_once():
    n_cfg = len(ta.FWD_CONFIGS) + len(ta.DX_CONFIGS) + len(ta.DW_CONFIGS)
    assert len(SPECS) == n_cfg
    names = {s.name.split("[")[0] for s in SPECS}
    assert names == {"fwd", "dx", "dw"}
    # Every code path of every kernel is compiled by at least one spec.
    assert {s.constexprs["P_MODE"] for s in SPECS if s.name.startswith("fwd")} == {0, 1, 2}
    assert {s.constexprs["EPILOGUE"] for s in SPECS if s.name.startswith("fwd")} == {0, 1, 2}
    assert {s.constexprs["GX_MODE"] for s in SPECS if s.name.startswith("dx")} == {0, 1, 2, 3}
    dw = {(s.constexprs["SIGN"], s.constexprs["ATOMIC"]) for s in SPECS if s.name.startswith("dw")}
    assert len(dw) == 4


def test_padding_covers_every_block():
    # The forward/∂X filter loads are unmasked: the host pads the filter rows so that every tile fits.
    fwd_dx = ta.FWD_CONFIGS + ta.DX_CONFIGS + [ta.INTERPRETER_CONFIGS[k] for k in ("fwd", "dx")]
    assert all(ta._W_PAD % c.kwargs["BLOCK_N"] == 0 for c in fwd_dx)
    dx = ta.DX_CONFIGS + [ta.INTERPRETER_CONFIGS["dx"]]
    assert all(ta._DX_O_PAD % c.kwargs["BLOCK_K"] == 0 for c in dx)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label.replace(" ", "_"))
def test_compiles_for_target(spec, cc):
    k = aot.compile_spec(spec, cc)
    cubin = k.asm["cubin"]
    assert cubin[:4] == b"\x7fELF"
    assert f".target sm_{cc}" in k.asm["ptx"]
    use = aot.resource_usage(cubin)
    assert 0 < use["registers"] <= 255
    # The hot loops are register-resident: nothing may spill at 1×1 (3×3 spills are in the report).
    assert use["local"] == 0


@pytest.mark.timeout(30)
def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    if ta._interpreting():
        pytest.skip("TRITON_INTERPRET is set for the whole process")
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*backend='cpu'"):
        ta.adder2d_triton(x, w)


@pytest.mark.timeout(120)
def test_packed_16bit_sfu_does_not_halve_the_mufu_count():
    # docs/kernels.md ("General p"): the general-p forward is MUFU-bound, and a packed f16x2/bf16x2 exp2
    # would only help if ptxas issued one MUFU per two results. It issues one per result on sm_90 (the
    # probe reads the SASS). If a future ptxas packs them, this fails: revisit the general-p design.
    rows = {r["form"]: r for r in kernel_report().sfu_probe(90)}
    assert set(rows) == {
        "lg2.approx.ftz.f32",
        "ex2.approx.ftz.f32",
        "ex2.approx.f16x2",
        "ex2.approx.ftz.bf16x2",
    }
    for r in rows.values():
        assert r["mufu_per_result"] == 1.0, r
    assert rows["ex2.approx.f16x2"]["sass"] == "MUFU.EX2.F16"


def test_exp2_fma_tiles_are_tuned_only_where_they_differ():
    # The EXP2_FMA tiles change only the fp32 general-p code (forward) / ℓp at general p (∂X); elsewhere
    # the autotuner would time exact duplicates, so they are pruned. The SFU-only tiles always stay.
    def split(configs):
        return {c.kwargs["EXP2_FMA"] > 0 for c in configs}

    fwd, dx = ta.FWD_CONFIGS, ta.DX_CONFIGS
    assert split(ta._prune_fwd_configs(fwd, {}, P_MODE=ta.P_GENERAL, FMA_EXP2_OK=True)) == {
        False,
        True,
    }
    assert len(ta._prune_fwd_configs(fwd, {}, P_MODE=ta.P_GENERAL, FMA_EXP2_OK=True)) == len(fwd)
    for mode, ok in ((ta.P_ONE, True), (ta.P_TWO, True), (ta.P_GENERAL, False)):
        kept = ta._prune_fwd_configs(fwd, {}, P_MODE=mode, FMA_EXP2_OK=ok)
        assert split(kept) == {False} and len(kept) == sum(not c.kwargs["EXP2_FMA"] for c in fwd)
    assert len(ta._prune_dx_configs(dx, {}, GX_MODE=ta.GX_POW, FMA_EXP2_OK=True)) == len(dx)
    for mode in (ta.GX_HARDTANH, ta.GX_SIGN, ta.GX_LINEAR):
        assert split(ta._prune_dx_configs(dx, {}, GX_MODE=mode, FMA_EXP2_OK=True)) == {False}
    # the tuning keys separate fp32 from fp64 compute (the split exists only for fp32)
    assert "FMA_EXP2_OK" in ta._FWD_KEY and "FMA_EXP2_OK" in ta._DX_KEY
    # and the tuners the launchers call are wired to the pruners (the launch's constexprs reach them)
    for tuned, mode_key, modes in (
        (ta._adder_fwd_tuned, "P_MODE", (ta.P_ONE, ta.P_GENERAL)),
        (ta._adder_bwd_dx_tuned, "GX_MODE", (ta.GX_SIGN, ta.GX_POW)),
    ):
        plain, general = (tuned.candidates((), {mode_key: m, "FMA_EXP2_OK": True}) for m in modes)
        assert split(plain) == {False} and split(general) == {False, True}


@pytest.mark.timeout(300)
def test_low_register_dw_candidate_doubles_resident_warps_on_sm90():
    # issue 21 item 5: ∂F's default tile holds 247 registers × 128 threads on sm_90 (3×3, full,
    # deterministic) → 2 programs = 8 warps per SM, too few to hide its div/mod gathers' latency; the
    # candidate the self-test times against it keeps the output tile (32×64, the same split) at half
    # the registers.
    import triton.language as tl

    kr = kernel_report()
    gpu = kr.H100_SXM
    default, cand = (ta.DW_CONFIGS[i] for i in ta.DW_SELFTEST_CONFIGS)
    assert (default.kwargs["BLOCK_M"], default.kwargs["BLOCK_N"]) == (
        cand.kwargs["BLOCK_M"],
        cand.kwargs["BLOCK_N"],
    )
    warps, regs = [], []
    for cfg in (default, cand):
        consts = dict(R=3, S=3, ACC_DTYPE=tl.float32, SIGN=False, ATOMIC=False)
        spec = aot.KernelSpec(
            "dw[full,deterministic]", ta._adder_bwd_dw_kernel, cfg, consts, "fp32", 1
        )
        k = aot.compile_spec(spec, 90)
        use = aot.resource_usage(k.asm["cubin"])
        assert use["local"] == 0 and use["stack"] == 0
        # registers are allocated per warp in units of 256 (8 per thread)
        alloc = -(-use["registers"] // 8) * 8
        threads = 32 * cfg.num_warps
        warps.append(kr.resident_programs(alloc, threads, k.metadata.shared, gpu) * cfg.num_warps)
        regs.append(use["registers"])
    assert regs[1] * 2 <= regs[0] + 8, regs
    assert warps == [8, 16], (regs, warps)
