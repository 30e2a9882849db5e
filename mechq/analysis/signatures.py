"""Weight-space signatures: how far each quantized module sits from the FP weights it encodes.

For one linear module with FP weight ``W`` and dequantized weight ``Ŵ = s·(q − z)`` (per-element
scale ``s`` from the module's group), all ``(out, in)``:

- ``cosine``: ``⟨W, Ŵ⟩ / (‖W‖ ‖Ŵ‖)`` over all elements. Honest quantization keeps a clear
  correlation even at 2 bits; weights read with the wrong layout (nibble order, transposed
  codes) are about uncorrelated with ``W``.
- ``rel_error``: ``‖Ŵ − W‖ / ‖W‖``.
- ``step_error``: the median over elements of ``|Ŵ − W| / s``: the error in quantization steps.
  Rounding puts it near 0.25 steps; GPTQ's error feedback moves it up, but a weight stays within
  a step or two of its grid point.
- ``error_corr``: the Pearson correlation over elements between the error's size ``|Ŵ − W|``
  and the weight's ``|W|``. Rounding, GPTQ's feedback and quantizing other FP weights leave
  errors whose size does not depend on the weight's (near 0); a weight read with another
  group's scale is ``W`` times a wrong factor, an error that grows with ``|W|``.
- ``beyond_half``: the share of elements with ``|Ŵ − W| / s > ½``: weights further from their
  FP value than rounding to the nearest grid point allows. Round-to-nearest puts (almost) none
  there; GPTQ's error feedback puts some (it rounds ``W`` plus the error it carries forward);
  weights quantized from *other* FP weights put many, in every module.
- ``step_bias``: the median over (group, output) cells of ``|mean_group(Ŵ − W)| / s``: how far a
  whole group is shifted, in steps. Rounding errors of a group average out; a zero point off by
  one shifts every weight of the group by one step (``step_bias ≈ 1``).

:func:`weight_signatures` gives one row per module; :func:`module_signature` the numbers of one.
For an AWQ variant ``W`` is the FP weight in AWQ's coordinates (its activation scales folded in,
:func:`mechq.quant.formats.awq.fp_targets`): AWQ quantizes that, not ``W`` itself. A variant that
knows its scales exactly (SmoothQuant: ``meta["fp_scales"]``, per module ``(s_out, s_in)``) is
compared with ``diag(1/s_out) · W · diag(s_in)``.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.quant import layout
from mechq.quant.packing import PackedLinear
from mechq.quant.variants import Variant

SIGNATURES = ("cosine", "error_corr", "rel_error", "step_error", "beyond_half", "step_bias")


def module_signature(w_fp: Float[Tensor, "out in"], packed: PackedLinear) -> dict[str, float]:
    """The signatures (module docstring) of one packed module against its FP weight."""
    w_fp = w_fp.detach().float().cpu()
    packed = packed.to("cpu")
    w_q = packed.weight(torch.float32)
    if w_q.shape != w_fp.shape:
        raise ValueError(f"quantized weight {tuple(w_q.shape)} vs FP weight {tuple(w_fp.shape)}")
    g = packed.g_idx.long()
    step = packed.scales.float()[g].T.abs().clamp_min(1e-12)     # (out, in), per element
    err = w_q - w_fp
    cos = torch.nn.functional.cosine_similarity(w_q.flatten(), w_fp.flatten(), dim=0)
    # group means of the error, per output row: scatter the in-axis into groups by g_idx
    n_groups = packed.n_groups
    sums = torch.zeros(w_fp.shape[0], n_groups).index_add_(1, g, err)
    counts = torch.bincount(g, minlength=n_groups).clamp_min(1).float()
    group_step = packed.scales.float().T.abs().clamp_min(1e-12)  # (out, groups)
    bias = (sums / counts).abs() / group_step
    e, w = err.flatten().abs().double(), w_fp.flatten().abs().double()
    e, w = e - e.mean(), w - w.mean()
    corr = (e @ w) / (e.norm() * w.norm()).clamp_min(1e-300)
    return dict(
        cosine=float(cos),
        error_corr=float(corr),
        rel_error=float(err.norm() / w_fp.norm().clamp_min(1e-12)),
        step_error=float((err.abs() / step).median()),
        beyond_half=float((err.abs() / step > 0.5).float().mean()),
        step_bias=float(bias[:, counts > 0].median()) if n_groups else float("nan"),
    )


def weight_signatures(model: HookedTransformer, variant: Variant) -> pd.DataFrame:
    """One row per quantized module of ``variant``: layer, component(s), bits and the
    signatures against ``model``'s current (FP) weights."""
    sites = layout.sites(model.cfg)
    targets = {}
    if variant.meta.get("fp_scales"):  # SmoothQuant: its scales are known exactly
        for module, (s_out, s_in) in variant.meta["fp_scales"].items():
            w = layout.module_weight(model, module).detach().float()
            w = w * s_in[None, :] if s_in is not None else w
            targets[module] = w / s_out[:, None] if s_out is not None else w
    elif variant.norms:  # AWQ: compare with the scaled weights AWQ quantized
        from mechq.quant.formats.awq import fp_targets

        targets = fp_targets(model, variant)
    rows = []
    for module in layout.modules(model.cfg):
        if module not in variant.modules:  # kept in full precision by the variant's rules
            continue
        if not isinstance(variant.modules[module], PackedLinear):  # FP8: no integer grid
            continue
        mine = [s for s in sites if s.module == module]
        p = variant.modules[module]
        rows.append(dict(variant=variant.name, module=module, layer=mine[0].layer,
                         component="+".join(s.component for s in mine), bits=p.bits,
                         **module_signature(targets.get(module, layout.module_weight(model, module)), p)))
    # an activation-only variant packs no module: an empty frame with the columns
    return pd.DataFrame(rows, columns=["variant", "module", "layer", "component", "bits",
                                       *SIGNATURES])
