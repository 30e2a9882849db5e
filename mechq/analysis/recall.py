"""Factual recall: first-token accuracy, target probability and answer rank (paper §3.1–3.2).

For a prompt whose next token should be the target ``t``, with next-token logits ``z``:

- ``correct``: ``argmax(z) == t``;
- ``target_prob``: ``softmax(z)[t]``;
- ``target_rank``: ``1 + #{v : z_v > z_t}`` (1 = top prediction).

Prompts run through :func:`mechq.engine.forward.last_states` (right-padded batches, the template's shared
prefix computed once per relation); only the last position of each prompt is decoded (final norm
+ unembedding on one vector per prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.engine.forward import last_states, score_states, tokenize_facts
from mechq.facts import FactSet
from mechq.quant.variants import Variant, VariantSpec, swap
from mechq.vocab import FP


@runtime_checkable
class ReadOut(Protocol):
    """A variant read out in its own way rather than by the model's last layer (peak-signal
    amplification, :class:`mechq.repair.amplify.Amplified`): it scores facts itself, returning
    :func:`evaluate_recall`'s rows under its ``name``."""

    name: str

    def recall_rows(self, model: HookedTransformer, facts: FactSet, batch_size: int
                    ) -> pd.DataFrame: ...


def variant_runs(variants, include_fp: bool = True) -> list[tuple[str, VariantSpec]]:
    """The one normaliser of a ``variants`` argument: ``[(name, spec)]`` with FP first as
    ``("fp", None)`` when ``include_fp``.

    Items are :class:`Variant` objects or ``(name, spec)`` pairs, where ``spec`` is a Variant or a
    ``{layer: Variant | None}`` mapping for mixed precision (``{}`` = FP through the variant code
    path). ``None`` items are skipped. Names must be unique and not ``"fp"``.
    """
    out: list[tuple[str, VariantSpec]] = [(FP, None)] if include_fp else []
    for v in variants or []:
        if v is None:
            continue
        if isinstance(v, Variant):
            out.append((v.name, v))
        elif (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
              and isinstance(v[1], (Variant, Mapping))):
            out.append(v)
        else:
            raise TypeError(f"variants must be mechq Variants or (name, Variant | mapping) "
                            f"pairs, got {type(v).__name__}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names) or (not include_fp and FP in names):
        raise ValueError(f"Variant names must be unique and not {FP!r}, got {names}")
    return out


def bits_of(spec: VariantSpec) -> float:
    """The ``bits`` column of a frame's rows: a Variant's bit width, NaN for FP and for
    per-layer mixes (whose widths differ by layer)."""
    return float(spec.bits) if isinstance(spec, Variant) else float("nan")


def evaluate_recall(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence | None = None,
    *,
    include_fp: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per fact × variant: correct, target prob, target rank and top-1 token.

    The FP model is the row set ``variant == "fp"`` (the model's own weights). Each variant is
    swapped into all layers and components for its rows and swapped out afterwards. A
    :class:`ReadOut` item (e.g. :class:`mechq.repair.amplify.Amplified`) scores itself.
    """
    if len(facts) == 0:
        raise ValueError("evaluate_recall needs at least one fact.")
    items = list(variants or [])
    readouts = {i: a for i, a in enumerate(items) if isinstance(a, ReadOut)}
    todo = variant_runs([v for i, v in enumerate(items) if i not in readouts], include_fp)
    prompts, info = tokenize_facts(model, facts)
    frames = {}
    bar = tqdm(total=len(todo) * len(prompts), desc="recall", unit="prompt", disable=not progress)
    for name, v in todo:
        with swap(model, v):
            cols = score_prompts(model, prompts, info, batch_size=batch_size,
                                 on_batch=bar.update)
        frames[name] = recall_rows(model, info, name, cols, bits=bits_of(v))
    bar.close()
    for a in readouts.values():
        if a.name in frames:
            raise ValueError(f"Variant names must be unique, {a.name!r} appears twice.")
        frames[a.name] = a.recall_rows(model, facts, batch_size=min(batch_size, 32))
    order = ([FP] if include_fp else []) + [n for n in _names(items) if n is not None]
    return pd.concat([frames[n] for n in order], ignore_index=True)


def _names(items) -> list[str | None]:
    """The frame name of each ``variants`` item (None for a skipped ``None``)."""
    out = []
    for v in items:
        if v is None:
            out.append(None)
        elif isinstance(v, tuple):
            out.append(v[0])
        else:
            out.append(v.name)
    return out


def score_prompts(model: HookedTransformer, prompts: list[list[int]], info: pd.DataFrame, *,
                  groups: Sequence | None = None, batch_size: int = 64, on_batch=None
                  ) -> dict[str, np.ndarray]:
    """Score tokenized prompts with the model's current weights: correct, target prob, target
    rank and top-1 id per prompt (target: ``info["target_id"]``). The one scorer every fact
    analysis uses (recall, Pararel, sensitivity), so their numbers agree to the bit. Prompts of
    one group (default: ``info["relation"]``, i.e. one template) share their prefix's forward."""
    targets = torch.tensor(info["target_id"].to_numpy())
    groups = info["relation"].tolist() if groups is None else list(groups)
    resid = last_states(model, prompts, [model.cfg.n_layers], groups=groups,
                        batch_size=batch_size, on_batch=on_batch)[:, 0]
    return {k: t.numpy() for k, t in score_states(model, resid, targets, chunk=batch_size).items()}


def recall_rows(model: HookedTransformer, info: pd.DataFrame, variant: str, cols: dict,
                bits: float = float("nan")) -> pd.DataFrame:
    """The frame of one variant: ``info`` (from :func:`tokenize_facts`) plus score columns."""
    df = info.copy()
    df.insert(0, "variant", variant)
    df.insert(1, "bits", bits)
    for k in ("correct", "target_prob", "target_rank", "top1_id"):
        df[k] = cols[k]
    df["correct"] = df["correct"].astype(bool)
    df["top1"] = [model.tokenizer.decode([int(t)]) for t in df["top1_id"]]
    return df


def recall_from_lens(model: HookedTransformer, facts: FactSet, lens: pd.DataFrame
                     ) -> pd.DataFrame:
    """:func:`evaluate_recall`'s frame for the variants of a :func:`mechq.logit_lens` frame.

    The lens's last layer is the model's own output, so no forward pass is repeated.
    """
    _, info = tokenize_facts(model, facts)
    last = lens[lens["layer"] == model.cfg.n_layers]
    frames = []
    for name, g in last.groupby("variant", sort=False):
        g = g.set_index("fact_id").loc[info["fact_id"]]
        top1 = g["top1_id"].to_numpy()
        frames.append(recall_rows(model, info, name, dict(
            correct=top1 == info["target_id"].to_numpy(), target_prob=g["target_prob"].to_numpy(),
            target_rank=g["target_rank"].to_numpy(), top1_id=top1), bits=g["bits"].iloc[0]))
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
    if len(names) == 1:
        return names[0]
    if "bits" in recall_df:
        bits = recall_df.drop_duplicates("variant").set_index("variant")["bits"]
        w4 = [n for n in names if bits.get(n) == 4]
        if len(w4) == 1:
            return w4[0]
    raise ValueError(f"Pass reference=: cannot pick the one 4-bit variant (column 'bits') "
                     f"among {names}.")


def subsets(
    recall_df: pd.DataFrame, fp: str = FP, reference: str | None = None
) -> dict[str, set[str]]:
    """Fact-id subsets from an :func:`mechq.evaluate_recall` frame (paper §3.2).

    - ``robust``: correct under FP *and* under ``reference`` (the 4-bit variant);
    - ``failure``: correct under FP, wrong under ``reference``;
    - ``fp_correct``: correct under FP (= robust ∪ failure).

    ``reference=None`` picks the only non-FP variant, or the only one with ``bits == 4``.
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


def subset_labels(recall_df: pd.DataFrame, fp: str = FP, reference: str | None = None,
                  fp_wrong: str | None = "FP wrong") -> dict[str, str | None]:
    """``fact_id -> "Robust" | "Failure"`` (:func:`subsets`), and ``fp_wrong`` for the facts FP
    gets wrong: the one mapping every Robust / Failure column is made from."""
    sub = subsets(recall_df, fp, reference)
    ids = dict.fromkeys(recall_df.loc[recall_df["variant"] == fp, "fact_id"])
    return {i: "Robust" if i in sub["robust"] else "Failure" if i in sub["failure"] else fp_wrong
            for i in ids}


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
