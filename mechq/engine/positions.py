"""Token positions of a prompt: where the subject sits, what comes after it, the last token.

Activation patching, the logit lens and the component metrics are read at *named* positions so
that prompts of different lengths can be aggregated. For a prompt tokenized as the model runs it
(``model.to_tokens``: BOS first when the model prepends one), the positions are (0-based token
indices into that sequence):

- ``bos``: position 0, only when a BOS token was prepended;
- ``prefix``: template tokens before the subject, after the BOS (e.g. "The capital of");
- ``subject_first``: the first token that overlaps the subject's characters;
- ``subject_mid``: the tokens strictly between ``subject_first`` and ``subject_last`` (empty for
  subjects of one or two tokens);
- ``subject_last``: the last token that overlaps the subject's characters (equal to
  ``subject_first`` for a one-token subject);
- ``relation``: the tokens strictly after ``subject_last`` and strictly before ``last`` (e.g.
  "is" in "The capital of France is" is *not* relation: it is ``last``; in
  "France's capital city is" the relation tokens are "'s capital city");
- ``last``: the final token, where the next token (the object) is predicted; ``n_tokens - 1``.

A token "overlaps the subject" when it covers at least one non-whitespace character of the
subject's character span, so a leading space merged into the first subject token (" France") or
punctuation merged into the last one is handled: the merged token belongs to the subject.
When the prompt ends with the subject, ``last == subject_last`` and ``relation`` is empty; the
names then overlap, and :meth:`Positions.labels` resolves each position to a single name with the
priority ``last > subject_last > subject_first > subject_mid > relation > prefix > bos``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from mechq.facts import Fact

#: Names of :meth:`Positions.semantic`, in prompt order.
NAMES = ("bos", "prefix", "subject_first", "subject_mid", "subject_last", "relation", "last")
_PRIORITY = ("last", "subject_last", "subject_first", "subject_mid", "relation", "prefix", "bos")


@dataclass(frozen=True)
class Positions:
    """Token positions of one prompt (indices into the model's token sequence, BOS included).

    See the module docstring for the definition of every name.
    """

    n_tokens: int
    subject_first: int
    subject_last: int
    relation: tuple[int, ...]
    last: int
    has_bos: bool = False

    def __post_init__(self):
        lo = int(self.has_bos)
        if not (lo <= self.subject_first <= self.subject_last <= self.last == self.n_tokens - 1):
            raise ValueError(f"Inconsistent positions: {self}")

    @property
    def prefix(self) -> tuple[int, ...]:
        """Template tokens before the subject (BOS excluded)."""
        return tuple(range(int(self.has_bos), self.subject_first))

    @property
    def subject(self) -> tuple[int, ...]:
        """All subject tokens, first to last."""
        return tuple(range(self.subject_first, self.subject_last + 1))

    @property
    def subject_mid(self) -> tuple[int, ...]:
        return tuple(range(self.subject_first + 1, self.subject_last))

    def semantic(self) -> dict[str, int | list[int]]:
        """Named positions: ints for single positions, lists for groups (possibly empty).

        Keys: ``bos`` (only with a BOS), ``prefix``, ``subject_first``, ``subject_mid``,
        ``subject_last``, ``relation``, ``last``.
        """
        out: dict[str, int | list[int]] = {}
        if self.has_bos:
            out["bos"] = 0
        out.update(
            prefix=list(self.prefix),
            subject_first=self.subject_first,
            subject_mid=list(self.subject_mid),
            subject_last=self.subject_last,
            relation=list(self.relation),
            last=self.last,
        )
        return out

    def labels(self) -> list[str]:
        """One name per token position (length ``n_tokens``), resolved by priority."""
        out: list[str | None] = [None] * self.n_tokens
        sem = self.semantic()
        for name in reversed(_PRIORITY):  # later (higher-priority) names overwrite
            v = sem.get(name)
            for p in [v] if isinstance(v, int) else (v or []):
                out[p] = name
        return [x or "prefix" for x in out]


# --------------------------------------------------------------------------------------------
# Character spans of tokens
# --------------------------------------------------------------------------------------------


def _spans_from_offsets(tokenizer, prompt: str):
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _spans_by_prefix(tokenizer, prompt: str):
    """Char spans without offset support.

    First try incremental prefix decoding (``decode(ids[:i])`` is a prefix of the prompt, true for
    byte-level BPE and SentencePiece); tokens whose prefix decode is not (a partial UTF-8
    character, a normalising tokenizer) get the span of the next token that re-synchronises.
    If decoding does not reproduce the prompt at all (word-level tokenizers join tokens with
    spaces), each token's decoded text is searched for in the prompt left to right.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def dec(x):
        return tokenizer.decode(x, clean_up_tokenization_spaces=False)

    if dec(ids) == prompt:
        spans: list[tuple[int, int]] = []
        prev, pending = 0, 0
        for i in range(1, len(ids) + 1):
            d = dec(ids[:i])
            if prompt.startswith(d) and len(d) >= prev:
                spans.extend([(prev, len(d))] * (pending + 1))
                prev, pending = len(d), 0
            else:
                pending += 1
        spans.extend([(prev, len(prompt))] * pending)
        return ids, spans
    found: list[tuple[int, int] | None] = []
    cursor = 0
    unk = getattr(tokenizer, "unk_token_id", None)
    for t in ids:
        piece = dec([t]).strip() if t != unk else ""
        j = prompt.find(piece, cursor) if piece else -1
        if j < 0:  # unknown token or an unmatched piece: filled in below
            found.append(None)
            continue
        found.append((j, j + len(piece)))
        cursor = j + len(piece)
    # An unmatched token spans the text between its matched neighbours.
    spans = []
    for i, sp in enumerate(found):
        if sp is None:
            prev_end = spans[-1][1] if spans else 0
            nxt = next((s for s in found[i + 1 :] if s is not None), None)
            sp = (prev_end, nxt[0] if nxt else len(prompt))
        spans.append(sp)
    return ids, spans


def token_spans(tokenizer, prompt: str, *, use_offsets: bool | None = None):
    """(token ids without special tokens, char span ``(start, end)`` of each token).

    ``use_offsets=None`` uses the fast tokenizer's ``return_offsets_mapping`` when available and
    falls back to prefix decoding otherwise; ``False`` forces the fallback.
    """
    if use_offsets is not False:
        try:
            return _spans_from_offsets(tokenizer, prompt)
        except (NotImplementedError, TypeError, ValueError, KeyError):
            if use_offsets:
                raise
    return _spans_by_prefix(tokenizer, prompt)


# --------------------------------------------------------------------------------------------
# Locating the subject
# --------------------------------------------------------------------------------------------


def _subject_char_start(prompt: str, subject: str, subject_char_start: int | None) -> int:
    if not subject or not subject.strip():
        raise ValueError("The subject is empty.")
    if subject_char_start is not None:
        if prompt[subject_char_start : subject_char_start + len(subject)] != subject:
            raise ValueError(
                f"Subject {subject!r} does not occur at char {subject_char_start} of {prompt!r}."
            )
        return subject_char_start
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"Subject {subject!r} does not occur in prompt {prompt!r}.")
    return start


