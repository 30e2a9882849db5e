"""Quantized variants of a model, and the weight swap that puts them into it.

A :class:`Variant` holds the quantized weights of every linear module compactly (packed integer
codes, fp16 scales and packed zero points, in the GPTQ layout) and dequantizes a module only
when it is swapped in. :func:`swap` is a context manager that writes the dequantized weights of
chosen layers and components into a ``HookedTransformer`` and restores the original tensors,
bit-identically, on exit (also when the body raises). The model object is never copied, so FP
and quantized runs share one set of hook names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformer

from mechq.quant import layout
from mechq.quant.packing import PackedLinear


@dataclass
class Variant:
    """A quantized version of a model's linear layers.

    ``modules`` maps Hugging Face module names to packed weights. ``avg_bits`` is the mean
    storage per weight, counting codes, zero points and fp16 scales (``g_idx`` is not counted:
    it is implied by the group size unless ``desc_act``).
    """

    name: str
    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    modules: dict[str, PackedLinear]
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Variant({self.name!r}, method={self.method}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
            f"modules={len(self.modules)}, avg_bits={self.avg_bits:.3f})"
        )

    @property
    def n_weights(self) -> int:
        return sum(p.in_features * p.out_features for p in self.modules.values())

    @property
    def avg_bits(self) -> float:
        bits = 0
        for p in self.modules.values():
            bits += 8 * (
                p.qweight.numel() * p.qweight.element_size()
                + p.qzeros.numel() * p.qzeros.element_size()
                + p.scales.numel() * p.scales.element_size()
            )
        return bits / max(self.n_weights, 1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors of all modules."""
        return sum(p.nbytes for p in self.modules.values())

    def weight(self, module: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Dequantized ``(out, in)`` weight of one module, computed on ``device`` (default: where
        the packed tensors are). Only the packed tensors travel: on a GPU the dequantization
        runs there, with the same float16 arithmetic (bit-identical result)."""
        try:
            packed = self.modules[module]
        except KeyError:
            raise KeyError(f"Variant {self.name!r} has no module {module!r}.") from None
        if device is not None:
            packed = packed.to(device)
        return packed.weight(dtype)


VariantSpec = Variant | Mapping[int, Variant | None] | None


def _plan(
    model: HookedTransformer,
    variant: VariantSpec,
    layers: int | Iterable[int] | None,
    components: str | Iterable[str],
) -> tuple[dict[tuple[int, str], list[layout.Site]], dict[int, Variant]]:
    """Group the sites to swap by (variant, module), so each module is dequantized once."""
    chosen = layout.select(model.cfg, layers, components)
    if isinstance(variant, Mapping):
        per_layer = dict(variant)
        bad = [l for l in per_layer if not 0 <= l < model.cfg.n_layers]
        if bad:
            raise ValueError(f"Layers {bad} out of range: the model has {model.cfg.n_layers}.")
    else:
        per_layer = {l: variant for l in range(model.cfg.n_layers)}
    plan: dict[tuple[int, str], list[layout.Site]] = defaultdict(list)
    registry: dict[int, Variant] = {}
    for s in chosen:
        v = per_layer.get(s.layer)
        if v is None:  # FP for this layer
            continue
        if not isinstance(v, Variant):
            raise TypeError(f"Expected a mechq Variant for layer {s.layer}, got {type(v).__name__}")
        if s.module not in v.modules:
            raise ValueError(
                f"Variant {v.name!r} has no weights for {s.module!r} (layer {s.layer}, "
                f"component {s.component!r}); was it made for another model?"
            )
        registry[id(v)] = v
        plan[(id(v), s.module)].append(s)
    return plan, registry


@contextmanager
def swap(
    model: HookedTransformer,
    variant: VariantSpec,
    layers: int | Iterable[int] | None = None,
    components: str | Iterable[str] = "all",
) -> Iterator[HookedTransformer]:
    """Temporarily put quantized weights into ``model``.

    ``variant`` is a :class:`Variant` (applied to ``layers``, default all) or a mapping
    ``{layer: Variant | None}`` for mixed precision (``None`` or a missing layer stays FP).
    ``components`` takes ``q k v o gate up down`` and the groups ``attn``, ``mlp``, ``all``.
    On exit every parameter gets back the very tensor it had before (bit-identical restore).
    Swaps nest: an inner swap restores the outer swap's weights.
    """
    plan, registry = _plan(model, variant, layers, components)
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        for (vid, module), site_list in plan.items():
            ref = params[site_list[0].param]
            w = registry[vid].weight(module, dtype=ref.dtype, device=ref.device)
            for s in site_list:
                p = params[s.param]
                new = layout.linear_to_hooked(w, s, model.cfg).contiguous()
                if new.shape != p.shape:
                    raise ValueError(
                        f"Variant {registry[vid].name!r}: {module} gives {s.param} shape "
                        f"{tuple(new.shape)}, the model has {tuple(p.shape)}."
                    )
                saved.setdefault(s.param, p.data)
                p.data = new
        yield model
    finally:
        for name, data in saved.items():
            params[name].data = data


def swapped(model: HookedTransformer, variant: VariantSpec | None):
    """``swap(model, variant)`` for a variant; for FP (``None``) a context that changes nothing.

    The one place that decides "swap or not": every analysis that loops over FP and variants
    enters ``with swapped(model, v):``.
    """
    return swap(model, variant) if variant is not None else nullcontext(model)
