"""The demo's numbers: `make demo`'s main job, run once more with its settings, its frames kept.

Runs mechq.report on SmolLM2 (GPTQ g128 at 8/4/3/2 bits, three calibration seeds at 4 bits,
the 404 bundled facts, verdicts) into a scratch folder and copies the frames the README and
docs cite into benchmarks/results/demo/: cliff.csv, accuracy.csv, accuracy_by_relation.csv,
evidence.csv, subsets.csv, lens_summary.csv, plus run.json (settings, minutes, machine). About 15 minutes on 2 cores
with a cold cache, 7 with the variants cached.

    .venv/bin/python scripts/measure_demo.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import mechq
from mechq.analysis.recall import accuracy
from mechq.engine.store import write_result

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo"
KEEP = ("cliff.csv", "accuracy.csv", "evidence.csv", "subsets.csv", "lens_summary.csv")
SETTINGS = dict(method="gptq", bits=(8, 4, 3, 2), group_size=128, seeds=3, seed_bits=(4,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mechq-demo-"))
    res = mechq.report(args.model, "bundled", out=scratch, progress=False, **SETTINGS)
    args.out.mkdir(parents=True, exist_ok=True)
    seed0 = res.recall[res.recall["seed"].fillna(0) == 0]
    accuracy(seed0, ["config", "relation"]).rename(columns={"config": "variant"}).to_csv(
        args.out / "accuracy_by_relation.csv", index=False)
    for name in KEEP:
        if (scratch / name).exists():
            shutil.copy(scratch / name, args.out / name)
    model = mechq.load_model(args.model, device="cpu")
    cfg = model.cfg
    write_result(args.out / "run.json", dict(
        model=args.model, settings={k: list(v) if isinstance(v, tuple) else v
                                    for k, v in SETTINGS.items()},
        facts=int(res.recall["fact_id"].nunique()), minutes=round(res.seconds / 60, 1),
        model_config=dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                          d_vocab=cfg.d_vocab)),
        command=f"python scripts/measure_demo.py --model {args.model}")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
