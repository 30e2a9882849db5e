"""Swapping a quantized variant into a model on a GPU: dequantize on the GPU vs on the CPU.

A :class:`mechq.Variant` keeps its packed GPTQ tensors on the CPU (that is where checkpoints are
read). ``mechq.swap`` used to dequantize every module there and copy the float weight to the
model's device; it now moves only the packed tensors and dequantizes on the device
(``Variant.weight(module, device=...)``). Both are measured side by side in one run, per variant:

- ``cpu_then_copy``: ``v.weight(m, dtype).to(device)`` for every module (the old path);
- ``on_device``: ``v.weight(m, dtype, device=device)`` for every module (the new path);
- ``swap``: entering and leaving ``mechq.swap(model, v)`` (all layers, all components);

and every module's two results are compared with ``torch.equal`` (float16 arithmetic is the same
on both devices, so they must be bit-identical).

Run (on a CUDA machine): python benchmarks/bench_swap_cuda.py [--bits 2 4] [--repeats 5]
Writes benchmarks/results/swap_cuda.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def _timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT / "swap_cuda.json"))
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import mechq

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device available")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model = mechq.load_model(args.model, device=args.device)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = []
    for bits in args.bits:
        v = mechq.quantize(model, args.method, bits=bits)
        where = {str(p.qweight.device) for p in v.modules.values()}

        def old():
            return [v.weight(m, dtype).to(dev) for m in v.modules]

        def new():
            return [v.weight(m, dtype, device=dev) for m in v.modules]

        def swap_in_out():
            with mechq.swap(model, v):
                sync()

        identical = all(torch.equal(a, b) for a, b in zip(old(), new()))  # also a warm-up
        swap_in_out()
        times = {name: [] for name in ("cpu_then_copy", "on_device", "swap")}
        for _ in range(args.repeats):
            times["cpu_then_copy"].append(_timed(old, sync))
            times["on_device"].append(_timed(new, sync))
            times["swap"].append(_timed(swap_in_out, sync))
        med = {k: round(statistics.median(t), 4) for k, t in times.items()}
        rows.append(dict(variant=v.name, modules=len(v.modules), packed_on=sorted(where),
                         packed_mib=round(v.nbytes / 2**20, 1), bit_identical=identical,
                         median_s=med, runs_s={k: [round(x, 4) for x in t]
                                               for k, t in times.items()},
                         speedup=round(med["cpu_then_copy"] / med["on_device"], 1)))
        print(rows[-1], flush=True)
    res = dict(model=args.model, device=str(dev),
               gpu=torch.cuda.get_device_name() if dev.type == "cuda" else None,
               dtype=str(dtype), repeats=args.repeats, variants=rows,
               machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                            torch=torch.__version__, torch_threads=torch.get_num_threads()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
