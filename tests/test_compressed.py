"""compressed-tensors checkpoints: written by compressed-tensors' own compressor, read by mechq.

RTN (and, marked slow, GPTQ) variants of mechq's tiny GPT-2 are written with
:func:`write_compressed_tensors` (compressed-tensors' ``PackedQuantizationCompressor``) and read
back by :func:`read_compressed_tensors` (mechq's reader, no compressed-tensors): every module
must dequantize bit-identically to the variant, and to compressed-tensors' own model-free
decompression (``CompressedTensorsDequantizer``) of the same files. Broken checkpoints, made
by editing a good one, must be refused with the file and tensor named.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mechq
from mechq.models import load as models
from mechq.quant import layout
from mechq.quant.formats.common import CheckpointError
from mechq.quant.formats.compressed import read_compressed_tensors
from mechq.quant.formats.compressed_write import write_compressed_tensors
from mechq.quant.formats import detect_format
from mechq.quant.variants import swap
from tests.conftest import edit_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend

# 64 divides tiny-gpt2's input widths (128 and 512): compressed-tensors needs whole groups.
GS = 64
# (bits, group_size, sym): W4A16 sym / asym, W8A16 per channel and grouped asym, 2 and 3 bits
CASES = [(4, GS, True), (4, GS, False), (8, -1, True), (8, 32, False), (3, GS, False),
         (2, GS, True)]
IDS = [f"w{b}{'g' + str(g) if g > 0 else 'ch'}{'' if s else '-asym'}" for b, g, s in CASES]
M = "transformer.h.1.mlp.c_fc"  # the module the bad-checkpoint tests break: (512, 128)


@pytest.fixture(scope="module")
def written(tiny, private_cache, tmp_path_factory):
    """Factory: (bits, group_size, sym) -> (RTN variant, its compressed-tensors directory)."""
    root = tmp_path_factory.mktemp("ct")
    made = {}

    def make(bits, group_size, sym):
        key = (bits, group_size, sym)
        if key not in made:
            v = mechq.quantize(tiny, "rtn", bits=bits, group_size=group_size, sym=sym)
            made[key] = v, write_compressed_tensors(v, root / v.name, model=tiny)
        return made[key]

    return make


def ct_dequantized(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor after compressed-tensors' own model-free decompression of ``path``."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    # validate() = process() plus its check that no packed tensor was left untargeted
    return CompressedTensorsDequantizer(path, dtype=dtype).validate(tensors)


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("bits,group_size,sym", CASES, ids=IDS)
def test_round_trip_is_the_variant(tiny, written, bits, group_size, sym):
    v, path = written(bits, group_size, sym)
    ck = read_compressed_tensors(path)
    assert detect_format(path) == "compressed-tensors"
    assert set(ck.modules) == set(v.modules) == set(layout.modules(tiny.cfg))
    qc = ck.quant_config
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, group_size, sym,
                                                                         False)
    # W8A16 is pack-quantized too: compressed-tensors' infer_module_format chose it
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["raw"]["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == bits and weights["symmetric"] == sym
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    assert qc["raw"]["ignore"] == ["lm_head"] and ck.architecture == "GPT2LMHeadModel"
    stored = load_file(path / "model.safetensors")
    source = load_file(models.source_of(tiny).hf_dir / "model.safetensors")
    for name, p in v.modules.items():
        q = ck.modules[name]
        # the compressor keeps float16 scales as given, so the codes, zero points and scales
        # are the variant's and the dequantized weights are bit-identical
        assert q.scales.dtype == torch.float16 and torch.equal(q.scales, p.scales)
        assert torch.equal(q.codes(), p.codes()) and torch.equal(q.zeros(), p.zeros())
        assert torch.equal(q.dequantize(), p.dequantize()), name
        assert torch.equal(q.weight(), v.weight(name))
        # the layout fact the reader's docstring states: weight_packed.T is GPTQ's qweight and
        # weight_zero_point.T its v2 qzeros, word for word
        assert torch.equal(q.qweight, stored[f"{name}.weight_packed"].T)
        assert torch.equal(stored[f"{name}.weight_shape"], torch.tensor(
            [p.out_features, p.in_features]))
        if sym:
            assert f"{name}.weight_zero_point" not in stored
        else:
            assert torch.equal(q.qzeros, stored[f"{name}.weight_zero_point"].T)
        # GPT-2's biases were copied from the model's HF weights and attached to the module
        assert torch.equal(q.bias, source[f"{name}.bias"])
    # the unquantized tensors are the model's own, and nothing else is left over
    assert set(ck.other) == {k for k in source if not (
        k.endswith(".weight") and k[:-len(".weight")] in v.modules)} - {
        f"{m}.bias" for m in v.modules}
    assert all(torch.equal(t, source[k]) for k, t in ck.other.items())


@pytest.mark.parametrize("bits,group_size,sym", CASES[:4], ids=IDS[:4])  # W4A16 and W8A16
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_reader_equals_compressed_tensors_decompression(written, tmp_path, bits, group_size,
                                                        sym, scale_dtype):
    """mechq's reader and compressed-tensors' decompress agree bit for bit, W4A16 and W8A16,
    with the scales as written (float16) and re-stored as bfloat16 / float32 (a new
    checkpoint: the cast rounds, both readers see the same rounded scales)."""
    _, path = written(bits, group_size, sym)
    if scale_dtype != torch.float16:
        path = edit_checkpoint(path, tmp_path / "scales", tensors=lambda t: t.update(
            {k: v.to(scale_dtype) for k, v in t.items() if k.endswith(".weight_scale")}))
    ck = read_compressed_tensors(path)
    theirs = ct_dequantized(path, dtype=scale_dtype)
    assert {k for k in theirs if k.endswith(".weight")} >= {f"{m}.weight" for m in ck.modules}
    for name, p in ck.modules.items():
        assert p.scales.dtype == scale_dtype  # kept as stored
        ref = theirs[f"{name}.weight"]
        assert ref.dtype == scale_dtype and ref.shape == (p.out_features, p.in_features)
        # Exact: compressed-tensors casts q - z to the scale dtype (exact for |q - z| <= 255)
        # and rounds the product once in that dtype. mechq does the same in float16, and in
        # float32 for bfloat16 / float32 scales, where the product is exact (bfloat16: 8 + 8
        # significant bits) or rounded once (float32); rounding that to bfloat16 is the same
        # single rounding compressed-tensors does.
        assert torch.equal(p.weight(scale_dtype), ref), name
    for k, t in ck.other.items():  # the rest passes through both readers unchanged
        assert torch.equal(theirs[k], t), k


def test_several_config_groups(written, tmp_path):
    """Layer 0 at 8 bits (a regex group), the rest at 4 (``Linear``): each module gets the
    group of its most specific target, as in compressed-tensors, and both readers agree."""
    v4, p4 = written(4, GS, False)
    v8, p8 = written(8, 32, False)
    layer0 = [m for m in v4.modules if m.startswith("transformer.h.0.")]
    eight = load_file(p8 / "model.safetensors")

    def tensors(t):
        for m in layer0:
            for k in [k for k in t if k.startswith(m + ".")]:
                del t[k]
            t.update({k: x for k, x in eight.items() if k.startswith(m + ".")})

    def config(qc):
        four = qc["config_groups"].pop("group_0")
        eight_scheme = json.loads((p8 / "config.json").read_text())["quantization_config"][
            "config_groups"]["group_0"]
        # the regex group comes first: compressed-tensors' model-free dequantizer takes the
        # groups in order and lets "Linear" claim every module it reaches
        qc["config_groups"] = {"layer0": dict(eight_scheme, targets=[r"re:transformer\.h\.0\."]),
                               "group_0": four}

    path = edit_checkpoint(p4, tmp_path / "mixed", config=config, tensors=tensors)
    ck = read_compressed_tensors(path)
    assert ck.module_bits == {m: 8 if m in layer0 else 4 for m in v4.modules}
    assert ck.quant_config["bits"] == 4  # the group covering most modules
    theirs = ct_dequantized(path, dtype=torch.float16)
    for name, p in ck.modules.items():
        v = v8 if name in layer0 else v4
        assert torch.equal(p.dequantize(), v.modules[name].dequantize()), name
        assert torch.equal(p.weight(torch.float16), theirs[f"{name}.weight"]), name  # see above


def test_g_idx_of_older_checkpoints(written, tmp_path):
    """compressed-tensors < 0.20 stored ``weight_g_idx`` for actorder='group': column ``i``
    uses group ``g_idx[i]``; a ``-1`` anywhere means column order."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    _, path = written(4, GS, False)
    g = torch.Generator().manual_seed(0)
    perm = (torch.randperm(128, generator=g) % 2).to(torch.int32)  # two groups, scattered
    attn = "transformer.h.0.attn.c_attn"  # (384, 128)

    def with_g_idx(t):
        t[f"{attn}.weight_g_idx"] = perm
        t[f"{M}.weight_g_idx"] = torch.full((128,), -1, dtype=torch.int32)

    edited = edit_checkpoint(path, tmp_path / "gidx", tensors=with_g_idx)
    ck, plain = read_compressed_tensors(edited), read_compressed_tensors(path)
    assert ck.quant_config["desc_act"] and not plain.quant_config["desc_act"]
    assert torch.equal(ck.modules[M].dequantize(), plain.modules[M].dequantize())  # -1: unset
    # Independent reference: compressed-tensors' own unpacking, float64 arithmetic. The float64
    # product of a small integer and a float16 scale is exact, so rounding it to float16 is
    # the single rounding mechq's float16 product makes.
    t = load_file(path / "model.safetensors")
    q = unpack_from_int32(t[f"{attn}.weight_packed"], 4, torch.Size([384, 128])).double()
    z = unpack_from_int32(t[f"{attn}.weight_zero_point"], 4, torch.Size([384, 2]),
                          packed_dim=0).double()
    s = t[f"{attn}.weight_scale"].double()
    ref = (q - z[:, perm.long()]) * s[:, perm.long()]
    assert torch.equal(ck.modules[attn].weight(torch.float16), ref.half())
    assert not torch.equal(ck.modules[attn].dequantize(), plain.modules[attn].dequantize())


