"""A mixed-precision recipe: the best weight repair within a bit budget, as GPTQModel rules.

:func:`make_recipe` tries the protection repairs of :mod:`mechq.repair.protect` that fit a budget of
average bits per weight and keeps the one with the best accuracy on the development facts
(:func:`mechq.repair.amplify.dev_heldout`), counted on the facts FP gets right (a repair that breaks
facts the base keeps does not win; ties go to fewer bits). The candidates:

- ``baseline``: the base variant, uniform (kept when nothing beats it);
- ``early-k``: every module of the first ``k`` layers at 8 bits, ``k`` as large as the budget
  allows (the paper's early-layer protection);
- ``kurtosis``: the most heavy-tailed modules at 8 bits up to the budget
  (:func:`mechq.repair.protect.kurtosis_protection`).

Each candidate is quantized for real (GPTQ through GPTQModel, read back by mechq's reader). The
recipe (:func:`make_recipe`'s dict, JSON as written by :func:`write_recipe`) holds:

- ``dynamic``: GPTQModel's per-module rules (regex keys; ``+:`` overrides, ``-:`` skips; the
  first match wins) to pass as ``QuantizeConfig(dynamic=...)`` or ``mechq.quantize(dynamic=)``;
- ``avg_bits`` of the linear modules as written, and ``memory`` (bytes);
- ``expected``: its accuracy on the held-out facts, which :func:`check_recipe` re-measures after
  quantizing again from the JSON alone;
- ``amplification``: peak-signal amplification chosen on the development facts for the chosen
  weights. It is not a weight change: GPTQModel ignores it; mechq applies it at read-out
  (:class:`mechq.repair.amplify.Amplified`) with the ``alpha`` and ``first`` given (``alpha = 0``: off).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.models import load as models

from mechq.repair import amplify

from mechq.repair import protect
from mechq.facts import FactSet, bundled_facts
from mechq.quant.quantize import Request, quantize_many
from mechq.quant.variants import Variant
from mechq.analysis.recall import evaluate_recall, subset_labels

FORMAT = "mechq-recipe/1"
HIGH_BITS = 8


def _fits(model: HookedTransformer, base: Request, budget: float, k: int) -> bool:
    mods = protect.early_modules(model, k, HIGH_BITS)
    return protect.estimated_bits(model, base.bits, base.group_size, mods) <= budget


def candidates(model: HookedTransformer, base: Request, budget: float) -> dict[str, dict | None]:
    """The candidate ``dynamic`` rules within ``budget`` (module docstring); ``None`` = uniform."""
    base_bits = protect.estimated_bits(model, base.bits, base.group_size)
    if budget < base_bits:
        raise ValueError(f"budget {budget} is below the base variant's {base_bits:.3f} bits per "
                         f"weight ({base.bits} bits, group size {base.group_size}).")
    out: dict[str, dict | None] = {"baseline": None}
    k = 0
    while k < model.cfg.n_layers and _fits(model, base, budget, k + 1):
        k += 1
    if k:
        out[f"early-{k}"] = protect.early_layers(model, k=k, high=HIGH_BITS)
    kurt = protect.kurtosis_protection(model, base.bits, budget, base.group_size, HIGH_BITS)
    if kurt:
        out["kurtosis"] = kurt
    return out


def memory(model: HookedTransformer, v: Variant) -> dict[str, int]:
    """Bytes of the quantized linear modules (``avg_bits · n_weights / 8``), of every other
    parameter at fp16 (embeddings, LM head, norms: as the HookedTransformer holds them, so a
    checkpoint with tied embeddings stores less), and of the whole model next to all-fp16."""
    n_all = sum(p.numel() for p in model.parameters())
    linear = int(round(v.avg_bits * v.n_weights / 8))
    other = 2 * (n_all - v.n_weights)
    return dict(linear_bytes=linear, other_bytes_fp16=other, total_bytes=linear + other,
                fp16_total_bytes=2 * n_all)


def _fp_known_accuracy(rec: pd.DataFrame, name: str, labels: dict, ids: set[str]) -> float:
    d = rec[(rec["variant"] == name) & rec["fact_id"].isin(ids)]
    d = d[d["fact_id"].map(labels).isin(["Robust", "Failure"])]
    return float(d["correct"].mean()) if len(d) else float("nan")


def make_recipe(model: HookedTransformer, base: Request, budget: float,
                facts: FactSet | None = None, *, alphas=amplify.ALPHAS, progress: bool = True, batch_size: int = 32) -> dict:
    """Search the candidates for ``base`` within ``budget`` bits and return the recipe dict
    (module docstring)."""
    facts = bundled_facts() if facts is None else facts
    if len(facts) == 0:
        raise ValueError("make_recipe needs at least one fact.")
    if base.dynamic:
        raise ValueError("the base of a recipe must be uniform (no dynamic rules).")
    cands = candidates(model, base, budget)
    made = quantize_many(model, [replace(base, dynamic=d, name=None) for d in cands.values()],
                         progress=progress)
    variants = dict(zip(cands, made))
    dev, held = amplify.dev_heldout(facts)
    dev_ids, held_ids = {f.id for f in dev}, {f.id for f in held}
    rec = evaluate_recall(model, facts, made, progress=progress, batch_size=batch_size)
    labels = subset_labels(rec, reference=variants["baseline"].name)
    rows = []
    for kind, v in variants.items():
        h = rec[(rec["variant"] == v.name) & rec["fact_id"].isin(held_ids)]
        rows.append(dict(candidate=kind, variant=v.name, dynamic=cands[kind],
                         avg_bits=v.avg_bits, within_budget=v.avg_bits <= budget + 1e-9,
                         dev_accuracy_fp_known=_fp_known_accuracy(rec, v.name, labels, dev_ids),
                         heldout_accuracy=float(h["correct"].mean()),
                         heldout_accuracy_fp_known=_fp_known_accuracy(rec, v.name, labels,
                                                                      held_ids)))
    table = pd.DataFrame(rows)
    ok = table[table["within_budget"]].sort_values(["dev_accuracy_fp_known", "avg_bits"],
                                                   ascending=[False, True])
    best = ok.iloc[0]
    chosen = variants[best["candidate"]]
    grid = amplify.amplified_recall(model, dev, [chosen], alphas=alphas, include_fp=False,
                                    batch_size=batch_size)
    alpha, first = amplify.choose(grid, chosen.name, labels)
    src = models.source_of(model)
    return {
        "format": FORMAT,
        "model": src.name,
        "architecture": src.architecture,
        "method": base.method, "bits": base.bits, "group_size": base.group_size,
        "sym": base.sym, "desc_act": base.desc_act,
        "calibration": {"seed": base.seed, "n_samples": base.n_samples,
                        "seq_len": base.seq_len},
        "budget": budget,
        "repair": best["candidate"],
        "dynamic": cands[best["candidate"]] or {},
        "avg_bits": chosen.avg_bits,
        "memory": memory(model, chosen),
        "expected": {
            "facts": held.name, "n_facts": len(held),
            "accuracy": float(best["heldout_accuracy"]),
            "accuracy_fp_known": float(best["heldout_accuracy_fp_known"]),
            "baseline_accuracy": float(table.iloc[0]["heldout_accuracy"]),
            "note": "held-out facts (sha256 split of the fact ids); the candidate was chosen on "
                    "the development half; GPTQ accuracy varies with the calibration seed",
        },
        "amplification": {
            "weight_change": False,
            "alpha": alpha, "first": first, "layer_rule": amplify.LAYER_RULE,
            "note": "not part of the checkpoint: apply at read-out with "
                    "mechq.repair.amplify.Amplified(variant, alpha, first); alpha 0 means off "
                    "(nothing helped on the development facts)",
        },
        "candidates": [{k: v for k, v in r.items()} for r in rows],
    }


def write_recipe(recipe: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=1) + "\n")
    return path


def read_recipe(path: str | Path) -> dict:
    """A recipe JSON, checked for the fields a re-run needs."""
    r = json.loads(Path(path).read_text())
    missing = [k for k in ("format", "method", "bits", "group_size", "dynamic", "expected")
               if k not in r]
    if r.get("format") != FORMAT or missing:
        raise ValueError(f"{path} is not a mechq recipe ({FORMAT}); missing {missing}.")
    return r


def request_of(recipe: dict, seed: int | None = None) -> Request:
    """The :class:`Request` that quantizes the recipe from its JSON alone (``seed``: another
    calibration seed, default the recipe's)."""
    c = recipe.get("calibration", {})
    return Request(recipe["method"], recipe["bits"], recipe["group_size"],
                   recipe.get("sym", True), recipe.get("desc_act", False),
                   seed=c.get("seed", 0) if seed is None else seed,
                   n_samples=c.get("n_samples", Request.n_samples),
                   seq_len=c.get("seq_len", Request.seq_len),
                   dynamic=recipe["dynamic"] or None)


def check_recipe(model: HookedTransformer, recipe: dict, facts: FactSet | None = None, *,
                 seed: int | None = None, progress: bool = True) -> dict:
    """Quantize again from the recipe's JSON alone (through GPTQModel for GPTQ), read the
    checkpoint back with mechq's reader, and measure the held-out accuracy the recipe promised:
    ``{"expected", "measured", "variant", "avg_bits", "path"}``. With ``seed=None`` the recipe's
    own calibration is run again (the cached checkpoint is overwritten, not reused); another
    ``seed`` draws other calibration windows."""
    src = models.source_of(model)
    if recipe.get("architecture") not in (None, src.architecture):
        raise ValueError(f"the recipe is for {recipe['architecture']}, the model is "
                         f"{src.architecture}.")
    facts = bundled_facts() if facts is None else facts
    _, held = amplify.dev_heldout(facts)
    (v,) = quantize_many(model, [request_of(recipe, seed)], cache=seed is not None,
                         progress=progress)
    rec = evaluate_recall(model, held, [v], include_fp=False, progress=progress)
    return dict(expected=recipe["expected"]["accuracy"], measured=float(rec["correct"].mean()),
                variant=v.name, avg_bits=v.avg_bits, path=str(v.meta.get("path")))
