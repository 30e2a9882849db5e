"""What an activation scheme costs a recall run: weight-only against weight + activation hooks.

Issue 28 asks that an activation scheme make a recall run at most 1.5× slower than the
weight-only run. Both runs score the bundled facts on SmolLM2 (``mechq.evaluate_recall``, FP
left out) in the same process, alternating, each timed ``--repeats`` times from a warm model:

- weights only: RTN W8 per-channel;
- the same weights with each activation scheme of the table: int8 per-tensor (static,
  calibrated before timing), int8 and FP8 per-token, and a KV cache int4 per head.

It reports the median seconds of each and their ratio to the weight-only run, and checks that the
schemes change the answers (a hook that did nothing would be free). Writes
benchmarks/results/bench_activations.json.

    .venv/bin/python benchmarks/bench_activations.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import mechq
from mechq.engine.store import write_result
from mechq.quant import activation_quant as aq
from mechq.quant.variants import calibrated, with_activations

OUT = Path(__file__).parent / "results" / "bench_activations.json"
SCHEMES = ("A8-int-tensor", "A8-int-token", "A8-fp8-token", "KV4-int-head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = mechq.load_model("smollm2-135m", device="cpu")
    facts = mechq.bundled_facts()
    w8 = mechq.quantize(model, "rtn", bits=8, group_size=-1)
    runs = {"weights only": w8}
    for name in SCHEMES:
        runs[name] = calibrated(model, with_activations(w8, aq.scheme(name)))
    times: dict[str, list[float]] = {k: [] for k in runs}
    answers = {}
    mechq.evaluate_recall(model, facts, [w8], include_fp=False, progress=False)  # warm-up
    for _ in range(args.repeats):
        for label, v in runs.items():
            t0 = time.perf_counter()
            rec = mechq.evaluate_recall(model, facts, [v], include_fp=False, progress=False)
            times[label].append(time.perf_counter() - t0)
            answers[label] = rec["top1_id"].tolist()
    base = statistics.median(times["weights only"])
    rows = {k: dict(median_s=round(statistics.median(t), 2), ratio=round(
        statistics.median(t) / base, 3), changed_answers=sum(
        a != b for a, b in zip(answers[k], answers["weights only"]))) for k, t in times.items()}
    data = dict(model="smollm2-135m", facts=len(facts), repeats=args.repeats,
                torch_threads=torch.get_num_threads(), runs=rows, target_ratio=1.5,
                met=all(r["ratio"] <= 1.5 for r in rows.values()), load=list(os.getloadavg()))
    write_result(OUT, data, command=f"python benchmarks/bench_activations.py --repeats "
                                    f"{args.repeats}")
    print(data)


if __name__ == "__main__":
    main()
