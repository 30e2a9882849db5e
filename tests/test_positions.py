"""Token positions: the subject located in real tokenizations (SmolLM2, a word-level tokenizer)."""

from pathlib import Path

import pytest

from mechq.facts import DATA_DIR, Fact, FactSet
from mechq.engine.positions import Positions, locate, locate_fact, positions_frame, token_spans

# Hand-written facts with awkward subjects: punctuation, apostrophes, several words, the subject
# at the start, the subject repeated in the template, braces in the template, non-ASCII text.
TRICKY = FactSet([
    Fact("t-01", "capital", "France", "Paris", "The capital of {subject} is"),
    Fact("t-02", "born", "Wolfgang Amadeus Mozart", "Salzburg", "{subject} was born in"),
    Fact("t-03", "capital", "O'Higgins", "Rancagua", "{subject}'s capital city is"),
    Fact("t-04", "hq", "AT&T Inc.", "Dallas", "The headquarters of {subject} are in"),
    Fact("t-05", "located", "St. Louis", "Missouri", "{subject}, located in"),
    Fact("t-06", "capital", "France", "Paris", "France is big. The capital of {subject} is"),
    Fact("t-07", "code", "Japan", "JP", "The {{iso}} code of {subject} is"),
    Fact("t-08", "located", "São Paulo", "Brazil", "The city of {subject} lies in"),
    Fact("t-09", "capital", "東京都", "Japan", "{subject} is the capital of"),
    Fact("t-10", "born", "Jean-Paul Sartre (philosopher)", "Paris", "{subject} was born in"),
    Fact("t-11", "last", "Paris", "x", "The last word is {subject}"),
    Fact("t-12", "q", "U.S.", "Washington", "The capital of the {subject}, a country, is"),
], name="tricky")


def _fact_sets():
    sets = [TRICKY]
    if (DATA_DIR / "facts.csv").exists() and (DATA_DIR / "relations.json").exists():
        import mechq

        sets.append(mechq.bundled_facts())
    return sets


def _check(model, fact, pos: Positions):
    tok = model.tokenizer
    toks = model.to_tokens(fact.prompt)[0]
    assert pos.n_tokens == len(toks) and pos.last == pos.n_tokens - 1
    assert pos.has_bos == model.cfg.default_prepend_bos
    assert int(pos.has_bos) <= pos.subject_first <= pos.subject_last <= pos.last
    # Word-level tokenizers decode with a space between tokens: compare without spaces.
    subj = fact.subject.replace(" ", "")
    span = toks[pos.subject_first : pos.subject_last + 1].tolist()

    def text(ids):
        return tok.decode(ids).replace(" ", "")

    assert subj in text(span), (fact, tok.decode(span))
    # Minimal: dropping the first or the last subject token loses part of the subject.
    if len(span) > 1:
        assert subj not in text(span[1:]) and subj not in text(span[:-1])
    assert pos.relation == tuple(range(pos.subject_last + 1, pos.last))


def test_tricky_subjects_smollm2(smol):
    for fact in TRICKY:
        _check(smol, fact, locate_fact(smol, fact))


def test_all_fact_sets_smollm2(smol):
    for fs in _fact_sets():
        for fact in fs:
            pos = locate_fact(smol, fact)
            _check(smol, fact, pos)
            # locate() on the prompt agrees; token ids are the ones the model runs.
            again = locate(smol.tokenizer, fact.prompt, fact.subject, prepend_bos=True,
                           subject_char_start=fact.prompt.rfind(fact.subject)
                           if fact.id == "t-06" else None)
            assert again == pos
            ids, _ = token_spans(smol.tokenizer, fact.prompt)
            assert [smol.tokenizer.bos_token_id] + ids == smol.to_tokens(fact.prompt)[0].tolist()


