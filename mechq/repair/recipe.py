"""A mixed-precision recipe: per-module widths within a bit budget, measured against the rules
users would otherwise pick at the same bits, written as GPTQModel ``dynamic`` rules.

:func:`make_recipe` works in four steps, re-quantizing only once:

1. **Sensitivity, at once** (:func:`recipe_sensitivity`): the base method's uniform variants at
   every candidate width (``widths``, default 2/3/4/8 bits; cached like any variant) and
   :func:`mechq.analysis.fisher.sensitivity`, the Fisher estimate of every module's KL increase
   at every width from one backward pass per calibration batch. With ``ranks``
   (:func:`eora_options`), every width also comes with an EoRA correction of each rank
   (:func:`mechq.repair.eora.eora` on the bundled calibration's Grams), as options of their own:
   the corrected weight's Fisher estimate, its factors' entries paid for at 16 bits.
2. **Allocations at the budget** (:mod:`mechq.repair.alternatives`): the recipe's own
   (``fisher``: the exact knapsack optimum of the estimate; ``fisher+eora`` the same with the
   EoRA options) and the rules it must beat (``uniform``, ``ends-8``, ``kurtosis``,
   ``llama.cpp``), each within the same stored bits.
3. **Measured, without re-quantizing** (:class:`Measurer`): each allocation is assembled from the
   uniform variants (:func:`mechq.repair.allocation.assemble`: every module's packed weights
   taken as they are) and run as a swap. Each is measured on the **development** half of the
   facts (:func:`mechq.repair.amplify.dev_heldout`) and of the held-out text (its first
   ``DEV_TOKENS`` tokens, :func:`mechq.facts.heldout.heldout_split`), and on the **held-out**
   halves of both. The recipe is the allocation with the least development KLD (ties: fewer
   bits); the held-out columns are not read to choose.
4. **Re-quantized for real**: the chosen widths go to the quantizer as ``dynamic`` rules
   (GPTQ: GPTQModel quantizes module by module with its error feedback, so the result differs
   from the assembled swap), the chosen EoRA ranks are fitted again on its weights, and that
   is measured on the held-out halves: the recipe's ``expected`` numbers, which
   :func:`check_recipe` re-measures from the JSON alone. The correction ships as a PEFT LoRA
   adapter beside the checkpoint (:func:`mechq.repair.adapter.write_peft_adapter`).

The recipe (a dict, JSON by :func:`write_recipe`) holds ``dynamic`` (GPTQModel's rules over a
uniform base of ``bits``; ``+:`` overrides, each matching exactly its modules' names),
``modules`` (every module's width), ``ranks`` (the EoRA rank of each corrected module; empty
without), ``avg_bits`` and ``memory`` (a correction's entries counted at 16 bits),
``candidates`` (every rule's
row of :class:`Measurer`), ``expected`` and ``amplification`` (peak-signal amplification chosen on
the development facts for the re-quantized weights: applied at read-out by
:class:`mechq.repair.amplify.Amplified`, not part of the checkpoint; ``alpha = 0``: off).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.analysis.fisher import DEFAULT_BITS, Fisher, fisher_diagonal, sensitivity
from mechq.analysis.kld import fp_reference, kld_stats
from mechq.analysis.recall import evaluate_recall
from mechq.facts import FactSet, bundled_facts
from mechq.facts.heldout import heldout_split
from mechq.models import load as models
from mechq.quant.quantize import Request, quantize_many
from mechq.quant.variants import Variant
from mechq.repair import amplify
from mechq.repair.allocation import assemble
from mechq.repair.alternatives import RULES, rule_allocations
from mechq.repair.eora import calibration_grams, eora

FORMAT = "mechq-recipe/3"
READABLE = ("mechq-recipe/1", "mechq-recipe/2", FORMAT)
#: held-out text tokens the recipe chooses on (the first ones, the part a diagnosis reads too)
DEV_TOKENS = 4096
#: the measurements of a :class:`Measurer` row, per variant
MEASURES = ("avg_bits", "dev_accuracy_fp_known", "dev_kld_mean", "heldout_accuracy",
            "heldout_accuracy_fp_known", "kld_mean", "kld_median", "kld_p99", "kld_max",
            "same_top1", "dp_mean")


def memory(model: HookedTransformer, v: Variant) -> dict[str, int]:
    """Bytes of the quantized linear modules (``avg_bits · n_weights / 8``), of every other
    parameter at fp16 (embeddings, LM head, norms: as the HookedTransformer holds them, so a
    checkpoint with tied embeddings stores less), and of the whole model next to all-fp16."""
    n_all = sum(p.numel() for p in model.parameters())
    linear = int(round(v.avg_bits * v.n_weights / 8))
    other = 2 * (n_all - v.n_weights)
    return dict(linear_bytes=linear, other_bytes_fp16=other, total_bytes=linear + other,
                fp16_total_bytes=2 * n_all)


def _check_base(base: Request) -> None:
    if base.dynamic:
        raise ValueError("the base of a recipe must be uniform (no dynamic rules).")
    if base.method not in ("gptq", "rtn"):
        raise ValueError(f"a recipe mixes per-module widths of GPTQ or RTN variants; "
                         f"{base.method!r} is not one (AWQ folds scales across modules).")


@dataclass
class Options:
    """What an allocation chooses from (step 1): ``frame``, one row per module and option
    (:func:`sensitivity`'s columns and ``rank``, 0 for no correction); ``uniform``, the uniform
    variant of each width; ``corrected``, those variants with their EoRA corrections (one per
    width and rank); ``grams``, the calibration Grams the corrections were fitted on (``None``
    without ranks)."""

    frame: pd.DataFrame
    uniform: dict[int, Variant]
    corrected: list[Variant] = field(default_factory=list)
    grams: Mapping | None = None

    @property
    def pool(self) -> list[Variant]:
        """Every variant an option's weights come from (what :func:`assemble` takes)."""
        return [*self.uniform.values(), *self.corrected]


def eora_options(model: HookedTransformer, frame: pd.DataFrame, uniform: Mapping[int, Variant],
                 ranks: Sequence[int], *, fisher: Fisher, grams: Mapping,
                 progress: bool = True) -> tuple[pd.DataFrame, list[Variant]]:
    """``frame`` (rank 0) with one more option per module, width and rank ``r`` of ``ranks``:
    the uniform variant's module with its rank-``r`` EoRA correction, its ``fisher_error`` that
    of the corrected weight and its ``storage_bits`` those of the codes plus ``r · (in + out)``
    entries at 16 bits. Returns the frame and the corrected variants (named
    ``<variant>-eora<r>``). The factors of rank ``r`` are the first ``r`` terms of the
    largest rank's (the same SVD), so every rank costs one fit per width."""
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise ValueError(f"EoRA ranks must be positive, got {ranks}.")
    rows, corrected, eigs = [frame.assign(rank=0)], [], {}
    for b, v in uniform.items():
        top = eora(model, v, ranks[-1], grams=grams, eigs=eigs, progress=progress)
        for r in ranks:
            cv = top if r == ranks[-1] else replace(
                top, name=f"{v.name}-eora{r}",
                lowrank={m: (f[:, :r].clone(), a[:r].clone()) for m, (f, a) in
                         top.lowrank.items()},
                meta=dict(top.meta, eora=dict(top.meta["eora"], rank=r)))
            corrected.append(cv)
            rows.append(sensitivity(model, [b], variants={b: cv}, fisher=fisher,
                                    progress=False).assign(rank=r))
    out = pd.concat(rows, ignore_index=True)
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["module"]))}
    out = out.sort_values(["module", "bits", "rank"], key=lambda c: c.map(order)
                          if c.name == "module" else c, kind="stable", ignore_index=True)
    return out, corrected


