"""mechq: what did quantization break? Mechanistic diagnosis of quantized LLMs.

After "From Signal Degradation to Computation Collapse" (arXiv 2604.19884). A quantized variant is
a weight swap on one ``HookedTransformer``, so FP and quantized runs share hook names.

    import mechq
    model = mechq.load_model()                      # SmolLM2-135M-Instruct, offline
    w4 = mechq.quantize(model, "gptq", bits=4)      # GPTQModel, read back by mechq
    df = mechq.evaluate_recall(model, mechq.bundled_facts(), variants=[w4])
    with mechq.swap(model, w4, layers=range(4), components="mlp"):
        logits = model("The capital of France is")
"""

import logging as _logging
import warnings as _warnings

# transformer-lens 3.9 warns that HookedTransformer is deprecated (4.x removed it; see README).
_warnings.filterwarnings("ignore", message=".*HookedTransformer.*", category=DeprecationWarning)
_warnings.filterwarnings("ignore", category=FutureWarning, module="transformer_lens")


def _import_noise(record: _logging.LogRecord) -> bool:
    """False for two import-time log lines that say nothing about the user's run: torchao (a
    GPTQModel dependency that transformers imports) not loading kernels built for other CUDA
    versions, and torch's deprecation note on torchao's Enum pytree registrations."""
    msg = str(record.msg)
    return not (msg.startswith("Failed to load") and "torchao" in record.getMessage()
                or "is an Enum subclass and is now natively supported" in msg)


_logging.getLogger("torchao").addFilter(_import_noise)
_logging.getLogger("torch.utils._pytree").addFilter(_import_noise)

from mechq.facts import Fact, FactSet, bundled_facts, load_facts, target_report  # noqa: E402
from mechq.models import load_model  # noqa: E402
from mechq.quant.quantize import Request, load_variant, quantize, quantize_many  # noqa: E402
from mechq.quant.variants import Variant, calibrated, swap, with_activations  # noqa: E402
from mechq.quant.activation_quant import ActScheme, scheme  # noqa: E402
from mechq.quant.fp8 import quantize_fp8_weights  # noqa: E402
from mechq.quant.formats.compressed_write import write_compressed_tensors  # noqa: E402
from mechq.analysis.recall import accuracy, evaluate_recall, subset_labels, subsets  # noqa: E402
from mechq.analysis.lens import logit_lens  # noqa: E402
from mechq.analysis.components import component_metrics  # noqa: E402
from mechq.analysis.representation import representation_metrics  # noqa: E402
from mechq.analysis.patching import patch_sweep  # noqa: E402
from mechq.facts.pararel import load_pararel  # noqa: E402
from mechq.analysis.cliff import cliff_table  # noqa: E402
from mechq.analysis.kld import kld_stats  # noqa: E402
from mechq.reports.pipeline import report  # noqa: E402
from mechq.diagnosis.verdict import diagnose  # noqa: E402
from mechq.repair.eora import eora  # noqa: E402
from mechq.repair.adapter import write_peft_adapter  # noqa: E402
from mechq.repair.table import repair_table  # noqa: E402
from mechq.repair.recipe import make_recipe  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ActScheme", "Fact", "FactSet", "Request", "Variant", "accuracy", "calibrated", "bundled_facts", "cliff_table",
    "component_metrics", "diagnose", "eora", "evaluate_recall", "kld_stats", "load_facts", "load_model",
    "load_pararel", "load_variant", "logit_lens", "make_recipe", "patch_sweep", "quantize", "quantize_fp8_weights", "quantize_many",
    "repair_table", "report", "representation_metrics", "scheme", "subset_labels", "subsets", "swap",
    "target_report", "with_activations",
    "write_compressed_tensors", "write_peft_adapter",
]
