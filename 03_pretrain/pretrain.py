"""Pre-train a T5/mT5 model from scratch with span corruption: the baseline, PRESENCE, a control or an ablation.

    python 03_pretrain/pretrain.py --preset tiny --method presence --seed 0
    python 03_pretrain/pretrain.py --preset tiny --method presence-shuffled          # the information control
    python 03_pretrain/pretrain.py --preset tiny --method presence-single --tau 2
    python 03_pretrain/pretrain.py --preset tiny --method presence --run-name presence-s0 --steps 300 --resume
                                                             # continue run presence-s0 to 300 steps
    python 03_pretrain/pretrain.py --preset presets/variants/tiny_x10.yaml --method noise-oracle --noise-rate 0.2
    torchrun --nproc_per_node 8 03_pretrain/pretrain.py --preset paper --method presence --seed 0

Methods: the table in common/presence/methods.py (one record each: schedule, scores, control, what it
needs): baseline, presence (tau=+1 up to step I, then -1), presence-shuffled (PRESENCE's schedule on scores
permuted at random within each step: the same weights, no information), presence-D, presence-I,
presence-I-D, presence-single (--tau), presence-linear, presence-cosine, presence-sequential /
presence-sequential-reverse (the baseline recipe on the lowest- / highest-self-influence part of the data,
scored by 03_pretrain/score_candidates.py), and noise-oracle (with --noise-rate: weight 0 on the rows known
to be noisy, uniform on the others). --per sample reweights samples instead of microbatches; --si-layers
picks the layer set; --noise-rate trains on the data with that share of the training rows corrupted
(01_data, data.noise_rates). The default run name is the method, then whatever differs from the preset's
own recipe (tau, I, per-sample, layer set, noise, steps, any other --set), then the seed.

Writes results/<preset>/pretrain/runs/<run>/ (config, environment, train_log.csv, heldout.csv,
heldout_rows.csv, noise_log.csv with --noise-rate, step_weights.csv and stream_weights.csv for weighted
methods, metrics.json) and artefacts/<preset>/pretrain/<run>/
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
import dataclasses
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
from common.config import (EXECUTION_KNOBS, LAYER_SETS, ConfigError, Preset, check_seed, load_preset,
                           recipe_differences)
from common.data.noise import noise_shares
from common.data.packed_data import (SpanCorruptionBatches, check_files, load_data_manifest, load_tokenizer_from_data,
                                     recorded_files)
from common.distributed import block_lists, broadcast_parameters, shard_model
from common.evaluation.heldout import HELDOUT_COLUMNS, HELDOUT_SEED, heldout_rows, row_losses, summarise
from common.families import get_family
from common.io import append_csv_row, read_csv, read_json, remove_interrupted_writes, write_csv, write_json
from common.memory import GB, PLAN_PARTS, available_memory, check_process_count, check_resources, plan_memory
from common.modeling import IGNORE_INDEX, build_model, model_flops_per_sequence, parameter_counts
from common.optim import apply_schedule, build_optimizer
from common.paths import artefacts_dir, results_dir
from common.presence.influence import batch_self_influence
from common.presence.methods import NAMES as METHODS
from common.presence.methods import PRESENCE, Knobs, Method, Recipe, get_method
from common.presence.presence_step import StepPlan, StepStats
from common.presence.reweighting import group_shares, kish_effective_count
from common.presence.train_step import train_step
from common.reporting.run_results import LOG_COLUMNS  # train_log.csv, as the tables read it
from common.reporting.stats import auroc
from common.runinfo import (bind_store, committed_note, config_changes, prepare_run_dir, run_lock, run_name,
                            write_run_files)
from common.seeding import seed_everything
from common.signals import StopRequests
from common.threads import set_cpu_threads

NOISE_LOG_COLUMNS = ["step", "kind", "batch_share", "weight_share", "si_auroc", "seed"]
# Every weight a score-weighted step applied, one row per step (items in order, full precision): what the
# weight-matched control replays.
WEIGHT_LOG_COLUMNS = ["step", "weights"]
# Every log_every steps of a weighted run, each stream's (language's, or source's) share of the batch and of the
# weight: how the weights shift across languages and sources over training.
STREAM_LOG_COLUMNS = ["step", "stream", "batch_share", "weight_share", "seed"]
# What --resume may change: the schedule (applied from the checkpoint on) and the execution knobs; each
# change is recorded in config.json's "history". Any other difference (method, seed, preset, data, model,
# the rest of the recipe) would make it another run and is refused.
RESUMABLE_CHANGES = tuple(f"preset.pretrain.{name}" for name in (
    "steps", "switch_step", "peak_lr", "warmup_steps") + EXECUTION_KNOBS) + ("world_size",)
NOT_PART_OF_THE_RUN = ("history", "preset.description", "preset.si_analysis", "preset.finetune",
                       "preset.pretrain.seeds", "preset.pretrain.reproduce_methods")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    p.add_argument("--method", default=PRESENCE.name, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override pretrain.steps")
    p.add_argument("--switch-step", type=int, help="override I, the step where tau changes")
    p.add_argument("--tau", type=float, help="temperature of presence-single")
    p.add_argument("--per", choices=["microbatch", "sample"], default="microbatch",
                   help="reweight microbatches (the paper) or samples (extension)")
    p.add_argument("--si-layers", choices=LAYER_SETS, help="override pretrain.si_layers (the layer set K)")
    p.add_argument("--noise-rate", type=float, default=0.0,
                   help="train on the rows with this share corrupted (one of data.noise_rates)")
    p.add_argument("--run-name", help="default: derived from the method and what differs from the preset's recipe")
    p.add_argument("--paired-run", help="the run a weight-matched control replays (default: the controlled method's "
                                        "run of the same seed and recipe, beside this one)")
    p.add_argument("--out", help="run folder for logs and metrics (default results/<preset>/pretrain/runs/<run>)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--verify-data", action="store_true",
                   help="hash every data file against its manifest first (the sizes are always checked)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    p.add_argument("--plan-memory", action="store_true",
                   help="print the run's memory per device (common/memory.py) and exit; nothing is built")
    p.add_argument("--device-memory-gb", type=float, help="the memory of one device for --plan-memory (default: "
                                                          "this machine's free GPU memory, else its MemAvailable)")
    p.add_argument("--nproc", type=int, help="processes for --plan-memory (default: WORLD_SIZE, else 1)")
    return p.parse_args(argv)


# ---- the run: its config, recipe, folders and progress ------------------------------------------------------

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
    """One run: the arguments it was started with (a resume command repeats them), its resolved preset and
    recipe (the seed lives there), its folders, this process's place in it, and how far it has come."""
    args: argparse.Namespace
    preset: Preset
    recipe: Recipe
    noise_rate: float
    name: str
    dir: Path  # results/<preset>/pretrain/runs/<run>: logs, config, metrics
    store: Path  # artefacts/<preset>/pretrain/<run>: checkpoints, snapshots, final model
    rank: int
    world: int
    device: torch.device
    progress: Progress = field(default_factory=Progress)

    @property
    def cfg(self):
        return self.preset.pretrain

    @property
    def method(self) -> Method:
        return self.recipe.method

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def main(self) -> bool:  # rank 0 writes the logs and checkpoints
        return self.rank == 0

    @property
    def sharded(self) -> bool:  # FSDP2: every rank takes part in each forward pass and checkpoint
        return self.preset.distributed.strategy == "fsdp"

    @property
    def checkpoints(self) -> Path:
        return self.store / "checkpoints"


