"""The PRESENCE step against brute force: sum_i w_i g_i from one autograd pass per microbatch / sample."""
import pytest
import torch

from common.presence.influence import batch_self_influence, layer_set, self_influence
from common.presence.presence_step import _FlatGrads, baseline_step, fixed_weights_step, presence_step
from common.presence.reweighting import presence_weights, shuffle
from tiny_t5 import flat_grad, loss_grads, one_thread, rel_err, split, tiny_batch, tiny_t5  # noqa: F401

MICROBATCH = 2


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    return tiny_t5(tied=request.param)


def brute_force_update(model, units, tau, base_weights=None, layers="first"):
    """(sum_i w_i g_i flattened, scores, weights), each g_i from its own autograd pass."""
    params = list(model.parameters())
    k_params = layer_set(model, layers)
    grads = [torch.cat([g.flatten() for g in loss_grads(model, unit, params)]) for unit in units]
    scores = torch.stack([sum(g.square().sum() for g in loss_grads(model, unit, k_params)) for unit in units])
    weights = presence_weights(scores, tau, base_weights=base_weights)[0]
    return (weights[:, None] * torch.stack(grads)).sum(0), scores, weights


def sample_base_weights(batch, microbatch_size):
    """The baseline's weight of each sample: its tokens / (n * its microbatch's tokens)."""
    tokens = (batch["labels"] != -100).sum(1).double()
    per_microbatch = tokens.view(-1, microbatch_size).sum(1).repeat_interleave(microbatch_size)
    return tokens / (len(tokens) // microbatch_size * per_microbatch)


def test_baseline_is_the_mean_of_microbatch_gradients(model):
    microbatches = split(tiny_batch(), MICROBATCH)
    stats = baseline_step(model, microbatches)
    expected, _, _ = brute_force_update(model, microbatches, 0.0)
    assert rel_err(flat_grad(model), expected) < 1e-12
    losses = [model(**mb).loss.item() for mb in microbatches]
    assert stats.loss == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert stats.scores is None and stats.weights is None


@pytest.mark.parametrize("tau", [1.0, -2.0])
def test_per_microbatch_update_equals_brute_force(model, tau):
    microbatches = split(tiny_batch(), MICROBATCH)
    stats = presence_step(model, microbatches, tau)
    expected, scores, weights = brute_force_update(model, microbatches, tau)
    assert rel_err(flat_grad(model), expected) < 1e-10
    assert torch.allclose(stats.scores, scores, rtol=1e-10, atol=0)
    assert torch.allclose(stats.weights, weights, rtol=1e-10, atol=0)
    assert stats.scores.device.type == "cpu"


@pytest.mark.parametrize("tau", [1.0, -2.0])
def test_per_sample_update_equals_brute_force(model, tau):
    batch = tiny_batch()
    stats = presence_step(model, split(batch, MICROBATCH), tau, per="sample")
    samples = split(batch, 1)
    expected, scores, weights = brute_force_update(model, samples, tau, sample_base_weights(batch, MICROBATCH))
    assert rel_err(flat_grad(model), expected) < 1e-10
    assert torch.allclose(stats.scores, scores, rtol=1e-10, atol=0)
    assert torch.allclose(stats.weights, weights, rtol=1e-10, atol=0)


def test_tau_zero_reproduces_the_baseline(model):
    microbatches = split(tiny_batch(), MICROBATCH)
    baseline_stats = baseline_step(model, microbatches)
    baseline = flat_grad(model).clone()
    stats = presence_step(model, microbatches, 0.0)
    assert rel_err(flat_grad(model), baseline) < 1e-12
    assert torch.allclose(stats.weights, torch.full((len(microbatches),), 1 / len(microbatches), dtype=torch.float64))
    presence_step(model, microbatches, 0.0, per="sample")
    # Not 1e-12: Hugging Face's T5LayerNorm computes its variance in float32 even in a float64 model, and
    # the per-sample path scales the gradient reaching it differently (1/N_j rather than 1/N_i).
    assert rel_err(flat_grad(model), baseline) < 1e-6
    assert stats.loss == pytest.approx(baseline_stats.loss, rel=1e-12)


def test_per_sample_scores_agree_with_self_influence(model):
    batch = tiny_batch()
    stats = presence_step(model, split(batch, MICROBATCH), 1.0, layers="embeddings", per="sample")
    assert torch.allclose(stats.scores, batch_self_influence(model, batch, "embeddings"), rtol=1e-12)


def test_step_changes_no_parameter_and_fills_every_grad(model):
    before = [p.detach().clone() for p in model.parameters()]
    for per in ("microbatch", "sample"):
        presence_step(model, split(tiny_batch(), 4), 1.0, layers="all", per=per)
        assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = tiny_t5().float()
    microbatches = [{k: v for k, v in mb.items()} for mb in split(tiny_batch(), MICROBATCH)]
    for per in ("microbatch", "sample"):
        presence_step(model, microbatches, 1.0, per=per)
        full = flat_grad(model).clone()
        presence_step(model, microbatches, 1.0, per=per, autocast_dtype=torch.bfloat16)
        assert rel_err(flat_grad(model), full) < 0.05  # measured 0.023; flipping tau moves it by 1.0


def test_unknown_granularity_is_refused(model):
    with pytest.raises(ValueError, match="per must be"):
        presence_step(model, split(tiny_batch(), MICROBATCH), 1.0, per="token")


def test_compiled_model_gives_the_eager_update():
    """pretrain.py runs a torch.compile'd model on GPU: its backward must accumulate into the flat-buffer
    views exactly as the eager model's does. aot_eager traces through dynamo and AOTAutograd like the
    GPU's inductor backend, without its (minutes-long on this CPU) code generation."""
    eager_model = tiny_t5()
    compiled_copy = tiny_t5()
    compiled = torch.compile(compiled_copy, backend="aot_eager")
    microbatches = split(tiny_batch(), MICROBATCH)
    for step in (lambda m: baseline_step(m, microbatches), lambda m: presence_step(m, microbatches, -1.0)):
        expected, got = step(eager_model), step(compiled)
        assert got.loss == pytest.approx(expected.loss, rel=1e-12)
        assert rel_err(flat_grad(compiled_copy), flat_grad(eager_model)) < 1e-12
        if expected.weights is not None:
            assert torch.allclose(got.weights, expected.weights, rtol=1e-12, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("per", ["microbatch", "sample"])
def test_shuffled_control_weights_the_items_by_permuted_scores(model, per):
    """The information control: the brute-force scores, permuted by the same seeded draw, give the
    weights; each item's gradient keeps its own place."""
    batch = tiny_batch()
    stats = presence_step(model, split(batch, MICROBATCH), -1.0, per=per, shuffle_seed=123)
    units = split(batch, MICROBATCH if per == "microbatch" else 1)
    base = None if per == "microbatch" else sample_base_weights(batch, MICROBATCH)
    params = list(model.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in loss_grads(model, u, params)]) for u in units])
    scores = torch.stack([sum(g.square().sum() for g in loss_grads(model, u, layer_set(model))) for u in units])
    weights = presence_weights(shuffle(scores, 123), -1.0, base_weights=base)[0]
    assert rel_err(flat_grad(model), (weights[:, None] * grads).sum(0)) < 1e-10
    assert torch.allclose(stats.scores, scores, rtol=1e-10, atol=0)  # logged in item order, unshuffled
    assert torch.allclose(stats.weights, weights, rtol=1e-10, atol=0)
    assert not torch.allclose(weights, presence_weights(scores, -1.0, base_weights=base)[0])


