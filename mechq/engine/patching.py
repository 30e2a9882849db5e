"""Batched cross-model activation patching and zero ablation (paper §3.4).

Which activations of the FP model are *sufficient* to bring a quantized model's answer back, and
which are *necessary* for it?

Definitions (ours; the paper gives no code). A **site** is (layer ``l``, token position ``p``) of
one activation kind:

- ``resid_pre``: the residual stream entering block ``l`` (``blocks.l.hook_resid_pre``);
- ``resid_mid``: after block ``l``'s attention, before its MLP (``blocks.l.hook_resid_mid``);
- ``resid_post``: the residual stream leaving block ``l`` (``blocks.l.hook_resid_post``);
- ``attn_out`` / ``mlp_out``: what block ``l``'s attention / MLP adds to the residual stream.

Modes:

- ``"fp_to_variant"`` (sufficiency, "denoising"): run the quantized variant, but replace the
  activation at the site by the FP model's activation there (same prompt);
- ``"variant_to_fp"`` (the reverse, "noising"): run the FP model with the variant's activation
  patched in at the site;
- ``"zero"`` (necessity): zero the activation at the site, on FP (``variant=None``) or on the
  variant.

The metric is read at the prompt's last position (next-token prediction of the fact's target
token ``t``, scored by :func:`mechq.engine.forward.score`): ``target_prob = softmax(z)[t]``,
``target_rank = 1 + #{v : z_v > z_t}``, ``correct = argmax(z) == t``. Each prompt's result also
carries the unpatched run's numbers (``baseline_*``: the model being patched, without the patch)
and the FP model's (``fp_*``).

Entry points: :func:`patch_sites` (one token sequence, grids ``[layer, pos]``),
:func:`patch_prompts` (several, each set of weights swapped in once) and
:func:`batched_act_patch` (TransformerLens's ``get_act_patch_*`` signature). The resumable sweep
over facts and its aggregation are in :mod:`mechq.analysis.patching`.

How the engine batches. TransformerLens's ``patching`` runs one full forward per site. Here,
for one prompt, the sites are put on the batch axis: replica ``i`` patches site ``i``, through
one hook per layer that writes into the rows of that layer's replicas. Three exact shortcuts
follow from causality:

1. *Layers*: a site at layer ``l`` leaves layers ``< l`` as in the unpatched run, so its replica
   joins the batch at layer ``l`` from the unpatched ``resid_pre`` there (cached by one unpatched
   run per prompt); block ``l`` runs only the replicas of layers ``≤ l``.
2. *Positions* (KV reuse): a site at position ``p`` leaves positions ``< p`` as in the unpatched
   run, so its replica computes positions ``p … n-1`` only and attends to the unpatched run's
   keys/values of earlier positions, handed to each block as a frozen TransformerLens KV-cache
   entry (what ``generate`` uses). Replicas are grouped into position bands that start at the
   band's first position (:func:`_bands` trades FLOPs against too-small block calls).
3. *Identical sites*: where the value patched in equals the one already there (``resid_pre`` of
   layer 0: embeddings are not quantized), the patched run *is* the unpatched one.

Only the last position's final residual is kept; the final norm and unembedding run once per
site (not per position). Attention and gated-MLP weights are given, for the duration, the memory
layout TransformerLens's kernels build on every call (:func:`kernel_layout`, bit-identical), so
block calls do not copy weights. Sites are split into chunks of at most ``max_batch`` replicas
and ``memory_mb`` of estimated transient memory (:func:`rows_per_chunk`); logits are decoded and
reduced in slices of the same budget. The activations patched in come from one batch-1 run per
prompt that keeps only the hooked activation at the chosen layers, and a variant is swapped in
once per call of :func:`patch_prompts`. All shortcuts can be switched off (``kv_reuse``,
``skip_identical``); results do not change beyond float rounding (tested).

Results agree with ``transformer_lens.patching`` (one forward per site) within float rounding
(tested to 1e-4 against ``get_act_patch_resid_pre`` with the FP cache as clean cache and the
variant swapped in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from mechq.models.families import family_of
from mechq.engine.forward import kernel_layout, score
from mechq.quant.variants import Variant, swap
from mechq.vocab import hook_name

ACTIVATIONS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
MODES = ("fp_to_variant", "variant_to_fp", "zero")


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def rows_per_chunk(model: HookedTransformer, n_tokens: int, max_batch: int = 512,
                   memory_mb: float | None = 1024.0) -> int:
    """How many replicas (sites) of an ``n_tokens`` prompt go into one forward.

    The estimate of transient memory per replica is one block's activations (residual, q/k/v/z,
    attention scores and pattern, MLP pre/post) plus the last position's logits and softmax,
    in the model's dtype; TransformerLens keeps no more than that alive at once without caching.
    """
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    hd = cfg.n_heads * cfg.d_head
    per_tok = 6 * cfg.d_model + 4 * hd + 3 * d_mlp + 3 * cfg.n_heads * n_tokens
    elt = torch.empty((), dtype=cfg.dtype).element_size()
    per_row = elt * n_tokens * per_tok + 4 * 3 * cfg.d_vocab
    rows = max_batch
    if memory_mb is not None:
        rows = min(rows, int(memory_mb * 2**20 // per_row))
    return max(1, rows)


def _decode(model: HookedTransformer, resid: Float[Tensor, "batch d_model"]
            ) -> Float[Tensor, "batch vocab"]:
    """Final norm + unembedding of last-position residual vectors.

    ``x @ W_U + b_U`` on the stored ``[d_model, vocab]`` matrix (TransformerLens's ``Unembed``,
    and so :func:`mechq.engine.forward.decode`, first copies its transpose, 113 MB for SmolLM2, on every
    call; the two differ by float rounding for a single row, so the engine keeps its own).
    """
    x = model.ln_final(resid[:, None, :])[:, 0]
    logits = torch.addmm(model.unembed.b_U, x, model.unembed.W_U)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap).float()


def _decode_apply(model: HookedTransformer, resid: Tensor, fn: Callable, rows: int):
    """``fn(logits)`` over slices of ``rows`` residual vectors (logits never all in memory);
    concatenates tensors, or dicts of tensors key by key."""
    parts = [fn(_decode(model, resid[i : i + rows])) for i in range(0, resid.shape[0], rows)]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _score(logits: Float[Tensor, "batch vocab"], target: int) -> dict[str, Tensor]:
    """:func:`mechq.engine.forward.score` against one target, as ``prob``, ``rank``,
    ``correct``."""
    s = score(logits, target)
    return dict(prob=s["target_prob"], rank=s["target_rank"], correct=s["correct"])


@torch.no_grad()
def _capture(model: HookedTransformer, tokens: Tensor, names: set[str]
             ) -> tuple[dict[str, Tensor], Tensor]:
    """One unpatched run: the hooked activations named (batch row 0) and the final residual
    stream at the last position (``[1, d_model]``)."""
    store: dict[str, Tensor] = {}

    def grab(act, hook):
        store[hook.name] = act[0].clone()

    with model.hooks(fwd_hooks=[(lambda n: n in names, grab)]):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    return store, resid[:, -1]


@dataclass
class _Prepared:
    """What a prompt needs for its patched runs, from one unpatched run under the target weights."""

    tokens: Tensor                        # [1, n]
    resid_pre: dict[int, Tensor]          # layer -> [n, d_model]
    own: dict[int, Tensor]                # layer -> [n, ...] the patched activation, unpatched
    keys: dict[int, Tensor]               # layer -> [1, n, kv_heads, d_head], as cached
    values: dict[int, Tensor]
    shortformer: Tensor | None            # [1, n, d_model] or None
    attention_mask: Tensor | None         # [1, n] or None
    reuse_kv: bool


def _can_reuse_kv(model: HookedTransformer) -> bool:
    """Whether ``hook_k`` / ``hook_v`` are exactly what TransformerLens's KV cache stores."""
    return family_of(model.cfg).kv_cache_matches_hooks(model.cfg)


