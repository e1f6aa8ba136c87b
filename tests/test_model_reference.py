"""A --checkpoint that is neither a folder nor a hub model id fails at once, listing the finished runs,
instead of a minute of hub retries (02_si_analysis and 04_finetune share the rule)."""
import argparse

import pytest

from common.config import load_preset
from common.modeling import looks_like_hub_id, require_model
from conftest import load_stage


@pytest.mark.parametrize("name, plausible", [
    ("google/mt5-small", True), ("google-t5/t5-small", True), ("facebook/xlm-roberta_large.v2", True),
    ("t5-small", False),  # no owner: the hub serves such names by redirect, but so would a mistyped run name
    ("baseline-s0", False), ("./google/mt5-small", False), ("/abs/path/final", False),
    ("artefacts/tiny/pretrain/run/final", False), ("a--b/c", False), ("a/b..c", False), ("-a/b", False),
])
def test_which_names_are_hub_ids(name, plausible):
    assert looks_like_hub_id(name) is plausible


def test_owner_name_under_a_local_folder_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert not looks_like_hub_id("runs/final") and looks_like_hub_id("google/final")


def test_require_model_lists_the_finished_runs(tmp_path):
    run = tmp_path / "baseline-s0" / "final"
    run.mkdir(parents=True)
    require_model(str(run), [run], "tiny")
    require_model("google/mt5-small", [run], "tiny")
    with pytest.raises(FileNotFoundError, match=rf"--checkpoint {run}x: no such folder.*runs of preset tiny: {run}\."):
        require_model(f"{run}x", [run], "tiny")


def test_si_analysis_refuses_a_mistyped_checkpoint_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path))
    final = tmp_path / "tiny" / "pretrain" / "baseline-s0" / "final"
    final.mkdir(parents=True)
    (final / "presence_run.json").write_text("{}")
    stage = load_stage("02_si_analysis/analyze_si.py")
    args = argparse.Namespace(checkpoint=str(final.parent / "fnal"), run="baseline-s0")
    with pytest.raises(FileNotFoundError, match=rf"no such folder, and not a hub model id.*{final}"):
        stage.checkpoints(args, load_preset("tiny"))
    assert stage.checkpoints(argparse.Namespace(checkpoint="google/mt5-base", run=None), load_preset("tiny")) == [
        ("google/mt5-base", None, "google/mt5-base")]
