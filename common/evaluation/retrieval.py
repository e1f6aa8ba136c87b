"""Parallel-sentence retrieval with encoder states, XTREME's Tatoeba protocol: embed each sentence as the
mean of its encoder hidden states over non-padding tokens, and count how often a sentence's nearest
neighbour (cosine similarity) in the other language is its translation. No fine-tuning is involved."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, length, dim] states -> [batch, dim] means over the positions where attention_mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def embed(encoder, tokenizer, texts: Sequence[str], layers: Sequence[int], batch_size: int, max_length: int,
          device: torch.device) -> dict[int, np.ndarray]:
    """Mean-pooled sentence vectors from the given entries of the encoder's hidden_states tuple
    (0: embeddings, i: block i, -1: the final, layer-normed encoder output)."""
    encoder.to(device).eval()
    vectors: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt").to(device)
        states = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=True).hidden_states
        for layer in layers:
            vectors[layer].append(mean_pool(states[layer].float(), batch.attention_mask).cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in vectors.items()}


def retrieval_accuracy(queries: np.ndarray, candidates: np.ndarray) -> float:
    """Percent of queries whose most cosine-similar candidate is the one at the same index."""
    if queries.shape != candidates.shape or len(queries) == 0:
        raise ValueError(f"queries {queries.shape} and candidates {candidates.shape} must be aligned and non-empty")
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(min=1e-12)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True).clip(min=1e-12)
    nearest = (q @ c.T).argmax(axis=1)
    return 100.0 * float((nearest == np.arange(len(q))).mean())
