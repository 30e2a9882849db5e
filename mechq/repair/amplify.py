"""Peak-signal amplification: add the most confident intermediate read-out to the final logits.

Under Signal Degradation the answer is still decodable inside the model, often most clearly at
an intermediate layer, and is outcompeted by the time it reaches the output (paper §4.3). The
repair reads that layer out and adds it back. For a prompt's last position, with lens logits
``z_l = W_U · norm_final(h_l)`` (the logit lens of :mod:`mechq.analysis.lens`; ``z_L`` is the model's own
output):

- confidence of layer ``l``: the entropy ``H_l`` of ``softmax(z_l)`` (low = confident);
- peak layer ``l*``: ``argmin H_l`` over the candidate layers ``first ≤ l < L``;
- amplified logits: ``z' = z_L + α · z_{l*}``, per prompt (``l*`` may differ between prompts).

This is a training-free decoding-time change, not a weight change: a variant stays as it is and
the wrapper changes only how its logits are read. Its nearest published relatives are DoLa
(Chuang et al., 2024), which contrasts the final layer with a premature one chosen by
Jensen-Shannon divergence, and activation decoding (Chen et al., 2024), which sharpens by the
entropy of intermediate activations; here the intermediate read-out is *added*, chosen by its own
entropy. ``first`` and ``α`` are chosen on a development split of the facts
(:func:`dev_heldout`) and reported on the held-out facts.

Measured on SmolLM2 GPTQ w4 (the 201 development facts, first ∈ {L/2, 2L/3, 5L/6, 26, 28},
α ∈ {0.1 … 4}, raw and log-softmax logits alike): this definition repairs nothing there. The
lowest-entropy intermediate read-outs are confident about other tokens, so every α > 0 brings
back at most 3 % of the Failure facts and loses Robust ones (α = 0.1 at first = 28 keeps 85 %
of Robust, α = 0.25 at first = L/2 18 %); on 2-bit nothing comes back. The layer rule is
therefore not settled: :func:`choose` keeps α = 0 when nothing helps on the development split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.facts import FactSet
from mechq.engine.forward import decode, last_states, score_states
from mechq.quant.variants import Variant, swap
from mechq.analysis.recall import bits_of, recall_rows, variant_runs
from mechq.engine.forward import tokenize_facts


ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)  # the α grid searched on the development facts
LAYER_RULE = "lowest-entropy logit-lens layer l* with first <= l* < L, per prompt"


@dataclass(frozen=True)
class Amplified:
    """A variant read out with peak-signal amplification (``z_L + α · z_{l*}``, module
    docstring): a wrapper, not a weight change. :func:`mechq.evaluate_recall` accepts it among
    its variants; analyses of the model's internals see ``variant``'s weights unchanged, and its
    storage (:attr:`avg_bits`, :attr:`nbytes`) is ``variant``'s."""

    variant: Variant
    alpha: float
    first: int

    def __post_init__(self):
        if not isinstance(self.variant, Variant):
            raise TypeError(f"Amplified wraps a mechq Variant, got {type(self.variant).__name__}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 for an amplification repair, got {self.alpha} "
                             f"(α = 0 is the variant itself).")

    @property
    def name(self) -> str:
        return f"{self.variant.name}+amp{self.alpha:g}@{self.first}"

    @property
    def bits(self) -> int:
        return self.variant.bits

    @property
    def avg_bits(self) -> float:
        return self.variant.avg_bits

    @property
    def nbytes(self) -> int:
        return self.variant.nbytes

    def recall_rows(self, model: HookedTransformer, facts: FactSet, batch_size: int = 32
                    ) -> pd.DataFrame:
        """Recall rows of this read-out (what :func:`mechq.evaluate_recall` asks of it)."""
        return evaluate_amplified(model, facts, self, batch_size=batch_size)


def dev_heldout(facts: FactSet, dev_share: float = 0.5) -> tuple[FactSet, FactSet]:
    """A fixed split of ``facts``: a fact is in the development half when the first byte of
    ``sha256(fact id)`` is below ``256 · dev_share`` (the same split on every machine, whatever
    the order or subset of facts given)."""
    cut = 256 * dev_share
    dev = [f for f in facts if hashlib.sha256(f.id.encode()).digest()[0] < cut]
    held = [f for f in facts if hashlib.sha256(f.id.encode()).digest()[0] >= cut]
    return FactSet(dev, name=f"{facts.name}:dev"), FactSet(held, name=f"{facts.name}:heldout")


