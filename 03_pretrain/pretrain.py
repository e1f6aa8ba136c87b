"""Pre-train a T5/mT5 model from scratch with span corruption: the baseline, PRESENCE, or an ablation.

    python 03_pretrain/pretrain.py --preset tiny --method presence --seed 0
    python 03_pretrain/pretrain.py --preset tiny --method presence-single --tau 2
    python 03_pretrain/pretrain.py --preset tiny --method presence --steps 100 --resume   # continue a run
    torchrun --nproc_per_node 8 03_pretrain/pretrain.py --preset paper --method presence --seed 0

Methods (common/presence/reweighting.py defines their temperature schedules): baseline, presence (tau=+1 up
to step I, then -1), presence-D, presence-I, presence-I-D, presence-single (--tau), presence-linear,
presence-cosine, and presence-sequential / presence-sequential-reverse (the baseline recipe on the
lowest- / highest-self-influence part of the data, scored by 03_pretrain/score_candidates.py).
--per sample reweights samples instead of microbatches; --si-layers picks the layer set.

Writes results/<preset>/pretrain/runs/<run>/ (config, environment, train_log.csv, metrics) and
artefacts/<preset>/pretrain/<run>/ (checkpoints/ to resume, snapshots/ for 02, final/ for 04).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from common.config import ConfigError, load_preset
from common.distributed import broadcast_parameters
from common.io import append_csv_row, read_csv, write_csv, write_json
from common.modeling import build_model, model_flops_per_sequence, parameter_counts, peak_tflops
from common.optim import build_optimizer
from common.data.packed_data import SpanCorruptionBatches, load_data_manifest, load_tokenizer_from_data
from common.paths import artefacts_dir, results_dir
from common.presence.reweighting import METHODS as REWEIGHTING_METHODS
from common.presence.reweighting import tau_schedule
from common.runinfo import prepare_run_dir, write_run_files
from common.seeding import seed_everything
from common.presence.train_step import train_step

# PRESENCE-Sequential filters the data offline and then trains with the baseline recipe.
SEQUENTIAL_METHODS = ("presence-sequential", "presence-sequential-reverse")
METHODS = REWEIGHTING_METHODS + SEQUENTIAL_METHODS
LOG_COLUMNS = ["step", "loss", "lr", "tau", "si_mean", "si_std", "max_weight", "weight_entropy",
               "tokens_seen", "seconds", "heldout_loss", "seed"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    p.add_argument("--method", default="presence", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override pretrain.steps")
    p.add_argument("--switch-step", type=int, help="override I, the step where tau changes")
    p.add_argument("--tau", type=float, help="temperature of presence-single")
    p.add_argument("--per", choices=["microbatch", "sample"], default="microbatch",
                   help="reweight microbatches (the paper) or samples (extension)")
    p.add_argument("--si-layers", help="override pretrain.si_layers: first | embeddings | all")
    p.add_argument("--run-name", help="default: derived from the method and options")
    p.add_argument("--out", help="run folder for logs and metrics (default results/<preset>/pretrain/runs/<run>)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    return p.parse_args(argv)


def get_config(args):
    overrides = list(args.set)
    for flag, field in ((args.steps, "steps"), (args.switch_step, "switch_step"), (args.si_layers, "si_layers")):
        if flag is not None:
            overrides.append(f"pretrain.{field}={flag}")
    preset = load_preset(args.preset, overrides)
    if args.method not in METHODS:
        raise ConfigError(f"--method: unknown method {args.method!r}. Fix: use one of {', '.join(METHODS)}")
    if args.method == "presence-single" and args.tau is None:
        raise ConfigError("--tau: presence-single needs a temperature. Fix: pass e.g. --tau 2")
    if args.tau is not None and args.method != "presence-single":
        raise ConfigError(f"--tau: only presence-single takes a temperature, not {args.method}. Fix: drop --tau")
    if (args.method == "baseline" or args.method in SEQUENTIAL_METHODS) and args.per == "sample":
        raise ConfigError(f"--per: {args.method} does not reweight online. Fix: drop --per sample")
    return preset


def default_run_name(args) -> str:
    parts = [args.method]
    if args.tau is not None:
        parts.append(f"tau{args.tau:+g}")
    if args.switch_step is not None:
        parts.append(f"I{args.switch_step}")
    if args.per == "sample":
        parts.append("per-sample")
    if args.si_layers is not None:
        parts.append(f"si-{args.si_layers}")
    parts.append(f"s{args.seed}")
    return "-".join(parts)


def init_distributed():
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_rows(args, preset, data_dir: Path, num_rows: int) -> np.ndarray | None:
    """The training-row subset for PRESENCE-Sequential (None = all rows): keep the lowest-SI share
    of the candidates, or, for -reverse, drop it (the paper's Table 2)."""
    if args.method not in SEQUENTIAL_METHODS:
        return None
    scores_path = artefacts_dir(preset.name, "pretrain", "sequential", f"scores-s{args.seed}.npy")
    if not scores_path.is_file():
        raise FileNotFoundError(f"{scores_path} is missing. Fix: run 03_pretrain/score_candidates.py --preset "
                                f"{preset.name} --seed {args.seed} (or make pretrain, which does it)")
    scores = np.load(scores_path)
    if len(scores) != num_rows:
        raise ValueError(f"{scores_path} scores {len(scores)} rows but the data has {num_rows}. Fix: re-run "
                         "score_candidates.py after rebuilding the data")
    order = np.argsort(scores, kind="stable")
    keep = int(round(preset.pretrain.sequential_keep_fraction * num_rows))
    return np.sort(order[:keep] if args.method == "presence-sequential" else order[num_rows - keep:])


def split_microbatches(batch: dict, num_microbatches: int, rank: int, world: int, device) -> list[dict]:
    """This rank's contiguous share of the global batch's microbatches, moved to the device."""
    per_rank = num_microbatches // world
    size = batch["input_ids"].shape[0] // num_microbatches
    rows = slice(rank * per_rank * size, (rank + 1) * per_rank * size)
    local = {k: v[rows].to(device, non_blocking=True) for k, v in batch.items()}
    return [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(per_rank)]


@torch.no_grad()
def heldout_loss(model, heldout: SpanCorruptionBatches, num_batches: int, device, autocast) -> float:
    model.eval()
    losses = []
    for step in range(num_batches):
        batch = {k: v.to(device) for k, v in heldout.batch(step).items()}
        with autocast():
            losses.append(model(**batch).loss.float())
    model.train()
    return torch.stack(losses).mean().item()


def weight_stats(stats) -> dict[str, float]:
    if stats.weights is None:
        return {"si_mean": "", "si_std": "", "max_weight": "", "weight_entropy": ""}
    w = stats.weights.double()
    return {"si_mean": stats.scores.double().mean().item(), "si_std": stats.scores.double().std(unbiased=False).item(),
            "max_weight": w.max().item(), "weight_entropy": -(w * w.clamp_min(1e-300).log()).sum().item()}


def truncate_log(path: Path, last_step: int) -> None:
    """A resumed run continues the per-step log from its checkpoint, dropping rows written after it."""
    if path.exists():
        rows = [r for r in read_csv(path) if int(r["step"]) <= last_step]
        write_csv(path, rows, LOG_COLUMNS)


def save_final(model, tokenizer, folder: Path, info: dict) -> None:
    tmp = folder.with_name(".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "presence_run.json", info)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(args: argparse.Namespace) -> dict:
    preset = get_config(args)
    cfg = preset.pretrain
    rank, world, device = init_distributed()
    if cfg.num_microbatches % world:
        raise ConfigError(f"pretrain.num_microbatches: {cfg.num_microbatches} microbatches cannot be shared by "
                          f"{world} processes. Fix: use a process count that divides it")
    run_name = args.run_name or default_run_name(args)
    run_dir = Path(args.out) if args.out else results_dir(preset.name, "pretrain") / "runs" / run_name
    store = artefacts_dir(preset.name, "pretrain", run_dir.name)
    main_process = rank == 0
    if main_process:
        prepare_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
        if args.overwrite and not args.resume:
            shutil.rmtree(store, ignore_errors=True)

    # Data, tokenizer, model, optimizer
    data_dir = artefacts_dir(preset.name, "data")
    manifest = load_data_manifest(data_dir)
    tokenizer = load_tokenizer_from_data(data_dir)
    train = SpanCorruptionBatches(data_dir, "train", cfg.batch_size, seed=args.seed)
    rows = training_rows(args, preset, data_dir, train.num_rows)
    if rows is not None:
        train = SpanCorruptionBatches(data_dir, "train", cfg.batch_size, seed=args.seed, rows=rows)
    heldout = SpanCorruptionBatches(data_dir, "heldout", cfg.batch_size // cfg.num_microbatches, seed=12345)
    seed_everything(args.seed)
    model = build_model(preset.model, manifest["vocab_size"]).to(device)
    broadcast_parameters(model)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    schedule = None if args.method in SEQUENTIAL_METHODS else tau_schedule(
        args.method, tau_direct=cfg.tau_direct, tau_inverse=cfg.tau_inverse, switch_step=cfg.switch_step,
        total_steps=cfg.steps, tau=args.tau)
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    step_model = torch.compile(model) if cfg.compile and device.type == "cuda" and args.per == "microbatch" else model

    start_step, elapsed, tokens_seen = 0, 0.0, 0
    log_path = run_dir / "train_log.csv"
    if args.resume and (ckpt := latest_checkpoint(store / "checkpoints")):
        start_step, extra = load_checkpoint(ckpt, model, optimizer, scheduler)
        elapsed, tokens_seen = extra["seconds"], extra["tokens_seen"]
        if main_process:
            truncate_log(log_path, start_step)
            print(f"resumed {run_dir.name} from {ckpt} at step {start_step}")
    elif main_process and log_path.exists():
        log_path.unlink()
    if main_process:
        write_run_files(run_dir, {"run_name": run_dir.name, "method": args.method, "seed": args.seed,
                                  "tau": args.tau, "per": args.per, "world_size": world,
                                  "training_rows": None if rows is None else len(rows),
                                  "preset": preset.to_dict()})

    flops_per_sequence = model_flops_per_sequence(model, manifest["input_length"], manifest["target_length"])
    flops_per_step = flops_per_sequence * cfg.batch_size
    snapshot_steps = {max(1, round(f * cfg.steps)) for f in preset.si_analysis.checkpoint_fractions} - {cfg.steps}
    bar = tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps, disable=not main_process,
               desc=run_dir.name, dynamic_ncols=True)
    timed_steps, timed_seconds, timed_tokens = 0, 0.0, 0
    # The next batch is cut on a thread while the device runs this step (small preset: ~12 ms of CPU per
    # batch by 01_data/bench_data.py); batches are a pure function of the step, so only timing changes.
    loader = ThreadPoolExecutor(max_workers=1)
    upcoming = loader.submit(train.batch, start_step)
    for step in bar:
        t0 = time.perf_counter()
        batch = upcoming.result()
        if step < cfg.steps:
            upcoming = loader.submit(train.batch, step)
        microbatches = split_microbatches(batch, cfg.num_microbatches, rank, world, device)
        tau = None if schedule is None else schedule.tau_at(step)
        try:
            stats, lr = train_step(step_model, microbatches, tau, optimizer, scheduler, layers=cfg.si_layers,
                                   per=args.per, autocast_dtype=autocast_dtype, grad_clip=cfg.grad_clip)
        except FloatingPointError as error:
            raise FloatingPointError(
                f"{error} at step {step} of {run_dir.name}; nothing was saved after the last good checkpoint "
                f"in {store / 'checkpoints'}. Fix: lower pretrain.peak_lr or use --set pretrain.grad_clip=1.0, "
                "then re-run with --resume") from error
        if device.type == "cuda" and step % cfg.log_every == 0:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        elapsed += seconds
        step_tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        tokens_seen += step_tokens
        if step > start_step + 3:  # the first steps pay for compilation and warm-up
            timed_steps += 1
            timed_seconds += seconds
            timed_tokens += step_tokens

        if not main_process:
            continue
        row = {"step": step, "loss": stats.loss, "lr": lr, "tau": "" if tau is None else tau,
               **weight_stats(stats), "tokens_seen": tokens_seen, "seconds": round(elapsed, 3), "heldout_loss": "",
               "seed": args.seed}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["heldout_loss"] = heldout_loss(model, heldout, cfg.eval_batches, device, autocast)
        append_csv_row(log_path, row, LOG_COLUMNS)
        if step % cfg.log_every == 0:
            tok_s = tokens_seen / max(elapsed, 1e-9)
            # refresh=False: tqdm redraws at its own interval, with a current step count
            bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            tqdm.write(f"step {step} | loss {stats.loss:.4f} | lr {lr:.2e} | tau {row['tau']} | "
                       f"{seconds:.3f} s/step")
        if step in snapshot_steps:
            save_final(model, tokenizer, store / "snapshots" / f"step-{step}",
                       {"run_name": run_dir.name, "method": args.method, "seed": args.seed, "step": step})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(store / "checkpoints", step, model, optimizer, scheduler,
                            {"seconds": elapsed, "tokens_seen": tokens_seen})
    loader.shutdown()
    if world > 1:
        dist.barrier()

    metrics = {"run_name": run_dir.name, "method": args.method, "seed": args.seed, "steps": cfg.steps,
               "wall_seconds": elapsed, "tokens_seen": tokens_seen, "device": str(device), "world_size": world,
               "parameters": parameter_counts(model)}
    if timed_steps:  # throughput of the steps after warm-up, without evaluation and checkpointing
        step_s = timed_seconds / timed_steps
        metrics.update(seconds_per_step=step_s, tokens_per_second=timed_tokens / timed_seconds,
                       model_tflops=flops_per_step / step_s / 1e12)
        if peak := peak_tflops(device):
            metrics["mfu"] = metrics["model_tflops"] / (peak * world)
        if device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if main_process:
        log = read_csv(log_path)  # the whole run's, also when it was resumed
        evals = [float(r["heldout_loss"]) for r in log if r["heldout_loss"]]
        metrics["final_heldout_loss"] = evals[-1] if evals else None
        metrics["final_loss"] = float(np.mean([float(r["loss"]) for r in log[-cfg.log_every:]]))
        save_final(model, tokenizer, store / "final", {"run_name": run_dir.name, "method": args.method,
                                                        "seed": args.seed, "preset": preset.name, "steps": cfg.steps})
        write_json(run_dir / "metrics.json", metrics)
    if world > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main(parse_args())
