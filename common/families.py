"""Model families, one record each: the paper's encoder-decoder T5 (the default) and the decoder-only
(GPT-2, Llama) and encoder-only (BERT) models the field pre-trains.

A record says which Hugging Face class builds the model and how its config comes from the preset's model
fields (d_model, d_ff, num_layers, num_heads; T5 also num_decoder_layers, d_kv), its pre-training
objective, its layer set "first" (the first transformer block of each stack: what the paper's "first layer
of the encoder and of the decoder" means for a family with one stack), which of its parameters are lookups
(token and position embeddings: no FLOPs) and its special tokens. Objectives, on the same packed rows of
01_data:
- "span-corruption" (T5): inputs with spans replaced by sentinels, targets the spans (common/data/span_corruption.py);
- "next-token" (GPT-2, Llama): the row itself, every token predicted from those before it (HF shifts);
- "masked-lm" (BERT): 15% of the tokens chosen, 80% of them replaced by a mask token, 10% by a random token,
  10% left, and only those predicted (Devlin et al. 2019).

The layer set "first" leaves out the embeddings of every family: for T5 the first blocks own the relative
attention biases every layer adds; GPT-2's learned position embeddings (transformer.wpe) and BERT's
embeddings block (word, position and token-type embeddings and their LayerNorm) sit before block 0 and
are left out, as T5's token embedding is ("embeddings" selects the token embedding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, BertConfig, GPT2Config,
                          LlamaConfig, PretrainedConfig)

from common.config import ModelConfig
from common.data.tokenizer import EOS_ID, NUM_SENTINELS, PAD_ID

OBJECTIVES = ("span-corruption", "next-token", "masked-lm")


@dataclass(frozen=True)
class Family:
    name: str
    auto_class: type  # the Auto class a saved checkpoint loads with
    objective: str  # of OBJECTIVES
    first_blocks: tuple[str, ...]  # parameter-name prefixes of layer set "first"
    lookups: tuple[str, ...]  # parameter-name prefixes of lookup tables (no FLOPs)
    build_config: Callable[[ModelConfig, int, int], PretrainedConfig] | None  # (model fields, vocab, positions)
    dropout_fields: tuple[str, ...]  # the config fields model.dropout_rate sets (Llama has attention dropout only)

    def dropout(self, rate: float) -> dict[str, float]:
        """Config overrides that set this family's dropout to `rate` when a checkpoint is loaded."""
        return dict.fromkeys(self.dropout_fields, rate)


def _gpt2(cfg: ModelConfig, vocab_size: int, positions: int) -> PretrainedConfig:
    return GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                      n_head=cfg.num_heads, n_inner=cfg.d_ff, tie_word_embeddings=cfg.tie_word_embeddings,
                      resid_pdrop=cfg.dropout_rate,
                      embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.dropout_rate, bos_token_id=EOS_ID,
                      eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _llama(cfg: ModelConfig, vocab_size: int, positions: int) -> PretrainedConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_heads, max_position_embeddings=positions,
                       tie_word_embeddings=cfg.tie_word_embeddings, attention_dropout=cfg.dropout_rate,
                       bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _bert(cfg: ModelConfig, vocab_size: int, positions: int) -> PretrainedConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
                      max_position_embeddings=positions, type_vocab_size=1, hidden_dropout_prob=cfg.dropout_rate,
                      tie_word_embeddings=cfg.tie_word_embeddings,
                      attention_probs_dropout_prob=cfg.dropout_rate, pad_token_id=PAD_ID)


FAMILIES = (
    # T5's config is built in common/modeling.py (hub configs, the untied output layer of T5 v1.1 / mT5).
    Family("t5", AutoModelForSeq2SeqLM, "span-corruption", ("encoder.block.0", "decoder.block.0"), ("shared",), None,
           ("dropout_rate",)),
    Family("gpt2", AutoModelForCausalLM, "next-token", ("transformer.h.0",), ("transformer.wte", "transformer.wpe"),
           _gpt2, ("resid_pdrop", "embd_pdrop", "attn_pdrop")),
    Family("llama", AutoModelForCausalLM, "next-token", ("model.layers.0",), ("model.embed_tokens",), _llama,
           ("attention_dropout",)),
    Family("bert", AutoModelForMaskedLM, "masked-lm", ("bert.encoder.layer.0",), ("bert.embeddings.word_embeddings",
           "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"), _bert,
           ("hidden_dropout_prob", "attention_probs_dropout_prob")),
)
BY_NAME = {family.name: family for family in FAMILIES}
# Hugging Face's model_type of each family's config, to find a built or loaded model's family.
MODEL_TYPES = {"t5": "t5", "mt5": "t5", "gpt2": "gpt2", "llama": "llama", "bert": "bert"}


def get_family(name: str) -> Family:
    if name not in BY_NAME:
        raise ValueError(f"unknown model family {name!r}. Fix: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def family_of(model) -> Family:
    """The family of a Hugging Face model (or of the module behind torch.compile's wrapper)."""
    return family_of_config(getattr(model, "_orig_mod", model).config)


def family_of_config(config: PretrainedConfig) -> Family:
    """The family a Hugging Face config (built, or read from a saved model) belongs to."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"a {model_type!r} model is of no family here. Fix: use one of {', '.join(BY_NAME)}")
    return BY_NAME[MODEL_TYPES[model_type]]


def backbone(model):
    """The stack whose hidden states represent a model's input (verse retrieval, task heads): T5's encoder,
    the one stack of every other family (GPT-2's transformer, Llama's model, BERT's bert)."""
    if family_of(model).name == "t5":
        return model.get_encoder()
    return model.base_model


def mask_token_id(vocab_size: int) -> int:
    """BERT's [MASK]: the first sentinel id, which never occurs in text (the tokenizer's last id)."""
    return vocab_size - 1


def random_token_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the ordinary pieces a masked-LM row's random replacements are drawn from (after pad,
    EOS and UNK, before the sentinels)."""
    return 3, vocab_size - NUM_SENTINELS