def test_reader_does_not_import_compressed_tensors(written):
    """mechq reads these files without the package (it is an optional extra)."""
    import subprocess
    import sys

    _, path = written(4, GS, False)
    code = ("import sys; from mechq.quant.formats.compressed import read_compressed_tensors; "
            f"ck = read_compressed_tensors({str(path)!r}); assert len(ck.modules) == 16; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'compressed_tensors'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_load_variant_and_swap(tiny, written):
    """mechq.load_variant detects the format; the variant read back swaps in the same weights."""
    v, path = written(4, GS, True)
    back = mechq.load_variant(path, model=tiny)
    assert (back.name, back.method, back.bits, back.group_size) == (v.name, "rtn", 4, GS)
    tokens = tiny.to_tokens("The capital of France is")
    with swap(tiny, v):
        ours = tiny(tokens)
    with swap(tiny, back):
        theirs = tiny(tokens)
    assert torch.equal(ours, theirs)  # the same weights in the same model: identical logits


def test_without_model(written, tmp_path):
    v, _ = written(8, -1, True)
    path = write_compressed_tensors(v, tmp_path / "bare")
    hf = json.loads((path / "config.json").read_text())
    assert set(hf) == {"quantization_config"}
    ck = read_compressed_tensors(path)
    assert ck.architecture is None and ck.other == {}
    assert all(torch.equal(ck.modules[m].dequantize(), p.dequantize())
               for m, p in v.modules.items())
    path = write_compressed_tensors(v, tmp_path / "config", model={"architectures": ["X"]})
    assert read_compressed_tensors(path).architecture == "X"


def test_desc_act_with_contiguous_groups_is_actorder_weight(written, tmp_path):
    """GPTQ act-order that kept groups contiguous changed calibration only: compressed-tensors
    calls that actorder='weight' (same layout), and mechq reads it back as desc_act."""
    v, _ = written(4, GS, True)
    path = write_compressed_tensors(dataclasses.replace(v, desc_act=True), tmp_path / "act")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    ck = read_compressed_tensors(path)
    assert ck.quant_config["desc_act"] and ck.quant_config["actorder"] == "weight"
    assert all(torch.equal(ck.modules[m].dequantize(), p.dequantize())
               for m, p in v.modules.items())


@pytest.mark.slow
def test_gptq_variant(tiny, private_cache, tmp_path):
    """A GPTQModel variant (v1 zero points, float16 scales) round-trips too (~30-60 s)."""
    v = mechq.quantize(tiny, "gptq", bits=4, group_size=GS, n_samples=8, seq_len=24)
    path = write_compressed_tensors(v, tmp_path / "gptq", model=tiny)
    ck = read_compressed_tensors(path)
    theirs = ct_dequantized(path, dtype=torch.float16)
    assert set(ck.modules) == set(v.modules)
    for name, p in v.modules.items():
        assert ck.modules[name].zero_offset == 0
        assert torch.equal(ck.modules[name].dequantize(), p.dequantize()), name
        assert torch.equal(ck.modules[name].weight(torch.float16), theirs[f"{name}.weight"])


# --------------------------------------------------------------------------------------------
# what the writer refuses


def _with(v, **changes):
    return dataclasses.replace(v, **changes)


def test_writer_refuses(tiny, written, private_cache, tmp_path):
    v, _ = written(4, GS, True)
    v8, _ = written(8, 32, False)
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="mechq writes compressed-tensors 'pack-quantized', "
                                         "'int-quantized', 'float-quantized' only"):
        write_compressed_tensors(v, out, fmt="marlin-24")
    with pytest.raises(ValueError, match="cannot be written as 'int-quantized': mechq writes "
                                         "W8A8 there"):  # W4 codes: not the int8 format
        write_compressed_tensors(v, out, fmt="int-quantized")
    mixed = _with(v, modules={**v.modules, M: v8.modules[M]})
    with pytest.raises(ValueError, match=r"mixed bits \[4, 8\]"):
        write_compressed_tensors(mixed, out)
    dyn = mechq.quantize(tiny, "rtn", bits=4, group_size=GS,
                         dynamic={r"+:.*\.h\.0\..*": {"bits": 8}})
    with pytest.raises(ValueError, match="per-module 'dynamic' rules"):
        write_compressed_tensors(dyn, out)
    b, a = torch.zeros(512, 2), torch.zeros(2, 128)
    with pytest.raises(ValueError, match="low-rank corrections"):
        write_compressed_tensors(_with(v, lowrank={M: (b, a)}), out)
    partial = mechq.quantize(tiny, "rtn", bits=4, group_size=96)  # 128 = 96 + 32
    with pytest.raises(ValueError, match="not whole groups of the variant's group_size 96"):
        write_compressed_tensors(partial, out)
    p = v.modules[M]
    shuffled = dataclasses.replace(p, g_idx=p.g_idx.flip(0).contiguous())
    with pytest.raises(ValueError, match=f"module '{re.escape(M)}' has an act-order g_idx"):
        write_compressed_tensors(_with(v, modules={**v.modules, M: shuffled}), out)
    with pytest.raises(ValueError, match="says sym=True, but module .* has zero points other "
                                         "than 128"):
        write_compressed_tensors(_with(v8, sym=True), out)
    assert not out.exists()  # refused before anything was written


