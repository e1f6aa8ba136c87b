"""The repository layout the README promises: stages are folders that never import each other."""
import re

import pytest

from common.paths import REPO_ROOT

STAGES = ["01_data", "02_si_analysis", "03_pretrain", "04_finetune", "05_figures"]


def test_layout_exists():
    for name in STAGES + ["common", "results", "tests", "presets", ".ci"]:
        assert (REPO_ROOT / name).is_dir(), name
    for name in ["environment.yml", "pyproject.toml", "Makefile", "README.md", ".ci/run"]:
        assert (REPO_ROOT / name).is_file(), name


@pytest.mark.parametrize("stage", STAGES)
def test_stages_are_not_packages_and_do_not_import_each_other(stage):
    folder = REPO_ROOT / stage
    assert not (folder / "__init__.py").exists()
    assert (folder / "README.md").is_file(), f"{stage} needs a README (inputs, outputs, command, time)"
    others = [s for s in STAGES if s != stage]
    for script in folder.glob("*.py"):
        text = script.read_text()
        for other in others:
            imports_other = re.search(rf"^\s*(import|from)\s+\S*{other}|spec_from_file_location\(.*{other}", text, re.M)
            assert not imports_other, f"{script} imports {other}: hand over through files instead"
