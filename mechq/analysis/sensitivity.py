"""Where does quantization break recall? Layer and component sensitivity (paper §4.3, App. C).

All analyses swap quantized weights into the one model object with :func:`mechq.quant.swap`
(restored bit-identically afterwards) and score each fact's next-token logits at the prompt's last
position as :mod:`mechq.analysis.recall` does (``correct``, ``target_prob``, ``target_rank``, ``top1_id``).
``L`` is the number of blocks.

- **First domino** (:func:`first_domino`, §4.3.1, Fig. 10): for ``k = 0 … L−1`` layers
  ``0 … k`` are quantized with one variant and layers ``k+1 … L−1`` stay FP; ``k = −1`` is the FP
  model. One row per fact × k; aggregate with ``recall.accuracy(df, by=["k"])``. Swaps are
  incremental: step ``k`` enters one more ``swap(model, variant, layers=k)`` inside an
  ``ExitStack``, so no layer is swapped twice and nothing is reloaded.
- **Single-layer sweep** (:func:`single_layer_sweep`, Fig. 22–23): only layer ``l`` quantized
  (optionally only some components), per ``l``. One row per fact × layer.
- **Component sensitivity** (:func:`component_sensitivity`, Table 5): one component group
  quantized in every layer, the rest FP. Settings (paper names): All, MLP, Attn, MLP gate+up,
  MLP down, Q+K, V, O. GELU models (GPT-2) have no gate: there "MLP gate+up" is the MLP input
  matrix (``up`` = ``c_fc``) only. One row per fact × setting.
- **Signal injection** (:func:`signal_injection`, §4.3.2(2), Fig. 12/24): layers ``0 … k−1`` at
  ``high`` precision (a Variant, or ``None`` = FP) and layers ``k … L−1`` at ``low``. For each k
  and layer ``l`` the cosine similarity to the FP model of ``hook_resid_post``, ``hook_attn_out``
  and ``hook_mlp_out`` at the last prompt position, averaged over facts (FP activations are
  computed once and cached at the last position only), plus accuracy and mean target prob per k.

Long sweeps: every analysis takes ``out_path`` (CSV, :class:`mechq.engine.store.Store`). After every
step (a k, a layer, a setting) its per-fact rows are appended to the file and flushed; a re-run
with the same path reads the file and skips the steps already complete there for the same facts
and variant(s), so an interrupted sweep loses nothing it had finished. One file may hold several
variants.

:func:`run_sensitivity` runs the analyses of ``mechq sensitivity`` for several variants, with
accuracy per Robust / Failure subset (:func:`accuracy_by_subset`) and a headline table each.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import FactSet
from mechq.engine.forward import batches, pad_id, score_states
from mechq.quant.variants import Variant, swap
from mechq.analysis.recall import accuracy, score_prompts
from mechq.engine.forward import tokenize_facts
from mechq.engine.store import Store
from mechq.vocab import FP, STREAMS, hook_name

SCORE_COLS = ("correct", "target_prob", "target_rank", "top1_id")
COMPONENT_SETTINGS: dict[str, tuple[str, ...]] = {
    "All": ("all",),
    "MLP": ("mlp",),
    "Attn": ("attn",),
    "MLP gate+up": ("gate", "up"),
    "MLP down": ("down",),
    "Q+K": ("q", "k"),
    "V": ("v",),
    "O": ("o",),
}
#: The per-fact columns every analysis writes after its step columns, and their types.
ROW_TYPES: dict[str, type] = {
    "fact_id": str, "relation": str, "target_id": int, "target_kind": str,
    "correct": bool, "target_prob": float, "target_rank": int, "top1_id": int,
}


class _Prepared:
    """Tokenized facts, reused by every step of a sweep."""

    def __init__(self, model: HookedTransformer, facts: FactSet, batch_size: int):
        if len(facts) == 0:
            raise ValueError("Sensitivity analyses need at least one fact.")
        self.prompts, info = tokenize_facts(model, facts)
        self.info = info[["fact_id", "relation", "target_id", "target_kind"]].copy()
        self.pad = pad_id(model)
        self.batch_size = batch_size

    def batches(self):
        return batches(self.prompts, self.info["target_id"].tolist(), self.batch_size, self.pad)


def _evaluate(model: HookedTransformer, prep: _Prepared) -> pd.DataFrame:
    """Score every fact with the model's current weights: one row per fact."""
    cols = score_prompts(model, prep.prompts, prep.info, batch_size=prep.batch_size)
    df = prep.info.copy()
    for k in SCORE_COLS:
        df[k] = cols[k]
    df["correct"] = df["correct"].astype(bool)
    return df


