"""Do the quantized model's components still work? Attention and FFN diagnostics (paper §4.1).

Every metric compares a variant with the FP model on the same prompts, per layer ``l`` and at
named token positions (default: ``subject_last``, the knowledge-extraction site, and ``last``,
where the answer is predicted). The paper publishes no code; these definitions are mechq's.

Attention (Fig. 6), from ``blocks.{l}.attn.hook_pattern``: for a query at position ``p`` a head's
attention ``a`` is a distribution over the ``n = p + 1`` visible keys ``0 … p``.

- ``attn_entropy``: normalized attention entropy ``H(a) / ln(n)`` with ``H(a) = −Σ a_k ln a_k``
  (``0 ln 0 = 0``), averaged over heads. 1 = uniform attention over the visible keys, 0 = all
  attention on one key. Undefined for ``n = 1`` (a query at position 0 sees one key): NaN there,
  which summaries skip. Absolute (not a comparison): the FP rows are FP's own entropy.
- ``attn_jsd`` (focus divergence): Jensen–Shannon divergence ``½ KL(a_fp ‖ m) + ½ KL(a_q ‖ m)``,
  ``m = ½(a_fp + a_q)``, natural log, so it lies in ``[0, ln 2]`` (``ln 2`` for disjoint
  supports); per head, then averaged over heads. The paper reads it at the last subject token;
  mechq reports it at every requested position.

FFN key–value memory (Fig. 7), ``d_mlp`` neurons:

- ``sign_flip``: share of neurons with ``sign(g_fp) ≠ sign(g_q)`` on ``blocks.{l}.mlp.hook_pre``.
  For gated (SwiGLU, Llama-family) MLPs TransformerLens's ``hook_pre`` is the *gate*
  pre-activation ``x·W_gate`` (before SiLU; the up projection is ``hook_pre_linear``). For
  non-gated MLPs (GPT-2 family, GELU) it is the MLP pre-activation ``x·W_in + b_in`` — the
  "key" match before the nonlinearity, used as the analogue of the gate.
- ``topk_jaccard``: Jaccard index ``|A ∩ B| / |A ∪ B|`` of the index sets of the
  ``k = max(1, ceil(top_frac · d_mlp))`` neurons with the largest ``|activation|`` on
  ``blocks.{l}.mlp.hook_post`` (the activation that multiplies ``W_out``), ``top_frac = 1 %``.
- ``value_cosine``: cosine similarity between FP's and the variant's FFN output
  ``blocks.{l}.hook_mlp_out`` (the retrieved "value" written to the residual stream).

:func:`component_metrics` runs the FP model once, keeping only these four hooks at the requested
positions (:mod:`mechq.engine.activations`), then each variant, and returns one tidy row per
(variant, fact, layer, position, metric). The ``fp`` rows of the comparative metrics compare FP
with itself (JSD 0, sign flip 0, Jaccard 1, cosine 1): the reference line in plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.engine.activations import Activations, _collect, prompt_positions
from mechq.facts import FactSet
from mechq.quant.variants import Variant, VariantSpec
from mechq.analysis.recall import variant_runs
from mechq.engine.forward import tokenize_facts
from mechq.vocab import FP
from mechq.vocab import hook_template

METRICS = ("attn_entropy", "attn_jsd", "sign_flip", "topk_jaccard", "value_cosine")
HOOKS = {k: hook_template(k) for k in ("pattern", "pre", "post", "mlp_out")}  # "blocks.{l}...."


# --------------------------------------------------------------------------------------------
# Metrics on tensors
# --------------------------------------------------------------------------------------------


@jaxtyped(typechecker=beartype)
def normalized_entropy(
    pattern: Float[Tensor, "*batch key"], n_visible: Int[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """``H(p) / ln(n_visible)`` of each attention row (natural log, ``0 ln 0 = 0``).

    Keys beyond ``n_visible`` must carry zero weight (causal masking does that). Rows with
    ``n_visible ≤ 1`` are NaN: the entropy of a single key is 0/0.
    """
    p = pattern.double()
    h = -torch.special.xlogy(p, p).sum(-1)
    n = n_visible.to(h.device).double()
    return torch.where(n > 1, h / torch.log(n.clamp(min=2)), torch.nan).to(pattern.dtype)


@jaxtyped(typechecker=beartype)
def js_divergence(
    p: Float[Tensor, "*batch key"], q: Float[Tensor, "*batch key"]
) -> Float[Tensor, "*batch"]:
    """Jensen–Shannon divergence ``½ KL(p‖m) + ½ KL(q‖m)``, ``m = (p+q)/2``, natural log.

    In ``[0, ln 2]``: 0 iff ``p = q`` (exactly 0 for identical rows), ``ln 2`` for disjoint
    supports. Computed in float64 and clipped to that range against rounding.
    """
    p, q = p.double(), q.double()
    m = (p + q) / 2
    kl_p = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)
    kl_q = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)
    return ((kl_p + kl_q) / 2).clamp(0.0, math.log(2)).float()


@jaxtyped(typechecker=beartype)
def sign_flip_rate(
    fp: Float[Tensor, "*batch neuron"], q: Float[Tensor, "*batch neuron"]
) -> Float[Tensor, "*batch"]:
    """Share of neurons whose sign differs, ``mean[sign(fp) ≠ sign(q)]`` (``sign(0) = 0``)."""
    return (torch.sign(fp) != torch.sign(q)).float().mean(-1)


def top_k_count(d: int, top_frac: float) -> int:
    """``max(1, ceil(top_frac · d))``: how many neurons the top-``top_frac`` set holds."""
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must lie in (0, 1], got {top_frac}.")
    return max(1, math.ceil(top_frac * d - 1e-9))


@jaxtyped(typechecker=beartype)
def topk_jaccard(
    fp: Float[Tensor, "*batch neuron"], q: Float[Tensor, "*batch neuron"], top_frac: float = 0.01
) -> Float[Tensor, "*batch"]:
    """Jaccard index of the top-``k`` ``|activation|`` neuron index sets (``k`` from
    :func:`top_k_count`): ``|A ∩ B| / |A ∪ B| = i / (2k − i)`` with ``i = |A ∩ B|``."""
    k = top_k_count(fp.shape[-1], top_frac)
    a = torch.zeros(fp.shape, dtype=torch.bool, device=fp.device)
    b = torch.zeros_like(a)
    a.scatter_(-1, fp.abs().topk(k, dim=-1).indices, True)
    b.scatter_(-1, q.abs().topk(k, dim=-1).indices, True)
    inter = (a & b).sum(-1).float()
    return inter / (2 * k - inter)


@jaxtyped(typechecker=beartype)
def cosine(
    fp: Float[Tensor, "*batch d"], q: Float[Tensor, "*batch d"]
) -> Float[Tensor, "*batch"]:
    """Cosine similarity ``⟨fp, q⟩ / (‖fp‖ ‖q‖)`` along the last axis (float64 inside)."""
    return F.cosine_similarity(fp.double(), q.double(), dim=-1, eps=1e-30).to(fp.dtype)


# --------------------------------------------------------------------------------------------
# Comparing two collections
# --------------------------------------------------------------------------------------------


def component_hooks(n_layers: int) -> list[str]:
    """The hooks :func:`component_metrics` reads, for every layer."""
    return [t.format(l=l) for l in range(n_layers) for t in HOOKS.values()]


def compare_components(
    fp: Activations,
    q: Activations,
    positions: dict[str, Int[Tensor, " n_prompts"]],
    n_layers: int,
    top_frac: float = 0.01,
) -> dict[tuple[str, int, str], Float[Tensor, " n_prompts"]]:
    """Per-prompt values of every metric, ``{(metric, layer, position): tensor}``.

    ``fp`` and ``q`` come from :func:`mechq.engine.activations.collect` with :func:`component_hooks`;
    ``positions`` maps each position name to the token index per prompt (the query of the
    attention row is at that index, so it sees ``index + 1`` keys). ``attn_entropy`` is the
    entropy of ``q``'s attention.
    """
    out = {}
    for pos, idx in positions.items():
        for l in range(n_layers):
            key = lambda h: (HOOKS[h].format(l=l), pos)  # noqa: E731
            pf, pq = fp[key("pattern")], q[key("pattern")]
            n_keys = (idx + 1)[:, None].expand(pq.shape[:2]).contiguous()  # [n, head]
            out[("attn_entropy", l, pos)] = normalized_entropy(pq, n_keys).mean(-1)
            out[("attn_jsd", l, pos)] = js_divergence(pf, pq).mean(-1)
            out[("sign_flip", l, pos)] = sign_flip_rate(fp[key("pre")], q[key("pre")])
            out[("topk_jaccard", l, pos)] = topk_jaccard(fp[key("post")], q[key("post")],
                                                         top_frac)
            out[("value_cosine", l, pos)] = cosine(fp[key("mlp_out")], q[key("mlp_out")])
    return out


def _frame(name: str, vals: dict, info: pd.DataFrame) -> pd.DataFrame:
    n = len(info)
    frames = []
    for (metric, layer, pos), v in vals.items():
        frames.append(pd.DataFrame({
            "variant": name, "fact_id": info["fact_id"].to_numpy(),
            "relation": info["relation"].to_numpy(), "layer": layer, "position": pos,
            "metric": metric, "value": v.double().numpy().reshape(n),
        }))
    return pd.concat(frames, ignore_index=True)


def named_variants(variants) -> list[tuple[str, VariantSpec]]:
    """``[(name, spec)]`` of the variants (FP not included): :func:`mechq.analysis.recall.variant_runs`."""
    return variant_runs(variants, include_fp=False)


@beartype
def component_metrics(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence[Variant | tuple[str, VariantSpec]] = (),
    positions: Sequence[str] = ("subject_last", "last"),
    batch_size: int = 32,
    *,
    top_frac: float = 0.01,
    include_fp: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Tidy per-prompt component metrics for FP and each variant (definitions: module docstring).

    Columns: ``variant, fact_id, relation, layer, position, metric, value``; ``metric`` is one of
    :data:`METRICS`. The FP model runs once (only the four hooks × positions are kept), then each
    variant, swapped into all layers. ``variants`` takes Variants or ``(name, spec)`` pairs with a
    per-layer mapping as spec. Join Robust/Failure subsets by ``fact_id``; aggregate with
    :func:`component_summary`.
    """
    if len(facts) == 0:
        raise ValueError("component_metrics needs at least one fact.")
    todo = named_variants(variants)
    L = model.cfg.n_layers
    hooks = component_hooks(L)
    prompts, info = tokenize_facts(model, facts)
    pos = prompt_positions(model, facts, positions)
    bar = tqdm(total=(1 + len(todo)) * len(prompts), desc="components", unit="prompt",
               disable=not progress)
    try:
        fp = _collect(model, prompts, pos, hooks, None, batch_size, bar)
        frames = [_frame(FP, compare_components(fp, fp, pos, L, top_frac), info)] \
            if include_fp else []
        for name, spec in todo:
            bar.set_postfix_str(name)
            q = _collect(model, prompts, pos, hooks, spec, batch_size, bar)
            frames.append(_frame(name, compare_components(fp, q, pos, L, top_frac), info))
            del q
    finally:
        bar.close()
    return pd.concat(frames, ignore_index=True)


@beartype
def component_summary(df: pd.DataFrame, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and spread per (``by`` …, variant, layer, position, metric) over prompts.

    Columns added: ``mean``, ``std``, ``sem`` (std / √n), ``q25``, ``median``, ``q75``, ``n``
    (non-NaN prompts: undefined entropies are skipped). ``by`` adds grouping columns, e.g. a
    ``subset`` column joined from :func:`mechq.analysis.recall.subsets`.
    """
    extra = [by] if isinstance(by, str) else list(by or [])
    keys = extra + ["variant", "layer", "position", "metric"]
    g = df.groupby(keys, sort=False)["value"]
    out = g.agg(mean="mean", std="std", median="median", n="count")
    out["q25"] = g.quantile(0.25)
    out["q75"] = g.quantile(0.75)
    out["sem"] = out["std"] / out["n"].clip(lower=1) ** 0.5
    out = out.reset_index()
    return out[keys + ["mean", "std", "sem", "q25", "median", "q75", "n"]]
