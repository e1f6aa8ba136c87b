"""Self-influence: TracIn with the current parameters only, SI_K(z) = ||grad_K loss(theta, z)||^2, the
squared gradient norm of an item z (a sample, or a microbatch of samples) restricted to a layer set K.

`self_influence` is the one definition: training per microbatch and per sample (common/presence/
presence_step.py) and the analyses (`batch_self_influence`, which 02_si_analysis and 03_pretrain's
scoring call) all take their scores from it. It reads them off whatever holds the items' gradients: the
microbatch-gradient rows a PRESENCE step materialises anyway, or a `GradTape` that forms per-sample
squared norms without per-sample gradients (common/presence/per_sample_grads.py).

Models: T5 / mT5 (what the pipeline trains), and the decoder-only (GPT-2, Llama) and encoder-only (BERT)
language models of Hugging Face, each with its own loss convention (`loss_convention`).

Layer sets (`layers`):
- "first" (default): the first transformer block of each stack (common/families.py): T5's encoder.block.0 +
  decoder.block.0, GPT-2's transformer.h.0, Llama's model.layers.0, BERT's bert.encoder.layer.0. For T5 the
  paper's "first layer of the encoder and of the decoder", read as the first transformer blocks; they own
  the relative attention biases, which every layer of their stack adds to its scores, so the biases'
  gradients collect every layer's use.
- "embeddings": the input token embedding (T5's `shared.weight`, which feeds both the encoder and the
  decoder). When the output layer is tied to it (transformers 5.x ties T5's output layer by default, see the
  report; GPT-2 and BERT tie theirs) its use as output layer is part of the same parameter and counts; an
  untied `lm_head` is not included (the paper says nothing about it; pass ["shared", "lm_head"] to include it).
- "all": every parameter that requires grad.
- a list of parameter-name prefixes, matched on whole dotted components ("encoder.block.1" does not match
  "encoder.block.10"); names include tied aliases, so "lm_head" selects the output layer tied or not.

Losses are Hugging Face's, `model(**batch).loss` on a batch in its convention (input_ids, attention_mask,
labels with -100 where no loss is taken): the mean token cross-entropy over the target tokens, i.e. the
labels != -100 that the model predicts (a causal LM predicts labels[:, 1:] from logits[:, :-1]; T5's
span corruption and BERT's masked LM predict every label). A sample's loss is the mean over its own target
tokens (what the model returns given that sample alone); a microbatch's loss is the mean over all of the
microbatch's target tokens. A sample without target tokens has loss 0 and self-influence 0 (Hugging Face
would return 0/0).

`batch_self_influence` scores a batch in one forward and one backward pass (common/presence/per_sample_grads.py); the
model is scored in the mode the caller set (train: with dropout, as in training; eval: deterministic).
During the pass no parameter requires grad (the tape's doing), so that autograd keeps no activation that only
a weight gradient would need; parameters, their .grad and requires_grad are left as they were, also when the
pass fails.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from common.config import LAYER_SETS
from common.families import family_of
from common.modeling import IGNORE_INDEX
from common.presence.per_sample_grads import GradTape

Layers = str | Sequence[str]


def eager(model: nn.Module) -> nn.Module:
    """The module behind torch.compile's wrapper (same parameters). Per-sample scores need forward hooks
    inside the model, which a compiled graph does not run, so they always run the eager model."""
    return getattr(model, "_orig_mod", model)


def layer_set(model: nn.Module, layers: Layers = "first") -> list[nn.Parameter]:
    """The parameters of layer set `layers` (see the module docstring), in model order, each once."""
    model = eager(model)
    if isinstance(layers, str):
        if layers == "all":
            prefixes = None
        elif layers == "first":
            prefixes = family_of(model).first_blocks
        elif layers == "embeddings":
            return [model.get_input_embeddings().weight]
        else:
            raise ValueError(f"unknown layer set {layers!r}. Fix: use one of {LAYER_SETS} or a list of "
                             "parameter-name prefixes")
    else:
        prefixes = tuple(prefix.rstrip(".") for prefix in layers)
    chosen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and (prefixes is None or any(name == x or name.startswith(x + ".") for x in prefixes)):
            chosen[p] = None
    if not chosen:
        raise ValueError(f"layer set {layers!r} selects no trainable parameter. Fix: check the prefixes "
                         "against model.named_parameters()")
    return list(chosen)


def loss_convention(model: nn.Module) -> str:
    """How `model(**batch).loss` pairs logits with labels: "seq2seq" (T5: the decoder reads the labels shifted
    right, logits[:, t] predicts labels[:, t]), "causal" (GPT-2, Llama: logits[:, t] predicts labels[:, t + 1],
    Hugging Face shifts inside) or "masked" (BERT: logits[:, t] predicts labels[:, t]). Read from Hugging
    Face's own tables of which class is a model type's causal or masked LM, not guessed from names."""
    model = eager(model)  # a compiled wrapper's class is no model class
    config = model.config
    if config.is_encoder_decoder:
        return "seq2seq"
    classes = {cls.__name__ for cls in type(model).__mro__}
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) in classes:
        return "causal"
    if MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(config.model_type) in classes:
        return "masked"
    raise NotImplementedError(f"{type(model).__name__} is neither an encoder-decoder nor Hugging Face's causal or "
                              "masked LM of its model type, so its loss convention is unknown. Fix: score its "
                              "causal-LM or masked-LM class")


def targets(model: nn.Module, batch: dict) -> torch.Tensor:
    """The labels `forward_logits` predicts, aligned with its logits: (B, T - 1) labels[:, 1:] for a causal
    LM, the labels otherwise. -100: no loss."""
    labels = batch["labels"]
    return labels[:, 1:] if loss_convention(model) == "causal" else labels


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of the targets (`targets(model, batch)`), (B, T_target, V), without Hugging Face's own loss.
    A causal LM's last position predicts nothing and is dropped, so that pairing these logits with the
    unshifted labels fails on the shapes rather than scoring the wrong tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    convention = loss_convention(model)
    if convention == "seq2seq":
        inputs.setdefault("decoder_input_ids", model.prepare_decoder_input_ids_from_labels(batch["labels"]))
    logits = model(**inputs).logits
    return logits[:, :-1] if convention == "causal" else logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every target token, 0 where labels == -100: (B, T). Computed in at least float32,
    as Hugging Face's loss is under autocast."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    losses = F.cross_entropy(logits.flatten(0, 1).to(dtype), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view_as(labels)


def group_losses(per_token: torch.Tensor, labels: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """The loss of each contiguous group of `group_size` samples: sum of its token losses / its number of
    target tokens. group_size 1: per-sample losses."""
    n_groups = labels.shape[0] // group_size
    counts = (labels != IGNORE_INDEX).reshape(n_groups, -1).sum(1)
    return per_token.reshape(n_groups, -1).sum(1) / counts.clamp(min=1)


class ItemGradients(Protocol):
    """Holds the loss gradient of each of n items (samples, groups of samples or microbatches)."""

    def squared_norms(self, params: Sequence[nn.Parameter], group_size: int = 1) -> torch.Tensor:
        """(n // group_size,) float64: the squared norm, on `params`, of each contiguous group's gradient."""


def self_influence(gradients: ItemGradients, layer_set: Sequence[nn.Parameter], group_size: int = 1) -> torch.Tensor:
    """SI_K of every item whose gradient `gradients` holds (or of each contiguous group of `group_size`
    items: the squared norm of the group's summed gradient), K = `layer_set`: a 1-D float64 tensor.

    The loss of a sample is the mean over its target tokens, that of a microbatch the mean over all of its
    target tokens (what the model returns given that item alone), as `gradients` was formed."""
    return gradients.squared_norms(layer_set, group_size)


def batch_self_influence(model: nn.Module, batch: dict, layers: Layers = "first", per: str = "sample",
                         microbatch_size: int | None = None, with_losses: bool = False):
    """Self-influence scores of `batch` (input_ids, attention_mask, labels): one per sample (per="sample")
    or one per contiguous microbatch of `microbatch_size` samples (per="microbatch"); a 1-D tensor on the
    model's device, float64. with_losses: (scores, the items' mean token losses) from the same forward."""
    batch_size = batch["input_ids"].shape[0]
    if per == "sample":
        if microbatch_size is not None:
            raise ValueError("microbatch_size is only used with per='microbatch'")
        group_size = 1
    elif per == "microbatch":
        if microbatch_size is None or microbatch_size < 1 or batch_size % microbatch_size:
            raise ValueError(f"per='microbatch' needs a microbatch_size that divides the batch size "
                             f"{batch_size}, got {microbatch_size}")
        group_size = microbatch_size
    else:
        raise ValueError(f"per must be 'sample' or 'microbatch', got {per!r}")
    model = eager(model)
    params = layer_set(model, layers)
    labels = targets(model, batch)
    with torch.enable_grad():
        with GradTape(model, params, batch_size) as tape:
            # the logits (B x T x vocabulary) get no name: the backward keeps only what the loss saved
            losses = group_losses(token_losses(forward_logits(model, batch), labels), labels, group_size)
        tape.backward(losses.sum())
    scores = self_influence(tape, params, group_size).detach()
    return (scores, losses.detach()) if with_losses else scores
