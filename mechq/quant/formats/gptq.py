"""Reading and writing GPTQ checkpoints ourselves (safetensors only, no GPTQModel at load time).

A GPTQ checkpoint directory holds ``quantize_config.json`` (or a ``quantization_config`` entry in
``config.json``) and one or more ``*.safetensors`` files. Every quantized linear module ``<name>``
contributes ``<name>.qweight``, ``<name>.qzeros``, ``<name>.scales``, ``<name>.g_idx`` and
optionally ``<name>.bias`` (layouts in :mod:`mechq.quant.packing`); all other tensors (embeddings,
norms, an unquantized ``lm_head``) are kept as they are in :attr:`Checkpoint.other`.

Supported: ``quant_method`` ``"gptq"`` with ``checkpoint_format`` ``"gptq"`` (v1: qzeros store
``zero - 1``) or ``"gptq_v2"`` (qzeros store ``zero``), bits 2/3/4/8, int32 packing.

Mixed precision: the config's ``dynamic`` (GPTQModel's per-module rules, resolved by
:mod:`mechq.quant.dynamic`) gives each module its own ``bits``, ``group_size``, ``sym`` and
``desc_act``; a module a ``-:`` rule skips has no packed tensors (GPTQModel stores its plain
``.weight``, which lands in :attr:`Checkpoint.other`). Every module is validated with its own
settings. Per-module ``format`` / ``checkpoint_format`` / ``pack_dtype`` / ``quant_method``
changes are not supported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mechq.quant import dynamic as dyn
from mechq.quant.formats.common import (
    HF_CONFIG_FILE, INDEX_FILE, QUANT_CONFIG_FILE, WEIGHTS_FILE, Checkpoint, CheckpointError,
    check_dtypes, check_module_tensors, check_shapes, module_parts, read_quant_config,
    read_tensors, tensor_error,
)
from mechq.quant.packing import PackedLinear, packed_length
from mechq.vocab import SUPPORTED_BITS

PACKED_TENSORS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")
SUPPORTED_FORMATS: dict[str, int] = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> zero_offset
_SUPPORTED = (
    "mechq reads GPTQ checkpoints: quant_method 'gptq', checkpoint_format 'gptq' (v1) or "
    f"'gptq_v2', bits {SUPPORTED_BITS}, pack_dtype int32"
)


def normalize_quant_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a GPTQ quantization config and fill the keys mechq relies on.

    ``source`` (a file name) is used in error messages. Raises :class:`CheckpointError` for
    methods, formats, bit widths or per-module overrides that mechq cannot dequantize.
    """
    qc = dict(raw)
    method = str(qc.get("quant_method") or qc.get("method") or "gptq").lower()
    if method != "gptq":
        raise CheckpointError(f"{source}: unsupported quant_method {method!r}; {_SUPPORTED}")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if qc.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in SUPPORTED_FORMATS:
        raise CheckpointError(f"{source}: unsupported checkpoint_format {fmt!r}; {_SUPPORTED}")
    if "bits" not in qc:
        raise CheckpointError(f"{source}: quantization config has no 'bits'; {_SUPPORTED}")
    try:
        bits = int(qc["bits"])
        group_size = int(qc.get("group_size", -1))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad bits / group_size ({e})") from e
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{source}: unsupported bits={bits}; {_SUPPORTED}")
    if not (group_size == -1 or group_size > 0):
        raise CheckpointError(f"{source}: group_size must be -1 or positive, got {group_size}")
    pack_dtype = str(qc.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise CheckpointError(f"{source}: unsupported pack_dtype {pack_dtype!r}; {_SUPPORTED}")
    rules = qc.get("dynamic") or None
    if rules is not None:
        layout = dict(pack_dtype="int32", format=fmt, checkpoint_format=fmt, quant_method=method,
                      method=method)
        if not isinstance(rules, Mapping) or not all(
                isinstance(o, Mapping) for o in rules.values()):
            raise CheckpointError(f"{source}: 'dynamic' must map rules to override objects")
        for rule, override in rules.items():
            try:
                re.compile(dyn.pattern(str(rule)))
            except re.error as e:
                raise CheckpointError(f"{source}: dynamic rule {rule!r} is not a regex ({e})") \
                    from None
            changed = {k: v for k, v in override.items() if k in layout
                       and str(v).replace("torch.", "").lower() != layout[k]}
            if changed and not str(rule).startswith(dyn.SKIP):
                raise CheckpointError(
                    f"{source}: per-module 'dynamic' override {rule!r} -> {changed} is not "
                    f"supported; {_SUPPORTED} for every module (bits and group_size may differ)"
                )
    qc.update(
        quant_method="gptq", checkpoint_format=fmt, bits=bits, group_size=group_size,
        sym=bool(qc.get("sym", True)), desc_act=bool(qc.get("desc_act", False)),
        pack_dtype="int32",
    )
    if rules:
        qc["dynamic"] = dict(rules)
    else:
        qc.pop("dynamic", None)
    return qc


def module_config(name: str, qc: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """``name``'s settings (``bits``, ``group_size``, ``sym``, ``desc_act``) under a normalized
    config's ``dynamic`` rules, or ``None`` when a ``-:`` rule leaves it unquantized.

    Raises :class:`CheckpointError` naming the module, the deciding rule and ``source`` when the
    module's bits or group size are ones mechq cannot read.
    """
    base = {k: qc[k] for k in ("bits", "group_size", "sym", "desc_act")}
    rule = dyn.rule_for(name, qc.get("dynamic"))
    cfg = dyn.resolve(name, base, qc.get("dynamic"))
    if cfg is None:
        return None
    why = f" (dynamic rule {rule!r})" if rule is not None else ""
    try:
        bits, group_size = int(cfg["bits"]), int(cfg["group_size"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: module '{name}'{why}: bad bits / group_size ({e})") \
            from None
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{source}: module '{name}'{why} has unsupported bits={bits}; "
                              f"{_SUPPORTED}")
    if not (group_size == -1 or group_size > 0):
        raise CheckpointError(f"{source}: module '{name}'{why}: group_size must be -1 or "
                              f"positive, got {group_size}")
    return dict(cfg, bits=bits, group_size=group_size, sym=bool(cfg["sym"]),
                desc_act=bool(cfg["desc_act"]))



def _build_module(
    name: str,
    t: dict[str, Tensor],
    origin: dict[str, str],
    bits: int,
    group_size: int,
    zero_offset: int,
) -> PackedLinear:
    err = tensor_error(name, origin)
    check_dtypes(t, err, ("qweight", "qzeros"), (torch.int32,), "torch.int32 (pack_dtype int32)")
    check_dtypes(t, err, ("g_idx",), (torch.int32, torch.int64, torch.int16), "an integer type")
    if not t["scales"].is_floating_point():
        raise err("scales", f"has dtype {t['scales'].dtype}, expected float16")
    for part, ndim in (("qweight", 2), ("qzeros", 2), ("scales", 2), ("g_idx", 1)):
        if t[part].ndim != ndim:
            raise err(part, f"has shape {tuple(t[part].shape)}, expected {ndim} dimensions")
    n_in = int(t["g_idx"].shape[0])
    n_out = int(t["qweight"].shape[1])
    groups = 1 if group_size == -1 else -(-n_in // group_size)
    expected = {
        "qweight": (packed_length(n_in, bits), n_out),
        "scales": (groups, n_out),
        "qzeros": (groups, packed_length(n_out, bits)),
    }
    if "bias" in t:
        expected["bias"] = (n_out,)
    check_shapes(t, err, expected, f"in_features={n_in} from g_idx, out_features={n_out} from "
                                   f"qweight, bits={bits}, group_size={group_size}")
    g_idx = t["g_idx"].to(torch.int32)
    if n_in and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise err(
            "g_idx",
            f"has values in [{int(g_idx.min())}, {int(g_idx.max())}] but scales has {groups} groups",
        )
    return PackedLinear(
        qweight=t["qweight"].contiguous(),
        qzeros=t["qzeros"].contiguous(),
        scales=t["scales"].to(torch.float16).contiguous(),
        g_idx=g_idx.contiguous(),
        bits=bits,
        group_size=group_size,
        zero_offset=zero_offset,
        in_features=n_in,
        out_features=n_out,
        bias=t.get("bias"),
    )


def load_gptq_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a GPTQ checkpoint directory (one or many ``*.safetensors``) with our own reader.

    Each module is read with its own bits and group size under the config's ``dynamic`` rules.
    Raises :class:`CheckpointError` naming the file (and tensor or module) for a missing
    quantization config, an unsupported method / format / bit width (per module too), a quantized
    module with a missing, extra or wrongly shaped tensor, packed tensors for a module the rules
    skip, or a checkpoint without quantized modules.
    """
    root = Path(path)
    hf_config, raw, source = read_quant_config(root)
    qc = normalize_quant_config(raw, source)
    zero_offset = SUPPORTED_FORMATS[qc["checkpoint_format"]]

    tensors, origin = read_tensors(root)
    modules: dict[str, PackedLinear] = {}
    claimed: set[str] = set()
    for name, parts in module_parts(tensors, PACKED_TENSORS).items():
        awq_like = ([p for p in PACKED_TENSORS if p not in parts] == ["g_idx"]
                    and not any(k.endswith(".g_idx") for k in tensors))
        check_module_tensors(
            name, parts, tensors, origin, PACKED_TENSORS, parts,
            missing_note="; no module has a g_idx, so these look like AWQ tensors under a GPTQ "
                         "config (quant_method 'awq' reads them)" if awq_like else "",
            extra_note=f"a GPTQ module holds only {', '.join(PACKED_TENSORS)} and bias")
        cfg = module_config(name, qc, source)
        if cfg is None:
            raise CheckpointError(
                f"{origin[f'{name}.qweight']}: module '{name}' is packed, but {source} says "
                f"dynamic rule {dyn.rule_for(name, qc.get('dynamic'))!r} leaves it unquantized"
            )
        modules[name] = _build_module(name, parts, origin, cfg["bits"], cfg["group_size"],
                                      zero_offset)
        claimed.update(f"{name}.{p}" for p in parts)
    if not modules:
        files = sorted({Path(f).name for f in origin.values()})
        raise CheckpointError(
            f"{root}: no quantized modules found in {files} (no '<module>.qweight' tensors)"
        )
    return Checkpoint.assemble(root, qc, modules, tensors, claimed, hf_config)


def save_gptq_checkpoint(
    out_dir: str | os.PathLike,
    modules: Mapping[str, PackedLinear],
    quant_config: Mapping[str, Any],
    hf_config: Mapping[str, Any] | None = None,
    *,
    other: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``modules`` (and ``other`` tensors) as a GPTQ checkpoint GPTQModel would write.

    Files: ``model.safetensors`` (``<name>.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``,
    ``.bias``), ``quantize_config.json`` and, with ``hf_config``, ``config.json`` carrying the
    same ``quantization_config``. ``checkpoint_format`` defaults to the modules' zero-point format
    (``"gptq"`` for ``zero_offset=1``, ``"gptq_v2"`` for 0) and must agree with it. Each module
    must have the bits and groups the config (with its ``dynamic`` rules) gives it, and no
    module a ``-:`` rule skips may be given. :func:`load_gptq_checkpoint` reads the directory
    back identically. Returns ``out_dir``.
    """
    root = Path(out_dir)
    if not modules:
        raise CheckpointError(f"{root}: nothing to save (no quantized modules)")
    offsets = {m.zero_offset for m in modules.values()}
    if len(offsets) != 1:
        raise CheckpointError(
            f"{root}: modules mix v1 and v2 zero points; convert them with "
            "PackedLinear.with_zero_offset first"
        )
    offset = offsets.pop()
    qc = dict(quant_config)
    qc.setdefault("bits", next(iter(modules.values())).bits)
    qc.setdefault("checkpoint_format", "gptq" if offset == 1 else "gptq_v2")
    qc.setdefault("format", qc["checkpoint_format"])
    qc.setdefault("quant_method", "gptq")
    qc.setdefault("method", qc["quant_method"])
    qc.setdefault("pack_dtype", "int32")
    qc.setdefault("sym", True)
    qc.setdefault("desc_act", False)
    if "group_size" not in qc:
        sizes = {m.group_size for m in modules.values()}
        qc["group_size"] = sizes.pop() if len(sizes) == 1 else -1
    norm = normalize_quant_config(qc, f"{root / QUANT_CONFIG_FILE} (to be written)")
    if SUPPORTED_FORMATS[norm["checkpoint_format"]] != offset:
        raise CheckpointError(
            f"{root}: checkpoint_format {norm['checkpoint_format']!r} needs zero_offset="
            f"{SUPPORTED_FORMATS[norm['checkpoint_format']]} but the modules have {offset}"
        )
    tensors: dict[str, Tensor] = {}
    for name, m in modules.items():
        cfg = module_config(name, norm, f"{root / QUANT_CONFIG_FILE} (to be written)")
        if cfg is None:
            rule = dyn.rule_for(name, norm.get("dynamic"))
            raise CheckpointError(f"{root}: module '{name}' is given packed, but dynamic rule "
                                  f"{rule!r} leaves it unquantized")
        bits, gs = cfg["bits"], cfg["group_size"]
        groups = 1 if gs == -1 else -(-m.in_features // gs)
        if m.bits != bits or m.n_groups != groups:
            raise CheckpointError(
                f"{root}: module '{name}' has bits={m.bits} and {m.n_groups} groups, but the "
                f"config says bits={bits}, group_size={gs} ({groups} groups for "
                f"in_features={m.in_features})"
            )
        packed = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales, "g_idx": m.g_idx}
        if m.bias is not None:
            packed["bias"] = m.bias
        for part, t in packed.items():
            tensors[f"{name}.{part}"] = t.detach().cpu().contiguous()
    for key, t in (other or {}).items():
        if key in tensors:
            raise CheckpointError(f"{root}: tensor '{key}' is both a packed and an other tensor")
        tensors[key] = t.detach().cpu().contiguous()
    root.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in root.glob("*.safetensors") if p.name != WEIGHTS_FILE)
    if stale or (root / INDEX_FILE).exists():
        raise CheckpointError(
            f"{root}: already holds other weight files {stale or [INDEX_FILE]}; "
            "save into an empty directory"
        )
    tmp = root / f"{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, root / WEIGHTS_FILE)
    (root / QUANT_CONFIG_FILE).write_text(_dumps(qc))
    if hf_config is not None:
        (root / HF_CONFIG_FILE).write_text(_dumps(dict(hf_config, quantization_config=qc)))
    return root


def _sorted_keys(obj: Any) -> Any:
    """``obj`` with dict keys sorted at every level except inside ``dynamic``, whose rule order
    is part of its meaning."""
    if not isinstance(obj, Mapping):
        return obj
    return {k: obj[k] if k == "dynamic" else _sorted_keys(obj[k]) for k in sorted(obj)}


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(_sorted_keys(obj), indent=2) + "\n"
