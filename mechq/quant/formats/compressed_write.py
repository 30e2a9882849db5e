"""Writing compressed-tensors checkpoints: a mechq :class:`~mechq.quant.variants.Variant` ->
compressed-tensors' own compressors and config classes (``mechq[ct]``).

The layout written, what is refused and why, and how the reader takes it back are in
:mod:`mechq.quant.formats.compressed`: pack-quantized for uniform integer weights,
int-quantized for 8-bit integer weights with an ``int`` input scheme, float-quantized for FP8
weights with an ``fp8`` one, each with the scheme's static scales.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mechq.quant.activation_quant import Quantizer, SchemeError
from mechq.quant.formats.common import (
    HF_CONFIG_FILE,
    INDEX_FILE,
    META_FILE,
    WEIGHTS_FILE,
    read_json,
    read_tensors,
)
from mechq.quant.formats.compressed import (
    ACT_FORMATS,
    FLOAT_QUANTIZED,
    FORMATS,
    INT_QUANTIZED,
    PACK_QUANTIZED,
    W8_FORMATS,
    WEIGHT_TYPES,
    attention_modules,
    input_site,
    model_sites,
    code_offset,
)
from mechq.quant.fp8 import FP8_DTYPE, Fp8Linear
from mechq.quant.packing import PackedLinear, unpack_int
from mechq.vocab import SUPPORTED_BITS


def _target_format(variant) -> str:
    """The format compressed-tensors stores ``variant`` in (its ``infer_module_format``): FP8
    weights are float-quantized, integer weights with quantized inputs int-quantized, integer
    weights alone (or with a KV-cache scheme only) pack-quantized."""
    if any(isinstance(p, Fp8Linear) for p in variant.modules.values()):
        return FLOAT_QUANTIZED
    if variant.act is not None and variant.act.inputs is not None:
        return INT_QUANTIZED
    return PACK_QUANTIZED


def _check_writable(variant, fmt: str) -> tuple[int, int, bool]:
    """(bits, group_size, sym) of a variant this module can write as ``fmt``, or a ValueError
    saying why (a :class:`SchemeError` for its activation scheme)."""
    if fmt not in FORMATS:
        raise ValueError(
            f"fmt={fmt!r}: mechq writes compressed-tensors {', '.join(map(repr, FORMATS))} only "
            "(the formats compressed-tensors itself picks for integer weight-only schemes of "
            "1-8 bits, W8A16 included, for int8 W8A8 and for FP8 W8A8)")
    why = []
    if variant.dynamic or variant.fp_modules:
        why.append("per-module 'dynamic' rules / modules kept in full precision")
    if variant.lowrank:
        why.append("low-rank corrections (compressed-tensors has no place for B @ A)")
    if variant.norms:
        why.append("norms rewritten by AWQ's folds")
    if not variant.modules:
        why.append("no quantized modules")
    fp8 = sorted(n for n, p in variant.modules.items() if isinstance(p, Fp8Linear))
    if fmt == FLOAT_QUANTIZED and len(fp8) < len(variant.modules):
        why.append("integer weights ('float-quantized' holds FP8 weights only)")
    if fmt != FLOAT_QUANTIZED and fp8:
        why.append(f"FP8 weights (module {fp8[0]!r}; they are 'float-quantized')")
    bits = {p.bits for p in variant.modules.values()}
    if len(bits) > 1:
        why.append(f"mixed bits {sorted(bits)}")
    if why:
        raise ValueError(f"Variant {variant.name!r} cannot be written as compressed-tensors "
                         f"{fmt!r}: {'; '.join(why)}. mechq writes uniform variants only.")
    if fmt == FLOAT_QUANTIZED:
        _check_act(variant, fmt)
        return 8, -1, True
    b = bits.pop()
    gs = -1 if variant.group_size in (-1, 0) else int(variant.group_size)
    if b not in SUPPORTED_BITS:
        raise ValueError(f"Variant {variant.name!r} has bits={b}; mechq writes {SUPPORTED_BITS}")
    if fmt == INT_QUANTIZED and (b != 8 or gs != -1 or not variant.sym):
        raise ValueError(
            f"Variant {variant.name!r} ({b} bits, group_size {gs}, sym={variant.sym}) cannot be "
            f"written as '{INT_QUANTIZED}': mechq writes W8A8 there, 8-bit per-channel "
            "symmetric weights (mechq.quantize(model, 'rtn', bits=8, group_size=-1))")
    for name, p in variant.modules.items():
        whole = p.n_groups == 1 if gs == -1 else (
            p.group_size == gs and p.in_features == gs * p.n_groups)
        if not whole:
            raise ValueError(
                f"Variant {variant.name!r}: module {name!r} has {p.in_features} input columns in "
                f"{p.n_groups} groups of {p.group_size}, not whole groups of the variant's "
                f"group_size {gs}; compressed-tensors' group quantization needs a group size "
                "that divides every input width")
        trivial = torch.arange(p.in_features, dtype=torch.int32) // (p.in_features if gs == -1
                                                                       else gs)
        if not torch.equal(p.g_idx.cpu(), trivial):
            raise ValueError(
                f"Variant {variant.name!r}: module {name!r} has an act-order g_idx (groups are "
                "not runs of consecutive columns); compressed-tensors 0.20 removed "
                "actorder='group', so it cannot be written")
    sym = bool(variant.sym)
    if sym:
        off = next(((n, p) for n, p in variant.modules.items()
                    if not torch.all(p.zeros() == code_offset(b))), None)
        if off is not None:
            raise ValueError(
                f"Variant {variant.name!r} says sym=True, but module {off[0]!r} has zero points "
                f"other than {code_offset(b)}: a symmetric compressed-tensors scheme stores none")
    _check_act(variant, fmt)
    return b, gs, sym


def _check_act(variant, fmt: str) -> None:
    """Raise :class:`SchemeError` unless ``variant.act`` is what ``fmt`` stores: input
    activations for the W8A8 formats only (``int`` with int-quantized, ``fp8`` with
    float-quantized; 8 bits, dynamic per token or static per tensor) and a KV-cache scheme
    that is static, per tensor, 8-bit and symmetric."""
    act = variant.act
    w8 = fmt in W8_FORMATS
    if act is None or act.inputs is None:
        if w8:
            raise SchemeError(
                f"Variant {variant.name!r} has no input-activation scheme, but '{fmt}' is W8A8: "
                "give it one (mechq.quant.variants.with_activations), or write integer weights "
                f"alone as '{PACK_QUANTIZED}'")
    if act is None:
        return
    if act.subset is not None:
        raise SchemeError(f"Activation scheme {act.name!r} is restricted to sites "
                          f"{', '.join(act.subset)}; a checkpoint's scheme covers every site")
    q = act.inputs
    if q is not None:
        if not w8:
            raise SchemeError(
                f"Variant {variant.name!r} quantizes input activations ({q.label}), but "
                f"'{PACK_QUANTIZED}' is weight-only; mechq writes W8A8 as '{INT_QUANTIZED}' "
                "(8-bit per-channel integer weights) or FP8 as 'float-quantized'")
        want = ACT_FORMATS[WEIGHT_TYPES[fmt]]
        if q.fmt != want or q.bits != 8:
            raise SchemeError(
                f"Activation scheme {act.name!r} quantizes inputs as {q.label}; '{fmt}' is "
                f"written with 8-bit {want} input activations (int8 W8A8 or FP8 W8A8)")
    k = act.kv
    if k is not None and (k.bits != 8 or k.granularity != "tensor" or k.dynamic or not k.sym):
        raise SchemeError(
            f"Activation scheme {act.name!r} quantizes the KV cache as {k.label}"
            f"{' (dynamic)' if k.dynamic else ''}; compressed-tensors' kv_cache_scheme holds "
            "static per-tensor 8-bit symmetric scales (k_scale / v_scale, what vLLM loads)")


def _static_scales(variant, model) -> tuple[dict[str, float], dict[str, float]]:
    """The static scales to store: ``{module: input_scale}`` (a site's scale on every module it
    feeds) and ``{"<attention>.k_scale": s, ...}``, placed by ``model``'s sites. Raises
    :class:`SchemeError` when the model is needed and missing, or a scale is."""
    act = variant.act
    inputs_static = act is not None and act.inputs is not None and not act.inputs.dynamic
    if not inputs_static and (act is None or act.kv is None):
        return {}, {}
    sites = model_sites(model)
    if sites is None:
        raise SchemeError(
            f"Variant {variant.name!r}'s activation scheme {act.name!r} has static scales; "
            "writing them needs the model (or its config.json dict with 'architectures'), to "
            "know which module each (site, layer) scale belongs to")

    def scale(site: str, layer: int) -> float:
        try:
            return float(act.scales[(site, layer)])
        except KeyError:
            raise SchemeError(
                f"Activation scheme {act.name!r} is static and has no scale for {site} in "
                f"layer {layer}: calibrate it first (mechq.quant.variants.calibrated)") from None

    inputs: dict[str, float] = {}
    if inputs_static:
        for s in sites:
            inputs[s.module] = scale(input_site(s.component), s.layer)
    kv: dict[str, float] = {}
    if act.kv is not None:
        for layer, attn in sorted(attention_modules(sites).items()):
            kv[f"{attn}.k_scale"] = scale("k_cache", layer)
            kv[f"{attn}.v_scale"] = scale("v_cache", layer)
    return inputs, kv


def _act_args(q: Quantizer, field: str):
    """compressed-tensors' QuantizationArgs of one of mechq's 8-bit quantizers."""
    from compressed_tensors.quantization import QuantizationArgs

    strategy = {"token": "token", "tensor": "tensor"}.get(q.granularity)
    if strategy is None:  # _check_act refuses these first; kept as a guard
        raise SchemeError(f"{field}: granularity {q.granularity!r} has no compressed-tensors "
                          "strategy here")
    return QuantizationArgs(num_bits=q.bits, type="int" if q.fmt == "int" else "float",
                            symmetric=q.sym, strategy=strategy, dynamic=q.dynamic)


def _scheme(bits: int, group_size: int, sym: bool, actorder: bool, fmt: str,
            inputs: Quantizer | None = None):
    """compressed-tensors' QuantizationScheme for the variant, checked to be ``fmt``."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits, type=WEIGHT_TYPES[fmt], symmetric=sym,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
        actorder="weight" if actorder else None)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=weights, format=fmt,
        input_activations=None if inputs is None else _act_args(inputs, "input_activations"))
    inferred = infer_module_format(torch.nn.Linear, scheme).value
    if inferred != fmt:  # compressed-tensors would store this scheme in another format
        raise ValueError(f"compressed-tensors stores this scheme as {inferred!r}, not {fmt!r}")
    return scheme


