"""Stage scripts end a known error with one line and exit status 2, and a bug with its traceback: the rule of
common/cli.py, checked on the rule itself, on a real stage script run as a user runs it, and on every script's
`__main__` guard."""
import ast
import os
import subprocess
import sys

import pytest

from common.cli import exit_on_known_errors, is_known_error
from common.config import ConfigError
from common.data.corpus import CorpusError
from common.evaluation.xtreme import XtremeDataError
from common.paths import REPO_ROOT
from common.runinfo import RunExistsError

STAGE_SCRIPTS = sorted(p for stage in REPO_ROOT.glob("0[1-5]_*") for p in stage.glob("*.py")
                       if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("error, known", [
    (ConfigError("pretrain.steps: must be positive. Fix: set a positive step count"), True),
    (RunExistsError("runs/x already holds a run. Fix: pass --resume"), True),
    (XtremeDataError("xnli/test-de.tsv, line 3: unknown label"), True),  # a project class needs no marker
    (CorpusError("no text for sw"), True),
    (FileNotFoundError("data_manifest.json is missing. Fix: run make data"), True),
    (OSError("cannot load the tokenizer. Fix: run prepare_data.py"), True),
    (ValueError("3 training examples cannot fill a batch. Fix: lower finetune.batch_size"), True),
    (ValueError("math domain error"), False),  # a library's ValueError: a bug until a message says the fix
    (FileNotFoundError("[Errno 2] No such file or directory: 'x'"), False),
    (KeyError("Fix: this is not a message for users"), False),
    (RuntimeError("CUDA error. Fix: nothing here"), False),
])
def test_which_errors_are_known(error, known):
    assert is_known_error(error) is known


def test_a_known_error_exits_2_and_a_bug_keeps_its_exception(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_known_errors():
            raise ConfigError("preset: unknown preset 'tinny'. Fix: use one of ['tiny']")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: preset: unknown preset 'tinny'. Fix: use one of ['tiny']")
    with pytest.raises(KeyError):
        with exit_on_known_errors():
            raise KeyError("step")


@pytest.mark.parametrize("returncode, status", [(2, 2), (1, 1), (-15, 143)])
def test_a_failed_child_script_passes_its_status_on(returncode, status, capsys):
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_known_errors():
            raise subprocess.CalledProcessError(returncode, ["python", "03_pretrain/pretrain.py", "--seed", "0"])
    assert exit_info.value.code == status
    assert f"03_pretrain/pretrain.py --seed 0 failed with status {returncode}" in capsys.readouterr().err
    with pytest.raises(subprocess.CalledProcessError):  # its output was captured: nobody has seen it yet
        with exit_on_known_errors():
            raise subprocess.CalledProcessError(1, ["python", "x.py"], output="", stderr="Traceback ...")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_a_stage_script_prints_a_known_error_as_one_line_and_a_bug_as_a_traceback():
    result = _run(["04_finetune/finetune_all.py", "--preset", "no-such-preset"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "finetune_all.py: error: preset: unknown preset 'no-such-preset'. Fix: use one of "
        f"{sorted(p.stem for p in (REPO_ROOT / 'presets').glob('*.yaml'))} or a path to a preset YAML file"]
    bug = _run(["-c", "from common.cli import exit_on_known_errors\nwith exit_on_known_errors():\n    {}['step']"])
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'step'" in bug.stderr


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_script_runs_main_inside_the_wrapper(script):
    guard = next(node for node in ast.parse(script.read_text()).body if isinstance(node, ast.If)
                 and ast.unparse(node.test) == "__name__ == '__main__'")
    wrapped = [node for node in ast.walk(guard) if isinstance(node, ast.With)
               and ast.unparse(node.items[0].context_expr) == "exit_on_known_errors()"]
    assert wrapped, f"{script}: run main() inside `with exit_on_known_errors():`"
    calls = [ast.unparse(node.func) for node in ast.walk(wrapped[0]) if isinstance(node, ast.Call)]
    assert "main" in calls, f"{script}: main() must run inside the wrapper"


SAVE_AND_LOAD = """
import sys
from transformers import T5Config, T5ForConditionalGeneration
from common.cli import exit_on_known_errors
config = T5Config(vocab_size=64, d_model=8, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=1, d_kv=8)
def main():
    T5ForConditionalGeneration(config).save_pretrained(sys.argv[1])
    T5ForConditionalGeneration.from_pretrained(sys.argv[1])
if sys.argv[2] == "wrapped":
    with exit_on_known_errors():
        main()
else:
    main()
"""


@pytest.mark.parametrize("wrapped", [True, False], ids=["inside exit_on_known_errors", "without it"])
def test_library_progress_bars_stay_out_of_a_log(tmp_path, wrapped):
    """stderr to a pipe, as in a log: transformers draws a bar per model saved and loaded, unless the
    script runs inside exit_on_known_errors (every stage script does)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # set in this process by the wrapper the tests above ran
    result = subprocess.run([sys.executable, "-c", SAVE_AND_LOAD, str(tmp_path / "model"),
                             "wrapped" if wrapped else "bare"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    bars = [name for name in ("Writing model shards", "Loading weights") if name in result.stderr]
    assert bars == ([] if wrapped else ["Writing model shards", "Loading weights"])
