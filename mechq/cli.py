"""The ``mechq`` command line.

    mechq report     the main job (make demo): verdicts + cliff + answer ranks + lens -> report.html
    mechq cliff      GPTQ/RTN at several bit widths -> recall table + performance_cliff.html
    mechq recall     recall, answer ranks, top-1 tokens and Robust/Failure subsets
    mechq lens       logit lens per layer, FP vs variants, Robust/Failure side by side
    mechq components attention entropy / JSD, FFN sign flips / Jaccard / value cosine (§4.1)
    mechq representation  CKA layer x layer, activation and error subspaces (§4.2)
    mechq patch      FP->variant activation patching and zero ablation heatmaps (§3.4)
    mechq sensitivity  first domino, single layers, component table, signal injection (§4.3)
    mechq diagnose   healthy / signal degradation / computation collapse / format bug, with evidence
    mechq quantize   make (or find in the cache) one variant and print its checkpoint path

Variants are named as mechq names them: ``gptq-w4g128``, ``rtn-w2g128``, ``gptq-w3`` (group
size 128 by default), with ``-asym`` / ``-act`` suffixes, or a path to a GPTQ checkpoint.
Facts: ``bundled``, a facts CSV, or ``pararel[:P36,P103]`` (the Pararel dev copy or
``$MECHQ_PARAREL``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from mechq.facts.calibration import AWQ_N_SAMPLES, AWQ_SEQ_LEN, N_SAMPLES, SEQ_LEN

SPEC = re.compile(r"^(gptq|rtn|awq)-w(\d+)(?:g(-?\d+))?((?:-asym|-act)*)(?:-s(\d+))?$")


AWQ_HELP = ("add an AWQ w4 variant (GPTQModel, GEMM format, the model's default group size: the "
            "largest of 128/64/32 dividing every input width, 64 on SmolLM2) on the same "
            "calibration; about 30 min on SmolLM2 on 2 cores")


def parse_variant(spec: str) -> dict:
    """``gptq-w4g128-asym-s1`` -> dict(method, bits, group_size, sym, desc_act, seed). Without
    ``gGROUP`` the group size is 128 for GPTQ / RTN and ``None`` (the model's default) for AWQ."""
    m = SPEC.match(spec)
    if not m:
        raise argparse.ArgumentTypeError(
            f"bad variant {spec!r}: use METHOD-wBITS[gGROUP][-asym][-act][-sSEED], e.g. "
            "gptq-w4g128, gptq-w4g128-s1 (calibration seed 1) or awq-w4g64, or a path to a "
            "GPTQ, AWQ or compressed-tensors checkpoint directory")
    method, bits, gs, flags, seed = m.groups()
    default = None if method == "awq" else 128
    return dict(method=method, bits=int(bits), group_size=int(gs) if gs else default,
                sym="-asym" not in flags, desc_act="-act" in flags, seed=int(seed or 0))


def _calib_kw(args) -> dict:
    return dict(calibration=args.calibration, n_samples=args.calib_samples,
                seq_len=args.calib_len)


def _gptq_log_note(n: int, logs: str) -> None:
    print(f"  {n} GPTQ run{'s' if n > 1 else ''}; GPTQModel's output goes to {logs}/",
          flush=True)


def load_variants(model, specs: list[str], args) -> list:
    """Variants named on the command line: checkpoint directories, or names made (in parallel)
    or read from the cache."""
    import mechq
    from mechq.quant.quantize import Request, quantize_many

    named = [(i, s) for i, s in enumerate(specs) if not Path(s).is_dir()]
    made = quantize_many(model, [Request(**parse_variant(s), **_calib_kw(args)) for _, s in named],
                         on_start=_gptq_log_note, verbose=args.verbose)
    out = {i: v for (i, _), v in zip(named, made)}
    for i, s in enumerate(specs):
        if i not in out:
            out[i] = mechq.load_variant(s, model=model)
    return [out[i] for i in range(len(specs))]


def _prepare(args):
    import mechq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mechq.load_model(args.model, device=args.device)
    from mechq.facts import load_fact_source

    facts = load_fact_source(args.facts, args.max_facts, args.seed)
    print(f"model {args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
          f"facts: {facts!r}", flush=True)
    return out, model, facts


def _table(df, cols=None) -> str:
    return (df[cols] if cols else df).to_string(index=False, float_format=lambda x: f"{x:.3f}")


ACC_COLS = ["variant", "accuracy", "ci_low", "ci_high", "n_correct", "n", "median_rank",
            "mean_target_prob"]


def cmd_cliff(args) -> int:
    """Recall of FP vs quantized variants at several bit widths (paper Fig. 1), with the
    calibration spread when --calib-seeds > 1."""
    import mechq
    from mechq.analysis.cliff import cliff_requests, summary_markdown
    from mechq.reports.pages import write_cliff
    from mechq.quant.quantize import Request, quantize_many

    t0 = time.perf_counter()
    out, model, facts = _prepare(args)
    requests = cliff_requests(args.method, args.bits, args.group_size, args.calib_seeds,
                              seed_bits=args.seed_bits, sym=not args.asym,
                              desc_act=args.desc_act, **_calib_kw(args))
    if args.awq:
        requests.append(Request("awq", 4, None, **_calib_kw(args)))
    variants = quantize_many(model, requests, on_start=_gptq_log_note, verbose=args.verbose)
    recall = mechq.evaluate_recall(model, facts, variants, batch_size=args.batch_size)
    res = write_cliff(recall, variants, out,
                      title=f"Performance cliff — {args.model}, {args.method.upper()} "
                            f"g{variants[0].group_size}, {len(facts)} facts")
    recall, table = res.recall, res.table
    path = out / "performance_cliff.html"
    print("\n" + summary_markdown(table))
    kinds = recall[recall.variant == "fp"]["target_kind"].value_counts().to_dict()
    print(f"\ntarget tokens: {kinds} (column target_kind of recall.csv)")
    print(f"wrote {path} and answer_rank.html, recall.csv, accuracy.csv, cliff.csv in {out} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_recall(args) -> int:
    """Recall, answer-rank distribution, top-1 tokens and Robust/Failure subsets (§3.2)."""
    import mechq
    from mechq.reports import plots
    from mechq.analysis.recall import accuracy, subset_sizes

    out, model, facts = _prepare(args)
    variants = load_variants(model, args.variants, args)
    recall = mechq.evaluate_recall(model, facts, variants, batch_size=args.batch_size)
    recall.to_csv(out / "recall.csv", index=False)
    acc = accuracy(recall)
    acc.to_csv(out / "accuracy.csv", index=False)
    top = plots.top_predictions(recall)
    top.to_csv(out / "top_predictions.csv", index=False)
    plots.save_html(plots.rank_ecdf(recall), out / "answer_rank.html")
    plots.save_html(plots.top_predictions_figure(top), out / "top_predictions.html")
    print("\n" + _table(acc, ACC_COLS))
    if variants:
        ref = args.reference or variants[0].name
        sizes = subset_sizes(recall, reference=ref)
        sizes.to_csv(out / "subsets.csv", index=False)
        print(f"\nsubsets (reference {ref}):\n" + _table(sizes[sizes.relation == "all"]))
    print("\nmost frequent wrong top-1 tokens:")
    for v, g in top.groupby("variant", sort=False):
        print(f"  {v}: " + ", ".join(f"{t!r} {s:.0%}" for t, s in zip(g.top1, g.share)))
    print(f"wrote {out}")
    return 0


def cmd_lens(args) -> int:
    """Logit lens per layer at the last token, per variant and Robust/Failure subset (§3.3)."""
    from mechq.reports import plots
    from mechq.analysis.lens import lens_summary, logit_lens
    from mechq.analysis.recall import subset_labels

    out, model, facts = _prepare(args)
    variants = load_variants(model, args.variants, args)
    lens = logit_lens(model, facts, variants, batch_size=args.batch_size)
    recall = lens[lens.layer == model.cfg.n_layers].assign(correct=lambda d: d.target_rank == 1)
    subset_col = None
    if variants:
        ref = args.reference or variants[0].name
        label = subset_labels(recall, reference=ref)
        lens["subset"] = lens["fact_id"].map(label)
        subset_col = "subset"
        _print_subsets(ref, label)
    lens.to_csv(out / "lens.csv.gz", index=False)
    by = ([subset_col] if subset_col else []) + ["variant", "layer"]
    summ = lens_summary(lens, by)
    summ.to_csv(out / "lens_summary.csv", index=False)
    if subset_col:
        summ = summ[summ[subset_col].isin(["Robust", "Failure"])]
    fig = plots.lens_curves(summ, subset_col, title=f"Logit lens — {args.model}")
    plots.save_html(fig, out / "logit_lens.html")
    mid = model.cfg.n_layers * 2 // 3
    show = summ[summ.layer.isin([mid, model.cfg.n_layers])]
    print("\n" + _table(show, by + ["mean_prob", "median_rank", "top1_share", "n"]))
    print(f"wrote {out / 'logit_lens.html'}, lens.csv.gz, lens_summary.csv")
    return 0


def cmd_report(args) -> int:
    """The main job: cliff at several bit widths, answer ranks, logit lens, one HTML report."""
    import mechq

    res = mechq.report(args.model, args.facts, out=args.out, method=args.method, bits=args.bits,
                       group_size=args.group_size, seeds=args.calib_seeds,
                       seed_bits=args.seed_bits,
                       max_facts=args.max_facts, batch_size=args.batch_size, device=args.device,
                       verbose=args.verbose, diagnose=not args.no_diagnose, awq=args.awq,
                       compare_with=args.compare_with, **_calib_kw(args))
    print("\n" + res.summary.split("\n", 2)[2].strip())
    return 0


def _subset_labels(model, facts, variants, args) -> dict[str, str] | None:
    """fact_id -> "Robust" / "Failure" against the reference variant (None without variants)."""
    import mechq
    from mechq.analysis.recall import subset_labels

    if not variants:
        return None
    ref = args.reference or variants[0].name
    ref_v = [v for v in variants if v.name == ref]
    if not ref_v:
        raise SystemExit(f"--reference {ref} is not among the variants")
    recall = mechq.evaluate_recall(model, facts, ref_v, progress=False)
    label = subset_labels(recall, reference=ref)
    _print_subsets(ref, label)
    return label


def _print_subsets(ref: str, label: dict) -> None:
    n = {k: list(label.values()).count(k) for k in ("Robust", "Failure")}
    print(f"subsets (reference {ref}): Robust {n['Robust']}, Failure {n['Failure']}")


def _finish(rep, heading: str, show, path: Path, frames: str) -> int:
    """Close a diagnostics report with its summary table, print it, write the HTML."""
    rep.heading(heading)
    rep.table(show.reset_index())
    rep.write(path)
    print("\n" + show.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {path}, {frames}")
    return 0


def cmd_components(args) -> int:
    """Attention and FFN diagnostics per layer at the last subject token and last token."""
    from mechq.reports import plots
    from mechq.analysis.components import METRICS, component_metrics, component_summary
    from mechq.reports.html import Report

    out, model, facts = _prepare(args)
    variants = load_variants(model, args.variants, args)
    df = component_metrics(model, facts, variants, batch_size=args.batch_size)
    labels = _subset_labels(model, facts, variants, args)
    df["subset"] = df["fact_id"].map(labels) if labels else "all"
    df.to_csv(out / "components.csv.gz", index=False)
    summ = component_summary(df)
    summ.to_csv(out / "components_summary.csv", index=False)
    summ_sub = component_summary(df, by="subset")
    summ_sub.to_csv(out / "components_by_subset.csv", index=False)
    rep = Report(f"Component diagnostics — {args.model}")
    rep.text("Definitions are in mechq.analysis.components (the paper publishes no code).", note=True)
    for metric in METRICS:
        rep.heading(metric)
        rep.figure(plots.component_lines(summ, metric))
    L = model.cfg.n_layers
    show = summ[summ.layer.isin([1, L // 2, L - 1])].pivot_table(
        index=["metric", "position", "layer"], columns="variant", values="mean")
    return _finish(rep, "Means at early / middle / late layers", show, out / "components.html",
                   "components.csv.gz, components_summary.csv")


def cmd_representation(args) -> int:
    """Linear CKA (layer x layer) and subspace similarity / error alignment per layer."""
    from mechq.reports import plots
    from mechq.reports.html import Report
    from mechq.analysis.representation import cka_diagonal, representation_metrics

    out, model, facts = _prepare(args)
    variants = load_variants(model, args.variants, args)
    rep_ = representation_metrics(model, facts, variants, batch_size=args.batch_size,
                                  energy=args.energy)
    rep_.cka.to_csv(out / "cka.csv.gz", index=False)
    rep_.subspace.to_csv(out / "subspace.csv", index=False)
    rep = Report(f"Representation diagnostics — {args.model}")
    rep.text(f"Linear CKA on prompt-centred activations; subspaces keep {args.energy:.0%} of "
             "the FP spectral energy (mechq.analysis.representation).", note=True)
    for stream in dict.fromkeys(rep_.cka["stream"]):
        for pos in dict.fromkeys(rep_.cka["position"]):
            rep.heading(f"CKA {stream} at {pos}")
            rep.figure(plots.cka_heatmaps(rep_.cka, stream=stream, position=pos))
    for pos in dict.fromkeys(rep_.subspace["position"]):
        rep.heading(f"Subspaces at {pos}")
        rep.figure(plots.subspace_lines(rep_.subspace, position=pos))
    diag = cka_diagonal(rep_.cka)
    L = model.cfg.n_layers
    show = diag[diag.layer.isin([1, L // 2, L - 1])].pivot_table(
        index=["stream", "position", "layer"], columns="variant", values="cka")
    return _finish(rep, "CKA diagonal at early / middle / late layers", show,
                   out / "representation.html", "cka.csv.gz, subspace.csv")


SUBSETS = ("fp-correct", "failure", "robust", "all")


def _choose_facts(model, facts, variants, args):
    """Facts to analyse (``--subset``) and their Robust/Failure label against ``--reference``.

    Subsets are defined as in §3.2 against the reference variant (default: the first one given,
    e.g. the 4-bit one): Robust = FP and reference correct, Failure = FP correct, reference wrong.
    Facts FP gets wrong are labelled "FP wrong" (analysed only with ``--subset all``).
    """
    label = _subset_labels(model, facts, variants, args) or {}
    keep = {"fp-correct": ("Robust", "Failure"), "failure": ("Failure",),
            "robust": ("Robust",), "all": None}[args.subset]
    chosen = [f for f in facts if keep is None or label.get(f.id) in keep]
    if not chosen:
        raise SystemExit(f"no facts in subset {args.subset!r} (of {len(facts)}); "
                         "try --subset all or more facts")
    print(f"analysing {len(chosen)} facts (--subset {args.subset})", flush=True)
    return chosen, label


def _prepare_analysis(args):
    """Model, facts and variants of ``mechq patch`` / ``mechq sensitivity``, plus the facts to
    analyse (a FactSet) and every fact's subset label."""
    from mechq.facts import FactSet

    out, model, facts = _prepare(args)
    variants = load_variants(model, args.variants, args)
    if not variants:
        raise SystemExit(f"mechq {args.command} needs at least one variant (--variants)")
    chosen, label = _choose_facts(model, facts, variants, args)
    return out, model, facts, variants, FactSet(chosen, name=f"{facts.name}:{args.subset}"), label


def cmd_patch(args) -> int:
    """Activation patching FP -> variant (sufficiency) and zero ablation (necessity), §3.4."""
    from mechq.reports import plots
    from mechq.reports.html import Report
    from mechq.analysis.patching import by_third, run_patching

    out, model, _, variants, chosen, label = _prepare_analysis(args)
    res = run_patching(model, chosen, variants, activations=args.activations, modes=args.modes,
                       fp_ablation=not args.no_fp_ablation, labels=label, out=out,
                       layers=args.layers, positions=args.positions, memory_mb=args.memory_mb)
    L = model.cfg.n_layers
    rep = Report(f"Activation patching — {args.model}")
    rep.text(f"{len(chosen)} facts (--subset {args.subset}); positions {args.positions}. "
             "restored = share of the FP-vs-unpatched target-probability gap that patching the "
             "FP activation closes; mean_delta = patched minus unpatched target probability "
             "(definitions in mechq.engine.patching).", note=True)
    shows = []
    for (activation, mode), g in res.heatmap.groupby(["activation", "mode"], sort=False):
        value = "restored" if mode == "fp_to_variant" else "mean_delta"
        rep.heading(f"{activation} · {mode} ({value})")
        fig = plots.patching_heatmap(g, value=value, title=f"{activation}, {mode}: {value}")
        name = f"patching_{activation}_{mode}.html"
        plots.save_html(fig, out / name)
        rep.figure(fig)
        show = by_third(g, value, L, lowest=(mode == "zero"))
        rep.table(show.reset_index())
        shows.append((f"{activation} · {mode}: {value}", show))
    rep.write(out / "patching.html")
    for title, show in shows:
        print(f"\n{title} (mean over early / middle / late layers, and the strongest)")
        print(show.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out / 'patching.html'}, patching.csv, patching_heatmap.csv")
    return 0


def cmd_sensitivity(args) -> int:
    """First domino, single-layer sweep, component table and signal injection (§4.3)."""
    from mechq.reports import plots
    from mechq.analysis import sensitivity as sens
    from mechq.reports.html import Report

    out, model, _, variants, chosen, label = _prepare_analysis(args)
    injection = {}
    if "injection" in args.analyses:
        low = variants[-1] if args.injection_low is None else load_variants(
            model, [args.injection_low], args)[0]
        highs = [None if h == "fp" else (next((v for v in variants if v.name == h), None)
                                         or load_variants(model, [h], args)[0])
                 for h in args.injection_high]
        injection = dict(injection_high=highs, injection_low=low, injection_ks=args.injection_ks)
    res = sens.run_sensitivity(model, chosen, variants, analyses=args.analyses, labels=label,
                               out=out, batch_size=args.batch_size, **injection)
    rep = Report(f"Layer and component sensitivity — {args.model}")
    rep.text(f"{len(chosen)} facts (--subset {args.subset}); Robust / Failure against "
             f"{args.reference or variants[0].name}. Definitions in mechq.analysis.sensitivity.",
             note=True)
    curves = {  # per-layer accuracy curves: file stem, layer column, heading, title, x axis
        "domino": ("first_domino", "k", "First domino: layers 0…k quantized, the rest FP "
                   "(paper Fig. 10, Table 2)", "First domino", "k (last quantized layer)"),
        "single": ("single_layer", "layer", "Single-layer quantization: only layer l "
                   "quantized (paper Fig. 22–23)", "Single layer quantized", "quantized layer"),
    }
    for name, a in res.items():
        if name in curves:
            stem, key, heading, title, xaxis_title = curves[name]
            rep.heading(heading)
            for v, g in a.frame.groupby("variant", sort=False):
                fig = plots.first_domino_curve(g.rename(columns={key: "k"}), color="subset",
                                               title=f"{title} — {v}", xaxis_title=xaxis_title)
                plots.save_html(fig, out / f"{stem}_{v}.html")
                rep.figure(fig)
        elif name == "components":
            rep.heading("Component sensitivity: one component quantized in every layer "
                        "(Table 5)")
        else:
            rep.heading(f"Signal injection: first k layers at high precision, the rest "
                        f"{injection['injection_low'].name} (paper Fig. 12, 24)")
            for h, g in a.frame.groupby("high", sort=False):
                fig = plots.injection_curves(g)
                plots.save_html(fig, out / f"signal_injection_{h}.html")
                rep.figure(fig)
        rep.table(a.table.reset_index())
    rep.write(out / "sensitivity.html")
    for a in res.values():
        print(f"\n{a.title}\n" + a.table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out / 'sensitivity.html'} and its CSV frames")
    return 0


def _attention_section(rep, model, facts, v, lens) -> None:
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


def cmd_diagnose(args) -> int:
    """The verdict on one variant, with its evidence table and the frames behind it (§4.3)."""
    from mechq.reports import plots
    from mechq.diagnosis.verdict import STEP_ERROR, diagnose
    from mechq.reports.html import Report
    from mechq.analysis.lens import lens_summary

    out, model, facts = _prepare(args)
    if args.repair and Path(args.variant).is_dir():
        raise ValueError("--repair quantizes the base again with repair rules: give a variant "
                         "name (e.g. gptq-w4g128), not a checkpoint directory.")
    (v,) = load_variants(model, [args.variant], args)
    d = diagnose(model, v, facts, n_facts=args.n_facts, batch_size=args.batch_size)
    d.evidence.to_csv(out / "evidence.csv", index=False)
    d.weights.to_csv(out / "weight_signatures.csv", index=False)
    rep = Report(f"mechq diagnose — {v.name} on {args.model}")
    rep.heading(f"Verdict: {d.verdict.replace('_', ' ')}")
    rep.text(d.reason)
    rep.table(d.evidence)
    rep.heading("Weight space: each module's error in quantization steps")
    rep.figure(plots.weight_signature_lines(d.weights, threshold=STEP_ERROR))
    lens = d.frames["lens"]
    rep.heading("Logit lens on the facts diagnosed (FP vs the variant)")
    rep.figure(plots.lens_curves(lens_summary(lens), None, title="Logit lens"))
    _attention_section(rep, model, facts, v, lens)
    if args.repair:
        from mechq.quant.quantize import Request
        from mechq.repair.table import repair_summary, repair_table

        base = Request(**parse_variant(args.variant), **_calib_kw(args))
        res = repair_table(model, [base], facts, batch_size=args.batch_size)
        res.table.to_csv(out / "repairs.csv", index=False)
        rep.heading("Repairs (held-out facts; accuracy in % by the base's subsets)")
        rep.text(repair_summary(res.table))
        rep.table(res.wide(), floatfmt="{:.1f}")
        rep.figure(plots.repair_pareto(res.table))
        print(res.wide().T.to_string(float_format=lambda x: f"{x:.1f}"))
        print(repair_summary(res.table))
    path = rep.write(out / "diagnose.html")
    print(f"\nverdict: {d.verdict} — {d.reason}\n")
    print(d.evidence.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {path}, evidence.csv, weight_signatures.csv")
    return 0


def cmd_recipe(args) -> int:
    """Search the protection repairs of a base variant within a bit budget; write recipe.json."""
    import mechq
    from mechq.facts import load_fact_source
    from mechq.quant.quantize import Request
    from mechq.repair.recipe import check_recipe, make_recipe, write_recipe

    if Path(args.variant).is_dir():
        raise ValueError("recipe quantizes the base again with each candidate's rules: give a "
                         "variant name (e.g. gptq-w4g128), not a checkpoint directory.")
    base = Request(**parse_variant(args.variant), **_calib_kw(args))
    model = mechq.load_model(args.model, device=args.device)
    facts = load_fact_source(args.facts, args.max_facts, args.seed)
    r = make_recipe(model, base, args.budget, facts, batch_size=args.batch_size)
    path = write_recipe(r, args.out)
    e, a = r["expected"], r["amplification"]
    print(f"recipe: {r['repair']} at {r['avg_bits']:.3f} bits per weight "
          f"(budget {r['budget']}); expected held-out accuracy {100 * e['accuracy']:.1f} % "
          f"(baseline {100 * e['baseline_accuracy']:.1f} %, {e['n_facts']} facts); "
          f"amplification alpha={a['alpha']:g}")
    if args.check:
        c = check_recipe(model, r, facts)
        print(f"re-quantized from the JSON: {100 * c['measured']:.1f} % measured vs "
              f"{100 * c['expected']:.1f} % expected ({c['variant']})")
    print(f"wrote {path}")
    return 0


def cmd_compare_architectures(args) -> int:
    """Two (or more) model families side by side: cliff, first domino, single layers,
    components, which protection wins, and what diagnose recommends (paper Fig. 10, Fig. 22)."""
    import mechq
    from mechq.reports.architectures import check_settings, compare_architectures
    from mechq.facts import load_fact_source
    from mechq.reports.html import Report
    from mechq.reports.pipeline import architecture_section, architecture_setting

    check_settings(tuple(args.bits), args.sweep_bits, args.protect_bits, args.method)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = load_fact_source(args.facts, args.max_facts, args.seed)
    models = {}
    for name in args.models:
        models[name] = mechq.load_model(name, device=args.device)
        cfg = models[name].cfg
        print(f"model {name}: {cfg.n_layers} layers, d_model {cfg.d_model}", flush=True)
    calib = {k: v for k, v in dict(n_samples=args.calib_samples, seq_len=args.calib_len).items()
             if v is not None}
    c = compare_architectures(models, facts, bits=args.bits, sweep_bits=args.sweep_bits,
                              protect_bits=args.protect_bits, n_facts=args.n_facts,
                              batch_size=args.batch_size, method=args.method, **calib)
    c.save(out)
    rep = Report("mechq compare-architectures — " + " vs ".join(args.models))
    table = architecture_section(rep, c, architecture_setting(args.method, args.sweep_bits,
                                                              args.protect_bits, args.n_facts))
    table.to_csv(out / "architectures_contrast.csv", index=False)
    path = rep.write(out / "architectures.html")
    _write_run_record(out / "architectures_run.json", args, time.perf_counter() - t0)
    print(table.T.to_string())
    print(f"wrote {path} and architectures_*.csv")
    return 0


def _write_run_record(path: Path, args, seconds: float) -> None:
    """How a result folder was made: the command's settings, mechq's version, the machine and
    how long it took (so a saved result can say where it came from)."""
    import json

    from mechq import __version__
    from mechq.reports.pipeline import machine_description

    settings = {k: v for k, v in vars(args).items() if k != "func"}
    path.write_text(json.dumps(dict(command=f"mechq {args.command}", settings=settings,
                                    mechq=__version__, machine=machine_description(),
                                    minutes=round(seconds / 60, 1)), indent=1) + "\n")


def cmd_quantize(args) -> int:
    """Quantize a model and print where the (cached) checkpoint lives."""
    import mechq

    model = mechq.load_model(args.model, device=args.device)
    (v,) = load_variants(model, [args.variant], args)
    print(v)
    print(v.meta.get("path"))
    if args.ct_out:
        from mechq.quant.formats.compressed import write_compressed_tensors

        print(write_compressed_tensors(v, args.ct_out, model=model))
    return 0


def _common(p: argparse.ArgumentParser, facts: bool = True, out: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded), tiny-gpt2, a local HF directory or a hub id")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    if out:
        p.add_argument("--out", default="figures", help="output folder for frames and figures")
    p.add_argument("--verbose", action="store_true",
                   help="show GPTQModel's output live (it always goes to a log file too)")
    p.add_argument("--calibration", default=None,
                   help="GPTQ calibration: bundled (default: mechq's shipped text), sampled "
                        "(drawn from the model), a text file, or dataset:NAME[:CONFIG]")
    p.add_argument("--calib-samples", type=int, default=None,
                   help=f"calibration: number of sequences (default {N_SAMPLES} for GPTQ, "
                        f"{AWQ_N_SAMPLES} for AWQ)")
    p.add_argument("--calib-len", type=int, default=None,
                   help=f"tokens per calibration sequence (default {SEQ_LEN} for GPTQ, "
                        f"{AWQ_SEQ_LEN} for AWQ)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --max-facts sampling (a variant's calibration seed is in its "
                        "name: gptq-w4g128-s1)")
    if facts:
        p.add_argument("--facts", default="bundled",
                       help="bundled | a facts CSV | pararel[:P36,P103]")
        p.add_argument("--max-facts", type=int, default=None, help="sample this many facts")
        p.add_argument("--batch-size", type=int, default=32)


def _analysis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", nargs="+", default=["gptq-w4g128", "gptq-w2g128"],
                   help="variant names (gptq-w4g128, rtn-w2g128 ...) or checkpoint dirs")
    p.add_argument("--reference", default=None,
                   help="variant defining Robust/Failure (default: the first)")
    p.add_argument("--subset", choices=SUBSETS, default="fp-correct",
                   help="facts analysed: FP-correct (Robust + Failure, default), one of "
                        "them, or all")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mechq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="main job: cliff + ranks + lens -> report.html")
    _common(p)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--awq", action="store_true", help=AWQ_HELP)
    p.add_argument("--calib-seeds", type=int, default=1,
                   help="calibration seeds per bit width (GPTQ): the cliff shows their range")
    p.add_argument("--seed-bits", type=int, nargs="+", default=None,
                   help="give the extra calibration seeds only to these bit widths")
    p.add_argument("--no-diagnose", action="store_true",
                   help="skip the verdicts (about a minute per bit width on SmolLM2, 2 cores)")
    p.add_argument("--compare-with", default=None, metavar="MODEL",
                   help="add the architecture contrast with another model (e.g. gemma-3-270m): "
                        "what compare-architectures measures, as a section of the report "
                        "(needs 3 and 2 among --bits; about an hour on 2 cores for SmolLM2 vs "
                        "Gemma with GPTQ)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("cliff", help="recall of FP vs bit widths (paper Fig. 1)")
    _common(p)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--awq", action="store_true", help=AWQ_HELP)
    p.add_argument("--asym", action="store_true", help="asymmetric quantization")
    p.add_argument("--desc-act", action="store_true", help="GPTQ activation order")
    p.add_argument("--calib-seeds", type=int, default=1,
                   help="calibration seeds per bit width (GPTQ): the cliff shows their range")
    p.add_argument("--seed-bits", type=int, nargs="+", default=None,
                   help="give the extra calibration seeds only to these bit widths")
    p.set_defaults(func=cmd_cliff)
    for name, func, helptext in [
        ("recall", cmd_recall, "recall, answer ranks, top-1 tokens, subsets (§3.2)"),
        ("lens", cmd_lens, "logit lens per layer, Robust vs Failure (§3.3)"),
        ("components", cmd_components, "attention and FFN diagnostics per layer (§4.1)"),
        ("representation", cmd_representation, "CKA and SVD subspaces per layer (§4.2)"),
    ]:
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("--variants", nargs="*", default=["gptq-w4g128", "gptq-w2g128"],
                       help="variant names (gptq-w4g128, rtn-w2g128 ...) or checkpoint dirs")
        p.add_argument("--reference", default=None,
                       help="variant defining Robust/Failure (default: the first)")
        if name == "representation":
            p.add_argument("--energy", type=float, default=0.9,
                           help="share of FP spectral energy the top-k subspace keeps")
        p.set_defaults(func=func)
    p = sub.add_parser("patch", help="FP->variant activation patching, zero ablation (§3.4)")
    _common(p)
    _analysis_args(p)
    p.add_argument("--activations", nargs="+", default=["resid_pre"],
                   choices=["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
    p.add_argument("--modes", nargs="+", default=["fp_to_variant", "zero"],
                   choices=["fp_to_variant", "variant_to_fp", "zero"])
    p.add_argument("--positions", default="semantic",
                   help="semantic (subject, relation, last tokens) or all")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    p.add_argument("--memory-mb", type=float, default=1024.0,
                   help="budget for one batched forward's transient memory")
    p.add_argument("--no-fp-ablation", action="store_true",
                   help="zero mode: ablate only the variants, not the FP model")
    p.set_defaults(func=cmd_patch)
    p = sub.add_parser("sensitivity",
                       help="first domino, single layers, components, signal injection (§4.3)")
    _common(p)
    _analysis_args(p)
    p.add_argument("--analyses", nargs="+", default=["domino", "components", "injection"],
                   choices=["domino", "single", "components", "injection"],
                   help="default: domino components injection (single adds one evaluation "
                        "per layer and variant)")
    p.add_argument("--injection-high", nargs="+", default=["fp"],
                   help="precisions of the first k layers: fp and/or variant names")
    p.add_argument("--injection-low", default=None,
                   help="precision of the other layers (default: the last of --variants)")
    p.add_argument("--injection-ks", type=int, nargs="*", default=None,
                   help="values of k (default: 0, L/10, L/5, L/3, L/2, 2L/3, L)")
    p.set_defaults(func=cmd_sensitivity)
    p = sub.add_parser("diagnose", help="verdict on one variant with its evidence (§4.3)")
    _common(p)
    p.add_argument("variant", help="e.g. gptq-w4g128, rtn-w2g128, or a checkpoint directory")
    p.add_argument("--n-facts", type=int, default=64,
                   help="FP-correct facts the diagnosis samples (default 64)")
    p.add_argument("--repair", action="store_true",
                   help="also measure the repairs (protection, + amplification, EoRA r32/r64) "
                        "on the held-out facts: repairs.csv and a table in diagnose.html")
    p.set_defaults(func=cmd_diagnose)
    p = sub.add_parser("recipe", help="best protection repair within a bit budget, as a "
                                      "GPTQModel dynamic config (recipe.json)")
    _common(p, out=False)
    p.add_argument("variant", help="the base, e.g. gptq-w4g128 (a name: it is quantized again)")
    p.add_argument("--budget", type=float, required=True,
                   help="average bits per weight allowed, e.g. 4.3")
    p.add_argument("--out", default="recipe.json", help="where to write the recipe JSON")
    p.add_argument("--check", action="store_true",
                   help="quantize again from the JSON alone and measure what it promised")
    p.set_defaults(func=cmd_recipe)
    p = sub.add_parser("compare-architectures",
                       help="model families side by side: cliff, first domino, single layers, "
                            "components, protection, verdicts (paper Fig. 10, 22)")
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--out", default="figures", help="output folder for frames and figures")
    p.add_argument("--facts", default="bundled",
                   help="bundled | a facts CSV | pararel[:P36,P103]")
    p.add_argument("--max-facts", type=int, default=None, help="sample this many facts")
    p.add_argument("--seed", type=int, default=0, help="seed for --max-facts sampling")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-facts", type=int, default=64,
                   help="FP-correct facts per model for the sweeps and verdicts (default 64)")
    p.add_argument("--sweep-bits", type=int, default=2, choices=[8, 4, 3, 2],
                   help="width of the first-domino, single-layer and component sweeps")
    p.add_argument("--protect-bits", type=int, default=3, choices=[8, 4, 3, 2],
                   help="width the two protections are compared at")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2],
                   help="the cliff's widths (must include --sweep-bits and --protect-bits)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                   help="gptq (the paper's; default) or rtn (no calibration: minutes, not an "
                        "hour, and a different contrast)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help=f"GPTQ calibration sequences (default {N_SAMPLES})")
    p.add_argument("--calib-len", type=int, default=None,
                   help=f"tokens per calibration sequence (default {SEQ_LEN})")
    p.set_defaults(func=cmd_compare_architectures)
    p = sub.add_parser("quantize", help="make one variant (cached), print its checkpoint path")
    _common(p, facts=False)
    p.add_argument("variant", help="e.g. gptq-w4g128, rtn-w2g128-asym, gptq-w3g128-act")
    p.add_argument("--ct-out", default=None, metavar="DIR",
                   help="also write the variant as a whole compressed-tensors (pack-quantized) "
                        "checkpoint into DIR, with compressed-tensors' own compressor (needs "
                        "mechq[ct]; uniform bits, no act-order g_idx)")
    p.set_defaults(func=cmd_quantize)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (an unknown variant, a checkpoint of another model, bad bits,
    an empty fact set ...) ends with a one-line message instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (argparse.ArgumentTypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mechq {args.command}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
