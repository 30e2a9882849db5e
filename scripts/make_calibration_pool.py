"""Write mechq's default calibration text: documents sampled once from SmolLM2, shipped as data.

Why shipped. GPTQ needs calibration text, and no corpus is reachable offline. Sampling it from
the FP model at run time (mechq's first default) gave *different tokens on different machines*:
a float32 difference in the last bits flips one sampled token and the rest of the sequence
diverges from there, and GPTQ at 3–4 bits moved by several points with it. Text written to a
file once is the same everywhere, so mechq samples it here, once, and ships the result in
``mechq/assets/calibration/``. ``mechq.facts.calibration`` tokenizes it with whichever model it
calibrates, so it serves every tokenizer (one model's token ids would not).

What it is. ``--docs`` documents of ``--tokens`` tokens each, sampled from the embedded
SmolLM2-135M-Instruct (the dequantized Q4_1 GGUF, float32, Apache-2.0) at temperature 1 within
the nucleus (top-p 0.9: at plain temperature 1 a 135M model drifts into noise), with Gumbel-max
on float64 logits and a private ``torch.Generator`` (no global RNG), each started
from BOS and one opener of :data:`OPENERS` (written for mechq: prose, dialogue, lists, code and
numbers, so the calibration is not one register). Special tokens are never sampled, so the text
decodes to plain characters and re-tokenizes cleanly under any tokenizer. Each document is
decoded and written as one JSON string per line, after a header line that records how the file
was made.

Re-running the script on the same machine reproduces the file; another machine may draw other
tokens (the reason the file is shipped). Runs in a few minutes on 2 CPU cores.

Usage:  python scripts/make_calibration_pool.py [--out mechq/assets/calibration/smollm2-samples.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Sentence starts for the sampled documents, written for mechq. Varied on purpose: narrative,
# exposition, instructions, dialogue, lists, letters, numbers and code.
OPENERS = (
    "The", "In", "A", "It", "When", "Many", "This", "Scientists", "Today", "Our",
    "After", "People", "One", "There", "If", "History",
    "Once upon a time", "Dear", "Chapter 1", "Q:", "How to", "Step 1:", "Why do",
    "The best way to", "In 1905,", "According to", "Ingredients:", "Abstract:", "Hello",
    "def", "import", "Title:", "Yesterday", "My", "We", "Although", "During the",
    "Researchers at", "The city of", "Water", "Children", "Music", "The history of",
    "Climate change", "To understand", "Here are", "First,", "The following", "Most",
    "Every year,", "She", "He", "They", "Two", "Welcome to", "Summary:", "The new",
    "Students", "Computers", "The word", "Example:", "1.", "Note:", "As a",
)


@torch.no_grad()
def sample_documents(hf, tok, n_docs: int, n_tokens: int, seed: int, top_p: float,
                     batch: int = 64) -> list[list[int]]:
    """``n_docs`` token sequences of ``n_tokens`` new tokens each (after BOS + opener), drawn
    from the nucleus: the smallest set of most likely tokens whose probability reaches
    ``top_p``, renormalised (the most likely token is always in it)."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder)))
    vocab = hf.config.vocab_size
    docs: list[list[int]] = []
    for start in range(0, n_docs, batch):
        rows = []
        for i in range(start, min(start + batch, n_docs)):
            opener = tok(OPENERS[i % len(OPENERS)], add_special_tokens=False)["input_ids"]
            rows.append([tok.bos_token_id] + opener)
        width = max(len(r) for r in rows)
        # left-pad the prompts so every row's next token is at the last position
        ids = torch.full((len(rows), width), tok.pad_token_id or 0)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        out = [list(r) for r in rows]
        past = None
        step_ids, step_mask = ids, mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(n_tokens):
            res = hf(input_ids=step_ids, attention_mask=step_mask, position_ids=pos,
                     past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1, :vocab].double()
            logits[:, special] = -torch.inf
            logp = logits.log_softmax(-1)
            sorted_p, order = logp.exp().sort(-1, descending=True)
            outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            logp = logp.scatter(-1, order, torch.where(outside, -torch.inf, logp.gather(-1, order)))
            gumbel = -torch.log(-torch.log(
                torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
            nxt = (logp + gumbel).argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                out[r].append(t)
            step_ids = nxt[:, None]
            step_mask = torch.cat([step_mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
        docs.extend(out)
        print(f"  {len(docs)}/{n_docs} documents", file=sys.stderr, flush=True)
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="mechq/assets/calibration/smollm2-samples.jsonl")
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.9,
                    help="nucleus sampling: at temperature 1 a 135M model drifts into noise")
    args = ap.parse_args(argv)

    from mechq.models import load_hf

    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf, tok, src = load_hf("smollm2-135m")
    t0 = time.perf_counter()
    docs = sample_documents(hf, tok, args.docs, args.tokens, args.seed, args.top_p)
    texts = [tok.decode(d[1:], skip_special_tokens=True) for d in docs]
    header = dict(
        what="mechq calibration text: documents sampled from a language model",
        model="SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to float32; Apache-2.0)",
        sampling=f"temperature 1, nucleus top-p {args.top_p}, Gumbel-max on float64 logits, "
                 f"torch.Generator seed {args.seed}, special tokens excluded",
        documents=len(texts), tokens_per_document=args.tokens,
        torch=torch.__version__, script="scripts/make_calibration_pool.py",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps({"header": header}, ensure_ascii=False) + "\n")
        for t in texts:
            fh.write(json.dumps(t, ensure_ascii=False) + "\n")
    print(f"wrote {out}: {len(texts)} documents, {sum(map(len, texts))} characters "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
