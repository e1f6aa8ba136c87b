"""The XTREME task metrics, written from the official definitions. Every score is a percentage (0-100),
as XTREME, mT5 and the PRESENCE paper report them.

- XQuAD and TyDi QA-GoldP use the SQuAD v1.1 script: lowercase, drop ASCII punctuation, drop the English
  articles a/an/the, collapse whitespace; token-level F1 and exact match, the maximum over the gold answers.
- MLQA uses its own script (mlqa_evaluation_v1.py), the same recipe made language-aware: punctuation is every
  Unicode "P*" character, articles are removed per language, and Chinese is split into single CJK
  characters (mixed segmentation) so that F1 is character-level there.
- XNLI and PAWS-X: accuracy.
- WikiAnn/PAN-X: micro-averaged entity-level F1 over IOB2 tags on the original tokens, counted the way
  seqeval's default (non-strict) mode counts entities.
"""
from __future__ import annotations

import re
import string
import sys
import unicodedata
from collections import Counter
from typing import Sequence

# --- SQuAD v1.1 --------------------------------------------------------------------------------------

_SQUAD_PUNCTUATION = frozenset(string.punctuation)
_ENGLISH_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCTUATION)
    return " ".join(_ENGLISH_ARTICLES.sub(" ", text).split())


# --- MLQA --------------------------------------------------------------------------------------------

_UNICODE_PUNCTUATION = frozenset(
    chr(i) for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P")
) | _SQUAD_PUNCTUATION
_MLQA_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    # The official pattern for Arabic removes the prefix "ال" wherever it occurs, also inside words.
    "ar": re.compile("ال"),
    "hi": None,  # no articles
    "zh": None,
}
MLQA_LANGUAGES = tuple(sorted(_MLQA_ARTICLES))
_CJK = re.compile("[\u4e00-\u9fa5]")


def _mixed_segmentation(text: str) -> list[str]:
    """MLQA's Chinese tokenisation: every CJK character and punctuation mark is a token of its own; the
    text between them is split on whitespace."""
    tokens: list[str] = []
    pending = ""
    for ch in text:
        if _CJK.match(ch) or ch in _UNICODE_PUNCTUATION:
            tokens.extend(pending.split())
            pending = ""
            tokens.append(ch)
        else:
            pending += ch
    tokens.extend(pending.split())
    return tokens


def mlqa_normalize(text: str, lang: str) -> str:
    if lang not in _MLQA_ARTICLES:
        raise ValueError(f"MLQA's evaluation defines no normalisation for language {lang!r}; "
                         f"it covers {', '.join(MLQA_LANGUAGES)}")
    text = "".join(ch for ch in text.lower() if ch not in _UNICODE_PUNCTUATION)
    articles = _MLQA_ARTICLES[lang]
    if articles is not None:
        text = articles.sub(" ", text)
    tokens = _mixed_segmentation(text) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


# --- extractive QA scores ----------------------------------------------------------------------------

def _token_f1(prediction: list[str], gold: list[str]) -> float:
    overlap = sum((Counter(prediction) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_example_scores(prediction: str, golds: Sequence[str], mlqa_lang: str | None = None) -> tuple[float, float]:
    """(F1, exact match) of one prediction in [0, 1], each the maximum over the gold answers.
    mlqa_lang=None scores with SQuAD v1.1's normalisation; a language code with MLQA's."""
    if not golds:
        raise ValueError("a QA example needs at least one gold answer")
    normalize = squad_normalize if mlqa_lang is None else (lambda s: mlqa_normalize(s, mlqa_lang))
    pred = normalize(prediction)
    f1 = em = 0.0
    for gold in golds:
        norm_gold = normalize(gold)
        f1 = max(f1, _token_f1(pred.split(), norm_gold.split()))
        em = max(em, float(pred == norm_gold))
    return f1, em


def qa_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]], mlqa_lang: str | None = None) -> dict:
    """Corpus F1 and exact match (percent) as the official scripts report them."""
    _same_length(predictions, golds)
    pairs = [qa_example_scores(p, g, mlqa_lang) for p, g in zip(predictions, golds)]
    return {"f1": 100.0 * sum(f for f, _ in pairs) / len(pairs),
            "exact_match": 100.0 * sum(e for _, e in pairs) / len(pairs)}


# --- classification ----------------------------------------------------------------------------------

def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Percent of exact matches; a prediction that is not a valid label simply never matches."""
    _same_length(predictions, labels)
    return 100.0 * sum(p == g for p, g in zip(predictions, labels)) / len(labels)


# --- entity-level F1 (IOB2) --------------------------------------------------------------------------

def iob2_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities (type, first, last) of one IOB2 tag sequence, read leniently like seqeval's default mode:
    an I-X continues an entity only after B-X or I-X; after O or another type it starts a new one."""
    entities = []
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if tag == "O":
            prefix, tag_kind = "O", None
        elif len(tag) > 2 and tag[:2] in ("B-", "I-"):
            prefix, tag_kind = tag[0], tag[2:]
        else:
            raise ValueError(f"tag {tag!r} at position {i} is not IOB2 (O, B-TYPE or I-TYPE)")
        continues = prefix == "I" and kind == tag_kind
        if kind is not None and not continues:
            entities.append((kind, start, i - 1))
            kind = None
        if prefix != "O" and not continues:
            start, kind = i, tag_kind
    return entities


def span_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    """Micro precision, recall and F1 (percent) of exact entity matches over sentences of IOB2 tags."""
    _same_length(gold, predicted)
    n_gold = n_pred = n_correct = 0
    for sentence, (gold_tags, pred_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {sentence}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        gold_entities, pred_entities = set(iob2_entities(gold_tags)), set(iob2_entities(pred_tags))
        n_gold += len(gold_entities)
        n_pred += len(pred_entities)
        n_correct += len(gold_entities & pred_entities)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
    if not b:
        raise ValueError("no examples to score")
