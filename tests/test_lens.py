"""Logit lens: consistency with the model's output, batching, shape of the frame."""

import numpy as np
import pytest
import torch

import mechq
from mechq.lens import lens_hook_names, lens_summary, logit_lens
from mechq.recall import evaluate_recall


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_final_layer_lens_is_the_model_output(which, request, facts):
    model = request.getfixturevalue(which)
    sub = facts.sample(10, seed=1)
    lens = logit_lens(model, sub, progress=False)
    L = model.cfg.n_layers
    assert sorted(lens["layer"].unique()) == list(range(L + 1))
    rec = evaluate_recall(model, sub, progress=False)
    final = lens[lens.layer == L].reset_index(drop=True)
    assert (final["fact_id"] == rec["fact_id"]).all()
    assert np.abs(final["target_prob"] - rec["target_prob"]).max() < 1e-5
    assert (final["target_rank"] == rec["target_rank"]).all()
    assert (final["top1_id"] == rec["top1_id"]).all()


def test_lens_matches_a_manual_decode_of_the_cache(smol, facts):
    f = facts.sample(1, seed=5)[0]
    lens = logit_lens(smol, facts.filter(ids=[f.id]), progress=False).set_index("layer")
    _, cache = smol.run_with_cache(f.prompt)
    tid = smol.tokenizer(" " + f.object, add_special_tokens=False)["input_ids"][0]
    for layer, name in enumerate(lens_hook_names(smol.cfg.n_layers)):
        if layer % 7:
            continue
        logits = smol.unembed(smol.ln_final(cache[name][:, -1:]))[0, 0]
        p = logits.softmax(-1)[tid].item()
        assert lens.loc[layer, "target_prob"] == pytest.approx(p, rel=1e-4, abs=1e-9)


def test_lens_per_variant_and_summary(tiny, facts):
    w2 = mechq.quantize(tiny, "rtn", bits=2, group_size=32)
    sub = facts.sample(16, seed=2)
    lens = logit_lens(tiny, sub, [w2], batch_size=5, progress=False)
    assert set(lens["variant"]) == {"fp", "rtn-w2g32"}
    assert len(lens) == 2 * 16 * (tiny.cfg.n_layers + 1)
    s = lens_summary(lens)
    assert set(s.columns) >= {"variant", "layer", "mean_prob", "median_rank", "top1_share"}
    assert (s["prob_q25"] <= s["prob_q75"]).all()
    # the swap is undone: an FP lens after the variant equals the first one
    again = logit_lens(tiny, sub, progress=False)
    fp = lens[lens.variant == "fp"].reset_index(drop=True)
    assert torch.allclose(torch.tensor(fp["target_prob"].to_numpy()),
                          torch.tensor(again["target_prob"].to_numpy()))
