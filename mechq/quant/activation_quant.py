"""Activation and KV-cache quantization, emulated as fake-quantizing hooks on the same model.

A deployment that quantizes activations (W8A8 int8, FP8, W4A8) rounds the *input* of each linear
module to a low-precision grid before the matrix product; one that quantizes the KV cache rounds
the keys and values it stores. mechq emulates both at the HookedTransformer hook points that carry
those tensors, so every analysis that runs a :class:`~mechq.quant.variants.Variant` through
:func:`~mechq.quant.variants.swap` runs an activation scheme unchanged: an :class:`ActScheme` rides
on a variant (:func:`with_activations`) and ``swap`` installs its hooks for the chosen layers and
components, and removes them on exit.

Sites (one per hook; a component selects the site that feeds it):

==========  =====================================  ==============  ===================================
site        hook                                   components      tensor quantized
==========  =====================================  ==============  ===================================
attn_in     ``blocks.L.ln1.hook_normalized``       q k v           the normed residual into q/k/v
o_in        ``blocks.L.attn.hook_z``               o               the heads' outputs into O
mlp_in      ``blocks.L.ln2.hook_normalized``       gate up         the normed residual into the MLP
down_in     ``blocks.L.mlp.hook_post``             down            the MLP hidden state into down
k_cache     ``attn.hook_rot_k`` (rotary) /         k               the keys the cache stores
            ``attn.hook_k``
v_cache     ``blocks.L.attn.hook_v``               v               the values the cache stores
==========  =====================================  ==============  ===================================

q, k and v share one quantized input, as in a fused deployment: choosing any of them quantizes
``attn_in`` for all three. A norm's hook sits before its weight (``x / rms``, then ``· w + b``),
so at a norm site the hook quantizes the linear module's true input ``u = x·w + b`` and hands back
``(Q(u) − b) / w`` (channels with ``w = 0`` are left alone: their product is 0 either way); the
norm then yields ``Q(u)`` up to one float32 rounding. Keys are quantized after the rotary
embedding, which is what a cache holds.

One quantizer (:class:`Quantizer`), on a tensor ``x`` with its reduction axes ``R`` (all axes for
``tensor``; the feature axes of one token for ``token``; one head's ``d_head`` for ``head``):

- ``int``, symmetric: ``s = max_R |x| / (2^(b−1) − 1)``, ``Q(x) = s · clamp(round(x / s),
  −2^(b−1), 2^(b−1) − 1)`` (round half to even);
- ``int``, asymmetric: ``s = (max_R x − min_R x) / (2^b − 1)``, ``z = round(−min_R x / s)``,
  ``Q(x) = s · (clamp(round(x / s) + z, 0, 2^b − 1) − z)``;
- ``fp8`` (e4m3): ``s = max_R |x| / 448``, ``Q(x) = s · fp8(x / s)`` (torch's ``float8_e4m3fn``
  cast, round to nearest even).

A *dynamic* quantizer computes ``s`` from the tensor at hand; a *static* one uses a scale
calibrated once per site and layer (:func:`calibrate`: the maximum over calibration text, with the
variant's weights in place and no activation quantization).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
SITES: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in", "k_cache", "v_cache")
INPUT_SITES: tuple[str, ...] = SITES[:4]
KV_SITES: tuple[str, ...] = SITES[4:]
#: the components whose inputs (or cache) each site quantizes
SITE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",),
    "k_cache": ("k",), "v_cache": ("v",),
}


class SchemeError(ValueError):
    """An activation scheme that mechq cannot apply: unknown, malformed or uncalibrated."""


@dataclass(frozen=True)
class Quantizer:
    """One fake quantizer: ``fmt`` ``int`` or ``fp8`` (e4m3), ``bits`` (2–8 for ``int``, 8 for
    ``fp8``), ``granularity`` ``tensor`` / ``token`` / ``head`` (one scale per site, per token,
    or per token and head), ``dynamic`` (scale from the tensor at hand) or static (calibrated),
    ``sym`` (symmetric, zero point 0; ``fp8`` is always symmetric)."""

    fmt: Literal["int", "fp8"] = "int"
    bits: int = 8
    granularity: Literal["tensor", "token", "head"] = "token"
    dynamic: bool = True
    sym: bool = True

    def __post_init__(self) -> None:
        if self.fmt not in ("int", "fp8"):
            raise SchemeError(f"Unknown activation format {self.fmt!r}: use 'int' or 'fp8'.")
        if self.fmt == "fp8" and (self.bits != 8 or not self.sym):
            raise SchemeError("fp8 (e4m3) activations are 8-bit and symmetric.")
        if self.fmt == "int" and not 2 <= self.bits <= 8:
            raise SchemeError(f"int activations take 2–8 bits, got {self.bits}.")
        if self.granularity not in ("tensor", "token", "head"):
            raise SchemeError(f"Unknown granularity {self.granularity!r}: use tensor, token "
                              "or head.")
        if self.granularity == "tensor" and self.dynamic:
            raise SchemeError("A per-tensor activation scale is static (calibrated): a dynamic "
                              "per-tensor scale would mix the prompts of a batch.")
        if not self.sym and not self.dynamic:
            raise SchemeError("Static scales are symmetric here (no calibrated zero point).")

    @property
    def qmax(self) -> float:
        """The largest code magnitude of a symmetric scale: 448 (e4m3) or ``2^(b−1) − 1``."""
        return FP8_MAX if self.fmt == "fp8" else 2 ** (self.bits - 1) - 1

    @property
    def label(self) -> str:
        kind = f"int{self.bits}" if self.fmt == "int" else "fp8"
        return f"{kind}-{self.granularity}" + ("" if self.sym else "-asym")


@dataclass
class ActScheme:
    """What a deployment quantizes besides the weights: ``inputs`` (the linear modules' inputs,
    sites ``attn_in o_in mlp_in down_in``) and ``kv`` (the cache, ``k_cache v_cache``), each a
    :class:`Quantizer` or ``None``. ``scales`` maps ``(site, layer)`` to the calibrated scale of a
    static quantizer (:func:`calibrate` fills it). ``name`` labels the runs (``A8``, ``KV4``)."""

    name: str
    inputs: Quantizer | None = None
    kv: Quantizer | None = None
    scales: dict[tuple[str, int], float] = field(default_factory=dict)
    #: the sites it is restricted to (:meth:`only`); ``None``: every site it has a quantizer for
    subset: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.inputs is None and self.kv is None:
            raise SchemeError(f"Activation scheme {self.name!r} quantizes nothing.")
        if self.inputs is not None and self.inputs.granularity == "head":
            raise SchemeError("Per-head scales are for the KV cache; linear inputs take "
                              "'tensor' or 'token'.")

    def quantizer(self, site: str) -> Quantizer | None:
        """The quantizer of ``site`` (``None``: the scheme leaves it alone)."""
        if site not in SITES:
            raise SchemeError(f"Unknown activation site {site!r}; sites: {', '.join(SITES)}.")
        return self.inputs if site in INPUT_SITES else self.kv

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites the scheme quantizes."""
        return tuple(s for s in SITES if self.active(s))

    @property
    def static(self) -> bool:
        return any(not q.dynamic for q in (self.inputs, self.kv) if q is not None)

    def only(self, sites: str | Iterable[str]) -> ActScheme:
        """The same scheme on ``sites`` only (its scales kept): what quantizing one kind of
        hook alone costs."""
        keep = {sites} if isinstance(sites, str) else set(sites)
        bad = keep - set(SITES)
        if bad:
            raise SchemeError(f"Unknown activation sites {sorted(bad)}; sites: {', '.join(SITES)}.")
        inputs = self.inputs if keep & set(INPUT_SITES) else None
        kv = self.kv if keep & set(KV_SITES) else None
        subset = tuple(s for s in SITES if s in keep)
        return ActScheme(f"{self.name}@{'+'.join(subset)}", inputs, kv, dict(self.scales), subset)

    def active(self, site: str) -> bool:
        """True when the scheme quantizes ``site`` (after :meth:`only`, within its subset)."""
        return self.quantizer(site) is not None and site in (self.subset or SITES)