class _Steps:
    """The steps of one analysis run (a ``k``, a layer, a setting: the ``step`` column), stored
    in a :class:`Store` under ``tags`` (e.g. the variant).

    A step is done when the file holds a row for every requested fact under the same tags; rows
    of other facts or tags in the same file stay on disk but are left out of the result.
    """

    def __init__(self, out_path, prep: _Prepared, step: str, step_type: type,
                 tags: Mapping[str, str], extra: Mapping[str, type] | None = None):
        self.step = step
        self.fact_ids = prep.info["fact_id"].astype(str).tolist()
        types = {**dict.fromkeys(tags, str), step: step_type, **ROW_TYPES, **(extra or {})}
        self.store = Store(out_path, types, where={**tags, "fact_id": self.fact_ids})
        self.done = self.store.done(step, "fact_id", len(set(self.fact_ids)))

    def add(self, df: pd.DataFrame) -> None:
        self.store.add(df)

    def result(self, order: Sequence) -> pd.DataFrame:
        """The steps of ``order`` in that order, each with the facts in their order."""
        out = self.store.frame()
        out = out[out[self.step].isin(list(order)) & out["fact_id"].isin(self.fact_ids)]
        rank_k = {k: i for i, k in enumerate(order)}
        rank_f = {f: i for i, f in enumerate(self.fact_ids)}
        out = out.assign(_k=out[self.step].map(rank_k), _f=out["fact_id"].astype(str).map(rank_f))
        out = out.sort_values(["_k", "_f"], kind="stable").drop(columns=["_k", "_f"])
        out = out.drop_duplicates(subset=[self.step, "fact_id"], keep="last")
        return out.reset_index(drop=True)


def _tag(df: pd.DataFrame, **cols) -> pd.DataFrame:
    for i, (k, v) in enumerate(cols.items()):
        df.insert(i, k, v)
    return df


