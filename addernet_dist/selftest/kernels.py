"""The ``kernels`` check: every Triton adder code path against the pure-PyTorch reference (the
specification), compiled on CUDA, through the Triton interpreter on CPU."""

from __future__ import annotations

import contextlib
import time

import torch

from addernet_dist.selftest.plan import CheckFailed, DeviceDescription

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Allowed error relative to the largest reference magnitude of each result: fp32 compute sums K ≤ ~200
# terms here (≈ 1e-6 relative); 16-bit storage rounds each stored result to 2^-8 (bf16) / 2^-11 (fp16).
_TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}


@contextlib.contextmanager
def kernel_module(mode: str):
    if mode == "interpreter":
        from addernet_dist.kernels.triton_testing import interpreted_modules

        with interpreted_modules("addernet_dist.kernels.triton_adder") as (ta,):
            yield ta
    else:
        from addernet_dist.kernels import tile_tuner
        from addernet_dist.kernels import triton_adder as ta

        # correctness of every code path with the first tile of each list: timing tiles here would
        # cost minutes of ptxas; the speed check tunes
        saved = tile_tuner.TUNING_ENABLED
        tile_tuner.TUNING_ENABLED = False
        try:
            yield ta
        finally:
            tile_tuner.TUNING_ENABLED = saved


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    ref = ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def run_kernel_case(ta, case: dict, shape: dict, device: str) -> dict[str, float]:
    """One code path vs the reference on the same (16-bit-rounded) inputs, in fp64. Returns errors."""
    from addernet_dist.ops import reference

    g = torch.Generator().manual_seed(0)
    n, c, o, h, k = shape["n"], shape["c"], shape["o"], shape["h"], shape["k"]
    st, pad = shape["stride"], shape["pad"]
    dt = _DTYPES[case["dtype"]]
    x = torch.randn(n, c, h, h, generator=g).to(dt)
    w = (0.5 * torch.randn(o, c, k, k, generator=g)).to(dt)
    p_out = (h + 2 * pad - k) // st + 1
    gy = torch.randn(n, o, p_out, p_out, generator=g).to(dt)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    xd, wd, gd = (
        t.to(device).to(memory_format=fmt) if t.dim() == 4 else t.to(device) for t in (x, w, gy)
    )
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y_ref = reference.adder2d_reference(
        x64, w64, stride=st, padding=pad, p=case["p"], grad_x=case["grad_x"], grad_w=case["grad_w"]
    )
    errs: dict[str, float] = {}
    tol = _TOL[case["dtype"]]
    epi = case["epilogue"]
    if epi == "none":
        xk, wk = xd.clone().requires_grad_(True), wd.clone().requires_grad_(True)
        y = ta.adder2d_triton(
            xk,
            wk,
            stride=st,
            padding=pad,
            p=case["p"],
            grad_x=case["grad_x"],
            grad_w=case["grad_w"],
            deterministic=case["deterministic"],
        )
        y.backward(gd)
        y_ref.backward(gy.double())
        if case["channels_last"] and not y.is_contiguous(memory_format=torch.channels_last):
            raise CheckFailed("channels_last input gave a non-channels_last output")
        errs = {
            "y": _rel_err(y, y_ref),
            "dx": _rel_err(xk.grad, x64.grad),
            "dw": _rel_err(wk.grad, w64.grad),
        }
    else:
        conv = ((st, st), (pad, pad), (1, 1))
        y_ref = y_ref.detach()
        if epi == "bn_stats":
            y, (mean, var) = ta.adder2d_forward(
                xd, wd, *conv, case["p"], (p_out, p_out), bn_stats=True
            )
            errs = {
                "y": _rel_err(y, y_ref),
                # the statistics of what was stored (the kernel's promise), relative to their spread
                "mean": float(
                    (mean.double().cpu() - y.double().cpu().mean((0, 2, 3))).abs().max()
                    / y_ref.std()
                ),
                "var": _rel_err(var, y.double().cpu().var((0, 2, 3), unbiased=False)),
            }
        else:
            gen = torch.Generator().manual_seed(1)
            center = y_ref.mean((0, 2, 3)).float()
            scale = (torch.rand(o, generator=gen) + 0.5) / y_ref.std((0, 2, 3)).float()
            shift = torch.randn(o, generator=gen)
            res = (
                torch.randn(n, o, p_out, p_out, generator=gen).to(dt)
                if epi == "affine_res_relu"
                else None
            )
            kw = dict(scale=scale.to(device), shift=shift.to(device), center=center.to(device))
            if res is not None:
                kw.update(residual=res.to(device).to(memory_format=fmt), relu=True)
            y, _ = ta.adder2d_forward(xd, wd, *conv, case["p"], (p_out, p_out), **kw)
            ref = (y_ref - center.double()[None, :, None, None]) * scale.double()[
                None, :, None, None
            ]
            ref = ref + shift.double()[None, :, None, None]
            if res is not None:
                ref = torch.relu(ref + res.double())
            errs = {"y": _rel_err(y, ref)}
    bad = {key: v for key, v in errs.items() if not (v <= tol)}  # NaN fails too
    if bad:
        raise CheckFailed(
            f"{_case_label(case)}: errors {bad} exceed {tol:g} (relative to the reference)"
        )
    return errs


def _case_label(case: dict) -> str:
    parts = [
        f"p={case['p']:g}",
        case["grad_x"],
        f"dF={case['grad_w']}",
        "det" if case["deterministic"] else "atomic",
        case["dtype"],
    ]
    if case["channels_last"]:
        parts.append("channels_last")
    if case["epilogue"] != "none":
        parts.append(f"epi={case['epilogue']}")
    return " ".join(parts)


def check_kernels(desc: DeviceDescription, params: dict) -> dict:
    rows, failures = [], []
    with kernel_module(params["mode"]) as ta:
        for case in params["cases"]:
            t0 = time.perf_counter()
            try:
                errs = run_kernel_case(ta, case, params["shape"], params["device"])
                rows.append(
                    dict(case=_case_label(case), ok=True, errors=errs, s=time.perf_counter() - t0)
                )
            except Exception as e:  # noqa: BLE001 — every case runs; the check fails at the end
                failures.append(f"{_case_label(case)}: {type(e).__name__}: {e}")
                rows.append(dict(case=_case_label(case), ok=False, error=str(e)[:500]))
    if failures:
        raise CheckFailed(
            f"{len(failures)} of {len(rows)} kernel cases failed: " + "; ".join(failures)
        )
    return {"mode": params["mode"], "cases": rows}
