"""The ``mechq`` command line: it parses arguments and calls :mod:`mechq.reports.pages`.

Variants are positional arguments, named as mechq names them: ``gptq-w4g128``, ``rtn-w2g128``,
``gptq-w3`` (group size 128 by default), with ``-asym`` / ``-act`` / ``-sSEED`` suffixes, or a
path to a checkpoint directory; ``+SCHEME`` adds an activation scheme (``gptq-w4g128+A8-int-token``,
``fp+KV4-int-head``; see ``mechq.quant.activation_quant``). Facts: ``bundled``, a facts CSV, or
``pararel[:P36,P103]`` (the Pararel dev copy or ``$MECHQ_PARAREL``). Every command writes into
``--out`` (default ``mechq-COMMAND/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mechq
from mechq.analysis.cliff import cliff_requests
from mechq.facts import load_fact_source
from mechq.facts.calibration import AWQ_N_SAMPLES, AWQ_SEQ_LEN, N_SAMPLES, SEQ_LEN
from mechq.quant.quantize import make_specs, parse_spec
from mechq.reports import pages
from mechq.reports.architectures import check_settings
from mechq.vocab import SUPPORTED_BITS


def _calib(args) -> dict:
    return dict(calibration=args.calibration, n_samples=args.calib_samples, seq_len=args.calib_len)


def _gptq_log_note(n: int, logs: str) -> None:
    print(f"  {n} GPTQ run{'s' if n > 1 else ''}; GPTQModel's output goes to {logs}/", flush=True)


def _requests(args, specs: list[str], why: str = "") -> list:
    """Each variant argument as :func:`mechq.quant.quantize.parse_spec` reads it; ``why``: why
    only a weight variant's name will do."""
    items = [parse_spec(s, **_calib(args)) for s in specs]
    if why and any(not isinstance(i, mechq.Request) or a is not None for i, a in items):
        raise ValueError(f"{why}: give a weight variant's name (e.g. gptq-w4g128), not a "
                         "checkpoint directory or an activation scheme.")
    return items


def _variants(model, items: list, args) -> list:
    """The variants of :func:`_requests`' items (GPTQ runs in parallel)."""
    return make_specs(model, items, on_start=_gptq_log_note, verbose=args.verbose)


def _model(name: str, device: str | None):
    model = mechq.load_model(name, device=device)
    print(f"model {name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}", flush=True)
    return model


