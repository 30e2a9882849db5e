"""Facts as cloze prompts with single-token targets.

A fact is a (subject, relation, object) triple; its relation's template is a cloze that ends
right before the object ("The capital of {subject} is"). The model is asked for the next token,
and the **target** is the first token of ``" " + object`` under the model's tokenizer
(the paper's first-token accuracy). How cleanly that token stands for the object is recorded as
``target_kind``:

- ``single``: the whole object is one token;
- ``multi``: the object spans several tokens; the first carries at least 3 characters of it;
- ``fragment``: the first token is a short piece (< 3 characters) that many objects share —
  reported, kept in every frame, and excluded from accuracy only where a caller asks.

The bundled fact set (``data/facts.csv`` + ``data/relations.json``) was written by hand by the
mechq authors.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

def _data_dir() -> Path:
    """``$MECHQ_DATA``, else the installed package ``mechq.data`` (``data/`` in the repo)."""
    if os.environ.get("MECHQ_DATA"):
        return Path(os.environ["MECHQ_DATA"])
    return Path(str(resources.files("mechq.data"))).resolve()


DATA_DIR = _data_dir()


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) fact and the cloze template of its relation."""

    id: str
    relation: str
    subject: str
    object: str
    template: str

    @property
    def prompt(self) -> str:
        return self.template.format(subject=self.subject)


class FactSet(Sequence[Fact]):
    """An ordered collection of facts with a name (e.g. ``"bundled"``)."""

    def __init__(self, facts: Sequence[Fact], name: str = "facts"):
        self.facts = list(facts)
        self.name = name
        ids = [f.id for f in self.facts]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"Duplicate fact ids in {name}: {dup}")

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return FactSet(self.facts[i], self.name)
        return self.facts[i]

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __repr__(self) -> str:
        return f"FactSet({self.name!r}, {len(self)} facts, {len(self.relations)} relations)"

    @property
    def relations(self) -> list[str]:
        return list(dict.fromkeys(f.relation for f in self.facts))

    def filter(self, relations: str | Sequence[str] | None = None, ids=None) -> FactSet:
        rel = {relations} if isinstance(relations, str) else set(relations or [])
        keep = set(ids) if ids is not None else None
        return FactSet(
            [
                f
                for f in self.facts
                if (not rel or f.relation in rel) and (keep is None or f.id in keep)
            ],
            self.name,
        )

    def sample(self, n: int, seed: int = 0) -> FactSet:
        """``n`` facts drawn without replacement, stratified by nothing, in a seeded order."""
        import random

        idx = sorted(random.Random(seed).sample(range(len(self)), min(n, len(self))))
        return FactSet([self.facts[i] for i in idx], self.name)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                dict(fact_id=f.id, relation=f.relation, subject=f.subject, object=f.object,
                     prompt=f.prompt)
                for f in self.facts
            ]
        )


def load_relations(path: str | Path | None = None) -> dict[str, dict]:
    """Relations by id from a relations.json (a list of {id, name, template, description})."""
    path = Path(path) if path else DATA_DIR / "relations.json"
    rels = {r["id"]: r for r in json.loads(path.read_text())}
    for rid, r in rels.items():
        t = r.get("template", "")
        if t.count("{subject}") != 1 or t != t.rstrip():
            raise ValueError(
                f"{path}: relation {rid!r} needs a template with one {{subject}} and no trailing "
                f"space, got {t!r}"
            )
    return rels


def load_facts(
    path: str | Path | None = None, relations_path: str | Path | None = None, name: str = ""
) -> FactSet:
    """Facts from a CSV with columns ``id,relation,subject,object``.

    Default: the bundled, hand-written set in ``data/``.
    """
    path = Path(path) if path else DATA_DIR / "facts.csv"
    rels = load_relations(relations_path)
    facts = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row_no, row in enumerate(csv.DictReader(fh), start=2):
            missing = [k for k in ("id", "relation", "subject", "object") if not row.get(k)]
            if missing:
                raise ValueError(f"{path}:{row_no}: missing {missing}")
            if row["relation"] not in rels:
                raise ValueError(
                    f"{path}:{row_no}: relation {row['relation']!r} is not in relations.json"
                )
            facts.append(
                Fact(row["id"], row["relation"], row["subject"].strip(), row["object"].strip(),
                     rels[row["relation"]]["template"])
            )
    return FactSet(facts, name or ("bundled" if path.parent == DATA_DIR else path.stem))


def bundled_facts() -> FactSet:
    """The hand-written fact set shipped in ``data/``."""
    return load_facts()


def target_token(tokenizer, obj: str) -> tuple[int, str, str]:
    """(first token id of ``" " + obj``, its text, target_kind)."""
    ids = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"Object {obj!r} tokenizes to nothing.")
    text = tokenizer.decode([ids[0]])
    if len(ids) == 1:
        kind = "single"
    elif len(text.strip()) >= 3:
        kind = "multi"
    else:
        kind = "fragment"
    return ids[0], text, kind


def target_report(facts: FactSet, tokenizer) -> pd.DataFrame:
    """Per fact: its target token and how cleanly that token stands for the object."""
    rows = []
    for f in facts:
        tid, text, kind = target_token(tokenizer, f.object)
        rows.append(dict(fact_id=f.id, relation=f.relation, object=f.object, target_id=tid,
                         target=text, target_kind=kind))
    return pd.DataFrame(rows)
