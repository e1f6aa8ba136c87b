"""The XTREME metrics against hand-computed scores and, for entity F1, against seqeval itself."""
import random
import warnings

import pytest

from common.evaluation.metrics import (accuracy, iob2_entities, mlqa_normalize, qa_example_scores, qa_scores, span_f1,
                            squad_normalize)


# --- SQuAD v1.1 (XQuAD, TyDi QA) ---------------------------------------------------------------------

def test_squad_normalisation_lowercases_and_drops_punctuation_articles_and_extra_space():
    assert squad_normalize("  The Quick,  brown fox!! ") == "quick brown fox"
    assert squad_normalize("an apple a day") == "apple day"
    assert squad_normalize("theatre") == "theatre", "articles are whole words only"
    assert squad_normalize("«Paris»") == "«paris»", "SQuAD only removes ASCII punctuation"


def test_squad_f1_and_exact_match_by_hand():
    # prediction {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert qa_example_scores("the cat sat", ["A cat sat down"]) == pytest.approx((0.8, 0.0))
    assert qa_example_scores("The cat.", ["cat"]) == (1.0, 1.0)
    # repeated tokens count with multiplicity: "cat cat" against "cat" gives P = 1/2, R = 1
    assert qa_example_scores("cat cat", ["cat"])[0] == pytest.approx(2 / 3)
    assert qa_example_scores("dog", ["cat"]) == (0.0, 0.0)


def test_qa_takes_the_maximum_over_gold_answers_and_averages_in_percent():
    assert qa_example_scores("Paris", ["London", "paris."]) == (1.0, 1.0)
    assert qa_example_scores("new york city", ["new york", "york city state"]) == pytest.approx((0.8, 0.0))
    scores = qa_scores(["Paris", "the cat sat", "dog"], [["paris"], ["a cat sat down"], ["cat"]])
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    assert scores["exact_match"] == pytest.approx(100 / 3)


def test_empty_prediction_scores_zero():
    assert qa_example_scores("", ["cat"]) == (0.0, 0.0)


# --- MLQA ---------------------------------------------------------------------------------------------

def test_mlqa_removes_unicode_punctuation_and_the_answer_languages_articles():
    assert mlqa_normalize("«Bonjour»", "en") == "bonjour"
    assert mlqa_normalize("Der Hund", "de") == "hund"
    assert mlqa_normalize("el perro y la casa", "es") == "perro y casa"
    assert mlqa_normalize("The dog", "de") == "the dog", "articles of another language stay"
    assert mlqa_normalize("cái bàn", "vi") == "bàn"
    assert mlqa_normalize("الكتاب", "ar") == "كتاب"


def test_mlqa_segments_chinese_into_characters():
    assert mlqa_normalize("iPhone手机，很好", "zh") == "iphone 手 机 很 好"
    # prediction 北京大学 (4 characters) against gold 北京: P = 1/2, R = 1, F1 = 2/3
    f1, em = qa_example_scores("北京大学", ["北京"], mlqa_lang="zh")
    assert (f1, em) == (pytest.approx(2 / 3), 0.0)
    # the same strings under SQuAD's normalisation are single tokens: no overlap at all
    assert qa_example_scores("北京大学", ["北京"]) == (0.0, 0.0)


def test_mlqa_and_squad_differ_exactly_where_the_definitions_differ():
    assert qa_example_scores("Der Hund", ["Hund"], mlqa_lang="de") == (1.0, 1.0)
    assert qa_example_scores("Der Hund", ["Hund"]) == pytest.approx((2 / 3, 0.0))


def test_mlqa_rejects_a_language_its_script_does_not_define():
    with pytest.raises(ValueError, match="MLQA"):
        mlqa_normalize("text", "fr")


# --- accuracy ----------------------------------------------------------------------------------------

def test_accuracy_counts_invalid_label_words_as_wrong():
    assert accuracy(["entailment", "neutral", "banana"], ["entailment", "contradiction", "neutral"]) == \
        pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        accuracy(["a", "b"], ["a", "b", "c"])


# --- entity-level F1 ---------------------------------------------------------------------------------

def test_entities_by_hand():
    assert iob2_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert iob2_entities(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)], "a stray I- starts an entity"
    assert iob2_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert iob2_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    with pytest.raises(ValueError, match="IOB2"):
        iob2_entities(["B-PER", "X"])


def test_span_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O"]]
    # gold entities 3, predicted 2, correct 1: P = 1/2, R = 1/3, F1 = 0.4
    assert span_f1(gold, pred) == pytest.approx({"precision": 50.0, "recall": 100 / 3, "f1": 40.0})
    assert span_f1([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0, "a partial span is wrong"
    assert span_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0


def _random_sentence(rng, length):
    return [rng.choice(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]) for _ in range(length)]


def test_entities_and_span_f1_match_seqeval_on_random_sequences():
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    for trial in range(300):
        gold = [_random_sentence(rng, rng.randint(1, 12)) for _ in range(rng.randint(1, 6))]
        pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-LOC", "I-ORG"]) for t in s] for s in gold]
        for sentence in gold:
            assert iob2_entities(sentence) == get_entities(sentence), sentence
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when a sample has no predicted entity
            expected = {"precision": 100 * seqeval_metrics.precision_score(gold, pred),
                        "recall": 100 * seqeval_metrics.recall_score(gold, pred),
                        "f1": 100 * seqeval_metrics.f1_score(gold, pred)}
        assert span_f1(gold, pred) == pytest.approx(expected), (trial, gold, pred)