def get_run(args) -> Run:
    preset, method = get_config(args)
    check_resources(preset, method.name, args.per)  # at launch: naming a run needs no machine that fits it
    rank, world, device = init_distributed(preset.distributed.strategy == "fsdp")
    set_cpu_threads(device)  # common/threads.py: one core left to whatever shares the machine
    check_process_count(preset, world)
    if args.noise_rate and world > 1:
        raise ConfigError("--noise-rate: the noise experiment logs per-row statistics in one process. Fix: run "
                          "it without torchrun")
    cfg = preset.pretrain
    name = args.run_name or default_run_name(args)
    run_dir = Path(args.out) if args.out else results_dir(preset.name, "pretrain") / "runs" / name
    replayed = paired_weights(args, preset, method, run_dir.parent) if "paired_run" in method.needs else None
    recipe = Recipe.of(method, args.per, args.seed, Knobs(cfg.tau_direct, cfg.tau_inverse, cfg.switch_step,
                                                          cfg.steps, args.tau), replayed, cfg.log_si_loss)
    return Run(args, preset, recipe, args.noise_rate, run_dir.name, run_dir,
               artefacts_dir(preset.name, "pretrain", run_dir.name), rank, world, device)


def resolve_preset(args) -> Preset:
    """The preset with --set and the flags that override its fields applied."""
    overrides = list(args.set)
    for flag, field_name in ((args.steps, "steps"), (args.switch_step, "switch_step"), (args.si_layers, "si_layers")):
        if flag is not None:
            key = f"pretrain.{field_name}"
            if any(item.split("=", 1)[0].strip() == key for item in args.set):
                raise ConfigError(f"--{field_name.replace('_', '-')}: --set {key} sets it too. Fix: give it once")
            overrides.append(f"{key}={flag}")
    return load_preset(args.preset, overrides)


