"""Round-to-nearest: the grid, its error bound, packing and the memory of a variant."""

import pytest
import torch

import mechq
from mechq.quant.rtn import rtn_quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_within_half_a_step(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 320, generator=g)  # 320 = 2.5 groups of 128: a partial last group
    p = rtn_quantize_weight(w, bits, 128, sym)
    assert p.codes().min() >= 0 and p.codes().max() <= 2**bits - 1
    deq = p.weight(torch.float32)
    assert deq.shape == w.shape
    step = p.scales.float()[p.g_idx.long()].T  # (out, in)
    # Inside the grid's range the error is at most half a step; the slack covers the fp16
    # rounding of the scale and of the result (relative 2**-11 = 4.9e-4 < 1e-3).
    err = (deq - w).abs()
    # Elementwise ops only; measured: all 30720 weights inside the bound for every bits/sym, so
    # the ulp-level differences of seeded randn between CPUs cannot reach 3 % (or 0.1 %) outside.
    assert (err <= step / 2 + 1e-3 * w.abs() + 1e-6).float().mean() > (0.97 if sym else 0.999)


def test_rtn_8bit_is_close_and_2bit_is_coarse():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    e8 = (rtn_quantize_weight(w, 8, 128).weight() - w).pow(2).mean()
    e2 = (rtn_quantize_weight(w, 2, 128).weight() - w).pow(2).mean()
    assert e8 < 1e-3 * w.pow(2).mean()  # measured 4.4e-5 (step²/12 at 8 bits): 20x room
    assert e2 > 100 * e8  # measured e2 / e8 = 7100: 70x room


def test_asym_represents_zero_point_zero():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(8, 128, generator=g) + 0.5  # all positive: lo = 0, zero point 0
    p = rtn_quantize_weight(w, 4, 128, sym=False)
    assert (p.zeros() == 0).all()
    # Half a step plus fp16 rounding is the bound (measured 0.50 of the largest step); one full
    # step fails only if the grid is wrong.
    assert (p.weight() - w).abs().max() < p.scales.float().max()


def test_variant_memory_and_average_bits(tiny):
    v4 = mechq.quantize(tiny, "rtn", bits=4, group_size=128)
    fp_bytes_fp16 = 2 * v4.n_weights
    # codes at 4/16 of fp16, plus one fp16 scale and one 4-bit zero per 128 weights. Byte counts,
    # no float noise: exact here (tiny's widths are multiples of 128); abs=0.01 would admit a
    # partial last group or word padding, not a missing scale (1/8 bit).
    assert v4.avg_bits == pytest.approx(4 + 16 / 128 + 4 / 128, abs=0.01)
    assert v4.nbytes < 0.30 * fp_bytes_fp16  # measured 0.269 (g_idx adds to avg_bits' 0.260)
    v2 = mechq.quantize(tiny, "rtn", bits=2, group_size=128)
    assert v2.avg_bits == pytest.approx(2 + 16 / 128 + 2 / 128, abs=0.01)  # same count: exact


def test_rtn_rejects_unsupported_bits(tiny):
    with pytest.raises(ValueError, match="bits"):
        mechq.quantize(tiny, "rtn", bits=5)
    with pytest.raises(ValueError, match="Unknown method"):
        mechq.quantize(tiny, "hqq", bits=4)
    # GPTQModel's AWQ fails on GPT-2's fused c_attn; mechq says so before starting a job
    with pytest.raises(ValueError, match="AWQ is not available.*c_attn"):
        mechq.quantize(tiny, "awq", bits=4)
