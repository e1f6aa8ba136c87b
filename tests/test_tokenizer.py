"""The trained tokenizer loads with AutoTokenizer, follows T5's id layout, round-trips multilingual text
and encodes exactly as SentencePiece does; the hub path works with a local stand-in."""
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from tokenizers.models import Unigram
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from common.data.tokenizer import (encode_texts, load_tokenizer, special_ids, train_sentencepiece_tokenizer,
                              training_pieces)

VOCAB = 700
# Sentences written for the test in four scripts; the generator makes a few thousand varied lines.
WORDS = {
    "en": "the light was good and the water moved over the deep earth while people spoke".split(),
    "hi": "परमेश्‍वर ने आकाश और पृथ्वी की सृष्टि की तब जल के ऊपर अंधकार था".split(),
    "ru": "в начале сотворил Бог небо и землю земля же была безвидна и пуста".split(),
    "zh": ["起初", "神", "创造", "天地", "地", "是", "空虚", "混沌", "渊面", "黑暗", "。", "，"],
}
MIXED = "In the beginning — परमेश्‍वर ने आकाश, Бог небо 神创造天地。 ☃ 🙂 ümlaut 10:30"


def corpus_lines(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    for i in range(n):
        language = list(WORDS)[i % 4]
        words = rng.choice(WORDS[language], size=rng.integers(4, 14))
        yield ("" if language == "zh" else " ").join(words)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_sentencepiece_tokenizer(corpus_lines(), out, VOCAB, character_coverage=1.0)
    return out


def test_autotokenizer_loads_it_with_t5_ids(trained):
    tok = AutoTokenizer.from_pretrained(trained)
    assert len(tok) == VOCAB
    assert tok.convert_tokens_to_ids("<extra_id_0>") == VOCAB - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == VOCAB - 100
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("the light").input_ids[-1] == 1  # EOS appended, as T5 does
    assert special_ids(tok) == {"vocab_size": VOCAB, "pad_id": 0, "eos_id": 1, "first_sentinel_id": VOCAB - 1}


def test_round_trip_with_byte_fallback_for_unseen_characters(trained):
    tok = AutoTokenizer.from_pretrained(trained)
    ids = tok(MIXED, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids  # ☃, 🙂, ü were never seen: they become UTF-8 byte pieces
    assert tok.decode(ids) == MIXED
    assert tok.decode(tok("  spaced   out\nlines ").input_ids, skip_special_tokens=True) == "spaced out lines"


def test_sentencepiece_and_transformers_give_identical_ids(trained):
    texts = list(corpus_lines(seed=1, n=200)) + [MIXED, "  leading and  double  spaces\tand tabs\n"]
    processor = spm.SentencePieceProcessor(model_file=str(trained / "sentencepiece.model"))
    reference = processor.encode([" ".join(t.split()) for t in texts])
    tok = AutoTokenizer.from_pretrained(trained)
    assert tok(texts, add_special_tokens=False)["input_ids"] == reference
    assert encode_texts(load_tokenizer(trained), texts) == reference


def test_training_is_deterministic(trained, tmp_path):
    again = tmp_path / "again"
    train_sentencepiece_tokenizer(corpus_lines(), again, VOCAB, character_coverage=1.0)
    vocab = lambda d: json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab(again) == vocab(trained)


def test_vocabulary_too_small_for_the_characters_says_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece_tokenizer(corpus_lines(), tmp_path / "t", 370, character_coverage=1.0)
    assert not (tmp_path / "t").exists()


def test_hub_kind_loads_from_a_local_stand_in(trained, tmp_path):
    stand_in = tmp_path / "google-mt5-base"  # what a user would download from the hub
    shutil.copytree(trained, stand_in)
    (stand_in / "sentencepiece.model").unlink()
    tok = load_tokenizer(stand_in)
    assert special_ids(tok)["first_sentinel_id"] == VOCAB - 1
    with pytest.raises(OSError, match="prepare_data"):
        load_tokenizer(tmp_path / "missing")


def test_a_tokenizer_without_sentinels_is_rejected():
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("a", -1.0)]
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(Unigram(vocab, unk_id=2)), pad_token="<pad>",
                                    eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match="sentinels"):
        special_ids(plain)


def test_training_pieces_respect_the_length_limit():
    assert list(training_pieces("a b\n\n  c  ")) == ["a b", "c"]
    long_words = " ".join(["word"] * 500)
    pieces = list(training_pieces(long_words, max_chars=100))
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces) == long_words
    assert [len(p) for p in training_pieces("字" * 250, max_chars=100)] == [100, 100, 50]