def _compress_module(name: str, p: PackedLinear, scheme, compressor) -> dict[str, Tensor]:
    """One pack-quantized module through compressed-tensors' compressor; returns its local
    tensors.

    The compressor quantizes a float weight with the given scale and zero point. It gets the
    variant's own grid point ``(q - z) * s`` in float32, which is exact for float16 and bfloat16
    scales (``|q - z| <= 255`` times an 11-bit significand fits float32's 24 bits), so its
    ``W / s + z`` is exactly the variant's code (a float32 scale's rounding is far below the half
    step that would change one). The result is checked code for code.
    """
    bits, off = p.bits, code_offset(p.bits)
    codes = p.codes().T.to(torch.int64) - off              # (out, in), signed
    zeros = p.zeros().T.to(torch.int64) - off              # (out, groups), signed
    scales = p.scales.T.contiguous()                       # (out, groups), stored dtype
    g = p.g_idx.long()
    weight = (codes - zeros[:, g]).to(torch.float32) * scales.to(torch.float32)[:, g]
    state = {"weight": weight, "weight_scale": scales}
    if not scheme.weights.symmetric:
        state["weight_zero_point"] = zeros.to(torch.int8)
    out = compressor.compress(state, scheme)
    got = unpack_int(out["weight_packed"], bits, 1, p.in_features)
    same = torch.equal(got.to(torch.int64), codes + off)
    if same and "weight_zero_point" in out:
        same = torch.equal(unpack_int(out["weight_zero_point"], bits, 0, p.out_features)
                           .to(torch.int64), zeros + off)
    if not same:
        raise RuntimeError(f"compressed-tensors' compressor did not reproduce the codes of "
                           f"{name!r}; refusing to write a checkpoint that differs from the "
                           "variant")
    return {k: v.contiguous() for k, v in out.items()}


