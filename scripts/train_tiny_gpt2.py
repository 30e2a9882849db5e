"""Train mechq's tiny GPT-2-architecture test model on the bundled facts.

The model is a real (small) transformer with the standard GPT-2 block — LayerNorm, GELU MLP,
learned absolute positions, biases everywhere, tied embeddings — trained from scratch until it
recalls the bundled facts (``data/facts.csv`` with the templates of ``data/relations.json``).
Tests use it as a fast, fully offline stand-in for a real LLM: it goes through the same code paths
(HF ``GPT2LMHeadModel`` -> TransformerLens, GPTQ via GPTQModel, weight swaps). It is a memoriser
with wide margins, so it is very robust to weight quantization (at the time of writing GPTQ w4
and w2 g128, and symmetric RTN down to 3 bits, keep 100 % recall; RTN w2 keeps ~98 %): use it
for plumbing and equivalence tests, and the 135M model for "quantization breaks recall" claims.

Absolute learned positions: a left-padded batch must pass ``position_ids`` computed from the
attention mask (TransformerLens does this itself); without them recall drops sharply.

Tokenizer: word level. Every word and punctuation mark of the templates and facts is one token;
``<|endoftext|>`` is BOS, EOS and PAD, ``<unk>`` stands for any other word. A leading space is
dropped by the pre-tokenizer, so ``tok(" Paris", add_special_tokens=False).input_ids`` is the one
id of ``Paris``. The tokenizer does not add BOS itself; callers prepend it (as TransformerLens does).

Training sequences are ``[bos] + tokens(template.format(subject)) + tokens(" " + object)``, one per
fact, with cross-entropy on every next-token prediction (the object tokens get an extra weight,
``OBJECT_WEIGHT``). Full-batch AdamW; training stops at the first evaluation where every fact
is recalled (first-token argmax at the last prompt position == first object token) and
then runs ``EXTRA_STEPS`` more steps so the margins are not razor-thin.

Determinism: fixed seed, ``torch.use_deterministic_algorithms(True)``, a fixed thread count, no
dropout, a deterministic vocabulary order. Re-running the script on the same machine and torch
version reproduces ``model.safetensors`` byte for byte (``--check-reproducible`` verifies that by
training twice). Different CPUs / torch versions may differ in the last bits.

Usage:  python scripts/train_tiny_gpt2.py [--out mechq/assets/tiny-gpt2] [--check-reproducible]
Runs in about two minutes on one CPU core (about 150 full-batch steps).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cuBLAS determinism knob (harmless on CPU); must be set before torch initialises CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
DEFAULT_OUT = ROOT / "mechq" / "assets" / "tiny-gpt2"

SEED = 0
# One thread: the reduction order (so the bits) does not depend on the core count, and on a busy
# 2-core machine one thread is faster than two that spin-wait on each other.
THREADS = 1
BOS = "<|endoftext|>"
UNK = "<unk>"

# Architecture. n_embd and n_inner are multiples of 128 so GPTQ with group_size 128 has whole
# groups on every Linear (GPTQModel's CPU kernels need in_features % group_size == 0).
N_LAYER = 4
N_EMBD = 128
N_HEAD = 4
N_INNER = 512
N_POSITIONS = 32

LR = 3e-3
WEIGHT_DECAY = 0.01
OBJECT_WEIGHT = 4.0  # extra weight of the object tokens in the loss
EVAL_EVERY = 10
EXTRA_STEPS = 50  # after reaching 100 % recall
MAX_STEPS = 1000
MIN_RECALL = 0.95


def set_determinism(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def load_facts() -> tuple[list[dict], dict[str, dict]]:
    relations = {r["id"]: r for r in json.loads((DATA / "relations.json").read_text("utf-8"))}
    with open(DATA / "facts.csv", newline="", encoding="utf-8") as f:
        facts = list(csv.DictReader(f))
    for fact in facts:
        fact["prompt"] = relations[fact["relation"]]["template"].format(subject=fact["subject"])
    return facts, relations


def build_tokenizer(facts: list[dict], relations: dict[str, dict]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of the templates, subjects and objects."""
    # Whitespace() splits on \w+|[^\w\s]+ (Unicode-aware) and drops the whitespace.
    pre = pre_tokenizers.Whitespace()
    texts = [r["template"].replace("{subject}", " ") for r in relations.values()]
    texts += [f["subject"] for f in facts] + [f["object"] for f in facts]
    words: set[str] = set()
    for text in texts:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {BOS: 0, UNK: 1}
    for w in sorted(words):  # sorted: the vocabulary (and so the weights) is deterministic
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        model_max_length=N_POSITIONS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def encode_facts(tok, facts):
    """(prompt ids with BOS, object ids) per fact."""
    out = []
    for f in facts:
        p = [tok.bos_token_id] + tok(f["prompt"], add_special_tokens=False).input_ids
        o = tok(" " + f["object"], add_special_tokens=False).input_ids
        assert tok.unk_token_id not in p + o, f
        assert o, f
        out.append((p, o))
    return out


