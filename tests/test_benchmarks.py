"""The benchmark scripts' own logic and common/benchmark.py (end-to-end runs: test_gpu_checks.py and
test_bench_si_peers.py)."""
import argparse

import pytest
import torch

from common import benchmark
from conftest import load_stage
from tiny_t5 import tiny_t5

bench_si = load_stage("03_pretrain/bench_si.py")
bench_train = load_stage("03_pretrain/bench_train.py")


def test_naive_loop_is_skipped_when_its_per_sample_buffer_cannot_fit(monkeypatch):
    model = tiny_t5()  # float64
    need = 512 * sum(p.numel() for p in model.parameters()) * 8
    monkeypatch.setattr(bench_si, "_available_ram_bytes", lambda: need / 0.7 * 1.01)
    fits, _ = bench_si.naive_buffer_fits(512, model, "cpu")
    assert fits
    monkeypatch.setattr(bench_si, "_available_ram_bytes", lambda: need / 0.7 * 0.99)
    fits, why = bench_si.naive_buffer_fits(512, model, "cpu")
    assert not fits and f"{need / 2**30:.1f} GiB" in why


def test_shapes_parse_and_bad_ones_say_the_format():
    assert bench_train.parse_shape("8x64") == (8, 64)
    assert bench_train.parse_shape("2X16") == (2, 16)
    for bad in ("8", "8x", "x64", "0x64", "8x-1", "ax b"):
        with pytest.raises(argparse.ArgumentTypeError, match="8x64|positive"):
            bench_train.parse_shape(bad)


def test_round_robin_interleaves_caps_slow_variants_and_takes_medians(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["now"])
    calls = []
    durations = {"a": iter([3.0, 1.0, 2.0, 9.0]), "b": iter([5.0, 4.0, 6.0, 5.0]), "slow": iter([7.0, 8.0])}

    def variant(name):
        def call():
            calls.append(name)
            clock["now"] += next(durations[name])
        return call

    wall_ms, _ = benchmark.time_round_robin({name: variant(name) for name in durations}, 4, "cpu",
                                           slow={"slow": 2})
    assert calls == ["a", "b", "slow", "a", "b", "slow", "a", "b", "a", "b"]
    assert wall_ms == {"a": 2500.0, "b": 5000.0, "slow": 7500.0}  # medians of (3, 1, 2, 9), (5, 4, 6, 5), (7, 8)


def test_paired_ratios_are_taken_round_by_round():
    # Rounds where b took 2, 4, 8, 16 s and a 1, 4, 4, 32 s: per-round ratios 0.5, 1, 0.5, 2, sorted
    # 0.5, 0.5, 1, 2; inclusive quartiles at positions 0.75, 1.5 and 2.25 of that list.
    q1, median, q3 = benchmark.paired_ratio_quartiles([1.0, 4.0, 4.0, 32.0], [2.0, 4.0, 8.0, 16.0])
    assert (q1, median, q3) == (0.5, 0.75, 1.25)
    assert benchmark.paired_ratio_quartiles([3.0], [2.0]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        benchmark.paired_ratio_quartiles([1.0, 2.0], [1.0])


def test_matmul_rate_is_two_n_cubed_over_the_fastest_product(monkeypatch):
    """A fake clock: the products take 4, 2 and 3 s; 2 x 16^3 FLOPs over the fastest (2 s)."""
    times = iter([0.0, 4.0, 10.0, 12.0, 20.0, 23.0])
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(times))
    assert benchmark.matmul_tflops("cpu", torch.float32, size=16, repeats=3) == pytest.approx(2 * 16 ** 3 / 2.0 / 1e12)
    assert benchmark.mfu_ceiling_tflops("cpu") is None  # MFU only on GPUs


def test_status_fields_are_read_and_a_missing_one_is_named(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1234 kB\n")
    assert benchmark.status_kb("VmRSS", str(status)) == 1234
    with pytest.raises(OSError, match="VmSwap not in"):
        benchmark.status_kb("VmSwap", str(status))


@pytest.mark.skipif(not benchmark.can_measure_cpu_memory(), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_is_the_memory_a_call_touches():
    size_mb = 64
    peak = benchmark.peak_memory_mb(lambda: torch.ones(size_mb * 2**18), "cpu")  # float32: 4 bytes each
    assert size_mb * 0.95 <= peak < size_mb * 1.5  # resident pages, not bytes: a few may be resident already


def test_fresh_process_runs_with_returned_memory_and_the_repository_importable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import json, os, sys\nimport common.paths\n"
                      "print('noise')\nprint(json.dumps([os.environ['MALLOC_MMAP_THRESHOLD_'], sys.argv[1:]]))\n")
    assert benchmark.fresh_process_json(str(script), ["--a", "1"]) == ["4096", ["--a", "1"]]
    script.write_text("raise SystemExit('child failed on purpose')\n")
    with pytest.raises(RuntimeError, match="child failed on purpose"):
        benchmark.fresh_process_json(str(script), [])
