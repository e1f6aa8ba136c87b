"""A small, made-up results/<preset>/ tree in the schemas the stages write, for the tests of
05_figures. Every number here is synthetic; it is written into a temporary folder only."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import load_preset

LANGS = ["en", "hi", "bn", "ru", "zh"]
HELDOUT_LANGS = np.array(["en"] * 4 + ["hi"] * 6)
HELDOUT_ROW_BASE = np.array([3.0, 3.4, 3.1, 3.5, 2.9, 3.3, 3.2, 3.6, 3.0, 3.0])  # mean 3.2 per language
TASKS = {"xquad": ["f1", "em"], "mlqa": ["f1", "em"], "tydiqa": ["f1", "em"], "xnli": ["accuracy"],
         "pawsx": ["accuracy"], "panx": ["span_f1"]}

# (method, tau, switch_step override, seeds)
RUNS = [("baseline", None, None, (0, 1)), ("presence", None, None, (0, 1)), ("presence-shuffled", None, None, (0, 1)),
        ("presence-D", None, None, (0,)),
        ("presence-I", None, None, (0,)), ("presence-I-D", None, None, (0,)),
        ("presence-single", -2.0, None, (0,)), ("presence-single", 2.0, None, (0,)),
        ("presence-sequential", None, None, (0,)), ("presence-sequential-reverse", None, None, (0,)),
        ("presence", None, 50, (0,))]


def tau_at(method: str, tau: float | None, step: int, switch: int) -> float | None:
    return {"baseline": None, "presence-sequential": None, "presence-sequential-reverse": None,
            "presence": 1.0 if step <= switch else -1.0, "presence-shuffled": 1.0 if step <= switch else -1.0,
            "presence-I-D": -1.0 if step <= switch else 1.0,
            "presence-D": 1.0, "presence-I": -1.0, "presence-single": tau}[method]


def run_name(method: str, tau, switch, seed: int) -> str:
    parts = [method] + ([f"tau{tau:+g}"] if tau is not None else []) + ([f"I{switch}"] if switch else [])
    return "-".join(parts + [f"s{seed}"])


def write_run(runs_dir: Path, preset: dict, method: str, tau, switch, seed: int, rng) -> str:
    name = run_name(method, tau, switch, seed)
    folder = runs_dir / name
    folder.mkdir(parents=True)
    preset = json.loads(json.dumps(preset))
    if switch:
        preset["pretrain"]["switch_step"] = switch
    cfg = preset["pretrain"]
    steps, switch_step, n = cfg["steps"], cfg["switch_step"], cfg["num_microbatches"]
    offset = {"baseline": 0.0, "presence": -0.05, "presence-sequential": -0.03, "presence-shuffled": -0.01}.get(method, 0.02)
    rows = []
    for step in range(1, steps + 1):
        t = tau_at(method, tau, step, switch_step)
        weights = rng.dirichlet(np.full(n, 20.0 / (1 + abs(t or 0))))
        rows.append({"step": step, "loss": 3 + 5 * math.exp(-step / 25) + offset * step / steps + rng.normal(0, 0.08),
                     "lr": cfg["peak_lr"] * math.sqrt(cfg["warmup_steps"] / max(step, cfg["warmup_steps"])),
                     "tau": "" if t is None else t,
                     "si_mean": "" if t is None else 50 * math.exp(-step / 80) + 5,
                     "si_std": "" if t is None else 3.0,
                     "max_weight": "" if t is None else weights.max(),
                     "weight_entropy": "" if t is None else -(weights * np.log(weights)).sum(),
                     "tokens_seen": step * 4096, "seconds": step * 0.1,
                     "heldout_loss": (3.2 + 5 * math.exp(-step / 25) + offset
                                      if step % cfg["eval_every"] == 0 or step == steps else ""),
                     "seed": seed})
    pd.DataFrame(rows).to_csv(folder / "train_log.csv", index=False)
    config = {"run_name": name, "method": method, "seed": seed, "tau": tau, "per": "microbatch", "world_size": 1,
              "preset": preset}
    (folder / "config.json").write_text(json.dumps(config))
    (runs_dir.parent.parent / "data").mkdir(exist_ok=True)
    pd.DataFrame({"language": ["en", "hi"], "sampling_probability": [0.25, 0.75]}).to_csv(
        runs_dir.parent.parent / "data" / "corpus_manifest.csv", index=False)
    heldout = [r["heldout_loss"] for r in rows if r["heldout_loss"] != ""]
    # held-out rows: the run's offset shifts every row's loss, so a paired Δ is the offsets' difference
    row_losses = HELDOUT_ROW_BASE + heldout[-1] - 3.2
    pd.DataFrame({"row": np.arange(len(HELDOUT_LANGS)), "lang": HELDOUT_LANGS, "n_tokens": 29,
                  "loss": row_losses}).to_csv(folder / "heldout_rows.csv", index=False)
    summary = [{"run": name, "method": method, "seed": seed, "step": steps, "lang": lang,
                "n_rows": int((HELDOUT_LANGS == lang).sum()), "n_tokens": int((HELDOUT_LANGS == lang).sum()) * 29,
                "loss": float(row_losses[HELDOUT_LANGS == lang].mean()), "se": 0.05} for lang in ("en", "hi")]
    summary.append({**summary[0], "lang": "all", "n_rows": len(HELDOUT_LANGS), "loss": heldout[-1], "se": 0.04})
    pd.DataFrame(summary).to_csv(folder / "heldout.csv", index=False)
    metrics = {"run_name": name, "method": method, "seed": seed, "steps": steps, "final_loss": rows[-1]["loss"],
               "final_heldout_loss": heldout[-1], "tokens_per_second": 40960.0, "seconds_per_step": 0.1,
               "model_tflops": 0.01, "wall_seconds": steps * 0.1, "parameters": {"total": 1_234_567}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return name


def write_synthetic_results(root: Path, preset_name: str = "tiny", finetune: bool = True, si: bool = True,
                            bench: bool = True, methods: tuple[str, ...] | None = None, seed: int = 0) -> Path:
    """Write root/<preset>/{pretrain/runs, finetune, si_analysis, bench}; returns root/<preset>.
    `methods` keeps only the runs of those methods (default: all of RUNS)."""
    rng = np.random.default_rng(seed)
    preset = load_preset(preset_name).to_dict()
    base = Path(root) / preset_name
    names = []
    for method, tau, switch, seeds in RUNS:
        if methods is not None and method not in methods:
            continue
        for s in seeds:
            names.append((write_run(base / "pretrain" / "runs", preset, method, tau, switch, s, rng), method, s))
    if finetune:
        xtreme, retrieval = [], []
        for name, method, s in names:
            bonus = {"presence": 2.0, "presence-sequential": 1.0}.get(method, 0.0)
            for task, metrics in TASKS.items():
                for metric in metrics:
                    values = [float(np.clip(rng.normal(40 + bonus, 5), 0, 100)) for _ in LANGS]
                    for lang, v in zip(LANGS + ["avg"], values + [float(np.mean(values))]):
                        xtreme.append({"run": name, "method": method, "seed": s, "task": task, "setting": "zero-shot",
                                       "lang": lang, "metric": metric, "value": v, "n_examples": 100})
            values = [float(np.clip(rng.normal(20 + bonus, 4), 0, 100)) for _ in LANGS[1:]]
            for lang, v in zip(LANGS[1:] + ["avg"], values + [float(np.mean(values))]):
                retrieval.append({"run": name, "method": method, "seed": s, "task": "verse_retrieval",
                                  "setting": "zero-shot", "lang": lang, "metric": "accuracy", "value": v,
                                  "n_examples": 200})
        (base / "finetune").mkdir(parents=True)
        pd.DataFrame(xtreme).to_csv(base / "finetune" / "xtreme.csv", index=False)
        pd.DataFrame(retrieval).to_csv(base / "finetune" / "retrieval.csv", index=False)
    if si:
        rows = []
        for layer_set in ("first", "all"):
            for step in (100, 200):
                for lang in ["en", "hi", "bn"]:
                    for condition, scale in (("clean", 1.0), ("jumbled", 1.8)):
                        for i in range(60):
                            rows.append({"lang": lang, "condition": condition, "sample_id": i, "n_tokens": 128,
                                         "loss": 5.0,
                                         "si": float(rng.lognormal(math.log(scale * (2 if lang == "hi" else 1)), 0.8)),
                                         "checkpoint": f"baseline-s0/step-{step}", "seed": 0,
                                         "layer_set": layer_set, "step": step})
                for condition, scale in (("random", 1.0), ("mismatched", 1.5)):
                    for i in range(60):
                        rows.append({"lang": "en", "condition": condition, "sample_id": i, "n_tokens": 128,
                                     "loss": 5.0, "si": float(rng.lognormal(math.log(scale), 0.8)),
                                     "checkpoint": f"baseline-s0/step-{step}", "seed": 0,
                                     "layer_set": layer_set, "step": step})
        (base / "si_analysis").mkdir(parents=True)
        pd.DataFrame(rows).to_csv(base / "si_analysis" / "si_scores.csv", index=False)
    if bench:
        (base / "bench").mkdir(parents=True)
        bench_rows = [("baseline", 100.0, 1.0), ("presence-microbatch", 108.0, 1.08), ("presence-sample", 140.0, 1.40),
                      ("naive-per-sample", 900.0, 9.0)]
        overhead = pd.DataFrame([{"method": m, "step_ms": ms, "ratio_to_baseline": r, "peak_mem_mb": 1000,
                                  "device": "cpu", "preset": preset_name} for m, ms, r in bench_rows])
        overhead.to_csv(base / "bench" / "si_overhead.csv", index=False)
    return base


def write_synthetic_noise_results(root: Path, preset_name: str = "tiny", seed: int = 0) -> Path:
    """Runs on noisy data (config noise_rate 0.2) with the noise columns of train_log.csv, and the
    noise_runs.csv and granularity.csv of 02_si_analysis/analyze_noise.py, all made up."""
    rng = np.random.default_rng(seed)
    base = Path(root) / preset_name
    preset = load_preset(preset_name).to_dict()
    noise_rows = []
    for method, per, share in (("baseline", "microbatch", 0.2), ("presence", "microbatch", 0.15),
                               ("presence", "sample", 0.1), ("noise-oracle", "microbatch", 0.0)):
        for s in (0, 1):
            name = write_run(base / "pretrain" / "runs", preset, method if method != "noise-oracle" else "baseline",
                             None, None, s, rng)
            folder = base / "pretrain" / "runs" / name
            renamed = folder.with_name(f"{method}{'-per-sample' if per == 'sample' else ''}-noise0.2-s{s}")
            folder.rename(renamed)
            config = json.loads((renamed / "config.json").read_text())
            config.update(run_name=renamed.name, method=method, per=per, noise_rate=0.2)
            (renamed / "config.json").write_text(json.dumps(config))
            log = pd.read_csv(renamed / "train_log.csv")
            log["noisy_batch_share"] = 0.2
            log["noisy_weight_share"] = share + rng.normal(0, 0.01, len(log))
            log["si_noise_auroc"] = np.where(log["step"] % 10 == 0, 0.7, np.nan)
            log.to_csv(renamed / "train_log.csv", index=False)
            noise_rows.append({"run": renamed.name, "method": method, "per": per, "noise_kind": "mixed",
                               "noise_rate": 0.2, "seed": s, "clean_heldout_loss": 4.0 + share, "se": 0.01,
                               "noisy_weight_share": share, "noisy_batch_share": 0.2})
    (base / "noise").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(noise_rows).to_csv(base / "noise" / "noise_runs.csv", index=False)
    granularity = [{"run": f"baseline-noise0.2-s{s}", "seed": s, "checkpoint_step": step, "microbatch_size": m,
                    "noisy_batch_share": 0.2, "noisy_weight_share_tau_minus1": 0.2 - 0.1 / m,
                    "noisy_weight_share_tau_plus1": 0.2 + 0.1 / m, "spearman_mean": 0.8 / m ** 0.5}
                   for s in (0, 1) for step in (100, 200) for m in (1, 4, 16, 64)]
    pd.DataFrame(granularity).to_csv(base / "noise" / "granularity.csv", index=False)
    return base


def add_repeat_run(base: Path, source: str, name: str, shift: float = 1.0) -> Path:
    """A second finished run of `source`'s recipe and seed, in folder `name` (as a resume check under
    another --run-name makes one): a copy whose losses and scores are all `shift` higher, so that a table
    that used it would show."""
    runs = base / "pretrain" / "runs"
    folder = runs / name
    shutil.copytree(runs / source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "run_name": name}))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(run_name=name, final_loss=metrics["final_loss"] + shift,
                   final_heldout_loss=metrics["final_heldout_loss"] + shift)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for table, columns in (("train_log.csv", ["loss", "heldout_loss"]), ("heldout.csv", ["loss"]),
                           ("heldout_rows.csv", ["loss"])):
        frame = pd.read_csv(folder / table)
        frame[columns] = frame[columns] + shift
        frame.to_csv(folder / table, index=False)
    for scores in ("xtreme.csv", "retrieval.csv"):
        path = base / "finetune" / scores
        if path.is_file():
            frame = pd.read_csv(path)
            copy = frame[frame["run"] == source].assign(run=name)
            copy["value"] = (copy["value"] + 10 * shift).clip(0, 100)
            pd.concat([frame, copy], ignore_index=True).to_csv(path, index=False)
    return folder