def test_expected_positions_smollm2(smol):
    # <|im_start|> The capital of France is  -> 6 tokens
    p = locate_fact(smol, TRICKY[0])
    assert p == Positions(6, 4, 4, (), 5, has_bos=True)
    assert p.semantic() == dict(bos=0, prefix=[1, 2, 3], subject_first=4, subject_mid=[],
                                subject_last=4, relation=[], last=5)
    assert p.labels() == ["bos", "prefix", "prefix", "prefix", "subject_last", "last"]
    # Subject first: Mozart's three words (or more tokens), then "was born in".
    p = locate_fact(smol, TRICKY[1])
    assert p.subject_first == 1 and p.prefix == ()
    assert len(p.relation) == 2  # " was", " born"; " in" is last
    assert p.subject_mid == tuple(range(2, p.subject_last))
    # The repeated subject: the template's occurrence (the second "France").
    p6 = locate_fact(smol, TRICKY[5])
    first = locate(smol.tokenizer, TRICKY[5].prompt, "France", prepend_bos=True)
    assert first.subject_first == 1 and p6.subject_first > 5
    # Prompt ending in the subject: last == subject_last, no relation tokens.
    p = locate_fact(smol, TRICKY[10])
    assert p.last == p.subject_last and p.relation == () and p.labels()[-1] == "last"


def test_fallback_without_offsets_agrees(smol):
    for fact in TRICKY:
        start = fact.prompt.rfind(fact.subject) if fact.id == "t-06" else None
        a = locate(smol.tokenizer, fact.prompt, fact.subject, prepend_bos=True,
                   subject_char_start=start)
        b = locate(smol.tokenizer, fact.prompt, fact.subject, prepend_bos=True,
                   subject_char_start=start, use_offsets=False)
        assert a == b, fact


def test_missing_subject_raises(smol):
    with pytest.raises(ValueError, match="does not occur"):
        locate(smol.tokenizer, "The capital of France is", "Germany", prepend_bos=True)
    with pytest.raises(ValueError, match="does not occur at char"):
        locate(smol.tokenizer, "The capital of France is", "France", prepend_bos=True,
               subject_char_start=3)
    with pytest.raises(ValueError, match="empty"):
        locate(smol.tokenizer, "The capital of France is", " ", prepend_bos=True)


def test_positions_frame(smol):
    df = positions_frame(smol, TRICKY)
    assert list(df.columns) == ["fact_id", "relation", "n_tokens", "subject_first",
                                "subject_last", "relation_positions", "prefix_positions", "last"]
    assert len(df) == len(TRICKY) and (df["last"] == df["n_tokens"] - 1).all()
    row = df.set_index("fact_id").loc["t-01"]
    assert row.relation == "capital" and row.relation_positions == [] and row.subject_first == 4


def test_inconsistent_positions_rejected():
    with pytest.raises(ValueError):
        Positions(5, 3, 2, (), 4)
    with pytest.raises(ValueError):
        Positions(5, 1, 2, (3,), 3)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level fast tokenizer, like the tiny GPT-2 test model's (no byte-level merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "The capital of France is O ' Higgins s city , St . Louis located in".split()
    vocab = {"[UNK]": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", unk_token="[UNK]")


@pytest.mark.parametrize("use_offsets", [None, False])
def test_word_level_tokenizer(word_tokenizer, use_offsets):
    cases = [
        ("The capital of France is", "France", (3, 3, 5, 4)),
        ("O'Higgins's capital city is", "O'Higgins", (0, 2, 8, 7)),
        ("St. Louis, located in", "St. Louis", (0, 2, 6, 5)),
        ("The capital of Zanzibar is", "Zanzibar", (3, 3, 5, 4)),  # unknown word -> [UNK]
    ]
    for prompt, subject, (first, last_subj, n, last) in cases:
        p = locate(word_tokenizer, prompt, subject, prepend_bos=False, use_offsets=use_offsets)
        assert (p.subject_first, p.subject_last, p.n_tokens, p.last) == (first, last_subj, n,
                                                                           last), prompt
        pb = locate(word_tokenizer, prompt, subject, prepend_bos=True, use_offsets=use_offsets)
        assert pb.subject_first == first + 1 and pb.n_tokens == n + 1
        assert pb.has_bos and pb.prefix == tuple(range(1, first + 1))


def test_tiny_gpt2_if_present():
    from mechq.models.load import ASSETS

    if not (Path(ASSETS) / "tiny-gpt2").exists():
        pytest.skip("mechq/assets/tiny-gpt2 is not built yet")
    import mechq

    tiny = mechq.load_model("tiny-gpt2", device="cpu")
    fs = mechq.bundled_facts() if (DATA_DIR / "facts.csv").exists() else TRICKY[:2]
    for fact in fs:
        _check(tiny, fact, locate_fact(tiny, fact))
