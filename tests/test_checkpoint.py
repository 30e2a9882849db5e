"""mechq's own GPTQ reader/dequantizer, checked bit for bit against GPTQModel on real checkpoints.

Tiny seeded Llama- and GPT-2-architecture models are quantized with GPTQModel for every
bits x sym x desc_act; each checkpoint is loaded back by GPTQModel's pure-torch kernel
(BACKEND.TORCH, float16) and by :func:`mechq.quant.formats.gptq.load_gptq_checkpoint`, and the
dequantized weights must be ``torch.equal``.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechq.quant.formats.common import CheckpointError, check_architecture
from mechq.quant.formats.gptq import (
    load_gptq_checkpoint,
    save_gptq_checkpoint,
)
from mechq.quant.packing import PackedLinear, pack_int, unpack_int

BITS = (2, 3, 4, 8)
VOCAB = 256
# Llama hidden 192 is not a multiple of 128: like SmolLM2's 576, the last input group is partial.
GROUP = {"llama": 128, "gpt2": 64}
LINEAR_TYPES = ("Linear", "Conv1D")


# --------------------------------------------------------------------------------------------
# tiny real models and GPTQModel runs


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


@pytest.fixture(scope="module", autouse=True)
def _frozen_gc():
    """GPTQModel calls gc.collect() several times per load; with the heap that torch and
    transformers leave, each call takes ~0.3 s. Freezing the objects alive now (imports, models)
    makes those calls cheap; they are unfrozen when this module's tests end."""
    import gptqmodel  # noqa: F401  (its import is part of the heap worth freezing)

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def fp_models(tmp_path_factory) -> dict[str, Path]:
    """Seeded random-init Llama and GPT-2 models saved with a word-level tokenizer (offline)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("fp")
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    configs = {
        "llama": (LlamaForCausalLM, LlamaConfig(
            vocab_size=VOCAB, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
            tie_word_embeddings=False, **special)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4, **special)),
    }
    out = {}
    for i, (arch, (cls, cfg)) in enumerate(configs.items()):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        d = root / arch
        model.save_pretrained(d)
        _tokenizer().save_pretrained(d)
        out[arch] = d
    return out


def _calibration(n: int = 16, length: int = 32) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(4, VOCAB, (length,), generator=g).tolist(),
         "attention_mask": [1] * length}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def quantized(fp_models, tmp_path_factory):
    """Factory: quantize (arch, bits, sym, desc_act, format) with GPTQModel once per module."""
    root = tmp_path_factory.mktemp("gptq")
    cache: dict[tuple, Path] = {}

    def make(arch, bits, sym=True, desc_act=False, fmt="gptq", max_shard_size=None) -> Path:
        key = (arch, bits, sym, desc_act, fmt, max_shard_size)
        if key not in cache:
            from gptqmodel import GPTQModel, QuantizeConfig

            qcfg = QuantizeConfig(bits=bits, group_size=GROUP[arch], sym=sym, desc_act=desc_act,
                                  format=fmt, offload_to_disk=False)
            model = GPTQModel.load(str(fp_models[arch]), qcfg, device="cpu")
            model.quantize(_calibration())
            out = root / "-".join(map(str, key))
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save(str(out), **kwargs)
            del model
            cache[key] = out
        return cache[key]

    return make


def gptqmodel_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as GPTQModel's pure-torch kernel dequantizes it."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    model = GPTQModel.load(str(path), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    out = {}
    for name, mod in model.model.named_modules():
        if isinstance(mod, TorchLinear):
            # The class function, not the instance attribute that post_init wrapped in
            # torch.compile: same arithmetic, eager, no inductor build.
            out[name] = TorchLinear.dequantize_weight(mod).detach().clone()
    del model
    return out


def hf_linear_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear / Conv1D of the FP model in ``path`` except the LM head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    shapes = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ in LINEAR_TYPES and "lm_head" not in name:
            w = mod.weight
            shapes[name] = tuple(w.shape) if type(mod).__name__ == "Linear" else tuple(w.T.shape)
    return shapes


@pytest.fixture(scope="module")
def linear_shapes(fp_models) -> dict[str, dict[str, tuple[int, int]]]:
    return {arch: hf_linear_shapes(path) for arch, path in fp_models.items()}


def assert_matches_gptqmodel(path: Path, zero_offset: int) -> None:
    ckpt = load_gptq_checkpoint(path)
    theirs = gptqmodel_dequantized(path)
    assert theirs and set(theirs) == set(ckpt.modules)
    for name, ref in theirs.items():
        p = ckpt.modules[name]
        assert p.zero_offset == zero_offset
        ours = p.dequantize()
        assert ours.dtype == ref.dtype == torch.float16, name
        # Exact on any CPU: both sides compute scale * (code - zero) elementwise on the same
        # checkpoint, and a correctly rounded fp16 product has one answer (no reductions).
        assert torch.equal(ours, ref), f"{path.name} {name}: max |diff| {(ours - ref).abs().max()}"
        # Our packer writes GPTQModel's layout, v1 zero-point borrows included, bit for bit.
        again = PackedLinear.from_codes(p.codes(), p.zeros(), p.scales, p.g_idx, p.bits,
                                        p.group_size, zero_offset=p.zero_offset, bias=p.bias)
        assert torch.equal(again.qweight, p.qweight) and torch.equal(again.qzeros, p.qzeros), name


# --------------------------------------------------------------------------------------------
# bit exactness against GPTQModel


@pytest.mark.slow
@pytest.mark.parametrize("desc_act", [False, True], ids=["noact", "act"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=[f"w{b}" for b in BITS])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dequantize_matches_gptqmodel(quantized, linear_shapes, arch, bits, sym, desc_act):
    path = quantized(arch, bits, sym, desc_act)
    ckpt = load_gptq_checkpoint(path)
    qc = ckpt.quant_config
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        bits, GROUP[arch], sym, desc_act)
    assert qc["checkpoint_format"] == "gptq" and "meta" in qc
    assert ckpt.architecture == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    shapes = linear_shapes[arch]
    assert set(ckpt.modules) == set(shapes)  # every linear quantized, nothing else
    check_architecture(ckpt, shapes)
    for name, p in ckpt.modules.items():
        assert (p.out_features, p.in_features) == shapes[name]
        assert p.weight().shape == shapes[name] and p.weight().dtype == torch.float32
        assert p.codes().max() <= p.maxq and p.zeros().max() <= p.maxq
        if sym:  # GPTQ's symmetric grid: the zero point sits mid-range
            assert torch.all(p.zeros() == 2 ** (bits - 1))
    assert "model.embed_tokens.weight" in ckpt.other or "transformer.wte.weight" in ckpt.other
    if desc_act:  # act-order really happened: groups are not contiguous runs of input channels
        assert any(not torch.all(p.g_idx[1:] >= p.g_idx[:-1]) for p in ckpt.modules.values())
    assert_matches_gptqmodel(path, zero_offset=1)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_v2_checkpoint_matches_gptqmodel(quantized, bits):
    path = quantized("llama", bits, sym=False, desc_act=True, fmt="gptq_v2")
    ckpt = load_gptq_checkpoint(path)
    assert ckpt.quant_config["checkpoint_format"] == "gptq_v2"
    assert_matches_gptqmodel(path, zero_offset=0)


@pytest.mark.slow
def test_sharded_checkpoint_matches_gptqmodel(quantized):
    path = quantized("llama", 4, sym=False, desc_act=False, max_shard_size="150KB")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 1 and (path / "model.safetensors.index.json").exists()
    assert_matches_gptqmodel(path, zero_offset=1)
    single = load_gptq_checkpoint(quantized("llama", 4, sym=False, desc_act=False))
    sharded = load_gptq_checkpoint(path)
    assert set(sharded.modules) == set(single.modules)
    assert set(sharded.other) == set(single.other)


def _with_extreme_zeros(p: PackedLinear) -> PackedLinear:
    """``p`` with every other zero point set to 0 and every fourth to maxq (v1 must borrow)."""
    zeros = p.zeros().clone()
    zeros[:, ::2] = 0
    zeros[:, 1::4] = p.maxq
    return PackedLinear.from_codes(p.codes(), zeros, p.scales, p.g_idx, p.bits, p.group_size,
                                   zero_offset=1, bias=p.bias)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["v1", "v2", "v1-zero0"])
def test_save_round_trip_and_gptqmodel_reads_ours(quantized, tmp_path, case):
    """Our writer: load -> save (as v1, converted to v2, or with zero points of 0 that v1 can only
    store by borrowing) -> load gives the same tensors, and GPTQModel loads what we wrote to the
    same dequantized weights. GPTQModel's own checkpoints never contain a zero point of 0 here."""
    src = quantized("llama", 2, sym=False, desc_act=True)
    ckpt = load_gptq_checkpoint(src)
    fmt, offset = ("gptq_v2", 0) if case == "v2" else ("gptq", 1)
    if case == "v1-zero0":
        modules = {n: _with_extreme_zeros(p) for n, p in ckpt.modules.items()}
        assert all((m.zeros() == 0).any() for m in modules.values())
    else:
        modules = {n: p.with_zero_offset(offset) for n, p in ckpt.modules.items()}
    qc = {k: v for k, v in ckpt.quant_config.items() if k not in ("format", "checkpoint_format")}
    out = tmp_path / case
    save_gptq_checkpoint(out, modules, qc, ckpt.hf_config, other=ckpt.other)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    back = load_gptq_checkpoint(out)
    assert back.quant_config["checkpoint_format"] == fmt
    assert back.quant_config["bits"] == 2 and back.quant_config["meta"] == qc["meta"]
    assert back.hf_config["quantization_config"]["checkpoint_format"] == fmt
    assert set(back.other) == set(ckpt.other)
    assert all(torch.equal(back.other[k], v) for k, v in ckpt.other.items())
    for name, p in modules.items():
        q = back.modules[name]
        assert q.zero_offset == offset
        assert torch.equal(q.zeros(), p.zeros()) and torch.equal(q.codes(), p.codes())
        assert torch.equal(q.qzeros, p.qzeros) and torch.equal(q.qweight, p.qweight)
        assert torch.equal(q.dequantize(), ckpt.modules[name].dequantize()) == (case != "v1-zero0")
    assert_matches_gptqmodel(out, zero_offset=offset)