def recipe_sensitivity(model: HookedTransformer, base: Request,
                       widths: Sequence[int] = DEFAULT_BITS, *, ranks: Sequence[int] = (),
                       progress: bool = True) -> Options:
    """Step 1: ``base``'s uniform variant at every width (made or read from the cache), the
    Fisher sensitivity of every module at every width (:func:`sensitivity`), and with
    ``ranks`` the EoRA options of every width (:func:`eora_options`)."""
    _check_base(base)
    widths = sorted(set(int(b) for b in widths))
    made = quantize_many(model, [replace(base, bits=b, name=None) for b in widths],
                         progress=progress)
    uniform = dict(zip(widths, made))
    fisher = fisher_diagonal(model, progress=progress)
    frame = sensitivity(model, widths, group_size=made[0].group_size, sym=base.sym,
                        variants=uniform, fisher=fisher, progress=progress).assign(rank=0)
    if not ranks:
        return Options(frame, uniform)
    grams = calibration_grams(model, progress=progress)
    frame, corrected = eora_options(model, frame, uniform, ranks, fisher=fisher, grams=grams,
                                    progress=progress)
    return Options(frame, uniform, corrected, grams)


class Measurer:
    """FP's references for measuring variants, made once: the development and held-out halves of
    ``facts`` with the facts FP answers in each, and FP's final states on both parts of the
    held-out text."""

    def __init__(self, model: HookedTransformer, facts: FactSet | None = None, *,
                 dev_tokens: int = DEV_TOKENS, batch_size: int = 32):
        facts = bundled_facts() if facts is None else facts
        if len(facts) == 0:
            raise ValueError("a recipe needs at least one fact.")
        self.model, self.batch_size = model, batch_size
        self.dev, self.held = amplify.dev_heldout(facts)
        self.facts = facts
        rec = evaluate_recall(model, facts, [], progress=False, batch_size=batch_size)
        self.fp_known = set(rec.loc[rec["correct"], "fact_id"])
        dev_seqs, test_seqs = heldout_split(model, dev_tokens)
        self.dev_ref, self.test_ref = fp_reference(model, dev_seqs), fp_reference(model, test_seqs)

    def __call__(self, variants: Mapping[str, Variant], progress: bool = True) -> pd.DataFrame:
        """One row per variant (keyed by its name in ``variants``): :data:`MEASURES`.
        ``*_accuracy_fp_known`` is the share of the facts FP answers that the variant answers
        (FP's is 1 by definition); ``dev_kld_mean`` is on the development text, the ``kld_*``,
        ``same_top1`` and ``dp_mean`` statistics on the held-out text
        (:mod:`mechq.analysis.kld`)."""
        named = [replace(v, name=k) for k, v in variants.items()]
        rec = evaluate_recall(self.model, self.facts, named, include_fp=False,
                              progress=progress, batch_size=self.batch_size)
        dev_ids, held_ids = {f.id for f in self.dev}, {f.id for f in self.held}
        dev_k = self.kld(named, self.dev_ref, progress)
        test_k = self.kld(named, self.test_ref, progress)
        rows = []
        for v in named:
            r = rec[rec["variant"] == v.name]
            known = r[r["fact_id"].isin(self.fp_known)]
            d, t = dev_k.loc[v.name], test_k.loc[v.name]
            dev_known = known[known["fact_id"].isin(dev_ids)]
            rows.append(dict(
                candidate=v.name, avg_bits=v.avg_bits,
                dev_accuracy_fp_known=float(dev_known["correct"].mean()),
                dev_kld_mean=float(d["kld_mean"]),
                heldout_accuracy=float(r[r["fact_id"].isin(held_ids)]["correct"].mean()),
                heldout_accuracy_fp_known=float(
                    known[known["fact_id"].isin(held_ids)]["correct"].mean()),
                **{k: float(t[k]) for k in ("kld_mean", "kld_median", "kld_p99", "kld_max",
                                            "same_top1", "dp_mean")}))
        return pd.DataFrame(rows)

    def kld(self, variants, ref, progress):
        return kld_stats(self.model, variants, reference=ref, progress=progress,
                         batch_size=8).set_index("variant")

    @property
    def n_heldout_fp_known(self) -> int:
        return len({f.id for f in self.held} & self.fp_known)


