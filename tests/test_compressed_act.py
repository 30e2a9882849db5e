"""compressed-tensors W8A8 checkpoints: int-quantized (int8) and float-quantized (FP8) weights
with their input-activation scheme and KV-cache scheme.

mechq writes variants of the tiny GPT-2 (RTN w8 per channel, or FP8 e4m3 per channel, each with
an :class:`~mechq.quant.activation_quant.ActScheme`) with compressed-tensors' own compressor
classes and reads them back: the weights must be bit-identical, the scheme identical (static
scales rounded to the float32 they are stored in) and the logits under :func:`swap` identical.
compressed-tensors' ``QuantizationConfig`` must parse the written config and its compressors
decompress the files to mechq's weights exactly. A checkpoint built by compressed-tensors alone
(a small random Llama, llm-compressor's usual bfloat16 scales) must be read by mechq, with the
scale-sharing rule (the largest input scale of q/k/v, and of gate/up). Unsupported or malformed
schemes are refused with the field named.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mechq
from mechq.quant.activation_quant import ActScheme, Quantizer, SchemeError, scheme
from mechq.quant.formats.common import CheckpointError
from mechq.quant.formats.compressed import act_scheme, config_sites, read_compressed_tensors
from mechq.quant.formats.compressed_write import write_compressed_tensors
from mechq.quant.fp8 import Fp8Linear, quantize_fp8_weights
from mechq.quant.packing import PackedLinear
from mechq.quant.variants import calibrated, swap, with_activations
from tests.conftest import edit_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend

INT8_STATIC = Quantizer("int", 8, "tensor", dynamic=False)
#: case -> (weights "int8" / "fp8" / "w4", activation scheme, the format it is written as)
CASES = {
    "int8-static-kv8": ("int8", ActScheme("W8A8-static", INT8_STATIC, INT8_STATIC),
                        "int-quantized"),
    "int8-token-asym": ("int8", ActScheme("W8A8-dyn", Quantizer("int", 8, "token", sym=False)),
                        "int-quantized"),
    "fp8-static-kv8": ("fp8", scheme("A8-fp8-tensor", "KV8-fp8-tensor"), "float-quantized"),
    "fp8-token": ("fp8", scheme("A8-fp8-token"), "float-quantized"),
    # W4A16 with an FP8 KV cache: pack-quantized weights plus a kv_cache_scheme
    "w4-kv8": ("w4", scheme("KV8-fp8-tensor"), "pack-quantized"),
}
TEXTS = ["The capital of France is Paris.", "Water boils at one hundred degrees."]
M = "transformer.h.1.mlp.c_fc"  # the module the bad-checkpoint tests break: (512, 128)
ATTN = "transformer.h.1.attn"    # its layer's attention module (k_scale / v_scale)


@pytest.fixture(scope="module")
def weights(tiny, private_cache):
    """The weight variants of the tiny model: RTN w8 per channel, FP8 per channel, RTN w4."""
    return {"int8": mechq.quantize(tiny, "rtn", bits=8, group_size=-1),
            "fp8": quantize_fp8_weights(tiny),
            "w4": mechq.quantize(tiny, "rtn", bits=4, group_size=64)}


@pytest.fixture(scope="module")
def written(tiny, weights, tmp_path_factory):
    """Factory: case -> (calibrated variant with its scheme, its compressed-tensors dir)."""
    root = tmp_path_factory.mktemp("ct-act")
    sequences = [tiny.to_tokens(t)[0].tolist() for t in TEXTS]
    made = {}

    def make(case):
        if case not in made:
            w, act, _ = CASES[case]
            v = calibrated(tiny, with_activations(weights[w], act), sequences)
            made[case] = v, write_compressed_tensors(v, root / case, model=tiny)
        return made[case]

    return make


def float32(x: float) -> float:
    """``x`` rounded to float32, as a stored scale holds it."""
    return float(torch.tensor(x, dtype=torch.float32))


def same_module(a, b) -> bool:
    """The same stored weights: codes, zero points and scales (FP8 codes by bit pattern)."""
    if isinstance(a, Fp8Linear) or isinstance(b, Fp8Linear):
        return (isinstance(a, Fp8Linear) and isinstance(b, Fp8Linear)
                and torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8))
                and a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales))
    return (a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
            and torch.equal(a.codes(), b.codes()) and torch.equal(a.zeros(), b.zeros()))


# --------------------------------------------------------------------------------------------
# round trips, and compressed-tensors reading what mechq wrote


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tiny, written, case):
    v, path = written(case)
    _, _, fmt = CASES[case]
    back = mechq.load_variant(path, model=tiny)
    assert back.name == v.name and back.act.name == v.act.name
    assert back.meta["quantize_config"]["format"] == fmt
    assert set(back.modules) == set(v.modules)
    for name, p in v.modules.items():
        assert same_module(back.modules[name], p), name
        assert torch.equal(back.weight(name), v.weight(name)), name
    act = back.act
    assert (act.inputs, act.kv, act.subset) == (v.act.inputs, v.act.kv, None)
    # static scales are stored as float32; the fake quantizer computes in float32 anyway
    assert act.scales == {k: float32(s) for k, s in v.act.scales.items()}
    tokens = tiny.to_tokens("The capital of France is")
    with swap(tiny, v):
        ours = tiny(tokens)
    with swap(tiny, back):
        theirs = tiny(tokens)
    assert torch.equal(ours, theirs)  # same weights, same hooks with the same scales


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_reads_what_mechq_wrote(written, case):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    v, path = written(case)
    _, _, fmt = CASES[case]
    qc = QuantizationConfig.model_validate(
        json.loads((path / "config.json").read_text())["quantization_config"])
    assert qc.format == fmt and qc.quantization_status == "compressed"
    group = qc.config_groups["group_0"]
    assert group.weights.num_bits == v.bits and group.weights.symmetric
    inputs, kv = v.act.inputs, v.act.kv
    if inputs is None:
        assert group.input_activations is None
    else:
        a = group.input_activations
        assert (a.num_bits, a.type, a.strategy, a.dynamic, a.symmetric) == (
            8, "int" if inputs.fmt == "int" else "float", inputs.granularity, inputs.dynamic,
            inputs.sym)
    if kv is None:
        assert qc.kv_cache_scheme is None
    else:
        k = qc.kv_cache_scheme
        assert (k.num_bits, k.type, k.strategy, k.dynamic) == (
            8, "int" if kv.fmt == "int" else "float", "tensor", False)
    if fmt == "pack-quantized":
        return  # its weights: tests/test_compressed.py
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    stored = load_file(path / "model.safetensors")
    for name, p in v.modules.items():
        state = {k: stored[f"{name}.{k}"] for k in compressor.compression_param_names(group)}
        ref = compressor.decompress(state, group)["weight"]
        # Exact: compressed-tensors casts the int8 / FP8 code to the scale's dtype (exact) and
        # rounds the product once there; mechq rounds the exact product once to that dtype.
        assert ref.dtype == p.scales.dtype and torch.equal(p.weight(ref.dtype), ref), name
        if not inputs.dynamic:  # every module holds its site's scale
            site = "attn_in" if ".attn.c_attn" in name else (
                "o_in" if ".attn." in name else "mlp_in" if ".c_fc" in name else "down_in")
            layer = int(name.split(".")[2])
            assert stored[f"{name}.input_scale"].item() == float32(
                v.act.scales[(site, layer)])


def test_fp8_weights(tiny, weights):
    """FP8 per channel: scale = max|w_row| / 448, codes e4m3; the storage Variant counts."""
    v = weights["fp8"]
    from mechq.quant import layout

    w = layout.module_weight(tiny, M)
    p = v.modules[M]
    assert p.scales.dtype == torch.float32 and p.qweight.dtype == torch.float8_e4m3fn
    assert torch.equal(p.scales, w.abs().amax(dim=1) / 448)
    assert torch.equal(p.qweight.float().abs().amax(dim=1), torch.full((512,), 448.0))
    # e4m3 keeps 3 mantissa bits: round to nearest is within 2**-4 of each value, relative
    # (the subnormal codes, below 2**-6, within half their 2**-9 step: 2**-10 scales); the
    # 2**-20 covers the float32 roundings of W / s and of c · s around a tie
    err = (p.weight() - w).abs()
    assert bool((err <= w.abs() * (2 ** -4 + 2 ** -20) + p.scales[:, None] * 2 ** -10).all())
    # storage: 8 bits per weight plus one float32 scale per output row, no zero points
    rows = sum(m.out_features for m in v.modules.values())
    assert v.avg_bits == (8 * v.n_weights + 32 * rows) / v.n_weights
    assert v.nbytes == sum(m.qweight.numel() for m in v.modules.values()) + 4 * rows


# --------------------------------------------------------------------------------------------
# a checkpoint compressed-tensors wrote: a small random Llama


LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
             rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
PROJ = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64),
        "mlp.down_proj": (64, 96)}


def ct_llama(root: Path, weight_type: str, weight_strategy: str, inputs: dict, kv: dict | None
             ) -> Path:
    """A compressed-tensors checkpoint of a random 2-layer Llama made with compressed-tensors'
    own code: ``calculate_qparams`` for the weight scales (bfloat16, llm-compressor's model
    dtype), its compressor for the codes, its config classes for ``config.json``; static input
    scales differ per module (q, k, v and gate, up disagree)."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    fmt = "int-quantized" if weight_type == "int" else "float-quantized"
    wargs = QuantizationArgs(num_bits=8, type=weight_type, symmetric=True,
                             strategy=weight_strategy)
    group = QuantizationScheme(targets=["Linear"], weights=wargs,
                               input_activations=QuantizationArgs(**inputs), format=fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 64, generator=gen).bfloat16(),
               "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}
    for i, (layer, proj) in enumerate((l, p) for l in range(2) for p in PROJ):
        name = f"model.layers.{layer}.{proj}"
        w = (torch.randn(*PROJ[proj], generator=gen) * 0.05).bfloat16()
        if weight_strategy == "channel":   # the observer's ranges: per row, or whole tensor
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            lo, hi = w.min().reshape(1), w.max().reshape(1)
        scale, _ = calculate_qparams(lo, hi, wargs)
        for k, t in compressor.compress({"weight": w, "weight_scale": scale}, group).items():
            tensors[f"{name}.{k}"] = t
        if not inputs["dynamic"]:
            tensors[f"{name}.input_scale"] = torch.tensor([0.01 * (i + 1)], dtype=torch.bfloat16)
    if kv is not None:
        for layer in range(2):
            for j, part in enumerate(("k_scale", "v_scale")):
                tensors[f"model.layers.{layer}.self_attn.{part}"] = torch.tensor(
                    [0.1 + 0.05 * (2 * layer + j)], dtype=torch.bfloat16)
    root.mkdir()
    save_file(tensors, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(LLAMA))
    qc = QuantizationConfig(config_groups={"group_0": group}, format=fmt, ignore=["lm_head"],
                            kv_cache_scheme=None if kv is None else QuantizationArgs(**kv),
                            quantization_status="compressed")
    ModelCompressor(quantization_config=qc).update_config(str(root))
    return root


