"""Quantized variants of a model, and the weight swap that puts them into it.

A :class:`Variant` holds the quantized weights of every quantized linear module compactly
(packed integer codes, fp16 scales and packed zero points, in the GPTQ layout; each module with its
own bit width when the variant was made with per-module ``dynamic`` rules) and dequantizes a module
only when it is swapped in. :func:`swap` is a context manager that writes the dequantized weights of
chosen layers and components into a ``HookedTransformer`` and restores the original tensors,
bit-identically, on exit (also when the body raises). The model object is never copied, so FP
and quantized runs share one set of hook names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from transformer_lens import HookedTransformer

from mechq.facts.calibration import from_pool
from mechq.quant import activation_quant as aq
from mechq.quant import dynamic as dyn
from mechq.quant import layout
from mechq.quant.packing import PackedLinear


FP_BITS = 16  # storage per weight counted for a linear module a variant keeps unquantized


@dataclass
class Variant:
    """A quantized version of a model's linear layers.

    ``modules`` maps Hugging Face module names to packed weights. ``bits``, ``group_size``,
    ``sym`` and ``desc_act`` are the base settings; ``dynamic`` holds the GPTQModel-style
    per-module rules the variant was made with (:mod:`mechq.quant.dynamic`; ``None`` for a
    uniform variant), so a module's own bit width is in :attr:`module_bits`. ``fp_modules`` maps
    each linear module that a ``-:`` rule keeps in full precision to its ``(out, in)`` shape:
    the variant holds no weights for it and :func:`swap` leaves the model's own weight there.
    ``lowrank`` maps a packed module to a low-rank correction ``(B, A)``, ``B`` ``(out, r)`` and
    ``A`` ``(r, in)`` (float16 or float32; :func:`mechq.repair.eora.eora` makes them): its weight is
    then the dequantized one plus ``B @ A``.
    ``act`` is an activation / KV-cache scheme (:mod:`mechq.quant.activation_quant`) that
    :func:`swap` installs as hooks with the weights (:func:`with_activations` makes one).
    ``norms`` maps HF norm tensors (``model.layers.3.input_layernorm.weight``) that the
    quantizer rewrote without quantizing them to their new values: AWQ folds its activation
    scales into the norm before q/k/v and before gate/up (and between v→o and up→down, inside
    quantized weights). :func:`swap` puts them in with the modules that read them, and refuses
    to split a layer's attention or MLP modules of such a variant, because a fold couples them.
    """

    name: str
    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    modules: dict[str, PackedLinear]  # or mechq.quant.fp8.Fp8Linear (FP8 weights)
    meta: dict = field(default_factory=dict)
    dynamic: dict | None = None
    fp_modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    act: aq.ActScheme | None = None

    def __repr__(self) -> str:
        mixed = f", dynamic={len(self.dynamic)} rules" if self.dynamic else ""
        ranks = sorted({b.shape[1] for b, _ in self.lowrank.values()})
        if ranks:
            mixed += f", lowrank rank={'/'.join(map(str, ranks))} on {len(self.lowrank)} modules"
        if self.act is not None:
            mixed += f", act={self.act.name}"
        return (
            f"Variant({self.name!r}, method={self.method}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}{mixed}, "
            f"modules={len(self.modules)}, avg_bits={self.avg_bits:.3f})"
        )

    @property
    def module_bits(self) -> dict[str, int]:
        """Bits of every linear module: a packed module's own width, :data:`FP_BITS` (16) for
        one the dynamic rules keep in full precision."""
        return {**{m: p.bits for m, p in self.modules.items()},
                **{m: FP_BITS for m in self.fp_modules}}

    def skips(self, module: str) -> bool:
        """True when the variant's dynamic rules leave ``module`` unquantized (full precision)."""
        return module not in self.modules and dyn.skipped(module, self.dynamic)

    @property
    def n_weights(self) -> int:
        """Weights of the linear modules the variant covers, packed or kept in full precision."""
        return (sum(p.in_features * p.out_features for p in self.modules.values())
                + sum(o * i for o, i in self.fp_modules.values()))

    @property
    def avg_bits(self) -> float:
        """Mean storage bits per weight over the linear modules (:attr:`n_weights`).

        A packed module counts its codes, zero points and fp16 scales (``g_idx`` is not counted:
        it is implied by the group size unless ``desc_act``); a module kept in full precision
        counts :data:`FP_BITS` = 16 per weight, its storage in an fp16 checkpoint (the model in
        memory may be float32). Embeddings, norms and the LM head are not counted.
        A low-rank correction adds 16 bits per stored entry, ``r · (in + out)`` entries per
        module (its fp16 storage, whatever dtype it is held in).
        """
        bits = FP_BITS * sum(o * i for o, i in self.fp_modules.values())
        bits += FP_BITS * sum(b.numel() + a.numel() for b, a in self.lowrank.values())
        for p in self.modules.values():
            bits += 8 * (
                p.qweight.numel() * p.qweight.element_size()
                + p.qzeros.numel() * p.qzeros.element_size()
                + p.scales.numel() * p.scales.element_size()
            )
        return bits / max(self.n_weights, 1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors of all modules and their low-rank factors."""
        return (sum(p.nbytes for p in self.modules.values())
                + sum(b.nbytes + a.nbytes for b, a in self.lowrank.values()))

    def weight(self, module: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Dequantized ``(out, in)`` weight of one module, computed on ``device`` (default: where
        the packed tensors are). Only the packed tensors travel: on a GPU the dequantization
        runs there, with the same float16 arithmetic (bit-identical result). A module with a
        low-rank correction is ``dequantized + B @ A`` in float32, then cast to ``dtype`` (the
        float32 matmul may round differently on another device)."""
        try:
            packed = self.modules[module]
        except KeyError:
            raise KeyError(f"Variant {self.name!r} has no module {module!r}.") from None
        if device is not None:
            packed = packed.to(device)
        if module not in self.lowrank:
            return packed.weight(dtype)
        b, a = (t.to(device=packed.qweight.device, dtype=torch.float32)
                for t in self.lowrank[module])
        return (packed.weight(torch.float32) + b @ a).to(dtype)


VariantSpec = Variant | Mapping[int, Variant | None] | None


def _plan(
    model: HookedTransformer,
    variant: VariantSpec,
    layers: int | Iterable[int] | None,
    components: str | Iterable[str],
) -> tuple[dict[tuple[int, str], list[layout.Site]], dict[int, Variant]]:
    """Group the sites to swap by (variant, module), so each module is dequantized once; a
    variant's rewritten norms join under the key ``(id(variant), "norm:" + tensor)``."""
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
            if v.skips(s.module):  # kept in full precision by the variant's dynamic rules
                continue
            raise ValueError(
                f"Variant {v.name!r} has no weights for {s.module!r} (layer {s.layer}, "
                f"component {s.component!r}); was it made for another model?"
            )
        registry[id(v)] = v
        plan[(id(v), s.module)].append(s)
    _plan_norms(model, chosen, per_layer, plan, registry)
    return plan, registry


def _plan_norms(model, chosen, per_layer, plan, registry) -> None:
    """Add the rewritten norms of the variants being swapped in (AWQ's folds), after checking
    that no layer's attention or MLP modules of such a variant are split."""
    picked = defaultdict(set)
    for s in chosen:
        v = per_layer.get(s.layer)
        if isinstance(v, Variant) and v.norms:
            picked[s.layer].add(s.component)
    if not picked:
        return
    comps = {s.component for s in layout.sites(model.cfg)}
    for layer, got in picked.items():
        v = per_layer[layer]
        for group in ("attn", "mlp"):
            need = set(layout.GROUPS[group]) & comps
            if got & need and not need <= got:
                raise ValueError(
                    f"Variant {v.name!r} folds scales between modules ({v.method.upper()}: norm → "
                    f"the modules reading it, v → o, up → down), so layer {layer}'s "
                    f"{' '.join(sorted(need))} must be swapped together; got "
                    f"{' '.join(sorted(got & need))}. Use components 'attn', 'mlp' or 'all'.")
    for n in layout.norm_sites(model.cfg):
        if n.layer in picked and set(n.components) & picked[n.layer]:
            v = per_layer[n.layer]
            if n.tensor in v.norms:
                registry[id(v)] = v
                plan[(id(v), "norm:" + n.tensor)].append(n)


def _act_plan(model: HookedTransformer, variant: VariantSpec, layers, components
              ) -> dict[int, tuple[aq.ActScheme, tuple[str, ...]]]:
    """Per chosen layer, the activation scheme of its variant and the chosen components."""
    chosen = layout.select(model.cfg, layers, components)
    per_layer = dict(variant) if isinstance(variant, Mapping) else None
    out: dict[int, tuple[aq.ActScheme, tuple[str, ...]]] = {}
    for s in chosen:
        v = per_layer.get(s.layer) if per_layer is not None else variant
        if isinstance(v, Variant) and v.act is not None:
            act, comps = out.get(s.layer, (v.act, ()))
            out[s.layer] = (act, (*comps, s.component))
    return out


def with_activations(variant: Variant | None, act: aq.ActScheme,
                     model: HookedTransformer | None = None) -> Variant:
    """``variant`` with the activation / KV-cache scheme ``act`` (W4A8 = GPTQ w4 + ``A8``),
    named ``"<variant>+<scheme>"``. ``variant=None`` gives FP weights with ``act`` alone
    (``W16A8``): a variant that packs no module and keeps every linear module of ``model`` in
    full precision. The packed weights are shared, not copied."""
    if not isinstance(act, aq.ActScheme):
        raise TypeError(f"act must be an ActScheme, got {type(act).__name__}")
    if variant is None:
        if model is None:
            raise ValueError("with_activations(None, act) needs the model, for its modules.")
        shapes = {s.module: tuple(layout.module_weight(model, s.module).shape)
                  for s in layout.sites(model.cfg)}
        return Variant(f"fp+{act.name}", "fp", FP_BITS, -1, True, False, {},
                       dynamic={"-:.*": {}}, fp_modules=shapes, act=act)
    if variant.act is not None:
        raise ValueError(f"Variant {variant.name!r} already has activation scheme "
                         f"{variant.act.name!r}.")
    return replace(variant, name=f"{variant.name}+{act.name}", act=act)


def calibrated(model: HookedTransformer, variant: Variant,
               sequences: list[list[int]] | None = None) -> Variant:
    """``variant`` with its static activation scales calibrated (:func:`aq.calibrate`) on
    ``sequences`` (default: 16 sequences of 128 tokens, fewer where the model's context is
    shorter, from the bundled calibration pool, the text GPTQ calibrates on), with the
    variant's weights in place. A variant without a static scheme comes back as it is."""
    if variant.act is None or not variant.act.static:
        return variant
    if sequences is None:
        sequences = from_pool(model, n_samples=16, seq_len=min(128, model.cfg.n_ctx)).tokens
    with swap(model, replace(variant, act=None)):
        act = aq.calibrate(model, variant.act, sequences)
    return replace(variant, act=act)


@contextmanager
def swap(
    model: HookedTransformer,
    variant: VariantSpec | None,
    layers: int | Iterable[int] | None = None,
    components: str | Iterable[str] = "all",
) -> Iterator[HookedTransformer]:
    """Temporarily put quantized weights into ``model``: the one way mechq runs a variant.

    ``variant`` is a :class:`Variant` (applied to ``layers``, default all), a mapping
    ``{layer: Variant | None}`` for mixed precision (``None`` or a missing layer stays FP), or
    ``None`` for the FP model itself (nothing changes), so that a loop over FP and variants
    enters ``with swap(model, v):`` for each.
    Modules the variant's dynamic rules skip keep the model's own weights; a module the variant
    lacks for any other reason (a variant of another model) is an error.
    ``components`` takes ``q k v o gate up down`` and the groups ``attn``, ``mlp``, ``all``.
    A variant with an activation scheme (``variant.act``) also quantizes, in the chosen layers,
    the activation sites that feed the chosen components (its hooks run first on their hook
    points, and are removed on exit).
    On exit every parameter gets back the very tensor it had before (bit-identical restore).
    Swaps nest: an inner swap restores the outer swap's weights; activation hooks of nested
    swaps add up.
    """
    if variant is None:
        yield model
        return
    plan, registry = _plan(model, variant, layers, components)
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    acts = _act_plan(model, variant, layers, components)
    try:
        for (vid, module), site_list in plan.items():
            if module.startswith("norm:"):
                n = site_list[0]
                p = params[n.param]
                new = layout.norm_to_hooked(registry[vid].norms[n.tensor], n, model.cfg)
                new = new.to(dtype=p.dtype, device=p.device).contiguous()
                if new.shape != p.shape:
                    raise ValueError(f"Variant {registry[vid].name!r}: {n.tensor} has shape "
                                     f"{tuple(new.shape)}, the model's {n.param} {tuple(p.shape)}.")
                saved.setdefault(n.param, p.data)
                p.data = new
                continue
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
        with aq.installed(model, acts):
            yield model
    finally:
        for name, data in saved.items():
            params[name].data = data

