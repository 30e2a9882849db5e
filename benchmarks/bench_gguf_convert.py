"""Gemma 3 270M: converting its GGUF into a Hugging Face directory, and loading it afterwards.

mechq's conversion (``mechq.models.load._convert_gguf``) loads the tokenizer, the config and the
weights through transformers, which parses the GGUF header for each; Gemma's header holds a
262k-token vocabulary. ``_one_gguf_parse`` lets the three share one ``gguf.GGUFReader``.

Peer, in the same run: the same conversion with the three parses transformers does by itself.
Both outputs are compared file by file (they must be byte-identical). Runs alternate, twice each.
Then the load from the converted directory (what every load after the first one does):
``mechq.load_model("gemma-3-270m")`` against transformers' ``AutoModelForCausalLM`` on the same
directory, alternating, twice each (a cache in a temporary folder, so yours is not touched).
Writes benchmarks/results/gguf_convert.json and prints the times.
Run: .venv/bin/python benchmarks/bench_gguf_convert.py   (needs make install-gemma)
"""

from __future__ import annotations

import filecmp
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mechq.models import load as M

OUT = Path(__file__).parent / "results"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 1)


def load_times(cache: Path) -> dict[str, list[float]]:
    """Cached loads, mechq's and transformers', from the directory ``cache`` holds."""
    from transformers import AutoModelForCausalLM

    os.environ["MECHQ_CACHE"] = str(cache)
    hf_dir = M.resolve_hf_dir("gemma-3-270m").hf_dir
    times: dict[str, list[float]] = {"mechq.load_model (HookedTransformer)": [],
                                     "transformers AutoModelForCausalLM": []}
    for _ in range(2):
        times["mechq.load_model (HookedTransformer)"].append(
            seconds(lambda: M.load_model("gemma-3-270m", device="cpu")))
        times["transformers AutoModelForCausalLM"].append(
            seconds(lambda: AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)))
    return times


def main() -> None:
    times: dict[str, list[float]] = {"shared reader (mechq)": [], "three parses (transformers)": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = M.embedded_gguf(M.GEMMA, tmp)
        outs = {}
        for rep in range(2):
            for shared, name in ((True, "shared reader (mechq)"),
                                 (False, "three parses (transformers)")):
                out = tmp / f"{'shared' if shared else 'plain'}-{rep}"
                times[name].append(seconds(lambda: M._convert_gguf(
                    gguf, out, "Gemma3ForCausalLM", "benchmark", share_reader=shared)))
                outs[shared] = out
        files = sorted(p.name for p in outs[True].iterdir())
        same = all(filecmp.cmp(outs[True] / f, outs[False] / f, shallow=False) for f in files)
        cache = tmp / "cache"
        (cache / "models").mkdir(parents=True)
        outs[True].rename(cache / "models" / "gemma-3-270m")
        loads = load_times(cache)
    record = {
        "what": "Gemma 3 270M GGUF -> HF directory (float32 safetensors), seconds per run",
        "seconds": times,
        "identical_files": files if same else [],
        "outputs_identical": same,
        "cached_load_seconds": loads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads; torch {torch.__version__}",
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "gguf_convert.json").write_text(json.dumps(record, indent=1) + "\n")
    for name, t in {**times, **loads}.items():
        print(f"{name:40s} {t}")
    print("outputs identical:", same)
    if not same:
        raise SystemExit("the two conversions differ")


if __name__ == "__main__":
    main()
