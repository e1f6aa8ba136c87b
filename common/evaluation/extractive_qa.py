"""Extractive QA with a span head (BERT, common/evaluation/heads.py): each (question, context) pair is
encoded with its characters' offsets, the first gold answer's first and last token are the training
targets, and a prediction is the best-scoring span of context tokens, cut from the context's own text."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.evaluation.finetuning import batched_outputs
from common.evaluation.xtreme import QAExample

MAX_ANSWER_TOKENS = 30  # the longest span predicted (max_answer_length of the SQuAD baselines)


def encode_spans(tokenizer, examples: Sequence[QAExample], input_length: int) -> list[dict]:
    """Per example: the ids of (question, context) in the tokenizer's pair format, cut to input_length
    tokens (the longer of the two first: the context, but for a question longer than its context); the
    context's character span of every token (None outside the context); and, when the first gold answer
    lies wholly within the context tokens kept, its first and last token as start_positions and
    end_positions (None when truncation cut it off)."""
    encoded = tokenizer([ex.question for ex in examples], [ex.context for ex in examples], truncation="longest_first",
                        max_length=input_length, return_offsets_mapping=True)
    rows = []
    for index, example in enumerate(examples):
        offsets = [tuple(span) if sequence == 1 else None
                   for span, sequence in zip(encoded["offset_mapping"][index], encoded.sequence_ids(index))]
        in_context = [(t, span) for t, span in enumerate(offsets) if span is not None]
        first = example.answer_starts[0]
        last = first + len(example.answers[0])
        start = end = None
        if in_context and in_context[-1][1][1] >= last:  # the answer's last character was kept
            start = next(t for t, (_, right) in in_context if right > first)
            end = max(t for t, (left, _) in in_context if left < last)
        rows.append({"input_ids": encoded.input_ids[index], "offsets": offsets, "start_positions": start,
                     "end_positions": end})
    return rows


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, in_context: torch.Tensor,
              max_tokens: int = MAX_ANSWER_TOKENS) -> tuple[int, int]:
    """(first, last) token of the span of context tokens with the highest start + end logit, first <= last
    < first + max_tokens. One example: (T,) logits, a (T,) bool mask of context tokens (at least one)."""
    scores = start_logits[:, None] + end_logits[None, :]
    positions = torch.arange(len(start_logits))
    allowed = ((positions[None, :] >= positions[:, None]) & (positions[None, :] < positions[:, None] + max_tokens)
               & in_context[:, None] & in_context[None, :])
    best = scores.masked_fill(~allowed, float("-inf")).flatten().argmax().item()
    return divmod(best, len(start_logits))


@torch.no_grad()
def predict_spans(model: nn.Module, encoded: Sequence[dict], contexts: Sequence[str], batch_size: int, pad_id: int,
                  device: torch.device, bf16: bool = False) -> list[str]:
    """The predicted answer text of each example: its best span (best_span), cut from its context."""
    answers = []
    for chunk, output in batched_outputs(model, encoded, batch_size, pad_id, device, bf16):
        for row, i in enumerate(chunk):
            ex = encoded[i]
            length = len(ex["input_ids"])
            in_context = torch.tensor([span is not None for span in ex["offsets"]])
            if not in_context.any():  # truncation kept no context token
                answers.append("")
                continue
            first, last = best_span(output.start_logits[row, :length].float().cpu(),
                                    output.end_logits[row, :length].float().cpu(), in_context)
            context = contexts[i]
            answers.append(context[ex["offsets"][first][0]:ex["offsets"][last][1]].strip())
    return answers