# --------------------------------------------------------------------------------------------
# v1 zero points: GPTQModel's overflow semantics, on arbitrary words


@pytest.mark.parametrize("bits", BITS)
def test_v1_zero_overflow_matches_gptqmodel(bits):
    """Any qzeros word, including stored fields of ``maxq`` (a real zero of 0 written per field
    by other tools) and a carry out of bit 31: our zeros() and dequantize() equal what
    GPTQModel's torch kernel computes after its own v1 -> v2 conversion."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    n_in, n_out, gs = 128, 64, 32
    g = torch.Generator().manual_seed(bits)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (n_in, n_out), generator=g)
    stored = torch.randint(0, maxq + 1, (n_in // gs, n_out), generator=g)
    stored[:, ::3] = maxq  # the v1 encoding of zero 0 when zero - 1 is written field by field
    scales = (torch.rand(n_in // gs, n_out, generator=g) / 50 + 1e-3).half()
    g_idx = torch.randperm(n_in, generator=g).to(torch.int32) % (n_in // gs)
    p = PackedLinear(qweight=pack_int(codes, bits, 0), qzeros=pack_int(stored, bits, 1),
                     scales=scales, g_idx=g_idx, bits=bits, group_size=gs, zero_offset=1)
    # The stored maxq fields really overflow into their neighbours for 2/4/8 bits.
    naive = (stored + 1) & maxq
    assert torch.equal(p.zeros(), naive) == (bits == 3)

    for training in (False, True):  # GPTQModel has an eval fast path (2/4/8) and a generic one
        mod = TorchLinear(bits=bits, group_size=gs, sym=False, desc_act=True, in_features=n_in,
                          out_features=n_out, bias=False, register_buffers=True)
        mod.qweight.copy_(p.qweight)
        mod.qzeros.copy_(p.qzeros)
        mod.scales.copy_(p.scales)
        mod.g_idx.copy_(p.g_idx)
        mod.post_init()
        mod.training = training
        convert_gptq_v1_to_v2_format_module(mod, bits=bits, pack_dtype=torch.int32)
        ref = TorchLinear.dequantize_weight(mod)
        assert ref.dtype == torch.float16 and torch.equal(p.dequantize(), ref)
    v2 = PackedLinear(qweight=p.qweight, qzeros=mod.qzeros.clone(), scales=scales, g_idx=g_idx,
                      bits=bits, group_size=gs, zero_offset=0)
    assert torch.equal(v2.zeros(), p.zeros())


# --------------------------------------------------------------------------------------------
# packing (pure torch)


def _reference_stream_pack(values: list[int], bits: int) -> list[int]:
    """Independent reference: one Python integer as the little-endian bit stream."""
    stream = sum(v << (k * bits) for k, v in enumerate(values))
    n_words = -(-len(values) * bits // 32)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", BITS)
def test_pack_int_is_the_little_endian_stream(bits):
    g = torch.Generator().manual_seed(0)
    for n in (32, 96, 45, 1):
        codes = torch.randint(0, 2**bits, (n, 3), generator=g)
        packed = pack_int(codes, bits, 0)
        assert packed.dtype == torch.int32 and packed.shape == (-(-n * bits // 32), 3)
        for col in range(3):
            assert packed[:, col].tolist() == _reference_stream_pack(codes[:, col].tolist(), bits)
        assert torch.equal(unpack_int(packed, bits, 0, n), codes.to(torch.int32))


def test_three_bit_fields_straddle_words():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b101  # bits 30..32: low two bits end word 0, the top bit opens word 1
    codes[21] = 0b011  # bits 63..65: the low bit ends word 1, the top two open word 2
    w = pack_int(codes, 3, 0)[:, 0].tolist()
    assert w == [0b01 << 30, 1 | (1 << 31) - (1 << 32), 0b01]  # int32: bit 31 is the sign


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_any_dim_and_sign_bit(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2**bits, (7, 33, 5), generator=g)
    for dim in range(3):
        assert torch.equal(unpack_int(pack_int(x, bits, dim), bits, dim, x.shape[dim]),
                           x.to(torch.int32))
    full = torch.full((32, 2), 2**bits - 1)
    assert torch.all(pack_int(full, bits, 0) == -1)  # every bit set, sign bit included


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=f"bits={bits}"):
        pack_int(torch.zeros(32, 1, dtype=torch.int64), bits, 0)
    with pytest.raises(ValueError, match=f"bits={bits}"):
        unpack_int(torch.zeros(8, 1, dtype=torch.int32), bits, 0, 32)


def test_pack_rejects_out_of_range_codes_and_bad_lengths():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int(torch.tensor([[16]]), 4, 0)
    with pytest.raises(ValueError, match="expected ceil"):
        unpack_int(torch.zeros(3, 1, dtype=torch.int32), 4, 0, 32)


@pytest.mark.parametrize("zero_offset", [1, 0])
@pytest.mark.parametrize("bits", BITS)
def test_from_codes_round_trip(bits, zero_offset):
    g = torch.Generator().manual_seed(bits)
    n_in, n_out, gs = 192, 96, 128  # a partial last group
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (n_in, n_out), generator=g)
    zeros = torch.randint(0, maxq + 1, (2, n_out), generator=g)
    zeros[0, :8] = 0  # v1 must borrow for these
    zeros[1, :8] = maxq
    scales = torch.rand(2, n_out, generator=g) / 10
    g_idx = torch.arange(n_in, dtype=torch.int32) // gs
    bias = torch.randn(n_out, generator=g).half()
    p = PackedLinear.from_codes(codes, zeros, scales, g_idx, bits, gs, zero_offset=zero_offset,
                                bias=bias)
    assert (p.in_features, p.out_features, p.n_groups) == (n_in, n_out, 2)
    assert p.qweight.shape == (n_in * bits // 32, n_out) and p.qzeros.shape == (2, n_out * bits // 32)
    assert torch.equal(p.codes(), codes.to(torch.int32))
    assert torch.equal(p.zeros(), zeros.to(torch.int32))
    expected = scales.half()[g_idx.long()] * (codes - zeros[g_idx.long()])
    assert torch.equal(p.dequantize(), expected)  # the same elementwise fp16 product: exact
    assert torch.equal(p.weight(torch.float64), expected.T.double())
    assert p.nbytes == sum(t.numel() * t.element_size()
                           for t in (p.qweight, p.qzeros, p.scales, p.g_idx, bias))
    other = p.with_zero_offset(1 - zero_offset)
    assert torch.equal(other.zeros(), p.zeros()) and torch.equal(other.qweight, p.qweight)
    assert torch.equal(other.dequantize(), p.dequantize())


def test_packed_linear_validates_shapes():
    p = PackedLinear.from_codes(torch.zeros(64, 32, dtype=torch.int64),
                                torch.zeros(1, 32, dtype=torch.int64), torch.ones(1, 32),
                                torch.zeros(64, dtype=torch.int32), 4, 64)
    with pytest.raises(ValueError, match="qweight has shape"):
        PackedLinear(p.qweight[:-1], p.qzeros, p.scales, p.g_idx, 4, 64)
    with pytest.raises(ValueError, match="scales must be a torch.float16 or .*bfloat16"):
        PackedLinear(p.qweight, p.qzeros, p.scales.double(), p.g_idx, 4, 64)
    # bfloat16 scales (AWQ's) are kept and dequantized in float32, exactly: (q - z) is an
    # integer of at most 8 bits and a bfloat16 significand has 8, so the product fits float32
    b = PackedLinear(p.qweight, p.qzeros, p.scales.bfloat16(), p.g_idx, 4, 64)
    ref = (b.codes() - b.zeros()[b.g_idx.long()]).double() * b.scales.double()[b.g_idx.long()]
    assert b.dequantize().dtype == torch.float32 and torch.equal(b.dequantize().double(), ref)


# --------------------------------------------------------------------------------------------
# clear errors


@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    """A valid two-module v1 checkpoint written by our own writer."""
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, (n_in, n_out) in {"model.layers.0.self_attn.q_proj": (64, 64),
                                "model.layers.0.mlp.down_proj": (128, 64)}.items():
        mods[name] = PackedLinear.from_codes(
            torch.randint(0, 16, (n_in, n_out), generator=g),
            torch.randint(0, 16, (n_in // 32, n_out), generator=g),
            torch.rand(n_in // 32, n_out, generator=g), torch.arange(n_in) // 32, 4, 32)
    path = tmp_path / "ckpt"
    save_gptq_checkpoint(path, mods, {"bits": 4, "group_size": 32, "sym": False},
                         {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                         other={"model.norm.weight": torch.ones(64)})
    return path


def _edit_tensors(path: Path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def _edit_config(path: Path, **changes) -> None:
    f = path / "quantize_config.json"
    qc = json.loads(f.read_text())
    qc.update(changes)
    f.write_text(json.dumps(qc))


def test_small_checkpoint_loads(small_ckpt):
    ckpt = load_gptq_checkpoint(small_ckpt)
    assert set(ckpt.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert list(ckpt.other) == ["model.norm.weight"] and ckpt.architecture == "LlamaForCausalLM"
    assert ckpt.quant_config["checkpoint_format"] == "gptq"


def test_error_missing_tensor(small_ckpt):
    _edit_tensors(small_ckpt, lambda t: t.pop("model.layers.0.mlp.down_proj.scales"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\."
                                              r"down_proj\.scales'"):
        load_gptq_checkpoint(small_ckpt)


def test_error_extra_tensor(small_ckpt):
    _edit_tensors(small_ckpt, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected tensor "
                                              r"'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        load_gptq_checkpoint(small_ckpt)


@pytest.mark.parametrize("part,shape_fn,message", [
    ("qweight", lambda t: t[:-1], r"qweight' has shape \(7, 64\), expected \(8, 64\)"),
    ("scales", lambda t: t[:1], r"scales' has shape \(1, 64\), expected \(2, 64\)"),
    ("qzeros", lambda t: t[:, :4], r"qzeros' has shape \(2, 4\), expected \(2, 8\)"),
])
def test_error_wrong_shape(small_ckpt, part, shape_fn, message):
    key = f"model.layers.0.self_attn.q_proj.{part}"
    _edit_tensors(small_ckpt, lambda t: t.update({key: shape_fn(t[key]).contiguous()}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\."
                                              r"self_attn\.q_proj\." + message):
        load_gptq_checkpoint(small_ckpt)


def test_error_g_idx_out_of_range(small_ckpt):
    key = "model.layers.0.self_attn.q_proj.g_idx"
    _edit_tensors(small_ckpt, lambda t: t[key].__setitem__(0, 5))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.g_idx' has "
                                              r"values in \[0, 5\] but scales has 2 groups"):
        load_gptq_checkpoint(small_ckpt)


def test_error_unsupported_bits(small_ckpt):
    _edit_config(small_ckpt, bits=5)
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: unsupported bits=5"):
        load_gptq_checkpoint(small_ckpt)


def test_error_awq_and_other_formats(small_ckpt):
    _edit_config(small_ckpt, quant_method="awq", method="awq", version="gemm", format="gemm",
                 checkpoint_format="gemm", zero_point=True)
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: unsupported quant_method "
                                              r"'awq'; mechq reads GPTQ checkpoints"):
        load_gptq_checkpoint(small_ckpt)
    _edit_config(small_ckpt, quant_method="gptq", method="gptq", checkpoint_format="marlin",
                 format="marlin")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint_format 'marlin'.*"
                                              r"'gptq' \(v1\) or 'gptq_v2'"):
        load_gptq_checkpoint(small_ckpt)


def test_error_no_quant_config(small_ckpt):
    (small_ckpt / "quantize_config.json").unlink()
    cfg = json.loads((small_ckpt / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (small_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no quantization config.*quantize_config\.json"):
        load_gptq_checkpoint(small_ckpt)
    cfg["quantization_config"] = qc  # config.json alone is enough
    (small_ckpt / "config.json").write_text(json.dumps(cfg))
    assert load_gptq_checkpoint(small_ckpt).quant_config["bits"] == 4


def test_error_no_quantized_modules(small_ckpt):
    _edit_tensors(small_ckpt, lambda t: [t.pop(k) for k in list(t) if k != "model.norm.weight"])
    with pytest.raises(CheckpointError, match=r"no quantized modules found in "
                                              r"\['model\.safetensors'\]"):
        load_gptq_checkpoint(small_ckpt)


def test_error_shards(small_ckpt):
    tensors = load_file(small_ckpt / "model.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]},
              small_ckpt / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' "
                                              r"is also in .*model-00002-of-00002\.safetensors"):
        load_gptq_checkpoint(small_ckpt)
    (small_ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00003-of-00003.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: lists shard\(s\) "
                                              r"\['model-00003-of-00003\.safetensors'\]"):
        load_gptq_checkpoint(small_ckpt)


def test_save_rejects_mismatched_format(small_ckpt, tmp_path):
    ckpt = load_gptq_checkpoint(small_ckpt)
    with pytest.raises(CheckpointError, match="checkpoint_format 'gptq_v2' needs zero_offset=0"):
        save_gptq_checkpoint(tmp_path / "x", ckpt.modules,
                             dict(ckpt.quant_config, checkpoint_format="gptq_v2"))
    with pytest.raises(CheckpointError, match=r"bits=4 and \d groups, but the config says bits=8"):
        save_gptq_checkpoint(tmp_path / "y", ckpt.modules, dict(ckpt.quant_config, bits=8))


def test_mixed_bits_round_trip_and_mismatch(small_ckpt, tmp_path):
    """Per-module bits through ``dynamic``: written and read back module by module; a module
    whose packing contradicts its rule is refused by the writer, naming it."""
    ckpt = load_gptq_checkpoint(small_ckpt)
    q_proj = "model.layers.0.self_attn.q_proj"
    p = ckpt.modules[q_proj]
    w8 = PackedLinear.from_codes(p.codes() * 16, p.zeros() * 16, p.scales, p.g_idx, 8,
                                 p.group_size)
    mods = dict(ckpt.modules, **{q_proj: w8})
    rules = {r"+:.*self_attn\..*": {"bits": 8}, r"-:.*lm_head": {}}
    save_gptq_checkpoint(tmp_path / "mixed", mods, dict(ckpt.quant_config, dynamic=rules))
    back = load_gptq_checkpoint(tmp_path / "mixed")
    assert back.module_bits == {q_proj: 8, "model.layers.0.mlp.down_proj": 4}
    assert back.quant_config["bits"] == 4 and back.quant_config["dynamic"] == rules
    assert torch.equal(back.modules[q_proj].dequantize(), w8.dequantize())
    with pytest.raises(CheckpointError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has "
                                              r"bits=4 .* the config says bits=8"):
        save_gptq_checkpoint(tmp_path / "bad", ckpt.modules, dict(ckpt.quant_config, dynamic=rules))


@pytest.mark.slow
def test_error_wrong_architecture(quantized, linear_shapes):
    """A GPT-2 checkpoint offered for the Llama model, and a Llama one of the wrong size."""
    gpt2 = load_gptq_checkpoint(quantized("gpt2", 4))
    llama_shapes = linear_shapes["llama"]
    with pytest.raises(CheckpointError, match=r"gpt2.*: 8 of 8 quantized modules do not belong "
                                              r"to this model \(checkpoint architecture: "
                                              r"GPT2LMHeadModel\), e\.g\. \['transformer\.h\.0"):
        check_architecture(gpt2, set(llama_shapes))
    llama = load_gptq_checkpoint(quantized("llama", 4))
    check_architecture(llama, set(llama_shapes))
    bigger = {k: (2 * o, i) for k, (o, i) in llama_shapes.items()}
    with pytest.raises(CheckpointError, match=r"14 quantized modules have other shapes.*"
                                              r"model\.layers\.0\.mlp\.down_proj: checkpoint"):
        check_architecture(llama, bigger)
