"""Factual recall: first-token accuracy, target probability and answer rank (paper §3.1–3.2).

For a prompt whose next token should be the target ``t``, with next-token logits ``z``:

- ``correct``: ``argmax(z) == t``;
- ``target_prob``: ``softmax(z)[t]``;
- ``target_rank``: ``1 + #{v : z_v > z_t}`` (1 = top prediction).

Prompts are run in batches, right-padded: under causal attention a real token never attends to
the padding after it, so each prompt's last-position logits equal its unpadded run. Only the last
position of each prompt is decoded (final norm + unembedding on one vector per prompt).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import FactSet, target_token
from mechq.quant.variants import Variant, swap

FP = "fp"


@dataclass
class PromptBatch:
    """Tokenized prompts, right-padded, with each prompt's length and target id."""

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    targets: Int[Tensor, " batch"]


def tokenize_facts(model: HookedTransformer, facts: FactSet) -> tuple[list[list[int]], pd.DataFrame]:
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


def batches(prompts: list[list[int]], targets: Sequence[int], batch_size: int, pad_id: int):
    """Yield (indices, PromptBatch) with prompts sorted by length to minimise padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        toks = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            toks[row, : len(prompts[i])] = torch.tensor(prompts[i])
        yield idx, PromptBatch(
            toks,
            torch.tensor([len(prompts[i]) for i in idx]),
            torch.tensor([targets[i] for i in idx]),
        )


@torch.no_grad()
def last_logits(model: HookedTransformer, batch: PromptBatch) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at each prompt's last real position."""
    dev = model.cfg.device
    resid = model(batch.tokens.to(dev), stop_at_layer=model.cfg.n_layers)
    last = resid[torch.arange(len(batch.lengths)), (batch.lengths - 1).to(dev)]
    return model.unembed(model.ln_final(last[:, None, :]))[:, 0].float()


def score(logits: Float[Tensor, "batch vocab"], targets: Int[Tensor, " batch"]) -> dict:
    """Correctness, target probability and rank (1-based) per row."""
    targets = targets.to(logits.device)
    tgt = logits.gather(1, targets[:, None])
    return dict(
        correct=(logits.argmax(-1) == targets).cpu(),
        target_prob=logits.softmax(-1).gather(1, targets[:, None])[:, 0].cpu(),
        target_rank=(1 + (logits > tgt).sum(-1)).cpu(),
        top1_id=logits.argmax(-1).cpu(),
    )


def _variant_list(variants, include_fp: bool) -> list[tuple[str, Variant | None]]:
    out: list[tuple[str, Variant | None]] = [(FP, None)] if include_fp else []
    for v in variants or []:
        if v is None:
            continue
        if not isinstance(v, Variant):
            raise TypeError(f"variants must be mechq Variants, got {type(v).__name__}")
        out.append((v.name, v))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Variant names must be unique, got {names}")
    return out


