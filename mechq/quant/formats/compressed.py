"""compressed-tensors checkpoints (llm-compressor's output, vLLM's input): written with
compressed-tensors' own compressor, read by mechq's own reader.

The on-disk layout, as compressed-tensors 0.20 writes it (checked against its source:
``compressors/pack_quantized/base.py`` and ``helpers.py``, ``quantization/lifecycle/forward.py``
and ``forward_helpers.py``, ``quantization/quant_args.py``, ``quant_config.py``,
``compressors/format.py``, ``compressors/model_compressors/model_compressor.py``):

**Values.** A weight ``W`` ``(out, in)`` in ``torch.nn.Linear`` orientation (also for GPT-2's
``Conv1D`` modules: vLLM holds them as linear layers, and its GPT-2 loader transposes only
tensors named ``.weight``) is
quantized per output row and group of ``group_size`` consecutive input columns to *signed*
integers ``q = round(clamp(W / s + z, -2**(b-1), 2**(b-1) - 1))`` (``torch.round``: half to
even; ``s`` the group's scale, ``z`` its signed zero point, 0 when symmetric). It dequantizes in
the scale's dtype: ``W = (q - z) * s``, where ``q - z`` is first cast to that dtype (exact for
integers this small), so the product is rounded once.

**Tensors** of a quantized module ``<m>``, all in ``model.safetensors`` (or shards):

- ``<m>.weight_packed`` int32 ``(out, ceil(in * b / 32))``: the codes ``q + 2**(b-1)`` (unsigned
  ``b``-bit fields), packed along the input dimension as one little-endian bit stream per row:
  code ``k`` at stream bits ``[k*b, (k+1)*b)``, 32 codes per ``b`` words with no wasted bits,
  a 3-bit code may straddle two words, padding fields are 0. This is exactly GPTQ's packing
  rule (:mod:`mechq.quant.packing`), so ``weight_packed.T`` *is* GPTQ's ``qweight``.
  (compressed-tensors before its dense packing put ``32 // b`` codes in a word; that differs
  for 3 bits only, and such 3-bit files are refused by their shape.)
- ``<m>.weight_scale`` ``(out, n_groups)`` in the dtype it was computed in (llm-compressor: the
  model's, often bfloat16; the compressor does not cast it). ``n_groups = in / group_size`` for
  strategy ``"group"`` (compressed-tensors 0.20 requires ``group_size`` to divide ``in``; older
  versions allowed one partial group, which mechq reads too), 1 for ``"channel"``.
- ``<m>.weight_zero_point`` (asymmetric only) int32 ``(ceil(out * b / 32), n_groups)``: the
  zero points ``z + 2**(b-1)`` packed the same way but along the *output* dimension (dim 0);
  ``.T`` of it is GPTQ's v2 ``qzeros``. Symmetric modules store none (``z = 0``, i.e. GPTQ's
  zero point ``2**(b-1)``).
- ``<m>.weight_shape`` int64 ``(2,)``: ``(out, in)``.
- ``<m>.weight_g_idx`` (optional, int32 ``(in,)``; written only by compressed-tensors versions
  before 0.20 for ``actorder="group"``): the group of each input column; a ``-1`` anywhere
  means "not set" (column order). 0.20 removed ``actorder="group"``; its ``"weight"`` ordering
  changes calibration only, not the layout.
- ``<m>.bias`` unchanged; every other tensor (embeddings, norms, ``lm_head``) as in an
  unquantized checkpoint.

**Config**: ``config.json``'s ``quantization_config`` holds ``quant_method``
``"compressed-tensors"``, ``format`` (``"pack-quantized"``; ``"mixed-precision"`` when config
groups differ in format, each then naming its own), ``quantization_status`` ``"compressed"``,
``version``, ``ignore`` (module names, ``re:`` regexes allowed, left unquantized),
``kv_cache_scheme``, ``sparsity_config``, ``transform_config`` and ``config_groups``: named
schemes ``{targets, weights, input_activations, output_activations, format}`` whose ``weights``
are ``{num_bits, type "int", symmetric, strategy "group" | "channel", group_size (None for
channel), actorder, dynamic false, ...}``. A module takes the scheme of its most specific
target, as compressed-tensors resolves them: exact name, then ``re:`` regex, then the class name
``"Linear"``, which (compressed-tensors' model-free rule) matches every module.

Which format compressed-tensors picks (``infer_module_format``): integer weight-only schemes of
1 to 8 bits are ``"pack-quantized"``, W4A16 and **W8A16 alike**; ``"int-quantized"`` is for
integer weights *with* quantized input activations (W8A8), ``"naive-quantized"`` the fallback.

mechq's side:

- :func:`write_compressed_tensors` writes a uniform :class:`~mechq.quant.variants.Variant` (every
  module the same bits in :data:`~mechq.vocab.SUPPORTED_BITS`, group size and symmetry; no
  ``dynamic`` rules, low-rank factors, AWQ-rewritten norms or act-order ``g_idx``) with
  compressed-tensors' ``PackedQuantizationCompressor`` and config classes. Scales keep the
  variant's dtype (float16 for mechq's RTN and GPTQ), so the file dequantizes bit-identically
  to the variant. Whether a
  server runs the 2- and 3-bit files depends on its version (vLLM's compressed-tensors WNA16
  scheme accepted only 4 and 8 bits for a long time); compressed-tensors 0.20 reads them all.
- :func:`read_compressed_tensors` reads pack-quantized integer weight-only checkpoints
  (bits 2/3/4/8, group or channel, symmetric or not, with or without ``g_idx``, one or several
  config groups) into a :class:`~mechq.quant.formats.common.Checkpoint` of
  :class:`~mechq.quant.packing.PackedLinear` modules (GPTQ layout, v2 zero points, scales in
  their stored dtype), without importing compressed-tensors. float16 scales dequantize exactly as
  compressed-tensors does; bfloat16 scales exactly in float32 (compressed-tensors' result is that
  rounded to bfloat16); float32 scales identically.

Who else reads what mechq writes (transformers 5 with compressed-tensors 0.20, checked in
``tests/test_compressed.py``): ``AutoModelForCausalLM.from_pretrained`` loads a symmetric
checkpoint of a Llama-family model (SmolLM2) and decompresses it on the first forward, in the
model's dtype: a float32 model holds ``(q - z) * s`` computed in float32, which rounded to
float16 is mechq's weight exactly. It refuses asymmetric pack-quantized checkpoints (the packed
zero points' shape; llm-compressor issue #1618), and it leaves GPT-2's ``Conv1D`` modules
packed (it decompresses ``Linear`` modules only), so a GPT-2 checkpoint is for mechq and vLLM.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mechq.quant.formats.common import (
    HF_CONFIG_FILE,
    INDEX_FILE,
    META_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    check_dtypes,
    check_module_tensors,
    read_json,
    read_tensors,
    tensor_error,
)
from mechq.quant.packing import SCALE_DTYPES, PackedLinear, packed_length, unpack_int
from mechq.vocab import SUPPORTED_BITS

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
MIXED = "mixed-precision"
STRATEGIES = ("group", "channel")
REQUIRED = ("weight_packed", "weight_scale", "weight_shape")
OPTIONAL = ("weight_zero_point", "weight_g_idx", "bias")
_SUPPORTED = (
    f"mechq reads compressed-tensors format '{PACK_QUANTIZED}' with integer weights only "
    f"(type 'int', num_bits {SUPPORTED_BITS}, strategy 'group' or 'channel', no activation, "
    "KV-cache, sparsity or transform quantization)"
)


def _offset(bits: int) -> int:
    """What compressed-tensors adds to a signed code or zero point before packing it."""
    return 1 << (bits - 1)


# --------------------------------------------------------------------------------------------
# writing: mechq Variant -> compressed-tensors' own compressor


def _check_writable(variant, fmt: str) -> tuple[int, int, bool]:
    """(bits, group_size, sym) of a variant this module can write, or a ValueError saying why."""
    if fmt != PACK_QUANTIZED:
        raise ValueError(
            f"fmt={fmt!r}: mechq writes compressed-tensors '{PACK_QUANTIZED}' only (the format "
            "compressed-tensors itself picks for integer weight-only schemes of 1-8 bits, "
            "W8A16 included)")
    why = []
    if variant.dynamic or variant.fp_modules:
        why.append("per-module 'dynamic' rules / modules kept in full precision")
    if variant.lowrank:
        why.append("low-rank corrections (compressed-tensors has no place for B @ A)")
    if variant.norms:
        why.append("norms rewritten by AWQ's folds")
    if not variant.modules:
        why.append("no quantized modules")
    bits = {p.bits for p in variant.modules.values()}
    gs = -1 if variant.group_size in (-1, 0) else int(variant.group_size)
    if len(bits) > 1:
        why.append(f"mixed bits {sorted(bits)}")
    if why:
        raise ValueError(f"Variant {variant.name!r} cannot be written as compressed-tensors: "
                         f"{'; '.join(why)}. mechq writes uniform variants only.")
    b = bits.pop()
    if b not in SUPPORTED_BITS:
        raise ValueError(f"Variant {variant.name!r} has bits={b}; mechq writes {SUPPORTED_BITS}")
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
                    if not torch.all(p.zeros() == _offset(b))), None)
        if off is not None:
            raise ValueError(
                f"Variant {variant.name!r} says sym=True, but module {off[0]!r} has zero points "
                f"other than {_offset(b)}: a symmetric compressed-tensors scheme stores none")
    return b, gs, sym


def _scheme(bits: int, group_size: int, sym: bool, actorder: bool, fmt: str):
    """compressed-tensors' QuantizationScheme for the variant, checked to be ``fmt``."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
        actorder="weight" if actorder else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format=fmt)
    inferred = infer_module_format(torch.nn.Linear, scheme).value
    if inferred != fmt:  # compressed-tensors would store this scheme in another format
        raise ValueError(f"compressed-tensors stores this scheme as {inferred!r}, not {fmt!r}")
    return scheme


