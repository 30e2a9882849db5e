"""Where each quantized matrix lives: Hugging Face linear modules <-> HookedTransformer weights.

Quantizers (GPTQ, RTN) work on the Hugging Face *linear modules* of a model (``q_proj``,
``gate_proj``, GPT-2's fused ``c_attn`` ...). Analyses name *components* as the paper does:
``q k v o gate up down``. A :class:`Site` ties one component of one layer to the module its
weights come from and the HookedTransformer parameter they go into.

Orientation convention: a module's weight is handled as ``torch.nn.Linear.weight``, shape
``(out_features, in_features)``; GPT-2's ``Conv1D`` stores the transpose, which is accounted for
here. For GELU (GPT-2) models there is no gate: ``up`` is the MLP input matrix (``c_fc``) and
``down`` its output matrix (``c_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformerConfig

COMPONENTS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all": COMPONENTS,
}


@dataclass(frozen=True)
class Site:
    """One component of one layer: ``module`` (HF name) feeds HookedTransformer ``param``.

    ``part`` selects a slice of a fused module (GPT-2 ``c_attn`` holds q, k, v as parts 0, 1, 2).
    """

    layer: int
    component: str
    module: str
    param: str
    part: int | None = None


def _is_gpt2(cfg: HookedTransformerConfig) -> bool:
    return cfg.original_architecture == "GPT2LMHeadModel"


def sites(cfg: HookedTransformerConfig) -> list[Site]:
    """Every (layer, component) site of a model, in layer then component order."""
    out: list[Site] = []
    for l in range(cfg.n_layers):
        if _is_gpt2(cfg):
            p = f"transformer.h.{l}"
            out += [
                Site(l, "q", f"{p}.attn.c_attn", f"blocks.{l}.attn.W_Q", 0),
                Site(l, "k", f"{p}.attn.c_attn", f"blocks.{l}.attn.W_K", 1),
                Site(l, "v", f"{p}.attn.c_attn", f"blocks.{l}.attn.W_V", 2),
                Site(l, "o", f"{p}.attn.c_proj", f"blocks.{l}.attn.W_O"),
                Site(l, "up", f"{p}.mlp.c_fc", f"blocks.{l}.mlp.W_in"),
                Site(l, "down", f"{p}.mlp.c_proj", f"blocks.{l}.mlp.W_out"),
            ]
        else:
            p = f"model.layers.{l}"
            kv = "_" if cfg.n_key_value_heads is not None else ""
            out += [
                Site(l, "q", f"{p}.self_attn.q_proj", f"blocks.{l}.attn.W_Q"),
                Site(l, "k", f"{p}.self_attn.k_proj", f"blocks.{l}.attn.{kv}W_K"),
                Site(l, "v", f"{p}.self_attn.v_proj", f"blocks.{l}.attn.{kv}W_V"),
                Site(l, "o", f"{p}.self_attn.o_proj", f"blocks.{l}.attn.W_O"),
                Site(l, "gate", f"{p}.mlp.gate_proj", f"blocks.{l}.mlp.W_gate"),
                Site(l, "up", f"{p}.mlp.up_proj", f"blocks.{l}.mlp.W_in"),
                Site(l, "down", f"{p}.mlp.down_proj", f"blocks.{l}.mlp.W_out"),
            ]
    return out


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
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    if _is_gpt2(cfg):
        conv = w.T  # Conv1D orientation (in, out)
        c = site.component
        if c in ("q", "k", "v"):
            part = conv[:, site.part * cfg.d_model : (site.part + 1) * cfg.d_model]
            return einops.rearrange(part, "m (n h) -> n m h", n=cfg.n_heads)
        if c == "o":
            return einops.rearrange(conv, "(n h) m -> n h m", n=cfg.n_heads)
        return conv  # up: (d_model, d_mlp); down: (d_mlp, d_model)
    c = site.component
    if c == "q":
        return einops.rearrange(w, "(n h) m -> n m h", n=cfg.n_heads)
    if c in ("k", "v"):
        return einops.rearrange(w, "(n h) m -> n m h", n=n_kv)
    if c == "o":
        return einops.rearrange(w, "m (n h) -> n h m", n=cfg.n_heads)
    return w.T  # gate/up: (d_model, d_mlp); down: (d_mlp, d_model)


def module_weight(model, module: str) -> Float[Tensor, "out in"]:
    """Reassemble a HF module's Linear-oriented weight from the model's current parameters.

    This is the inverse of :func:`linear_to_hooked` and lets quantizers work on whatever
    weights the HookedTransformer holds.
    """
    cfg = model.cfg
    params = dict(model.named_parameters())
    parts = [s for s in sites(cfg) if s.module == module]
    if not parts:
        raise KeyError(f"{module!r} is not a quantizable module of this model.")
    if _is_gpt2(cfg):
        c = parts[0].component
        if c in ("q", "k", "v"):
            cols = [
                einops.rearrange(params[s.param], "n m h -> m (n h)")
                for s in sorted(parts, key=lambda s: s.part)
            ]
            return torch.cat(cols, dim=1).T
        if c == "o":
            return einops.rearrange(params[parts[0].param], "n h m -> (n h) m").T
        return params[parts[0].param].T
    s = parts[0]
    t = params[s.param]
    if s.component in ("q", "k", "v"):
        return einops.rearrange(t, "n m h -> (n h) m")
    if s.component == "o":
        return einops.rearrange(t, "n h m -> m (n h)")
    return t.T
