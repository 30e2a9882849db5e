"""CUDA correctness check of the batched patching engine: ``mechq.engine.patching.batched_act_patch``
vs TransformerLens's ``get_act_patch_resid_pre`` (FP cache patched into the RTN 2-bit variant),
on bundled facts' prompts, with and without KV reuse; tolerance 1e-4.

Run: python benchmarks/check_patching_cuda.py MODEL OUT.json FACT_ID,FACT_ID,...
benchmarks/results/patching_h100_check.json came from
  python benchmarks/check_patching_cuda.py smollm2-135m patching_h100_check.json \
      capital-001,instrument-010,capital-003,sport-004,instrument-009
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from transformer_lens import patching as tlp  # noqa: E402

import mechq  # noqa: E402
from mechq.engine import patching  # noqa: E402
from mechq.facts import target_token  # noqa: E402

name, out, ids = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
model = mechq.load_model(name, device="cuda")
v = mechq.quantize(model, "rtn", bits=2)
facts = {f.id: f for f in mechq.bundled_facts()}
rows = []
for fid in ids:
    f = facts[fid]
    toks = model.to_tokens(f.prompt)
    tid, text, _ = target_token(model.tokenizer, f.object)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda h: h.endswith("resid_pre"))
    with mechq.swap(model, v), torch.no_grad():
        ours = patching.batched_act_patch(model, toks, cache, target_id=tid)
        ref = tlp.get_act_patch_resid_pre(model, toks, cache,
                                          lambda lg: lg[0, -1].softmax(-1)[tid])
        nokv = patching.batched_act_patch(model, toks, cache, target_id=tid, kv_reuse=False)
    d = float((ours - ref).abs().max())
    rows.append(dict(fact_id=fid, prompt=f.prompt, n_tokens=toks.shape[1], target=text,
                     device=str(ours.device), max_abs_diff=d,
                     max_abs_diff_no_kv_reuse=float((nokv - ref).abs().max()),
                     max_target_prob=float(ref.max()), ok=d <= 1e-4))
    print(rows[-1], flush=True)
res = dict(model=name, variant=v.name, gpu=torch.cuda.get_device_name(),
           tolerance=1e-4, all_ok=all(r["ok"] for r in rows), prompts=rows)
json.dump(res, open(out, "w"), indent=2)
print("ALL OK" if res["all_ok"] else "MISMATCH")