def _compress_module(name: str, p: PackedLinear, scheme, compressor) -> dict[str, Tensor]:
    """One module through compressed-tensors' compressor; returns its local tensors.

    The compressor quantizes a float weight with the given scale and zero point. It gets the
    variant's own grid point ``(q - z) * s`` in float32, which is exact for float16 and bfloat16
    scales (``|q - z| <= 255`` times an 11-bit significand fits float32's 24 bits), so its
    ``W / s + z`` is exactly the variant's code (a float32 scale's rounding is far below the half
    step that would change one). The result is checked code for code.
    """
    bits, off = p.bits, _offset(p.bits)
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


def write_compressed_tensors(
    variant,
    out_dir: str | os.PathLike,
    model=None,
    fmt: str = PACK_QUANTIZED,
) -> Path:
    """Write ``variant`` as a compressed-tensors checkpoint with compressed-tensors' compressor.

    ``model``: the ``HookedTransformer`` the variant was made from (mechq.load_model): its
    Hugging Face ``config.json`` and every tensor that is not a quantized weight (embeddings,
    norms, biases, an untied ``lm_head``) are copied from its source directory, so the folder is a
    whole model; or an HF config dict (only the packed tensors are written, plus each module's
    bias when the variant holds one); or ``None`` (packed tensors and a ``config.json`` that
    holds only the ``quantization_config``).

    Files: ``model.safetensors`` (layout in the module docstring), ``config.json`` (its
    ``quantization_config`` built from compressed-tensors' ``QuantizationConfig`` and written by
    its ``ModelCompressor.update_config``: one config group ``group_0`` targeting ``Linear``,
    ``ignore`` ``lm_head`` and any linear module the variant leaves out) and
    ``mechq_variant.json`` (the variant's name and method, for :func:`mechq.load_variant`).
    A variant made with ``desc_act`` but contiguous groups is written with ``actorder="weight"``.
    Raises ValueError for variants it cannot write (see :func:`_check_writable`): mixed bits,
    ``dynamic`` rules, low-rank factors, AWQ norms, act-order ``g_idx``, partial groups, bits
    outside :data:`~mechq.vocab.SUPPORTED_BITS`, a ``fmt`` other than ``"pack-quantized"``.
    Needs the ``compressed-tensors`` package (``pip install mechq[ct]``). Returns ``out_dir``.
    """
    bits, group_size, sym = _check_writable(variant, fmt)
    try:
        from compressed_tensors.compressors import BaseCompressor, ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    except ImportError as e:  # an optional extra
        raise ImportError("writing compressed-tensors checkpoints needs the compressed-tensors "
                          "package: pip install 'mechq[ct]'") from e

    root = Path(out_dir)
    hf_config, tensors, unquantized = _model_files(model, variant)
    scheme = _scheme(bits, group_size, sym, bool(variant.desc_act), fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    for name, p in variant.modules.items():
        for part, t in _compress_module(name, p.to("cpu"), scheme, compressor).items():
            tensors[f"{name}.{part}"] = t
        if p.bias is not None and f"{name}.bias" not in tensors:
            tensors[f"{name}.bias"] = p.bias.detach().cpu()

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
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head", *unquantized],
        quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=qconfig).update_config(str(root))
    (root / META_FILE).write_text(json.dumps(
        {"name": variant.name, "method": variant.method,
         "written_by": "mechq.quant.formats.compressed.write_compressed_tensors"}, indent=2) + "\n")
    return root