@torch.no_grad()
def _prepare(model: HookedTransformer, tokens: Tensor, layers: Sequence[int], activation: str,
             reuse_kv: bool):
    L = model.cfg.n_layers
    names = {hook_name("resid_pre", l) for l in layers} | {hook_name(activation, l) for l in layers}
    kv_layers = range(min(layers), L) if reuse_kv else range(0)
    names |= {hook_name(x, l) for l in kv_layers for x in "kv"}
    cache, final = _capture(model, tokens, names)
    _, _, spe, mask = model.input_to_embed(tokens)
    return _Prepared(
        tokens,
        resid_pre={l: cache[hook_name("resid_pre", l)] for l in layers},
        own={l: cache[hook_name(activation, l)] for l in layers},
        keys={l: cache[hook_name("k", l)][None] for l in kv_layers},
        values={l: cache[hook_name("v", l)][None] for l in kv_layers},
        shortformer=spe, attention_mask=mask, reuse_kv=reuse_kv,
    ), final


def _expand(x: Tensor | None, rows: int) -> Tensor | None:
    return None if x is None else x.expand(rows, *x.shape[1:])


#: GEMM rows (replicas × tokens) below which a block call costs about as much as this many rows:
#: small calls are merged into position bands (see :func:`_bands`).
MIN_TOKENS = 64
#: On a GPU a block call costs its launch overhead more than its arithmetic: fewer, larger bands
#: win (H100, full SmolLM2 sweeps: 4096 ran 2.7-5.7x faster than 64, same results;
#: benchmarks/results/patching_h100.json).
MIN_TOKENS_CUDA = 4096


