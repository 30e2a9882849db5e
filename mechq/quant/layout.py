"""Where each quantized matrix lives: Hugging Face linear modules <-> HookedTransformer weights.

Quantizers (GPTQ, RTN) work on the Hugging Face *linear modules* of a model (``q_proj``,
``gate_proj``, GPT-2's fused ``c_attn`` ...). Analyses name *components* as the paper does:
``q k v o gate up down``. A :class:`Site` ties one component of one layer to the module its
weights come from and the HookedTransformer parameter they go into.

Which module feeds which parameter, and the reshapes between them, belong to the model's family
(:mod:`mechq.models.families`); this module is the architecture-free interface to them. A module's
weight is handled as ``torch.nn.Linear.weight``, shape ``(out_features, in_features)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from mechq.models.families import NormSite, Site, family_of

COMPONENTS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all": COMPONENTS,
}


def sites(cfg: HookedTransformerConfig) -> list[Site]:
    """Every (layer, component) site of a model, in layer then component order."""
    family = family_of(cfg)
    return [s for l in range(cfg.n_layers) for s in family.layer_sites(cfg, l)]


def norm_sites(cfg: HookedTransformerConfig) -> list[NormSite]:
    """Every norm that feeds quantized modules (what AWQ rewrites), in layer order."""
    family = family_of(cfg)
    return [n for l in range(cfg.n_layers) for n in family.norm_sites(cfg, l)]


def norm_to_hooked(t: Tensor, site: NormSite, cfg: HookedTransformerConfig) -> Tensor:
    """The HookedTransformer tensor for a norm site from its HF tensor."""
    return family_of(cfg).norm_to_hooked(t, site, cfg)


def modules(cfg: HookedTransformerConfig) -> list[str]:
    """The HF linear module names a quantizer must produce for this model, in order."""
    return list(dict.fromkeys(s.module for s in sites(cfg)))


def expand_components(components: str | Iterable[str]) -> tuple[str, ...]:
    """``"attn"`` -> ``("q","k","v","o")``; accepts names, groups, or an iterable of both."""
    items = [components] if isinstance(components, str) else list(components)
    out: list[str] = []
    for c in items:
        if c in GROUPS:
            out += GROUPS[c]
        elif c in COMPONENTS:
            out.append(c)
        else:
            raise ValueError(
                f"Unknown component {c!r}; use one of {', '.join(COMPONENTS)} "
                f"or a group {', '.join(GROUPS)}."
            )
    return tuple(dict.fromkeys(out))


def select(
    cfg: HookedTransformerConfig,
    layers: int | Iterable[int] | None = None,
    components: str | Iterable[str] = "all",
) -> list[Site]:
    """The sites for the chosen layers (None = all) and components."""
    if layers is None:
        chosen = set(range(cfg.n_layers))
    elif isinstance(layers, int):
        chosen = {layers}
    else:
        chosen = set(layers)
    bad = sorted(l for l in chosen if not 0 <= l < cfg.n_layers)
    if bad:
        raise ValueError(f"Layers {bad} out of range: the model has {cfg.n_layers} layers.")
    comps = set(expand_components(components))
    return [s for s in sites(cfg) if s.layer in chosen and s.component in comps]


def linear_to_hooked(
    w: Float[Tensor, "out in"], site: Site, cfg: HookedTransformerConfig
) -> Tensor:
    """The HookedTransformer tensor for ``site`` from its module's Linear-oriented weight."""
    return family_of(cfg).to_hooked(w, site, cfg)


def module_weight(model, module: str) -> Float[Tensor, "out in"]:
    """Reassemble a HF module's Linear-oriented weight from the model's current parameters.

    This is the inverse of :func:`linear_to_hooked` and lets quantizers work on whatever
    weights the HookedTransformer holds.
    """
    return module_tensor(dict(model.named_parameters()), module, model.cfg)


def module_tensor(params: Mapping[str, Tensor], module: str, cfg: HookedTransformerConfig
                  ) -> Float[Tensor, "out in"]:
    """:func:`module_weight` for any tensors keyed by HookedTransformer parameter name and shaped
    like those parameters (their gradients, say): the same reshape, permutation and
    concatenation of parts, so an elementwise quantity lands on the weight it belongs to."""
    parts = [s for s in sites(cfg) if s.module == module]
    if not parts:
        raise KeyError(f"{module!r} is not a quantizable module of this model.")
    return family_of(cfg).from_hooked(params, parts, cfg)
