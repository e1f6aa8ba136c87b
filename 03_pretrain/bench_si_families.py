"""Per-sample self-influence on each model family beside an ordinary backward pass, on the CPU.

For T5, GPT-2, Llama and BERT as the pipeline builds them (common.modeling.build_model: untied output
layers), at one small shape (random weights, float32), and the layer sets "first" and "all", two calls are
timed round-robin (every round runs each once, so the machine's load hits them alike):
  plain   model(**batch).loss.backward() with only the layer set requiring grad: what the ordinary
          gradient over those parameters costs
  ours    common.presence.influence.batch_self_influence(model, batch, layers): the B per-sample scores
`ratio` is ours / plain within each round, the median over rounds (q1, q3: its quartiles), of wall-clock
times; `cpu_ratio` the same of this process's CPU times, which other jobs on the cores disturb less; times
are the medians in ms. Batches: B rows of `--length` tokens; causal LMs take the loss on every token, BERT
on 15% of them, T5 reads `--length` input tokens and predicts a quarter as many.

    python 03_pretrain/bench_si_families.py                          # ~1 min, one thread
    python 03_pretrain/bench_si_families.py --out results/tiny/bench/si_families.csv
    python 03_pretrain/bench_si_families.py --d-model 256 --num-layers 4 --batch-size 32 --length 256 --vocab-size 4000 \\
        --repeats 5 --out results/tiny/bench/si_families_medium.csv   # the medium shape, ~12 min
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from common.benchmark import median_ms, paired_ratio_quartiles, round_robin_seconds, write_benchmark_csv
from common.cli import exit_on_known_errors
from common.config import ModelConfig
from common.modeling import build_model, random_batch
from common.presence.influence import batch_self_influence, layer_set

FAMILIES = ("t5", "gpt2", "llama", "bert")
LAYER_SETS = ("first", "all")
COLUMNS = ["family", "layers", "batch_size", "length", "d_model", "num_layers", "vocab_size", "threads", "rounds",
           "plain_ms", "ours_ms", "ratio", "ratio_q1", "ratio_q3", "cpu_ratio", "seed"]


@dataclass
class Config:
    batch_size: int = 16  # rows per batch
    length: int = 64  # tokens per row (T5: input tokens)
    d_model: int = 128  # hidden size; feed-forward 4x, heads of 32
    num_layers: int = 2  # blocks per stack
    vocab_size: int = 1000
    repeats: int = 7  # timed rounds (median); one untimed warm-up round before
    threads: int = 1  # one: the cores are shared with other jobs, and small matmuls gain little from more
    seed: int = 0
    out: str | None = None  # CSV path; none: print only


def build(family: str, cfg: Config) -> torch.nn.Module:
    """The family's model as the pipeline builds it (common.modeling.build_model: untied output layer)."""
    heads = max(1, cfg.d_model // 32)
    model_cfg = ModelConfig(family=family, d_model=cfg.d_model, d_ff=4 * cfg.d_model, num_layers=cfg.num_layers,
                            num_decoder_layers=cfg.num_layers, num_heads=heads, d_kv=cfg.d_model // heads)
    return build_model(model_cfg, cfg.vocab_size, positions=cfg.length)


def plain_backward(model: torch.nn.Module, inputs: dict, params: list[torch.nn.Parameter]):
    chosen = set(params)
    everything = list(model.parameters())

    def run():
        for p in everything:
            p.requires_grad_(p in chosen)
            p.grad = None
        model(**inputs).loss.backward()
        for p in everything:
            p.requires_grad_(True)
    return run


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for family in FAMILIES:
        torch.manual_seed(cfg.seed)
        model = build(family, cfg).eval()
        inputs = random_batch(family, cfg.batch_size, cfg.length, max(1, cfg.length // 4), cfg.vocab_size, "cpu", g)
        for layers in LAYER_SETS:
            params = layer_set(model, layers)
            fns = {"plain": plain_backward(model, inputs, params),
                   "ours": lambda: batch_self_influence(model, inputs, layers)}
            round_robin_seconds(fns, 1, "cpu")  # warm-up: lazy initialisation, the tape's plan
            wall, cpu = round_robin_seconds(fns, cfg.repeats, "cpu")
            q1, ratio, q3 = paired_ratio_quartiles(wall["ours"], wall["plain"])
            cpu_ratio = paired_ratio_quartiles(cpu["ours"], cpu["plain"])[1]
            median = median_ms(wall)
            rows.append({"family": family, "layers": layers, "batch_size": cfg.batch_size, "length": cfg.length,
                         "d_model": cfg.d_model, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
                         "threads": cfg.threads, "rounds": cfg.repeats, "plain_ms": round(median["plain"], 2),
                         "ours_ms": round(median["ours"], 2), "ratio": round(ratio, 3), "ratio_q1": round(q1, 3),
                         "ratio_q3": round(q3, 3), "cpu_ratio": round(cpu_ratio, 3), "seed": cfg.seed})
            print(f"{family:6} {layers:6} plain {median['plain']:8.1f} ms | ours {median['ours']:8.1f} ms | "
                  f"ours / plain {ratio:.2f} ({q1:.2f}-{q3:.2f}), CPU time {cpu_ratio:.2f}")
    if cfg.out:
        write_benchmark_csv(rows, COLUMNS, cfg.out, "tiny", "si_families.csv")
    return {"rows": rows}


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(Config()).items():
        p.add_argument("--" + name.replace("_", "-"), type=int if isinstance(default, int) else str, default=default)
    return Config(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())
