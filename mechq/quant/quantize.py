"""Making and loading quantized variants, with an on-disk cache.

``quantize(model, ...)`` returns a :class:`~mechq.quant.variants.Variant`. Every variant is
stored as a GPTQ-layout checkpoint directory under ``<cache>/variants/<key>``, where ``key`` hashes
(model, method, bits, group size, sym, desc_act, calibration, mechq's format version) — the
calibration enters as its recipe for the default sampled text and as a hash of the token ids for
user texts;
asking again for the same variant reads that directory instead of quantizing. GPTQ checkpoints
are GPTQModel's own output; RTN variants are written by mechq in the same layout. Both are read
back by :func:`load_quantized`, i.e. by mechq's dequantizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from transformer_lens import HookedTransformer

from mechq import models
from mechq.calibration import get_calibration, is_sampled, sampled_spec
from mechq.quant import layout
from mechq.quant.checkpoint import check_architecture, load_gptq_checkpoint, save_gptq_checkpoint
from mechq.quant.gptq import run_gptq
from mechq.quant.rtn import SUPPORTED_BITS, rtn_quantize_weight
from mechq.quant.variants import Variant

METHODS = ("gptq", "rtn")
CACHE_FORMAT = 1
META_FILE = "mechq_variant.json"


def variant_name(method: str, bits: int, group_size: int, sym: bool = True,
                 desc_act: bool = False) -> str:
    """``gptq-w4g128``, with ``-asym`` / ``-act`` suffixes for non-default choices."""
    g = "" if group_size in (-1, 0) else f"g{group_size}"
    return f"{method}-w{bits}{g}" + ("" if sym else "-asym") + ("-act" if desc_act else "")


def quantize(
    model: HookedTransformer,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    calibration: str | list[str] | None = None,
    seed: int = 0,
    *,
    n_samples: int = 16,
    seq_len: int = 64,
    cache: bool = True,
    name: str | None = None,
) -> Variant:
    """Quantize ``model``'s linear layers and return the variant (not swapped in).

    ``method="gptq"`` runs GPTQModel on the model's Hugging Face weights with ``calibration``
    (default: ``n_samples`` × ``seq_len`` tokens sampled from the FP model, see
    :mod:`mechq.calibration`); ``method="rtn"`` is mechq's group-wise round-to-nearest, which
    needs no calibration. ``group_size=-1`` means one group per row (per-channel).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}.")
    if group_size not in (-1,) and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (per-channel), got {group_size}.")
    if method == "rtn" and desc_act:
        raise ValueError("desc_act (activation order) needs calibration: it applies to GPTQ only.")
    src = models.source_of(model)
    calib, calib_id = None, None
    if method == "gptq":
        if is_sampled(calibration):  # drawn only on a cache miss
            calib_id = sampled_spec(n_samples, seq_len, seed)
        else:
            calib = get_calibration(model, calibration, n_samples=n_samples, seq_len=seq_len,
                                    seed=seed)
            calib_id = calib.digest
    key_fields = dict(
        model=src.name,
        config=hashlib.sha256((src.hf_dir / "config.json").read_bytes()).hexdigest()[:16],
        method=method, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
        calibration=calib_id, seed=seed if calib_id else None,
        format=CACHE_FORMAT,
    )
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    out = models.cache_dir() / "variants" / key
    vname = name or variant_name(method, bits, group_size, sym, desc_act)
    if cache and (out / META_FILE).exists():
        return load_quantized(out, model=model, name=vname)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{key}.tmp"))
    t0 = time.perf_counter()
    try:
        if method == "gptq":
            if calib is None:
                calib = get_calibration(model, None, n_samples=n_samples, seq_len=seq_len,
                                        seed=seed)
            run_gptq(src.hf_dir, tmp, calib, bits=bits, group_size=group_size, sym=sym,
                     desc_act=desc_act, seed=seed, device=str(model.cfg.device).split(":")[0])
            (tmp / "calibration.json").write_text(json.dumps(
                {"source": calib.source, "digest": calib.digest, "tokens": calib.tokens}))
        else:
            packed = {
                m: rtn_quantize_weight(layout.module_weight(model, m), bits, group_size, sym)
                for m in layout.modules(model.cfg)
            }
            save_gptq_checkpoint(
                tmp,
                packed,
                dict(bits=bits, group_size=group_size, sym=sym, desc_act=False,
                     quant_method="gptq", checkpoint_format="gptq_v2",
                     meta={"quantizer": ["mechq-rtn"]}),
            )
        meta = dict(key_fields, name=vname, seconds=round(time.perf_counter() - t0, 2),
                    calibration_source=calib.source if calib else None,
                    calibration_tokens=calib.n_tokens if calib else 0,
                    calibration_digest=calib.digest if calib else None)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_quantized(out, model=model, name=vname)


def load_quantized(
    path: str | Path, model: HookedTransformer | None = None, name: str | None = None
) -> Variant:
    """Read a GPTQ checkpoint directory into a :class:`Variant` with mechq's own dequantizer.

    With ``model``, the checkpoint's quantized modules are checked against the model's
    architecture (a clear error names modules that do not belong to it).
    """
    ckpt = load_gptq_checkpoint(path)
    if model is not None:
        check_architecture(ckpt, set(layout.modules(model.cfg)))
    qc = ckpt.quant_config
    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    quantizer = (qc.get("meta") or {}).get("quantizer") or []
    method = meta.get("method") or ("rtn" if any("rtn" in str(q) for q in quantizer) else "gptq")
    bits, gs = int(qc["bits"]), int(qc.get("group_size", -1))
    sym, act = bool(qc.get("sym", True)), bool(qc.get("desc_act", False))
    return Variant(
        name=name or meta.get("name") or variant_name(method, bits, gs, sym, act),
        method=method,
        bits=bits,
        group_size=gs,
        sym=sym,
        desc_act=act,
        modules=ckpt.modules,
        meta=dict(meta, path=str(path), quantize_config=qc),
    )
