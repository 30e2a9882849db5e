"""Did the representation space keep its structure? CKA and SVD subspaces (paper §4.2, App. B.2).

Activations are collected per layer at named positions (default ``subject_last`` and ``last``)
for three streams: ``resid_post`` (``blocks.{l}.hook_resid_post``), ``attn_out``
(``blocks.{l}.hook_attn_out``) and ``mlp_out`` (``blocks.{l}.hook_mlp_out``). For one stream,
position and layer, ``X ∈ R^{n×d}`` stacks the ``n`` prompts' activation vectors (rows). The paper
publishes no code; these definitions are mechq's.

- **Linear CKA** (Kornblith et al. 2019) between ``X ∈ R^{n×d₁}`` and ``Y ∈ R^{n×d₂}`` on the
  same prompts: centre each column over prompts (``X̃ = HX``, ``H = I − 11ᵀ/n``), then
  ``CKA = ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F)`` ∈ [0, 1] (computed through the centred Gram
  matrices ``X̃X̃ᵀ``, ``ỸỸᵀ``: the same number). 1 when ``Y = c·XQ + 1bᵀ`` for orthogonal ``Q``;
  invariant to isotropic scaling and orthogonal maps, not to general linear maps. The layer ×
  layer matrix compares FP layer ``i`` with variant layer ``j``.
- **Subspace similarity**: principal directions in activation space are the top left singular
  vectors of ``Aᵀ = X̃ᵀ`` (``d × n``, columns = prompts), i.e. the top right singular vectors of
  ``X̃``. ``k`` is the smallest number whose squared singular values hold at least ``energy``
  (default 0.9) of the FP activations' total ``Σσ²``; the variant uses the same ``k``. Similarity
  ``‖U_fpᵀ U_q‖²_F / k`` ∈ [0, 1] (1 = same subspace; mean squared cosine of the principal
  angles). Activations are **centred** over prompts by default (``center=False`` keeps the mean,
  which in the residual stream is dominated by a few large constant directions).
- **Error-subspace alignment**: the same measure between the top-``k`` directions of the error
  ``E = X_q − X_fp`` (centred the same way) and the top-``k`` FP directions (``k`` from FP). High
  values mean the quantization error lies in the subspace that carries the signal. Also reported:
  ``error_energy_in_fp_subspace = ‖U_fpᵀ Ẽᵀ‖²_F / ‖Ẽ‖²_F``, the share of the error's energy
  inside the FP subspace. For both, a random ``k``-dimensional subspace of ``R^d`` would give
  about ``k/d`` (``random_baseline`` column). Undefined (NaN) when the error is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechq.engine.activations import Activations, _collect, prompt_positions, stack_layers
from mechq.analysis.components import named_variants
from mechq.facts import FactSet
from mechq.quant.variants import Variant, VariantSpec
from mechq.engine.forward import tokenize_facts
from mechq.vocab import FP
from mechq.vocab import STREAMS as VOCAB_STREAMS, hook_template

STREAMS = {s: hook_template(s) for s in VOCAB_STREAMS}  # "blocks.{l}.hook_resid_post", ...
SUBSPACE_METRICS = ("subspace_similarity", "error_alignment", "error_energy_in_fp_subspace")


class Representation(NamedTuple):
    """The two frames of :func:`representation_metrics`."""

    cka: pd.DataFrame
    subspace: pd.DataFrame


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------


def _centered_gram(X: Tensor) -> Tensor:
    Xc = X.double() - X.double().mean(0, keepdim=True)
    return Xc @ Xc.T


@jaxtyped(typechecker=beartype)
def linear_cka(X: Float[Tensor, "n d1"], Y: Float[Tensor, "n d2"]) -> float:
    """Linear CKA of two activation matrices on the same ``n`` prompts (rows), centred over
    prompts: ``‖ỸᵀX̃‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)``. NaN when either has no variance."""
    K, L = _centered_gram(X), _centered_gram(Y)
    den = torch.linalg.norm(K) * torch.linalg.norm(L)
    return float((K * L).sum() / den) if den > 0 else float("nan")


@jaxtyped(typechecker=beartype)
def cka_matrix(
    A_fp: Float[Tensor, "layer_fp n d1"], A_q: Float[Tensor, "layer_q n d2"]
) -> Float[Tensor, "layer_fp layer_q"]:
    """Linear CKA between every FP layer ``i`` and every variant layer ``j`` (float64)."""

    def normalized(A):
        G = torch.stack([_centered_gram(a) for a in A]).flatten(1)
        return G / torch.linalg.norm(G, dim=1, keepdim=True)

    return normalized(A_fp) @ normalized(A_q).T


# --------------------------------------------------------------------------------------------
# SVD subspaces
# --------------------------------------------------------------------------------------------


def _prep(X: Tensor, center: bool) -> Tensor:
    X = X.double()
    return X - X.mean(0, keepdim=True) if center else X


def _directions(X: Tensor) -> tuple[Tensor, Tensor]:
    """(singular values, directions ``[d, r]``) of an already prepared ``[n, d]`` matrix."""
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return S, Vh.T


@jaxtyped(typechecker=beartype)
def energy_rank(S: Float[Tensor, " r"], energy: float) -> int:
    """Smallest ``k`` with ``Σ_{i≤k} σ_i² ≥ energy · Σ σ_i²`` (``S`` sorted decreasingly)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy}.")
    e = S.double() ** 2
    if e.sum() <= 0:
        raise ValueError("The activations have no energy (all zero after centring).")
    cum = torch.cumsum(e, 0) / e.sum()
    return int((cum < energy - 1e-12).sum()) + 1


