"""Fine-tuning a pre-trained checkpoint on one XTREME task and predicting with it.

T5/mT5: classification and QA are text-to-text as in mT5: the input is a task prefix plus the text, the
target is a label word or the answer span, and predictions come from batched greedy decoding. NER uses a
linear token-classification head on the pre-trained encoder instead (see 04_finetune/README.md for why): it
predicts one IOB2 tag per original token, read at the token's first sub-word, as XTREME's baselines do.
The other families (GPT-2, Llama, BERT) are fine-tuned with Hugging Face's task heads on the same inputs
(common/evaluation/heads.py): a class index per pair, a tag per sub-word as above, an answer span.
Optimizer: Adafactor at a constant learning rate, as T5X fine-tunes mT5.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm
from transformers.modeling_outputs import TokenClassifierOutput

from common.adafactor import Adafactor
from common.evaluation.xtreme import NER_TAGS, PairExample, QAExample, TaggedSentence
from common.modeling import IGNORE_INDEX

# Label words the model generates. XNLI's labels are already words; PAWS-X's 0/1 are given names.
LABEL_WORDS = {"xnli": {"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction"},
               "pawsx": {"0": "different", "1": "paraphrase"}}


# --- text-to-text formatting -------------------------------------------------------------------------

def pair_input(task: str, example: PairExample) -> str:
    if task == "xnli":
        return f"xnli premise: {example.text_a} hypothesis: {example.text_b}"
    return f"pawsx sentence1: {example.text_a} sentence2: {example.text_b}"


def qa_input(example: QAExample) -> str:
    return f"question: {example.question} context: {example.context}"


def encode_text_to_text(tokenizer, inputs: Sequence[str], input_length: int, targets: Sequence[str] | None = None,
                        target_length: int | None = None) -> list[dict]:
    """Token ids per example (with labels when targets are given); inputs longer than input_length are cut at
    the end, keeping EOS."""
    input_ids = tokenizer(list(inputs), truncation=True, max_length=input_length).input_ids
    if targets is None:
        return [{"input_ids": ids} for ids in input_ids]
    labels = tokenizer(list(targets), truncation=True, max_length=target_length).input_ids
    return [{"input_ids": i, "labels": t} for i, t in zip(input_ids, labels)]


def qa_answer_fits(tokenizer, examples: Sequence[QAExample], input_length: int) -> list[bool]:
    """Whether the first gold answer survives truncation: the tokens of the input up to the answer's end
    (plus EOS) must fit in input_length."""
    prefixes = [f"question: {ex.question} context: {ex.context[: ex.answer_starts[0] + len(ex.answers[0])]}"
                for ex in examples]
    return [len(ids) <= input_length for ids in tokenizer(prefixes).input_ids]


def max_label_tokens(tokenizer, words: Sequence[str]) -> int:
    """Decoding steps a label word needs (EOS included): classification never needs target_length steps."""
    return max(len(ids) for ids in tokenizer(list(words)).input_ids)


# --- batching and training ---------------------------------------------------------------------------

TARGETS = ("labels", "start_positions", "end_positions")  # what a Hugging Face head's loss reads


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (attention mask 0 on padding) and label sequences (IGNORE_INDEX on padding);
    a target that is one number per example (a class, an answer's start or end) is stacked as it is."""
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.tensor([ex["input_ids"] + [pad_id] * (width - len(ex["input_ids"]))
                                        for ex in examples]),
             "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"]))
                                             for ex in examples])}
    for key in (key for key in TARGETS if key in examples[0]):
        if isinstance(examples[0][key], int):
            batch[key] = torch.tensor([ex[key] for ex in examples])
            continue
        label_width = max(len(ex[key]) for ex in examples)
        batch[key] = torch.tensor([ex[key] + [IGNORE_INDEX] * (label_width - len(ex[key])) for ex in examples])
    return batch


def batches_forever(examples: Sequence[dict], batch_size: int, seed: int, pad_id: int) -> Iterator[dict]:
    """Seeded reshuffle every epoch; the last incomplete batch of an epoch is dropped."""
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} training examples cannot fill one batch of {batch_size}. "
                         "Fix: lower finetune.batch_size or raise finetune.max_train_examples")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)


