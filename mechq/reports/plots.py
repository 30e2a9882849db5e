"""Interactive Plotly figures for mechq's tidy frames. Functions return ``go.Figure``; none shows.

:func:`save_html` writes a self-contained HTML file (plotly.js inlined) that opens offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mechq.vocab import FP


def variant_order(names) -> list[str]:
    """FP first, then the variants in the order they first appear (the order the analysis was
    given them, e.g. w8, w4, w3, w2 for the cliff). Names are never parsed."""
    names = list(dict.fromkeys(names))
    return [n for n in names if n == FP] + [n for n in names if n != FP]


def performance_cliff(acc: pd.DataFrame, by_relation: pd.DataFrame | None = None,
                      title: str | None = None, seeds: pd.DataFrame | None = None) -> go.Figure:
    """Accuracy per variant with its 95 % Wilson interval (thin bars), optionally one faint line
    per relation.

    ``acc`` is :func:`mechq.analysis.recall.accuracy` by ``"variant"``, or :func:`mechq.analysis.cliff.cliff_table`
    (one row per configuration, accuracy = mean over calibration seeds): then the seed range is
    drawn as a thick bar and, with ``seeds`` (:func:`mechq.analysis.cliff.variant_table` joined with
    accuracy: columns ``config``, ``seed``, ``accuracy``), each seed as a dot. ``by_relation`` is
    accuracy by ``["variant", "relation"]``.
    """
    order = variant_order(acc["variant"])
    a = acc.set_index("variant").loc[order].reset_index()
    spread = "seed_min" in a
    fig = go.Figure()
    if by_relation is not None:
        for rel, g in by_relation.groupby("relation", sort=False):
            g = g.set_index("variant").reindex(order).reset_index()
            fig.add_trace(go.Scatter(
                x=g["variant"], y=g["accuracy"], mode="lines+markers", name=str(rel),
                line=dict(width=1), opacity=0.45, legendgroup="relations",
                hovertemplate=f"{rel}<br>%{{x}}: %{{y:.1%}}<extra></extra>",
            ))
    count = a["mean_correct"] if spread else a["n_correct"]
    fig.add_trace(go.Scatter(
        x=a["variant"], y=a["accuracy"], mode="lines+markers+text", name="all facts",
        line=dict(width=4, color="black"), marker=dict(size=10),
        text=[f"{v:.1%}" for v in a["accuracy"]], textposition="top right",
        error_y=dict(type="data", symmetric=False, array=a["ci_high"] - a["accuracy"],
                     arrayminus=a["accuracy"] - a["ci_low"], thickness=1, width=3,
                     color="#888"),
        customdata=np.stack([count, a["n"], a["median_rank"]], axis=1),
        hovertemplate=("%{x}: %{y:.1%} (%{customdata[0]:.0f}/%{customdata[1]})"
                       "<br>95 % CI over facts: thin bar"
                       "<br>median answer rank %{customdata[2]}<extra></extra>"),
    ))
    if spread:
        multi = a[a["seeds"] > 1]
        fig.add_trace(go.Scatter(
            x=multi["variant"], y=multi["accuracy"], mode="markers", name="calibration seeds",
            marker=dict(size=1, color="#d62728"),
            error_y=dict(type="data", symmetric=False, array=multi["seed_max"] - multi["accuracy"],
                         arrayminus=multi["accuracy"] - multi["seed_min"], thickness=5, width=0,
                         color="rgba(214,39,40,0.6)"),
            customdata=np.stack([multi["seed_min"], multi["seed_max"], multi["seeds"]], axis=1),
            hovertemplate=("%{x}: seeds %{customdata[0]:.1%}–%{customdata[1]:.1%} "
                           "(%{customdata[2]} seeds)<extra></extra>"),
        ))
        if seeds is not None:
            s = seeds[seeds["config"].isin(multi["variant"])]
            fig.add_trace(go.Scatter(
                x=s["config"], y=s["accuracy"], mode="markers", name="one seed",
                marker=dict(size=7, color="#d62728", symbol="circle-open"),
                customdata=s[["seed"]],
                hovertemplate="%{x}, seed %{customdata[0]}: %{y:.1%}<extra></extra>",
            ))
    fig.update_layout(
        title=title or "Performance cliff: factual-recall accuracy vs precision",
        xaxis_title="variant", yaxis_title="first-token accuracy",
        yaxis=dict(tickformat=".0%", range=[0, 1.05]), template="plotly_white",
        legend=dict(groupclick="toggleitem"),
    )
    fig.update_xaxes(categoryorder="array", categoryarray=order)
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
    if not order:
        fig = go.Figure()
        fig.add_annotation(text="no wrong answers", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        return fig.update_layout(title=title or "Top-1 predictions when the answer is wrong",
                                 template="plotly_white")
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

    ``summary`` is :func:`mechq.analysis.lens.lens_summary` by (``subset_col``,) variant, layer. Lines are
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


# --------------------------------------------------------------------------------------------
# Components and representation (paper §4.1–4.2, Fig. 6–9)
# --------------------------------------------------------------------------------------------

COMPONENT_LABELS = {
    "attn_entropy": "normalized attention entropy",
    "attn_jsd": "attention JSD vs FP (nats, ≤ ln 2)",
    "sign_flip": "gate sign-flip rate vs FP",
    "topk_jaccard": "Jaccard of top-1 % neurons vs FP",
    "value_cosine": "FFN output cosine vs FP",
    "subspace_similarity": "subspace similarity ‖U_fpᵀU_q‖²/k",
    "error_alignment": "error ↔ FP subspace alignment",
    "error_energy_in_fp_subspace": "share of error energy in FP subspace",
}


def component_lines(summary: pd.DataFrame, metric: str, title: str | None = None) -> go.Figure:
    """One component metric per layer: a line per variant (mean over prompts, band = 95 % CI
    of the mean, ±1.96 sem), one column per position. ``summary`` is
    :func:`mechq.analysis.components.component_summary`."""
    from plotly.subplots import make_subplots

    part = summary[summary["metric"] == metric]
    if part.empty:
        raise ValueError(f"No rows for metric {metric!r} in the summary.")
    positions = list(dict.fromkeys(part["position"]))
    fig = make_subplots(rows=1, cols=len(positions), subplot_titles=positions, shared_yaxes=True)
    colors = _colors(part["variant"])
    for c, pos in enumerate(positions, start=1):
        for v in variant_order(part["variant"]):
            g = part[(part["position"] == pos) & (part["variant"] == v)].sort_values("layer")
            if g.empty:
                continue
            lo, hi = g["mean"] - 1.96 * g["sem"], g["mean"] + 1.96 * g["sem"]
            fig.add_trace(go.Scatter(
                x=list(g["layer"]) + list(g["layer"])[::-1], y=list(hi) + list(lo)[::-1],
                fill="toself", fillcolor=colors[v], opacity=0.15, line=dict(width=0),
                hoverinfo="skip", showlegend=False, legendgroup=v), row=1, col=c)
            fig.add_trace(go.Scatter(
                x=g["layer"], y=g["mean"], mode="lines+markers", name=v,
                line=dict(color=colors[v], dash="dot" if v == "fp" else "solid"),
                marker=dict(size=4), legendgroup=v, showlegend=(c == 1),
                customdata=g[["n"]],
                hovertemplate=f"{v} layer %{{x}}: %{{y:.4g}} (n=%{{customdata[0]}})<extra></extra>",
            ), row=1, col=c)
        fig.update_xaxes(title_text="layer", row=1, col=c)
    fig.update_yaxes(title_text=COMPONENT_LABELS.get(metric, metric), row=1, col=1)
    fig.update_layout(title=title or COMPONENT_LABELS.get(metric, metric),
                      template="plotly_white", height=420)
    return fig


def cka_heatmaps(cka: pd.DataFrame, stream: str | None = "resid_post",
                 position: str | None = None, title: str | None = None) -> go.Figure:
    """Layer × layer linear CKA (FP layer on y, variant layer on x), one heatmap per variant side
    by side with one shared 0–1 colour scale; one row per (stream, position) left after
    filtering (``None`` keeps all). ``cka`` is the ``cka`` frame of
    :func:`mechq.analysis.representation.representation_metrics`."""
    from plotly.subplots import make_subplots

    df = cka
    if stream is not None:
        df = df[df["stream"] == stream]
    if position is not None:
        df = df[df["position"] == position]
    if df.empty:
        raise ValueError(f"No CKA rows for stream={stream!r}, position={position!r}.")
    order = variant_order(df["variant"])
    combos = list(dict.fromkeys(zip(df["stream"], df["position"])))
    titles = [f"{v} · {s} @ {p}" for s, p in combos for v in order]
    fig = make_subplots(rows=len(combos), cols=len(order), subplot_titles=titles,
                        horizontal_spacing=0.04,
                        vertical_spacing=min(0.1, 0.3 / len(combos)))
    for r, (s, p) in enumerate(combos, start=1):
        for c, v in enumerate(order, start=1):
            g = df[(df["variant"] == v) & (df["stream"] == s) & (df["position"] == p)]
            if g.empty:
                continue
            z = g.pivot(index="layer_fp", columns="layer_q", values="cka")
            fig.add_trace(go.Heatmap(
                z=z.to_numpy(), x=z.columns, y=z.index, coloraxis="coloraxis",
                hovertemplate=(f"{v}<br>FP layer %{{y}} vs {v} layer %{{x}}"
                               "<br>CKA %{z:.3f}<extra></extra>")), row=r, col=c)
            fig.update_xaxes(title_text=f"{v} layer", row=r, col=c)
            fig.update_yaxes(title_text="FP layer" if c == 1 else None, row=r, col=c)
    fig.update_layout(
        title=title or "Linear CKA between FP and variant layers",
        coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="CKA")),
        template="plotly_white", height=max(380, 330 * len(combos)),
        width=max(500, 330 * len(order) + 120),
    )
    return fig


def subspace_lines(df: pd.DataFrame, position: str | None = None,
                   title: str | None = None) -> go.Figure:
    """Subspace measures per layer: rows = streams, columns = metrics (similarity, error
    alignment, error energy in the FP subspace), a line per variant, the random-subspace
    baseline ``k/d`` dotted. ``df`` is the ``subspace`` frame of
    :func:`mechq.analysis.representation.representation_metrics`; ``position`` defaults to the first."""
    from plotly.subplots import make_subplots

    position = position or df["position"].iloc[0]
    part = df[df["position"] == position]
    streams = list(dict.fromkeys(part["stream"]))
    metrics = list(dict.fromkeys(part["metric"]))
    fig = make_subplots(rows=len(streams), cols=len(metrics), shared_xaxes=True,
                        shared_yaxes=True,
                        subplot_titles=[f"{s}: {COMPONENT_LABELS.get(m, m)}"
                                        for s in streams for m in metrics])
    colors = _colors(part["variant"])
    for r, s in enumerate(streams, start=1):
        for c, m in enumerate(metrics, start=1):
            cell = part[(part["stream"] == s) & (part["metric"] == m)]
            for v in variant_order(cell["variant"]):
                g = cell[cell["variant"] == v].sort_values("layer")
                if g["value"].isna().all():
                    continue
                fig.add_trace(go.Scatter(
                    x=g["layer"], y=g["value"], mode="lines+markers", name=v,
                    line=dict(color=colors[v]), marker=dict(size=4), legendgroup=v,
                    showlegend=(r == 1 and c == 1), customdata=g[["k"]],
                    hovertemplate=f"{v} layer %{{x}}: %{{y:.3f}} (k=%{{customdata[0]}})"
                                  "<extra></extra>"), row=r, col=c)
            if m != "subspace_similarity":
                g = cell.drop_duplicates("layer").sort_values("layer")
                fig.add_trace(go.Scatter(
                    x=g["layer"], y=g["random_baseline"], mode="lines", name="random k/d",
                    line=dict(color="gray", dash="dot"), legendgroup="random",
                    showlegend=(r == 1 and c == 2), hoverinfo="skip"), row=r, col=c)
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(title_text="layer", row=len(streams))
    energy = part["energy"].iloc[0] if "energy" in part else None
    fig.update_layout(
        title=title or f"Activation subspaces at {position}"
        + (f" (k: {energy:.0%} of FP spectral energy)" if energy is not None else ""),
        template="plotly_white", height=260 * len(streams) + 120)
    return fig


def patching_heatmap(frame: pd.DataFrame, value: str = "restored", title: str | None = None,
                     zmin: float | None = None, zmax: float | None = None) -> go.Figure:
    """Layers × semantic positions heatmaps of an activation-patching sweep (paper §3.4).

    ``frame`` is :func:`mechq.engine.patching.patch_heatmap_frame`. One panel per (variant, activation,
    mode); x = layer, y = position name in prompt order (subject first at the top). ``value``:
    ``restored`` (share of the FP-vs-unpatched probability gap closed by the patch; default),
    ``mean_delta`` (patched − unpatched target probability), ``mean_prob``, ``correct_share``.
    All panels share one colour range (``zmin``/``zmax``, default the data's range; symmetric
    around 0 for ``mean_delta``). Hover shows the mean probabilities and the number of prompts
    behind each cell.
    """
    from plotly.subplots import make_subplots

    from mechq.engine.positions import NAMES

    keys = ["variant", "activation", "mode"]
    panels = list(frame[keys].drop_duplicates().itertuples(index=False, name=None))
    panels.sort(key=lambda k: (variant_order(frame["variant"]).index(k[0]), k[1], k[2]))
    names = [n for n in NAMES if n in set(frame["position_label"])]
    layers = sorted(frame["layer"].unique())
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.12 /
                        max(len(panels), 1), subplot_titles=[f"{v} · {a} · {m}"
                                                             for v, a, m in panels])
    diverging = value in ("mean_delta",)
    # One colour scale for every panel, so that panels compare (plotly scales each on its own).
    vals = frame[value].to_numpy(dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size:
        if diverging:
            bound = float(np.abs(vals).max()) or 1.0
            zmin = -bound if zmin is None else zmin
            zmax = bound if zmax is None else zmax
        else:
            zmin = float(vals.min()) if zmin is None else zmin
            zmax = float(vals.max()) if zmax is None else zmax
    for r, (v, a, m) in enumerate(panels, start=1):
        g = frame[(frame["variant"] == v) & (frame["activation"] == a) & (frame["mode"] == m)]
        z = g.pivot(index="position_label", columns="layer", values=value).reindex(
            index=names, columns=layers)
        n = g.pivot(index="position_label", columns="layer", values="n_facts").reindex(
            index=names, columns=layers)
        p = g.pivot(index="position_label", columns="layer", values="mean_prob").reindex(
            index=names, columns=layers)
        fig.add_trace(go.Heatmap(
            z=z.to_numpy(), x=layers, y=names, customdata=np.dstack([p.to_numpy(), n.to_numpy()]),
            colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
            zmin=zmin, zmax=zmax, showscale=(r == 1),
            hovertemplate=(f"{v}<br>layer %{{x}} · %{{y}}<br>{value} %{{z:.3f}}"
                           "<br>patched target prob %{customdata[0]:.3f}"
                           "<br>prompts %{customdata[1]}<extra></extra>"),
        ), row=r, col=1)
        fig.update_yaxes(autorange="reversed", row=r, col=1)
    fig.update_xaxes(title_text="layer", row=len(panels), col=1)
    fig.update_layout(
        title=title or f"Activation patching: {value} by layer × position",
        template="plotly_white", height=220 * len(panels) + 140)
    return fig


def first_domino_curve(acc_by_k: pd.DataFrame, color: str | None = None,
                       title: str | None = None,
                       xaxis_title: str = "k (last quantized layer)") -> go.Figure:
    """Accuracy vs. k of a first-domino sweep (paper Fig. 10).

    ``acc_by_k`` is ``recall.accuracy(first_domino(...), by=["k", ...])``: x = k (layers
    ``0 … k`` quantized; ``k = −1`` is FP), y = accuracy with its Wilson interval as error bars.
    ``color`` names a column (e.g. ``subset`` or ``variant``) drawn as separate lines.
    """
    fig = go.Figure()
    groups = [(None, acc_by_k)] if color is None else list(acc_by_k.groupby(color, sort=False))
    for name, g in groups:
        g = g.sort_values("k")
        fig.add_trace(go.Scatter(
            x=g["k"], y=g["accuracy"], mode="lines+markers", name=str(name or "accuracy"),
            error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["accuracy"],
                         arrayminus=g["accuracy"] - g["ci_low"]),
            customdata=np.stack([g["mean_target_prob"], g["n"]], axis=-1),
            hovertemplate=("k %{x}<br>accuracy %{y:.3f}<br>mean target prob "
                           "%{customdata[0]:.3f}<br>n %{customdata[1]}<extra></extra>"),
        ))
    fig.update_layout(title=title or "First domino: layers 0…k quantized, the rest FP",
                      xaxis_title=xaxis_title, yaxis_title="accuracy",
                      yaxis_range=[-0.02, 1.02], template="plotly_white")
    return fig


def injection_curves(df: pd.DataFrame, value: str = "cos_mean",
                     title: str | None = None) -> go.Figure:
    """Signal injection (paper Fig. 12/24): cosine to FP by layer, one line per k, one panel per
    stream (resid_post, attn_out, mlp_out). ``df`` is :func:`mechq.analysis.sensitivity.signal_injection`;
    the legend shows each k's accuracy."""
    from plotly.subplots import make_subplots

    streams = list(dict.fromkeys(df["stream"]))
    fig = make_subplots(rows=1, cols=len(streams), shared_yaxes=True, subplot_titles=streams)
    ks = sorted(df["k"].unique())
    for c, s in enumerate(streams, start=1):
        for i, k in enumerate(ks):
            g = df[(df["stream"] == s) & (df["k"] == k)].sort_values("layer")
            acc = g["accuracy"].iloc[0] if "accuracy" in g and len(g) else float("nan")
            fig.add_trace(go.Scatter(
                x=g["layer"], y=g[value], mode="lines", legendgroup=str(k), showlegend=(c == 1),
                name=f"k={k} (acc {acc:.2f})",
                line=dict(color=f"hsl({int(270 * i / max(len(ks) - 1, 1))},70%,45%)"),
                hovertemplate=f"k={k} · {s}<br>layer %{{x}}<br>{value} %{{y:.4f}}<extra></extra>",
            ), row=1, col=c)
        fig.update_xaxes(title_text="layer", row=1, col=c)
    hi, lo = (df["high"].iloc[0], df["low"].iloc[0]) if "high" in df else ("high", "low")
    fig.update_layout(title=title or f"Signal injection: first k layers {hi}, the rest {lo}",
                      yaxis_title=f"cosine to FP ({value})", template="plotly_white",
                      height=420)
    return fig


