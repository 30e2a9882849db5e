"""KL divergence statistics on held-out text, against an independent float64 computation from
the full logits, and the held-out text itself."""

import numpy as np
import pytest
import torch

import mechq
from mechq.analysis import kld as K
from mechq.facts.heldout import heldout_passages, heldout_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heldout_text_ships_and_is_not_calibration_text(tiny):
    passages = heldout_passages()
    assert len(passages) >= 30 and all(text.strip() for _, text in passages)
    from mechq.facts.calibration import pool_texts

    calib = "\n".join(pool_texts())
    assert not any(text[:80] in calib for _, text in passages)
    seqs = heldout_tokens(tiny, max_tokens=1000)
    assert 900 <= sum(map(len, seqs)) <= 1000 and max(map(len, seqs)) <= tiny.cfg.n_ctx


def _float64_reference(model, variant, sequences):
    """Every statistic from the full logits of both runs, in float64, one sequence at a time."""
    kld, same, dp = [], [], []
    for seq in sequences:
        toks = torch.tensor([seq])
        with torch.no_grad():
            lp = model(toks)[0, :-1].double().log_softmax(-1)
            with mechq.swap(model, variant):
                lq = model(toks)[0, :-1].double().log_softmax(-1)
        p = lp.exp()
        kld.append((p * (lp - lq)).sum(-1))
        top = lp.argmax(-1, keepdim=True)
        same.append((lq.argmax(-1, keepdim=True) == top)[:, 0].double())
        dp.append((lq.gather(-1, top).exp() - p.gather(-1, top))[:, 0])
    kld, same, dp = (torch.cat(x).numpy() for x in (kld, same, dp))
    return dict(kld_mean=kld.mean(), kld_median=np.quantile(kld, 0.5),
                kld_p99=np.quantile(kld, 0.99), kld_max=kld.max(), same_top1=same.mean(),
                dp_mean=dp.mean(), dp_p01=np.quantile(dp, 0.01), dp_p99=np.quantile(dp, 0.99),
                n_tokens=len(kld))


def test_kld_statistics_match_float64(tiny):
    variant = mechq.quantize(tiny, "rtn", bits=2, group_size=128)
    ref = K.fp_reference(tiny, max_tokens=600)
    got = K.kld_stats(tiny, [variant], reference=ref, progress=False).iloc[0]
    want = _float64_reference(tiny, variant, ref.sequences)
    assert got["n_tokens"] == want["n_tokens"] == sum(len(s) - 1 for s in ref.sequences)
    assert want["kld_mean"] > 0.05  # 2-bit rounding moves the distribution (not a trivial 0)
    for stat, value in want.items():
        # float32 logits against float64 ones: log-softmax differences of ~1e-6 per token,
        # summed over a 672-token vocabulary, stay below 1e-5 nats (measured 6.5e-7)
        assert got[stat] == pytest.approx(value, abs=1e-5, rel=1e-4), stat


def test_fp_against_itself_is_zero(tiny):
    frame = K.kld_stats(tiny, [("fp-again", {})], max_tokens=300, progress=False)
    r = frame.iloc[0]
    # the same float32 model twice: identical logits up to batching order (measured 0)
    assert abs(r["kld_mean"]) < 1e-6 and r["same_top1"] == 1.0 and abs(r["dp_mean"]) < 1e-6
