"""Presets load into validated configs; impossible configurations fail at once, naming the field."""
import dataclasses
import re

import pytest

from common.config import ConfigError, available_presets, load_preset
from common.paths import PRESETS_DIR


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
        (["pretrain.switch_step=-1"], "pretrain.switch_step"),
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


def test_a_variant_changes_only_what_it_states_and_keeps_its_own_name(tmp_path):
    tiny = load_preset("tiny")
    variant_file = tmp_path / "longer.yaml"
    variant_file.write_text("base: tiny\npretrain:\n  steps: 400\n  switch_step: 40\n"
                            "data:\n  tokenizer:\n    vocab_size: 3000\n")
    variant = load_preset(str(variant_file))
    assert variant.name == "longer"
    assert (variant.pretrain.steps, variant.pretrain.switch_step) == (400, 40)
    assert variant.data.tokenizer.vocab_size == 3000
    assert variant.data.tokenizer.training_chars == tiny.data.tokenizer.training_chars  # merged, not replaced
    # Everything not stated is tiny's, field by field.
    expected = tiny.to_dict()
    expected["name"], expected["description"] = "longer", ""
    expected["pretrain"].update(steps=400, switch_step=40)
    expected["data"]["tokenizer"]["vocab_size"] = 3000
    assert variant.to_dict() == expected


def test_a_variant_chain_that_loops_fails_with_a_fix(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_preset(str(tmp_path / "a.yaml"))


def test_the_committed_variants_load_and_keep_ten_percent_switch():
    x10 = load_preset(str(PRESETS_DIR / "variants" / "tiny_x10.yaml"))
    tiny = load_preset("tiny")
    assert x10.name == "tiny_x10" and x10.model == tiny.model
    # the same data, plus a noisy copy of the training rows for the known-noise experiment
    assert x10.data.noise_rates == [0.2] and dataclasses.replace(x10.data, noise_rates=[]) == tiny.data
    assert x10.pretrain.steps == 10 * tiny.pretrain.steps
    assert x10.pretrain.switch_step / x10.pretrain.steps == tiny.pretrain.switch_step / tiny.pretrain.steps


def test_floats_written_as_yaml_1_1_reads_them_are_numbers(tmp_path):
    """PyYAML reads 1e6 and 1e-3 (no dot) as strings; float fields take them as numbers."""
    preset = load_preset("tiny", ["pretrain.peak_lr=1e6", "finetune.lr=1e-3", "data.alpha=3E-1"])
    assert (preset.pretrain.peak_lr, preset.finetune.lr, preset.data.alpha) == (1e6, 1e-3, 0.3)
    variant = tmp_path / "v.yaml"
    variant.write_text("base: tiny\npretrain:\n  peak_lr: 5e-3\nsi_analysis:\n  checkpoint_fractions: [1e-1, 1]\n")
    preset = load_preset(str(variant))
    assert preset.pretrain.peak_lr == 5e-3 and preset.si_analysis.checkpoint_fractions == [0.1, 1.0]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf", "1e999"])
def test_non_finite_values_are_refused(value):
    with pytest.raises(ConfigError, match="pretrain.peak_lr: .* is not a finite number. Fix:"):
        load_preset("tiny", [f"pretrain.peak_lr={value}"])


@pytest.mark.parametrize("override, field", [("data.seed=-1", "data.seed"), ("pretrain.seeds=[0, -2]", "pretrain.seeds[1]"),
                                             ("finetune.seed=-3", "finetune.seed")])
def test_negative_seeds_are_refused(override, field):
    with pytest.raises(ConfigError, match=re.escape(field) + ": -[0-9] is negative. Fix:"):
        load_preset("tiny", [override])


def test_a_field_set_twice_is_refused():
    with pytest.raises(ConfigError, match="pretrain.steps: set twice .'pretrain.steps=5' and ' pretrain.steps=abc'.*Fix"):
        load_preset("tiny", ["pretrain.steps=5", " pretrain.steps=abc"])


@pytest.mark.parametrize("override, expected", [
    ("pretrain.steps=many", "pretrain.steps: expected int, got 'many'. Fix: give an integer such as 200"),
    ("pretrain.compile=maybe", "pretrain.compile: expected bool, got 'maybe'. Fix: give true or false"),
    ("pretrain.optimizer=3", "pretrain.optimizer: expected str, got 3. Fix: give a text value"),
])
def test_a_value_of_the_wrong_type_says_what_the_field_takes(override, expected):
    with pytest.raises(ConfigError) as err:
        load_preset("tiny", [override])
    assert str(err.value) == expected