def _compress_w8(name: str, p: PackedLinear | Fp8Linear, scheme, compressor
                 ) -> dict[str, Tensor]:
    """One int- or float-quantized module through compressed-tensors' compressor: ``weight``
    (int8 or float8_e4m3fn codes) and ``weight_scale`` ``(out, 1)`` in the scales' dtype.

    The compressor gets the variant's grid point ``code * s`` in float32: exact for float16 and
    bfloat16 scales (an 8-bit integer or a 4-bit FP8 significand times at most 11 bits), so
    ``W / s`` is the code again; with float32 scales the product rounds by at most 2**-24
    relative, far below the half step (of an integer, or of FP8's 3-bit mantissa) that would
    change a code. The result is checked code for code (FP8 by bit pattern)."""
    if isinstance(p, Fp8Linear):
        codes, scales = p.qweight, p.scales[:, None].contiguous()
        weight = codes.to(torch.float32) * scales.to(torch.float32)
    else:
        codes = p.codes().T.to(torch.int64) - code_offset(8)     # (out, in), signed
        scales = p.scales.T.contiguous()                     # (out, 1), stored dtype
        weight = codes.to(torch.float32) * scales.to(torch.float32)
    out = compressor.compress({"weight": weight, "weight_scale": scales}, scheme)
    got = out["weight"]
    if isinstance(p, Fp8Linear):
        same = got.dtype == FP8_DTYPE and torch.equal(got.view(torch.uint8),
                                                      codes.view(torch.uint8))
    else:
        same = got.dtype == torch.int8 and torch.equal(got.to(torch.int64), codes)
    if not same:
        raise RuntimeError(f"compressed-tensors' compressor did not reproduce the codes of "
                           f"{name!r}; refusing to write a checkpoint that differs from the "
                           "variant")
    return {k: v.contiguous() for k, v in out.items()}


