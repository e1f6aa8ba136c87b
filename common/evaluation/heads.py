"""Which Hugging Face task head fine-tunes a checkpoint of each one-stack family (GPT-2, Llama, BERT;
common/families.py) on each kind of XTREME task, built from the pre-trained weights with the head new.
T5 is not here: it is fine-tuned text-to-text (common/evaluation/finetuning.py).

- pair classification (XNLI, PAWS-X): AutoModelForSequenceClassification, one linear layer over one
  state: for GPT-2 and Llama the last non-padding token's, the only one that has read the whole input;
  for BERT the first token's through BERT's pooler (dense + tanh, new: a masked-LM checkpoint has none).
  Our inputs have no [CLS]: the first token is the task prefix's first piece, the same in every example,
  and BERT's attention in both directions lets it gather the pair as [CLS] does.
- NER (BERT): AutoModelForTokenClassification, dropout and a linear layer over every sub-word's final
  state, read at each word's first sub-word: the recipe of T5's EncoderTagger.
- QA (BERT): AutoModelForQuestionAnswering, start and end logits per token over (question, context).
"""
from __future__ import annotations

from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification

HEADS: dict[str, dict[str, type]] = {
    "gpt2": {"pair": AutoModelForSequenceClassification},
    "llama": {"pair": AutoModelForSequenceClassification},
    "bert": {"pair": AutoModelForSequenceClassification, "tagging": AutoModelForTokenClassification,
             "qa": AutoModelForQuestionAnswering},
}
# Why a causal LM is not fine-tuned on a task kind (what a reader sees in the log and the README)
CAUSAL_LEFT_OUT = {
    "tagging": "a causal LM's state at a word has read only the words before it, so its tag could not depend "
               "on the words that follow (the usual NER heads read both sides)",
    "qa": "a causal LM answers by generating the answer after the prompt, not by span extraction (whose start "
          "logit could not see the rest of the context); prompted generation for causal LMs is not built yet",
}


def head_class(family: str, kind: str) -> type | None:
    """The Auto class that fine-tunes `family` on task kind `kind` (pair, tagging, qa); None: left out."""
    return HEADS[family].get(kind)


def left_out_reason(family: str, kind: str) -> str:
    """Why `family` has no head for `kind` (only asked when head_class is None)."""
    return CAUSAL_LEFT_OUT[kind]
