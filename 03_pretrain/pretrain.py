"""Pre-train a T5/mT5 model from scratch with span corruption: the baseline, PRESENCE, a control or an ablation.

    python 03_pretrain/pretrain.py --preset tiny --method presence --seed 0
    python 03_pretrain/pretrain.py --preset tiny --method presence-shuffled          # the information control
    python 03_pretrain/pretrain.py --preset tiny --method presence-single --tau 2
    python 03_pretrain/pretrain.py --preset tiny --method presence --steps 300 --resume   # continue a run to 300 steps
    python 03_pretrain/pretrain.py --preset presets/variants/tiny_x10.yaml --method noise-oracle --noise-rate 0.2
    torchrun --nproc_per_node 8 03_pretrain/pretrain.py --preset paper --method presence --seed 0

Methods (common/presence/reweighting.py defines their temperature schedules): baseline, presence (tau=+1 up
to step I, then -1), presence-shuffled (PRESENCE's schedule on scores permuted at random within each step:
the same weights, no information), presence-D, presence-I, presence-I-D, presence-single (--tau),
presence-linear, presence-cosine, presence-sequential / presence-sequential-reverse (the baseline recipe on
the lowest- / highest-self-influence part of the data, scored by 03_pretrain/score_candidates.py), and
noise-oracle (with --noise-rate: weight 0 on the rows known to be noisy, uniform on the others).
--per sample reweights samples instead of microbatches; --si-layers picks the layer set; --noise-rate
trains on the data with that share of the training rows corrupted (01_data, data.noise_rates).

Writes results/<preset>/pretrain/runs/<run>/ (config, environment, train_log.csv, heldout.csv,
heldout_rows.csv, noise_log.csv with --noise-rate, metrics.json) and artefacts/<preset>/pretrain/<run>/
(checkpoints/ to resume, snapshots/ for 02, final/ for 04). metrics.json comes last: a run is finished
when it is there.

Faults: one process at a time works on a run (a lock), and the artefacts folder is bound to the run
folder; a non-finite loss, update or parameter stops the run with nothing of it applied or saved;
SIGTERM / Ctrl-C finish the step, save a checkpoint and exit with 128 + the signal; every stop prints the
command that resumes the run. --resume refuses another method, seed, preset, data or recipe, and applies
a changed schedule (steps, I, learning rate) from the checkpoint on, recorded in config.json's history.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import spearmanr
from tqdm import tqdm

from common.benchmark import mfu_ceiling_tflops
from common.checkpoint import (checkpoint_step, confirm_checkpoint, latest_checkpoint, load_checkpoint,
                               roll_back_checkpoint, save_checkpoint, save_model_folder)
from common.cli import exit_on_known_errors
from common.config import LAYER_SETS, ConfigError, check_seed, load_preset
from common.data.noise import noise_shares
from common.data.packed_data import (SpanCorruptionBatches, check_files, load_data_manifest, load_tokenizer_from_data,
                                     recorded_files)
from common.distributed import broadcast_parameters
from common.evaluation.heldout import HELDOUT_COLUMNS, HELDOUT_SEED, heldout_rows, row_losses, summarise
from common.io import append_csv_row, read_csv, read_json, remove_interrupted_writes, write_csv, write_json
from common.memory import check_resources
from common.modeling import IGNORE_INDEX, build_model, model_flops_per_sequence, parameter_counts
from common.optim import apply_schedule, build_optimizer
from common.paths import artefacts_dir, results_dir
from common.presence.influence import self_influence
from common.presence.reweighting import METHODS as REWEIGHTING_METHODS
from common.presence.reweighting import SHUFFLED_METHODS, kish_effective_count, tau_schedule
from common.reporting.stats import auroc
from common.runinfo import bind_store, config_changes, prepare_run_dir, run_lock, write_run_files
from common.seeding import seed_everything
from common.signals import StopRequests
from common.presence.train_step import train_step

# PRESENCE-Sequential filters the data offline and then trains with the baseline recipe.
SEQUENTIAL_METHODS = ("presence-sequential", "presence-sequential-reverse")
ORACLE_METHODS = ("noise-oracle",)
METHODS = REWEIGHTING_METHODS + SEQUENTIAL_METHODS + ORACLE_METHODS
LOG_COLUMNS = ["step", "loss", "lr", "tau", "si_mean", "si_std", "max_weight", "weight_entropy", "kish_n",
               "z_variance_share", "noisy_batch_share", "noisy_weight_share", "si_noise_auroc",
               "mb_si_noise_spearman", "tokens_seen", "seconds", "heldout_loss", "seed"]
NOISE_LOG_COLUMNS = ["step", "kind", "batch_share", "weight_share", "si_auroc", "seed"]
# What --resume may change: the schedule (applied from the checkpoint on) and how often the run logs,
# evaluates and saves; each change is recorded in config.json's "history". Any other difference (method,
# seed, preset, data, model, the rest of the recipe) would make it another run and is refused.
RESUMABLE_CHANGES = tuple(f"preset.pretrain.{name}" for name in (
    "steps", "switch_step", "peak_lr", "warmup_steps", "log_every", "eval_every", "save_every", "noise_log_every",
    "eval_batch_size", "compile")) + ("world_size",)
NOT_PART_OF_THE_RUN = ("history", "preset.description", "preset.si_analysis", "preset.finetune",
                       "preset.pretrain.seeds", "preset.pretrain.reproduce_methods")


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
    p.add_argument("--si-layers", choices=LAYER_SETS, help="override pretrain.si_layers (the layer set K)")
    p.add_argument("--noise-rate", type=float, default=0.0,
                   help="train on the rows with this share corrupted (one of data.noise_rates)")
    p.add_argument("--run-name", help="default: derived from the method and options")
    p.add_argument("--out", help="run folder for logs and metrics (default results/<preset>/pretrain/runs/<run>)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--verify-data", action="store_true",
                   help="hash every data file against its manifest first (the sizes are always checked)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    return p.parse_args(argv)


# ---- set-up -------------------------------------------------------------------------------------------------

def get_config(args):
    check_seed(args.seed, "--seed")
    overrides = list(args.set)
    for flag, field_name in ((args.steps, "steps"), (args.switch_step, "switch_step"), (args.si_layers, "si_layers")):
        if flag is not None:
            key = f"pretrain.{field_name}"
            if any(item.split("=", 1)[0].strip() == key for item in args.set):
                raise ConfigError(f"--{field_name.replace('_', '-')}: --set {key} sets it too. Fix: give it once")
            overrides.append(f"{key}={flag}")
    preset = load_preset(args.preset, overrides)
    if args.method not in METHODS:
        raise ConfigError(f"--method: unknown method {args.method!r}. Fix: use one of {', '.join(METHODS)}")
    if args.method == "presence-single" and args.tau is None:
        raise ConfigError("--tau: presence-single needs a temperature. Fix: pass e.g. --tau 2")
    if args.tau is not None and not math.isfinite(args.tau):
        raise ConfigError(f"--tau: {args.tau} is not a finite number. Fix: pass e.g. --tau 2")
    if args.tau is not None and args.method != "presence-single":
        raise ConfigError(f"--tau: only presence-single takes a temperature, not {args.method}. Fix: drop --tau")
    if args.method in ("baseline",) + SEQUENTIAL_METHODS + ORACLE_METHODS and args.per == "sample":
        raise ConfigError(f"--per: {args.method} does not reweight by self-influence. Fix: drop --per sample")
    if args.noise_rate and args.noise_rate not in preset.data.noise_rates:
        raise ConfigError(f"--noise-rate: {args.noise_rate:g} is not among data.noise_rates "
                          f"{preset.data.noise_rates}. Fix: add it there and run 01_data/prepare_data.py")
    if args.method in ORACLE_METHODS and not args.noise_rate:
        raise ConfigError(f"--method {args.method} needs noisy data to drop. Fix: pass --noise-rate")
    if args.noise_rate and args.method in SEQUENTIAL_METHODS:
        raise ConfigError("--noise-rate: PRESENCE-Sequential scores the clean data. Fix: drop --noise-rate")
    check_resources(preset, args.method, args.per)
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
    if args.noise_rate:
        parts.append(f"noise{args.noise_rate:g}")
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


def training_rows(args, preset, num_rows: int) -> np.ndarray | None:
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


@dataclass
class Data:
    manifest: dict
    tokenizer: object
    train: SpanCorruptionBatches
    heldout: SpanCorruptionBatches
    heldout_ids: np.ndarray  # the held-out rows every evaluation scores
    training_rows: int | None  # Sequential's kept rows
    checksums: dict | None  # sha256 of every data file the run reads (None: built before they were recorded)


def get_data(args, preset) -> Data:
    cfg = preset.pretrain
    data_dir = artefacts_dir(preset.name, "data")
    manifest = load_data_manifest(data_dir)
    files = recorded_files(data_dir, args.noise_rate)
    check_files(data_dir, files, full=args.verify_data)
    train = SpanCorruptionBatches(data_dir, "train", cfg.batch_size, seed=args.seed, noise_rate=args.noise_rate)
    rows = training_rows(args, preset, train.num_rows)
    if rows is not None:
        train = SpanCorruptionBatches(data_dir, "train", cfg.batch_size, seed=args.seed, rows=rows)
    heldout = SpanCorruptionBatches(data_dir, "heldout", 1, seed=HELDOUT_SEED)
    return Data(manifest, load_tokenizer_from_data(data_dir), train, heldout,
                heldout_rows(heldout.num_rows, cfg.eval_rows), None if rows is None else len(rows),
                None if files is None else {name: record["sha256"] for name, record in files.items()})


@dataclass
class Method:
    """How a step forms its update: tau schedule (None: unweighted), shuffled scores, or fixed weights."""
    name: str
    per: str
    seed: int
    schedule: object | None
    shuffled: bool
    oracle: bool

    def step_options(self, step: int, noise_labels: np.ndarray | None) -> dict:
        options = {"tau": None if self.schedule is None else self.schedule.tau_at(step), "per": self.per}
        if self.shuffled:  # a pure function of (seed, step): a resumed run draws the same permutations
            options["shuffle_seed"] = int(np.random.SeedSequence([self.seed, 7, step]).generate_state(1)[0])
        if self.oracle:
            clean = noise_labels == 0
            if not clean.any():
                raise ValueError(f"step {step}: every row of the batch is noisy; the oracle has nothing to keep. "
                                 "Fix: lower the noise rate or raise pretrain.batch_size")
            options["sample_weights"] = torch.from_numpy(clean / clean.sum())
        return options


def get_method(args, cfg) -> Method:
    online = args.method not in SEQUENTIAL_METHODS + ORACLE_METHODS
    schedule = tau_schedule(args.method, tau_direct=cfg.tau_direct, tau_inverse=cfg.tau_inverse,
                            switch_step=cfg.switch_step, total_steps=cfg.steps, tau=args.tau) if online else None
    return Method(args.method, args.per, args.seed, schedule, args.method in SHUFFLED_METHODS,
                  args.method in ORACLE_METHODS)


# ---- the run folder: one process and one store per run, resuming --------------------------------------------

@dataclass
class Progress:
    step: int = 0
    elapsed: float = 0.0  # training seconds, without evaluation and checkpoint writing
    tokens_seen: int = 0
    timed_steps: int = 0  # steps after the warm-up, for the throughput figures
    timed_seconds: float = 0.0
    timed_tokens: int = 0
    si_aurocs: list = field(default_factory=list)
    unverified: bool = False  # the latest checkpoint awaits a finite step after it (common/checkpoint.py)


@dataclass
class Run:
    name: str
    dir: Path
    store: Path  # checkpoints, snapshots, final model
    method: str
    seed: int
    main: bool  # rank 0 writes the logs and checkpoints

    @property
    def checkpoints(self) -> Path:
        return self.store / "checkpoints"


@contextlib.contextmanager
def claim_run(args, preset, rank: int) -> Iterator[Run]:
    """The run's folders, held for the block: its artefacts folder is locked (one process per run) and bound
    to the run folder (artefacts are stored by the run's name, --out can repeat a name), and leftovers of
    interrupted writes are removed."""
    run_name = args.run_name or default_run_name(args)
    run_dir = Path(args.out) if args.out else results_dir(preset.name, "pretrain") / "runs" / run_name
    run = Run(run_dir.name, run_dir, artefacts_dir(preset.name, "pretrain", run_dir.name), args.method,
              args.seed, rank == 0)
    if not run.main:
        yield run
        return
    with run_lock(run.store):
        if previous_owner := bind_store(run.store, run.dir, take_over=args.overwrite and not args.resume):
            print(f"--overwrite: {run.store} held the checkpoints of the run in {previous_owner}; they are replaced")
        prepare_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
        if args.overwrite and not args.resume:
            for old in ("checkpoints", "snapshots", "final"):
                shutil.rmtree(run.store / old, ignore_errors=True)
        remove_interrupted_writes(run.dir)
        remove_interrupted_writes(run.store)
        yield run


def run_config(args, preset, run: Run, data: Data, world: int) -> dict:
    """What config.json records; a resume compares it with the run's own."""
    return {"run_name": run.name, "method": args.method, "seed": args.seed, "tau": args.tau, "per": args.per,
            "noise_rate": args.noise_rate, "world_size": world, "training_rows": data.training_rows,
            "data_sha256": data.checksums, "preset": preset.to_dict(), "history": []}


def maybe_resume(args, preset, run: Run, config: dict, model, optimizer, scheduler) -> Progress:
    """With --resume and a checkpoint: continue from it, refusing a config that would make it another run;
    a changed schedule takes effect and is recorded in config["history"]. Else start at step 0."""
    progress = Progress()
    checkpoint = latest_checkpoint(run.checkpoints) if args.resume else None
    if checkpoint is not None:
        previous = previous_config(run)
        changes = resume_changes(previous, config, checkpoint_step(checkpoint))
        progress.step, extra = load_checkpoint(checkpoint, model, optimizer, scheduler)
        apply_schedule(optimizer, scheduler, preset.pretrain.peak_lr)
        progress.elapsed, progress.tokens_seen = extra["seconds"], extra["tokens_seen"]
        progress.si_aurocs = list(extra.get("si_aurocs", []))
        progress.unverified = True
        config["history"] = previous.get("history", []) + [
            {"resumed_at_step": progress.step, "changes": {key: list(values) for key, values in changes.items()}}]
        if run.main:
            print(f"resumed {run.name} from {checkpoint} at step {progress.step}"
                  + "".join(f"; {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()))
    if run.main:
        start_outputs(run, progress.step)
    return progress


def previous_config(run: Run) -> dict:
    path = run.dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} is missing, so the settings of the run are unknown. Fix: "
                                "start the run anew with --overwrite")
    return read_json(path)


def resume_changes(previous: dict, config: dict, step: int) -> dict:
    """What a resume changes in the run's config.json, once nothing differs that would make it another run."""
    changes = {key: values for key, values in config_changes(previous, config).items()
               if not key.startswith(NOT_PART_OF_THE_RUN)}
    refused = [f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in changes if key not in RESUMABLE_CHANGES]
    if refused:
        raise ConfigError(f"--resume: the run was made with other settings ({'; '.join(refused)}). A resumed run "
                          f"may change only {', '.join(key.split('.')[-1] for key in RESUMABLE_CHANGES)}. Fix: "
                          "resume with the run's own settings (its config.json), or start another run "
                          "(--run-name, or --overwrite)")
    steps = config["preset"]["pretrain"]["steps"]
    if steps < step:
        raise ConfigError(f"pretrain.steps: the run has reached step {step}, beyond the {steps} asked for. Fix: ask "
                          f"for at least {step} steps")
    return changes


def start_outputs(run: Run, step: int) -> None:
    """The logs continue from `step` (start afresh at 0), and the run counts as unfinished until finish()
    is done: its metrics.json and final model go."""
    if step:
        truncate_logs(run.dir, step)
    else:
        for name in ("train_log.csv", "heldout.csv", "noise_log.csv", "heldout_rows.csv"):
            (run.dir / name).unlink(missing_ok=True)
    (run.dir / "metrics.json").unlink(missing_ok=True)
    shutil.rmtree(run.store / "final", ignore_errors=True)


def truncate_logs(run_dir: Path, last_step: int) -> None:
    """A resumed run continues its logs from its checkpoint, dropping rows written after it."""
    for name, columns in (("train_log.csv", LOG_COLUMNS), ("heldout.csv", HELDOUT_COLUMNS),
                          ("noise_log.csv", NOISE_LOG_COLUMNS)):
        path = run_dir / name
        if path.exists():
            write_csv(path, [r for r in read_csv(path) if int(r["step"]) <= last_step], columns)


# ---- logging, evaluation, checkpoints -----------------------------------------------------------------------

def weight_stats(stats) -> dict:
    if stats.weights is None:
        return {"si_mean": "", "si_std": "", "max_weight": "", "weight_entropy": "", "kish_n": "",
                "z_variance_share": ""}
    w = stats.weights.double()
    row = {"max_weight": w.max().item(), "weight_entropy": -(w * w.clamp_min(1e-300).log()).sum().item(),
           "kish_n": kish_effective_count(w), "si_mean": "", "si_std": "",
           "z_variance_share": "" if stats.variance_share is None else stats.variance_share}
    if stats.scores is not None:
        row.update(si_mean=stats.scores.double().mean().item(), si_std=stats.scores.double().std(unbiased=False).item())
    return row


def row_weights(stats, per: str, batch_size: int) -> np.ndarray:
    """The weight each row of the batch had in the update (summing to 1): uniform without weights, the
    sample weights as they are, a microbatch's weight shared by its rows."""
    if stats.weights is None:
        return np.full(batch_size, 1 / batch_size)
    w = stats.weights.double().numpy()
    return w if len(w) == batch_size else np.repeat(w / (batch_size // len(w)), batch_size // len(w))


def probe_self_influence(model, microbatches, method: Method, step: int, every: int, layers) -> np.ndarray | None:
    """Per-sample self-influence of the batch with the parameters the step starts from, every `every`
    steps (the noise experiment's detector measure); per-sample PRESENCE computes it anyway."""
    if step % every or method.per == "sample":
        return None
    return torch.cat([self_influence(model, mb, layers=layers, per="sample") for mb in microbatches]).cpu().numpy()


def noise_row(stats, labels: np.ndarray, kinds: list[str], method: Method, si, step: int, run) -> dict:
    """The step's noise columns of train_log.csv (si: per-sample self-influence of the batch, or None);
    the per-kind rows go to noise_log.csv."""
    weights = row_weights(stats, method.per, len(labels))
    shares = noise_shares(labels, weights, len(kinds))
    aurocs = {k: auroc(si[labels == k] if k else si[labels > 0], si[labels == 0]) if si is not None else ""
              for k in shares}
    for k, (batch_share, weight_share) in shares.items():
        append_csv_row(run.dir / "noise_log.csv", {"step": step, "kind": kinds[k - 1] if k else "all",
                                                   "batch_share": batch_share, "weight_share": weight_share,
                                                   "si_auroc": aurocs[k], "seed": method.seed}, NOISE_LOG_COLUMNS)
    spearman = ""
    if stats.scores is not None and method.per == "microbatch":
        per_microbatch = (labels > 0).reshape(len(stats.scores), -1).mean(1)
        if np.ptp(per_microbatch) > 0:
            spearman = float(spearmanr(stats.scores.numpy(), per_microbatch).statistic)
    return {"noisy_batch_share": shares[0][0], "noisy_weight_share": shares[0][1], "si_noise_auroc": aurocs[0],
            "mb_si_noise_spearman": spearman}


def evaluate(model, data: Data, cfg, device, autocast, step: int, run, final: bool) -> float:
    """Held-out loss on the fixed rows: rows of heldout.csv (per language and "all"); at the end also the
    per-row losses (heldout_rows.csv), so that runs can be compared row by row."""
    losses, counts = row_losses(model, data.heldout, data.heldout_ids, cfg.eval_batch_size, device, autocast)
    languages = [data.manifest["languages"][i] for i in data.heldout.row_language[data.heldout_ids]]
    summary = summarise(losses, counts, languages, data.manifest["sampling_probabilities"])
    for row in summary:
        append_csv_row(run.dir / "heldout.csv", {"run": run.name, "method": run.method, "seed": run.seed,
                                                 "step": step, **row}, HELDOUT_COLUMNS)
    if final:
        write_csv(run.dir / "heldout_rows.csv", [{"row": int(r), "lang": lang, "n_tokens": int(c), "loss": loss}
                                                 for r, lang, c, loss in zip(data.heldout_ids, languages, counts,
                                                                             losses)])
    return summary[-1]["loss"]


def split_microbatches(batch: dict, num_microbatches: int, rank: int, world: int, device) -> list[dict]:
    """This rank's contiguous share of the global batch's microbatches, moved to the device."""
    per_rank = num_microbatches // world
    size = batch["input_ids"].shape[0] // num_microbatches
    rows = slice(rank * per_rank * size, (rank + 1) * per_rank * size)
    local = {k: v[rows].to(device, non_blocking=True) for k, v in batch.items()}
    return [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(per_rank)]


def throughput(progress: Progress, flops_per_step: float, device, world: int) -> dict:
    """Tokens/s, s/step, model TFLOP/s (and MFU, GPU memory on a GPU) over the steps after the warm-up."""
    if not progress.timed_steps:
        return {}
    step_s = progress.timed_seconds / progress.timed_steps
    out = {"seconds_per_step": step_s, "tokens_per_second": progress.timed_tokens / progress.timed_seconds,
           "model_tflops": flops_per_step / step_s / 1e12}
    if peak := mfu_ceiling_tflops(device):  # measured on this card now
        out.update(mfu=out["model_tflops"] / (peak * world), matmul_ceiling_tflops=peak)
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def save_due(step: int, cfg) -> bool:
    return step % cfg.save_every == 0 or step == cfg.steps


def save(run: Run, progress: Progress, model, optimizer, scheduler) -> None:
    save_checkpoint(run.checkpoints, progress.step, model, optimizer, scheduler,
                    {"seconds": progress.elapsed, "tokens_seen": progress.tokens_seen, "si_aurocs": progress.si_aurocs})
    progress.unverified = True


def maybe_save(args, preset, run: Run, data: Data, progress: Progress, model, optimizer, scheduler,
               snapshot_steps: set[int], world: int) -> None:
    """The step's snapshot (for 02) and checkpoint when due; parameters that are not finite stop the run."""
    step = progress.step
    try:
        if step in snapshot_steps:
            save_model_folder(run.store / "snapshots" / f"step-{step}", model, data.tokenizer,
                              {"run_name": run.name, "method": run.method, "seed": run.seed, "step": step})
        if save_due(step, preset.pretrain):
            save(run, progress, model, optimizer, scheduler)
    except FloatingPointError as error:
        raise diverged(args, preset, run, progress, step, world, error) from error


# ---- faults: blow-ups, full disks, stop signals -------------------------------------------------------------

def rerun_command(args, world: int, settings: dict | None = None, start_over: bool = False) -> str:
    """The command that resumes this run (or, with start_over, starts it anew); `settings`
    ({"pretrain.peak_lr": "0.001"}) replace any earlier setting of those fields."""
    settings = settings or {}
    words = (["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(world)]) + [
        "03_pretrain/pretrain.py", "--preset", args.preset, "--method", args.method, "--seed", str(args.seed)]
    for flag, value in (("--steps", args.steps), ("--switch-step", args.switch_step), ("--tau", args.tau),
                        ("--si-layers", args.si_layers), ("--noise-rate", args.noise_rate or None),
                        ("--run-name", args.run_name), ("--out", args.out)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if args.per != "microbatch":
        words += ["--per", args.per]
    kept = [item for item in args.set if item.split("=", 1)[0].strip() not in settings]
    for item in kept + [f"{key}={value}" for key, value in settings.items()]:
        words += ["--set", item]
    return shlex.join(words + ["--overwrite" if start_over else "--resume"])


def latest_step(run: Run) -> int | None:
    checkpoint = latest_checkpoint(run.checkpoints)
    return None if checkpoint is None else checkpoint_step(checkpoint)


def diverged(args, preset, run: Run, progress: Progress, step: int, world: int,
             error: Exception) -> FloatingPointError:
    """The error a non-finite step stops the run with, and its fix: a tenth of the learning rate (at most the
    preset's own), resumed from the last good checkpoint. A checkpoint that led straight to the failure is
    dropped first (common/checkpoint.py); if the step after a verified one fails, the run starts anew."""
    dropped = roll_back_checkpoint(run.checkpoints)[0] if run.main and progress.unverified else None
    resumed_from = latest_step(run)
    lower = {"pretrain.peak_lr": f"{min(preset.pretrain.peak_lr / 10, load_preset(args.preset).pretrain.peak_lr):g}"}
    start_over = resumed_from is not None and step == resumed_from + 1
    where = ("the run has to start anew" if start_over else "the run resumes from step 0" if resumed_from is None
             else f"the run resumes from its checkpoint of step {resumed_from}")
    return FloatingPointError(
        f"step {step} of {run.name}: {error}. Training stopped; nothing of this step was saved"
        f"{f', and checkpoint {dropped}, which led straight to it, was dropped' if dropped else ''}; {where}. "
        f"Fix: a lower learning rate: {rerun_command(args, world, lower, start_over)}")


def disk_error(args, run: Run, world: int, error: OSError) -> OSError:
    resumed_from = latest_step(run)
    kept = "no checkpoint was saved yet" if resumed_from is None else f"its checkpoint of step {resumed_from} is kept"
    return OSError(f"{error}. The run stopped; {kept}. Fix: make room on that disk (or mend what the error names), "
                   f"then: {rerun_command(args, world)}")


def stop_requested(stops: StopRequests, world: int, device) -> bool:
    """Whether a stop signal arrived, on any rank (all ranks must stop after the same step)."""
    received = stops.received is not None
    if world > 1:
        flag = torch.tensor([float(received)], device=device)
        dist.all_reduce(flag)
        received = flag.item() > 0
    return received


def stop(args, cfg, run: Run, progress: Progress, stops: StopRequests, model, optimizer, scheduler,
         world: int) -> NoReturn:
    """After a stop signal: the step is complete; save it (unless it was just saved), say how to resume, and
    exit with 128 + the signal's number."""
    signum = stops.received or signal.SIGTERM  # another rank received it
    if run.main:
        if not save_due(progress.step, cfg):
            save(run, progress, model, optimizer, scheduler)
        tqdm.write(f"{signal.Signals(signum).name}: {run.name} stopped after step {progress.step}, saved in "
                   f"{latest_checkpoint(run.checkpoints)}. Resume with: {rerun_command(args, world)}")
    raise SystemExit(128 + signum)


# ---- the run ------------------------------------------------------------------------------------------------

def train(args, preset, run: Run, data: Data, model, optimizer, scheduler, method: Method, progress: Progress,
          device, world: int, rank: int) -> None:
    cfg = preset.pretrain
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    step_model = torch.compile(model) if cfg.compile and device.type == "cuda" and args.per == "microbatch" else model
    snapshot_steps = {max(1, round(f * cfg.steps)) for f in preset.si_analysis.checkpoint_fractions} - {cfg.steps}
    train_data = data.train
    bar = tqdm(range(progress.step + 1, cfg.steps + 1), initial=progress.step, total=cfg.steps,
               disable=not run.main, desc=run.name, dynamic_ncols=True)
    # The next batch is cut on a thread while the device runs this step (small preset: ~12 ms of CPU per
    # batch by 01_data/bench_data.py); batches are a pure function of the step, so only timing changes.
    with ThreadPoolExecutor(max_workers=1) as loader, StopRequests() as stops:
        upcoming = loader.submit(train_data.batch, progress.step)
        first_step = progress.step + 1
        for step in bar:
            t0 = time.perf_counter()
            batch = upcoming.result()
            if step < cfg.steps:
                upcoming = loader.submit(train_data.batch, step)
            labels = None if train_data.noise_labels is None else \
                train_data.noise_labels[train_data.batch_rows(step - 1)]
            microbatches = split_microbatches(batch, cfg.num_microbatches, rank, world, device)
            probe_start = time.perf_counter()
            si = probe_self_influence(model, microbatches, method, step, cfg.noise_log_every, cfg.si_layers) \
                if labels is not None else None
            t0 += time.perf_counter() - probe_start  # the probe is measurement, not training: untimed
            options = method.step_options(step, labels)
            try:
                stats, lr = train_step(step_model, microbatches, optimizer=optimizer, scheduler=scheduler,
                                       layers=cfg.si_layers, autocast_dtype=autocast_dtype, grad_clip=cfg.grad_clip,
                                       **options)
            except FloatingPointError as error:
                raise diverged(args, preset, run, progress, step, world, error) from error
            if progress.unverified and run.main:  # the checkpoint before this finite step is good
                confirm_checkpoint(run.checkpoints)
            progress.unverified = False
            if device.type == "cuda" and step % cfg.log_every == 0:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            step_tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())
            progress.step, progress.elapsed, progress.tokens_seen = step, progress.elapsed + seconds, \
                progress.tokens_seen + step_tokens
            if step > first_step + 2:  # the first steps pay for compilation and warm-up
                progress.timed_steps += 1
                progress.timed_seconds += seconds
                progress.timed_tokens += step_tokens
            if run.main:
                log_step(args, cfg, run, data, model, method, progress, stats, lr, options, labels, si, seconds,
                         device, autocast, bar)
                maybe_save(args, preset, run, data, progress, model, optimizer, scheduler, snapshot_steps, world)
            if stop_requested(stops, world, device):
                stop(args, cfg, run, progress, stops, model, optimizer, scheduler, world)


def log_step(args, cfg, run: Run, data: Data, model, method: Method, progress: Progress, stats, lr: float,
             options: dict, labels, si, seconds: float, device, autocast, bar) -> None:
    """The step's row of train_log.csv (with the held-out loss every eval_every steps and the noise columns
    with --noise-rate) and, every log_every steps, one log line."""
    step = progress.step
    row = {"step": step, "loss": stats.loss, "lr": lr, "tau": "" if options["tau"] is None else options["tau"],
           **weight_stats(stats), "noisy_batch_share": "", "noisy_weight_share": "", "si_noise_auroc": "",
           "mb_si_noise_spearman": "", "tokens_seen": progress.tokens_seen, "seconds": round(progress.elapsed, 3),
           "heldout_loss": "", "seed": args.seed}
    if labels is not None:
        if method.per == "sample" and step % cfg.noise_log_every == 0:
            si = stats.scores.double().numpy()  # the step's own per-sample scores
        row.update(noise_row(stats, labels, data.train.noise_kinds, method, si, step, run))
        if row["si_noise_auroc"] != "" and np.isfinite(row["si_noise_auroc"]):
            progress.si_aurocs.append(row["si_noise_auroc"])
    if step % cfg.eval_every == 0 or step == cfg.steps:
        row["heldout_loss"] = evaluate(model, data, cfg, device, autocast, step, run, final=step == cfg.steps)
    append_csv_row(run.dir / "train_log.csv", row, LOG_COLUMNS)
    if step % cfg.log_every == 0:
        bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{progress.tokens_seen / max(progress.elapsed, 1e-9):,.0f}",
                        refresh=False)  # tqdm redraws at its own interval
        tqdm.write(f"step {step} | loss {stats.loss:.4f} | lr {lr:.2e} | tau {row['tau']} | {seconds:.3f} s/step")


def finish(args, preset, run: Run, data: Data, model, progress: Progress, device, world: int) -> dict:
    """metrics.json and the final model; metrics.json comes last, so that its presence means finished."""
    cfg = preset.pretrain
    flops_per_step = model_flops_per_sequence(model, data.manifest["input_length"],
                                              data.manifest["target_length"]) * cfg.batch_size
    metrics = {"run_name": run.name, "method": args.method, "seed": args.seed, "steps": cfg.steps,
               "noise_rate": args.noise_rate, "wall_seconds": progress.elapsed, "tokens_seen": progress.tokens_seen,
               "device": str(device), "world_size": world, "parameters": parameter_counts(model),
               **throughput(progress, flops_per_step, device, world)}
    if not run.main:
        return metrics
    log = read_csv(run.dir / "train_log.csv")  # the whole run's, also when it was resumed
    evals = [float(r["heldout_loss"]) for r in log if r["heldout_loss"]]
    metrics["final_heldout_loss"] = evals[-1] if evals else None
    metrics["final_loss"] = float(np.mean([float(r["loss"]) for r in log[-cfg.log_every:]]))
    if progress.si_aurocs:
        metrics["si_noise_auroc_mean"] = float(np.mean(progress.si_aurocs))
    save_model_folder(run.store / "final", model, data.tokenizer, {"run_name": run.name, "method": args.method,
                                                                    "seed": args.seed, "preset": preset.name,
                                                                    "steps": cfg.steps})
    confirm_checkpoint(run.checkpoints)  # the run ended finite: the last checkpoint is good
    write_json(run.dir / "metrics.json", metrics)
    return metrics


def main(args: argparse.Namespace) -> dict:
    preset = get_config(args)
    cfg = preset.pretrain
    rank, world, device = init_distributed()
    if cfg.num_microbatches % world:
        raise ConfigError(f"pretrain.num_microbatches: {cfg.num_microbatches} microbatches cannot be shared by "
                          f"{world} processes. Fix: use a process count that divides it")
    if args.noise_rate and world > 1:
        raise ConfigError("--noise-rate: the noise experiment logs per-row statistics in one process. Fix: run "
                          "it without torchrun")
    data = get_data(args, preset)
    with claim_run(args, preset, rank) as run:
        seed_everything(args.seed)
        model = build_model(preset.model, data.manifest["vocab_size"]).to(device)
        broadcast_parameters(model)
        model.train()
        optimizer, scheduler = build_optimizer(model, cfg)
        method = get_method(args, cfg)
        config = run_config(args, preset, run, data, world)
        progress = maybe_resume(args, preset, run, config, model, optimizer, scheduler)
        if run.main:
            write_run_files(run.dir, config)
        try:
            train(args, preset, run, data, model, optimizer, scheduler, method, progress, device, world, rank)
            if world > 1:
                dist.barrier()
            metrics = finish(args, preset, run, data, model, progress, device, world)
        except OSError as error:
            raise disk_error(args, run, world, error) from error
    if world > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())
