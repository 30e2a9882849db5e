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
one fp16 scale and one zero point per group and output (``bits + (16 + bits) / group_size``),
which is what :attr:`mechq.Variant.avg_bits` measures on the written checkpoint.
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
    return {m: layout.module_weight(model, m).numel() for m in layout.modules(model.cfg)}


def estimated_bits(model: HookedTransformer, bits: int, group_size: int,
                   high: dict[str, int] | None = None,
                   sizes: dict[str, int] | None = None) -> float:
    """Average bits per weight of the linear modules when ``high`` maps some modules to other
    bit widths: ``b + (16 + b) / group_size`` per weight of a module at ``b`` bits (per-channel
    groups, ``group_size = -1``, count one group per row: negligible here)."""
    high = high or {}
    sizes = sizes or weights_per_module(model)
    per = lambda b: b + ((16 + b) / group_size if group_size > 0 else 0.0)  # noqa: E731
    total = sum(n * per(high.get(m, bits)) for m, n in sizes.items())
    return total / sum(sizes.values())


def early_layers(model: HookedTransformer, k: int = 2, high: int = 8) -> dict:
    """``dynamic`` putting every linear module of layers ``0 … k−1`` at ``high`` bits."""
    if not 0 < k <= model.cfg.n_layers:
        raise ValueError(f"k must lie in 1 … {model.cfg.n_layers}, got {k}.")
    mods = [s.module for s in layout.sites(model.cfg) if s.layer < k]
    return {_rule(list(dict.fromkeys(mods))): {"bits": high}}


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
    sizes = weights_per_module(model)
    base = estimated_bits(model, bits, group_size, sizes=sizes)
    if budget < base:
        raise ValueError(f"budget {budget} is below the base variant's {base:.3f} bits per weight "
                         f"({bits} bits, group size {group_size}).")
    chosen: dict[str, int] = {}
    for m in kurtosis_ranking(model)["module"]:
        if estimated_bits(model, bits, group_size, {**chosen, m: high}, sizes) <= budget:
            chosen[m] = high
    return {_rule(list(chosen)): {"bits": high}} if chosen else {}