# --------------------------------------------------------------------------------------------
# what the reader refuses




def _group(qc):
    return qc["config_groups"]["group_0"]


def _weights(**kw):
    return lambda qc: _group(qc)["weights"].update(kw)


def _drop(*names):
    return lambda t: [t.pop(n) for n in names]


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


CFG = r"config\.json \(quantization_config\): "
BAD_CONFIGS = {
    # read now (tests/test_compressed_act.py), but not over a pack-quantized config group
    "float-quantized": (lambda qc: qc.update(format="float-quantized"),
                        CFG + "config group 'group_0' has format 'pack-quantized', but the "
                              "config's format is 'float-quantized'"),
    "float-quantized-int-weights": (
        lambda qc: (qc.update(format="float-quantized"), _group(qc).update(format=None)),
        CFG + "config group 'group_0' is 'float-quantized' but has weights of type 'int'"),
    "marlin-24": (lambda qc: qc.update(format="marlin-24"), CFG + "unsupported format 'marlin"),
    "nvfp4": (lambda qc: qc.update(format="nvfp4-pack-quantized"),
              CFG + "unsupported format 'nvfp4-pack-quantized'"),
    "mixed-int-quantized": (lambda qc: (qc.update(format="mixed-precision"),
                                        _group(qc).update(format="int-quantized")),
                            CFG + "config group 'group_0' has weights.num_bits=4; mechq "
                                  "reads 'int-quantized' with 8-bit weights"),
    "type-float": (_weights(type="float", num_bits=8),
                   CFG + "config group 'group_0' has weights of type 'float'"),
    "bits-5": (_weights(num_bits=5), CFG + "config group 'group_0' has num_bits=5"),
    "bits-6": (_weights(num_bits=6), CFG + "config group 'group_0' has num_bits=6"),
    "w8a8": (lambda qc: _group(qc).update(input_activations=dict(
        num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)),
             CFG + "config group 'group_0' quantizes input_activations .*weight-only"),
    # a KV-cache scheme is read (tests/test_compressed_act.py), but its scales must be there
    "kv-cache": (lambda qc: qc.update(kv_cache_scheme=dict(num_bits=8, type="float")),
                 CFG + r"has a kv_cache_scheme \(static per tensor\) but \['model.safetensors'\] "
                       "hold no '<attention>.k_scale'"),
    "tensor-strategy": (_weights(strategy="tensor", group_size=None),
                        CFG + "config group 'group_0' has weight strategy 'tensor'"),
    "bad-regex": (lambda qc: qc["ignore"].append("re:(("),
                  CFG + r"target / ignore entry 're:\(\(' is not a regex"),
    "gptq-method": (lambda qc: qc.update(quant_method="gptq"),
                    CFG + "quant_method 'gptq' is not 'compressed-tensors'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config(written, tmp_path, case):
    edit, message = BAD_CONFIGS[case]
    path = edit_checkpoint(written(4, GS, False)[1], tmp_path / case, config=edit)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + message):
        read_compressed_tensors(path)


T = r"model\.safetensors: "
BAD_TENSORS = {
    "no-scale": (_drop(f"{M}.weight_scale"),
                 T + f"quantized module '{M}' has .* but no '{M}.weight_scale'"),
    "no-packed": (_drop(f"{M}.weight_packed"),
                  T + f"quantized module '{M}' has .* but no '{M}.weight_packed'"),
    "no-zero-point": (_drop(f"{M}.weight_zero_point"),
                      T + f"quantized module '{M}' has .* but no '{M}.weight_zero_point' "
                          r"\(config group 'group_0': asymmetric 4-bit\)"),
    "packed-short": (lambda t: t.update({f"{M}.weight_packed": t[f"{M}.weight_packed"][:, :-1]}),
                     T + rf"tensor '{M}.weight_packed' has shape \(512, 15\), expected \(512, "
                         r"16\) for weight_shape \(512, 128\)"),
    "shape-wrong": (_set(f"{M}.weight_shape", torch.tensor([512, 256])),
                    T + rf"tensor '{M}.weight_packed' has shape \(512, 16\), expected "
                        r"\(512, 32\) for weight_shape \(512, 256\)"),
    "groups-wrong": (lambda t: t.update({f"{M}.weight_scale": t[f"{M}.weight_scale"][:, :1]}),
                     T + rf"tensor '{M}.weight_scale' has shape \(512, 1\), expected \(512, 2\)"),
    "zero-point-unpacked": (lambda t: t.update({f"{M}.weight_zero_point": torch.zeros(
        512, 2, dtype=torch.int32)}), T + rf"tensor '{M}.weight_zero_point' has shape "
                                          r"\(512, 2\), expected \(64, 2\)"),
    "scale-int": (lambda t: t.update({f"{M}.weight_scale": t[f"{M}.weight_scale"].to(
        torch.int32)}), T + rf"tensor '{M}.weight_scale' has dtype torch.int32"),
    "shape-float": (_set(f"{M}.weight_shape", torch.tensor([512.0, 128.0])),
                    T + rf"tensor '{M}.weight_shape' is \[512.0, 128.0\]"),
    "g-idx-range": (_set(f"{M}.weight_g_idx", torch.full((128,), 2, dtype=torch.int32)),
                    T + rf"tensor '{M}.weight_g_idx' has values in \[2, 2\] but there are 2"),
    "extra-tensor": (_set(f"{M}.input_scale", torch.ones(1)),
                     T + f"unexpected tensor '{M}.input_scale' in quantized module '{M}'"),
    "nothing-packed": (lambda t: [t.pop(k) for k in list(t) if ".weight_" in k],
                       r"no quantized modules found in \['model.safetensors'\]"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors(written, tmp_path, case):
    edit, message = BAD_TENSORS[case]
    path = edit_checkpoint(written(4, GS, False)[1], tmp_path / case, tensors=edit)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + message):
        read_compressed_tensors(path)


def test_bad_module_targets(written, tmp_path):
    src = written(4, GS, True)[1]
    path = edit_checkpoint(src, tmp_path / "ignored", config=lambda qc: qc["ignore"].append(M))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: module '{M}' has packed "
                                              r"tensors, but .* lists it under 'ignore'"):
        read_compressed_tensors(path)
    path = edit_checkpoint(src, tmp_path / "untargeted",
                 config=lambda qc: _group(qc).update(targets=[r"re:.*\.attn\..*"]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: module 'transformer\.h\.0\."
                                              r"mlp\.c_fc' has packed tensors, but no config "
                                              "group"):
        read_compressed_tensors(path)
    path = edit_checkpoint(src, tmp_path / "sym-zp", tensors=_set(f"{M}.weight_zero_point",
                                                         torch.zeros(64, 2, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{M}.weight_zero_point' .*"
                                              "symmetric"):
        read_compressed_tensors(path)


def test_old_three_bit_packing_is_named(written, tmp_path):
    """compressed-tensors before dense packing put 10 three-bit codes in a word."""
    path = edit_checkpoint(written(3, GS, False)[1], tmp_path / "old3", tensors=_set(
        f"{M}.weight_packed", torch.zeros(512, 13, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=rf"tensor '{M}.weight_packed' has shape \(512, 13\)"
                                              r".*older 10-codes-per-word 3-bit packing"):
        read_compressed_tensors(path)


# --------------------------------------------------------------------------------------------
# whole checkpoints: the CLI, and transformers reading what mechq wrote


def test_cli_ct_out(tiny, written, private_cache, tmp_path, capsys):
    """`mechq quantize VARIANT --ct --out DIR` writes a checkpoint that reads back as the
    variant."""
    from mechq.cli import main

    out = tmp_path / "cli-ct"
    assert main(["quantize", "rtn-w4g64", "--model", "tiny-gpt2", "--ct", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    v, _ = written(4, GS, True)  # the name without -asym is symmetric
    back = mechq.load_variant(out, model=tiny)
    assert back.name == v.name and set(back.modules) == set(v.modules)
    assert all(torch.equal(back.modules[m].dequantize(), p.dequantize())
               for m, p in v.modules.items())


@pytest.mark.slow
def test_transformers_reads_it(smol, private_cache, tmp_path):
    """transformers loads mechq's compressed-tensors checkpoint of SmolLM2 (~30 s).

    transformers multiplies codes by the float16 scales in the model's float32, where mechq and
    compressed-tensors' own decompression multiply in float16: its weights rounded to float16
    are exactly mechq's."""
    from transformers import AutoModelForCausalLM

    # symmetric: transformers 5 refuses asymmetric pack-quantized checkpoints, whose zero points
    # compressed-tensors stores packed (llm-compressor issue #1618); mechq reads them
    v = mechq.quantize(smol, "rtn", bits=4, group_size=64)
    path = write_compressed_tensors(v, tmp_path / "smol-ct", model=smol)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = smol.to_tokens("The capital of France is")
    with torch.no_grad():
        theirs = hf(tokens).logits[0]  # compressed-tensors decompresses on the first forward
    with torch.no_grad(), swap(smol, v):
        ours = smol(tokens)[0]
    params = dict(hf.named_parameters())
    for name in v.modules:
        w = params[f"{name}.weight"].detach()
        assert w.dtype == torch.float32
        assert torch.equal(w.half().float(), v.weight(name).float()), name
    # weights differ by under half a float16 step (<= 2**-11 relative); through 30 layers that
    # moved logits by 0.037 at most when measured: 0.25 is ~7x that, far below a real layout
    # error (a scrambled layout moves logits by whole units)
    assert (ours - theirs).abs().max() < 0.25
