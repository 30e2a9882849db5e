"""The recipe against the usual rules at equal bits, per model and budget (issue 27's table).

For each model: the base method's uniform variants at 2/3/4/8 bits (g128), the Fisher
sensitivity of every module at every width, its validation (Spearman's rank correlation
against the measured held-out KL of one module swapped alone, on a fixed sample of modules),
then at each budget every rule of :mod:`mechq.repair.alternatives` assembled from the uniform
variants and measured on the development and held-out halves of the facts and the held-out
text, the recipe (the rule with the least development KLD) quantized again for real with its
``dynamic`` rules, and the diagnosis of uniform and recipe at the lowest budget. The goals are
scored on the held-out halves against the uniform variant at the budget's base width. Last,
every row of the table is diagnosed (:func:`table_verdicts`).

Writes ``benchmarks/results/recipe/<model>-<method>.json``, the verdicts as
``<model>-<method>-verdicts.json`` and the sensitivity frame as CSV (for the map in figures/),
rendered into docs/recipe.md by ``scripts/build_docs.py``. ``--verdicts-only`` diagnoses the
rows of a table already written, and writes only the verdicts.

    .venv/bin/python scripts/measure_recipe.py [--models smollm2-135m gemma-3-270m]
        [--method rtn|gptq] [--budgets 2.5 3.3 4.3] [--validate-modules 30] [--eora-ranks R ...]
        [--verdicts-only]

With ``--eora-ranks`` every width also comes with EoRA corrections of those ranks as options
(:func:`mechq.repair.recipe.eora_options`), and the rule ``fisher+eora`` is measured beside
the others.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

import mechq
from mechq.analysis import fisher as F
from mechq.diagnosis.verdict import diagnose_many
from mechq.engine.store import read_result, write_result
from mechq.repair.allocation import assemble
from mechq.repair.alternatives import base_width, plain, rule_allocations
from mechq.repair.recipe import (Measurer, check_recipe, make_recipe, recipe_sensitivity,
                                 recipe_variant)

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "recipe"
#: the issue's goals, per budget: the held-out gains the recipe must reach over uniform
GOALS = {4.3: dict(gap_recovered=0.5, kld_cut=0.3), 3.3: dict(points=0.15),
         2.5: dict(verdict=("healthy", "signal_degradation"))}


def goals(budget: float, uniform: dict, recipe: dict, verdicts: dict) -> dict:
    """The goal of ``budget`` scored on the held-out rows of uniform and the re-quantized
    recipe: ``met`` and the numbers it is read from (``short_by`` where missed)."""
    acc_u, acc_r = uniform["heldout_accuracy_fp_known"], recipe["heldout_accuracy_fp_known"]
    out: dict = dict(uniform_accuracy=acc_u, recipe_accuracy=acc_r,
                     uniform_kld=uniform["kld_mean"], recipe_kld=recipe["kld_mean"])
    g = GOALS.get(budget)
    if g is None:
        return out
    if "gap_recovered" in g:
        # no gap (uniform keeps every fact FP knows): that half of the goal has nothing to do
        rec = (acc_r - acc_u) / (1 - acc_u) if acc_u < 1 else None
        cut = 1 - recipe["kld_mean"] / uniform["kld_mean"]
        out.update(goal=f"recover >= {g['gap_recovered']:.0%} of the FP-uniform recall gap and "
                        f"cut the mean KLD by >= {g['kld_cut']:.0%}",
                   gap_recovered=rec, kld_cut=cut,
                   met=bool((rec is None or rec >= g["gap_recovered"])
                            and cut >= g["kld_cut"]),
                   short_by=dict(gap_recovered=max(0.0, g["gap_recovered"]
                                                   - (1.0 if rec is None else rec)),
                                 kld_cut=max(0.0, g["kld_cut"] - cut)))
    elif "points" in g:
        gain = acc_r - acc_u
        out.update(goal=f"beat uniform by >= {100 * g['points']:.0f} points of held-out recall",
                   points=gain, met=bool(gain >= g["points"]),
                   short_by=max(0.0, g["points"] - gain))
    else:
        out.update(goal="move the verdict from computation collapse to a repairable one",
                   verdicts=verdicts, met=verdicts.get("recipe") in g["verdict"])
    return out


def same_weights(a, b) -> bool:
    """Whether two variants hold the same modules with equal dequantized weights (low-rank
    corrections included)."""
    return (set(a.modules) == set(b.modules) and set(a.lowrank) == set(b.lowrank)
            and all(torch.equal(a.weight(m), b.weight(m)) for m in a.modules))


def table_verdicts(model, base, options, table: list[dict], recipes: dict) -> list[dict]:
    """The verdict of every row of the table (:func:`mechq.diagnosis.verdict.diagnose_many`,
    FP observed once for all). Each rule's variant is assembled again from ``options`` at the
    row's budget and checked against the row the table measured (same average bits and Fisher
    estimate, or this raises: the verdict must be that variant's). The re-quantized recipe is
    quantized again from its JSON; where its weights equal the assembled recipe's module by
    module (RTN is deterministic), it shares that variant's verdict (``same_as``)."""
    variants, keys, same = [], [], {}
    by_row = {(r["budget"], r["rule"]): r for r in table}
    for b in sorted({r["budget"] for r in table}):
        mixed = {}
        for rule, a in rule_allocations(model, options.frame, b).items():
            v = assemble(model, a, options.pool, name=f"{rule}@{b:g}")
            row = by_row[(b, rule)]
            # 1e-6 relative: the Fisher diagonal is summed again by backward passes whose float
            # reductions may be ordered otherwise; a different allocation moves far more
            if (abs(v.avg_bits - row["avg_bits"]) > 1e-9
                    or abs(a.estimated_kl - row["estimated_kl"])
                    > 1e-6 * max(1.0, abs(row["estimated_kl"]))):
                raise RuntimeError(f"{rule} at {b} bits assembles to another variant than the "
                                   f"table measured ({v.avg_bits} vs {row['avg_bits']} bits).")
            mixed[rule] = v
            variants.append(v)
            keys.append((b, rule))
        rec = recipes[str(b)]
        rq = recipe_variant(model, rec, grams=options.grams, progress=False)
        rule = f"{rec['repair']} (re-quantized)"
        if same_weights(rq, mixed[rec["repair"]]):
            same[(b, rule)] = (b, rec["repair"])
        else:
            variants.append(replace(rq, name=f"{rule}@{b:g}"))
            keys.append((b, rule))
    found = dict(zip(keys, diagnose_many(model, variants)))
    out = []
    for r in table:
        key = (r["budget"], r["rule"])
        d = found[same.get(key, key)]
        out.append(dict(budget=r["budget"], rule=r["rule"], verdict=d.verdict,
                        borderline=d.borderline, margin=d.margin, n_facts=d.n_facts,
                        same_as=same[key][1] if key in same else None))
    return out


