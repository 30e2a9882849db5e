"""GPTQ through GPTQModel, the implementation the paper used.

mechq does not re-implement GPTQ: it hands the model's Hugging Face directory and the calibration
tokens to GPTQModel, lets it quantize layer by layer and save a standard GPTQ checkpoint, and then
reads that checkpoint back with its *own* dequantizer (:mod:`mechq.quant.checkpoint`).

On CPU GPTQModel needs ``GPTQMODEL_CPU_WORKERS`` (set here to the number of cores unless the user
set it) and JIT-compiles a C++ packer into ``~/.cache/gptqmodel`` on its first run (~30 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mechq.calibration import Calibration


def run_gptq(
    hf_dir: str | Path,
    out_dir: str | Path,
    calibration: Calibration,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Quantize the model in ``hf_dir`` with GPTQModel and save the checkpoint to ``out_dir``."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import GPTQModel, QuantizeConfig

    _keep_logs_out_of_cwd()

    cfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    torch.manual_seed(seed)
    model = GPTQModel.load(str(hf_dir), cfg, device=device)
    model.quantize(calibration.as_gptqmodel(), batch_size=1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir))
    del model
    return out_dir


def _keep_logs_out_of_cwd() -> None:
    """GPTQModel 7.x writes per-run logs into ``./logs``; send them to mechq's cache instead."""
    from mechq.models import cache_dir

    try:
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = cache_dir() / "gptqmodel-logs"
    except (ImportError, AttributeError):  # other GPTQModel versions: leave their default
        pass
