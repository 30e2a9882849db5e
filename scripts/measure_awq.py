"""AWQ next to GPTQ on SmolLM2 (paper App. D), and the AWQ variant against GPTQModel's runtime.

- quantizes AWQ w4 g64 (GPTQModel, its default calibration: 16 × 64 tokens of the bundled pool)
  and GPTQ w4 g64 on the very same tokens, next to the default GPTQ w4 g128 (32 × 128);
- recall of all four (FP included) on the 404 bundled facts, and GPTQ g64 vs AWQ fact by fact;
- the verdict of each (mechq.diagnose);
- agreement of mechq's swapped AWQ variant (float32) with GPTQModel's own AWQ runtime
  (``BACKEND.AWQ_TORCH``, bfloat16) on the first 64 bundled facts: top-1 agreement, logit gap;
  and with a float32 transformers model built from the same dequantized weights and norms; the
  same transformers model in bfloat16 against itself in float32 is the yardstick for bf16
  rounding;
- GPTQModel 7.6's ``dequantize_model`` on the AWQ checkpoint: how far its weights are from
  mechq's, whether they equal mechq's "AWQ order read as sequential" fault, and the verdict
  on that fault.

Writes benchmarks/results/awq.json.

    .venv/bin/python scripts/measure_awq.py
"""

import json
import tempfile
import time
from pathlib import Path

import torch

import mechq
from mechq.analysis.cliff import method_comparison
from mechq.quant import faults
from mechq.quant.variants import swap
from mechq.analysis.recall import FP, accuracy
from mechq.diagnosis.verdict import diagnose_many

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "awq.json"


def main() -> None:
    t0 = time.perf_counter()
    model = mechq.load_model("smollm2-135m", device="cpu")
    facts = mechq.bundled_facts()
    t = time.perf_counter()
    awq = mechq.quantize(model, "awq", bits=4)
    awq_seconds = awq.meta.get("seconds") or time.perf_counter() - t
    gptq64 = mechq.quantize(model, "gptq", bits=4, group_size=64, n_samples=awq.meta[
        "calibration_tokens"] // 64, seq_len=64, name="gptq-w4g64-awqcalib")
    gptq128 = mechq.quantize(model, "gptq", bits=4)
    assert gptq64.meta["calibration_digest"] == awq.meta["calibration_digest"]
    variants = [gptq128, gptq64, awq]
    recall = mechq.evaluate_recall(model, facts, variants, progress=False)
    acc = accuracy(recall)
    table = [dict(variant=r.variant, accuracy=float(r.accuracy), n=int(r.n),
                  avg_bits=next((v.avg_bits for v in variants if v.name == r.variant), 32.0),
                  calibration_tokens=next((v.meta.get("calibration_tokens") for v in variants
                                           if v.name == r.variant), None))
             for r in acc.itertuples()]
    comp = method_comparison(recall, gptq64.name, awq.name)
    diags = diagnose_many(model, variants)

    # GPTQModel's runtime vs mechq's swap, on the first 64 facts' prompts
    from gptqmodel import BACKEND, GPTQModel

    rt = GPTQModel.load(awq.meta["path"], device="cpu", backend=BACKEND.AWQ_TORCH)
    prompts = [f.prompt for f in list(facts)[:64]]
    agree, gaps, scales = [], [], []
    for p in prompts:
        toks = model.to_tokens(p, prepend_bos=model.cfg.default_prepend_bos)
        with swap(model, awq), torch.no_grad():
            ours = model(toks)[0, -1].float()
        with torch.no_grad():
            theirs = rt.model(toks).logits[0, -1].float()
        agree.append(bool(ours.argmax() == theirs.argmax()))
        gaps.append(float((ours - theirs).abs().max()))
        scales.append(float(ours.abs().max()))
    del rt

    # a float32 transformers model with mechq's dequantized weights and AWQ's norms
    from mechq.models import load_hf

    hf = load_hf("smollm2-135m")[0]
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for m in awq.modules:
            params[f"{m}.weight"].copy_(awq.weight(m))
        for n, w in awq.norms.items():
            params[n].copy_(w.float())
    hf_gap = 0.0
    for p in prompts[:8]:
        toks = model.to_tokens(p, prepend_bos=model.cfg.default_prepend_bos)
        with swap(model, awq), torch.no_grad():
            ours = model(toks)[0].float()
            ref = hf(toks).logits[0].float()
        hf_gap = max(hf_gap, float((ours - ref).abs().max()))
    # the yardstick for "within bf16 rounding": the very same weights run in bfloat16 by
    # transformers, against themselves in float32, on the same 64 prompts
    bf_agree, bf_gaps = [], []
    hf_bf16 = load_hf("smollm2-135m")[0]
    hf_bf16.load_state_dict(hf.state_dict())
    hf_bf16 = hf_bf16.to(torch.bfloat16)
    for p in prompts:
        toks = model.to_tokens(p, prepend_bos=model.cfg.default_prepend_bos)
        with torch.no_grad():
            ref = hf(toks).logits[0, -1].float()
            low = hf_bf16(toks).logits[0, -1].float()
        bf_agree.append(bool(ref.argmax() == low.argmax()))
        bf_gaps.append(float((ref - low).abs().max()))
    del hf, hf_bf16

    # GPTQModel 7.6's dequantize_model on the AWQ checkpoint
    from gptqmodel.utils.model_dequant import dequantize_model
    from safetensors.torch import load_file

    bug = faults.awq_order_as_gptq(awq)
    with tempfile.TemporaryDirectory() as d:
        dequantize_model(awq.meta["path"], Path(d) / "out", target_dtype=torch.float32)
        theirs = {}
        for f in sorted((Path(d) / "out").glob("*.safetensors")):
            theirs.update(load_file(f))
    vs_mechq = max(float((theirs[f"{m}.weight"].float() - awq.weight(m)).abs().max())
                   for m in awq.modules)
    vs_fault = max(float((theirs[f"{m}.weight"].float() - bug.weight(m)).abs().max())
                   for m in awq.modules)
    (bug_diag,) = diagnose_many(model, [bug])

    result = dict(
        awq=dict(name=awq.name, group_size=awq.group_size, avg_bits=awq.avg_bits,
                 calibration=awq.meta.get("calibration_source"),
                 calibration_tokens=awq.meta.get("calibration_tokens"),
                 quantize_seconds=awq_seconds, n_norms=len(awq.norms)),
        recall=table, gptq64_vs_awq=comp.to_dict(orient="records"),
        verdicts={d.variant: d.verdict for d in diags},
        evidence={d.variant: d.evidence.to_dict(orient="records") for d in diags},
        runtime=dict(n_prompts=len(prompts), top1_agreement=sum(agree) / len(agree),
                     max_logit_gap=max(gaps), max_logit=max(scales),
                     hf_float32_max_gap=hf_gap,
                     bf16_yardstick=dict(top1_agreement=sum(bf_agree) / len(bf_agree),
                                         max_logit_gap=max(bf_gaps))),
        dequantize_model=dict(max_abs_vs_mechq=vs_mechq,
                              max_abs_vs_sequential_fault=vs_fault,
                              fault_verdict=bug_diag.verdict, fault_reason=bug_diag.reason),
        fp_accuracy=float(acc.loc[acc.variant == FP, "accuracy"].iloc[0]),
        seconds=time.perf_counter() - t0,
    )
    OUT.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "evidence"}, indent=1,
                     default=str))
    print(f"wrote {OUT} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
