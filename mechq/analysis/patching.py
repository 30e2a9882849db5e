"""Activation-patching sweeps over facts, resumable, and their aggregation (paper §3.4).

:func:`patch_sweep` patches every (layer, position) site of every fact's prompt with the engine
of :mod:`mechq.engine.patching` (:func:`~mechq.engine.patching.patch_prompts`, which also defines the modes
and metrics) and returns one tidy row per site (:data:`COLUMNS`), with
``delta_prob = target_prob - baseline_prob``. Positions are chosen by name
(:data:`mechq.engine.positions.NAMES`); each row's ``position_label`` is the position's single name.

A **sweep** is one (model, variant, activation, mode, layers, positions); its key (column
``sweep``) is a hash of those. With ``out_path`` each prompt's rows are appended to a CSV as soon
as they are computed (:class:`mechq.engine.store.Store`), and prompts whose rows are all in the file
for the same sweep are skipped: an interrupted sweep loses nothing it had finished.

:func:`run_patching` runs the sweeps of ``mechq patch`` (variants × activations × modes, with
FP ablation) and writes its frames. Aggregation: :func:`patch_heatmap_frame` (layers × semantic
positions, over prompts of different lengths) and :func:`by_third` (early / middle / late layers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import Fact, FactSet, target_token
from mechq.engine.patching import Prompt, layer_list, patch_prompts, validate
from mechq.engine.positions import NAMES, locate_fact
from mechq.quant.variants import Variant
from mechq.engine.store import Store, complete, typed
from mechq.vocab import FP

#: Positions patched with ``positions="semantic"``: the subject, relation and last tokens.
SEMANTIC = ("subject_first", "subject_mid", "subject_last", "relation", "last")

#: The columns of a sweep frame, in order, and their types.
TYPES: dict[str, type] = {
    "fact_id": str, "relation": str, "variant": str, "activation": str, "mode": str,
    "layer": int, "position": int, "position_label": str, "token": str, "n_tokens": int,
    "target": str, "target_id": int, "target_prob": float, "target_rank": int, "correct": bool,
    "baseline_prob": float, "baseline_rank": int, "baseline_correct": bool, "fp_prob": float,
    "fp_rank": int, "fp_correct": bool, "delta_prob": float, "n_sites": int, "sweep": str,
}
COLUMNS = list(TYPES)


def _position_filter(positions: str | Iterable[str]) -> set[str] | None:
    if positions == "all":
        return None
    if positions == "semantic":
        return set(SEMANTIC)
    names = {positions} if isinstance(positions, str) else set(positions)
    bad = names - set(NAMES)
    if bad:
        raise ValueError(f"Unknown position names {sorted(bad)}; use 'all', 'semantic' or "
                         f"names from {NAMES}.")
    return names


def _sweep_key(model, variant_name, activation, mode, layers, positions) -> str:
    spec = dict(model=model.cfg.model_name, variant=variant_name, activation=activation,
                mode=mode, layers=layers,
                positions=positions if isinstance(positions, str) else sorted(positions))
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _complete_prompts(rows: pd.DataFrame) -> pd.DataFrame:
    """The prompts whose ``n_sites`` rows are all in the file, each site once."""
    ok = complete(rows, ["sweep", "fact_id"], ["layer", "position"], "n_sites")
    return rows[ok].drop_duplicates(["sweep", "fact_id", "layer", "position"])


def _rows(model: HookedTransformer, fact: Fact, prompt: Prompt, labels: list[str], target: str,
          res: dict, **const) -> pd.DataFrame:
    """One prompt's result from :func:`mechq.engine.patching.patch_prompts` as sweep rows."""
    n_lay, n_pos = len(res["layers"]), len(res["positions"])
    li = res["layers"].repeat_interleave(n_pos)
    pi = res["positions"].repeat(n_lay)
    str_toks = model.to_str_tokens(prompt.tokens[0])
    pl = pi.tolist()
    frame = pd.DataFrame({
        "fact_id": fact.id, "relation": fact.relation, "variant": const["variant"],
        "activation": const["activation"], "mode": const["mode"],
        "layer": li.numpy(), "position": pi.numpy(),
        "position_label": [labels[p] for p in pl],
        "token": [str_toks[p] for p in pl], "n_tokens": prompt.tokens.shape[1],
        "target": target, "target_id": prompt.target_id,
        "target_prob": res["target_prob"].reshape(-1).numpy(),
        "target_rank": res["target_rank"].reshape(-1).numpy(),
        "correct": res["correct"].reshape(-1).numpy(),
        "baseline_prob": res["baseline_prob"], "baseline_rank": res["baseline_rank"],
        "baseline_correct": bool(res["baseline_correct"]),
        "fp_prob": res["fp_prob"], "fp_rank": res["fp_rank"],
        "fp_correct": bool(res["fp_correct"]),
        "n_sites": len(li), "sweep": const["sweep"],
    })
    frame["delta_prob"] = frame["target_prob"] - frame["baseline_prob"]
    return frame[COLUMNS]


