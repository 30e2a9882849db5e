"""Activation-patching benchmark on the embedded SmolLM2-135M: mechq's batched engine vs
TransformerLens's ``patching.get_act_patch_resid_pre``, side by side in one run.

The task is the same for both: a full ``resid_pre`` sweep (all 30 layers × all positions) of one
prompt, patching the FP model's activations (the clean cache) into the model with a quantized
variant swapped in (the corrupted run), metric = target-token probability at the last position.
TransformerLens does one forward per (layer, position); mechq puts the sites on the batch axis
(with KV reuse for positions before the patched one, and replicas joining at their own layer).
Both get the same inputs (model with the variant swapped in, tokens, FP cache) and are timed
from there; the end-to-end ``patch_sweep`` (swap, FP run and all) is timed too, and so are the
engine with its shortcuts switched off, to show what each contributes.

Threads: ``--threads`` (default ``1``; e.g. ``1,2`` measures both in turn). On a shared 2-core
machine two threads per process oversubscribe the cores when others are busy, which slows
small ops by up to 10× and makes timings erratic; one thread keeps the comparison stable. The
load average before and after each measurement is recorded with the results.

GPU: ``--device cuda`` runs the same comparison on the GPU. Each timer then reads the clock
after ``torch.cuda.synchronize()``, both functions run once untimed before timing (CUDA context,
kernel selection and allocator warm-up), TransformerLens is timed ``--tl-repeats`` times (median),
peak GPU memory of each function is recorded (``torch.cuda.max_memory_allocated``, reset before
each), and thread settings are left alone. ``--extra-fact ID`` (repeatable) measures a bundled
fact's prompt as well, as a separate entry (``extra_prompts``).

Writes benchmarks/results/patching.json (``--out``) and prints a table.
Run: .venv/bin/python benchmarks/bench_patching.py [--variant gptq|rtn] [--bits 2] [--threads 1,2]
     [--device cpu|cuda] [--extra-fact instrument-010] [--out benchmarks/results/patching_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = Path(__file__).parent / "results"


def _sync() -> None:
    """Wait for queued GPU work (no-op on CPU), so that a clock read covers it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    _sync()
    return r, time.perf_counter() - w, time.process_time() - c


def _repeat(fn, n: int, cuda: bool, peaks: list):
    """Run ``fn`` (returning result, wall, cpu) ``n`` times: the last result and the
    (wall, cpu) of each run; each run's peak GPU memory is appended to ``peaks``."""
    out, runs = None, []
    for _ in range(n):
        with _Peak(cuda) as pk:
            out, w, c = fn()
        runs.append((w, c))
        peaks.append(pk.mib)
    return out, runs


