"""The repair table on SmolLM2 (the paper's Table 1, extended): GPTQ w4, w3, w2 and RTN w4 g128
(calibration seed 0) x {baseline, protection, protection + amplification, EoRA r32, r64}, on the
held-out half of the bundled facts. Writes benchmarks/results/repairs.json (GPTQ variants come
from the cache when made before; from scratch, six GPTQ runs).

    .venv/bin/python scripts/measure_repairs.py
"""

import json
import time
from pathlib import Path

import mechq
from mechq.repair.table import repair_summary, repair_table

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "repairs.json"


def main() -> None:
    t0 = time.perf_counter()
    model = mechq.load_model("smollm2-135m", device="cpu")
    bases = [mechq.Request("gptq", b) for b in (4, 3, 2)] + [mechq.Request("rtn", 4)]
    res = repair_table(model, bases)
    seconds = time.perf_counter() - t0
    result = dict(table=res.table.to_dict(orient="records"),
                  choices={k: dict(alpha=a, first=f) for k, (a, f) in res.choices.items()},
                  summary=repair_summary(res.table), seconds=seconds)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(res.wide().round(1).T.to_string())
    print(result["summary"])
    print(f"wrote {OUT} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
