"""Which quantized format a checkpoint directory holds, and the reader for it.

A checkpoint says what it is in its quantization config: ``quantize_config.json`` (GPTQModel,
AutoAWQ) or the ``quantization_config`` entry of ``config.json`` (transformers, llm-compressor).
Its ``quant_method`` picks the reader:

- ``"gptq"`` → :func:`mechq.quant.formats.gptq.load_gptq_checkpoint` (v1 / v2 zero points,
  act-order ``g_idx``, per-module ``dynamic`` bits);
- ``"awq"`` → :func:`mechq.quant.formats.awq.load_awq_checkpoint` (GEMM layout, with the norms AWQ
  rewrote);
- ``"compressed-tensors"`` → :func:`mechq.quant.formats.compressed.read_compressed_tensors`
  (pack-quantized integer weights; int-quantized int8 and float-quantized FP8 W8A8 weights with
  their static activation and KV-cache scales).

Every reader is mechq's own and returns a :class:`~mechq.quant.formats.common.Checkpoint` whose
modules are :class:`~mechq.quant.packing.PackedLinear` (:class:`~mechq.quant.fp8.Fp8Linear` for
FP8 weights). A config that names one format over tensors of another is refused with the file
and tensor named.

:mod:`~mechq.quant.formats.dense` is no quantized format: it puts a variant's dequantized weights
into the model's float transformers model (:func:`~mechq.quant.formats.dense.dequantized_hf_model`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mechq.quant.formats.awq import load_awq_checkpoint
from mechq.quant.formats.common import Checkpoint, CheckpointError, read_quant_config
from mechq.quant.formats.compressed import read_compressed_tensors
from mechq.quant.formats.gptq import load_gptq_checkpoint

FORMATS: tuple[str, ...] = ("gptq", "awq", "compressed-tensors")
#: the name stem of a variant read from each format (``awq-w4g64``, ``ct-w4g128``)
METHOD_OF: dict[str, str] = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "ct"}
#: mechq's reader of each format
READERS = {"gptq": load_gptq_checkpoint, "awq": load_awq_checkpoint,
           "compressed-tensors": read_compressed_tensors}


def quant_config(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The raw quantization config of a checkpoint directory and the file it came from."""
    _, raw, source = read_quant_config(Path(path))
    return raw, source


def detect_format(path: str | os.PathLike) -> str:
    """``"gptq"``, ``"awq"`` or ``"compressed-tensors"``, from the config's ``quant_method``."""
    raw, source = quant_config(path)
    method = str(raw.get("quant_method") or raw.get("method") or "").lower().replace("_", "-")
    if not method and "bits" in raw:  # old GPTQ configs carry no method
        method = "gptq"
    if method not in FORMATS:
        raise CheckpointError(f"{source}: unknown quantization format {method or None!r}; "
                              f"mechq reads {', '.join(FORMATS)}")
    return method


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Detect the format and read the checkpoint with mechq's reader for it.

    Its ``quant_config["format_family"]`` records which of :data:`FORMATS` it was.
    """
    fmt = detect_format(path)
    ckpt = READERS[fmt](path)
    ckpt.quant_config["format_family"] = fmt
    return ckpt
