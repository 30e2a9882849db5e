"""The verdict: is a quantized model healthy, degraded, collapsed, read wrongly, or compared
with the wrong FP model? (paper §4.3)

``mechq.diagnose(model, variant)`` is :func:`diagnose` here.

The paper separates two failures of low-bit post-training quantization. **Signal Degradation**:
attention and FFN still compute what they computed in FP, the answer is still inside the model
(the logit lens finds it near the top, outcompeted), and the loss accumulates over the depth; a
training-free repair brings much of it back. **Computation Collapse**: attention patterns and FFN
activations change, the representation decorrelates from FP early, quantizing only the first
layers already destroys recall, and a clean signal injected into the low-precision layers dies
there; no training-free repair helps. Two more causes are not the quantizer's at all, and the
weights alone show them (:mod:`mechq.analysis.signatures`):

- a **format bug**: a checkpoint read with the wrong packing order, zero-point convention, group
  index or orientation. Its weights are uncorrelated with FP's, shifted by whole steps, or off
  their grid in some modules and not others;
- a **reference mismatch**: a checkpoint quantized from other FP weights (another revision, a
  fine-tune, base against instruct). Its weights stay correlated with FP's and unshifted, but
  sit further from them than rounding allows, in every module alike.

:func:`diagnose` observes a sample of facts the FP model knows (:mod:`mechq.diagnosis.evidence`),
computes every signature with a bootstrap 95 % interval, and decides with the named thresholds
of this module:

1. weights uncorrelated, shifted, off their grid in only some modules, or off it with errors
   that grow with the weight → ``format_bug``; off their grid in the median module, correlated,
   unshifted, errors unrelated to the weight → ``reference_mismatch``
   (:func:`weight_verdict`);
2. recall at least :data:`HEALTHY_RECALL` and mean KLD at most :data:`HEALTHY_KLD` →
   ``healthy``;
3. at least :data:`COLLAPSE_VOTES` of the seven mechanistic signatures beyond their thresholds →
   ``computation_collapse``; otherwise ``signal_degradation``.

A signature whose interval straddles its threshold is *undecided*. When undecided signatures
could change the outcome of step 2 or 3, the diagnosis is ``borderline``: the verdict is the one
the point values give, and :attr:`Diagnosis.borderline` names the thresholds in question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.analysis.recall import evaluate_recall
from mechq.diagnosis.evidence import (
    N_BOOT, SIGNATURES, FPObservation, bootstrap, observe, observe_fp, per_fact_frame,
    sample_note, statistics,
)
from mechq.facts import FactSet, bundled_facts
from mechq.quant.variants import Variant

VERDICTS = ("healthy", "signal_degradation", "computation_collapse", "format_bug",
            "reference_mismatch")

N_FACTS = 128         # FP-correct facts a diagnosis uses (one fact moves recall by < 1 %)
FACT_SEED = 0
NEXT_STEP = {
    "healthy": "nothing to repair: the facts and the output distribution are kept",
    "signal_degradation": "repairable without training: try low-rank compensation "
                          "(mechq.eora, `mechq diagnose --repair`) or protecting the most "
                          "sensitive modules (`mechq recipe`)",
    "computation_collapse": "no training-free repair helps: quantize with more bits (or "
                            "quantization-aware training)",
    "format_bug": "the checkpoint is read wrongly: check its packing format (nibble order, "
                  "zero-point convention, g_idx, orientation) against the worst modules",
    "reference_mismatch": "load the FP model this checkpoint was quantized from (--model) and "
                          "diagnose again",
}

# --------------------------------------------------------------------------------------------
# Thresholds. Fit on SmolLM2-135M's cases (scripts/validate_verdict.py, the "fit" rows of
# benchmarks/results/validation/) and tested on Gemma 3 270M's and the others there.
# --------------------------------------------------------------------------------------------

HEALTHY_RECALL = 0.9
"""Recall on FP-correct facts at or above which the facts are kept."""

HEALTHY_KLD = 0.05
"""Mean KL divergence (nats) from FP's next-token distribution on held-out text at or below
which the distribution is kept."""

ABSENT_SHARE = 0.002
"""Median over Failure facts of the answer's best late-layer lens rank, as a share of the
vocabulary, above which the answer is *absent* rather than outcompeted (§3.3): rank 98 of
SmolLM2's 49 152 tokens, 524 of Gemma 3's 262 144."""

ATTN_JSD = 0.08
"""Mean attention Jensen-Shannon divergence to FP (last token, nats) above which attention no
longer attends where FP does (§4.1)."""

SIGN_FLIP = 0.25
"""Mean share of FFN gate pre-activations whose sign differs from FP (§4.1); 0.5 is chance."""

TOPK_JACCARD = 0.15
"""Mean Jaccard overlap of the top-1 % FFN neurons with FP's below which the FFN reads other
memories (§4.1)."""

CKA_MIN = 0.5
"""Lowest linear CKA to FP of the residual stream over the layers (last token) below which the
representation has decorrelated (§4.2)."""

FIRST_LAYERS_RECALL = 0.5
"""Recall with only the first layers quantized (:func:`mechq.diagnosis.evidence.first_layers`,
the first domino, §4.3) below which the damage starts in the first layers."""

INJECTION_COSINE = 0.5
"""Cosine to FP of the last residual stream with the first half of the layers FP and the second
half quantized (signal injection, §4.3) below which the low-precision layers do not sustain a
clean signal."""

COLLAPSE_VOTES = 4
"""Computation Collapse needs a majority (4 of the 7) of the mechanistic signatures beyond their
thresholds."""

WEIGHT_COSINE = 0.5
"""Weight-space cosine to FP below which a module's weights are not the FP weights quantized."""

