"""The pages each ``mechq`` command writes: frames, figures and one HTML report per command.

Every ``*_page`` function takes the model, facts, variants and options of one command, writes its
CSV frames, Plotly figures and HTML page into ``out``, and returns a :class:`Page`: the main file
it wrote and the summary the command prints. The CLI only parses arguments and calls them; the
notebooks can call the same code. The building blocks :func:`mechq.report` shares are here too:
:func:`write_cliff`, :func:`architecture_section` and :func:`machine_description`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from mechq.analysis.cliff import cliff_table, summary_markdown, variant_table
from mechq.analysis.recall import accuracy, evaluate_recall, subset_labels, subset_sizes
from mechq.engine.store import machine_text
from mechq.facts import FactSet
from mechq.models.load import source_of
from mechq.quant.quantize import Request
from mechq.quant.variants import Variant
from mechq.reports import plots
from mechq.reports.html import Report

SUBSETS = {"fp-correct": ("Robust", "Failure"), "failure": ("Failure",), "robust": ("Robust",),
           "all": None}  # the facts mechq patch / sensitivity analyse: subset -> labels kept
ACC_COLS = ["variant", "accuracy", "ci_low", "ci_high", "n_correct", "n", "median_rank",
            "mean_target_prob"]


def say(text: str) -> None:
    """Print a progress line at once."""
    print(text, flush=True)


@dataclass
class Page:
    """What a ``*_page`` function wrote: its main file, the summary a command prints, and the
    frames behind it."""

    path: Path
    text: str
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)


def _text(df: pd.DataFrame, index: bool = True, digits: int = 3) -> str:
    return df.to_string(index=index, float_format=lambda x: f"{x:.{digits}f}")


def _name(model: HookedTransformer) -> str:
    return source_of(model).name


def _at_depths(df: pd.DataFrame, model: HookedTransformer, index: list[str],
               value: str) -> pd.DataFrame:
    """``value`` at an early, the middle and the last-but-one layer, one column per variant."""
    L = model.cfg.n_layers
    return df[df.layer.isin([1, L // 2, L - 1])].pivot_table(
        index=[*index, "layer"], columns="variant", values=value)


def _subsets_line(ref: str, label: Mapping[str, str | None]) -> str:
    n = {k: list(label.values()).count(k) for k in ("Robust", "Failure")}
    return f"subsets (reference {ref}): Robust {n['Robust']}, Failure {n['Failure']}"


def _close(rep: Report, heading: str, show: pd.DataFrame, path: Path) -> Page:
    """End ``rep`` with its summary table ``show`` and write it to ``path``."""
    rep.heading(heading)
    rep.table(show.reset_index())
    return Page(rep.write(path), _text(show), {"summary": show})


# --------------------------------------------------------------------------------------------
# Shared with mechq.report
# --------------------------------------------------------------------------------------------


@dataclass
class CliffOutputs:
    """What :func:`write_cliff` computed (and wrote into its folder)."""

    recall: pd.DataFrame       # recall rows with config, bits and seed columns
    per_variant: pd.DataFrame  # accuracy per variant (every seed) with its configuration
    table: pd.DataFrame        # cliff_table: one row per configuration
    seed0: pd.DataFrame        # the recall rows of seed 0 (and FP)
    cliff_fig: object
    rank_fig: object


def write_cliff(recall: pd.DataFrame, variants: Sequence[Variant], out: Path,
                title: str, kld: pd.DataFrame | None = None) -> CliffOutputs:
    """The cliff's frames and figures from recall rows, written to ``out``: recall.csv,
    accuracy.csv, cliff.csv, performance_cliff.html and answer_rank.html (shared by
    :func:`cliff_page` and :func:`mechq.report`); with ``kld`` (held-out KL divergence per
    variant) also kld.csv, and the cliff table gains its columns."""
    info = variant_table(variants)
    recall = recall.merge(info[["variant", "config", "bits", "seed"]], on="variant", how="left")
    recall.to_csv(out / "recall.csv", index=False)
    per_variant = accuracy(recall).merge(info, on="variant", how="left")
    per_variant.to_csv(out / "accuracy.csv", index=False)
    table = cliff_table(recall, variants, kld)
    table.to_csv(out / "cliff.csv", index=False)
    if kld is not None:
        kld.to_csv(out / "kld.csv", index=False)
    seed0 = recall[recall["seed"].fillna(0) == 0]
    cliff_fig = plots.performance_cliff(
        table, accuracy(seed0, ["config", "relation"]).rename(columns={"config": "variant"}),
        title=title, seeds=per_variant)
    plots.save_html(cliff_fig, out / "performance_cliff.html")
    rank_fig = plots.rank_ecdf(seed0)
    plots.save_html(rank_fig, out / "answer_rank.html")
    return CliffOutputs(recall, per_variant, table, seed0, cliff_fig, rank_fig)


def matmul_gflops(seconds: float = 0.5) -> float:
    """Measured float32 matmul throughput of this machine (GFLOP/s, 1024² × 1024² products on
    the CPU), so that timings from different machines can be compared."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def machine_description() -> str:
    """This machine in one line (:func:`mechq.engine.store.machine_text`: CPU model, cores, torch
    threads, GPU, versions) with its measured float32 matmul throughput."""
    head, _, versions = machine_text().partition(";")
    return f"{head}, {matmul_gflops():.0f} GFLOP/s float32 matmul;{versions}"


