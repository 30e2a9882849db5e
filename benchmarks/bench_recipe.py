"""How long ``mechq recipe gptq-w4g128 --budget 4.3`` takes on SmolLM2 once the uniform GPTQ
variants are cached (issue 27's target: at most 10 minutes on 2 cores), step by step.

One process, SmolLM2-135M. The uniform GPTQ g128 variants at 2/3/4/8 bits are made (or read from
the cache) first, outside the timings, as ``make demo`` and earlier recipes leave them. Then,
each timed from a warm model:

- ``sensitivity``: :func:`mechq.repair.recipe.recipe_sensitivity` (the cached variants read
  back, the Fisher diagonal's backward passes, every module at every width);
- ``measurer``: FP's references for the development and held-out halves of the facts and text;
- ``search``: :func:`mechq.repair.recipe.make_recipe` with ``requantize=False``: every rule's
  allocation assembled from the uniform variants and measured, and the choice;
- ``requantize``: the chosen recipe quantized through GPTQModel with its ``dynamic`` rules,
  **not** from the cache (``cache=False``), as a first run of the recipe would;
- ``recipe_total``: the sum, what ``mechq recipe`` costs on a first run;
- the peer, ``uniform_gptq``: one uniform GPTQ w4 quantization, also not from the cache, what a
  user pays for the variant the recipe is compared with.

With ``--eora-ranks R ...`` the EoRA corrections of those ranks are options too (the
sensitivity step fits them at every width), and when the recipe corrects modules the correction
is fitted again on the re-quantized weights inside the ``requantize`` step, as ``mechq recipe
--eora-ranks`` does; that run writes recipe_bench_eora.json.

Writes benchmarks/results/recipe_bench.json (recipe_bench_eora.json with ranks).

    .venv/bin/python benchmarks/bench_recipe.py [--budget 4.3] [--eora-ranks 16 64]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

import mechq
from mechq.engine.store import write_result
from timing import timed  # benchmarks/timing.py: a script's folder is on sys.path
from mechq.repair.recipe import Measurer, make_recipe, recipe_sensitivity, recipe_variant

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=4.3)
    ap.add_argument("--eora-ranks", type=int, nargs="*", default=[])
    args = ap.parse_args()
    ranks = sorted(args.eora_ranks)
    model = mechq.load_model("smollm2-135m", device="cpu")
    base = mechq.Request.parse("gptq-w4g128")
    mechq.quantize_many(model, [replace(base, bits=b) for b in (2, 3, 4, 8)])  # cached first
    model(torch.tensor([[1, 2, 3]]))  # warm
    options, sens_s = timed(lambda: recipe_sensitivity(model, base, ranks=ranks,
                                                       progress=False))
    measurer, meas_s = timed(lambda: Measurer(model))
    r, search_s = timed(lambda: make_recipe(model, base, args.budget, options=options,
                                            measurer=measurer, requantize=False,
                                            progress=False))
    _, requant_s = timed(lambda: recipe_variant(model, r, grams=options.grams, cache=False,
                                                progress=False))
    _, peer_s = timed(lambda: mechq.quantize_many(model, [base], cache=False, progress=False))
    total = round(sens_s + meas_s + search_s + requant_s, 1)
    data = dict(model="smollm2-135m", base=base.method, budget=args.budget,
                torch_threads=torch.get_num_threads(), sensitivity_s=sens_s, measurer_s=meas_s,
                search_s=search_s, requantize_s=requant_s, recipe_total_s=total,
                recipe_total_min=round(total / 60, 2), uniform_gptq_s=peer_s,
                chosen=r["repair"], avg_bits=r["avg_bits"], target_min=10,
                eora_ranks=ranks, n_corrected=len(r["ranks"] or {}),
                load=list(os.getloadavg()))
    out = RESULTS / ("recipe_bench_eora.json" if ranks else "recipe_bench.json")
    write_result(out, data, command=f"python benchmarks/bench_recipe.py --budget {args.budget}"
                 + (f" --eora-ranks {' '.join(map(str, ranks))}" if ranks else ""))
    print(data)


if __name__ == "__main__":
    main()
