"""The benchmark scripts' own logic (their end-to-end runs are in test_gpu_checks.py)."""
import argparse

import pytest

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
