"""FP8 (e4m3) weights: the one weight format mechq holds that is not an integer grid.

A module's weight ``W`` ``(out, in)`` is held as ``float8_e4m3fn`` codes ``c`` ``(out, in)`` and
one scale ``s`` per output row (per-channel; a per-tensor checkpoint is the case of equal rows):

- quantized (:func:`quantize_fp8_weights`): ``s_o = max_i |W[o, i]| / 448`` (float32; 448 is the
  largest finite e4m3 value), ``c = fp8(clamp(W / s, −448, 448))`` (torch's cast: round to
  nearest even);
- dequantized: ``W_q = c · s`` rounded once to the scale's dtype, which is what compressed-tensors
  computes (it casts ``c`` to the scale's dtype, exactly, and multiplies there).

:class:`Fp8Linear` stands in :attr:`Variant.modules <mechq.quant.variants.Variant.modules>` where a
:class:`~mechq.quant.packing.PackedLinear` usually does, and offers what :class:`Variant` and
:func:`~mechq.quant.variants.swap` use of one: ``weight(dtype)``, ``to(device)``, ``bits``,
``in_features``, ``out_features``, ``qweight`` / ``qzeros`` / ``scales`` (counted by
``Variant.avg_bits``) and ``nbytes``. It has no integer codes, zero points or ``g_idx``: code
that reads those of a module (weight signatures, fault injection, the GPTQ writer) does not take
an FP8 variant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Float8e4m3fn
from torch import Tensor
from transformer_lens import HookedTransformer

from mechq.quant import layout
from mechq.quant.activation_quant import FP8_MAX
from mechq.quant.packing import SCALE_DTYPES
from mechq.quant.variants import Variant

FP8_DTYPE = torch.float8_e4m3fn
#: the name of the variant :func:`quantize_fp8_weights` makes (8-bit, per-channel, no group)
FP8_VARIANT = "fp8-w8"


@dataclass(eq=False)
class Fp8Linear:
    """One FP8-e4m3 linear layer (module docstring): ``qweight`` the codes ``(out, in)`` in
    ``torch.nn.Linear`` orientation (as compressed-tensors stores them), ``scales`` one per output
    row ``(out,)`` in one of :data:`~mechq.quant.packing.SCALE_DTYPES`, ``bias`` as stored."""

    qweight: Float8e4m3fn[Tensor, "out in"]
    scales: Float[Tensor, " out"]
    bias: Float[Tensor, " out"] | None = None

    bits = 8
    group_size = -1

    def __post_init__(self) -> None:
        if not isinstance(self.qweight, Tensor) or self.qweight.dtype != FP8_DTYPE:
            got = self.qweight.dtype if isinstance(self.qweight, Tensor) else type(self.qweight)
            raise ValueError(f"qweight must be a {FP8_DTYPE} tensor, got {got}")
        if not isinstance(self.scales, Tensor) or self.scales.dtype not in SCALE_DTYPES:
            got = self.scales.dtype if isinstance(self.scales, Tensor) else type(self.scales)
            raise ValueError(f"scales must be a {' or '.join(map(str, SCALE_DTYPES))} tensor, "
                             f"got {got}")
        if self.qweight.ndim != 2:
            raise ValueError(f"qweight must be 2-D (out, in), got {tuple(self.qweight.shape)}")
        expected = {"scales": (self.out_features,)}
        if self.bias is not None:
            expected["bias"] = (self.out_features,)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, expected {shape} for qweight "
                                 f"{tuple(self.qweight.shape)}")

    def __repr__(self) -> str:
        return (f"Fp8Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"scales={self.scales.dtype}, bias={self.bias is not None})")

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def qzeros(self) -> Tensor:
        """No zero points (FP8 is symmetric): an empty tensor, so storage counts see none."""
        return self.qweight.new_empty(0, dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes, the scales and the bias."""
        ts = [self.qweight, self.scales] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device: torch.device | str) -> Fp8Linear:
        """The same layer with its tensors on ``device`` (``self`` when they are there)."""
        device = torch.device(device)
        if self.qweight.device == device:
            return self
        bias = None if self.bias is None else self.bias.to(device)
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device),
                       bias=bias)

    def weight(self, dtype: torch.dtype = torch.float32) -> Float[Tensor, "out in"]:
        """``c · s`` ``(out, in)``, rounded once to the scale's dtype, then cast to ``dtype``.

        The product is formed in float64, where it is exact (a 4-bit significand times one of at
        most 24 bits), so the single rounding to the scale's dtype is the one compressed-tensors'
        decompression makes in that dtype."""
        exact = self.qweight.to(torch.float64) * self.scales.to(torch.float64)[:, None]
        return exact.to(self.scales.dtype).to(dtype).contiguous()

    @classmethod
    def from_weight(cls, w: Float[Tensor, "out in"], bias: Float[Tensor, " out"] | None = None
                    ) -> Fp8Linear:
        """Quantize ``w`` per output row (module docstring); float32 scales. An all-zero row gets
        the smallest positive float32 scale (its codes are 0)."""
        wf = w.detach().to(torch.float32)
        scales = (wf.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        codes = (wf / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return cls(codes.contiguous(), scales.contiguous(),
                   None if bias is None else bias.detach())


def quantize_fp8_weights(model: HookedTransformer, name: str = FP8_VARIANT) -> Variant:
    """FP8-e4m3 per-channel weights of every linear module of ``model`` (its current weights;
    module docstring), as a :class:`~mechq.quant.variants.Variant` of :class:`Fp8Linear`
    modules (method ``"fp8"``, 8 bits, per channel, symmetric), on the CPU. An activation
    scheme rides on it as on any variant (:func:`~mechq.quant.variants.with_activations`)."""
    modules = {m: Fp8Linear.from_weight(layout.module_weight(model, m).cpu())
               for m in layout.modules(model.cfg)}
    return Variant(name=name, method="fp8", bits=8, group_size=-1, sym=True, desc_act=False,
                   modules=modules)