def _locate(ids, spans, prompt, subject, start, prepend_bos) -> Positions:
    # The non-whitespace char range of the subject.
    s, e = start, start + len(subject)
    while s < e and prompt[s].isspace():
        s += 1
    while e > s and prompt[e - 1].isspace():
        e -= 1
    hit = []
    for i, (a, b) in enumerate(spans):
        lo, hi = max(a, s), min(b, e)
        if lo < hi and prompt[lo:hi].strip():
            hit.append(i)
    if not hit:
        raise ValueError(
            f"No token of {prompt!r} covers the subject {subject!r} (char {s}-{e}); "
            "the tokenizer's offsets could not be aligned with the text."
        )
    off = int(prepend_bos)
    n = len(ids) + off
    first, last_subj = hit[0] + off, hit[-1] + off
    return Positions(
        n_tokens=n,
        subject_first=first,
        subject_last=last_subj,
        relation=tuple(range(last_subj + 1, n - 1)),
        last=n - 1,
        has_bos=prepend_bos,
    )


def locate(
    tokenizer,
    prompt: str,
    subject: str,
    *,
    prepend_bos: bool,
    subject_char_start: int | None = None,
    use_offsets: bool | None = None,
) -> Positions:
    """Positions of ``subject`` in ``prompt`` tokenized by ``tokenizer``.

    The prompt is tokenized without special tokens; ``prepend_bos`` says whether the model puts a
    BOS token in front (it shifts every position by one and sets ``has_bos``). The subject is the
    occurrence starting at char ``subject_char_start`` when given, else its first occurrence.
    Raises ``ValueError`` when the subject does not occur.
    """
    start = _subject_char_start(prompt, subject, subject_char_start)
    ids, spans = token_spans(tokenizer, prompt, use_offsets=use_offsets)
    return _locate(ids, spans, prompt, subject, start, prepend_bos)


def fact_subject_start(fact: Fact) -> int:
    """Char offset of the subject in ``fact.prompt``: where the template puts ``{subject}``."""
    i = fact.template.index("{subject}")
    return len(fact.template[:i].format())  # un-escapes "{{" / "}}" before the subject


def _model_prepends_bos(model) -> bool:
    return bool(model.cfg.default_prepend_bos)


def locate_fact(model, fact: Fact) -> Positions:
    """Positions of ``fact``'s subject in ``model.to_tokens(fact.prompt)``.

    The subject is the occurrence the template placed (``template.index("{subject}")``), so a
    subject that also appears elsewhere in the prompt is located correctly. The token ids are
    checked against ``model.to_tokens`` (the sequence every analysis runs).
    """
    prompt = fact.prompt
    bos = _model_prepends_bos(model)
    start = fact_subject_start(fact)
    ids, spans = token_spans(model.tokenizer, prompt)
    run = model.to_tokens(prompt, prepend_bos=bos)[0].tolist()
    if run[int(bos):] != ids or len(run) != len(ids) + int(bos):
        raise RuntimeError(
            f"Tokenizing {prompt!r} without special tokens gives {ids}, but model.to_tokens "
            f"gives {run} (prepend_bos={bos}); cannot align positions."
        )
    return _locate(ids, spans, prompt, fact.subject, start, bos)


def positions_frame(model, facts: Iterable[Fact]) -> pd.DataFrame:
    """One row per fact: ``fact_id``, ``relation`` (the fact's relation id), ``n_tokens``,
    ``subject_first``, ``subject_last``, ``relation_positions`` (list), ``prefix_positions``
    (list), ``last``.

    The relation *positions* column is named ``relation_positions`` because ``relation`` holds the
    relation id in every mechq frame.
    """
    rows = []
    for f in facts:
        p = locate_fact(model, f)
        rows.append(dict(fact_id=f.id, relation=f.relation, n_tokens=p.n_tokens,
                         subject_first=p.subject_first, subject_last=p.subject_last,
                         relation_positions=list(p.relation), prefix_positions=list(p.prefix),
                         last=p.last))
    return pd.DataFrame(rows, columns=["fact_id", "relation", "n_tokens", "subject_first",
                                       "subject_last", "relation_positions", "prefix_positions",
                                       "last"])
