"""GPT-2 (``GPT2LMHeadModel``): LayerNorm, learned positions, GELU MLP, fused ``c_attn``.

Quirks: the attention's q, k and v come from one fused ``Conv1D`` (``c_attn``, parts 0/1/2), and
``Conv1D`` stores its weight as ``(in, out)``, the transpose of ``nn.Linear``. There is no gate:
``up`` is the MLP input matrix (``c_fc``) and ``down`` its output matrix (``c_proj``). mechq's
bundled test model ``tiny-gpt2`` is of this family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from mechq.models.families.base import Embedded, Family, NormSite, Site

_ACT = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "gelu_fast": "gelu_fast"}


class GPT2(Family):
    name = "gpt2"
    architectures = ("GPT2LMHeadModel",)
    conv1d = True
    awq_unsupported = (
        "GPTQModel 7.6's AWQ cannot search scales across GPT-2's fused c_attn (its scale search "
        "fails with a 128 vs 384 size mismatch); quantize GPT-2 with 'gptq' or 'rtn'")

    def hooked_config(self, hf_config, *, device: str, dtype: torch.dtype
                      ) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            d_model=hf_config.n_embd,
            d_head=hf_config.n_embd // hf_config.n_head,
            n_heads=hf_config.n_head,
            d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
            n_layers=hf_config.n_layer,
            n_ctx=hf_config.n_positions,
            eps=hf_config.layer_norm_epsilon,
            d_vocab=hf_config.vocab_size,
            act_fn=_ACT.get(hf_config.activation_function, "gelu_new"),
            use_attn_scale=True,
            normalization_type="LN",
            positional_embedding_type="standard",
            device=device, dtype=dtype, original_architecture=hf_config.architectures[0],
        )

    def state_dict(self, hf_model, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        return convert_gpt2_weights(hf_model, cfg)

    def layer_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[Site]:
        p, b = f"transformer.h.{layer}", f"blocks.{layer}"
        return [
            Site(layer, "q", f"{p}.attn.c_attn", f"{b}.attn.W_Q", 0),
            Site(layer, "k", f"{p}.attn.c_attn", f"{b}.attn.W_K", 1),
            Site(layer, "v", f"{p}.attn.c_attn", f"{b}.attn.W_V", 2),
            Site(layer, "o", f"{p}.attn.c_proj", f"{b}.attn.W_O"),
            Site(layer, "up", f"{p}.mlp.c_fc", f"{b}.mlp.W_in"),
            Site(layer, "down", f"{p}.mlp.c_proj", f"{b}.mlp.W_out"),
        ]

    def norm_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[NormSite]:
        p, b = f"transformer.h.{layer}", f"blocks.{layer}"
        return [NormSite(layer, f"{p}.ln_{i}.{w}", f"{b}.ln{i}.{w[0]}", comps)
                for i, comps in ((1, ("q", "k", "v")), (2, ("up",))) for w in ("weight", "bias")]

    def to_hooked(self, w: Float[Tensor, "out in"], site: Site, cfg: HookedTransformerConfig
                  ) -> Tensor:
        conv = w.T  # Conv1D orientation (in, out)
        if site.component in ("q", "k", "v"):
            part = conv[:, site.part * cfg.d_model:(site.part + 1) * cfg.d_model]
            return einops.rearrange(part, "m (n h) -> n m h", n=cfg.n_heads)
        if site.component == "o":
            return einops.rearrange(conv, "(n h) m -> n h m", n=cfg.n_heads)
        return conv  # up: (d_model, d_mlp); down: (d_mlp, d_model)

    def from_hooked(self, params: Mapping[str, Tensor], parts: Sequence[Site],
                    cfg: HookedTransformerConfig) -> Float[Tensor, "out in"]:
        c = parts[0].component
        if c in ("q", "k", "v"):
            cols = [einops.rearrange(params[s.param], "n m h -> m (n h)")
                    for s in sorted(parts, key=lambda s: s.part)]
            return torch.cat(cols, dim=1).T
        if c == "o":
            return einops.rearrange(params[parts[0].param], "n h m -> (n h) m").T
        return params[parts[0].param].T


#: The 4-layer GPT-2 mechq trains itself on the bundled facts (``scripts/train_tiny_gpt2.py``),
#: shipped in ``mechq/assets/tiny-gpt2``; the fast tests use it.
TINY_GPT2 = Embedded(name="tiny-gpt2", architecture="GPT2LMHeadModel",
                     note="trained by mechq on bundled facts", asset="tiny-gpt2",
                     install="regenerate it with `python scripts/train_tiny_gpt2.py`")

FAMILY = GPT2(embedded=[TINY_GPT2])
