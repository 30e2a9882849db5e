"""Protection repairs on SmolLM2 at 4 bits (g128, calibration seed 0): early-layer protection
(layers 0-1 at 8 bits) and kurtosis protection at the same estimated bit budget, for GPTQ and
RTN; recall on the bundled facts, split into the baseline's Robust / Failure subsets.
Writes benchmarks/results/protection.json (GPTQ variants come from the cache when made before).

    .venv/bin/python scripts/measure_protection.py
"""

import json
import time
from pathlib import Path

import mechq
from mechq.repair import protect as P
from mechq.analysis.recall import subset_labels

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "protection.json"


def main() -> None:
    t0 = time.perf_counter()
    model = mechq.load_model("smollm2-135m", device="cpu")
    early = P.early_layers(model, k=2)
    sizes = P.weights_per_module(model)
    budget = P.estimated_bits(model, 4, 128, {m: 8 for m in sizes
                                               if any(f".layers.{l}." in m for l in (0, 1))})
    kurt = P.kurtosis_protection(model, 4, budget)
    reqs = []
    for method in ("gptq", "rtn"):
        reqs += [mechq.Request(method, 4), mechq.Request(method, 4, dynamic=early),
                 mechq.Request(method, 4, dynamic=kurt)]
    variants = mechq.quantize_many(model, reqs)
    facts = mechq.bundled_facts()
    rec = mechq.evaluate_recall(model, facts, variants, progress=False)
    result = {"budget_estimate": budget, "rows": []}
    for method in ("gptq", "rtn"):
        base, e, k = [v for v in variants if v.method == method]
        labels = subset_labels(rec, reference=base.name)
        for kind, v in (("baseline", base), ("early layers 0-1 at 8 bits", e),
                        ("kurtosis, same budget", k)):
            r = rec[rec["variant"] == v.name].assign(sub=lambda d: d["fact_id"].map(labels))
            row = dict(method=method, repair=kind, variant=v.name, avg_bits=v.avg_bits,
                       all=float(r["correct"].mean()),
                       robust=float(r.loc[r["sub"] == "Robust", "correct"].mean()),
                       failure=float(r.loc[r["sub"] == "Failure", "correct"].mean()),
                       n_failure=int((r["sub"] == "Failure").sum()),
                       n_protected=sum(b != v.bits for b in v.module_bits.values()))
            result["rows"].append(row)
            print(row, flush=True)
    result["seconds"] = time.perf_counter() - t0
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
