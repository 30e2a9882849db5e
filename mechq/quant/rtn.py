"""Group-wise round-to-nearest (RTN) quantization: the no-calibration baseline.

For a weight ``W`` of shape ``(out, in)`` and group size ``g``, input columns are split into
groups of ``g`` consecutive columns (the last group may be partial). For every output row and
group, with ``maxq = 2**bits - 1`` and the group's values ``w``:

- asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``, ``scale = (hi - lo) / maxq``,
  ``zero = round(-lo / scale)``;
- symmetric: ``a = max(|min(w)|, |max(w)|)``, ``scale = 2a / maxq``, ``zero = (maxq + 1) / 2``;

``scale`` is stored in fp16 and codes are ``q = clamp(round(w / scale) + zero, 0, maxq)``, so the
dequantized weight is ``scale * (q - zero)`` — the same grid GPTQ uses, without its error
feedback. Results are packed in the GPTQ layout (:class:`~mechq.quant.packing.PackedLinear`, v2
zero points, which represent ``zero = 0`` without the v1 off-by-one).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechq.quant.packing import PackedLinear
from mechq.vocab import SUPPORTED_BITS


def rtn_quantize_weight(
    w: Float[Tensor, "out in"], bits: int, group_size: int, sym: bool = True
) -> PackedLinear:
    """Quantize one Linear-oriented weight with group-wise RTN into a packed GPTQ layout."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"RTN supports bits {SUPPORTED_BITS}, got {bits}.")
    out_f, in_f = w.shape
    g = in_f if group_size in (-1, 0, None) else group_size
    n_groups = -(-in_f // g)
    maxq = 2**bits - 1
    wt = w.detach().to(torch.float32).T.contiguous()  # (in, out), GPTQ orientation
    g_idx = torch.arange(in_f, dtype=torch.int32) // g
    pad = n_groups * g - in_f
    grouped = torch.nn.functional.pad(wt, (0, 0, 0, pad), value=0.0).reshape(n_groups, g, out_f)
    # Padding rows are zeros, which never widen [lo, hi] because 0 is always inside the range.
    lo = grouped.amin(dim=1).clamp(max=0)
    hi = grouped.amax(dim=1).clamp(min=0)
    if sym:
        a = torch.maximum(lo.abs(), hi)
        scale = 2 * a / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (hi - lo) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale16 = scale.to(torch.float16)
    s = scale16.to(torch.float32)
    if zero is None:
        zero = torch.round(-lo / s).clamp(0, maxq)
    q = torch.round(wt / s[g_idx.long()]) + zero[g_idx.long()]
    q = q.clamp(0, maxq).to(torch.int32)
    return PackedLinear.from_codes(
        codes=q,
        zeros=zero.to(torch.int32),
        scales=scale16,
        g_idx=g_idx,
        bits=bits,
        group_size=g,
        zero_offset=0,
    )
