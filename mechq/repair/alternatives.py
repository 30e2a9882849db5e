"""The bit allocations a user would otherwise pick, at the same budget as the recipe.

Each rule below turns a budget of average bits per weight into one width per linear module,
chosen among the options of a sensitivity frame (:func:`mechq.analysis.fisher.sensitivity`: one
row per module and width, with its exact ``storage_bits``), and returns it as an
:class:`~mechq.repair.allocation.Allocation`, the same object the recipe's own allocation is, so
:func:`~mechq.repair.allocation.assemble` builds every rule's variant from the same uniform
variants and every rule is measured the same way. Costs are counted exactly as
:attr:`mechq.quant.variants.Variant.avg_bits` counts them (codes, zero points, fp16 scales), so
"equal bits" means the same stored bits, not the same nominal width.

The rules (``widths`` are the frame's widths in increasing order; the **base** is the widest
width whose uniform allocation fits the budget; a module "goes up" to the next wider width, or
to the widest for the protection rules):

- ``uniform``: every module at the base;
- ``ends-8``: the first and last layers at the widest width (8 bits), then the second and the
  second-last, and so on, whole layers while they fit, then module by module within the next
  layer while any fits (the common "keep the first and last layers at 8 bits" advice);
- ``kurtosis``: modules in decreasing excess kurtosis of their FP weights
  (:func:`mechq.repair.protect.kurtosis_ranking`) at the widest width, each one that fits;
- ``llama.cpp``: llama.cpp's Q4_K_M rule for its ``attn_v`` and ``ffn_down`` tensors, which get
  a wider type in the layers ``use_more_bits`` picks: ``i < n/8``, ``i ≥ 7n/8``, or
  ``(i − n/8) mod 3 = 2`` (integer division, ``n`` layers; ``llama-quant.cpp``). Here the ``v``
  and ``down`` modules of those layers go one width up, in layer order, each that fits (at 4.3
  bits the whole rule does not fit over a 4-bit base: 8 bits is the next width mechq's
  GPTQModel path has; llama.cpp's Q6_K is a 6-bit type);
- ``fisher``: :func:`mechq.repair.allocation.allocate`, the least summed Fisher estimate;
- ``fisher+eora`` (:data:`EORA_RULE`, only over a frame with EoRA options,
  :func:`mechq.repair.recipe.eora_options`): the same optimum where a module may also take an
  EoRA correction of one of the frame's ranks, its factors paid for at 16 bits per entry.

Every rule but ``fisher+eora`` chooses among the options without a correction (``rank`` 0).

A rule whose choices leave budget unused keeps it unused: it is that rule's allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pandas as pd
from transformer_lens import HookedTransformer

from mechq.repair.allocation import COLUMNS, NEEDED, Allocation, allocate, capacity
from mechq.repair.protect import kurtosis_ranking

#: the rules, in the order tables show them
RULES = ("uniform", "ends-8", "kurtosis", "llama.cpp", "fisher")
#: the recipe's allocation with EoRA ranks among the options (a frame with a ``rank`` column)
EORA_RULE = "fisher+eora"


def plain(sens: pd.DataFrame) -> pd.DataFrame:
    """The options without a low-rank correction (the whole frame when it has no ``rank``)."""
    return sens[sens["rank"] == 0] if "rank" in sens.columns else sens


def has_ranks(sens: pd.DataFrame) -> bool:
    return "rank" in sens.columns and bool((sens["rank"] > 0).any())


def widths_of(sens: pd.DataFrame) -> list[int]:
    return sorted(int(b) for b in sens["bits"].unique())


def _costs(sens: pd.DataFrame) -> dict[tuple[str, int], int]:
    return {(m, int(b)): int(c) for m, b, c in zip(sens["module"], sens["bits"],
                                                      sens["storage_bits"])}


def base_width(sens: pd.DataFrame, budget: float) -> int:
    """The widest width whose uniform allocation fits ``budget`` (``ValueError`` if none)."""
    sens = plain(sens)
    cap, n = capacity(sens, budget)
    fits = [b for b in widths_of(sens)
            if int(sens.loc[sens["bits"] == b, "storage_bits"].sum()) <= cap]
    if not fits:
        narrow = min(widths_of(sens))
        need = sens.loc[sens["bits"] == narrow, "storage_bits"].sum() / n
        raise ValueError(f"budget {budget} is below uniform {narrow} bits' {need:.4f} bits per "
                         "weight.")
    return max(fits)


def as_allocation(sens: pd.DataFrame, bits: dict[str, int], budget: float, rule: str
                  ) -> Allocation:
    """The allocation giving each module of ``sens`` the width ``bits[module]`` (its row of
    ``sens``, in the frame's module order)."""
    rows = sens.set_index(["module", "bits"])
    picks = [(m, bits[m]) for m in dict.fromkeys(sens["module"])]
    missing = [p for p in picks if p not in rows.index]
    if missing:
        raise ValueError(f"{missing[0][0]!r} has no {missing[0][1]}-bit option in the frame.")
    frame = rows.loc[picks].reset_index()
    frame = frame[[c for c in COLUMNS if c in frame.columns]]
    alloc = Allocation(frame, float(budget), rule, 1, float("nan"))
    cap, _ = capacity(sens, budget)
    if alloc.storage_bits > cap:
        raise AssertionError(f"rule {rule} exceeds the budget")
    return alloc


def _greedy(sens: pd.DataFrame, budget: float, rule: str, order: Iterable[str],
            target: Callable[[int], int]) -> Allocation:
    """From the base, move each module of ``order`` to ``target(base)`` while it fits."""
    base = base_width(sens, budget)
    cost = _costs(sens)
    cap, _ = capacity(sens, budget)
    bits = {m: base for m in dict.fromkeys(sens["module"])}
    used = sum(cost[(m, base)] for m in bits)
    for m in order:
        b = target(base)
        extra = cost[(m, b)] - cost[(m, bits[m])]
        if b > bits[m] and used + extra <= cap:
            bits[m], used = b, used + extra
    return as_allocation(sens, bits, budget, rule)


def _up(sens: pd.DataFrame) -> Callable[[int], int]:
    ws = widths_of(sens)
    return lambda b: ws[min(ws.index(b) + 1, len(ws) - 1)]


def ends_order(sens: pd.DataFrame, n_layers: int) -> list[str]:
    """Modules layer by layer from both ends: 0, n−1, 1, n−2, … (layout order within a
    layer)."""
    layers = []
    lo, hi = 0, n_layers - 1
    while lo <= hi:
        layers += [lo] if lo == hi else [lo, hi]
        lo, hi = lo + 1, hi - 1
    by_layer = sens.drop_duplicates("module").groupby("layer", sort=False)["module"].apply(list)
    return [m for layer in layers for m in by_layer.get(layer, [])]


def llama_cpp_layers(n_layers: int) -> list[int]:
    """The layers llama.cpp's ``use_more_bits(i, n)`` picks (module docstring)."""
    e = n_layers // 8
    return [i for i in range(n_layers)
            if i < e or i >= 7 * n_layers // 8 or (i - e) % 3 == 2]


def rule_allocation(model: HookedTransformer, sens: pd.DataFrame, budget: float, rule: str
                    ) -> Allocation:
    """The allocation of one rule of :data:`RULES` or :data:`EORA_RULE` at ``budget`` (module
    docstring)."""
    if rule not in (*RULES, EORA_RULE):
        raise ValueError(f"unknown rule {rule!r}; expected one of {(*RULES, EORA_RULE)}.")
    missing = [c for c in ("module", "layer", "component", *NEEDED) if c not in sens.columns]
    if missing:
        raise ValueError(f"the sensitivity frame lacks the columns {missing}.")
    if rule == EORA_RULE:
        if not has_ranks(sens):
            raise ValueError(f"rule {EORA_RULE!r} needs EoRA options in the frame "
                             "(mechq.repair.recipe.eora_options).")
        alloc = allocate(sens, budget)
        alloc.method = f"{EORA_RULE} ({alloc.method})"
        return alloc
    sens = plain(sens)
    widest = max(widths_of(sens))
    if rule == "uniform":
        return _greedy(sens, budget, rule, [], _up(sens))
    if rule == "ends-8":
        return _greedy(sens, budget, rule, ends_order(sens, model.cfg.n_layers),
                       lambda b: widest)
    if rule == "kurtosis":
        ranked = [m for m in kurtosis_ranking(model)["module"] if m in set(sens["module"])]
        return _greedy(sens, budget, rule, ranked, lambda b: widest)
    if rule == "llama.cpp":
        layers = set(llama_cpp_layers(model.cfg.n_layers))
        mods = sens.drop_duplicates("module")
        parts = mods["component"].str.split("+").map(set)
        picked = mods[mods["layer"].isin(layers) & parts.map(lambda c: bool({"v", "down"} & c))]
        return _greedy(sens, budget, rule, list(picked["module"]), _up(sens))
    alloc = allocate(sens, budget)
    alloc.method = f"fisher ({alloc.method})"
    return alloc


def rule_allocations(model: HookedTransformer, sens: pd.DataFrame, budget: float,
                     rules: Sequence[str] = RULES) -> dict[str, Allocation]:
    """Every rule's allocation at ``budget``, by rule name (:data:`EORA_RULE` after them when
    the frame has EoRA options and ``rules`` does not already name it)."""
    rules = list(rules) + ([EORA_RULE] if has_ranks(sens) and EORA_RULE not in rules else [])
    return {r: rule_allocation(model, sens, budget, r) for r in rules}