class _Peak:
    """Peak GPU memory (MiB) allocated while the body runs; None on CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.mib = cuda, None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return False


def _measure(model, variant, toks, tid, fp_cache, args, threads: int | None,
             fact=None) -> dict:
    import torch
    from transformer_lens import patching as tlp

    import mechq
    from mechq.engine import patching
    from mechq.analysis.patching import patch_sweep

    cuda = args.device == "cuda"
    if threads is not None:
        torch.set_num_threads(threads)
    L, n = model.cfg.n_layers, toks.shape[1]

    def metric(logits):  # TransformerLens: full logits [1, pos, vocab]
        return logits[0, -1].softmax(-1)[tid]

    def ours_once(**kw):
        return _timed(lambda: patching.batched_act_patch(model, toks, fp_cache, target_id=tid,
                                                         **kw))

    def tl_once():
        return _timed(lambda: tlp.get_act_patch_resid_pre(model, toks, fp_cache, metric))

    load0 = os.getloadavg()
    peak_ours, peak_tl = [], []
    with mechq.swap(model, variant), torch.no_grad():
        if cuda:  # untimed warm-up of both functions
            ours_once()
            tl_once()
        ours, runs = _repeat(ours_once, args.repeats, cuda, peak_ours)
        ref, tl_runs = _repeat(tl_once, args.tl_repeats, cuda, peak_tl)
        tl_w = statistics.median(r[0] for r in tl_runs)
        tl_c = statistics.median(r[1] for r in tl_runs)
        # The engine with its shortcuts switched off (same results), for the record.
        ablations = {}
        shortcuts = {"no_kv_reuse": dict(kv_reuse=False),
                     "no_kv_reuse_no_skip": dict(kv_reuse=False, skip_identical=False)}
        for mt in args.min_tokens_ablation:
            shortcuts[f"min_tokens_{mt}"] = dict(min_tokens=mt)
        for name, kw in shortcuts.items():
            g, w, c = ours_once(**kw)
            ablations[name] = dict(wall_s=round(w, 3), cpu_s=round(c, 3),
                                   max_abs_diff_vs_tl=float((g - ref).abs().max()))
        for _ in range(args.repeats):  # again after TransformerLens, against drift in load
            _, w, c = ours_once()
            runs.append((w, c))
    if fact is None:
        fact = mechq.Fact("bench", "bench", args.subject, args.target.strip(),
                          args.prompt.replace(args.subject, "{subject}", 1))
    if cuda:  # untimed warm-up (the variant's first swap-in from its packed weights)
        patch_sweep(model, [fact], variant, progress=False)
    sweep, sw_w, sw_c = _timed(lambda: patch_sweep(model, [fact], variant, progress=False))
    load1 = os.getloadavg()
    ours_w = statistics.median(r[0] for r in runs)
    ours_c = statistics.median(r[1] for r in runs)
    sweep_grid = torch.tensor(sweep["target_prob"].to_numpy()).reshape(L, n)
    tl = dict(function="transformer_lens.patching.get_act_patch_resid_pre",
              wall_s=round(tl_w, 3), cpu_s=round(tl_c, 3),
              per_site_wall_s=round(tl_w / (L * n), 4))
    me = dict(function="mechq.engine.patching.batched_act_patch", wall_s=round(ours_w, 3),
              cpu_s=round(ours_c, 3), runs_wall_s=[round(r[0], 3) for r in runs])
    if args.tl_repeats > 1:
        tl["runs_wall_s"] = [round(r[0], 3) for r in tl_runs]
    if cuda:
        tl["peak_gpu_mib"] = max(peak_tl)
        me["peak_gpu_mib"] = max(peak_ours)
    return dict(
        torch_threads=threads,
        transformer_lens=tl,
        mechq=me,
        speedup_wall=round(tl_w / ours_w, 1), speedup_cpu=round(tl_c / ours_c, 1),
        max_abs_diff=float((ours - ref).abs().max()),
        patch_sweep_end_to_end=dict(
            wall_s=round(sw_w, 3), cpu_s=round(sw_c, 3),
            max_abs_diff_vs_tl=float((sweep_grid - ref.cpu()).abs().max()),
            note="includes swapping the variant in and out and the FP run; patch_sweep "
                 "amortises the swap over prompt_block prompts"),
        engine_without_shortcuts=ablations,
        target_prob=dict(fp=float(sweep["fp_prob"].iloc[0]),
                         variant=float(sweep["baseline_prob"].iloc[0]),
                         best_patch=float(ref.max())),
        loadavg_before=[round(x, 2) for x in load0], loadavg_after=[round(x, 2) for x in load1],
    )


def _table(r: dict, L: int, n: int, vname: str) -> None:
    tl, me, ab, sw = (r["transformer_lens"], r["mechq"], r["engine_without_shortcuts"],
                      r["patch_sweep_end_to_end"])
    rows = [
        ("TransformerLens get_act_patch_resid_pre", tl["wall_s"], tl["cpu_s"], "—"),
        ("mechq batched_act_patch (median)", me["wall_s"], me["cpu_s"],
         f"{r['max_abs_diff']:.1e}"),
        ("  … without KV reuse", ab["no_kv_reuse"]["wall_s"], ab["no_kv_reuse"]["cpu_s"],
         f"{ab['no_kv_reuse']['max_abs_diff_vs_tl']:.1e}"),
        ("  … without KV reuse or identical-site skip", ab["no_kv_reuse_no_skip"]["wall_s"],
         ab["no_kv_reuse_no_skip"]["cpu_s"],
         f"{ab['no_kv_reuse_no_skip']['max_abs_diff_vs_tl']:.1e}"),
        ("mechq patch_sweep end to end (incl. swap)", sw["wall_s"], sw["cpu_s"],
         f"{sw['max_abs_diff_vs_tl']:.1e}"),
    ]
    for k, v in ab.items():
        if k.startswith("min_tokens_"):
            rows.insert(-1, (f"  … with min_tokens={k[11:]}", v["wall_s"], v["cpu_s"],
                             f"{v['max_abs_diff_vs_tl']:.1e}"))
    where = (f"{r['torch_threads']} thread(s)" if r["torch_threads"] is not None
             else r.get("device", "GPU"))
    print(f"\nFull resid_pre sweep, {L} layers × {n} positions = {L * n} sites, FP → {vname}, "
          f"{where}, load {r['loadavg_before'][0]:.1f}→{r['loadavg_after'][0]:.1f}")
    print(f"{'':48s} {'wall s':>8s} {'cpu s':>8s} {'max |Δ| vs TL':>14s}")
    for name, w, c, d in rows:
        print(f"{name:48s} {w:8.2f} {c:8.2f} {d:>14s}")
    if "peak_gpu_mib" in me:
        print(f"peak GPU memory: TransformerLens {tl['peak_gpu_mib']} MiB, "
              f"mechq {me['peak_gpu_mib']} MiB")
    print(f"speed-up (wall): {r['speedup_wall']}×   (CPU time): {r['speedup_cpu']}×")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--threads", default="1",
                    help="comma-separated torch thread counts, each measured in turn (e.g. 1,2)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--subject", default="France", help="occurs in --prompt")
    ap.add_argument("--target", default=" Paris")
    ap.add_argument("--repeats", type=int, default=3, help="runs of mechq's engine (median)")
    ap.add_argument("--out", default=str(OUT / "patching.json"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="smollm2-135m",
                    help="mechq.load_model name (e.g. tiny-gpt2 for a quick check)")
    ap.add_argument("--tl-repeats", type=int, default=1,
                    help="runs of TransformerLens's function (median)")
    ap.add_argument("--extra-fact", action="append", default=[],
                    help="also measure this bundled fact's prompt (id, e.g. instrument-010); "
                         "repeatable; reported under extra_prompts")
    ap.add_argument("--min-tokens-ablation", type=lambda v: [int(x) for x in v.split(",")],
                    default=[], help="also time the engine with these min_tokens (e.g. 4096)")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import mechq
    from mechq.engine import patching
    from mechq.facts import target_token

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    model = mechq.load_model(args.model, device=args.device)
    variant = mechq.quantize(model, args.variant, bits=args.bits)  # cached after the first run
    thread_counts = [None] if cuda else [int(t) for t in args.threads.split(",")]

    def measure_prompt(prompt, target, tid, fact=None):
        toks = model.to_tokens(prompt)
        L, n = model.cfg.n_layers, toks.shape[1]
        print(f"{args.model}: {L} layers; prompt {model.to_str_tokens(prompt)} ({n} tokens) → "
              f"{L * n} sites; variant {variant.name}; {args.device}", file=sys.stderr)
        with torch.no_grad():
            _, fp_cache = model.run_with_cache(toks,
                                               names_filter=lambda h: h.endswith("resid_pre"))
        runs = [_measure(model, variant, toks, tid, fp_cache, args, t, fact=fact)
                for t in thread_counts]
        if cuda:
            for r in runs:
                r["device"] = torch.cuda.get_device_name()
        return dict(prompt=prompt, tokens=model.to_str_tokens(prompt), n_tokens=n, sites=L * n,
                    target=target), runs

    tid = model.tokenizer(args.target, add_special_tokens=False)["input_ids"][0]
    head, runs = measure_prompt(args.prompt, args.target, tid)
    extra = []
    facts = {f.id: f for f in mechq.bundled_facts()}
    for fid in args.extra_fact:
        f = facts[fid]
        ftid, ftext, _ = target_token(model.tokenizer, f.object)
        e, eruns = measure_prompt(f.prompt, ftext, ftid, fact=f)
        extra.append(dict(fact_id=fid, **e, runs=eruns))
    L = model.cfg.n_layers
    model_label = ("SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to float32)"
                   if args.model == "smollm2-135m" else args.model)
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   torch=torch.__version__)
    if cuda:
        machine.update(device="cuda", gpu=torch.cuda.get_device_name(),
                       cuda=torch.version.cuda,
                       tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    res = dict(
        model=model_label,
        n_layers=L, **head, variant=variant.name, activation="resid_pre",
        mode="fp_to_variant", engine_defaults=dict(
            max_batch=512, memory_mb=1024, min_tokens=patching.default_min_tokens(model)),
        runs=runs,
    )
    if extra:
        res["extra_prompts"] = extra
    if cuda:
        from importlib.metadata import version

        res["variant_made_by"] = (f"mechq.quantize(model, {args.variant!r}, bits={args.bits}) "
                                  "on this machine")
        res["timing"] = ("wall clock after torch.cuda.synchronize(); both functions run once "
                         "untimed first; medians of --repeats (mechq) and --tl-repeats (TL) runs")
        machine.update(transformer_lens=version("transformer-lens"),
                       transformers=version("transformers"))
    res["machine"] = machine
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    for r in runs:
        _table(r, L, head["n_tokens"], variant.name)
    for e in extra:
        for r in e["runs"]:
            _table(r, L, e["n_tokens"], variant.name)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
