"""Weight-space signatures of SmolLM2's GPTQ and RTN variants (w8/w4/w3/w2, g128, calibration
seed 0), of the format faults of mechq.quant.faults applied to GPTQ w4 and w2, and of reference
mismatches: RTN w8 / w4 of a copy of SmolLM2 whose linear weights carry a fine-tune-sized delta
(Gaussian, 2 %, 5 % and 10 % of each matrix's standard deviation), compared with the unedited
model, alone and with a zero point off by one on top. Each entry also holds the weight-space
verdict (mechq.diagnosis.verdict.weight_verdict; null: the weights are the FP weights quantized).

The numbers behind the thresholds of mechq.diagnosis.verdict (its docstrings cite this file's output,
benchmarks/results/weight_signatures.json). GPTQ variants come from the cache when make demo
ran before (else about 15 min of GPTQ on 2 cores).

    .venv/bin/python scripts/measure_weight_signatures.py
"""

from pathlib import Path

import torch

import mechq
from mechq.diagnosis.verdict import weight_verdict
from mechq.engine.store import write_result
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
    other = mechq.load_model("smollm2-135m", device="cpu")
    base = {n: p.detach().clone() for n, p in other.named_parameters()}
    mismatched = []
    for rho in (0.02, 0.05, 0.10):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in other.named_parameters():
                p.copy_(base[n])
                if p.ndim >= 2 and n.rsplit(".", 1)[-1] in ("W_Q", "W_K", "W_V", "_W_K", "_W_V",
                                                           "W_O", "W_in", "W_gate", "W_out"):
                    p.add_(rho * p.std() * torch.randn(p.shape, generator=gen))
        for b in (8, 4):
            v = mechq.quantize(other, "rtn", bits=b, name=f"rtn-w{b}g128-mismatch{rho:g}")
            mismatched.append(v)
            if rho == 0.10 and b == 4:
                mismatched.append(faults.zero_point_off_by_one(v))
    result = {}
    for v in variants + broken + mismatched:
        df = weight_signatures(model, v)
        row = {"n_modules": len(df)}
        for s in SIGNATURES:
            row[s] = {"min": float(df[s].min()), "median": float(df[s].median()),
                      "max": float(df[s].max())}
        worst = df.loc[df["cosine"].idxmin()]
        row["lowest_cosine_module"] = str(worst["module"])
        row["weight_verdict"] = weight_verdict(df)[0]
        result[v.name] = row
        print(f"{v.name:32s} cos min {row['cosine']['min']:.3f} med {row['cosine']['median']:.3f}"
              f" | step_err med {row['step_error']['median']:.3f} max "
              f"{row['step_error']['max']:.3f} | step_bias med {row['step_bias']['median']:.3f}"
              f" max {row['step_bias']['max']:.3f} | beyond half med "
              f"{row['beyond_half']['median']:.3f} | verdict {row['weight_verdict']}",
              flush=True)
    write_result(OUT, result, command="python scripts/measure_weight_signatures.py")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
