"""AWQ checkpoints (GEMM format), read by mechq's own reader.

AWQ (activation-aware weight quantization) scales each input channel of a group of linear modules
by ``s`` before quantizing them, and divides the module that produces that input by ``s``, so the
full-precision function is unchanged. What lands on disk (AutoAWQ's and GPTQModel's "gemm"
version, 4 bits, ``quant_method`` ``"awq"``):

- **qweight** int32 ``(in, out / 8)``: word ``j`` of input row ``i`` holds the codes of output
  channels ``8j … 8j+7``; its 4-bit field ``k`` (bits ``4k … 4k+3``) holds channel
  ``8j + AWQ_ORDER[k]`` with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``. Reading the fields in
  sequential order instead scrambles every group of 8 output channels (the bug of
  :func:`mechq.quant.faults.awq_order_as_gptq`).
- **qzeros** int32 ``(in / g, out / 8)``: the zero point of each group, packed the same way.
- **scales** ``(in / g, out)``, bfloat16 or float16 as the quantizer saved them.
- the weight: ``W[o, i] = (q[i, o] - z[i // g, o]) · s[i // g, o]``. There is no ``g_idx``: groups
  are contiguous runs of ``g`` input channels, and ``g`` must divide every input width.
- the folds: the scales of q/k/v's input are divided out of the norm before them
  (``input_layernorm``), those of gate/up's input out of ``post_attention_layernorm``, those of
  down's input out of up's rows (and of o's input out of v's rows when their shapes allow; not
  with grouped-query attention). Folds into quantized modules are in their codes; the rewritten
  norms are ordinary tensors in the checkpoint, and a variant must carry them
  (:attr:`mechq.quant.variants.Variant.norms`).

:func:`load_awq_checkpoint` turns each module losslessly into a :class:`PackedLinear` (codes and
zero points repacked in the GPTQ layout, ``zero_offset`` 0, scales kept in their stored dtype), so
the rest of mechq handles AWQ and GPTQ alike. bfloat16 scales dequantize exactly in float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from mechq.quant.formats.common import (
    Checkpoint,
    CheckpointError,
    check_dtypes,
    check_module_tensors,
    check_shapes,
    module_parts,
    read_quant_config,
    read_tensors,
    tensor_error,
)
from mechq.quant.packing import SCALE_DTYPES, PackedLinear, unpack_int

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_BITS = 4  # the GEMM layout's interleaving is defined for 4-bit codes
AWQ_VERSIONS = ("gemm",)
AWQ_TENSORS: tuple[str, ...] = ("qweight", "qzeros", "scales")
_SUPPORTED = "mechq reads AWQ checkpoints: quant_method 'awq', version 'gemm', bits 4, int32 words"


def _unpack_awq(words: Tensor, size: int) -> Tensor:
    """4-bit fields of int32 ``words`` ``(rows, size / 8)`` in AWQ's order -> ``(rows, size)``."""
    seq = unpack_int(words, AWQ_BITS, 1, size)  # field k of word j at column 8j + k
    perm = torch.arange(size).view(-1, 8)[:, list(AWQ_ORDER)].reshape(-1)
    out = torch.empty_like(seq)
    out[:, perm] = seq  # field k of word j is channel 8j + AWQ_ORDER[k]
    return out


