"""The architecture contrast: where quantization damage starts, and which protection repairs it,
measured side by side on two model families (paper §4.3, Fig. 10 and Fig. 22).

The paper finds that Llama / Mistral have an early representation bottleneck (the first-domino
curve falls within the first layers, and protecting the first layers repairs them) while Qwen /
Gemma degrade uniformly (kurtosis-ranked protection repairs them). :func:`compare_architectures`
measures the same things on any models mechq loads, with the same settings for each:

- **cliff**: GPTQ at :data:`CLIFF_BITS` (group size 128, default calibration; ``method="rtn"``
  gives a calibration-free contrast in seconds, for teaching), first-token recall on all facts;
- on ``n_facts`` facts each FP model answers correctly (:func:`mechq.diagnosis.verdict.fp_correct_sample`,
  its own sample per model), with the variant at ``sweep_bits`` (default 2, where recall dies):
  the **first-domino** curve (layers ``0 … k`` quantized), the **single-layer** sweep (only layer
  ``l`` quantized) and **component sensitivity** (one component group in every layer). Depth is
  also given as a fraction, ``(k + 1) / L``, so a 30-layer and an 18-layer model share an axis;
- **protection** at ``protect_bits`` (default 3, where the paper's repairs apply): the first
  :data:`mechq.repair.table.PROTECT_K` layers at 8 bits, and kurtosis-ranked modules at 8 bits within the
  *same* estimated bit budget (:func:`mechq.repair.protect.kurtosis_protection`), each quantized by GPTQ;
  accuracy on the held-out half of the facts (:func:`mechq.repair.amplify.dev_heldout`) and on the
  held-out facts FP knows. The **winner** (:func:`protection_winner`) is the protection with
  the most held-out FP-known facts right, if it beats both the other and the unprotected
  baseline;
- **diagnose** each cliff variant, and the **recommendation** that follows from the verdict and
  the measured winner (:func:`recommendation`).

Every frame carries a ``model`` column. The models here have 135M and 270M parameters, the
paper's 8B; the contrast measured on them is a property of these small models first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.repair import protect
from mechq.repair.amplify import dev_heldout
from mechq.facts import FactSet, bundled_facts
from mechq.quant.quantize import Request, quantize_many
from mechq.analysis.recall import accuracy, evaluate_recall
from mechq.repair.table import PROTECT_BITS, PROTECT_K
from mechq.analysis.sensitivity import component_sensitivity, first_domino, single_layer_sweep
from mechq.diagnosis.verdict import N_FACTS, diagnose_many, fp_correct_sample
from mechq.engine.store import atomic_write
from mechq.vocab import FP

CLIFF_BITS = (8, 4, 3, 2)
PROTECTIONS = ("baseline", "early-layers", "kurtosis")


@dataclass
class Comparison:
    """The frames of :func:`compare_architectures`, each with a ``model`` column.

    ``cliff``: accuracy per model × variant (with ``bits``); ``domino``: accuracy per model × k
    (``depth`` = (k+1)/L; k = −1 is FP); ``single``: accuracy per model × layer (``depth`` =
    (layer+1)/L); ``components``: accuracy per model × setting; ``protection``: per model ×
    protection, ``avg_bits``, held-out ``accuracy`` and ``fp_known_accuracy``; ``verdicts``: per
    model × variant, the verdict, its reason and the recommendation; ``winners``: per model, the
    protection that won (``None``: neither beat the baseline and the other)."""

    cliff: pd.DataFrame
    domino: pd.DataFrame
    single: pd.DataFrame
    components: pd.DataFrame
    protection: pd.DataFrame
    verdicts: pd.DataFrame
    winners: dict[str, str | None] = field(default_factory=dict)

    def frames(self) -> dict[str, pd.DataFrame]:
        return dict(cliff=self.cliff, domino=self.domino, single=self.single,
                    components=self.components, protection=self.protection,
                    verdicts=self.verdicts)

    def save(self, folder: str | Path) -> list[Path]:
        """Write each frame as ``architectures_<frame>.csv`` (what ``mechq
        compare-architectures`` writes) and return the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for key, frame in self.frames().items():
            paths.append(folder / f"architectures_{key}.csv")
            with atomic_write(paths[-1], newline="") as fh:  # never a half-written frame
                frame.to_csv(fh, index=False)
        return paths

    @classmethod
    def load(cls, folder: str | Path) -> Comparison:
        """Read back what :meth:`save` wrote; the winners are recomputed from ``protection``."""
        folder = Path(folder)
        names = [f.name for f in fields(cls) if f.name != "winners"]
        missing = [n for n in names if not (folder / f"architectures_{n}.csv").exists()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks architectures_{{{','.join(missing)}}}.csv: write them with "
                "`mechq compare-architectures --out` or Comparison.save.")
        frames = {n: pd.read_csv(folder / f"architectures_{n}.csv") for n in names}
        winners = {m: protection_winner(g) for m, g in
                   frames["protection"].groupby("model", sort=False)}
        return cls(**frames, winners=winners)