STEP_BIAS = 0.25
"""Median group-mean error in steps above which a module's groups are shifted (a zero-point
convention mix-up gives 1.00)."""

SHIFT_SHARE = 0.5
"""A group shift counts only when it is at least this share of the module's median error: a
whole-step shift moves every weight of the group alike (shift ≈ error), while independent
errors of ``e`` steps leave group means of about ``e / sqrt(group size)`` (a reference
mismatch of 4 steps at 8 bits shows group means of 0.7 steps, not a shift)."""

STEP_ERROR = 0.36
"""Median weight error in quantization steps above which a module is off its grid. Rounding
gives 0.25; honest GPTQ on SmolLM2 at most 0.30 (benchmarks/results/weight_signatures.json)."""

BEYOND_HALF = 0.3
"""Share of a module's weights more than half a step from their FP value above which the module
is off its grid. Round-to-nearest puts (almost) none there; GPTQ's error feedback puts some: at
most 0.24 in any module of SmolLM2's honest GPTQ variants."""

MISMATCH_BEYOND_HALF = 0.2
"""The same share in the *median* module above which the weights as a whole sit further from FP
than rounding allows (honest GPTQ: a median module of 0.10-0.15). Being a median, it speaks for
the modules alike, which a reference mismatch moves and a format fault of a few modules does
not."""

ERROR_CORR = 0.35
"""Median over the modules of the correlation between the error's size and the weight's
(:mod:`mechq.analysis.signatures`) above which the error grows with the weight: wrong scales or a
wrong group index, not other FP weights. Measured on the tiny model, RTN g32: honest modules at
most 0.23, a permuted g_idx 0.41-0.56, a 10 % reference mismatch at most 0.10."""

#: signature -> (direction that crosses its threshold, the verdict a crossing supports)
RULES = {
    "recall": ("below", "not healthy"),
    "kld_mean": ("above", "not healthy"),
    "failure_best_rank": ("above", "computation_collapse"),
    "attn_jsd": ("above", "computation_collapse"),
    "sign_flip": ("above", "computation_collapse"),
    "topk_jaccard": ("below", "computation_collapse"),
    "cka_min": ("below", "computation_collapse"),
    "first_layers_recall": ("below", "computation_collapse"),
    "injection_cosine": ("below", "computation_collapse"),
}
MECHANISTIC = [k for k, (_, s) in RULES.items() if s == "computation_collapse"]


