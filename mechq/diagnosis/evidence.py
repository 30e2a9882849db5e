"""The evidence behind a verdict: each signature measured fact by fact, with a 95 % interval.

A diagnosis runs on ``n`` facts the FP model answers correctly. For each variant,
:func:`observe` records per fact what every signature needs, in a few batched passes:

- one hooked forward (FP's once for all variants): at the last token of every layer, the
  residual stream (for the logit lens and CKA), each head's attention row, and the FFN gate
  pre-activation and output activation;
- the first layers quantized and the rest FP (first domino); the first half FP and the rest
  quantized (signal injection);
- the variant's next-token distribution against FP's on held-out text (:mod:`mechq.analysis.kld`).

:func:`statistics` turns the observations of any subset of the facts into the signature values
(definitions: :data:`SIGNATURES`), so that :func:`bootstrap` can resample facts with replacement
and read each signature's 2.5th and 97.5th percentiles: the interval a different sample of facts
would likely give. The KLD's interval resamples held-out passages instead (positions within a
passage are not independent). Layer sets are shares of the depth and ranks shares of the
vocabulary, so the same definitions apply to models of any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.analysis.components import js_divergence, sign_flip_rate, topk_jaccard
from mechq.analysis.kld import Reference, final_states, fp_reference, token_kld
from mechq.analysis.recall import score_prompts
from mechq.analysis.signatures import weight_signatures
from mechq.engine.activations import _collect, prompt_positions
from mechq.engine.forward import decode, last_states, score, tokenize_facts
from mechq.facts import FactSet
from mechq.quant.variants import Variant, swap
from mechq.vocab import hook_template

#: signature -> what it is (the paper section in brackets); the order of the evidence table
SIGNATURES = {
    "recall": "share of the FP-correct facts whose answer is still the top prediction (§3.1)",
    "median_rank": "median rank of the answer at the output (§3.2)",
    "kld_mean": "mean KL divergence of the next-token distribution from FP's on held-out "
                "text, nats",
    "same_top1": "share of held-out positions where the top prediction is FP's",
    "failure_best_rank": "median over the Failure facts of the answer's best logit-lens rank "
                         "in the second half of the layers, as a share of the vocabulary (§3.3)",
    "attn_jsd": "Jensen-Shannon divergence of each head's attention at the last token from "
                "FP's, nats, mean over heads and layers (§4.1)",
    "sign_flip": "share of FFN gate pre-activations whose sign differs from FP's (§4.1)",
    "topk_jaccard": "Jaccard overlap of the top 1 % FFN neurons with FP's (§4.1)",
    "cka_min": "lowest linear CKA to FP of the residual stream over the layers (§4.2)",
    "first_layers_recall": "recall with only the first layers quantized (first domino, §4.3)",
    "injection_cosine": "cosine to FP of the last residual stream when the first half of the "
                        "layers is FP (signal injection, §4.3)",
}
#: the first domino quantizes this share of the layers (at least one layer)
FIRST_LAYERS_SHARE = 0.07
N_BOOT = 1000
CKA_LAYERS = 3  # layers whose CKA the bootstrap resamples (the lowest on all facts)
KLD_TOKENS = 4096  # held-out tokens a diagnosis compares (the first passages)
_HOOKS = {k: hook_template(k) for k in ("pattern", "pre", "post", "resid_post")}


def first_layers(n_layers: int) -> int:
    """How many layers the first domino quantizes: :data:`FIRST_LAYERS_SHARE` of the depth,
    rounded, and at least one."""
    return max(1, round(FIRST_LAYERS_SHARE * n_layers))


@dataclass
class FPObservation:
    """What every variant is compared with: FP's activations on the facts and its reference on
    the held-out text."""

    facts: FactSet
    prompts: list[list[int]]
    targets: Tensor
    acts: dict
    grams: Tensor                 # [layer, n, n] uncentred Gram matrices of the residual stream
    last_resid: Tensor            # [n, d_model] residual stream after the last block
    kld_ref: Reference | None


@dataclass
class Observation:
    """One variant's per-fact (and per-passage) observations."""

    name: str
    vocab: int
    final_rank: np.ndarray        # [n]
    best_late_rank: np.ndarray    # [n] best lens rank over the second half of the layers
    attn_jsd: np.ndarray          # [n] mean over layers and heads
    sign_flip: np.ndarray         # [n]
    topk_jaccard: np.ndarray      # [n]
    grams: Tensor                 # [layer, n, n]
    first_layers_correct: np.ndarray  # [n]
    injection_cosine: np.ndarray  # [n]
    kld_sum: np.ndarray | None    # [passages] sum of per-position KLD
    same_sum: np.ndarray | None   # [passages] positions with FP's top prediction
    n_pos: np.ndarray | None      # [passages] positions
    weights: pd.DataFrame = field(repr=False, default=None)


def _hooks(n_layers: int) -> list[str]:
    return [t.format(l=l) for l in range(n_layers) for t in _HOOKS.values()]