def amplified_logits(model: HookedTransformer, resid: Float[Tensor, "n layer d_model"],
                     alpha: float, first: int) -> tuple[Float[Tensor, "n vocab"], Int[Tensor, " n"]]:
    """``z_L + α · z_{l*}`` (module docstring) from the residual streams at lens layers
    ``0 … L`` of each prompt, and each prompt's peak layer ``l*``."""
    L = resid.shape[1] - 1
    if not 0 <= first < L:
        raise ValueError(f"first must lie in 0 … {L - 1}, got {first}.")
    final = decode(model, resid[:, L])
    cand = decode(model, resid[:, first:L])                    # (n, L - first, vocab)
    logp = cand.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)                    # (n, L - first)
    peak = entropy.argmin(-1)
    chosen = cand[torch.arange(len(cand)), peak]
    return final + alpha * chosen, peak + first


def amplified_recall(model: HookedTransformer, facts: FactSet, variants: Sequence = (), *,
                     alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
                     firsts: Sequence[int] | None = None, include_fp: bool = True,
                     batch_size: int = 32) -> pd.DataFrame:
    """Recall under amplification for every (variant, α, first): :func:`mechq.evaluate_recall`'s
    columns plus ``alpha``, ``first`` and ``peak_layer``. ``α = 0`` is the unrepaired model.
    ``firsts`` defaults to ``L/2, 2L/3, 5L/6``. Each variant runs its forward once; every
    (α, first) reuses its residual streams."""
    for a in alphas:
        if not a >= 0:
            raise ValueError(f"alpha must be ≥ 0 (0 = no amplification), got {a}.")
    L = model.cfg.n_layers
    firsts = sorted(set(firsts if firsts is not None else (L // 2, 2 * L // 3, 5 * L // 6)))
    prompts, info = tokenize_facts(model, facts)
    targets = torch.tensor(info["target_id"].to_numpy())
    frames = []
    for name, v in variant_runs(variants, include_fp):
        with swap(model, v):
            resid = last_states(model, prompts, list(range(L + 1)),
                                groups=info["relation"].tolist(), batch_size=batch_size)
        for first in firsts:
            for alpha in alphas:
                peaks = []

                def read(r, alpha=alpha, first=first, peaks=peaks):
                    logits, peak = amplified_logits(model, r, alpha, first)
                    peaks.append(peak)
                    return logits

                cols = {k: t.numpy() for k, t in
                        score_states(model, resid, targets, chunk=batch_size, read=read).items()}
                df = recall_rows(model, info, name, cols, bits=bits_of(v))
                df["alpha"], df["first"] = alpha, first
                df["peak_layer"] = torch.cat(peaks).numpy()
                frames.append(df)
    return pd.concat(frames, ignore_index=True)


def evaluate_amplified(model: HookedTransformer, facts: FactSet, amp: Amplified,
                       batch_size: int = 32) -> pd.DataFrame:
    """Recall rows (:func:`mechq.evaluate_recall`'s columns) of one :class:`Amplified` variant,
    named ``amp.name``."""
    df = amplified_recall(model, facts, [amp.variant], alphas=[amp.alpha], firsts=[amp.first],
                          include_fp=False, batch_size=batch_size)
    return df.assign(variant=amp.name)


def choose(dev: pd.DataFrame, variant: str, labels: dict[str, str]) -> tuple[float, int]:
    """The (α, first) with the best accuracy on ``variant``'s development rows among the facts
    FP knows (Robust + Failure: a repair that breaks Robust facts does not win); ties go to the
    smaller α, then the later first layer."""
    d = dev[(dev["variant"] == variant) & dev["fact_id"].map(labels).isin(["Robust", "Failure"])]
    acc = d.groupby(["alpha", "first"])["correct"].mean().reset_index()
    acc = acc.sort_values(["correct", "alpha", "first"], ascending=[False, True, False])
    best = acc.iloc[0]
    return float(best["alpha"]), int(best["first"])


