"""mechq's main job (``make demo``, ``mechq report``): verdicts, the cliff, answer ranks, lens.

:func:`report` loads a model, quantizes it at several bit widths (each with one or more
calibration seeds), measures recall on a fact set, gives each width's verdict with its evidence
(:mod:`mechq.diagnosis.verdict`), runs the logit lens on the Robust and
Failure facts, and writes one offline HTML report, the figures, the CSV frames and
``summary.md`` (the cliff table with its calibration spread, how long the run took and on what
machine). It runs as a list of named stages (load, quantize, recall, diagnose, figures, contrast,
write), each a function of a shared :class:`_Job`; it prints one line per stage, numbered over
the stages that run; long stages show a progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mechq.facts import FactSet


@dataclass
class ReportResult:
    """What :func:`report` computed and where it wrote it."""

    out: Path
    recall: pd.DataFrame
    cliff: pd.DataFrame
    summary: str
    seconds: float
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class _Job:
    """What the stages of :func:`report` share: its settings, then what each stage adds."""

    model: object  # a name or a loaded model; the HookedTransformer after the load stage
    facts: object  # a FactSet or a fact source; the FactSet after the load stage
    out: Path
    method: str
    bits: tuple[int, ...]
    group_size: int
    seeds: int
    seed_bits: Sequence[int] | None
    calib: dict  # calibration, n_samples, seq_len
    max_facts: int | None
    batch_size: int
    device: str | None
    progress: bool
    verbose: bool
    others: dict  # compare_with as {name: model or None}
    echo: Callable[[str], None]
    name: str
    awq: bool
    t0: float = field(default_factory=time.perf_counter)
    variants: list = field(default_factory=list)
    ref: object = None  # the 4-bit and 2-bit variants of seed 0: the logit lens's
    low: object = None
    calib_source: str | None = None
    lens: pd.DataFrame | None = None
    cliff: object = None  # CliffOutputs
    rep: object = None  # the Report
    machine: str = ""
    verdicts: pd.DataFrame | None = None
    frames: dict = field(default_factory=dict)
    result: ReportResult | None = None


def report(
    model="smollm2-135m",
    facts: FactSet | str = "bundled",
    *,
    out: str | Path = "mechq-report",
    method: str = "gptq",
    bits: Sequence[int] = (8, 4, 3, 2),
    group_size: int = 128,
    seeds: int = 1,
    seed_bits: Sequence[int] | None = None,
    calibration=None,
    n_samples: int | None = None,
    seq_len: int | None = None,
    max_facts: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    diagnose: bool = True,
    awq: bool = False,
    compare_with=None,
    echo: Callable[[str], None] | None = None,
) -> ReportResult:
    """Run the main job and write ``report.html``, ``summary.md``, figures and frames to ``out``.

    ``model`` is a name for :func:`mechq.load_model` or a loaded model; ``facts`` a
    :class:`FactSet`, ``"bundled"``, a facts CSV or ``"pararel[:P36,...]"``. ``seeds`` is the
    number of calibration seeds per bit width (GPTQ; ``seed_bits`` limits them to some widths):
    the cliff then shows each width's mean and seed range. GPTQModel's output goes to log files
    under the cache (their folder is printed); ``verbose`` also shows it live. With
    ``diagnose`` the report opens with :func:`mechq.diagnose`'s verdict on each width's
    seed-0 variant, with the evidence side by side. ``awq`` adds an AWQ w4 variant (GPTQModel,
    the model's default AWQ group size) on the same calibration: a row in the cliff, a verdict,
    and a GPTQ-vs-AWQ section. ``compare_with`` (a model name, or a mapping of names to loaded
    models) adds the architecture contrast of this model with those
    (:func:`mechq.reports.architectures.compare_architectures`, with this report's method, bits and
    calibration; it needs 2 and 3 among ``bits``): a section of the report and
    ``architectures_*.csv``. ``echo`` receives the one-line stage messages, numbered
    ``[i/n]`` over the stages this call runs (default: print to stdout).
    """
    from mechq.models.load import source_of

    name = model if isinstance(model, str) else source_of(model).name
    others = {compare_with: None} if isinstance(compare_with, str) else dict(compare_with or {})
    if others:  # checked before any work
        from mechq.reports.architectures import check_settings

        check_settings(tuple(bits), 2, 3, method)
        if name in others:
            raise ValueError(f"compare_with names the report's own model {name!r}.")
    job = _Job(model, facts, Path(out), method, tuple(bits), group_size, seeds, seed_bits,
               dict(calibration=calibration, n_samples=n_samples, seq_len=seq_len), max_facts,
               batch_size, device, progress, verbose, others,
               echo or (lambda s: print(s, flush=True)), name, awq)
    stages = [_load, _quantize, _recall, *([_diagnose] if diagnose else []), _figures,
              *([_contrast] if others else []), _write]
    for i, run in enumerate(stages, 1):
        run(job, lambda text, i=i: job.echo(f"[{i}/{len(stages)}] {text}"))
    return job.result


def _load(job: _Job, stage: Callable[[str], None]) -> None:
    """The model (unless given loaded) and the facts."""
    from mechq.facts import load_fact_source
    from mechq.models.load import load_model

    if isinstance(job.model, str):
        job.model = load_model(job.model, device=job.device)
    if isinstance(job.facts, FactSet):
        job.facts = job.facts.sample(job.max_facts) if job.max_facts else job.facts
    else:
        job.facts = load_fact_source(job.facts, job.max_facts)
    if len(job.facts) == 0:
        raise ValueError("report needs at least one fact.")
    job.out.mkdir(parents=True, exist_ok=True)
    cfg = job.model.cfg
    stage(f"model {job.name}: {cfg.n_layers} layers, d_model {cfg.d_model}; {len(job.facts)} "
          f"facts ({job.facts.name}) ({time.perf_counter() - job.t0:.0f} s)")


def _quantize(job: _Job, stage: Callable[[str], None]) -> None:
    """Every width's variants (one per calibration seed), and AWQ w4 if asked."""
    from mechq.analysis.cliff import cliff_requests
    from mechq.quant.quantize import Request, quantize_many

    requests = cliff_requests(job.method, job.bits, job.group_size, job.seeds,
                              seed_bits=job.seed_bits, **job.calib)
    if job.awq:
        requests.append(Request("awq", 4, None, **job.calib))
    t = time.perf_counter()
    seed_bits = "/".join(map(str, job.seed_bits or ()))
    per_width = (f"{job.seeds} calibration seeds" + (
        f" at w{seed_bits}, 1 at the others" if job.seed_bits is not None else " per width")
        if job.seeds > 1 and job.method == "gptq" else "1 variant per width")
    stage(f"quantize: {job.method.upper()} w{'/'.join(map(str, job.bits))} g{job.group_size}, "
          f"{per_width}" + (" + AWQ w4" if job.awq else ""))
    job.variants = quantize_many(
        job.model, requests, progress=job.progress, verbose=job.verbose,
        on_start=lambda n, logs: job.echo(f"      {n} GPTQ runs (GPTQModel's output goes to "
                                          f"{logs}/)"))
    job.calib_source = next((v.meta.get("calibration_source") for v in job.variants
                             if v.meta.get("calibration_source")), None)
    job.echo(f"      {len(job.variants)} variants ready ({time.perf_counter() - t:.0f} s)")
    first = [v for v in job.variants if not v.meta.get("seed") and v.method == job.method]
    job.ref = next((v for v in first if v.bits == 4), None)
    job.low = next((v for v in first if v.bits == 2), None)


def _recall(job: _Job, stage: Callable[[str], None]) -> None:
    """Recall of every variant, the logit lens of FP and the seed-0 w4 and w2 variants (its last
    layer is their recall, so they run once), the cliff's files; opens the report."""
    from mechq.analysis.lens import logit_lens
    from mechq.analysis.recall import FP, evaluate_recall, recall_from_lens
    from mechq.reports.html import Report
    from mechq.reports.pages import machine_description, write_cliff

    lensed = [v for v in (job.ref, job.low) if v is not None] if job.ref is not None else []
    others = [v for v in job.variants if all(v is not w for w in lensed)]
    fs, n_lens = job.facts, len(lensed) + 1 if lensed else 0
    stage(f"recall: {len(fs)} facts × {len(job.variants) + 1} variants"
          + (f", the logit lens for {n_lens} of them" if n_lens else ""))
    parts = []
    if lensed:
        job.lens = logit_lens(job.model, fs, lensed, batch_size=job.batch_size,
                              progress=job.progress)
        parts.append(recall_from_lens(job.model, fs, job.lens))
    if others or not lensed:
        parts.append(evaluate_recall(job.model, fs, others, include_fp=not lensed,
                                     batch_size=job.batch_size, progress=job.progress))
    order = {n: i for i, n in enumerate([FP] + [v.name for v in job.variants])}
    recall = pd.concat(parts, ignore_index=True)
    recall = (recall.assign(_o=recall["variant"].map(order)).sort_values("_o", kind="stable")
              .drop(columns="_o").reset_index(drop=True))
    from mechq.analysis.kld import kld_stats
    from mechq.diagnosis.evidence import KLD_TOKENS

    t = time.perf_counter()
    kld = kld_stats(job.model, job.variants, max_tokens=KLD_TOKENS, progress=job.progress)
    job.echo(f"      held-out KL divergence: {len(job.variants)} variants on "
             f"{int(kld['n_tokens'].iloc[0]) if len(kld) else 0} tokens "
             f"({time.perf_counter() - t:.0f} s)")
    job.frames["kld"] = kld
    job.cliff = write_cliff(recall, job.variants, job.out,
                            title=f"Performance cliff — {job.name}", kld=kld)
    job.frames["accuracy"] = job.cliff.per_variant
    job.machine = machine_description()
    job.rep = Report(f"mechq report — {job.name}")
    job.rep.text(f"{len(fs)} facts ({fs.name}); {job.method.upper()} group size "
                 f"{job.group_size}; calibration: {job.calib_source or 'none (RTN)'}"
                 + (f", seeds 0–{job.seeds - 1} (the seed range is the red bar)"
                    if job.seeds > 1 else "") + ". Machine: " + job.machine + ".", note=True)


def _diagnose(job: _Job, stage: Callable[[str], None]) -> None:
    """The verdict on each width's seed-0 variant with its evidence, and the attention of FP,
    w4 and w2 on one fact."""
    from mechq.diagnosis.verdict import N_FACTS, diagnose_many, evidence_long, evidence_table
    from mechq.reports import plots

    first_seed = [v for v in job.variants if not v.meta.get("seed")]
    stage(f"diagnose: verdicts for {', '.join(v.name for v in first_seed)} on up to "
          f"{min(N_FACTS, len(job.facts))} FP-correct facts")
    t = time.perf_counter()
    diags = diagnose_many(job.model, first_seed, job.facts, batch_size=min(job.batch_size, 32))
    evidence = evidence_long(diags)
    evidence.to_csv(job.out / "evidence.csv", index=False)
    job.verdicts = pd.DataFrame([dict(variant=d.variant, verdict=d.verdict,
                                      borderline=d.borderline or "", reason=d.reason,
                                      next_step=d.next_step) for d in diags])
    job.frames["verdicts"], job.frames["evidence"] = job.verdicts, evidence
    job.echo("      " + "; ".join(f"{d.variant}: {d.verdict.replace('_', ' ')}" for d in diags)
             + f" ({time.perf_counter() - t:.0f} s)")
    job.rep.heading("0. Verdict (paper §4.3): healthy, signal degradation, computation "
                    "collapse, a format bug, or a reference mismatch")
    job.rep.text("Each signature is measured on the same FP-correct facts (and held-out text "
                 "for the KL divergence), with a bootstrap 95 % interval; thresholds are named "
                 "constants in mechq.diagnosis.verdict (docs/diagnose.md says where each was "
                 "fit). A verdict is borderline when an interval straddles a threshold that "
                 "could change it.")
    job.rep.table(job.verdicts)
    job.rep.figure(plots.evidence_heatmap(evidence))
    job.rep.table(evidence_table(diags))
    if job.ref is not None or job.low is not None:
        _attention(job)


def _attention(job: _Job) -> None:
    """circuitsvis view of FP, w4 and w2 on one fact: a Failure fact of w4 if there is one."""
    from mechq.analysis.recall import subset_labels
    from mechq.reports.attention import attention_view

    shown, ref = [v for v in (job.ref, job.low) if v is not None], job.ref
    label = subset_labels(job.cliff.recall, reference=ref.name) if ref is not None else {}
    fact = next((f for f in job.facts if label.get(f.id) == "Failure"), None) or next(
        (f for f in job.facts if label.get(f.id) == "Robust"), job.facts[0])
    view = attention_view(job.model, fact.prompt, [None, *shown])
    job.rep.text(f"Attention of FP and {', '.join(v.name for v in shown)} on one fact "
                 f"({fact.subject} → {fact.object}"
                 + (f", a Failure fact of {ref.name}" if label.get(fact.id) == "Failure" else "")
                 + f"), layer {view.patterns.layer} (circuitsvis).")
    job.rep.attention(view)


def _figures(job: _Job, stage: Callable[[str], None]) -> None:
    """The cliff, GPTQ vs AWQ, answer ranks, and the logit lens split into Robust / Failure."""
    from mechq.reports import plots

    stage(f"figures; logit lens split into Robust / Failure against {job.ref.name}"
          if job.lens is not None else
          "figures (no logit lens: it needs a 4-bit variant to define Robust / Failure)")
    rep, cliff = job.rep, job.cliff
    rep.heading("1. Performance cliff (paper Fig. 1)")
    rep.table(cliff.table)
    rep.figure(cliff.cliff_fig)
    awq = next((v for v in job.variants if v.method == "awq"), None)
    if awq is not None and job.ref is not None:
        from mechq.analysis.cliff import method_comparison

        comp = method_comparison(cliff.recall, job.ref.name, awq.name)
        comp.to_csv(job.out / "gptq_vs_awq.csv", index=False)
        job.frames["gptq_vs_awq"] = comp
        rep.heading(f"1b. {job.ref.name} vs {awq.name} (paper App. D)")
        rep.text(f"Both at 4 bits on the same calibration; {awq.name} uses group size "
                 f"{awq.group_size} because AWQ's groups must divide every input width "
                 "(mechq.quant.quantize.default_group_size). Counts are over the facts FP gets "
                 "right.")
        rep.table(comp)
    rep.heading("2. Answer rank (paper Fig. 2)")
    rep.figure(cliff.rank_fig)
    rep.figure(plots.top_predictions_figure(plots.top_predictions(cliff.seed0, k=6)))
    if job.lens is not None:
        _lens_section(job)


def _lens_section(job: _Job) -> None:
    """subsets.csv, lens.csv.gz, lens_summary.csv, logit_lens.html and section 3."""
    from mechq.analysis.lens import lens_summary
    from mechq.analysis.recall import subset_labels, subset_sizes
    from mechq.reports import plots

    ref, recall, lens = job.ref.name, job.cliff.recall, job.lens
    sizes = subset_sizes(recall, reference=ref)
    sizes.to_csv(job.out / "subsets.csv", index=False)
    lens["subset"] = lens["fact_id"].map(subset_labels(recall, reference=ref, fp_wrong=None))
    lens.to_csv(job.out / "lens.csv.gz", index=False)
    summ = lens_summary(lens.dropna(subset=["subset"]), ["subset", "variant", "layer"])
    summ.to_csv(job.out / "lens_summary.csv", index=False)
    job.frames["lens_summary"] = summ
    fig = plots.lens_curves(summ, "subset", title=f"Logit lens — {job.name}")
    plots.save_html(fig, job.out / "logit_lens.html")
    job.rep.heading("3. Logit lens, Robust vs Failure (paper Fig. 3)")
    job.rep.text(f"Subsets against {ref}: Robust = FP and {ref} correct, Failure = FP correct, "
                 f"{ref} wrong.")
    job.rep.table(sizes[sizes.relation == "all"])
    job.rep.figure(fig)
    L = job.model.cfg.n_layers
    job.rep.table(summ[summ.layer.isin([L // 2, 2 * L // 3, L - 2, L])][
        ["subset", "variant", "layer", "mean_prob", "median_rank", "top1_share", "n"]])


def _contrast(job: _Job, stage: Callable[[str], None]) -> None:
    """The architecture contrast with ``compare_with``: architectures_*.csv and section 4."""
    from mechq.diagnosis.verdict import N_FACTS
    from mechq.models.load import load_model
    from mechq.reports.architectures import compare_architectures
    from mechq.reports.pages import architecture_section, architecture_setting

    stage(f"architecture contrast: {job.name} vs {', '.join(job.others)}")
    t = time.perf_counter()
    loaded = {job.name: job.model, **{k: m if m is not None else load_model(k, device=job.device)
                                      for k, m in job.others.items()}}
    calib = ({k: v for k, v in job.calib.items() if v is not None} if job.method == "gptq"
             else {})
    comp = compare_architectures(loaded, job.facts, bits=job.bits, method=job.method,
                                 batch_size=min(job.batch_size, 32), progress=job.progress,
                                 **calib)
    comp.save(job.out)
    contrast = architecture_section(job.rep, comp, architecture_setting(job.method, 2, 3, N_FACTS),
                                    number="4.")
    contrast.to_csv(job.out / "architectures_contrast.csv", index=False)
    job.frames["architectures_contrast"] = contrast
    job.echo("      winners: " + "; ".join(f"{k}: {w or 'neither'}"
                                          for k, w in comp.winners.items())
             + f" ({time.perf_counter() - t:.0f} s)")


def _write(job: _Job, stage: Callable[[str], None]) -> None:
    """summary.md (the cliff table, the verdicts, how long it took on what) and report.html."""
    from mechq.analysis.cliff import summary_markdown

    seconds = time.perf_counter() - job.t0
    fs, verdicts = job.facts, job.verdicts
    summary = "\n".join([
        f"# mechq report — {job.name}",
        "",
        f"{len(fs)} facts ({fs.name}), first-token recall. {job.method.upper()} "
        f"g{job.group_size}, calibration {job.calib_source or 'none'}"
        + (f", seeds 0–{job.seeds - 1}" if job.seeds > 1 and job.method == "gptq" else "") + ".",
        "",
        summary_markdown(job.cliff.table),
        "",
        *(["Verdicts (mechq.diagnosis.verdict): " + "; ".join(
            f"{r.variant} **{r.verdict.replace('_', ' ')}**" for r in verdicts.itertuples()) + ".",
           ""] if verdicts is not None else []),
        f"Run took {seconds / 60:.1f} min on {job.machine}.",
        "",
    ])
    (job.out / "summary.md").write_text(summary, encoding="utf-8")
    path = job.rep.write(job.out / "report.html")
    stage(f"wrote {path}, summary.md, figures and CSV frames in {job.out}/ "
          f"({seconds:.0f} s in all)")
    job.result = ReportResult(job.out, job.cliff.recall, job.cliff.table, summary, seconds,
                              job.frames)