@jaxtyped(typechecker=beartype)
def principal_directions(
    X: Float[Tensor, "n d"], energy: float = 0.9, k: int | None = None, center: bool = True
) -> Float[Tensor, "d k"]:
    """Top-``k`` principal directions (orthonormal columns) of the rows of ``X``; ``k`` from
    :func:`energy_rank` unless given."""
    S, U = _directions(_prep(X, center))
    k = energy_rank(S, energy) if k is None else k
    return U[:, :k]


def _overlap(U: Tensor, V: Tensor) -> float:
    k = U.shape[1]
    return float((U.T @ V).pow(2).sum() / k)


@jaxtyped(typechecker=beartype)
def subspace_similarity(
    A_fp: Float[Tensor, "n d"], A_q: Float[Tensor, "n d"], energy: float = 0.9,
    k: int | None = None, center: bool = True,
) -> float:
    """``‖U_fpᵀ U_q‖²_F / k`` for the top-``k`` principal directions (``k`` from the FP energy
    share unless given) of FP and variant activations on the same prompts."""
    S, U_fp = _directions(_prep(A_fp, center))
    k = energy_rank(S, energy) if k is None else k
    _, U_q = _directions(_prep(A_q, center))
    return _overlap(U_fp[:, :k], U_q[:, :k])


@jaxtyped(typechecker=beartype)
def error_subspace_alignment(
    A_fp: Float[Tensor, "n d"], A_q: Float[Tensor, "n d"], energy: float = 0.9,
    k: int | None = None, center: bool = True,
) -> dict[str, float]:
    """How the error ``E = A_q − A_fp`` sits relative to FP's principal subspace.

    ``error_alignment = ‖U_fpᵀ U_E‖²_F / k`` (top-``k`` directions of each, ``k`` from FP) and
    ``error_energy_in_fp_subspace = ‖U_fpᵀ Ẽᵀ‖²_F / ‖Ẽ‖²_F``; NaN when ``E`` is zero.
    """
    S, U_fp = _directions(_prep(A_fp, center))
    k = energy_rank(S, energy) if k is None else k
    U_fp = U_fp[:, :k]
    E = _prep(A_q.double() - A_fp.double(), center)
    total = E.pow(2).sum()
    if total <= 0:
        return dict(error_alignment=float("nan"), error_energy_in_fp_subspace=float("nan"))
    _, U_e = _directions(E)
    return dict(
        error_alignment=_overlap(U_fp, U_e[:, :k]),
        error_energy_in_fp_subspace=float((E @ U_fp).pow(2).sum() / total),
    )


# --------------------------------------------------------------------------------------------
# Model-level entry points
# --------------------------------------------------------------------------------------------


def _subspace_measures(A_fp: Tensor, A_q: Tensor, energy: float, center: bool
                       ) -> tuple[int, dict[str, float]]:
    """(k, the three :data:`SUBSPACE_METRICS`) with one SVD each of FP, variant and error."""
    nan = float("nan")
    S, U_fp = _directions(_prep(A_fp, center))
    if (S**2).sum() <= 0:
        return 0, dict.fromkeys(SUBSPACE_METRICS, nan)
    k = energy_rank(S, energy)
    U_fp = U_fp[:, :k]
    _, U_q = _directions(_prep(A_q, center))
    out = dict(subspace_similarity=_overlap(U_fp, U_q[:, :k]),
               error_alignment=nan, error_energy_in_fp_subspace=nan)
    E = _prep(A_q.double() - A_fp.double(), center)
    total = E.pow(2).sum()
    if total > 0:
        _, U_e = _directions(E)
        out.update(error_alignment=_overlap(U_fp, U_e[:, :k]),
                   error_energy_in_fp_subspace=float((E @ U_fp).pow(2).sum() / total))
    return k, out


