"""The tokenizer: a SentencePiece unigram model trained here (kind "sentencepiece") or mT5's own from the
hub (kind "hub"). Either way every stage uses it through transformers.AutoTokenizer.

A trained tokenizer follows T5's conventions: pad = 0, EOS = 1, UNK = 2, byte fallback for characters
outside the vocabulary, and the 100 sentinels <extra_id_0> ... <extra_id_99> as the last 100 ids with
<extra_id_0> = vocab_size - 1 (sentinels count downward). SentencePiece trains the model; the folder
we save holds the same model as a `tokenizers` Unigram (tokenizer.json), because transformers 5
rebuilds a T5Tokenizer from spiece.model without byte fallback and cannot read spiece.model without
protobuf. The SentencePiece model is kept beside it (sentencepiece.model) for reference.

SentencePiece runs with the "identity" normalisation (no NFKC): the tokenizers pipeline then splits
exactly as SentencePiece does (tested), and full-width CJK punctuation survives a decode.

The saved tokenizer_config.json names the class and the sentinels the way transformers 4.x reads them too
(PortableTokenizer), so a checkpoint folder loads with AutoTokenizer under 4.x (>= 4.40) and 5.x alike.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from common.io import write_json

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SENTINELS = 100
MAX_TRAINING_PIECE_CHARS = 1000  # SentencePiece drops sentences over 4192 bytes; 1000 chars stay under it


def sentinel(k: int) -> str:
    return f"<extra_id_{k}>"


def training_pieces(text: str, max_chars: int = MAX_TRAINING_PIECE_CHARS) -> Iterator[str]:
    """A document as SentencePiece training sentences: its lines, whitespace collapsed, long ones cut
    at the last space before max_chars (or at max_chars in text without spaces)."""
    for line in text.splitlines():
        line = " ".join(line.split())
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            yield line[:cut]
            line = line[cut:].lstrip()
        if line:
            yield line


class PortableTokenizer(PreTrainedTokenizerFast):
    """A tokenizer.json tokenizer whose saved config every transformers from 4.40 on can read. transformers 5
    saves the class as "TokenizersBackend" and the sentinels as a list of "extra_special_tokens"; 4.x knows
    neither (AutoTokenizer fails, or reads the list as a mapping). Saved as PreTrainedTokenizerFast with
    "additional_special_tokens", both versions load the same tokenizer."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
        # 4.x's defaults differ: it would glue "and ." into "and." and return token_type_ids, which T5 rejects
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        config["model_input_names"] = list(self.model_input_names)
        write_json(path, config)
        return saved


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                                  character_coverage: float = 0.9995, seed: int = 0) -> PortableTokenizer:
    """Train a unigram model of vocab_size - 100 pieces on `texts`, add the sentinels, and save the
    tokenizer to out_dir (atomically: the folder appears complete or not at all)."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(piece for text in texts for piece in training_pieces(text)), model_writer=model,
            model_type="unigram", vocab_size=vocab_size - NUM_SENTINELS, character_coverage=character_coverage,
            byte_fallback=True, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            normalization_rule_name="identity", input_sentence_size=0, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training failed ({err}). Fix: raise data.tokenizer.vocab_size or lower "
                         "data.tokenizer.character_coverage (too many distinct characters for the vocabulary), "
                         "or give it more text (data.tokenizer.training_chars)") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokenizer = tokenizer_from_sentencepiece(processor)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer.save_pretrained(staging)
        (staging / "sentencepiece.model").write_bytes(model.getvalue())
        staging.chmod(0o755)  # mkdtemp makes it private; the tokenizer is an ordinary output folder
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def tokenizer_from_sentencepiece(processor: spm.SentencePieceProcessor) -> PortableTokenizer:
    """The SentencePiece model as a transformers tokenizer, with the sentinels appended in reverse."""
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    vocab += [(sentinel(k), 0.0) for k in reversed(range(NUM_SENTINELS))]
    backend = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=True))
    # SentencePiece's whitespace handling: collapse runs, mark every word start with "▁".
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", EOS_ID)])
    return PortableTokenizer(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                             additional_special_tokens=[sentinel(k) for k in range(NUM_SENTINELS)])


def load_tokenizer(name_or_dir: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained with errors that say what to do; checks T5's sentinel layout. A generic
    tokenizer.json tokenizer (ours) comes back as a PortableTokenizer, so that saving it again stays portable."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
        if type(tokenizer) is PreTrainedTokenizerFast:
            tokenizer = PortableTokenizer.from_pretrained(str(name_or_dir))
    except (OSError, ValueError) as err:
        local = Path(name_or_dir).exists() or str(name_or_dir).startswith((".", "/"))
        fix = ("run python 01_data/prepare_data.py for the preset" if local else
               f"the hub may be unreachable: save the tokenizer of {name_or_dir} into a folder "
               "and set data.tokenizer.hub_name to that folder")
        raise OSError(f"cannot load the tokenizer {name_or_dir} ({err}). Fix: {fix}") from None
    special_ids(tokenizer)
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """vocab_size, pad_id, eos_id and first_sentinel_id, after checking that <extra_id_k> = first - k."""
    first = tokenizer.convert_tokens_to_ids(sentinel(0))
    ids = [tokenizer.convert_tokens_to_ids(sentinel(k)) for k in range(NUM_SENTINELS)]
    if first is None or first == tokenizer.unk_token_id or ids != list(range(first, first - NUM_SENTINELS, -1)):
        raise ValueError("the tokenizer lacks T5's sentinels <extra_id_0..99> counting down from one id. Fix: use "
                         "a T5/mT5 tokenizer or data.tokenizer.kind=sentencepiece")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs pad and EOS tokens. Fix: use a T5/mT5 tokenizer")
    return {"vocab_size": len(tokenizer), "pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id,
            "first_sentinel_id": first}


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without EOS. For a tokenizer trained here SentencePiece itself encodes: it gives the same
    ids (tested) about 5x faster than the tokenizers Unigram, which matters for a whole corpus."""
    if not texts:
        return []
    model = Path(tokenizer.name_or_path) / "sentencepiece.model"
    if model.is_file():
        return _sentencepiece(str(model)).encode([" ".join(text.split()) for text in texts],
                                                 num_threads=os.cpu_count() or 1)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=4)
def _sentencepiece(model_file: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=model_file)