def run_model(name: str, method: str, budgets: list[float], n_validate: int,
              ranks: list[int]) -> tuple[tuple, dict]:
    """The table of one model, and what :func:`table_verdicts` needs to diagnose its rows
    (the model, the base request and the options) without making them again."""
    model = mechq.load_model(name, device="cpu")
    base = mechq.Request(method, 4, deterministic=method == "gptq")
    t0 = time.perf_counter()
    options = recipe_sensitivity(model, base, ranks=ranks)
    sens, uniform = options.frame, options.uniform
    t_sens = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    sens.to_csv(OUT / f"{name}-{method}-sensitivity.csv", index=False)
    val = F.validate(model, plain(sens), uniform, bits=(2, 3, 4), n_modules=n_validate,
                     max_tokens=2048)
    corr = pd.concat([F.rank_correlation(val), F.rank_correlation(val, by=None)
                      .assign(bits="all")], ignore_index=True)
    measurer = Measurer(model)
    rows, recipes, scored = [], {}, {}
    for b in budgets:
        t1 = time.perf_counter()
        r = make_recipe(model, base, b, options=options, measurer=measurer)
        seconds = time.perf_counter() - t1
        recipes[str(b)] = {k: v for k, v in r.items() if k != "candidates"}
        recipes[str(b)]["seconds"] = seconds
        for c in r["candidates"]:
            rows.append(dict(c, budget=b))
        table = {c["rule"]: c for c in r["candidates"]}
        requantized = next(c for c in r["candidates"] if c["requantized"])
        goal_verdicts = {}
        if b == min(budgets):
            u = uniform[base_width(sens, b)]
            v = recipe_variant(model, r, grams=options.grams, progress=False)
            for label, var in (("uniform", u), ("recipe", v)):
                goal_verdicts[label] = mechq.diagnose(model, var).verdict
        scored[str(b)] = goals(b, table["uniform"], requantized, goal_verdicts)
        print(f"{name} {method} {b}: {r['repair']}, {scored[str(b)]}", flush=True)
    top = str(max(budgets))
    check = check_recipe(model, recipes[top], progress=False)
    return (model, base, options), dict(model=name, method=method, deterministic=base.deterministic,
                eora_ranks=sorted(ranks), widths=sorted(uniform), uniform={str(k): v.name for k, v in uniform.items()},
                sensitivity_seconds=t_sens, validation=val.to_dict(orient="records"),
                rank_correlation=corr.to_dict(orient="records"),
                n_heldout_fp_known=measurer.n_heldout_fp_known, table=rows, recipes=recipes,
                goals=scored, round_trip=dict(check, budget=float(top)))


