"""How much GPTQ moves with the CPU's kernels, and whether a setting removes it.

GPTQModel quantizes in a one-thread child process (mechq.quant.gptq), so the calibration tokens
and the thread count are fixed; what still differs between machines is which SIMD code path
runs: ATen's vectorized kernels (picked by the CPU's ISA, forced with ``ATEN_CPU_CAPABILITY`` =
default / avx2 / avx512), MKL's BLAS (``MKL_CBWR`` = AVX2, AVX512, COMPATIBLE, ...: MKL's
Conditional Numerical Reproducibility modes; COMPATIBLE is the code path every x86 CPU runs)
and oneDNN (``ONEDNN_MAX_CPU_ISA``). On one machine these variables emulate other CPUs.

For each setting this script quantizes SmolLM2 with GPTQ w8/w4/w3/w2 g128 (default calibration,
seed 0) into a cache of its own, then scores every variant in this process (same evaluation
kernels for all, so only the quantization differs): first-token recall on the 404 bundled
facts, and the share of integer codes that differ from the native setting's (and from the
"compatible" setting's, to see whether MKL's COMPATIBLE path makes ATen's choice irrelevant). Writes
benchmarks/results/spread.json (about 40 minutes on 2 cores).

    .venv/bin/python scripts/measure_spread.py [--bits 8 4 3 2] [--settings native avx2 ...]

``--reuse DIR`` scores the GPTQ checkpoints an earlier run of this script left in its work folder
(``DIR/<setting>/variants/*``) instead of quantizing again: the codes are the same GPTQ outputs,
made under the same settings, and the results file records the folder and each checkpoint's own
GPTQ seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import mechq
from mechq.analysis.recall import accuracy
from mechq.engine.store import write_result

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "spread.json"

#: name -> environment of the GPTQ child. "native" is this machine as it is.
SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "sse": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "compatible": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                   "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "compatible-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
                        "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "compatible-avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "COMPATIBLE",
                          "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}
KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def quantize_under(model, setting: str, bits: list[int], cache: Path) -> tuple[list, float]:
    """GPTQ variants made with ``setting``'s environment in a cache of their own."""
    saved = {k: os.environ.get(k) for k in (*KNOBS, "MECHQ_CACHE")}
    os.environ.update(SETTINGS[setting], MECHQ_CACHE=str(cache))
    try:
        t0 = time.perf_counter()
        variants = mechq.quantize_many(model, [mechq.Request("gptq", b) for b in bits],
                                       progress=False)
        return variants, time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reuse_from(folder: Path, model, bits: list[int]) -> list:
    """The GPTQ checkpoints an earlier run quantized under one setting, read back as variants."""
    found = {}
    for meta in sorted(folder.glob("variants/*/mechq_variant.json")):
        info = json.loads(meta.read_text())
        if info.get("method") == "gptq" and info.get("bits") in bits:
            v = mechq.load_variant(meta.parent, model, name=info["name"])
            v.meta.setdefault("seconds", info.get("seconds", float("nan")))
            found[info["bits"]] = v
    missing = sorted(set(bits) - set(found))
    if missing:
        raise SystemExit(f"{folder} holds no GPTQ checkpoint for bits {missing}")
    return [found[b] for b in bits]


def code_difference(a, b) -> float:
    """Share of integer codes that differ between two variants of the same settings."""
    diff = total = 0
    for name, m in a.modules.items():
        ca, cb = m.codes(), b.modules[name].codes()
        diff += int((ca != cb).sum())
        total += ca.numel()
    return diff / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--reuse", type=Path, default=None,
                    help="score the checkpoints an earlier run left in this work folder")
    args = ap.parse_args()
    if "native" not in args.settings:
        args.settings.insert(0, "native")
    if any(s.startswith("compatible-") for s in args.settings) and "compatible" in args.settings:
        args.settings.remove("compatible")  # the deterministic group's reference goes first
        args.settings.insert(1, "compatible")
    model = mechq.load_model("smollm2-135m", device="cpu")
    facts = mechq.bundled_facts()
    work = Path(tempfile.mkdtemp(prefix="mechq-spread-"))
    made: dict[str, dict[int, object]] = {}
    rows = []
    fp = None
    for setting in args.settings:
        print(f"{setting}: quantizing w{'/'.join(map(str, args.bits))} with "
              f"{SETTINGS[setting] or 'no override'}", flush=True)
        if args.reuse:
            variants, seconds = reuse_from(args.reuse / setting, model, args.bits), float("nan")
        else:
            variants, seconds = quantize_under(model, setting, args.bits, work / setting)
        made[setting] = {v.bits: v for v in variants}
        renamed = [(f"{setting}:{v.name}", v) for v in variants]
        recall = mechq.evaluate_recall(model, facts, renamed, include_fp=fp is None,
                                       progress=False)
        acc = accuracy(recall).set_index("variant")
        if fp is None:
            fp = acc.loc["fp"]
        for v in variants:
            a = acc.loc[f"{setting}:{v.name}"]
            rows.append(dict(
                setting=setting, **{k: SETTINGS[setting].get(k, "") for k in KNOBS},
                variant=v.name, bits=v.bits, accuracy=float(a["accuracy"]),
                n_correct=int(a["n_correct"]), n=int(a["n"]),
                median_rank=float(a["median_rank"]),
                code_diff_vs_native=code_difference(v, made["native"][v.bits]),
                code_diff_vs_compatible=(code_difference(v, made["compatible"][v.bits])
                                         if "compatible" in made else None),
                gptq_seconds=float(v.meta.get("seconds", float("nan")))))
            print(f"  {v.name}: {a['accuracy']:.1%}, codes differing from native "
                  f"{rows[-1]['code_diff_vs_native']:.2%}, GPTQ {rows[-1]['gptq_seconds']:.0f} s",
                  flush=True)
        print(f"  ({seconds:.0f} s for the setting)", flush=True)
    write_result(args.out, dict(
        model="smollm2-135m", facts=len(facts), method="gptq", group_size=128,
        calibration="bundled default (32 x 128 tokens, seed 0)",
        fp=dict(accuracy=float(fp["accuracy"]), n_correct=int(fp["n_correct"]), n=int(fp["n"])),
        evaluation_threads=torch.get_num_threads(), rows=rows,
        reused=str(args.reuse) if args.reuse else None),
        command="python scripts/measure_spread.py " + " ".join(
            f"--{k} {' '.join(map(str, v))}" for k, v in
            dict(bits=args.bits, settings=args.settings).items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
