"""common/memory.py: the parameter count against the model itself, the estimate against a measured peak,
and the refusals (memory beyond the machine's, bf16 or compile without a GPU) with their override."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from common.config import ConfigError, load_preset
from common.memory import (GB, HEADROOM, PLAN_PARTS, check_resources, estimate_peak, model_dimensions, parameter_count,
                           plan_memory)
from common.modeling import build_model
from common.paths import REPO_ROOT
from conftest import free_port, load_stage, pretrain_args

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


def test_fsdp_shards_every_term_but_the_activations_and_adds_what_it_gathers():
    """Hand computation: under fsdp on W ranks each rank holds 1/W of the weights, gradients, rows and
    optimizer state, runs b / W sequences a pass, and gathers the root and blocks unsharded."""
    small = load_preset("small", CPU_SMALL)
    replicate = estimate_peak(small, "presence")
    fsdp = estimate_peak(load_preset("small", CPU_SMALL + ["distributed.strategy=fsdp"]), "presence", world_size=4)
    for part in ("weights", "gradients", "gradient_rows", "optimizer", "activations"):
        assert getattr(fsdp, part) == pytest.approx(getattr(replicate, part) / 4), part
    d, f, hk, V = 512, 1024, 6 * 64, 32000
    encoder, decoder = 4 * d * hk + 3 * d * f + 2 * d, 8 * d * hk + 3 * d * f + 3 * d
    root = 76_830_080 - 8 * (encoder + decoder)
    assert root == 2 * V * d + 2 * 32 * 6 + 2 * d  # embedding, output layer, the two bias tables, final norms
    assert fsdp.gathered == pytest.approx(4 * (2 * root + 3 * decoder))
    chunked = estimate_peak(load_preset("small", CPU_SMALL + ["pretrain.microbatch_chunks=4"]), "presence")
    assert chunked.activations == pytest.approx(replicate.activations / 4)


def test_a_plan_that_does_not_fit_names_a_setting_that_fits():
    paper = load_preset("paper")
    with pytest.raises(ConfigError, match=r"needs 230.0 GB per device > 72.0 GB. Fix: --set pretrain.microbatch_chunks=4 "
                                          r"\(63.3 GB per device\)$"):
        plan_memory(paper, "presence", "microbatch", 8, 80 * GB)
    fitted = estimate_peak(load_preset("paper", ["pretrain.microbatch_chunks=4"]), "presence", world_size=8, gpu=True)
    assert fitted.total / GB == pytest.approx(63.3, abs=0.05)
    with pytest.raises(ConfigError, match="8 microbatches cannot be shared by 32 processes.*distributed.strategy=fsdp"):
        plan_memory(paper, "presence", "microbatch", 32, 80 * GB)
    estimate, text = plan_memory(load_preset("paper", ["distributed.strategy=fsdp"]), "presence", "microbatch", 32,
                                 80 * GB)
    assert text.splitlines()[-1] == f"  total         {estimate.total / GB:8.2f} of 90% of 80 GB"


def test_pretrain_plans_the_paper_preset_without_building_it(capsys):
    pretrain = load_stage("03_pretrain/pretrain.py")
    plan = pretrain.main(pretrain.parse_args(["--preset", "paper", "--plan-memory", "--device-memory-gb", "80",
                                              "--nproc", "8", "--set", "distributed.strategy=fsdp"]))
    assert plan["total"] == pytest.approx(sum(plan[part] for part in PLAN_PARTS))
    assert "strategy fsdp" in capsys.readouterr().out


SHAPES = ["model.d_model=256", "model.d_ff=1024", "model.num_layers=4", "model.num_decoder_layers=4",
          "model.num_heads=4", "model.d_kv=64", "pretrain.batch_size=16", "pretrain.num_microbatches=4"]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("baseline", []), ("presence", ["pretrain.microbatch_chunks=2"]),
                                           ("presence", ["model.family=gpt2"]), ("presence", ["per=sample"])])
def test_the_model_terms_are_within_a_quarter_of_the_tensors_a_measured_step_holds(method, extra):
    """Two steps at 13M parameters against the peak of live tensor bytes in tests/measure_step_memory.py (the
    CPU allocator's count under the profiler, which is what the model terms stand for). Measured here: -3%
    (baseline), -3% (PRESENCE, 2 chunks), +11% (GPT-2), +13% (per sample). Not the resident set: its growth
    beyond the start also holds the code pages of the kernels the first steps run and the C allocator's
    slack, which differ between machines (the baseline's was 0.27-0.29 GB on one machine and 0.42 GB on
    another, against 0.20 estimated)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "measure_step_memory.py"), method,
                             "peak=tensors", *SHAPES, *extra], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.splitlines()[-1])["measured"]
    per = "sample" if "per=sample" in extra else "microbatch"
    estimate = estimate_peak(load_preset("tiny", SHAPES + [x for x in extra if x != "per=sample"]), method, per)
    assert abs(estimate.total - estimate.runtime - measured) < measured / 4, (estimate, measured)


def measured_rank_peak(*arguments: str) -> int:
    """tests/measure_step_memory.py under torchrun with 2 gloo processes: the larger rank's peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), str(REPO_ROOT / "tests" / "measure_step_memory.py"), *arguments], env=env,
                            capture_output=True, text=True, timeout=600)
    # A crashed rank's own message (e.g. gloo's "what(): ...") comes before torchrun's long report.
    cause = [line for line in result.stderr.splitlines() if re.search(r"what\(\)|Error|terminate", line)]
    assert result.returncode == 0, "\n".join(cause[:10]) + "\n" + result.stderr[-1500:]
    peaks = [int(found) for found in re.findall(r'\{"measured": (\d+)\}', result.stdout)]
    assert len(peaks) == 2, result.stdout[-2000:]
    return max(peaks)


@pytest.mark.slow
def test_under_fsdp_what_a_rank_adds_with_more_layers_or_rows_is_within_half_of_the_estimate():
    """fsdp on 2 processes, PRESENCE per microbatch: a rank's peak with twice the layers, and with four times
    the rows, against the estimate's increase (the increase, since at these shapes a rank's fixed costs,
    FSDP2's and gloo's buffers among them, outweigh the model: 0.47 GB measured against 0.23 estimated).
    Measured here: +237 MB against +164 (layers), +181 against +167 (rows)."""
    shapes = ["model.d_model=256", "model.d_ff=1024", "model.num_heads=4", "model.d_kv=64",
              "pretrain.num_microbatches=4", "distributed.strategy=fsdp"]
    small = ["model.num_layers=4", "model.num_decoder_layers=4", "pretrain.batch_size=16"]
    deeper = ["model.num_layers=8", "model.num_decoder_layers=8", "pretrain.batch_size=16"]
    wider = ["model.num_layers=4", "model.num_decoder_layers=4", "pretrain.batch_size=64"]
    estimate = {name: estimate_peak(load_preset("tiny", shapes + grown), "presence", world_size=2).total
                for name, grown in (("small", small), ("deeper", deeper), ("wider", wider))}
    measured = {name: measured_rank_peak("presence", *shapes, *grown)
                for name, grown in (("small", small), ("deeper", deeper), ("wider", wider))}
    for grown in ("deeper", "wider"):
        added, expected = measured[grown] - measured["small"], estimate[grown] - estimate["small"]
        assert abs(expected - added) < added / 2, (grown, added, expected)
