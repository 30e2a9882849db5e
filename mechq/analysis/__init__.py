"""Layer 5 — analysis: what the paper measures, each as a tidy ``pandas.DataFrame``.

- :mod:`~mechq.analysis.recall`: factual recall, answer rank, Robust / Failure subsets (§3.1–3.2);
- :mod:`~mechq.analysis.paraphrase`: recall over Pararel's paraphrases;
- :mod:`~mechq.analysis.lens`: the logit lens (§3.3);
- :mod:`~mechq.analysis.components`: attention entropy / JSD, FFN sign flips / Jaccard (§4.1);
- :mod:`~mechq.analysis.representation`: CKA and SVD subspaces (§4.2);
- :mod:`~mechq.analysis.patching`: patching sweeps FP → variant and zero ablation (§3.4);
- :mod:`~mechq.analysis.sensitivity`: first domino, single layers, components, injection (§4.3);
- :mod:`~mechq.analysis.cliff`: the performance cliff across bit widths (Fig. 1);
- :mod:`~mechq.analysis.signatures`: per-module weight signatures (no forward pass);
- :mod:`~mechq.analysis.fisher`: every module's estimated KL increase at every width (Fisher);
- :mod:`~mechq.analysis.outliers`: massive activations, outlier channels, what a scheme destroys.
"""