def default_min_tokens(model: HookedTransformer) -> int:
    """Band-size floor for :func:`_bands`: :data:`MIN_TOKENS` on CPU, more on a GPU."""
    return MIN_TOKENS_CUDA if torch.device(model.cfg.device).type == "cuda" else MIN_TOKENS



def _bands(layer_idx: Tensor, pos_idx: Tensor, n: int, n_layers: int, reuse_kv: bool,
           min_tokens: int = MIN_TOKENS) -> list[tuple[int, list[int]]]:
    """Split the sites' positions into contiguous bands ``(start, positions)``.

    A band's replicas run on tokens ``start … n-1`` (positions before ``start`` come from the
    KV cache). One band per position does the fewest FLOPs, but makes many small block calls;
    this picks the partition minimising ``Σ_calls max(rows × tokens, min_tokens)`` by dynamic
    programming over the sorted positions. Without KV reuse there is one band from 0.
    """
    U = sorted(set(pos_idx.tolist()))
    if not reuse_kv:
        return [(0, U)]
    # rows[k, l]: replicas of position U[k] alive at layer l (they join at their own layer)
    count = torch.zeros(len(U), n_layers, dtype=torch.long)
    index = {p: k for k, p in enumerate(U)}
    count.index_put_((torch.tensor([index[p] for p in pos_idx.tolist()]), layer_idx),
                     torch.ones(len(pos_idx), dtype=torch.long), accumulate=True)
    alive = torch.cat([torch.zeros(1, n_layers, dtype=torch.long),
                       count.cumsum(1).cumsum(0)])  # prefix sums over positions
    best = [0] + [None] * len(U)
    cut = [0] * (len(U) + 1)
    for j in range(1, len(U) + 1):
        for i in range(max(0, j - 64), j):  # bands of at most 64 positions
            rows = alive[j] - alive[i]
            cost = torch.where(rows > 0, (rows * (n - U[i])).clamp(min=min_tokens), 0).sum()
            c = best[i] + int(cost)
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], len(U)
    while j > 0:
        i = cut[j]
        out.append((U[i], U[i:j]))
        j = i
    return out[::-1]


