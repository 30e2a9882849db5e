"""Logit lens: is the answer decodable from the residual stream, layer by layer? (paper §3.3)

Definition. For a prompt with target token ``t`` and ``L`` blocks, let ``x_l`` be the residual
stream at the prompt's last position after ``l`` blocks (``l = 0``: token + position embeddings,
``hook_resid_pre`` of block 0; ``l ≥ 1``: ``hook_resid_post`` of block ``l-1``). The lens decodes
it with the model's own final norm and unembedding, ``z_l = W_U · norm_final(x_l) + b_U``, and
reports ``prob = softmax(z_l)[t]`` and ``rank = 1 + #{v : z_l[v] > z_l[t]}``. At ``l = L`` this is
exactly the model's output distribution.

Only the last position of each prompt is kept (a hook gathers it during the forward pass), so
memory does not grow with sequence length or with the full activation cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import FactSet
from mechq.quant.variants import Variant, swap
from mechq.recall import _variant_list, batches, tokenize_facts


def lens_hook_names(n_layers: int) -> list[str]:
    """Hook of lens layer ``l`` for ``l = 0 … n_layers``."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


@torch.no_grad()
def last_position_resid(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"]
) -> Float[Tensor, "batch layer d_model"]:
    """Residual stream at each prompt's last real position, for lens layers 0 … L."""
    names = lens_hook_names(model.cfg.n_layers)
    index = {n: i for i, n in enumerate(names)}
    out = torch.empty(len(lengths), len(names), model.cfg.d_model, device=model.cfg.device,
                      dtype=model.cfg.dtype)
    rows = torch.arange(len(lengths), device=model.cfg.device)
    last = (lengths - 1).to(model.cfg.device)

    def grab(act, hook):
        out[:, index[hook.name]] = act[rows, last]

    model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[(lambda n: n in index, grab)],
                         return_type=None)
    return out


@torch.no_grad()
def decode(model: HookedTransformer, resid: Float[Tensor, "batch layer d_model"]
           ) -> Float[Tensor, "batch layer vocab"]:
    """Final norm + unembedding of residual vectors (the lens read-out)."""
    return model.unembed(model.ln_final(resid)).float()


def logit_lens(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence[Variant] | None = None,
    *,
    include_fp: bool = True,
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per variant × fact × lens layer: target prob and rank at the last position.

    Columns: variant, fact_id, relation, layer (0 … n_layers), target_prob, target_rank,
    top1_id, top1. Subsets (Robust / Failure) are joined later by ``fact_id``.
    """
    prompts, info = tokenize_facts(model, facts)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    L = model.cfg.n_layers
    todo = _variant_list(variants, include_fp)
    frames = []
    bar = tqdm(total=len(todo) * len(prompts), desc="logit lens", unit="prompt",
               disable=not progress)
    for name, v in todo:
        prob = torch.empty(len(prompts), L + 1)
        rank = torch.empty(len(prompts), L + 1, dtype=torch.long)
        top1 = torch.empty(len(prompts), L + 1, dtype=torch.long)
        with swap(model, v) if v is not None else nullcontext():
            for idx, b in batches(prompts, info["target_id"].tolist(), batch_size, pad):
                logits = decode(model, last_position_resid(model, b.tokens, b.lengths))
                t = b.targets.to(logits.device)[:, None, None].expand(-1, L + 1, 1)
                tl = logits.gather(2, t)
                prob[idx] = logits.softmax(-1).gather(2, t)[..., 0].cpu()
                rank[idx] = (1 + (logits > tl).sum(-1)).cpu()
                top1[idx] = logits.argmax(-1).cpu()
                bar.update(len(idx))
        n = len(prompts)
        df = pd.DataFrame({
            "variant": name,
            "fact_id": info["fact_id"].repeat(L + 1).to_numpy(),
            "relation": info["relation"].repeat(L + 1).to_numpy(),
            "layer": list(range(L + 1)) * n,
            "target_prob": prob.reshape(-1).numpy(),
            "target_rank": rank.reshape(-1).numpy(),
            "top1_id": top1.reshape(-1).numpy(),
        })
        frames.append(df)
    bar.close()
    out = pd.concat(frames, ignore_index=True)
    vocab = {i: model.tokenizer.decode([i]) for i in out["top1_id"].unique().tolist()}
    out["top1"] = out["top1_id"].map(vocab)
    return out


def lens_summary(lens: pd.DataFrame, by: Sequence[str] = ("variant", "layer")) -> pd.DataFrame:
    """Per group: mean, median and quartiles of target prob; median and quartiles of log10 rank."""
    import numpy as np

    df = lens.assign(log10_rank=np.log10(lens["target_rank"]))
    g = df.groupby(list(by), sort=False)
    out = pd.DataFrame({
        "mean_prob": g["target_prob"].mean(),
        "prob_q25": g["target_prob"].quantile(0.25),
        "prob_q75": g["target_prob"].quantile(0.75),
        "median_rank": g["target_rank"].median(),
        "log10_rank_q25": g["log10_rank"].quantile(0.25),
        "log10_rank_q75": g["log10_rank"].quantile(0.75),
        "top1_share": g["target_rank"].apply(lambda r: float((r == 1).mean())),
        "n": g.size(),
    })
    return out.reset_index()
