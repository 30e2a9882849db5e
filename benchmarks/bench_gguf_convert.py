"""Converting Gemma 3 270M's GGUF into a Hugging Face directory: one shared header parse vs three.

mechq's conversion (``mechq.models._convert_gguf``) loads the tokenizer, the config and the
weights through transformers, which parses the GGUF header for each; Gemma's header holds a
262k-token vocabulary. ``_one_gguf_parse`` lets the three share one ``gguf.GGUFReader``.

Peer, in the same run: the same conversion with the three parses transformers does by itself.
Both outputs are compared file by file (they must be byte-identical). Runs alternate, twice each.
Writes benchmarks/results/gguf_convert.json and prints the times.
Run: .venv/bin/python benchmarks/bench_gguf_convert.py   (needs make install-gemma)
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mechq import models as M

OUT = Path(__file__).parent / "results"


def convert(gguf: Path, out: Path, shared: bool) -> float:
    real = M._one_gguf_parse
    if not shared:
        M._one_gguf_parse = contextlib.nullcontext
    try:
        start = time.perf_counter()
        M._convert_gguf(gguf, out, "Gemma3ForCausalLM", "benchmark")
        return time.perf_counter() - start
    finally:
        M._one_gguf_parse = real


def main() -> None:
    times: dict[str, list[float]] = {"shared reader (mechq)": [], "three parses (transformers)": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = M.gemma_gguf(tmp)
        outs = {}
        for rep in range(2):
            for shared, name in ((True, "shared reader (mechq)"),
                                 (False, "three parses (transformers)")):
                out = tmp / f"{'shared' if shared else 'plain'}-{rep}"
                times[name].append(round(convert(gguf, out, shared), 1))
                outs[shared] = out
        files = sorted(p.name for p in outs[True].iterdir() if p.name != "mechq_source.json")
        same = all(filecmp.cmp(outs[True] / f, outs[False] / f, shallow=False) for f in files)
    record = {
        "what": "Gemma 3 270M GGUF -> HF directory (float32 safetensors), seconds per run",
        "seconds": times,
        "identical_files": files if same else [],
        "outputs_identical": same,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads; torch {torch.__version__}",
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "gguf_convert.json").write_text(json.dumps(record, indent=1) + "\n")
    for name, t in times.items():
        print(f"{name:30s} {t}")
    print("outputs identical:", same)
    if not same:
        raise SystemExit("the two conversions differ")


if __name__ == "__main__":
    main()
