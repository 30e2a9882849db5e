"""Calibration text for GPTQ, offline by default.

GPTQ needs activations of representative text. The paper used C4; no corpus is available offline,
so mechq's default (``calibration=None`` or ``"sampled"``) is **text sampled from the FP model
itself**: ``n_samples`` sequences of ``seq_len`` tokens, each started from BOS and one opener word
of a fixed list, drawn at temperature 1 with ``torch.manual_seed(seed)``. The same model, seed and
sizes give the same tokens on the same machine; because the draw can flip on floating-point
differences (another thread count, another CPU), the variant cache is keyed by this *recipe*
(:func:`sampled_spec`), and the tokens actually drawn are stored next to the checkpoint.

Other sources:

- a list of strings (each one calibration sample, truncated to ``seq_len`` tokens);
- a path to a text file (samples are its blank-line separated paragraphs);
- ``"dataset:NAME[:CONFIG]"`` — the ``text`` column of a Hugging Face dataset (needs the hub).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

# Opener words for sampled calibration text: varied, neutral sentence starts.
OPENERS = (
    "The", "In", "A", "It", "When", "Many", "This", "Scientists", "Today", "Our",
    "After", "People", "One", "There", "If", "History",
)
MIN_TOKENS = 10  # GPTQModel drops calibration rows shorter than this


@dataclass
class Calibration:
    """Token ids of the calibration samples, where they came from, and their hash."""

    tokens: list[list[int]]
    source: str

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def digest(self) -> str:
        blob = json.dumps(self.tokens, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_gptqmodel(self) -> list[dict]:
        return [{"input_ids": t, "attention_mask": [1] * len(t)} for t in self.tokens]


def sample_from_model(
    model: HookedTransformer, n_samples: int, seq_len: int, seed: int = 0
) -> list[list[int]]:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model`` (seeded)."""
    tok = model.tokenizer
    starts = []
    for i in range(n_samples):
        word = tok(OPENERS[i % len(OPENERS)], add_special_tokens=False)["input_ids"][0]
        prefix = [tok.bos_token_id] if model.cfg.default_prepend_bos and tok.bos_token_id is not None else []
        starts.append(prefix + [word])
    x = torch.tensor(starts, device=model.cfg.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            x,
            max_new_tokens=seq_len - x.shape[1],
            do_sample=True,
            temperature=1.0,
            stop_at_eos=False,
            verbose=False,
            use_past_kv_cache=True,
        )
    return out.cpu().tolist()


def is_sampled(calibration) -> bool:
    return calibration is None or (isinstance(calibration, str) and calibration == "sampled")


def sampled_spec(n_samples: int, seq_len: int, seed: int) -> str:
    """The recipe of the default calibration, as recorded in the variant cache key."""
    return f"sampled(n={n_samples},len={seq_len},seed={seed})"


def get_calibration(
    model: HookedTransformer,
    calibration: str | list[str] | None = None,
    *,
    n_samples: int = 16,
    seq_len: int = 64,
    seed: int = 0,
) -> Calibration:
    """Resolve a calibration argument into token ids (see the module docstring)."""
    if is_sampled(calibration):
        toks = sample_from_model(model, n_samples, seq_len, seed)
        return Calibration(toks, sampled_spec(n_samples, seq_len, seed))
    if isinstance(calibration, str) and calibration.startswith("dataset:"):
        texts = _dataset_texts(calibration.removeprefix("dataset:"), n_samples)
        source = calibration
    elif isinstance(calibration, (str, Path)):
        path = Path(calibration)
        if not path.exists():
            raise FileNotFoundError(
                f"Calibration file {path} not found. Pass None/'sampled' (offline default), "
                "a list of strings, a text file, or 'dataset:NAME'."
            )
        texts = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
        source = f"file:{path.name}"
    else:
        texts = list(calibration)
        source = f"texts(n={len(texts)})"
    toks = []
    for t in texts:
        ids = model.to_tokens(t, prepend_bos=model.cfg.default_prepend_bos, truncate=False)[0]
        if len(ids) >= MIN_TOKENS:
            toks.append(ids[:seq_len].tolist())
    if not toks:
        raise ValueError(f"No calibration sample from {source} has ≥{MIN_TOKENS} tokens.")
    return Calibration(toks, source)


def _dataset_texts(spec: str, n: int) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        return [row["text"] for _, row in zip(range(n), ds)]
    except Exception as exc:
        raise RuntimeError(
            f"Could not read calibration dataset {name!r} ({type(exc).__name__}: {exc}). "
            "Offline, use the default sampled calibration or pass texts / a file."
        ) from exc