#: The named schemes of the activation table (``scheme(NAME)``). Static ones need
#: :func:`calibrate` before they run.
SCHEMES: dict[str, dict] = {
    "A8-int-tensor": dict(inputs=Quantizer("int", 8, "tensor", dynamic=False)),
    "A8-int-token": dict(inputs=Quantizer("int", 8, "token")),
    "A8-fp8-tensor": dict(inputs=Quantizer("fp8", 8, "tensor", dynamic=False)),
    "A8-fp8-token": dict(inputs=Quantizer("fp8", 8, "token")),
    "A4-int-token": dict(inputs=Quantizer("int", 4, "token")),
    "KV8-int-head": dict(kv=Quantizer("int", 8, "head")),
    "KV8-int-token": dict(kv=Quantizer("int", 8, "token")),
    "KV4-int-head": dict(kv=Quantizer("int", 4, "head", sym=False)),
    "KV4-int-token": dict(kv=Quantizer("int", 4, "token", sym=False)),
    "KV8-fp8-tensor": dict(kv=Quantizer("fp8", 8, "tensor", dynamic=False)),
}


def scheme(*names: str) -> ActScheme:
    """A named scheme, or several combined (``scheme("A8-int-token", "KV4-int-head")``): at most
    one of them may quantize the inputs and one the cache."""
    parts = []
    for n in names:
        if n not in SCHEMES:
            raise SchemeError(f"Unknown activation scheme {n!r}; known: {', '.join(SCHEMES)}.")
        parts.append(SCHEMES[n])
    inputs = [p["inputs"] for p in parts if "inputs" in p]
    kv = [p["kv"] for p in parts if "kv" in p]
    if len(inputs) > 1 or len(kv) > 1:
        raise SchemeError(f"{' + '.join(names)}: at most one input and one KV-cache scheme.")
    return ActScheme("+".join(names), inputs[0] if inputs else None, kv[0] if kv else None)


