"""The paper's measurements on SmolLM2, GPTQ w4 / w2 g128 (default calibration, seed 0): the
numbers of docs/analyses.md.

- Pararel (primary template; P36, P103, P176 from ../shared/pararel-dev): recall, answer rank,
  wrong top-1 tokens, and paraphrase robustness on 100 facts each of P36 and P103;
- components and representation (§4.1–4.2) on a sample of the bundled facts, split by subset;
- sensitivity (§4.3): first domino, single layers, component table, signal injection, on a
  sample of the facts FP knows;
- activation patching (§3.4): FP -> variant and zero ablation of resid_pre at the semantic
  positions, on a smaller sample of them.

Writes compact frames and run.json into benchmarks/results/analyses/ (about an hour on 2 cores;
the GPTQ variants come from the cache when `make test` or `make demo` made them).

    .venv/bin/python scripts/measure_analyses.py [--facts 128] [--patch-facts 48] [--skip pararel]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import mechq
from mechq.analysis import paraphrase
from mechq.analysis.components import component_metrics, component_summary
from mechq.analysis.patching import by_third, run_patching
from mechq.analysis.recall import accuracy, subset_labels, subset_sizes
from mechq.analysis.representation import cka_diagonal, representation_metrics
from mechq.analysis.sensitivity import run_sensitivity
from mechq.engine.store import write_result
from mechq.facts import FactSet, load_pararel
from mechq.facts.pararel import default_path
from mechq.reports import plots

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "analyses"
PARTS = ("pararel", "components", "sensitivity", "patching")


def pararel_part(model, variants, out: Path) -> dict:
    """Recall on three Pararel relations and paraphrase robustness on two."""
    pr = load_pararel(relations=["P36", "P103", "P176"])
    recall = mechq.evaluate_recall(model, pr.facts, variants, progress=False)
    accuracy(recall).to_csv(out / "pararel_accuracy.csv", index=False)
    top = plots.top_predictions(recall, k=4)
    top.to_csv(out / "pararel_wrong_top1.csv", index=False)
    sizes = subset_sizes(recall, reference=variants[0].name)
    sizes[sizes.relation == "all"].to_csv(out / "pararel_subsets.csv", index=False)
    para = load_pararel(relations=["P36", "P103"], max_facts_per_relation=100, seed=0)
    rows = paraphrase.evaluate_paraphrases(model, para, variants, progress=False)
    paraphrase.robustness_summary(rows).to_csv(out / "pararel_robustness.csv", index=False)
    all19 = load_pararel(max_facts_per_relation=200, seed=0)
    fp19 = accuracy(mechq.evaluate_recall(model, all19.facts, [], progress=False))
    return dict(pararel_facts=len(pr.facts), paraphrase_prompts=len(rows) // (len(variants) + 1),
                all_relations=len(all19.relations), all_relations_facts=len(all19.facts),
                all_relations_fp_accuracy=float(fp19["accuracy"].iloc[0]))


def components_part(model, facts, variants, labels, out: Path) -> dict:
    """Component metrics and CKA / subspaces per layer, with the Robust / Failure split."""
    comp = component_metrics(model, facts, variants, progress=False)
    comp["subset"] = comp["fact_id"].map(labels)
    component_summary(comp).to_csv(out / "components_summary.csv", index=False)
    component_summary(comp.dropna(subset=["subset"]), by="subset").to_csv(
        out / "components_by_subset.csv", index=False)
    rep = representation_metrics(model, facts, variants, streams=["resid_post"], progress=False)
    cka_diagonal(rep.cka).to_csv(out / "cka_diagonal.csv", index=False)
    rep.subspace.to_csv(out / "subspace.csv", index=False)
    return dict(component_facts=len(facts))


def sensitivity_part(model, facts, variants, labels, out: Path) -> dict:
    """First domino, single layers, component table and signal injection (FP and w4 starts)."""
    res = run_sensitivity(model, facts, variants,
                          analyses=["domino", "single", "components", "injection"],
                          labels=labels, injection_high=[None, variants[0]],
                          injection_low=variants[-1], progress=False)
    for name, a in res.items():
        a.frame.to_csv(out / f"sensitivity_{name}.csv", index=False)
    return dict(sensitivity_facts=len(facts))


def patching_part(model, facts, variants, labels, out: Path) -> dict:
    """resid_pre patching FP -> variant and zero ablation, at the semantic positions."""
    res = run_patching(model, facts, variants, labels=labels, positions="semantic",
                       progress=False)
    res.heatmap.to_csv(out / "patching_heatmap.csv", index=False)
    res.heatmap_by_subset.to_csv(out / "patching_heatmap_by_subset.csv", index=False)
    L = model.cfg.n_layers
    thirds = [by_third(g, "restored" if mode == "fp_to_variant" else "mean_delta", L,
                       lowest=mode == "zero").reset_index()
              for mode, g in res.heatmap.groupby("mode", sort=False)]
    pd.concat(thirds, ignore_index=True).to_csv(out / "patching_thirds.csv", index=False)
    return dict(patching_facts=len(facts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=128,
                    help="FP-known facts for components and sensitivity")
    ap.add_argument("--patch-facts", type=int, default=48, help="FP-known facts for patching")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = mechq.load_model("smollm2-135m", device="cpu")
    w4, w2 = mechq.quantize_many(model, [mechq.Request("gptq", b) for b in (4, 2)],
                                 progress=False)
    bundled = mechq.bundled_facts()
    recall = mechq.evaluate_recall(model, bundled, [w4], progress=False)
    labels = subset_labels(recall, reference=w4.name, fp_wrong=None)
    known = FactSet([f for f in bundled if labels[f.id] is not None], name="bundled:fp-known")
    run = dict(model="smollm2-135m", variants=[w4.name, w2.name],
               calibration=w4.meta.get("calibration_source"),
               robust=sum(v == "Robust" for v in labels.values()),
               failure=sum(v == "Failure" for v in labels.values()), seconds={},
               skipped=list(args.skip))
    parts = {
        "pararel": lambda: pararel_part(model, [w4, w2], args.out),
        "components": lambda: components_part(model, known.sample(args.facts, seed=0),
                                              [w4, w2], labels, args.out),
        "sensitivity": lambda: sensitivity_part(model, known.sample(args.facts, seed=0),
                                                [w4, w2], labels, args.out),
        "patching": lambda: patching_part(model, known.sample(args.patch_facts, seed=0),
                                          [w4, w2], labels, args.out),
    }
    for name, fn in parts.items():
        if name in args.skip or (name == "pararel" and default_path() is None):
            continue
        t0 = time.perf_counter()
        print(f"{name} …", flush=True)
        run.update(fn())
        run["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {run['seconds'][name]:.0f} s", flush=True)
    write_result(args.out / "run.json", run, command="python scripts/measure_analyses.py "
                 f"--facts {args.facts} --patch-facts {args.patch_facts}"
                 + (f" --skip {' '.join(args.skip)}" if args.skip else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