CT_CASES = {
    # W8A8 int8: per-tensor weight scales, static per-tensor inputs, int8 KV cache
    "int8-tensor-static": ("int", "tensor", dict(num_bits=8, type="int", strategy="tensor",
                                                 dynamic=False),
                           dict(num_bits=8, type="int", strategy="tensor", dynamic=False)),
    # FP8: per-channel weight scales, dynamic per-token inputs, FP8 KV cache
    "fp8-channel-token": ("float", "channel", dict(num_bits=8, type="float", strategy="token",
                                                   dynamic=True),
                          dict(num_bits=8, type="float", strategy="tensor", dynamic=False)),
}


@pytest.mark.parametrize("case", list(CT_CASES))
def test_reads_what_compressed_tensors_wrote(tmp_path, case):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    weight_type, strategy, inputs, kv = CT_CASES[case]
    path = ct_llama(tmp_path / case, weight_type, strategy, inputs, kv)
    v = mechq.load_variant(path)  # no model: the layers come from config.json
    stored = load_file(path / "model.safetensors")
    qc = QuantizationConfig.model_validate(
        json.loads((path / "config.json").read_text())["quantization_config"])
    group = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    assert set(v.modules) == {f"model.layers.{l}.{p}" for l in range(2) for p in PROJ}
    for name, p in v.modules.items():
        assert isinstance(p, PackedLinear if weight_type == "int" else Fp8Linear)
        ref = compressor.decompress({k: stored[f"{name}.{k}"] for k in ("weight", "weight_scale")},
                                    group)["weight"]
        # Exact: the bfloat16 scales are kept; see test_compressed_tensors_reads_what_mechq_wrote
        assert ref.dtype == torch.bfloat16 and torch.equal(p.weight(torch.bfloat16), ref), name
    fmt = "int" if weight_type == "int" else "fp8"
    act = v.act
    assert act.inputs == Quantizer(fmt, 8, inputs["strategy"], dynamic=inputs["dynamic"])
    assert act.kv == Quantizer(fmt, 8, "tensor", dynamic=False)
    assert v.name == f"ct{'-fp8' if fmt == 'fp8' else ''}-w8+{act.name}"

    def s(layer, proj):
        return stored[f"model.layers.{layer}.{proj}"].item()

    expected = {}
    for l in range(2):
        expected[("k_cache", l)] = s(l, "self_attn.k_scale")
        expected[("v_cache", l)] = s(l, "self_attn.v_scale")
        if not inputs["dynamic"]:
            # the sharing rule: a fused kernel quantizes q/k/v's (gate/up's) input once, with
            # the largest of their scales; o and down keep their own
            expected[("attn_in", l)] = max(s(l, f"self_attn.{p}_proj.input_scale") for p in "qkv")
            expected[("mlp_in", l)] = max(s(l, f"mlp.{p}_proj.input_scale") for p in ("gate", "up"))
            expected[("o_in", l)] = s(l, "self_attn.o_proj.input_scale")
            expected[("down_in", l)] = s(l, "mlp.down_proj.input_scale")
    assert act.scales == expected
    if not inputs["dynamic"]:  # the rule picked v_proj's scale here, not q's or k's
        assert act.scales[("attn_in", 0)] == s(0, "self_attn.v_proj.input_scale") > s(
            0, "self_attn.q_proj.input_scale")


