"""The held-out KL divergence of one variant: mechq's batched pass against the plain way.

Both compute the statistics of mechq.analysis.kld (llama.cpp's ``--kl-divergence``) for RTN w4 of
SmolLM2 on the held-out text (default 8192 tokens), in the same process, each timed from a warm
model:

- mechq (``mechq.kld_stats`` with FP's reference computed once): FP's final residual stream is
  kept, each variant is one batched pass, and the logits are decoded chunk by chunk;
- the plain way: for each sequence, FP's and the variant's full logits from two forward passes
  (the variant swapped in and out around each), then log-softmax and the KL sum.

It reports both times (FP's reference separately, since many variants share it) and the
largest difference between the two results' statistics. Writes benchmarks/results/kld.json.

    .venv/bin/python benchmarks/bench_kld.py [--tokens 8192]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mechq
from mechq.analysis import kld as K
from mechq.engine.store import write_result

OUT = Path(__file__).parent / "results" / "kld.json"


def plain(model, variant, sequences) -> dict[str, float]:
    """The statistics from full logits, one sequence at a time."""
    kld, same, dp = [], [], []
    for seq in sequences:
        toks = torch.tensor([seq])
        with torch.no_grad():
            lp = model(toks)[0, :-1].log_softmax(-1)
            with mechq.swap(model, variant):
                lq = model(toks)[0, :-1].log_softmax(-1)
        top = lp.argmax(-1, keepdim=True)
        kld.append((lp.exp() * (lp - lq)).sum(-1))
        same.append((lq.argmax(-1, keepdim=True) == top)[:, 0])
        dp.append((lq.gather(-1, top).exp() - lp.gather(-1, top).exp())[:, 0])
    return K.summarize(dict(kld=torch.cat(kld), same_top1=torch.cat(same), dp=torch.cat(dp)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    model = mechq.load_model("smollm2-135m", device="cpu")
    variant = mechq.quantize(model, "rtn", bits=4)
    t0 = time.perf_counter()
    ref = K.fp_reference(model, max_tokens=args.tokens)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = K.kld_stats(model, [variant], reference=ref, progress=False).iloc[0]
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = plain(model, variant, ref.sequences)
    plain_s = time.perf_counter() - t0
    diff = max(abs(float(ours[k]) - float(theirs[k])) for k in K.STATS if k != "n_tokens")
    data = dict(model="smollm2-135m", variant=variant.name, tokens=int(ours["n_tokens"]),
                torch_threads=torch.get_num_threads(), fp_reference_s=round(ref_s, 1),
                mechq_per_variant_s=round(ours_s, 1), plain_per_variant_s=round(plain_s, 1),
                max_stat_difference=diff, kld_mean=float(ours["kld_mean"]),
                same_top1=float(ours["same_top1"]),
                load=list(__import__("os").getloadavg()))
    write_result(OUT, data, command=f"python benchmarks/bench_kld.py --tokens {args.tokens}")
    print(data)


if __name__ == "__main__":
    main()