def get_config(args) -> tuple[Preset, Method]:
    """The resolved preset and the method, refusing a recipe the method cannot run; a knob the method does
    not read is not checked against it."""
    check_seed(args.seed, "--seed")
    preset = resolve_preset(args)
    if args.method not in METHODS:
        raise ConfigError(f"--method: unknown method {args.method!r}. Fix: use one of {', '.join(METHODS)}")
    method = get_method(args.method)
    if "tau" in method.reads and args.tau is None:
        raise ConfigError(f"--tau: {method.name} needs a temperature. Fix: pass e.g. --tau 2")
    if args.tau is not None and not math.isfinite(args.tau):
        raise ConfigError(f"--tau: {args.tau} is not a finite number. Fix: pass e.g. --tau 2")
    if args.tau is not None and "tau" not in method.reads:
        raise ConfigError(f"--tau: only methods with a constant temperature of their own take one, not "
                          f"{method.name}. Fix: drop --tau")
    if args.per not in method.granularities:
        raise ConfigError(f"--per: {method.name} does not reweight by self-influence per {args.per}. Fix: drop "
                          f"--per {args.per}")
    cfg = preset.pretrain
    if cfg.activation_checkpointing and args.per == "sample":
        raise ConfigError("pretrain.activation_checkpointing: the per-sample engine records each forward pass once, "
                          "and checkpointing runs it again in the backward. Fix: use --per microbatch, or "
                          "pretrain.microbatch_chunks to save memory")
    if preset.distributed.strategy == "fsdp" and args.noise_rate:
        raise ConfigError("distributed.strategy: fsdp runs without the noise experiment, whose per-row logs and "
                          "probes need the whole batch and model in one process. Fix: drop --noise-rate, or --set "
                          "distributed.strategy=replicate")
    if "switch_step" in method.reads and not 0 <= cfg.switch_step <= cfg.steps:
        raise ConfigError(f"pretrain.switch_step: {cfg.switch_step} is outside [0, steps={cfg.steps}]. Fix: set I "
                          "between 0 and steps (--switch-step)")
    if args.noise_rate and args.noise_rate not in preset.data.noise_rates:
        raise ConfigError(f"--noise-rate: {args.noise_rate:g} is not among data.noise_rates "
                          f"{preset.data.noise_rates}. Fix: add it there and run 01_data/prepare_data.py")
    if "noise_labels" in method.needs and not args.noise_rate:
        raise ConfigError(f"--method {method.name} needs noisy data to drop. Fix: pass --noise-rate")
    if args.noise_rate and method.data_filter:
        raise ConfigError(f"--noise-rate: {method.label} scores the clean data. Fix: drop --noise-rate")
    return preset, method


def default_run_name(args) -> str:
    """The method, its --tau, the granularity, the noise rate, then every recipe field that differs from
    the preset as its file states it (a knob the method does not read is left out), then the seed."""
    preset, method = get_config(args)
    return run_name(method.name, args.seed, args.tau, args.per, args.noise_rate,
                    recipe_changes(preset, load_preset(args.preset), method))


def recipe_changes(preset: Preset, reference: Preset, method: Method) -> dict[str, object]:
    """The fields of data, model and pretrain whose value in `preset` differs from `reference`'s, as
    {"pretrain.steps": 30} (common.config.recipe_differences)."""
    sections = ("data", "model", "pretrain")
    return recipe_differences({s: dataclasses.asdict(getattr(preset, s)) for s in sections},
                              {s: dataclasses.asdict(getattr(reference, s)) for s in sections}, method.reads)


def paired_weights(args, preset: Preset, method: Method, runs_dir: Path) -> np.ndarray:
    """The weights the paired run (the controlled method, same seed and recipe) applied, (steps, items);
    refused when that run is missing, unfinished, made otherwise, or logged no weights."""
    paired_args = argparse.Namespace(**{**vars(args), "method": method.controls, "run_name": None})
    folder = runs_dir / (args.paired_run or default_run_name(paired_args))
    train_it = shlex.join(["python", "03_pretrain/pretrain.py", "--preset", args.preset, "--method", method.controls,
                           "--seed", str(args.seed)] + (["--per", args.per] if args.per != "microbatch" else [])
                         + [part for change in args.set for part in ("--set", change)])
    if not (folder / "metrics.json").is_file() or not (folder / "step_weights.csv").is_file():
        raise ConfigError(f"--method {method.name}: it replays the weights of the {method.controls} run {folder}, "
                          f"which is missing, unfinished or logged no weights. Fix: train it first ({train_it}), or "
                          "name it with --paired-run")
    paired = read_json(folder / "config.json")
    ours = {"seed": args.seed, "per": args.per, "noise_rate": args.noise_rate, "preset": preset.to_dict()}
    differs = [key for key in config_changes({k: paired.get(k) for k in ours}, ours)
               if not key.startswith(NOT_PART_OF_THE_RUN) and key.split(".")[-1] not in EXECUTION_KNOBS]
    if differs:
        raise ConfigError(f"--method {method.name}: the paired run {folder} differs in {', '.join(differs)}. Fix: "
                          f"pair it with a {method.controls} run of the same seed and recipe ({train_it})")
    rows = read_csv(folder / "step_weights.csv")
    weights = np.array([[float(w) for w in row["weights"].split()] for row in rows])
    steps = preset.pretrain.steps
    if [int(row["step"]) for row in rows] != list(range(1, steps + 1)):
        raise ConfigError(f"--method {method.name}: {folder / 'step_weights.csv'} does not hold steps 1..{steps}. "
                          f"Fix: re-train the paired run ({train_it} --overwrite)")
    return weights


def init_distributed(sharded: bool = False):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; nccl on GPU, gloo on CPU. A sharded model
    needs a process group also in one process (e.g. to resume a sharded run there)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or sharded:
        use_cuda = torch.cuda.is_available()
        if world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        else:
            dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- data and model ---------------------------------------------------------------------------------------

@dataclass
class Data:
    manifest: dict
    tokenizer: object
    train: SpanCorruptionBatches
    heldout: SpanCorruptionBatches
    heldout_ids: np.ndarray  # the held-out rows every evaluation scores
    training_rows: int | None  # Sequential's kept rows
    checksums: dict | None  # sha256 of every data file the run reads (None: built before they were recorded)