def patch_sweep(
    model: HookedTransformer,
    facts: FactSet | Sequence[Fact] | Fact,
    variant: Variant | None = None,
    *,
    activation: str = "resid_pre",
    mode: str = "fp_to_variant",
    layers: int | Iterable[int] | None = None,
    positions: str | Iterable[str] = "all",
    max_batch: int = 512,
    memory_mb: float | None = 1024.0,
    prompt_block: int = 32,
    out_path: str | Path | None = None,
    progress: bool = True,
    kv_reuse: bool = True,
    skip_identical: bool = True,
) -> pd.DataFrame:
    """Patch every (layer, position) site of every fact's prompt; one tidy row per site.

    ``variant=None`` means the FP model itself (``mode="zero"`` then ablates FP;
    ``"fp_to_variant"`` patches FP into FP, which changes nothing). ``positions``: ``"all"``
    (every token), ``"semantic"`` (subject, relation and last tokens: :data:`SEMANTIC`), or
    names from :data:`mechq.engine.positions.NAMES`. Each row's ``position_label`` is the position's
    single name by :meth:`mechq.engine.positions.Positions.labels` (a one-token subject is
    ``subject_last``). ``max_batch`` / ``memory_mb`` bound the replicas per forward
    (:func:`mechq.engine.patching.rows_per_chunk`); ``prompt_block`` prompts share one swap of the
    variant; ``kv_reuse`` / ``skip_identical`` switch off the engine's shortcuts.

    ``out_path`` (CSV): each prompt's rows are appended (and fsynced) as soon as they are
    computed, and prompts already complete in the file for the same sweep are skipped. The
    returned frame holds the requested facts' rows, from disk and new, in the facts' order.
    """
    validate(activation, mode, variant)
    facts = [facts] if isinstance(facts, Fact) else list(facts)
    if not facts:
        raise ValueError("patch_sweep needs at least one fact.")
    lay = layer_list(model, layers)
    keep = _position_filter(positions)
    vname = variant.name if variant is not None else FP
    spec = positions if isinstance(positions, str) else sorted(keep)
    sweep = _sweep_key(model, vname, activation, mode, lay, spec)
    store = Store(out_path, TYPES, keep=_complete_prompts,
                  where=dict(sweep=sweep, fact_id=[f.id for f in facts]))
    done = set(store.rows["fact_id"])

    todo = []  # (fact, prompt, position labels, target text) of every prompt to do
    for f in facts:
        if f.id in done:
            continue
        toks = model.to_tokens(f.prompt, prepend_bos=model.cfg.default_prepend_bos)
        labels = locate_fact(model, f).labels()
        pos = [i for i, lab in enumerate(labels) if keep is None or lab in keep]
        if not pos:
            continue
        tid, text, _ = target_token(model.tokenizer, f.object)
        todo.append((f, Prompt(toks, tid, pos), labels, text))

    bar = tqdm(total=sum(len(lay) * len(t[1].positions) for t in todo), unit="site",
               desc=f"patch {activation} {mode} {vname}", disable=not progress)
    for b0 in range(0, len(todo), prompt_block):
        block = todo[b0 : b0 + prompt_block]

        def save(i: int, res: dict, block=block) -> None:
            f, prompt, labels, text = block[i]
            store.add(_rows(model, f, prompt, labels, text, res, variant=vname,
                            activation=activation, mode=mode, sweep=sweep))

        patch_prompts(model, [t[1] for t in block], variant, activation=activation, mode=mode,
                      layers=lay, max_batch=max_batch, memory_mb=memory_mb, kv_reuse=kv_reuse,
                      skip_identical=skip_identical, on_result=save, on_chunk=bar.update)
    bar.close()
    order = {f.id: i for i, f in enumerate(facts)}
    out = store.frame().sort_values(
        ["fact_id", "layer", "position"], kind="stable",
        key=lambda c: c.map(order) if c.name == "fact_id" else c)
    return typed(out, TYPES).reset_index(drop=True)


@dataclass
class Patching:
    """What :func:`run_patching` computes (and writes with ``out``)."""

    rows: pd.DataFrame               # every site of every sweep, plus ``subset``: patching.csv
    heatmap: pd.DataFrame            # patch_heatmap_frame(rows): patching_heatmap.csv
    heatmap_by_subset: pd.DataFrame  # ... by subset: patching_heatmap_by_subset.csv


