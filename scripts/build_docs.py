"""Write README.md and docs/*.md from their templates and the results files they cite.

Every number on those pages comes from a results file under benchmarks/results/ (written by the
command the page names) or from mechq's own code (a threshold, a default), through a Jinja2
template in docs/templates/. Nothing measured is typed into a template: ``--check`` also lists
numbers written into a template's prose outside ``{{ … }}`` (see :func:`stray_numbers`).

    .venv/bin/python scripts/build_docs.py           # rewrite README.md and docs/*.md
    .venv/bin/python scripts/build_docs.py --check   # exit 1 if a page differs from its
                                                     # template + results, or a number is typed

docs/api.md is generated from ``mechq.__all__``: one line per public name, its docstring's first
sentence.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from functools import cached_property
from pathlib import Path

import jinja2
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATES = ROOT / "docs" / "templates"
#: output page -> template
#: the order model sections appear in on a page
MODEL_ORDER = {"smollm2-135m": 0, "gemma-3-270m": 1}
PAGES = {"README.md": "README.md"} | {
    f"docs/{p.name}": p.name for p in sorted(TEMPLATES.glob("*.md")) if p.name != "README.md"}


class Results:
    """``results.NAME`` is benchmarks/results/NAME.json (or the folder NAME/ as a mapping of its
    files: ``.json`` parsed, ``.csv`` as a DataFrame), read once."""

    def __init__(self, root: Path = RESULTS):
        self._root = root
        self._cache: dict[str, object] = {}

    def has(self, name: str) -> bool:
        """Whether NAME.json or the folder NAME/ exists (a page may say a result is pending)."""
        return (self._root / f"{name}.json").exists() or (self._root / name).is_dir()

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "has":
            raise AttributeError(name)
        if name not in self._cache:
            self._cache[name] = self._read(name)
        return self._cache[name]

    def _read(self, name: str):
        path = self._root / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        folder = self._root / name
        if folder.is_dir():
            return {p.stem: (json.loads(p.read_text()) if p.suffix == ".json"
                             else pd.read_csv(p)) for p in sorted(folder.iterdir())
                    if p.suffix in (".json", ".csv")}
        raise FileNotFoundError(f"no results file {path} or folder {folder}")


# ---- filters: how numbers are written ------------------------------------------------------


def pct(x, digits: int = 1) -> str:
    """0.4801 -> '48.0 %'."""
    return "—" if _missing(x) else f"{100 * float(x):.{digits}f} %"


def pts(x, digits: int = 1) -> str:
    """A difference of shares in percentage points: 0.034 -> '3.4 points'."""
    return f"{100 * float(x):.{digits}f} points"


def num(x, digits: int = 2) -> str:
    """A plain number with thin grouping of thousands: 18698 -> '18 698', 0.1234 -> '0.12'."""
    if _missing(x):
        return "—"
    x = float(x)
    if x == int(x) and abs(x) >= 1000 or digits == 0:
        return f"{x:,.0f}".replace(",", " ")
    return f"{x:.{digits}f}"


def rank(x) -> str:
    """An answer rank: an integer (median ranks of even counts keep their .5)."""
    if _missing(x):
        return "—"
    x = float(x)
    return num(x, 0) if x == int(x) else f"{x:.1f}"


def minutes(seconds) -> str:
    return f"{float(seconds) / 60:.1f} min"


def secs(seconds, digits: int = 0) -> str:
    return f"{float(seconds):.{digits}f} s"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, pts=pts, num=num, rank=rank, minutes=minutes, secs=secs)
    return env


class Context:
    """What templates see: ``results`` (the files), ``mechq`` (its code's constants) and a few
    values derived from several files."""

    def __init__(self):
        self.results = Results()

    @cached_property
    def code(self) -> dict:
        """Constants of mechq's code that pages cite (thresholds, defaults)."""
        from mechq import vocab
        from mechq.diagnosis import verdict
        from mechq.models import families as fam
        from mechq.facts import calibration
        from mechq.quant import quantize
        from mechq.repair import table

        from mechq.diagnosis import evidence

        return dict(verdict=verdict, evidence=evidence, signatures=evidence.SIGNATURES,
                    calibration=calibration, vocab=vocab, quantize=quantize,
                    repair=table, families=[
                        dict(name=f.name, architectures=list(f.architectures),
                             embedded=[e.name for e in f.embedded])
                        for f in dict.fromkeys(map(fam.for_architecture, fam.architectures()))],
                    bits="/".join(map(str, vocab.SUPPORTED_BITS)), **self._activation_code())

    @staticmethod
    def _activation_code() -> dict:
        """The activation sites and schemes (docs/activations.md), from their module."""
        from mechq.analysis import outliers
        from mechq.quant import activation_quant as aq

        hooks = {"attn_in": "blocks.L.ln1.hook_normalized", "o_in": "blocks.L.attn.hook_z",
                 "mlp_in": "blocks.L.ln2.hook_normalized", "down_in": "blocks.L.mlp.hook_post",
                 "k_cache": "blocks.L.attn.hook_rot_k (rotary; else hook_k)",
                 "v_cache": "blocks.L.attn.hook_v"}
        sites = [dict(site=s, hook=hooks[s], components=" ".join(aq.SITE_COMPONENTS[s]),
                      part="inputs" if s in aq.INPUT_SITES else "KV cache") for s in aq.SITES]
        return dict(activation_sites=sites, activation_schemes=list(aq.SCHEMES),
                    massive_abs=outliers.MASSIVE_ABS, massive_ratio=outliers.MASSIVE_RATIO,
                    channel_ratio=outliers.CHANNEL_RATIO)

    @cached_property
    def architectures(self) -> dict[str, dict]:
        """Per model, the contrast's headline values from benchmarks/results/architectures/."""
        a = self.results.architectures
        out = {}
        for model, cliff in a["architectures_cliff"].groupby("model", sort=False):
            dom = a["architectures_domino"].query("model == @model")
            single = a["architectures_single"].query("model == @model").sort_values("accuracy")
            comp = a["architectures_components"].query("model == @model").set_index("setting")
            prot = a["architectures_protection"].query("model == @model").set_index("protection")
            verd = a["architectures_verdicts"].query("model == @model").set_index("bits")
            zero = dom[(dom.k >= 0) & (dom.accuracy == 0)]
            out[model] = dict(
                recall={("fp" if pd.isna(r.bits) else f"w{int(r.bits)}"): r.accuracy
                        for r in cliff.itertuples()},
                n_layers=int(dom.k.max()) + 1, n_facts=int(dom.n.iloc[0]),
                domino0=float(dom.loc[dom.k == 0, "accuracy"].iloc[0]),
                zero_k=int(zero.k.min()) if len(zero) else None,
                zero_depth=float(zero.depth.min()) if len(zero) else None,
                worst=single.head(3)[["layer", "accuracy"]].to_dict("records"),
                mildest=single.tail(1)[["layer", "accuracy"]].to_dict("records")[0],
                components={s: float(comp.loc[s, "accuracy"]) for s in ("Q+K", "V", "O")},
                protection={k: dict(correct=int(r.fp_known_correct), n=int(r.fp_known_n),
                                    bits=float(r.avg_bits)) for k, r in prot.iterrows()},
                winner=a["architectures_contrast"].set_index("model").loc[model,
                                                                          "protection winner"],
                verdicts={f"w{int(b)}": v.replace("_", " ") for b, v in verd["verdict"].items()},
                recommendation={f"w{int(b)}": r for b, r in verd["recommendation"].items()})
        return out

    @cached_property
    def demo(self) -> dict:
        """benchmarks/results/demo/: the cliff table's rows with each width's verdict and the
        recall range over emulated CPUs (spread.json), and the run's record."""
        from mechq.engine.store import machine_text

        demo = self.results.demo
        run = demo["run"]
        cliff = demo["cliff"]
        ev = demo["evidence"].drop_duplicates("variant").set_index("variant")
        verdicts = {v: r.verdict + (" (borderline)" if isinstance(r.borderline, str)
                                    and r.borderline else "") for v, r in ev.iterrows()}
        per_bits = self.spread["bits"]
        rows = []
        for r in cliff.itertuples():
            fp = r.variant == "fp"
            b = None if fp else int(r.bits)
            if fp:
                seeds = "—"
            elif r.seeds > 1:
                seeds = f"{pct(r.seed_min)}–{pct(r.seed_max)} ({r.seeds} seeds)"
            else:
                seeds = "1 seed"
            cpus = ("same" if fp else f"{pct(per_bits[b]['min'])}–{pct(per_bits[b]['max'])}"
                    if b in per_bits else "not measured")
            verdict = "" if fp else next((v for k, v in verdicts.items()
                                          if k.startswith(r.variant)), "")
            rows.append(dict(name="FP" if fp else r.variant, avg_bits=r.avg_bits,
                             accuracy=r.accuracy, seeds=seeds, ci_low=r.ci_low,
                             ci_high=r.ci_high, cpus=cpus, median_rank=r.median_rank,
                             kld=getattr(r, "kld_mean", float("nan")),
                             same_top1=getattr(r, "same_top1", float("nan")),
                             verdict=str(verdict).replace("_", " ")))
        return dict(rows=rows, run=run, machine=machine_text(run["provenance"]["machine"]))

    @cached_property
    def demo_evidence(self) -> dict:
        """The demo's evidence (benchmarks/results/demo/evidence.csv, one row per variant and
        signature) as a table: one row per signature, one column per variant, each cell the value
        and its 95 % interval as the docs write them."""
        from mechq.diagnosis.verdict import format_value

        ev = self.results.demo["evidence"]
        variants = list(dict.fromkeys(ev["variant"]))
        cell = ev.set_index(["signature", "variant"])
        rows = []
        for sig in dict.fromkeys(ev["signature"]):
            vals = []
            for v in variants:
                r = cell.loc[(sig, v)]
                text = format_value(sig, r["value"], r["ci_low"], r["ci_high"])
                vals.append(f"**{text}**" if r["crossed"] is True or r["crossed"] == "True"
                            else text)
            thr = cell.loc[(sig, variants[0]), "threshold"]
            rows.append(dict(signature=sig, values=vals,
                             threshold="" if pd.isna(thr) else format_value(sig, float(thr))))
        head = ev.drop_duplicates("variant").set_index("variant")
        return dict(variants=variants, rows=rows,
                    verdicts=[str(head.loc[v, "verdict"]).replace("_", " ") for v in variants],
                    borderline=[head.loc[v, "borderline"] if isinstance(head.loc[v, "borderline"],
                                                                         str) else ""
                                for v in variants],
                    n_facts=int(ev["n_facts"].iloc[0]))

    @cached_property
    def honest_step_error(self) -> float:
        """The largest weight error in steps of any module of an honest variant."""
        w = self.results.weight_signatures
        return max(v["step_error"]["max"] for k, v in w.items()
                   if isinstance(v, dict) and "step_error" in v and k.count("-") == 1)

    @cached_property
    def weight_cases(self) -> list[dict]:
        """Every case of benchmarks/results/weight_signatures.json with the median module's
        error, the largest share beyond half a step, and the weight-space verdict."""
        w = self.results.weight_signatures
        return [dict(name=k, step_error=v["step_error"]["median"],
                     beyond_half_median=v["beyond_half"]["median"],
                     beyond_half_max=v["beyond_half"]["max"],
                     error_corr=v["error_corr"]["median"], cosine=v["cosine"]["min"],
                     verdict=(v["weight_verdict"] or "none").replace("_", " "))
                for k, v in w.items() if isinstance(v, dict) and "step_error" in v]

    @cached_property
    def fault_signatures(self) -> dict:
        """Per reader fault applied to GPTQ w4: worst-module weight error and cosine."""
        w = self.results.weight_signatures
        names = {"awq-order": "AWQ order read as GPTQ", "zero-offset": "zero points off by one",
                 "g-idx": "a permuted g_idx", "transposed": "transposed codes"}
        return {label: dict(step_error=w[f"gptq-w4g128-{k}"]["step_error"]["max"],
                            cosine=w[f"gptq-w4g128-{k}"]["cosine"]["min"])
                for k, label in names.items()}

    @cached_property
    def calibration_sizes(self) -> list[dict]:
        """benchmarks/results/calibration.json: per calibration size, the three seeds' recall,
        their mean and range, and GPTQ's seconds per variant (the runs alone, else all)."""
        runs = pd.DataFrame(self.results.calibration["runs"])
        out = []
        for (n, L), g in runs.groupby(["n_samples", "seq_len"], sort=True):
            alone = g[g.run.str.startswith("alone")]
            out.append(dict(n_samples=int(n), seq_len=int(L), tokens=int(g.tokens.iloc[0]),
                            seeds=g.sort_values("seed").accuracy.tolist(),
                            mean=float(g.accuracy.mean()),
                            range=float(g.accuracy.max() - g.accuracy.min()),
                            seconds=float((alone if len(alone) else g).gptq_seconds.mean()),
                            default=(int(n), int(L)) == (self.code["calibration"].N_SAMPLES,
                                                         self.code["calibration"].SEQ_LEN)))
        return out

    @cached_property
    def repairs(self) -> dict:
        """benchmarks/results/repairs.json as one row per (base, subset): the subset's size and
        each repair's accuracy; and each repair's average bits per base."""
        t = pd.DataFrame(self.results.repairs["table"])
        repairs = list(dict.fromkeys(t.repair))
        rows = []
        for (base, subset), g in t.groupby(["base", "subset"], sort=False):
            acc = g.set_index("repair")["accuracy"]
            rows.append(dict(base=base, subset=subset, n=int(g.n.iloc[0]),
                             acc=[acc.get(r) for r in repairs]))
        bits = t.drop_duplicates(["base", "repair"]).pivot(index="base", columns="repair",
                                                          values="avg_bits")
        return dict(repairs=repairs, rows=rows,
                    bits={b: [float(bits.loc[b, r]) for r in repairs] for b in bits.index},
                    alphas={b: c["alpha"] for b, c in self.results.repairs["choices"].items()})

    @cached_property
    def spread(self) -> dict:
        """benchmarks/results/spread.json per bit width: the recall under each CPU setting, its
        range over the settings that emulate other CPUs, and the deterministic setting's codes."""
        from mechq.engine.store import machine_text

        s = self.results.spread
        rows = pd.DataFrame(s["rows"])
        cpus = rows[~rows.setting.str.startswith("compatible")]
        compat = rows[rows.setting.str.startswith("compatible")]
        per_bits = {}
        for b, g in cpus.groupby("bits"):
            c = compat[compat.bits == b]
            per_bits[int(b)] = dict(
                min=float(g.accuracy.min()), max=float(g.accuracy.max()),
                range=float(g.accuracy.max() - g.accuracy.min()),
                native=float(g.loc[g.setting == "native", "accuracy"].iloc[0]),
                settings=dict(zip(g.setting, g.accuracy)),
                max_code_diff=float(g.code_diff_vs_native.max()),
                compatible=dict(zip(c.setting, c.accuracy)),
                compatible_code_diff=(float(c.code_diff_vs_compatible.max())
                                      if len(c) and c.code_diff_vs_compatible.notna().any()
                                      else None))
        seconds = rows.groupby("setting").gptq_seconds.mean().to_dict()
        return dict(bits=per_bits, settings=list(dict.fromkeys(rows.setting)),
                    env={r.setting: {k: getattr(r, k) for k in
                                     ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
                                     if getattr(r, k, "")}
                         for r in rows.drop_duplicates("setting").itertuples()},
                    seconds=seconds, fp=s["fp"], n=s["facts"],
                    code_diff=rows[rows.bits == 4].set_index("setting")
                    .code_diff_vs_native.to_dict(),
                    machine=machine_text(s["provenance"]["machine"]),
                    max_range=max(v["range"] for v in per_bits.values()))

    @cached_property
    def lens_layers(self) -> list[int]:
        """The lens layers the analyses page shows: every fifth, and the last."""
        layers = sorted(self.results.demo["lens_summary"]["layer"].unique())
        return [int(l) for l in layers if l % 5 == 0 or l == layers[-1]]

    @cached_property
    def lens_rows(self) -> list[dict]:
        """The demo's median answer rank per (subset, variant) at :attr:`lens_layers`."""
        lens = self.results.demo["lens_summary"]
        lens = lens[lens["layer"].isin(self.lens_layers)]
        rows = []
        for (subset, variant), g in lens.groupby(["subset", "variant"], sort=False):
            ranks = g.set_index("layer")["median_rank"]
            rows.append(dict(subset=subset, variant=variant,
                             ranks=[float(ranks.get(l, float("nan"))) for l in self.lens_layers]))
        return rows

    @cached_property
    def validation(self) -> dict | None:
        """benchmarks/results/validation/: the held-out confusion tables (None before the run).
        ``held``: per case that some fit did not see, its expected verdict and the verdict under
        the thresholds fit on the other family; ``counts``: outcome counts per fit;
        ``shipped``: every case under the shipped thresholds; ``thresholds``: each fit."""
        if not self.results.has("validation"):
            return None
        val = self.results.validation
        conf, cases = val["confusion"], val["cases"]
        truth = cases.set_index(["model", "case"])
        fits = {k: v for k, v in val["thresholds"].items() if k != "provenance"}

        def row(r):
            t = truth.loc[(r.model, r.case)]
            return dict(model=r.model, case=r.case, kind=r.kind, expected=r.expected,
                        verdict=r.verdict, outcome=r.outcome, margin=r.margin,
                        borderline=r.borderline if isinstance(r.borderline, str) else "",
                        kept=t.get("kept"), repaired=t.get("repaired"),
                        truth_low=t.get("truth_low"), truth_high=t.get("truth_high"),
                        fit=r.fit.removeprefix("fit on "))

        held = conf[conf.held_out & (conf.fit != "shipped")]
        counts = {f.removeprefix("fit on "): g.outcome.value_counts().to_dict()
                  for f, g in held.groupby("fit", sort=False)}
        names = [s for s in fits["shipped"] if s != "collapse_votes"]
        return dict(held=[row(r) for r in held.itertuples()], counts=counts,
                    shipped=[row(r) for r in conf[conf.fit == "shipped"].itertuples()],
                    thresholds=fits, names=names, n_cases=len(cases),
                    no_truth=cases[cases.expected.isna()][["model", "case"]].to_dict("records"),
                    provenance=val["thresholds"]["provenance"])

    @cached_property
    def recipe_runs(self) -> list[dict]:
        """benchmarks/results/recipe/: per run (model, method), the rank correlations, the rows
        of each budget (the rules in table order, the re-quantized recipe last, each with its
        verdict from ``<key>-verdicts.json`` where that was measured) and the goals."""
        if not self.results.has("recipe"):
            return []
        from mechq.repair.alternatives import RULES

        runs = []
        for key, run in self.results.recipe.items():
            if not isinstance(run, dict) or key.endswith("-verdicts"):
                continue  # the sensitivity CSVs, the verdicts (read with their table)
            verdicts = self.results.recipe.get(f"{key}-verdicts")
            found = {(v["budget"], v["rule"]): v for v in verdicts["rows"]} if verdicts else {}
            table = pd.DataFrame(run["table"])
            table["verdict"] = [found.get((b, r), {}).get("verdict")
                                for b, r in zip(table["budget"], table["rule"])]
            table["borderline"] = [bool(found.get((b, r), {}).get("borderline"))
                                   for b, r in zip(table["budget"], table["rule"])]
            budgets = []
            for b, g in table.groupby("budget", sort=True):
                order = {r: i for i, r in enumerate(RULES)}
                g = g.assign(_o=g["rule"].map(lambda r: order.get(r, len(RULES))))
                rows = g.sort_values("_o").drop(columns="_o").to_dict("records")
                rec = run["recipes"][str(b)]
                sens = self.results.recipe[f"{key}-sensitivity"]
                n = sens.drop_duplicates("module").set_index("module")["n_params"]
                chosen = pd.Series(rec["modules"])
                mix = n.groupby(chosen.reindex(n.index)).sum() / n.sum()
                final = next(r for r in rows if r["requantized"])
                beats = [dict(rule=r["rule"], recall=r["heldout_accuracy_fp_known"])
                         for r in rows if not r["requantized"] and r["heldout_accuracy_fp_known"]
                         > final["heldout_accuracy_fp_known"]]
                budgets.append(dict(budget=b, rows=rows, chosen=rec["repair"],
                                    verdicts=g["verdict"].value_counts().to_dict(),
                                    n_corrected=len(rec.get("ranks") or {}),
                                    final=final, more_recall=beats,
                                    less_kld=[r["rule"] for r in rows if not r["requantized"]
                                              and r["kld_mean"] < final["kld_mean"]],
                                    mix={int(w): float(x) for w, x in mix.items()},
                                    goal=run["goals"][str(b)], seconds=rec["seconds"],
                                    n_rules=len(rec["dynamic"]), base=rec["bits"]))
            corr = {str(r["bits"]): r for r in run["rank_correlation"]}
            runs.append(dict(key=key, model=run["model"], method=run["method"],
                             deterministic=run["deterministic"], corr=corr,
                             eora_ranks=run.get("eora_ranks") or [],
                             n_validated=corr["all"]["n_modules"] // len(
                                 [k for k in corr if k != "all"]),
                             budgets=budgets, round_trip=run["round_trip"],
                             verdicts=None if verdicts is None else dict(
                                 command=verdicts["provenance"]["command"],
                                 machine=self.machine(verdicts),
                                 same=sum(v["same_as"] is not None for v in verdicts["rows"])),
                             n_known=run["n_heldout_fp_known"],
                             sensitivity_seconds=run["sensitivity_seconds"],
                             minutes=run["minutes"], machine=self.machine(run)))
        return sorted(runs, key=lambda r: (MODEL_ORDER.get(r["model"], 2), r["method"]))

    @cached_property
    def activation_runs(self) -> list[dict]:
        """benchmarks/results/activations/: per model, the table's rows, the outliers, each
        scheme's damage per site (averaged over layers) and SmoothQuant's chosen α."""
        if not self.results.has("activations"):
            return []
        runs = []
        for key, run in self.results.activations.items():
            if not isinstance(run, dict):
                continue  # the α CSVs
            o = run["outliers"]
            m = pd.DataFrame(o["massive"])
            m = m[m["massive"]] if len(m) else m
            massive = dict(layers=len(m), channels=sorted(set(m["channel"])),
                           tokens=sorted(set(m["token"].map(repr))), max=m["value"].abs().max()
                           ) if len(m) else None
            dmg = pd.DataFrame(o["damage"]).groupby(["scheme", "site"])[
                ["sqnr_db", "flushed"]].mean()
            damage = {sch: {site: row for site, row in g.droplevel(0).iterrows()}
                      for sch, g in dmg.groupby(level=0)}
            sites = [s for s in ("attn_in", "o_in", "mlp_in", "down_in", "k_cache", "v_cache")
                     if s in dmg.index.get_level_values(1)]
            alpha = {site: {("nan" if k in ("nan", "NaN") else k): v for k, v in counts.items()}
                     for site, counts in run["smoothquant_alpha"].items()}
            runs.append(dict(model=run["model"], n_layers=run["n_layers"], rows=run["rows"],
                             n_known=run["n_heldout_fp_known"], massive=massive,
                             outlier_channels=o["outlier_channels"], damage=damage,
                             damage_sites=sites, alpha=alpha, alphas=sorted(
                                 self.results.activations[f"{key}-alpha"]["alpha"].dropna()
                                 .unique().tolist()),
                             minutes=round(run["seconds"] / 60), machine=self.machine(run)))
        return sorted(runs, key=lambda r: MODEL_ORDER.get(r["model"], 2))

    @cached_property
    def activation_contrast(self) -> dict | None:
        """The rows every measured model has, side by side (docs/activations.md), and the rows
        whose verdict or worst site differs between the models; None with fewer than two."""
        runs = self.activation_runs
        if len(runs) < 2:
            return None
        by_model = [{r["row"]: r for r in run["rows"]} for run in runs]
        shared = [name for name in by_model[0] if all(name in rows for rows in by_model[1:])]
        rows = [dict(row=name, cells=[rows[name] for rows in by_model]) for name in shared]

        def differ(key: str) -> list[str]:
            return [r["row"] for r in rows if len({c.get(key) for c in r["cells"]}) > 1]

        return dict(models=[run["model"] for run in runs], rows=rows,
                    verdict_differs=differ("verdict"), site_differs=differ("worst_site"),
                    collapse=[f"{run['model']} {r['row']}" for run in runs for r in run["rows"]
                              if r["verdict"] == "computation_collapse"])

    def machine(self, result: dict) -> str:
        """The machine a results file was measured on, in words."""
        from mechq.engine.store import machine_text

        return machine_text(result["provenance"]["machine"])

    def as_dict(self) -> dict:
        return dict(results=self.results, code=self.code, ctx=self)


