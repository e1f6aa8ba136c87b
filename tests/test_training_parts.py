"""Model construction, the learning-rate schedule, the step's guard and checkpoints (against hand-computed
values)."""
import json
import math

import pytest
import torch
from transformers import T5ForConditionalGeneration

from common.checkpoint import (CheckpointError, confirm_checkpoint, latest_checkpoint, load_checkpoint,
                               roll_back_checkpoint, save_checkpoint, save_model_folder)
from common.config import ModelConfig, load_preset
from common.modeling import all_finite, build_model, model_flops_per_sequence, parameter_counts
from common.optim import apply_schedule, build_optimizer, inverse_sqrt_lr
from common.presence.presence_step import StepPlan
from common.presence.train_step import train_step
from tiny_t5 import one_thread, split, tiny_batch, tiny_t5  # noqa: F401

TINY = ModelConfig(d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8)


def test_inverse_sqrt_schedule_is_t5x_at_paper_settings():
    # T5X: lr = 1 / sqrt(max(step, 10000))
    for step in (0, 1, 9999, 10000, 40000, 1_000_000):
        assert inverse_sqrt_lr(step, 0.01, 10_000) == pytest.approx(1 / math.sqrt(max(step, 10_000)))


def test_scheduler_follows_the_formula():
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=50)
    cfg = load_preset("tiny", ["pretrain.peak_lr=0.02", "pretrain.warmup_steps=4"]).pretrain
    optimizer, scheduler = build_optimizer(model, cfg)
    seen = []
    for _ in range(8):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.02 * math.sqrt(4 / max(s, 4)) for s in range(8)])


def test_model_is_t5_v1_1_and_flops_follow_the_perf_convention():
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=50)
    assert model.config.feed_forward_proj == "gated-gelu" and not model.config.scale_decoder_outputs
    assert model.lm_head.weight is not model.shared.weight, "T5 v1.1 / mT5 have an untied output layer"
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    # T5X's fan-in variance scaling for the output layer: std 1/sqrt(d_model) = 0.25 here
    assert model.lm_head.weight.std().item() == pytest.approx(16 ** -0.5, rel=0.1)
    counts = parameter_counts(model)
    assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["embedding"] + counts["lm_head"]
    assert counts["embedding"] == counts["lm_head"] == 50 * 16
    flops = model_flops_per_sequence(model, 10, 4)
    assert flops == 6 * (counts["encoder"] * 10 + (counts["decoder"] + counts["lm_head"]) * 4)


def test_saved_model_reloads_untied_and_identical(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=50)
    model.save_pretrained(tmp_path)
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.shared.weight
    assert reloaded.encoder.embed_tokens.weight is reloaded.shared.weight
    batch = {"input_ids": torch.randint(2, 50, (2, 6)), "labels": torch.randint(2, 50, (2, 3))}
    assert torch.equal(model(**batch).loss, reloaded(**batch).loss)