def weight_signature_lines(weights: pd.DataFrame, signature: str = "step_error",
                           threshold: float | None = None, title: str | None = None) -> go.Figure:
    """One weight-space signature (:mod:`mechq.analysis.signatures`) per layer, one line per component, with
    the threshold above which :mod:`mechq.diagnosis.verdict` calls a module off its grid."""
    fig = go.Figure()
    for i, (comp, g) in enumerate(weights.groupby("component", sort=False)):
        fig.add_trace(go.Scatter(x=g["layer"], y=g[signature], mode="lines+markers", name=comp,
                                 text=g["module"], line=dict(color=PALETTE[i % len(PALETTE)]),
                                 hovertemplate="%{text}<br>%{y:.3f}<extra></extra>"))
    if threshold is not None:
        fig.add_hline(y=threshold, line=dict(color="#d62728", dash="dash"),
                      annotation_text=f"threshold {threshold:g}")
    fig.update_layout(title=title or f"{signature} per module", xaxis_title="layer",
                      yaxis_title=signature, template="plotly_white", height=380)
    return fig


def repair_pareto(table: pd.DataFrame, subset: str = "all",
                  title: str | None = None) -> go.Figure:
    """Accuracy (on ``subset`` of the held-out facts) against average bits per weight, one
    marker per (base, repair) of a :func:`mechq.repair.table.repair_table` frame, each base's points
    joined in bit order; the upper-left frontier is where a repair pays for its bits."""
    t = table[table["subset"] == subset].sort_values("avg_bits")
    fig = go.Figure()
    symbols = {r: s for r, s in zip(dict.fromkeys(table["repair"]),
                                    ["circle", "square", "diamond", "triangle-up", "star", "x"])}
    for base, d in t.groupby("base", sort=False):
        fig.add_trace(go.Scatter(
            x=d["avg_bits"], y=100 * d["accuracy"], mode="lines+markers", name=base,
            marker=dict(size=11, symbol=[symbols[r] for r in d["repair"]]),
            text=d["repair"], line=dict(dash="dot", width=1),
            hovertemplate="%{text}<br>%{x:.3f} bits<br>%{y:.1f} %<extra>" + base + "</extra>"))
    fig.update_layout(title=title or f"Repairs: accuracy ({subset} held-out facts) vs bits",
                      xaxis_title="average bits per weight (linear modules)",
                      yaxis_title="accuracy (%)", template="plotly_white")
    return fig


