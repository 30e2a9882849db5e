"""A bit allocation under a budget: one width per module, the least estimated KL increase.

**Problem** (a multiple-choice knapsack). Every linear module ``m`` has options ``k`` (its rows in
:func:`mechq.analysis.fisher.sensitivity`: one uniform variant's weights per width; with
:func:`mechq.repair.recipe.eora_options` also each width with an EoRA correction of rank ``r``,
the ``rank`` column), each with a cost ``c_mk`` (``storage_bits``: codes, zero points and fp16
scales, and a correction's ``r · (in + out)`` entries at 16 bits, as
:attr:`mechq.quant.variants.Variant.avg_bits` counts them) and an estimated KL increase ``e_mk``
(``fisher_error``, of the corrected weight where there is a correction). Choose one option per
module to

    minimise Σ_m e_mk   subject to   Σ_m c_mk ≤ budget · Σ_m n_m,

``n_m`` the module's weights: the average bits per weight of the linear modules stay within the
budget, counted the way every mechq variant counts them. Summing per-module estimates assumes
the modules' errors do not interact (second order, independent errors; see
:mod:`mechq.analysis.fisher`).

**Method: exact dynamic programming over the bits.** Costs are whole numbers of bits. Each
module's cheapest option is taken as its base and the DP runs over the extra bits above the
bases, in units of ``u`` = the greatest common divisor of all cost differences (192 bits for
SmolLM2's RTN g128 widths 2/3/4/8); ``D_m(c)`` = the least error of modules ``1 … m`` within ``c``
units, ``D_m(c) = min_k D_{m−1}(c − c_mk) + e_mk``, with one int8 choice per module and unit
kept for the backtrack. When the
capacity fits in ``max_units`` units the answer is the **exact optimum** (optimality gap 0).
When it does not, costs are rounded *up* to a coarser unit ``u' = ⌈capacity / max_units⌉``:
the allocation found still respects the true budget, and it is optimal among allocations
whose rounded costs fit, so it is at least as good as the exact optimum under a budget smaller
by at most ``M · u'`` bits (``M`` modules) — at most ``M / max_units`` of the capacity above the
bases. Either way :class:`Allocation` reports the Lagrangian lower bound
``max_λ≥0 Σ_m min_k (e_mk + λ c_mk) − λ · capacity`` (the LP relaxation's value), so
``estimated_kl − lower_bound`` bounds the gap to the exact optimum from the data, without trust
in the argument above. Ties go to the cheaper option.

Measured on SmolLM2 (210 modules × 4 widths, one 2-core machine under load): 2.5 and 3.3 bits
are solved exactly (1 s and 6 s); 4.3 bits needs 1.2·10⁶ units of 192 bits, more than
:data:`MAX_UNITS`, so its costs are rounded up to 218-bit units (10 s), and the Lagrangian bound
puts it within 0.1 % of the exact optimum.

**Outputs.** :class:`Allocation` holds the chosen row of every module (``frame``: module, layer,
component, bits, variant, n_params, storage_bits, avg_bits, fisher_error), its average bits and
its estimated KL; :meth:`Allocation.dynamic` writes it as GPTQModel ``dynamic`` rules (``+:``
overrides for the modules away from the base width, each matching exactly its modules' names
in the form of :mod:`mechq.repair.protect`, whose rule helper the recipe's rules come from too), so
``mechq.quantize(model, method, bits=allocation.base_bits, dynamic=allocation.dynamic())``
re-quantizes the recipe for real; :func:`assemble` builds the mixed variant from the uniform
variants the options came from, with no re-quantization: each module's packed weights are taken
as they are (a :class:`~mechq.quant.variants.Variant` holds per-module widths), so its
``avg_bits`` is the allocation's to the last bit and :func:`mechq.swap` runs it like any variant.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from mechq.quant import dynamic as dyn
from mechq.quant import layout
from mechq.quant.variants import Variant
from mechq.repair.protect import _rule

#: the DP's largest capacity in cost units; above it costs are rounded up (module docstring).
#: The DP keeps one int8 choice per module and unit: 2²⁰ units × 210 modules ≈ 220 MB.
MAX_UNITS = 2**20
#: the columns of :attr:`Allocation.frame`
COLUMNS = ("module", "layer", "component", "bits", "rank", "variant", "group_size", "n_params",
           "storage_bits", "avg_bits", "fisher_error")
NEEDED = ("module", "bits", "variant", "n_params", "storage_bits", "fisher_error")


@dataclass
class Allocation:
    """One option per module under a budget (module docstring). ``frame`` has one row per
    module in the order of the sensitivity frame; ``method`` is ``"dp-exact"`` or
    ``"dp-rounded"`` (costs rounded up to ``unit`` bits); ``lower_bound`` the Lagrangian bound
    on the exact optimum's estimated KL."""

    frame: pd.DataFrame
    budget: float
    method: str
    unit: int
    lower_bound: float

    @property
    def n_params(self) -> int:
        return int(self.frame["n_params"].sum())

    @property
    def storage_bits(self) -> int:
        return int(self.frame["storage_bits"].sum())

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight of the linear modules: ``Σ storage_bits / Σ n_params``, the
        number :attr:`Variant.avg_bits` gives for :func:`assemble`'s variant."""
        return self.storage_bits / self.n_params

    @property
    def estimated_kl(self) -> float:
        """``Σ fisher_error`` of the chosen options (nats per token, to second order)."""
        return float(self.frame["fisher_error"].sum())

    @property
    def gap(self) -> float:
        """``estimated_kl − lower_bound``: how far above the exact optimum it can at most be."""
        return max(self.estimated_kl - self.lower_bound, 0.0)

    @property
    def bits(self) -> dict[str, int]:
        """The chosen width of every module."""
        return dict(zip(self.frame["module"], self.frame["bits"].astype(int)))

    @property
    def ranks(self) -> dict[str, int]:
        """The EoRA rank of every module the allocation corrects (options with ``rank > 0``;
        empty when the frame has no ``rank`` column)."""
        if "rank" not in self.frame.columns:
            return {}
        r = self.frame[self.frame["rank"] > 0]
        return dict(zip(r["module"], r["rank"].astype(int)))

    @property
    def base_bits(self) -> int:
        """The width holding the most weights: the base of :meth:`dynamic` (fewest rules)."""
        w = self.frame.groupby("bits")["n_params"].sum()
        return int(w[w == w.max()].index.min())

    def dynamic(self, base_bits: int | None = None) -> dict:
        """GPTQModel ``dynamic`` rules giving every module its chosen width over a uniform base
        of ``base_bits`` (default :attr:`base_bits`): one ``+:`` rule per other width, matching
        exactly its modules' names, override ``{"bits": b}`` (plus ``"group_size"`` where that
        width's variant has another group size than the base's)."""
        base = self.base_bits if base_bits is None else base_bits
        gs = self._group_sizes()
        rules = {}
        for b, g in self.frame.groupby("bits", sort=True):
            if int(b) != base:
                over = {"bits": int(b)}
                if gs.get(int(b)) != gs.get(base) and gs.get(int(b)) is not None:
                    over["group_size"] = gs[int(b)]
                rules[_rule(list(g["module"]))] = over
        return dyn.check(rules) or {}

    def _group_sizes(self) -> dict[int, int]:
        if "group_size" not in self.frame.columns:
            return {}
        out = {}
        for b, g in self.frame.groupby("bits"):
            sizes = set(g["group_size"].astype(int))
            if len(sizes) > 1:
                raise ValueError(f"the {b}-bit options come with group sizes {sorted(sizes)}; "
                                 "one dynamic rule per width cannot say which module has which.")
            out[int(b)] = sizes.pop()
        return out