def normalize_awq_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate an AWQ quantization config; fill ``bits``, ``group_size``, ``sym``,
    ``desc_act`` (False) and ``checkpoint_format`` (``"awq_gemm"``)."""
    qc = dict(raw)
    method = str(qc.get("quant_method") or qc.get("method") or "").lower()
    if method != "awq":
        raise CheckpointError(f"{source}: quant_method {method!r} is not 'awq'; {_SUPPORTED}")
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if version not in AWQ_VERSIONS:
        raise CheckpointError(f"{source}: AWQ version {version!r} is not supported "
                              f"(GEMV and Marlin layouts differ); {_SUPPORTED}")
    try:
        bits = int(qc.get("bits", qc.get("w_bit", 0)))
        group_size = int(qc.get("group_size", qc.get("q_group_size", 0)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad bits / group_size ({e})") from None
    if bits != AWQ_BITS:
        raise CheckpointError(f"{source}: unsupported bits={bits}; {_SUPPORTED}")
    if group_size <= 0:
        raise CheckpointError(f"{source}: AWQ group_size must be positive, got {group_size}")
    if qc.get("dynamic"):
        raise CheckpointError(f"{source}: per-module 'dynamic' rules in an AWQ checkpoint are "
                              "not supported (GPTQModel's AWQ allows only skipping)")
    qc.update(quant_method="awq", version=version, checkpoint_format="awq_gemm", bits=bits,
              group_size=group_size, sym=not bool(qc.get("zero_point", False)), desc_act=False)
    return qc


def _build(name: str, t: dict[str, Tensor], origin: dict[str, str], group_size: int
           ) -> PackedLinear:
    err = tensor_error(name, origin)
    check_dtypes(t, err, ("qweight", "qzeros"), (torch.int32,), "torch.int32")
    check_dtypes(t, err, ("scales",), SCALE_DTYPES, "bfloat16 or float16")
    for part in AWQ_TENSORS:
        if t[part].ndim != 2:
            raise err(part, f"has shape {tuple(t[part].shape)}, expected 2 dimensions")
    n_in, n_out = int(t["qweight"].shape[0]), int(t["scales"].shape[1])
    if n_in % group_size:
        raise err("qweight", f"has {n_in} input rows, not a multiple of group_size {group_size}")
    groups = n_in // group_size
    expected = {"qweight": (n_in, n_out // 8), "qzeros": (groups, n_out // 8),
                "scales": (groups, n_out)}
    if n_out % 8:
        raise err("scales", f"has {n_out} output channels, not a multiple of 8")
    if "bias" in t:
        expected["bias"] = (n_out,)
    check_shapes(t, err, expected, f"in_features={n_in} from qweight, out_features={n_out} "
                                   f"from scales, group_size={group_size}; AWQ GEMM layout")
    codes = _unpack_awq(t["qweight"], n_out)
    zeros = _unpack_awq(t["qzeros"], n_out)
    return PackedLinear.from_codes(
        codes, zeros, t["scales"], torch.arange(n_in, dtype=torch.int32) // group_size,
        AWQ_BITS, group_size, zero_offset=0, bias=t.get("bias"), scale_dtype=t["scales"].dtype)


def load_awq_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an AWQ GEMM checkpoint directory with mechq's own reader.

    Returns a :class:`~mechq.quant.formats.common.Checkpoint` whose modules are the AWQ modules
    repacked in the GPTQ layout (exact: the same codes, zero points and scales) and whose
    ``other`` tensors include the norms AWQ rewrote. Raises :class:`CheckpointError` naming the
    file (and tensor) for a config that is not AWQ GEMM 4-bit, a module with a missing, extra,
    mistyped or misshapen tensor, or no quantized modules.
    """
    root = Path(path)
    hf_config, raw, source = read_quant_config(root)
    qc = normalize_awq_config(raw, source)
    tensors, origin = read_tensors(root)
    if any(k.endswith(".g_idx") for k in tensors):
        key = next(k for k in tensors if k.endswith(".g_idx"))
        raise CheckpointError(f"{origin[key]}: tensor '{key}' is a GPTQ tensor, but {source} "
                              "says AWQ; is the config from another checkpoint?")
    modules: dict[str, PackedLinear] = {}
    claimed: set[str] = set()
    for name, parts in module_parts(tensors, AWQ_TENSORS).items():
        check_module_tensors(name, parts, tensors, origin, AWQ_TENSORS, parts,
                             extra_note=f"an AWQ module holds only {', '.join(AWQ_TENSORS)} "
                                        "and bias")
        modules[name] = _build(name, parts, origin, qc["group_size"])
        claimed.update(f"{name}.{p}" for p in parts)
    if not modules:
        raise CheckpointError(f"{root}: no quantized modules found (no '<module>.qweight' "
                              "tensors)")
    return Checkpoint.assemble(root, qc, modules, tensors, claimed, hf_config)


