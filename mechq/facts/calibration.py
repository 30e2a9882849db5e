"""Calibration text for GPTQ: the same tokens on every machine.

GPTQ fits each layer to the activations of some calibration text. The paper used C4; offline
there is no corpus, so mechq ships its own (``calibration=None`` or ``"bundled"``, the default):
128 documents of 512 tokens sampled once from SmolLM2-135M-Instruct by
``scripts/make_calibration_pool.py`` and stored as text in
``mechq/assets/calibration/smollm2-samples.jsonl``. Being a file, it gives identical token ids
under any thread count, process or machine; being text, it serves any tokenizer.

**Definition of a bundled calibration** ``(n_samples, seq_len, seed)``: each document is tokenized
with the model's tokenizer (no special tokens) and cut into consecutive windows of
``seq_len - 1`` tokens (``seq_len`` when the model prepends no BOS); a window that does not fill
is dropped. Window ``(d, k)`` (document ``d``, ``k``-th window) gets the sort key
``sha256("{seed}:{d}:{k}")``; the ``n_samples`` windows with the smallest keys, in key order, are
the calibration, each with BOS prepended when the model prepends one. The order is a pure function
of the seed, the text and the tokenizer: no RNG, no floating point.

Other sources:

- ``"sampled"``: ``n_samples`` sequences sampled from the model itself at temperature 1
  (Gumbel-max on float64 logits with a private ``torch.Generator``). Self-generated text, but a
  float difference in the last bits can flip one draw and the rest of the sequence follows it,
  so the tokens may differ between machines; the variant cache is keyed by their digest;
- a list of strings (each one calibration sample, truncated to ``seq_len`` tokens);
- a path to a text file (samples are its blank-line separated paragraphs);
- ``"dataset:NAME[:CONFIG]"`` — the ``text`` column of a Hugging Face dataset (needs the hub).

:attr:`Calibration.digest` (sha256 of the token ids, 16 hex digits) names a calibration exactly;
the variant cache key holds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

POOL_FILE = Path(__file__).resolve().parents[1] / "assets" / "calibration" / "smollm2-samples.jsonl"
BUNDLED = "bundled"
SAMPLED = "sampled"
# Default size: 32 windows of 128 tokens (4 096 tokens), chosen by measurement: the README's
# "How much calibration" table (GPTQ w4 on the bundled facts, seeds 0-2 at 1k-16k tokens).
N_SAMPLES = 32
SEQ_LEN = 128
#: AWQ's default calibration size: 16 windows of 64 tokens of the same bundled pool GPTQ uses
#: (GPTQ: 32 × 128). The reason is time, not quality: GPTQModel's AWQ runs in bfloat16 on CPU,
#: emulated without bf16 instructions. On SmolLM2 (2 vCPUs) 16 × 64 tokens took 1725 s for the
#: 30 layers in scripts/measure_awq.py; 32 × 128 ran at 3.6 min per layer (about 1.8 h).
#: Whether more tokens would help AWQ here is not measured; pass n_samples / seq_len to choose.
AWQ_N_SAMPLES, AWQ_SEQ_LEN = 16, 64
MIN_TOKENS = 10  # GPTQModel drops calibration rows shorter than this


@dataclass(frozen=True)
class Calibration:
    """Token ids of the calibration samples and where they came from."""

    tokens: list[list[int]]
    source: str

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def digest(self) -> str:
        """sha256 of the token ids (16 hex digits): equal digests, identical calibration."""
        blob = json.dumps(self.tokens, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_gptqmodel(self) -> list[dict]:
        return [{"input_ids": t, "attention_mask": [1] * len(t)} for t in self.tokens]


# --------------------------------------------------------------------------------------------
# The bundled text
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def pool_texts() -> tuple[str, ...]:
    """The shipped calibration documents (the header line describes how they were made)."""
    if not POOL_FILE.exists():
        raise FileNotFoundError(
            f"{POOL_FILE} is missing from this mechq install; regenerate it with "
            "`python scripts/make_calibration_pool.py` or pass calibration texts.")
    lines = POOL_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines[1:] if line.strip())


def _bos(model: HookedTransformer) -> list[int]:
    tok = model.tokenizer
    return [tok.bos_token_id] if model.cfg.default_prepend_bos and tok.bos_token_id is not None \
        else []


def _window_key(seed: int, doc: int, k: int) -> bytes:
    return hashlib.sha256(f"{seed}:{doc}:{k}".encode()).digest()


def pool_calibration(tokenizer, bos: list[int], n_samples: int = N_SAMPLES,
                     seq_len: int = SEQ_LEN, seed: int = 0) -> Calibration:
    """The bundled calibration for a tokenizer (``bos``: ``[bos_id]`` or ``[]``)."""
    if seq_len < MIN_TOKENS:
        raise ValueError(f"seq_len must be at least {MIN_TOKENS} (GPTQModel drops shorter rows).")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    width = seq_len - len(bos)
    windows = []
    for d, text in enumerate(pool_texts()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for k in range(len(ids) // width):
            windows.append((_window_key(seed, d, k), ids[k * width:(k + 1) * width]))
    if n_samples > len(windows):
        raise ValueError(
            f"The bundled calibration text has {len(windows)} windows of {seq_len} tokens under "
            f"this tokenizer; asked for {n_samples}. Use fewer or shorter samples, or pass your "
            "own texts.")
    windows.sort(key=lambda w: w[0])
    toks = [list(bos) + w for _, w in windows[:n_samples]]
    return Calibration(toks, f"{BUNDLED}(n={n_samples},len={seq_len},seed={seed})")


def from_pool(model: HookedTransformer, n_samples: int = N_SAMPLES, seq_len: int = SEQ_LEN,
              seed: int = 0) -> Calibration:
    """The bundled calibration ``(n_samples, seq_len, seed)`` (definition in the module doc)."""
    return pool_calibration(model.tokenizer, _bos(model), n_samples, seq_len, seed)


# --------------------------------------------------------------------------------------------
# Sampling from the model (opt-in)
# --------------------------------------------------------------------------------------------

# Opener words for text sampled from the model: varied, neutral sentence starts.
OPENERS = (
    "The", "In", "A", "It", "When", "Many", "This", "Scientists", "Today", "Our",
    "After", "People", "One", "There", "If", "History",
)


@torch.no_grad()
def sample_from_model(model: HookedTransformer, n_samples: int, seq_len: int, seed: int = 0
                      ) -> list[list[int]]:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model`` at temperature 1.

    Each starts from BOS (if the model prepends one) and an opener word; the next token is
    ``argmax(log_softmax(z) + g)`` with float64 logits ``z`` and Gumbel noise ``g`` drawn from a
    private ``torch.Generator(seed)`` (the global RNG is left alone).
    """
    tok = model.tokenizer
    dev = model.cfg.device
    starts = [_bos(model) + tok(OPENERS[i % len(OPENERS)], add_special_tokens=False)["input_ids"][:1]
              for i in range(n_samples)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor(starts, device=dev)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, dev, n_samples)
    out = x.clone()
    logits = model(x, past_kv_cache=cache)[:, -1]
    for _ in range(seq_len - x.shape[1]):
        u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        nxt = (logits.double().cpu().log_softmax(-1) - torch.log(-torch.log(u))).argmax(-1)
        out = torch.cat([out, nxt[:, None].to(dev)], 1)
        logits = model(nxt[:, None].to(dev), past_kv_cache=cache)[:, -1]
    return out.cpu().tolist()