def _options(sens: pd.DataFrame, bits: Iterable[int] | None) -> pd.DataFrame:
    missing = [c for c in NEEDED if c not in sens.columns]
    if missing:
        raise ValueError(f"the sensitivity frame lacks {missing} (use "
                         "mechq.analysis.fisher.sensitivity).")
    opts = sens if bits is None else sens[sens["bits"].isin(list(bits))]
    if opts.empty:
        raise ValueError("no option to allocate (check bits).")
    if opts.duplicated(["module", "variant"]).any():
        raise ValueError("a module has the same variant twice in the sensitivity frame.")
    per = opts.groupby("module")["n_params"].nunique()
    if (per > 1).any():
        raise ValueError(f"{per[per > 1].index[0]} has options of different sizes.")
    return opts


def lagrangian_bound(costs: list[np.ndarray], errors: list[np.ndarray], capacity: int,
                     iterations: int = 200) -> float:
    """``max_λ≥0 Σ_m min_k (e_mk + λ c_mk) − λ·capacity`` by bisection on λ (the dual function
    is concave; any λ gives a valid lower bound on the knapsack's optimum, so an inexact λ only
    loosens the bound)."""
    c = [np.asarray(x, dtype=np.float64) for x in costs]
    e = [np.asarray(x, dtype=np.float64) for x in errors]

    def dual(lam: float) -> tuple[float, float]:
        val, used = -lam * capacity, 0.0
        for cm, em in zip(c, e):
            k = int(np.argmin(em + lam * cm))
            val += em[k] + lam * cm[k]
            used += cm[k]
        return val, used

    best, used = dual(0.0)
    if used <= capacity:  # the unconstrained optimum fits: the bound is the optimum itself
        return best
    # costs are whole bits, so at λ = max ptp(e) no option dearer than a module's cheapest can
    # pay for itself: every module takes its cheapest, which fits (checked by the caller)
    lo, hi = 0.0, max(max(float(np.ptp(em)) for em in e), 1e-300)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        val, used = dual(mid)
        best = max(best, val)
        if used > capacity:
            lo = mid
        else:
            hi = mid
    return max(best, dual(hi)[0], dual(lo)[0])