def test_fixed_weights_step_is_the_weighted_sum_of_sample_gradients(model):
    batch = tiny_batch()
    weights = torch.tensor([0.0, 0.2, 0.1, 0.0, 0.3, 0.1, 0.3, 0.0], dtype=torch.float64)
    stats = fixed_weights_step(model, split(batch, MICROBATCH), weights)
    params = list(model.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in loss_grads(model, u, params)]) for u in split(batch, 1)])
    # 1e-6, not 1e-12: T5LayerNorm's variance is float32 even in a float64 model, and one pass over a
    # microbatch sees it at other magnitudes than one pass per sample (measured ~7e-8)
    assert rel_err(flat_grad(model), (weights[:, None] * grads).sum(0)) < 1e-6
    assert torch.equal(stats.weights, weights)
    losses = [model(**mb).loss.item() for mb in split(batch, MICROBATCH)]
    assert stats.loss == pytest.approx(sum(losses) / len(losses), rel=1e-12)


def test_microbatch_scores_are_exact_sums_of_squares_over_millions_of_entries():
    """A float32 row of 2^22 entries: the squared norm agrees with a float64 reference to float64
    rounding, where torch.linalg.vector_norm in float32 is ~1e-5..1e-4 off."""
    k_param = torch.nn.Parameter(torch.zeros(1 << 22))
    other = torch.nn.Parameter(torch.zeros(5))
    flat = _FlatGrads([k_param, other], [k_param], 3)
    flat.rows.copy_(torch.randn(3, (1 << 22) + 5, generator=torch.Generator().manual_seed(0)) * 1e-3)
    reference = flat.rows[:, :1 << 22].double().square().sum(1)
    assert torch.allclose(self_influence(flat, [k_param]), reference, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="layer set K"):
        self_influence(flat, [other])


def _residual_by_hand(si, loss):
    """z(SI) minus its least-squares fit on z(loss), with numpy's own polynomial fit as the regression."""
    import numpy as np
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731 - population std, as standardise (eps negligible here)
    zs, zl = z(si.numpy()), z(loss.numpy())
    slope, intercept = np.polyfit(zl, zs, 1)
    return torch.from_numpy(zs - (slope * zl + intercept))