@dataclass(frozen=True)
class Thresholds:
    """One threshold per rule of :data:`RULES` (defaults: this module's constants, the ones
    fit on SmolLM2) and the vote a collapse needs. ``scripts/validate_verdict.py`` fits other
    sets to test these out of sample."""

    recall: float = HEALTHY_RECALL
    kld_mean: float = HEALTHY_KLD
    failure_best_rank: float = ABSENT_SHARE
    attn_jsd: float = ATTN_JSD
    sign_flip: float = SIGN_FLIP
    topk_jaccard: float = TOPK_JACCARD
    cka_min: float = CKA_MIN
    first_layers_recall: float = FIRST_LAYERS_RECALL
    injection_cosine: float = INJECTION_COSINE
    collapse_votes: int = COLLAPSE_VOTES

    def of(self, signature: str) -> float:
        return getattr(self, signature)


DEFAULT = Thresholds()
SECTION = {"recall": "§3.1", "median_rank": "§3.2", "kld_mean": "held-out text",
           "same_top1": "held-out text", "failure_best_rank": "§3.3", "attn_jsd": "§4.1",
           "sign_flip": "§4.1", "topk_jaccard": "§4.1", "cka_min": "§4.2",
           "first_layers_recall": "§4.3 first domino", "injection_cosine": "§4.3 injection"}


@dataclass
class Diagnosis:
    """What :func:`diagnose` found: the verdict, how sure, its evidence, the next step."""

    variant: str
    verdict: str
    evidence: pd.DataFrame
    reason: str
    weights: pd.DataFrame = field(repr=False)
    borderline: str | None = None
    margin: float = 0.0
    n_facts: int = 0
    frames: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    sample: FactSet | None = field(default=None, repr=False)

    @property
    def next_step(self) -> str:
        """What the verdict points to."""
        step = NEXT_STEP[self.verdict]
        if self.borderline:
            step += "; the verdict is borderline: more facts would settle it"
        return step

    @property
    def worst_modules(self) -> pd.DataFrame:
        """The five modules furthest from FP in quantization steps."""
        return self.weights.sort_values("step_error", ascending=False).head(5)

    def __repr__(self) -> str:
        tag = f" (borderline: {self.borderline})" if self.borderline else ""
        return f"Diagnosis({self.variant!r}: {self.verdict}{tag} — {self.reason})"


# --------------------------------------------------------------------------------------------
# Weight space
# --------------------------------------------------------------------------------------------


def suspect_modules(weights: pd.DataFrame) -> pd.DataFrame:
    """Modules whose weights are not the FP weights quantized: uncorrelated, shifted, or off
    their grid (:data:`STEP_ERROR`, :data:`BEYOND_HALF`), worst first."""
    return weights[_broken(weights) | _off_grid(weights)].sort_values("step_error",
                                                                       ascending=False)


def _broken(w: pd.DataFrame) -> pd.Series:
    shifted = (w["step_bias"] > STEP_BIAS) & (w["step_bias"] > SHIFT_SHARE * w["step_error"])
    return (w["cosine"] < WEIGHT_COSINE) | shifted


def _off_grid(w: pd.DataFrame) -> pd.Series:
    return (w["step_error"] > STEP_ERROR) | (w["beyond_half"] > BEYOND_HALF)


