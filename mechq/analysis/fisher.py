"""Fisher sensitivity: how far each linear module at each bit width moves the output, at once.

Quantizing module ``m`` to width ``b`` replaces its weight ``W`` (Hugging Face layout
``(out, in)``, :func:`mechq.quant.layout.module_weight`) by ``Q_b(W)`` (the quantizer's dequantized
weight, :meth:`mechq.quant.variants.Variant.weight`), an error ``δ = W − Q_b(W)``. The quantity to
predict is the mean per-token KL divergence of the model's next-token distribution to FP's,
``KL(p_FP ‖ p_θ+δ)``, the number :func:`mechq.analysis.kld.kld_stats` measures (``kld_mean``).

**Definition.** At ``δ = 0`` this KL and its gradient are zero; its Hessian is the Fisher
information of the model's own predictive distribution, so to second order

    ΔKL_{m,b} ≈ ½ δᵀ F δ ≈ ½ Σ_ij F_ij δ_ij²           (:func:`fisher_error`)

with ``F_ij`` the diagonal of the per-token Fisher, averaged over the positions ``t`` of the
calibration text (:func:`mechq.facts.calibration.get_calibration`, the samples GPTQ uses):

    F_ij = mean_t  E_{y ~ p_FP(·|x_<t)} [ (∂ log p_θ(y | x_<t) / ∂W_ij)² ].

:func:`fisher_diagonal` estimates it from one backward pass per calibration batch: at every
position of the batch a label ``y_t`` is **drawn from FP's own next-token distribution** (Gumbel-
max on float64 log-probabilities with a private generator seeded from ``seed`` and the sequence's
index, so the draw does not depend on batching and touches no global RNG), ``g`` is the gradient
of ``Σ_t −log p(y_t | x_<t)`` over the batch, and ``F̂ = Σ_batches g ⊙ g / n_tokens``. Because each
label is drawn independently given its (fixed, teacher-forced) context, every score
``∇ log p(y_t)`` has mean zero and the cross terms ``g_t ⊙ g_t'`` (``t ≠ t'``) vanish in
expectation: ``F̂`` is an unbiased estimate of the Fisher diagonal for any batch size (a smaller
batch only lowers its variance).

*Why sampled labels.* The Fisher with labels drawn from the model is the Hessian of the KL to FP,
the object the estimate needs. The "empirical Fisher" (the text's true next tokens) is a
different matrix wherever the text is not the model's own distribution (Kunstner et al. 2019,
"Limitations of the empirical Fisher approximation"), and with true labels the per-token
gradients do not have zero mean, so the cross terms of a batch gradient do not cancel. FP's
argmax tokens estimate no Fisher at all (a confidently predicted argmax has a near-zero
gradient). ``labels="text"`` is still offered, for comparison. mechq's bundled calibration is
text SmolLM2 sampled (temperature 1 within top-p 0.9, re-tokenized into windows), so for SmolLM2
its tokens are close to draws from the model, though not exactly (the nucleus cuts the tail).

*Why the diagonal.* For quantization errors that are independent and zero-mean across weights
(round-to-nearest: the rounding residuals of different weights are nearly independent), the
expectation of ``δᵀ F δ`` over the errors is ``Σ F_ii E[δ_i²]``: the off-diagonal terms average
out. The same argument makes the per-module estimates add up across modules (what
:mod:`mechq.repair.allocation` assumes). GPTQ correlates its errors on purpose (it pushes them
into directions the inputs do not excite), so for GPTQ weights the diagonal estimate tends to
overstate the damage; it is a ranking, not a promise. At 2 bits the errors are large and the
second-order term is only the leading one.

**Layouts.** TransformerLens stores weights in its own shapes (``W_Q`` is ``(n_heads, d_model,
d_head)``, ``W_in`` is ``(d_model, d_mlp)``, GPT-2's fused ``c_attn`` is split into three
parameters). The gradient is taken w.r.t. the HookedTransformer parameters and mapped to the HF
``(out, in)`` layout by :func:`mechq.quant.layout.module_tensor`, the same pure reshape /
permutation / concatenation that maps the weights, so ``F`` and ``δ`` line up elementwise.
Grouped-query attention: TransformerLens holds one ``_W_K`` / ``_W_V`` per key/value head and
repeats it (``repeat_interleave``) for the query heads at run time, so autograd already sums the
repeated copies' gradients into the shared parameter, which is what the HF ``k_proj`` /
``v_proj`` weight receives (``tests/test_fisher.py`` checks both against Hugging Face autograd).

**Validation.** :func:`measured_kl` swaps one module at a time to a width and measures the
held-out KL (:mod:`mechq.facts.heldout`, :mod:`mechq.analysis.kld`); :func:`validate` puts it
beside the estimate for a deterministic sample of modules and :func:`spearman` gives the rank
correlation. ``scripts/measure_recipe.py`` measures it for every model and method it runs (30
modules of :func:`sample_modules`, RTN or GPTQ g128 at 2 / 3 / 4 bits, 2 048 held-out tokens)
and docs/recipe.md shows the result; ``tests/test_fisher.py`` checks it on the tiny GPT-2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.analysis.kld import Reference, final_states, fp_reference, summarize, token_kld
from mechq.engine.forward import pad_id
from mechq.facts.calibration import N_SAMPLES, SEQ_LEN, Calibration, get_calibration
from mechq.quant import layout
from mechq.quant.quantize import quantize
from mechq.quant.variants import Variant, swap

#: the candidate widths of :func:`sensitivity` (issue 27: 2, 3, 4 and 8 bits)
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 8)
LABELS = ("sampled", "text")
BATCH_SIZE = 4  # calibration samples per backward: smaller batches, less variance, more passes
NOT_SCORED = -1  # target of a position that gets no label (padding; the text's last token)
#: modules :func:`validate` measures by default: each one is a forward over the held-out text
N_VALIDATE = 12
#: the columns of :func:`sensitivity`, in order
COLUMNS = ("module", "layer", "component", "bits", "variant", "method", "group_size",
           "n_params", "storage_bits", "avg_bits", "sq_error", "fisher_error")


@dataclass
class Fisher:
    """The estimated per-token Fisher diagonal of every quantizable linear module.

    ``diag`` maps HF module names to ``F`` in the ``(out, in)`` layout (float32); ``tokens`` are
    the calibration samples and ``targets`` the label of every position (``NOT_SCORED`` = -1
    where none), ``n_tokens`` the labelled positions, ``batch_size`` how the samples were grouped
    into backward passes (the estimate's variance depends on it, its expectation does not).
    """

    diag: dict[str, Float[Tensor, "out in"]]
    tokens: list[list[int]]
    targets: list[list[int]]
    n_tokens: int
    labels: str
    seed: int
    batch_size: int
    calibration: str


def _module_sites(model: HookedTransformer) -> dict[str, list[layout.Site]]:
    out: dict[str, list[layout.Site]] = {}
    for s in layout.sites(model.cfg):
        out.setdefault(s.module, []).append(s)
    return out


def draw_labels(logits: Float[Tensor, "pos vocab"], seed: int, index: int) -> list[int]:
    """One draw from each position's softmax: ``argmax(log_softmax(z) + Gumbel)`` in float64,
    the noise from a private generator seeded by ``sha256("{seed}:{index}")`` (``index``: the
    sequence's place in the calibration), so a sequence's labels do not depend on the batch."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(key & (2**63 - 1))
    lp = logits.detach().double().cpu().log_softmax(-1)
    u = torch.rand(lp.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    return (lp - torch.log(-torch.log(u))).argmax(-1).tolist()


def _targets(rows: list[list[int]], logits: Tensor, labels: str, seed: int, first: int
             ) -> list[list[int]]:
    out = []
    for r, toks in enumerate(rows):
        if labels == "sampled":
            out.append(draw_labels(logits[r, : len(toks)], seed, first + r))
        else:  # the text's next token; the last position has none
            out.append(list(toks[1:]) + [NOT_SCORED])
    return out


def fisher_diagonal(
    model: HookedTransformer,
    calibration: str | Path | list[str] | Calibration | None = None,
    *,
    labels: str = "sampled",
    n_samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> Fisher:
    """Estimate the per-token Fisher diagonal of every quantizable linear module (module
    docstring) from one forward and backward pass per batch of ``batch_size`` calibration samples.

    ``calibration`` is what :func:`mechq.facts.calibration.get_calibration` takes (default the
    bundled text GPTQ uses: ``n_samples`` windows of ``seq_len`` tokens, default 32 ×
    min(128, n_ctx), the windows of calibration seed 0 as GPTQ's default), or a
    :class:`~mechq.facts.calibration.Calibration` for any other. ``labels``: ``"sampled"`` (drawn
    from FP's own distribution, ``seed`` choosing the draws: the Fisher) or ``"text"`` (the
    calibration's next tokens: the empirical Fisher). Call it with FP weights in the model (not
    inside a swap). Gradients are enabled here even under ``torch.no_grad()``; every parameter's
    ``requires_grad`` and ``.grad`` are put back as they were, and the weights are not touched.
    """
    from tqdm.auto import tqdm

    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    calib = calibration if isinstance(calibration, Calibration) else get_calibration(
        model, calibration, n_samples=n_samples or N_SAMPLES,
        seq_len=seq_len or min(SEQ_LEN, model.cfg.n_ctx), seed=0)
    toks = calib.tokens
    by_module = _module_sites(model)
    params = dict(model.named_parameters())
    wanted = {s.param for parts in by_module.values() for s in parts}
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in wanted}
    targets: list[list[int]] = []
    n_tokens = 0
    pad, dev = pad_id(model), model.cfg.device
    bar = tqdm(total=len(toks), desc="fisher", unit="sample", disable=not progress)
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
            p.grad = None
        with torch.enable_grad():
            for i in range(0, len(toks), batch_size):
                rows = toks[i:i + batch_size]
                width = max(len(t) for t in rows)
                x = torch.tensor([t + [pad] * (width - len(t)) for t in rows], device=dev)
                logits = model(x, attention_mask=torch.ones_like(x))
                got = _targets(rows, logits, labels, seed, i)
                targets += got
                y = torch.tensor([t + [NOT_SCORED] * (width - len(t)) for t in got], device=dev)
                mask = y != NOT_SCORED
                lp = logits.log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
                (-lp[mask].sum()).backward()
                n_tokens += int(mask.sum())
                for n in wanted:
                    g = params[n].grad
                    if g is not None:
                        acc[n] += g.float().square()
                    params[n].grad = None
                del logits, lp
                bar.update(len(rows))
    finally:
        bar.close()
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    if n_tokens == 0:
        raise ValueError("The calibration gave no labelled position.")
    diag = {m: layout.module_tensor(acc, m, model.cfg).contiguous().div_(n_tokens).cpu()
            for m in by_module}
    return Fisher(diag, [list(t) for t in toks], targets, n_tokens, labels, seed, batch_size,
                  f"{calib.source}#{calib.digest}")


def fisher_error(fisher: Float[Tensor, "out in"], w: Float[Tensor, "out in"],
                 w_q: Float[Tensor, "out in"]) -> float:
    """``½ Σ F ⊙ (W − W_q)²`` in float64: the second-order estimate of the KL increase (nats per
    token) from replacing ``w`` by ``w_q`` (module docstring)."""
    d = w.detach().double().cpu() - w_q.detach().double().cpu()
    return float(0.5 * (fisher.double() * d.square()).sum())


def module_storage_bits(variant: Variant, module: str) -> int:
    """Bits one packed module of ``variant`` stores, counted exactly as
    :attr:`Variant.avg_bits` counts them (codes, zero points, fp16 scales; a low-rank
    correction's entries at 16 bits)."""
    one = replace(variant, modules={module: variant.modules[module]}, fp_modules={},
                  lowrank={k: v for k, v in variant.lowrank.items() if k == module}, norms={})
    return round(one.avg_bits * one.n_weights)


def uniform_variants(
    model: HookedTransformer,
    bits: Iterable[int] = DEFAULT_BITS,
    *,
    group_size: int = 128,
    sym: bool = True,
    variants: Mapping[int, Variant] | None = None,
    cache: bool = True,
) -> dict[int, Variant]:
    """One uniform variant per width: the given ``variants`` (e.g. cached GPTQ ones), and RTN
    (``mechq.quantize(model, "rtn", bits=b, group_size=group_size, sym=sym)``) for the widths they
    do not cover. A given variant must be uniform (no dynamic rules) and of that width."""
    given = dict(variants or {})
    for b, v in given.items():
        if not isinstance(v, Variant):
            raise TypeError(f"variants[{b}] must be a mechq Variant, got {type(v).__name__}.")
        if v.dynamic or v.fp_modules or v.bits != b:
            raise ValueError(f"variants[{b}] ({v.name!r}) must be a uniform {b}-bit variant.")
    out = {}
    for b in dict.fromkeys(list(bits) + list(given)):
        out[b] = given[b] if b in given else quantize(model, "rtn", bits=b,
                                                      group_size=group_size, sym=sym,
                                                      cache=cache)
    return out


def sensitivity(
    model: HookedTransformer,
    bits: Iterable[int] = DEFAULT_BITS,
    *,
    group_size: int = 128,
    sym: bool = True,
    variants: Mapping[int, Variant] | None = None,
    fisher: Fisher | None = None,
    calibration: str | Path | list[str] | Calibration | None = None,
    n_samples: int | None = None,
    seq_len: int | None = None,
    labels: str = "sampled",
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    cache: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """The estimated KL increase of every linear module at every width: one row per
    (module, width), columns :data:`COLUMNS`.

    - ``module`` (HF name), ``layer``, ``component`` (``q``…``down``; GPT-2's fused ``c_attn`` is
      ``q+k+v``), ``bits``, ``variant`` (the uniform variant the quantized weight comes from,
      :func:`uniform_variants`), ``method``, ``group_size``;
    - ``n_params`` = out · in; ``storage_bits`` the module's stored bits in that variant and
      ``avg_bits`` = storage_bits / n_params, both as :attr:`Variant.avg_bits` counts them
      (codes, zero points and fp16 scales);
    - ``sq_error`` = ``Σ (W − Q_b(W))²`` (unweighted, for comparison) and ``fisher_error`` =
      ``½ Σ F ⊙ (W − Q_b(W))²``, the estimate of the held-out ``kld_mean`` increase in nats per
      token when only this module is quantized (module docstring).

    ``fisher`` (from :func:`fisher_diagonal`) is computed here when not given, from
    ``calibration`` / ``n_samples`` / ``seq_len`` / ``labels`` / ``seed`` / ``batch_size``.
    ``variants`` maps widths to already quantized uniform variants; the other widths are made
    with RTN at ``group_size`` / ``sym`` (cached when ``cache``). ``model`` must hold FP weights.
    """
    from tqdm.auto import tqdm

    quants = uniform_variants(model, bits, group_size=group_size, sym=sym, variants=variants,
                              cache=cache)
    if fisher is None:
        fisher = fisher_diagonal(model, calibration, labels=labels, n_samples=n_samples,
                                 seq_len=seq_len, seed=seed, batch_size=batch_size,
                                 progress=progress)
    rows = []
    for m, parts in tqdm(list(_module_sites(model).items()), desc="sensitivity", unit="module",
                         disable=not progress):
        w = layout.module_weight(model, m).detach().float().cpu()
        f = fisher.diag[m].float()
        for b, v in quants.items():
            if m not in v.modules:
                raise ValueError(f"Variant {v.name!r} has no weights for {m!r}.")
            # float32 differences of float32 weights are exact up to one rounding; the sums
            # run in float64
            d2 = (w - v.weight(m, torch.float32, device="cpu")).square_()
            n = w.numel()
            sb = module_storage_bits(v, m)
            rows.append(dict(module=m, layer=parts[0].layer,
                             component="+".join(s.component for s in parts), bits=b,
                             variant=v.name, method=v.method,
                             group_size=v.group_size, n_params=n,
                             storage_bits=sb, avg_bits=sb / n,
                             sq_error=float(d2.sum(dtype=torch.float64)),
                             fisher_error=0.5 * float((f * d2).sum(dtype=torch.float64))))
    return pd.DataFrame(rows, columns=list(COLUMNS))


# --------------------------------------------------------------------------------------------
# Validation: the measured KL of one module swapped alone
# --------------------------------------------------------------------------------------------


def measured_kl(
    model: HookedTransformer,
    variants: Variant | Mapping[int, Variant],
    modules: Sequence[str],
    *,
    reference: Reference | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """The held-out KL divergence to FP when **only** one module is quantized: one row per
    (module, variant) with ``module, layer, component, bits, variant`` and the statistics of
    :func:`mechq.analysis.kld.summarize` (``kld_mean`` is what :func:`sensitivity`'s
    ``fisher_error`` estimates). The module is swapped in with
    ``mechq.swap(model, variant, layers=its layer, components=its components)``, restored after.
    ``reference`` (:func:`mechq.analysis.kld.fp_reference`) is reused when given; otherwise FP
    runs once on the shipped held-out text (up to ``max_tokens``)."""
    from tqdm.auto import tqdm

    vs = [variants] if isinstance(variants, Variant) else list(dict(variants).values())
    by_module = _module_sites(model)
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise KeyError(f"{unknown[0]!r} is not a quantizable module of this model.")
    ref = reference or fp_reference(model, max_tokens=max_tokens, batch_size=batch_size)
    rows = []
    todo = [(m, v) for m in modules for v in vs]
    for m, v in tqdm(todo, desc="measured kl", unit="swap", disable=not progress):
        parts = by_module[m]
        with swap(model, v, layers=parts[0].layer, components=[s.component for s in parts]):
            resid = final_states(model, ref.sequences, batch_size)
        stats = summarize(token_kld(model, ref.resid, resid))
        rows.append(dict(module=m, layer=parts[0].layer,
                         component="+".join(s.component for s in parts),
                         bits=v.modules[m].bits if m in v.modules else v.bits, variant=v.name,
                         **stats))
    return pd.DataFrame(rows)


def sample_modules(model: HookedTransformer, n: int, seed: int = 0) -> list[str]:
    """``n`` linear modules chosen without looking at any estimate: the ``n`` smallest
    ``sha256("{seed}:{module}")``, returned in layout order (all of them when ``n`` ≥ their
    number)."""
    mods = list(_module_sites(model))
    chosen = set(sorted(mods, key=lambda m: hashlib.sha256(f"{seed}:{m}".encode()).digest())[:n])
    return [m for m in mods if m in chosen]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average
    rank). NaN when either side is constant or has fewer than two values."""
    a, b = pd.Series(list(x), dtype=float), pd.Series(list(y), dtype=float)
    if len(a) != len(b):
        raise ValueError(f"x and y differ in length ({len(a)} vs {len(b)}).")
    if len(a) < 2:
        return float("nan")
    return float(a.rank().corr(b.rank()))


def validate(
    model: HookedTransformer,
    sens: pd.DataFrame,
    variants: Mapping[int, Variant],
    bits: int | Iterable[int] = 2,
    *,
    modules: Sequence[str] | None = None,
    n_modules: int = N_VALIDATE,
    seed: int = 0,
    reference: Reference | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """The estimate beside the measurement: :func:`sensitivity`'s rows for ``modules`` (default
    :func:`sample_modules` ``(n_modules, seed)``) at width(s) ``bits``, joined with
    :func:`measured_kl` of the same modules swapped alone to the same ``variants`` (the ones
    ``sens`` was computed from: their names must match the frame's ``variant`` column).
    :func:`rank_correlation` summarises it."""
    widths = [bits] if isinstance(bits, int) else list(bits)
    mods = list(modules) if modules is not None else sample_modules(model, n_modules, seed)
    for b in widths:
        have = set(sens.loc[sens["bits"] == b, "variant"])
        if b not in variants or have != {variants[b].name}:
            raise ValueError(f"sens was computed from {sorted(have)} at {b} bits; pass that "
                             f"variant in variants[{b}].")
    meas = measured_kl(model, {b: variants[b] for b in widths}, mods, reference=reference,
                       max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    est = sens[sens["bits"].isin(widths) & sens["module"].isin(mods)]
    keep = ["module", "bits", "variant", "kld_mean", "kld_sem", "n_tokens"]
    return est.merge(meas[keep], on=["module", "bits", "variant"], how="inner")


def rank_correlation(frame: pd.DataFrame, estimate: str = "fisher_error",
                     measured: str = "kld_mean", by: str | None = "bits") -> pd.DataFrame:
    """Spearman's ρ between ``estimate`` and ``measured`` in :func:`validate`'s frame: one row
    per value of ``by`` (default per width; ``None`` for all rows together), with ``n_modules``."""
    groups = [(None, frame)] if by is None else list(frame.groupby(by, sort=True))
    return pd.DataFrame([{**({by: k} if by else {}), "n_modules": len(g),
                          "spearman": spearman(g[estimate], g[measured])} for k, g in groups])
