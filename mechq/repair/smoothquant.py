"""SmoothQuant (Xiao et al., arXiv 2211.10438): move the activations' outliers into the weights.

A linear module computes ``X Wᵀ``. For any positive per-input-channel ``s``,
``X Wᵀ = (X diag(1/s)) (W diag(s))ᵀ``: dividing channel ``j`` of the activation by ``s_j`` and
multiplying column ``j`` of the weight by it changes nothing in full precision, but flattens the
outlier channels that set a per-tensor activation scale. SmoothQuant's choice, with migration
strength ``α``:

    s_j = max|X_j|^α / max|W_j|^(1−α)

(``max|X_j|`` over calibration tokens; ``max|W_j|`` over the output rows of every module that
reads ``X``). The division by ``s`` is folded into the producer of ``X``, so it costs nothing at
inference:

- ``attn_in``: the norm before q/k/v (its weight ``w`` becomes ``w / s``); q, k, v take ``· s``;
- ``mlp_in``: the norm before the MLP; gate and up take ``· s``;
- ``down_in`` (gated MLPs): the up projection's output rows take ``/ s`` (the hidden state is
  ``act(gate) ⊙ up``, linear in up), down's columns ``· s``.

O's input is left alone (its producer, v, is shared across query heads under grouped-query
attention). Families with RMSNorm only (a LayerNorm's bias would also need ``/ s``).

:func:`fit` picks ``α`` per layer and mapping from a grid (or no smoothing, ``α = None``) by the
relative output error ``‖X Wᵀ − Q_a(X/s) Q_w(W s)ᵀ‖² / ‖X Wᵀ‖²`` on calibration activations, with
the scheme's activation quantizer ``Q_a`` (its static scale ``max|X/s| / qmax`` where static) and
per-channel symmetric RTN weights ``Q_w``; for ``down_in`` the up projection's own rounding is
left out of the objective. The result is a Variant: the smoothed weights, RTN-quantized per output
channel, the smoothed norms, and the activation scheme calibrated on the smoothed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.facts.calibration import from_pool
from mechq.quant import activation_quant as aq
from mechq.quant import layout
from mechq.quant.rtn import rtn_quantize_weight
from mechq.quant.variants import Variant, calibrated

#: the migration strengths tried per layer and mapping, besides no smoothing
ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Smoothing:
    """One smoothing: the activation ``site`` of ``layer``, the HF ``modules`` that read it, and
    what absorbs ``1 / s``: a norm site (``norm``) or the producer module's output rows
    (``producer``)."""

    layer: int
    site: str
    modules: tuple[str, ...]
    norm: object | None = None
    producer: str | None = None


def mappings(model: HookedTransformer) -> list[Smoothing]:
    """The smoothings of ``model`` (module docstring); a clear error for a family without
    RMSNorm."""
    if model.cfg.normalization_type != "RMS":
        raise ValueError(f"SmoothQuant folds 1/s into RMSNorm weights; this model's norms are "
                         f"{model.cfg.normalization_type!r} (a LayerNorm's bias is not handled).")
    sites = layout.sites(model.cfg)
    out = []
    for n in layout.norm_sites(model.cfg):
        mods = tuple(dict.fromkeys(s.module for s in sites
                                   if s.layer == n.layer and s.component in n.components))
        out.append(Smoothing(n.layer, "attn_in" if "q" in n.components else "mlp_in", mods, n))
    if model.cfg.gated_mlp:
        for l in range(model.cfg.n_layers):
            mod = {s.component: s.module for s in sites if s.layer == l}
            out.append(Smoothing(l, "down_in", (mod["down"],), producer=mod["up"]))
    return sorted(out, key=lambda m: (m.layer, aq.SITES.index(m.site)))


def smoothing_scale(x_amax: Float[Tensor, " channel"], w_amax: Float[Tensor, " channel"],
                    alpha: float | None) -> Float[Tensor, " channel"]:
    """``s = max|X|^α / max|W|^(1−α)`` per channel (1 where either maximum is 0); ``None`` → 1."""
    if alpha is None:
        return torch.ones_like(x_amax)
    s = x_amax.clamp_min(1e-8) ** alpha / w_amax.clamp_min(1e-8) ** (1 - alpha)
    return torch.where((x_amax > 0) & (w_amax > 0), s, torch.ones_like(s))


def _rtn8(w: Tensor, bits: int) -> Tensor:
    return rtn_quantize_weight(w, bits, -1, sym=True).weight(torch.float32)


def _output_error(x: Tensor, w: Tensor, s: Tensor, q: aq.Quantizer, bits: int) -> float:
    ref = x @ w.T
    xs = x / s
    scale = None if q.dynamic else float(xs.abs().max()) / q.qmax
    got = aq.fake_quant(xs[None], q, scale)[0] @ _rtn8(w * s, bits).T
    return float(((ref - got) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))


def _inputs(model, sequences, sites) -> dict[tuple[str, int], Tensor]:
    """Every site's linear input over ``sequences``, stacked as ``(tokens, channels)``."""
    got: dict[tuple[str, int], list[Tensor]] = {}
    for ids in sequences:
        for key, u in aq.site_inputs(model, ids, sites).items():
            got.setdefault(key, []).append(u)
    return {k: torch.cat(v) for k, v in got.items()}


