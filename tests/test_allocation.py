"""The budgeted allocation: exact against brute force, within budget, never worse than uniform,
and its mixed variant assembled from uniform variants with the bits it promised."""

import itertools
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

import mechq
from mechq.analysis import fisher as F
from mechq.analysis.kld import fp_reference, kld_stats
from mechq.quant import dynamic as dyn
from mechq.quant import layout
from mechq.repair import allocation as A
from tests.conftest import assert_params_equal, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# Two sums of the same float64 errors in other orders differ by a few ulps (< 1e-15 relative for
# a handful of terms); 1e-12 leaves room for that and for nothing else.
SUM_RTOL = 1e-12


@pytest.fixture(scope="module")
def variants(tiny, private_cache):
    return F.uniform_variants(tiny)


@pytest.fixture(scope="module")
def sens(tiny, variants):
    return F.sensitivity(tiny, variants=variants, progress=False)


def capacity(frame: pd.DataFrame, budget: float) -> int:
    n = frame.drop_duplicates("module")["n_params"].sum()
    return int(Fraction(repr(budget)) * int(n))


def brute_force(frame: pd.DataFrame, budget: float) -> float:
    """The least summed error over every combination of one option per module."""
    cap = capacity(frame, budget)
    groups = [g[["storage_bits", "fisher_error"]].to_numpy() for _, g in
              frame.groupby("module", sort=False)]
    best = np.inf
    for combo in itertools.product(*groups):
        c = sum(int(x[0]) for x in combo)
        if c <= cap:
            best = min(best, sum(x[1] for x in combo))
    return best


def synthetic(rng: np.random.Generator, n_modules: int, n_options: int) -> pd.DataFrame:
    """A random instance (non-convex trade-offs, unequal module sizes) in the frame's format."""
    rows = []
    for i in range(n_modules):
        n = int(rng.integers(50, 400))
        costs = np.sort(rng.integers(1, 10 * n, n_options))
        errs = np.sort(rng.random(n_options))[::-1] * rng.random() * 10
        for k in range(n_options):
            rows.append(dict(module=f"m{i}", layer=i, component="x", bits=k + 2,
                             variant=f"v{k}", group_size=128, n_params=n,
                             storage_bits=int(costs[k]), avg_bits=costs[k] / n,
                             fisher_error=float(errs[k])))
    return pd.DataFrame(rows)


def test_dp_is_the_brute_force_optimum(sens):
    """Real estimates (the tiny model's first 6 modules × 4 widths: 4 096 combinations) and 30
    random instances: the DP's summed error is the exhaustive minimum, within the budget, above
    the Lagrangian bound."""
    mods = list(dict.fromkeys(sens["module"]))[:6]
    real = sens[sens["module"].isin(mods)]
    rng = np.random.default_rng(0)
    cases = [(real, b) for b in (2.2, 2.6, 3.0, 3.5, 4.3, 6.0, 8.5)]
    for _ in range(30):
        frame = synthetic(rng, 5, 4)
        lo = frame.groupby("module")["storage_bits"].min().sum() / \
            frame.drop_duplicates("module")["n_params"].sum()
        cases.append((frame, round(float(lo) + rng.random() * 4, 3)))
    for frame, budget in cases:
        a = A.allocate(frame, budget)
        assert a.method == "dp-exact"
        assert a.storage_bits <= capacity(frame, budget)
        assert a.avg_bits <= budget
        best = brute_force(frame, budget)
        assert a.estimated_kl == pytest.approx(best, rel=SUM_RTOL), budget
        assert a.lower_bound <= a.estimated_kl * (1 + SUM_RTOL)


def test_rounded_dp_stays_within_budget_and_near_the_optimum(sens):
    """With a capacity of 64 units the costs are rounded up: still within budget, never better
    than the exact optimum, and within the bound the docstring states (checked directly: no
    worse than the exact optimum at the budget shrunk by M · unit bits, M = 16 modules; one bit
    more for the float repr of the shrunk budget)."""
    n = int(sens.drop_duplicates("module")["n_params"].sum())
    cheapest = sens.groupby("module")["storage_bits"].min().sum() / n
    for budget in (4.3, 6.0, 7.5):
        exact = A.allocate(sens, budget)
        rounded = A.allocate(sens, budget, max_units=64)
        assert rounded.method == "dp-rounded"
        assert rounded.avg_bits <= budget
        assert rounded.estimated_kl >= exact.estimated_kl * (1 - SUM_RTOL)
        shrunk = budget - (16 * rounded.unit + 1) / n
        assert shrunk >= cheapest
        assert rounded.estimated_kl <= A.allocate(sens, shrunk).estimated_kl * (1 + SUM_RTOL)
        assert exact.lower_bound <= exact.estimated_kl


