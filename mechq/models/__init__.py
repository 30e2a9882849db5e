"""Layer 1 — models: a real model as a TransformerLens ``HookedTransformer``, and its family.

:func:`load_model` turns a name (the embedded SmolLM2, Gemma 3 270M, the tiny GPT-2) or a Hugging
Face directory into a ``HookedTransformer`` whose weights are exactly the Hugging Face ones;
:mod:`mechq.models.families` holds, per architecture, everything mechq knows about it.
"""

from mechq.models.load import (
    EMBEDDED, GEMMA, TINY, ModelLoadError, ModelSource, cache_dir, default_device, load_hf,
    load_model, register_source, resolve_hf_dir, source_of, weights_digest,
)

__all__ = ["EMBEDDED", "GEMMA", "TINY", "ModelLoadError", "ModelSource", "cache_dir",
           "default_device", "load_hf", "load_model", "register_source", "resolve_hf_dir",
           "source_of", "weights_digest"]