def evaluate_recall(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence[Variant] | None = None,
    *,
    include_fp: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per fact × variant: correct, target prob, target rank and top-1 token.

    The FP model is the row set ``variant == "fp"`` (the model's own weights). Each variant is
    swapped into all layers and components for its rows and swapped out afterwards.
    """
    if len(facts) == 0:
        raise ValueError("evaluate_recall needs at least one fact.")
    prompts, info = tokenize_facts(model, facts)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    frames = []
    todo = _variant_list(variants, include_fp)
    bar = tqdm(total=len(todo) * len(prompts), desc="recall", unit="prompt", disable=not progress)
    for name, v in todo:
        cols: dict[str, list] = {k: [None] * len(prompts) for k in
                                 ("correct", "target_prob", "target_rank", "top1_id")}
        with swap(model, v) if v is not None else nullcontext():
            for idx, b in batches(prompts, info["target_id"].tolist(), batch_size, pad):
                s = score(last_logits(model, b), b.targets)
                for k in cols:
                    for row, i in enumerate(idx):
                        cols[k][i] = s[k][row].item()
                bar.update(len(idx))
        df = info.copy()
        df.insert(0, "variant", name)
        for k, vals in cols.items():
            df[k] = vals
        df["correct"] = df["correct"].astype(bool)
        df["top1"] = [model.tokenizer.decode([t]) for t in df["top1_id"]]
        frames.append(df)
    bar.close()
    return pd.concat(frames, ignore_index=True)


def accuracy(recall: pd.DataFrame, by: str | list[str] = "variant",
             exclude_fragments: bool = False) -> pd.DataFrame:
    """Accuracy (share of ``correct``), its 95 % Wilson interval, and counts per group."""
    df = recall[recall["target_kind"] != "fragment"] if exclude_fragments else recall
    by = [by] if isinstance(by, str) else list(by)
    g = df.groupby(by, sort=False)
    out = g["correct"].agg(["mean", "sum", "count"]).rename(
        columns={"mean": "accuracy", "sum": "n_correct", "count": "n"}
    )
    out["median_rank"] = g["target_rank"].median()
    out["mean_target_prob"] = g["target_prob"].mean()
    lo, hi = _wilson(out["n_correct"].to_numpy(), out["n"].to_numpy())
    out["ci_low"], out["ci_high"] = lo, hi
    return out.reset_index()


def _wilson(k, n, z: float = 1.96):
    import numpy as np

    n = np.maximum(n, 1)
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


# --------------------------------------------------------------------------------------------
# Robust / Failure subsets (paper §3.2)
# --------------------------------------------------------------------------------------------


def _reference_name(recall_df: pd.DataFrame, fp: str, reference: str | None) -> str:
    names = [v for v in dict.fromkeys(recall_df["variant"]) if v != fp]
    if reference is not None:
        if reference not in names:
            raise ValueError(f"Reference variant {reference!r} is not in the frame (have {names}).")
        return reference
    w4 = [n for n in names if re.search(r"(?<!\d)(w4(?!\d)|4-?bits?\b)", n)]
    if len(names) == 1:
        return names[0]
    if len(w4) == 1:
        return w4[0]
    raise ValueError(f"Pass reference=: cannot pick the 4-bit variant among {names}.")


def subsets(
    recall_df: pd.DataFrame, fp: str = FP, reference: str | None = None
) -> dict[str, set[str]]:
    """Fact-id subsets from an :func:`mechq.evaluate_recall` frame (paper §3.2).

    - ``robust``: correct under FP *and* under ``reference`` (the 4-bit variant);
    - ``failure``: correct under FP, wrong under ``reference``;
    - ``fp_correct``: correct under FP (= robust ∪ failure).

    ``reference=None`` picks the only non-FP variant, or the only one whose name says 4 bits
    (``gptq-w4g128``).
    """
    ref = _reference_name(recall_df, fp, reference)
    if fp not in set(recall_df["variant"]):
        raise ValueError(f"FP variant {fp!r} is not in the frame.")
    a = recall_df[recall_df["variant"] == fp].set_index("fact_id")["correct"]
    b = recall_df[recall_df["variant"] == ref].set_index("fact_id")["correct"]
    if a.index.has_duplicates or b.index.has_duplicates:
        raise ValueError("Each fact must appear once per variant.")
    common = a.index.intersection(b.index)
    if len(common) != len(a):
        raise ValueError(f"{len(a) - len(common)} FP facts have no {ref!r} row.")
    a, b = a.loc[common].astype(bool), b.loc[common].astype(bool)
    return dict(
        robust=set(common[a & b]),
        failure=set(common[a & ~b]),
        fp_correct=set(common[a]),
    )


def subset_sizes(
    recall_df: pd.DataFrame, fp: str = FP, reference: str | None = None
) -> pd.DataFrame:
    """Sizes of the subsets per relation and overall (``relation == "all"``): ``n_facts``,
    ``fp_correct``, ``robust``, ``failure``, ``failure_rate`` (failure / fp_correct)."""
    ref = _reference_name(recall_df, fp, reference)
    sub = subsets(recall_df, fp, ref)
    fpdf = recall_df[recall_df["variant"] == fp]
    rel = fpdf.set_index("fact_id")["relation"] if "relation" in fpdf else None
    groups = [("all", set(fpdf["fact_id"]))]
    if rel is not None:
        groups += [(r, set(ids)) for r, ids in rel.index.groupby(rel.values).items()]
        groups = groups[:1] + sorted(groups[1:], key=lambda x: str(x[0]))
    rows = []
    for name, ids in groups:
        n_fp = len(sub["fp_correct"] & ids)
        n_fail = len(sub["failure"] & ids)
        rows.append(dict(relation=name, reference=ref, n_facts=len(ids), fp_correct=n_fp,
                         robust=len(sub["robust"] & ids), failure=n_fail,
                         failure_rate=n_fail / n_fp if n_fp else float("nan")))
    return pd.DataFrame(rows)
