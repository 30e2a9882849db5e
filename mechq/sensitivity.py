"""Where does quantization break recall? Layer and component sensitivity (paper §4.3, App. C).

All analyses swap quantized weights into the one model object with :func:`mechq.quant.swap`
(restored bit-identically afterwards) and score each fact's next-token logits at the prompt's last
position as :mod:`mechq.recall` does (``correct``, ``target_prob``, ``target_rank``, ``top1_id``).
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

Long sweeps: every analysis takes ``out_path`` (CSV). After every step (a k, a layer, a
setting) its per-fact rows are appended to the file and flushed; a re-run with the same path
reads the file and skips the steps already complete there for the same facts and variant(s), so
an interrupted sweep loses nothing it had finished. One file may hold several variants.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.facts import FactSet
from mechq.quant.variants import Variant, swap
from mechq.recall import batches, score, score_prompts, tokenize_facts

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
STREAMS = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


class _Prepared:
    """Tokenized facts, reused by every step of a sweep."""

    def __init__(self, model: HookedTransformer, facts: FactSet, batch_size: int):
        if len(facts) == 0:
            raise ValueError("Sensitivity analyses need at least one fact.")
        self.prompts, info = tokenize_facts(model, facts)
        self.info = info[["fact_id", "relation", "target_id", "target_kind"]].copy()
        self.pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
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


class _Store:
    """Append-only CSV of finished steps, or an in-memory list without a path.

    A step (a value of the ``key`` column: ``k`` or ``layer``) counts as done when the file holds
    a row for every requested fact under the same ``tags`` (e.g. the variant); rows of other
    facts or variants in the same file are kept on disk but left out of the result.
    """

    def __init__(self, out_path: str | os.PathLike | None, key: str, fact_ids: Sequence[str],
                 required: Sequence[str] = (), **tags):
        self.path = Path(out_path) if out_path is not None else None
        if self.path is not None and self.path.suffix.lower() != ".csv":
            raise ValueError(f"out_path must be a .csv file, got {self.path}.")
        self.key, self.tags = key, tags
        self.fact_ids = [str(f) for f in fact_ids]
        self.frames: list[pd.DataFrame] = []
        self.done: set = set()
        if self.path is not None and self.path.exists() and self.path.stat().st_size > 0:
            old = pd.read_csv(self.path, dtype={"fact_id": str, "relation": str,
                                                "target_kind": str, "components": str})
            missing = sorted(set([key, "fact_id", "correct", *tags, *required]) - set(old))
            if missing:
                raise ValueError(f"{self.path} was not written by this analysis (no columns "
                                 f"{missing[:4]}); give another out_path.")
            old["correct"] = old["correct"].astype(bool)
            for col, val in tags.items():
                old = old[old[col].astype(str) == str(val)]
            old = old[old["fact_id"].isin(self.fact_ids)]
            self.frames.append(old)
            have = old.groupby(key)["fact_id"].nunique()
            self.done = set(have[have == len(set(self.fact_ids))].index.tolist())

    def add(self, df: pd.DataFrame) -> None:
        self.frames.append(df)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = not (self.path.exists() and self.path.stat().st_size > 0)
            with open(self.path, "a", newline="") as fh:
                df.to_csv(fh, header=header, index=False)
                fh.flush()
                os.fsync(fh.fileno())

    def result(self, order: Sequence) -> pd.DataFrame:
        out = pd.concat(self.frames, ignore_index=True)
        out = out[out[self.key].isin(list(order)) & out["fact_id"].isin(self.fact_ids)]
        rank_k = {k: i for i, k in enumerate(order)}
        rank_f = {f: i for i, f in enumerate(self.fact_ids)}
        out = out.assign(_k=out[self.key].map(rank_k), _f=out["fact_id"].astype(str).map(rank_f))
        out = out.sort_values(["_k", "_f"], kind="stable").drop(columns=["_k", "_f"])
        out = out.drop_duplicates(subset=[self.key, "fact_id"], keep="last")
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
    store = _Store(out_path, "k", prep.info["fact_id"].tolist(), variant=variant.name)
    todo = set(k for k in ks if k not in store.done)
    bar = tqdm(total=len(todo), desc=f"first domino {variant.name}", unit="k",
               disable=not progress)
    with ExitStack() as stack:
        swapped = -1  # layers 0 … swapped are quantized
        for k in ks:
            if k not in todo:
                continue
            while swapped < k:  # one more layer's swap per step
                swapped += 1
                stack.enter_context(swap(model, variant, layers=swapped))
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
    store = _Store(out_path, "layer", prep.info["fact_id"].tolist(), variant=variant.name,
                   components=comp)
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
    store = _Store(out_path, "setting", prep.info["fact_id"].tolist(), variant=variant.name)
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
    names = {f"blocks.{l}.{h}": (l, j) for l in range(L) for j, h in enumerate(STREAMS.values())}
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
        lr = resid[rows, last]
        logits = model.unembed(model.ln_final(lr[:, None, :]))[:, 0].float()
        s = score(logits, b.targets)
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
    hname = high.name if high is not None else "fp"
    cos_cols = [f"cos_{stream}_{l}" for l in range(L) for stream in STREAMS]  # (L, S) order
    store = _Store(out_path, "k", prep.info["fact_id"].tolist(), required=cos_cols, high=hname,
                   low=low.name)
    todo = [k for k in ks if k not in store.done]
    fp_acts = _last_acts(model, prep)[0] if todo else None
    for k in tqdm(todo, desc=f"injection {hname}→{low.name}", unit="k", disable=not progress):
        spec = {l: (high if l < k else low) for l in range(L)}
        with swap(model, spec) if any(v is not None for v in spec.values()) else nullcontext():
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
