"""A tiny random float64 T5 and brute-force references (one autograd pass per sample or microbatch),
shared by the self-influence, PRESENCE-step and data-parallel tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

VOCAB = 40


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and far slower when OpenMP threads compete for the
    cores with other processes. Import this fixture into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_t5(tied: bool = False, attn: str = "sdpa", seed: int = 0, dropout: float = 0.0) -> T5ForConditionalGeneration:
    """d_model 16 and vocab 40 make the output layer take the Gram ("ghost") form per sample and the
    16x16 blocks the per-sample-matrix form, so both paths of the engine are exercised."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=16, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                      d_kv=8, feed_forward_proj="gated-gelu", dropout_rate=dropout, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, attn_implementation=attn)
    model = T5ForConditionalGeneration(config).double()
    if not tied:  # transformers 5.x ties T5's output layer whatever the config says; untie as T5 v1.1
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight))
    return model


def tiny_batch(batch_size: int = 8, seed: int = 1) -> dict:
    """Padded inputs and -100-padded labels, so samples have different token counts."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch_size, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, VOCAB, (batch_size, 5), generator=g)
    for row in range(batch_size):
        attention_mask[row, 11 - row % 5:] = 0
        labels[row, 5 - row % 4:] = -100
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def loss_grads(model, batch: dict, params) -> list[torch.Tensor]:
    """Gradient of Hugging Face's loss on `batch` alone (zeros for unused parameters)."""
    grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def brute_force_scores(model, batch: dict, params, group_size: int = 1) -> torch.Tensor:
    return torch.stack([sum(g.square().sum() for g in loss_grads(model, part, params))
                        for part in split(batch, group_size)])


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
