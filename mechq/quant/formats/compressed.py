"""compressed-tensors checkpoints (llm-compressor's output, vLLM's input): the format, and
mechq's own reader; the writer, which uses compressed-tensors' own compressor, is
:mod:`mechq.quant.formats.compressed_write`.

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
integer weights *with* quantized input activations (W8A8), ``"float-quantized"`` for FP8 weights
with quantized input activations, ``"naive-quantized"`` the fallback.

**W8A8: int-quantized and float-quantized.** (``compressors/naive_quantized/base.py``,
``quantization/lifecycle/initialize.py``, ``quantization/utils/helpers.py``.) A module ``<m>``
stores ``<m>.weight`` ``(out, in)``, the codes themselves, unpacked: ``int8`` ``q = round(clamp(W /
s, -128, 127))`` (int-quantized) or ``float8_e4m3fn`` ``c = fp8(clamp(W / s, -448, 448))``
(float-quantized); ``<m>.weight_scale`` ``(out, 1)`` (strategy ``"channel"``) or ``(1,)``
(``"tensor"``), in the dtype it was computed in; no zero point (symmetric). It dequantizes as
above: ``q`` (or ``c``) cast to the scale's dtype, exactly, times ``s``, rounded once. The config
group's ``input_activations`` (``{num_bits, type "int" | "float", symmetric, strategy "token" |
"tensor", dynamic}``) says how the module's *input* is quantized at run time: ``dynamic`` per
token (one scale per token, computed on the fly; nothing stored) or static per tensor, whose
scale ``<m>.input_scale`` ``(1,)`` is stored with the module. Each linear module holds its own
``input_scale``, also where several read the same tensor (q/k/v, gate/up).

**KV cache.** ``kv_cache_scheme`` (top level; the same fields) quantizes the keys and values the
attention caches, after the rotary embedding: static per-tensor scales ``<attn>.k_scale`` and
``<attn>.v_scale`` ``(1,)`` on each attention module (the parent of ``k_proj`` / ``c_attn``).
compressed-tensors itself attaches them to modules named ``self_attn`` / ``attention`` only; vLLM
loads them by that name.

mechq's side:

- :func:`~mechq.quant.formats.compressed_write.write_compressed_tensors` writes a uniform :class:`~mechq.quant.variants.Variant` (every
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
- It reads int-quantized (8-bit symmetric integer weights, per channel or per tensor) into
  8-bit per-channel ``PackedLinear`` modules (codes ``q + 128``, zero point 128, one group; a
  per-tensor scale repeated per row) and float-quantized (FP8 e4m3, per channel or tensor) into
  :class:`~mechq.quant.fp8.Fp8Linear` modules, both dequantizing exactly as compressed-tensors
  does. Their input activations (8-bit ``int`` or ``float``; dynamic per token, symmetric or not,
  or static per tensor, symmetric) and a ``kv_cache_scheme`` (static, per tensor, 8-bit,
  symmetric; also next to pack-quantized weights) become one
  :class:`~mechq.quant.activation_quant.ActScheme` (:func:`act_scheme`, which
  :func:`mechq.load_variant` puts on the variant as ``Variant.act``). Static scales map onto
  mechq's sites per layer: ``attn_in`` / ``mlp_in`` feed several modules (q, k, v / gate, up),
  each with its own ``input_scale``, and take the **largest** of them, the one scale a fused
  kernel that quantizes the shared input once must use (it clips none of the modules' ranges);
  ``o_in`` and ``down_in`` take their module's, ``k_cache`` / ``v_cache`` the attention's
  ``k_scale`` / ``v_scale``. What mechq cannot apply is refused with
  :class:`~mechq.quant.activation_quant.SchemeError` naming the config field (activations other
  than 8 bits, asymmetric static scales, per-group / per-head / dynamic per-tensor strategies,
  config groups that declare different input activations, a module the scheme would quantize
  that the checkpoint leaves unquantized); a missing ``input_scale``, ``k_scale`` or
  ``v_scale`` is a :class:`~mechq.quant.formats.common.CheckpointError` naming the tensor.
- :func:`write_compressed_tensors` also writes a variant of 8-bit per-channel symmetric integer
  weights with an ``int`` input scheme (``Variant.act``) as int-quantized, and one of
  ``Fp8Linear`` weights (:func:`~mechq.quant.fp8.quantize_fp8_weights`) with an ``fp8`` input
  scheme as float-quantized, with compressed-tensors' ``IntQuantizationCompressor`` /
  ``FloatQuantizationCompressor`` (codes checked against the variant's, scales kept in their
  dtype), plus the scheme's static scales (float32 ``(1,)``; mechq's fake quantizer computes in
  float32 anyway, so a scale read back acts identically) and, when the scheme quantizes the
  cache statically per tensor, ``kv_cache_scheme`` with ``k_scale`` / ``v_scale``. A static
  site's scale is written to every module it feeds, so reading it back gives the same scale.

Who else reads what mechq writes (transformers 5 with compressed-tensors 0.20, checked in
``tests/test_compressed.py``): ``AutoModelForCausalLM.from_pretrained`` loads a symmetric
checkpoint of a Llama-family model (SmolLM2) and decompresses it on the first forward, in the
model's dtype: a float32 model holds ``(q - z) * s`` computed in float32, which rounded to
float16 is mechq's weight exactly. It refuses asymmetric pack-quantized checkpoints (the packed
zero points' shape; llm-compressor issue #1618), and it leaves GPT-2's ``Conv1D`` modules
packed (it decompresses ``Linear`` modules only), so a GPT-2 checkpoint is for mechq and vLLM.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechq.models.families.base import Site
from mechq.quant.activation_quant import (
    INPUT_SITES,
    SITE_COMPONENTS,
    ActScheme,
    Quantizer,
    SchemeError,
)
from mechq.quant.formats.common import (
    HF_CONFIG_FILE,
    Checkpoint,
    CheckpointError,
    architecture_of,
    check_dtypes,
    check_module_tensors,
    read_json,
    read_tensors,
    tensor_error,
)
from mechq.quant.fp8 import FP8_DTYPE, Fp8Linear
from mechq.quant.packing import SCALE_DTYPES, PackedLinear, packed_length, unpack_int
from mechq.vocab import SUPPORTED_BITS

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
MIXED = "mixed-precision"
#: the formats mechq reads and writes
FORMATS: tuple[str, ...] = (PACK_QUANTIZED, INT_QUANTIZED, FLOAT_QUANTIZED)
#: the W8A8 formats: unpacked 8-bit codes in ``<m>.weight``
W8_FORMATS: tuple[str, ...] = (INT_QUANTIZED, FLOAT_QUANTIZED)
STRATEGIES = ("group", "channel")      # of pack-quantized weights
W8_STRATEGIES = ("channel", "tensor")  # of int- / float-quantized weights
#: the tensors of a quantized module, by format: required, and what else it may hold
REQUIRED = {PACK_QUANTIZED: ("weight_packed", "weight_scale", "weight_shape"),
            INT_QUANTIZED: ("weight", "weight_scale"), FLOAT_QUANTIZED: ("weight", "weight_scale")}
OPTIONAL = {PACK_QUANTIZED: ("weight_zero_point", "weight_g_idx", "bias"),
            INT_QUANTIZED: ("input_scale", "bias"), FLOAT_QUANTIZED: ("input_scale", "bias")}
#: a tensor ``<m>.<marker>`` makes ``<m>`` a quantized module (unquantized ones hold ``weight``)
MARKERS = ("weight_packed", "weight_scale", "weight_shape")
#: the static KV-cache scales on an attention module, and the query scale mechq does not read
KV_SCALES = ("k_scale", "v_scale")
Q_SCALE = "q_scale"
#: the code dtype of each W8A8 format
CODE_DTYPES = {INT_QUANTIZED: torch.int8, FLOAT_QUANTIZED: FP8_DTYPE}
#: compressed-tensors' ``type`` of each format's weights
WEIGHT_TYPES = {PACK_QUANTIZED: "int", INT_QUANTIZED: "int", FLOAT_QUANTIZED: "float"}
#: mechq's Quantizer.fmt for each compressed-tensors activation ``type``
ACT_FORMATS = {"int": "int", "float": "fp8"}
_SUPPORTED = (
    f"mechq reads compressed-tensors formats '{PACK_QUANTIZED}' (integer weights only: type "
    f"'int', num_bits {SUPPORTED_BITS}, strategy 'group' or 'channel'), '{INT_QUANTIZED}' (8-bit "
    f"symmetric integer weights) and '{FLOAT_QUANTIZED}' (FP8 e4m3 weights), per channel or per "
    "tensor, with 8-bit input activations (dynamic per token or static per tensor) and an "
    "optional static per-tensor 8-bit kv_cache_scheme; no sparsity or transforms"
)


def code_offset(bits: int) -> int:
    """What compressed-tensors adds to a signed code or zero point before packing it."""
    return 1 << (bits - 1)


# --------------------------------------------------------------------------------------------
# mechq's sites of a model: which module's input scale feeds which (site, layer)


def config_sites(hf_config: Mapping[str, Any] | None) -> list[Site] | None:
    """The quantizable sites (:func:`mechq.quant.layout.sites`) of the model a Hugging Face
    ``config.json`` describes, built offline from the config alone (``None`` when it names no
    architecture). Raises :class:`CheckpointError` when the config cannot be built."""
    arch = architecture_of(dict(hf_config) if hf_config else None)
    if arch is None:
        return None
    from transformers import AutoConfig

    from mechq.models.families import for_architecture
    from mechq.quant import layout

    fields = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    try:
        family = for_architecture(arch)
        hooked = family.hooked_config(AutoConfig.for_model(**fields), device="cpu",
                                      dtype=torch.float32)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build the layer layout of a {arch} from its config.json "
                              f"({e}); pass the model") from e
    return layout.sites(hooked)


def model_sites(model) -> list[Site] | None:
    """Sites of a ``HookedTransformer``, of an HF config dict, or ``None`` without either."""
    if model is None:
        return None
    if isinstance(model, Mapping):
        return config_sites(model)
    from mechq.quant import layout

    return layout.sites(model.cfg)


def input_site(component: str) -> str:
    """The input site (``attn_in`` ...) that feeds a component (``q`` ...)."""
    return next(s for s in INPUT_SITES if component in SITE_COMPONENTS[s])


def attention_modules(sites: Sequence[Site]) -> dict[int, str]:
    """Per layer, the attention module holding ``k_scale`` / ``v_scale``: the parent of the
    module the layer's keys come from (``k_proj``, GPT-2's fused ``c_attn``)."""
    return {s.layer: s.module.rsplit(".", 1)[0] for s in sites if s.component == "k"}


def scheme_name(inputs: Quantizer | None, kv: Quantizer | None) -> str:
    """A scheme's name in the style of :data:`~mechq.quant.activation_quant.SCHEMES`:
    ``A8-int-token``, ``A8-fp8-tensor+KV8-fp8-tensor``."""
    parts = [f"{prefix}{q.bits}-{q.fmt}-{q.granularity}" + ("" if q.sym else "-asym")
             for prefix, q in (("A", inputs), ("KV", kv)) if q is not None]
    return "+".join(parts)


# --------------------------------------------------------------------------------------------
# reading: mechq's own reader (safetensors + json; no compressed-tensors import)


def _act_quantizer(args: Any, field: str, where: str, *, kv: bool) -> Quantizer:
    """mechq's :class:`Quantizer` for compressed-tensors' activation args ``field``
    (``input_activations`` or ``kv_cache_scheme``); :class:`SchemeError` naming the field for
    what mechq cannot apply: other than 8 bits, an unknown type, a strategy other than dynamic
    ``token`` or static ``tensor`` (the KV cache: static ``tensor`` only), asymmetric static
    scales or asymmetric FP8 / KV cache."""
    if not isinstance(args, Mapping):
        raise SchemeError(f"{where}: {field} is {type(args).__name__}, expected an object of "
                          "quantization args")
    typ = str(args.get("type", "int")).lower()
    if typ not in ACT_FORMATS:
        raise SchemeError(f"{where}: {field}.type is {typ!r}; mechq reads 'int' or 'float' "
                          "(FP8 e4m3) activations")
    bits = args.get("num_bits", 8)
    if bits != 8:
        raise SchemeError(f"{where}: {field}.num_bits is {bits}; mechq reads 8-bit activations "
                          "(int8 W8A8 or FP8), the ones vLLM runs from these formats")
    dynamic = args.get("dynamic", False)
    if dynamic not in (True, False):
        raise SchemeError(f"{where}: {field}.dynamic is {dynamic!r}; mechq reads true (scales "
                          "computed at run time) or false (stored scales)")
    strategy = args.get("strategy") or ("tensor" if args.get("group_size") is None else "group")
    allowed = {"tensor": False} if kv else {"token": True, "tensor": False}
    if strategy not in allowed:
        raise SchemeError(
            f"{where}: {field}.strategy is {strategy!r}; mechq reads "
            + ("static per-tensor KV-cache scales ('tensor', dynamic false)" if kv else
               "'token' (dynamic) or 'tensor' (static) input activations"))
    if bool(dynamic) != allowed[strategy]:
        raise SchemeError(
            f"{where}: {field}.dynamic is {str(dynamic).lower()} with strategy {strategy!r}; "
            + ("a per-token scale is computed at run time (dynamic true)" if strategy == "token"
               else "mechq's per-tensor activation scales are static (dynamic false): a dynamic "
                    "per-tensor scale would mix the prompts of a batch"))
    sym = bool(args.get("symmetric", True))
    if not sym and (kv or typ == "float" or not dynamic):
        raise SchemeError(
            f"{where}: {field}.symmetric is false; mechq reads asymmetric activations only as "
            "dynamic per-token int8 (static scales have no zero point here, FP8 and the KV "
            "cache are symmetric)")
    return Quantizer(ACT_FORMATS[typ], 8, strategy, dynamic=bool(dynamic), sym=sym)


def _w8_args(where: str, w: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """The weight settings of an int- or float-quantized group (8 bits, symmetric, per channel
    or per tensor); :class:`CheckpointError` naming the field otherwise."""
    want = WEIGHT_TYPES[fmt]
    typ = str(w.get("type", "int")).lower()
    if typ != want:
        raise CheckpointError(f"{where} is '{fmt}' but has weights of type {typ!r}; '{fmt}' "
                              f"holds type {want!r} weights")
    if w.get("num_bits", 8) != 8:
        raise CheckpointError(f"{where} has weights.num_bits={w.get('num_bits')}; mechq reads "
                              f"'{fmt}' with 8-bit weights (W8A8)")
    gs = w.get("group_size")
    strategy = w.get("strategy") or ("channel" if gs == -1 else "group" if gs else "tensor")
    if strategy not in W8_STRATEGIES:
        raise CheckpointError(f"{where} has weights.strategy {strategy!r}; mechq reads '{fmt}' "
                              "weights per channel or per tensor")
    if not w.get("symmetric", True):
        raise CheckpointError(f"{where} has weights.symmetric false; mechq reads '{fmt}' "
                              "weights symmetric (no weight_zero_point)")
    if w.get("dynamic"):
        raise CheckpointError(f"{where} has dynamic weight quantization; {_SUPPORTED}")
    return dict(format=fmt, bits=8, group_size=-1, sym=True, strategy=strategy, actorder=None)


def _weight_args(group: str, scheme: Any, default_fmt: str, source: str) -> dict[str, Any]:
    """Validate one config group; return its weight settings in mechq's terms, and its input
    activations as ``inputs`` (a :class:`Quantizer` or ``None``)."""
    where = f"{source}: config group {group!r}"
    if not isinstance(scheme, Mapping):
        raise CheckpointError(f"{where} is {type(scheme).__name__} (a preset name's target "
                              f"list?), expected an expanded scheme object; {_SUPPORTED}")
    fmt = str(scheme.get("format") or default_fmt)
    if fmt not in FORMATS:
        raise CheckpointError(f"{where} has format {fmt!r}; {_SUPPORTED}")
    if default_fmt and fmt != default_fmt:
        raise CheckpointError(f"{where} has format {fmt!r}, but the config's format is "
                              f"{default_fmt!r} (several formats make it '{MIXED}')")
    refused = ("input_activations", "output_activations") if fmt == PACK_QUANTIZED else (
        "output_activations",)
    for acts in refused:
        a = scheme.get(acts)
        if a:
            bits, typ = (a.get("num_bits"), a.get("type")) if isinstance(a, Mapping) else ("?",
                                                                                         "?")
            raise CheckpointError(
                f"{where} quantizes {acts} ({bits}-bit {typ}); mechq reads '{PACK_QUANTIZED}' "
                f"as weight-only quantization (W8A8 is '{INT_QUANTIZED}' or "
                f"'{FLOAT_QUANTIZED}'), and quantized outputs in no format")
    w = scheme.get("weights")
    if not isinstance(w, Mapping):
        raise CheckpointError(f"{where} has no 'weights' quantization; {_SUPPORTED}")
    inputs = scheme.get("input_activations")
    inputs = None if not inputs else _act_quantizer(inputs, "input_activations", where,
                                                    kv=False)
    if fmt in W8_FORMATS:
        return dict(_w8_args(where, w, fmt), inputs=inputs)
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
                actorder=w.get("actorder"), inputs=None)


def normalize_ct_config(raw: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Validate a compressed-tensors ``quantization_config``; return each config group's weight
    settings (``format``, ``bits``, ``group_size`` (-1: channel or tensor), ``sym``,
    ``strategy``, ``actorder``, ``inputs``: its input activations as a :class:`Quantizer` or
    ``None``). Raises :class:`CheckpointError` naming ``source`` for anything mechq cannot
    dequantize, :class:`SchemeError` for activations or a ``kv_cache_scheme`` it cannot apply
    (:func:`declared_quantizers` also checks that the groups agree)."""
    method = str(raw.get("quant_method") or "").lower().replace("_", "-")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: quant_method {method or None!r} is not "
                              f"{QUANT_METHOD!r}; {_SUPPORTED}")
    fmt = str(raw.get("format") or "")
    if fmt not in (*FORMATS, MIXED):
        raise CheckpointError(f"{source}: unsupported format {fmt or None!r}; {_SUPPORTED}")
    if raw.get("kv_cache_scheme"):
        _act_quantizer(raw["kv_cache_scheme"], "kv_cache_scheme", source, kv=True)
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