def architecture_curves(frame: pd.DataFrame, x: str = "depth", title: str | None = None,
                        xaxis_title: str = "depth quantized, (k + 1) / L") -> go.Figure:
    """Accuracy against relative depth, one line per model (paper Fig. 10 / Fig. 22 side by
    side): ``frame`` is :attr:`mechq.reports.architectures.Comparison.domino` or ``.single``."""
    fig = go.Figure()
    for name, g in frame.groupby("model", sort=False):
        g = g.sort_values(x)
        fig.add_trace(go.Scatter(
            x=g[x], y=g["accuracy"], mode="lines+markers", name=f"{name} ({g['variant'].iloc[0]})",
            error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["accuracy"],
                         arrayminus=g["accuracy"] - g["ci_low"]),
            hovertemplate=f"{name}<br>{x} %{{x:.2f}}<br>accuracy %{{y:.3f}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title="accuracy",
                      yaxis_range=[-0.02, 1.02], template="plotly_white")
    return fig


def architecture_bars(frame: pd.DataFrame, x: str, title: str | None = None) -> go.Figure:
    """Accuracy per ``x`` (a component setting, a protection, a bit width), bars grouped by
    model."""
    fig = go.Figure()
    for name, g in frame.groupby("model", sort=False):
        fig.add_trace(go.Bar(x=g[x].astype(str), y=g["accuracy"], name=str(name),
                             hovertemplate=f"{name}<br>%{{x}}<br>accuracy %{{y:.3f}}"
                                           "<extra></extra>"))
    fig.update_layout(title=title, barmode="group", yaxis_title="accuracy",
                      yaxis_range=[0, 1.02], template="plotly_white")
    return fig