def get_data(run: Run) -> Data:
    cfg = run.cfg
    data_dir = artefacts_dir(run.preset.name, "data")
    manifest = load_data_manifest(data_dir)
    files = recorded_files(data_dir, run.noise_rate)
    check_files(data_dir, files, full=run.args.verify_data)
    objective = get_family(run.preset.model.family).objective
    train = SpanCorruptionBatches(data_dir, "train", cfg.batch_size, seed=run.seed, noise_rate=run.noise_rate,
                                  objective=objective)
    rows = training_rows(run, train.num_rows)
    if rows is not None:
        train = SpanCorruptionBatches(data_dir, "train", cfg.batch_size, seed=run.seed, rows=rows, objective=objective)
    heldout = SpanCorruptionBatches(data_dir, "heldout", 1, seed=HELDOUT_SEED, objective=objective)
    return Data(manifest, load_tokenizer_from_data(data_dir), train, heldout,
                heldout_rows(heldout.num_rows, cfg.eval_rows), None if rows is None else len(rows),
                None if files is None else {name: record["sha256"] for name, record in files.items()})


def training_rows(run: Run, num_rows: int) -> np.ndarray | None:
    """The training-row subset of a method with a data filter (None = all rows): PRESENCE-Sequential keeps
    the lowest-SI share of the candidates, -reverse the highest (the paper's Table 2)."""
    if run.method.data_filter is None:
        return None
    scores_path = artefacts_dir(run.preset.name, "pretrain", "sequential", f"scores-s{run.seed}.npy")
    if not scores_path.is_file():
        raise FileNotFoundError(f"{scores_path} is missing. Fix: run 03_pretrain/score_candidates.py --preset "
                                f"{run.args.preset} --seed {run.seed} (or make pretrain, which does it)")
    scores = np.load(scores_path)
    if len(scores) != num_rows:
        raise ValueError(f"{scores_path} scores {len(scores)} rows but the data has {num_rows}. Fix: re-run "
                         "score_candidates.py after rebuilding the data")
    order = np.argsort(scores, kind="stable")
    keep = int(round(run.cfg.sequential_keep_fraction * num_rows))
    return np.sort(order[:keep] if run.method.data_filter == "keep-lowest" else order[num_rows - keep:])


@dataclass
class Trainer:
    """The model as trained (step_model: compiled where the preset asks) and its optimizer and schedule."""
    model: torch.nn.Module
    step_model: torch.nn.Module
    optimizer: object
    scheduler: object
    autocast_dtype: torch.dtype | None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()


def get_trainer(run: Run, data: Data) -> Trainer:
    seed_everything(run.seed)
    model = build_model(run.preset.model, data.manifest["vocab_size"], data.manifest["raw_length"]).to(run.device)
    broadcast_parameters(model)
    model.train()
    if run.cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if run.sharded:  # before the optimizer, which must hold the sharded parameters
        shard_model(model, block_lists(get_family(run.preset.model.family).first_blocks), run.device)
    optimizer, scheduler = build_optimizer(model, run.cfg)
    on_gpu = run.device.type == "cuda"
    step_model = torch.compile(model) if run.cfg.compile and on_gpu and run.recipe.per == "microbatch" else model
    return Trainer(model, step_model, optimizer, scheduler,
                   torch.bfloat16 if run.cfg.precision == "bf16" and on_gpu else None)


# ---- the run folder: one process and one store per run, resuming --------------------------------------------

@contextlib.contextmanager
def claim_run(run: Run) -> Iterator[Run]:
    """The run's folders, held for the block: its artefacts folder is locked (one process per run) and bound
    to the run folder (artefacts are stored by the run's name, --out can repeat a name), and leftovers of
    interrupted writes are removed."""
    if not run.main:
        yield run
        return
    args = run.args
    with run_lock(run.store):
        if previous_owner := bind_store(run.store, run.dir, take_over=args.overwrite and not args.resume):
            print(f"--overwrite: {run.store} held the checkpoints of the run in {previous_owner}; they are replaced")
        prepare_run_dir(run.dir, resume=args.resume, overwrite=args.overwrite)
        if args.overwrite and not args.resume:
            for old in ("checkpoints", "snapshots", "final"):
                shutil.rmtree(run.store / old, ignore_errors=True)
        remove_interrupted_writes(run.dir)
        remove_interrupted_writes(run.store)
        yield run


def run_config(run: Run, data: Data) -> dict:
    """What config.json records; a resume compares it with the run's own."""
    return {"run_name": run.name, "method": run.method.name, "seed": run.seed, "tau": run.args.tau,
            "per": run.recipe.per, "noise_rate": run.noise_rate, "world_size": run.world,
            "training_rows": data.training_rows, "data_sha256": data.checksums, "preset": run.preset.to_dict(),
            "history": []}


def maybe_resume(run: Run, trainer: Trainer, config: dict) -> None:
    """With --resume and a checkpoint: continue from it, refusing a config that would make it another run;
    a changed schedule takes effect and is recorded in config["history"]. Else start at step 0."""
    progress = run.progress
    checkpoint = latest_checkpoint(run.checkpoints) if run.args.resume else None
    if checkpoint is not None:
        previous = previous_config(run)
        changes = resume_changes(previous, config, checkpoint_step(checkpoint))
        progress.step, extra = load_checkpoint(checkpoint, trainer.model, trainer.optimizer, trainer.scheduler)
        apply_schedule(trainer.optimizer, trainer.scheduler, run.cfg.peak_lr)
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
        for name in ("train_log.csv", "heldout.csv", "noise_log.csv", "heldout_rows.csv", "step_weights.csv",
                     "stream_weights.csv"):
            (run.dir / name).unlink(missing_ok=True)
    (run.dir / "metrics.json").unlink(missing_ok=True)
    shutil.rmtree(run.store / "final", ignore_errors=True)


