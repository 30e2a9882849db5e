"""Model families: everything mechq knows about one architecture, in one file each.

A family (:class:`~mechq.models.families.base.Family`) holds, for the Hugging Face architectures it
covers (one module each, defining ``FAMILY``): how their config becomes a
``HookedTransformerConfig``, how their weights become
TransformerLens weights, which HF linear module feeds which HookedTransformer parameter (the
:class:`~mechq.models.families.base.Site` table, with the reshapes both ways), and its quirks. The
rest of mechq asks this registry and never branches on an architecture name. A family also
declares the models mechq loads by name (:class:`~mechq.models.families.base.Embedded`: SmolLM2
in :mod:`.llama`, Gemma 3 270M in :mod:`.gemma3`, the tiny GPT-2 in :mod:`.gpt2`), with their
architecture and where their weights are; :func:`embedded` finds one by name.

Adding an architecture = one new module here, added to the registration list at the bottom,
plus its tests.
"""

from __future__ import annotations

from transformer_lens import HookedTransformerConfig

from mechq.models.families.base import Embedded, Family, NormSite, Site

_REGISTRY: dict[str, Family] = {}
_EMBEDDED: dict[str, Embedded] = {}


def register(family: Family) -> Family:
    """Make ``family`` the one for each of its ``architectures`` (an architecture has one), and
    its :attr:`~Family.embedded` models loadable by name (a name has one model)."""
    for arch in family.architectures:
        if arch in _REGISTRY and _REGISTRY[arch] is not family:
            raise ValueError(f"{arch} is already handled by family {_REGISTRY[arch].name!r}.")
    for e in family.embedded:
        if e.name in _EMBEDDED and _EMBEDDED[e.name] != e:
            raise ValueError(f"an embedded model is already named {e.name!r}.")
    for arch in family.architectures:
        _REGISTRY[arch] = family
    for e in family.embedded:
        _EMBEDDED[e.name] = e
    return family


def embedded(name: str) -> Embedded | None:
    """The embedded model called ``name`` (None: no family declares one)."""
    return _EMBEDDED.get(name)


def architectures() -> tuple[str, ...]:
    """The Hugging Face architecture names mechq can load, in registration order."""
    return tuple(_REGISTRY)


def for_architecture(arch: str) -> Family:
    """The family of a Hugging Face architecture name (``config.architectures[0]``)."""
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ValueError(
            f"architecture {arch or '(none)'!r} is not supported; mechq supports "
            f"{', '.join(_REGISTRY)}.") from None


def family_of(cfg: HookedTransformerConfig) -> Family:
    """The family of a HookedTransformer built by mechq (from ``cfg.original_architecture``)."""
    return for_architecture(cfg.original_architecture or "")


from mechq.models.families import gemma3, gpt2, llama  # noqa: E402

for _module in (llama, gpt2, gemma3):
    register(_module.FAMILY)

__all__ = ["Embedded", "Family", "NormSite", "Site", "architectures", "embedded", "family_of",
           "for_architecture", "register", "gemma3", "gpt2", "llama"]