def architecture_section(rep: Report, c, setting: str, number: str = "") -> pd.DataFrame:
    """Add the architecture contrast (:class:`mechq.reports.architectures.Comparison` ``c``) to
    ``rep``: the contrast table, the cliff, first-domino, single-layer and component figures, the
    protections and the verdicts. ``setting`` says how it was measured; ``number`` prefixes the
    headings. Returns the contrast table."""
    from mechq.reports.architectures import contrast_table

    table = contrast_table(c)
    pre = f"{number} " if number else ""
    rep.heading(f"{pre}The architecture contrast, measured (paper Fig. 10, Fig. 22)")
    rep.text(setting + " Models of 135M-270M parameters, not the paper's 8B: the contrast is "
             "a property of these models first.", note=True)
    rep.table(table)
    rep.figure(plots.architecture_bars(c.cliff, "variant", "The cliff: recall per bit width"))
    rep.figure(plots.architecture_curves(c.domino, title="First domino: layers 0…k quantized "
                                                         "(paper Fig. 10)"))
    rep.figure(plots.architecture_curves(c.single, title="Single layer quantized (paper Fig. 22)",
                                         xaxis_title="layer depth, (l + 1) / L"))
    rep.figure(plots.architecture_bars(c.components, "setting", "Component sensitivity"))
    rep.heading(f"{pre}Protection at the same bit budget")
    rep.table(c.protection)
    rep.heading(f"{pre}What diagnose says, and recommends")
    rep.table(c.verdicts)
    return table


def architecture_setting(method: str, sweep_bits: int, protect_bits: int, n_facts: int) -> str:
    """The sentence that says how a comparison was measured."""
    how = ("GPTQ g128 with the default calibration" if method == "gptq"
           else f"{method.upper()} g128 (no calibration)")
    return (f"{how}. Sweeps at {sweep_bits} bits on up to {n_facts} facts each FP model knows; "
            f"protections at {protect_bits} bits, accuracy on the held-out half of the facts.")


# --------------------------------------------------------------------------------------------
# Robust / Failure subsets of the analysis commands
# --------------------------------------------------------------------------------------------


def fact_labels(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant],
                reference: str | None = None,
                echo: Callable[[str], None] = say) -> tuple[str, dict[str, str]]:
    """The reference variant's name (default: the first variant) and each fact's subset against
    it (§3.2): Robust = FP and the reference correct, Failure = FP correct, the reference wrong,
    "FP wrong" otherwise. ``echo`` receives the subset sizes."""
    ref = reference or variants[0].name
    ref_v = [v for v in variants if v.name == ref]
    if not ref_v:
        raise ValueError(f"reference {ref} is not among the variants")
    label = subset_labels(evaluate_recall(model, facts, ref_v, progress=False), reference=ref)
    echo(_subsets_line(ref, label))
    return ref, label


