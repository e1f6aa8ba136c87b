"""Self-influence and the per-sample PRESENCE step on every model family the engine supports (T5, GPT-2,
Llama, BERT), against brute force: one float64 autograd pass per sample or microbatch, through a loss
written out in the tests (tests/tiny_families.py), itself checked against Hugging Face's
`model(**batch).loss`."""
import pytest
import torch

from common.presence.influence import (batch_self_influence, forward_logits, group_losses, layer_set,
                                       loss_convention, targets, token_losses)
from common.presence.presence_step import baseline_step, presence_step
from common.presence.reweighting import presence_weights
from tiny_families import FAMILIES, brute_force_scores, family_batch, reference_loss, tiny_model
from tiny_t5 import flat_grad, one_thread, rel_err, split  # noqa: F401 (autouse fixture)

RTOL = 1e-10


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_model(request.param)


def max_rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs() / expected.abs()).max().item()


@pytest.mark.parametrize("layers", ["first", "embeddings", "all"])
@pytest.mark.parametrize("group_size", [1, 2, 3, 6])
def test_scores_equal_brute_force(family, layers, group_size):
    name, model = family
    batch = family_batch(name)
    if group_size == 1:
        scores = batch_self_influence(model, batch, layers)
    else:
        scores = batch_self_influence(model, batch, layers, per="microbatch", microbatch_size=group_size)
    expected = brute_force_scores(name, model, batch, layer_set(model, layers), group_size)
    assert scores.shape == expected.shape and (expected > 0).all()
    assert max_rel_err(scores, expected) < RTOL


def test_losses_are_hugging_faces(family):
    # Each sample's and the batch's loss from forward_logits / targets are what the model returns given them
    # alone: the reference's, and Hugging Face's up to its float32 cross-entropy (a misaligned target would
    # be off by about a nat).
    name, model = family
    batch = family_batch(name)
    labels = targets(model, batch)
    with torch.no_grad():
        per_token = token_losses(forward_logits(model, batch), labels)
        for group_size in (1, 3, 6):
            parts = split(batch, group_size)
            got = group_losses(per_token, labels, group_size)
            reference = torch.stack([reference_loss(name, model, part) for part in parts])
            assert torch.allclose(got, reference, rtol=1e-12, atol=0)
            assert torch.allclose(got, torch.stack([model(**part).loss for part in parts]).double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name,convention", [("t5", "seq2seq"), ("gpt2", "causal"), ("llama", "causal"),
                                             ("bert", "masked")])
def test_loss_convention_of_each_family_compiled_or_not(name, convention):
    model = tiny_model(name)
    assert loss_convention(model) == convention == loss_convention(torch.compile(model))


def test_causal_logits_do_not_pair_with_unshifted_labels():
    # Pairing a causal LM's logits with the raw labels would score every token against the wrong target;
    # the shapes differ so that it fails instead.
    model = tiny_model("gpt2")
    batch = family_batch("gpt2")
    assert loss_convention(model) == "causal"
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError)):
        token_losses(forward_logits(model, batch), batch["labels"])


@pytest.mark.parametrize("name,prefix", [("t5", ("encoder.block.0.", "decoder.block.0.")),
                                         ("gpt2", ("transformer.h.0.",)), ("llama", ("model.layers.0.",)),
                                         ("bert", ("bert.encoder.layer.0.",))])
def test_first_layer_set_is_the_first_block_of_each_stack(name, prefix):
    model = tiny_model(name)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [names[id(p)] for p in layer_set(model, "first")]
    assert chosen and all(n.startswith(prefix) for n in chosen)
    assert all(any(n.startswith(x) for n in chosen) for x in prefix)
    assert len(chosen) == sum(n.startswith(prefix) for n in names.values())


def test_embeddings_layer_set_is_the_input_embedding_tied_or_not():
    gpt2, llama, bert = tiny_model("gpt2"), tiny_model("llama"), tiny_model("bert")
    assert layer_set(gpt2, "embeddings") == [gpt2.transformer.wte.weight]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert layer_set(llama, "embeddings") == [llama.model.embed_tokens.weight]
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    assert layer_set(bert, "embeddings") == [bert.bert.embeddings.word_embeddings.weight]


def test_first_is_refused_for_an_unknown_model_type():
    from transformers import OPTConfig, OPTForCausalLM
    model = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                     vocab_size=50, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="'opt' model is of no family"):
        layer_set(model, "first")


def test_a_model_without_a_known_loss_convention_is_refused():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    model = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(NotImplementedError, match="loss convention is unknown"):
        loss_convention(model)


# ---- the PRESENCE step per sample ------------------------------------------------------------------------

def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("tau,layers,chunks", [(1.0, "first", 1), (-2.0, "first", 1), (0.0, "first", 1),
                                               (1.0, "all", 1), (-2.0, "first", 3)])
def test_per_sample_step_is_the_weighted_sum_of_sample_gradients(name, tau, layers, chunks):
    """sum_j w_j grad loss_j with w from the samples' brute-force scores and the baseline's weights
    b_j = N_j / (n N_i) (N: target tokens, counted here: a causal LM's first label has none); at tau = 0
    that is the gradient of the mean of the microbatch losses. Also with each microbatch run as chunks."""
    model = tiny_model(name)
    batch = family_batch(name)
    microbatches = split(batch, 3)
    stats = presence_step(model, microbatches, tau, layers, per="sample", chunks=chunks)
    params, k_params = list(model.parameters()), layer_set(model, layers)
    samples = split(batch, 1)
    grads = torch.stack([flat(torch.autograd.grad(reference_loss(name, model, s), params)) for s in samples])
    scores = brute_force_scores(name, model, batch, k_params)
    labels = batch["labels"][:, 1:] if name == "gpt2" else batch["labels"]
    tokens = (labels != -100).sum(1).double()
    per_microbatch = tokens.view(-1, 3).sum(1).repeat_interleave(3)
    weights = presence_weights(scores, tau, base_weights=tokens / (len(microbatches) * per_microbatch))[0]
    assert rel_err(flat_grad(model), weights @ grads) < RTOL
    assert max_rel_err(stats.scores, scores) < RTOL
    assert torch.allclose(stats.weights, weights, rtol=RTOL, atol=0)
    if tau == 0:
        mean_loss = sum(reference_loss(name, model, mb) for mb in microbatches) / len(microbatches)
        assert rel_err(flat_grad(model), flat(torch.autograd.grad(mean_loss, params))) < RTOL


@pytest.mark.parametrize("name,chunks,tolerance", [("bert", 1, 1e-12), ("gpt2", 1, 1e-6), ("bert", 3, 1e-7),
                                                   ("gpt2", 3, 1e-6)])
def test_tau_zero_per_sample_reproduces_the_baseline_step(name, chunks, tolerance):
    # The baseline takes Hugging Face's loss: float64 for BERT, float32 cross-entropy for GPT-2 (measured
    # 3e-8); in chunks, it weighs each chunk's loss by N_c / N, a float32 ratio of integer token counts
    # (measured 2e-8 for BERT). The counts are of the tokens the model predicts (a causal LM's are shifted).
    model = tiny_model(name)
    microbatches = split(family_batch(name), 3)
    baseline_step(model, microbatches, chunks=chunks)
    baseline = flat_grad(model).clone()
    presence_step(model, microbatches, 0.0, per="sample", chunks=chunks)
    assert rel_err(flat_grad(model), baseline) < tolerance


def test_gradient_checkpointing_is_refused():
    model = tiny_model("gpt2")
    model.gradient_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        batch_self_influence(model, family_batch("gpt2"))
    assert all(p.requires_grad for p in model.parameters())
