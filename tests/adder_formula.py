"""An explicit float64 statement of the adder operator and its gradients, independent of the library
(no unfold, no chunking): a loop over kernel taps on the zero-padded input. Used only by tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _taps(x_pad, kh, kw, stride, dilation, ho, wo):
    sh, sw = stride
    dh, dw = dilation
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            yield (
                i,
                j,
                (slice(r0, r0 + sh * (ho - 1) + 1, sh), slice(c0, c0 + sw * (wo - 1) + 1, sw)),
            )


def formula(x, w, g, stride, padding, dilation, p, grad_x, grad_w):
    """Returns (y, dL/dx, dL/dw) for upstream gradient g, all float64."""
    x, w, g = x.double(), w.double(), g.double()
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ph, pw = padding
    ho, wo = g.shape[2], g.shape[3]
    x_pad = F.pad(x, (pw, pw, ph, ph))
    y = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    gx_pad = torch.zeros_like(x_pad)
    gw = torch.zeros_like(w)
    for i, j, (rs, cs) in _taps(x_pad, kh, kw, stride, dilation, ho, wo):
        patch = x_pad[:, :, rs, cs]  # (N, C, Ho, Wo)
        d = patch[:, None] - w[None, :, :, i, j, None, None]  # (N, O, C, Ho, Wo) = x − w
        y -= (d.abs() ** p).sum(2)
        gw_tap = d if grad_w == "full" else d.sign()
        gw[:, :, i, j] += (gw_tap * g[:, :, None]).sum((0, 3, 4))
        e = -d  # w − x
        if grad_x == "hardtanh":
            fx = e.clamp(-1, 1)
        else:
            fx = e.sign() * e.abs() ** (p - 1) if p != 1 else e.sign()
        gx_pad[:, :, rs, cs] += (fx * g[:, :, None]).sum(1)
    gx = gx_pad[:, :, ph : ph + h, pw : pw + wd]
    return y, gx, gw