def analysis_facts(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant],
                   reference: str | None = None, subset: str = "fp-correct",
                   echo: Callable[[str], None] = say) -> tuple[FactSet, str, dict[str, str]]:
    """The facts ``mechq patch`` / ``mechq sensitivity`` analyse: those of ``subset`` (a key of
    :data:`SUBSETS`) against ``reference``, with the reference's name and every fact's label.
    Facts FP gets wrong are analysed only with ``subset="all"``."""
    if not variants:
        raise ValueError("give at least one variant")
    ref, label = fact_labels(model, facts, variants, reference, echo)
    keep = SUBSETS[subset]
    chosen = FactSet([f for f in facts if keep is None or label.get(f.id) in keep],
                     name=f"{facts.name}:{subset}")
    if not chosen:
        raise ValueError(f"no facts in subset {subset!r} (of {len(facts)}); "
                         "try --subset all or more facts")
    echo(f"analysing {len(chosen)} facts (subset {subset})")
    return chosen, ref, label


# --------------------------------------------------------------------------------------------
# One page per command
# --------------------------------------------------------------------------------------------


def cliff_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant], out: Path,
               *, batch_size: int = 32) -> Page:
    """Recall of FP and ``variants`` (``mechq cliff``, paper Fig. 1) and their KL divergence from
    FP on the held-out text: :func:`write_cliff`'s files; the summary is the cliff table and the
    kinds of target tokens."""
    from mechq.analysis.kld import kld_stats
    from mechq.diagnosis.evidence import KLD_TOKENS

    recall = evaluate_recall(model, facts, variants, batch_size=batch_size)
    kld = kld_stats(model, variants, max_tokens=KLD_TOKENS)
    v = variants[0]
    res = write_cliff(recall, variants, out, title=f"Performance cliff — {_name(model)}, "
                      f"{v.method.upper()} g{v.group_size}, {len(facts)} facts", kld=kld)
    kinds = res.recall[res.recall.variant == "fp"]["target_kind"].value_counts().to_dict()
    return Page(out / "performance_cliff.html",
                f"{summary_markdown(res.table)}\n\ntarget tokens: {kinds} (column target_kind "
                "of recall.csv)", {"recall": res.recall, "cliff": res.table})


def recall_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant], out: Path,
                *, reference: str | None = None, batch_size: int = 32) -> Page:
    """Recall, answer-rank distribution, top-1 tokens and Robust/Failure subsets (§3.2):
    recall.csv, accuracy.csv, top_predictions.csv, subsets.csv (against ``reference``, default
    the first variant), answer_rank.html and top_predictions.html."""
    recall = evaluate_recall(model, facts, variants, batch_size=batch_size)
    recall.to_csv(out / "recall.csv", index=False)
    acc = accuracy(recall)
    acc.to_csv(out / "accuracy.csv", index=False)
    top = plots.top_predictions(recall)
    top.to_csv(out / "top_predictions.csv", index=False)
    path = plots.save_html(plots.rank_ecdf(recall), out / "answer_rank.html")
    plots.save_html(plots.top_predictions_figure(top), out / "top_predictions.html")
    parts = [_text(acc[ACC_COLS], index=False)]
    if variants:
        ref = reference or variants[0].name
        sizes = subset_sizes(recall, reference=ref)
        sizes.to_csv(out / "subsets.csv", index=False)
        parts.append(f"subsets (reference {ref}):\n"
                     + _text(sizes[sizes.relation == "all"], index=False))
    parts.append("most frequent wrong top-1 tokens:\n" + "\n".join(
        f"  {v}: " + ", ".join(f"{t!r} {s:.0%}" for t, s in zip(g.top1, g.share))
        for v, g in top.groupby("variant", sort=False)))
    return Page(path, "\n\n".join(parts), {"recall": recall, "accuracy": acc})


