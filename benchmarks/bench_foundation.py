"""Foundation benchmarks on the embedded SmolLM2-135M: load, quantize, dequantize, swap, memory.

Each mechq operation is measured side by side with its peer in the same run:

- load:        mechq.load_model (cached conversion)      vs transformers AutoModelForCausalLM
- quantize:    mechq RTN w4 g128                          vs GPTQModel GPTQ w4 g128 (same model)
- dequantize:  mechq PackedLinear.dequantize (all layers) vs GPTQModel's torch kernel
                                                             dequantize_weight (same checkpoint)
- swap:        mechq.swap in + out of all 30 layers       vs load_state_dict of a full
                                                             dequantized copy (+ restore)
- memory:      a Variant's packed bytes                   vs a full float32 / float16 copy

Peak memory is each step's peak RSS, measured in a fresh child process per step.
Writes benchmarks/results/foundation.json and prints a table.
Run: make bench   (or: .venv/bin/python benchmarks/bench_foundation.py [--checkpoint DIR])
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
OUT = Path(__file__).parent / "results"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(step: str, q) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import mechq
    from mechq.models import load as models
    from mechq.quant import layout

    res: dict = {"step": step}
    base = _peak_mib()
    t0 = time.perf_counter()
    if step == "load_mechq":
        mechq.load_model("smollm2-135m", device="cpu")
    elif step == "load_hf":
        from transformers import AutoModelForCausalLM

        d = models.resolve_hf_dir("smollm2-135m").hf_dir
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    elif step in ("rtn_w4", "gptq_w4"):
        model = mechq.load_model("smollm2-135m", device="cpu")
        base, t0 = _peak_mib(), time.perf_counter()
        method = step.split("_")[0]
        v = mechq.quantize(model, method, bits=4, group_size=128, cache=False)
        res["variant_path"] = v.meta["path"]
    elif step == "dequant_mechq":
        v = mechq.load_variant(os.environ["BENCH_CKPT"])
        t0 = time.perf_counter()
        for p in v.modules.values():
            p.dequantize()
    elif step == "dequant_gptqmodel":
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        # fp16, as the checkpoint's scales; the class method, not the torch.compile wrapper
        # post_init installs on instances (its first call would time inductor's build).
        m = GPTQModel.load(os.environ["BENCH_CKPT"], device="cpu", backend=BACKEND.TORCH,
                           dtype=torch.float16)
        qls = [mod for mod in m.model.modules() if isinstance(mod, TorchLinear)]
        t0 = time.perf_counter()
        with torch.no_grad():
            for ql in qls:
                TorchLinear.dequantize_weight(ql)
        res["modules"] = len(qls)
    elif step in ("swap_mechq", "swap_state_dict"):
        model = mechq.load_model("smollm2-135m", device="cpu")
        v = mechq.load_variant(os.environ["BENCH_CKPT"], model=model)
        if step == "swap_state_dict":
            # The peer: keep a full dequantized state dict in memory and load it / restore it.
            fp = {k: t.clone() for k, t in model.state_dict().items()}
            params = dict(model.named_parameters())
            quant = dict(fp)
            for s in layout.sites(model.cfg):
                quant[s.param] = layout.linear_to_hooked(v.weight(s.module), s, model.cfg)
            base, t0 = _peak_mib(), time.perf_counter()
            for _ in range(3):
                model.load_state_dict(quant, strict=False)
                model.load_state_dict(fp, strict=False)
            res["extra_bytes_held"] = sum(
                params[s.param].numel() * 4 for s in layout.sites(model.cfg)
            )
        else:
            base, t0 = _peak_mib(), time.perf_counter()
            for _ in range(3):
                with mechq.swap(model, v):
                    pass
            res["extra_bytes_held"] = v.nbytes
        res["repeats"] = 3
    elif step == "memory":
        model = mechq.load_model("smollm2-135m", device="cpu")
        v = mechq.load_variant(os.environ["BENCH_CKPT"], model=model)
        res["variant_packed_bytes"] = v.nbytes
        res["fp32_linear_bytes"] = 4 * v.n_weights
        res["fp16_linear_bytes"] = 2 * v.n_weights
        res["avg_bits"] = v.avg_bits
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["peak_rss_mib"] = round(_peak_mib(), 1)
    res["peak_rss_growth_mib"] = round(_peak_mib() - base, 1)
    q.put(res)


def run(step: str, env: dict | None = None) -> dict:
    os.environ.update(env or {})
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(step, q))
    p.start()
    res = q.get()
    p.join()
    print(f"  {step:20s} {res['seconds']:8.2f} s   peak RSS {res['peak_rss_mib']:7.0f} MiB",
          flush=True)
    return res


def main() -> None:
    import torch

    print(f"SmolLM2-135M on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    results = {"machine": dict(cores=os.cpu_count(), python=sys.version.split()[0],
                               torch=torch.__version__)}
    run("load_mechq")  # warm the conversion cache before timing
    results["load"] = [run("load_mechq"), run("load_hf")]
    if len(sys.argv) > 2 and sys.argv[1] == "--checkpoint":
        # Skip the quantizers: dequantize / swap / memory on an existing GPTQ checkpoint.
        env = {"BENCH_CKPT": sys.argv[2]}
        results["quantize"] = "skipped (--checkpoint)"
    else:
        # cache=False: both quantizers really run (checkpoints land in the mechq cache).
        rtn = run("rtn_w4")
        gptq = run("gptq_w4")
        results["quantize"] = [rtn, gptq]
        env = {"BENCH_CKPT": gptq["variant_path"]}
    results["dequantize"] = [run("dequant_mechq", env), run("dequant_gptqmodel", env)]
    results["swap"] = [run("swap_mechq", env), run("swap_state_dict", env)]
    results["memory"] = run("memory", env)
    OUT.mkdir(exist_ok=True)
    (OUT / "foundation.json").write_text(json.dumps(results, indent=2))
    m = results["memory"]
    print(f"\nvariant w4 g128: {m['variant_packed_bytes'] / 2**20:.1f} MiB packed "
          f"({m['avg_bits']:.2f} bits/weight) vs {m['fp16_linear_bytes'] / 2**20:.1f} MiB fp16, "
          f"{m['fp32_linear_bytes'] / 2**20:.1f} MiB fp32 for the same linear layers")
    print(f"wrote {OUT / 'foundation.json'}")


if __name__ == "__main__":
    main()