def api_page() -> str:
    """docs/api.md: each public name of ``mechq`` with the first sentence of its docstring."""
    import mechq

    lines = ["# mechq's public API", "",
             "What `import mechq` gives, one line each (generated from `mechq.__all__` and the "
             "docstrings by `scripts/build_docs.py`). Everything else is reachable through its "
             "layer (`mechq.analysis`, `mechq.repair`, …; see ARCHITECTURE.md).", "",
             "| name | what it is |", "|---|---|"]
    for name in mechq.__all__:
        obj = getattr(mechq, name)
        doc = (getattr(obj, "__doc__", None) or "").strip()
        first = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0] if doc else ""
        if not first:
            raise ValueError(f"mechq.{name} has no docstring: every public name needs one.")
        cell = first.replace("|", "\\|")
        lines.append(f"| `mechq.{name}` | {cell} |")
    return "\n".join(lines) + "\n"


def render() -> dict[str, str]:
    """Every generated page: path relative to the repository -> text."""
    env = environment()
    ctx = Context().as_dict()
    pages = {out: env.get_template(t).render(**ctx) for out, t in PAGES.items()}
    pages["docs/api.md"] = api_page()
    return pages


#: numbers in prose that are names, not measurements: §3.1, Fig. 10, Table 2, w4, 2-bit, g128,
#: SmolLM2-135M, Gemma 3, P36, arXiv ids, file names, "Layer 1", ordinals of a list.
_NAMES = re.compile(
    r"(GPT|Gemma|Llama|Qwen|Mistral|SmolLM)[- ]?\d+(\.\d+)?(-\d+[BM])?|seeds? \d+(, \d+)*|\b95 ?%|\d+\.x\b|<\d+|§\s?\d+(\.\d+)*|(Fig(ure)?s?|Table|App(endix)?|[Ss]ection|[Ll]ayer|[Ss]tage|[Nn]otebook)"
    r"\.?\s\d+([–-]\d+)?|\b[wWgGrPAsk]\d+\b|\b\d+-bit\b|\b\d+ bits?\b|[A-Za-z]+\d+[A-Za-z0-9-]*"
    r"|\d+[A-Za-z]+[A-Za-z0-9]*|\d{4}\.\d{4,5}|\b\d+\.\s|\b0\d_|#\d+")
