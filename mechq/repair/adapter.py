"""An EoRA correction as a PEFT LoRA adapter: what a user ships beside the quantized model.

:func:`mechq.repair.eora.eora` gives a :class:`~mechq.quant.variants.Variant` whose
``lowrank[module] = (B, A)`` makes a module's weight ``W_q + B A``. :func:`write_peft_adapter`
writes those factors in PEFT's LoRA format, so that ``peft.PeftModel.from_pretrained(base, dir)``
on the quantized (or dequantized, :func:`mechq.quant.formats.dense.dequantized_hf_model` with
``lowrank=False``) transformers model computes what :func:`mechq.swap` computes with the variant.
:func:`read_peft_adapter` reads such an adapter (mechq's or any other plain LoRA one) back into
``(B, A)`` pairs.

**Definition.** PEFT's LoRA layer computes ``y = base(x) + s · lora_B(lora_A(x))`` with
``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)`` and scaling ``s = lora_alpha / r``
(``lora_alpha / √r`` with ``use_rslora``). Written here, for every module ``m`` with factors:

- ``adapter_model.safetensors``: ``base_model.model.<m>.lora_A.weight = A`` and
  ``base_model.model.<m>.lora_B.weight = B``, in the dtype the variant holds them (float16 from
  :func:`~mechq.repair.eora.eora` by default), unchanged, so a read gives the same bits back.
  ``<m>`` is mechq's module name, which *is* the Hugging Face module path
  (``model.layers.0.self_attn.q_proj``; :mod:`mechq.models.families`). The file's metadata
  records the variant's name and its EoRA settings.
- ``adapter_config.json``: ``peft_type`` ``"LORA"``, ``task_type`` ``"CAUSAL_LM"``, ``r`` the most
  common rank and ``lora_alpha = r``, so ``s = 1`` and the layer adds exactly ``B A x``; a module
  of another rank is listed in ``rank_pattern`` and ``alpha_pattern`` (its full name as an
  escaped regular expression, with ``alpha = rank``: ``s = 1`` there too). ``target_modules``:
  the short name (``q_proj``, ``down_proj``, GPT-2's ``c_attn``) when every module of that name
  has factors, else the full names of those that do. ``fan_in_fan_out`` is true for a family
  whose modules are ``Conv1D`` (GPT-2; only merging reads it), ``bias`` ``"none"``, no dropout,
  ``base_model_name_or_path`` as given, else the variant's checkpoint directory when it is a
  loadable model (it holds a ``config.json``), else null.

GPT-2's fused ``c_attn`` is one module to mechq and to PEFT alike: its EoRA factors are fitted to
the whole fused ``(3·d_model, d_model)`` weight, so one LoRA on ``c_attn`` is the same correction.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.models.families import family_of
from mechq.quant import layout
from mechq.quant.variants import Variant

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of a causal LM's module names in a saved adapter
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"

Factors = dict[str, tuple[Float[Tensor, "out r"], Float[Tensor, "r in"]]]


class AdapterError(ValueError):
    """A variant mechq cannot write as a PEFT adapter, or an adapter it cannot read."""


def _module_shapes(model: HookedTransformer) -> dict[str, tuple[int, int]]:
    return {m: tuple(layout.module_weight(model, m).shape) for m in layout.modules(model.cfg)}


def _check_factors(lowrank: Mapping[str, tuple[Tensor, Tensor]],
                   shapes: Mapping[str, tuple[int, int]], what: str) -> None:
    """Each module belongs to the model and its ``B`` ``(out, r)``, ``A`` ``(r, in)`` fit it."""
    for m, (b, a) in lowrank.items():
        if m not in shapes:
            raise AdapterError(f"{what}: {m!r} is not a linear module of this model; was it made "
                               "for another model?")
        out, inp = shapes[m]
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != out or a.shape[1] != inp \
                or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{what}: {m} has B {tuple(b.shape)} and A {tuple(a.shape)}; the "
                               f"module is {out}×{inp}, so they must be ({out}, r) and (r, {inp}).")


def _targets(modules: list[str], all_modules: list[str]) -> list[str]:
    """Short names where every module of that name is covered, else the full names."""
    have = set(modules)
    by_leaf: dict[str, list[str]] = {}
    for m in all_modules:
        by_leaf.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    out: list[str] = []
    for leaf, ms in by_leaf.items():
        if all(m in have for m in ms):
            out.append(leaf)
        else:
            out += [m for m in ms if m in have]
    return sorted(out)


def _base_model(variant: Variant) -> str | None:
    path = variant.meta.get("path")
    return str(path) if path and (Path(path) / "config.json").exists() else None


def write_peft_adapter(
    variant: Variant,
    out_dir: str | os.PathLike,
    model: HookedTransformer,
    *,
    base_model: str | None = None,
) -> Path:
    """Write ``variant``'s low-rank factors as a PEFT LoRA adapter (scaling 1); returns ``out_dir``.

    ``out_dir`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` (format and
    definitions in :mod:`mechq.repair.adapter`): loaded with ``peft.PeftModel.from_pretrained``
    onto a transformers model holding the variant's quantized weights, each module computes
    ``W_q x + B A x``. ``model``: the ``HookedTransformer`` the variant was made for (module
    names, shapes, and whether the family stores ``Conv1D``). ``base_model``: the
    ``base_model_name_or_path`` to record, the quantized model the adapter goes on (a hub id or
    a path; default: the variant's checkpoint directory if it is a loadable model, else none).
    Raises :class:`AdapterError` (a ValueError) for a variant without low-rank factors (make
    them with :func:`mechq.repair.eora.eora`), or with factors for modules it does not pack or
    that do not fit ``model``. Writes no other file; the two are replaced if present.
    """
    if not variant.lowrank:
        raise AdapterError(f"Variant {variant.name!r} has no low-rank factors to write; make them "
                           f"with mechq.eora(model, variant, rank) and write that variant.")
    loose = [m for m in variant.lowrank if m not in variant.modules]
    if loose:
        raise AdapterError(f"Variant {variant.name!r} has low-rank factors for {loose[0]!r}, a "
                           "module it does not pack: mechq.swap would not apply them, so the "
                           "adapter would not be the same correction.")
    shapes = _module_shapes(model)
    _check_factors(variant.lowrank, shapes, f"Variant {variant.name!r}")
    ranks = {m: int(b.shape[1]) for m, (b, _) in variant.lowrank.items()}
    counts = Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k))  # the most common rank, the smaller on ties
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model if base_model is not None else _base_model(variant),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _targets(list(variant.lowrank), list(shapes)),
        "fan_in_fan_out": bool(family_of(model.cfg).conv1d),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for m, (b, a) in variant.lowrank.items():
        tensors[f"{PREFIX}{m}{A_KEY}"] = a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{m}{B_KEY}"] = b.detach().cpu().contiguous()
    meta = {"format": "pt", "mechq_variant": variant.name,
            "mechq_eora": json.dumps(variant.meta.get("eora"), sort_keys=True)}

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, root / ADAPTER_WEIGHTS)
    (root / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return root


def _pattern_value(patterns: Mapping[str, int | float], module: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key that, as a regular
    expression, matches the end of the module name at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_adapter(path: str | os.PathLike, model: HookedTransformer | None = None) -> Factors:
    """``{module: (B, A)}`` from a PEFT LoRA adapter directory, such that the module's weight
    with the adapter applied is ``W + B A``.

    Factors come back in their stored dtype and bit for bit, except when the adapter's scaling
    ``s`` (``lora_alpha / r``, or ``/ √r`` with ``use_rslora``, per module with
    ``rank_pattern`` / ``alpha_pattern``) is not 1: then ``B`` is ``s · lora_B`` in float32.
    Attach them with ``dataclasses.replace(variant, lowrank=factors)``. With ``model``, each
    module is checked to be one of its linear modules with matching shapes. Raises
    :class:`AdapterError` for what a ``W + B A`` correction cannot express (not LoRA, DoRA,
    LoRA biases, ``modules_to_save`` or embedding tensors, an unknown key) or a missing file.
    """
    root = Path(path)
    try:
        config = json.loads((root / ADAPTER_CONFIG).read_text())
        with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as e:
        raise AdapterError(f"{root}: not a PEFT adapter directory ({e.filename} is missing); "
                           f"expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.") from None
    where = str(root / ADAPTER_CONFIG)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r}; mechq reads LORA "
                           "adapters only.")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterError(f"{where}: {flag} is set; a {flag.removeprefix('use_')} adapter "
                               "is not a W + B A correction.")
    if config.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save {config['modules_to_save']} replaces whole "
                           "modules; mechq reads low-rank corrections only.")

    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        part = next((p for p in (A_KEY, B_KEY) if key.endswith(p)), None)
        if part is None or not key.startswith(PREFIX):
            raise AdapterError(f"{root / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA factor "
                               f"'{PREFIX}<module>{A_KEY}' / '{B_KEY}'; mechq reads plain LoRA "
                               "adapters of linear modules only.")
        pairs.setdefault(key[len(PREFIX):-len(part)], {})[part] = t
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    out: Factors = {}
    for m, got in pairs.items():
        if set(got) != {A_KEY, B_KEY}:
            raise AdapterError(f"{root / ADAPTER_WEIGHTS}: {m} has only "
                               f"{'lora_A' if A_KEY in got else 'lora_B'}.")
        b, a = got[B_KEY], got[A_KEY]
        r = int(_pattern_value(rank_pattern, m, r0))
        if a.shape[0] != r:
            raise AdapterError(f"{where}: {m} has rank {a.shape[0]} in the file, {r} in the "
                               "config.")
        alpha = float(_pattern_value(alpha_pattern, m, alpha0))
        s = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        out[m] = (b, a) if s == 1.0 else (b.float() * s, a)
    if model is not None:
        _check_factors(out, _module_shapes(model), str(root))
    return out
