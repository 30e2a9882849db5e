"""Layer 4 — the engine: batched forwards that every analysis runs on.

- :mod:`mechq.engine.forward`: fact prompts tokenized, right-padded batches, the last position's
  residual stream at chosen layers with shared prefixes computed once, decoding and scoring;
- :mod:`mechq.engine.positions`: which token of a prompt is the subject, the relation, the last;
- :mod:`mechq.engine.activations`: activations at those positions, for FP and any variant;
- :mod:`mechq.engine.patching`: activation patching with patch sites on the batch axis;
- :mod:`mechq.engine.store`: the results store, an append-only CSV that lets a sweep resume.
"""
