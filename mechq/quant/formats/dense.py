"""A variant as a plain float Hugging Face model: its dequantized weights in a transformers model.

Not a quantized format: what a tool that knows nothing of quantization (PEFT, an evaluation
harness, ``save_pretrained``) can run. :func:`dequantized_hf_model` loads the model's own Hugging
Face weights (:func:`mechq.models.source_of`) with transformers and writes into every linear
module the variant packs its dequantized weight ``variant.weight(m)`` (with ``lowrank=False``
the packed weight alone, without a low-rank correction ``B A``: the base an EoRA adapter goes on),
and into every norm the variant rewrote (AWQ) its new value. Modules the variant keeps in full
precision, embeddings, biases and the LM head stay as the Hugging Face directory holds them.
Weights are placed in ``torch.nn.Linear`` orientation, transposed for a family that stores
``Conv1D`` (GPT-2).
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from mechq.models import load as models
from mechq.models.families import family_of


@torch.no_grad()
def dequantized_hf_model(variant, model: HookedTransformer, *, lowrank: bool = True,
                         dtype: torch.dtype = torch.float32):
    """The transformers model behind ``model`` with ``variant``'s dequantized weights in it.

    ``lowrank``: include the variant's low-rank corrections (``W_q + B A``, what
    :func:`mechq.swap` puts in); False gives the packed weights only. ``dtype``: the
    transformers model's dtype (the weights are dequantized in float32, then cast). Raises
    ValueError when ``model``'s weights differ from those it was loaded with (inside a swap, or
    edited: the unquantized tensors come from its Hugging Face directory) or the variant does
    not fit it.
    Returns the model in eval mode.
    """
    src = models.source_of(model)
    if src.weights and models.weights_digest(model) != src.weights:
        raise ValueError(f"the model's weights differ from those it was loaded with (is it "
                         f"inside a swap, or edited?), but the Hugging Face model is read from "
                         f"{src.hf_dir}; call this outside any swap, or save the edited model as "
                         "a Hugging Face directory and load that.")
    hf, _, _ = models.load_hf(str(src.hf_dir), dtype=dtype)
    conv1d = family_of(model.cfg).conv1d
    params = dict(hf.named_parameters())
    for m, packed in variant.modules.items():
        w = variant.weight(m, torch.float32) if lowrank else packed.weight(torch.float32)
        target = params.get(f"{m}.weight")
        if target is None:
            raise ValueError(f"Variant {variant.name!r}: {src.hf_dir} has no module {m!r}; was "
                             "the variant made for another model?")
        w = w.T if conv1d else w
        if tuple(w.shape) != tuple(target.shape):
            raise ValueError(f"Variant {variant.name!r}: {m} is {tuple(w.shape)} here, "
                             f"{tuple(target.shape)} in {src.hf_dir}; another model?")
        target.copy_(w.to(target.dtype))
    for name, t in variant.norms.items():
        params[name].copy_(t.to(params[name].dtype))
    return hf.eval()