def make_recipe(model: HookedTransformer, base: Request, budget: float,
                facts: FactSet | None = None, **kwargs) -> dict:
    """The recipe for ``base``'s method within ``budget`` average bits per weight, as its JSON
    (:func:`fit_recipe` with the same keywords, without the variant)."""
    return fit_recipe(model, base, budget, facts, **kwargs)[0]


def fit_recipe(model: HookedTransformer, base: Request, budget: float,
               facts: FactSet | None = None, *, widths: Sequence[int] = DEFAULT_BITS,
               ranks: Sequence[int] = (), rules: Sequence[str] = RULES,
               options: Options | None = None, measurer: Measurer | None = None,
               requantize: bool = True, alphas=amplify.ALPHAS, progress: bool = True,
               batch_size: int = 32) -> tuple[dict, Variant]:
    """The recipe (its JSON) and its variant: re-quantized, with its EoRA corrections if it
    has ranks (with ``requantize=False``, the assembled swap). The recipe for ``base``'s method and settings (its ``bits`` are not used: the widths
    come from the allocation) within ``budget`` average bits per weight (module docstring).
    ``ranks``: EoRA ranks a module may take besides its width (none by default). ``options``
    (from :func:`recipe_sensitivity`, which then decides the widths and ranks) and ``measurer``
    are made here when not given; pass them to make several budgets from one sensitivity.
    ``requantize=False`` stops after step 3 (``expected`` then describes the assembled swap)."""
    _check_base(base)
    if "fisher" not in rules:
        raise ValueError("rules must include 'fisher', the recipe's own allocation.")
    if options is None:
        options = recipe_sensitivity(model, base, widths, ranks=ranks, progress=progress)
    uniform = options.uniform
    measurer = measurer or Measurer(model, facts, batch_size=batch_size)
    allocs = rule_allocations(model, options.frame, budget, rules)
    mixed = {r: assemble(model, a, options.pool, name=f"{r}@{budget:g}")
             for r, a in allocs.items()}
    table = measurer(mixed, progress)
    table.insert(0, "rule", list(allocs))
    table["estimated_kl"] = [a.estimated_kl for a in allocs.values()]
    table["requantized"] = False
    best = table.sort_values(["dev_kld_mean", "avg_bits"]).iloc[0]
    alloc = allocs[best["rule"]]
    dynamic = alloc.dynamic()
    chosen = mixed[best["rule"]]
    if requantize:
        (chosen,) = quantize_many(model, [replace(base, bits=alloc.base_bits,
                                                  dynamic=dynamic or None, name=None)],
                                  progress=progress)
        if alloc.ranks:  # fitted again on the re-quantized weights, on the same Grams
            chosen = eora(model, chosen, alloc.ranks, grams=options.grams, progress=progress)
        row = measurer({"recipe": chosen}, progress).iloc[0].to_dict()
        row.update(rule=f"{best['rule']} (re-quantized)", estimated_kl=alloc.estimated_kl,
                   requantized=True)
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    final = table.iloc[-1] if requantize else best
    grid = amplify.amplified_recall(model, measurer.dev, [chosen], alphas=alphas,
                                    include_fp=False, batch_size=batch_size)
    # amplify.choose scores the facts FP knows (its Robust and Failure labels)
    labels = {f: ("Robust" if f in measurer.fp_known else "Unknown") for f in grid["fact_id"]}
    alpha, first = amplify.choose(grid, chosen.name, labels)
    src = models.source_of(model)
    recipe = {
        "format": FORMAT, "model": src.name, "architecture": src.architecture,
        "method": base.method, "bits": alloc.base_bits, "group_size": chosen.group_size,
        "sym": base.sym, "desc_act": base.desc_act,
        "calibration": {"seed": base.seed, "n_samples": base.n_samples,
                        "seq_len": base.seq_len},
        "deterministic": base.deterministic,
        "budget": budget, "widths": sorted(int(b) for b in uniform),
        "repair": str(best["rule"]), "dynamic": dynamic,
        "modules": {m: int(b) for m, b in alloc.bits.items()},
        "ranks": alloc.ranks,
        "avg_bits": chosen.avg_bits, "memory": memory(model, chosen),
        "estimated_kl": alloc.estimated_kl,
        "expected": {
            "facts": measurer.held.name, "n_facts": len(measurer.held),
            "n_fp_known": measurer.n_heldout_fp_known,
            "accuracy": float(final["heldout_accuracy"]),
            "accuracy_fp_known": float(final["heldout_accuracy_fp_known"]),
            "kld_mean": float(final["kld_mean"]),
            "requantized": bool(requantize),
            "note": "held-out facts (sha256 split of the fact ids) and held-out text (after its "
                    f"first {DEV_TOKENS} tokens); the rule was chosen on the development halves; "
                    "GPTQ moves with the calibration seed and the CPU's kernels",
        },
        "amplification": {
            "weight_change": False, "alpha": alpha, "first": first,
            "layer_rule": amplify.LAYER_RULE,
            "note": "not part of the checkpoint: apply at read-out with "
                    "mechq.repair.amplify.Amplified(variant, alpha, first); alpha 0 means off "
                    "(nothing helped on the development facts)",
        },
        "candidates": table.to_dict(orient="records"),
    }
    return recipe, chosen


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
    if r.get("format") not in READABLE or missing:
        raise ValueError(f"{path} is not a mechq recipe ({' or '.join(READABLE)}); "
                         f"missing {missing}.")
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
                   dynamic=recipe["dynamic"] or None,
                   deterministic=recipe.get("deterministic", False))