def split_spec(spec: str) -> tuple[str, ActScheme | None]:
    """A variant spelled with its activation scheme, as :func:`~mechq.quant.variants.
    with_activations` names it: ``"gptq-w4g128+A8-int-token+KV4-int-head"`` is the weight
    variant ``gptq-w4g128`` and ``scheme("A8-int-token", "KV4-int-head")``; ``"fp+A8-int-tensor"``
    has FP weights. A spec without ``+`` has no scheme (``None``)."""
    base, *names = spec.split("+")
    if not base or any(not n for n in names):
        raise SchemeError(f"Bad variant {spec!r}: spell it VARIANT[+SCHEME...], e.g. "
                          "gptq-w4g128+A8-int-token or fp+KV8-int-head.")
    return base, scheme(*names) if names else None


# --------------------------------------------------------------------------------------------
# The fake quantizer
# --------------------------------------------------------------------------------------------


def _axes(x: Tensor, granularity: str) -> tuple[int, ...]:
    """Reduction axes: all for ``tensor``; all but (batch, pos) for ``token``; the last for
    ``head`` (a ``(batch, pos, head, d_head)`` tensor)."""
    if granularity == "tensor":
        return tuple(range(x.ndim))
    if granularity == "token":
        return tuple(range(2, x.ndim))
    if x.ndim != 4:
        raise SchemeError("Per-head scales need a (batch, pos, head, d_head) tensor.")
    return (-1,)


def scale_of(x: Tensor, q: Quantizer) -> Tensor:
    """The symmetric scale ``max_R |x| / qmax`` of ``x`` (keepdim, float32, never 0)."""
    amax = x.detach().abs().float().amax(dim=_axes(x, q.granularity), keepdim=True)
    return (amax / q.qmax).clamp_min(torch.finfo(torch.float32).tiny)


def fake_quant(x: Tensor, q: Quantizer, scale: Tensor | float | None = None) -> Tensor:
    """``Q(x)`` in ``x``'s dtype (module docstring). ``scale``: a static scale; ``None`` computes
    a dynamic one."""
    xf = x.float()
    if q.fmt == "int" and not q.sym:
        axes = _axes(x, q.granularity)
        lo = xf.amin(dim=axes, keepdim=True).clamp_max(0)
        hi = xf.amax(dim=axes, keepdim=True).clamp_min(0)
        top = 2 ** q.bits - 1
        s = ((hi - lo) / top).clamp_min(torch.finfo(torch.float32).tiny)
        z = torch.round(-lo / s)
        return (s * (torch.clamp(torch.round(xf / s) + z, 0, top) - z)).to(x.dtype)
    s = scale_of(x, q) if scale is None else torch.as_tensor(scale, dtype=torch.float32,
                                                             device=x.device)
    if q.fmt == "fp8":
        y = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        lo, hi = -(2 ** (q.bits - 1)), 2 ** (q.bits - 1) - 1
        y = torch.clamp(torch.round(xf / s), lo, hi)
    return (y * s).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Sites and hooks
# --------------------------------------------------------------------------------------------


def hook_name(model: HookedTransformer, site: str, layer: int) -> str:
    """The HookedTransformer hook that carries ``site`` in ``layer``."""
    rotary = model.cfg.positional_embedding_type == "rotary"
    return f"blocks.{layer}." + {
        "attn_in": "ln1.hook_normalized", "o_in": "attn.hook_z",
        "mlp_in": "ln2.hook_normalized", "down_in": "mlp.hook_post",
        "k_cache": "attn.hook_rot_k" if rotary else "attn.hook_k", "v_cache": "attn.hook_v",
    }[site]


def _norm(model: HookedTransformer, site: str, layer: int):
    """The norm module whose weight (and bias) follow a norm site's hook, else ``None``."""
    if site not in ("attn_in", "mlp_in"):
        return None
    return getattr(model.blocks[layer], "ln1" if site == "attn_in" else "ln2")


def linear_input(model: HookedTransformer, site: str, layer: int, x: Tensor) -> Tensor:
    """What the linear modules fed by ``site`` receive, from the hook's tensor ``x``: the norm's
    ``x·w + b`` at a norm site, ``x`` itself elsewhere."""
    norm = _norm(model, site, layer)
    if norm is None or not hasattr(norm, "w"):
        return x
    return x * norm.w + (norm.b if hasattr(norm, "b") else 0)