def protection_requests(model: HookedTransformer, bits: int = 3, group_size: int = 128,
                        method: str = "gptq", **calibration) -> dict[str, Request]:
    """The base request (``method``: gptq or rtn) and its two protections at one bit budget:
    the first :data:`PROTECT_K` layers at :data:`PROTECT_BITS` bits, and kurtosis-ranked modules
    at :data:`PROTECT_BITS` bits filling the budget the early-layer rule spends. ``calibration``:
    :class:`~mechq.quant.quantize.Request` fields (``n_samples``, ``seq_len``, ``seed``)."""
    early = protect.early_layers(model, k=PROTECT_K, high=PROTECT_BITS)
    budget = protect.estimated_bits(model, bits, group_size,
                                    protect.early_modules(model, PROTECT_K, PROTECT_BITS))
    kurt = protect.kurtosis_protection(model, bits, budget, group_size, PROTECT_BITS)
    base = Request(method, bits, group_size, **calibration)
    return {"baseline": base, "early-layers": replace(base, dynamic=early),
            "kurtosis": replace(base, dynamic=kurt or None)}


def protection_winner(protection: pd.DataFrame) -> str | None:
    """The protection with the most held-out FP-known facts right, if it has strictly more than
    both the other protection and the unprotected baseline; ``None`` otherwise."""
    right = protection.set_index("protection")["fp_known_correct"]
    best = max(("early-layers", "kurtosis"), key=lambda k: right[k])
    other = "kurtosis" if best == "early-layers" else "early-layers"
    return best if right[best] > max(right[other], right["baseline"]) else None


def recommendation(verdict: str, winner: str | None) -> str:
    """What a verdict calls for (paper §4.3), with the protection measured to win on this model.

    healthy → nothing; signal_degradation → the winning protection (and peak-signal
    amplification, which mechq measures separately); computation_collapse → no training-free
    repair: more bits; format_bug → fix how the checkpoint is read."""
    if verdict == "healthy":
        return "none needed"
    if verdict == "signal_degradation":
        how = {"early-layers": f"protect the first {PROTECT_K} layers at {PROTECT_BITS} bits",
               "kurtosis": f"protect kurtosis-ranked modules at {PROTECT_BITS} bits"}
        return how.get(winner or "", "neither protection beat the unprotected variant here")
    if verdict == "computation_collapse":
        return "no training-free repair: more bits"
    return "fix the checkpoint reader"


def check_settings(bits: Sequence[int], sweep_bits: int, protect_bits: int,
                   method: str = "gptq") -> None:
    """Raise ``ValueError`` before any work if the settings cannot make a comparison."""
    if method not in ("gptq", "rtn"):
        raise ValueError(f"compare_architectures quantizes with gptq or rtn, not {method!r}.")
    if sweep_bits not in bits or protect_bits not in bits:
        raise ValueError(f"sweep_bits ({sweep_bits}) and protect_bits ({protect_bits}) must be "
                         f"among the cliff's bits {list(bits)}")
    if protect_bits >= PROTECT_BITS:
        raise ValueError(f"protect_bits ({protect_bits}) must be below the {PROTECT_BITS} bits "
                         "protected modules get.")


def _depth(df: pd.DataFrame, col: str, n_layers: int) -> pd.DataFrame:
    return df.assign(depth=(df[col] + 1) / n_layers)


