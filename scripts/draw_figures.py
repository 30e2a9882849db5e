"""Draw the README's figures as PNGs from the results files (figures/*.png).

- figures/cliff.png: the performance cliff of the demo (benchmarks/results/demo/);
- figures/evidence.png: the demo's verdicts with their evidence;
- figures/patching.png: activation patching FP -> GPTQ w4 / w2 (benchmarks/results/analyses/);
- figures/sensitivity-<run>.png: the recipe's sensitivity map of each run, with the widths chosen
  at the largest budget and its EoRA corrections (benchmarks/results/recipe/).

Needs the static extra and a Chromium (mechq.reports.static).

    .venv/bin/python scripts/draw_figures.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mechq.reports import plots, static
from mechq.repair.alternatives import plain

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "figures"


def main() -> None:
    demo = RESULTS / "demo"
    cliff = pd.read_csv(demo / "cliff.csv")
    fig = plots.performance_cliff(cliff, pd.read_csv(demo / "accuracy_by_relation.csv"),
                                  title="The performance cliff: SmolLM2-135M, GPTQ g128, "
                                        "bundled facts",
                                  seeds=pd.read_csv(demo / "accuracy.csv"))
    static.write_png(fig, FIGURES / "cliff.png", 900, 450)
    evidence = pd.read_csv(demo / "evidence.csv")
    fig = plots.evidence_heatmap(evidence)
    static.write_png(fig, FIGURES / "evidence.png", 900, fig.layout.height or 500)
    heat = pd.read_csv(RESULTS / "analyses" / "patching_heatmap.csv")
    heat = heat[(heat["mode"] == "fp_to_variant") & (heat["activation"] == "resid_pre")]
    fig = plots.patching_heatmap(heat, value="restored",
                                 title="Patching one FP activation (resid_pre) into the "
                                       "quantized run: share of the answer restored")
    static.write_png(fig, FIGURES / "patching.png", 900, fig.layout.height or 600)
    for run in sorted((RESULTS / "recipe").glob("*.json")):
        if run.stem.endswith("-verdicts"):
            continue  # a table's verdicts (scripts/measure_recipe.py), drawn in no figure
        r = json.loads(run.read_text())
        top = max(r["recipes"], key=float)
        sens = plain(pd.read_csv(run.with_name(f"{run.stem}-sensitivity.csv")))
        rec = r["recipes"][top]
        fig = plots.sensitivity_map(sens, rec["modules"], ranks=rec.get("ranks"), title=(
            f"Sensitivity map, {r['model']} {r['method'].upper()}: estimated KL increase per "
            f"module and width (squares: the {top}-bit recipe"
            + ("; dots: EoRA)" if rec.get("ranks") else ")")))
        static.write_png(fig, FIGURES / f"sensitivity-{run.stem}.png", fig.layout.width,
                         fig.layout.height)
    print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in sorted(FIGURES.glob('*.png')))}")


if __name__ == "__main__":
    main()
