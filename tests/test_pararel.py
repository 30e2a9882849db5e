"""Pararel: loading the original layout, prompt styles, robustness summary, recall subsets."""

import os
import re
from pathlib import Path

import pandas as pd
import pytest

import mechq
from mechq.analysis import paraphrase as PP
from mechq.facts import pararel as PR
from mechq.analysis import recall as R
from mechq.analysis.recall import evaluate_recall

REPO = Path(__file__).resolve().parents[1]
PARAREL = Path(os.environ.get("MECHQ_PARAREL", REPO.parent / "shared" / "pararel-dev"))
needs_pararel = pytest.mark.skipif(
    not (PARAREL / "data" / "pattern_data" / "graphs_json").is_dir(),
    reason=f"no Pararel checkout at {PARAREL}",
)


@pytest.fixture(scope="module")
def small():
    return PR.load_pararel(PARAREL, ["P36", "P27", "P140"], max_facts_per_relation=20, seed=0)


# --------------------------------------------------------------------------------------------
# Prompt construction (no data needed)
# --------------------------------------------------------------------------------------------


def test_templates_and_prompts():
    assert PR.primary_template("The capital of [X] is [Y] .") == "The capital of {subject} is"
    assert PR.primary_template("[X],  a subclass of [Y].") == "{subject}, a subclass of"
    assert PR.primary_template("[X] uses {braces} in [Y]").format(subject="A") == \
        "A uses {braces} in"
    with pytest.raises(ValueError):
        PR.primary_template("[Y] is the capital of [X].")
    assert PR.paraphrase_prompt("[X]'s capital is [Y].", "Chile") == ("Chile's capital is", True)
    prompt, last = PR.paraphrase_prompt("[Y] is the capital of [X] .", "Chile")
    assert not last and prompt == (
        "Based on your knowledge, complete the following sentence by filling in the blank: "
        "'___ is the capital of Chile.' The missing word is:"
    )
    # A subject that looks like a placeholder is inserted verbatim, once.
    assert PR.paraphrase_prompt("[X] is in [Y].", "[Y]") == ("[Y] is in", True)


# --------------------------------------------------------------------------------------------
# Loading the dev copy
# --------------------------------------------------------------------------------------------


@needs_pararel
def test_load_counts(small):
    assert len(small.facts) == 60 and small.facts.relations == ["P36", "P27", "P140"]
    info = small.relations
    assert {k: v["n_patterns"] for k, v in info.items()} == {"P36": 14, "P27": 9, "P140": 4}
    assert {k: v["pattern_index"] for k, v in info.items()} == {"P36": 0, "P27": 1, "P140": 2}
    assert info["P27"]["template"] == "{subject} is a citizen of"
    assert len(small.paraphrases) == 20 * (14 + 9 + 4)
    assert all(re.fullmatch(r"P\d+-\d{4}", f.id) for f in small.facts)
    # The full relation: 471 lines, one exact duplicate dropped.
    full = PR.load_pararel(PARAREL, "P36")
    assert len(full.facts) == 470 and full.relations["P36"]["n_duplicates"] == 1
    # Sub-sampling keeps ids and content of the full load, in file order.
    by_id = {f.id: f for f in full.facts}
    p36 = small.facts.filter("P36")
    assert all(by_id[f.id] == f for f in p36)
    assert [f.id for f in p36] == sorted(f.id for f in p36)
    again = PR.load_pararel(PARAREL, ["P36", "P27", "P140"], max_facts_per_relation=20, seed=0)
    assert [f.id for f in again.facts] == [f.id for f in small.facts]
    other = PR.load_pararel(PARAREL, ["P36"], max_facts_per_relation=20, seed=1)
    assert [f.id for f in other.facts] != [f.id for f in p36]


@needs_pararel
def test_all_dev_relations_load():
    pr = PR.load_pararel(PARAREL, max_facts_per_relation=3)
    assert len(pr.relations) == 19 and len(pr.facts) == 57
    for pid, info in pr.relations.items():
        assert info["template"].count("{subject}") == 1
        assert not info["template"].endswith((" ", ".", "[Y]"))


