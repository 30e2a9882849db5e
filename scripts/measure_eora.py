"""EoRA on SmolLM2 at 4 bits (g128): the cost of the Grams and of ranks 32 and 64, and recall on
all bundled facts for the base variants and their compensated versions (RTN, and GPTQ when its
checkpoint is already in the cache: a new GPTQ run is not started). Writes
benchmarks/results/eora.json.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/measure_eora.py
"""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import mechq
from mechq.repair.eora import calibration_grams, eora, weighted_error
from mechq.quant import layout
from mechq.quant.quantize import Request, quantize_many
from mechq.analysis.recall import subset_labels

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "eora.json"
RANKS = (32, 64)


def cached_gptq(model) -> mechq.Variant | None:
    """GPTQ w4 g128 (default calibration) if its checkpoint is cached; never quantizes."""
    from mechq.quant import quantize as Q

    before = Q.run_gptq_jobs

    def refuse(*a, **k):
        raise LookupError("not cached")

    Q.run_gptq_jobs = refuse
    try:
        return quantize_many(model, [Request("gptq", 4)], progress=False)[0]
    except LookupError:
        return None
    finally:
        Q.run_gptq_jobs = before


def main() -> None:
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())  # other processes on the machine stretch the timings
    model = mechq.load_model("smollm2-135m", device="cpu")
    bases = [mechq.quantize(model, "rtn", bits=4, group_size=128)]
    gptq = cached_gptq(model)
    if gptq is not None:
        bases.append(gptq)

    t0 = time.perf_counter()
    grams = calibration_grams(model, progress=False)
    t_grams = time.perf_counter() - t0
    print(f"grams {t_grams:.1f} s", flush=True)

    rows, variants = [], []
    for base in bases:
        variants.append(base)
        for r in RANKS:
            t0 = time.perf_counter()
            v = eora(model, base, r, grams=grams, progress=False)
            seconds = time.perf_counter() - t0
            ratios = []
            for m in base.modules:
                w = layout.module_weight(model, m)
                ratios.append(weighted_error(w - v.weight(m), grams[m])
                              / weighted_error(w - base.weight(m), grams[m]))
            rows.append(dict(variant=v.name, base=base.name, rank=r, eora_seconds=seconds,
                             calib_error_ratio_median=statistics.median(ratios),
                             calib_error_ratio_max=max(ratios),
                             max_abs_B=max(float(b.abs().max()) for b, _ in v.lowrank.values()),
                             max_abs_A=max(float(a.abs().max()) for _, a in v.lowrank.values())))
            print(rows[-1], flush=True)
            variants.append(v)

    t0 = time.perf_counter()
    rec = mechq.evaluate_recall(model, mechq.bundled_facts(), variants, progress=False)
    t_recall = time.perf_counter() - t0
    acc = mechq.accuracy(rec).set_index("variant")
    extra = {r["variant"]: r for r in rows}
    recall = []
    for name in acc.index:
        v = next((x for x in variants if x.name == name), None)
        row = dict(variant=name, avg_bits=v.avg_bits if v else None,
                   accuracy=float(acc.loc[name, "accuracy"]),
                   n_correct=int(acc.loc[name, "n_correct"]), n=int(acc.loc[name, "n"]),
                   ci95=[float(acc.loc[name, "ci_low"]), float(acc.loc[name, "ci_high"])],
                   mean_target_prob=float(acc.loc[name, "mean_target_prob"]))
        if v is not None:
            base = v.meta.get("eora", {}).get("base", v.name)
            labels = subset_labels(rec, reference=base)
            r = rec[rec["variant"] == name].assign(sub=lambda d: d["fact_id"].map(labels))
            row.update(base=base,
                       robust=float(r.loc[r["sub"] == "Robust", "correct"].mean()),
                       failure=float(r.loc[r["sub"] == "Failure", "correct"].mean()),
                       n_robust=int((r["sub"] == "Robust").sum()),
                       n_failure=int((r["sub"] == "Failure").sum()))
            row.update({k: extra[name][k] for k in ("rank", "eora_seconds",
                                                     "calib_error_ratio_median")
                        if name in extra})
        recall.append(row)
        print(row, flush=True)

    result = dict(
        model="smollm2-135m", device="cpu", threads=threads, torch=torch.__version__,
        machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        load_average_at_start=load_start, load_average_at_end=list(os.getloadavg()),
        calibration="bundled, 32 × 128 tokens, seed 0 (GPTQ's default)",
        lowrank_dtype="float16",
        gptq_in_cache=gptq is not None,
        grams_seconds=t_grams, recall_seconds=t_recall, eora=rows, recall=recall,
        note=("avg_bits counts 16 bits per stored low-rank entry, r·(in+out) per module. "
              "calib_error_ratio: ‖(W − W_eora)Xᵀ‖ / ‖(W − W_q)Xᵀ‖ per module on the calibration "
              "inputs. robust / failure: recall on the facts FP and the base variant get right "
              "/ FP gets right and the base variant does not (subset_labels, reference = base)."),
        seconds=time.perf_counter() - t_start,
    )
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
