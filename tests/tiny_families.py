"""Tiny random float64 models of the families the per-sample engine supports (T5, GPT-2, Llama, BERT) and
padded batches in Hugging Face's own convention (labels -100 where no loss is taken), shared by the family
tests of self-influence and of the PRESENCE step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from common.config import ModelConfig
from common.modeling import build_model
from tiny_t5 import split, tiny_batch, tiny_t5

FAMILIES = ("t5", "gpt2", "gpt2-untied", "llama", "llama-tied", "bert", "bert-untied")
VOCAB = 1000
LENGTH = 12
MASK_ID = 3


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Hugging Face's GPT-2 and BERT tie their output layer to the input embedding, Llama does not unless
    "llama-tied"; "gpt2-untied" and "bert-untied" are what the pipeline builds (common.modeling.build_model,
    untied as its presets ask). T5 is tests/tiny_t5.py's untied model. Eval mode: GPT-2's and BERT's configs
    default to dropout."""
    if family == "t5":
        return tiny_t5()
    torch.manual_seed(seed)
    if family.endswith("-untied"):
        cfg = ModelConfig(family=family.split("-")[0], d_model=64, d_ff=128, num_layers=2, num_heads=4)
        model = build_model(cfg, VOCAB, positions=LENGTH)
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif family.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             tie_word_embeddings=family == "llama-tied", bos_token_id=0,
                                             eos_token_id=0, pad_token_id=0))
    elif family == "bert":
        model = BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, vocab_size=VOCAB))
    else:
        raise ValueError(family)
    return model.double().eval()


def family_batch(family: str, batch_size: int = 6, seed: int = 1) -> dict:
    """Right-padded rows of different lengths (attention_mask 0, labels -100 there). Causal LMs: labels are
    the input ids, and sample 1 also takes no loss on its first 5 tokens (a prompt). BERT: labels only at
    some masked positions of each row. T5: tests/tiny_t5.py's span-corruption batch."""
    if family == "t5":
        return tiny_batch(batch_size, seed)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch_size, LENGTH), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch_size):
        attention_mask[row, LENGTH - (3 * row) % 7:] = 0
    input_ids[attention_mask == 0] = 0
    if family.startswith("bert"):
        labels = torch.full_like(input_ids, -100)
        chosen = (torch.rand(input_ids.shape, generator=g) < 0.3) & (attention_mask == 1)
        chosen[:, 0] = True  # every row has a target
        labels[chosen] = input_ids[chosen]
        input_ids = input_ids.masked_fill(chosen, MASK_ID)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[1, :5] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_loss(family: str, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The mean token cross-entropy of `batch` in float64, written out here: Hugging Face's causal-LM loss
    casts the logits to float32, too coarse a reference for a float64 model. A causal LM predicts
    labels[:, 1:] from logits[:, :-1]; T5 and BERT predict every label at its own position."""
    inputs = {k: v for k, v in batch.items() if k != "labels" or family == "t5"}  # T5's decoder reads the labels
    logits, labels = model(**inputs).logits, batch["labels"]
    if family.split("-")[0] in ("gpt2", "llama"):
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def brute_force_scores(family: str, model: torch.nn.Module, batch: dict, params, group_size: int = 1) -> torch.Tensor:
    """||grad of reference_loss on params||^2 of each contiguous group of `group_size` samples, alone."""
    scores = []
    for part in split(batch, group_size):
        grads = torch.autograd.grad(reference_loss(family, model, part), params, allow_unused=True)
        scores.append(sum(g.square().sum() for g in grads if g is not None))
    return torch.stack(scores)