@needs_pararel
def test_primary_prompts_end_right_before_the_object(small):
    for f in small.facts:
        info = small.relations[f.relation]
        pattern = info["patterns"][info["pattern_index"]]
        filled = PR._fill(pattern, f.subject, f.object)
        assert filled.startswith(f.prompt + " " + f.object)
        assert filled[len(f.prompt) + 1 + len(f.object):] in ("", ".", " .")
        assert not f.prompt.endswith(" ")


@needs_pararel
def test_paraphrases_wrapped_when_object_not_last(small):
    df = small.paraphrase_frame()
    assert len(df) == len(small.paraphrases)
    assert df.groupby("fact_id").size().to_dict() == {
        f.id: small.relations[f.relation]["n_patterns"] for f in small.facts
    }
    for row in df.itertuples():
        if row.object_last:
            filled = PR._fill(row.pattern, row.subject, row.object)
            assert filled.startswith(row.prompt + " " + row.object)
        else:
            assert row.prompt.startswith("Based on your knowledge, complete the following")
            assert row.prompt.endswith("' The missing word is:")
            assert row.prompt.count("___") == 1 and row.subject in row.prompt
    primary = df[df.is_primary].set_index("fact_id")["prompt"]
    assert primary.to_dict() == {f.id: f.prompt for f in small.facts}
    # P27's first pattern "[X] is [Y] citizen." is wrapped; P140 has one object-last pattern.
    assert (~df[df.relation == "P140"].object_last).sum() == 20 * 3


def test_missing_path_and_relation(tmp_path):
    with pytest.raises(FileNotFoundError):
        PR.load_pararel(tmp_path)
    if PARAREL.is_dir():
        with pytest.raises(ValueError, match="P9999"):
            PR.load_pararel(PARAREL, ["P9999"])


# --------------------------------------------------------------------------------------------
# Robustness summary and subsets on hand-made frames
# --------------------------------------------------------------------------------------------


def _frame(spec):
    rows = []
    for variant, fact, rel, corrects in spec:
        for k, c in enumerate(corrects):
            rows.append(dict(variant=variant, fact_id=fact, relation=rel, pattern_index=k,
                             correct=bool(c), target_kind="single"))
    return pd.DataFrame(rows)


def test_robustness_summary_thresholds():
    df = _frame([
        ("fp", "a", "R1", [0, 0, 0]),     # none
        ("fp", "b", "R1", [1, 0, 0]),     # >=1
        ("fp", "c", "R1", [1, 1, 0]),     # >=1, majority
        ("fp", "d", "R2", [1, 1, 1]),     # all
        ("fp", "e", "R2", [1, 1, 0, 0]),  # exactly half: not a majority
        ("w4", "a", "R1", [1, 1, 1]),
        ("w4", "b", "R1", [0, 0, 0]),
    ])
    s = PP.robustness_summary(df).set_index("variant")
    # shares of a few booleans, in float64: pytest.approx's default rel=1e-6 is ample
    assert s.loc["fp", "n_facts"] == 5 and s.loc["fp", "n_paraphrases"] == 16
    assert s.loc["fp", "any_correct"] == pytest.approx(4 / 5)
    assert s.loc["fp", "majority_correct"] == pytest.approx(2 / 5)
    assert s.loc["fp", "all_correct"] == pytest.approx(1 / 5)
    assert s.loc["fp", "paraphrase_accuracy"] == pytest.approx(8 / 16)
    assert s.loc["w4", ["any_correct", "majority_correct", "all_correct"]].tolist() == [.5, .5, .5]
    r = PP.robustness_summary(df, by=["variant", "relation"]).set_index(["variant", "relation"])
    assert r.loc[("fp", "R1"), "any_correct"] == pytest.approx(2 / 3)
    assert r.loc[("fp", "R2"), "majority_correct"] == pytest.approx(1 / 2)
    assert r.loc[("fp", "R2"), "all_correct"] == pytest.approx(1 / 2)