def run_patching(
    model: HookedTransformer,
    facts: FactSet | Sequence[Fact],
    variants: Sequence[Variant],
    *,
    activations: Sequence[str] = ("resid_pre",),
    modes: Sequence[str] = ("fp_to_variant", "zero"),
    fp_ablation: bool = True,
    labels: Mapping[str, str] | None = None,
    out: str | Path | None = None,
    **sweep_kw,
) -> Patching:
    """The sweeps of ``mechq patch``: every variant × activation × mode, and with
    ``fp_ablation`` zero ablation of the FP model too; then the heatmap frames.

    ``labels`` maps fact ids to a subset name (Robust / Failure, column ``subset``; default
    ``"all"``). ``out`` (a folder): the sweeps resume from and append to ``patching.csv`` there,
    and the heatmap frames are written next to it. ``sweep_kw`` go to :func:`patch_sweep`.
    """
    out = Path(out) if out is not None else None
    csv = out / "patching.csv" if out is not None else None
    frames = []
    for activation in activations:
        for mode in modes:
            targets = ([None] if mode == "zero" and fp_ablation else []) + list(variants)
            for v in targets:
                frames.append(patch_sweep(model, facts, v, activation=activation, mode=mode,
                                          out_path=csv, **sweep_kw))
    rows = pd.concat(frames, ignore_index=True)
    rows["subset"] = rows["fact_id"].map(labels) if labels is not None else "all"
    res = Patching(rows, patch_heatmap_frame(rows), patch_heatmap_frame(rows, by=["subset"]))
    if out is not None:
        res.heatmap.to_csv(out / "patching_heatmap.csv", index=False)
        res.heatmap_by_subset.to_csv(out / "patching_heatmap_by_subset.csv", index=False)
    return res


def patch_heatmap_frame(df: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Layers × semantic positions, aggregated over prompts of different lengths.

    Positions are grouped by ``position_label``. Within one prompt, positions sharing a label
    (``relation``, ``subject_mid``, ``prefix``) are averaged first, so that every prompt weighs
    the same; then per (variant, activation, mode, *by*, layer, position_label):

    - ``mean_prob``: mean patched target probability; ``mean_delta``: mean of
      ``target_prob - baseline_prob``;
    - ``restored``: ``(Σ patched − Σ baseline) / (Σ fp − Σ baseline)`` over prompts, the share of
      the FP-vs-baseline probability gap that the patch closes (1 = FP's answer fully restored,
      0 = no effect; for zero ablation on FP both sums match and it is NaN);
    - ``correct_share``: share of prompts whose patched prediction is the target (within-prompt
      groups count a prompt as its mean over the group's positions);
    - ``median_rank``: median patched target rank; ``baseline_prob``, ``fp_prob``: means of the
      unpatched runs; ``n_facts``: prompts that have that position.
    """
    keys = ["variant", "activation", "mode", *by, "layer", "position_label"]
    per_prompt = (df.assign(correct=df["correct"].astype(float))
                  .groupby([*keys, "fact_id"], sort=False)
                  .agg(target_prob=("target_prob", "mean"), delta_prob=("delta_prob", "mean"),
                       correct=("correct", "mean"), target_rank=("target_rank", "median"),
                       baseline_prob=("baseline_prob", "first"), fp_prob=("fp_prob", "first"))
                  .reset_index())
    g = per_prompt.groupby(keys, sort=False)
    out = g.agg(mean_prob=("target_prob", "mean"), mean_delta=("delta_prob", "mean"),
                correct_share=("correct", "mean"), median_rank=("target_rank", "median"),
                baseline_prob=("baseline_prob", "mean"), fp_prob=("fp_prob", "mean"),
                n_facts=("fact_id", "nunique")).reset_index()
    gap = out["fp_prob"] - out["baseline_prob"]
    out["restored"] = (out["mean_prob"] - out["baseline_prob"]) / gap.where(gap.abs() > 1e-12)
    order = {n: i for i, n in enumerate(NAMES)}
    out = out.sort_values(["layer", "position_label"], kind="stable",
                          key=lambda c: c.map(order) if c.name == "position_label" else c)
    return out.reset_index(drop=True)


def by_third(heat: pd.DataFrame, value: str, n_layers: int, lowest: bool = False
             ) -> pd.DataFrame:
    """Mean of ``value`` over the early / middle / late thirds of the layers, and its strongest
    cell (``strongest``, ``at_layer``): the highest, or with ``lowest`` the lowest (zero
    ablation lowers the probability). One row per (variant, activation, mode, position_label)
    of a :func:`patch_heatmap_frame`; layer ``l`` is in third ``min(2, 3 l // n_layers)``."""
    names = ("early", "middle", "late")
    third = heat["layer"].map(lambda l: names[min(2, 3 * l // n_layers)])
    keys = ["variant", "activation", "mode", "position_label"]
    g = heat.assign(third=third).pivot_table(index=keys, columns="third", values=value,
                                             aggfunc="mean")
    g = g.reindex(columns=["early", "middle", "late"])
    grouped = heat.dropna(subset=[value]).groupby(keys)[value]
    peak = heat.loc[grouped.idxmin() if lowest else grouped.idxmax(),
                    keys + ["layer", value]].set_index(keys)
    g["strongest"], g["at_layer"] = peak[value], peak["layer"]
    return g
