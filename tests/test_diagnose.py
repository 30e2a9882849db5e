"""diagnose: weight signatures, format faults against a reference mismatch, intervals and
borderline verdicts, layer sets relative to depth, and the verdicts on real variants."""

import pandas as pd
import pytest
import torch

import mechq
from mechq.analysis.signatures import weight_signatures
from mechq.diagnosis import evidence as E
from mechq.diagnosis import verdict as D
from mechq.quant import faults

FAULTS = [faults.awq_order_as_gptq, faults.zero_point_off_by_one, faults.permuted_g_idx,
          faults.transposed_codes]


@pytest.fixture(scope="module")
def tiny_g32(tiny):
    # group size 32 gives the tiny model's 128-wide inputs 4 groups, so a permuted g_idx moves
    # channels between groups (with one group per row it would change nothing)
    return mechq.quantize(tiny, "rtn", bits=4, group_size=32)


@pytest.fixture(scope="module")
def other_tiny():
    """The tiny model with a fine-tune-sized delta on every linear weight: Gaussian noise of
    10 % of each matrix's standard deviation (seeded). Quantizing it and comparing with the
    unedited model is a reference mismatch."""
    model = mechq.load_model("tiny-gpt2", device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name.rsplit(".", 1)[-1] in ("W_Q", "W_K", "W_V", "_W_K", "_W_V",
                                                          "W_O", "W_in", "W_gate", "W_out"):
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    return model


def test_rounding_signatures_follow_their_definition(tiny, tiny_g32):
    w = weight_signatures(tiny, tiny_g32)
    assert len(w) == len(tiny_g32.modules)
    # round-to-nearest leaves an error uniform on [0, 0.5] steps: median 0.25; fp16 scales and
    # clipped extremes move each module's median by a few hundredths (measured 0.25-0.26)
    assert w["step_error"].between(0.2, 0.3).all()
    # nearest rounding puts no weight beyond half a step but for fp16 scales and clipping
    # (measured at most 1.1 % of a module's weights)
    assert (w["beyond_half"] < 0.05).all()
    # a group's rounding errors average out: |mean| over 32 weights is ~0.29/sqrt(32) = 0.05 steps
    assert (w["step_bias"] < 0.1).all()
    assert (w["cosine"] > 0.98).all()  # 4-bit rounding keeps weights close (measured >= 0.99)
    assert (w["error_corr"] < D.ERROR_CORR).all()  # measured at most 0.23
    assert D.suspect_modules(w).empty
    assert D.weight_verdict(w)[0] is None


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_format_faults_are_format_bugs(tiny, tiny_g32, fault):
    broken = fault(tiny_g32)
    w = weight_signatures(tiny, broken)
    bad = D.suspect_modules(w)
    assert len(bad), f"{broken.name}: no module flagged"
    assert D.weight_verdict(w)[0] == "format_bug"
    if fault is faults.transposed_codes:  # only square modules can be read transposed
        square = {m for m, p in tiny_g32.modules.items() if p.in_features == p.out_features}
        assert set(bad["module"]) <= square and square


def test_a_transposing_reader_cannot_misread_a_model_without_square_modules(tiny_g32):
    """Gemma 3 270M has no square linear module: transposed codes would not fit any shape, so
    the fault is refused by name instead of returning the variant unchanged as a "fault"."""
    from dataclasses import replace

    oblong = replace(tiny_g32, modules={m: p for m, p in tiny_g32.modules.items()
                                        if p.in_features != p.out_features})
    assert oblong.modules
    with pytest.raises(faults.FaultNotApplicable, match="no square module"):
        faults.transposed_codes(oblong)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_checkpoint_from_other_fp_weights_is_a_reference_mismatch(tiny, other_tiny, bits):
    variant = mechq.quantize(other_tiny, "rtn", bits=bits, group_size=32)
    w = weight_signatures(tiny, variant)
    verdict, reason, margin = D.weight_verdict(w)
    assert verdict == "reference_mismatch", reason
    assert margin >= 0 and "other FP weights" in reason
    # against the weights it was quantized from, the same checkpoint is honest
    assert D.weight_verdict(weight_signatures(other_tiny, variant))[0] is None


@pytest.mark.parametrize("fault", [faults.zero_point_off_by_one, faults.permuted_g_idx],
                         ids=lambda f: f.__name__)
def test_a_format_fault_on_top_of_a_mismatch_is_a_format_bug(tiny, other_tiny, fault):
    variant = fault(mechq.quantize(other_tiny, "rtn", bits=4, group_size=32))
    assert D.weight_verdict(weight_signatures(tiny, variant))[0] == "format_bug"


def test_diagnose_names_the_broken_module_and_shows_its_evidence(tiny, tiny_g32, facts):
    d = D.diagnose(tiny, faults.zero_point_off_by_one(tiny_g32), facts, n_facts=16, n_boot=50)
    assert d.verdict == "format_bug"
    assert "transformer.h." in d.reason and "checkpoint is read wrongly" in d.next_step
    assert list(d.evidence.columns) == ["signature", "value", "ci_low", "ci_high", "threshold",
                                        "crossed", "supports", "section", "definition"]
    assert list(d.evidence["signature"]) == list(E.SIGNATURES)
    assert d.worst_modules["step_bias"].min() > 0.9  # one whole step, up to fp16 scales


def test_diagnose_calls_rtn_w8_healthy_with_intervals(tiny, facts):
    d = D.diagnose(tiny, mechq.quantize(tiny, "rtn", bits=8), facts, n_facts=16, n_boot=200)
    assert d.verdict == "healthy" and d.borderline is None, d
    ev = d.evidence.set_index("signature")
    assert d.n_facts == 16 and "fewer than the 101" in d.reason  # the sample is too small
    measured = ev[ev["value"].notna()]
    # a percentile interval holds the point value up to the bootstrap's own resolution
    # (1/n_boot of the draws on either side): checked with a margin of one fact in 16
    assert ((measured["ci_low"] <= measured["value"] + 1 / 16)
            & (measured["value"] <= measured["ci_high"] + 1 / 16)).all()
    assert ev.loc["kld_mean", "value"] < D.HEALTHY_KLD  # 8-bit rounding: measured 2e-4 nats


def test_an_interval_across_a_threshold_makes_the_verdict_borderline():
    """The decision alone, on evidence frames written by hand (values chosen around the
    thresholds), with weights that are honest."""
    values = dict(recall=0.91, median_rank=1.0, kld_mean=0.01, same_top1=0.95,
                  failure_best_rank=1e-4, attn_jsd=0.01, sign_flip=0.05, topk_jaccard=0.8,
                  cka_min=0.95, first_layers_recall=1.0, injection_cosine=0.95)
    ok = pd.DataFrame(dict(module=["m"], cosine=[0.99], error_corr=[0.0], step_error=[0.25],
                           beyond_half=[0.0], step_bias=[0.01]))
    sure = D.evidence_frame(values, {k: (v, v) for k, v in values.items()})
    assert D.decide(sure, ok)[:3] == ("healthy", D.decide(sure, ok)[1], None)
    wide = {k: (v, v) for k, v in values.items()} | {"recall": (0.85, 0.95)}
    verdict, _, border, margin = D.decide(D.evidence_frame(values, wide), ok)
    assert verdict == "healthy" and "recall 0.9" in border and margin == 0
    # three collapse signatures crossed for sure and one straddling: 3 or 4 of 7 votes
    bad = values | dict(recall=0.3, kld_mean=0.8, attn_jsd=0.2, sign_flip=0.4,
                        topk_jaccard=0.05, cka_min=0.45)
    iv = {k: (v, v) for k, v in bad.items()} | {"cka_min": (0.4, 0.6)}
    verdict, _, border, _ = D.decide(D.evidence_frame(bad, iv), ok)
    assert verdict == "computation_collapse" and "cka_min 0.5" in border
    iv["cka_min"] = (0.4, 0.45)
    assert D.decide(D.evidence_frame(bad, iv), ok)[2] is None


def test_layer_sets_and_ranks_are_relative():
    # the first domino covers ~7 % of the depth and at least one layer
    assert [E.first_layers(n) for n in (4, 12, 18, 30, 100)] == [1, 1, 1, 2, 7]
    # "absent" is a share of the vocabulary: rank 98 of SmolLM2's, 524 of Gemma 3's
    assert int(D.ABSENT_SHARE * 49152) == 98 and int(D.ABSENT_SHARE * 262144) == 524


def test_bad_input(tiny):
    with pytest.raises(TypeError, match="Variant"):
        D.diagnose(tiny, "gptq-w4g128")
    with pytest.raises(ValueError, match="at least one fact"):
        D.diagnose(tiny, mechq.quantize(tiny, "rtn", bits=8), mechq.FactSet([], name="none"))


def test_smollm2_format_faults_are_caught(smol, smol_gptq):
    for v in smol_gptq.values():
        assert D.weight_verdict(weight_signatures(smol, v))[0] is None, v.name
    for fault in FAULTS:
        w = weight_signatures(smol, fault(smol_gptq[4]))
        assert D.weight_verdict(w)[0] == "format_bug", fault.__name__


def test_smollm2_verdicts(smol, smol_gptq, facts):
    # both widths on one sample: FP's activations and held-out reference are computed once
    d4, d2 = D.diagnose_many(smol, [smol_gptq[4], smol_gptq[2]], facts)
    assert d4.n_facts == D.N_FACTS  # SmolLM2 knows more than 128 of the bundled facts
    assert d4.verdict == "signal_degradation", d4
    assert d2.verdict == "computation_collapse" and d2.borderline is None, d2