def lens_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant], out: Path,
              *, reference: str | None = None, batch_size: int = 32,
              echo: Callable[[str], None] = say) -> Page:
    """Logit lens per layer at the last token, per variant and Robust/Failure subset against
    ``reference`` (§3.3): lens.csv.gz, lens_summary.csv, logit_lens.html."""
    from mechq.analysis.lens import lens_summary, logit_lens

    lens = logit_lens(model, facts, variants, batch_size=batch_size)
    L = model.cfg.n_layers
    by = ["variant", "layer"]
    if variants:
        ref = reference or variants[0].name
        recall = lens[lens.layer == L].assign(correct=lambda d: d.target_rank == 1)
        label = subset_labels(recall, reference=ref)
        echo(_subsets_line(ref, label))
        lens["subset"] = lens["fact_id"].map(label)
        by = ["subset", *by]
    lens.to_csv(out / "lens.csv.gz", index=False)
    summ = lens_summary(lens, by)
    summ.to_csv(out / "lens_summary.csv", index=False)
    if variants:
        summ = summ[summ["subset"].isin(["Robust", "Failure"])]
    fig = plots.lens_curves(summ, "subset" if variants else None,
                            title=f"Logit lens — {_name(model)}")
    path = plots.save_html(fig, out / "logit_lens.html")
    show = summ[summ.layer.isin([L * 2 // 3, L])]
    return Page(path, _text(show[by + ["mean_prob", "median_rank", "top1_share", "n"]],
                            index=False), {"lens": lens, "lens_summary": summ})


def components_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant],
                    out: Path, *, reference: str | None = None, batch_size: int = 32,
                    echo: Callable[[str], None] = say) -> Page:
    """Attention and FFN diagnostics per layer (§4.1), split by Robust/Failure against
    ``reference``: components.csv.gz, components_summary.csv, components_by_subset.csv,
    components.html."""
    from mechq.analysis.components import METRICS, component_metrics, component_summary

    df = component_metrics(model, facts, variants, batch_size=batch_size)
    labels = fact_labels(model, facts, variants, reference, echo)[1] if variants else None
    df["subset"] = df["fact_id"].map(labels) if labels else "all"
    df.to_csv(out / "components.csv.gz", index=False)
    summ = component_summary(df)
    summ.to_csv(out / "components_summary.csv", index=False)
    component_summary(df, by="subset").to_csv(out / "components_by_subset.csv", index=False)
    rep = Report(f"Component diagnostics — {_name(model)}")
    rep.text("Definitions are in mechq.analysis.components (the paper publishes no code).",
             note=True)
    for metric in METRICS:
        rep.heading(metric)
        rep.figure(plots.component_lines(summ, metric))
    return _close(rep, "Means at early / middle / late layers",
                  _at_depths(summ, model, ["metric", "position"], "mean"),
                  out / "components.html")


def representation_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant],
                        out: Path, *, energy: float = 0.9, batch_size: int = 32) -> Page:
    """Linear CKA (layer x layer) and subspace similarity / error alignment per layer (§4.2):
    cka.csv.gz, subspace.csv, representation.html."""
    from mechq.analysis.representation import cka_diagonal, representation_metrics

    r = representation_metrics(model, facts, variants, batch_size=batch_size, energy=energy)
    r.cka.to_csv(out / "cka.csv.gz", index=False)
    r.subspace.to_csv(out / "subspace.csv", index=False)
    rep = Report(f"Representation diagnostics — {_name(model)}")
    rep.text(f"Linear CKA on prompt-centred activations; subspaces keep {energy:.0%} of "
             "the FP spectral energy (mechq.analysis.representation).", note=True)
    for stream in dict.fromkeys(r.cka["stream"]):
        for pos in dict.fromkeys(r.cka["position"]):
            rep.heading(f"CKA {stream} at {pos}")
            rep.figure(plots.cka_heatmaps(r.cka, stream=stream, position=pos))
    for pos in dict.fromkeys(r.subspace["position"]):
        rep.heading(f"Subspaces at {pos}")
        rep.figure(plots.subspace_lines(r.subspace, position=pos))
    return _close(rep, "CKA diagonal at early / middle / late layers",
                  _at_depths(cka_diagonal(r.cka), model, ["stream", "position"], "cka"),
                  out / "representation.html")