def weight_verdict(weights: pd.DataFrame) -> tuple[str | None, str, float]:
    """``(verdict or None, reason, margin)`` from the per-module weight signatures alone:

    1. any module uncorrelated with FP or shifted by whole steps → ``format_bug``;
    2. the median module off its grid (:data:`STEP_ERROR`, :data:`MISMATCH_BEYOND_HALF`): with
       errors that grow with the weight (:data:`ERROR_CORR`) → ``format_bug`` (wrong scales),
       else → ``reference_mismatch``;
    3. some modules off their grid (:data:`STEP_ERROR`, :data:`BEYOND_HALF`) → ``format_bug``.

    ``margin``: how far the deciding statistic lies beyond its threshold."""
    n = len(weights)
    broken, off = _broken(weights), _off_grid(weights)

    def worst(rows):
        w = rows.sort_values("step_error", ascending=False).iloc[0]
        return (f"worst {w['module']} (cosine {w['cosine']:.2f}, error {w['step_error']:.2f} "
                f"steps, {w['beyond_half']:.0%} beyond half a step, shift "
                f"{w['step_bias']:.2f} steps)")

    if broken.any():
        return "format_bug", (f"{int(broken.sum())} of {n} modules are uncorrelated with FP "
                              f"or shifted by whole steps, {worst(weights[broken])}"), \
            float(broken.mean())
    med_err, med_beyond = weights["step_error"].median(), weights["beyond_half"].median()
    if n and (med_err > STEP_ERROR or med_beyond > MISMATCH_BEYOND_HALF):
        scaled = float(weights["error_corr"].median())
        if scaled > ERROR_CORR:
            return "format_bug", (
                f"the modules are off their grid with errors that grow with the weight (median "
                f"correlation {scaled:.2f}): wrong scales or group index, "
                f"{worst(weights)}"), scaled - ERROR_CORR
        return "reference_mismatch", (
            f"the median module lies further from these FP weights than rounding allows "
            f"({med_err:.2f} steps, {med_beyond:.0%} of its weights beyond half a step), while "
            f"every module stays correlated with them (lowest cosine "
            f"{weights['cosine'].min():.3f}), unshifted, with errors unrelated to the weight: it "
            f"was quantized from other FP weights"), float(max(
                med_err - STEP_ERROR, med_beyond - MISMATCH_BEYOND_HALF))
    if off.any():
        return "format_bug", (f"{int(off.sum())} of {n} modules are off their grid and the "
                              f"others are not, {worst(weights[off])}"), float(off.mean())
    return None, "", 0.0


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


def _side(value: float, threshold: float, direction: str) -> bool:
    return value < threshold if direction == "below" else value > threshold


def evidence_frame(values: dict, intervals: dict | None = None,
                   thresholds: Thresholds = DEFAULT) -> pd.DataFrame:
    """The evidence table: one row per signature with its value, 95 % interval, threshold,
    ``crossed`` (True / False, or None when the interval straddles the threshold or the
    signature was not measured), the verdict a crossing supports, the paper section and the
    signature's definition."""
    rows = []
    for sig in SIGNATURES:
        v = values[sig]
        lo, hi = (intervals or {}).get(sig, (v, v))
        thr, supports, crossed = None, "(context)", None
        if sig in RULES:
            direction, supports = RULES[sig]
            thr = thresholds.of(sig)
            ends = {_side(lo, thr, direction), _side(hi, thr, direction)}
            crossed = ends.pop() if len(ends) == 1 and v == v else None
        rows.append(dict(signature=sig, value=v, ci_low=lo, ci_high=hi, threshold=thr,
                         crossed=crossed, supports=supports, section=SECTION[sig],
                         definition=SIGNATURES[sig]))
    return pd.DataFrame(rows)


