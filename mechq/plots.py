"""Interactive Plotly figures for mechq's tidy frames. Functions return ``go.Figure``; none shows.

:func:`save_html` writes a self-contained HTML file (plotly.js inlined) that opens offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

FP_COLOR = "#1f77b4"


def variant_order(names) -> list[str]:
    """FP first, then by decreasing bit width as written in the name (``...-w8...`` first)."""
    import re

    def key(n: str):
        if n == "fp":
            return (0, 0, n)
        m = re.search(r"w(\d+)", n)
        return (1, -int(m.group(1)) if m else 0, n)

    return sorted(dict.fromkeys(names), key=key)


def performance_cliff(acc: pd.DataFrame, by_relation: pd.DataFrame | None = None,
                      title: str | None = None) -> go.Figure:
    """Accuracy per variant (95 % Wilson interval), optionally one faint line per relation.

    ``acc`` is :func:`mechq.recall.accuracy` by ``"variant"``; ``by_relation`` the same by
    ``["variant", "relation"]``.
    """
    order = variant_order(acc["variant"])
    a = acc.set_index("variant").loc[order].reset_index()
    fig = go.Figure()
    if by_relation is not None:
        for rel, g in by_relation.groupby("relation", sort=False):
            g = g.set_index("variant").reindex(order).reset_index()
            fig.add_trace(go.Scatter(
                x=g["variant"], y=g["accuracy"], mode="lines+markers", name=str(rel),
                line=dict(width=1), opacity=0.45, legendgroup="relations",
                hovertemplate=f"{rel}<br>%{{x}}: %{{y:.1%}}<extra></extra>",
            ))
    fig.add_trace(go.Scatter(
        x=a["variant"], y=a["accuracy"], mode="lines+markers+text", name="all facts",
        line=dict(width=4, color="black"), marker=dict(size=10),
        text=[f"{v:.1%}" for v in a["accuracy"]], textposition="top right",
        error_y=dict(type="data", symmetric=False, array=a["ci_high"] - a["accuracy"],
                     arrayminus=a["accuracy"] - a["ci_low"]),
        customdata=a[["n_correct", "n", "median_rank"]],
        hovertemplate=("%{x}: %{y:.1%} (%{customdata[0]}/%{customdata[1]})"
                       "<br>median answer rank %{customdata[2]}<extra></extra>"),
    ))
    fig.update_layout(
        title=title or "Performance cliff: factual-recall accuracy vs precision",
        xaxis_title="variant", yaxis_title="first-token accuracy",
        yaxis=dict(tickformat=".0%", range=[0, 1.05]), template="plotly_white",
        legend=dict(groupclick="toggleitem"),
    )
    return fig


def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write a self-contained HTML file (plotly.js inlined: opens offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


PALETTE = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f"]


def _colors(names) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(variant_order(names))}


def rank_ecdf(recall: pd.DataFrame, title: str | None = None) -> go.Figure:
    """ECDF of the correct answer's rank per variant, log x axis (paper Fig. 2).

    A curve that stays high at small ranks means the answer is still near the top; a collapsed
    model's curve only rises at ranks in the thousands.
    """
    import numpy as np

    fig = go.Figure()
    colors = _colors(recall["variant"])
    for v in variant_order(recall["variant"]):
        r = np.sort(recall.loc[recall["variant"] == v, "target_rank"].to_numpy())
        y = np.arange(1, len(r) + 1) / len(r)
        fig.add_trace(go.Scatter(x=r, y=y, mode="lines", name=v, line=dict(color=colors[v]),
                                 line_shape="hv",
                                 hovertemplate=f"{v}<br>rank ≤ %{{x}}: %{{y:.1%}}<extra></extra>"))
    fig.update_layout(
        title=title or "Where is the correct answer? ECDF of its rank",
        xaxis=dict(type="log", title="rank of the correct answer (1 = top prediction)"),
        yaxis=dict(title="share of facts", tickformat=".0%", range=[0, 1.02]),
        template="plotly_white",
    )
    return fig


def top_predictions(recall: pd.DataFrame, k: int = 8, only_wrong: bool = True) -> pd.DataFrame:
    """The ``k`` most frequent top-1 tokens per variant (on wrong answers by default)."""
    df = recall[~recall["correct"]] if only_wrong else recall
    counts = (df.groupby(["variant", "top1"]).size().rename("count").reset_index()
              .sort_values(["variant", "count"], ascending=[True, False]))
    counts["share"] = counts["count"] / counts.groupby("variant")["count"].transform("sum")
    return counts.groupby("variant", sort=False).head(k).reset_index(drop=True)


def top_predictions_figure(top: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Bars of what each variant predicts instead of the answer (``repr`` of each token)."""
    from plotly.subplots import make_subplots

    order = variant_order(top["variant"])
    fig = make_subplots(rows=1, cols=len(order), subplot_titles=order, shared_yaxes=False)
    for i, v in enumerate(order, start=1):
        g = top[top["variant"] == v]
        fig.add_trace(go.Bar(x=g["share"], y=[repr(t) for t in g["top1"]], orientation="h",
                             name=v, showlegend=False,
                             hovertemplate="%{y}: %{x:.1%}<extra></extra>"), row=1, col=i)
        fig.update_yaxes(autorange="reversed", row=1, col=i)
        fig.update_xaxes(tickformat=".0%", row=1, col=i)
    fig.update_layout(title=title or "Top-1 predictions when the answer is wrong",
                      template="plotly_white", height=380)
    return fig


def lens_curves(summary: pd.DataFrame, subset_col: str | None = None,
                title: str | None = None) -> go.Figure:
    """Logit-lens curves per layer: target probability (top) and log10 rank (bottom).

    ``summary`` is :func:`mechq.lens.lens_summary` by (``subset_col``,) variant, layer. Lines are
    the mean probability / median rank; bands the inter-quartile range. One column per subset.
    """
    from plotly.subplots import make_subplots

    subsets = list(dict.fromkeys(summary[subset_col])) if subset_col else [None]
    fig = make_subplots(rows=2, cols=len(subsets), shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[str(s) if s is not None else "" for s in subsets])
    colors = _colors(summary["variant"])
    for c, s in enumerate(subsets, start=1):
        part = summary if s is None else summary[summary[subset_col] == s]
        for v in variant_order(part["variant"]):
            g = part[part["variant"] == v].sort_values("layer")
            col = colors[v]
            for row, (mid, lo, hi) in enumerate(
                [("mean_prob", "prob_q25", "prob_q75"),
                 ("median_rank", "log10_rank_q25", "log10_rank_q75")], start=1):
                y = g[mid] if row == 1 else np.log10(g[mid])
                fig.add_trace(go.Scatter(
                    x=list(g["layer"]) + list(g["layer"])[::-1],
                    y=list(g[hi]) + list(g[lo])[::-1], fill="toself", fillcolor=col,
                    opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False,
                    legendgroup=v), row=row, col=c)
                fig.add_trace(go.Scatter(
                    x=g["layer"], y=y, mode="lines", name=v, line=dict(color=col),
                    legendgroup=v, showlegend=(row == 1 and c == 1),
                    hovertemplate=f"{v} layer %{{x}}: %{{y:.3g}}<extra></extra>"), row=row, col=c)
    fig.update_yaxes(title_text="target probability", row=1, col=1)
    fig.update_yaxes(title_text="log10 rank of target", row=2, col=1)
    fig.update_xaxes(title_text="layer (0 = embeddings)", row=2)
    fig.update_layout(title=title or "Logit lens at the last token", template="plotly_white",
                      height=620)
    return fig
