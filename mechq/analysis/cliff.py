"""The performance cliff (paper Fig. 1), with how much of it is the calibration's doing.

A *configuration* is one quantizer setting (method, bits, group size, sym, desc_act); quantized
with calibration seeds ``0 … S-1`` it gives ``S`` variants (``gptq-w4g128``, ``gptq-w4g128-s1``
…) whose calibrations are different windows of the same text (:mod:`mechq.facts.calibration`).

Per configuration, :func:`cliff_table` reports:

- ``accuracy``: the mean over seeds of first-token accuracy (:func:`mechq.analysis.recall.accuracy`);
- ``seed_min`` / ``seed_max``: the lowest and highest accuracy among the seeds — the
  *calibration spread*: how far the result moves with the text GPTQ happened to see;
- ``ci_low`` / ``ci_high``: the 95 % Wilson interval of an accuracy equal to that mean on this
  many facts — the *fact-sampling* uncertainty, which no choice of calibration removes;
- ``median_rank`` (median over facts and seeds of the answer's rank) and ``mean_target_prob``;
- ``avg_bits``: storage per weight of the packed variant (codes, zero points, fp16 scales).

A spread inside the CI means the calibration moves the number less than the fact sample does.
"""

from __future__ import annotations


from collections.abc import Sequence

import pandas as pd

from mechq.quant.quantize import Request, variant_name
from mechq.quant.variants import Variant
from mechq.analysis.recall import FP, _wilson, accuracy


def cliff_requests(method: str = "gptq", bits: Sequence[int] = (8, 4, 3, 2), group_size: int = 128,
                   seeds: int = 1, *, seed_bits: Sequence[int] | None = None, sym: bool = True,
                   desc_act: bool = False, calibration=None, n_samples: int | None = None,
                   seq_len: int | None = None) -> list[Request]:
    """One request per bit width and calibration seed ``0 … seeds-1``.

    ``seed_bits`` limits the extra seeds to some widths (the others get seed 0 only); RTN takes
    no calibration and always gets one variant per width.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}.")
    if seed_bits is not None and not set(seed_bits) <= set(bits):
        raise ValueError(f"seed_bits {list(seed_bits)} must be among bits {list(bits)}.")
    size = {k: v for k, v in dict(n_samples=n_samples, seq_len=seq_len).items() if v}

    def n(b: int) -> int:
        if method != "gptq" or (seed_bits is not None and b not in seed_bits):
            return 1
        return seeds

    return [Request(method, b, group_size, sym, desc_act, calibration, s, **size)
            for b in bits for s in range(n(b))]


def variant_table(variants: Sequence[Variant]) -> pd.DataFrame:
    """One row per variant: its configuration, calibration seed and storage.

    ``bits`` is the variant's base bit width; ``avg_bits`` is :attr:`Variant.avg_bits` (storage
    per linear weight, which for per-module ``dynamic`` rules mixes the modules' widths and
    counts modules kept in full precision at 16 bits). ``config`` is the variant's name without
    its seed suffix, so rules with different ``dynamic`` are different configurations.
    """
    rows = [dict(variant=FP, config=FP, method=None, bits=None, seed=None, avg_bits=32.0,
                 calibration=None)]
    for v in variants:
        rows.append(dict(variant=v.name,
                         config=variant_name(v.method, v.bits, v.group_size, v.sym, v.desc_act,
                                             dynamic=v.dynamic),
                         method=v.method, bits=v.bits, seed=v.meta.get("seed"),
                         avg_bits=v.avg_bits, calibration=v.meta.get("calibration_source")))
    return pd.DataFrame(rows)


def cliff_table(recall: pd.DataFrame, variants: Sequence[Variant],
                kld: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per configuration: mean accuracy over seeds, the seed range, the facts' 95 % CI, ranks;
    with ``kld`` (:func:`mechq.analysis.kld.kld_stats`, one row per variant) also the mean over
    seeds of the held-out KL divergence (mean and 99th percentile) and the same-top-1 rate."""
    info = variant_table(variants).set_index("variant")
    per = accuracy(recall).set_index("variant").join(info, how="left")
    rec = recall.assign(config=recall["variant"].map(info["config"]))
    rows = []
    for config, g in per.groupby("config", sort=False):
        n = int(g["n"].iloc[0])
        mean = float(g["accuracy"].mean())
        lo, hi = _wilson(mean * n, n)
        r = rec[rec["config"] == config]
        rows.append(dict(
            variant=config, method=g["method"].iloc[0], bits=g["bits"].iloc[0], avg_bits=float(g["avg_bits"].mean()),
            seeds=len(g), accuracy=mean, seed_min=float(g["accuracy"].min()),
            seed_max=float(g["accuracy"].max()), ci_low=float(lo), ci_high=float(hi), n=n,
            mean_correct=float(g["n_correct"].mean()),
            median_rank=float(r["target_rank"].median()),
            mean_target_prob=float(r["target_prob"].mean())))
    table = pd.DataFrame(rows)
    if kld is not None:
        cols = ["kld_mean", "kld_p99", "same_top1"]
        k = kld.assign(config=kld["variant"].map(info["config"])).groupby("config")[cols].mean()
        table = table.join(k, on="variant")
        table.loc[table["variant"] == FP, cols] = [0.0, 0.0, 1.0]
    return table