def evidence_heatmap(evidence: pd.DataFrame, title: str | None = None) -> go.Figure:
    """The verdicts' evidence side by side, from :func:`mechq.diagnosis.verdict.evidence_long`:
    one row per signature with a threshold, one column per variant. A cell is red when its 95 %
    interval lies wholly beyond the threshold on the side that supports computation collapse,
    orange when it lies wholly on the "not healthy" side (recall, KLD), yellow when the
    interval straddles the threshold, and grey otherwise; the label is the value and its
    interval. Column titles carry each variant's verdict."""
    from mechq.diagnosis.verdict import RULES

    ev = evidence[evidence["threshold"].notna()]
    variants = list(dict.fromkeys(ev["variant"]))
    sigs = list(dict.fromkeys(ev["signature"]))
    cell = ev.set_index(["signature", "variant"])
    z, text = [], []
    for sig in sigs:
        zs, ts = [], []
        for v in variants:
            r = cell.loc[(sig, v)]
            if r["value"] != r["value"]:
                zs.append(0.0)
                ts.append("not measured")
                continue
            crossed = r["crossed"] if r["crossed"] in (True, False) else None
            zs.append(2.0 if crossed is None else
                      (3.0 if r["supports"] == "not healthy" else 1.0) if crossed else 0.0)
            ts.append(_short(r["value"]) + (f" [{_short(r['ci_low'])}, {_short(r['ci_high'])}]"
                                            if r["ci_low"] != r["ci_high"] else ""))
        z.append(zs)
        text.append(ts)
    thr = ev.drop_duplicates("signature").set_index("signature")["threshold"]
    sign = {"below": "<", "above": ">"}
    labels = [f"{s} ({sign[RULES[s][0]]} {thr[s]:g})" for s in sigs]
    heads = ev.drop_duplicates("variant").set_index("variant")
    cols = [f"{v}<br><b>{heads.loc[v, 'verdict'].replace('_', ' ')}</b>"
            + ("<br>borderline" if heads.loc[v, "borderline"] else "") for v in variants]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=labels, text=text, texttemplate="%{text}", zmin=0, zmax=3,
        showscale=False,
        colorscale=[[0, "#f4f4f4"], [0.25, "#f4f4f4"], [0.25, "#e4572e"], [0.5, "#e4572e"],
                    [0.5, "#f2d16b"], [0.75, "#f2d16b"], [0.75, "#f28e2b"], [1, "#f28e2b"]],
        hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>", xgap=2, ygap=2))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "The verdict's evidence with 95 % intervals (red: beyond "
                                     "the collapse threshold, orange: not healthy, yellow: "
                                     "straddles its threshold)",
                      template="plotly_white", height=90 + 34 * len(sigs),
                      margin=dict(l=20, r=20, t=60, b=20))
    return fig