@torch.no_grad()
def _patched_final(
    model: HookedTransformer,
    prep: _Prepared,
    layer_idx: Tensor,
    pos_idx: Tensor,
    activation: str,
    source: dict[int, Tensor] | None,
    max_batch: int,
    memory_mb: float | None,
    on_chunk=None,
    min_tokens: int | None = None,
) -> Tensor:
    """Final last-position residual of one replica per site (``source=None``: zero ablation).

    Sites are grouped by position ``p``. Patching at ``(l, p)`` leaves every position ``< p``
    and every layer ``< l`` as in the unpatched run, so a replica is run only on positions
    ``p … n-1`` from layer ``l`` on: it joins the batch at its layer with the unpatched
    ``resid_pre`` there, and attends to the unpatched run's keys and values of positions ``< p``
    (a frozen TransformerLens KV-cache entry, which is what ``generate`` uses). Positions are
    grouped into bands (:func:`_bands`) so that block calls are not too small. Returns
    ``[sites, d_model]`` in the order of the given sites.
    """
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    L = model.cfg.n_layers
    n = prep.tokens.shape[1]
    dev = model.cfg.device
    final = torch.empty(len(layer_idx), model.cfg.d_model, dtype=model.cfg.dtype, device=dev)
    if min_tokens is None:
        min_tokens = default_min_tokens(model)
    for s, band in _bands(layer_idx, pos_idx, n, L, prep.reuse_kv, min_tokens):
        sel = torch.isin(pos_idx, torch.tensor(band)).nonzero()[:, 0]
        sel = sel[torch.argsort(layer_idx[sel], stable=True)]
        chunk = rows_per_chunk(model, n - s, max_batch, memory_mb)
        for c0 in range(0, len(sel), chunk):
            idx = sel[c0 : c0 + chunk]
            ls = layer_idx[idx].tolist()
            ps = pos_idx[idx].to(dev)
            spans: dict[int, tuple[int, int]] = {}
            for r, l in enumerate(ls):
                spans[l] = (spans.get(l, (r, r))[0], r + 1)
            hooks = []
            for l, (a, b) in spans.items():
                rows = torch.arange(b - a, device=dev)
                pos = ps[a:b]
                val = None if source is None else source[l][pos]

                def hook(act, hook, a=a, b=b, rows=rows, pos=pos - s, val=val):
                    part = act[a:b]
                    part[rows, pos] = 0 if val is None else val.to(act.dtype)
                    return act

                hooks.append((hook_name(activation, l), hook))
            resid = None
            with model.hooks(fwd_hooks=hooks):
                for l in range(ls[0], L):
                    if l in spans:
                        a, b = spans[l]
                        new = prep.resid_pre[l][None, s:].repeat(b - a, 1, 1)
                        resid = new if resid is None else torch.cat([resid, new])
                    rows_now = resid.shape[0]
                    entry = None
                    if s > 0:
                        entry = TransformerLensKeyValueCacheEntry(
                            past_keys=_expand(prep.keys[l][:, :s], rows_now),
                            past_values=_expand(prep.values[l][:, :s], rows_now),
                            frozen=True,
                        )
                    spe = prep.shortformer
                    resid = model.blocks[l](
                        resid,
                        shortformer_pos_embed=_expand(None if spe is None else spe[:, s:],
                                                      rows_now),
                        past_kv_cache_entry=entry,
                        attention_mask=_expand(prep.attention_mask, rows_now),
                    )
            final[idx.to(dev)] = resid[:, -1]
            if on_chunk is not None:
                on_chunk(len(ls))
    return final