def recipe_variant(model: HookedTransformer, recipe: dict, *, seed: int | None = None,
                   grams: Mapping | None = None, cache: bool = True,
                   progress: bool = True) -> Variant:
    """The recipe quantized from its JSON alone (:func:`request_of`), with its EoRA ranks (if it
    has any) fitted on the re-quantized weights: on ``grams`` when given (the Grams its options
    were fitted on), else on the bundled calibration."""
    (v,) = quantize_many(model, [request_of(recipe, seed)], cache=cache, progress=progress)
    if recipe.get("ranks"):
        v = eora(model, v, recipe["ranks"], grams=grams, progress=progress)
    return v


def check_recipe(model: HookedTransformer, recipe: dict, facts: FactSet | None = None, *,
                 seed: int | None = None, progress: bool = True) -> dict:
    """Quantize again from the recipe's JSON alone (through GPTQModel for GPTQ), read the
    checkpoint back with mechq's reader, fit its EoRA ranks again (if it has any), and measure
    the held-out accuracy and KLD the recipe promised: ``{"expected", "measured",
    "expected_kld_mean", "kld_mean", "variant", "avg_bits", "path"}`` (the KLD ones for format
    2 and later recipes). With ``seed=None`` the recipe's
    own calibration is run again (the cached checkpoint is overwritten, not reused); another
    ``seed`` draws other calibration windows."""
    src = models.source_of(model)
    if recipe.get("architecture") not in (None, src.architecture):
        raise ValueError(f"the recipe is for {recipe['architecture']}, the model is "
                         f"{src.architecture}.")
    facts = bundled_facts() if facts is None else facts
    _, held = amplify.dev_heldout(facts)
    # the correction, if any, is fitted again on the bundled calibration
    v = recipe_variant(model, recipe, seed=seed, cache=seed is not None, progress=progress)
    rec = evaluate_recall(model, held, [v], include_fp=False, progress=progress)
    out = dict(expected=recipe["expected"]["accuracy"], measured=float(rec["correct"].mean()),
               variant=v.name, avg_bits=v.avg_bits, path=str(v.meta.get("path")))
    if "kld_mean" in recipe["expected"]:
        test = fp_reference(model, heldout_split(model, DEV_TOKENS)[1])
        k = kld_stats(model, [v], reference=test, progress=False)
        out.update(expected_kld_mean=recipe["expected"]["kld_mean"],
                   kld_mean=float(k["kld_mean"].iloc[0]))
    return out
