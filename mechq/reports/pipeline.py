"""mechq's main job (``make demo``, ``mechq report``): verdicts, the cliff, answer ranks, lens.

:func:`report` loads a model, quantizes it at several bit widths (each with one or more
calibration seeds), measures recall on a fact set, gives each width's verdict with its evidence
(:mod:`mechq.diagnosis.verdict`), runs the logit lens on the Robust and
Failure facts, and writes one offline HTML report, the figures, the CSV frames and
``summary.md`` (the cliff table with its calibration spread, how long the run took and on what
machine). It prints one line per stage; long stages show a progress bar.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

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
    """CPU model, core count, torch thread count and float32 matmul throughput (or the GPU)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{matmul_gflops():.0f} GFLOP/s float32 matmul{gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def architecture_section(rep, c, setting: str, number: str = "") -> pd.DataFrame:
    """Add the architecture contrast (:class:`mechq.reports.architectures.Comparison` ``c``) to the
    :class:`~mechq.reports.html.Report` ``rep``: the contrast table, the cliff, first-domino,
    single-layer and component figures, the protections and the verdicts. ``setting`` says how it
    was measured; ``number`` prefixes the headings. Returns the contrast table."""
    from mechq.reports import plots
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


def report(
    model="smollm2-135m",
    facts: FactSet | str = "bundled",
    *,
    out: str | Path = "figures",
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
    ``architectures_*.csv``. ``echo`` receives the one-line stage messages (default: print to
    stdout).
    """
    from mechq.models import load as models
    from mechq.reports import plots
    from mechq.analysis.cliff import cliff_requests, summary_markdown
    from mechq.reports.pages import write_cliff
    from mechq.facts import load_fact_source
    from mechq.reports.html import Report
    from mechq.analysis.lens import lens_summary, logit_lens
    from mechq.quant.quantize import quantize_many
    from mechq.analysis.recall import (FP, evaluate_recall, recall_from_lens, subset_labels,
                              subset_sizes)
    from mechq.diagnosis.verdict import N_FACTS, diagnose_many, evidence_table

    echo = echo or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_stages = (6 if diagnose else 5) + (compare_with is not None)
    if compare_with is not None:
        from mechq.reports.architectures import check_settings

        check_settings(tuple(bits), 2, 3, method)  # before any work

    def stage(i: int, text: str) -> None:
        echo(f"[{i}/{n_stages}] {text}")

    name = model if isinstance(model, str) else models.source_of(model).name
    if isinstance(model, str):
        model = models.load_model(model, device=device)
    fs = facts if isinstance(facts, FactSet) else load_fact_source(facts, max_facts)
    if isinstance(facts, FactSet) and max_facts:
        fs = fs.sample(max_facts)
    if len(fs) == 0:
        raise ValueError("report needs at least one fact.")
    stage(1, f"model {name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
             f"{len(fs)} facts ({fs.name}) ({time.perf_counter() - t0:.0f} s)")

    requests = cliff_requests(method, bits, group_size, seeds, seed_bits=seed_bits,
                              calibration=calibration, n_samples=n_samples, seq_len=seq_len)
    if awq:
        from mechq.quant.quantize import Request

        size = {k: v for k, v in dict(n_samples=n_samples, seq_len=seq_len).items() if v}
        requests.append(Request("awq", 4, None, calibration=calibration, **size))
    t = time.perf_counter()

    def started(n_runs: int, logs: str) -> None:
        echo(f"      {n_runs} GPTQ runs (GPTQModel's output goes to {logs}/)")

    per_width = (f"{seeds} calibration seeds" + (
        f" at w{'/'.join(map(str, seed_bits))}, 1 at the others" if seed_bits is not None
        else " per width") if seeds > 1 and method == "gptq" else "1 variant per width")
    stage(2, f"quantize: {method.upper()} w{'/'.join(map(str, bits))} g{group_size}, {per_width}"
             + (" + AWQ w4" if awq else ""))
    variants = quantize_many(model, requests, progress=progress, on_start=started,
                             verbose=verbose)
    calib = next((v.meta.get("calibration_source") for v in variants
                  if v.meta.get("calibration_source")), None)
    echo(f"      {len(variants)} variants ready ({time.perf_counter() - t:.0f} s)")

    # FP, the 4-bit and the 2-bit variant (seed 0) get the logit lens; its last layer is their
    # recall, so they run once. The other variants run recall only.
    ref = next((v for v in variants if v.bits == 4 and not v.meta.get("seed")
                and v.method == method), None)
    low = next((v for v in variants if v.bits == 2 and not v.meta.get("seed")
                and v.method == method), None)
    awq_variant = next((v for v in variants if v.method == "awq"), None)
    lens_variants = [v for v in (ref, low) if v is not None] if ref is not None else []
    others = [v for v in variants if all(v is not w for w in lens_variants)]
    n_lens = len(lens_variants) + 1 if lens_variants else 0
    stage(3, f"recall: {len(fs)} facts × {len(variants) + 1} variants"
             + (f", the logit lens for {n_lens} of them" if n_lens else ""))
    lens = None
    parts = []
    if lens_variants:
        lens = logit_lens(model, fs, lens_variants, batch_size=batch_size, progress=progress)
        parts.append(recall_from_lens(model, fs, lens))
    if others or not lens_variants:
        parts.append(evaluate_recall(model, fs, others, include_fp=not lens_variants,
                                     batch_size=batch_size, progress=progress))
    order = [FP] + [v.name for v in variants]
    recall = pd.concat(parts, ignore_index=True)
    recall = (recall.assign(_o=recall["variant"].map({n: i for i, n in enumerate(order)}))
              .sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True))
    res = write_cliff(recall, variants, out, title=f"Performance cliff — {name}")
    recall, per_variant, table, seed0 = res.recall, res.per_variant, res.table, res.seed0
    cliff_fig, rank_fig = res.cliff_fig, res.rank_fig

    frames = {"accuracy": per_variant}
    machine = machine_description()
    rep = Report(f"mechq report — {name}")
    rep.text(f"{len(fs)} facts ({fs.name}); {method.upper()} group size {group_size}; "
             f"calibration: {calib or 'none (RTN)'}"
             + (f", seeds 0–{seeds - 1} (the seed range is the red bar)" if seeds > 1 else "")
             + ". Machine: " + machine + ".", note=True)
    verdicts = None
    if diagnose:
        first_seed = [v for v in variants if not v.meta.get("seed")]
        stage(4, f"diagnose: verdicts for {', '.join(v.name for v in first_seed)} on "
                 f"up to {min(N_FACTS, len(fs))} FP-correct facts")
        t = time.perf_counter()
        diags = diagnose_many(model, first_seed, fs, batch_size=min(batch_size, 32))
        evidence = evidence_table(diags)
        evidence.to_csv(out / "evidence.csv", index=False)
        verdicts = pd.DataFrame([dict(variant=d.variant, verdict=d.verdict, reason=d.reason)
                                 for d in diags])
        frames["verdicts"], frames["evidence"] = verdicts, evidence
        echo("      " + "; ".join(f"{d.variant}: {d.verdict.replace('_', ' ')}"
                                   for d in diags) + f" ({time.perf_counter() - t:.0f} s)")
        rep.heading("0. Verdict (paper §4.3): healthy, signal degradation, computation "
                    "collapse, or a format bug")
        rep.text("Each signature is measured on the same FP-correct facts; thresholds are named "
                 "constants in mechq.diagnosis.verdict, with the measurements they come from.")
        rep.table(verdicts)
        rep.table(evidence)
        shown = [v for v in (ref, low) if v is not None]
        if shown:
            from mechq.reports.attention import attention_view

            label = subset_labels(recall, reference=ref.name) if ref is not None else {}
            fact = next((f for f in fs if label.get(f.id) == "Failure"), None) or next(
                (f for f in fs if label.get(f.id) == "Robust"), fs[0])
            view = attention_view(model, fact.prompt, [None, *shown])
            rep.text(f"Attention of FP and {', '.join(v.name for v in shown)} on one fact "
                     f"({fact.subject} → {fact.object}"
                     + (f", a Failure fact of {ref.name}" if label.get(fact.id) == "Failure"
                        else "") + f"), layer {view.patterns.layer} (circuitsvis).")
            rep.attention(view)
    rep.heading("1. Performance cliff (paper Fig. 1)")
    rep.table(table)
    rep.figure(cliff_fig)
    if awq_variant is not None and ref is not None:
        from mechq.analysis.cliff import method_comparison

        comp = method_comparison(recall, ref.name, awq_variant.name)
        comp.to_csv(out / "gptq_vs_awq.csv", index=False)
        frames["gptq_vs_awq"] = comp
        rep.heading(f"1b. {ref.name} vs {awq_variant.name} (paper App. D)")
        rep.text(f"Both at 4 bits on the same calibration; {awq_variant.name} uses group size "
                 f"{awq_variant.group_size} because AWQ's groups must divide every input width "
                 "(mechq.quant.quantize.default_group_size). Counts are over the facts FP gets "
                 "right.")
        rep.table(comp)
    rep.heading("2. Answer rank (paper Fig. 2)")
    rep.figure(rank_fig)
    rep.figure(plots.top_predictions_figure(plots.top_predictions(seed0, k=6)))

    if lens is not None:
        stage(n_stages - 1, f"figures; logit lens split into Robust / Failure against {ref.name}")
        sizes = subset_sizes(recall, reference=ref.name)
        sizes.to_csv(out / "subsets.csv", index=False)
        lens["subset"] = lens["fact_id"].map(subset_labels(recall, reference=ref.name,
                                                           fp_wrong=None))
        lens.to_csv(out / "lens.csv.gz", index=False)
        summ = lens_summary(lens.dropna(subset=["subset"]), ["subset", "variant", "layer"])
        summ.to_csv(out / "lens_summary.csv", index=False)
        frames["lens_summary"] = summ
        fig = plots.lens_curves(summ, "subset", title=f"Logit lens — {name}")
        plots.save_html(fig, out / "logit_lens.html")
        rep.heading("3. Logit lens, Robust vs Failure (paper Fig. 3)")
        rep.text(f"Subsets against {ref.name}: Robust = FP and {ref.name} correct, Failure = FP "
                 f"correct, {ref.name} wrong.")
        rep.table(sizes[sizes.relation == "all"])
        rep.figure(fig)
        L = model.cfg.n_layers
        rep.table(summ[summ.layer.isin([L // 2, 2 * L // 3, L - 2, L])][
            ["subset", "variant", "layer", "mean_prob", "median_rank", "top1_share", "n"]])
    else:
        stage(n_stages - 1, "figures (no logit lens: it needs a 4-bit variant to define Robust / Failure)")

    if compare_with is not None:
        from mechq.reports.architectures import compare_architectures

        others = ({compare_with: None} if isinstance(compare_with, str) else dict(compare_with))
        if name in others:
            raise ValueError(f"compare_with names the report's own model {name!r}.")
        stage(n_stages - 1, f"architecture contrast: {name} vs {', '.join(others)}")
        t = time.perf_counter()
        loaded = {name: model, **{k: m if m is not None else models.load_model(k, device=device)
                                  for k, m in others.items()}}
        calib_kw = ({k: v for k, v in dict(calibration=calibration, n_samples=n_samples,
                                           seq_len=seq_len).items() if v is not None}
                    if method == "gptq" else {})
        comp = compare_architectures(loaded, fs, bits=bits, method=method,
                                     batch_size=min(batch_size, 32), progress=progress,
                                     **calib_kw)
        comp.save(out)
        contrast = architecture_section(
            rep, comp, architecture_setting(method, 2, 3, N_FACTS), number="4.")
        contrast.to_csv(out / "architectures_contrast.csv", index=False)
        frames["architectures_contrast"] = contrast
        echo("      winners: " + "; ".join(f"{k}: {w or 'neither'}"
                                          for k, w in comp.winners.items())
             + f" ({time.perf_counter() - t:.0f} s)")

    seconds = time.perf_counter() - t0
    summary = "\n".join([
        f"# mechq report — {name}",
        "",
        f"{len(fs)} facts ({fs.name}), first-token recall. {method.upper()} g{group_size}, "
        f"calibration {calib or 'none'}"
        + (f", seeds 0–{seeds - 1}" if seeds > 1 and method == "gptq" else "") + ".",
        "",
        summary_markdown(table),
        "",
        *(["Verdicts (mechq.diagnosis.verdict): " + "; ".join(
            f"{r.variant} **{r.verdict.replace('_', ' ')}**" for r in verdicts.itertuples()) + ".",
           ""] if verdicts is not None else []),
        f"Run took {seconds / 60:.1f} min on {machine}.",
        "",
    ])
    (out / "summary.md").write_text(summary, encoding="utf-8")
    path = rep.write(out / "report.html")
    stage(n_stages, f"wrote {path}, summary.md, figures and CSV frames in {out}/ "
             f"({seconds:.0f} s in all)")
    return ReportResult(out, recall, table, summary, seconds, frames)