def train(model: nn.Module, batches: Iterator[dict], steps: int, lr: float, device: torch.device,
          bf16: bool = False, log_every: int = 100, desc: str = "fine-tune") -> dict:
    """Adafactor at a constant learning rate. T5X's defaults: decay rate 0.8, update clipping at 1.0, and
    updates scaled by each parameter's RMS ("multiply_by_parameter_scale"); no warm-up, no weight decay."""
    optimizer = Adafactor(model.parameters(), lr=lr, scale_parameter=True, decay_rate=-0.8, clip_threshold=1.0)
    model.to(device).train()
    losses, started = [], time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False, disable=None):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; lower finetune.lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            seconds = time.perf_counter() - started
            tqdm.write(f"{desc} | step {step} | loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                       f"| lr {lr:g} | {seconds / step:.3f} s/step")
    seconds = time.perf_counter() - started
    return {"steps": steps, "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "train_seconds": seconds, "steps_per_second": steps / seconds}


# --- prediction --------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, encoded: Sequence[dict], batch_size: int, max_new_tokens: int,
             device: torch.device, bf16: bool = False) -> list[str]:
    """Batched greedy decoding. Examples are batched by length (less padding) and returned in input order."""
    model.to(device).eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": encoded[i]["input_ids"]} for i in chunk], tokenizer.pad_token_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        for i, text in zip(chunk, tokenizer.batch_decode(output, skip_special_tokens=True)):
            texts[i] = text.strip()
    return texts


# --- NER: token classification on the encoder --------------------------------------------------------

class EncoderTagger(nn.Module):
    """The pre-trained encoder, dropout and a linear layer over its final states: one tag per sub-word."""

    def __init__(self, encoder: nn.Module, d_model: int, dropout_rate: float, num_tags: int = len(NER_TAGS)):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout_rate)
        self.classifier = nn.Linear(d_model, num_tags)

    def forward(self, input_ids, attention_mask, labels=None):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.classifier(self.dropout(states))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return TokenClassifierOutput(loss=loss, logits=logits)


def encode_tagged(tokenizer, sentences: Sequence[TaggedSentence], input_length: int) -> list[dict]:
    """Sub-word ids per sentence; the tag of each original token sits on its first sub-word (IGNORE_INDEX on the
    others). `first_subword[k]` is the position of token k, or None when truncation cut it off."""
    tag_id = {tag: i for i, tag in enumerate(NER_TAGS)}
    encoded = tokenizer([list(s.tokens) for s in sentences], is_split_into_words=True, truncation=True,
                        max_length=input_length)
    examples = []
    for index, sentence in enumerate(sentences):
        word_ids = encoded.word_ids(index)
        first_subword: list[int | None] = [None] * len(sentence.tokens)
        labels = [IGNORE_INDEX] * len(word_ids)
        for position, word in enumerate(word_ids):
            if word is not None and first_subword[word] is None:
                first_subword[word] = position
                labels[position] = tag_id[sentence.tags[word]]
        examples.append({"input_ids": encoded.input_ids[index], "labels": labels, "first_subword": first_subword})
    return examples


@torch.no_grad()
def batched_outputs(model: nn.Module, encoded: Sequence[dict], batch_size: int, pad_id: int, device: torch.device,
                    bf16: bool = False, order: Sequence[int] | None = None) -> Iterator[tuple[list[int], object]]:
    """A task head's output on the examples' input_ids, `batch_size` at a time in `order` (default: input
    order), padded by collate: (the batch's example indices, the model's output)."""
    model.to(device).eval()
    order = list(range(len(encoded))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": encoded[i]["input_ids"]} for i in chunk], pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        yield chunk, output  # outside autocast: the caller's own work is not cast


@torch.no_grad()
def predict_tags(model: nn.Module, encoded: Sequence[dict], batch_size: int, pad_id: int,
                 device: torch.device, bf16: bool = False) -> list[list[str]]:
    """One IOB2 tag per original token; tokens lost to truncation are tagged O (so they count as misses).
    `model`: an EncoderTagger, or any token-classification head that returns one row of logits per sub-word."""
    predictions = []
    for chunk, output in batched_outputs(model, encoded, batch_size, pad_id, device, bf16):
        for i, row in zip(chunk, output.logits.argmax(-1).cpu().tolist()):
            predictions.append([NER_TAGS[row[p]] if p is not None else "O" for p in encoded[i]["first_subword"]])
    return predictions


# --- sequence-pair classification with a head (GPT-2, Llama, BERT) -----------------------------------

@torch.no_grad()
def predict_classes(model: nn.Module, encoded: Sequence[dict], batch_size: int, pad_id: int,
                    device: torch.device, bf16: bool = False) -> list[int]:
    """The argmax class of a sequence-classification head per example, batched by length (less padding),
    in input order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    classes: list[int] = [0] * len(encoded)
    for chunk, output in batched_outputs(model, encoded, batch_size, pad_id, device, bf16, order):
        for i, best in zip(chunk, output.logits.argmax(-1).tolist()):
            classes[i] = best
    return classes
