"""The names every mechq module shares: the FP run's name, the bit widths, the streams, hooks.

One definition each, so that a frame written by one analysis can be read by another:

- :data:`FP` — the ``variant`` value of rows computed on the full-precision model.
- :data:`CODE_PATH_VARIABLES` — the environment variables that choose torch's CPU code paths.
- :data:`SUPPORTED_BITS` — the weight bit widths mechq packs, reads and quantizes (GPTQ's int32
  packing is defined for 2, 3, 4 and 8 bits).
- :data:`STREAMS` — the three per-block outputs the representation and injection analyses read:
  the residual stream leaving a block, and what attention and the MLP write into it.
- :func:`hook_name` — a TransformerLens hook name, built by TransformerLens's own
  ``get_act_name`` (``hook_name("resid_post", 3) == "blocks.3.hook_resid_post"``,
  ``hook_name("pattern", 3) == "blocks.3.attn.hook_pattern"``).
"""
from __future__ import annotations

from transformer_lens.utilities import get_act_name

FP = "fp"
#: Environment variables that pick which CPU code paths torch runs, and so how it rounds:
#: ATen's vectorized kernels, MKL's BLAS, oneDNN. GPTQ's results depend on them.
CODE_PATH_VARIABLES: tuple[str, ...] = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
STREAMS: tuple[str, ...] = ("resid_post", "attn_out", "mlp_out")


def hook_name(activation: str, layer: int) -> str:
    """TransformerLens's hook name of ``activation`` in block ``layer``."""
    return get_act_name(activation, layer)


def hook_template(activation: str) -> str:
    """``hook_name`` with ``{l}`` in place of the layer, for ``template.format(l=layer)``."""
    return get_act_name(activation, 0).replace("blocks.0.", "blocks.{l}.", 1)