def truncate_logs(run_dir: Path, last_step: int) -> None:
    """A resumed run continues its logs from its checkpoint, dropping rows written after it."""
    for name, columns in (("train_log.csv", LOG_COLUMNS), ("heldout.csv", HELDOUT_COLUMNS),
                          ("noise_log.csv", NOISE_LOG_COLUMNS), ("step_weights.csv", WEIGHT_LOG_COLUMNS),
                          ("stream_weights.csv", STREAM_LOG_COLUMNS)):
        path = run_dir / name
        if path.exists():
            write_csv(path, [r for r in read_csv(path) if int(r["step"]) <= last_step], columns)


# ---- one step, as logged ----------------------------------------------------------------------------------

@dataclass
class StepRecord:
    """What a step did, for its log row: the plan it followed, its statistics and learning rate, the noise
    labels of its rows (with --noise-rate) and the batch's per-sample self-influence when probed."""
    step: int
    plan: StepPlan
    stats: StepStats
    lr: float
    seconds: float
    labels: np.ndarray | None = None
    si: np.ndarray | None = None


def weight_stats(stats) -> dict:
    """The step's weight and score columns; with both the items' SI and losses (every score-weighted step
    forms both), their within-step Spearman correlation."""
    spearman = ""
    if stats.scores is not None and stats.item_losses is not None and len(stats.scores) > 2:
        spearman = float(spearmanr(stats.scores.numpy(), stats.item_losses.numpy()).statistic)
    if stats.weights is None:
        return {"si_mean": "", "si_std": "", "max_weight": "", "weight_entropy": "", "kish_n": "",
                "z_variance_share": "", "si_loss_spearman": spearman}
    w = stats.weights.double()
    row = {"max_weight": w.max().item(), "weight_entropy": -(w * w.clamp_min(1e-300).log()).sum().item(),
           "kish_n": kish_effective_count(w), "si_mean": "", "si_std": "", "si_loss_spearman": spearman,
           "z_variance_share": "" if stats.variance_share is None else stats.variance_share}
    if stats.scores is not None:
        row.update(si_mean=stats.scores.double().mean().item(), si_std=stats.scores.double().std(unbiased=False).item())
    return row


