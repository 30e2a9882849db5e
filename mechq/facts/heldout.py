"""Held-out text: natural prose no quantizer calibrates on, for comparing output distributions.

``mechq/assets/heldout/passages.jsonl`` holds short passages of ordinary English (stories,
letters, dialogue, explanations, instructions, reports) written for mechq by its authors and
shipped under its licence. They are disjoint from the calibration text by construction: that
one is text SmolLM2 generated (:mod:`mechq.facts.calibration`), and nothing reads one for the
other. :mod:`mechq.analysis.kld` measures each variant's next-token distribution against FP's on
it, the way llama.cpp's ``--kl-divergence`` does on a user's text.

Each passage is one sequence: the model's BOS (where it prepends one) and the passage's tokens.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from transformer_lens import HookedTransformer

HELDOUT_FILE = Path(__file__).resolve().parents[1] / "assets" / "heldout" / "passages.jsonl"


@lru_cache(maxsize=1)
def heldout_passages() -> tuple[tuple[str, str], ...]:
    """``(id, text)`` of every shipped passage, in file order."""
    rows = [json.loads(line) for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return tuple((r["id"], r["text"]) for r in rows)


def heldout_tokens(model: HookedTransformer, max_tokens: int | None = None,
                   texts: list[str] | None = None) -> list[list[int]]:
    """Token ids of each passage (or of ``texts``), BOS first where the model prepends one; a
    passage longer than the model's context is cut into consecutive windows that fit, each
    with its own BOS.

    ``max_tokens`` keeps whole sequences, in order, until their total would exceed it (the last
    one is cut to fit), so a smaller budget is a prefix of a larger one.
    """
    texts = [t for _, t in heldout_passages()] if texts is None else list(texts)
    if not texts:
        raise ValueError("held-out text: no passages given.")
    bos = model.to_tokens("", prepend_bos=True)[0].tolist() if model.cfg.default_prepend_bos \
        else []
    width = model.cfg.n_ctx - len(bos)
    windows = []
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [bos + ids[i:i + width] for i in range(0, len(ids), width)]
    seqs: list[list[int]] = []
    total = 0
    for ids in windows:
        if max_tokens is not None and total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        if len(ids) >= 2:  # at least one next-token prediction
            seqs.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return seqs


def heldout_split(model: HookedTransformer, dev_tokens: int
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """Two disjoint parts of the held-out text: ``dev``, the first ``dev_tokens`` tokens
    (exactly :func:`heldout_tokens` ``(model, dev_tokens)``, what a diagnosis reads), and
    ``test``, every sequence that starts after them (the sequence ``dev`` cuts short is in
    neither). Something chosen on ``dev`` is measured on ``test``."""
    dev = heldout_tokens(model, dev_tokens)
    test, used = [], 0
    for s in heldout_tokens(model):
        if used >= dev_tokens:
            test.append(s)
        used += len(s)
    if not test:
        raise ValueError(f"the held-out text has no sequence after its first {dev_tokens} "
                         "tokens.")
    return dev, test