def _short(x: float) -> str:
    """A compact label for a signature value."""
    if x != x:
        return "—"
    if x != 0 and abs(x) < 0.01:
        return f"{x:.1e}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def sensitivity_map(sens: pd.DataFrame, chosen: dict[str, int] | None = None,
                    title: str | None = None, ranks: dict[str, int] | None = None) -> go.Figure:
    """The sensitivity map: one panel per width, layer (y) × component (x), coloured by
    ``log10`` of the Fisher estimate of the KL increase (:func:`mechq.analysis.fisher.sensitivity`'s
    ``fisher_error``, nats per token) when only that module is quantized to that width; one
    colour range for every panel. ``chosen`` (module → width, e.g. a recipe's ``modules``)
    marks each module's chosen width with a white square; ``ranks`` (module → EoRA rank, a
    recipe's ``ranks``) adds a white dot inside the square of each corrected module."""
    from plotly.subplots import make_subplots

    widths = sorted(int(b) for b in sens["bits"].unique())
    comps = list(dict.fromkeys(sens["component"]))
    layers = sorted(sens["layer"].unique())
    logs = np.log10(sens["fisher_error"].clip(lower=1e-12).to_numpy(dtype=float))
    fig = make_subplots(rows=1, cols=len(widths), shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[f"{b} bits" for b in widths])
    in_legend: set[str] = set()  # each mark named once in the legend, where it first appears
    for c, b in enumerate(widths, start=1):
        g = sens[sens["bits"] == b].assign(log=np.log10(
            sens.loc[sens["bits"] == b, "fisher_error"].clip(lower=1e-12)))
        z = g.pivot(index="layer", columns="component", values="log").reindex(
            index=layers, columns=comps)
        mods = g.pivot(index="layer", columns="component", values="module").reindex(
            index=layers, columns=comps)
        fig.add_trace(go.Heatmap(
            z=z.to_numpy(), x=comps, y=layers, customdata=mods.to_numpy(),
            zmin=float(logs.min()), zmax=float(logs.max()), colorscale="Viridis",
            showscale=(c == len(widths)), colorbar=dict(title="log10 ΔKL"),
            hovertemplate=(f"%{{customdata}}<br>{b} bits: estimated ΔKL 10^%{{z:.2f}} nats"
                           "<extra></extra>")), row=1, col=c)
        if chosen:
            pick = g[g["module"].map(chosen) == b]
            fig.add_trace(go.Scatter(
                x=pick["component"], y=pick["layer"], mode="markers",
                showlegend=len(pick) > 0 and "chosen width" not in in_legend,
                name="chosen width", legendgroup="chosen",
                marker=dict(symbol="square-open", size=9, color="white", line=dict(width=2)),
                hoverinfo="skip"), row=1, col=c)
            if len(pick):
                in_legend.add("chosen width")
            fixed = pick[pick["module"].isin(list(ranks or {}))]
            if len(fixed):
                fig.add_trace(go.Scatter(
                    x=fixed["component"], y=fixed["layer"], mode="markers",
                    showlegend="EoRA correction" not in in_legend,
                    name="EoRA correction", legendgroup="eora",
                    customdata=[[m, ranks[m]] for m in fixed["module"]],
                    marker=dict(symbol="circle", size=4, color="white"),
                    hovertemplate="%{customdata[0]}: EoRA rank %{customdata[1]}<extra></extra>"),
                    row=1, col=c)
                in_legend.add("EoRA correction")
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    fig.update_layout(title=title or "Sensitivity map: estimated KL increase of each module "
                                     "at each width", template="plotly_white",
                      legend=dict(orientation="h", x=0, y=-0.06),
                      height=max(360, 16 * len(layers) + 180), width=230 * len(widths) + 160)
    return fig
