"""Self-influence scores against brute force: one autograd pass per sample (or microbatch), float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.presence.influence import batch_self_influence, forward_logits, group_losses, layer_set, token_losses
from common.presence.per_sample_grads import GradTape
from tiny_t5 import brute_force_scores, one_thread, tiny_batch, tiny_t5  # noqa: F401 (autouse fixture)

LAYER_SETS = ["first", "embeddings", "all", ["lm_head", "encoder.block.1", "decoder.block.0.layer.1"]]


@pytest.fixture(scope="module")
def untied():
    return tiny_t5(tied=False)


@pytest.fixture(scope="module")
def tied():
    return tiny_t5(tied=True)


@pytest.mark.parametrize("layers", LAYER_SETS, ids=["first", "embeddings", "all", "prefixes"])
@pytest.mark.parametrize("per,microbatch_size", [("sample", None), ("microbatch", 2), ("microbatch", 4)])
def test_scores_equal_brute_force(untied, layers, per, microbatch_size):
    batch = tiny_batch()
    scores = batch_self_influence(untied, batch, layers, per, microbatch_size)
    expected = brute_force_scores(untied, batch, layer_set(untied, layers), microbatch_size or 1)
    assert scores.shape == expected.shape
    assert torch.allclose(scores, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layers", ["embeddings", "all"])
def test_tied_output_layer_counts_in_the_embedding_norm(tied, layers):
    # The embedding feeds encoder and decoder and is the output layer: the cross terms matter.
    assert tied.lm_head.weight is tied.shared.weight
    batch = tiny_batch()
    expected = brute_force_scores(tied, batch, layer_set(tied, layers))
    assert torch.allclose(batch_self_influence(tied, batch, layers), expected, rtol=1e-6, atol=0)


def test_eager_attention_gives_the_same_scores():
    model = tiny_t5(attn="eager")
    batch = tiny_batch()
    expected = brute_force_scores(model, batch, layer_set(model, "first"))
    assert torch.allclose(batch_self_influence(model, batch), expected, rtol=1e-6, atol=0)


def test_leaves_parameters_and_grads_untouched(untied):
    for p in untied.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [(p.detach().clone(), p.grad.clone()) for p in untied.parameters()]
    batch_self_influence(untied, tiny_batch(), "all")
    for p, (value, grad) in zip(untied.parameters(), before):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)
    assert not any(hasattr(m, "compute_bias") and "compute_bias" in vars(m) for m in untied.modules())


def test_scores_in_eval_mode_of_a_dropout_model_match_brute_force():
    model = tiny_t5(dropout=0.3).eval()
    batch = tiny_batch()
    expected = brute_force_scores(model, batch, layer_set(model, "first"))
    assert torch.allclose(batch_self_influence(model, batch), expected, rtol=1e-6, atol=0)


def test_first_layer_set_is_the_first_blocks(untied):
    names = {id(p): n for n, p in untied.named_parameters()}
    chosen = [names[id(p)] for p in layer_set(untied, "first")]
    assert chosen and all(n.startswith(("encoder.block.0.", "decoder.block.0.")) for n in chosen)
    assert any("relative_attention_bias" in n for n in chosen)
    assert len(chosen) == sum(n.startswith(("encoder.block.0.", "decoder.block.0.")) for n in names.values())


def test_prefixes_match_whole_components():
    model = nn.Module()
    model.block = nn.ModuleDict({"1": nn.Linear(2, 2), "10": nn.Linear(2, 2)})
    assert layer_set(model, ["block.1"]) == list(model.block["1"].parameters())


def test_bad_arguments_fail_clearly(untied):
    batch = tiny_batch()
    with pytest.raises(ValueError, match="unknown layer set"):
        batch_self_influence(untied, batch, "middle")
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        batch_self_influence(untied, batch, ["decoder.block.7"])
    with pytest.raises(ValueError, match="divides the batch size"):
        batch_self_influence(untied, batch, per="microbatch", microbatch_size=3)
    with pytest.raises(ValueError, match="per must be"):
        batch_self_influence(untied, batch, per="token")


class _Toy(nn.Module):
    """Paths T5 does not take: an embedding with a padding index and a Linear with a bias, used twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 5, padding_idx=0).double()
        self.proj = nn.Linear(5, 5).double()

    def forward(self, ids):
        return self.proj(torch.tanh(self.proj(self.embed(ids)))).square().sum((1, 2))


def test_engine_handles_padding_index_bias_and_repeated_use():
    toy = _Toy()
    ids = torch.tensor([[0, 3, 3, 5], [1, 0, 2, 2], [6, 6, 6, 0]])
    params = list(toy.parameters())
    with GradTape(toy, params, batch_size=3) as tape:
        losses = toy(ids)
    tape.backward(losses.sum())
    expected = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(toy(ids[i:i + 1]).sum(), params))
                            for i in range(3)])
    assert torch.allclose(tape.squared_norms(params), expected, rtol=1e-10)
    weights = torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64)
    grads = {p: torch.zeros_like(p) for p in params}
    tape.add_weighted_grads(weights, grads)
    reference = torch.autograd.grad((weights * toy(ids)).sum(), params)
    for p, ref in zip(params, reference):
        assert torch.allclose(grads[p], ref, rtol=1e-10, atol=1e-12)


def test_unsupported_modules_are_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, kernel_size=2))
    with pytest.raises(NotImplementedError, match=r"1 \(Conv1d\) owns 1.weight, used by conv1d, .*Fix: leave"):
        with GradTape(model, model.parameters(), batch_size=2):
            model(torch.randn(2, 3, 3))


