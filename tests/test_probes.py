"""Probe sets: jumbling permutes the documented units and nothing else, samples respect the token
budget, the mismatched domain is standard-library source, and probes become padded T5 examples."""
from collections import Counter
import re

import numpy as np
import pytest

from common.data.probes import (choose, document_samples, jumble, jumble_units, mismatched_samples, pack_lines,
                           span_corrupted_probes)
from common.modeling import IGNORE_INDEX
from common.data.tokenizer import train_sentencepiece_tokenizer

ENGLISH = "So Boaz took Ruth, and she became his wife;\nand he went in to her, and she bore a son."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the a code def return self value import in to and she he was light water 神 天 地 之".split()
    words += ["".join(rng.choice(list("abcdefghijklmnoprstuvw"), size=rng.integers(2, 9))) for _ in range(3000)]
    lines = (" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(3000))
    return train_sentencepiece_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer", 600)


def test_english_jumble_permutes_words_and_keeps_the_layout():
    out = jumble(ENGLISH, "en", np.random.default_rng(0))
    assert out != ENGLISH
    assert Counter(out.split()) == Counter(ENGLISH.split())
    assert re.findall(r"\s+", out) == re.findall(r"\s+", ENGLISH)  # the newline stays where it was
    assert out == jumble(ENGLISH, "en", np.random.default_rng(0))


def test_chinese_jumble_permutes_characters():
    text = "起初，神创造天地。\n地是空虚混沌。"
    out = jumble(text, "zh", np.random.default_rng(1))
    assert Counter(out) == Counter(text) and out != text
    assert [len(line) for line in out.splitlines()] == [9, 7]


def test_japanese_is_cut_into_bunsetsu_like_chunks():
    # by hand: kanji/katakana run + following hiragana + trailing punctuation
    assert jumble_units("神は、実に、そのひとり子をお与えになった", "ja") == ["神は、", "実に、", "そのひとり", "子をお", "与えになった"]
    text = "神は、実に、そのひとり子をお与えになった。それは御子を信じる者が滅びないためである。"
    out = jumble(text, "ja", np.random.default_rng(0))
    assert Counter(jumble_units(out, "ja")) != Counter() and sorted(out) == sorted(text) and out != text


def test_pack_lines_by_hand():
    # counts 3 4 | 5 | 9 (alone, over the budget) | 2 (a tail under min_tokens, dropped)
    assert pack_lines([3, 4, 5, 9, 2], budget=8, min_tokens=4) == [(0, 2), (2, 3), (3, 4)]
    assert pack_lines([3, 4, 5, 9, 2], budget=8) == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_document_samples_fit_the_budget(tokenizer):
    text = "\n".join(["the light was in the water and she was"] * 30 + ["a " * 200])
    samples = document_samples([("doc://1", text)], tokenizer, budget=40)
    assert samples and all(20 <= s["tokens"] <= 40 for s in samples)
    for s in samples:
        assert len(tokenizer(s["text"], add_special_tokens=False).input_ids) <= 40
    assert samples[0]["source"].startswith("doc://1#lines=1-")
    short = [("doc://2", "just one line"), ("doc://3", text)]
    firsts = document_samples(short, tokenizer, budget=40, one_per_document=True)
    assert [s["source"].split("#")[0] for s in firsts] == ["doc://2", "doc://3"]
    assert firsts[1]["text"] == samples[0]["text"]
    with pytest.raises(ValueError, match="probe_samples_per_language"):
        choose(samples, len(samples) + 1, np.random.default_rng(0), "test")


def test_mismatched_samples_are_standard_library_source(tokenizer):
    samples = mismatched_samples(tokenizer, n=4, budget=60, seed=0)
    assert len(samples) == 4 and len({s["source"].split("#")[0] for s in samples}) == 4  # one per file
    assert all(s["source"].startswith("stdlib/") and "/test/" not in s["source"] for s in samples)
    assert all(30 <= s["tokens"] <= 60 for s in samples)
    assert samples == mismatched_samples(tokenizer, n=4, budget=60, seed=0)


def test_probe_examples_are_padded_and_twins_share_noise(tokenizer):
    clean = "the light was in the water and she was the code"
    jumbled = jumble(clean, "en", np.random.default_rng(3))
    batch = span_corrupted_probes([clean, jumbled, "a"], [7, 7, 8], tokenizer, input_length=32, seed=0)
    assert batch["input_ids"].shape == (3, 32) and batch["labels"].shape[0] == 3
    assert ((batch["labels"] == IGNORE_INDEX) == (batch["labels"] < 0)).all()
    n_in = batch["attention_mask"].sum(dim=1)
    assert (batch["input_ids"][0, n_in[0]:] == 0).all()
    sentinel = batch["input_ids"] >= len(tokenizer) - 100
    assert n_in[0] == n_in[1] and (sentinel[0] == sentinel[1]).all()  # same length and seed -> same noise
