"""Activation and KV-cache quantization per model (issue 28's table): what each scheme costs,
how the computation breaks, where, and what SmoothQuant's migration gives back.

For each model:

- the outliers of FP runs on held-out text (:mod:`mechq.analysis.outliers`): the massive
  activations, the outlier channels per activation site, and each scheme's damage per site;
- the table's rows, each a weight variant plus an activation scheme
  (:func:`mechq.quant.variants.with_activations`), next to the weights-only variants: RTN
  per-channel W8 and RTN W4 g128 (RTN: no calibration, so the weights do not move with the CPU;
  GPTQ weights compose with a scheme the same way) and FP8-e4m3 per-channel W8; each measured on
  the held-out half of the facts (the share of the facts FP answers that it keeps) and the
  held-out text's KLD statistics (:class:`mechq.repair.recipe.Measurer`), diagnosed
  (:func:`mechq.diagnose`), and, for a scheme, the site whose quantization alone adds the most
  KLD to the weights' own (the scheme restricted to one site, all layers, on the first
  ``SITE_TOKENS`` held-out tokens);
- SmoothQuant (:mod:`mechq.repair.smoothquant`) on the W8A8 int8 per-tensor row: the per-layer
  α the data pick, and the smoothed variant measured like the rows.

Writes ``benchmarks/results/activations/<model>.json`` and the α choice as
``<model>-alpha.csv`` beside it, rendered into docs/activations.md by ``scripts/build_docs.py``.

    .venv/bin/python scripts/measure_activations.py [--models smollm2-135m gemma-3-270m]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import mechq
from mechq.analysis import outliers as ol
from mechq.analysis.kld import fp_reference, kld_stats
from mechq.diagnosis.verdict import diagnose_many
from mechq.engine.store import write_result
from mechq.facts.heldout import heldout_tokens
from mechq.quant import activation_quant as aq
from mechq.quant.fp8 import quantize_fp8_weights
from mechq.quant.variants import calibrated, with_activations
from mechq.repair import smoothquant as sq
from mechq.repair.recipe import Measurer

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "activations"
#: (row label, weights, scheme): the issue's six rows
ROWS = (
    ("W8A8 int8 per-tensor", "w8", "A8-int-tensor"),
    ("W8A8 int8 per-token", "w8", "A8-int-token"),
    ("W4A8", "w4", "A8-int-token"),
    ("W8A8 FP8", "fp8", "A8-fp8-token"),
    ("W4A16 + KV int4", "w4", "KV4-int-head"),
    ("KV cache int8", None, "KV8-int-head"),
)
WEIGHTS_ONLY = (("W8A16 (weights only)", "w8"), ("W4A16 (weights only)", "w4"),
                ("W8A16 FP8 (weights only)", "fp8"))
OUTLIER_SEQS = 4      # held-out sequences the outlier statistics read
SITE_TOKENS = 1024    # held-out tokens of the per-site KLD


def weights(model) -> dict:
    return {"w8": mechq.quantize(model, "rtn", bits=8, group_size=-1),
            "w4": mechq.quantize(model, "rtn", bits=4, group_size=128),
            "fp8": quantize_fp8_weights(model)}


def outliers(model, seqs) -> dict:
    massive = ol.massive_activations(model, seqs, top=1)
    chans = ol.outlier_channels(model, seqs)
    damage = []
    for name in sorted({s for _, _, s in ROWS} | {"A4-int-token"}):
        act = calibrated(model, with_activations(None, aq.scheme(name), model)).act
        damage += ol.scheme_damage(model, act, seqs).to_dict("records")
    return dict(massive=massive.to_dict("records"),
                outlier_channels={str(k): int(n) for k, n in chans.groupby("site").size().items()},
                outlier_channels_rows=chans.to_dict("records"), damage=damage)


def worst_site(model, variant, ref) -> dict:
    """KLD of the variant's weights alone, and with the scheme on each of its sites alone (all
    layers); the worst site is the one that adds the most KLD to the weights'."""
    weights = replace(variant, act=None, name="weights")
    runs = [weights] + [replace(variant, act=variant.act.only(site), name=site)
                        for site in variant.act.sites]
    k = kld_stats(model, runs, reference=ref, progress=False).set_index("variant")["kld_mean"]
    added = {site: float(k[site] - k["weights"]) for site in variant.act.sites}
    return dict(weights_kld=float(k["weights"]), site_added_kld=added,
                worst_site=max(added, key=added.get))


def measure(model_name: str) -> dict:
    t0 = time.time()
    model = mechq.load_model(model_name)
    seqs = heldout_tokens(model)[:OUTLIER_SEQS]
    res: dict = dict(model=model_name, n_layers=model.cfg.n_layers)
    res["outliers"] = outliers(model, seqs)
    json.dumps(res["outliers"], default=str)  # fail here, not after an hour, if JSON cannot hold it
    print(f"[{model_name}] outliers {time.time() - t0:.0f}s", flush=True)
    w = weights(model)
    variants = {}
    for label, key in WEIGHTS_ONLY:
        variants[label] = w[key]
    for label, key, scheme in ROWS:
        v = with_activations(w[key] if key else None, aq.scheme(scheme), model)
        variants[label] = calibrated(model, v)
    act = aq.scheme("A8-int-tensor")
    smooth, alpha = sq.fit(model, act)
    variants["W8A8 int8 per-tensor + SmoothQuant"] = smooth
    print(f"[{model_name}] variants {time.time() - t0:.0f}s", flush=True)
    meas = Measurer(model)
    table = meas(variants, progress=False).set_index("candidate")
    print(f"[{model_name}] measured {time.time() - t0:.0f}s", flush=True)
    diagnoses = {d.variant: d for d in diagnose_many(
        model, [replace(v, name=k) for k, v in variants.items()])}
    print(f"[{model_name}] diagnosed {time.time() - t0:.0f}s", flush=True)
    ref = fp_reference(model, max_tokens=SITE_TOKENS)
    rows = []
    for label, v in variants.items():
        row = dict(row=label, weights=v.name.split("+")[0], scheme=v.act.name if v.act else None,
                   avg_bits=v.avg_bits, **table.loc[label].drop("avg_bits").to_dict(),
                   verdict=diagnoses[label].verdict)
        if v.act is not None:
            row.update(worst_site(model, v, ref))
        rows.append(row)
    res.update(rows=rows, n_heldout_fp_known=meas.n_heldout_fp_known,
               smoothquant_alpha={site: {str(a): int(n) for a, n in g["alpha"].value_counts(
                   dropna=False).sort_index().items()}
                   for site, g in alpha[alpha["chosen"]].groupby("site")},
               seconds=time.time() - t0)
    alpha.to_csv(OUT / f"{model_name}-alpha.csv", index=False)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        res = measure(name)
        path = write_result(OUT / f"{name}.json", res,
                            command=f"scripts/measure_activations.py --models {name}")
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