def test_mt5_classes_give_exact_scores_too():
    # The paper preset builds MT5ForConditionalGeneration (its own layer-norm and attention classes).
    from transformers import MT5Config, MT5ForConditionalGeneration
    torch.manual_seed(0)
    config = MT5Config(vocab_size=40, d_model=16, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8,
                       dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    model = MT5ForConditionalGeneration(config).double()
    batch = tiny_batch()
    expected = brute_force_scores(model, batch, layer_set(model, "all"))
    assert torch.allclose(batch_self_influence(model, batch, "all"), expected, rtol=1e-6, atol=0)


def test_norms_can_be_asked_again_after_per_sample_gradients_were_formed(untied):
    # squared_norms keeps the per-sample gradients it formed and drops their factors; later calls use them.
    batch = tiny_batch()
    params = layer_set(untied, "first")
    with GradTape(untied, params, batch_size=8) as tape:
        logits = forward_logits(untied, batch)
    tape.backward(group_losses(token_losses(logits, batch["labels"]), batch["labels"]).sum())
    per_sample = tape.squared_norms(params)
    assert torch.allclose(tape.squared_norms(params), per_sample, rtol=1e-12)
    # Now pairs: ||grad l_a + grad l_b||^2 with l_j the loss of sample j alone.
    pairs = []
    for a in range(0, 8, 2):
        loss = sum(untied(**{k: v[j:j + 1] for k, v in batch.items()}).loss for j in (a, a + 1))
        pairs.append(sum(g.square().sum() for g in torch.autograd.grad(loss, params)))
    assert torch.allclose(tape.squared_norms(params, group_size=2), torch.stack(pairs), rtol=1e-6, atol=0)


def _float64_reference_sq_norms(tape: GradTape, params, names) -> dict[str, torch.Tensor]:
    """Per-sample squared norms from the tape's recorded inputs and output gradients, by float64 autograd
    through each recorded module's own formula: grad_p sum_uses <output_u(p), recorded output gradient_u>."""
    norms = {}
    for p in params:
        per_sample = []
        for j in range(tape.batch_size):
            weight = p.detach().double().requires_grad_()
            total = 0
            for use in tape.uses[p]:
                grad = use.grad[j].double()
                if use.kind == "linear":
                    out = F.linear(use.inputs[j].double(), weight)
                elif use.kind == "norm":
                    x = use.inputs[j].double()
                    out = weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + use.module.variance_epsilon)
                else:  # relative_bias: the table looked up at the (query, key) buckets, (H, Tq, Tk)
                    out = F.embedding(use.inputs, weight).permute(2, 0, 1)
                total = total + (out * grad).sum()
            per_sample.append(torch.autograd.grad(total, weight)[0].square().sum())
        norms[names[p]] = torch.stack(per_sample)
    return norms


def test_per_sample_scores_are_exact_over_long_sequences():
    """float32 and 1,024 input tokens: the far bucket of the encoder's bias table collects ~400k
    query/key pairs per sample, which one float32 sum gets ~1e-5 wrong. Every parameter's per-sample
    squared norm agrees with a float64 reference from the same recorded factors to 1e-6."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(2, 64, (2, 1024), generator=g),
             "labels": torch.randint(2, 64, (2, 229), generator=g)}
    params = layer_set(model, "first")
    names = {p: n for n, p in model.named_parameters()}
    with GradTape(model, params, batch_size=2) as tape:
        logits = forward_logits(model, batch)
    tape.backward(group_losses(token_losses(logits, batch["labels"]), batch["labels"]).sum())
    reference = _float64_reference_sq_norms(tape, params, names)
    for p in params:
        scores = tape.squared_norms([p])
        assert scores.dtype == torch.float64
        assert torch.allclose(scores, reference[names[p]], rtol=1e-6, atol=0), names[p]


def _graph_leaves(node) -> list[torch.Tensor]:
    """The leaf tensors (AccumulateGrad nodes) an autograd graph reaches from `node`."""
    leaves, seen, stack = [], set(), [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(following for following, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("layers", ["first", "all"])
def test_no_parameter_is_in_the_graph_the_tape_records(untied, layers):
    # Autograd saves a tensor for a parameter's gradient only if the parameter is in the graph. Inside the
    # tape none is: nothing is kept for weight gradients (a Linear's input, a norm's normalised input),
    # which the tape forms from its own records.
    batch = tiny_batch()
    params = layer_set(untied, layers)
    with GradTape(untied, params, batch_size=8) as tape:
        losses = group_losses(token_losses(forward_logits(untied, batch), batch["labels"]), batch["labels"])
    leaves = _graph_leaves(losses.grad_fn)
    parameter_ids = {id(p) for p in untied.parameters()}
    assert leaves and not any(id(leaf) in parameter_ids for leaf in leaves)
    assert all(p.requires_grad for p in untied.parameters())
    tape.backward(losses.sum())
    assert torch.allclose(tape.squared_norms(params), brute_force_scores(untied, batch, params), rtol=1e-6, atol=0)


def test_requires_grad_is_restored_when_the_pass_fails(untied):
    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = untied.decoder.block[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batch_self_influence(untied, tiny_batch())
    finally:
        handle.remove()
    assert all(p.requires_grad for p in untied.parameters())


def test_the_losses_beside_the_scores_are_each_samples_own_loss(untied):
    """with_losses: the mean token loss of each sample, as Hugging Face computes it for that sample alone."""
    batch = tiny_batch()
    scores, losses = batch_self_influence(untied, batch, "first", with_losses=True)
    assert torch.equal(scores, batch_self_influence(untied, batch, "first"))
    with torch.no_grad():
        alone = torch.stack([untied(**{k: v[i:i + 1] for k, v in batch.items()}).loss
                             for i in range(len(batch["input_ids"]))])
    assert torch.allclose(losses, alone.to(losses.dtype), rtol=1e-10, atol=0)
