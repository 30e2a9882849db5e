"""Batched forwards that keep only what a cloze prompt needs: its last position.

Every fact analysis asks one question per prompt — what does the model predict next, and what
does the residual stream hold, at the prompt's last token? This module answers it for many
prompts at once, and it is where their cost is decided.

:func:`last_states` returns the residual stream at each prompt's last position at chosen *lens
layers* (``l = 0``: the embeddings, ``blocks.0.hook_resid_pre``; ``l ≥ 1``: the output of block
``l-1``, ``blocks.{l-1}.hook_resid_post``; ``l = L`` is what the final norm and unembedding
read). Two exact shortcuts:

- **right padding, last position only**: prompts are sorted by length and right-padded; under
  causal attention a real token never attends to the padding after it, so each prompt's last
  position equals its unpadded run. Nothing is unembedded inside the forward;
- **shared prefixes**: prompts of one group (the facts of one relation share their template's
  opening words) share their longest common token prefix. Its keys and values are computed once
  per group and handed to every batch as a frozen TransformerLens KV cache, so only the suffixes
  run (37 % fewer tokens on the bundled facts). Causality makes this exact; only float rounding
  differs (the prefix runs at batch size 1).

Inside :func:`last_states` the weights sit in the layout TransformerLens's kernels build on every
call (:func:`kernel_layout`): bit-identical results, about 15 % less time on a CPU.

:func:`decode` applies the final norm and unembedding; :func:`score` turns logits into
correctness, target probability, rank and top-1 id, and :func:`score_states` does both, chunk by
chunk, for every fact analysis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from mechq.facts import FactSet, target_token

@contextmanager
def kernel_layout(model: HookedTransformer, layers: Iterable[int]):
    """Give attention and gated-MLP weights the memory layout TransformerLens's kernels want.

    TransformerLens builds its GEMM operands on every call: ``W_gate.T.contiguous()``,
    ``rearrange(W_Q, "h m d -> (h d) m")``, … which copies every weight of a block (14 MB for
    SmolLM2) per forward. Inside this context those parameters are strided views of tensors
    already in that layout, so the copies become no-ops: the same values reach the same kernel
    in the same layout (results are bit-identical). The original tensors are put back on exit.
    """
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    saved: list[tuple[torch.nn.Parameter, Tensor]] = []

    def relayout(p: torch.nn.Parameter, perm: tuple[int, ...]):
        inv = tuple(perm.index(i) for i in range(len(perm)))
        saved.append((p, p.data))
        p.data = p.data.permute(*perm).contiguous().permute(*inv)

    split = model.cfg.use_split_qkv_input or model.cfg.use_attn_in
    try:
        for l in layers:
            blk = model.blocks[l]
            attn = getattr(blk, "attn", None)
            if attn is not None and not split and not model.cfg.load_in_4bit:
                for name in ("W_Q", "_W_K", "_W_V", "W_K", "W_V"):
                    p = attn._parameters.get(name)
                    if p is not None and p.dim() == 3:
                        relayout(p, (0, 2, 1))      # -> [(h d_head), d_model] rows
                p = attn._parameters.get("W_O")
                if p is not None and p.dim() == 3:
                    relayout(p, (2, 0, 1))          # -> [d_model, (h d_head)]
            if isinstance(getattr(blk, "mlp", None), GatedMLP) and not model.cfg.load_in_4bit:
                for name in ("W_gate", "W_in", "W_out"):
                    p = blk.mlp._parameters.get(name)
                    if p is not None and p.dim() == 2:
                        relayout(p, (1, 0))
        yield model
    finally:
        for p, data in reversed(saved):
            p.data = data


#: Shared prefixes shorter than this are not worth a separate prefix run.
MIN_PREFIX = 2


def pad_id(model: HookedTransformer) -> int:
    """The id used to right-pad batches (never attended to by a real token)."""
    tok = model.tokenizer
    return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def lens_hook_name(layer: int) -> str:
    """Hook of lens layer ``layer``: embeddings (0) or the output of block ``layer - 1``."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


@dataclass
class PromptBatch:
    """Tokenized prompts, right-padded, with each prompt's length and target id."""

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    targets: Int[Tensor, " batch"]