def declared_quantizers(raw: Mapping[str, Any], source: str
                        ) -> tuple[Quantizer | None, Quantizer | None]:
    """``(inputs, kv)``: the input-activation and KV-cache quantizers a compressed-tensors
    ``quantization_config`` declares (``None``: not quantized). mechq applies one input scheme
    to every linear module, so config groups that declare different ``input_activations``
    (one of them none) raise :class:`SchemeError` naming them."""
    return _declared(normalize_ct_config(raw, source), raw, source)


def _declared(settings: Mapping[str, Mapping[str, Any]], raw: Mapping[str, Any], source: str
              ) -> tuple[Quantizer | None, Quantizer | None]:
    """:func:`declared_quantizers` from the config groups' settings already validated."""
    declared = {g: s["inputs"] for g, s in settings.items()}
    first = next(iter(declared))
    other = next((g for g, q in declared.items() if q != declared[first]), None)
    if other is not None:
        def show(q):
            return "none" if q is None else q.label + ("" if q.dynamic else " (static)")

        raise SchemeError(
            f"{source}: config groups {first!r} and {other!r} declare different "
            f"input_activations ({show(declared[first])} vs {show(declared[other])}); mechq "
            "applies one activation scheme to every linear module")
    kv = raw.get("kv_cache_scheme")
    return declared[first], (None if not kv else
                             _act_quantizer(kv, "kv_cache_scheme", source, kv=True))


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
    """One pack-quantized module's tensors -> a PackedLinear (GPTQ layout, v2 zero points),
    validated."""
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
        zeros = torch.full((n_groups, n_out), code_offset(bits), dtype=torch.int32)
    else:
        zeros = unpack_int(t["weight_zero_point"], bits, 0, n_out).T   # (groups, out)
    return PackedLinear.from_codes(
        codes.T, zeros, t["weight_scale"].T, g_idx, bits, gs, zero_offset=0,
        bias=t.get("bias"), scale_dtype=t["weight_scale"].dtype)


