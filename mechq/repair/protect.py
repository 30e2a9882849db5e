"""Protecting sensitive weights: mixed-bit rules in GPTQModel's ``dynamic`` syntax (paper §4.3).

Signal Degradation is repaired, in the paper, by keeping a few sensitive weights at higher
precision. Two rules choose them; both return a ``dynamic`` mapping for
``mechq.quantize(model, method, bits, dynamic=...)`` (RTN, or GPTQ through GPTQModel):

- :func:`early_layers`: every linear module of the first ``k`` layers at ``high`` bits (paper:
  ``k = 2`` at 8 bits, about 4.25 bits per weight on Llama-3-8B), for models whose damage starts
  in the first layers ("first domino").
- :func:`kurtosis_protection`: modules ranked by the excess kurtosis of their FP weights
  (heavy tails: a few large weights that rounding treats worst), protected at ``high`` bits in
  that order while the estimated average stays within ``budget`` bits per weight.

Average bits are estimated as :func:`estimated_bits` does, from the module shapes: codes,
one fp16 scale and one zero point per group and output, which is what
:attr:`mechq.Variant.avg_bits` measures on the written checkpoint.
"""

from __future__ import annotations

import re

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.quant import layout


def _rule(modules: list[str]) -> str:
    """A ``+:`` rule matching exactly these module names."""
    return "+:^(?:" + "|".join(re.escape(m) for m in modules) + ")$"


def weights_per_module(model: HookedTransformer) -> dict[str, int]:
    """Number of weights of every linear module, in layout order."""
    return {m: o * i for m, (o, i) in module_shapes(model).items()}


def module_shapes(model: HookedTransformer) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every linear module, in layout order."""
    return {m: tuple(layout.module_weight(model, m).shape) for m in layout.modules(model.cfg)}


def estimated_bits(model: HookedTransformer, bits: int, group_size: int,
                   high: dict[str, int] | None = None,
                   shapes: dict[str, tuple[int, int]] | None = None) -> float:
    """Average bits per weight of the linear modules when ``high`` maps some modules to other
    bit widths. A module ``(out, in)`` at ``b`` bits stores ``b`` bits per weight plus, per output
    and group, one fp16 scale and one ``b``-bit zero point, with ``ceil(in / group_size)`` groups
    (one for ``group_size = -1``): a 576-wide input at g128 has 5 groups, not 4.5."""
    high = high or {}
    shapes = shapes or module_shapes(model)
    total = n = 0
    for m, (o, i) in shapes.items():
        b = high.get(m, bits)
        groups = -(-i // group_size) if group_size > 0 else 1
        total += b * o * i + groups * o * (16 + b)
        n += o * i
    return total / n


def early_modules(model: HookedTransformer, k: int, high: int = 8) -> dict[str, int]:
    """Every linear module of layers ``0 … k−1``, mapped to ``high`` bits (in layout order; the
    ``high`` argument of :func:`estimated_bits`)."""
    return {s.module: high for s in layout.sites(model.cfg) if s.layer < k}


def early_layers(model: HookedTransformer, k: int = 2, high: int = 8) -> dict:
    """``dynamic`` putting every linear module of layers ``0 … k−1`` at ``high`` bits."""
    if not 0 < k <= model.cfg.n_layers:
        raise ValueError(f"k must lie in 1 … {model.cfg.n_layers}, got {k}.")
    return {_rule(list(early_modules(model, k, high))): {"bits": high}}


def kurtosis_ranking(model: HookedTransformer) -> pd.DataFrame:
    """Every linear module with its FP weights' excess kurtosis ``E[(w−μ)⁴]/σ⁴ − 3`` and
    ``max|w−μ|/σ``, most heavy-tailed first."""
    first_layer = {}
    for s in layout.sites(model.cfg):
        first_layer.setdefault(s.module, s.layer)
    rows = []
    for module, layer in first_layer.items():
        w = layout.module_weight(model, module).detach().double().flatten()
        z = (w - w.mean()) / w.std()
        rows.append(dict(module=module, layer=layer, n_weights=w.numel(),
                         kurtosis=float((z ** 4).mean() - 3), max_over_sigma=float(z.abs().max())))
    return pd.DataFrame(rows).sort_values("kurtosis", ascending=False, ignore_index=True)


def kurtosis_protection(model: HookedTransformer, bits: int, budget: float,
                        group_size: int = 128, high: int = 8) -> dict:
    """``dynamic`` protecting the most heavy-tailed modules at ``high`` bits, in kurtosis order,
    while :func:`estimated_bits` stays ≤ ``budget``; modules that do not fit are skipped over
    (a smaller one further down may still fit)."""
    shapes = module_shapes(model)
    base = estimated_bits(model, bits, group_size, shapes=shapes)
    if budget < base:
        raise ValueError(f"budget {budget} is below the base variant's {base:.3f} bits per weight "
                         f"({bits} bits, group size {group_size}).")
    chosen: dict[str, int] = {}
    for m in kurtosis_ranking(model)["module"]:
        if estimated_bits(model, bits, group_size, {**chosen, m: high}, shapes) <= budget:
            chosen[m] = high
    return {_rule(list(chosen)): {"bits": high}} if chosen else {}
