"""Each module kind the per-sample engine supports, on small models of its own, against brute force (one
float64 autograd pass per sample); and the refusals: a module the engine does not model, or one used in a
way it does not model, raises rather than being scored wrongly."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.presence.per_sample_grads import GradTape
from tiny_t5 import one_thread, rel_err  # noqa: F401 (autouse fixture)

RTOL = 1e-10


def max_rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs() / expected.abs()).max().item()


class ScaleNorm(nn.Module):
    """An RMS norm under a name no list knows: it must be recognised by what it computes."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


class Kinds(nn.Module):
    """Every kind at once: token and learned position embeddings (position ids (1, T), shared by the batch),
    LayerNorms with a bias, without one and without an affine part, an RMS norm of an unknown class,
    Conv1D, Linear with a bias, and an output layer tied to the token embedding."""

    def __init__(self, vocab: int = 11, d: int = 4, d_hidden: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(8, d)
        self.norm = nn.LayerNorm(d)
        self.norm_without_bias = nn.LayerNorm(d, bias=False)
        self.plain_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.scale_norm = ScaleNorm(d)
        self.up = Conv1D(d_hidden, d)  # (d_in, d_out) = (4, 3)
        self.down = nn.Linear(d_hidden, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.tokens.weight
        for p in self.parameters():  # random affine parts, so that no gradient is special
            nn.init.normal_(p)
        self.double()

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.norm(self.tokens(ids) + self.positions(positions))
        h = h + self.down(torch.tanh(self.up(self.norm_without_bias(h))))
        return self.out(self.scale_norm(self.plain_norm(h)))


def sample_losses(model, ids):
    return torch.logsumexp(model(ids), -1).mean(1)


@pytest.mark.parametrize("length", [1, 6], ids=["gram-form", "per-sample-matrices"])
def test_every_module_kind_is_exact(length):
    """Length 1: every matmul takes the Gram form per sample (T (d_in + d_out) < d_in d_out); length 6:
    the per-sample matrices, which add_weighted_grads then reuses."""
    model = Kinds()
    ids = torch.randint(0, 11, (4, length), generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    with GradTape(model, params, batch_size=4) as tape:
        losses = sample_losses(model, ids)
    tape.backward(losses.sum())
    per_sample = [torch.autograd.grad(sample_losses(model, ids[j:j + 1]).sum(), params) for j in range(4)]
    for i, p in enumerate(params):
        expected = torch.stack([g[i].square().sum() for g in per_sample])
        assert max_rel_err(tape.squared_norms([p]), expected) < RTOL
    pairs = torch.stack([sum((a + b).square().sum() for a, b in zip(per_sample[j], per_sample[j + 1])) for j in (0, 2)])
    assert max_rel_err(tape.squared_norms(params, group_size=2), pairs) < RTOL
    weights = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    grads = {p: torch.zeros_like(p) for p in params}
    tape.add_weighted_grads(weights, grads)
    for p, reference in zip(params, torch.autograd.grad((weights * sample_losses(model, ids)).sum(), params)):
        assert torch.allclose(grads[p], reference, rtol=RTOL, atol=1e-13)


class OneProjection(nn.Module):
    """An embedding and a projection, with `head` saying how the projection is applied."""

    def __init__(self, head):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)
        self.head = head
        self.double()

    def forward(self, ids):
        return self.head(self, self.embed(ids)).square().sum((1, 2))


def refused(model, ids, match, params=None):
    with pytest.raises(NotImplementedError, match=match):
        with GradTape(model, list(model.parameters()) if params is None else params, batch_size=ids.shape[0]):
            model(ids)


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])


def test_a_parameter_used_outside_its_module_is_refused():
    # An output layer formed from the embedding's weight directly: the tape would miss that use.
    refused(OneProjection(lambda m, h: h @ m.embed.weight.T[:, :4]), IDS, r"embed.weight is used by .* outside")
    refused(OneProjection(lambda m, h: F.linear(h, m.proj.weight)), IDS, r"proj.weight is used by linear outside")


def test_a_co_owner_that_uses_the_parameter_is_refused():
    # BERT's prediction head owns the bias its decoder uses; one that also adds it itself is refused.
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(4, 4)
            self.bias = self.decoder.bias

        def forward(self, h):
            return self.decoder(h) + self.bias

    head = Head().double()
    model = OneProjection(lambda m, h: head(h))
    model.head_module = head
    refused(model, IDS, r"head_module.decoder.bias is used by .* outside")