# --------------------------------------------------------------------------------------------
# named errors: what the reader refuses




def _inputs(**kw):
    return lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(kw)


def _weights(**kw):
    return lambda qc: qc["config_groups"]["group_0"]["weights"].update(kw)


def _kv(**kw):
    return lambda qc: qc["kv_cache_scheme"].update(kw)


CFG = r"config\.json \(quantization_config\)"
IN = CFG + ": config group 'group_0': input_activations"
#: case -> (edit of the int8 static checkpoint's config, error, message)
BAD_SCHEMES = {
    "int4-inputs": (_inputs(num_bits=4), SchemeError, IN + r"\.num_bits is 4; mechq reads 8-bit"),
    "asym-static": (_inputs(symmetric=False), SchemeError,
                    IN + r"\.symmetric is false; mechq reads asymmetric activations only as "
                         "dynamic per-token int8"),
    "dynamic-tensor": (_inputs(dynamic=True), SchemeError,
                       IN + r"\.dynamic is true with strategy 'tensor'"),
    "static-token": (_inputs(strategy="token"), SchemeError,
                     IN + r"\.dynamic is false with strategy 'token'"),
    "group-inputs": (_inputs(strategy="group", group_size=32), SchemeError,
                     IN + r"\.strategy is 'group'"),
    "local-dynamic": (_inputs(dynamic="local"), SchemeError, IN + r"\.dynamic is 'local'"),
    "kv-per-head": (_kv(strategy="attn_head"), SchemeError,
                    CFG + r": kv_cache_scheme\.strategy is 'attn_head'; mechq reads static "
                          "per-tensor KV-cache scales"),
    "kv-int4": (_kv(num_bits=4), SchemeError, CFG + r": kv_cache_scheme\.num_bits is 4"),
    "kv-asym": (_kv(symmetric=False), SchemeError, CFG + r": kv_cache_scheme\.symmetric is false"),
    "format-unknown": (lambda qc: qc.update(format="nvfp4-pack-quantized"), CheckpointError,
                       CFG + ": unsupported format 'nvfp4-pack-quantized'"),
    "weights-int4": (_weights(num_bits=4), CheckpointError,
                     CFG + ": config group 'group_0' has weights.num_bits=4; mechq reads "
                           "'int-quantized' with 8-bit weights"),
    "weights-asym": (_weights(symmetric=False), CheckpointError,
                     CFG + ": config group 'group_0' has weights.symmetric false"),
    "weights-group": (_weights(strategy="group", group_size=32), CheckpointError,
                      CFG + ": config group 'group_0' has weights.strategy 'group'"),
    "weights-float": (_weights(type="float"), CheckpointError,
                      CFG + ": config group 'group_0' is 'int-quantized' but has weights of "
                            "type 'float'"),
    "output-activations": (lambda qc: qc["config_groups"]["group_0"].update(
        output_activations=dict(num_bits=8, type="int")), CheckpointError,
        CFG + ": config group 'group_0' quantizes output_activations"),
    "groups-disagree": (lambda qc: qc["config_groups"].update(
        layer0=dict(qc["config_groups"]["group_0"], targets=[r"re:transformer\.h\.0\."],
                    input_activations=dict(num_bits=8, type="int", strategy="token",
                                           dynamic=True))), SchemeError,
        CFG + ": config groups 'group_0' and 'layer0' declare different input_activations "
              r"\(int8-tensor \(static\) vs int8-token\)"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEMES))
