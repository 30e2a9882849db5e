"""Robustness over paraphrases: one fact asked many ways (Pararel, :mod:`mechq.facts.pararel`).

Every paraphrase prompt is scored by :func:`mechq.analysis.recall.score_prompts`, the scorer of
:func:`mechq.evaluate_recall` (first token of ``" " + object`` at the last position); a fact's
robustness is the share of its paraphrases answered correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.analysis.recall import bits_of, recall_rows, score_prompts, variant_runs
from mechq.facts import target_token
from mechq.facts.pararel import ParaRel
from mechq.quant.variants import Variant, swap


def evaluate_paraphrases(
    model: HookedTransformer,
    pararel: ParaRel,
    variants: Sequence[Variant] | None = None,
    *,
    include_fp: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per fact × paraphrase × variant: correct, target_prob, target_rank, top1.

    Same scorer as :func:`mechq.evaluate_recall` (first token of ``" " + object`` at the last
    position; BOS prepended as the model does), on every paraphrase prompt; the prompts of one
    paraphrase pattern share their prefix's forward.
    """
    if not pararel.paraphrases:
        raise ValueError("evaluate_paraphrases needs at least one paraphrase.")
    tok = model.tokenizer
    by_id = {f.id: f for f in pararel.facts}
    targets: dict[str, tuple[int, str, str]] = {}
    for f in pararel.facts:
        targets[f.id] = target_token(tok, f.object)
    bos = model.cfg.default_prepend_bos
    frame = pararel.paraphrase_frame()
    prompts = [model.to_tokens(p, prepend_bos=bos)[0].tolist() for p in frame["prompt"]]
    frame["target"] = [targets[i][1] for i in frame["fact_id"]]
    frame["target_id"] = [targets[i][0] for i in frame["fact_id"]]
    frame["target_kind"] = [targets[i][2] for i in frame["fact_id"]]
    frame["n_tokens"] = [len(p) for p in prompts]
    assert all(i in by_id for i in frame["fact_id"])
    todo = variant_runs(variants, include_fp)
    out = []
    bar = tqdm(total=len(todo) * len(prompts), desc="paraphrases", unit="prompt",
               disable=not progress)
    for name, v in todo:
        with swap(model, v):
            cols = score_prompts(model, prompts, frame, groups=frame["pattern"],
                                 batch_size=batch_size, on_batch=bar.update)
        out.append(recall_rows(model, frame.drop(columns=["pattern"]), name, cols,
                               bits=bits_of(v)))
    bar.close()
    return pd.concat(out, ignore_index=True)


def robustness_summary(
    df: pd.DataFrame, by: str | Sequence[str] = "variant", exclude_fragments: bool = False
) -> pd.DataFrame:
    """Per group (default per variant; ``by=["variant", "relation"]`` per relation too).

    For each fact, ``share`` = fraction of its paraphrases answered correctly. Then per group:

    - ``any_correct``: share of facts with at least one correct paraphrase (share > 0);
    - ``majority_correct``: share of facts with *more than* half correct (share > 0.5);
    - ``all_correct``: share of facts with every paraphrase correct (share == 1);
    - ``paraphrase_accuracy``: mean of ``correct`` over all (fact, paraphrase) rows;
    - ``n_facts``, ``n_paraphrases`` (rows).
    """
    by = [by] if isinstance(by, str) else list(by)
    if exclude_fragments and "target_kind" in df:
        df = df[df["target_kind"] != "fragment"]
    per_fact = (
        df.groupby(by + ["fact_id"], sort=False)["correct"]
        .agg(n_correct="sum", n="count")
        .reset_index()
    )
    per_fact["share"] = per_fact["n_correct"] / per_fact["n"]
    per_fact["any"] = per_fact["n_correct"] >= 1
    per_fact["majority"] = per_fact["n_correct"] * 2 > per_fact["n"]
    per_fact["all"] = per_fact["n_correct"] == per_fact["n"]
    g = per_fact.groupby(by, sort=False)
    out = pd.DataFrame({
        "n_facts": g.size(),
        "n_paraphrases": g["n"].sum(),
        "any_correct": g["any"].mean(),
        "majority_correct": g["majority"].mean(),
        "all_correct": g["all"].mean(),
        "paraphrase_accuracy": g["n_correct"].sum() / g["n"].sum(),
    })
    return out.reset_index()