def validate(activation: str, mode: str, variant: Variant | None) -> None:
    """Raise on an unknown activation or mode, or a mode the variant cannot have."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode == "variant_to_fp" and variant is None:
        raise ValueError("mode='variant_to_fp' needs a variant.")
    if variant is not None and not isinstance(variant, Variant):
        raise TypeError(f"variant must be a mechq Variant or None, got {type(variant).__name__}.")


def _roles(mode: str, variant: Variant | None):
    """(weights of the source run, weights of the patched run, whether a source is patched)."""
    if mode == "fp_to_variant":
        return None, variant, True
    if mode == "variant_to_fp":
        return variant, None, True
    return None, variant, False


def layer_list(model: HookedTransformer, layers: int | Iterable[int] | None) -> list[int]:
    """The sorted distinct layers to patch (``None``: all); raises on one out of range."""
    L = model.cfg.n_layers
    if layers is None:
        return list(range(L))
    out = sorted({int(l) for l in ([layers] if isinstance(layers, int) else layers)})
    bad = [l for l in out if not 0 <= l < L]
    if bad or not out:
        raise ValueError(f"layers must be in 0…{L - 1} (and not empty), got {bad or out}.")
    return out


def _run_prompt(model, prep, base_final, li, pi, activation, source, max_batch, memory_mb,
                skip_identical, on_chunk=None, min_tokens: int | None = None) -> Tensor:
    """Final last-position residual of every site (``[sites, d_model]``). Sites whose patch
    writes the value already there reuse the unpatched run's (exact: the patched forward *is*
    the unpatched one)."""
    same = torch.zeros(len(li), dtype=torch.bool)
    if skip_identical:
        for i, (l, p) in enumerate(zip(li.tolist(), pi.tolist())):
            own = prep.own[l][p]
            same[i] = bool((own == 0).all()) if source is None else torch.equal(source[l][p], own)
    final = torch.empty(len(li), model.cfg.d_model, dtype=base_final.dtype,
                        device=base_final.device)
    final[same.to(final.device)] = base_final
    todo = (~same).nonzero()[:, 0]
    if len(todo):
        final[todo.to(final.device)] = _patched_final(model, prep, li[todo], pi[todo],
                                                      activation, source, max_batch, memory_mb,
                                                      on_chunk, min_tokens)
    if on_chunk is not None and int(same.sum()):
        on_chunk(int(same.sum()))
    return final


def _decode_rows(model: HookedTransformer, max_batch: int, memory_mb) -> int:
    return rows_per_chunk(model, 1, max_batch, memory_mb)


@jaxtyped(typechecker=beartype)
def batched_act_patch(
    model: HookedTransformer,
    tokens: Int[Tensor, "1 pos"],
    clean_cache=None,
    metric: Callable[[Tensor], Tensor] | None = None,
    *,
    target_id: int | None = None,
    activation: str = "resid_pre",
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    max_batch: int = 512,
    memory_mb: float | int | None = 1024.0,
    kv_reuse: bool = True,
    skip_identical: bool = True,
    min_tokens: int | None = None,
) -> Float[Tensor, "layer site_pos"]:
    """Batched counterpart of ``transformer_lens.patching.get_act_patch_<activation>``.

    Same inputs as TransformerLens's function for one prompt: the model *as it is now* (e.g.
    with a variant swapped in: the "corrupted" run), its ``tokens`` and a ``clean_cache`` (an
    ``ActivationCache`` or a dict of hook name → ``[1, pos, ...]``, e.g. from the FP model) whose
    activation at each (layer, position) is patched in; ``clean_cache=None`` zero-ablates
    instead. ``metric`` maps last-position logits ``[sites, vocab]`` to ``[sites]`` (default:
    softmax probability of ``target_id``). Returns ``[len(layers), len(positions)]`` (default
    all layers × all positions), like TransformerLens's ``[n_layers, pos]``. ``min_tokens``:
    the smallest block call worth making (:func:`_bands`; default :func:`default_min_tokens`).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if metric is None:
        if target_id is None:
            raise ValueError("Give a metric or a target_id.")
        metric = lambda logits: logits.softmax(-1)[:, target_id]  # noqa: E731
    n = tokens.shape[1]
    lay = layer_list(model, layers)
    pos = _positions(n, positions)
    tokens = tokens.to(model.cfg.device)
    li = torch.tensor(lay).repeat_interleave(len(pos))
    pi = torch.tensor(pos).repeat(len(lay))
    source = None
    if clean_cache is not None:
        source = {l: clean_cache[hook_name(activation, l)][0].to(model.cfg.device) for l in lay}
    with kernel_layout(model, range(lay[0], model.cfg.n_layers)):
        prep, base_final = _prepare(model, tokens, lay, activation,
                                    kv_reuse and _can_reuse_kv(model))
        final = _run_prompt(model, prep, base_final, li, pi, activation, source, max_batch,
                            memory_mb, skip_identical, min_tokens=min_tokens)
        out = _decode_apply(model, final, metric, _decode_rows(model, max_batch, memory_mb))
    return out.reshape(len(lay), len(pos))


def _positions(n: int, positions) -> list[int]:
    pos = list(range(n)) if positions is None else [int(p) for p in positions]
    if not pos or any(not 0 <= p < n for p in pos):
        raise ValueError(f"positions must be in 0…{n - 1}, got {pos}.")
    return pos


class Prompt(NamedTuple):
    """One token sequence to patch: its tokens, the target token id scored at its last
    position, and the positions to patch (``None``: all)."""

    tokens: Int[Tensor, "1 pos"]
    target_id: int
    positions: Sequence[int] | None = None


