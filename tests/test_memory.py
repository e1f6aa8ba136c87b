"""common/memory.py: the parameter count against the model itself, the estimate against a measured peak,
and the refusals (memory beyond the machine's, bf16 or compile without a GPU) with their override."""
import json
import os
import subprocess
import sys

import pytest
import torch

from common.config import ConfigError, load_preset
from common.memory import GB, HEADROOM, check_resources, estimate_peak, model_dimensions, parameter_count
from common.modeling import build_model
from common.paths import REPO_ROOT
from conftest import load_stage, pretrain_args

CPU_SMALL = ["pretrain.precision=fp32", "pretrain.compile=false"]  # the small preset without its GPU settings


@pytest.mark.parametrize("name, overrides", [("tiny", []), ("small", []), ("tiny", ["model.tie_word_embeddings=true"]),
                                             ("tiny", ["model.d_kv=8", "model.num_decoder_layers=3"])])
def test_the_parameter_count_is_the_models(name, overrides):
    preset = load_preset(name, overrides)
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(preset.model, preset.data.tokenizer.vocab_size)
    assert parameter_count(model_dimensions(preset))[0] == sum(p.numel() for p in model.parameters())


def test_presence_per_microbatch_adds_one_gradient_row_per_microbatch():
    small = load_preset("small", CPU_SMALL)
    presence, baseline = estimate_peak(small, "presence"), estimate_peak(small, "baseline")
    assert presence.gradient_rows == 8 * presence.weights and baseline.gradient_rows == 0
    assert presence.total - baseline.total == pytest.approx(8 * 4 * 76_830_080)
    assert estimate_peak(small, "presence", world_size=2).gradient_rows == 4 * presence.weights  # 4 per rank
    bf16 = estimate_peak(load_preset("small"), "presence", gpu=True)
    assert bf16.activations == pytest.approx(presence.activations / 2)


def test_tiny_is_far_below_a_small_machine_and_small_is_beyond_a_24_gb_one():
    tiny = estimate_peak(load_preset("tiny"), "presence").total
    assert tiny < 1 * GB
    check_resources(load_preset("tiny"), "presence", gpu=False, available=4 * GB)  # a 4 GB laptop
    assert estimate_peak(load_preset("small", CPU_SMALL), "presence").total > 24 * GB  # killed at 24 GB resident


def test_a_run_beyond_the_machine_is_refused_with_the_estimate_and_the_override():
    small = load_preset("small", CPU_SMALL)
    total = estimate_peak(small, "presence").total
    with pytest.raises(ConfigError) as error:
        check_resources(small, "presence", gpu=False, available=22.4 * GB)
    assert str(error.value) == (
        f"preset small: estimated peak memory {total / GB:.1f} GB > {HEADROOM * 22.4:.1f} GB available on this "
        "machine (cpu: 90% of its 22.4 GB free). Fix: use a GPU / a smaller preset, or pass --set "
        "pretrain.memory_check=false to try anyway")
    assert check_resources(load_preset("small", CPU_SMALL + ["pretrain.memory_check=false"]), "presence", gpu=False,
                           available=22.4 * GB) is None
    assert check_resources(small, "presence", gpu=True, available=139 * GB).total == pytest.approx(total)


def test_gpu_settings_without_a_gpu_are_refused_unless_overridden():
    with pytest.raises(ConfigError, match=r"^preset small: pretrain.precision bf16 and pretrain.compile need a GPU, "
                                          r"and torch finds none on this machine. Fix: use a GPU, or a preset for "
                                          r"the CPU \(tiny\), or pass --set pretrain.memory_check=false"):
        check_resources(load_preset("small"), "presence", gpu=False, available=1000 * GB)
    assert check_resources(load_preset("small", ["pretrain.memory_check=false"]), "presence", gpu=False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the small preset may run")
def test_pretrain_refuses_the_small_preset_on_a_cpu_before_anything_starts(tmp_path):
    pretrain = load_stage("03_pretrain/pretrain.py")
    with pytest.raises(ConfigError, match="preset small: .*need a GPU"):
        pretrain.main(pretrain.parse_args(["--preset", "small", "--method", "presence", "--out", str(tmp_path / "r")]))
    assert not (tmp_path / "r").exists()


MEASURED_RUN = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["baseline", "presence"])
def test_the_estimate_of_a_miniature_run_is_within_a_third_of_its_measured_peak(tmp_path, artefacts, method):
    """pretrain.py as a user runs it, on the miniature data; its peak resident set size (getrusage) against
    the estimate for the same settings (there, the runtime term is nearly all of it)."""
    args = pretrain_args(tmp_path, "run", "--method", method)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURED_RUN, str(REPO_ROOT / "03_pretrain" / "pretrain.py"), *args],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = int(result.stdout.split("peak_rss_bytes")[-1])
    sets = [args[i + 1] for i, word in enumerate(args) if word == "--set"]
    estimate = estimate_peak(load_preset("tiny", sets), method).total
    assert abs(estimate - measured) < measured / 3, json.dumps({"estimate": estimate, "measured": measured})
