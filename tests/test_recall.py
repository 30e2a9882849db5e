"""Facts and recall: loading, targets, batching equivalence, accuracy on real models."""

import pandas as pd
import pytest

import mechq
from mechq import facts as F
from mechq.analysis.recall import accuracy, evaluate_recall


def test_bundled_facts_shape(facts):
    assert len(facts) >= 300
    assert len(facts.relations) >= 8
    per_rel = facts.to_frame().groupby("relation").size()
    assert per_rel.min() >= 20
    for f in facts:
        assert f.prompt.endswith(f.template.split("{subject}")[-1])
        assert f.subject in f.prompt and not f.prompt.endswith(" ")


def test_target_report_flags_rather_than_drops(facts, smol):
    rep = F.target_report(facts, smol.tokenizer)
    assert len(rep) == len(facts)
    assert set(rep["target_kind"]) <= {"single", "multi", "fragment"}
    paris = rep[rep.object == "Paris"].iloc[0]
    assert paris.target == " Paris" and paris.target_kind == "single"


def test_target_kinds():
    class Tok:  # the real tokenizers are tested above; this pins the classification rule
        def __init__(self, pieces):
            self.pieces = pieces

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(self.pieces[text])))}

        def decode(self, ids):
            return self.current[ids[0]]

    t = Tok({" Paris": [" Paris"], " Buenos Aires": [" Buenos", " Aires"], " Kyiv": [" K", "yiv"]})
    for obj, kind in [("Paris", "single"), ("Buenos Aires", "multi"), ("Kyiv", "fragment")]:
        t.current = t.pieces[" " + obj]
        assert F.target_token(t, obj)[2] == kind


def test_facts_csv_errors(tmp_path):
    rel = tmp_path / "relations.json"
    rel.write_text('[{"id": "capital", "name": "c", "template": "The capital of {subject} is"}]')
    bad = tmp_path / "facts.csv"
    bad.write_text("id,relation,subject,object\nx-1,currency,France,euro\n")
    with pytest.raises(ValueError, match="currency"):
        F.load_facts(bad, rel)
    rel.write_text('[{"id": "capital", "name": "c", "template": "The capital of {subject} is "}]')
    with pytest.raises(ValueError, match="trailing"):
        F.load_relations(rel)


def test_tiny_model_recalls_the_bundled_facts(tiny, facts):
    df = evaluate_recall(tiny, facts, progress=False)
    assert len(df) == len(facts)
    # FP tiny model: measured 404/404 correct, top-1 ahead of top-2 by >= 5.1 logits everywhere,
    # so float noise (~1e-5) flips no answer and the 5 % margin is spare.
    assert df["correct"].mean() >= 0.95
    # rank 1 exactly when correct; probabilities are probabilities
    assert ((df["target_rank"] == 1) == df["correct"]).all()
    assert df["target_prob"].between(0, 1).all()


def test_batched_equals_one_prompt_at_a_time(smol, facts):
    sub = facts.sample(12, seed=3)
    batched = evaluate_recall(smol, sub, batch_size=12, progress=False)
    single = evaluate_recall(smol, sub, batch_size=1, progress=False)
    # Exact correct/rank of the FP model are safe here: the nearest other logit is >= 1.7e-3
    # from the target (sport-017), top-1 leads top-2 by >= 2e-2, vs logit noise ~4e-5 measured
    # across thread counts and ISAs (|logits| <= 25).
    pd.testing.assert_series_equal(batched["correct"], single["correct"])
    pd.testing.assert_series_equal(batched["target_rank"], single["target_rank"])
    # float32, 30 layers, other batch shapes: probs differ by 6e-7 here and by up to 3e-6
    # between 1 and 2 threads. Was 1e-5; 1e-4 keeps 30x room, a padding bug gives > 1e-2.
    assert (batched["target_prob"] - single["target_prob"]).abs().max() < 1e-4
    # and both equal a plain unbatched forward of the HookedTransformer (measured 7e-7; as above)
    f = sub[0]
    probs = smol(f.prompt)[0, -1].softmax(-1)
    assert probs[batched.loc[0, "target_id"]].item() == pytest.approx(
        batched.loc[0, "target_prob"], abs=1e-4)


def test_smollm2_recall_and_rtn_cliff(smol, facts):
    sub = facts.sample(120, seed=0)
    w8 = mechq.quantize(smol, "rtn", bits=8, group_size=128)
    w2 = mechq.quantize(smol, "rtn", bits=2, group_size=128)
    df = evaluate_recall(smol, sub, [w8, w2], progress=False)
    acc = accuracy(df).set_index("variant")["accuracy"]
    # Measured (of 120): FP 64 correct (0.53), w8 66 (2 facts differ), w2 0. Only facts whose
    # top-1 leads top-2 by less than the logit noise (~4e-5) could flip on another CPU: none of
    # FP's or w8's lead by < 3e-3 (w2: 1.4e-3). So FP stays far above 0.25, w8 within 6 facts
    # of FP (4 to spare) and w2 at most 6 facts: margins, not exact counts.
    assert acc["fp"] >= 0.25, acc
    assert abs(acc["rtn-w8g128"] - acc["fp"]) <= 0.05
    assert acc["rtn-w2g128"] <= 0.05
    # the collapsed model's answers sit far down the ranking: median 19180 vs 1 measured
    med = df.groupby("variant")["target_rank"].median()
    assert med["rtn-w2g128"] > 50 * med["fp"]


def test_accuracy_intervals():
    df = pd.DataFrame(dict(variant=["a"] * 10, correct=[True] * 7 + [False] * 3,
                           target_rank=[1] * 7 + [5] * 3, target_prob=[0.5] * 10,
                           target_kind=["single"] * 10))
    a = accuracy(df).iloc[0]
    assert a.accuracy == pytest.approx(0.7) and a.n == 10 and a.n_correct == 7  # float64 mean
    assert a.ci_low < 0.7 < a.ci_high and 0 <= a.ci_low and a.ci_high <= 1


def test_evaluate_recall_rejects_bad_input(tiny, facts):
    with pytest.raises(ValueError, match="at least one fact"):
        evaluate_recall(tiny, facts[:0])
    with pytest.raises(TypeError, match="Variant"):
        evaluate_recall(tiny, facts[:3], variants=["w4"])