# --------------------------------------------------------------------------------------------
# Resolving a calibration argument
# --------------------------------------------------------------------------------------------


def get_calibration(
    model: HookedTransformer,
    calibration: str | Path | list[str] | None = None,
    *,
    n_samples: int = N_SAMPLES,
    seq_len: int = SEQ_LEN,
    seed: int = 0,
) -> Calibration:
    """Resolve a calibration argument into token ids (see the module docstring)."""
    if calibration is None or calibration == BUNDLED:
        return from_pool(model, n_samples, seq_len, seed)
    if calibration == SAMPLED:
        toks = sample_from_model(model, n_samples, seq_len, seed)
        return Calibration(toks, f"{SAMPLED}(n={n_samples},len={seq_len},seed={seed})")
    if isinstance(calibration, str) and calibration.startswith("dataset:"):
        texts = _dataset_texts(calibration.removeprefix("dataset:"), n_samples)
        source = calibration
    elif isinstance(calibration, (str, Path)):
        path = Path(calibration)
        if not path.exists():
            raise FileNotFoundError(
                f"Calibration file {path} not found. Pass None/'bundled' (the offline default), "
                "'sampled', a list of strings, a text file, or 'dataset:NAME'.")
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
            "Offline, use the bundled calibration (the default) or pass texts / a file."
        ) from exc
