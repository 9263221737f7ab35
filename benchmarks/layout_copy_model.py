"""Modelled cost of ``train.channels_last`` for an AdderNet (issue 21.3): the bytes of the NCHW copies the
Triton adder launchers make of a channels_last operand, against what channels_last can save.

    python benchmarks/layout_copy_model.py [--batch 128] [--image-size 224] [--tbps 3.35]

The forward and ∂X hot loops stream NCHW (``addernet_dist/kernels/triton_adder.py``, ``_hot_loop_layout``): with a
channels_last model every adder layer copies x (forward) and ∂Y (∂X) to NCHW, fp32 (the adder layers run in
fp32 under bf16 autocast, ops/amp.py): one read + one write = 8 bytes per element. The only plain conv of
the ImageNet ResNets is the 7×7 stem; in NCHW cuDNN may transpose its bf16 input and output (forward) and
∂Y (backward): at most (in + out) · 2 + ∂Y · 2 element copies of 2 bytes. Step times are BENCHMARKS.md's
modelled H100 adder-kernel + elementwise times per step of 128 (fp32, p = 1). A model, not a timing: the
GPU measurement plan is in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

from addernet_dist.layer_shapes import adder_layer_shapes

# BENCHMARKS.md "Modelled throughput" (H100 SXM5, batch 128): adder kernels + BN/ReLU passes, ms per step.
MODELLED_STEP_MS = {"resnet18": 64.2 + 1.4, "resnet50": 150.4 + 8.7}


def copy_bytes(model: str, batch: int, image_size: int) -> tuple[int, int]:
    """(bytes of the x copies, bytes of the ∂Y copies) per training step with channels_last."""
    xs = dys = 0
    for s in adder_layer_shapes(model, image_size):
        xs += s.count * batch * s.c * s.h * s.h
        dys += s.count * batch * s.o * s.p * s.p
    return 8 * xs, 8 * dys


def stem_transpose_bytes(batch: int, image_size: int) -> int:
    """Upper bound of the stem conv's NCHW↔NHWC transposes in cuDNN (bf16), forward + backward."""
    x = batch * 3 * image_size * image_size
    y = batch * 64 * (image_size // 2) ** 2
    return 2 * 2 * (x + y) + 2 * 2 * y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tbps", type=float, default=3.35, help="HBM bandwidth, TB/s (H100 SXM5)")
    args = ap.parse_args()
    stem = stem_transpose_bytes(args.batch, args.image_size)
    for model, step_ms in MODELLED_STEP_MS.items():
        x, dy = copy_bytes(model, args.batch, args.image_size)
        ms = (x + dy) / args.tbps / 1e9
        print(
            f"{model}: channels_last copies x {x / 1e9:.1f} GB + dY {dy / 1e9:.1f} GB = "
            f"{(x + dy) / 1e9:.1f} GB/step = {ms:.2f} ms ({100 * ms / step_ms:.1f} % of {step_ms:.1f} ms); "
            f"NCHW stem transposes <= {stem / 1e9:.2f} GB = {stem / args.tbps / 1e9:.2f} ms"
        )


if __name__ == "__main__":
    main()
