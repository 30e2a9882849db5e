"""How much calibration does GPTQ need? Accuracy spread over calibration seeds, per size.

For each calibration size (``n_samples`` windows of 128 tokens of mechq's bundled calibration
text) and each seed, quantize SmolLM2 with GPTQ (GPTQModel, g128, sym) at the given bit widths
and measure first-token recall on the 404 bundled facts. The seeds pick different windows of the
same text (mechq.facts.calibration), so the spread over seeds is how much a GPTQ result depends on
*which* calibration text it saw. The time column is GPTQModel's wall time for one variant in its
one-thread child process (runs go two at a time on 2 cores, so read it as a relative cost).

Also measures whether GPTQModel is deterministic: the same calibration quantized once with 1 and
once with 2 torch threads, compared code by code (``--threads-check``).

Writes benchmarks/results/calibration.json and prints the tables the README quotes.
Run: .venv/bin/python benchmarks/bench_calibration.py [--sizes 8 16 32 64 128] [--bits 4 3]
     .venv/bin/python benchmarks/bench_calibration.py --sizes --threads-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def threads_check(model, facts, n_samples: int, seq_len: int) -> dict:
    """GPTQ w4 of one calibration with 1 and with 2 torch threads: differing codes and recall."""
    import tempfile

    import torch

    from mechq.models import load as models
    from mechq.facts.calibration import get_calibration
    from mechq.quant.formats.gptq import load_gptq_checkpoint
    from mechq.quant.gptq import make_job, run_gptq
    from mechq.quant.quantize import load_variant
    from mechq.analysis.recall import accuracy, evaluate_recall

    calib = get_calibration(model, None, n_samples=n_samples, seq_len=seq_len, seed=0)
    src = models.source_of(model)
    res: dict = {"calibration": calib.source, "digest": calib.digest}
    dirs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (1, 2, 1):
            out = Path(tmp) / f"t{threads}-{len(dirs)}"
            t0 = time.perf_counter()
            run_gptq(make_job(src.hf_dir, out, calib, bits=4, group_size=128, sym=True,
                              desc_act=False, threads=threads, log=Path(tmp) / f"{out.name}.log"))
            dirs[out.name] = (threads, out, time.perf_counter() - t0)
        names = list(dirs)
        ck = {n: load_gptq_checkpoint(dirs[n][1]) for n in names}
        first = {}
        total = diff = 0
        for n in names[1:]:
            total = diff = 0
            per_layer = {}
            for m, a in ck[names[0]].modules.items():
                b = ck[n].modules[m]
                qa, qb = a.codes(), b.codes()
                d = int((qa != qb).sum())
                total += qa.numel()
                diff += d
                layer = int(m.split(".layers.")[1].split(".")[0]) if ".layers." in m else -1
                per_layer[layer] = per_layer.get(layer, 0) + d
            first[n] = dict(threads=dirs[n][0], differing_codes=diff, codes=total,
                            share=diff / total,
                            first_layer_with_difference=min(
                                (k for k, v in per_layer.items() if v), default=None))
        variants = [load_variant(dirs[n][1], model=model, name=n) for n in names]
        acc = accuracy(evaluate_recall(model, facts, variants, include_fp=False,
                                       progress=False)).set_index("variant")
    res["runs"] = [dict(name=n, threads=dirs[n][0], seconds=round(dirs[n][2], 1),
                        accuracy=float(acc.loc[n, "accuracy"]),
                        n_correct=int(acc.loc[n, "n_correct"])) for n in names]
    res["against_first_run"] = first
    del torch
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32, 64, 128],
                    help="n_samples (windows of --seq-len tokens); none: only --threads-check")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads-check", action="store_true")
    ap.add_argument("--threads-check-samples", type=int, default=32)
    ap.add_argument("--out", default=str(OUT / "calibration.json"))
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import mechq
    from mechq.quant.quantize import Request, quantize_many
    from mechq.analysis.recall import accuracy, evaluate_recall

    model = mechq.load_model("smollm2-135m", device="cpu")
    facts = mechq.bundled_facts()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = dict(cores=os.cpu_count(), python=platform.python_version(),
                             cpu=platform.processor() or platform.machine())
    fp = accuracy(evaluate_recall(model, facts, [], progress=False)).iloc[0]
    result["fp"] = dict(accuracy=float(fp["accuracy"]), n_correct=int(fp["n_correct"]),
                        n=int(fp["n"]))
    rows = {(r["bits"], r["n_samples"], r["seed"]): r for r in result.get("runs", [])}
    for n in args.sizes:
        reqs = [Request("gptq", b, 128, seed=s, n_samples=n, seq_len=args.seq_len,
                        name=f"w{b}-n{n}-s{s}") for b in args.bits for s in args.seeds]
        t0 = time.perf_counter()
        variants = quantize_many(model, reqs)
        acc = accuracy(evaluate_recall(model, facts, variants, include_fp=False,
                                       progress=False)).set_index("variant")
        for j, (r, v) in enumerate(zip(reqs, variants)):
            alone = len(reqs) % 2 == 1 and j == len(reqs) - 1
            rows[(r.bits, n, r.seed)] = dict(
                bits=r.bits, n_samples=n, seq_len=args.seq_len, tokens=n * args.seq_len,
                seed=r.seed, digest=v.meta.get("calibration_digest"),
                accuracy=float(acc.loc[v.name, "accuracy"]),
                n_correct=int(acc.loc[v.name, "n_correct"]),
                gptq_seconds=v.meta.get("seconds"),
                run="alone (the odd one out)" if alone else "paired (two GPTQ children at once)")
        result["runs"] = sorted(rows.values(), key=lambda r: (-r["bits"], r["n_samples"],
                                                              r["seed"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"size {n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.threads_check:
        result["threads_check"] = threads_check(model, facts, args.threads_check_samples,
                                                args.seq_len)
        out.write_text(json.dumps(result, indent=2))

    print(f"FP: {result['fp']['accuracy']:.1%}")
    print("| bits | calibration tokens | " + " | ".join(f"seed {s}" for s in args.seeds)
          + " | mean | min–max | GPTQ s/variant |")
    print("|---|---|" + "---|" * (len(args.seeds) + 3))
    for b in sorted({r["bits"] for r in rows.values()}, reverse=True):
        for n in sorted({r["n_samples"] for r in rows.values() if r["bits"] == b}):
            rs = [rows.get((b, n, s)) for s in args.seeds]
            rs = [r for r in rs if r]
            accs = [r["accuracy"] for r in rs]
            secs = [r["gptq_seconds"] for r in rs if r.get("gptq_seconds")]
            print(f"| w{b} | {n * args.seq_len} | " + " | ".join(f"{a:.1%}" for a in accs)
                  + f" | {sum(accs) / len(accs):.1%} | {min(accs):.1%}–{max(accs):.1%} | "
                  + (f"{sum(secs) / len(secs):.0f}" if secs else "cached") + " |")
    if "threads_check" in result:
        print(json.dumps(result["threads_check"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