def compare_one(name: str, model: HookedTransformer, facts: FactSet | None = None, *,
                bits: Sequence[int] = CLIFF_BITS, sweep_bits: int = 2, protect_bits: int = 3,
                n_facts: int = N_FACTS, batch_size: int = 32, progress: bool = True,
                method: str = "gptq", **calibration) -> Comparison:
    """Every measurement of the module docstring on one model (``name`` fills ``model``).
    ``bits``: the cliff's widths, which must include ``sweep_bits`` and ``protect_bits``;
    ``method``: gptq (the paper's) or rtn; ``calibration``: Request fields for every GPTQ run
    (default: mechq's default calibration)."""
    facts = bundled_facts() if facts is None else facts
    bits = tuple(bits)
    check_settings(bits, sweep_bits, protect_bits, method)
    if method == "rtn" and calibration:
        raise ValueError(f"RTN takes no calibration; got {sorted(calibration)}.")
    prot = protection_requests(model, protect_bits, method=method, **calibration)
    reqs = [Request(method, b, 128, **calibration) for b in bits] + [prot["early-layers"],
                                                                     prot["kurtosis"]]
    made = quantize_many(model, reqs, progress=progress)
    cliff_vs = dict(zip(bits, made[:len(bits)]))
    prot_vs = {"baseline": cliff_vs[protect_bits], "early-layers": made[-2],
               "kurtosis": made[-1]}
    L = model.cfg.n_layers

    rec = evaluate_recall(model, facts, list(cliff_vs.values()) + [prot_vs["early-layers"],
                                                                    prot_vs["kurtosis"]],
                          progress=progress, batch_size=batch_size)
    width = {FP: float("nan"), **{v.name: float(b) for b, v in cliff_vs.items()}}
    cliff = accuracy(rec[rec["variant"].isin(width)]).assign(
        bits=lambda d: d["variant"].map(width))

    sample = fp_correct_sample(model, facts, n=n_facts)
    low = cliff_vs[sweep_bits]
    kw = dict(batch_size=batch_size, progress=progress)
    domino = _depth(accuracy(first_domino(model, sample, low, ks=range(-1, L), **kw),
                             ["variant", "k"]), "k", L)
    single = _depth(accuracy(single_layer_sweep(model, sample, low, **kw),
                             ["variant", "layer"]), "layer", L)
    comps = accuracy(component_sensitivity(model, sample, low, **kw), ["variant", "setting"])

    _, held = dev_heldout(facts)
    held_ids = {f.id for f in held}
    fp_ok = set(rec.loc[(rec["variant"] == FP) & rec["correct"], "fact_id"]) & held_ids
    rows = []
    for kind, v in prot_vs.items():
        r = rec[(rec["variant"] == v.name) & rec["fact_id"].isin(held_ids)]
        known = r[r["fact_id"].isin(fp_ok)]
        rows.append(dict(protection=kind, variant=v.name, avg_bits=v.avg_bits,
                         accuracy=float(r["correct"].mean()), n=len(r),
                         fp_known_accuracy=float(known["correct"].mean()),
                         fp_known_n=len(known), fp_known_correct=int(known["correct"].sum())))
    protection = pd.DataFrame(rows)
    winner = protection_winner(protection)

    diags = diagnose_many(model, list(cliff_vs.values()), facts, n_facts=n_facts,
                          batch_size=batch_size)
    verdicts = pd.DataFrame([dict(variant=d.variant, bits=float(b), verdict=d.verdict,
                                  borderline=d.borderline or "",
                                  reason=d.reason,
                                  recommendation=recommendation(d.verdict, winner))
                             for b, d in zip(bits, diags)])
    tag = {"model": name}
    return Comparison(*(f.assign(**tag) for f in (cliff, domino, single, comps, protection,
                                                   verdicts)), winners={name: winner})


def compare_architectures(models: Mapping[str, HookedTransformer], facts: FactSet | None = None,
                          **kw) -> Comparison:
    """:func:`compare_one` for each model, frames concatenated (module docstring)."""
    if len(models) < 1:
        raise ValueError("compare_architectures needs at least one model.")
    check_settings(tuple(kw.get("bits", CLIFF_BITS)), kw.get("sweep_bits", 2),
                   kw.get("protect_bits", 3), kw.get("method", "gptq"))
    parts = [compare_one(name, m, facts, **kw) for name, m in models.items()]
    frames = {k: pd.concat([p.frames()[k] for p in parts], ignore_index=True)
              for k in parts[0].frames()}
    winners = {k: v for p in parts for k, v in p.winners.items()}
    return Comparison(**frames, winners=winners)


def contrast_table(c: Comparison, depths: Sequence[float] = (0.1, 0.25, 0.5)) -> pd.DataFrame:
    """One row per model: FP and GPTQ recall per width, first-domino recall once the first
    ``depths`` of the layers are quantized, the most damaging single layer (and its depth), the
    most damaging component setting, the protection that won and the w4 / w2 verdicts."""
    rows = []
    for model, cl in c.cliff.groupby("model", sort=False):
        row = {"model": model}
        for _, r in cl.iterrows():
            row["FP" if r["variant"] == FP else f"w{int(r['bits'])}"] = r["accuracy"]
        dom = c.domino[c.domino["model"] == model]
        for d in depths:
            at = dom[dom["depth"] <= d + 1e-9]
            row[f"domino@{d:g}"] = float(at.sort_values("depth")["accuracy"].iloc[-1]) \
                if len(at) else float("nan")
        sl = c.single[c.single["model"] == model].sort_values("accuracy")
        row["worst layer"] = int(sl["layer"].iloc[0])
        row["worst layer depth"] = float(sl["depth"].iloc[0])
        row["worst layer accuracy"] = float(sl["accuracy"].iloc[0])
        comp = c.components[(c.components["model"] == model)
                            & (c.components["setting"] != "All")].sort_values("accuracy")
        row["most damaging component"] = comp["setting"].iloc[0]
        row["protection winner"] = c.winners.get(model) or "neither"
        for _, r in c.verdicts[c.verdicts["model"] == model].iterrows():
            row[f"verdict w{int(r['bits'])}"] = r["verdict"]
        rows.append(row)
    return pd.DataFrame(rows)