def _model_files(model, variant) -> tuple[dict[str, Any] | None, dict[str, Tensor], list[str]]:
    """(HF config, tensors to write besides the packed ones, unquantized linear modules)."""
    if model is None:
        return None, {}, []
    if isinstance(model, Mapping):
        return dict(model), {}, []
    from mechq.models import load as models
    from mechq.quant import layout

    shapes = {m: tuple(layout.module_weight(model, m).shape) for m in layout.modules(model.cfg)}
    wrong = [f"{n}: variant {(p.out_features, p.in_features)}, model {shapes.get(n)}"
             for n, p in variant.modules.items()
             if shapes.get(n) != (p.out_features, p.in_features)]
    if wrong:
        raise ValueError(f"Variant {variant.name!r} does not fit this model: {wrong[:3]}")
    src = models.source_of(model).hf_dir
    hf_config = read_json(src / HF_CONFIG_FILE)
    hf_config.pop("quantization_config", None)
    tensors, _ = read_tensors(src)
    missing = [m for m in variant.modules if f"{m}.weight" not in tensors]
    if missing:
        raise ValueError(f"{src}: has no '{missing[0]}.weight'; its tensor names differ from "
                         "the variant's module names")
    other = {k: v for k, v in tensors.items()
             if not (k.endswith(".weight") and k[: -len(".weight")] in variant.modules)}
    return hf_config, other, [m for m in shapes if m not in variant.modules]


def _scale_tensor(value: float) -> Tensor:
    """A static activation scale as stored: float32 ``(1,)``."""
    return torch.tensor([value], dtype=torch.float32)