def test_hub_config_stand_in_gives_an_mt5_model(tmp_path):
    config = {"model_type": "mt5", "vocab_size": 64, "d_model": 16, "d_ff": 32, "num_layers": 1,
              "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8, "feed_forward_proj": "gated-gelu",
              "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = build_model(ModelConfig(hub_config=str(tmp_path)), vocab_size=64)
    assert type(model).__name__ == "MT5ForConditionalGeneration"
    assert model.lm_head.weight is not model.shared.weight and not model.config.scale_decoder_outputs
    assert build_model(ModelConfig(hub_config=str(tmp_path)), vocab_size=60).config.vocab_size == 64
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(ModelConfig(hub_config=str(tmp_path)), vocab_size=65)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=50)
    cfg = load_preset("tiny").pretrain
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = {"input_ids": torch.randint(2, 50, (2, 6)), "labels": torch.randint(2, 50, (2, 3))}
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"seconds": 1.5})
    save_checkpoint(tmp_path, 5, model, optimizer, scheduler, {"seconds": 2.5})
    expected_random = torch.rand(3)

    restored = build_model(TINY, vocab_size=50)
    opt2, sched2 = build_optimizer(restored, cfg)
    path = latest_checkpoint(tmp_path)
    assert path.name == "step-5" and not (tmp_path / "step-3").exists()
    step, extra = load_checkpoint(path, restored, opt2, sched2)
    assert (step, extra) == (5, {"seconds": 2.5})
    assert torch.equal(torch.rand(3), expected_random), "the torch RNG state must be restored"
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == scheduler.get_last_lr()
    assert opt2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_incomplete_checkpoint_is_reported(tmp_path):
    (tmp_path / "LATEST").write_text("step-9")
    (tmp_path / "step-9").mkdir()
    with pytest.raises(CheckpointError, match="step-9/model.safetensors is missing: checkpoint .* is damaged and the "
                                              "run has no other. Fix: start the run anew"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing") is None


def cut(path, keep=0.5):
    """Truncate a file, as a full disk or an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt"])
def test_a_damaged_latest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, capsys, damaged):
    model, optimizer, scheduler = trained(2)
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    confirm_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {})  # unverified: step-2 is kept beside it
    cut(tmp_path / "step-4" / damaged)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2"
    said = capsys.readouterr().out
    assert said.startswith(f"checkpoint {tmp_path / 'step-4'} skipped: {tmp_path / 'step-4' / damaged} ")
    assert said.rstrip().endswith(f"using {tmp_path / 'step-2'}, the newest intact checkpoint")
    assert (tmp_path / "LATEST").read_text() == "step-2"  # said once: the next call finds step-2 at once
    assert latest_checkpoint(tmp_path) == tmp_path / "step-2" and capsys.readouterr().out == ""
    cut(tmp_path / "step-2" / damaged)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'step-2' / damaged}.*Fix: start the run anew"):
        latest_checkpoint(tmp_path)


def trained(steps: int, peak_lr: float = 0.01):
    """A tiny model, its optimizer and scheduler after `steps` steps (warm-up 4)."""
    torch.manual_seed(0)
    model = build_model(TINY, vocab_size=50)
    optimizer, scheduler = build_optimizer(model, load_preset("tiny", [f"pretrain.peak_lr={peak_lr}",
                                                                       "pretrain.warmup_steps=4"]).pretrain)
    batch = {"input_ids": torch.randint(2, 50, (2, 6)), "labels": torch.randint(2, 50, (2, 3))}
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_a_resumed_schedule_takes_the_configs_peak_learning_rate():
    """After load_checkpoint the scheduler holds the checkpoint's peak; apply_schedule makes the config's
    count from the next step on, and leaves an unchanged one exactly as loaded."""
    _, optimizer, scheduler = trained(6)
    _, same_opt, same_sched = trained(0)
    same_opt.load_state_dict(optimizer.state_dict())
    same_sched.load_state_dict(scheduler.state_dict())
    apply_schedule(same_opt, same_sched, 0.01)
    assert same_sched.get_last_lr() == scheduler.get_last_lr() == [0.01 * math.sqrt(4 / 6)]
    _, new_opt, new_sched = trained(0, peak_lr=0.02)
    new_opt.load_state_dict(optimizer.state_dict())
    new_sched.load_state_dict(scheduler.state_dict())
    assert new_sched.get_last_lr() == pytest.approx([0.01 * math.sqrt(4 / 6)])  # the checkpoint's, until applied
    apply_schedule(new_opt, new_sched, 0.02)
    seen = []
    for _ in range(3):
        seen.append(new_sched.get_last_lr()[0])
        assert new_opt.param_groups[0]["lr"] == seen[-1]
        new_opt.step()
        new_sched.step()
    assert seen == pytest.approx([0.02 * math.sqrt(4 / step) for step in (6, 7, 8)])


def test_checkpoints_refuse_non_finite_parameters(tmp_path):
    model, optimizer, scheduler = trained(1)
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step-4 not written: 1 parameter tensors are not finite .lm_head"):
        save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {})
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-2"]
    with pytest.raises(FloatingPointError, match="final not written"):
        save_model_folder(tmp_path / "final", model, None, {})
    assert not (tmp_path / "final").exists()


def test_a_checkpoint_is_dropped_when_the_step_after_it_fails_before_it_is_verified(tmp_path):
    model, optimizer, scheduler = trained(1)
    names = lambda: sorted(p.name for p in tmp_path.glob("step-*"))  # noqa: E731
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    confirm_checkpoint(tmp_path)  # step 3 ran finite
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {})
    assert names() == ["step-2", "step-4"] and latest_checkpoint(tmp_path).name == "step-4"
    assert roll_back_checkpoint(tmp_path) == ("step-4", "step-2")  # step 5 failed
    assert names() == ["step-2"] and latest_checkpoint(tmp_path).name == "step-2"
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {})
    confirm_checkpoint(tmp_path)
    assert names() == ["step-4"]
    assert roll_back_checkpoint(tmp_path) == (None, "step-4")  # a verified checkpoint stays
    assert latest_checkpoint(tmp_path).name == "step-4"

    first = tmp_path / "first"
    save_checkpoint(first, 1, model, optimizer, scheduler, {})
    assert roll_back_checkpoint(first) == ("step-1", None)
    assert latest_checkpoint(first) is None and not list(first.glob("step-*"))


def test_all_finite_refuses_nan_inf_and_norms_that_overflow():
    fine = [torch.ones(3), torch.zeros(2, 2, dtype=torch.float64), torch.full((4,), 1e18), torch.ones(2).bfloat16()]
    assert all_finite(fine)
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]), torch.full((2,), 1e30)):
        assert not all_finite(fine + [bad])


# (step keyword arguments, the fault): the loss stays finite while the update direction (a NaN gradient of
# the output layer) or the starting point (an infinite embedding row that no token of the batch uses) is not.
STEP_FAULTS = [(StepPlan(), "nan-gradient"), (StepPlan("scores", tau=1.0), "nan-gradient"),
               (StepPlan("fixed", sample_weights=torch.full((8,), 1 / 8, dtype=torch.float64)), "nan-gradient"),
               (StepPlan(), "inf-parameter"), (StepPlan("scores", tau=1.0), "inf-parameter"),
               (StepPlan("scores", "sample", 1.0), "inf-parameter")]


@pytest.mark.parametrize("plan, fault", STEP_FAULTS,
                         ids=["baseline-nan", "presence-nan", "fixed-nan", "baseline-inf", "presence-inf", "sample-inf"])
def test_a_non_finite_update_is_refused_before_the_optimizer_step(plan, fault):
    model = tiny_t5()
    optimizer, scheduler = build_optimizer(model, load_preset("tiny").pretrain)
    if fault == "nan-gradient":
        model.lm_head.weight.register_hook(lambda grad: grad * float("nan"))
    else:
        with torch.no_grad():
            model.shared.weight[1] = float("inf")  # token 1 (EOS) is in no input and no label of tiny_batch
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="update direction or the parameters are not finite"):
        train_step(model, split(tiny_batch(), 2), plan, optimizer=optimizer, scheduler=scheduler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state and scheduler.last_epoch == 0