def batches(prompts: list[list[int]], targets: Sequence[int], batch_size: int, pad: int):
    """Yield (indices, PromptBatch) with prompts sorted by length to minimise padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        toks = torch.full((len(idx), width), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            toks[row, : len(prompts[i])] = torch.tensor(prompts[i])
        yield idx, PromptBatch(
            toks,
            torch.tensor([len(prompts[i]) for i in idx]),
            torch.tensor([targets[i] for i in idx]),
        )


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all prompts share, leaving each at least one token."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for k in range(max(n, 0)):
        if any(p[k] != first[k] for p in prompts[1:]):
            return k
    return max(n, 0)


def _frozen_prefix_cache(model: HookedTransformer, prefix: list[int]
                         ) -> TransformerLensKeyValueCache:
    dev = model.cfg.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, dev, 1)
    toks = torch.tensor([prefix], device=dev)
    model(toks, attention_mask=torch.ones_like(toks), past_kv_cache=cache, return_type=None)
    cache.freeze()
    return cache


def _expand(cache: TransformerLensKeyValueCache, batch: int) -> TransformerLensKeyValueCache:
    """The same frozen cache for ``batch`` rows (views, no copies)."""
    entries = [TransformerLensKeyValueCacheEntry(
        e.past_keys.expand(batch, -1, -1, -1), e.past_values.expand(batch, -1, -1, -1),
        frozen=True) for e in cache.entries]
    mask = cache.previous_attention_mask.expand(batch, -1)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


@torch.no_grad()
def last_states(
    model: HookedTransformer,
    prompts: list[list[int]],
    layers: Sequence[int],
    *,
    groups: Sequence[Hashable] | None = None,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> Float[Tensor, "prompt layer d_model"]:
    """Residual stream at each prompt's last position, at the given lens layers (0 … L).

    ``groups`` (e.g. each fact's relation) marks prompts that may share a prefix; without it all
    prompts form one group (sharing what all of them share, often nothing). ``on_batch(n)`` is
    called after each batch of ``n`` prompts.
    """
    names = {lens_hook_name(l): i for i, l in enumerate(layers)}
    if len(names) != len(layers) or any(not 0 <= l <= model.cfg.n_layers for l in layers):
        raise ValueError(f"layers must be distinct lens layers 0…{model.cfg.n_layers}: {layers}")
    dev = model.cfg.device
    out = torch.empty(len(prompts), len(layers), model.cfg.d_model, device=dev,
                      dtype=model.cfg.dtype)
    stop = max(layers)  # blocks after the last wanted layer are not run
    by_group: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups if groups is not None else [0] * len(prompts)):
        by_group[g].append(i)
    can_cache = model.cfg.positional_embedding_type in ("rotary", "standard")
    with kernel_layout(model, range(min(stop, model.cfg.n_layers))):
        _run_groups(model, prompts, list(by_group.values()), names, out, stop, can_cache,
                    batch_size, on_batch)
    return out


def _run_groups(model, prompts, groups, names, out, stop, can_cache, batch_size, on_batch):
    """The batches of :func:`last_states`, group by group, writing into ``out``."""
    dev = model.cfg.device
    for idx in groups:
        k = common_prefix([prompts[i] for i in idx]) if len(idx) > 1 and can_cache else 0
        cache = _frozen_prefix_cache(model, prompts[idx[0]][:k]) if k >= MIN_PREFIX else None
        k = k if cache is not None else 0
        suffixes = [prompts[i][k:] for i in idx]
        for rows, b in batches(suffixes, [0] * len(idx), batch_size, pad_id(model)):
            which = torch.tensor([idx[r] for r in rows], device=dev)
            last = (b.lengths - 1).to(dev)
            sel = torch.arange(len(rows), device=dev)

            def grab(act, hook):
                out[which, names[hook.name]] = act[sel, last]

            toks = b.tokens.to(dev)
            kw = {}
            if cache is not None:
                kw = dict(past_kv_cache=_expand(cache, len(rows)),
                          attention_mask=torch.ones_like(toks))
            model.run_with_hooks(toks, fwd_hooks=[(lambda n: n in names, grab)],
                                 stop_at_layer=stop if stop > 0 else 1, **kw)
            if on_batch is not None:
                on_batch(len(rows))


@torch.no_grad()
def decode(model: HookedTransformer, resid: Float[Tensor, "... d_model"]
           ) -> Float[Tensor, "... vocab"]:
    """Final norm + unembedding of residual vectors (the model's read-out, or the lens)."""
    x = resid.reshape(-1, 1, resid.shape[-1])
    return model.unembed(model.ln_final(x))[:, 0].float().reshape(*resid.shape[:-1], -1)


def score(logits: Float[Tensor, "batch *rest vocab"], targets: Int[Tensor, " batch"] | int
          ) -> dict[str, Tensor]:
    """Correctness, target probability, rank (1-based) and top-1 id of every logit vector.

    The one definition of these four numbers: ``correct = argmax(z) == t``, ``target_prob =
    softmax(z)[t]``, ``target_rank = 1 + #{v : z_v > z_t}``. ``targets`` holds one id per row of
    ``logits`` (shared by the row's further dimensions, e.g. the lens layers), or is one id for
    all rows. Results have ``logits``'s shape less the vocabulary, on the CPU.
    """
    t = torch.as_tensor(targets, device=logits.device)
    t = t.reshape(t.shape + (1,) * (logits.dim() - 1 - t.dim())).expand(logits.shape[:-1])
    idx = t[..., None]
    top1 = logits.argmax(-1)
    return dict(
        correct=(top1 == t).cpu(),
        target_prob=logits.softmax(-1).gather(-1, idx)[..., 0].cpu(),
        target_rank=(1 + (logits > logits.gather(-1, idx)).sum(-1)).cpu(),
        top1_id=top1.cpu(),
    )


@torch.no_grad()
def score_states(model: HookedTransformer, resid: Float[Tensor, "n *rest d_model"],
                 targets: Int[Tensor, " n"], chunk: int = 64,
                 read: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """:func:`score` of residual states read out to logits, ``chunk`` rows at a time (the
    full-vocabulary logits of all rows are never in memory at once).

    ``read`` maps a chunk of states to its logits; the default is :func:`decode`, the model's
    own read-out. Every fact scorer (recall, the logit lens, sensitivity, amplification) goes
    through here, so their numbers agree by construction.
    """
    read = read if read is not None else (lambda r: decode(model, r))
    parts = [score(read(resid[i:i + chunk]), targets[i:i + chunk])
             for i in range(0, len(resid), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def tokenize_facts(model: HookedTransformer, facts: FactSet
                   ) -> tuple[list[list[int]], pd.DataFrame]:
    """Token ids of every prompt (with the model's BOS when it prepends one) and target info."""
    tok = model.tokenizer
    prompts: list[list[int]] = []
    rows = []
    for f in facts:
        ids = model.to_tokens(f.prompt, prepend_bos=model.cfg.default_prepend_bos)[0].tolist()
        prompts.append(ids)
        tid, text, kind = target_token(tok, f.object)
        rows.append(dict(fact_id=f.id, relation=f.relation, subject=f.subject, object=f.object,
                         target=text, target_id=tid, target_kind=kind))
    return prompts, pd.DataFrame(rows)