def patch_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant], out: Path,
               *, reference: str | None = None, subset: str = "fp-correct",
               positions: str = "semantic", echo: Callable[[str], None] = say,
               **patching) -> Page:
    """Activation patching FP -> variant (sufficiency) and zero ablation (necessity), §3.4, on
    the facts of ``subset`` (:func:`analysis_facts`): patching.csv, the heatmap frames, one
    heatmap per activation and mode, patching.html. ``patching``: options of
    :func:`mechq.analysis.patching.run_patching` (activations, modes, fp_ablation, layers ...)."""
    from mechq.analysis.patching import by_third, run_patching

    chosen, _, label = analysis_facts(model, facts, variants, reference, subset, echo)
    res = run_patching(model, chosen, variants, labels=label, out=out, positions=positions,
                       **patching)
    rep = Report(f"Activation patching — {_name(model)}")
    rep.text(f"{len(chosen)} facts (subset {subset}); positions {positions}. "
             "restored = share of the FP-vs-unpatched target-probability gap that patching the "
             "FP activation closes; mean_delta = patched minus unpatched target probability "
             "(definitions in mechq.engine.patching).", note=True)
    parts = []
    for (activation, mode), g in res.heatmap.groupby(["activation", "mode"], sort=False):
        value = "restored" if mode == "fp_to_variant" else "mean_delta"
        rep.heading(f"{activation} · {mode} ({value})")
        fig = plots.patching_heatmap(g, value=value, title=f"{activation}, {mode}: {value}")
        plots.save_html(fig, out / f"patching_{activation}_{mode}.html")
        rep.figure(fig)
        show = by_third(g, value, model.cfg.n_layers, lowest=(mode == "zero"))
        rep.table(show.reset_index())
        parts.append(f"{activation} · {mode}: {value} (mean over early / middle / late layers, "
                     f"and the strongest)\n{_text(show)}")
    return Page(rep.write(out / "patching.html"), "\n\n".join(parts),
                {"patching": res.rows, "heatmap": res.heatmap})


CURVES = {  # per-layer accuracy curves: file stem, layer column, heading, title, x axis
    "domino": ("first_domino", "k", "First domino: layers 0…k quantized, the rest FP "
               "(paper Fig. 10, Table 2)", "First domino", "k (last quantized layer)"),
    "single": ("single_layer", "layer", "Single-layer quantization: only layer l quantized "
               "(paper Fig. 22–23)", "Single layer quantized", "quantized layer"),
}


def _sensitivity_section(rep: Report, name: str, frame: pd.DataFrame, low: Variant,
                         out: Path) -> None:
    """The heading and figures of one analysis of :func:`sensitivity_page`."""
    if name in CURVES:
        stem, key, heading, title, xaxis_title = CURVES[name]
        rep.heading(heading)
        for v, g in frame.groupby("variant", sort=False):
            fig = plots.first_domino_curve(g.rename(columns={key: "k"}), color="subset",
                                           title=f"{title} — {v}", xaxis_title=xaxis_title)
            plots.save_html(fig, out / f"{stem}_{v}.html")
            rep.figure(fig)
    elif name == "components":
        rep.heading("Component sensitivity: one component quantized in every layer (Table 5)")
    else:
        rep.heading(f"Signal injection: first k layers at high precision, the rest {low.name} "
                    "(paper Fig. 12, 24)")
        for h, g in frame.groupby("high", sort=False):
            fig = plots.injection_curves(g)
            plots.save_html(fig, out / f"signal_injection_{h}.html")
            rep.figure(fig)