def _dp(costs: list[np.ndarray], errors: list[np.ndarray], cap: int) -> list[int]:
    """The exact DP over ``cap`` units (costs already in units, each module's minimum 0)."""
    dp = np.zeros(cap + 1)
    choice = np.zeros((len(costs), cap + 1), dtype=np.int8)
    inf = np.inf
    for i, (cm, em) in enumerate(zip(costs, errors)):
        new = np.full(cap + 1, inf)
        pick = choice[i]
        for k in np.argsort(cm, kind="stable"):  # cheaper first: ties keep the cheaper option
            w = int(cm[k])
            if w > cap:
                continue
            cand = dp[: cap + 1 - w] + em[k]
            better = cand < new[w:]
            new[w:][better] = cand[better]
            pick[w:][better] = k
        dp = new
    out, c = [0] * len(costs), cap
    for i in range(len(costs) - 1, -1, -1):
        k = int(choice[i][c])
        out[i] = k
        c -= int(costs[i][k])
    return out


def capacity(sens: pd.DataFrame, budget: float) -> tuple[int, int]:
    """``(bits, weights)``: the stored bits ``budget`` allows over the frame's modules, the
    budget read as the decimal it is written as (4.3 is 43/10, so ``avg_bits <= budget`` holds
    for the floats too), and the modules' weights."""
    n = int(sens.drop_duplicates("module")["n_params"].sum())
    return math.floor(Fraction(repr(float(budget))) * n), n