def test_budget_is_respected_and_uniform_is_never_better(tiny, sens, variants):
    """At each uniform variant's own avg_bits the uniform choice is feasible, so the optimum
    estimates at most its KL; the budget holds in bits per weight counted as variants count."""
    for b, v in variants.items():
        a = A.allocate(sens, v.avg_bits)
        uniform = sens.loc[sens["bits"] == b, "fisher_error"].sum()
        assert a.avg_bits <= v.avg_bits
        assert a.estimated_kl <= uniform * (1 + SUM_RTOL)
        assert a.frame["module"].tolist() == layout.modules(tiny.cfg)
    top = A.allocate(sens, 100.0)  # all at 8 bits: nothing left to gain
    assert set(top.bits.values()) == {8} and top.gap == 0
    with pytest.raises(ValueError, match="below the cheapest"):
        A.allocate(sens, 2.0)


def test_assembled_variant_is_the_allocation(tiny, sens, variants):
    """The mixed variant takes each module's packed weights from its uniform variant (the same
    objects: nothing re-quantized), has the allocation's avg_bits to the last bit, its dynamic
    rules resolve to each module's width, RTN with those rules re-made from scratch is the same
    checkpoint, and swapping it in restores the model bit-identically."""
    a = A.allocate(sens, 3.3)
    assert len(set(a.bits.values())) >= 3  # a real mix, not a uniform answer
    v = A.assemble(tiny, a, variants)
    assert v.avg_bits == a.avg_bits
    assert v.module_bits == a.bits
    by_name = {u.name: u for u in variants.values()}
    for m, name in zip(a.frame["module"], a.frame["variant"]):
        assert v.modules[m] is by_name[name].modules[m]
    rules = a.dynamic()
    assert v.dynamic == rules and v.bits == a.base_bits
    assert all(k.startswith("+:") for k in rules)
    base = dict(bits=v.bits, group_size=v.group_size, sym=v.sym)
    assert {m: dyn.resolve(m, base, rules)["bits"] for m in v.modules} == a.bits
    again = mechq.quantize(tiny, "rtn", bits=a.base_bits, group_size=128, dynamic=rules)
    assert again.avg_bits == v.avg_bits
    for m, p in v.modules.items():
        q = again.modules[m]
        assert p.bits == q.bits
        assert torch.equal(p.qweight, q.qweight) and torch.equal(p.qzeros, q.qzeros)
        assert torch.equal(p.scales, q.scales)
    snap = snapshot(tiny)
    with mechq.swap(tiny, v):
        for m in v.modules:
            assert torch.equal(layout.module_weight(tiny, m), v.weight(m))
    assert_params_equal(tiny, snap)
    with pytest.raises(ValueError, match="not among the variants"):
        A.assemble(tiny, a, [variants[2]])


def test_allocation_beats_uniform_on_held_out_kl(tiny, sens, variants):
    """The point of the allocation, measured (not estimated) on held-out text: at uniform w4's
    own bits (4.156) the mix moves the next-token distribution less than uniform w4.

    Measured on tiny-gpt2, 2 048 held-out tokens (kld_mean ± its standard error): uniform w4
    0.00328 ± 0.00019, the mix 0.00191 ± 0.00010 (−42 %; the estimate promised −71 %). Not
    asserted, because it does not hold: at w3's bits (3.148) the mix (five modules at 2 bits,
    one at 8) measures 0.0135 ± 0.0008 against uniform w3's 0.0139 ± 0.0015, a tie, where the
    estimate promised −69 %: the summed second-order estimates understate 2-bit modules taken
    together. 0.15 bit more (3.298) gives 0.0100 (−28 %)."""
    ref = fp_reference(tiny, max_tokens=2048, batch_size=64)
    uniform = variants[4]
    mixed = A.assemble(tiny, A.allocate(sens, uniform.avg_bits), variants)
    stats = kld_stats(tiny, [uniform, mixed], reference=ref, batch_size=64,
                      progress=False).set_index("variant")
    kld, sem = stats["kld_mean"], stats["kld_sem"]
    # a cut of at least 20 % (measured 42 %); the gap is then > 3 standard errors of the two
    # means combined (about 0.0002 here), so it is no sampling accident of the held-out text
    assert kld[mixed.name] <= 0.8 * kld[uniform.name], kld.to_dict()
    assert kld[uniform.name] - kld[mixed.name] > 3 * float(np.hypot(*sem)), stats.to_dict()
