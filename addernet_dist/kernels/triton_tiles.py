"""Tile tables of the Triton adder kernels (the tuning lists and their keys), their TileTuners, and
``_launch``, which runs a kernel with an explicit config, the tuner's tile or the interpreter's config."""

from __future__ import annotations

import triton

from addernet_dist.kernels.tile_tuner import TileTuner
from addernet_dist.kernels.triton_kernels import _adder_bwd_dw_kernel, _adder_bwd_dx_kernel, _adder_fwd_kernel
from addernet_dist.kernels.triton_math import GX_POW, P_GENERAL


# ----------------------------------------------------------------------------------------------------------
# Tuning lists. Every entry compiles for sm_80 and sm_90 (tests/unit/test_triton_aot.py); the first entry of
# each list is the interpreter/default config. Keys: the shapes that change the best tile.
# ----------------------------------------------------------------------------------------------------------
def _tile_config(m: int, n: int, k: int, warps: int, exp2_fma: int = 0) -> triton.Config:
    """A forward / ∂X tile; ``exp2_fma``: of each BLOCK_K step, the terms whose exp2 is on the FMA pipe."""
    kw = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "EXP2_FMA": exp2_fma}
    return triton.Config(kw, num_warps=warps, num_stages=1)


FWD_CONFIGS = [
    # BLOCK_M = 32 lanes × num_warps × (positions per thread) so that every warp sits on the position axis
    # and each thread keeps all BLOCK_N channels of its positions (see the comment on acc in the kernel).
    _tile_config(256, 16, 4, 4),
    _tile_config(128, 32, 4, 4),
    _tile_config(256, 32, 2, 4),
    _tile_config(128, 16, 4, 2),
    _tile_config(64, 8, 4, 2),
    # General p only (pruned otherwise): half of each channel step takes the FMA-pipe exp2, which the
    # model puts at 12 instead of 16 cycles per MAC; the autotuner measures it against the SFU-only tiles
    # above, so a GPU where the model is wrong keeps the faster one.
    _tile_config(256, 16, 4, 4, exp2_fma=2),
    _tile_config(128, 32, 4, 4, exp2_fma=2),
    _tile_config(256, 32, 2, 4, exp2_fma=1),
]


def _exp2_fma_pruner(mode_key: str, pow_mode: int):
    """Autotuner pruning: EXP2_FMA tiles differ from their SFU-only twins only where the kernel takes
    |d|^e in fp32 (``mode_key == pow_mode`` and FMA_EXP2_OK); elsewhere they would time duplicates."""

    def prune(configs, named_args, **kwargs):
        split_matters = kwargs.get(mode_key) == pow_mode and kwargs.get("FMA_EXP2_OK")
        return [c for c in configs if split_matters or c.kwargs["EXP2_FMA"] == 0]

    return prune


_prune_fwd_configs = _exp2_fma_pruner("P_MODE", P_GENERAL)


DX_CONFIGS = [
    # Same register blocking as the forward (BLOCK_M = 32 × num_warps × positions per thread); each thread
    # also keeps its BLOCK_N × positions x values, so the tiles are half the forward's.
    _tile_config(128, 16, 4, 4),
    _tile_config(256, 16, 4, 4),
    _tile_config(128, 32, 2, 4),
    _tile_config(64, 8, 4, 2),
    # ℓp mode at general p only (pruned otherwise), as the forward's EXP2_FMA tiles: |d|^(p−1) of half
    # the output channels of each step takes the FMA-pipe exp2 (model: 16 → 13.6 cycles per MAC).
    _tile_config(128, 16, 4, 4, exp2_fma=2),
    _tile_config(128, 32, 2, 4, exp2_fma=1),
]


_prune_dx_configs = _exp2_fma_pruner("GX_MODE", GX_POW)


DW_CONFIGS = [
    # (output channels, input channels, positions per GEMM step); tl.dot needs every dim ≥ 16.
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=2, num_stages=1),
    # The default's output tile and split with half its registers (sm_90, 3×3, full/deterministic: 93
    # instead of 247 per thread → 16 instead of 8 resident warps per SM): the hot loop's div/mod gathers
    # of x and g are load-latency bound, which the issue model (BENCHMARKS.md) assumes hidden.
    # addernet-selftest's speed check times both in the deterministic mode (DW_SELFTEST_CONFIGS).
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=1),
]
# The ∂F candidates the GPU self-test times against each other: the default and the low-register tile.
DW_SELFTEST_CONFIGS = (0, 4)
# Tile keys: the layer shape and code path, never the batch size N (kernels/tile_tuner.py: evaluation
# batches and a short last batch reuse the training batch's tile instead of re-tuning every layer).
_SHAPE_KEY = ["C", "O", "H", "W", "P", "Q", "R", "S"]
_SHAPE_KEY += ["stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
_FWD_KEY = _SHAPE_KEY + ["P_MODE", "FMA_EXP2_OK", "EPILOGUE", "HAS_RES", "RELU"]
_DX_KEY = _SHAPE_KEY + ["GX_MODE", "FMA_EXP2_OK"]
_DW_KEY = _SHAPE_KEY + ["SIGN", "ATOMIC"]


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _tuned(kind, kernel, configs, key, prune=None):
    """The kernel's TileTuner, or None in the interpreter (which runs INTERPRETER_CONFIGS: timing tiles
    there is pointless). Tests build a tuner under the interpreter themselves to exercise the mechanism."""
    if _interpreting():
        return None
    return TileTuner(kind, kernel, configs, key, prune)


_adder_fwd_tuned = _tuned("fwd", _adder_fwd_kernel, FWD_CONFIGS, _FWD_KEY, _prune_fwd_configs)
_adder_bwd_dx_tuned = _tuned("dx", _adder_bwd_dx_kernel, DX_CONFIGS, _DX_KEY, _prune_dx_configs)
# ∂F is tuned only in its atomic (non-deterministic) mode, where every config adds into the same
# buffer (zeroed between trials). The deterministic mode keeps DW_CONFIGS[0]: the tile sets the
# reduction split, so a config picked by timing (which varies run to run) would change the summation
# order and with it the bits that mode promises to reproduce.
_adder_bwd_dw_atomic_tuned = _tuned("dw", _adder_bwd_dw_kernel, DW_CONFIGS, _DW_KEY)


# The interpreter's cost is per executed block operation, so it runs big tiles by default (fewer programs:
# the fused ResNet-8 test took 21 s with FWD_CONFIGS[0]). Every tuning config is still interpreted on a
# small case by tests/unit/test_triton_adder.py (the `config=` argument) and compiled by the AOT test.
INTERPRETER_CONFIGS = {
    "fwd": triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 8, "EXP2_FMA": 4}),
    "dx": triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 8, "EXP2_FMA": 4}),
    "dw": triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}),
}


def _default_config(kind: str, configs: list[triton.Config]) -> triton.Config:
    return INTERPRETER_CONFIGS[kind] if _interpreting() else configs[0]


def _launch(kernel, tuned, kind, configs, grid_fn, args, consts, config, reset=()):
    """Run ``kernel`` with an explicit config, the tuner's tile for this layer shape (GPU), or the
    interpreter's config. ``reset``: accumulation targets the tuner zeroes between its trials."""

    def run(cfg):
        meta = dict(cfg.kwargs)
        kernel[grid_fn(meta)](
            *args, **consts, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )

    if config is None and tuned is not None:
        config = tuned.choose(args, consts, run, reset)
    # the chosen tile runs last, so grid_fn's side effects (the BN partials' BLOCK_M) describe it
    run(config if config is not None else _default_config(kind, configs))
