"""What every checkpoint format shares: file names, the in-memory checkpoint, its errors.

Each format's reader (:mod:`~mechq.quant.formats.gptq`, :mod:`~mechq.quant.formats.awq`,
:mod:`~mechq.quant.formats.compressed`) reads its own tensors into
:class:`~mechq.quant.packing.PackedLinear` modules and returns a :class:`Checkpoint`; the file
reading, the quantization-config lookup and the fit check against a model are written once here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mechq.quant.fp8 import Fp8Linear
from mechq.quant.packing import PackedLinear

QUANT_CONFIG_FILE = "quantize_config.json"
HF_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
META_FILE = "mechq_variant.json"  # what mechq knows of a variant it wrote (method, calibration)


class CheckpointError(ValueError):
    """A checkpoint that mechq cannot read, or that does not fit the model it is used with."""


@dataclass
class Checkpoint:
    """A quantized checkpoint read into memory (any format, as GPTQ-layout modules).

    ``quant_config`` is the file's quantization config with ``bits``, ``group_size``, ``sym``,
    ``desc_act`` (the base settings) and ``checkpoint_format`` (``"gptq"`` or ``"gptq_v2"``)
    normalized, plus every other entry (GPTQModel's ``meta``, the per-module ``dynamic`` rules).
    ``modules`` maps Hugging Face module names (``"model.layers.3.self_attn.q_proj"``) to their
    packed weights, each with its own bits; ``other`` holds the non-quantized tensors (the plain
    ``.weight`` of a module a ``-:`` rule skipped among them); ``hf_config`` is ``config.json``
    when present. A module is a :class:`~mechq.quant.fp8.Fp8Linear` where the checkpoint holds
    FP8 weights. ``act_scales`` maps the tensor names of stored static activation scales
    (compressed-tensors' ``<m>.input_scale``, ``<attn>.k_scale``, ``<attn>.v_scale``) to their
    values.
    """

    path: Path
    quant_config: dict[str, Any]
    modules: dict[str, PackedLinear | Fp8Linear]
    other: dict[str, Tensor] = field(default_factory=dict)
    hf_config: dict[str, Any] | None = None
    architecture: str | None = None
    act_scales: dict[str, float] = field(default_factory=dict)

    @classmethod
    def assemble(cls, root: Path, quant_config: dict[str, Any],
                 modules: dict[str, PackedLinear | Fp8Linear], tensors: Mapping[str, Tensor],
                 claimed: Iterable[str], hf_config: dict[str, Any] | None,
                 act_scales: Mapping[str, float] | None = None) -> Checkpoint:
        """What a format's reader returns: its ``modules``, every tensor no module ``claimed``
        as ``other``, the architecture named by ``hf_config`` and the static activation
        scales it read."""
        claimed = set(claimed)
        return cls(path=root, quant_config=quant_config, modules=modules,
                   other={k: v for k, v in tensors.items() if k not in claimed},
                   hf_config=hf_config, architecture=architecture_of(hf_config),
                   act_scales=dict(act_scales or {}))

    @property
    def bits(self) -> int:
        return int(self.quant_config["bits"])

    @property
    def module_bits(self) -> dict[str, int]:
        """The bit width of every packed module."""
        return {n: m.bits for n, m in self.modules.items()}

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def __repr__(self) -> str:
        qc = self.quant_config
        return (
            f"Checkpoint({str(self.path)!r}, architecture={self.architecture}, "
            f"bits={qc['bits']}, group_size={qc['group_size']}, sym={qc['sym']}, "
            f"desc_act={qc['desc_act']}, format={qc['checkpoint_format']}, "
            f"{len(self.modules)} quantized modules, {len(self.other)} other tensors)"
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_quant_config(root: Path) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """``(hf_config or None, raw quantization config, the file it came from)`` of a checkpoint
    directory: ``quantize_config.json`` (GPTQModel, AutoAWQ) first, else ``config.json``'s
    ``quantization_config`` entry (transformers, llm-compressor)."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    hf_path = root / HF_CONFIG_FILE
    hf_config = read_json(hf_path) if hf_path.exists() else None
    qc_path = root / QUANT_CONFIG_FILE
    if qc_path.exists():
        return hf_config, read_json(qc_path), str(qc_path)
    if hf_config is not None and isinstance(hf_config.get("quantization_config"), dict):
        return hf_config, hf_config["quantization_config"], f"{hf_path} (quantization_config)"
    raise CheckpointError(f"{root}: no quantization config: neither {QUANT_CONFIG_FILE} nor a "
                          f"'quantization_config' entry in {HF_CONFIG_FILE}")


def architecture_of(hf_config: dict[str, Any] | None) -> str | None:
    """The first of ``config.json``'s ``architectures`` (the Hugging Face architecture name
    :mod:`mechq.models.families` knows its family by), if any."""
    if hf_config and hf_config.get("architectures"):
        return str(hf_config["architectures"][0])
    return None


def tensor_error(name: str, origin: Mapping[str, str]) -> Callable[[str, str], CheckpointError]:
    """``err(part, msg)``: the error for module ``name``'s tensor ``part``, naming its file."""
    def err(part: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{origin[f'{name}.{part}']}: tensor '{name}.{part}' {msg}")

    return err


def check_dtypes(t: Mapping[str, Tensor], err: Callable[[str, str], CheckpointError],
                 parts: Iterable[str], allowed: Collection[torch.dtype], expected: str) -> None:
    """Raise ``err`` for the first of ``parts`` whose dtype is not ``allowed`` (``expected``
    says what is, in the message)."""
    for part in parts:
        if t[part].dtype not in allowed:
            raise err(part, f"has dtype {t[part].dtype}, expected {expected}")


def check_shapes(t: Mapping[str, Tensor], err: Callable[[str, str], CheckpointError],
                 expected: Mapping[str, tuple[int, ...]], why: str) -> None:
    """Raise ``err`` for the first tensor whose shape is not ``expected`` (``why``: where the
    expected shapes come from, in the message)."""
    for part, shape in expected.items():
        if tuple(t[part].shape) != shape:
            raise err(part, f"has shape {tuple(t[part].shape)}, expected {shape} ({why})")


def check_module_tensors(name: str, parts: Mapping[str, Tensor], tensors: Mapping[str, Tensor],
                         origin: Mapping[str, str], need: Sequence[str], allowed: Collection[str],
                         *, missing_note: str = "", extra_note: str) -> None:
    """Raise :class:`CheckpointError` when quantized module ``name`` (its tensors: ``parts``)
    lacks one of ``need`` (``missing_note`` ends the message), or when the file holds a
    ``<name>.<part>`` whose part is not ``allowed`` (``extra_note``: what a module holds)."""
    missing = [p for p in need if p not in parts]
    if missing:
        have = next(p for p in need if p in parts)
        raise CheckpointError(
            f"{origin[f'{name}.{have}']}: quantized module '{name}' has {sorted(parts)} but no "
            f"{', '.join(repr(f'{name}.{p}') for p in missing)}{missing_note}")
    extra = sorted(k for k in tensors if k.startswith(f"{name}.")
                   and k[len(name) + 1:] not in allowed)
    if extra:
        raise CheckpointError(f"{origin[extra[0]]}: unexpected tensor '{extra[0]}' in quantized "
                              f"module '{name}' ({extra_note})")


def module_parts(tensors: dict[str, Tensor], packed: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
    """The tensors of each quantized module, by module name (sorted): every ``<m>.<part>`` whose
    part is one of ``packed``, plus ``<m>.bias`` when there is one."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors
                    if "." in k and k.rsplit(".", 1)[1] in packed})
    return {m: {p: tensors[f"{m}.{p}"] for p in (*packed, "bias") if f"{m}.{p}" in tensors}
            for m in names}

def read_tensors(root: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a checkpoint directory (one file or shards with an index) and the file
    each came from."""
    files = sorted(root.glob("*.safetensors"))
    index = root / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if not (root / f).exists()})
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) {missing} that are not in {root}")
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files found")
    tensors: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    if key in tensors:
                        raise CheckpointError(
                            f"{f}: tensor '{key}' is also in {origin[key]}; each tensor must be "
                            "stored once"
                        )
                    tensors[key] = reader.get_tensor(key)
                    origin[key] = str(f)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e
    return tensors, origin


def check_architecture(
    ckpt: Checkpoint,
    expected_modules: Iterable[str] | Mapping[str, tuple[int, int]],
) -> None:
    """Raise :class:`CheckpointError` if ``ckpt``'s quantized modules do not belong to a model.

    ``expected_modules`` holds the model's quantizable module names, or maps each name to its
    ``(out_features, in_features)`` so that sizes are checked too. The error names a few
    offending modules.
    """
    expected = dict(expected_modules) if isinstance(expected_modules, Mapping) else {
        m: None for m in expected_modules
    }
    names = set(ckpt.modules)
    unknown = sorted(names - set(expected))
    if unknown:
        raise CheckpointError(
            f"{ckpt.path}: {len(unknown)} of {len(names)} quantized modules do not belong to this "
            f"model (checkpoint architecture: {ckpt.architecture}), e.g. {unknown[:3]}; the model's "
            f"modules look like {sorted(expected)[:3]}"
        )
    wrong = [
        f"{n}: checkpoint (out, in) = {(m.out_features, m.in_features)}, model {tuple(expected[n])}"
        for n, m in sorted(ckpt.modules.items())
        if expected.get(n) is not None
        and (m.out_features, m.in_features) != tuple(expected[n])
    ]
    if wrong:
        raise CheckpointError(
            f"{ckpt.path}: {len(wrong)} quantized modules have other shapes than this model's, "
            f"e.g. {wrong[:3]}"
        )