def method_comparison(recall: pd.DataFrame, a: str, b: str, fp: str = FP) -> pd.DataFrame:
    """Two variants of the same width side by side (GPTQ vs AWQ at w4, paper App. D).

    On the facts FP answers correctly: how many each keeps (``accuracy`` over those facts),
    how many both keep, only one keeps, neither keeps, and how often their top-1 tokens agree
    (on all facts). One row per variant plus a ``both`` row for the shared counts.
    """
    piv = recall.pivot_table(index="fact_id", columns="variant", values="correct",
                             aggfunc="first")
    top = recall.pivot_table(index="fact_id", columns="variant", values="top1_id",
                             aggfunc="first")
    missing = [v for v in (fp, a, b) if v not in piv.columns]
    if missing:
        raise ValueError(f"method_comparison: no recall rows for {missing}.")
    known = piv[piv[fp].astype(bool)]
    ka, kb = known[a].astype(bool), known[b].astype(bool)
    n = len(known)
    rows = [dict(variant=v, fp_correct=n, kept=int(k.sum()), kept_share=k.mean() if n else
                 float("nan"), only_this=int((k & ~o).sum()))
            for v, k, o in ((a, ka, kb), (b, kb, ka))]
    agree = float((top[a] == top[b]).mean())
    rows.append(dict(variant="both", fp_correct=n, kept=int((ka & kb).sum()),
                     kept_share=(ka & kb).mean() if n else float("nan"),
                     only_this=int((~ka & ~kb).sum()), top1_agreement=agree))
    out = pd.DataFrame(rows)
    out.loc[out.variant == "both", "note"] = "only_this = neither keeps it"
    return out


def summary_markdown(table: pd.DataFrame, fp_label: str = "FP") -> str:
    """The cliff table as Markdown (what the demo writes to ``summary.md``)."""
    kld = "kld_mean" in table.columns
    lines = ["| variant | avg bits/weight | accuracy | calibration seeds: range | "
             "95 % CI (facts) | median answer rank | mean target prob |"
             + (" mean KLD (nats) | same top-1 |" if kld else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if kld else "")]
    for r in table.itertuples():
        name = fp_label if r.variant == FP else r.variant
        spread = (f"{r.seed_min:.1%}–{r.seed_max:.1%} ({r.seeds} seeds)" if r.seeds > 1
                  else "—" if r.variant == FP else "none (no calibration)"
                  if r.method == "rtn" else "1 seed")
        lines.append(
            f"| {name} | {r.avg_bits:.2f} | **{r.accuracy:.1%}** ({r.mean_correct:.0f}/{r.n}) | "
            f"{spread} | {r.ci_low:.1%}–{r.ci_high:.1%} | {_rank(r.median_rank)} | "
            f"{r.mean_target_prob:.3f} |"
            + (f" {r.kld_mean:.3f} | {r.same_top1:.1%} |" if kld else ""))
    return "\n".join(lines)


def _rank(x: float) -> str:
    return f"{x:,.0f}".replace(",", " ") if x == int(x) else f"{x:.1f}"