_NUMBER = re.compile(r"(?<![\w.])\d+([.,]\d+)*(\s?%)?")


def stray_numbers(template: str) -> list[str]:
    """Numbers typed into a template's prose: outside ``{{ }}`` / ``{% %}``, code spans and
    blocks, links' targets, and outside the names of :data:`_NAMES`."""
    text = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", " ", template, flags=re.S)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)|<[^>\n]*>", " ", text)
    text = _NAMES.sub(" ", text)
    return [m.group(0) for m in _NUMBER.finditer(text)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare instead of writing; exit 1 on any difference")
    args = ap.parse_args()
    pages = render()
    bad = []
    for rel, text in pages.items():
        path = ROOT / rel
        if args.check:
            old = path.read_text() if path.exists() else ""
            if old != text:
                diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                    f"{rel} (committed)", f"{rel} (generated)"))
                bad.append(f"{rel} differs from its template and results:\n{diff[:3000]}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for t in sorted(TEMPLATES.glob("*.md")):
        typed = stray_numbers(t.read_text())
        if typed:
            bad.append(f"{t.relative_to(ROOT)}: numbers typed into the prose (take them from a "
                       f"results file): {typed[:12]}")
    for b in bad:
        print(b, file=sys.stderr)
    if not args.check:
        print(f"wrote {', '.join(pages)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