@pytest.mark.parametrize("per", ["microbatch", "sample"])
@pytest.mark.parametrize("source", ["loss", "si-beyond-loss"])
def test_loss_and_beyond_loss_scores_equal_brute_force(model, per, source):
    """The item's own loss (a model call on that item alone) and SI beyond it, through the same weights."""
    batch, tau = tiny_batch(), -1.0
    stats = presence_step(model, split(batch, MICROBATCH), tau, per=per, scores=source)
    units = split(batch, MICROBATCH if per == "microbatch" else 1)
    params = list(model.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in loss_grads(model, unit, params)]) for unit in units])
    si = torch.stack([sum(g.square().sum() for g in loss_grads(model, u, layer_set(model, "first"))) for u in units])
    losses = torch.stack([model(**unit).loss.detach().double() for unit in units])
    used = losses if source == "loss" else _residual_by_hand(si, losses)
    base = sample_base_weights(batch, MICROBATCH) if per == "sample" else None
    weights = presence_weights(used, tau, base_weights=base)[0]
    assert torch.allclose(stats.item_losses, losses, rtol=1e-10, atol=0)
    assert torch.allclose(stats.scores, si, rtol=1e-10, atol=0)
    assert torch.allclose(stats.weights, weights, rtol=1e-8, atol=0)
    assert rel_err(flat_grad(model), (weights[:, None] * grads).sum(0)) < 1e-8


def test_the_loss_peer_weights_samples_as_sow_et_al():
    """Losses 1, 2, 3 scale to -1, 0, 1; LinUpper gives 0, 1, 1, quadratic 0, 1, 0, extremes 1, 0, 1; the
    weights are exp(f / r) normalised (r = 1 here)."""
    from common.presence.reweighting import loss_peer_weights
    import math
    e = math.e
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    expected = {"linupper": [1, e, e], "quadratic": [1, e, 1], "extremes": [e, 1, e]}
    for shaping, unnormalised in expected.items():
        want = torch.tensor(unnormalised, dtype=torch.float64) / sum(unnormalised)
        assert torch.allclose(loss_peer_weights(losses, 1.0, shaping), want, rtol=1e-12)
        assert torch.allclose(loss_peer_weights(losses * 7 + 3, 1.0, shaping), want, rtol=1e-12)  # min-max scaled
    assert torch.equal(loss_peer_weights(losses, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown shaping"):
        loss_peer_weights(losses, 1.0, "cubic")


def test_the_peer_step_applies_its_weights_to_the_samples(model):
    batch = tiny_batch()
    stats = presence_step(model, split(batch, MICROBATCH), 1.0, per="sample", scores="loss", weighting="linupper")
    samples = split(batch, 1)
    params = list(model.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in loss_grads(model, u, params)]) for u in samples])
    losses = torch.stack([model(**u).loss.detach().double() for u in samples])
    span = losses.max() - losses.min()
    scaled = 2 * (losses - (losses.max() + losses.min()) / 2) / span
    unnormalised = torch.exp(torch.clamp(scaled + 1, max=1.0)) * sample_base_weights(batch, MICROBATCH)
    weights = unnormalised / unnormalised.sum()
    assert torch.allclose(stats.weights, weights, rtol=1e-8, atol=0)
    assert rel_err(flat_grad(model), (weights[:, None] * grads).sum(0)) < 1e-8


def test_given_microbatch_weights_are_applied_as_such(model):
    """The weight-matched control's step: sum_i w_i g_i for given w, one backward pass per microbatch."""
    microbatches = split(tiny_batch(), MICROBATCH)
    weights = torch.tensor([0.5, 0.125, 0.25, 0.125], dtype=torch.float64)[:len(microbatches)]
    weights = weights / weights.sum()
    stats = baseline_step(model, microbatches, microbatch_weights=weights)
    params = list(model.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in loss_grads(model, mb, params)]) for mb in microbatches])
    assert rel_err(flat_grad(model), (weights[:, None] * grads).sum(0)) < 1e-12
    assert torch.equal(stats.weights, weights)


@pytest.mark.parametrize("kind", ["baseline", "presence", "presence-per-sample", "fixed", "matched"])
def test_accumulation_chunks_give_the_unchunked_step(model, kind):
    """Microbatches of 4 rows with unequal target counts, run as 2 chunks of 2: the microbatch's gradient
    is the token-weighted sum of its chunks', so its self-influence (the norm of that sum), its weight and
    the update equal the single pass's."""
    microbatches = split(tiny_batch(), 4)
    weights = torch.tensor([0.25, 0.125, 0.125, 0.0, 0.125, 0.125, 0.125, 0.125], dtype=torch.float64)
    step = {"baseline": lambda c: baseline_step(model, microbatches, chunks=c),
            "presence": lambda c: presence_step(model, microbatches, -1.0, chunks=c),
            "presence-per-sample": lambda c: presence_step(model, microbatches, 1.0, per="sample", chunks=c),
            "fixed": lambda c: fixed_weights_step(model, microbatches, weights, chunks=c),
            "matched": lambda c: baseline_step(model, microbatches, microbatch_weights=weights[:2] * 2, chunks=c)}[kind]
    whole = step(1)
    whole_grad = flat_grad(model).clone()
    chunked = step(2)
    assert rel_err(flat_grad(model), whole_grad) < 1e-10
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-10)
    for name in ("scores", "weights", "item_losses"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-10, atol=0)), name
    with pytest.raises(ValueError, match="cannot split a microbatch of 4 rows"):
        step(3)