def test_subsets_on_hand_made_recall_frame():
    rows = [("a", 1, 1), ("b", 1, 0), ("c", 0, 1), ("d", 0, 0), ("e", 1, 1), ("f", 1, 0)]
    rel = {"a": "R1", "b": "R1", "c": "R1", "d": "R2", "e": "R2", "f": "R2"}
    recs = []
    for fid, fp, w4 in rows:
        recs += [dict(variant="fp", bits=None, fact_id=fid, relation=rel[fid], correct=bool(fp)),
                 dict(variant="gptq-w4g128", bits=4, fact_id=fid, relation=rel[fid],
                      correct=bool(w4)),
                 dict(variant="gptq-w2g128", bits=2, fact_id=fid, relation=rel[fid],
                      correct=False)]
    df = pd.DataFrame(recs)
    s = R.subsets(df)  # picks the variant whose bits column says 4
    assert s["robust"] == {"a", "e"} and s["failure"] == {"b", "f"}
    assert s["fp_correct"] == {"a", "b", "e", "f"}
    s2 = R.subsets(df, reference="gptq-w2g128")
    assert s2["robust"] == set() and s2["failure"] == {"a", "b", "e", "f"}
    sizes = R.subset_sizes(df).set_index("relation")
    assert sizes.loc["all", ["n_facts", "fp_correct", "robust", "failure"]].tolist() == [6, 4, 2, 2]
    assert sizes.loc["R1", ["n_facts", "fp_correct", "robust", "failure"]].tolist() == [3, 2, 1, 1]
    assert sizes.loc["R2", "failure_rate"] == pytest.approx(0.5)  # float64 ratio of counts
    with pytest.raises(ValueError, match="reference"):  # two 4-bit variants: no default
        R.subsets(df.replace({"bits": {2: 4}}))
    labels = R.subset_labels(df)
    assert labels == {"a": "Robust", "b": "Failure", "c": "FP wrong", "d": "FP wrong",
                      "e": "Robust", "f": "Failure"}
    with pytest.raises(ValueError, match="not in the frame"):
        R.subsets(df, reference="awq-w4")


# --------------------------------------------------------------------------------------------
# A small real run
# --------------------------------------------------------------------------------------------


@needs_pararel
def test_evaluate_paraphrases_on_smollm2(smol):
    # P103 has 4 patterns, 2 of them wrapped: 40 prompts per variant keeps this fast on CPU.
    pr = PR.load_pararel(PARAREL, "P103", max_facts_per_relation=10, seed=0)
    w2 = mechq.quantize(smol, "rtn", bits=2, group_size=128)
    df = PP.evaluate_paraphrases(smol, pr, variants=[w2], progress=False)
    assert len(df) == 10 * 4 * 2
    assert df.groupby("variant")["object_last"].sum().tolist() == [20, 20]
    assert set(df["variant"]) == {"fp", w2.name}
    assert df["target_prob"].between(0, 1).all() and (df["target_rank"] >= 1).all()
    assert (df["correct"] == (df["target_rank"] == 1)).all()
    assert set(df["target_kind"]) <= {"single", "multi", "fragment"}
    # The primary paraphrase is exactly the recall prompt: same scores as evaluate_recall.
    rec = evaluate_recall(smol, pr.facts, progress=False).set_index("fact_id")
    prim = df[(df.variant == "fp") & df.is_primary].set_index("fact_id")
    # FP ranks compared exactly: the nearest other logit is >= 2.4e-2 from the target on these
    # prompts, vs ~4e-5 logit noise across CPUs.
    assert (prim.loc[rec.index, "target_rank"] == rec["target_rank"]).all()
    # float32, the primary prompts run in other batches (padded among paraphrases): measured
    # rel 1.7e-6; logit noise up to ~4e-5 moves a prob by rel <= 8e-5, which the old rel=1e-4
    # barely covered. 1e-3 does, and a wrong prompt or target is off by far more.
    assert prim.loc[rec.index, "target_prob"].to_numpy() == pytest.approx(
        rec["target_prob"].to_numpy(), rel=1e-3, abs=1e-7)
    # 2-bit RTN changes the model's answers (probs move by up to 0.34 here).
    fp, q = (df[df.variant == v].set_index(["fact_id", "pattern_index"]) for v in ("fp", w2.name))
    assert (fp["target_prob"] != q.loc[fp.index, "target_prob"]).any()
    s = PP.robustness_summary(df, by=["variant", "relation"])
    assert len(s) == 2 and (s["n_facts"] == 10).all()
    assert ((s["all_correct"] <= s["majority_correct"])
            & (s["majority_correct"] <= s["any_correct"])).all()
