"""How long ``mechq.diagnose`` takes on a cached variant, with and without what it adds.

One process, SmolLM2-135M and its cached GPTQ w4 g128 (``make demo`` caches it; otherwise it
is quantized first, outside the timings), each timed from a warm model:

- ``full``: ``mechq.diagnose(model, variant)`` as a user calls it: FP's observation of the
  FP-correct facts and of the held-out text, the variant's pass, the bootstrap intervals and
  the KL divergence;
- ``bare``: the same call with ``n_boot=0, kld_tokens=0`` (no intervals, no KLD): the cost of
  the signatures alone, the peer that shows what intervals and KLD add;
- ``per_variant``: one more variant (GPTQ w2) diagnosed with FP's observation reused
  (``diagnose_many``), the marginal cost of each variant in a sweep.

Writes benchmarks/results/diagnose.json.

    .venv/bin/python benchmarks/bench_diagnose.py
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import mechq
from mechq.diagnosis import verdict as V
from mechq.engine.store import write_result
from timing import timed  # benchmarks/timing.py: a script's folder is on sys.path

OUT = Path(__file__).parent / "results" / "diagnose.json"


def main() -> None:
    model = mechq.load_model("smollm2-135m", device="cpu")
    w4, w2 = mechq.quantize_many(model, [mechq.Request("gptq", 4), mechq.Request("gptq", 2)])
    model(torch.tensor([[1, 2, 3]]))  # warm
    full, full_s = timed(lambda: mechq.diagnose(model, w4))
    bare, bare_s = timed(lambda: mechq.diagnose(model, w4, n_boot=0, kld_tokens=0))
    sample = V.fp_correct_sample(model)
    from mechq.diagnosis.evidence import observe_fp

    fp, fp_s = timed(lambda: observe_fp(model, sample))
    (d2,), per_s = timed(lambda: V.diagnose_many(model, [w2], fp=fp))
    data = dict(model="smollm2-135m", variant=w4.name, n_facts=full.n_facts,
                torch_threads=torch.get_num_threads(), full_s=full_s, bare_s=bare_s,
                fp_observation_s=fp_s, per_variant_s=per_s, per_variant=w2.name,
                verdict=full.verdict, verdict_bare=bare.verdict, verdict_w2=d2.verdict,
                load=list(os.getloadavg()))
    write_result(OUT, data, command="python benchmarks/bench_diagnose.py")
    print(data)


if __name__ == "__main__":
    main()
