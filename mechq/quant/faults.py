"""Checkpoints read the wrong way: the format bugs real quantized-model loaders make.

Each function takes a correctly read :class:`Variant` and returns the variant a buggy reader
would have produced from the same checkpoint, so that a diagnosis can be checked against a
known cause (``mechq.diagnose`` must answer ``"format_bug"`` and name the module):

- :func:`awq_order_as_gptq`: AWQ GEMM packs eight 4-bit codes of one *input* row per int32 in
  the order 0, 2, 4, 6, 1, 3, 5, 7 of their output columns; a reader that takes them in
  sequential order puts each output column's codes and zero points into its neighbour's column
  (within blocks of eight), under the right column's scale.
- :func:`zero_point_off_by_one`: GPTQ v1 stores ``zero − 1``, v2 stores ``zero``; reading one
  as the other shifts every zero point, hence every weight, by one quantization step.
- :func:`permuted_g_idx`: a group index (``g_idx``, act-order) applied in the wrong order, so
  input channels take the scales and zero points of other groups.
- :func:`transposed_codes`: the code matrix read with its axes swapped, for the square modules
  where the shapes still fit (the others are left as they were). A model without a square
  linear module cannot be misread this way silently (a transposing reader fails on the
  shapes): :class:`FaultNotApplicable`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mechq.quant.formats.awq import AWQ_ORDER
from mechq.quant.packing import PackedLinear, pack_int
from mechq.quant.variants import Variant


class FaultNotApplicable(ValueError):
    """The fault cannot occur silently on this variant (no module it would change)."""


def _repacked(p: PackedLinear, codes: torch.Tensor, zeros: torch.Tensor) -> PackedLinear:
    """``p`` with new ``(in, out)`` codes and ``(groups, out)`` zero points (stored as v2)."""
    return replace(p, qweight=pack_int(codes, p.bits, 0), qzeros=pack_int(zeros, p.bits, 1),
                   zero_offset=0)


def _each_module(variant: Variant, fault, suffix: str) -> Variant:
    modules = {m: fault(p) for m, p in variant.modules.items()}
    return replace(variant, name=f"{variant.name}-{suffix}", modules=modules,
                   meta={**variant.meta, "fault": suffix})


def awq_order_as_gptq(variant: Variant) -> Variant:
    """Codes and zero points of each block of eight output columns read in AWQ's packing order
    as if it were sequential (4-bit variants; see the module docstring)."""
    if variant.bits != 4:
        raise ValueError(f"AWQ's nibble order concerns 4-bit codes; {variant.name} has "
                         f"{variant.bits} bits.")

    def fault(p: PackedLinear) -> PackedLinear:
        n = p.out_features - p.out_features % 8
        cols = torch.arange(p.out_features)
        cols[:n] = (cols[:n].view(-1, 8)[:, list(AWQ_ORDER)]).reshape(-1)
        return _repacked(p, p.codes()[:, cols], p.zeros()[:, cols])

    return _each_module(variant, fault, "awq-order")


def zero_point_off_by_one(variant: Variant) -> Variant:
    """Every module's zero points read with the other GPTQ version's offset (v1 <-> v2)."""
    return _each_module(variant, lambda p: replace(p, zero_offset=1 - p.zero_offset),
                        "zero-offset")


def permuted_g_idx(variant: Variant, seed: int = 0) -> Variant:
    """Every module's ``g_idx`` permuted (a private generator seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    return _each_module(
        variant, lambda p: replace(p, g_idx=p.g_idx[torch.randperm(p.in_features,
                                                                    generator=gen)]),
        "g-idx")


def transposed_codes(variant: Variant) -> Variant:
    """Codes of every square module read transposed; the other modules unchanged.

    Only meaningful for a variant whose groups span whole rows or whose group structure is the
    same along both axes: the zero points and scales stay where they were.
    """
    if not any(p.in_features == p.out_features for p in variant.modules.values()):
        raise FaultNotApplicable(
            f"{variant.name} has no square module: a reader that transposed its codes would "
            "fail on their shapes, not misread them silently.")

    def fault(p: PackedLinear) -> PackedLinear:
        if p.in_features != p.out_features:
            return p
        return _repacked(p, p.codes().T.contiguous(), p.zeros())

    return _each_module(variant, fault, "transposed")