def allocate(sens: pd.DataFrame, budget: float, *, bits: Iterable[int] | None = None,
             max_units: int = MAX_UNITS) -> Allocation:
    """The allocation minimising the summed ``fisher_error`` within ``budget`` bits per weight
    (module docstring), over the options of ``sens`` (:func:`mechq.analysis.fisher.sensitivity`;
    ``bits`` keeps only some widths). ``budget`` is read as the decimal it is written as (4.3 is
    43/10), so ``allocation.avg_bits <= budget`` holds for the floats too. Raises ``ValueError``
    when even the cheapest option of every module exceeds the budget."""
    if max_units < 1:
        raise ValueError(f"max_units must be at least 1, got {max_units}.")
    opts = _options(sens, bits)
    modules = list(dict.fromkeys(opts["module"]))
    groups = {m: g for m, g in opts.groupby("module", sort=False)}
    cap_bits, n_total = capacity(opts, budget)
    raw_costs = [groups[m]["storage_bits"].to_numpy(dtype=np.int64) for m in modules]
    errors = [groups[m]["fisher_error"].to_numpy(dtype=np.float64) for m in modules]
    floor = int(sum(int(c.min()) for c in raw_costs))
    if floor > cap_bits:
        raise ValueError(f"budget {budget} is below the cheapest allocation's "
                         f"{floor / n_total:.4f} bits per weight.")
    extra = [c - c.min() for c in raw_costs]
    room = cap_bits - floor
    unit = 0
    for c in extra:
        for x in c.tolist():
            unit = math.gcd(unit, int(x))
    unit = unit or 1
    if room // unit <= max_units:
        method, costs, cap = "dp-exact", [c // unit for c in extra], room // unit
    else:
        unit = -(-room // max_units)
        method, costs, cap = "dp-rounded", [-(-c // unit) for c in extra], room // unit
    picks = _dp(costs, errors, int(cap))
    chosen = pd.concat([groups[m].iloc[[k]] for m, k in zip(modules, picks)], ignore_index=True)
    if int(chosen["storage_bits"].sum()) > cap_bits:  # cannot happen: costs only rounded up
        raise AssertionError("the allocation exceeds the budget")
    bound = lagrangian_bound(raw_costs, errors, cap_bits)
    cols = [c for c in COLUMNS if c in chosen.columns]
    return Allocation(chosen[cols].reset_index(drop=True), float(budget), method, int(unit),
                      min(bound, float(chosen["fisher_error"].sum())))


def assemble(model: HookedTransformer, allocation: Allocation,
             variants: Iterable[Variant] | Mapping[object, Variant], *,
             name: str | None = None) -> Variant:
    """The mixed variant of ``allocation``, from the uniform ``variants`` its options came from
    (matched by name; e.g. :func:`mechq.analysis.fisher.uniform_variants`' values), without
    re-quantizing: every module's packed weights (and a low-rank correction, if its variant has
    one) are taken from its chosen variant as they are. The base settings are those of the
    variant at :attr:`Allocation.base_bits`; ``dynamic`` is :meth:`Allocation.dynamic`, which
    resolves every module to its own width (checked here). Variants that rewrite norms (AWQ)
    are refused: their scale folds couple modules."""
    pool = list(variants.values()) if isinstance(variants, Mapping) else list(variants)
    by_name = {v.name: v for v in pool}
    have = set(layout.modules(model.cfg))
    chosen = dict(zip(allocation.frame["module"], allocation.frame["variant"]))
    if set(chosen) != have:
        miss = sorted(have - set(chosen)) or sorted(set(chosen) - have)
        raise ValueError(f"the allocation does not cover this model's linear modules exactly "
                         f"(e.g. {miss[0]!r}).")
    unknown = sorted(set(chosen.values()) - set(by_name))
    if unknown:
        raise ValueError(f"variant {unknown[0]!r} of the allocation is not among the variants "
                         f"given ({sorted(by_name)}).")
    used = [by_name[n] for n in dict.fromkeys(chosen.values())]
    for v in used:
        if v.norms:
            raise ValueError(f"Variant {v.name!r} rewrites norms ({v.method.upper()} folds its "
                             "scales), so its modules cannot be mixed with others'.")
    base_bits = allocation.base_bits
    base = next(by_name[chosen[m]] for m in layout.modules(model.cfg)
                if by_name[chosen[m]].modules[m].bits == base_bits)
    modules, lowrank = {}, {}
    for m in layout.modules(model.cfg):
        v = by_name[chosen[m]]
        if m not in v.modules:
            raise ValueError(f"Variant {v.name!r} keeps {m!r} unquantized; nothing to take.")
        modules[m] = v.modules[m]
        if m in v.lowrank:
            lowrank[m] = v.lowrank[m]
    rules = allocation.dynamic(base_bits)
    if len({v.sym for v in used}) > 1:
        raise ValueError("the variants mix symmetric and asymmetric quantization; the dynamic "
                         "rules carry bits and group size only.")
    base_cfg = dict(bits=base.bits, group_size=base.group_size, sym=base.sym)
    for m, p in modules.items():
        got = dyn.resolve(m, base_cfg, rules)
        src = by_name[chosen[m]]
        if got is None or (got["bits"], got["group_size"]) != (p.bits, src.group_size):
            raise AssertionError(f"the dynamic rules give {m} {got}, its weights have "
                                 f"{p.bits} bits, group size {src.group_size}")
    methods = sorted({v.method for v in used})
    digest = hashlib.sha256(repr(sorted(chosen.items())).encode()).hexdigest()[:6]
    out = Variant(
        name=name or f"{'+'.join(methods)}-mix{allocation.avg_bits:.2f}-{digest}",
        method=methods[0] if len(methods) == 1 else "+".join(methods),
        bits=base.bits, group_size=base.group_size, sym=base.sym, desc_act=base.desc_act,
        modules=modules, dynamic=rules or None, lowrank=lowrank,
        meta=dict(allocation=dict(budget=allocation.budget, method=allocation.method,
                                  avg_bits=allocation.avg_bits,
                                  estimated_kl=allocation.estimated_kl,
                                  lower_bound=allocation.lower_bound),
                  sources=sorted(v.name for v in used), dynamic=rules or None))
    return out
