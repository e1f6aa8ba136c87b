"""The model: a randomly initialised T5 v1.1 / mT5 encoder-decoder (or a model of another family,
common/families.py), the FLOP count used for throughput and MFU figures, and the finiteness check of its
tensors."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForSeq2SeqLM, PretrainedConfig, T5Config, T5ForConditionalGeneration

from transformers.utils import logging as hf_logging

from common.config import ModelConfig
from common.families import family_of, family_of_config, get_family

IGNORE_INDEX = -100  # the label Hugging Face's losses skip (padding); every label tensor here uses it

# Bucketed relative positions mean T5 has no position embeddings; these ids are T5's conventions
# (decoding starts from the pad id) and our tokenizer's.
PAD_ID, EOS_ID = 0, 1


class ModelFileError(ValueError):
    """A saved model whose weights cannot be read (a truncated or damaged file); the message names the file."""


def model_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    """The HF config: the hub's (e.g. google/mt5-base, for the paper preset) or one built from `cfg`."""
    if cfg.hub_config:
        config = AutoConfig.from_pretrained(cfg.hub_config)
        # mT5's embedding matrix is padded beyond its tokenizer (250,112 rows for 250,100 tokens)
        if config.vocab_size < vocab_size:
            raise ValueError(
                f"model.hub_config {cfg.hub_config} has vocab_size {config.vocab_size} but the tokenizer has "
                f"{vocab_size}. Fix: use the tokenizer that belongs to {cfg.hub_config} (data.tokenizer.kind: hub)"
            )
        config.dropout_rate = cfg.dropout_rate
        config.scale_decoder_outputs = cfg.tie_word_embeddings  # T5 v1.1 / mT5 do not rescale decoder outputs
        return config
    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        d_kv=cfg.d_kv,
        feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dropout_rate=cfg.dropout_rate,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def build_model(cfg: ModelConfig, vocab_size: int, positions: int = 512):
    """A freshly initialised model (the caller seeds torch first). mT5 configs give MT5ForConditionalGeneration,
    which is the same network as T5ForConditionalGeneration. A family with learned positions (GPT-2, BERT)
    gets `positions` of them: the data's row length."""
    family = get_family(cfg.family)
    if family.build_config is not None:
        return family.auto_class.from_config(family.build_config(cfg, vocab_size, positions))
    model = AutoModelForSeq2SeqLM.from_config(model_config(cfg, vocab_size))
    if not cfg.tie_word_embeddings:
        # transformers 5 always builds T5 with the output layer tied to the input embedding (its loader
        # unties only when a checkpoint holds different values). T5 v1.1 and mT5 have a separate output
        # layer; T5X initialises it with variance scaling over fan-in, N(0, 1/d_model), so that the first
        # logits have unit scale (HF's N(0, 1) gives logits of scale sqrt(d_model) and a huge first loss).
        std = model.config.initializer_factor * model.config.d_model ** -0.5
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * std)
        say_untied(model)
    return model


def say_untied(model) -> None:
    """Make the config say what the model is. transformers 5 sets tie_word_embeddings to true for every T5;
    saved so, transformers 4.x ties the output layer to the embedding again and rescales the decoder output
    (T5 v1.0's recipe) and computes other logits without a warning. google/mt5's configs say false."""
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        model.config.tie_word_embeddings = False


def parameter_counts(model) -> dict[str, int]:
    """Parameters per part: the embedding matrix is a lookup (no FLOPs), the output layer is a matmul. For
    T5: encoder, decoder, embedding, lm_head (0 when tied); for one-stack families: the lookups (token and
    position embeddings), the output layer when untied, and the rest as "blocks"."""
    family = family_of(model)
    if family.name != "t5":
        return _one_stack_counts(model, family)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    embedding = model.shared.weight.numel()
    lm_head = 0 if model.lm_head.weight is model.shared.weight else model.lm_head.weight.numel()
    encoder = count(model.encoder) - embedding
    decoder = count(model.decoder) - embedding
    return {"encoder": encoder, "decoder": decoder, "embedding": embedding, "lm_head": lm_head,
            "total": sum(p.numel() for p in model.parameters())}


def _one_stack_counts(model, family) -> dict[str, int]:
    named = dict(model.named_parameters())  # tied parameters once
    lookups = sum(p.numel() for n, p in named.items() if n.startswith(family.lookups))
    output = model.get_output_embeddings()
    tied = output is None or output.weight is model.get_input_embeddings().weight
    lm_head = 0 if tied else output.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"blocks": total - lookups - lm_head, "embedding": lookups, "lm_head": lm_head, "total": total}


def model_flops_per_sequence(model, input_length: int, target_length: int) -> float:
    """Training FLOPs of one sequence: 6 x matmul parameters x tokens, per stack (attention score
    FLOPs excluded), the usual model-FLOPs convention (Kaplan et al. 2020; Chowdhery et al. 2022's MFU). The
    output layer runs on target tokens. One-stack families run every parameter but the lookups, and the
    output layer (tied or not), on `input_length` tokens (`target_length` is T5's)."""
    counts = parameter_counts(model)
    if "blocks" in counts:
        output = model.get_output_embeddings()
        return 6.0 * (counts["blocks"] + (output.weight.numel() if output is not None else 0)) * input_length
    decoder_matmul = counts["decoder"] + (counts["lm_head"] or counts["embedding"])
    return 6.0 * (counts["encoder"] * input_length + decoder_matmul * target_length)


