"""Protection rules: which modules they pick, their bit budget, and the variants they make."""

import pytest
import torch

import mechq
from mechq.repair import protect as P
from mechq.quant import dynamic as dyn
from mechq.quant import layout


def test_early_layers_rule_covers_exactly_the_first_k_layers(tiny):
    rules = P.early_layers(tiny, k=2)
    for s in layout.sites(tiny.cfg):
        got = dyn.resolve(s.module, {"bits": 4}, rules)["bits"]
        assert got == (8 if s.layer < 2 else 4), s.module
    with pytest.raises(ValueError, match="k must lie"):
        P.early_layers(tiny, k=0)


def test_kurtosis_ranking_follows_its_definition(tiny):
    rank = P.kurtosis_ranking(tiny)
    assert len(rank) == len(layout.modules(tiny.cfg))
    assert rank["kurtosis"].is_monotonic_decreasing
    top = rank.iloc[0]
    w = layout.module_weight(tiny, top["module"]).double().flatten()
    z = (w - w.mean()) / w.std()
    # float64 moments of the same tensor: only summation order differs
    assert top["kurtosis"] == pytest.approx(float((z ** 4).mean() - 3), rel=1e-9)


def test_kurtosis_protection_stays_within_its_budget(tiny):
    base = P.estimated_bits(tiny, 4, 32)
    budget = base + 0.5
    rules = P.kurtosis_protection(tiny, 4, budget, group_size=32)
    high = {m: 8 for m in layout.modules(tiny.cfg)
            if dyn.resolve(m, {"bits": 4}, rules)["bits"] == 8}
    assert high and P.estimated_bits(tiny, 4, 32, high) <= budget
    order = list(P.kurtosis_ranking(tiny)["module"])
    assert order[0] in high  # the most heavy-tailed module is protected first (it fits here)
    with pytest.raises(ValueError, match="below the base"):
        P.kurtosis_protection(tiny, 4, base - 0.1, group_size=32)


def test_protected_rtn_variant_has_its_bits_and_predicted_average(tiny):
    rules = P.early_layers(tiny, k=1)
    v = mechq.quantize(tiny, "rtn", bits=4, group_size=32, dynamic=rules)
    bits = v.module_bits
    assert all(b == (8 if ".h.0." in m else 4) for m, b in bits.items())
    high = {m: 8 for m in bits if ".h.0." in m}
    # the estimate counts fp16 scales and one b-bit zero per group, as the packed tensors do
    # (packing pads zero points to whole int32 words: a fraction of a percent here)
    assert v.avg_bits == pytest.approx(P.estimated_bits(tiny, 4, 32, high), rel=0.01)
    assert torch.is_tensor(v.weight(next(iter(high))))


def test_estimate_counts_partial_groups_like_the_checkpoint(smol, smol_gptq):
    # SmolLM2's 576-wide inputs hold 4.5 groups of 128: the checkpoint stores 5 scales per row.
    # 4-bit codes and zero points fill whole int32 words at these widths, so the estimate is
    # exact up to float rounding of the sum
    assert P.estimated_bits(smol, 4, 128) == pytest.approx(smol_gptq[4].avg_bits, rel=1e-12)
