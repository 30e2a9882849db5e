"""Logit lens: is the answer decodable from the residual stream, layer by layer? (paper §3.3)

Definition. For a prompt with target token ``t`` and ``L`` blocks, let ``x_l`` be the residual
stream at the prompt's last position after ``l`` blocks (``l = 0``: token + position embeddings,
``hook_resid_pre`` of block 0; ``l ≥ 1``: ``hook_resid_post`` of block ``l-1``). The lens decodes
it with the model's own final norm and unembedding, ``z_l = W_U · norm_final(x_l) + b_U``, and
reports ``prob = softmax(z_l)[t]`` and ``rank = 1 + #{v : z_l[v] > z_l[t]}``. At ``l = L`` this is
exactly the model's output distribution.

Only the last position of each prompt is kept (:func:`mechq.engine.forward.last_states`), so memory
does not grow with sequence length or with the full activation cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import FactSet
from mechq.engine.forward import lens_hook_name, last_states, score_states
from mechq.quant.variants import Variant
from mechq.analysis.recall import bits_of, variant_runs
from mechq.engine.forward import tokenize_facts
from mechq.quant.variants import swap


def lens_hook_names(n_layers: int) -> list[str]:
    """Hook of lens layer ``l`` for ``l = 0 … n_layers``."""
    return [lens_hook_name(l) for l in range(n_layers + 1)]


def logit_lens(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence[Variant] | None = None,
    *,
    include_fp: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per variant × fact × lens layer: target prob and rank at the last position.

    Columns: variant, bits, fact_id, relation, layer (0 … n_layers), target_prob, target_rank,
    top1_id, top1. Subsets (Robust / Failure) are joined later by ``fact_id``. The rows of layer
    ``n_layers`` are the model's own output, i.e. :func:`mechq.evaluate_recall`'s numbers.
    """
    prompts, info = tokenize_facts(model, facts)
    targets = torch.tensor(info["target_id"].to_numpy())
    L = model.cfg.n_layers
    todo = variant_runs(variants, include_fp)
    frames = []
    bar = tqdm(total=len(todo) * len(prompts), desc="logit lens", unit="prompt",
               disable=not progress)
    for name, v in todo:
        with swap(model, v):
            resid = last_states(model, prompts, list(range(L + 1)),
                                groups=info["relation"].tolist(), batch_size=batch_size,
                                on_batch=bar.update)
            # the logits of 16 prompts × all layers at a time
            s = score_states(model, resid, targets, chunk=16)
        n = len(prompts)
        frames.append(pd.DataFrame({
            "variant": name,
            "bits": bits_of(v),
            "fact_id": info["fact_id"].repeat(L + 1).to_numpy(),
            "relation": info["relation"].repeat(L + 1).to_numpy(),
            "layer": list(range(L + 1)) * n,
            "target_prob": s["target_prob"].reshape(-1).numpy(),
            "target_rank": s["target_rank"].reshape(-1).numpy(),
            "top1_id": s["top1_id"].reshape(-1).numpy(),
        }))
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
