"""The verdict: is a quantized model healthy, degraded, collapsed, or read wrongly? (paper §4.3)

``mechq.diagnose(model, variant)`` is :func:`diagnose` here.

The paper separates two failures of low-bit post-training quantization. **Signal Degradation**:
attention and FFN still compute what they computed in FP, the answer is still inside the model
(the logit lens finds it near the top, outcompeted), and the loss accumulates over the depth;
protecting a few sensitive weights and amplifying the peak signal repairs much of it.
**Computation Collapse**: attention patterns and FFN activations change, the representation
decorrelates from FP early, quantizing only the first layers already destroys recall, and even a
clean signal injected into the low-precision layers dies there; no training-free repair helps.
A third cause is not the quantizer's at all: a **format bug** (a checkpoint read with the wrong
packing order, zero-point convention, group index or orientation) leaves weights that are not
on the grid the checkpoint claims, which the weight-space signatures of :mod:`mechq.analysis.signatures`
show module by module.

:func:`diagnose` measures the signatures (:func:`measure`), each on what it needs only: a
fixed sample of facts the FP model gets right, the last token position, the layers named below.
:func:`verdict` turns them into one of :data:`VERDICTS` with the named thresholds of this module;
:class:`Diagnosis` keeps the evidence table, one row per signature with the value, the FP value,
the threshold, the verdict the signature supports and the paper section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.facts import FactSet, bundled_facts
from mechq.quant.variants import Variant
from mechq.vocab import FP

VERDICTS = ("healthy", "signal_degradation", "computation_collapse", "format_bug")

N_FACTS = 64          # FP-correct facts a diagnosis samples (fixed seed)
FACT_POOL = 128       # facts scored in FP to find them
FACT_SEED = 0


@dataclass
class Diagnosis:
    """What :func:`diagnose` found: the verdict, its evidence, and the frames behind it."""

    variant: str
    verdict: str
    evidence: pd.DataFrame
    reason: str
    weights: pd.DataFrame = field(repr=False)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"Diagnosis({self.variant!r}: {self.verdict} — {self.reason})"


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def fp_correct_sample(model: HookedTransformer, facts: FactSet | None = None, n: int = N_FACTS,
                      pool: int = FACT_POOL, seed: int = FACT_SEED) -> FactSet:
    """``n`` facts the FP model answers correctly, from a seeded sample of ``pool`` facts."""
    from mechq.analysis.recall import evaluate_recall

    facts = bundled_facts() if facts is None else facts
    if len(facts) == 0:
        raise ValueError("diagnose needs at least one fact.")
    cand = facts.sample(min(pool, len(facts)), seed=seed)
    rec = evaluate_recall(model, cand, [], progress=False)
    ok = set(rec.loc[rec["correct"], "fact_id"])
    chosen = [f for f in cand if f.id in ok][:n]
    if not chosen:
        raise ValueError(f"The FP model gets none of {len(cand)} facts right: nothing to "
                         "diagnose on.")
    return FactSet(chosen, name=f"{facts.name}:fp-correct")


def measure(model: HookedTransformer, variants: list[Variant], facts: FactSet,
            batch_size: int = 32) -> list[tuple[dict[str, float], dict[str, pd.DataFrame]]]:
    """The raw signature values of each variant on FP-correct ``facts`` (the rows of
    :func:`evidence_frame`) and the frames they were read from. The FP model's lens, component
    and representation activations are computed once for all variants."""
    from mechq.analysis import sensitivity as sens
    from mechq.analysis.components import component_metrics
    from mechq.analysis.lens import logit_lens
    from mechq.analysis.representation import cka_diagonal, representation_metrics
    from mechq.analysis.signatures import weight_signatures

    L = model.cfg.n_layers
    lens = logit_lens(model, facts, variants, batch_size=batch_size, progress=False)
    comp = component_metrics(model, facts, variants, positions=("last",),
                             batch_size=batch_size, include_fp=False, progress=False)
    rep = representation_metrics(model, facts, variants, positions=("last",),
                                 streams=("resid_post",), batch_size=batch_size,
                                 include_fp=False, progress=False)
    cka = cka_diagonal(rep.cka)
    results = []
    for variant in variants:
        out: dict[str, float] = {}
        frames: dict[str, pd.DataFrame] = {}
        frames["lens"] = lens[lens["variant"].isin([FP, variant.name])]
        mine = lens[lens["variant"] == variant.name]
        final = mine[mine["layer"] == L]
        out["recall"] = float((final["target_rank"] == 1).mean())
        out["median_rank"] = float(final["target_rank"].median())
        failure = set(final.loc[final["target_rank"] > 1, "fact_id"])
        q = mine[mine["fact_id"].isin(failure) & (mine["layer"] >= L // 2)]
        out["failure_best_rank"] = (float(q.groupby("fact_id")["target_rank"].min().median())
                                    if failure else 1.0)

        frames["components"] = c = comp[comp["variant"] == variant.name]
        means = c.groupby("metric")["value"].mean()
        out["attn_jsd"] = float(means["attn_jsd"])
        out["sign_flip"] = float(means["sign_flip"])
        out["topk_jaccard"] = float(means["topk_jaccard"])

        frames["cka"] = d = cka[cka["variant"] == variant.name]
        out["cka_min"] = float(d["cka"].min())

        dom = sens.first_domino(model, facts, variant, ks=[1], batch_size=batch_size,
                                progress=False)
        frames["first_domino"] = dom
        out["first_two_layers_recall"] = float(dom["correct"].mean())

        inj = sens.signal_injection(model, facts, None, variant, ks=[L // 2],
                                    batch_size=batch_size, progress=False)
        frames["injection"] = inj
        last = inj[(inj["stream"] == "resid_post") & (inj["layer"] == L - 1)]
        out["injection_cosine"] = float(last["cos_mean"].iloc[0])

        frames["weights"] = w = weight_signatures(model, variant)
        out["weight_cosine_min"] = float(w["cosine"].min())
        out["step_error_max"] = float(w["step_error"].max())
        out["step_bias_max"] = float(w["step_bias"].max())
        results.append((out, frames))
    return results


# --------------------------------------------------------------------------------------------
# Thresholds. Measured on SmolLM2-135M (64 FP-correct bundled facts, seed 0) by
# scripts/measure_diagnose.py -> benchmarks/results/diagnose_signatures.json and
# scripts/measure_weight_signatures.py -> benchmarks/results/weight_signatures.json.
# --------------------------------------------------------------------------------------------

HEALTHY_RECALL = 0.9
"""Recall on FP-correct facts at or above which a variant is healthy. GPTQ w8 keeps 1.00 and
RTN w8 0.98 of them; GPTQ w4 keeps 0.73 / 0.62 / 0.59 (calibration seeds 0 / 1 / 2) and
RTN w4 0.53, already a visible loss."""

ABSENT_RANK = 100.0
"""Median over Failure facts of the answer's best logit-lens rank in the second half of the
layers, above which the answer is *absent* rather than outcompeted (§3.3). GPTQ w4 3 (all
seeds ≤ 3.5), w3 26.5, w2 3 550; RTN w4 3.5, w3 85.5, w2 4 258. The paper finds the answer near
the top for Signal Degradation."""

ATTN_JSD = 0.08
"""Mean attention Jensen-Shannon divergence to FP (last token, all layers, nats) above which
attention no longer attends where FP does (§4.1). GPTQ w4 0.009, w3 0.032, w2 0.163; RTN w4
0.023, w3 0.060, w2 0.221."""

SIGN_FLIP = 0.25
"""Mean share of FFN gate pre-activations whose sign differs from FP (§4.1). GPTQ w4 0.085,
w3 0.176, w2 0.366; RTN w4 0.140, w3 0.232, w2 0.396 (0.5 would be chance)."""

TOPK_JACCARD = 0.15
"""Mean Jaccard overlap of the top-1 % FFN neurons with FP's, below which the FFN reads other
memories (§4.1). GPTQ w4 0.53, w3 0.28, w2 0.067; RTN w4 0.35, w3 0.17, w2 0.031."""

CKA_MIN = 0.5
"""Lowest linear CKA to FP of the residual stream over the layers (last token), below which the
representation has decorrelated (§4.2). GPTQ w4 0.93, w3 0.79, w2 0.19; RTN w4 0.91, w3 0.83,
w2 0.25."""

FIRST_TWO_RECALL = 0.5
"""Recall with only layers 0-1 quantized ("first domino", §4.3), below which the damage starts
in the first layers. GPTQ w4 0.97, w3 0.77, w2 0.33; RTN w4 0.86, w3 0.63, w2 0.02."""

INJECTION_COSINE = 0.5
"""Cosine to FP of the last residual stream when the first half of the layers is FP and the
second half quantized ("signal injection", §4.3): below it, the low-precision layers do not
sustain a clean signal. GPTQ w4 0.95, w3 0.80, w2 0.21; RTN w4 0.95, w3 0.79, w2 0.16."""

COLLAPSE_VOTES = 4
"""Computation Collapse needs a majority (4 of the 7) of the mechanistic signatures above to
cross their thresholds. GPTQ and RTN w2 cross all 7; w3 and w4 (every seed) none. RTN w3
loses every fact yet crosses none: its answers sit at median rank 85 in the late layers, its
components are worn but working — degraded, not collapsed, on this measure."""

WEIGHT_COSINE = 0.5
"""Weight-space cosine to FP below which a module's weights are not the FP weights quantized.
Honest quantization keeps at least 0.715 (GPTQ w2, worst of 210 modules); AWQ nibble order read
as GPTQ gives 0.21, transposed codes -0.005."""

STEP_ERROR = 0.36
"""Median weight error in quantization steps (:mod:`mechq.analysis.signatures`) above which a module's
weights are off their grid. Every module of GPTQ and RTN w8/w4/w3/w2 stays at or below 0.300
(rounding alone gives 0.25); AWQ order 1.55, zero points off by one 1.00, a permuted ``g_idx``
at w4 up to 0.43 (median 0.34: only its worst modules cross), transposed codes 2.55."""

STEP_BIAS = 0.25
"""Median group-mean error in steps above which a module's groups are shifted (a zero-point
convention mix-up gives 1.00). Honest quantization: at most 0.038."""


def _rows(values: dict[str, float]) -> list[dict]:
    """(signature, value, FP value, threshold, crossing test, verdict it supports, section)."""
    v = values
    return [
        ("recall on FP-correct facts", v["recall"], 1.0, HEALTHY_RECALL,
         v["recall"] >= HEALTHY_RECALL, "healthy", "§3.1"),
        ("median answer rank", v["median_rank"], 1.0, None, None, "(context)", "§3.2"),
        ("Failure facts: best late-layer lens rank", v["failure_best_rank"], 1.0, ABSENT_RANK,
         v["failure_best_rank"] > ABSENT_RANK, "computation_collapse", "§3.3"),
        ("attention JSD to FP", v["attn_jsd"], 0.0, ATTN_JSD, v["attn_jsd"] > ATTN_JSD,
         "computation_collapse", "§4.1"),
        ("FFN gate sign flips", v["sign_flip"], 0.0, SIGN_FLIP, v["sign_flip"] > SIGN_FLIP,
         "computation_collapse", "§4.1"),
        ("FFN top-1 % Jaccard", v["topk_jaccard"], 1.0, TOPK_JACCARD,
         v["topk_jaccard"] < TOPK_JACCARD, "computation_collapse", "§4.1"),
        ("residual CKA to FP (lowest layer)", v["cka_min"], 1.0, CKA_MIN, v["cka_min"] < CKA_MIN,
         "computation_collapse", "§4.2"),
        ("recall, only layers 0-1 quantized", v["first_two_layers_recall"], 1.0,
         FIRST_TWO_RECALL, v["first_two_layers_recall"] < FIRST_TWO_RECALL,
         "computation_collapse", "§4.3 first domino"),
        ("signal injection: last-layer cosine", v["injection_cosine"], 1.0, INJECTION_COSINE,
         v["injection_cosine"] < INJECTION_COSINE, "computation_collapse", "§4.3 injection"),
        ("weight cosine to FP (worst module)", v["weight_cosine_min"], 1.0, WEIGHT_COSINE,
         v["weight_cosine_min"] < WEIGHT_COSINE, "format_bug", "weight space"),
        ("weight error in steps (worst module)", v["step_error_max"], 0.0, STEP_ERROR,
         v["step_error_max"] > STEP_ERROR, "format_bug", "weight space"),
        ("group shift in steps (worst module)", v["step_bias_max"], 0.0, STEP_BIAS,
         v["step_bias_max"] > STEP_BIAS, "format_bug", "weight space"),
    ]


def evidence_frame(values: dict[str, float]) -> pd.DataFrame:
    """The evidence table: one row per signature; ``crossed`` says whether the value is on the
    side of its threshold that supports the verdict in ``supports``."""
    return pd.DataFrame(_rows(values), columns=["signature", "value", "fp_value", "threshold",
                                                "crossed", "supports", "section"])


def suspect_modules(weights: pd.DataFrame) -> pd.DataFrame:
    """Modules whose weight signatures say they were read wrongly, worst first."""
    bad = ((weights["cosine"] < WEIGHT_COSINE) | (weights["step_error"] > STEP_ERROR)
           | (weights["step_bias"] > STEP_BIAS))
    return weights[bad].sort_values("step_error", ascending=False)


def verdict(evidence: pd.DataFrame, weights: pd.DataFrame) -> tuple[str, str]:
    """The verdict and a one-line reason, from the evidence table and the per-module weights.

    1. Any module off its grid -> ``format_bug`` (the worst module is named).
    2. Recall on FP-correct facts at least :data:`HEALTHY_RECALL` -> ``healthy``.
    3. At least :data:`COLLAPSE_VOTES` mechanistic signatures crossed ->
       ``computation_collapse``; otherwise ``signal_degradation``.
    """
    bad = suspect_modules(weights)
    if len(bad):
        w = bad.iloc[0]
        return "format_bug", (f"{len(bad)} of {len(weights)} modules are off their grid, worst "
                              f"{w['module']} (cosine {w['cosine']:.2f}, error "
                              f"{w['step_error']:.2f} steps, shift {w['step_bias']:.2f} steps)")
    by = evidence.set_index("signature")
    recall = by.loc["recall on FP-correct facts", "value"]
    if recall >= HEALTHY_RECALL:
        return "healthy", f"keeps {recall:.0%} of the facts FP knows"
    mech = evidence[evidence["supports"] == "computation_collapse"]
    votes = int(mech["crossed"].sum())
    if votes >= COLLAPSE_VOTES:
        return "computation_collapse", (f"recall {recall:.0%}; {votes} of {len(mech)} "
                                        "mechanistic signatures say the computation broke")
    return "signal_degradation", (f"recall {recall:.0%}; computation intact ({votes} of "
                                  f"{len(mech)} mechanistic signatures crossed)")


def diagnose(model: HookedTransformer, variant: Variant, facts: FactSet | None = None, *,
             n_facts: int = N_FACTS, batch_size: int = 32) -> Diagnosis:
    """Measure ``variant``'s signatures on ``n_facts`` FP-correct facts (from ``facts``,
    default the bundled ones) and give the verdict with its evidence."""
    return diagnose_many(model, [variant], facts, n_facts=n_facts, batch_size=batch_size)[0]


def diagnose_many(model: HookedTransformer, variants: list[Variant],
                  facts: FactSet | None = None, *, n_facts: int = N_FACTS,
                  batch_size: int = 32) -> list[Diagnosis]:
    """:func:`diagnose` for several variants on one shared sample of FP-correct facts."""
    for v in variants:
        if not isinstance(v, Variant):
            raise TypeError(f"diagnose needs a mechq Variant, got {type(v).__name__}")
    sample = fp_correct_sample(model, facts, n=n_facts)
    out = []
    for v, (values, frames) in zip(variants, measure(model, variants, sample, batch_size)):
        evidence = evidence_frame(values)
        verdict_, reason = verdict(evidence, frames["weights"])
        out.append(Diagnosis(v.name, verdict_, evidence, reason, frames["weights"], frames))
    return out


def evidence_table(diagnoses: list[Diagnosis]) -> pd.DataFrame:
    """The evidence of several diagnoses side by side: one row per signature, one value column
    per variant, then threshold, the verdict a crossing supports, and the paper section; the
    first row holds each variant's verdict."""
    first = diagnoses[0].evidence
    table = first[["signature"]].copy()
    for d in diagnoses:
        table[d.variant] = d.evidence["value"].to_numpy()
    table["threshold"] = first["threshold"]
    table["crossing supports"] = first["supports"]
    table["section"] = first["section"]
    head = {"signature": "verdict", **{d.variant: d.verdict.replace("_", " ")
                                       for d in diagnoses},
            "threshold": "", "crossing supports": "", "section": "§4.3"}
    return pd.concat([pd.DataFrame([head]), table.astype(object)], ignore_index=True)