def write_compressed_tensors(
    variant,
    out_dir: str | os.PathLike,
    model=None,
    fmt: str | None = None,
) -> Path:
    """Write ``variant`` as a compressed-tensors checkpoint with compressed-tensors' compressor.

    ``fmt``: ``None`` (default) takes the format compressed-tensors would pick
    (``pack-quantized`` for integer weights alone or with a KV-cache scheme only,
    ``int-quantized`` for integer weights with input activations, ``float-quantized`` for
    :class:`~mechq.quant.fp8.Fp8Linear` weights), or one of :data:`FORMATS`, checked.
    ``model``: the ``HookedTransformer`` the variant was made from (mechq.load_model): its
    Hugging Face ``config.json`` and every tensor that is not a quantized weight (embeddings,
    norms, biases, an untied ``lm_head``) are copied from its source directory, so the folder is a
    whole model; or an HF config dict (only the packed tensors are written, plus each module's
    bias when the variant holds one); or ``None`` (packed tensors and a ``config.json`` that
    holds only the ``quantization_config``). Static activation or KV-cache scales need the model
    or a config dict naming its architecture (which module feeds which site).

    Files: ``model.safetensors`` (layout in the module docstring), ``config.json`` (its
    ``quantization_config`` built from compressed-tensors' ``QuantizationConfig`` and written by
    its ``ModelCompressor.update_config``: one config group ``group_0`` targeting ``Linear``
    with the variant's ``input_activations``, ``kv_cache_scheme`` when ``variant.act``
    quantizes the cache, ``ignore`` ``lm_head`` and any linear module the variant leaves out)
    and ``mechq_variant.json`` (the variant's name, method and activation scheme's name, for
    :func:`mechq.load_variant`).
    A variant made with ``desc_act`` but contiguous groups is written with ``actorder="weight"``.
    Raises ValueError for variants it cannot write (see :func:`_check_writable`): mixed bits,
    ``dynamic`` rules, low-rank factors, AWQ norms, act-order ``g_idx``, partial groups, bits
    outside :data:`~mechq.vocab.SUPPORTED_BITS`, an unknown ``fmt``, weights of another format;
    :class:`SchemeError` (a ValueError) for an activation scheme the format does not hold or a
    static scale missing. Needs the ``compressed-tensors`` package (``pip install mechq[ct]``).
    Returns ``out_dir``.
    """
    fmt = fmt or _target_format(variant)
    bits, group_size, sym = _check_writable(variant, fmt)
    try:
        from compressed_tensors.compressors import BaseCompressor, ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    except ImportError as e:  # an optional extra
        raise ImportError("writing compressed-tensors checkpoints needs the compressed-tensors "
                          "package: pip install 'mechq[ct]'") from e

    root = Path(out_dir)
    input_scales, kv_scales = _static_scales(variant, model)
    hf_config, tensors, unquantized = _model_files(model, variant)
    act = variant.act
    scheme = _scheme(bits, group_size, sym, bool(variant.desc_act), fmt,
                     inputs=act.inputs if act is not None else None)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    compress = _compress_module if fmt == PACK_QUANTIZED else _compress_w8
    for name, p in variant.modules.items():
        for part, t in compress(name, p.to("cpu"), scheme, compressor).items():
            tensors[f"{name}.{part}"] = t
        if p.bias is not None and f"{name}.bias" not in tensors:
            tensors[f"{name}.bias"] = p.bias.detach().cpu()
        if name in input_scales:
            tensors[f"{name}.input_scale"] = _scale_tensor(input_scales[name])
    tensors.update({k: _scale_tensor(v) for k, v in kv_scales.items()})

    root.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in root.glob("*.safetensors") if p.name != WEIGHTS_FILE)
    if stale or (root / INDEX_FILE).exists():
        raise ValueError(f"{root}: already holds other weight files {stale or [INDEX_FILE]}; "
                         "write into an empty directory")
    tmp = root / f"{WEIGHTS_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, root / WEIGHTS_FILE)
    (root / HF_CONFIG_FILE).write_text(json.dumps(hf_config or {}, indent=2) + "\n")
    kv_args = None if act is None or act.kv is None else _act_args(act.kv, "kv_cache_scheme")
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head", *unquantized],
        kv_cache_scheme=kv_args, quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=qconfig).update_config(str(root))
    (root / META_FILE).write_text(json.dumps(
        {"name": variant.name, "method": variant.method,
         "act": None if act is None else act.name,
         "written_by": "mechq.quant.formats.compressed_write.write_compressed_tensors"}, indent=2) + "\n")
    return root
