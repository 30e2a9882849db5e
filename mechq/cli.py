"""The ``mechq`` command line. ``mechq cliff`` is the main job that ``make demo`` runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded), tiny-gpt2, a local HF directory or a hub id")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--out", default="figures", help="output folder for frames and figures")


def _facts(args):
    from mechq.facts import bundled_facts, load_facts

    fs = bundled_facts() if args.facts == "bundled" else load_facts(args.facts)
    if args.max_facts:
        fs = fs.sample(args.max_facts, seed=args.seed)
    return fs


def cmd_cliff(args) -> int:
    """GPTQ/RTN at several bit widths, recall on facts, table + figures/performance_cliff.html."""
    import mechq
    from mechq import plots
    from mechq.recall import accuracy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = mechq.load_model(args.model, device=args.device)
    facts = _facts(args)
    print(f"model {args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
          f"facts: {facts!r}")
    variants = []
    for b in args.bits:
        t = time.perf_counter()
        v = mechq.quantize(model, args.method, bits=b, group_size=args.group_size,
                           sym=not args.asym, desc_act=args.desc_act, seed=args.seed,
                           n_samples=args.calib_samples, seq_len=args.calib_len)
        print(f"  {v.name}: avg {v.avg_bits:.2f} bits/weight, "
              f"{v.nbytes / 2**20:.1f} MiB packed ({time.perf_counter() - t:.0f} s)")
        variants.append(v)
    recall = mechq.evaluate_recall(model, facts, variants, batch_size=args.batch_size)
    recall.to_csv(out / "recall.csv", index=False)
    acc = accuracy(recall)
    rel = accuracy(recall, ["variant", "relation"])
    acc.to_csv(out / "accuracy.csv", index=False)
    fig = plots.performance_cliff(
        acc, rel, title=f"Performance cliff — {args.model}, {args.method.upper()} "
                        f"g{args.group_size}, {len(facts)} facts")
    path = plots.save_html(fig, out / "performance_cliff.html")
    cols = ["variant", "accuracy", "ci_low", "ci_high", "n_correct", "n", "median_rank",
            "mean_target_prob"]
    print()
    print(acc[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    kinds = recall[recall.variant == "fp"]["target_kind"].value_counts().to_dict()
    print(f"\ntarget tokens: {kinds} (see recall.csv, column target_kind)")
    print(f"wrote {path}, {out / 'recall.csv'}, {out / 'accuracy.csv'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_quantize(args) -> int:
    """Quantize a model and print where the (cached) checkpoint lives."""
    import mechq

    model = mechq.load_model(args.model, device=args.device)
    v = mechq.quantize(model, args.method, bits=args.bits, group_size=args.group_size,
                       sym=not args.asym, desc_act=args.desc_act, seed=args.seed,
                       n_samples=args.calib_samples, seq_len=args.calib_len)
    print(v)
    print(v.meta.get("path"))
    return 0


def _quant_opts(p, bits_many: bool) -> None:
    if bits_many:
        p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    else:
        p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true", help="asymmetric quantization")
    p.add_argument("--desc-act", action="store_true", help="GPTQ activation order")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mechq", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cliff", help="recall accuracy of FP vs quantized variants (Fig. 1)")
    _common(p)
    _quant_opts(p, bits_many=True)
    p.add_argument("--facts", default="bundled", help="'bundled' or a facts CSV path")
    p.add_argument("--max-facts", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_cliff)
    p = sub.add_parser("quantize", help="quantize a model (cached) and print the checkpoint path")
    _common(p)
    _quant_opts(p, bits_many=False)
    p.set_defaults(func=cmd_quantize)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
