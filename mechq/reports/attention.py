"""Attention patterns of FP and quantized variants on one prompt, drawn with circuitsvis.

The numbers behind paper Fig. 6 (attention entropy and JSD, :mod:`mechq.analysis.components`) are
averages; this view shows the patterns themselves. For one prompt and one layer,
:func:`attention_patterns` returns ``A[v, h, q, k]`` = the attention weight that head ``h`` puts on
key position ``k`` from query position ``q`` (TransformerLens's ``blocks.{l}.attn.hook_pattern``,
a softmax over keys ``k ≤ q``) under each variant, read from the same weight-swapped model so
FP and quantized runs share hook names.

:func:`attention_view` draws them as circuitsvis ``AttentionHeads`` panels, one per variant.
circuitsvis's own offline HTML (``RenderedHTML.local_src``) inlines its 1.3 MB JavaScript
bundle (``circuitsvis/dist/cdn/iife.js``) into every view. mechq keeps the bundle apart:
:func:`circuitsvis_script` is the bundle as one ``<script>`` that defines the global
``CircuitsVis``, and each view fragment only calls ``CircuitsVis.render``. A page carries the
script once, however many views it holds (:class:`AttentionView` ``_repr_html_`` for notebooks,
:meth:`mechq.reports.html.Report.attention` for the report). Nothing is fetched from the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechq.quant.variants import Variant, swap
from mechq.vocab import FP, hook_name



@dataclass
class AttentionPatterns:
    """Attention of each variant at one layer on one prompt."""

    prompt: str
    tokens: list[str]
    layer: int
    variants: list[str]
    pattern: Float[torch.Tensor, "variant head query key"]


@torch.no_grad()
def attention_patterns(
    model: HookedTransformer,
    prompt: str,
    variants: Sequence[Variant | None],
    layer: int | None = None,
) -> AttentionPatterns:
    """``blocks.{layer}.attn.hook_pattern`` on ``prompt`` for each variant (``None`` is FP).

    ``layer`` defaults to the middle layer (``n_layers // 2``; on SmolLM2 layer 15, where 2-bit
    attention already differs from FP and 4-bit still matches it).
    """
    layer = model.cfg.n_layers // 2 if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be an int in 0..{model.cfg.n_layers - 1}, got {layer!r}.")
    if not prompt:
        raise ValueError("attention_patterns needs a non-empty prompt.")
    if not variants:
        raise ValueError("attention_patterns needs at least one variant (None is FP).")
    toks = model.to_tokens(prompt, prepend_bos=model.cfg.default_prepend_bos)
    name = hook_name("pattern", layer)
    pats = []
    for v in variants:
        with swap(model, v):
            _, cache = model.run_with_cache(toks, names_filter=name)
        pats.append(cache[name][0].float().cpu())
    return AttentionPatterns(prompt, [str(t) for t in model.to_str_tokens(toks[0])], layer,
                             [FP if v is None else v.name for v in variants],
                             torch.stack(pats))


@lru_cache(maxsize=1)
def circuitsvis_script() -> str:
    """circuitsvis's offline bundle as one ``<script>`` element (defines ``CircuitsVis``)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(f"circuitsvis {circuitsvis.__version__} has no {path}; "
                                "mechq needs its offline bundle (circuitsvis ≥ 1.40).")
    # an inline script ends at the first "</script>"; circuitsvis strips it the same way
    js = path.read_text(encoding="utf-8").replace("</script>", "")
    return f"<script>{js}</script>"


def _fragment(pats: AttentionPatterns, i: int) -> str:
    """One variant's panel: circuitsvis's offline HTML with the bundle taken out."""
    import html

    from circuitsvis.attention import attention_heads

    n_heads = pats.pattern.shape[1]
    local = attention_heads(pats.pattern[i], pats.tokens,
                            attention_head_names=[f"L{pats.layer}H{h}" for h in range(n_heads)]
                            ).local_src
    bundle = circuitsvis_script()[len("<script>"):-len("</script>")]
    if bundle not in local:
        raise RuntimeError("circuitsvis's local_src no longer inlines dist/cdn/iife.js as "
                           "expected; mechq cannot share one script across views.")
    title = f"{pats.variants[i]} — layer {pats.layer}"
    # circuitsvis writes a self-closing <div .../>, which HTML parsers read as an open div; and
    # a classic script (not a module) runs in page order, right after the bundle defined
    # CircuitsVis, also where module scripts do not run (jsdom, some notebook viewers)
    body = (local.replace(bundle, "", 1)
            .replace('margin: 15px 0;"/>', 'margin: 15px 0;"></div>', 1)
            .replace('<script crossorigin type="module">', "<script>", 1))
    return f"<h4>{html.escape(title)}</h4>{body}"


@dataclass
class AttentionView:
    """Panels of :class:`AttentionPatterns`, side by side in one page."""

    patterns: AttentionPatterns

    def fragments(self) -> list[str]:
        """One HTML fragment per variant; each needs :func:`circuitsvis_script` earlier on the page."""
        return [_fragment(self.patterns, i) for i in range(len(self.patterns.variants))]

    def html(self, include_script: bool = True) -> str:
        """All panels, with the circuitsvis bundle first when ``include_script``."""
        p = self.patterns
        import html as _h
        head = (f"<p>Attention at layer {p.layer} on {_h.escape(repr(p.prompt))}: query rows, "
                f"key columns; click a head to enlarge it.</p>")
        return (circuitsvis_script() if include_script else "") + head + "".join(self.fragments())

    def _repr_html_(self) -> str:
        return self.html(include_script=True)


def attention_view(
    model: HookedTransformer,
    prompt: str,
    variants: Sequence[Variant | None],
    layer: int | None = None,
) -> AttentionView:
    """circuitsvis panels of each variant's attention at ``layer`` (default: the middle layer)
    on ``prompt`` (FP is ``None``)."""
    return AttentionView(attention_patterns(model, prompt, variants, layer))