def _scalar_scale(t: Tensor, err, part: str) -> float:
    """A stored static scale (one positive finite float) as a Python float."""
    if not t.is_floating_point() or t.numel() != 1:
        raise err(part, f"is {tuple(t.shape)} {t.dtype}, expected one floating-point scale")
    value = float(t.reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise err(part, f"is {value}; a scale must be positive and finite")
    return value


def _build_w8(name: str, t: dict[str, Tensor], origin: dict[str, str], cfg: Mapping[str, Any]
              ) -> PackedLinear | Fp8Linear:
    """One int- or float-quantized module's tensors -> an 8-bit per-channel PackedLinear (codes
    ``q + 128``, zero point 128) or an :class:`Fp8Linear`, validated; a per-tensor scale is
    repeated per row."""
    err = tensor_error(name, origin)
    fmt = cfg["format"]
    code_dtype = CODE_DTYPES[fmt]
    check_dtypes(t, err, ("weight",), (code_dtype,), f"{code_dtype} ('{fmt}' codes)")
    check_dtypes(t, err, ("weight_scale",), SCALE_DTYPES,
                 f"one of {', '.join(map(str, SCALE_DTYPES))}")
    w, s = t["weight"], t["weight_scale"]
    if w.ndim != 2:
        raise err("weight", f"has shape {tuple(w.shape)}, expected (out_features, in_features)")
    n_out, n_in = w.shape
    per_tensor = cfg["strategy"] == "tensor"
    if (s.numel() != 1) if per_tensor else (tuple(s.shape) != (n_out, 1)):
        want = "one scale" if per_tensor else str((n_out, 1))
        raise err("weight_scale", f"has shape {tuple(s.shape)}, expected {want} for weight "
                                  f"{(n_out, n_in)}, {cfg['strategy']} strategy")
    if "bias" in t and (tuple(t["bias"].shape) != (n_out,) or not t["bias"].is_floating_point()):
        raise err("bias", f"is {tuple(t['bias'].shape)} {t['bias'].dtype}, expected a "
                          f"floating-point ({n_out},)")
    rows = s.reshape(-1).expand(n_out).contiguous()                  # (out,), stored dtype
    if fmt == FLOAT_QUANTIZED:
        return Fp8Linear(w.contiguous(), rows, t.get("bias"))
    codes = w.to(torch.int32).T + code_offset(8)                         # (in, out), q + 128
    zeros = torch.full((1, n_out), code_offset(8), dtype=torch.int32)
    return PackedLinear.from_codes(
        codes, zeros, rows[None, :], torch.zeros(n_in, dtype=torch.int32), 8, -1,
        zero_offset=0, bias=t.get("bias"), scale_dtype=s.dtype)


def _kv_scales(tensors: Mapping[str, Tensor], origin: Mapping[str, str], raw: Mapping[str, Any],
               source: str) -> dict[str, float]:
    """The checkpoint's ``<attn>.k_scale`` / ``<attn>.v_scale``, validated: both of each
    attention module, a ``kv_cache_scheme`` declaring them, and no ``q_scale``."""
    found = [k for k in tensors if k.rsplit(".", 1)[-1] in KV_SCALES]
    q = next((k for k in tensors if k.rsplit(".", 1)[-1] == Q_SCALE), None)
    if q is not None:
        raise CheckpointError(f"{origin[q]}: tensor '{q}' quantizes the attention's queries; "
                              "mechq reads KV-cache quantization only")
    if not raw.get("kv_cache_scheme"):
        if found:
            raise CheckpointError(f"{origin[found[0]]}: tensor '{found[0]}' is a KV-cache scale, "
                                  f"but {source} has no kv_cache_scheme")
        return {}
    if not found:
        files = sorted({Path(f).name for f in origin.values()})
        raise CheckpointError(f"{source}: has a kv_cache_scheme (static per tensor) but "
                              f"{files} hold no '<attention>.k_scale' / '.v_scale' tensors")
    out = {}
    for k in sorted(found):
        module, part = k.rsplit(".", 1)
        twin = f"{module}.{'v_scale' if part == 'k_scale' else 'k_scale'}"
        if twin not in tensors:
            raise CheckpointError(f"{origin[k]}: attention module '{module}' has '{k}' but no "
                                  f"'{twin}'")
        out[k] = _scalar_scale(tensors[k], tensor_error(module, origin), part)
    return out


def read_compressed_tensors(path: str | os.PathLike) -> Checkpoint:
    """Read a compressed-tensors checkpoint directory with mechq's own reader.

    Every pack-quantized module (one with a ``weight_packed``) becomes a :class:`PackedLinear`
    (codes and zero points repacked in the GPTQ layout, ``zero_offset`` 0, scales in their
    stored dtype, its ``bias`` attached), every int-quantized one an 8-bit per-channel
    ``PackedLinear`` and every float-quantized one an :class:`~mechq.quant.fp8.Fp8Linear`, with
    the settings of the config group that targets it. ``quant_config`` holds ``quant_method``
    ``"compressed-tensors"``, ``format`` (= ``checkpoint_format``), the settings of the group
    covering most modules (``bits``, ``group_size`` (-1 for channel or tensor), ``sym``,
    ``strategy``, ``actorder``, ``desc_act``: True when the config sets an ``actorder`` or a
    module has a ``weight_g_idx`` in use), ``version`` and the raw config under ``"raw"``; each
    module keeps its own bits. The static activation scales (``<m>.input_scale``,
    ``<attn>.k_scale``, ``<attn>.v_scale``) go to ``Checkpoint.act_scales`` by tensor name;
    :func:`act_scheme` turns them and the config into mechq's activation scheme.
    Raises :class:`CheckpointError` naming the file (and tensor) for a format mechq does not
    read, bits outside :data:`~mechq.vocab.SUPPORTED_BITS`, sparsity or transforms, a module
    with a missing, unexpected, mistyped or misshapen tensor (``input_scale`` for static input
    activations included), one that no group targets or that the ignore list names, KV-cache
    scales without a ``kv_cache_scheme`` or the reverse, or no quantized modules; and
    :class:`SchemeError` for activations mechq cannot apply (:func:`declared_quantizers`).
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
    inputs, _ = _declared(groups, raw, source)
    ignore = [str(i) for i in raw.get("ignore") or []]

    tensors, origin = read_tensors(root)
    codes = tuple(CODE_DTYPES.values())  # an unpacked int8 / FP8 weight marks a module too
    names = sorted({k.rsplit(".", 1)[0] for k, v in tensors.items()
                    if "." in k and (k.rsplit(".", 1)[1] in MARKERS
                                     or (k.endswith(".weight") and v.dtype in codes))})
    every_part = dict.fromkeys(p for f in FORMATS for p in (*REQUIRED[f], *OPTIONAL[f]))
    modules: dict[str, PackedLinear | Fp8Linear] = {}
    module_group: dict[str, str] = {}
    act_scales: dict[str, float] = {}
    claimed: set[str] = set()
    for name in names:
        parts = {p: tensors[f"{name}.{p}"] for p in every_part if f"{name}.{p}" in tensors}
        first = origin[f"{name}.{next(p for p in (*MARKERS, 'weight') if p in parts)}"]
        held = "packed" if "weight_packed" in parts else "quantized"
        group = _group_of(name, raw)
        if group is None:
            raise CheckpointError(f"{first}: module '{name}' has {held} tensors, but no config "
                                  f"group of {source} targets it")
        if any(_match(name, i) for i in ignore):
            raise CheckpointError(f"{first}: module '{name}' has {held} tensors, but {source} "
                                  "lists it under 'ignore' (unquantized)")
        cfg = groups[group]
        fmt = cfg["format"]
        static = inputs is not None and not inputs.dynamic
        need = [*REQUIRED[fmt], *([] if cfg["sym"] else ["weight_zero_point"]),
                *(["input_scale"] if static else [])]
        if not any(p in parts for p in need):
            raise CheckpointError(f"{first}: module '{name}' has {sorted(parts)}, none of the "
                                  f"tensors of a '{fmt}' module ({', '.join(need)}; config "
                                  f"group {group!r})")
        if fmt == PACK_QUANTIZED:
            allowed = {*need, "weight_g_idx", "bias"}
            kind = ("symmetric" if cfg["sym"] else "asymmetric") + f" {cfg['bits']}-bit"
            note = f"config group {group!r} is {kind.split()[0]} weight-only"
        else:
            allowed = {*need, "bias"}
            acts = "" if inputs is None else (
                f", {'dynamic' if inputs.dynamic else 'static'} {inputs.label} inputs")
            kind = f"{fmt} per {cfg['strategy']}{acts}"
            note = f"config group {group!r} is {kind}"
        check_module_tensors(
            name, parts, tensors, origin, need, allowed,
            missing_note=f" (config group {group!r}: {kind})",
            extra_note=f"{note}; a module holds {', '.join(sorted(allowed))}")
        if fmt == PACK_QUANTIZED:
            modules[name] = _build(name, parts, origin, cfg)
        else:
            modules[name] = _build_w8(name, parts, origin, cfg)
        if static:
            act_scales[f"{name}.input_scale"] = _scalar_scale(
                parts["input_scale"], tensor_error(name, origin), "input_scale")
        module_group[name] = group
        claimed.update(f"{name}.{p}" for p in parts)
    if not modules:
        files = sorted({Path(f).name for f in origin.values()})
        raise CheckpointError(f"{root}: no quantized modules found in {files} (no "
                              "'<module>.weight_packed' or '<module>.weight_scale' tensors)")
    kv = _kv_scales(tensors, origin, raw, source)
    act_scales.update(kv)
    claimed.update(kv)

    base = groups[Counter(module_group.values()).most_common(1)[0][0]]
    g_idx_used = any(isinstance(m, PackedLinear) and not torch.equal(
        m.g_idx, torch.arange(m.in_features, dtype=torch.int32)
        // (m.in_features if m.group_size == -1 else m.group_size)) for m in modules.values())
    quant_config = dict(
        quant_method=QUANT_METHOD, format=str(raw["format"]), checkpoint_format=str(raw["format"]),
        bits=base["bits"], group_size=base["group_size"], sym=base["sym"],
        strategy=base["strategy"], actorder=base["actorder"],
        desc_act=bool(base["actorder"]) or g_idx_used, version=raw.get("version"),
        raw=dict(raw))
    return Checkpoint.assemble(root, quant_config, modules, tensors, claimed, hf_config,
                               act_scales)


def act_scheme(ckpt: Checkpoint, sites: Sequence[Site] | None,
               name: str | None = None) -> ActScheme | None:
    """The activation / KV-cache scheme a compressed-tensors checkpoint declares, as mechq's
    :class:`~mechq.quant.activation_quant.ActScheme` (``None`` when it quantizes weights only),
    named ``name`` or by :func:`scheme_name`.

    ``sites``: the model's (:func:`mechq.quant.layout.sites`, or :func:`config_sites` of the
    checkpoint's ``config.json``). Static scales map per layer onto mechq's sites: a site that
    feeds several modules (``attn_in``: q, k, v; ``mlp_in``: gate, up) takes the **largest** of
    their ``input_scale`` values, the one scale a fused kernel quantizing the shared input once
    must use; ``o_in`` / ``down_in`` take their module's; ``k_cache`` / ``v_cache`` the layer's
    attention's ``k_scale`` / ``v_scale`` (the parent module of its keys' linear module).
    Raises :class:`SchemeError` when input activations are declared but a linear module of the
    model is not quantized (mechq applies one input scheme to every module), and
    :class:`CheckpointError` when ``sites`` is ``None`` but there are static scales to map, or a
    layer's KV-cache scale is missing or a KV-cache scale belongs to no attention module.
    """
    source = f"{ckpt.path / HF_CONFIG_FILE} (quantization_config)"
    inputs, kv = declared_quantizers(ckpt.quant_config.get("raw") or {}, source)
    if inputs is None and kv is None:
        return None
    name = name or scheme_name(inputs, kv)
    static = (inputs is not None and not inputs.dynamic) or kv is not None
    if sites is None:
        if static:
            raise CheckpointError(
                f"{ckpt.path}: activation scheme {name} has static scales, and mapping them "
                "onto layers needs the model (or a config.json naming a supported "
                "architecture)")
        return ActScheme(name, inputs, kv)
    scales: dict[tuple[str, int], float] = {}
    if inputs is not None:
        for s in sites:
            if s.module not in ckpt.modules:
                raise SchemeError(
                    f"{ckpt.path}: module {s.module!r} is not quantized, but the checkpoint's "
                    f"{inputs.label} input activations would quantize its input too (mechq "
                    "applies one activation scheme to every linear module)")
            if not inputs.dynamic:
                key = (input_site(s.component), s.layer)
                value = ckpt.act_scales[f"{s.module}.input_scale"]
                scales[key] = max(scales.get(key, 0.0), value)
    if kv is not None:
        attention = attention_modules(sites)
        for layer, attn in sorted(attention.items()):
            for site, part in (("k_cache", "k_scale"), ("v_cache", "v_scale")):
                key = f"{attn}.{part}"
                if key not in ckpt.act_scales:
                    raise CheckpointError(
                        f"{ckpt.path}: its kv_cache_scheme needs '{key}' (layer {layer}'s "
                        "attention), which it does not hold")
                scales[(site, layer)] = ckpt.act_scales[key]
        known = {f"{a}.{p}" for a in attention.values() for p in KV_SCALES}
        stray = sorted(k for k in ckpt.act_scales if k.rsplit(".", 1)[-1] in KV_SCALES
                       and k not in known)
        if stray:
            raise CheckpointError(f"{ckpt.path}: KV-cache scale '{stray[0]}' belongs to no "
                                  "attention module of this model")
    return ActScheme(name, inputs, kv, scales)