def sensitivity_page(model: HookedTransformer, facts: FactSet, variants: Sequence[Variant],
                     out: Path, *, reference: str | None = None, subset: str = "fp-correct",
                     echo: Callable[[str], None] = say, **options) -> Page:
    """First domino, single-layer sweep, component table and signal injection (§4.3) on the
    facts of ``subset`` (:func:`analysis_facts`): each analysis's CSV frames, its figures and
    sensitivity.html. ``options``: those of
    :func:`mechq.analysis.sensitivity.run_sensitivity` (analyses, injection_high ...)."""
    from mechq.analysis.sensitivity import run_sensitivity

    chosen, ref, label = analysis_facts(model, facts, variants, reference, subset, echo)
    res = run_sensitivity(model, chosen, variants, labels=label, out=out, **options)
    rep = Report(f"Layer and component sensitivity — {_name(model)}")
    rep.text(f"{len(chosen)} facts (subset {subset}); Robust / Failure against {ref}. "
             "Definitions in mechq.analysis.sensitivity.", note=True)
    low = options.get("injection_low") or variants[-1]
    for name, a in res.items():
        _sensitivity_section(rep, name, a.frame, low, out)
        rep.table(a.table.reset_index())
    return Page(rep.write(out / "sensitivity.html"),
                "\n\n".join(f"{a.title}\n{_text(a.table)}" for a in res.values()),
                {name: a.frame for name, a in res.items()})


def _attention_section(rep: Report, model: HookedTransformer, facts: FactSet, v: Variant,
                       lens: pd.DataFrame) -> None:
    """circuitsvis view of FP and ``v`` on one diagnosed fact, one ``v`` answers wrong if any."""
    from mechq.reports.attention import attention_view

    last = lens[(lens.variant == v.name) & (lens.layer == lens.layer.max())]
    wrong = last.loc[last.target_rank > 1, "fact_id"]
    fid = wrong.iloc[0] if len(wrong) else last["fact_id"].iloc[0]
    fact = next(f for f in facts if f.id == fid)
    view = attention_view(model, fact.prompt, [None, v])
    rep.heading("Attention on one fact (FP vs the variant)")
    rep.text(f"{fact.subject} → {fact.object}"
             + (f" ({v.name} gets it wrong)" if len(wrong) else "")
             + f"; layer {view.patterns.layer}.")
    rep.attention(view)


def _repair_section(rep: Report, model: HookedTransformer, base: Request, facts: FactSet,
                    out: Path, batch_size: int) -> str:
    """The repairs of ``base`` on held-out facts: repairs.csv and a section of ``rep``; returns
    their summary."""
    from mechq.repair.table import repair_summary, repair_table

    res = repair_table(model, [base], facts, batch_size=batch_size)
    res.table.to_csv(out / "repairs.csv", index=False)
    summary = repair_summary(res.table)
    rep.heading("Repairs (held-out facts; accuracy in % by the base's subsets)")
    rep.text(summary)
    rep.table(res.wide(), floatfmt="{:.1f}")
    rep.figure(plots.repair_pareto(res.table))
    return f"{_text(res.wide().T, digits=1)}\n{summary}"