def decide(evidence: pd.DataFrame, weights: pd.DataFrame, n_facts: int = 0
           ) -> tuple[str, str, str | None, float]:
    """``(verdict, reason, borderline, margin)`` from the evidence table (thresholds and
    crossings as :func:`evidence_frame` set them) and the per-module weight signatures (module
    docstring). ``margin``: for the weight verdicts the share of modules beyond the rule; for a
    confident healthy verdict the recall's lower bound above its threshold; for the others the
    number of mechanistic signatures that would have to change sides (0 when borderline)."""
    w_verdict, w_reason, w_margin = weight_verdict(weights)
    if w_verdict is not None:
        return w_verdict, w_reason, None, w_margin
    ev = evidence.set_index("signature")
    votes_needed = int(evidence.attrs.get("collapse_votes", COLLAPSE_VOTES))
    note = f" ({sample_note(n_facts)})" if n_facts and n_facts < 101 else ""

    def measured(s):
        return ev.loc[s, "value"] == ev.loc[s, "value"]

    def beyond(s):  # the point value is on the crossing side
        return _side(ev.loc[s, "value"], ev.loc[s, "threshold"], RULES[s][0])

    def straddling(sigs):
        return [f"{s} {ev.loc[s, 'threshold']:g}" for s in sigs
                if ev.loc[s, "crossed"] is None and measured(s)]

    recall, kld = ev.loc["recall", "value"], ev.loc["kld_mean", "value"]
    kept = f"recall {recall:.0%}" + (f", mean KLD {kld:.3f}" if kld == kld else "")
    healthy_sigs = [s for s in ("recall", "kld_mean") if measured(s)]
    open_h = straddling(healthy_sigs)
    border = None
    if not any(ev.loc[s, "crossed"] is True for s in healthy_sigs):
        if open_h:
            border = f"healthy vs degraded: {', '.join(open_h)} inside the interval"
        if not any(beyond(s) for s in healthy_sigs):
            margin = 0.0 if border else float(ev.loc["recall", "ci_low"]
                                              - ev.loc["recall", "threshold"])
            return ("healthy", f"{kept}: the facts and the distribution are kept{note}",
                    border, margin)
    crossed = [s for s in MECHANISTIC if ev.loc[s, "crossed"] is True]
    undecided = straddling(MECHANISTIC)
    point = [s for s in MECHANISTIC if beyond(s)]
    verdict = "computation_collapse" if len(point) >= votes_needed else "signal_degradation"
    if len(crossed) < votes_needed <= len(crossed) + len(undecided):
        border = "; ".join(filter(None, [border, (
            f"degradation vs collapse: {len(crossed)} of {len(MECHANISTIC)} crossed, "
            f"{', '.join(undecided)} inside the interval")]))
    margin = (len(crossed) - votes_needed + 1 if verdict == "computation_collapse"
              else votes_needed - len(crossed) - len(undecided))
    if verdict == "computation_collapse":
        reason = (f"{kept}; {len(point)} of {len(MECHANISTIC)} mechanistic signatures say the "
                  f"computation broke ({', '.join(point)}){note}")
    else:
        reason = (f"{kept}; computation intact ({len(point)} of {len(MECHANISTIC)} mechanistic "
                  f"signatures crossed){note}")
    return verdict, reason, border, float(0 if border else max(margin, 0))


def verdict(evidence: pd.DataFrame, weights: pd.DataFrame) -> tuple[str, str]:
    """The verdict and its reason (:func:`decide` without the borderline and the margin)."""
    v, reason, _, _ = decide(evidence, weights)
    return v, reason


# --------------------------------------------------------------------------------------------
# Diagnosing
# --------------------------------------------------------------------------------------------


def fp_correct_sample(model: HookedTransformer, facts: FactSet | None = None, n: int = N_FACTS,
                      seed: int = FACT_SEED) -> FactSet:
    """``n`` facts the FP model answers correctly (all it knows when fewer), drawn with a
    seeded shuffle of ``facts`` (default: the bundled facts)."""
    facts = bundled_facts() if facts is None else facts
    if len(facts) == 0:
        raise ValueError("diagnose needs at least one fact.")
    rec = evaluate_recall(model, facts, [], progress=False)
    ok = set(rec.loc[rec["correct"], "fact_id"])
    known = FactSet([f for f in facts if f.id in ok], name=f"{facts.name}:fp-correct")
    if not len(known):
        raise ValueError(f"The FP model gets none of {len(facts)} facts right: nothing to "
                         "diagnose on.")
    return known.sample(min(n, len(known)), seed=seed)


def diagnose(model: HookedTransformer, variant: Variant, facts: FactSet | None = None, *,
             n_facts: int = N_FACTS, batch_size: int = 32, n_boot: int = N_BOOT,
             kld_tokens: int | None = None, thresholds: Thresholds = DEFAULT) -> Diagnosis:
    """Measure ``variant``'s signatures on ``n_facts`` FP-correct facts (from ``facts``,
    default the bundled ones) and on held-out text, and give the verdict with its evidence."""
    return diagnose_many(model, [variant], facts, n_facts=n_facts, batch_size=batch_size,
                         n_boot=n_boot, kld_tokens=kld_tokens, thresholds=thresholds)[0]


