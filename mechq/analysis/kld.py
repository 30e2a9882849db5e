"""How far a variant's next-token distribution moves from FP's, on held-out text.

These are the statistics llama.cpp's ``--kl-divergence`` prints, so a user can set mechq's
numbers beside their own. For every position ``t`` of every held-out sequence that has a next
token, with ``p`` = softmax of FP's logits and ``q`` = softmax of the variant's:

- ``KLD_t = Σ_v p_v (ln p_v − ln q_v)`` (natural log, nats; 0 when the distributions agree);
- same top-1: ``argmax p == argmax q``;
- ``Δp_t = q[top] − p[top]`` with ``top = argmax p``: the probability the variant gives FP's most
  likely token, minus FP's own.

Per variant (:func:`kld_stats`): ``kld_mean`` with its standard error ``kld_sem`` (the standard
deviation over positions / √n, as llama.cpp reports it), ``kld_median``, ``kld_p99``,
``kld_max``; ``same_top1`` (share of positions); ``dp_mean``, ``dp_p01`` and ``dp_p99`` (the 1st and
99th percentiles of Δp); ``n_tokens``. Percentiles are linear interpolations between positions.

Cost: FP's transformer runs once over the text; its final residual stream (positions ×
``d_model``: megabytes, where the logits would be gigabytes) is kept and decoded again chunk by
chunk next to each variant's, so nothing of vocabulary size is held for all positions at once.
Each variant is one batched pass (right-padded sequences; padding is never attended to and never
scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.analysis.recall import variant_runs
from mechq.engine.forward import batches, decode, kernel_layout, pad_id
from mechq.facts.heldout import heldout_tokens
from mechq.quant.variants import swap

#: the columns of :func:`kld_stats`, in order, after ``variant``
STATS = ("kld_mean", "kld_sem", "kld_median", "kld_p99", "kld_max", "same_top1", "dp_mean",
         "dp_p01", "dp_p99", "n_tokens")
DECODE_CHUNK = 512  # positions decoded at once: two chunk × vocabulary float32 arrays live


@dataclass
class Reference:
    """FP's side of the comparison: the sequences and FP's final residual stream at every
    position that predicts a next token (sequence by sequence, in order)."""

    sequences: list[list[int]]
    resid: Float[Tensor, "position d_model"]


@torch.no_grad()
def final_states(model: HookedTransformer, sequences: list[list[int]], batch_size: int = 8
                 ) -> Float[Tensor, "position d_model"]:
    """The residual stream after the last block at every position but each sequence's last,
    for the model's current weights (one batched forward over right-padded sequences)."""
    L = model.cfg.n_layers
    out: list[Tensor | None] = [None] * len(sequences)
    with kernel_layout(model, range(L)):
        for idx, b in batches(sequences, [0] * len(sequences), batch_size, pad_id(model)):
            resid = model(b.tokens.to(model.cfg.device), stop_at_layer=L)
            for row, i in enumerate(idx):
                out[i] = resid[row, : len(sequences[i]) - 1].float()
    return torch.cat(out)


def fp_reference(model: HookedTransformer, sequences: list[list[int]] | None = None, *,
                 max_tokens: int | None = None, batch_size: int = 8) -> Reference:
    """FP's reference on ``sequences`` (default: the shipped held-out text,
    :func:`mechq.facts.heldout.heldout_tokens`, up to ``max_tokens``)."""
    seqs = heldout_tokens(model, max_tokens) if sequences is None else [list(s) for s in sequences]
    if not seqs or any(len(s) < 2 for s in seqs):
        raise ValueError("KLD needs sequences of at least two tokens.")
    with swap(model, None):
        return Reference(seqs, final_states(model, seqs, batch_size))


@torch.no_grad()
def token_kld(model: HookedTransformer, fp_resid: Float[Tensor, "position d_model"],
              q_resid: Float[Tensor, "position d_model"], chunk: int = DECODE_CHUNK
              ) -> dict[str, Tensor]:
    """Per position: ``kld``, ``same_top1`` and ``dp`` (module docstring) of the distributions
    the two residual streams decode to, ``chunk`` positions at a time, in float32."""
    parts: dict[str, list[Tensor]] = {"kld": [], "same_top1": [], "dp": []}
    for i in range(0, len(fp_resid), chunk):
        lp = decode(model, fp_resid[i:i + chunk]).log_softmax(-1)
        lq = decode(model, q_resid[i:i + chunk]).log_softmax(-1)
        p = lp.exp()
        top = lp.argmax(-1, keepdim=True)
        parts["kld"].append((p * (lp - lq)).sum(-1).clamp_min(0))
        parts["same_top1"].append(lq.argmax(-1, keepdim=True) == top)
        parts["dp"].append((lq.gather(-1, top).exp() - p.gather(-1, top))[:, 0])
    return {k: torch.cat(v).reshape(-1).cpu() for k, v in parts.items()}


def summarize(per_token: dict[str, Tensor]) -> dict[str, float]:
    """The statistics of :data:`STATS` from :func:`token_kld`'s per-position values."""
    kld = per_token["kld"].double()
    dp = per_token["dp"].double()
    n = kld.numel()
    q = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
    k01, k50, k99 = torch.quantile(kld, q).tolist()
    d01, _, d99 = torch.quantile(dp, q).tolist()
    return dict(kld_mean=float(kld.mean()),
                kld_sem=float(kld.std() / n ** 0.5) if n > 1 else float("nan"),
                kld_median=k50, kld_p99=k99, kld_max=float(kld.max()),
                same_top1=float(per_token["same_top1"].double().mean()),
                dp_mean=float(dp.mean()), dp_p01=d01, dp_p99=d99, n_tokens=n)


def kld_stats(model: HookedTransformer, variants: Sequence, *, reference: Reference | None = None,
              max_tokens: int | None = None, batch_size: int = 8, per_token: bool = False,
              progress: bool = True) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """One row per variant: the KLD statistics of its next-token distribution against FP's on
    held-out text (module docstring). ``variants``: Variants or ``(name, spec)`` pairs (as
    :func:`mechq.evaluate_recall` takes them). ``reference`` (:func:`fp_reference`) is reused
    when given, so FP runs once for many calls. With ``per_token`` also a frame of every
    position's values (``variant, position, kld, same_top1, dp``)."""
    ref = reference or fp_reference(model, max_tokens=max_tokens, batch_size=batch_size)
    rows, tokens = [], []
    todo = variant_runs(variants, include_fp=False)
    for name, v in tqdm(todo, desc="kld", unit="variant", disable=not progress):
        with swap(model, v):
            resid = final_states(model, ref.sequences, batch_size)
        vals = token_kld(model, ref.resid, resid)
        rows.append(dict(variant=name, **summarize(vals)))
        if per_token:
            tokens.append(pd.DataFrame(dict(variant=name, position=range(len(vals["kld"])),
                                            **{k: t.numpy() for k, t in vals.items()})))
    frame = pd.DataFrame(rows, columns=["variant", *STATS])
    if per_token:
        return frame, pd.concat(tokens, ignore_index=True) if tokens else pd.DataFrame()
    return frame

