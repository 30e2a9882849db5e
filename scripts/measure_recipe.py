"""The recipe for SmolLM2 GPTQ w4 g128 within 4.3 bits per weight, and its round trip: quantize
again from the JSON alone through GPTQModel (the same calibration, then calibration seed 1), read
the checkpoint back with mechq's reader, and compare the held-out accuracy with what the recipe
promised. Writes benchmarks/results/recipe.json (the recipe itself under "recipe").

    .venv/bin/python scripts/measure_recipe.py          # or: mechq recipe gptq-w4g128 --budget 4.3 --check
"""

import json
import time
from pathlib import Path

import mechq
from mechq.repair.recipe import check_recipe, make_recipe

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "recipe.json"


def main() -> None:
    t0 = time.perf_counter()
    model = mechq.load_model("smollm2-135m", device="cpu")
    r = make_recipe(model, mechq.Request("gptq", 4), 4.3)
    t1 = time.perf_counter()
    checks = [check_recipe(model, r, seed=s) for s in (None, 1)]
    result = dict(recipe=r, recipe_seconds=t1 - t0,
                  round_trip=[dict(c, seed=s) for c, s in zip(checks, ("recipe's", 1))],
                  seconds=time.perf_counter() - t0)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in r.items() if k != "candidates"}, indent=1))
    print(result["round_trip"])
    print(f"wrote {OUT} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