def _grams(acts: dict, n_layers: int) -> Tensor:
    """``X Xᵀ`` per layer of the last-token residual stream, in float64."""
    x = torch.stack([acts[(_HOOKS["resid_post"].format(l=l), "last")] for l in range(n_layers)])
    x = x.double()
    return x @ x.transpose(1, 2)


def observe_fp(model: HookedTransformer, facts: FactSet, *, kld_tokens: int | None = KLD_TOKENS,
               batch_size: int = 32) -> FPObservation:
    """FP's side of every comparison (:func:`observe` reuses it for each variant)."""
    L = model.cfg.n_layers
    prompts, info = tokenize_facts(model, facts)
    pos = prompt_positions(model, facts, ("last",))
    acts = _collect(model, prompts, pos, _hooks(L), None, batch_size)
    last = acts[(_HOOKS["resid_post"].format(l=L - 1), "last")].float()
    ref = (fp_reference(model, max_tokens=kld_tokens, batch_size=8)
           if kld_tokens else None)
    return FPObservation(facts, prompts, torch.tensor(info["target_id"].to_numpy()), acts,
                         _grams(acts, L), last, ref)


@torch.no_grad()
def _late_ranks(model: HookedTransformer, acts: dict, targets: Tensor
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per fact: the answer's rank at the output, and its best logit-lens rank over lens layers
    ``L/2 … L`` (the residual stream leaving blocks ``L/2 − 1 … L − 1``)."""
    L = model.cfg.n_layers
    ranks = []
    for l in range(max(L // 2 - 1, 0), L):
        resid = acts[(_HOOKS["resid_post"].format(l=l), "last")].float()
        ranks.append(score(decode(model, resid), targets)["target_rank"])
    ranks = torch.stack(ranks, dim=1)  # [n, layers]
    return ranks[:, -1].numpy(), ranks.min(1).values.numpy()


def observe(model: HookedTransformer, fp: FPObservation, variant: Variant,
            batch_size: int = 32) -> Observation:
    """Every per-fact observation of ``variant`` (module docstring)."""
    L = model.cfg.n_layers
    pos = prompt_positions(model, fp.facts, ("last",))
    acts = _collect(model, fp.prompts, pos, _hooks(L), variant, batch_size)
    final, late = _late_ranks(model, acts, fp.targets)
    comp = {k: [] for k in ("attn_jsd", "sign_flip", "topk_jaccard")}
    for l in range(L):
        def get(h, a):
            return a[(_HOOKS[h].format(l=l), "last")]

        comp["attn_jsd"].append(js_divergence(get("pattern", fp.acts), get("pattern", acts))
                                .mean(-1))
        comp["sign_flip"].append(sign_flip_rate(get("pre", fp.acts), get("pre", acts)))
        comp["topk_jaccard"].append(topk_jaccard(get("post", fp.acts), get("post", acts)))
    comp = {k: torch.stack(v, 1).double().mean(1).numpy() for k, v in comp.items()}
    k = first_layers(L)
    info = pd.DataFrame(dict(target_id=fp.targets.numpy(),
                             relation=[f.relation for f in fp.facts]))
    with swap(model, variant, layers=range(k)):
        first = score_prompts(model, fp.prompts, info, batch_size=batch_size)["correct"]
    half = {l: variant for l in range(L // 2, L)}
    with swap(model, half):
        inj = last_states(model, fp.prompts, [L], groups=info["relation"].tolist(),
                          batch_size=batch_size)[:, 0].float()
    cos = torch.nn.functional.cosine_similarity(inj.double(), fp.last_resid.double(), dim=-1)
    kld_sum = same_sum = n_pos = None
    if fp.kld_ref is not None:
        with swap(model, variant):
            resid = final_states(model, fp.kld_ref.sequences)
        vals = token_kld(model, fp.kld_ref.resid, resid)
        lengths = [len(s) - 1 for s in fp.kld_ref.sequences]
        kld_sum = np.array([t.double().sum().item() for t in vals["kld"].split(lengths)])
        same_sum = np.array([t.double().sum().item() for t in vals["same_top1"].split(lengths)])
        n_pos = np.array(lengths, dtype=float)
    return Observation(variant.name, model.cfg.d_vocab, final, late, comp["attn_jsd"],
                       comp["sign_flip"], comp["topk_jaccard"], _grams(acts, L),
                       np.asarray(first, dtype=bool), cos.numpy(), kld_sum, same_sum, n_pos,
                       weight_signatures(model, variant))


def _cka_min(g_fp: Tensor, g_q: Tensor, idx: Tensor) -> Tensor:
    """Lowest linear CKA over the layers for each row of facts ``idx`` (``[draws, n]``, repeats
    allowed), from the uncentred Gram matrices: ``HSIC(K, Q) / sqrt(HSIC(K, K) HSIC(Q, Q))``
    with ``HSIC(K, Q) = ⟨HKH, HQH⟩`` (centring ``H`` over the resampled facts)."""
    rows, cols = idx[:, :, None], idx[:, None, :]

    def centre(M):
        return M - M.mean(1, keepdim=True) - M.mean(2, keepdim=True) + M.mean((1, 2),
                                                                               keepdim=True)

    out = torch.full((len(idx),), float("inf"), dtype=torch.float64)
    for K, Q in zip(g_fp, g_q):  # layer by layer: [draws, n, n] at a time
        Kc, Qc = centre(K[rows, cols]), centre(Q[rows, cols])
        hsic = (Kc * Qc).sum((1, 2))
        norm = ((Kc * Kc).sum((1, 2)) * (Qc * Qc).sum((1, 2))).sqrt().clamp_min(1e-300)
        out = torch.minimum(out, hsic / norm)
    return out


def statistics(o: Observation, g_fp: Tensor, idx: np.ndarray | None = None,
               passages: np.ndarray | None = None) -> dict[str, float]:
    """The signature values (:data:`SIGNATURES`) on the facts ``idx`` and the held-out passages
    ``passages`` (default: all, once each; repeats allowed)."""
    n = len(o.final_rank)
    idx = np.arange(n)[None] if idx is None else np.asarray(idx)[None]
    p = None if passages is None else np.asarray(passages)[None]
    return {k: float(v[0]) for k, v in _draws(o, g_fp, idx, p).items()}


def _draws(o: Observation, g_fp: Tensor, idx: np.ndarray, passages: np.ndarray | None
           ) -> dict[str, np.ndarray]:
    """Every signature for each row of ``idx`` (``[draws, n]`` fact indices) and of
    ``passages`` (``[draws, m]`` passage indices, or all passages for every draw)."""
    rank = o.final_rank[idx]
    fail = rank > 1
    late = np.where(fail, o.best_late_rank[idx], np.nan)
    with np.errstate(all="ignore"):
        fbr = np.where(fail.any(1), np.nanmedian(np.where(fail.any(1)[:, None], late, 0), 1),
                       1.0) / o.vocab
    out = dict(recall=(rank == 1).mean(1), median_rank=np.median(rank, 1),
               failure_best_rank=fbr, attn_jsd=o.attn_jsd[idx].mean(1),
               sign_flip=o.sign_flip[idx].mean(1), topk_jaccard=o.topk_jaccard[idx].mean(1),
               cka_min=np.concatenate([_cka_min(g_fp, o.grams, torch.as_tensor(c)).numpy()
                                       for c in np.array_split(idx, max(1, len(idx) // 64))]),
               first_layers_recall=o.first_layers_correct[idx].mean(1),
               injection_cosine=o.injection_cosine[idx].mean(1))
    if o.kld_sum is not None:
        p = (np.arange(len(o.kld_sum))[None].repeat(len(idx), 0) if passages is None
             else passages)
        out["kld_mean"] = o.kld_sum[p].sum(1) / o.n_pos[p].sum(1)
        out["same_top1"] = o.same_sum[p].sum(1) / o.n_pos[p].sum(1)
    else:
        out["kld_mean"] = out["same_top1"] = np.full(len(idx), np.nan)
    return {k: out[k] for k in SIGNATURES}


def bootstrap(o: Observation, g_fp: Tensor, n_boot: int = N_BOOT, seed: int = 0
              ) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of every signature: facts (and held-out passages) resampled
    with replacement ``n_boot`` times, with a seeded generator."""
    rng = np.random.default_rng(seed)
    n = len(o.final_rank)
    m = len(o.kld_sum) if o.kld_sum is not None else 0
    # the lowest CKA of a resample lies, in practice, among the layers lowest on all facts:
    # resample only the CKA_LAYERS of them (the bootstrap's cost is the CKA's)
    every = torch.arange(n)[None]
    per_layer = torch.stack([_cka_min(g[None], q[None], every) for g, q in zip(g_fp, o.grams)])
    low = per_layer[:, 0].argsort()[:CKA_LAYERS]
    o = replace(o, grams=o.grams[low])
    g_fp = g_fp[low]
    draws = _draws(o, g_fp, rng.integers(0, n, (n_boot, n)),
                   rng.integers(0, m, (n_boot, m)) if m else None)
    return {k: (float(np.nanquantile(v, 0.025)), float(np.nanquantile(v, 0.975)))
            if np.isfinite(v).any() else (float("nan"), float("nan")) for k, v in draws.items()}


def sample_note(n: int) -> str:
    """What a sample of ``n`` facts can resolve: one fact moves recall by ``1/n``."""
    step = 1 / max(n, 1)
    return (f"{n} FP-correct facts: one fact moves recall by {step:.1%}"
            + ("" if step < 0.01 else " (fewer than the 101 that resolve 1 %)"))


def per_fact_frame(o: Observation, facts: Sequence) -> pd.DataFrame:
    """The per-fact observations as a tidy frame (one row per fact)."""
    return pd.DataFrame(dict(
        variant=o.name, fact_id=[f.id for f in facts], final_rank=o.final_rank,
        best_late_rank=o.best_late_rank, attn_jsd=o.attn_jsd, sign_flip=o.sign_flip,
        topk_jaccard=o.topk_jaccard, first_layers_correct=o.first_layers_correct,
        injection_cosine=o.injection_cosine))
