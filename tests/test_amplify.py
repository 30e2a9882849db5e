"""Peak-signal amplification: its definition, the α = 0 identity, the dev / held-out split."""

import pytest
import torch

import mechq
from mechq.repair import amplify as A
from mechq.engine.forward import decode, last_states
from mechq.engine.forward import tokenize_facts


def test_split_is_fixed_and_disjoint(facts):
    dev, held = A.dev_heldout(facts)
    assert len(dev) + len(held) == len(facts)
    assert not {f.id for f in dev} & {f.id for f in held}
    # the split depends on each fact's id only, not on which other facts are given
    dev2, _ = A.dev_heldout(mechq.FactSet(list(facts)[::3], name="third"))
    assert {f.id for f in dev2} == {f.id for f in dev} & {f.id for f in list(facts)[::3]}
    assert 0.35 < len(dev) / len(facts) < 0.65  # a hash split of 404 ids lands near one half


def test_amplified_logits_follow_the_definition(tiny, facts):
    prompts, _ = tokenize_facts(tiny, facts.sample(8, seed=0))
    L = tiny.cfg.n_layers
    resid = last_states(tiny, prompts, list(range(L + 1)))
    logits, peak = A.amplified_logits(tiny, resid, alpha=0.5, first=1)
    lens = decode(tiny, resid)                                    # (n, L + 1, vocab)
    logp = lens[:, 1:L].log_softmax(-1)
    want_peak = (-(logp.exp() * logp).sum(-1)).argmin(-1) + 1
    assert torch.equal(peak, want_peak)
    want = lens[:, L] + 0.5 * lens[torch.arange(len(lens)), want_peak]
    # the same float32 decodes, batched differently: a few ulps of logits of size ~10
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="first"):
        A.amplified_logits(tiny, resid, alpha=0.5, first=L)


def test_alpha_zero_is_the_model_itself(tiny, tiny_w2, facts):
    few = facts.sample(24, seed=1)
    amp = A.amplified_recall(tiny, few, [tiny_w2], alphas=(0.0, 1.0), firsts=[2])
    rec = mechq.evaluate_recall(tiny, few, [tiny_w2], progress=False)
    base = amp[amp["alpha"] == 0].reset_index(drop=True)
    assert (base["correct"].to_numpy() == rec["correct"].to_numpy()).all()
    assert set(amp["peak_layer"]) <= {2, 3}
    with pytest.raises(ValueError, match="alpha"):
        A.amplified_recall(tiny, few, [tiny_w2], alphas=(-1.0,))
