"""Model families: everything mechq knows about one architecture, in one file each.

A family (:class:`~mechq.models.families.base.Family`) holds, for the Hugging Face architectures it
covers (one module each, defining ``FAMILY``): how their config becomes a
``HookedTransformerConfig``, how their weights become
TransformerLens weights, which HF linear module feeds which HookedTransformer parameter (the
:class:`~mechq.models.families.base.Site` table, with the reshapes both ways), and its quirks. The
rest of mechq asks this registry and never branches on an architecture name.

Adding an architecture = one new module here, added to the registration list at the bottom,
plus its tests.
"""

from __future__ import annotations

from transformer_lens import HookedTransformerConfig

from mechq.models.families.base import Family, NormSite, Site

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` the one for each of its ``architectures`` (an architecture has one)."""
    for arch in family.architectures:
        if arch in _REGISTRY and _REGISTRY[arch] is not family:
            raise ValueError(f"{arch} is already handled by family {_REGISTRY[arch].name!r}.")
        _REGISTRY[arch] = family
    return family


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

__all__ = ["Family", "NormSite", "Site", "architectures", "family_of", "for_architecture", "register",
           "gemma3", "gpt2", "llama"]
