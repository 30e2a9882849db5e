"""GPTQ bit packing of integer codes, and the packed linear layer it produces.

Layout (GPTQ / GPTQModel, ``pack_dtype`` int32):

- **Packing rule.** ``n`` codes of ``bits`` bits each, taken along one dimension, are written into
  ``ceil(n * bits / 32)`` int32 words along that dimension. Consecutive words form one
  little-endian bit stream: code ``k`` occupies stream bits ``[k*bits, (k+1)*bits)``, i.e. bits
  ``k*bits % 32 ...`` of word ``k*bits // 32``, low bits first. For 2/4/8 bits a word holds
  32/bits whole codes; for 3 bits, 32 codes fill 3 words and codes 10 and 21 straddle a word
  boundary (GPTQModel's "10 | 1 | 10 | 1 | 10" scheme is exactly this rule). Words are stored as
  signed int32 (two's complement); internally everything is done on unsigned values in int64.
- **qweight** ``(ceil(in*bits/32), out)``: the codes ``q`` of ``W^T`` (input-major), packed along
  the input dimension (dim 0).
- **qzeros** ``(n_groups, ceil(out*bits/32))``: per-group zero points packed along the output
  dimension (dim 1). GPTQ v1 checkpoints (``checkpoint_format="gptq"``, ``zero_offset=1``) store
  ``zero - 1``; v2 (``"gptq_v2"``, ``zero_offset=0``) store ``zero``.
- **scales** ``(n_groups, out)`` float16 (GPTQ; bfloat16 or float32 when another format's
  reader keeps the scales as stored, e.g. AWQ's bfloat16); **g_idx** ``(in,)`` int32: the group
  of each input channel (``i // group_size`` unless the checkpoint used act-order / ``desc_act``).
- Dequantized weight (input-major): ``W^T[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.

v1 zero points and their overflow. GPTQModel turns v1 ``qzeros`` into real zero points (and back)
with *whole-word* integer arithmetic for 2/4/8 bits: it adds the constant with a 1 in every field
(``0x11111111`` for 4 bits) to each int32 word, modulo 2**32, so a field holding ``maxq`` (a stored
``-1``) wraps to 0 and carries one into the next field of the same word; its v1 writer subtracts
the same constant, borrowing. For 3 bits it shifts each field by one modulo 8 with no carry.
:meth:`PackedLinear.zeros` and :meth:`PackedLinear.from_codes` use these exact semantics, so a
GPTQModel v1 checkpoint whose zero point is 0 round-trips and dequantizes bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from beartype import beartype
from jaxtyping import Float, Int, Int32, jaxtyped
from torch import Tensor

from mechq.vocab import SUPPORTED_BITS

WORD_BITS = 32
_MASK32 = (1 << WORD_BITS) - 1
_SIGN32 = 1 << (WORD_BITS - 1)
#: scale dtypes a PackedLinear holds: GPTQ's float16, AWQ's bfloat16, compressed-tensors' float32
SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bits={bits}: GPTQ int32 packing is implemented for bits {SUPPORTED_BITS}"
        )


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits: ``ceil(n * bits / 32)``."""
    _check_bits(bits)
    return -(-n * bits // WORD_BITS)


def _block(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole block: 32/bits codes in 1 word, or 32 codes in 3 words."""
    g = math.gcd(WORD_BITS, bits)
    return WORD_BITS // g, bits // g


def _to_signed32(words: Tensor) -> Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bit pattern."""
    return (((words & _MASK32) ^ _SIGN32) - _SIGN32).to(torch.int32)


def _to_unsigned32(words: Tensor) -> Tensor:
    """int32 (or any integer) words -> their unsigned 32-bit value in int64."""
    return words.to(torch.int64) & _MASK32


def _pack_words(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Pack codes (already in range) along ``dim``; returns unsigned words in int64."""
    per_block, words_per_block = _block(bits)
    x = codes.to(torch.int64).movedim(dim, 0)
    n, rest = x.shape[0], x.shape[1:]
    n_blocks = -(-n // per_block)
    if n_blocks * per_block != n:
        x = torch.cat([x, x.new_zeros((n_blocks * per_block - n, *rest))], dim=0)
    x = x.reshape(n_blocks, per_block, *rest)
    words = [x.new_zeros((n_blocks, *rest)) for _ in range(words_per_block)]
    for j in range(per_block):
        w, o = divmod(j * bits, WORD_BITS)
        words[w] |= (x[:, j] << o) & _MASK32
        if o + bits > WORD_BITS:  # the code straddles into the next word
            words[w + 1] |= x[:, j] >> (WORD_BITS - o)
    out = torch.stack(words, dim=1).reshape(n_blocks * words_per_block, *rest)
    return out[: packed_length(n, bits)].movedim(0, dim).contiguous()


def _unpack_words(words: Tensor, bits: int, dim: int, size: int) -> Tensor:
    """Unpack ``size`` codes along ``dim`` from words (any integer dtype); returns int32."""
    per_block, words_per_block = _block(bits)
    n_words = words.shape[dim]
    need = packed_length(size, bits)
    if n_words != need:
        raise ValueError(
            f"{n_words} packed words along dim {dim} cannot hold exactly {size} {bits}-bit codes "
            f"(expected ceil({size}*{bits}/32) = {need})"
        )
    maxq = (1 << bits) - 1
    if words_per_block == 1:
        # Fast path (2/4/8 bits): every code sits inside one word; shift all fields at once.
        # An arithmetic right shift of a negative int32 fills high bits, which the mask drops.
        w = words.movedim(dim, 0)
        shifts = torch.arange(0, WORD_BITS, bits, dtype=w.dtype, device=w.device)
        v = (w.unsqueeze(1) >> shifts.view(1, per_block, *([1] * (w.ndim - 1)))) & maxq
        out = v.reshape(n_words * per_block, *w.shape[1:])[:size]
        return out.movedim(0, dim).to(torch.int32).contiguous()
    p = _to_unsigned32(words).movedim(dim, 0)
    rest = p.shape[1:]
    n_blocks = -(-size // per_block)
    if n_blocks * words_per_block != n_words:
        pad = p.new_zeros((n_blocks * words_per_block - n_words, *rest))
        p = torch.cat([p, pad], dim=0)
    p = p.reshape(n_blocks, words_per_block, *rest)
    vals = []
    for j in range(per_block):
        w, o = divmod(j * bits, WORD_BITS)
        v = p[:, w] >> o
        if o + bits > WORD_BITS:
            v = v | (p[:, w + 1] << (WORD_BITS - o))
        vals.append((v & maxq).to(torch.int32))
    out = torch.stack(vals, dim=1).reshape(n_blocks * per_block, *rest)
    return out[:size].movedim(0, dim).contiguous()


def _check_range(codes: Tensor, bits: int, what: str) -> None:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {codes.dtype}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(
                f"{what} must lie in [0, {(1 << bits) - 1}] for bits={bits}, got [{lo}, {hi}]"
            )


@jaxtyped(typechecker=beartype)
def pack_int(codes: Int[Tensor, "..."], bits: int, dim: int) -> Int32[Tensor, "..."]:
    """Pack integer codes in ``[0, 2**bits)`` into int32 words along ``dim`` (GPTQ layout).

    Code ``k`` along ``dim`` occupies bits ``[k*bits, (k+1)*bits)`` of the little-endian stream
    formed by consecutive words; the result has ``ceil(n*bits/32)`` words along ``dim``.
    """
    _check_bits(bits)
    _check_range(codes, bits, "codes")
    return _to_signed32(_pack_words(codes, bits, dim))


@jaxtyped(typechecker=beartype)
def unpack_int(packed: Int[Tensor, "..."], bits: int, dim: int, size: int) -> Int32[Tensor, "..."]:
    """Inverse of :func:`pack_int`: the first ``size`` codes along ``dim``, as int32.

    ``packed`` must have exactly ``ceil(size*bits/32)`` words along ``dim``.
    """
    _check_bits(bits)
    return _unpack_words(packed, bits, dim, size)


def _ones_word(bits: int) -> int:
    """The int32 word with a 1 in every ``bits``-wide field (``0x11111111`` for 4 bits)."""
    return sum(1 << (k * bits) for k in range(WORD_BITS // bits))


def _expected_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size in (-1, 0) else -(-in_features // group_size)


@dataclass(eq=False)
class PackedLinear:
    """One GPTQ-packed linear layer (see the module docstring for the layout definitions).

    ``in_features`` / ``out_features`` are inferred from ``g_idx`` and ``scales`` when omitted.
    ``zero_offset`` is 1 for v1 checkpoints (qzeros store ``zero - 1``) and 0 for v2.
    """

    qweight: Int32[Tensor, "in_words out"]
    qzeros: Int32[Tensor, "groups out_words"]
    scales: Float[Tensor, "groups out"]
    g_idx: Int32[Tensor, " in"]
    bits: int
    group_size: int
    zero_offset: int = 1
    in_features: int | None = None
    out_features: int | None = None
    bias: Float[Tensor, " out"] | None = None

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.zero_offset not in (0, 1):
            raise ValueError(f"zero_offset must be 1 (GPTQ v1) or 0 (v2), got {self.zero_offset}")
        if not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")
        for name, dtypes in (("qweight", (torch.int32,)), ("qzeros", (torch.int32,)),
                             ("scales", SCALE_DTYPES), ("g_idx", (torch.int32,))):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype not in dtypes:
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                want = " or ".join(map(str, dtypes))
                raise ValueError(f"{name} must be a {want} tensor, got {got}")
        if self.g_idx.ndim != 1 or self.scales.ndim != 2:
            raise ValueError(
                f"g_idx must be 1-D and scales 2-D, got shapes {tuple(self.g_idx.shape)} and "
                f"{tuple(self.scales.shape)}"
            )
        if self.in_features is None:
            self.in_features = int(self.g_idx.shape[0])
        if self.out_features is None:
            self.out_features = int(self.scales.shape[1])
        n_in, n_out, bits = self.in_features, self.out_features, self.bits
        groups = _expected_groups(n_in, self.group_size)
        expected = {
            "qweight": (packed_length(n_in, bits), n_out),
            "qzeros": (groups, packed_length(n_out, bits)),
            "scales": (groups, n_out),
            "g_idx": (n_in,),
        }
        if self.bias is not None:
            expected["bias"] = (n_out,)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"{name} has shape {got}, expected {shape} for in_features={n_in}, "
                    f"out_features={n_out}, bits={bits}, group_size={self.group_size}"
                )
        if n_in:
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= groups:
                raise ValueError(f"g_idx values span [{lo}, {hi}] but there are {groups} groups")

    def __repr__(self) -> str:
        return (
            f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, n_groups={self.n_groups}, "
            f"zero_offset={self.zero_offset}, bias={self.bias is not None})"
        )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors (qweight, qzeros, scales, g_idx, bias)."""
        ts = [self.qweight, self.qzeros, self.scales, self.g_idx]
        if self.bias is not None:
            ts.append(self.bias)
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device: torch.device | str) -> PackedLinear:
        """The same layer with its tensors on ``device`` (``self`` when they are there)."""
        device = torch.device(device)
        if self.qweight.device == device:
            return self
        moved = {n: getattr(self, n).to(device) for n in ("qweight", "qzeros", "scales", "g_idx")}
        if self.bias is not None:
            moved["bias"] = self.bias.to(device)
        return replace(self, **moved)

    def codes(self) -> Int32[Tensor, "in out"]:
        """The integer codes ``q``, input-major ``(in, out)``."""
        return unpack_int(self.qweight, self.bits, 0, self.in_features)

    def zeros(self) -> Int32[Tensor, "groups out"]:
        """Real zero points ``(n_groups, out)``, with GPTQModel's v1 -> v2 overflow semantics."""
        if self.zero_offset == 0:
            z = _unpack_words(self.qzeros, self.bits, 1, self.out_features)
        elif self.bits == 3:
            z = (_unpack_words(self.qzeros, 3, 1, self.out_features) + 1) & self.maxq
        else:
            words = _to_unsigned32(self.qzeros) + _ones_word(self.bits)  # carries like int32 add
            z = _unpack_words(words & _MASK32, self.bits, 1, self.out_features)
        return z

    def dequantize(self) -> Float[Tensor, "in out"]:
        """``scales[g_idx] * (q - zeros[g_idx])``, input-major ``(in, out)``.

        float16 scales (GPTQ): float16 arithmetic, as GPTQModel's torch kernel does: an exact
        integer difference times the float16 scale, rounded once to float16. bfloat16 or float32
        scales: float32 arithmetic, which is exact for bfloat16 scales (an 8-bit significand
        times an integer of at most 8 bits fits float32's 24 bits) and rounds once for float32.
        """
        g = self.g_idx.long()
        scales = self.scales if self.scales.dtype == torch.float16 else self.scales.float()
        return scales[g] * (self.codes() - self.zeros()[g])

    def weight(self, dtype: torch.dtype = torch.float32) -> Float[Tensor, "out in"]:
        """The dequantized weight as ``torch.nn.Linear.weight`` ``(out, in)``, cast to ``dtype``."""
        return self.dequantize().T.to(dtype).contiguous()

    def with_zero_offset(self, zero_offset: int) -> PackedLinear:
        """The same layer with qzeros re-encoded for ``zero_offset`` (1: GPTQ v1, 0: v2)."""
        if zero_offset == self.zero_offset:
            return self
        return PackedLinear.from_codes(
            self.codes(), self.zeros(), self.scales, self.g_idx, self.bits, self.group_size,
            zero_offset=zero_offset, bias=self.bias,
        )

    @classmethod
    @jaxtyped(typechecker=beartype)
    def from_codes(
        cls,
        codes: Int[Tensor, "in out"],
        zeros: Int[Tensor, "groups out"],
        scales: Float[Tensor, "groups out"],
        g_idx: Int[Tensor, " in"],
        bits: int,
        group_size: int,
        zero_offset: int = 1,
        bias: Float[Tensor, " out"] | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> PackedLinear:
        """Pack codes ``(in, out)`` and real zero points ``(groups, out)`` into the GPTQ layout.

        ``scales`` are stored as ``scale_dtype`` (float16, GPTQ's; bfloat16 or float32 to keep
        another format's scales as they were stored). With ``zero_offset=1`` the qzeros are written as GPTQModel's
        v1 writer does (``zero - 1`` per field, borrowing across a 2/4/8-bit word), so
        :meth:`zeros` returns ``zeros`` exactly for every value in ``[0, 2**bits)``.
        """
        _check_bits(bits)
        if zero_offset not in (0, 1):
            raise ValueError(f"zero_offset must be 1 (GPTQ v1) or 0 (v2), got {zero_offset}")
        _check_range(codes, bits, "codes")
        _check_range(zeros, bits, "zeros")
        if zero_offset == 0:
            qzeros = _pack_words(zeros, bits, 1)
        elif bits == 3:
            qzeros = _pack_words((zeros.to(torch.int64) - 1) & 0x7, 3, 1)
        else:
            qzeros = _pack_words(zeros, bits, 1) - _ones_word(bits)  # borrows like int32 sub
        return cls(
            qweight=_to_signed32(_pack_words(codes, bits, 0)),
            qzeros=_to_signed32(qzeros),
            scales=scales.detach().to(scale_dtype).contiguous(),
            g_idx=g_idx.detach().to(torch.int32).contiguous(),
            bits=bits,
            group_size=group_size,
            zero_offset=zero_offset,
            in_features=int(codes.shape[0]),
            out_features=int(codes.shape[1]),
            bias=bias,
        )
