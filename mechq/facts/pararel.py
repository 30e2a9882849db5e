"""Pararel (Elazar et al., 2021) at scale: its facts and paraphrase prompts.

Reads a Pararel checkout in its original layout (never copied into mechq):

- ``data/pattern_data/graphs_json/P*.jsonl``: one paraphrase per line, ``{"pattern": "[X] ...
  [Y] ."}`` (patterns: MIT licence);
- ``data/trex_lms_vocab/P*.jsonl``: ``{"sub_label", "obj_label", "uuid"}`` tuples (T-REx,
  CC BY-NC 4.0).

Two prompt styles, as in the paper:

- **primary** (mechanistic analysis, paper §3.1): one template per relation, the first pattern in
  file order whose ``[Y]`` comes last (optionally followed by a period). The template is the
  pattern cut right before ``[Y]``, trailing whitespace removed, ``[X]`` → ``{subject}``:
  ``"The capital of [X] is [Y] ."`` → ``"The capital of {subject} is"``. These are ordinary
  :class:`mechq.facts.Fact` s in a :class:`~mechq.facts.FactSet`; ids are ``P36-0001``, where
  the number is the tuple's 1-based line in its ``trex_lms_vocab`` file (stable under
  sub-sampling). Exact duplicate (subject, object) lines keep their first occurrence.
- **paraphrases** (robustness evaluation): every pattern of the relation (the primary included).
  A pattern whose ``[Y]`` is last becomes a prompt the same way as the primary. Any other pattern
  is wrapped in an instruction::

      Based on your knowledge, complete the following sentence by filling in the blank: '{cloze}' The missing word is:

  where ``cloze`` is the pattern with ``[X]`` filled and ``[Y]`` replaced by ``___`` (three
  underscores), runs of whitespace collapsed and a space before a final period removed.

In both styles the target is the first token of ``" " + object`` (see
:func:`mechq.facts.target_token`); multi-token objects are kept and flagged by ``target_kind``.
Pattern whitespace is normalised (runs of spaces → one space) everywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mechq.facts.factset import Fact, FactSet

PATTERN_DIR = Path("data") / "pattern_data" / "graphs_json"
TUPLE_DIR = Path("data") / "trex_lms_vocab"
BLANK = "___"
INSTRUCTION = (
    "Based on your knowledge, complete the following sentence by filling in the blank: "
    "'{cloze}' The missing word is:"
)
_Y_LAST = re.compile(r"\[Y\]\s*\.?\s*$")


@dataclass(frozen=True)
class Paraphrase:
    """One fact asked with one pattern of its relation.

    ``pattern_index`` is the 0-based line of the pattern in its ``graphs_json`` file;
    ``object_last`` says whether the prompt is a plain continuation (``[Y]`` last) or the
    fill-in-the-blank instruction.
    """

    fact_id: str
    pattern_index: int
    prompt: str
    object_last: bool


@dataclass
class ParaRel:
    """Pararel facts (primary templates), every paraphrase, and per-relation info.

    ``relations[pid]`` holds ``template`` (the primary, ``{subject}`` form), ``pattern_index``
    (of the primary), ``patterns`` (all, whitespace-normalised), ``n_patterns``,
    ``n_object_last``, ``n_tuples`` (in the file), ``n_duplicates`` (dropped), ``n_facts`` (kept).
    """

    facts: FactSet
    paraphrases: list[Paraphrase]
    relations: dict[str, dict] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"ParaRel({len(self.facts)} facts, {len(self.paraphrases)} paraphrases, "
                f"{len(self.relations)} relations)")

    def paraphrase_frame(self) -> pd.DataFrame:
        """One row per paraphrase: fact_id, relation, subject, object, pattern_index, pattern,
        is_primary, object_last, prompt."""
        by_id = {f.id: f for f in self.facts}
        rows = []
        for p in self.paraphrases:
            f = by_id[p.fact_id]
            info = self.relations[f.relation]
            rows.append(dict(
                fact_id=p.fact_id, relation=f.relation, subject=f.subject, object=f.object,
                pattern_index=p.pattern_index, pattern=info["patterns"][p.pattern_index],
                is_primary=p.pattern_index == info["pattern_index"], object_last=p.object_last,
                prompt=p.prompt,
            ))
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def default_path() -> Path | None:
    """``$MECHQ_PARAREL``, else ``../shared/pararel-dev`` next to the repository, if present."""
    env = os.environ.get("MECHQ_PARAREL")
    cands = [Path(env)] if env else []
    cands.append(Path(__file__).resolve().parents[3] / "shared" / "pararel-dev")
    for c in cands:
        if (c / PATTERN_DIR).is_dir():
            return c
    return None


def _norm(pattern: str) -> str:
    return re.sub(r"\s+", " ", pattern).strip()


def _fill(pattern: str, subject: str, y: str) -> str:
    """Replace ``[X]`` and ``[Y]`` in one pass (a subject containing "[Y]" stays intact)."""
    return re.sub(r"\[X\]|\[Y\]", lambda m: subject if m.group() == "[X]" else y, pattern)


def object_last(pattern: str) -> bool:
    return bool(_Y_LAST.search(pattern))


def primary_template(pattern: str) -> str:
    """``"[X] is located in [Y] ."`` → ``"{subject} is located in"``."""
    if not object_last(pattern):
        raise ValueError(f"[Y] is not last in {pattern!r}")
    head = _norm(pattern)[: _norm(pattern).index("[Y]")].rstrip()
    head = head.replace("{", "{{").replace("}", "}}")
    return head.replace("[X]", "{subject}")


def paraphrase_prompt(pattern: str, subject: str) -> tuple[str, bool]:
    """(prompt, object_last) for one pattern and subject."""
    pat = _norm(pattern)
    if object_last(pat):
        return _fill(pat[: pat.index("[Y]")].rstrip(), subject, ""), True
    cloze = re.sub(r"\s+\.$", ".", _fill(pat, subject, BLANK))
    return INSTRUCTION.format(cloze=cloze), False


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def available_relations(path: str | Path) -> list[str]:
    """P-ids that have both a pattern file and a tuple file, sorted numerically."""
    path = Path(path)
    pats = {p.stem for p in (path / PATTERN_DIR).glob("P*.jsonl")}
    tups = {p.stem for p in (path / TUPLE_DIR).glob("P*.jsonl")}
    return sorted(pats & tups, key=lambda s: int(s[1:]))


def load_pararel(
    path: str | Path | None = None,
    relations: str | Sequence[str] | None = None,
    *,
    max_facts_per_relation: int | None = None,
    seed: int = 0,
) -> ParaRel:
    """Load Pararel from a checkout (see the module docstring for the prompt styles).

    ``relations``: P-ids to load (default: every relation with both files). With
    ``max_facts_per_relation``, that many tuples are drawn per relation (seeded by ``seed`` and
    the P-id) and kept in file order.
    """
    if path is None:
        path = default_path()
        if path is None:
            raise FileNotFoundError("No Pararel checkout: pass a path or set $MECHQ_PARAREL.")
    path = Path(path)
    if not (path / PATTERN_DIR).is_dir() or not (path / TUPLE_DIR).is_dir():
        raise FileNotFoundError(f"{path} does not hold {PATTERN_DIR} and {TUPLE_DIR}.")
    have = available_relations(path)
    if relations is None:
        wanted = have
    else:
        wanted = [relations] if isinstance(relations, str) else list(relations)
        missing = [r for r in wanted if r not in have]
        if missing:
            raise ValueError(f"Relations {missing} are not in {path} (have {have}).")
    facts: list[Fact] = []
    paras: list[Paraphrase] = []
    info: dict[str, dict] = {}
    for pid in wanted:
        patterns = [_norm(r["pattern"]) for r in _read_jsonl(path / PATTERN_DIR / f"{pid}.jsonl")]
        bad = [p for p in patterns if p.count("[X]") != 1 or p.count("[Y]") != 1]
        if bad:
            raise ValueError(f"{pid}: patterns need one [X] and one [Y], got {bad[:3]}")
        last = [i for i, p in enumerate(patterns) if object_last(p)]
        if not last:
            raise ValueError(f"{pid}: no pattern ends with [Y]; cannot build a primary template.")
        template = primary_template(patterns[last[0]])
        tuples = _read_jsonl(path / TUPLE_DIR / f"{pid}.jsonl")
        seen: set[tuple[str, str]] = set()
        kept: list[tuple[int, str, str]] = []
        for line_no, t in enumerate(tuples, start=1):
            sub, obj = str(t["sub_label"]).strip(), str(t["obj_label"]).strip()
            if not sub or not obj or (sub, obj) in seen:
                continue
            seen.add((sub, obj))
            kept.append((line_no, sub, obj))
        n_kept = len(kept)
        if max_facts_per_relation is not None and len(kept) > max_facts_per_relation:
            rng = random.Random(f"{seed}-{pid}")
            kept = sorted(rng.sample(kept, max_facts_per_relation))
        width = max(4, len(str(len(tuples))))
        for line_no, sub, obj in kept:
            fid = f"{pid}-{line_no:0{width}d}"
            facts.append(Fact(fid, pid, sub, obj, template))
            for k, pat in enumerate(patterns):
                prompt, ol = paraphrase_prompt(pat, sub)
                paras.append(Paraphrase(fid, k, prompt, ol))
        info[pid] = dict(
            template=template, pattern_index=last[0], patterns=patterns,
            n_patterns=len(patterns), n_object_last=len(last), n_tuples=len(tuples),
            n_duplicates=len(tuples) - n_kept, n_facts=len(kept),
        )
    return ParaRel(FactSet(facts, name="pararel"), paras, info)