# A Hugging Face hub model id: owner/name, each part letters, digits, "_", "." or "-" (at most 96 characters)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def looks_like_hub_id(name: str) -> bool:
    """owner/name whose owner is no local folder; a name of any other form that does not exist is a
    mistyped path, which the hub client would retry for a minute before failing."""
    return (HUB_ID.fullmatch(name) is not None and "--" not in name and ".." not in name
            and not Path(name.split("/")[0]).is_dir())


def require_model(name: str, local_runs: list[Path], preset: str) -> None:
    """Fail at once, listing `local_runs`, when `name` is neither an existing folder nor a hub model id."""
    if Path(name).exists() or looks_like_hub_id(name):
        return
    runs = ", ".join(str(run) for run in local_runs) or "none"
    raise FileNotFoundError(f"--checkpoint {name}: no such folder, and not a hub model id (owner/name). Finished "
                            f"pre-training runs of preset {preset}: {runs}. Fix: pass one of these folders, or a hub "
                            "id such as google/mt5-small")


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: is every tensor's Euclidean norm finite, i.e. no NaN or
    inf, and no entries so large that the norm overflows (beyond ~1e19 in float32: a blow-up too)? No host
    sync: the caller reads it with something it syncs anyway. The L2 norms of all tensors are one fused
    kernel on a GPU, and on a CPU ten times faster than their max-norms (5.6 vs 0.55 ms for the tiny model's
    parameters and gradients, 870 vs 93 ms for the small model's, one thread)."""
    return torch.stack(torch._foreach_norm(tensors, 2)).isfinite().all()


def unreadable_weights(folder: str | Path) -> list[str]:
    """What keeps a saved model folder's weights from loading, one sentence per file (empty: none): no
    *.safetensors file, or one whose header does not describe the file (truncated, or not safetensors).
    Reads the headers only, not the tensors."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return [f"{Path(folder) / 'model.safetensors'} is missing"]
    problems = []
    for path in files:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            problems.append(f"{path} cannot be read ({err})")
    return problems


def load_pretrained(name_or_path, auto_class=None, dropout_rate: float | None = None, **config_overrides):
    """A saved model (a folder of ours, or a hub name such as google/mt5-base), with its family's Auto class
    or `auto_class` (a task head such as AutoModelForSequenceClassification, built on the pre-trained
    weights); `dropout_rate` sets each of the family's dropout fields. transformers 5 warns on
    every load that our untied output layer differs from the embedding it would tie it to, which is
    exactly what T5 v1.1 / mT5 want; only that warning is silenced (and, for a task head, the list of its
    new weights). A local folder whose weights are damaged is refused with ModelFileError, naming the file
    and the fix."""
    if Path(name_or_path).is_dir() and (problems := unreadable_weights(name_or_path)):
        raise ModelFileError(f"{problems[0]}: the model in {name_or_path} is truncated or damaged. Fix: "
                             f"{remake_model_fix(Path(name_or_path))}")
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        family = family_of_config(AutoConfig.from_pretrained(str(name_or_path)))
        if dropout_rate is not None:
            config_overrides.update(family.dropout(dropout_rate))
        model = (auto_class or family.auto_class).from_pretrained(str(name_or_path), **config_overrides)
    finally:
        hf_logging.set_verbosity(previous)
    say_untied(model)
    return model


def remake_model_fix(folder: Path) -> str:
    """How to get a damaged model folder back: a pre-training run's final/ is written again when the run
    is resumed from its checkpoint (presence_run.json names the run), anything else from its source."""
    info = folder / "presence_run.json"
    run = None
    if info.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            run = json.loads(info.read_text(encoding="utf-8"))["run_name"]
    if run is None:
        return "save or download the model again, or use another"
    return (f"write it again by resuming the pre-training run {run} (03_pretrain/pretrain.py with that run's "
            "arguments and --resume; a finished run rewrites final/ from its last checkpoint), or use another model")


def random_microbatches(batch_size: int, num_microbatches: int, input_length: int, target_length: int,
                        vocab_size: int, device: torch.device | str) -> list[dict]:
    """Benchmark inputs: uniformly random token ids in span-corrupted shapes, split into equal microbatches
    (ids 0 and 1 are pad and end-of-sequence, so every position is a real token)."""
    inputs = torch.randint(2, vocab_size, (batch_size, input_length), device=device)
    labels = torch.randint(2, vocab_size, (batch_size, target_length), device=device)
    mask = torch.ones_like(inputs)
    size = batch_size // num_microbatches
    return [{"input_ids": inputs[i:i + size], "attention_mask": mask[i:i + size], "labels": labels[i:i + size]}
            for i in range(0, batch_size, size)]


def random_batch(family: str, batch_size: int, length: int, target_length: int, vocab_size: int,
                 device: torch.device | str, generator: torch.Generator | None = None) -> dict:
    """Benchmark inputs of any family in Hugging Face's convention (input_ids, attention_mask, labels; -100:
    no loss): rows of `length` uniformly random tokens (no pad or EOS). Labels: T5 `target_length` random
    tokens; a causal LM the row itself (the model shifts it); BERT 15% of the positions (the first always),
    the rest -100."""
    shape = (batch_size, length)
    input_ids = torch.randint(2, vocab_size, shape, generator=generator)
    objective = get_family(family).objective
    if objective == "span-corruption":
        labels = torch.randint(2, vocab_size, (batch_size, target_length), generator=generator)
    elif objective == "masked-lm":
        chosen = torch.rand(shape, generator=generator) < 0.15
        chosen[:, 0] = True
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    else:
        labels = input_ids.clone()
    return {k: v.to(device) for k, v in
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}.items()}
