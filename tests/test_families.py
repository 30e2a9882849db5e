"""The family registry: every architecture question goes through one family object."""

import copy

import pytest
import torch

from mechq.models import families
from mechq.models.families.gpt2 import GPT2
from mechq.quant import layout


def test_registered_architectures():
    assert families.architectures() == (
        "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel",
        "Gemma3ForCausalLM")
    assert families.for_architecture("Qwen2ForCausalLM").name == "llama"
    assert families.for_architecture("GPT2LMHeadModel").name == "gpt2"


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="'BertModel' is not supported.*LlamaForCausalLM"):
        families.for_architecture("BertModel")


def test_an_architecture_has_one_family():
    class Impostor(GPT2):
        name = "impostor"

    with pytest.raises(ValueError, match="already handled by family 'gpt2'"):
        families.register(Impostor())


def test_models_know_their_family(tiny, smol):
    assert families.family_of(tiny.cfg).name == "gpt2"
    assert families.family_of(smol.cfg).name == "llama"
    # SmolLM2 uses grouped-query attention: k and v go into TransformerLens's _W_K / _W_V.
    k = [s for s in layout.sites(smol.cfg) if s.component == "k"][0]
    assert k.param == "blocks.0.attn._W_K"


def test_a_new_family_is_one_registration(tiny):
    """A family registered under a new architecture name drives layout and swap code alone."""
    class Renamed(GPT2):
        name = "renamed-gpt2"
        architectures = ("RenamedGPT2ForTests",)

    fam = families.register(Renamed())
    try:
        cfg = copy.copy(tiny.cfg)
        cfg.original_architecture = "RenamedGPT2ForTests"
        assert families.family_of(cfg) is fam
        assert layout.modules(cfg) == layout.modules(tiny.cfg)
        site = layout.sites(cfg)[0]
        w = torch.randn(3 * cfg.d_model, cfg.d_model)
        assert torch.equal(layout.linear_to_hooked(w, site, cfg),
                           layout.linear_to_hooked(w, site, tiny.cfg))
    finally:
        families._REGISTRY.pop("RenamedGPT2ForTests")
