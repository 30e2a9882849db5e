"""EoRA as a PEFT LoRA adapter: the files, the round trip, and PEFT applying it to a real model
(the tiny GPT-2 with its fused c_attn; SmolLM2 in the slow test), against mechq's own swap."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mechq
from mechq.quant import layout
from mechq.quant.formats.dense import dequantized_hf_model
from mechq.repair.adapter import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_peft_adapter, write_peft_adapter,
)

peft = pytest.importorskip("peft", reason="peft applies the adapters (pip install 'mechq[test]')")

PROMPTS = ["The capital of France is", "Water boils at a temperature of",
           "The Eiffel Tower is located in the city of"]
# Two float32 implementations of one function: swap puts W_q + B·A (one float32 matmul) into
# TransformerLens's weights; PEFT computes x·W_qᵀ + (x·Aᵀ)·Bᵀ in transformers' modules. Both
# read the same float16 factors exactly (float16 → float32 is exact), so only the order of
# float32 operations differs. Measured here (max |Δ logit| / max |logit|, one 2-core CPU):
# FP TransformerLens vs transformers 3.8e-7 (tiny) and 1.1e-6…2.1e-6 (SmolLM2: 3.7e-5…7.2e-5 on
# logits of 31–34; tests/test_models.py saw up to 8e-6 on another CPU); EoRA swap vs PEFT
# 4.4e-7 (tiny) and 2.4e-6…6.6e-6 (SmolLM2: 7.4e-5…2.2e-4), up to 3x the FP gap because the
# unmerged sum rounds otherwise than the merged weight. The bound is tests/test_models.py's
# REL_GAP, 1e-4 (~840 float32 epsilons; 15x the largest gap measured); a wrong factor (B and A
# swapped, a transposed Conv1D, a lost scaling) moves logits by what EoRA itself moves them:
# 0.23 on 17.5 (1.3e-2, tiny) and 9–11 on 31–34 (0.3, SmolLM2), checked against 10 · REL_GAP.
REL_GAP = 1e-4


def _rel_gap(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _logits(model, variant, prompt):
    toks = model.to_tokens(prompt)
    with torch.no_grad(), mechq.swap(model, variant):
        return toks, model(toks)[0]


def _peft_model(variant, model, adapter_dir):
    base = dequantized_hf_model(variant, model, lowrank=False)
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def tiny_w4(tiny):
    return mechq.quantize(tiny, "rtn", bits=4)


@pytest.fixture(scope="module")
def tiny_eora(tiny, tiny_w4):
    # 8 calibration samples: enough for a correction that visibly moves the logits
    return mechq.eora(tiny, tiny_w4, 4, n_samples=8, progress=False)


def test_adapter_files_follow_peft_lora_layout(tiny, tiny_eora, tmp_path):
    out = write_peft_adapter(tiny_eora, tmp_path / "a", tiny)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == cfg["lora_alpha"] == 4  # scaling lora_alpha / r = 1
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
    # every module of each name is covered: GPT-2's HF names (fused c_attn, both c_proj)
    assert cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert cfg["fan_in_fan_out"] is True  # GPT-2's Conv1D
    assert cfg["base_model_name_or_path"] is None  # an RTN variant: no loadable checkpoint
    assert not cfg["use_rslora"] and not cfg["use_dora"] and cfg["bias"] == "none"
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["mechq_variant"] == tiny_eora.name
        assert json.loads(f.metadata()["mechq_eora"])["rank"] == 4
        for m, (b, a) in tiny_eora.lowrank.items():
            t_a = f.get_tensor(f"base_model.model.{m}.lora_A.weight")
            t_b = f.get_tensor(f"base_model.model.{m}.lora_B.weight")
            out_f, in_f = layout.module_weight(tiny, m).shape
            assert t_a.shape == (4, in_f) and t_b.shape == (out_f, 4)
            assert t_a.dtype == t_b.dtype == torch.float16
            assert torch.equal(t_a, a) and torch.equal(t_b, b)
    assert keys == {f"base_model.model.{m}.lora_{x}.weight"
                    for m in layout.modules(tiny.cfg) for x in "AB"}
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys


def test_write_then_read_gives_the_same_factors(tiny, tiny_w4, tiny_eora, tmp_path):
    out = write_peft_adapter(tiny_eora, tmp_path, tiny)
    back = read_peft_adapter(out, tiny)
    assert set(back) == set(tiny_eora.lowrank)
    for m, (b, a) in tiny_eora.lowrank.items():
        assert torch.equal(back[m][0], b) and torch.equal(back[m][1], a), m
    again = dataclasses.replace(tiny_w4, lowrank=back)
    for m in tiny_w4.modules:
        assert torch.equal(again.weight(m), tiny_eora.weight(m)), m


def test_peft_applies_the_adapter_like_swap_on_gpt2_fused_c_attn(tiny, tiny_w4, tiny_eora,
                                                                  tmp_path):
    """PEFT's LoRA on GPT-2's fused c_attn (and the Conv1D c_fc / c_proj) computes what
    mechq.swap computes with the EoRA variant; merging (which reads fan_in_fan_out) too."""
    pm = _peft_model(tiny_eora, tiny, write_peft_adapter(tiny_eora, tmp_path, tiny))
    for p in PROMPTS:
        toks, ours = _logits(tiny, tiny_eora, p)
        _, quant = _logits(tiny, tiny_w4, p)
        with torch.no_grad():
            theirs = pm(toks).logits[0]
            with pm.disable_adapter():
                base = pm(toks).logits[0]
        assert _rel_gap(theirs, ours) < REL_GAP, p
        assert _rel_gap(base, quant) < REL_GAP, p  # the dequantized HF base is the variant
        assert (ours - quant).abs().max() > 10 * REL_GAP * ours.abs().max()  # EoRA acts
    merged = pm.merge_and_unload()
    toks, ours = _logits(tiny, tiny_eora, PROMPTS[0])
    with torch.no_grad():
        assert _rel_gap(merged(toks).logits[0], ours) < REL_GAP


def _mixed(variant):
    """The variant with layer 1's factors cut to rank 2 and layer 2's to rank 3 (the leading
    columns of B and rows of A: valid factors of a lower rank)."""
    low = {}
    for m, (b, a) in variant.lowrank.items():
        k = 2 if ".h.1." in m else 3 if ".h.2." in m else 4
        low[m] = (b[:, :k].contiguous(), a[:k].contiguous())
    return dataclasses.replace(variant, name=variant.name + "-mixed", lowrank=low)


def test_ranks_that_differ_per_module_go_into_rank_pattern(tiny, tiny_eora, tmp_path):
    mixed = _mixed(tiny_eora)
    out = write_peft_adapter(mixed, tmp_path, tiny)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4  # layers 0 and 3: the most common rank
    assert len(cfg["rank_pattern"]) == 8 and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert cfg["rank_pattern"][r"transformer\.h\.1\.attn\.c_attn"] == 2
    back = read_peft_adapter(out, tiny)
    assert all(torch.equal(back[m][1], a) for m, (_, a) in mixed.lowrank.items())
    # PEFT builds each module at its own rank (else loading fails on the shapes) with scaling 1
    pm = _peft_model(mixed, tiny, out)
    lora = pm.get_submodule("base_model.model.transformer.h.1.attn.c_attn")
    assert lora.r["default"] == 2 and lora.scaling["default"] == 1.0
    toks, ours = _logits(tiny, mixed, PROMPTS[0])
    with torch.no_grad():
        assert _rel_gap(pm(toks).logits[0], ours) < REL_GAP


def test_factors_on_some_modules_name_them_in_full(tiny, tiny_eora, tmp_path):
    """Factors on layer 0 only: target_modules lists those modules, not every c_attn."""
    some = dataclasses.replace(tiny_eora, lowrank={m: f for m, f in tiny_eora.lowrank.items()
                                                   if ".h.0." in m})
    out = write_peft_adapter(some, tmp_path, tiny)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["target_modules"] == sorted(some.lowrank)
    pm = _peft_model(some, tiny, out)
    assert not hasattr(pm.get_submodule("base_model.model.transformer.h.1.attn.c_attn"), "lora_A")
    toks, ours = _logits(tiny, some, PROMPTS[0])
    with torch.no_grad():
        assert _rel_gap(pm(toks).logits[0], ours) < REL_GAP


def test_the_dequantized_hf_model_is_the_variant(tiny, tiny_eora):
    toks, ours = _logits(tiny, tiny_eora, PROMPTS[0])
    with torch.no_grad():
        with_lowrank = dequantized_hf_model(tiny_eora, tiny)(toks).logits[0]
        without = dequantized_hf_model(tiny_eora, tiny, lowrank=False)(toks).logits[0]
    assert _rel_gap(with_lowrank, ours) < REL_GAP
    assert (without - ours).abs().max() > 10 * REL_GAP * ours.abs().max()
    with mechq.swap(tiny, tiny_eora), pytest.raises(ValueError, match="inside a swap"):
        dequantized_hf_model(tiny_eora, tiny)  # the digest cannot tell a swap from an edit


def test_errors_are_named(tiny, tiny_w4, tiny_eora, tmp_path):
    with pytest.raises(AdapterError, match="no low-rank factors.*mechq.eora"):
        write_peft_adapter(tiny_w4, tmp_path, tiny)
    assert issubclass(AdapterError, ValueError)
    m = "transformer.h.0.mlp.c_fc"
    b, a = tiny_eora.lowrank[m]
    bad = dataclasses.replace(tiny_eora, lowrank={m: (a.T, b.T)})  # B and A swapped
    with pytest.raises(AdapterError, match=r"c_fc has B .*must be \(512, r\) and \(r, 128\)"):
        write_peft_adapter(bad, tmp_path, tiny)
    loose = dataclasses.replace(tiny_eora, modules={k: p for k, p in tiny_eora.modules.items()
                                                    if k != m})
    with pytest.raises(AdapterError, match="a module it does not pack"):
        write_peft_adapter(loose, tmp_path, tiny)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        read_peft_adapter(tmp_path / "nothing")
    assert not any(tmp_path.iterdir())  # nothing was written by the refused calls


def test_reader_refuses_what_is_not_w_plus_ba_and_applies_scaling(tiny, tiny_eora, tmp_path):
    out = write_peft_adapter(tiny_eora, tmp_path, tiny)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    m = "transformer.h.0.attn.c_attn"
    b, a = tiny_eora.lowrank[m]
    # another tool's adapter with lora_alpha = 2r: the correction is 2·B·A
    (out / ADAPTER_CONFIG).write_text(json.dumps(dict(cfg, lora_alpha=8)))
    got = read_peft_adapter(out)
    assert got[m][0].dtype == torch.float32 and torch.equal(got[m][0], 2 * b.float())
    assert torch.equal(got[m][1], a)
    for change, msg in (({"use_dora": True}, "use_dora is set"),
                        ({"peft_type": "IA3"}, "LORA adapters only"),
                        ({"modules_to_save": ["lm_head"]}, "modules_to_save")):
        (out / ADAPTER_CONFIG).write_text(json.dumps(dict(cfg, **change)))
        with pytest.raises(AdapterError, match=msg):
            read_peft_adapter(out)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(out / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError, match="'base_model.model.lm_head.weight' is not a LoRA"):
        read_peft_adapter(out)


# slow: loads SmolLM2-135M (the `smol` fixture) and the transformers model twice (FP reference
# and the dequantized base). Only the first QUANTIZED layers are quantized (the rest skipped
# with a `-:` rule), so EoRA fits 7 * QUANTIZED modules, not 210: the test is the export of
# every kind of Llama module and PEFT applying it, not EoRA over the whole depth.
QUANTIZED = 2


@pytest.mark.slow
def test_smollm2_eora_adapter_in_peft_matches_swap(smol, tmp_path):
    skip = {rf"-:.*\.layers\.(?!({'|'.join(map(str, range(QUANTIZED)))})\.).*": {}}
    w4 = mechq.quantize(smol, "rtn", bits=4, dynamic=skip)
    assert len(w4.modules) == 7 * QUANTIZED
    # rank 8 and 8 calibration samples (8 × 128 tokens): a small, fast fit; the test is the
    # export, not EoRA's quality
    v = mechq.eora(smol, w4, 8, n_samples=8, progress=False)
    out = write_peft_adapter(v, tmp_path, smol)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["fan_in_fan_out"] is False and cfg["r"] == cfg["lora_alpha"] == 8
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in f.keys()
        assert len(f.keys()) == 2 * 7 * QUANTIZED
    back = read_peft_adapter(out, smol)
    assert all(torch.equal(back[m][0], b) and torch.equal(back[m][1], a)
               for m, (b, a) in v.lowrank.items())

    hf_fp, _, _ = mechq.models.load_hf()
    pm = _peft_model(v, smol, out)
    for p in PROMPTS:
        toks, ours = _logits(smol, v, p)
        _, quant = _logits(smol, w4, p)
        _, fp = _logits(smol, None, p)
        with torch.no_grad():
            theirs = pm(toks).logits[0]
            fp_hf = hf_fp(toks).logits[0]
        assert _rel_gap(fp, fp_hf) < REL_GAP, p  # the implementations' own gap, for scale
        assert _rel_gap(theirs, ours) < REL_GAP, p
        assert (ours - quant).abs().max() > 10 * REL_GAP * ours.abs().max(), p  # EoRA acts