@torch.no_grad()
def patch_prompts(
    model: HookedTransformer,
    prompts: Sequence[Prompt],
    variant: Variant | None = None,
    *,
    activation: str = "resid_pre",
    mode: str = "fp_to_variant",
    layers: int | Iterable[int] | None = None,
    max_batch: int = 512,
    memory_mb: float | int | None = 1024.0,
    kv_reuse: bool = True,
    skip_identical: bool = True,
    on_result: Callable[[int, dict], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[dict[str, Tensor | float | int | bool]]:
    """:func:`patch_sites` of several prompts, each set of weights swapped in once for all.

    The source runs (the activations patched in, and the FP or variant scores) run first under
    the source weights, then the patched runs under the target weights. ``on_result(i, result)``
    is called as soon as prompt ``i`` is done (e.g. to save it); ``on_chunk(n)`` after every
    ``n`` sites.
    """
    validate(activation, mode, variant)
    lay = layer_list(model, layers)
    dev = model.cfg.device
    todo = [(p.tokens.to(dev), p.target_id, _positions(p.tokens.shape[1], p.positions))
            for p in prompts]
    src_w, tgt_w, patch = _roles(mode, variant)
    names = {hook_name(activation, l) for l in lay} if patch else set()
    sources = []
    with swap(model, src_w), kernel_layout(model, range(model.cfg.n_layers)):
        for tokens, target_id, _ in todo:
            cache, final = _capture(model, tokens, names)
            source = {l: cache[hook_name(activation, l)] for l in lay} if patch else None
            sources.append((source, _score(_decode(model, final), target_id)))
    reuse = kv_reuse and _can_reuse_kv(model)
    results = []
    with swap(model, tgt_w), kernel_layout(model, range(lay[0], model.cfg.n_layers)):
        for i, ((tokens, target_id, pos), (source, src_score)) in enumerate(zip(todo, sources)):
            li = torch.tensor(lay).repeat_interleave(len(pos))
            pi = torch.tensor(pos).repeat(len(lay))
            prep, base_final = _prepare(model, tokens, lay, activation, reuse)
            final = _run_prompt(model, prep, base_final, li, pi, activation, source, max_batch,
                                memory_mb, skip_identical, on_chunk=on_chunk)
            s = _decode_apply(model, final, lambda lg: _score(lg, target_id),
                              _decode_rows(model, max_batch, memory_mb))
            base = _score(_decode(model, base_final), target_id)
            fp = src_score if tgt_w is not None else base
            shape = (len(lay), len(pos))
            out = {f"target_{k}" if k != "correct" else "correct": v.reshape(shape)
                   for k, v in s.items()}
            out.update({f"baseline_{k}": v[0].item() for k, v in base.items()})
            out.update({f"fp_{k}": v[0].item() for k, v in fp.items()})
            out.update(layers=torch.tensor(lay), positions=torch.tensor(pos))
            results.append(out)
            if on_result is not None:
                on_result(i, out)
    return results


@jaxtyped(typechecker=beartype)
def patch_sites(
    model: HookedTransformer,
    tokens: Int[Tensor, "1 pos"],
    target_id: int,
    variant: Variant | None = None,
    *,
    activation: str = "resid_pre",
    mode: str = "fp_to_variant",
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | None = None,
    **engine,
) -> dict[str, Tensor | float | int | bool]:
    """Patch every (layer, position) of one token sequence; grids of shape ``[layer, pos]``.

    The tensor-level engine behind :func:`mechq.analysis.patching.patch_sweep`, for any token sequence
    (no fact needed). Returns ``target_prob``, ``target_rank``, ``correct`` (each
    ``[len(layers), len(positions)]``), ``baseline_prob/rank/correct`` and
    ``fp_prob/rank/correct`` (Python scalars), ``layers`` and ``positions``. Swaps ``variant``
    in and out itself. ``engine`` takes :func:`patch_prompts`' options (``max_batch``,
    ``memory_mb``; ``kv_reuse`` / ``skip_identical`` switch off the engine's two shortcuts, see
    the module docstring, and results do not change).
    """
    positions = None if positions is None else list(positions)
    return patch_prompts(model, [Prompt(tokens, target_id, positions)], variant,
                         activation=activation, mode=mode, layers=layers, **engine)[0]