def test_bad_scheme(written, tmp_path, case):
    edit, error, message = BAD_SCHEMES[case]
    path = edit_checkpoint(written("int8-static-kv8")[1], tmp_path / case, config=edit)
    with pytest.raises(error, match=re.escape(str(path)) + ".*" + message):
        read_compressed_tensors(path)


T = r"model\.safetensors: "
#: case -> (edit of the int8 static checkpoint's tensors, message of the CheckpointError)
BAD_TENSORS = {
    "no-input-scale": (lambda t: t.pop(f"{M}.input_scale"),
                       T + f"quantized module '{M}' has .* but no '{M}.input_scale' "
                           r"\(config group 'group_0': int-quantized per channel, static "
                           r"int8-tensor inputs\)"),
    "zero-input-scale": (lambda t: t.update({f"{M}.input_scale": torch.zeros(1)}),
                         T + rf"tensor '{M}.input_scale' is 0.0; a scale must be positive"),
    "no-v-scale": (lambda t: t.pop(f"{ATTN}.v_scale"),
                   T + f"attention module '{ATTN}' has '{ATTN}.k_scale' but no "
                       f"'{ATTN}.v_scale'"),
    "no-kv-scales": (lambda t: [t.pop(k) for k in list(t) if k.endswith(("k_scale", "v_scale"))],
                     CFG + r": has a kv_cache_scheme \(static per tensor\) but "
                           r"\['model.safetensors'\] hold no '<attention>.k_scale'"),
    "q-scale": (lambda t: t.update({f"{ATTN}.q_scale": torch.ones(1)}),
                T + f"tensor '{ATTN}.q_scale' quantizes the attention's queries"),
    "weight-fp8-under-int": (lambda t: t.update({f"{M}.weight": t[f"{M}.weight"].float().to(
        torch.float8_e4m3fn)}), T + rf"tensor '{M}.weight' has dtype torch.float8_e4m3fn, "
                                    r"expected torch.int8 \('int-quantized' codes\)"),
    "no-weight-scale": (lambda t: t.pop(f"{M}.weight_scale"),
                        T + f"quantized module '{M}' has .* but no '{M}.weight_scale'"),
    "scale-shape": (lambda t: t.update({f"{M}.weight_scale": t[f"{M}.weight_scale"][:, 0]}),
                    T + rf"tensor '{M}.weight_scale' has shape \(512,\), expected \(512, 1\)"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors(written, tmp_path, case):
    edit, message = BAD_TENSORS[case]
    path = edit_checkpoint(written("int8-static-kv8")[1], tmp_path / case, tensors=edit)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + message):
        read_compressed_tensors(path)


def test_scheme_errors_that_need_the_model(tiny, written, tmp_path):
    """What only the model's layers reveal: a module the input scheme would quantize but the
    checkpoint leaves in full precision; static scales without any layer layout."""
    src = written("int8-static-kv8")[1]

    def unquantize(t):
        t[f"{M}.weight"] = torch.zeros(512, 128)
        del t[f"{M}.weight_scale"], t[f"{M}.input_scale"]

    path = edit_checkpoint(src, tmp_path / "ignored", tensors=unquantize,
                 config=lambda qc: qc["ignore"].append(M))
    with pytest.raises(SchemeError, match=f"module '{re.escape(M)}' is not quantized, but the "
                                          "checkpoint's int8-tensor input activations"):
        mechq.load_variant(path, model=tiny)
    ck = read_compressed_tensors(src)
    with pytest.raises(CheckpointError, match="has static scales, and mapping them onto layers "
                                              "needs the model"):
        act_scheme(ck, None)
    assert config_sites({"architectures": None}) is None


# --------------------------------------------------------------------------------------------
# named errors: what the writer refuses


def test_writer_refuses(tiny, weights, written, tmp_path):
    int8, fp8, w4 = weights["int8"], weights["fp8"], weights["w4"]
    v_static, _ = written("int8-static-kv8")
    out = tmp_path / "x"
    cases = [
        (fp8, SchemeError, "has no input-activation scheme, but 'float-quantized' is W8A8"),
        (with_activations(w4, scheme("A8-int-token")), ValueError,
         r"\(4 bits, group_size 64, sym=True\) cannot be written as 'int-quantized'"),
        (with_activations(fp8, scheme("A8-int-token")), SchemeError,
         "quantizes inputs as int8-token; 'float-quantized' is written with 8-bit fp8 input"),
        (with_activations(int8, scheme("A8-int-token", "KV8-int-head")), SchemeError,
         r"quantizes the KV cache as int8-head \(dynamic\); compressed-tensors' "
         "kv_cache_scheme holds static per-tensor"),
        (with_activations(int8, scheme("A8-int-tensor")), SchemeError,
         "is static and has no scale for attn_in in layer 0: calibrate it first"),
        (dataclasses.replace(v_static, act=v_static.act.only("attn_in")), SchemeError,
         "is restricted to sites attn_in"),
        (with_activations(int8, scheme("A4-int-token")), SchemeError,
         "quantizes inputs as int4-token; 'int-quantized' is written with 8-bit int"),
    ]
    for variant, error, message in cases:
        with pytest.raises(error, match=message):
            write_compressed_tensors(variant, out, model=tiny)
    with pytest.raises(SchemeError, match="'pack-quantized' is weight-only"):
        write_compressed_tensors(v_static, out, model=tiny, fmt="pack-quantized")
    with pytest.raises(SchemeError, match="writing them needs the model"):
        write_compressed_tensors(v_static, out)
    with pytest.raises(ValueError, match=r"FP8 weights \(module .*they are 'float-quantized'\)"):
        write_compressed_tensors(with_activations(fp8, scheme("A8-fp8-token")), out,
                                 fmt="int-quantized")
    assert not out.exists()  # refused before anything was written