def diagnose_page(model: HookedTransformer, variant: Variant, facts: FactSet, out: Path, *,
                  n_facts: int = 128, batch_size: int = 32,
                  repair: Request | None = None) -> Page:
    """The verdict on ``variant`` with its evidence and the frames behind it (§4.3):
    evidence.csv, weight_signatures.csv, diagnose.html; with ``repair`` (the variant's request)
    also the repairs (protection, + amplification, EoRA) in repairs.csv and the page."""
    from mechq.analysis.lens import logit_lens, lens_summary
    from mechq.diagnosis.verdict import STEP_ERROR, diagnose, evidence_long, evidence_table

    d = diagnose(model, variant, facts, n_facts=n_facts, batch_size=batch_size)
    evidence = evidence_long([d])
    evidence.to_csv(out / "evidence.csv", index=False)
    d.weights.to_csv(out / "weight_signatures.csv", index=False)
    d.frames["facts"].to_csv(out / "evidence_per_fact.csv", index=False)
    rep = Report(f"mechq diagnose — {variant.name} on {_name(model)}")
    rep.heading(f"Verdict: {d.verdict.replace('_', ' ')}"
                + (" (borderline)" if d.borderline else ""))
    rep.text(d.reason)
    if d.borderline:
        rep.text(f"Borderline: {d.borderline}.", note=True)
    rep.text(f"Next step: {d.next_step}.")
    rep.figure(plots.evidence_heatmap(evidence))
    rep.table(evidence_table([d]))
    rep.heading("Weight space: each module's error in quantization steps")
    rep.figure(plots.weight_signature_lines(d.weights, threshold=STEP_ERROR))
    lens = logit_lens(model, d.sample, [variant], batch_size=batch_size, progress=False)
    rep.heading("Logit lens on the facts diagnosed (FP vs the variant)")
    rep.figure(plots.lens_curves(lens_summary(lens), None, title="Logit lens"))
    _attention_section(rep, model, facts, variant, lens)
    parts = [f"verdict: {d.verdict}" + (f" (borderline: {d.borderline})" if d.borderline
                                         else "") + f" — {d.reason}",
             f"next step: {d.next_step}", _text(evidence_table([d]), index=False),
             "worst modules:\n" + _text(d.worst_modules, index=False)]
    if repair is not None:
        parts.insert(0, _repair_section(rep, model, repair, facts, out, batch_size))
    return Page(rep.write(out / "diagnose.html"), "\n\n".join(parts), {"evidence": evidence})


def recipe_page(model: HookedTransformer, base: Request, facts: FactSet, out: Path, *,
                budget: float, check: bool = False, widths: Sequence[int] | None = None,
                eora_ranks: Sequence[int] = (), batch_size: int = 32) -> Page:
    """Per-module widths of ``base``'s method within ``budget`` bits per weight, measured against
    the usual rules at the same bits (:mod:`mechq.repair.recipe`): recipe.json (with GPTQModel's
    dynamic rules), candidates.csv, sensitivity.csv and recipe.html with the sensitivity map;
    with ``eora_ranks`` a module may also take an EoRA correction, which goes into ``adapter/``
    as a PEFT LoRA adapter for the re-quantized checkpoint; with ``check`` the recipe is
    quantized again from the JSON alone and measured."""
    from mechq.analysis.fisher import DEFAULT_BITS
    from mechq.repair.adapter import write_peft_adapter
    from mechq.repair.alternatives import plain
    from mechq.repair.recipe import check_recipe, fit_recipe, recipe_sensitivity, write_recipe

    options = recipe_sensitivity(model, base, widths or DEFAULT_BITS, ranks=eora_ranks)
    r, variant = fit_recipe(model, base, budget, facts, options=options, batch_size=batch_size)
    path = write_recipe(r, out / "recipe.json")
    sens = options.frame
    sens.to_csv(out / "sensitivity.csv", index=False)
    if r["ranks"]:  # the re-quantized checkpoint's correction, fitted on it by fit_recipe
        write_peft_adapter(variant, out / "adapter", model)
    table = pd.DataFrame(r["candidates"])
    table.to_csv(out / "candidates.csv", index=False)
    e, a = r["expected"], r["amplification"]
    uni = table.set_index("rule").loc["uniform"]
    text = (f"recipe: {r['repair']} at {r['avg_bits']:.3f} bits per weight (budget "
            f"{r['budget']}), {len(r['dynamic'])} dynamic rule(s) over {r['bits']} bits; "
            f"held-out ({e['n_fp_known']} facts FP knows): {100 * e['accuracy_fp_known']:.1f} % "
            f"kept, KLD {e['kld_mean']:.4f} (uniform {int(uni['avg_bits'])}-bit "
            f"{100 * uni['heldout_accuracy_fp_known']:.1f} %, KLD {uni['kld_mean']:.4f}); "
            f"amplification alpha={a['alpha']:g}"
            + (f"; EoRA on {len(r['ranks'])} module(s), adapter in {out / 'adapter'}"
               if r["ranks"] else "") + "\n\n" + _text(table[[
                "rule", "avg_bits", "dev_kld_mean", "heldout_accuracy_fp_known", "kld_mean",
                "same_top1"]], index=False))
    if check:
        c = check_recipe(model, r, facts)
        text += (f"\nre-quantized from the JSON: {100 * c['measured']:.1f} % measured vs "
                 f"{100 * c['expected']:.1f} % expected, KLD {c['kld_mean']:.4f} vs "
                 f"{c['expected_kld_mean']:.4f} ({c['variant']})")
    rep = Report(f"mechq recipe — {source_of(model).name} within {budget} bits")
    rep.text(text.split("\n\n")[0])
    rep.heading("Every rule at the same bits (chosen on the development halves)")
    rep.table(table)
    rep.heading("Sensitivity map (white squares: the recipe's widths; dots: its EoRA "
                "corrections)")
    rep.figure(plots.sensitivity_map(plain(sens), r["modules"], ranks=r["ranks"]))
    rep.write(out / "recipe.html")
    return Page(path, text, {"candidates": table, "sensitivity": sens})


