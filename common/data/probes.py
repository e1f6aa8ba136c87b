"""Probe sets for the self-influence analysis (the paper's section 2.1, Figure 1).

Conditions, per probe language:
  clean       held-out text (never pre-trained on): consecutive lines (verses, or mC4 lines) of one
              held-out document, as many as fit a token budget
  jumbled     the same samples with their word order permuted
and for English only:
  random      the clean English samples (random held-out English)
  mismatched  English of another domain: Python standard-library source (code, comments, docstrings),
              cut the same way, so that both sides have similar lengths

"Jumbled" per script: in languages written with spaces, whitespace-separated words are permuted
(punctuation moves with its word; the whitespace layout stays). Chinese and Japanese have no spaces
and no word segmenter is available offline, so:
  zh  characters are permuted (Chinese words are mostly one or two characters, and no rule finds
      their boundaries; breaking two-character words makes this a somewhat stronger corruption)
  ja  bunsetsu-like chunks are permuted: a run of kanji/katakana/other characters, the hiragana that
      follows it (particles, inflections) and any trailing punctuation, e.g.
      神は、実に、そのひとり子をお与えになった -> 神は、/ 実に、/ そのひとり / 子をお / 与えになった
"""
from __future__ import annotations

import math
import re
import sysconfig
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from common.data.span_corruption import compute_input_and_target_lengths, span_corrupted_example
from common.data.tokenizer import encode_texts, special_ids

CONDITIONS = ("clean", "jumbled", "random", "mismatched")
_HIRAGANA = "\u3040-\u309f"
_CJK_PUNCTUATION = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
_JA_CHUNK = re.compile(f"[^\\s{_HIRAGANA}{_CJK_PUNCTUATION}]*[{_HIRAGANA}]*[{_CJK_PUNCTUATION}]*")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def jumble_units(word: str, language: str) -> list[str]:
    """The units a whitespace-separated word is cut into before permuting."""
    if not word:
        return []
    if language == "zh":
        return list(word)
    if language == "ja":
        return [chunk for chunk in _JA_CHUNK.findall(word) if chunk]
    return [word]


def jumble(text: str, language: str, rng: np.random.Generator) -> str:
    """`text` with its units (see jumble_units) randomly permuted across the whole sample; the
    whitespace between words stays where it was, so the layout is kept."""
    pieces = re.split(r"(\s+)", text)
    words, separators = pieces[0::2], pieces[1::2]
    slots = [jumble_units(word, language) for word in words]
    units = [unit for slot in slots for unit in slot]
    shuffled = iter([units[i] for i in rng.permutation(len(units))])
    new_words = ["".join(next(shuffled) for _ in slot) for slot in slots]
    return "".join(word + separator for word, separator in zip(new_words, separators + [""]))


def pack_lines(token_counts: list[int], budget: int, min_tokens: float = 0) -> list[tuple[int, int]]:
    """Greedy runs [start, end) of consecutive lines holding at most `budget` tokens, keeping those of at
    least min_tokens. A line longer than the budget is a run of its own, cut to the budget later."""
    runs, start, total = [], 0, 0
    for i, count in enumerate(token_counts):
        if total and total + count > budget:
            runs.append((start, i, total))
            start, total = i, 0
        total += count
    if total:
        runs.append((start, len(token_counts), total))
    return [(s, e) for s, e, t in runs if t >= min_tokens]


def document_samples(documents: Iterable[tuple[str, str]], tokenizer, budget: int,
                     one_per_document: bool = False) -> list[dict]:
    """Candidate samples {"text", "source", "tokens"} of (source, text) documents. By default every run
    of lines with budget / 2 to budget tokens (Bible chapters, source files: a chapter's short tail
    would make a short sample); with one_per_document, each document's first run whatever its length
    (mC4: a random document cut to one row, as the paper's random mC4 samples)."""
    samples = []
    for source, text in documents:
        lines = [line for line in text.splitlines() if line.strip()]
        counts = [len(ids) for ids in encode_texts(tokenizer, lines)]
        runs = pack_lines(counts, budget, 0 if one_per_document else budget / 2)
        for start, end in runs[:1] if one_per_document else runs:
            sample = "\n".join(lines[start:end])
            tokens = sum(counts[start:end])
            if tokens > budget:  # one over-long line: keep its first `budget` tokens
                sample = tokenizer.decode(encode_texts(tokenizer, [sample])[0][:budget])
                tokens = budget
            samples.append({"text": sample, "source": f"{source}#lines={start + 1}-{end}", "tokens": tokens})
    return samples


def choose(samples: list[dict], n: int, rng: np.random.Generator, what: str) -> list[dict]:
    if len(samples) < n:
        raise ValueError(f"{what}: {len(samples)} probe samples available, {n} asked. Fix: lower "
                         "data.probe_samples_per_language or data.probe_max_tokens (shorter samples)")
    return [samples[i] for i in sorted(rng.choice(len(samples), size=n, replace=False))]


def stdlib_files() -> list[Path]:
    """Python standard-library sources, sorted (test suites and installed packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))


def mismatched_samples(tokenizer, n: int, budget: int, seed: int) -> list[dict]:
    """n samples of standard-library source, spread over as many files as possible: files are read in
    a seeded order, and samples are taken round-robin, one per file per round (seeded within a file),
    reading only as many files as about ceil(n / files) samples each need."""
    files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"no Python sources under {sysconfig.get_paths()['stdlib']}. Fix: the "
                                "domain-mismatched probes need the standard library's .py files")
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng([seed, 1])
    per_file = math.ceil(n / len(files))
    queues: list[list[dict]] = []
    for i in rng.permutation(len(files)):
        try:
            text = files[i].read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        candidates = document_samples([(f"stdlib/{files[i].relative_to(root)}", text)], tokenizer, budget)
        queues.append([candidates[j] for j in rng.permutation(len(candidates))])
        if sum(min(len(q), per_file) for q in queues) >= n:
            break
    picked = [q[r] for r in range(max(map(len, queues), default=0)) for q in queues if r < len(q)]
    if len(picked) < n:
        raise ValueError(f"the standard library gave {len(picked)} samples of up to {budget} tokens, {n} asked. "
                         "Fix: lower data.probe_samples_per_language")
    return picked[:n]


def span_corrupted_probes(texts: list[str], sample_ids: list[int], tokenizer, *, input_length: int, seed: int,
                          noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> dict[str, torch.Tensor]:
    """A batch of probe texts as padded span-corruption examples (labels -100 on padding), the way
    pre-training sees a row: the text's tokens and EOS, cut to one raw row, then corrupted. The noise
    of a sample is seeded by (seed, sample_id), so a clean sample and its jumbled twin of the same
    token count get the same noise positions."""
    ids = special_ids(tokenizer)
    raw_length, target_length = compute_input_and_target_lengths(input_length, noise_density, mean_noise_span_length)
    examples = []
    for tokens, sample_id in zip(encode_texts(tokenizer, texts), sample_ids):
        examples.append(span_corrupted_example(
            (list(tokens) + [ids["eos_id"]])[:raw_length], np.random.default_rng([seed, sample_id]),
            input_length=input_length, target_length=target_length, pad_id=ids["pad_id"], eos_id=ids["eos_id"],
            first_sentinel_id=ids["first_sentinel_id"], noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length))
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
