"""Low-rank error compensation (EoRA) of a quantized variant, as a weight swap.

The paper's "advanced compensation" is EoRA (Liu et al., arXiv 2410.21271): each quantized linear
module gets a rank-``r`` correction ``B A`` fitted to the quantization error where the module's
inputs actually lie. :func:`eora` returns a new :class:`~mechq.quant.variants.Variant` with the
same packed weights and ``lowrank[module] = (B, A)``; swapping it in puts ``W_q + B A`` into the
model, so every mechq analysis runs on it unchanged.

**Definition.** For a linear module with FP weight ``W`` ``(out, in)`` (``layout.module_weight``),
dequantized weight ``W_q`` (``variant.weight``) and error ``E = W − W_q``; calibration inputs
``X`` ``(n, in)`` of that module in the FP model (every real token of mechq's calibration,
:func:`mechq.facts.calibration.get_calibration`, the samples GPTQ uses by default):

- ``G = XᵀX / n = Q Λ Qᵀ`` (float64 eigendecomposition; eigenvalues clamped at
  :data:`EIG_FLOOR` · ``λ_max``);
- ``E' = E Q Λ^{1/2}`` and its truncated SVD ``E' ≈ U_r Σ_r V_rᵀ``;
- ``B = U_r Σ_r`` ``(out, r)``, ``A = V_rᵀ Λ^{-1/2} Qᵀ`` ``(r, in)``; compensated weight
  ``W_q + B A``. Stored, column ``k`` of ``B`` and row ``k`` of ``A`` are rescaled by ``c_k`` and
  ``1/c_k`` to equal norms: the same product, but float16 factors then neither underflow nor
  overflow (``U_r Σ_r`` alone puts the small singular values' columns into float16 subnormals).

Since ``‖(E − BA) Xᵀ‖_F² = n ‖(E − BA) Q Λ^{1/2}‖_F² = n ‖E' − BA Q Λ^{1/2}‖_F²``, Eckart–Young
makes ``B A`` the rank-``r`` minimiser of the error on the calibration inputs (exactly so for the
clamped ``Λ``; the clamp only matters in directions carrying < 1e-10 of the largest one's
energy). At full rank ``B A = E``: the FP weight comes back. :func:`weighted_error` is
``‖D Xᵀ‖_F / √n`` computed from ``G``.

**Where the inputs are read** (TransformerLens hooks, one batched forward of the FP model over the
calibration; only the Gram sums are kept): q/k/v (GPT-2's fused ``c_attn`` too) read the
attention's normalized input, ``blocks.l.ln1.hook_normalized`` times the norm's weight (plus its
bias for LayerNorm), which is what TransformerLens multiplies by ``W_Q/W_K/W_V``; o reads
``attn.hook_z`` with heads flattened ``(n h)``; gate/up read ``ln2`` the same way; down reads
``mlp.hook_post``. mechq loads weights unfolded (``fold_ln=False``, :mod:`mechq.models`), so the
HF weight multiplies exactly these tensors; the tests check ``X Wᵀ + b`` against the output hooks.

**Why not GPTQModel's generator.** gptqmodel 7.6 has EoRA (``gptqmodel/eora/eora.py:
eora_compute_lora``, driven by ``GPTQModel.adapter.generate`` in ``gptqmodel/models/auto.py``
through ``looper/eora_processor.py: EoraProcessor``). Checked here: it does *not* need a GPU
(SmolLM2 GPTQ w4, rank 8, 4 calibration samples ran on CPU in bfloat16 in 213 s), but it does not
fit mechq:

- it loads the quantized checkpoint with the ``TorchLinear`` kernel, which only takes float16 /
  bfloat16 (``select_quant_linear`` in ``gptqmodel/utils/importer.py`` refuses float32), and
  ``EoraProcessor.process`` asserts the compensated weight is float16/bfloat16: mechq's FP
  reference is float32, so the Grams and the error would come from a half-precision model;
- it works on checkpoint directories plus the HF model, not on a ``HookedTransformer`` and a
  :class:`Variant` (variants with ``fp_modules``, from :mod:`mechq.quant.faults`, or in memory);
- it is sequential: ``EoraProcessor.process`` writes ``W_q + B A`` into each module, and the
  layer is replayed with it before the next one's inputs are captured
  (``ExecutionConfig.fwd_replay_after_process`` defaults to true, ``looper/stage_layer.py``),
  so layer ``l``'s Gram comes from the compensated quantized model, not the FP one;
- it accumulates the covariance in float32 and drops eigenvalues below ``n · eps_f32`` of the
  largest, where mechq accumulates in float64 and clamps.

The math is the same (``eora_compute_lora``: eigh of the covariance, SVD of ``E Q Λ^{1/2}``, ``A``
through ``Λ^{-1/2} Qᵀ``; it splits ``Σ^{1/2}`` between the factors, here each rank-one term
is balanced by norm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.facts.calibration import N_SAMPLES, SEQ_LEN, Calibration, get_calibration
from mechq.engine.forward import pad_id
from mechq.quant import layout
from mechq.quant.variants import Variant
from mechq.vocab import hook_name

EIG_FLOOR = 1e-10  # eigenvalue floor relative to the largest: float64 eigh is accurate to
#                    ~in·eps64 ≈ 3e-13 of λ_max (in ≤ 1536 here), so this clamps noise only
BATCH_SIZE = 8  # calibration samples per forward in calibration_grams

# Which input feeds each component's HF module (see the module docstring).
INPUT_OF = {"q": "ln1", "k": "ln1", "v": "ln1", "o": "z", "gate": "ln2", "up": "ln2",
            "down": "post"}


@dataclass(frozen=True)
class ModuleInput:
    """One input of a layer: the hook it is read at and the HF modules it multiplies."""

    layer: int
    kind: str  # ln1 | z | ln2 | post
    hook: str
    modules: tuple[str, ...]


def module_input_sites(model: HookedTransformer) -> list[ModuleInput]:
    """Every distinct linear-module input of the model, in layer order (q/k/v share one)."""
    cfg = model.cfg
    if cfg.use_attn_in or cfg.use_split_qkv_input or cfg.parallel_attn_mlp:
        raise ValueError("EoRA reads q/k/v inputs from ln1 and gate/up from ln2; models with "
                         "use_attn_in, use_split_qkv_input or parallel_attn_mlp are not handled.")
    groups: dict[tuple[int, str], list[str]] = {}
    kind_of: dict[str, str] = {}
    for s in layout.sites(cfg):
        kind = INPUT_OF[s.component]
        if kind_of.setdefault(s.module, kind) != kind:
            raise ValueError(f"{s.module} feeds components with different inputs.")
        mods = groups.setdefault((s.layer, kind), [])
        if s.module not in mods:
            mods.append(s.module)
    return [ModuleInput(l, k, _hook(cfg, l, k), tuple(m)) for (l, k), m in groups.items()]


def _hook(cfg, layer: int, kind: str) -> str:
    if kind in ("ln1", "ln2"):
        if cfg.normalization_type is None:  # no norm: the residual itself
            return hook_name("resid_pre" if kind == "ln1" else "resid_mid", layer)
        return f"blocks.{layer}.{kind}.hook_normalized"
    return hook_name(kind, layer)


def _as_input(model: HookedTransformer, site: ModuleInput, act: Tensor
              ) -> Float[Tensor, "... d_in"]:
    """A hook's activation as the input that multiplies the HF weight."""
    if site.kind == "z":
        return act.flatten(-2)  # (n h), the input order of o_proj / c_proj
    if site.kind in ("ln1", "ln2") and model.cfg.normalization_type is not None:
        norm = getattr(model.blocks[site.layer], site.kind)
        w, b = getattr(norm, "w", None), getattr(norm, "b", None)
        if w is not None:  # TransformerLens: x * w + b (LayerNorm), x * w (RMSNorm)
            act = act * w + b if b is not None else act * w
    return act


