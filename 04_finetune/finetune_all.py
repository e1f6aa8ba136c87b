"""04_finetune: zero-shot cross-lingual evaluation of every pre-trained checkpoint.

For each checkpoint that 03_pretrain finished (or each --checkpoint given), of any model family (T5, GPT-2,
Llama, BERT: read from its config):
  1. verse retrieval: XTREME's Tatoeba protocol on held-out aligned verses of the embedded corpus
     (mean-pooled states of T5's encoder or of the other families' one stack, nearest neighbour, accuracy
     per language). No fine-tuning; always offline.
  2. XTREME (when a local folder in XTREME's layout is given, or finetune.xtreme_source=hub): fine-tune on
     English, test every language with a test file (zero-shot; finetune.test_languages restricts them, and
     the XTREME average stays over XTREME's own languages); again on English + translate-train data when
     present. T5 is fine-tuned text-to-text (NER: a tagging head), the other families with Hugging Face's
     task heads (common/evaluation/heads.py); a task a family has no head for is skipped, saying why. The
     data is read and checked first, before any model runs.
Outputs: results/<preset>/finetune/retrieval.csv and xtreme.csv (one row per measurement with its chance
level, re-runs replace their rows), and a run folder per (checkpoint, task, setting) under
artefacts/<preset>/finetune/.

  python 04_finetune/finetune_all.py --preset tiny                                  # retrieval only, offline
  PRESENCE_XTREME_DIR=/data/xtreme python 04_finetune/finetune_all.py --preset tiny      # + XTREME, tiny
  python 04_finetune/finetune_all.py --preset paper                                 # hub data, paper recipe
  python 04_finetune/finetune_all.py --preset paper --checkpoint google/mt5-base    # any hub or local model
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as transformers_logging

from common.cli import exit_on_interrupt, exit_on_known_errors
from common.config import FinetuneConfig, load_preset
from common.evaluation.extractive_qa import encode_spans, predict_spans
from common.evaluation.finetuning import (LABEL_WORDS, EncoderTagger, batches_forever, encode_tagged, encode_text_to_text,
                               generate, max_label_tokens, pair_input, predict_classes, predict_tags, qa_answer_fits,
                               qa_input, train)
from common.evaluation.heads import head_class, left_out_reason
from common.families import Family, backbone, family_of_config
from common.io import iter_jsonl_gz
from common.evaluation.metrics import accuracy, qa_scores, span_f1
from common.modeling import load_pretrained, require_model
from common.paths import artefacts_dir, finished_pretrain_runs, results_dir, xtreme_dir
from common.evaluation.retrieval import embed, retrieval_accuracy
from common.evaluation.score_rows import chance_level, upsert_rows
from common.runinfo import write_run_files
from common.seeding import seed_everything
from common.evaluation.xtreme import NER_TAGS, TASK_METRICS, TaskData, in_xtreme_average, load_hub, load_local, subsample
from common.threads import set_cpu_threads

KIND = {"xnli": "pair", "pawsx": "pair", "panx": "tagging", "xquad": "qa", "mlqa": "qa", "tydiqa": "qa"}


@dataclass(frozen=True)
class Checkpoint:
    path: str  # a local Hugging Face folder or a hub name
    run: str
    method: str
    seed: int


# --- checkpoints -------------------------------------------------------------------------------------

def find_checkpoints(preset: str, given: list[str], default_seed: int) -> list[Checkpoint]:
    if given:
        return [describe_checkpoint(name, default_seed, preset) for name in given]
    found = finished_pretrain_runs(preset)
    if not found:
        raise FileNotFoundError(f"no pre-trained checkpoint under {artefacts_dir(preset, 'pretrain')} (looked for "
                                "*/final/presence_run.json). Fix: run `make pretrain` first, or pass --checkpoint DIR")
    return [describe_checkpoint(str(folder), default_seed, preset) for folder in found]


def describe_checkpoint(name: str, default_seed: int, preset: str) -> Checkpoint:
    """A folder from 03_pretrain carries presence_run.json; any other model (a local folder or a hub name
    such as google/mt5-small) is evaluated as method 'external'."""
    require_model(name, finished_pretrain_runs(preset), preset)
    folder = Path(name)
    if not folder.exists():
        return Checkpoint(name, name.replace("/", "--"), "external", default_seed)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no Hugging Face model (config.json is missing). Fix: pass the "
                                "'final' folder of a pre-training run")
    info_path = folder / "presence_run.json"
    if not info_path.is_file():
        return Checkpoint(str(folder), folder.name, "external", default_seed)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        return Checkpoint(str(folder), str(info["run_name"]), str(info["method"]), int(info["seed"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{info_path} is not a valid run description ({err}); it needs run_name, method and seed. "
                         "Fix: re-run the pre-training that wrote it") from None


def checkpoint_family(checkpoint: Checkpoint) -> Family:
    return family_of_config(AutoConfig.from_pretrained(checkpoint.path))


def load_model(checkpoint: Checkpoint, dropout_rate: float, auto_class=None, **head):
    """The checkpoint's model (with its family's Auto class, or a task head's built on its weights) and its
    tokenizer; `head`: the head's config fields (num_labels)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = load_pretrained(checkpoint.path, auto_class, dropout_rate=dropout_rate, **head)
    return model, tokenizer


