"""Where facts come from, named in one string (the CLI's ``--facts``)."""

from __future__ import annotations

from mechq.facts.factset import FactSet, bundled_facts, load_facts
from mechq.facts.pararel import load_pararel


def load_fact_source(spec: str, max_facts: int | None = None, seed: int = 0) -> FactSet:
    """``bundled`` | a facts CSV | ``pararel[:P36,P103]`` -> FactSet (sampled to ``max_facts``)."""
    if spec == "bundled":
        fs = bundled_facts()
    elif spec.startswith("pararel"):
        rels = spec.partition(":")[2]
        fs = load_pararel(relations=rels.split(",") if rels else None).facts
    else:
        fs = load_facts(spec)
    return fs.sample(max_facts, seed=seed) if max_facts else fs