@torch.no_grad()
def module_inputs(model: HookedTransformer, tokens: Tensor
                  ) -> dict[str, Float[Tensor, "batch pos d_in"]]:
    """The input of every quantizable linear module on ``tokens`` (one forward, FP weights as the
    model holds them). Modules sharing an input share the tensor."""
    sites = module_input_sites(model)
    hooks = {s.hook for s in sites}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks,
                                    attention_mask=torch.ones_like(tokens))
    out = {}
    for s in sites:
        x = _as_input(model, s, cache[s.hook])
        out.update({m: x for m in s.modules})
    return out


def _calibration(model: HookedTransformer, calibration, n_samples: int | None,
                 seq_len: int | None) -> Calibration:
    if isinstance(calibration, Calibration):
        return calibration
    return get_calibration(model, calibration, n_samples=n_samples or N_SAMPLES,
                           seq_len=seq_len or min(SEQ_LEN, model.cfg.n_ctx))


@torch.no_grad()
def calibration_grams(
    model: HookedTransformer,
    calibration: str | Path | list[str] | Calibration | None = None,
    *,
    n_samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> dict[str, Float[Tensor, "d_in d_in"]]:
    """``G = XᵀX / n`` (float64) of every quantizable linear module's inputs over the calibration.

    One batched forward of the model as it is (call it with FP weights, outside any swap) over
    ``calibration`` (as :func:`mechq.facts.calibration.get_calibration` takes it, default the bundled
    samples GPTQ uses: ``n_samples`` windows of ``seq_len`` tokens, default 32 × min(128, n_ctx);
    a :class:`~mechq.facts.calibration.Calibration` is used as is). Samples are right-padded within a
    batch and padding positions are left out (causal attention: real tokens never see them).
    Modules sharing an input (q/k/v, gate/up) share one tensor. Only the sums are held, never the
    activations.
    """
    from tqdm.auto import tqdm

    calib = _calibration(model, calibration, n_samples, seq_len)
    sites = module_input_sites(model)
    by_hook = {s.hook: s for s in sites}
    sums: dict[str, Tensor] = {}
    mask: list[Tensor] = []  # the current batch's real positions, read by the hooks
    seen: set[str] = set()  # hooks read in this batch: TransformerLens calls ln1 once for each
    #                         of q, k and v, on the same input; it is counted once

    def accumulate(act: Tensor, hook) -> None:
        if hook.name in seen:
            return
        seen.add(hook.name)
        s = by_hook[hook.name]
        x = _as_input(model, s, act)[mask[0]].double()
        g = x.T @ x
        if s.hook in sums:
            sums[s.hook] += g
        else:
            sums[s.hook] = g

    toks, pad = calib.tokens, pad_id(model)
    n = sum(len(t) for t in toks)
    dev = model.cfg.device
    bar = tqdm(total=len(toks), desc="eora grams", unit="sample", disable=not progress)
    for i in range(0, len(toks), batch_size):
        rows = toks[i:i + batch_size]
        width = max(len(t) for t in rows)
        x = torch.tensor([t + [pad] * (width - len(t)) for t in rows], device=dev)
        mask[:] = [torch.tensor([[j < len(t) for j in range(width)] for t in rows], device=dev)]
        seen.clear()
        model.run_with_hooks(x, attention_mask=torch.ones_like(x), return_type=None,
                             fwd_hooks=[(h, accumulate) for h in by_hook])
        bar.update(len(rows))
    bar.close()
    out = {}
    for s in sites:
        g = sums[s.hook].div_(n) if s.hook in sums else None
        out.update({m: g for m in s.modules})
    return out


def _eig(gram: Float[Tensor, "d_in d_in"]) -> tuple[Tensor, Tensor]:
    """``(λ clamped at EIG_FLOOR·λ_max, Q)`` in float64."""
    lam, q = torch.linalg.eigh(gram.double())
    top = float(lam[-1])
    return lam.clamp_min(EIG_FLOOR * top if top > 0 else 1.0), q


def lowrank_factors(
    error: Float[Tensor, "d_out d_in"], gram: Float[Tensor, "d_in d_in"], rank: int,
    eig: tuple[Tensor, Tensor] | None = None,
) -> tuple[Float[Tensor, "d_out r"], Float[Tensor, "r d_in"]]:
    """``(B, A)`` in float64 minimising ``‖(E − BA) Xᵀ‖_F`` at rank ``rank`` for ``G = XᵀX/n``
    (definition in the module docstring). ``eig``: ``_eig(gram)``, when already computed."""
    lam, q = eig if eig is not None else _eig(gram)
    root = lam.sqrt()
    u, sig, vh = torch.linalg.svd((error.double() @ q) * root, full_matrices=False)
    b, a = u[:, :rank] * sig[:rank], (vh[:rank] / root) @ q.T
    # the same product with each rank-one term's two vectors at equal norm, so that float16
    # storage keeps neither factor's small entries near underflow while the other is large
    c = (a.norm(dim=1) / b.norm(dim=0).clamp_min(1e-300)).sqrt().clamp_min(1e-150)
    return b * c, a / c[:, None]


def weighted_error(delta: Float[Tensor, "d_out d_in"], gram: Float[Tensor, "d_in d_in"]
                   ) -> float:
    """``‖D Xᵀ‖_F / √n = √tr(D G Dᵀ)``: a weight difference's error on the calibration inputs."""
    d = delta.double()
    return float(((d @ gram.double()) * d).sum().clamp_min(0).sqrt())


def eora(
    model: HookedTransformer,
    variant: Variant,
    rank: int | Mapping[str, int],
    *,
    calibration: str | Path | list[str] | Calibration | None = None,
    n_samples: int | None = None,
    grams: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float16,
    eigs: dict[int, tuple[Tensor, Tensor]] | None = None,
    progress: bool = True,
) -> Variant:
    """``variant`` with a rank-``rank`` EoRA correction on every packed module (``rank`` a
    mapping ``{module: rank}``: on those modules only, each at its own rank; a recipe's ranks).

    Returns a new :class:`Variant` named ``f"{variant.name}-eora{rank}"`` (a mapping: its ranks
    joined by ``/``) with the same packed modules and ``lowrank[module] = (B, A)`` stored in
    ``dtype`` (float16, as counted by
    :attr:`Variant.avg_bits`; float32 keeps the float64 result to float32 precision). Modules the
    variant keeps in full precision get none. ``model`` must hold its FP weights (not be inside
    a swap). ``grams`` (from :func:`calibration_grams`) lets several variants and ranks share one
    calibration pass; without it the Grams are computed here from ``calibration`` /
    ``n_samples`` and dropped afterwards. ``eigs``: a dict this call fills with each Gram's
    eigendecomposition (keyed by the Gram's ``id``); pass the same dict with the same ``grams``
    to later calls and they skip the eigendecompositions.
    """
    from tqdm.auto import tqdm

    ranks = dict(rank) if isinstance(rank, Mapping) else None
    for r in ranks.values() if ranks is not None else [rank]:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"rank must be an int, got {type(r).__name__}.")
    if ranks is not None:
        loose = sorted(set(ranks) - set(variant.modules))
        if loose:
            raise ValueError(f"rank names {loose[0]!r}, which Variant {variant.name!r} does not "
                             "pack.")
        if not ranks:
            raise ValueError("rank is an empty mapping: no module to correct.")
    if variant.lowrank:
        raise ValueError(f"Variant {variant.name!r} already has a low-rank correction; "
                         "compensate its base variant instead.")
    if variant.norms:
        raise ValueError(f"Variant {variant.name!r} rewrites norms ({variant.method.upper()} "
                         "folds its scales into them), so its weights are not the FP weights' "
                         "coordinates; EoRA here compensates GPTQ and RTN variants only.")
    have = set(layout.modules(model.cfg))
    foreign = [m for m in variant.modules if m not in have]
    if foreign:
        raise ValueError(f"Variant {variant.name!r} has modules this model lacks ({foreign[0]!r}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                         "was it made for another model?")
    shapes = {}
    for m, p in variant.modules.items():
        w_shape = tuple(layout.module_weight(model, m).shape)
        if (p.out_features, p.in_features) != w_shape:
            raise ValueError(f"Variant {variant.name!r}: {m} is {p.out_features}×{p.in_features}, "
                             f"the model's is {w_shape[0]}×{w_shape[1]}; another model?")
        shapes[m] = w_shape
    ranks = ranks if ranks is not None else dict.fromkeys(variant.modules, rank)
    for m, r in ranks.items():
        if not 1 <= r <= min(shapes[m]):
            raise ValueError(f"rank must lie in 1 … {min(shapes[m])} (min(out, in) of {m}), "
                             f"got {r}.")
    if grams is None:
        grams = calibration_grams(model, calibration, n_samples=n_samples, progress=progress)
    missing = [m for m in ranks if m not in grams]
    if missing:
        raise ValueError(f"grams has no entry for {missing[0]!r}.")

    eigs = {} if eigs is None else eigs  # one eigendecomposition per shared Gram
    lowrank = {}
    label = str(rank) if not isinstance(rank, Mapping) else \
        "/".join(str(r) for r in sorted(set(ranks.values())))
    for m in tqdm(list(ranks), desc=f"eora r{label}", unit="module", disable=not progress):
        g = grams[m]
        if id(g) not in eigs:
            eigs[id(g)] = _eig(g)
        w = layout.module_weight(model, m).double()
        e = w - variant.weight(m, torch.float32, device=w.device).double()
        b, a = lowrank_factors(e, g, ranks[m], eigs[id(g)])
        lowrank[m] = (b.to(dtype).cpu(), a.to(dtype).cpu())
        if not all(torch.isfinite(t).all() for t in lowrank[m]):
            raise FloatingPointError(f"EoRA factors of {m} overflow {dtype}; use dtype=float32.")
    info = dict(rank=dict(ranks) if isinstance(rank, Mapping) else rank, base=variant.name,
                dtype=str(dtype).removeprefix("torch."))
    return replace(variant, name=f"{variant.name}-eora{label}", lowrank=lowrank,
                   meta=dict(variant.meta, eora=info))
