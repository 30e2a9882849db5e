"""Loading real models into HookedTransformer: equivalence with Hugging Face, sources, errors."""

import pytest
import torch

import mechq
from mechq.models import load as models

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "Tokyo is in"]


def _logits_gap(model, hf, prompts):
    """max |logit_TL - logit_HF| relative to max |logit|, and whether the argmaxes agree."""
    gaps, same_top = [], True
    for p in prompts:
        toks = model.to_tokens(p)
        with torch.no_grad():
            a = model(toks)
            b = hf(toks).logits
        gaps.append(((a - b).abs().max() / b.abs().max()).item())
        same_top &= bool(torch.equal(a.argmax(-1), b.argmax(-1)))
    return max(gaps), same_top


# TransformerLens and Hugging Face compute the same function with other operation orders (einsum
# vs fused attention, rotary applied differently), so float32 rounding differs through 30
# layers. Measured relative gaps: 8e-6 (1.6e-4 on logits of ~20) on one CPU, 2e-6 on another.
# A relative bound of 1e-4 (~840 float32 epsilons) leaves >10x room; a conversion bug (a wrong
# rotary base, a missing norm weight, swapped heads) moves logits by O(1), i.e. relative >1e-2.
REL_GAP = 1e-4


def test_smollm2_matches_hugging_face(smol):
    hf, _, src = models.load_hf("smollm2-135m")
    assert src.architecture == "LlamaForCausalLM"
    assert smol.cfg.n_layers == 30 and smol.cfg.d_model == 576
    assert smol.cfg.n_heads == 9 and smol.cfg.n_key_value_heads == 3 and smol.cfg.d_mlp == 1536
    gap, same_top = _logits_gap(smol, hf, PROMPTS)
    assert gap < REL_GAP and same_top


def test_smollm2_knows_paris(smol):
    logits = smol("The capital of France is")[0, -1]
    # an exact token of the FP model, kept because its margin is wide: Paris leads the
    # runner-up by more than 1 logit (far beyond any float32 difference between CPUs)
    top2 = logits.topk(2).values
    assert smol.to_string(logits.argmax()) == " Paris" and (top2[0] - top2[1]).item() > 1.0


def test_tiny_gpt2_matches_hugging_face(tiny):
    hf, _, src = models.load_hf("tiny-gpt2")
    assert src.architecture == "GPT2LMHeadModel"
    assert tiny.cfg.normalization_type == "LN" and tiny.cfg.positional_embedding_type == "standard"
    gap, same_top = _logits_gap(tiny, hf, PROMPTS[:1])
    assert gap < REL_GAP and same_top


def test_tokenizer_attached(smol):
    toks = smol.to_tokens("The capital of France is")
    assert toks[0, 0].item() == smol.tokenizer.bos_token_id
    assert smol.to_string(toks[0, 1:]) == "The capital of France is"


def test_embedded_conversion_is_cached(smol):
    d = models.cache_dir() / "models" / "smollm2-135m"
    assert (d / "config.json").exists() and (d / "model.safetensors").exists()
    assert models.source_of(smol).hf_dir == d


def test_local_directory_loads_like_the_name(tiny):
    m = mechq.load_model(str(models.ASSETS / "tiny-gpt2"), device="cpu")
    for (n, p), (_, q) in zip(m.named_parameters(), tiny.named_parameters()):
        assert torch.equal(p, q), n


def test_not_a_model_directory(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        mechq.load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(models.ModelLoadError, match="not supported"):
        mechq.load_model(str(tmp_path))


def test_a_quantized_checkpoint_is_not_an_fp_model(tmp_path, capsys):
    """A quantized model given as the FP reference is refused by name before any weight loads,
    by the library and by the CLI (which names the command)."""
    import json
    import shutil

    from mechq import cli

    ckpt = tmp_path / "gptq"
    shutil.copytree(models.ASSETS / "tiny-gpt2", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelLoadError, match="quantized checkpoint .*'gptq'.*not a "
                                                    "full-precision model"):
        mechq.load_model(str(ckpt), device="cpu")
    with pytest.raises(SystemExit, match="^mechq diagnose: .*--model FP_DIR"):
        cli.main(["diagnose", "rtn-w4g32", "--model", str(ckpt), "--out", str(tmp_path / "d")])


def test_unreachable_hub_id_names_the_offline_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.ModelLoadError, match="smollm2-135m"):
        mechq.load_model("someone/definitely-not-a-local-model")
