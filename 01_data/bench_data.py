"""Benchmark: how fast span corruption + batching (SpanCorruptionBatches.batch) delivers tokens on this
CPU, side by side with how fast the small preset's pre-training consumes them on one GPU.

    python 01_data/bench_data.py --preset tiny     # the tiny shapes and the small preset's shapes
    python 01_data/bench_data.py --preset small

Tokens are counted the same way on both sides: batch x (input_length + target_length) per step.
The GPU side is the fastest consumption measured for a plain Hugging Face T5 training step at mT5-small
dimensions on one NVIDIA H200 (transformers 5.17, torch 2.11, bf16, torch.compile, batch 512 of 512 + 114
tokens): 929k tokens/s, so the ratio is a lower bound for the small preset. The loader runs on synthetic rows in a temporary data folder (same code path as real data).
Writes results/<preset>/bench/data_throughput.csv.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import exit_on_known_errors
from common.config import load_preset
from common.io import write_csv, write_json
from common.data.packed_data import MANIFEST, PackedWriter, SpanCorruptionBatches
from common.paths import results_dir
from common.data.span_corruption import compute_input_and_target_lengths

GPU_TOKENS_PER_SECOND = 929_000  # plain HF T5 step, mT5-small dims, bf16 + compile, one H200 (see docstring)
ROWS = 8192  # synthetic rows in the benchmark's data folder
VOCAB = 32_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    p.add_argument("--steps", type=int, default=30, help="timed batches per shape (after 3 warm-up batches)")
    return p.parse_args(argv)


def synthetic_data_dir(folder: Path, input_length: int, seed: int) -> None:
    raw, target = compute_input_and_target_lengths(input_length)
    rows = np.random.default_rng(seed).integers(3, VOCAB - 100, size=(ROWS, raw))
    with PackedWriter(folder / "packed" / "train.bin", raw, 1, np.uint16) as writer:
        writer.add([rows.ravel()])  # one long document: ROWS full rows (its EOS is dropped with the partial row)
        writer.end_language()
    (folder / "packed" / "heldout.bin").write_bytes(b"")
    np.save(folder / "packed" / "heldout_language.npy", np.zeros(0, np.int16))
    write_json(folder / MANIFEST, {
        "languages": ["xx"], "input_length": input_length, "target_length": target, "raw_length": raw,
        "eos_id": 1, "pad_id": 0, "first_sentinel_id": VOCAB - 1, "vocab_size": VOCAB, "noise_density": 0.15,
        "mean_noise_span_length": 3.0, "token_dtype": "uint16", "sampling_probabilities": {"xx": 1.0},
        "splits": {"train": {"rows": writer.rows_per_language[0]}, "heldout": {"rows": 0}},
        "per_language": {"xx": {"train_rows": writer.rows_per_language[0]}}, "tokenizer": "none"})


def time_batches(input_length: int, batch_size: int, steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_data_dir(Path(tmp), input_length, seed)
        loader = SpanCorruptionBatches(tmp, "train", batch_size, seed)
        for step in range(3):
            loader.batch(step)
        seconds = []
        for step in range(3, 3 + steps):
            start = time.perf_counter()
            loader.batch(step)
            seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    tokens = batch_size * (loader.input_length + loader.target_length)
    return {"batch_size": batch_size, "input_length": loader.input_length, "target_length": loader.target_length,
            "tokens_per_batch": tokens, "median_s_per_batch": round(median, 6),
            "cpu_tokens_per_s": round(tokens / median), "gpu_tokens_per_s_small_preset": GPU_TOKENS_PER_SECOND,
            "ratio_cpu_over_gpu": round(tokens / median / GPU_TOKENS_PER_SECOND, 2)}


def main(preset: str = "tiny", overrides: list[str] | None = None, steps: int = 30) -> list[dict]:
    config = load_preset(preset, overrides)
    small = load_preset("small")
    shapes = {config.name: (config.data.input_length, config.pretrain.batch_size),
              "small": (small.data.input_length, small.pretrain.batch_size)}
    rows = []
    for name, (input_length, batch_size) in shapes.items():
        row = {"preset": config.name, "shapes_of": name, **time_batches(input_length, batch_size, steps, seed=0),
               "torch_threads": torch.get_num_threads(), "seed": 0}
        rows.append(row)
        print(f"{name:>6} shapes: batch {batch_size} x ({row['input_length']} + {row['target_length']}) | "
              f"CPU {row['cpu_tokens_per_s'] / 1e6:.1f}M tokens/s | GPU consumption {GPU_TOKENS_PER_SECOND / 1e6:.2f}M "
              f"tokens/s | CPU / GPU = {row['ratio_cpu_over_gpu']}x")
    path = results_dir(config.name, "bench") / "data_throughput.csv"
    write_csv(path, rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    args = parse_args()
    with exit_on_known_errors():
        main(args.preset, args.set, args.steps)