# --------------------------------------------------------------------------------------------
# reading: mechq's own reader (safetensors + json; no compressed-tensors import)


def _weight_args(group: str, scheme: Any, default_fmt: str, source: str) -> dict[str, Any]:
    """Validate one config group; return its weight settings in mechq's terms."""
    where = f"{source}: config group {group!r}"
    if not isinstance(scheme, Mapping):
        raise CheckpointError(f"{where} is {type(scheme).__name__} (a preset name's target "
                              f"list?), expected an expanded scheme object; {_SUPPORTED}")
    fmt = str(scheme.get("format") or default_fmt)
    if fmt != PACK_QUANTIZED:
        raise CheckpointError(f"{where} has format {fmt!r}; {_SUPPORTED}")
    for acts in ("input_activations", "output_activations"):
        if scheme.get(acts):
            raise CheckpointError(
                f"{where} quantizes {acts} ({scheme[acts].get('num_bits')}-bit "
                f"{scheme[acts].get('type')}, e.g. W8A8); mechq reads weight-only quantization")
    w = scheme.get("weights")
    if not isinstance(w, Mapping):
        raise CheckpointError(f"{where} has no 'weights' quantization; {_SUPPORTED}")
    if str(w.get("type", "int")).lower() != "int":
        raise CheckpointError(f"{where} has weights of type {w.get('type')!r} (floating-point "
                              f"codes); {_SUPPORTED}")
    try:
        bits = int(w.get("num_bits", 8))
        group_size = None if w.get("group_size") is None else int(w["group_size"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad num_bits / group_size ({e})") from None
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{where} has num_bits={bits}; {_SUPPORTED}")
    strategy = w.get("strategy") or ("channel" if group_size == -1 else
                                     "group" if group_size else "tensor")
    if strategy not in STRATEGIES:
        raise CheckpointError(f"{where} has weight strategy {strategy!r}; {_SUPPORTED}")
    if strategy == "group" and not (group_size and group_size > 0):
        raise CheckpointError(f"{where}: strategy 'group' needs a positive group_size, "
                              f"got {group_size}")
    if w.get("dynamic"):
        raise CheckpointError(f"{where} has dynamic weight quantization; {_SUPPORTED}")
    return dict(format=fmt, bits=bits, group_size=group_size if strategy == "group" else -1,
                sym=bool(w.get("symmetric", True)), strategy=strategy,
                actorder=w.get("actorder"))


def normalize_ct_config(raw: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Validate a compressed-tensors ``quantization_config``; return each config group's weight
    settings (``format``, ``bits``, ``group_size`` (-1: channel), ``sym``, ``strategy``,
    ``actorder``). Raises :class:`CheckpointError` naming ``source`` for anything mechq cannot
    dequantize."""
    method = str(raw.get("quant_method") or "").lower().replace("_", "-")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: quant_method {method or None!r} is not "
                              f"{QUANT_METHOD!r}; {_SUPPORTED}")
    fmt = str(raw.get("format") or "")
    if fmt not in (PACK_QUANTIZED, MIXED):
        raise CheckpointError(f"{source}: unsupported format {fmt or None!r}; {_SUPPORTED}")
    if raw.get("kv_cache_scheme"):
        raise CheckpointError(f"{source}: has a kv_cache_scheme (quantized activations); "
                              "mechq reads weight-only quantization")
    sparsity = raw.get("sparsity_config") or {}
    if isinstance(sparsity, Mapping) and sparsity.get("format") not in (None, "dense"):
        raise CheckpointError(f"{source}: sparsity_config format {sparsity['format']!r} is not "
                              f"supported; {_SUPPORTED}")
    transform = raw.get("transform_config") or {}
    if isinstance(transform, Mapping) and transform.get("config_groups"):
        raise CheckpointError(f"{source}: transform_config rotates the weights (e.g. Hadamard); "
                              f"mechq cannot undo it; {_SUPPORTED}")
    groups = raw.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointError(f"{source}: no config_groups; {_SUPPORTED}")
    default_fmt = fmt if fmt != MIXED else ""
    settings = {str(g): _weight_args(str(g), s, default_fmt, source) for g, s in groups.items()}
    names = [*(raw.get("ignore") or []),
             *(t for s in groups.values() for t in s.get("targets") or [])]
    for t in map(str, names):
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise CheckpointError(f"{source}: target / ignore entry {t!r} is not a regex "
                                      f"({e})") from None
    return settings


def _match(name: str, target: str) -> bool:
    """compressed-tensors' name match: ``re:`` regex (``re.match``) or exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _group_of(name: str, raw: Mapping[str, Any]) -> str | None:
    """The config group that quantizes module ``name``: the group of its most specific target
    (exact name, then regex in sorted order, then ``"Linear"``; a target listed twice belongs
    to the later group), as compressed-tensors' ``apply_quantization_config`` decides."""
    target_to_group: dict[str, str] = {}
    for g, scheme in raw["config_groups"].items():
        for t in scheme.get("targets") or []:
            target_to_group[str(t)] = str(g)
    named = sorted((t for t in target_to_group if t != "Linear" and _match(name, t)),
                   key=lambda t: (t.startswith("re:"), t))
    if not named and "Linear" in target_to_group:
        named = ["Linear"]
    return target_to_group[named[0]] if named else None


def _build(name: str, t: dict[str, Tensor], origin: dict[str, str], cfg: Mapping[str, Any]
           ) -> PackedLinear:
    """One module's tensors -> a PackedLinear (GPTQ layout, v2 zero points), validated."""
    err = tensor_error(name, origin)
    bits, gs = cfg["bits"], cfg["group_size"]
    shape = t["weight_shape"]
    if shape.is_floating_point() or shape.ndim != 1 or shape.numel() != 2 or \
            int(shape.min()) <= 0:
        raise err("weight_shape", f"is {shape.tolist()} ({shape.dtype}), expected the two "
                                  "positive integers (out_features, in_features)")
    n_out, n_in = (int(v) for v in shape)
    n_groups = 1 if gs == -1 else -(-n_in // gs)
    check_dtypes(t, err, [p for p in ("weight_packed", "weight_zero_point") if p in t],
                 (torch.int32,), "torch.int32 (packed codes)")
    check_dtypes(t, err, ("weight_scale",), SCALE_DTYPES,
                 f"one of {', '.join(map(str, SCALE_DTYPES))}")
    expected = {"weight_packed": (n_out, packed_length(n_in, bits)),
                "weight_scale": (n_out, n_groups)}
    if "weight_zero_point" in t:
        expected["weight_zero_point"] = (packed_length(n_out, bits), n_groups)
    if "weight_g_idx" in t:
        expected["weight_g_idx"] = (n_in,)
    if "bias" in t:
        expected["bias"] = (n_out,)
    for part, want in expected.items():
        got = tuple(t[part].shape)
        if got != want:
            hint = ""
            if part == "weight_packed" and bits == 3 and got == (n_out, -(-n_in // 10)):
                hint = ("; this is the older 10-codes-per-word 3-bit packing, which mechq does "
                        "not read")
            raise err(part, f"has shape {got}, expected {want} for weight_shape "
                            f"{(n_out, n_in)}, num_bits={bits}, {cfg['strategy']} strategy"
                            + (f" with group_size={gs}" if gs != -1 else "") + hint)
    if "bias" in t and not t["bias"].is_floating_point():
        raise err("bias", f"has dtype {t['bias'].dtype}, expected a floating-point type")
    g_idx = torch.arange(n_in, dtype=torch.int32) // (n_in if gs == -1 else gs)
    if "weight_g_idx" in t:
        stored = t["weight_g_idx"]
        if stored.is_floating_point():
            raise err("weight_g_idx", f"has dtype {stored.dtype}, expected an integer type")
        if not bool((stored == -1).any()):  # compressed-tensors: any -1 means "not set"
            if int(stored.min()) < 0 or int(stored.max()) >= n_groups:
                raise err("weight_g_idx", f"has values in [{int(stored.min())}, "
                                          f"{int(stored.max())}] but there are {n_groups} groups")
            g_idx = stored.to(torch.int32)
    codes = unpack_int(t["weight_packed"], bits, 1, n_in)           # (out, in), q + 2^(b-1)
    if cfg["sym"]:
        zeros = torch.full((n_groups, n_out), _offset(bits), dtype=torch.int32)
    else:
        zeros = unpack_int(t["weight_zero_point"], bits, 0, n_out).T   # (groups, out)
    return PackedLinear.from_codes(
        codes.T, zeros, t["weight_scale"].T, g_idx, bits, gs, zero_offset=0,
        bias=t.get("bias"), scale_dtype=t["weight_scale"].dtype)


def read_compressed_tensors(path: str | os.PathLike) -> Checkpoint:
    """Read a compressed-tensors checkpoint directory with mechq's own reader.

    Every module with a ``weight_packed`` becomes a :class:`PackedLinear` (codes and zero points
    repacked in the GPTQ layout, ``zero_offset`` 0, scales in their stored dtype, its ``bias``
    attached), with the settings of the config group that targets it. ``quant_config`` holds
    ``quant_method`` ``"compressed-tensors"``, ``format`` (= ``checkpoint_format``), the settings
    of the group covering most modules (``bits``, ``group_size`` (-1 for channel), ``sym``,
    ``strategy``, ``actorder``, ``desc_act``: True when the config sets an ``actorder`` or a
    module has a ``weight_g_idx`` in use), ``version`` and the raw config under ``"raw"``; each
    module keeps its own bits. Raises :class:`CheckpointError` naming the file (and tensor) for
    a format other than pack-quantized integers, bits outside
    :data:`~mechq.vocab.SUPPORTED_BITS`, quantized activations (W8A8, KV cache), sparsity or
    transforms, a module with a missing, unexpected, mistyped or misshapen tensor, one that no
    group targets or that the ignore list names, or no quantized modules.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    hf_path = root / HF_CONFIG_FILE
    if not hf_path.exists():
        raise CheckpointError(f"{root}: no {HF_CONFIG_FILE} (compressed-tensors keeps its "
                              "quantization_config there)")
    hf_config = read_json(hf_path)
    raw = hf_config.get("quantization_config")
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{hf_path}: no 'quantization_config' entry")
    source = f"{hf_path} (quantization_config)"
    groups = normalize_ct_config(raw, source)
    ignore = [str(i) for i in raw.get("ignore") or []]

    tensors, origin = read_tensors(root)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors
                    if "." in k and k.rsplit(".", 1)[1] in REQUIRED})
    modules: dict[str, PackedLinear] = {}
    module_group: dict[str, str] = {}
    claimed: set[str] = set()
    for name in names:
        parts = {p: tensors[f"{name}.{p}"] for p in (*REQUIRED, *OPTIONAL)
                 if f"{name}.{p}" in tensors}
        first = origin[f"{name}.{next(p for p in REQUIRED if p in parts)}"]
        group = _group_of(name, raw)
        if group is None:
            raise CheckpointError(f"{first}: module '{name}' has packed tensors, but no config "
                                  f"group of {source} targets it")
        if any(_match(name, i) for i in ignore):
            raise CheckpointError(f"{first}: module '{name}' has packed tensors, but {source} "
                                  "lists it under 'ignore' (unquantized)")
        cfg = groups[group]
        need = [*REQUIRED, *([] if cfg["sym"] else ["weight_zero_point"])]
        allowed = {*need, "weight_g_idx", "bias"}
        kind = "symmetric" if cfg["sym"] else "asymmetric"
        check_module_tensors(
            name, parts, tensors, origin, need, allowed,
            missing_note=f" (config group {group!r}: {kind} {cfg['bits']}-bit)",
            extra_note=f"config group {group!r} is {kind} weight-only; a module holds "
                       f"{', '.join(sorted(allowed))}")
        modules[name] = _build(name, parts, origin, cfg)
        module_group[name] = group
        claimed.update(f"{name}.{p}" for p in parts)
    if not modules:
        files = sorted({Path(f).name for f in origin.values()})
        raise CheckpointError(f"{root}: no quantized modules found in {files} (no "
                              "'<module>.weight_packed' tensors)")

    base = groups[Counter(module_group.values()).most_common(1)[0][0]]
    g_idx_used = any(not torch.equal(m.g_idx, torch.arange(m.in_features, dtype=torch.int32)
                                     // (m.in_features if m.group_size == -1 else m.group_size))
                     for m in modules.values())
    quant_config = dict(
        quant_method=QUANT_METHOD, format=str(raw["format"]), checkpoint_format=str(raw["format"]),
        bits=base["bits"], group_size=base["group_size"], sym=base["sym"],
        strategy=base["strategy"], actorder=base["actorder"],
        desc_act=bool(base["actorder"]) or g_idx_used, version=raw.get("version"),
        raw=dict(raw))
    return Checkpoint.assemble(root, quant_config, modules, tensors, claimed, hf_config)