@torch.no_grad()
def smoothed(model: HookedTransformer, scales: dict[Smoothing, Tensor]
             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The FP weights after smoothing by ``scales`` (one ``s`` per mapping): every linear module's
    ``(out, in)`` weight, and the rewritten norms as HF tensors. In full precision the model
    computes the same function (up to float32 rounding)."""
    weights = {m: layout.module_weight(model, m).detach().float().clone()
               for m in layout.modules(model.cfg)}
    params = dict(model.named_parameters())
    norms: dict[str, Tensor] = {}
    for mp, s in scales.items():
        for m in mp.modules:
            weights[m] = weights[m] * s
        if mp.producer is not None:
            weights[mp.producer] = weights[mp.producer] / s[:, None]
        else:
            n = mp.norm
            offset = layout.norm_to_hooked(torch.zeros(1), n, model.cfg)  # Gemma: 1 + w
            norms[n.tensor] = (params[n.param].detach().float() / s - offset).to(
                params[n.param].dtype)
    return weights, norms


def fp_scales(scales: dict[Smoothing, Tensor]) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Per module, ``(s_out, s_in)``: the smoothed FP weight is ``diag(1/s_out) · W · diag(s_in)``
    (``None``: 1). What the weight signatures compare a smoothed module with
    (``Variant.meta["fp_scales"]``)."""
    out: dict[str, list] = {}
    for mp, s in scales.items():
        for m in mp.modules:
            out.setdefault(m, [None, None])[1] = s
        if mp.producer is not None:
            out.setdefault(mp.producer, [None, None])[0] = s
    return {m: (o, i) for m, (o, i) in out.items()}


@torch.no_grad()
def fit(model: HookedTransformer, act: aq.ActScheme, sequences: Sequence[Sequence[int]] | None
        = None, *, alphas: Sequence[float] = ALPHAS, bits: int = 8, name: str | None = None
        ) -> tuple[Variant, pd.DataFrame]:
    """SmoothQuant ``model`` for the activation scheme ``act`` (module docstring): returns the
    W``bits`` variant with ``act`` calibrated on the smoothed model, and the choice frame (one row
    per layer, site and candidate: ``alpha`` (NaN = no smoothing), ``error``, ``chosen``).
    ``sequences``: calibration text (default: 8 × 128 tokens of the bundled pool)."""
    if act.inputs is None:
        raise aq.SchemeError(f"{act.name!r} quantizes no linear input: nothing to smooth.")
    if sequences is None:
        sequences = from_pool(model, n_samples=8, seq_len=128).tokens
    maps = mappings(model)
    xs = _inputs(model, sequences, {m.site for m in maps})
    rows, scales = [], {}
    for mp in maps:
        x = xs[(mp.site, mp.layer)]
        w = torch.cat([layout.module_weight(model, m).detach().float() for m in mp.modules])
        x_amax, w_amax = x.abs().amax(0), w.abs().amax(0)
        errs = {a: _output_error(x, w, smoothing_scale(x_amax, w_amax, a), act.inputs, bits)
                for a in (None, *alphas)}
        best = min(errs, key=errs.get)
        rows += [dict(layer=mp.layer, site=mp.site, alpha=float("nan") if a is None else a,
                      error=e, chosen=a == best) for a, e in errs.items()]
        scales[mp] = smoothing_scale(x_amax, w_amax, best)
    weights, norms = smoothed(model, scales)
    modules = {m: rtn_quantize_weight(w, bits, -1, sym=True) for m, w in weights.items()}
    variant = Variant(name or f"smoothquant-w{bits}+{act.name}", "smoothquant", bits, -1, True,
                      False, modules, meta={"alphas": list(alphas),
                                            "fp_scales": fp_scales(scales)},
                      norms=norms, act=replace(act, scales={}))
    return calibrated(model, variant), pd.DataFrame(rows)


def plain(model: HookedTransformer, act: aq.ActScheme, bits: int = 8) -> Variant:
    """The baseline SmoothQuant is measured against: the same per-channel RTN W``bits`` weights,
    unsmoothed, with ``act`` calibrated on them."""
    modules = {m: rtn_quantize_weight(layout.module_weight(model, m).detach().float(), bits, -1,
                                      sym=True) for m in layout.modules(model.cfg)}
    v = Variant(f"rtn-w{bits}-channel+{act.name}", "rtn", bits, -1, True, False, modules,
                act=replace(act, scales={}))
    return calibrated(model, v)
