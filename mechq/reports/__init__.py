"""Layer 8 — reports: figures, HTML pages and the main job, drawn from analysis frames.

- :mod:`~mechq.reports.plots`: Plotly figures, one per frame kind;
- :mod:`~mechq.reports.attention`: attention patterns with circuitsvis, offline;
- :mod:`~mechq.reports.html`: one self-contained HTML page;
- :mod:`~mechq.reports.pipeline`: the main job (``make demo``, ``mechq report``);
- :mod:`~mechq.reports.architectures`: two model families side by side.
"""