def test_a_parameter_nothing_uses_has_gradient_zero():
    # BERT's untied prediction head holds an output bias nothing uses: its score is 0, the rest unchanged.
    holder = nn.Module()
    holder.bias = nn.Parameter(torch.ones(4, dtype=torch.float64))
    model = OneProjection(lambda m, h: m.proj(h))
    model.holder = holder
    params = list(model.parameters())
    with GradTape(model, params, batch_size=2) as tape:
        losses = model(IDS)
    tape.backward(losses.sum())
    assert torch.equal(tape.squared_norms([holder.bias]), torch.zeros(2, dtype=torch.float64))
    used = [p for p in params if p is not holder.bias]
    expected = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(model(IDS[j:j + 1]).sum(), used))
                            for j in range(2)])
    assert max_rel_err(tape.squared_norms(params), expected) < RTOL


def test_a_linear_that_computes_something_else_is_refused():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = OneProjection(lambda m, h: m.proj(h))
    model.proj = Doubled(4, 4).double()
    refused(model, IDS, r"proj \(Doubled\): its output is not x W\^T \+ b")
    model = OneProjection(lambda m, h: m.proj(h))
    model.proj.register_forward_hook(lambda module, args, output: output * 3)
    refused(model, IDS, r"proj \(Linear\): its output is not")


def test_a_norm_whose_output_is_not_weight_times_the_normalised_input_is_refused():
    class OffsetNorm(nn.Module):  # Gemma's kind: (1 + weight) * x_hat, whose weight gradient is not x_hat * d
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)

    norm = OffsetNorm().double()
    model = OneProjection(lambda m, h: norm(h))
    model.norm = norm
    refused(model, IDS, r"norm \(OffsetNorm\): its output is not weight \* f\(x\) \+ bias")


def test_inputs_without_the_batch_first_are_refused():
    refused(OneProjection(lambda m, h: m.proj(h[:1].expand(3, -1, -1))), IDS,
            r"proj is called on a tensor of shape \(3, 3, 4\)")
    model = OneProjection(lambda m, h: m.proj(h + m.embed(torch.arange(3)).unsqueeze(0)))
    refused(model, IDS, r"embed is called on a tensor of shape \(3,\)")


def test_a_shared_output_used_other_than_by_broadcasting_is_refused():
    # Position embeddings computed once for the batch and then indexed rather than broadcast: expanding
    # them over the batch would give sample 0's row every sample's gradient.
    model = OneProjection(lambda m, h: m.proj(h + m.embed(torch.arange(3).unsqueeze(0))[0]))
    refused(model, IDS, r"the output of embed, computed once for the whole batch .* is passed to __getitem__")
    broadcast = OneProjection(lambda m, h: m.proj(h + m.embed(torch.arange(3).unsqueeze(0))))
    with GradTape(broadcast, list(broadcast.parameters()), batch_size=2):
        broadcast(IDS)


def test_a_module_of_a_known_kind_called_on_several_inputs_is_refused():
    class TwoInputNorm(ScaleNorm):
        def forward(self, x, scale):
            return super().forward(x) * scale

    norm = TwoInputNorm(4).double()
    model = OneProjection(lambda m, h: norm(h, 2.0))
    model.norm = norm
    refused(model, IDS, r"norm is called with 2 arguments", params=[norm.weight])


class AutocastNorm(ScaleNorm):
    """Normalises in float32 under autocast and in the input's dtype otherwise, as CUDA's autocast runs
    layer_norm (the CPU's runs it in bfloat16, so this module stands in for it here)."""

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def test_a_norm_under_autocast_is_scored_with_the_normalised_input_of_its_call():
    """The norm's input is bfloat16 (a Linear's output under autocast); its x_hat, recomputed for the weight
    gradient, must be the float32 one the call made, not the bfloat16 one a call outside autocast would
    (~1e-3 off). The batch gradient formed from the records (all weights 1) matches autograd's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), AutocastNorm(16), nn.Linear(16, 4))
    x = torch.randn(3, 5, 8)
    norm = [model[1].weight]
    for _ in range(2):  # the first pass checks the norm's formula in the forward; the second recomputes x_hat after it
        with GradTape(model, norm, batch_size=3) as tape, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().sum()
        tape.backward(loss)
    grads = {p: torch.zeros_like(p) for p in norm}
    tape.add_weighted_grads(torch.ones(3), grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.autograd.grad(model(x).float().square().sum(), norm)[0]
    assert rel_err(grads[norm[0]], reference) < 1e-5
