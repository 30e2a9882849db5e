"""Collecting the activations an analysis needs, at named token positions, without a full cache.

:func:`collect` runs the prompts of a fact set in right-padded batches (as :mod:`mechq.analysis.recall`
does: under causal attention a real token never attends to the padding after it, so every value
kept here equals the prompt's unpadded run) with one forward hook on the requested hook points.
The hook keeps, per prompt, only the rows at the named positions (``subject_last``, ``last``, …,
see :mod:`mechq.engine.positions`) and copies them to the CPU; nothing else of the forward pass is
stored, so memory is ``n_prompts × n_positions × (size of one row)`` per hook, never the full
activation cache. The forward stops after the last block a hook needs.

Shapes of what comes back, per ``(hook, position)``:

- hooks whose activation is ``[batch, pos, ...]`` (residual stream, ``hook_attn_out``,
  ``hook_mlp_out``, ``mlp.hook_pre`` / ``hook_post``, ``attn.hook_z`` …) give
  ``[n_prompts, ...]``: the row at that position;
- attention hooks ``[batch, head, query_pos, key_pos]`` (``attn.hook_pattern``,
  ``attn.hook_attn_scores``) give ``[n_prompts, head, max_len]``: the *query row* at the position
  over all keys. Keys after the position (masked by causality) and keys beyond the prompt's end
  hold 0 for patterns and ``-inf`` for scores; the visible keys of a query at position ``p`` are
  ``0 … p``, i.e. ``p + 1`` of them. ``max_len`` is the longest prompt of the fact set.

A ``variant`` is swapped in for the whole collection (:func:`mechq.swap`); it may be a
:class:`~mechq.quant.variants.Variant` or a per-layer mapping ``{layer: Variant | None}`` (an
empty mapping is the FP model run through the same code path).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import FactSet
from mechq.engine.positions import locate_fact
from mechq.engine.forward import batches, pad_id, tokenize_facts
from mechq.quant.variants import VariantSpec, swap

#: Named positions that are a single token (the ones :func:`collect` can gather).
SINGLE_POSITIONS = ("bos", "subject_first", "subject_last", "last")
#: Hooks whose activation is ``[batch, head, query_pos, key_pos]``.
QUERY_ROW_HOOKS = ("hook_pattern", "hook_attn_scores")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")

Activations = dict[tuple[str, str], Tensor]


def is_query_row_hook(name: str) -> bool:
    """True for attention hooks indexed ``[batch, head, query_pos, key_pos]``."""
    return name.rsplit(".", 1)[-1] in QUERY_ROW_HOOKS


@jaxtyped(typechecker=beartype)
def prompt_positions(
    model: HookedTransformer, facts: FactSet, positions: Sequence[str] = ("subject_last", "last")
) -> dict[str, Int[Tensor, " n_prompts"]]:
    """Token index of each named single-token position for every fact, in fact order."""
    bad = [p for p in positions if p not in SINGLE_POSITIONS]
    if bad:
        raise ValueError(f"Positions {bad} are not single tokens; choose from {SINGLE_POSITIONS}.")
    out: dict[str, list[int]] = {p: [] for p in positions}
    for f in facts:
        sem = locate_fact(model, f).semantic()
        for p in positions:
            if p not in sem:
                raise ValueError(f"Position {p!r} does not exist for {f.id!r} (no BOS?).")
            out[p].append(int(sem[p]))
    return {p: torch.tensor(v, dtype=torch.long) for p, v in out.items()}


def _stop_layer(model: HookedTransformer, hooks: Sequence[str]) -> int | None:
    layers = []
    for h in hooks:
        m = _BLOCK.match(h)
        if m is None:
            return None
        layers.append(int(m.group(1)))
    top = max(layers) + 1
    return top if top < model.cfg.n_layers else None


def _check_hooks(model: HookedTransformer, hooks: Sequence[str]) -> None:
    if not hooks:
        raise ValueError("collect needs at least one hook name.")
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ValueError(f"Unknown hook names {missing[:5]} (see model.hook_dict).")
    if len(set(hooks)) != len(hooks):
        raise ValueError("Hook names must be unique.")


@torch.no_grad()
def _collect(
    model: HookedTransformer,
    prompts: list[list[int]],
    pos: dict[str, Tensor],
    hooks: Sequence[str],
    variant: VariantSpec,
    batch_size: int,
    bar=None,
) -> Activations:
    """The batched, hooked forward passes behind :func:`collect` (prompts already tokenized)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    dev = model.cfg.device
    n = len(prompts)
    max_len = max(len(p) for p in prompts)
    hook_set = set(hooks)
    stop = _stop_layer(model, hooks)
    out: Activations = {}
    state: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> None:
        rows = state["rows"]
        for name, idx in state["pos"].items():
            key = (hook.name, name)
            if is_query_row_hook(hook.name):
                val = act[rows, :, idx, :]  # [b, head, width]: the query row at the position
                if key not in out:
                    fill = 0.0 if hook.name.endswith("hook_pattern") else float("-inf")
                    out[key] = torch.full((n, act.shape[1], max_len), fill, dtype=act.dtype)
                out[key][state["idx"], :, : val.shape[-1]] = val.detach().cpu()
            else:
                val = act[rows, idx]  # [b, ...]
                if key not in out:
                    out[key] = torch.empty((n, *val.shape[1:]), dtype=act.dtype)
                out[key][state["idx"]] = val.detach().cpu()

    with swap(model, variant):
        for idx, b in batches(prompts, [0] * n, batch_size, pad_id(model)):
            it = torch.tensor(idx, dtype=torch.long)
            state.update(
                idx=it,
                rows=torch.arange(len(idx), device=dev),
                pos={p: v[it].to(dev) for p, v in pos.items()},
            )
            model.run_with_hooks(b.tokens.to(dev), fwd_hooks=[(lambda h: h in hook_set, grab)],
                                 return_type=None, stop_at_layer=stop)
            if bar is not None:
                bar.update(len(idx))
    return out


@beartype
def collect(
    model: HookedTransformer,
    facts: FactSet,
    hooks: list[str],
    positions: Sequence[str] = ("subject_last", "last"),
    variant: VariantSpec = None,
    batch_size: int = 32,
    *,
    progress: bool = True,
) -> Activations:
    """Activations of ``hooks`` at the named ``positions`` of every fact's prompt.

    Returns ``{(hook, position): tensor}`` with prompts in fact order on the first axis
    (``[n_prompts, ...]``; attention patterns ``[n_prompts, head, max_len]``, the query row at the
    position — see the module docstring). ``variant`` (a Variant or a ``{layer: Variant | None}``
    mapping) is swapped in for the run; ``None`` runs the model as it is.
    """
    if len(facts) == 0:
        raise ValueError("collect needs at least one fact.")
    _check_hooks(model, hooks)
    prompts, _ = tokenize_facts(model, facts)
    pos = prompt_positions(model, facts, positions)
    bar = tqdm(total=len(prompts), desc="collect", unit="prompt", disable=not progress)
    try:
        return _collect(model, prompts, pos, hooks, variant, batch_size, bar)
    finally:
        bar.close()


@jaxtyped(typechecker=beartype)
def stack_layers(
    acts: Activations, template: str, position: str, n_layers: int
) -> Float[Tensor, "layer n_prompts ..."]:
    """``[layer, n_prompts, ...]`` from the per-layer entries ``template.format(l=l)``."""
    return torch.stack([acts[(template.format(l=l), position)] for l in range(n_layers)])