def verdicts_only(name: str, method: str) -> dict:
    """The verdicts of a table already written (its ``<model>-<method>.json``), its options
    made again with the same widths and EoRA ranks."""
    data = read_result(OUT / f"{name}-{method}.json").data
    model = mechq.load_model(name, device="cpu")
    base = mechq.Request(method, 4, deterministic=data["deterministic"])
    options = recipe_sensitivity(model, base, data["widths"], ranks=data.get("eora_ranks", []))
    return dict(model=name, method=method,
                rows=table_verdicts(model, base, options, data["table"], data["recipes"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.3, 4.3])
    ap.add_argument("--validate-modules", type=int, default=30)
    ap.add_argument("--eora-ranks", type=int, nargs="*", default=[])
    ap.add_argument("--verdicts-only", action="store_true",
                    help="diagnose every row of the table already written (its variants "
                         "assembled again) and write only <model>-<method>-verdicts.json")
    args = ap.parse_args()
    for name in args.models:
        t0 = time.perf_counter()
        vpath = OUT / f"{name}-{args.method}-verdicts.json"
        if args.verdicts_only:
            res = verdicts_only(name, args.method)
            res["minutes"] = (time.perf_counter() - t0) / 60
            path = write_result(vpath, res, command=f"python scripts/measure_recipe.py --models "
                                f"{name} --method {args.method} --verdicts-only")
            print(f"wrote {path} ({res['minutes']:.1f} min)")
            continue
        made, res = run_model(name, args.method, args.budgets, args.validate_modules,
                              args.eora_ranks)
        res["minutes"] = (time.perf_counter() - t0) / 60
        command = (f"python scripts/measure_recipe.py --models {name} --method {args.method} "
                   f"--budgets {' '.join(map(str, args.budgets))} "
                   f"--validate-modules {args.validate_modules}"
                   + (f" --eora-ranks {' '.join(map(str, args.eora_ranks))}"
                      if args.eora_ranks else ""))
        # the table is written before its rows are diagnosed: a failure there keeps it
        path = write_result(OUT / f"{name}-{args.method}.json", res, command=command)
        print(f"wrote {path} ({res['minutes']:.1f} min); diagnosing its rows", flush=True)
        t1 = time.perf_counter()
        rows = table_verdicts(*made, res["table"], res["recipes"])
        write_result(vpath, dict(model=name, method=args.method, rows=rows,
                                 minutes=(time.perf_counter() - t1) / 60), command=command)
        print(f"wrote {vpath}")


if __name__ == "__main__":
    main()
