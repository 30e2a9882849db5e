"""Diagnosis signatures of SmolLM2's GPTQ and RTN variants (w8/w4/w3/w2, g128, calibration
seed 0, plus GPTQ w4 seeds 1 and 2): the measurements behind mechq.diagnosis.verdict's thresholds.
Writes benchmarks/results/diagnose_signatures.json. Variants come from the cache (make demo).

    .venv/bin/python scripts/measure_diagnose.py
"""

import json
import time
from pathlib import Path

import mechq
from mechq.diagnosis.verdict import fp_correct_sample, measure

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "diagnose_signatures.json"


def main() -> None:
    model = mechq.load_model("smollm2-135m", device="cpu")
    reqs = ([mechq.Request(m, b) for m in ("gptq", "rtn") for b in (8, 4, 3, 2)]
            + [mechq.Request("gptq", 4, seed=s) for s in (1, 2)])
    variants = mechq.quantize_many(model, reqs)
    facts = fp_correct_sample(model)
    result = {"facts": len(facts)}
    for v in variants:
        t = time.perf_counter()
        ((vals, _),) = measure(model, [v], facts)
        vals["seconds"] = time.perf_counter() - t
        result[v.name] = vals
        print(v.name, {k: round(x, 4) for k, x in vals.items()}, flush=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