def make_batch(encoded, pad_id: int):
    """Right-padded training batch: inputs, labels (-100 on padding), per-token loss weights."""
    seqs = [p + o for p, o in encoded]
    L = max(map(len, seqs))
    assert L <= N_POSITIONS, f"a training sequence has {L} tokens > n_positions {N_POSITIONS}"
    n = len(seqs)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    weight = torch.zeros((n, L))
    for i, ((p, o), s) in enumerate(zip(encoded, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, : len(s) - 1] = torch.tensor(s[1:])  # label at t = token t+1
        weight[i, : len(s) - 1] = 1.0
        weight[i, len(p) - 1 : len(s) - 1] = OBJECT_WEIGHT  # predictions of the object tokens
    return ids, mask, labels, weight


@torch.no_grad()
def recall(model, tok, encoded) -> tuple[float, list[int]]:
    """First-token recall with BOS, left padding and explicit position ids (as callers batch)."""
    model.eval()
    prompts = [p for p, _ in encoded]
    L = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    target = torch.tensor([o[0] for _, o in encoded])
    hit = logits.argmax(-1) == target
    model.train()
    return hit.float().mean().item(), [i for i, h in enumerate(hit.tolist()) if not h]


def train(out: Path, quiet: bool = False) -> dict:
    t0 = time.perf_counter()
    set_determinism()
    facts, relations = load_facts()
    tok = build_tokenizer(facts, relations)
    encoded = encode_facts(tok, facts)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_inner=N_INNER,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(torch.float32)
    model.train()
    ids, mask, labels, weight = make_batch(encoded, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                            betas=(0.9, 0.98))
    n_tok = weight.sum()
    step, reached, rec, loss_val, obj_loss = 0, None, 0.0, float("nan"), float("nan")
    while step < MAX_STEPS:
        logits = model(input_ids=ids, attention_mask=mask).logits
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=-100, reduction="none",
        ).view_as(weight)
        loss = (ce * weight).sum() / n_tok
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_val = loss.item()
        obj_loss = (ce * (weight == OBJECT_WEIGHT)).sum().item() / (weight == OBJECT_WEIGHT).sum().item()
        if step % EVAL_EVERY == 0:
            rec, _ = recall(model, tok, encoded)
            if not quiet:
                print(f"step {step:5d}  loss {loss_val:.4f}  object loss {obj_loss:.4f}  "
                      f"recall {rec:.4f}", flush=True)
            if reached is None and rec == 1.0:
                reached = step
            if reached is not None and step >= reached + EXTRA_STEPS:
                break
    model.eval()
    rec, missed = recall(model, tok, encoded)
    if rec < MIN_RECALL:
        raise SystemExit(f"recall {rec:.3f} < {MIN_RECALL} after {step} steps")

    # Save atomically: write into a temp dir next to out, then swap.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    per_relation = {}
    for rid in relations:
        idx = [i for i, f in enumerate(facts) if f["relation"] == rid]
        per_relation[rid] = round(1 - sum(i in missed for i in idx) / len(idx), 4)
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "seed": SEED,
        "threads": THREADS,
        "steps": step,
        "steps_to_full_recall": reached,
        "loss": round(loss_val, 6),
        "object_loss": round(obj_loss, 6),
        "recall": round(rec, 6),
        "recall_per_relation": per_relation,
        "missed_fact_ids": [facts[i]["id"] for i in missed],
        "n_facts": len(facts),
        "n_params": n_params,
        "vocab_size": len(tok),
        "config": {"n_layer": N_LAYER, "n_embd": N_EMBD, "n_head": N_HEAD, "n_inner": N_INNER,
                   "n_positions": N_POSITIONS, "activation_function": "gelu_new",
                   "tie_word_embeddings": True},
        "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY,
                      "betas": [0.9, 0.98], "grad_clip": 1.0, "full_batch": True,
                      "object_weight": OBJECT_WEIGHT, "extra_steps": EXTRA_STEPS},
        "recall_method": "argmax of the logits at the last prompt position, BOS prepended, "
                         "batched with left padding + attention mask + position ids, "
                         "== first token of ' ' + object",
        "data_sha256": {
            name: hashlib.sha256((DATA / name).read_bytes()).hexdigest()
            for name in ("relations.json", "facts.csv")
        },
        "weights_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "python": platform.python_version(),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes 0700; the shipped files should be world-readable
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if not quiet:
        print(json.dumps({k: report[k] for k in
                          ("steps", "loss", "object_loss", "recall", "n_params",
                           "vocab_size", "train_seconds", "weights_sha256")}, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--check-reproducible", action="store_true",
                    help="train a second time into a temp dir and compare the weights' bytes")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    report = train(args.out, quiet=args.quiet)
    if args.check_reproducible:
        with tempfile.TemporaryDirectory() as d:
            again = train(Path(d) / "tiny-gpt2", quiet=True)
        same = again["weights_sha256"] == report["weights_sha256"]
        print(f"reproducible: {same} ({again['weights_sha256'][:16]})")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
