"""Presets load into validated configs; impossible configurations fail at once, naming the field."""
import pytest

from common.config import ConfigError, available_presets, load_preset


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_every_preset_loads_and_validates(name):
    preset = load_preset(name)
    assert preset.name == name
    assert preset.pretrain.batch_size % preset.pretrain.num_microbatches == 0


def test_presets_are_the_three_documented_ones():
    assert set(available_presets()) >= {"tiny", "small", "paper"}


def test_tiny_has_the_languages_the_issue_asks_for():
    langs = load_preset("tiny").data.languages
    assert {"en", "hi", "bn"} <= set(langs)
    assert {"ru", "zh"} & set(langs), "tiny needs a language in another script than Latin/Devanagari/Bengali"


def test_paper_preset_is_the_paper_recipe():
    p = load_preset("paper")
    assert (p.pretrain.steps, p.pretrain.batch_size, p.pretrain.num_microbatches) == (1_000_000, 1024, 8)
    assert p.pretrain.switch_step == 100_000
    assert (p.pretrain.tau_direct, p.pretrain.tau_inverse) == (1.0, -1.0)
    assert p.data.input_length == 1024 and p.data.alpha == 0.3
    assert p.model.hub_config == "google/mt5-base" and p.data.tokenizer.hub_name == "google/mt5-base"
    assert (p.finetune.batch_size, p.finetune.lr, p.finetune.dropout_rate, p.finetune.steps) == (128, 1e-3, 0.1, 20000)


@pytest.mark.parametrize(
    "override, field",
    [
        (["pretrain.num_microbatches=7"], "pretrain.num_microbatches"),
        (["pretrain.steps=-5"], "pretrain.steps"),
        (["pretrain.switch_step=100000"], "pretrain.switch_step"),
        (["pretrain.optimizer=sgd"], "pretrain.optimizer"),
        (["data.languages=[en, xx]"], "data.languages"),
        (["data.source=local", "data.local_dir=/no/such/dir"], "data.local_dir"),
        (["pretrain.stepz=3"], "pretrain"),
        (["pretrain.steps=many"], "pretrain.steps"),
        (["finetune.tasks=[xnli, squad2]"], "finetune.tasks"),
        (["data.probe_languages=[fr]"], "data.probe_languages"),
    ],
)
def test_impossible_configs_fail_naming_the_field_and_a_fix(override, field):
    with pytest.raises(ConfigError) as err:
        load_preset("tiny", override)
    message = str(err.value)
    assert message.startswith(field)
    assert "Fix:" in message


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_preset("huge")


def test_overrides_change_values_with_yaml_types():
    p = load_preset("tiny", ["pretrain.steps=10", "pretrain.switch_step=2", "pretrain.peak_lr=0.5"])
    assert p.pretrain.steps == 10 and p.pretrain.switch_step == 2 and p.pretrain.peak_lr == 0.5
