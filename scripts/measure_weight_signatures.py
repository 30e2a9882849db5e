"""Weight-space signatures of SmolLM2's GPTQ and RTN variants (w8/w4/w3/w2, g128, calibration
seed 0) and of the format faults of mechq.quant.faults applied to GPTQ w4 and w2.

The numbers behind the thresholds of mechq.diagnosis.verdict (its docstrings cite this file's output,
benchmarks/results/weight_signatures.json). GPTQ variants come from the cache when make demo
ran before (else about 15 min of GPTQ on 2 cores).

    .venv/bin/python scripts/measure_weight_signatures.py
"""

import json
from pathlib import Path

import mechq
from mechq.quant import faults
from mechq.analysis.signatures import SIGNATURES, weight_signatures

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "weight_signatures.json"


def main() -> None:
    model = mechq.load_model("smollm2-135m", device="cpu")
    reqs = [mechq.Request(m, b) for m in ("gptq", "rtn") for b in (8, 4, 3, 2)]
    variants = mechq.quantize_many(model, reqs)
    gptq = {v.bits: v for v in variants if v.method == "gptq"}
    broken = [f(gptq[b]) for b in (4, 2) for f in (faults.awq_order_as_gptq,
                                                   faults.zero_point_off_by_one,
                                                   faults.permuted_g_idx,
                                                   faults.transposed_codes)
              if not (f is faults.awq_order_as_gptq and b != 4)]
    result = {}
    for v in variants + broken:
        df = weight_signatures(model, v)
        row = {"n_modules": len(df)}
        for s in SIGNATURES:
            row[s] = {"min": float(df[s].min()), "median": float(df[s].median()),
                      "max": float(df[s].max())}
        worst = df.loc[df["cosine"].idxmin()]
        row["lowest_cosine_module"] = str(worst["module"])
        result[v.name] = row
        print(f"{v.name:32s} cos min {row['cosine']['min']:.3f} med {row['cosine']['median']:.3f}"
              f" | step_err med {row['step_error']['median']:.3f} max "
              f"{row['step_error']['max']:.3f} | step_bias med {row['step_bias']['median']:.3f}"
              f" max {row['step_bias']['max']:.3f} | rel_err max {row['rel_error']['max']:.3f}",
              flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