def row_weights(stats, batch_size: int) -> np.ndarray:
    """The weight each row of the batch had in the update (summing to 1): uniform without weights, the
    sample weights as they are, a microbatch's weight shared by its rows."""
    if stats.weights is None:
        return np.full(batch_size, 1 / batch_size)
    w = stats.weights.double().numpy()
    return w if len(w) == batch_size else np.repeat(w / (batch_size // len(w)), batch_size // len(w))


def probe_self_influence(run: Run, model, microbatches: list[dict], step: int) -> np.ndarray | None:
    """Per-sample self-influence of the batch with the parameters the step starts from, every
    noise_log_every steps (the noise experiment's detector measure); per-sample PRESENCE computes it anyway."""
    if step % run.cfg.noise_log_every or run.recipe.per == "sample":
        return None
    return torch.cat([batch_self_influence(model, mb, layers=run.cfg.si_layers, per="sample")
                      for mb in microbatches]).cpu().numpy()


def noise_row(run: Run, record: StepRecord, kinds: list[str]) -> dict:
    """The step's noise columns of train_log.csv; the per-kind rows go to noise_log.csv."""
    stats, labels, si = record.stats, record.labels, record.si
    if run.recipe.per == "sample" and record.step % run.cfg.noise_log_every == 0:
        si = stats.scores.double().numpy()  # the step's own per-sample scores
    shares = noise_shares(labels, row_weights(stats, len(labels)), len(kinds))
    aurocs = {k: auroc(si[labels == k] if k else si[labels > 0], si[labels == 0]) if si is not None else ""
              for k in shares}
    for k, (batch_share, weight_share) in shares.items():
        append_csv_row(run.dir / "noise_log.csv", {"step": record.step, "kind": kinds[k - 1] if k else "all",
                                                   "batch_share": batch_share, "weight_share": weight_share,
                                                   "si_auroc": aurocs[k], "seed": run.seed}, NOISE_LOG_COLUMNS)
    spearman = ""
    if stats.scores is not None and run.recipe.per == "microbatch":
        per_microbatch = (labels > 0).reshape(len(stats.scores), -1).mean(1)
        if np.ptp(per_microbatch) > 0:
            spearman = float(spearmanr(stats.scores.numpy(), per_microbatch).statistic)
    return {"noisy_batch_share": shares[0][0], "noisy_weight_share": shares[0][1], "si_noise_auroc": aurocs[0],
            "mb_si_noise_spearman": spearman}


def log_step(run: Run, data: Data, trainer: Trainer, record: StepRecord, bar) -> None:
    """The step's row of train_log.csv (with the held-out loss every eval_every steps and the noise columns
    with --noise-rate) and, every log_every steps, one log line. Every rank of a sharded model calls it, since
    its evaluation is a collective; rank 0 writes."""
    cfg, progress, step, stats = run.cfg, run.progress, record.step, record.stats
    heldout = evaluate(run, data, trainer, step, final=step == cfg.steps) if step % cfg.eval_every == 0 or \
        step == cfg.steps else ""
    if not run.main:
        return
    row = {"step": step, "loss": stats.loss, "lr": record.lr, "tau": "" if record.plan.tau is None else record.plan.tau,
           **weight_stats(stats), "noisy_batch_share": "", "noisy_weight_share": "", "si_noise_auroc": "",
           "mb_si_noise_spearman": "", "tokens_seen": progress.tokens_seen, "seconds": round(progress.elapsed, 3),
           "heldout_loss": heldout, "seed": run.seed}
    if record.labels is not None:
        row.update(noise_row(run, record, data.train.noise_kinds))
        if row["si_noise_auroc"] != "" and np.isfinite(row["si_noise_auroc"]):
            progress.si_aurocs.append(row["si_noise_auroc"])
    append_csv_row(run.dir / "train_log.csv", row, LOG_COLUMNS)
    if record.plan.update == "scores" and run.method.update == "scores":
        append_csv_row(run.dir / "step_weights.csv", {"step": step, "weights": " ".join(
            repr(float(w)) for w in stats.weights.double())}, WEIGHT_LOG_COLUMNS)
    if step % cfg.log_every == 0 and stats.weights is not None:
        streams = data.train.row_language[data.train.batch_rows(step - 1)]
        for shares in group_shares(streams, row_weights(stats, len(streams)), data.manifest["languages"]):
            append_csv_row(run.dir / "stream_weights.csv", {"step": step, **shares, "seed": run.seed},
                           STREAM_LOG_COLUMNS)
    if step % cfg.log_every == 0:
        bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{progress.tokens_seen / max(progress.elapsed, 1e-9):,.0f}",
                        refresh=False)  # tqdm redraws at its own interval
        tqdm.write(f"step {step} | loss {stats.loss:.4f} | lr {record.lr:.2e} | tau {row['tau']} | "
                   f"{record.seconds:.3f} s/step")


def evaluate(run: Run, data: Data, trainer: Trainer, step: int, final: bool) -> float:
    """Held-out loss on the fixed rows: rows of heldout.csv (per language and "all"); at the end also the
    per-row losses (heldout_rows.csv), so that runs can be compared row by row."""
    losses, counts = row_losses(trainer.model, data.heldout, data.heldout_ids, run.cfg.eval_batch_size, run.device,
                                trainer.autocast)
    languages = [data.manifest["languages"][i] for i in data.heldout.row_language[data.heldout_ids]]
    summary = summarise(losses, counts, languages, data.manifest["sampling_probabilities"])
    if not run.main:
        return summary[-1]["loss"]
    for row in summary:
        append_csv_row(run.dir / "heldout.csv", {"run": run.name, "method": run.method.name, "seed": run.seed,
                                                 "step": step, **row}, HELDOUT_COLUMNS)
    if final:
        write_csv(run.dir / "heldout_rows.csv", [{"row": int(r), "lang": lang, "n_tokens": int(c), "loss": loss}
                                                 for r, lang, c, loss in zip(data.heldout_ids, languages, counts,
                                                                             losses)])
    return summary[-1]["loss"]


def batch_tokens(batch: dict, objective: str) -> int:
    """The tokens a step processes: T5's inputs and targets; a one-stack model's inputs (its labels are its
    inputs, or a share of them)."""
    tokens = int(batch["attention_mask"].sum())
    return tokens + int((batch["labels"] != IGNORE_INDEX).sum()) if objective == "span-corruption" else tokens


def split_microbatches(batch: dict, num_microbatches: int, run: Run) -> list[dict]:
    """This rank's contiguous share of the global batch's microbatches, moved to the device; a sharded model's
    ranks each take their contiguous share of the rows of every microbatch (common/presence/sharded_step.py)."""
    rank, world, device = run.rank, run.world, run.device
    size = batch["input_ids"].shape[0] // num_microbatches
    if run.sharded:
        part = size // world
        return [{k: v[i * size + rank * part:i * size + (rank + 1) * part].to(device, non_blocking=True)
                 for k, v in batch.items()} for i in range(num_microbatches)]
    per_rank = num_microbatches // world
    rows = slice(rank * per_rank * size, (rank + 1) * per_rank * size)
    local = {k: v[rows].to(device, non_blocking=True) for k, v in batch.items()}
    return [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(per_rank)]


def throughput(run: Run, flops_per_step: float) -> dict:
    """Tokens/s, s/step, model TFLOP/s (and MFU, GPU memory on a GPU) over the steps after the warm-up."""
    progress = run.progress
    if not progress.timed_steps:
        return {}
    step_s = progress.timed_seconds / progress.timed_steps
    out = {"seconds_per_step": step_s, "tokens_per_second": progress.timed_tokens / progress.timed_seconds,
           "model_tflops": flops_per_step / step_s / 1e12}
    if peak := mfu_ceiling_tflops(run.device):  # measured on this card now
        out.update(mfu=out["model_tflops"] / (peak * run.world), matmul_ceiling_tflops=peak)
    if run.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- checkpoints ------------------------------------------------------------------------------------------

def save_due(step: int, cfg) -> bool:
    return step % cfg.save_every == 0 or step == cfg.steps


def save(run: Run, trainer: Trainer) -> None:
    progress = run.progress
    save_checkpoint(run.checkpoints, progress.step, trainer.model, trainer.optimizer, trainer.scheduler,
                    {"seconds": progress.elapsed, "tokens_seen": progress.tokens_seen, "si_aurocs": progress.si_aurocs})
    progress.unverified = True


def maybe_save(run: Run, data: Data, trainer: Trainer, snapshot_steps: set[int]) -> None:
    """The step's snapshot (for 02) and checkpoint when due; parameters that are not finite stop the run."""
    step = run.progress.step
    try:
        if step in snapshot_steps:
            save_model_folder(run.store / "snapshots" / f"step-{step}", trainer.model, data.tokenizer,
                              {"run_name": run.name, "method": run.method.name, "seed": run.seed, "step": step})
        if save_due(step, run.cfg):
            save(run, trainer)
    except FloatingPointError as error:
        raise diverged(run, step, error) from error


# ---- faults: blow-ups, full disks, stop signals -------------------------------------------------------------

def rerun_command(run: Run, settings: dict | None = None, start_over: bool = False) -> str:
    """The command that resumes this run (or, with start_over, starts it anew); `settings`
    ({"pretrain.peak_lr": "0.001"}) replace any earlier setting of those fields. It names the run, since
    changed settings would derive another name."""
    args, settings = run.args, settings or {}
    words = (["python"] if run.world == 1 else ["torchrun", "--nproc_per_node", str(run.world)]) + [
        "03_pretrain/pretrain.py", "--preset", args.preset, "--method", run.method.name, "--seed", str(run.seed)]
    for flag, value in (("--steps", args.steps), ("--switch-step", args.switch_step), ("--tau", args.tau),
                        ("--si-layers", args.si_layers), ("--noise-rate", run.noise_rate or None),
                        ("--run-name", run.name), ("--out", args.out)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if run.recipe.per != "microbatch":
        words += ["--per", run.recipe.per]
    kept = [item for item in args.set if item.split("=", 1)[0].strip() not in settings]
    for item in kept + [f"{key}={value}" for key, value in settings.items()]:
        words += ["--set", item]
    return shlex.join(words + ["--overwrite" if start_over else "--resume"])


def latest_step(run: Run) -> int | None:
    checkpoint = latest_checkpoint(run.checkpoints)
    return None if checkpoint is None else checkpoint_step(checkpoint)


def diverged(run: Run, step: int, error: Exception) -> FloatingPointError:
    """The error a non-finite step stops the run with, and its fix: a tenth of the learning rate (at most the
    preset's own), resumed from the last good checkpoint. A checkpoint that led straight to the failure is
    dropped first (common/checkpoint.py); if the step after a verified one fails, the run starts anew."""
    dropped = roll_back_checkpoint(run.checkpoints)[0] if run.main and run.progress.unverified else None
    resumed_from = latest_step(run)
    lower = {"pretrain.peak_lr": f"{min(run.cfg.peak_lr / 10, load_preset(run.args.preset).pretrain.peak_lr):g}"}
    start_over = resumed_from is not None and step == resumed_from + 1
    where = ("the run has to start anew" if start_over else "the run resumes from step 0" if resumed_from is None
             else f"the run resumes from its checkpoint of step {resumed_from}")
    return FloatingPointError(
        f"step {step} of {run.name}: {error}. Training stopped; nothing of this step was saved"
        f"{f', and checkpoint {dropped}, which led straight to it, was dropped' if dropped else ''}; {where}. "
        f"Fix: a lower learning rate: {rerun_command(run, lower, start_over)}"
        f"{committed_note(run.dir) if start_over else ''}")


def disk_error(run: Run, error: OSError) -> OSError:
    resumed_from = latest_step(run)
    kept = "no checkpoint was saved yet" if resumed_from is None else f"its checkpoint of step {resumed_from} is kept"
    return OSError(f"{error}. The run stopped; {kept}. Fix: make room on that disk (or mend what the error names), "
                   f"then: {rerun_command(run)}")


def stop_requested(stops: StopRequests, run: Run) -> bool:
    """Whether a stop signal arrived, on any rank (all ranks must stop after the same step)."""
    received = stops.received is not None
    if run.world > 1:
        flag = torch.tensor([float(received)], device=run.device)
        dist.all_reduce(flag)
        received = flag.item() > 0
    return received


def stop(run: Run, stops: StopRequests, trainer: Trainer) -> NoReturn:
    """After a stop signal: the step is complete; save it (unless it was just saved), say how to resume, and
    exit with 128 + the signal's number."""
    signum = stops.received or signal.SIGTERM  # another rank received it
    if (run.main or run.sharded) and not save_due(run.progress.step, run.cfg):
        save(run, trainer)
    if run.main:
        tqdm.write(f"{signal.Signals(signum).name}: {run.name} stopped after step {run.progress.step}, saved in "
                   f"{latest_checkpoint(run.checkpoints)}. Resume with: {rerun_command(run)}")
    raise SystemExit(128 + signum)


# ---- training -----------------------------------------------------------------------------------------------

def train(run: Run, data: Data, trainer: Trainer) -> None:
    cfg, progress, train_data = run.cfg, run.progress, data.train
    snapshot_steps = {max(1, round(f * cfg.steps)) for f in run.preset.si_analysis.checkpoint_fractions} - {cfg.steps}
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
            microbatches = split_microbatches(batch, cfg.num_microbatches, run)
            probe_start = time.perf_counter()
            si = probe_self_influence(run, trainer.model, microbatches, step) if labels is not None else None
            t0 += time.perf_counter() - probe_start  # the probe is measurement, not training: untimed
            plan = run.recipe.plan(step, labels)
            try:
                stats, lr = train_step(trainer.step_model, microbatches, plan, trainer.optimizer, trainer.scheduler,
                                       layers=cfg.si_layers, autocast_dtype=trainer.autocast_dtype,
                                       grad_clip=cfg.grad_clip, chunks=cfg.microbatch_chunks)
            except FloatingPointError as error:
                raise diverged(run, step, error) from error
            if progress.unverified and run.main:  # the checkpoint before this finite step is good
                confirm_checkpoint(run.checkpoints)
            progress.unverified = False
            if run.device.type == "cuda" and step % cfg.log_every == 0:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            step_tokens = batch_tokens(batch, data.train.objective)
            progress.step, progress.elapsed, progress.tokens_seen = step, progress.elapsed + seconds, \
                progress.tokens_seen + step_tokens
            if step > first_step + 2:  # the first steps pay for compilation and warm-up
                progress.timed_steps += 1
                progress.timed_seconds += seconds
                progress.timed_tokens += step_tokens
            if run.main or run.sharded:  # a sharded model's evaluation and saving are collectives
                log_step(run, data, trainer, StepRecord(step, plan, stats, lr, seconds, labels, si), bar)
                maybe_save(run, data, trainer, snapshot_steps)
            if stop_requested(stops, run):
                stop(run, stops, trainer)


def finish(run: Run, data: Data, trainer: Trainer) -> dict:
    """metrics.json and the final model; metrics.json comes last, so that its presence means finished."""
    cfg, progress, model = run.cfg, run.progress, trainer.model
    one_stack = data.train.objective != "span-corruption"  # the row itself is the input
    flops_per_step = model_flops_per_sequence(model, data.manifest["raw_length" if one_stack else "input_length"],
                                              data.manifest["target_length"]) * cfg.batch_size
    metrics = {"run_name": run.name, "method": run.method.name, "seed": run.seed, "steps": cfg.steps,
               "noise_rate": run.noise_rate, "wall_seconds": progress.elapsed, "tokens_seen": progress.tokens_seen,
               "device": str(run.device), "world_size": run.world, "parameters": parameter_counts(model),
               **throughput(run, flops_per_step)}
    if run.main or run.sharded:  # a sharded model's is gathered from every rank's shards; rank 0 writes
        save_model_folder(run.store / "final", model, data.tokenizer, final_info(run))
    if not run.main:
        return metrics
    log = read_csv(run.dir / "train_log.csv")  # the whole run's, also when it was resumed
    evals = [float(r["heldout_loss"]) for r in log if r["heldout_loss"]]
    metrics["final_heldout_loss"] = evals[-1] if evals else None
    metrics["final_loss"] = float(np.mean([float(r["loss"]) for r in log[-cfg.log_every:]]))
    if progress.si_aurocs:
        metrics["si_noise_auroc_mean"] = float(np.mean(progress.si_aurocs))
    confirm_checkpoint(run.checkpoints)  # the run ended finite: the last checkpoint is good
    write_json(run.dir / "metrics.json", metrics)
    return metrics


def plan(args) -> dict:
    """--plan-memory: the run's memory per device, printed, in bytes per part; refused when it does not fit."""
    preset, method = get_config(args)
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.is_available()
    device = args.device_memory_gb * GB if args.device_memory_gb else available_memory(gpu)[0]
    if device is None:
        raise ConfigError("--plan-memory: this machine's memory is unknown. Fix: pass --device-memory-gb")
    estimate, text = plan_memory(preset, method.name, args.per, world, device, gpu=gpu or bool(args.device_memory_gb))
    print(text)
    return {**{part: getattr(estimate, part) for part in PLAN_PARTS}, "total": estimate.total}


def final_info(run: Run) -> dict:
    """presence_run.json of the final model."""
    return {"run_name": run.name, "method": run.method.name, "seed": run.seed, "preset": run.preset.name,
            "steps": run.cfg.steps}


def main(args: argparse.Namespace) -> dict:
    if args.plan_memory:
        return plan(args)
    run = get_run(args)
    data = get_data(run)
    with claim_run(run):
        trainer = get_trainer(run, data)
        config = run_config(run, data)
        maybe_resume(run, trainer, config)
        if run.main:
            write_run_files(run.dir, config)
        try:
            train(run, data, trainer)
            if run.world > 1:
                dist.barrier()
            metrics = finish(run, data, trainer)
        except OSError as error:
            raise disk_error(run, error) from error
    if dist.is_initialized():
        # no rank closes its sockets while another still reads a collective's last message (gloo's reader
        # would throw, and that rank abort)
        dist.barrier()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())