def _quantize_site(model, site: str, layer: int, x: Tensor, q: Quantizer, scale) -> Tensor:
    norm = _norm(model, site, layer)
    if norm is None or not hasattr(norm, "w"):
        return fake_quant(x, q, scale)
    w = norm.w.detach()
    b = norm.b.detach() if hasattr(norm, "b") else torch.zeros_like(w)
    u = fake_quant(x * w + b, q, scale)
    safe = torch.where(w == 0, torch.ones_like(w), w)
    return torch.where(w == 0, x, (u - b) / safe)


def active_sites(act: ActScheme, components: Iterable[str]) -> list[str]:
    """The sites of ``act`` that feed any of ``components``."""
    comps = set(components)
    return [s for s in SITES if act.active(s) and comps & set(SITE_COMPONENTS[s])]


def _hook(model, site: str, layer: int, act: ActScheme):
    q = act.quantizer(site)
    scale = None
    if not q.dynamic:
        try:
            scale = act.scales[(site, layer)]
        except KeyError:
            raise SchemeError(
                f"Activation scheme {act.name!r} is static and has no scale for {site} in layer "
                f"{layer}: calibrate it first (mechq.quant.activation_quant.calibrate).") from None

    def fake_quantize(x: Tensor, hook) -> Tensor:
        return _quantize_site(model, site, layer, x, q, scale)

    return fake_quantize


@contextmanager
def installed(model: HookedTransformer, plan: Mapping[int, tuple[ActScheme, Sequence[str]]]
              ) -> Iterator[None]:
    """Install fake-quantizing hooks: ``plan`` maps a layer to its scheme and the components
    chosen there. The hooks are permanent (``run_with_hooks`` and ``model.hooks()`` keep them)
    and run before any other hook on their hook point (an analysis that caches or patches a
    site sees or replaces the quantized tensor); on exit exactly these hooks are removed."""
    added = []
    try:
        for layer, (act, comps) in plan.items():
            for site in active_sites(act, comps):
                name = hook_name(model, site, layer)
                point = model.hook_dict[name]
                fn = _hook(model, site, layer, act)
                point.add_hook(fn, is_permanent=True, prepend=True)
                added.append((point, fn))
        yield
    finally:
        for point, fn in added:
            for handle in [h for h in point.fwd_hooks if h.user_hook is fn]:
                handle.hook.remove()
                point.fwd_hooks.remove(handle)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def site_inputs(model: HookedTransformer, ids: Sequence[int], sites: Iterable[str] = SITES
                ) -> dict[tuple[str, int], Tensor]:
    """Each site's quantized tensor in one run of the sequence ``ids`` on ``model`` as it is, per
    (site, layer): a linear module's true input at a norm site, the hook's tensor elsewhere;
    float32, without the batch axis (``(pos, d)``, the cache ``(pos, head, d_head)``)."""
    names = {hook_name(model, s, l): (s, l) for s in sites for l in range(model.cfg.n_layers)}
    out: dict[tuple[str, int], Tensor] = {}

    def grab(x: Tensor, hook) -> None:
        site, layer = names[hook.name]
        out[(site, layer)] = linear_input(model, site, layer, x)[0].float()

    model.run_with_hooks(torch.tensor([list(ids)]), return_type=None,
                         fwd_hooks=[(n, grab) for n in names])
    return out


def site_amax(model: HookedTransformer, sequences: Sequence[Sequence[int]],
              sites: Iterable[str] = SITES) -> dict[tuple[str, int], float]:
    """``max |x|`` of every site's quantized tensor (:func:`site_inputs`) over ``sequences``,
    run one at a time (no padding), per (site, layer)."""
    sites = list(sites)
    out: dict[tuple[str, int], float] = {}
    for ids in sequences:
        for key, u in site_inputs(model, ids, sites).items():
            out[key] = max(out.get(key, 0.0), float(u.abs().max()))
    return out


def calibrate(model: HookedTransformer, act: ActScheme, sequences: Sequence[Sequence[int]]
              ) -> ActScheme:
    """``act`` with the static scale of every (site, layer) it quantizes statically:
    ``max |x| / qmax`` over ``sequences`` (calibration text, never held-out text), measured on
    ``model`` as it is (:func:`mechq.quant.variants.calibrated` swaps a variant's weights in
    first, without activation quantization). A dynamic scheme comes back unchanged."""
    static = [s for s in act.sites if not act.quantizer(s).dynamic]
    if not static:
        return act
    scales = dict(act.scales)
    for (site, layer), m in site_amax(model, sequences, static).items():
        scales[(site, layer)] = max(m, torch.finfo(torch.float32).tiny) / act.quantizer(site).qmax
    return replace(act, scales=scales)