def first_domino(
    model: HookedTransformer,
    facts: FactSet,
    variant: Variant,
    *,
    ks: Iterable[int] | None = None,
    batch_size: int = 32,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Quantize layers ``0 … k`` with ``variant``, the rest FP; one row per fact × k.

    ``ks`` defaults to ``0 … L−1``; ``k = −1`` (no quantized layer) is the FP model. Columns:
    variant, k, fact_id, relation, target_id, target_kind, correct, target_prob, target_rank,
    top1_id. With ``out_path`` each k's rows are appended to a CSV and finished ks are skipped.
    """
    L = model.cfg.n_layers
    ks = sorted(set(range(L) if ks is None else ks))
    if not ks or ks[0] < -1 or ks[-1] >= L:
        raise ValueError(f"ks must lie in −1 … {L - 1}, got {ks}.")
    prep = _Prepared(model, facts, batch_size)
    store = _Steps(out_path, prep, "k", int, dict(variant=variant.name))
    todo = set(k for k in ks if k not in store.done)
    bar = tqdm(total=len(todo), desc=f"first domino {variant.name}", unit="k",
               disable=not progress)
    with ExitStack() as stack:
        done = -1  # layers 0 … done are quantized
        for k in ks:
            if k not in todo:
                continue
            while done < k:  # one more layer's swap per step
                done += 1
                stack.enter_context(swap(model, variant, layers=done))
            store.add(_tag(_evaluate(model, prep), variant=variant.name, k=k))
            bar.update(1)
    bar.close()
    return store.result(ks)


def single_layer_sweep(
    model: HookedTransformer,
    facts: FactSet,
    variant: Variant,
    *,
    layers: Iterable[int] | None = None,
    components: str | Iterable[str] = "all",
    batch_size: int = 32,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Only layer ``l`` quantized (``components`` of it), per ``l``; one row per fact × layer."""
    L = model.cfg.n_layers
    layers = sorted(set(range(L) if layers is None else layers))
    prep = _Prepared(model, facts, batch_size)
    comp = components if isinstance(components, str) else "+".join(components)
    store = _Steps(out_path, prep, "layer", int, dict(variant=variant.name, components=comp))
    todo = [l for l in layers if l not in store.done]
    for l in tqdm(todo, desc=f"single layer {variant.name}", unit="layer", disable=not progress):
        with swap(model, variant, layers=l, components=components):
            store.add(_tag(_evaluate(model, prep), variant=variant.name, components=comp,
                           layer=l))
    return store.result(layers)


def component_sensitivity(
    model: HookedTransformer,
    facts: FactSet,
    variant: Variant,
    *,
    settings: Sequence[str] | None = None,
    batch_size: int = 32,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Quantize one component group in all layers (Table 5); one row per fact × setting.

    Settings: All, MLP, Attn, MLP gate+up, MLP down, Q+K, V, O (:data:`COMPONENT_SETTINGS`).
    For GELU models without a gate, "MLP gate+up" quantizes ``up`` only. With ``out_path`` each
    setting's rows are appended to a CSV and finished settings are skipped.
    """
    settings = list(COMPONENT_SETTINGS) if settings is None else list(settings)
    unknown = [x for x in settings if x not in COMPONENT_SETTINGS]
    if unknown or not settings:
        raise ValueError(f"Unknown settings {unknown}; choose from {list(COMPONENT_SETTINGS)}.")
    prep = _Prepared(model, facts, batch_size)
    store = _Steps(out_path, prep, "setting", str, dict(variant=variant.name))
    todo = [x for x in settings if x not in store.done]
    for name in tqdm(todo, desc=f"components {variant.name}", unit="setting",
                     disable=not progress):
        with swap(model, variant, components=COMPONENT_SETTINGS[name]):
            store.add(_tag(_evaluate(model, prep), variant=variant.name, setting=name))
    return store.result(settings)


@torch.no_grad()
def _last_acts(model: HookedTransformer, prep: _Prepared):
    """Per fact: stream activations at the last position (n, L, 3, d) and the score columns."""
    L, d = model.cfg.n_layers, model.cfg.d_model
    names = {hook_name(h, l): (l, j) for l in range(L) for j, h in enumerate(STREAMS)}
    acts = torch.empty(len(prep.prompts), L, len(STREAMS), d)
    scores = {k: torch.empty(len(prep.prompts), dtype=torch.float64) for k in SCORE_COLS}
    dev = model.cfg.device
    for idx, b in prep.batches():
        rows = torch.arange(len(idx), device=dev)
        last = (b.lengths - 1).to(dev)
        buf = torch.empty(len(idx), L, len(STREAMS), d, device=dev)

        def grab(act, hook):
            l, j = names[hook.name]
            buf[:, l, j] = act[rows, last].float()

        resid = model.run_with_hooks(b.tokens.to(dev), fwd_hooks=[(lambda n: n in names, grab)],
                                     stop_at_layer=L)
        s = score_states(model, resid[rows, last], b.targets, chunk=len(idx))
        acts[idx] = buf.cpu()
        for k in SCORE_COLS:
            scores[k][idx] = s[k].double()
    return acts, scores


def signal_injection(
    model: HookedTransformer,
    facts: FactSet,
    high: Variant | None,
    low: Variant,
    *,
    ks: Iterable[int],
    batch_size: int = 32,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Layers ``0 … k−1`` at ``high`` (None = FP), ``k … L−1`` at ``low``; cosine to FP.

    One row per k × layer × stream (resid_post, attn_out, mlp_out): ``cos_mean`` and
    ``cos_median`` over facts of the cosine similarity to the FP activation at the last position,
    ``n``; and per k (repeated on its rows) ``accuracy`` and ``mean_target_prob``. The per-fact
    scores and cosines of each k (columns ``cos_<stream>_<layer>``) are in
    ``df.attrs["recall"]``; with ``out_path`` those per-fact rows are appended to a CSV per k and
    finished ks are skipped.
    """
    L = model.cfg.n_layers
    ks = sorted(set(ks))
    if not ks or ks[0] < 0 or ks[-1] > L:
        raise ValueError(f"ks must lie in 0 … {L}, got {ks}.")
    prep = _Prepared(model, facts, batch_size)
    hname = high.name if high is not None else FP
    cos_cols = [f"cos_{stream}_{l}" for l in range(L) for stream in STREAMS]  # (L, S) order
    store = _Steps(out_path, prep, "k", int, dict(high=hname, low=low.name),
                   extra=dict.fromkeys(cos_cols, float))
    todo = [k for k in ks if k not in store.done]
    fp_acts = _last_acts(model, prep)[0] if todo else None
    for k in tqdm(todo, desc=f"injection {hname}→{low.name}", unit="k", disable=not progress):
        spec = {l: (high if l < k else low) for l in range(L)}
        with swap(model, spec):  # all None (k = L, high FP): nothing is swapped
            acts, sc = _last_acts(model, prep)
        cos = torch.nn.functional.cosine_similarity(acts, fp_acts, dim=-1)  # (n, L, S)
        r = _tag(prep.info.copy(), high=hname, low=low.name, k=k)
        for c in SCORE_COLS:
            r[c] = sc[c].numpy()
        r["correct"] = r["correct"].astype(bool)
        r["target_rank"] = r["target_rank"].astype(int)
        r["top1_id"] = r["top1_id"].astype(int)
        r = pd.concat([r, pd.DataFrame(cos.reshape(len(r), -1).numpy(), columns=cos_cols)],
                      axis=1)
        store.add(r)
    recall = store.result(ks)
    frames = []
    for k, g in recall.groupby("k", sort=False):
        cos = torch.tensor(g[cos_cols].to_numpy()).reshape(len(g), L, len(STREAMS))
        for j, stream in enumerate(STREAMS):
            frames.append(pd.DataFrame({
                "high": hname, "low": low.name, "k": k, "layer": range(L), "stream": stream,
                "cos_mean": cos[:, :, j].mean(0).numpy(),
                "cos_median": cos[:, :, j].median(0).values.numpy(),
                "n": len(g), "accuracy": g["correct"].mean(),
                "mean_target_prob": g["target_prob"].mean(),
            }))
    out = pd.concat(frames, ignore_index=True)
    out.attrs["recall"] = recall
    return out


ANALYSES = ("domino", "single", "components", "injection")


def accuracy_by_subset(df: pd.DataFrame, labels: Mapping[str, str] | None,
                       keys: Sequence[str]) -> pd.DataFrame:
    """:func:`mechq.analysis.recall.accuracy` per variant × subset × ``keys``: the subsets named by
    ``labels`` (fact id → e.g. Robust / Failure) and ``"all"`` (every fact)."""
    both = df.assign(subset="all")
    if labels is not None:
        both = pd.concat([df.assign(subset=df["fact_id"].map(labels)), both], ignore_index=True)
    return accuracy(both, ["variant", "subset", *keys])


@dataclass
class Analysis:
    """One analysis of :func:`run_sensitivity`: its frame (also written to ``out``) and its
    headline table, with a title saying what the table shows."""

    frame: pd.DataFrame
    table: pd.DataFrame
    title: str


def run_sensitivity(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence[Variant],
    *,
    analyses: Iterable[str] = ("domino", "components", "injection"),
    labels: Mapping[str, str] | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    injection_high: Sequence[Variant | None] = (None,),
    injection_low: Variant | None = None,
    injection_ks: Iterable[int] | None = None,
    progress: bool = True,
) -> dict[str, Analysis]:
    """The analyses of ``mechq sensitivity`` (of :data:`ANALYSES`) for every variant.

    - ``"domino"``: :func:`first_domino` for ``k = −1 … L−1``; frame: accuracy per variant ×
      subset × k (:func:`accuracy_by_subset`); table: accuracy at a few ks.
    - ``"single"``: :func:`single_layer_sweep`; frame: accuracy per variant × subset × layer;
      table: each variant's three most damaging layers.
    - ``"components"``: :func:`component_sensitivity`; frame: accuracy per variant × subset ×
      setting; table: setting × (variant, subset).
    - ``"injection"``: :func:`signal_injection` from each of ``injection_high`` (``None``: FP)
      to ``injection_low`` (default: the last variant) at ``injection_ks`` (default
      ``0, L/10, L/5, L/3, L/2, 2L/3, L``); frame: its per-layer cosines; table: cosine to FP
      at the last layer, and accuracy, per high × k.

    ``labels``: fact id → subset name (Robust / Failure). ``out`` (a folder): each sweep
    resumes from and appends to its CSV there (``first_domino_<variant>.csv``,
    ``single_layer_<variant>.csv``, ``component_sensitivity.csv``,
    ``signal_injection_recall.csv``) and each frame is written as ``first_domino_accuracy.csv``,
    ``single_layer_accuracy.csv``, ``component_accuracy.csv``, ``signal_injection.csv``.
    Returns the analyses run, in the order of :data:`ANALYSES`.
    """
    analyses = set(analyses)
    unknown = analyses - set(ANALYSES)
    if unknown:
        raise ValueError(f"Unknown analyses {sorted(unknown)}; choose from {ANALYSES}.")
    out = Path(out) if out is not None else None
    L = model.cfg.n_layers
    kw = dict(batch_size=batch_size, progress=progress)

    def path(name: str) -> Path | None:
        return out / name if out is not None else None

    def write(frame: pd.DataFrame, name: str) -> None:
        if out is not None:
            frame.to_csv(out / name, index=False)

    res: dict[str, Analysis] = {}
    if "domino" in analyses:
        df = pd.concat([first_domino(model, facts, v, ks=range(-1, L),
                                     out_path=path(f"first_domino_{v.name}.csv"), **kw)
                        for v in variants], ignore_index=True)
        acc = accuracy_by_subset(df, labels, ["k"])
        write(acc, "first_domino_accuracy.csv")
        ks = sorted({-1, 0, 1, 2, 4, L // 4, L // 2, 3 * L // 4, L - 1})
        table = acc[acc.k.isin(ks)].pivot_table(index=["variant", "subset"], columns="k",
                                                values="accuracy", sort=False)
        res["domino"] = Analysis(acc, table, "first domino: accuracy with layers 0…k quantized "
                                             "(k = -1: FP)")
    if "single" in analyses:
        df = pd.concat([single_layer_sweep(model, facts, v,
                                           out_path=path(f"single_layer_{v.name}.csv"), **kw)
                        for v in variants], ignore_index=True)
        acc = accuracy_by_subset(df, labels, ["layer"])
        write(acc, "single_layer_accuracy.csv")
        worst = (acc[acc.subset == "all"].sort_values(["variant", "accuracy"])
                 .groupby("variant", sort=False).head(3))
        res["single"] = Analysis(acc, worst.set_index(["variant", "layer"])[["accuracy", "n"]],
                                 "single layer: the three most damaging layers")
    if "components" in analyses:
        df = pd.concat([component_sensitivity(model, facts, v,
                                              out_path=path("component_sensitivity.csv"), **kw)
                        for v in variants], ignore_index=True)
        acc = accuracy_by_subset(df, labels, ["setting"])
        write(acc, "component_accuracy.csv")
        table = acc.pivot_table(index="setting", columns=["variant", "subset"],
                                values="accuracy", sort=False)
        res["components"] = Analysis(acc, table, "component table: accuracy with only this "
                                                 "component quantized")
    if "injection" in analyses:
        low = injection_low if injection_low is not None else variants[-1]
        ks = injection_ks or sorted({0, L // 10, L // 5, L // 3, L // 2, 2 * L // 3, L})
        parts = []
        for high in injection_high:  # per-fact rows: signal_injection_recall.csv
            part = signal_injection(model, facts, high, low, ks=ks,
                                    out_path=path("signal_injection_recall.csv"), **kw)
            part.attrs.clear()
            parts.append(part)
        inj = pd.concat(parts, ignore_index=True)
        write(inj, "signal_injection.csv")
        table = inj[inj.layer == L - 1].pivot_table(index=["high", "k"], columns="stream",
                                                    values="cos_mean", sort=False)
        table["accuracy"] = inj.groupby(["high", "k"], sort=False)["accuracy"].first()
        res["injection"] = Analysis(inj, table, f"signal injection → {low.name}: cosine to FP "
                                                "at the last layer, and accuracy")
    return res
