"""AWQ through GPTQModel, read back by mechq's own reader, and swapped like GPTQ.

A seeded random-init Llama (2 layers, hidden 192, intermediate 384: like SmolLM2's 576, 192 is
not a multiple of 128, so AWQ takes group size 64) is quantized with GPTQModel's AWQ on CPU
(``mechq.quantize(model, "awq")``). Its checkpoint is checked three ways: against an independent
float64 unpacking written here, against GPTQModel's own AWQ runtime (bfloat16), and against a
float32 transformers model built from the same dequantized weights and rewritten norms.
(mechq's tiny GPT-2 cannot be used: GPTQModel 7.6's AWQ scale search fails on GPT-2's fused
``c_attn``, "size of tensor a (128) must match the size of tensor b (384)".)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mechq
from mechq.quant import faults
from mechq.quant.formats.awq import AWQ_ORDER
from mechq.quant.formats.common import CheckpointError
from mechq.quant.formats import detect_format
from mechq.quant.quantize import default_group_size
from mechq.quant.variants import swap
from tests.conftest import assert_params_equal, snapshot

VOCAB = 256


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A seeded random Llama with a word-level tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("awq") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=192, intermediate_size=384,
                      num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      initializer_range=0.1,  # peaked logits: top-1 tokens mean something
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llama(llama_dir):
    return mechq.load_model(str(llama_dir), device="cpu")


@pytest.fixture(scope="module")
def awq(llama):
    """AWQ w4 of the random Llama (GPTQModel, bfloat16, ~20 s), read by mechq."""
    return mechq.quantize(llama, "awq", bits=4, calibration="sampled", n_samples=16, seq_len=32)


PROMPTS = ["w5 w17 w99 w3 w42 w8", "w200 w11 w64 w64 w7 w150 w33"]


def _independent_dequant(path: Path) -> dict[str, torch.Tensor]:
    """float64 ``(out, in)`` weights straight from the files: nibble k of a word is output
    channel 8j + AWQ_ORDER[k], w = (q - z) * s, groups of ``group_size`` input rows."""
    qc = json.loads((path / "quantize_config.json").read_text())
    g = int(qc["group_size"])
    t = {}
    for f in sorted(path.glob("*.safetensors")):
        t.update(load_file(f))
    out = {}
    for key in t:
        if not key.endswith(".qweight"):
            continue
        m = key[: -len(".qweight")]

        def nibbles(words: torch.Tensor) -> torch.Tensor:
            w = words.to(torch.int64) & 0xFFFFFFFF
            cols = torch.zeros(w.shape[0], w.shape[1] * 8, dtype=torch.int64)
            for k in range(8):
                cols[:, torch.arange(w.shape[1]) * 8 + AWQ_ORDER[k]] = (w >> (4 * k)) & 0xF
            return cols

        q, z = nibbles(t[key]), nibbles(t[f"{m}.qzeros"])
        s = t[f"{m}.scales"].double()
        rows = torch.arange(q.shape[0]) // g
        out[m] = ((q - z[rows]).double() * s[rows]).T
    return out


def test_awq_checkpoint_layout_and_default_group(llama, awq):
    path = Path(awq.meta["path"])
    assert detect_format(path) == "awq"
    assert default_group_size(llama, "awq") == 64  # 192 and 384 are multiples of 64, not 128
    assert (awq.method, awq.bits, awq.group_size, awq.name) == ("awq", 4, 64, "awq-w4g64")
    qc = awq.meta["quantize_config"]
    assert qc["quant_method"] == "awq" and qc["checkpoint_format"] == "awq_gemm"
    # AWQ rewrote every norm before a quantized module; the variant carries all 4
    assert sorted(awq.norms) == sorted(
        f"model.layers.{l}.{n}.weight" for l in range(2)
        for n in ("input_layernorm", "post_attention_layernorm"))
    fp = dict(llama.named_parameters())
    assert not torch.equal(awq.norms["model.layers.0.input_layernorm.weight"].float(),
                           fp["blocks.0.ln1.w"])
    # storage: 4-bit codes and zeros, 16-bit scales per 64 weights: 4 + 4/64 + 16/64 bits
    assert awq.avg_bits == pytest.approx(4 + 4 / 64 + 16 / 64)


def test_awq_reader_is_exact(awq):
    """mechq's reader equals an independent float64 unpacking of the files, exactly: bfloat16
    scales times integers of at most 4 bits are exact in float32 (8 + 4 < 24 bits)."""
    ref = _independent_dequant(Path(awq.meta["path"]))
    assert set(ref) == set(awq.modules)
    for m, w in ref.items():
        ours = awq.modules[m].weight(torch.float32)
        assert torch.equal(ours.double(), w), m


def test_awq_reader_matches_gptqmodel_kernel(awq):
    """GPTQModel's AWQ dequantization (``dequantize_gemm``, as its torch kernel calls it)
    rounds (q - z) * s to the scales' bfloat16 once; mechq's exact float32 value rounded to
    bfloat16 must be that same number."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    path = Path(awq.meta["path"])
    t = {}
    for f in sorted(path.glob("*.safetensors")):
        t.update(load_file(f))
    for m, p in awq.modules.items():
        theirs = dequantize_gemm(t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"], 4, 64)
        assert torch.equal(p.dequantize().to(theirs.dtype), theirs), m


def test_awq_swap_matches_gptqmodel_runtime_and_a_float32_model(llama, llama_dir, awq):
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    snap = snapshot(llama)
    toks = llama.to_tokens(PROMPTS[0], prepend_bos=True)
    with swap(llama, awq), torch.no_grad():
        ours = llama(toks)[0].float()
    assert_params_equal(llama, snap)  # norms and weights restored bit for bit

    # a float32 transformers model with the same dequantized weights and rewritten norms
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for m in awq.modules:
            params[f"{m}.weight"].copy_(awq.weight(m))
        for name, t in awq.norms.items():
            params[name].copy_(t.float())
        ref = hf(toks).logits[0]
    # two float32 implementations of the same function: differences are summation order only,
    # ~1e-6 relative on logits of size ~1-10; 1e-3 is the bound
    assert (ours - ref).abs().max() < 1e-3

    rt = GPTQModel.load(str(awq.meta["path"]), device="cpu", backend=BACKEND.AWQ_TORCH)
    with torch.no_grad():
        theirs = rt.model(toks).logits[0].float()
    # the runtime computes in bfloat16 (8 significant bits, relative step 2^-8 = 0.4 %), through
    # two layers; its logits stay within a few bf16 steps of the logit scale
    scale = ref.abs().max()
    assert (theirs - ours).abs().max() < 0.05 * scale
    # top-1 must agree wherever our float32 margin is larger than that bound
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1 * scale
    assert clear.any()
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


def test_partial_swap_of_coupled_modules_is_refused(llama, awq):
    with pytest.raises(ValueError, match=r"folds scales.*k o q v must be swapped together"):
        with swap(llama, awq, components=["q", "k"]):
            pass
    with pytest.raises(ValueError, match="down gate up must be swapped together"):
        with swap(llama, awq, components="down"):
            pass
    snap = snapshot(llama)
    with swap(llama, awq, layers=[1], components="mlp"):  # a whole group: fine
        p = dict(llama.named_parameters())
        assert not torch.equal(p["blocks.1.ln2.w"], snap["blocks.1.ln2.w"])
        assert torch.equal(p["blocks.1.ln1.w"], snap["blocks.1.ln1.w"])  # attention left FP
        assert torch.equal(p["blocks.0.ln2.w"], snap["blocks.0.ln2.w"])  # layer 0 left FP
    assert_params_equal(llama, snap)


def test_awq_read_sequentially_is_a_format_bug(llama, awq):
    """The bug of GPTQModel 7.6's ``dequantize_model`` (nibbles in sequential order): the
    weights lose their correlation with FP, and every module is named."""
    from mechq.diagnosis.verdict import suspect_modules
    from mechq.analysis.signatures import weight_signatures

    broken = faults.awq_order_as_gptq(awq)
    ok = weight_signatures(llama, awq)
    bad = weight_signatures(llama, broken)
    # a correct 4-bit read keeps cosine > 0.9 with FP on every module (measured ≥ 0.98);
    # a scrambled one drops to ≈ 0 (random 8-channel shuffles of random weights)
    assert ok["cosine"].min() > 0.9 and bad["cosine"].max() < 0.5
    assert set(suspect_modules(bad)["module"]) == set(awq.modules)
    # the folded scales estimated from a scrambled module fall back to 1 instead of blowing up:
    # the unguarded least-squares ratio reported a shift of 1e30 steps on SmolLM2. Misread
    # codes sit at most 15 steps from the right ones, so the errors stay at a few steps; 1e3 is
    # far above that and far below what the unguarded ratio gave
    assert bad[["step_error", "step_bias"]].abs().max().max() < 1e3


@pytest.mark.parametrize("edit, match", [
    (lambda qc, t: qc.update(bits=8), r"quantize_config.json: unsupported bits=8"),
    (lambda qc, t: qc.update(version="gemv"), r"AWQ version 'gemv' is not supported"),
    (lambda qc, t: qc.update(quant_method="squeezellm"),
     r"unknown quantization format 'squeezellm'"),
    (lambda qc, t: t.pop("model.layers.0.mlp.up_proj.qzeros"),
     r"'model.layers.0.mlp.up_proj' has .* but no 'model.layers.0.mlp.up_proj.qzeros'"),
    (lambda qc, t: t.update({"model.layers.1.self_attn.q_proj.scales":
                             t["model.layers.1.self_attn.q_proj.scales"][:-1]}),
     r"tensor 'model.layers.1.self_attn.q_proj.scales' has shape \(2, 192\), expected \(3, 192\)"),
    (lambda qc, t: t.update({"model.layers.0.self_attn.o_proj.qweight":
                             t["model.layers.0.self_attn.o_proj.qweight"].float()}),
     r"'model.layers.0.self_attn.o_proj.qweight' has dtype torch.float32"),
])
def test_bad_awq_checkpoints_are_named(awq, tmp_path, edit, match):
    src = Path(awq.meta["path"])
    dst = tmp_path / "bad"
    dst.mkdir()
    qc = json.loads((src / "quantize_config.json").read_text())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    edit(qc, tensors)
    (dst / "quantize_config.json").write_text(json.dumps(qc))
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        mechq.load_variant(dst)


def test_awq_tensors_under_a_gptq_config_are_named(awq, tmp_path):
    src = Path(awq.meta["path"])
    dst = tmp_path / "mismatch"
    dst.mkdir()
    qc = dict(json.loads((src / "quantize_config.json").read_text()), quant_method="gptq",
              checkpoint_format="gptq", format="gptq")
    (dst / "quantize_config.json").write_text(json.dumps(qc))
    for f in src.glob("*.safetensors"):
        (dst / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="look like AWQ tensors under a GPTQ config"):
        mechq.load_variant(dst)


def test_awq_checkpoint_of_another_model_is_refused(awq, smol):
    with pytest.raises(CheckpointError, match="do not belong to this model|other shapes"):
        mechq.load_variant(awq.meta["path"], model=smol)


def test_awq_requests_are_checked(llama):
    with pytest.raises(ValueError, match="AWQ .* 4-bit codes only"):
        mechq.quantize(llama, "awq", bits=2)
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the input widths \[192"):
        mechq.quantize(llama, "awq", bits=4, group_size=128)
    with pytest.raises(ValueError, match="honours only '-:'"):
        mechq.quantize(llama, "awq", bits=4, dynamic={r"+:.*q_proj": {"bits": 8}})


def test_gptqmodel_dequantize_model_reads_awq_sequentially(llama, awq, tmp_path):
    """GPTQModel 7.6's ``dequantize_model`` unpacks AWQ nibbles in sequential order: its output
    is not mechq's exact weights but exactly mechq's ``awq_order_as_gptq`` fault (float32 both
    ways: the same bf16 scale times the same integer), which diagnose's weight signatures flag.
    (README: "An upstream bug, written up for GPTQModel".)"""
    from gptqmodel.utils.model_dequant import dequantize_model

    dequantize_model(awq.meta["path"], tmp_path / "deq", target_dtype=torch.float32)
    theirs = {}
    for f in sorted((tmp_path / "deq").glob("*.safetensors")):
        theirs.update(load_file(f))
    bug = faults.awq_order_as_gptq(awq)
    for m in awq.modules:
        w = theirs[f"{m}.weight"].float()
        assert not torch.equal(w, awq.weight(m)), m
        assert torch.equal(w, bug.weight(m)), m


def test_cliff_gets_an_awq_row(llama_dir, awq, tmp_path):
    """``mechq cliff --awq`` adds AWQ w4 at the model's default group size (64 here) as its own
    row, on the calibration asked for (here the fixture's, so it comes from the cache)."""
    import pandas as pd

    from mechq import cli

    rc = cli.main(["cliff", "--model", str(llama_dir), "--method", "rtn", "--bits", "4", "--awq",
                   "--calibration", "sampled", "--calib-samples", "16", "--calib-len", "32",
                   "--max-facts", "12", "--out", str(tmp_path)])
    assert rc == 0
    table = pd.read_csv(tmp_path / "cliff.csv")
    row = table[table.variant == "awq-w4g64"]
    assert len(row) == 1 and row.method.iloc[0] == "awq"
    assert row.avg_bits.iloc[0] == pytest.approx(awq.avg_bits)
    assert {"fp", "rtn-w4g128"} <= set(table.variant)


def test_method_comparison_counts():
    """GPTQ vs AWQ fact by fact (paper App. D): a pure function of recall rows."""
    import pandas as pd

    from mechq.analysis.cliff import method_comparison

    rows = []
    for fid, (fp, a, b) in enumerate([(1, 1, 1), (1, 1, 0), (1, 0, 1), (1, 0, 0), (0, 1, 1)]):
        for v, c in (("fp", fp), ("gptq", a), ("awq", b)):
            rows.append(dict(fact_id=fid, variant=v, correct=bool(c), top1_id=c))
    comp = method_comparison(pd.DataFrame(rows), "gptq", "awq").set_index("variant")
    assert comp.loc["gptq", "kept"] == 2 and comp.loc["awq", "kept"] == 2
    assert comp.loc["gptq", "only_this"] == 1 and comp.loc["awq", "only_this"] == 1
    assert comp.loc["both", "kept"] == 1 and comp.loc["both", "only_this"] == 1  # neither
    assert comp.loc["both", "fp_correct"] == 4
    assert comp.loc["both", "top1_agreement"] == pytest.approx(3 / 5)  # facts 0, 3, 4
    with pytest.raises(ValueError, match="no recall rows for \\['rtn'\\]"):
        method_comparison(pd.DataFrame(rows), "gptq", "rtn")
