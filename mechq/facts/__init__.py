"""Layer 2 — facts and text: what the model is asked, and what quantizers calibrate on.

- :mod:`mechq.facts.factset`: facts as cloze prompts with single-token targets, the bundled set;
- :mod:`mechq.facts.pararel`: Pararel's facts and paraphrase prompts, read from a checkout;
- :mod:`mechq.facts.sources`: a fact source named in one string (``bundled``, a CSV, Pararel);
- :mod:`mechq.facts.calibration`: the calibration text every quantizer gets.
"""

from mechq.facts.factset import (
    DATA_DIR, Fact, FactSet, bundled_facts, load_facts, load_relations, target_report,
    target_token,
)
from mechq.facts.pararel import load_pararel
from mechq.facts.sources import load_fact_source

__all__ = ["DATA_DIR", "Fact", "FactSet", "bundled_facts", "load_fact_source", "load_facts",
           "load_pararel", "load_relations", "target_report", "target_token"]