def write_checkpoint(variant: Variant, out: Path, model: HookedTransformer | None = None,
                     ct: bool = False) -> Path:
    """``variant``'s checkpoint in ``out``: a copy of its directory (the cache's GPTQ / RTN /
    AWQ one), or with ``ct`` a whole compressed-tensors checkpoint written by
    compressed-tensors' compressor (:func:`mechq.write_compressed_tensors`). Returns ``out``."""
    if variant.act is not None and not ct:
        raise ValueError(f"{variant.name}: an activation scheme is written into a "
                         "compressed-tensors checkpoint only (--ct).")
    if ct:
        from mechq.quant.formats.compressed_write import write_compressed_tensors

        return Path(write_compressed_tensors(variant, out, model=model))
    src = Path(variant.meta["path"])
    if src.resolve() != out.resolve():
        shutil.copytree(src, out, dirs_exist_ok=True)
    return out


def compare_architectures_page(models: Mapping[str, HookedTransformer], facts: FactSet,
                               out: Path, *, method: str = "gptq", sweep_bits: int = 2,
                               protect_bits: int = 3, n_facts: int = 64, **options) -> Page:
    """Model families side by side (paper Fig. 10, Fig. 22): architectures_*.csv and
    architectures.html; the summary is the contrast table. ``options``: those of
    :func:`mechq.reports.architectures.compare_architectures` (bits, batch_size, calibration)."""
    from mechq.reports.architectures import compare_architectures

    c = compare_architectures(models, facts, method=method, sweep_bits=sweep_bits,
                              protect_bits=protect_bits, n_facts=n_facts, **options)
    c.save(out)
    rep = Report("mechq compare-architectures — " + " vs ".join(models))
    table = architecture_section(rep, c, architecture_setting(method, sweep_bits, protect_bits,
                                                              n_facts))
    table.to_csv(out / "architectures_contrast.csv", index=False)
    return Page(rep.write(out / "architectures.html"), table.T.to_string(), c.frames())


def write_run_record(path: Path, command: str, settings: dict, seconds: float) -> Path:
    """How a result folder was made: the command's settings, mechq's version, the machine and
    how long it took (so a saved result can say where it came from)."""
    from mechq import __version__

    path.write_text(json.dumps(dict(command=f"mechq {command}", settings=settings,
                                    mechq=__version__, machine=machine_description(),
                                    minutes=round(seconds / 60, 1)), indent=1, default=str)
                    + "\n")
    return path
