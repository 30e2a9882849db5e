"""The pages each ``mechq`` command writes: frames, figures and one HTML report per command.

Every function here takes frames an analysis computed (or the analysis's arguments), writes its
CSV frames, Plotly figures and HTML page into ``out``, and returns what it wrote, so that the CLI
only parses arguments and the notebooks can call the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mechq.analysis.cliff import cliff_table, variant_table
from mechq.analysis.recall import accuracy
from mechq.quant.variants import Variant
from mechq.reports import plots


@dataclass
class CliffOutputs:
    """What :func:`write_cliff` computed (and wrote into its folder)."""

    recall: pd.DataFrame       # recall rows with config, bits and seed columns
    per_variant: pd.DataFrame  # accuracy per variant (every seed) with its configuration
    table: pd.DataFrame        # cliff_table: one row per configuration
    seed0: pd.DataFrame        # the recall rows of seed 0 (and FP)
    cliff_fig: object
    rank_fig: object


def write_cliff(recall: pd.DataFrame, variants: Sequence[Variant], out: Path,
                title: str) -> CliffOutputs:
    """The cliff's frames and figures from recall rows, written to ``out``: recall.csv,
    accuracy.csv, cliff.csv, performance_cliff.html and answer_rank.html (shared by
    ``mechq cliff`` and :func:`mechq.report`)."""
    info = variant_table(variants)
    recall = recall.merge(info[["variant", "config", "bits", "seed"]], on="variant", how="left")
    recall.to_csv(out / "recall.csv", index=False)
    per_variant = accuracy(recall).merge(info, on="variant", how="left")
    per_variant.to_csv(out / "accuracy.csv", index=False)
    table = cliff_table(recall, variants)
    table.to_csv(out / "cliff.csv", index=False)
    seed0 = recall[recall["seed"].fillna(0) == 0]
    cliff_fig = plots.performance_cliff(
        table, accuracy(seed0, ["config", "relation"]).rename(columns={"config": "variant"}),
        title=title, seeds=per_variant)
    plots.save_html(cliff_fig, out / "performance_cliff.html")
    rank_fig = plots.rank_ecdf(seed0)
    plots.save_html(rank_fig, out / "answer_rank.html")
    return CliffOutputs(recall, per_variant, table, seed0, cliff_fig, rank_fig)
