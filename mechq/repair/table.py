"""The repair table: the paper's training-free repairs measured side by side (its Table 1).

For each base variant (a :class:`~mechq.quant.quantize.Request`, e.g. GPTQ w4 g128) the table
measures five columns:

- ``baseline``: the variant itself;
- ``protection``: the first :data:`PROTECT_K` layers at :data:`PROTECT_BITS` bits
  (:func:`mechq.repair.protect.early_layers`, the paper's choice), quantized again with those rules;
- ``protection+amplification``: the protected variant read out with peak-signal amplification
  (:class:`mechq.repair.amplify.Amplified`), ``α`` and the first candidate layer chosen on the
  development facts (:func:`mechq.repair.amplify.choose`; ``α = 0``, i.e. no amplification, when no
  ``α > 0`` helps there);
- ``eora-r32``, ``eora-r64``: the base variant plus its low-rank error compensation
  (:func:`mechq.repair.eora.eora`, ranks :data:`EORA_RANKS`).

Each cell is the accuracy on the **held-out** facts (:func:`mechq.repair.amplify.dev_heldout`; only
amplification is tuned, and only on the development facts), split by the base variant's subsets
(:func:`mechq.analysis.recall.subset_labels` with the base as reference): ``Failure`` (FP right, base
wrong: what a repair should bring back), ``Robust`` (FP and base right: what a repair must not
break) and ``all`` facts; with the cell's average bits per weight (:attr:`Variant.avg_bits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.repair import amplify

from mechq.repair import protect
from mechq.repair.eora import calibration_grams, eora
from mechq.facts import FactSet, bundled_facts
from mechq.quant.quantize import Request, quantize_many
from mechq.analysis.recall import evaluate_recall, subset_labels

PROTECT_K = 2      # paper §4.3: the first two layers at 8 bits (~4.25 bits on Llama-3-8B)
PROTECT_BITS = 8
EORA_RANKS = (32, 64)
REPAIRS = ("baseline", "protection", "protection+amplification",
           *(f"eora-r{r}" for r in EORA_RANKS))
SUBSETS = ("Failure", "Robust", "all")


@dataclass
class RepairResult:
    """``table``: one row per (base, repair, subset) with ``accuracy``, ``n``, ``avg_bits``,
    ``variant``; ``recall``: the held-out recall rows behind it; ``choices``: the (α, first)
    chosen on the development facts per base."""

    table: pd.DataFrame
    recall: pd.DataFrame
    choices: dict[str, tuple[float, int]]

    def wide(self) -> pd.DataFrame:
        """The table as the paper prints it: one row per base, one column per (repair, subset)
        in %, plus the average bits of every repair."""
        t = self.table.assign(cell=lambda d: d["repair"] + " · " + d["subset"])
        acc = t.pivot_table(index="base", columns="cell", values="accuracy", sort=False) * 100
        bits = t.drop_duplicates(["base", "repair"]).pivot_table(
            index="base", columns="repair", values="avg_bits", sort=False)
        bits.columns = [f"{c} · bits" for c in bits.columns]
        cols = [f"{r} · {s}" for r in dict.fromkeys(t["repair"]) for s in SUBSETS
                if f"{r} · {s}" in acc.columns]
        return acc[cols].join(bits).reset_index()


def repair_table(model: HookedTransformer, bases: Sequence[Request], facts: FactSet | None = None,
                 *, ranks: Sequence[int] = EORA_RANKS, alphas: Sequence[float] = amplify.ALPHAS,
                 firsts: Sequence[int] | None = None, progress: bool = True,
                 batch_size: int = 32) -> RepairResult:
    """Measure every repair of every base (module docstring). GPTQ bases and their protected
    versions are made side by side (:func:`mechq.quantize_many`, cached); the calibration Gram
    matrices for EoRA are taken once, from the default calibration."""
    facts = bundled_facts() if facts is None else facts
    if len(facts) == 0:
        raise ValueError("repair_table needs at least one fact.")
    if not bases:
        raise ValueError("repair_table needs at least one base variant.")
    for b in bases:
        if b.dynamic:
            raise ValueError(f"a base must be uniform (no dynamic rules), got {b.dynamic}.")
    early = protect.early_layers(model, k=PROTECT_K, high=PROTECT_BITS)
    reqs = [r for b in bases for r in (b, replace(b, dynamic=early, name=None))]
    made = quantize_many(model, reqs, progress=progress)
    pairs = [(made[2 * i], made[2 * i + 1]) for i in range(len(bases))]
    grams = calibration_grams(model, progress=progress)
    eoras = {b.name: [eora(model, b, r, grams=grams, progress=False) for r in ranks]
             for b, _ in pairs}
    dev, held = amplify.dev_heldout(facts)
    everything = [v for b, p in pairs for v in (b, p, *eoras[b.name])]
    rec = evaluate_recall(model, facts, everything, progress=progress, batch_size=batch_size)

    held_ids = {f.id for f in held}
    rows, choices = [], {}
    held_frames = [rec[(rec["variant"] == "fp") & rec["fact_id"].isin(held_ids)]]
    for base, prot in pairs:
        labels = subset_labels(rec, reference=base.name)
        grid = amplify.amplified_recall(model, dev, [prot], alphas=alphas, firsts=firsts,
                                        include_fp=False, batch_size=batch_size)
        alpha, first = amplify.choose(grid, prot.name, labels)
        choices[base.name] = (alpha, first)
        cells = [("baseline", base, None), ("protection", prot, None)]
        if alpha > 0:
            amp = amplify.Amplified(prot, alpha, first)
            cells.append(("protection+amplification", amp,
                          amplify.evaluate_amplified(model, held, amp, batch_size=batch_size)))
        else:   # nothing helped on dev: the chosen repair is protection alone
            cells.append(("protection+amplification", prot, None))
        cells += [(f"eora-r{r}", v, None) for r, v in zip(ranks, eoras[base.name])]
        for repair, v, df in cells:
            df = rec[rec["variant"] == v.name] if df is None else df
            df = df[df["fact_id"].isin(held_ids)].assign(base=base.name, repair=repair)
            held_frames.append(df)
            sub = df["fact_id"].map(labels)
            for s in SUBSETS:
                pick = df if s == "all" else df[sub == s]
                rows.append(dict(base=base.name, repair=repair, subset=s, variant=v.name,
                                 accuracy=float(pick["correct"].mean()) if len(pick) else
                                 float("nan"), n=len(pick), avg_bits=v.avg_bits,
                                 alpha=alpha if repair == "protection+amplification" else 0.0,
                                 first=first if repair == "protection+amplification" else None))
    return RepairResult(pd.DataFrame(rows), pd.concat(held_frames, ignore_index=True), choices)


def repair_summary(table: pd.DataFrame) -> str:
    """One sentence per base: the share of its Failure facts each repair brings back and of its
    Robust facts it keeps (the contrast the verdict predicts: most of Signal Degradation's
    Failure facts recoverable, little of Computation Collapse's)."""
    out = []
    for base, t in table.groupby("base", sort=False):
        acc = t.set_index(["repair", "subset"])["accuracy"]
        def kept(r):
            a = acc[(r, "Robust")]
            return "no Robust facts" if pd.isna(a) else f"{100 * a:.0f} % of Robust kept"
        parts = [f"{r}: {100 * acc[(r, 'Failure')]:.0f} % of Failure back, {kept(r)}"
                 for r in dict.fromkeys(t["repair"]) if r != "baseline"]
        n = int(t.loc[(t["repair"] == "baseline") & (t["subset"] == "Failure"), "n"].iloc[0])
        out.append(f"{base} ({n} held-out Failure facts) — " + "; ".join(parts) + ".")
    return " ".join(out)