def _prepare(args):
    """The model and facts; makes the ``--out`` folder."""
    model = _model(args.model, args.device)
    facts = load_fact_source(args.facts, args.max_facts, args.seed)
    print(f"facts: {facts!r}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    return model, facts


def _analysis(args):
    """Model, facts and variants of the commands that analyse several variants."""
    items = _requests(args, args.variants)
    model, facts = _prepare(args)
    return model, facts, _variants(model, items, args)


def _page(args, *lead, **kw) -> int:
    """Call the command's page (``<command>_page`` of :mod:`mechq.reports.pages`) with ``lead``,
    ``--out``, the options named in ``args.keys`` and ``kw``; print its summary."""
    page = getattr(pages, args.command.replace("-", "_") + "_page")(
        *lead, args.out, **{k: getattr(args, k) for k in args.keys}, **kw)
    frames = f" and its frames in {args.out}/" if page.frames else ""
    print(f"\n{page.text}\nwrote {page.path}{frames}")
    return 0


def cmd_report(args) -> int:
    res = mechq.report(args.model, args.facts, out=args.out, **_calib(args),
                       **{k: getattr(args, k) for k in args.keys})
    print("\n" + res.summary.split("\n", 2)[2].strip())
    return 0


def cmd_cliff(args) -> int:
    requests = cliff_requests(args.method, args.bits, args.group_size, args.seeds,
                              seed_bits=args.seed_bits, sym=not args.asym,
                              desc_act=args.desc_act, **_calib(args))
    if args.awq:
        requests.append(mechq.Request("awq", 4, None, **_calib(args)))
    model, facts = _prepare(args)
    variants = mechq.quantize_many(model, requests, on_start=_gptq_log_note, verbose=args.verbose)
    return _page(args, model, facts, variants)


def cmd_analysis(args) -> int:
    return _page(args, *_analysis(args))


def cmd_sensitivity(args) -> int:
    model, facts, variants = _analysis(args)
    injection = {}
    if "injection" in args.analyses:  # FP is None; names not among the variants are loaded
        named = {v.name: v for v in variants}
        extra = sorted({args.injection_low, *args.injection_high} - {None, "fp", *named})
        named.update(zip(extra, _variants(model, _requests(args, extra), args)))
        injection = dict(injection_high=[named.get(h) for h in args.injection_high],
                         injection_low=named.get(args.injection_low),
                         injection_ks=args.injection_ks)
    return _page(args, model, facts, variants, **injection)


def cmd_diagnose(args) -> int:
    why = "--repair quantizes the base again with repair rules" if args.repair else ""
    items = _requests(args, [args.variant], why)
    model, facts = _prepare(args)
    (v,) = _variants(model, items, args)
    return _page(args, model, v, facts, repair=items[0][0] if args.repair else None)


def cmd_recipe(args) -> int:
    ((base, _),) = _requests(args, [args.variant], "recipe quantizes the base's method per width")
    model, facts = _prepare(args)
    return _page(args, model, base, facts)


def cmd_compare_architectures(args) -> int:
    check_settings(tuple(args.bits), args.sweep_bits, args.protect_bits, args.method)
    t0 = time.perf_counter()
    facts = load_fact_source(args.facts, args.max_facts, args.seed)
    models = {name: _model(name, args.device) for name in args.models}
    rc = _page(args, models, facts, **{k: v for k, v in _calib(args).items() if v is not None})
    pages.write_run_record(args.out / "architectures_run.json", args.command,
                           {k: v for k, v in vars(args).items() if k not in ("func", "keys")},
                           time.perf_counter() - t0)
    return rc


def cmd_quantize(args) -> int:
    items = _requests(args, [args.variant])
    model = _model(args.model, args.device)
    (v,) = _variants(model, items, args)
    print(f"{v}\nwrote {pages.write_checkpoint(v, args.out, model=model, ct=args.ct)}")
    return 0


def _parent(*parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, parents=list(parents))


def build_parser() -> argparse.ArgumentParser:
    device = _parent()
    device.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    model = _parent(device)
    model.add_argument("--model", default="smollm2-135m",
                       help="smollm2-135m (embedded), tiny-gpt2, a local HF directory or a hub id")
    model.add_argument("--verbose", action="store_true", help="show GPTQModel's log live")
    facts = _parent()
    facts.add_argument("--facts", default="bundled", help="bundled | a CSV | pararel[:P36,P103]")
    facts.add_argument("--max-facts", type=int, help="sample this many facts")
    facts.add_argument("--seed", type=int, default=0, help="seed for --max-facts sampling (a "
                       "variant's calibration seed is in its name: gptq-w4g128-s1)")
    facts.add_argument("--batch-size", type=int, default=32)
    calib = _parent()
    calib.add_argument("--calibration", help="GPTQ / AWQ calibration: bundled (default), sampled "
                       "(drawn from the model), a text file, or dataset:NAME[:CONFIG]")
    calib.add_argument("--calib-samples", type=int, help=f"calibration sequences (default "
                       f"{N_SAMPLES} for GPTQ, {AWQ_N_SAMPLES} for AWQ)")
    calib.add_argument("--calib-len", type=int, help=f"tokens per calibration sequence (default "
                       f"{SEQ_LEN} for GPTQ, {AWQ_SEQ_LEN} for AWQ)")
    output = _parent()
    output.add_argument("--out", help="output folder (default: mechq-COMMAND)")
    several = _parent()
    several.add_argument("variants", nargs="*", default=["gptq-w4g128", "gptq-w2g128"],
                         metavar="VARIANT", help="variant names (gptq-w4g128, rtn-w2g128 ...) or "
                         "checkpoint dirs (default: gptq-w4g128 gptq-w2g128)")
    reference = _parent(several)
    reference.add_argument("--reference", help="variant defining Robust/Failure (default: 1st)")
    analysis = _parent(reference)
    analysis.add_argument("--subset", choices=list(pages.SUBSETS), default="fp-correct",
                          help="facts analysed: FP-correct (Robust + Failure), one of them, or all")
    one = _parent()
    one.add_argument("variant", help="a variant name (gptq-w4g128, rtn-w2g128-asym ...) or, where "
                     "it is not quantized again, a checkpoint directory")
    widths = _parent()
    widths.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2], help="bit widths")
    widths.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                        help="gptq (the paper's) or rtn (no calibration: minutes, not an hour)")
    seeds = _parent(widths)
    seeds.add_argument("--group-size", type=int, default=128)
    seeds.add_argument("--awq", action="store_true", help="add an AWQ w4 variant (GPTQModel, "
                       "the model's default group size, 64 on SmolLM2) on the same calibration; "
                       "about 30 min on SmolLM2 on 2 cores")
    seeds.add_argument("--calib-seeds", type=int, default=1, dest="seeds",
                       help="calibration seeds per bit width (GPTQ): the cliff shows their range")
    seeds.add_argument("--seed-bits", type=int, nargs="+",
                       help="give the extra calibration seeds only to these bit widths")
    common = [model, facts, calib, output]

    ap = argparse.ArgumentParser(prog="mechq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, func, helptext: str, *parents, keys=()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, parents=list(parents))
        p.set_defaults(func=func, keys=keys)
        return p

    p = command("report", cmd_report, "the main job (make demo): verdicts + cliff + answer ranks "
                "+ lens -> report.html", *common, seeds, keys=(
                    "method", "bits", "group_size", "seeds", "seed_bits", "max_facts",
                    "batch_size", "device", "verbose", "diagnose", "awq", "compare_with"))
    p.add_argument("--no-diagnose", action="store_false", dest="diagnose",
                   help="skip the verdicts (about a minute per bit width on SmolLM2, 2 cores)")
    p.add_argument("--compare-with", metavar="MODEL", help="add the architecture contrast with "
                   "another model (e.g. gemma-3-270m) as a section (needs 3 and 2 among --bits; "
                   "about an hour on 2 cores for SmolLM2 vs Gemma with GPTQ)")
    p = command("cliff", cmd_cliff, "recall of FP vs bit widths (paper Fig. 1)", *common, seeds,
                keys=("batch_size",))
    p.add_argument("--asym", action="store_true", help="asymmetric quantization")
    p.add_argument("--desc-act", action="store_true", help="GPTQ activation order")
    for name, helptext in [("recall", "recall, answer ranks, top-1 tokens, subsets (§3.2)"),
                           ("lens", "logit lens per layer, Robust vs Failure (§3.3)"),
                           ("components", "attention and FFN diagnostics per layer (§4.1)")]:
        command(name, cmd_analysis, helptext, *common, reference, keys=("reference", "batch_size"))
    p = command("representation", cmd_analysis, "CKA and SVD subspaces per layer (§4.2)", *common,
                several, keys=("energy", "batch_size"))
    p.add_argument("--energy", type=float, default=0.9, help="share of the FP spectral energy kept")
    p = command("patch", cmd_analysis, "FP->variant activation patching, zero ablation (§3.4)",
                *common, analysis, keys=("reference", "subset", "activations", "modes",
                                         "positions", "layers", "memory_mb", "fp_ablation"))
    p.add_argument("--activations", nargs="+", default=["resid_pre"],
                   choices=["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
    p.add_argument("--modes", nargs="+", default=["fp_to_variant", "zero"],
                   choices=["fp_to_variant", "variant_to_fp", "zero"])
    p.add_argument("--positions", default="semantic", help="semantic (subject, relation, last) "
                   "or all")
    p.add_argument("--layers", type=int, nargs="*", help="default: every layer")
    p.add_argument("--memory-mb", type=float, default=1024.0, help="memory of one forward batch")
    p.add_argument("--fp-ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="zero mode: ablate the FP model too, not only the variants")
    p = command("sensitivity", cmd_sensitivity, "first domino, single layers, components, "
                "signal injection (§4.3)", *common, analysis,
                keys=("reference", "subset", "analyses", "batch_size"))
    p.add_argument("--analyses", nargs="+", default=["domino", "components", "injection"],
                   choices=["domino", "single", "components", "injection"])
    p.add_argument("--injection-high", nargs="+", default=["fp"], help="fp / variants: layers < k")
    p.add_argument("--injection-low", help="precision of the other layers (default: last variant)")
    p.add_argument("--injection-ks", type=int, nargs="*", help="k (default: 0, L/10 ... L)")
    p = command("diagnose", cmd_diagnose, "healthy / signal degradation / computation collapse "
                "/ format bug / reference mismatch, with evidence (§4.3)", *common, one,
                keys=("n_facts", "batch_size"))
    p.add_argument("--n-facts", type=int, default=128, help="FP-correct facts (fewer if unknown)")
    p.add_argument("--repair", action="store_true", help="also measure the repairs (protection, "
                   "+ amplification, EoRA r32/r64) on held-out facts: repairs.csv")
    p = command("recipe", cmd_recipe, "per-module widths within a bit budget against the usual "
                "rules, as a GPTQModel dynamic config (recipe.json)", *common, one,
                keys=("budget", "check", "widths", "eora_ranks", "batch_size"))
    p.add_argument("--budget", type=float, required=True, help="average bits per weight, e.g. 4.3")
    p.add_argument("--widths", type=int, nargs="+", choices=SUPPORTED_BITS, default=[2, 3, 4, 8])
    p.add_argument("--eora-ranks", type=int, nargs="*", default=[], help="EoRA ranks a module "
                   "may take too (e.g. 16 64), exported as a PEFT adapter (adapter/)")
    p.add_argument("--check", action="store_true",
                   help="quantize again from the JSON alone and measure what it promised")
    p = command("compare-architectures", cmd_compare_architectures, "model families side by "
                "side: cliff, first domino, single layers, components, protection, verdicts "
                "(paper Fig. 10, 22)", device, facts, calib, output, widths,
                keys=("method", "sweep_bits", "protect_bits", "n_facts", "bits", "batch_size"))
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    p.add_argument("--n-facts", type=int, default=64, help="FP-correct facts per model sampled")
    p.add_argument("--sweep-bits", type=int, default=2, choices=SUPPORTED_BITS,
                   help="width of the first-domino, single-layer and component sweeps")
    p.add_argument("--protect-bits", type=int, default=3, choices=SUPPORTED_BITS,
                   help="width the two protections are compared at (both among --bits)")
    p = command("quantize", cmd_quantize, "make one variant (or find it in the cache) and "
                "write its checkpoint into --out", model, calib, output, one)
    p.add_argument("--ct", action="store_true", help="write a whole compressed-tensors "
                   "(pack-quantized) checkpoint instead of a copy of mechq's (needs mechq[ct]; "
                   "uniform bits, no act-order g_idx)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (an unknown variant, a checkpoint of another model, bad bits,
    an empty fact set ...) ends with a one-line message instead of a traceback."""
    args = build_parser().parse_args(argv)
    args.out = Path(args.out or f"mechq-{args.command}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mechq {args.command}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
