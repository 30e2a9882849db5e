"""Outliers in the activations, and what each activation scheme does to them.

Activation quantization fails where a few values dwarf the rest: one scale must cover both, so the
large values set a step that rounds the small ones away. Two kinds, measured on FP runs over text:

- **Massive activations** (Sun et al., arXiv 2402.17762): single entries of the residual stream
  (``hook_resid_post`` of a layer) far larger than the rest, at fixed channels and usually on the
  first token or a delimiter. Here an entry is *massive* when ``|h| > MASSIVE_ABS`` and
  ``|h| > MASSIVE_RATIO ·`` the median ``|h|`` of its layer over the same text (the paper's 100
  and 1000×).
- **Outlier channels**: channels of a linear module's input (an activation site,
  :mod:`mechq.quant.activation_quant`) whose maximum ``|u|`` over tokens is at least
  ``CHANNEL_RATIO`` (10) times the median channel's maximum, in that layer and site.

:func:`scheme_damage` quantizes each site's FP tensor with a scheme's quantizer and reports, per
(layer, site): ``sqnr_db`` = 10·log10(‖u‖² / ‖Q(u) − u‖²); ``flushed``, the share of nonzero
entries outside the outlier channels that ``Q`` rounds to zero; and ``outlier_error``, the relative
error ``‖Q(u) − u‖ / ‖u‖`` on the outlier channels alone (NaN where a site has none). It isolates
the damage a scheme does at one site from the damage that flows in from earlier layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.quant import activation_quant as aq

MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
CHANNEL_RATIO = 10.0


def _site_tensors(model: HookedTransformer, ids: Sequence[int], sites: Sequence[str]
                  ) -> dict[tuple[str, int], Tensor]:
    """:func:`~mechq.quant.activation_quant.site_inputs` flattened to ``(token, channel)`` (the
    cache: ``(token, head · d_head)``)."""
    return {k: u.flatten(1) for k, u in aq.site_inputs(model, ids, sites).items()}


@torch.no_grad()
def massive_activations(model: HookedTransformer, sequences: Sequence[Sequence[int]],
                        top: int = 3) -> pd.DataFrame:
    """The ``top`` largest ``|h|`` of every layer's residual stream over ``sequences``: one row per
    entry with ``layer, sequence, position, token, channel, value, ratio`` (to the layer's median
    ``|h|``) and ``massive`` (module docstring)."""
    rows = []
    for si, ids in enumerate(sequences):
        _, cache = model.run_with_cache(torch.tensor([list(ids)]),
                                        names_filter=lambda n: n.endswith("hook_resid_post"))
        for layer in range(model.cfg.n_layers):
            h = cache[f"blocks.{layer}.hook_resid_post"][0].float()
            med = float(h.abs().median())
            vals, idx = h.abs().flatten().topk(top)
            for v, i in zip(vals.tolist(), idx.tolist()):
                pos, ch = divmod(i, h.shape[1])
                rows.append(dict(layer=layer, sequence=si, position=pos,
                                 token=model.tokenizer.decode([ids[pos]]), channel=ch,
                                 value=float(h[pos, ch]), ratio=v / max(med, 1e-12)))
    df = pd.DataFrame(rows)
    df = (df.sort_values("value", key=abs, ascending=False)
          .groupby("layer", sort=True).head(top).sort_values(["layer", "value"], key=abs,
                                                                 ascending=[True, False]))
    df["massive"] = (df["value"].abs() > MASSIVE_ABS) & (df["ratio"] > MASSIVE_RATIO)
    return df.reset_index(drop=True)


def _channel_max(model, sequences, sites) -> dict[tuple[str, int], Tensor]:
    amax: dict[tuple[str, int], Tensor] = {}
    for ids in sequences:
        for key, u in _site_tensors(model, ids, sites).items():
            m = u.abs().amax(0)
            amax[key] = m if key not in amax else torch.maximum(amax[key], m)
    return amax


@torch.no_grad()
def outlier_channels(model: HookedTransformer, sequences: Sequence[Sequence[int]],
                     sites: Sequence[str] = aq.INPUT_SITES, ratio: float = CHANNEL_RATIO
                     ) -> pd.DataFrame:
    """Outlier channels of each site's input over ``sequences``: one row per (layer, site,
    channel) with its ``amax`` and ``ratio`` to the median channel's maximum (module
    docstring), largest ratio first within a layer and site."""
    rows = []
    for (site, layer), m in sorted(_channel_max(model, sequences, sites).items(),
                                   key=lambda kv: (kv[0][1], aq.SITES.index(kv[0][0]))):
        med = float(m.median())
        r = m / max(med, 1e-12)
        for ch in torch.nonzero(r >= ratio).flatten().tolist():
            rows.append(dict(layer=layer, site=site, channel=ch, amax=float(m[ch]),
                             ratio=float(r[ch])))
    cols = ["layer", "site", "channel", "amax", "ratio"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["layer", "site", "ratio"], ascending=[True, True, False],
                          ignore_index=True)


@torch.no_grad()
def scheme_damage(model: HookedTransformer, act: aq.ActScheme,
                  sequences: Sequence[Sequence[int]], ratio: float = CHANNEL_RATIO
                  ) -> pd.DataFrame:
    """Per (layer, site) the scheme quantizes: ``sqnr_db``, ``flushed``, ``outlier_error`` and
    ``n_outliers`` (module docstring), pooled over ``sequences``, each site's FP tensor
    quantized on its own. A static scheme must be calibrated (its ``scales``). One FP run per
    sequence: every sum is kept per channel (float64), and the outlier channels, known only
    once every sequence has set its maximum, pick theirs at the end."""
    sites = act.sites
    # per (site, layer): channel max |u|, Σu², Σ(Q(u) − u)², # flushed, # nonzero
    acc: dict[tuple[str, int], list[Tensor]] = {}
    for ids in sequences:
        for (site, layer), u in _site_tensors(model, ids, sites).items():
            q = act.quantizer(site)
            scale = None
            if not q.dynamic:
                scale = act.scales.get((site, layer))
                if scale is None:
                    raise aq.SchemeError(f"{act.name!r} is static and uncalibrated: calibrate "
                                         "it first (mechq.quant.variants.calibrated).")
            shaped = u.reshape(1, u.shape[0], model.cfg.n_key_value_heads or model.cfg.n_heads,
                               -1) if q.granularity == "head" else u[None]
            y = aq.fake_quant(shaped, q, scale).reshape(u.shape)
            nonzero = u != 0
            new = [u.abs().amax(0), (u.double() ** 2).sum(0), ((y - u).double() ** 2).sum(0),
                   ((y == 0) & nonzero).sum(0).double(), nonzero.sum(0).double()]
            old = acc.get((site, layer))
            acc[(site, layer)] = new if old is None else [torch.maximum(old[0], new[0]),
                                                          *(a + b for a, b in zip(old[1:],
                                                                                   new[1:]))]
    rows = []
    for (site, layer), (amax, u2, e2, flushed, nonzero) in sorted(
            acc.items(), key=lambda kv: (kv[0][1], aq.SITES.index(kv[0][0]))):
        out = amax / max(float(amax.median()), 1e-12) >= ratio
        n_out = int(out.sum())
        rows.append(dict(scheme=act.name, layer=layer, site=site,
                         sqnr_db=float(10 * torch.log10(u2.sum() / e2.sum().clamp_min(1e-30))),
                         flushed=float(flushed[~out].sum() / nonzero[~out].sum().clamp_min(1)),
                         outlier_error=float((e2[out].sum() / u2[out].sum()).sqrt())
                         if n_out else float("nan"),
                         n_outliers=n_out))
    return pd.DataFrame(rows)