#: (producer, consumer) components whose scales AWQ folds from one into the other when their
#: shapes allow (v's outputs are o's inputs only without grouped-query attention)
FOLD_PAIRS: tuple[tuple[str, str], ...] = (("v", "o"), ("up", "down"))


#: The range of a plausible AWQ scale: GPTQModel's AWQ clamps its scales at 1e-4 below and
#: normalises them by sqrt(max · min), so a folded scale far outside this range is not one.
SCALE_RANGE = (1e-4, 1e4)


def _plausible(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` per channel, where that is a plausible AWQ scale; 1 (no fold) elsewhere.
    A least-squares ratio is meaningless where the quantized module is uncorrelated with FP
    (a misread checkpoint): its denominator is then about 0 or negative."""
    s = num / den
    ok = (den > 0) & (s >= SCALE_RANGE[0]) & (s <= SCALE_RANGE[1])
    return torch.where(ok, s, torch.ones_like(s))


def fp_targets(model, variant) -> dict[str, Tensor]:
    """The FP weights in AWQ's coordinates: what each module of an AWQ ``variant`` encodes.

    AWQ quantizes ``diag(1/s_out) · W · diag(s_in)``: ``s_in`` is the scale folded into the
    module's input (exactly ``norm_fp / norm_awq`` after a rewritten norm, or, after a quantized
    producer, the per-channel ratio estimated from the *other* module of the pair, by least
    squares), ``s_out`` the scale the next module took from its output. Comparing a module with
    this target instead of ``W`` keeps the weight-space signatures (:mod:`mechq.analysis.signatures`)
    meaningful for AWQ. Modules fused with others (GPT-2's ``c_attn``) keep ``s = 1`` here.
    """
    from mechq.quant import layout

    params = dict(model.named_parameters())
    sites = layout.sites(model.cfg)
    own = {(s.layer, s.component): s.module for s in sites
           if sum(t.module == s.module for t in sites) == 1}
    fp = {m: layout.module_weight(model, m).detach().float() for m in set(own.values())}
    q = {m: variant.weight(m) for m in set(own.values()) if m in variant.modules}
    s_in: dict[str, Tensor] = {}
    for n in layout.norm_sites(model.cfg):
        if n.tensor in variant.norms and n.param.endswith(".w"):
            ratio = params[n.param].detach().float() / variant.norms[n.tensor].float()
            for c in n.components:
                if (n.layer, c) in own:
                    s_in[own[(n.layer, c)]] = ratio
    s_out: dict[str, Tensor] = {}
    for layer in range(model.cfg.n_layers):
        for prod, cons in FOLD_PAIRS:
            p, c = own.get((layer, prod)), own.get((layer, cons))
            if p is None or c is None or p not in q or c not in q:
                continue
            if fp[p].shape[0] != fp[c].shape[1]:
                continue  # no fold between them (e.g. grouped-query attention)
            # consumer columns: q_c[:, j] ≈ fp_c[:, j] · s[j]  ->  s from the consumer, used
            # for the producer's rows; producer rows: q_p[j] ≈ fp_p[j] · s_in_p / s[j]  ->  s
            # from the producer, used for the consumer's columns
            fc = fp[c]
            s_from_c = _plausible((fc * q[c]).sum(0), (fc * fc).sum(0))
            pp = fp[p] * s_in.get(p, torch.ones(fp[p].shape[1]))
            s_from_p = _plausible((pp * pp).sum(1), (pp * q[p]).sum(1))
            s_out[p] = s_from_c
            s_in[c] = s_from_p
    out = {}
    for m, w in fp.items():
        if m not in variant.modules:
            continue
        if m in s_in:
            w = w * s_in[m][None, :]
        if m in s_out:
            w = w / s_out[m][:, None]
        out[m] = w
    return out