# --- verse retrieval ---------------------------------------------------------------------------------

def read_heldout_verses(path: Path) -> dict[str, dict[str, str]]:
    """language -> verse id ("book.chapter.verse") -> text, from the data stage's gzipped JSON lines
    {"book", "chapter", "verse", <language>: text, ...} (one line per verse of the held-out books)."""
    verses: dict[str, dict[str, str]] = {}
    fix = "run `make data` first (the data stage writes the held-out aligned verses), or set finetune.retrieval=false"
    for line_no, record in iter_jsonl_gz(path, fix):
        try:
            verse_id = f"{int(record.pop('book'))}.{int(record.pop('chapter'))}.{int(record.pop('verse'))}"
            for lang, text in record.items():
                verses.setdefault(str(lang), {})[verse_id] = str(text)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}, line {line_no}: expected JSON with book, chapter, verse and one text "
                             f"per language ({err!r}). Fix: re-run `make data`") from None
    return verses


def choose_retrieval_pairs(verses: dict[str, dict[str, str]], cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """The languages to test against English and one seeded sample of verse ids that all of them share."""
    languages = cfg.retrieval_languages or sorted(lang for lang in verses if lang != "en")
    missing = sorted(({"en"} | set(languages)) - set(verses))
    if missing:
        raise ValueError(f"held-out verses have no {missing}; they have {sorted(verses)}. "
                         "Fix: choose finetune.retrieval_languages among them")
    shared = sorted(set(verses["en"]).intersection(*(verses[lang] for lang in languages)))
    if len(shared) < 2:
        raise ValueError(f"only {len(shared)} verse(s) are aligned across en and {languages}. Fix: re-run `make data`")
    if len(shared) < cfg.retrieval_pairs:
        print(f"retrieval: only {len(shared)} aligned verses (finetune.retrieval_pairs={cfg.retrieval_pairs})")
    return languages, sorted(random.Random(cfg.seed).sample(shared, min(cfg.retrieval_pairs, len(shared))))


def evaluate_retrieval(ckpt: Checkpoint, verses, languages, verse_ids, cfg, device) -> tuple[list[dict], dict]:
    """X -> English accuracy from the final output of the backbone (T5's encoder, the other families' one
    stack: after its final norm for GPT-2 and Llama) ('accuracy') and from the middle block
    ('accuracy_middle_layer'), and English -> X from the final output ('accuracy_en_to_x')."""
    model, tokenizer = load_model(ckpt, dropout_rate=0.0)
    encoder = backbone(model)
    layers = {"last": -1, "middle": model.config.num_hidden_layers // 2}
    started = time.perf_counter()

    def vectors(lang):
        return embed(encoder, tokenizer, [verses[lang][v] for v in verse_ids], list(layers.values()),
                     cfg.eval_batch_size, cfg.input_length, device)

    english = vectors("en")
    scores = {}
    for lang in languages:
        other = vectors(lang)
        scores[lang] = {"accuracy": retrieval_accuracy(other[layers["last"]], english[layers["last"]]),
                        "accuracy_en_to_x": retrieval_accuracy(english[layers["last"]], other[layers["last"]]),
                        "accuracy_middle_layer": retrieval_accuracy(other[layers["middle"]], english[layers["middle"]])}
    seconds = time.perf_counter() - started
    n = {lang: len(verse_ids) for lang in languages}
    metrics = {"scores": scores, "layers": layers, "pairs_per_language": len(verse_ids), "seconds": seconds,
               "sentences_per_second": len(verse_ids) * (len(languages) + 1) / seconds}
    return result_rows(ckpt, "verse_retrieval", "zero-shot", scores, n, languages), metrics


# --- XTREME ------------------------------------------------------------------------------------------

def load_tasks(cfg: FinetuneConfig, folder: str | None) -> dict[str, TaskData]:
    languages = cfg.test_languages or None
    if cfg.xtreme_source == "hub":
        def load(task):
            return load_hub(task, languages)
    else:
        root = xtreme_dir(folder)
        if root is None:
            print("XTREME: no local folder (set PRESENCE_XTREME_DIR or --xtreme-dir, or finetune.xtreme_source=hub); "
                  "XTREME tasks skipped")
            return {}
        print(f"XTREME: reading {root}")

        def load(task):
            return load_local(task, root, cfg.seed, languages)
    tasks = {}
    for name in cfg.tasks:
        data = load(name)
        data.test = {lang: subsample(examples, cfg.max_eval_examples, cfg.seed) for lang, examples in data.test.items()}
        for note in data.notes:
            print(f"  note: {note}")
        if not data.translate_train:
            print(f"  {name} translate-train: files not present, skipped")
        tasks[name] = data
    return tasks


def training_groups(tasks: dict[str, TaskData], setting: str) -> list[list[str]]:
    """Tasks trained on the same data share one fine-tuned model (XTREME trains one SQuAD model for XQuAD
    and MLQA)."""
    groups: dict[tuple, list[str]] = {}
    for name, data in tasks.items():
        if setting == "translate-train" and not data.translate_train:
            continue
        key = (KIND[name], data.train_source) + ((data.translate_source,) if setting == "translate-train" else ())
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def training_examples(data: TaskData, setting: str, cfg: FinetuneConfig) -> list:
    examples = list(data.train)
    if setting == "translate-train":
        examples += [ex for lang in sorted(data.translate_train) for ex in data.translate_train[lang]]
    return subsample(examples, cfg.max_train_examples, cfg.seed)


def finetune(ckpt: Checkpoint, family: Family, task: str, examples: list, cfg: FinetuneConfig, device, desc: str):
    seed_everything(ckpt.seed)
    prepare = prepare_text_to_text if family.name == "t5" else prepare_head
    model, tokenizer, encoded, stats = prepare(ckpt, family, task, examples, cfg)
    batches = batches_forever(encoded, cfg.batch_size, ckpt.seed, tokenizer.pad_token_id)
    stats.update(train(model, batches, cfg.steps, cfg.lr, device, cfg.precision == "bf16", cfg.log_every, desc))
    return model, tokenizer, stats


def prepare_text_to_text(ckpt: Checkpoint, family: Family, task: str, examples: list, cfg: FinetuneConfig):
    """T5: the model and its encoded training examples (NER: the encoder with a tagging head)."""
    model, tokenizer = load_model(ckpt, cfg.dropout_rate)
    stats = {"n_train_examples": len(examples)}
    if KIND[task] == "tagging":
        model = EncoderTagger(model.get_encoder(), model.config.d_model, cfg.dropout_rate)
        encoded = encode_tagged(tokenizer, examples, cfg.input_length)
    elif KIND[task] == "qa":  # a target the input no longer contains cannot be learnt: drop it
        kept = [ex for ex, fits in zip(examples, qa_answer_fits(tokenizer, examples, cfg.input_length)) if fits]
        stats["dropped_answer_truncated"] = len(examples) - len(kept)
        if not kept:
            raise ValueError(f"no {task} training answer lies within the first finetune.input_length="
                             f"{cfg.input_length} tokens of its input. Fix: raise finetune.input_length")
        encoded = encode_text_to_text(tokenizer, [qa_input(ex) for ex in kept], cfg.input_length,
                                      [ex.answers[0] for ex in kept], cfg.target_length)
    else:
        encoded = encode_text_to_text(tokenizer, [pair_input(task, ex) for ex in examples], cfg.input_length,
                                      [LABEL_WORDS[task][ex.label] for ex in examples], cfg.target_length)
    return model, tokenizer, encoded, stats


def prepare_head(ckpt: Checkpoint, family: Family, task: str, examples: list, cfg: FinetuneConfig):
    """GPT-2, Llama, BERT: the task head on the pre-trained weights and its encoded training examples. Pairs
    are the text-to-text inputs with the label's index as target (the order of LABEL_WORDS)."""
    kind, stats = KIND[task], {"n_train_examples": len(examples)}
    num_labels = {"pair": len(LABEL_WORDS.get(task, {})), "tagging": len(NER_TAGS), "qa": 2}[kind]  # qa: start, end
    model, tokenizer = load_model(ckpt, cfg.dropout_rate, head_class(family.name, kind), num_labels=num_labels)
    if kind == "tagging":
        encoded = encode_tagged(tokenizer, examples, cfg.input_length)
    elif kind == "qa":  # an answer the input no longer contains cannot be learnt: drop it
        spans = encode_spans(tokenizer, examples, cfg.input_length)
        encoded = [row for row in spans if row["start_positions"] is not None]
        stats["dropped_answer_truncated"] = len(spans) - len(encoded)
        if not encoded:
            raise ValueError(f"no {task} training answer lies within the first finetune.input_length="
                             f"{cfg.input_length} tokens of its input. Fix: raise finetune.input_length")
    else:
        classes = list(LABEL_WORDS[task])
        inputs = encode_text_to_text(tokenizer, [pair_input(task, ex) for ex in examples], cfg.input_length)
        encoded = [{**row, "labels": classes.index(ex.label)} for row, ex in zip(inputs, examples)]
    return model, tokenizer, encoded, stats


def evaluate(task: str, family: Family, model, tokenizer, test: dict[str, list], cfg: FinetuneConfig,
             device) -> tuple[dict, dict]:
    """Scores per language, and for the run folder: timing, diagnostics and the first predictions."""
    bf16, scores, extra = cfg.precision == "bf16", {}, {"first_predictions": {}}
    text_to_text = family.name == "t5"
    started = time.perf_counter()
    for lang, examples in tqdm(test.items(), desc=f"evaluate {task}", leave=False, disable=None):
        if KIND[task] == "tagging":
            encoded = encode_tagged(tokenizer, examples, cfg.input_length)
            predicted = predict_tags(model, encoded, cfg.eval_batch_size, tokenizer.pad_token_id, device, bf16)
            gold = [ex.tags for ex in examples]
            scores[lang] = {f"span_{name}": value for name, value in span_f1(gold, predicted).items()}
        elif KIND[task] == "qa" and text_to_text:
            encoded = encode_text_to_text(tokenizer, [qa_input(ex) for ex in examples], cfg.input_length)
            predicted = generate(model, tokenizer, encoded, cfg.eval_batch_size, cfg.target_length, device, bf16)
            gold = [ex.answers for ex in examples]
            scores[lang] = qa_scores(predicted, gold, lang if task == "mlqa" else None)
            fits = qa_answer_fits(tokenizer, examples, cfg.input_length)
            extra.setdefault("answer_in_input_percent", {})[lang] = 100.0 * sum(fits) / len(fits)
        elif KIND[task] == "qa":
            encoded = encode_spans(tokenizer, examples, cfg.input_length)
            predicted = predict_spans(model, encoded, [ex.context for ex in examples], cfg.eval_batch_size,
                                      tokenizer.pad_token_id, device, bf16)
            gold = [ex.answers for ex in examples]
            scores[lang] = qa_scores(predicted, gold, lang if task == "mlqa" else None)
            fits = [row["start_positions"] is not None for row in encoded]
            extra.setdefault("answer_in_input_percent", {})[lang] = 100.0 * sum(fits) / len(fits)
        else:
            words = LABEL_WORDS[task]
            encoded = encode_text_to_text(tokenizer, [pair_input(task, ex) for ex in examples], cfg.input_length)
            if text_to_text:
                predicted = generate(model, tokenizer, encoded, cfg.eval_batch_size,
                                     max_label_tokens(tokenizer, list(words.values())), device, bf16)
            else:
                labels = list(words)
                classes = predict_classes(model, encoded, cfg.eval_batch_size, tokenizer.pad_token_id, device, bf16)
                predicted = [words[labels[c]] for c in classes]
            gold = [words[ex.label] for ex in examples]
            scores[lang] = {"accuracy": accuracy(predicted, gold)}
            valid = sum(p in words.values() for p in predicted)  # the rest are wrong by definition
            extra.setdefault("valid_label_percent", {})[lang] = 100.0 * valid / len(predicted)
        extra["first_predictions"][lang] = [{"predicted": p, "gold": g} for p, g in zip(predicted[:3], gold[:3])]
    seconds = time.perf_counter() - started
    n_examples = sum(len(examples) for examples in test.values())
    extra.update({"eval_seconds": seconds, "eval_examples_per_second": n_examples / seconds})
    return scores, extra


def finetune_and_evaluate(preset, ckpt: Checkpoint, setting: str, names: list[str], tasks: dict[str, TaskData],
                          out: Path, device) -> dict[str, float]:
    """Fine-tune once for a group of tasks, test each of them on every language, record the results."""
    cfg, first = preset.finetune, tasks[names[0]]
    desc = f"{ckpt.run} | {'+'.join(names)} | {setting}"
    family = checkpoint_family(ckpt)
    if family.name != "t5" and head_class(family.name, KIND[names[0]]) is None:
        print(f"{desc} | skipped for a {family.name} model: {left_out_reason(family.name, KIND[names[0]])}")
        return {}
    model, tokenizer, train_stats = finetune(ckpt, family, names[0], training_examples(first, setting, cfg), cfg,
                                             device, desc)
    averages = {}
    for name in names:
        data = tasks[name]
        scores, extra = evaluate(name, family, model, tokenizer, data.test, cfg, device)
        n = {lang: len(examples) for lang, examples in data.test.items()}
        rows = result_rows(ckpt, name, setting, scores, n, [lang for lang in scores if in_xtreme_average(name, lang)])
        upsert_rows(out / "xtreme.csv", rows)
        config = {"train_source": first.train_source, "trained_with": names, "notes": data.notes,
                  "translate_train_languages": sorted(first.translate_train) if setting == "translate-train" else []}
        save_run(preset, ckpt, name, setting, config, {"train": train_stats, **extra, "scores": scores})
        metric = TASK_METRICS[name][0]
        averages[name] = next((r["value"] for r in rows if r["lang"] == "avg" and r["metric"] == metric), None)
        print(f"{ckpt.run} | {name} | {setting} | {describe_average(name, metric, averages[name], list(scores))} "
              f"| {extra['eval_examples_per_second']:.0f} examples/s")
    return averages


def describe_average(task: str, metric: str, average: float | None, languages: list[str]) -> str:
    """The log line's score: the XTREME average beside chance, and the languages reported apart from it."""
    extra = [lang for lang in languages if not in_xtreme_average(task, lang)]
    chance = chance_level(task, metric, 1)  # XTREME's chance levels do not depend on the example count
    text = f"no {metric} avg" if average is None else f"{metric} avg {average:.2f}%"
    text += "" if chance is None else f" (chance {chance:.2f}%)"
    text += f" over {len(languages) - len(extra)} languages"
    return text + (f" (+ {', '.join(extra)} in rows of their own)" if extra else "")


# --- results -----------------------------------------------------------------------------------------

def result_rows(ckpt: Checkpoint, task: str, setting: str, scores: dict[str, dict], n: dict[str, int],
                averaged: list[str]) -> list[dict]:
    """One row per (language, metric), plus lang 'avg': the plain mean over the `averaged` languages (for XTREME
    tasks XTREME's own, English included, as XTREME averages them); no 'avg' row when that list is empty."""
    rows = []
    base = {"run": ckpt.run, "method": ckpt.method, "seed": ckpt.seed, "task": task, "setting": setting}
    metrics = list(next(iter(scores.values())))
    for lang, values in scores.items():
        rows += [{**base, "lang": lang, "metric": m, "value": round(values[m], 4), "n_examples": n[lang]}
                 for m in metrics]
    if averaged:
        rows += [{**base, "lang": "avg", "metric": m,
                  "value": round(sum(scores[lang][m] for lang in averaged) / len(averaged), 4),
                  "n_examples": sum(n[lang] for lang in averaged)} for m in metrics]
    return rows


def save_run(preset, ckpt: Checkpoint, name: str, setting: str, config: dict, metrics: dict) -> None:
    """Write the run folder beside its place and swap it in, so that an interruption leaves the earlier
    folder or the new one, never a mix of the two."""
    run_dir = artefacts_dir(preset.name, "finetune", ckpt.run, name, setting)
    staging = run_dir.with_name(f".{run_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_run_files(staging, {"preset": preset.to_dict(), "checkpoint": asdict(ckpt), "task": name,
                              "setting": setting, **config}, metrics)
    if run_dir.is_dir():
        print(f"  replacing the earlier evaluation in {run_dir}")
        shutil.rmtree(run_dir)
    staging.rename(run_dir)


# --- main --------------------------------------------------------------------------------------------

def main(preset_name: str = "tiny", overrides: list[str] | None = None, checkpoints: list[str] | None = None,
         xtreme_folder: str | None = None) -> dict:
    started = time.perf_counter()
    transformers_logging.disable_progress_bar()  # one bar per model load would bury the log lines
    preset = load_preset(preset_name, overrides)
    cfg = preset.finetune
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_cpu_threads(device)  # common/threads.py: one core left to whatever shares the machine
    ckpts = find_checkpoints(preset.name, checkpoints or [], cfg.seed)
    out = results_dir(preset.name, "finetune")
    print(f"04_finetune | preset {preset.name} | {device} | checkpoints: {', '.join(c.run for c in ckpts)}")
    summary: dict = {"checkpoints": [asdict(c) for c in ckpts], "retrieval": {}, "xtreme": {}}
    tasks = load_tasks(cfg, xtreme_folder)  # first: a bad data file fails before any model is run

    if cfg.retrieval:
        verses = read_heldout_verses(artefacts_dir(preset.name, "data", "heldout_parallel_verses.jsonl.gz"))
        languages, verse_ids = choose_retrieval_pairs(verses, cfg)
        for ckpt in ckpts:
            rows, metrics = evaluate_retrieval(ckpt, verses, languages, verse_ids, cfg, device)
            upsert_rows(out / "retrieval.csv", rows)
            save_run(preset, ckpt, "verse_retrieval", "zero-shot", {"languages": languages}, metrics)
            average = next(r["value"] for r in rows if r["lang"] == "avg" and r["metric"] == "accuracy")
            chance = chance_level("verse_retrieval", "accuracy", len(verse_ids))
            print(f"{ckpt.run} | verse_retrieval | X->en accuracy avg {average:.1f}% (chance {chance:.1f}%) over "
                  f"{len(languages)} language{'s' * (len(languages) != 1)} | "
                  f"{metrics['sentences_per_second']:.0f} sentences/s")
            summary["retrieval"][ckpt.run] = average

    for setting in ("zero-shot", "translate-train"):
        for ckpt in ckpts:
            for names in training_groups(tasks, setting):
                averages = finetune_and_evaluate(preset, ckpt, setting, names, tasks, out, device)
                summary["xtreme"].update({f"{ckpt.run}/{name}/{setting}": v for name, v in averages.items()})
    summary["seconds"] = time.perf_counter() - started
    print(f"04_finetune done in {summary['seconds']:.0f} s; results in {out}")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a preset field, e.g. --set finetune.steps=50 (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="DIR_OR_HUB_NAME",
                        help="evaluate this model instead of every finished pre-training run (repeatable)")
    parser.add_argument("--xtreme-dir", help="folder with XTREME's download layout (default: $PRESENCE_XTREME_DIR)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    with exit_on_known_errors():
        out = results_dir(load_preset(args.preset, args.set).name, "finetune")
        # every evaluation's rows are written (atomically) as soon as it ends: an interruption loses the one
        # under way only
        with exit_on_interrupt(f"the evaluations that finished are kept in {out} (a rerun evaluates every "
                               "checkpoint again and replaces its rows)"):
            main(args.preset, args.set, args.checkpoint, args.xtreme_dir)
