"""Model families as data (common/families.py): each record builds its model, names blocks and lookups
that exist, and its objective's batches are what the objective says."""
import numpy as np
import pytest
import torch

from common.config import MODEL_FAMILIES, ConfigError, load_preset
from common.data.packed_data import MASK_SHARE, MASKED_SHARE, RANDOM_SHARE, objective_batch
from common.families import BY_NAME, family_of, mask_token_id, random_token_range
from common.modeling import IGNORE_INDEX, build_model, model_flops_per_sequence, parameter_counts, random_batch

PRESETS = {"t5": "tiny", "gpt2": "presets/variants/tiny_gpt2.yaml", "llama": "presets/variants/tiny_llama.yaml",
           "bert": "presets/variants/tiny_bert.yaml"}


def test_the_config_knows_every_family():
    assert MODEL_FAMILIES == tuple(BY_NAME)
    with pytest.raises(ConfigError, match="model.family: unknown family 'rwkv'"):
        load_preset("tiny", ["model.family=rwkv"])


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_each_family_builds_its_model_with_the_blocks_and_lookups_it_names(name):
    preset = load_preset(PRESETS[name])
    model = build_model(preset.model, 4000, 141)
    family = family_of(model)
    assert family.name == name and isinstance(model, family.auto_class._model_mapping[type(model.config)])
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for prefix in family.first_blocks + family.lookups:
        assert any(n.startswith(prefix + ".") for n in names), prefix
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert 0.5e6 < counts["total"] < 0.8e6  # about tiny's 0.71M


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_the_dropout_fields_are_exactly_those_the_preset_s_dropout_rate_sets(name):
    """A fine-tuning dropout override must reach the same fields as pre-training's model.dropout_rate."""
    built = build_model(load_preset(PRESETS[name], ["model.dropout_rate=0.25"]).model, 4000, 141).config
    default = build_model(load_preset(PRESETS[name], ["model.dropout_rate=0.0"]).model, 4000, 141).config
    changed = {k for k, v in built.to_dict().items() if v != default.to_dict().get(k)}
    assert changed == set(BY_NAME[name].dropout_fields)
    assert BY_NAME[name].dropout(0.1) == dict.fromkeys(BY_NAME[name].dropout_fields, 0.1)


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_random_benchmark_batches_follow_each_family_s_label_convention(name):
    batch = random_batch(name, 64, 20, 5, 300, "cpu", torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (64, 20) and batch["attention_mask"].all() and ids.min() >= 2 and ids.max() < 300
    chosen = labels != IGNORE_INDEX
    if name == "t5":
        assert labels.shape == (64, 5) and chosen.all()
    elif name == "bert":  # 15% of the positions, the first always, each the token at its place
        assert chosen[:, 0].all() and chosen[:, 1:].float().mean() == pytest.approx(0.15, abs=0.03)
        assert torch.equal(labels[chosen], ids[chosen])
    else:  # the row itself: Hugging Face's causal-LM loss shifts it
        assert torch.equal(labels, ids)


def test_one_stack_flops_are_six_times_matmul_parameters_times_tokens():
    model = build_model(load_preset(PRESETS["llama"]).model, 4000, 141)  # untied: lm_head counted once
    lookups = model.model.embed_tokens.weight.numel()
    matmuls = sum(p.numel() for p in model.parameters()) - lookups
    assert model_flops_per_sequence(model, 141, 29) == 6.0 * matmuls * 141


def test_next_token_batches_predict_the_rows_themselves():
    tokens = np.arange(20, dtype=np.uint16).reshape(2, 10) + 5
    batch = objective_batch(tokens, "next-token", np.random.default_rng(0), 4000)
    assert torch.equal(batch["input_ids"], torch.from_numpy(tokens.astype(np.int64)))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()


def test_masked_lm_batches_follow_the_80_10_10_recipe():
    vocab = 4000
    tokens = np.random.default_rng(1).integers(3, 3900, (400, 141)).astype(np.uint16)
    batch = objective_batch(tokens, "masked-lm", np.random.default_rng(2), vocab)
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) >= 1).all()
    assert chosen.mean() == pytest.approx(MASKED_SHARE, abs=0.01)
    assert np.array_equal(labels[chosen], tokens[chosen])  # what is predicted is the original token
    assert np.array_equal(inputs[~chosen], tokens[~chosen])  # what is not chosen is left as it was
    masked = inputs[chosen] == mask_token_id(vocab)
    kept = inputs[chosen] == tokens[chosen]
    low, high = random_token_range(vocab)
    assert masked.mean() == pytest.approx(MASK_SHARE, abs=0.02)
    # left as they were: the 10% kept, and the rare random draw of the token itself
    assert kept.mean() == pytest.approx(1 - MASK_SHARE - RANDOM_SHARE + RANDOM_SHARE / (high - low), abs=0.02)
    assert ((inputs[chosen] >= low) & (inputs[chosen] < high) | masked).all()
    again = objective_batch(tokens, "masked-lm", np.random.default_rng(2), vocab)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # seeded: a held-out row reads the same


@pytest.mark.parametrize("name", MODEL_FAMILIES)
def test_activation_checkpointing_gives_every_family_the_same_presence_update(name):
    """PRESENCE per microbatch with each block's activations recomputed in the backward (Hugging Face's
    gradient checkpointing, as pretrain.py turns it on): the same scores and update, float64."""
    from common.presence.presence_step import presence_step
    from tiny_families import family_batch

    config = load_preset(PRESETS[name]).model
    batch = family_batch(name)
    microbatches = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2, 4)]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(config, 1000, 12).double().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        stats = presence_step(model, microbatches, tau=1.0)
        results.append((stats.scores, [p.grad.clone() for p in model.parameters()]))
    (plain_scores, plain_grads), (scores, grads) = results
    torch.testing.assert_close(scores, plain_scores, rtol=1e-10, atol=0)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