def representation_hooks(n_layers: int, streams: Sequence[str] = tuple(STREAMS)) -> list[str]:
    """The hooks :func:`representation_metrics` reads."""
    bad = [s for s in streams if s not in STREAMS]
    if bad:
        raise ValueError(f"Unknown streams {bad}; choose from {tuple(STREAMS)}.")
    return [STREAMS[s].format(l=l) for s in streams for l in range(n_layers)]


def compare_representations(
    fp: Activations, q: Activations, streams: Sequence[str], positions: Sequence[str],
    n_layers: int, energy: float = 0.9, center: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CKA and subspace frames (without the ``variant`` column) for two collections."""
    cka_rows, sub_rows = [], []
    for s in streams:
        for p in positions:
            Af = stack_layers(fp, STREAMS[s], p, n_layers)
            Aq = stack_layers(q, STREAMS[s], p, n_layers)
            M = cka_matrix(Af, Aq)
            Lf, Lq = M.shape
            cka_rows.append(pd.DataFrame({
                "stream": s, "position": p,
                "layer_fp": torch.arange(Lf).repeat_interleave(Lq).numpy(),
                "layer_q": torch.arange(Lq).repeat(Lf).numpy(),
                "cka": M.reshape(-1).numpy(),
            }))
            n, d = Af.shape[1], Af.shape[2]
            for l in range(n_layers):
                k, vals = _subspace_measures(Af[l], Aq[l], energy, center)
                for metric, value in vals.items():
                    sub_rows.append(dict(stream=s, position=p, layer=l, metric=metric,
                                         value=value, k=k, d=d, n=n, energy=energy,
                                         random_baseline=k / d if k else float("nan")))
    return pd.concat(cka_rows, ignore_index=True), pd.DataFrame(sub_rows)


@beartype
def representation_metrics(
    model: HookedTransformer,
    facts: FactSet,
    variants: Sequence[Variant | tuple[str, VariantSpec]] = (),
    positions: Sequence[str] = ("subject_last", "last"),
    streams: Sequence[str] = tuple(STREAMS),
    batch_size: int = 32,
    *,
    energy: float = 0.9,
    center: bool = True,
    include_fp: bool = True,
    progress: bool = True,
) -> Representation:
    """CKA matrices and subspace measures of each variant against FP (module docstring).

    Returns :class:`Representation` with

    - ``cka``: ``variant, stream, position, layer_fp, layer_q, cka`` (every layer pair);
    - ``subspace``: ``variant, stream, position, layer, metric, value, k, d, n, energy,
      random_baseline`` with ``metric`` in :data:`SUBSPACE_METRICS`.

    The FP model runs once (only the stream hooks × positions are kept). ``fp`` rows compare FP
    with itself (CKA diagonal 1, similarity 1, error metrics NaN). Needs at least 3 prompts;
    use many more (≥ 50) for stable CKA and subspaces.
    """
    if len(facts) < 3:
        raise ValueError("representation_metrics needs at least 3 facts.")
    todo = named_variants(variants)
    L = model.cfg.n_layers
    hooks = representation_hooks(L, streams)
    prompts, _ = tokenize_facts(model, facts)
    pos = prompt_positions(model, facts, positions)
    bar = tqdm(total=(1 + len(todo)) * len(prompts), desc="representation", unit="prompt",
               disable=not progress)
    ckas, subs = [], []

    def add(name, q):
        c, s = compare_representations(fp, q, streams, positions, L, energy, center)
        c.insert(0, "variant", name)
        s.insert(0, "variant", name)
        ckas.append(c)
        subs.append(s)

    try:
        fp = _collect(model, prompts, pos, hooks, None, batch_size, bar)
        if include_fp:
            add(FP, fp)
        for name, spec in todo:
            bar.set_postfix_str(name)
            add(name, _collect(model, prompts, pos, hooks, spec, batch_size, bar))
    finally:
        bar.close()
    return Representation(pd.concat(ckas, ignore_index=True), pd.concat(subs, ignore_index=True))


def cka_diagonal(cka: pd.DataFrame) -> pd.DataFrame:
    """The ``layer_fp == layer_q`` entries as ``variant, stream, position, layer, cka``."""
    d = cka[cka["layer_fp"] == cka["layer_q"]].rename(columns={"layer_fp": "layer"})
    return d.drop(columns="layer_q").reset_index(drop=True)