def diagnose_many(model: HookedTransformer, variants: list[Variant],
                  facts: FactSet | None = None, *, n_facts: int = N_FACTS,
                  batch_size: int = 32, n_boot: int = N_BOOT, kld_tokens: int | None = None,
                  fp: FPObservation | None = None, thresholds: Thresholds = DEFAULT
                  ) -> list[Diagnosis]:
    """:func:`diagnose` for several variants on one sample of FP-correct facts; FP runs once.
    ``kld_tokens``: held-out tokens compared (default
    :data:`mechq.diagnosis.evidence.KLD_TOKENS`; 0 skips the KLD)."""
    from mechq.diagnosis.evidence import KLD_TOKENS

    for v in variants:
        if not isinstance(v, Variant):
            raise TypeError(f"diagnose needs a mechq Variant, got {type(v).__name__}")
    if fp is None:
        sample = fp_correct_sample(model, facts, n=n_facts)
        fp = observe_fp(model, sample, kld_tokens=KLD_TOKENS if kld_tokens is None
                        else kld_tokens, batch_size=batch_size)
    out = []
    for v in variants:
        o = observe(model, fp, v, batch_size)
        values = statistics(o, fp.grams)
        intervals = bootstrap(o, fp.grams, n_boot) if n_boot else None
        evidence = evidence_frame(values, intervals, thresholds)
        evidence.attrs["collapse_votes"] = thresholds.collapse_votes
        verdict_, reason, border, margin = decide(evidence, o.weights, len(fp.facts))
        out.append(Diagnosis(v.name, verdict_, evidence, reason, o.weights, border, margin,
                             len(fp.facts), {"facts": per_fact_frame(o, fp.facts)}, fp.facts))
    return out


def evidence_long(diagnoses: list[Diagnosis]) -> pd.DataFrame:
    """The evidence of several diagnoses as one tidy frame: :func:`evidence_frame`'s rows with
    the variant, its verdict, whether it is borderline, its margin and the facts it used."""
    return pd.concat([d.evidence.assign(variant=d.variant, verdict=d.verdict,
                                        borderline=d.borderline or "", margin=d.margin,
                                        n_facts=d.n_facts)
                      for d in diagnoses], ignore_index=True)


def evidence_table(diagnoses: list[Diagnosis]) -> pd.DataFrame:
    """The evidence of several diagnoses side by side: one row per signature, one column per
    variant (``value [low, high]``), then the threshold and the verdict a crossing supports;
    the first rows hold each variant's verdict and whether it is borderline."""
    first = diagnoses[0].evidence
    table = first[["signature"]].copy()
    for d in diagnoses:
        table[d.variant] = [format_value(r.signature, r.value, r.ci_low, r.ci_high)
                            for r in d.evidence.itertuples()]
    table["threshold"] = [("" if t is None or t != t else format_value(s, t))
                          for s, t in zip(first["signature"], first["threshold"])]
    table["crossing supports"] = first["supports"]
    table["section"] = first["section"]
    head = [{"signature": "verdict", **{d.variant: d.verdict.replace("_", " ")
                                       for d in diagnoses},
             "threshold": "", "crossing supports": "", "section": "§4.3"},
            {"signature": "borderline", **{d.variant: d.borderline or "no" for d in diagnoses},
             "threshold": "", "crossing supports": "", "section": ""}]
    return pd.concat([pd.DataFrame(head), table.astype(object)], ignore_index=True)


def format_value(signature: str, value: float, lo: float | None = None,
                 hi: float | None = None) -> str:
    """A signature's value as the evidence table writes it: ranks as integers, shares of the
    vocabulary in scientific notation, the rest with three decimals; ``[lo, hi]`` appended."""
    if value != value:
        return "not measured"

    def one(x):
        if signature == "median_rank":
            return f"{x:.0f}" if x == int(x) else f"{x:.1f}"
        if signature == "failure_best_rank":
            return f"{x:.2e}"
        return f"{x:.3f}"

    if lo is None or hi is None or (lo == value == hi):
        return one(value)
    return f"{one(value)} [{one(lo)}, {one(hi)}]"
