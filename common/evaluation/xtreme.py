"""Readers of the XTREME tasks the PRESENCE paper evaluates, into one in-memory form whichever the source:
a local folder with XTREME's download layout (scripts/download_data.sh of google-research/xtreme), or the
Hugging Face hub (`google/xtreme` configs, plus `nyu-mll/multi_nli` for XNLI's English training set).

Zero-shot cross-lingual protocol: train on English, test every language of the task. Where a local folder
lacks XTREME's English training file, a documented stand-in is used and recorded in TaskData.notes.

A local folder's test files are found by name, so languages beyond XTREME's lists (XTREME-R adds some to
XQuAD and PAN-X) are tested too; they are reported in rows of their own and kept out of the XTREME average,
which stays over TEST_LANGUAGES (`in_xtreme_average`). A file found but not evaluated is named in a note.
Bad input fails when it is read, before any fine-tuning, with XtremeDataError naming the file and the line
(or JSON element) at fault: malformed lines, empty files, and parallel test sets that are no longer parallel.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.config import XTREME_TASKS
from common.evaluation.metrics import MLQA_LANGUAGES

TASKS = XTREME_TASKS
TASK_METRICS = {"xnli": ("accuracy",), "pawsx": ("accuracy",), "panx": ("span_f1", "span_precision", "span_recall"),
                "xquad": ("f1", "exact_match"), "mlqa": ("f1", "exact_match"), "tydiqa": ("f1", "exact_match")}
# XTREME's test languages per task; XTREME's per-task score is the mean over all of them, English included.
TEST_LANGUAGES = {
    "xnli": ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"),
    "pawsx": ("de", "en", "es", "fr", "ja", "ko", "zh"),
    "panx": ("af", "ar", "bg", "bn", "de", "el", "en", "es", "et", "eu", "fa", "fi", "fr", "he", "hi", "hu", "id",
             "it", "ja", "jv", "ka", "kk", "ko", "ml", "mr", "ms", "my", "nl", "pt", "ru", "sw", "ta", "te", "th",
             "tl", "tr", "ur", "vi", "yo", "zh"),
    "xquad": ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"),
    "mlqa": ("ar", "de", "en", "es", "hi", "vi", "zh"),
    "tydiqa": ("ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te"),
}
NLI_LABELS = ("entailment", "neutral", "contradiction")
PAWSX_LABELS = ("0", "1")
NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
TYDIQA_NAMES = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
                "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
TYDIQA_CODES = {name: code for code, name in TYDIQA_NAMES.items()}
# Test sets that are translations of one set, example by example (subsample keeps them aligned).
PARALLEL_TASKS = ("xnli", "pawsx", "xquad")
HUB_DATASET = "google/xtreme"
HUB_MNLI = "nyu-mll/multi_nli"


class XtremeDataError(ValueError):
    """Missing or malformed task data. The message names the file and line, and what to do."""


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # every gold answer; the first one is the training target
    answer_starts: tuple[int, ...]


@dataclass(frozen=True)
class PairExample:
    text_a: str
    text_b: str
    label: str


@dataclass(frozen=True)
class TaggedSentence:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass
class TaskData:
    task: str
    train: list  # English training examples (zero-shot cross-lingual)
    train_source: str  # where they came from; tasks with the same source share one fine-tuned model
    test: dict[str, list]  # language -> test examples
    translate_train: dict[str, list] = field(default_factory=dict)  # language -> translated training examples
    translate_source: str = ""  # the folder they came from (QA tasks that share it share one fine-tuned model)
    notes: list[str] = field(default_factory=list)  # every departure from XTREME's protocol


def in_xtreme_average(task: str, lang: str) -> bool:
    """Whether `lang` is one of XTREME's test languages of `task`, the languages its score averages."""
    return lang in TEST_LANGUAGES[task]


def subsample(examples: list, limit: int | None, seed: int) -> list:
    """A seeded sample of at most `limit` examples, in file order. Parallel test sets of equal size (XNLI,
    XQuAD) get the same indices in every language, so they stay parallel."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


# --- local files -------------------------------------------------------------------------------------

def read_squad_json(path: Path) -> list[QAExample]:
    """SQuAD v1.1 JSON (XQuAD, MLQA, TyDi QA-GoldP and SQuAD itself)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise XtremeDataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}). Fix: re-download the file")
    examples = []
    try:
        for a, article in enumerate(data["data"]):
            for p, paragraph in enumerate(article["paragraphs"]):
                for q, qa in enumerate(paragraph["qas"]):
                    where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    if not qa["answers"]:
                        raise XtremeDataError(f"{path}, {where}: question {qa['id']!r} has no answer. "
                                              "Fix: use the SQuAD v1.1 files XTREME distributes")
                    examples.append(QAExample(
                        id=str(qa["id"]), question=qa["question"], context=paragraph["context"],
                        answers=tuple(ans["text"] for ans in qa["answers"]),
                        answer_starts=tuple(int(ans["answer_start"]) for ans in qa["answers"])))
    except (KeyError, TypeError) as err:
        raise XtremeDataError(f"{path}: not SQuAD v1.1 JSON (missing or wrong field {err}). "
                              "Fix: the file must hold data[].paragraphs[].qas[] with answers") from None
    if not examples:
        raise XtremeDataError(f"{path}: no questions (data[] holds {len(data['data'])} articles). "
                              "Fix: re-download the file")
    return examples


def read_pair_tsv(path: Path, labels: tuple[str, ...], header: bool = False) -> list[PairExample]:
    """Sentence pairs, one per line: text_a TAB text_b TAB label. Translate-train files may carry the English
    originals in front: the last three fields are always (text_a, text_b, label)."""
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if header and line_no == 1 or not row:
                continue
            if len(row) < 3:
                raise XtremeDataError(f"{path}, line {line_no}: expected text_a, text_b and label separated by "
                                      f"tabs, found {len(row)} field(s). Fix: test files need their labels")
            label = "contradiction" if row[-1].strip() == "contradictory" else row[-1].strip()
            if label not in labels:
                raise XtremeDataError(f"{path}, line {line_no}: unknown label {row[-1]!r}; expected one of {labels}")
            examples.append(PairExample(row[-3], row[-2], label))
    if not examples:
        raise XtremeDataError(f"{path}: no sentence pairs ({_blank_file(path)}). Fix: re-download the file")
    return examples


def read_conll_tsv(path: Path) -> list[TaggedSentence]:
    """PAN-X as XTREME writes it: token TAB IOB2 tag, a blank line between sentences."""
    sentences, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                if tokens:
                    sentences.append(TaggedSentence(tuple(tokens), tuple(tags)))
                tokens, tags = [], []
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise XtremeDataError(f"{path}, line {line_no}: expected token TAB tag, found {len(fields)} field(s)")
            if fields[1] not in NER_TAGS:
                raise XtremeDataError(f"{path}, line {line_no}: unknown tag {fields[1]!r}; expected one of {NER_TAGS}")
            tokens.append(fields[0])
            tags.append(fields[1])
    if tokens:
        sentences.append(TaggedSentence(tuple(tokens), tuple(tags)))
    if not sentences:
        raise XtremeDataError(f"{path}: no tagged sentences ({_blank_file(path)}). Fix: re-download the file")
    return sentences


def _blank_file(path: Path) -> str:
    """What an example-less text file holds, for the error message."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        return "the file is empty"
    return f"lines 1-{len(lines)} hold no example" if len(lines) > 1 else "line 1 holds no example"


def _first_existing(root: Path, *candidates: str) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_file()), None)


def _require(root: Path, *candidates: str) -> Path:
    found = _first_existing(root, *candidates)
    if found is None:
        raise XtremeDataError(f"{root / candidates[0]} is missing. Fix: download the task in XTREME's layout "
                              "(google-research/xtreme scripts/download_data.sh) or drop the task from finetune.tasks")
    return found


@dataclass(frozen=True)
class FilePattern:
    """Test files of a task in XTREME's layout: the files `glob` finds whose name fully matches `name`; the
    regex's group is the language. `layout` is the form the notes quote."""
    glob: str
    name: str
    layout: str


# In order of preference: the first file found for a language is its test set.
TEST_FILES = {
    "xnli": (FilePattern("xnli/test-*.tsv", r"test-([^.]+)\.tsv", "xnli/test-<l>.tsv"),),
    "pawsx": (FilePattern("pawsx/test-*.tsv", r"test-([^.]+)\.tsv", "pawsx/test-<l>.tsv"),),
    "panx": (FilePattern("panx/test-*.tsv", r"test-([^.]+)\.tsv", "panx/test-<l>.tsv"),),
    "xquad": (FilePattern("xquad/xquad.*.json", r"xquad\.([^.]+)\.json", "xquad/xquad.<l>.json"),),
    # XTREME's MLQA score takes context and question in one language; the mixed pairs are MLQA's G-XLT task
    "mlqa": (FilePattern("mlqa/MLQA_V1/test/*.json", r"test-context-([^.-]+)-question-\1\.json",
                       "mlqa/MLQA_V1/test/test-context-<l>-question-<l>.json"),
             FilePattern("mlqa/MLQA_V1/dev/*.json", r"dev-context-([^.-]+)-question-\1\.json",
                       "mlqa/MLQA_V1/dev/dev-context-<l>-question-<l>.json")),
    "tydiqa": (FilePattern("tydiqa/tydiqa-goldp-v1.1-dev/tydiqa-goldp-dev-*.json", r"tydiqa-goldp-dev-([a-z]+)\.json",
                         "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa-goldp-dev-<language name>.json"),
               FilePattern("tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.goldp.*.dev.json", r"tydiqa\.goldp\.([^.]+)\.dev\.json",
                         "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.goldp.<l>.dev.json")),
}
PAWSX_DEV_FILES = (FilePattern("pawsx/dev-*.tsv", r"dev-([^.]+)\.tsv", "pawsx/dev-<l>.tsv"),)
UNMATCHED_WHY = {"mlqa": " (XTREME's MLQA score takes context and question in one language)"}


def find_test_files(root: Path, patterns: tuple[FilePattern, ...]) -> tuple[dict[str, Path], list[Path]]:
    """language -> its test file, and the files the globs found whose names fit no pattern."""
    found: dict[str, Path] = {}
    unmatched = []
    for pattern in patterns:
        for path in sorted(root.glob(pattern.glob)):
            match = re.fullmatch(pattern.name, path.name)
            if match is None:
                unmatched.append(path)
            else:
                found.setdefault(TYDIQA_CODES.get(match.group(1), match.group(1)), path)
    return found, unmatched


def _choose_languages(task: str, files: dict[str, Path], languages: list[str] | None,
                      notes: list[str]) -> dict[str, Path]:
    """The test files to evaluate: every language found, or those of `languages`; a note for each file left
    out, each language without a file, and the languages outside XTREME's average."""
    wanted = list(languages) if languages else sorted(set(TEST_LANGUAGES[task]) | set(files))
    left_out = sorted(set(files) - set(wanted))
    if left_out:
        notes.append(f"{task}: test files for {', '.join(left_out)} not evaluated (finetune.test_languages)")
    if task == "mlqa":
        unscorable = sorted(lang for lang in files if lang in wanted and lang not in MLQA_LANGUAGES)
        if unscorable:
            notes.append(f"mlqa: test files for {', '.join(unscorable)} not evaluated: MLQA's official evaluation "
                         f"normalises answers of {', '.join(MLQA_LANGUAGES)} only")
        wanted = [lang for lang in wanted if lang not in unscorable]
    missing = [lang for lang in wanted if lang not in files]
    if missing:
        notes.append(f"{task}: no test file for {', '.join(missing)}; averaged over the other languages")
    chosen = {lang: files[lang] for lang in wanted if lang in files}
    extra = [lang for lang in chosen if not in_xtreme_average(task, lang)]
    if extra:
        notes.append(f"{task}: {', '.join(extra)} evaluated in rows of their own, outside the XTREME average "
                     f"(not among XTREME's {task} languages)")
    return chosen


def _check_parallel(task: str, files: dict[str, Path], tests: dict[str, list]) -> None:
    """Parallel test sets must have one size: a file with another was cut short or is not that set."""
    sizes = {lang: len(examples) for lang, examples in tests.items()}
    counts = Counter(sizes.values())
    reference = "en" if "en" in sizes else max(sizes, key=lambda lang: (counts[sizes[lang]], sizes[lang]))
    for lang, size in sizes.items():
        if size != sizes[reference]:
            path = files[lang]
            ends = (f", ending at line {len(path.read_text(encoding='utf-8').splitlines())}"
                    if path.suffix == ".tsv" else "")
            raise XtremeDataError(f"{path}: {size:,} examples{ends}, but {files[reference].name} has "
                                  f"{sizes[reference]:,}; {task}'s test files are translations of one set, example "
                                  "by example, so this one was cut short or is another set. Fix: re-download it")


def _local_tests(task: str, root: Path, read: Callable[[Path], list], patterns: tuple[FilePattern, ...],
                 notes: list[str], languages: list[str] | None) -> dict[str, list]:
    files, unmatched = find_test_files(root, patterns)
    if unmatched:
        layouts = " or ".join(p.layout for p in patterns)
        shown = ", ".join(p.name for p in unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        notes.append(f"{task}: {len(unmatched)} file(s) not evaluated, their names are not {layouts}"
                     f"{UNMATCHED_WHY.get(task, '')}: {shown}")
    files = _choose_languages(task, files, languages, notes)
    if not files:
        chosen = f", languages {', '.join(languages)}" if languages else ""
        raise XtremeDataError(f"no test file of {task} to evaluate under {root} "
                              f"({' or '.join(p.layout for p in patterns)}{chosen}). Fix: download the task, check "
                              "finetune.test_languages, or drop the task from finetune.tasks")
    tests = {lang: read(path) for lang, path in files.items()}
    if task in PARALLEL_TASKS:
        _check_parallel(task, files, tests)
    if task == "mlqa":
        _note_mlqa_splits(root, files, notes)
    return tests


def _note_mlqa_splits(root: Path, files: dict[str, Path], notes: list[str]) -> None:
    on_dev = [lang for lang, path in files.items() if path.parent.name == "dev"]
    if not on_dev:
        return
    if not (root / "mlqa/MLQA_V1/test").is_dir():
        notes.append("mlqa: evaluated on MLQA dev (the test split is not in the folder)")
        return
    on_test = [lang for lang in files if lang not in on_dev]
    notes.append(f"mlqa: evaluated on MLQA dev for {', '.join(on_dev)} (no test file for them), on test for "
                 f"{', '.join(on_test) or 'none'}; the average mixes the two splits")


# Where XTREME's layout keeps translate-train data: machine translations of the English training set
# (google-research/xtreme "Translations"); PAN-X has none, so there it means the other languages' gold training sets.
TRANSLATE_TRAIN_FILES = {"xnli": "xnli/translate-train/en-{}-translated.tsv",
                         "pawsx": "pawsx/translate-train/en-{}-translated.tsv",
                         "xquad": "squad/translate-train/squad.translate.train.en-{}.json",
                         "mlqa": "squad/translate-train/squad.translate.train.en-{}.json",
                         "tydiqa": "tydiqa/translate-train/tydiqa.translate.train.en-{}.json",
                         "panx": "panx/train-{}.tsv"}


def translate_train_files(task: str, root: Path) -> dict[str, Path]:
    """The translate-train files of `task` present under `root`, by language."""
    found = {lang: Path(root) / TRANSLATE_TRAIN_FILES[task].format(lang) for lang in TEST_LANGUAGES[task]}
    return {lang: path for lang, path in found.items() if lang != "en" and path.is_file()}


def load_local(task: str, root: Path, seed: int = 0, languages: list[str] | None = None) -> TaskData:
    """One task from a folder with XTREME's download layout (all examples; cap them with `subsample`), tested on
    every language with a test file, or on `languages` only."""
    root = Path(root)
    notes: list[str] = []
    qa_train = ("squad/train-v1.1.json",)
    tydi_train = ("tydiqa/tydiqa-goldp-v1.1-train/tydiqa.goldp.en.train.json",
                  "tydiqa/tydiqa-goldp-v1.1-train/tydiqa.en.train.json")
    if task == "xnli":
        train_path = _first_existing(root, "xnli/train-en.tsv")
        if train_path is None:
            train_path = _require(root, "xnli/dev-en.tsv")
        train = read_pair_tsv(train_path, NLI_LABELS)
        if train_path.name == "dev-en.tsv":
            notes.append(f"xnli: English training set is XNLI English dev ({len(train):,} pairs), "
                         "a stand-in for MNLI train")
        test = _local_tests(task, root, lambda p: read_pair_tsv(p, NLI_LABELS), TEST_FILES[task], notes, languages)
    elif task == "pawsx":
        train_path = _first_existing(root, "pawsx/train-en.tsv")
        if train_path is not None:
            train = read_pair_tsv(train_path, PAWSX_LABELS)
            test = _local_tests(task, root, lambda p: read_pair_tsv(p, PAWSX_LABELS), TEST_FILES[task], notes,
                                languages)
        else:
            train, test = _pawsx_dev_split(root, seed, notes, languages)
    elif task == "panx":
        train_path = _require(root, "panx/train-en.tsv")
        train = read_conll_tsv(train_path)
        test = _local_tests(task, root, read_conll_tsv, TEST_FILES[task], notes, languages)
    elif task in ("xquad", "mlqa"):
        train_path = _first_existing(root, *qa_train) or _require(root, *tydi_train)
        train = read_squad_json(train_path)
        if "tydiqa" in train_path.parts:
            notes.append(f"{task}: English training set is TyDi QA-GoldP English train ({len(train):,} questions), "
                         "a stand-in for SQuAD v1.1 train")
        test = _local_tests(task, root, read_squad_json, TEST_FILES[task], notes, languages)
    elif task == "tydiqa":
        train_path = _require(root, *tydi_train)
        train = read_squad_json(train_path)
        test = _local_tests(task, root, read_squad_json, TEST_FILES[task], notes, languages)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    translated = {lang: (read_conll_tsv(p) if task == "panx" else read_squad_json(p) if p.suffix == ".json"
                         else read_pair_tsv(p, NLI_LABELS if task == "xnli" else PAWSX_LABELS))
                  for lang, p in translate_train_files(task, root).items()}
    source = str(train_path.relative_to(root)) if train_path else "pawsx/dev-en.tsv (half)"
    return TaskData(task, train, source, test, translated, TRANSLATE_TRAIN_FILES[task] if translated else "", notes)


def _pawsx_dev_split(root: Path, seed: int, notes: list[str], languages: list[str] | None
                     ) -> tuple[list, dict[str, list]]:
    """Without PAWS-X's English train file, train on half of English dev and test every language on the other
    half. The dev files are line-aligned translations, so testing on the same lines would leak the labels."""
    if not (root / "pawsx/dev-en.tsv").is_file():
        raise XtremeDataError(f"{root / 'pawsx/train-en.tsv'} and {root / 'pawsx/dev-en.tsv'} are both missing. "
                              "Fix: download PAWS-X in XTREME's layout")
    unused = sorted(p.name for p in root.glob("pawsx/test-*.tsv"))
    if unused:
        notes.append(f"pawsx: {', '.join(unused)} not evaluated: without pawsx/train-en.tsv every language is "
                     "tested on half of its dev file")
    dev = _local_tests("pawsx", root, lambda p: read_pair_tsv(p, PAWSX_LABELS), PAWSX_DEV_FILES, notes,
                       sorted({"en", *languages}) if languages else None)
    size = len(dev["en"])
    order = list(range(size))
    random.Random(seed).shuffle(order)
    train_lines, test_lines = sorted(order[: size // 2]), sorted(order[size // 2:])
    notes.append(f"pawsx: trained on {len(train_lines)} English dev pairs, tested on the other {len(test_lines)} "
                 "dev lines of every language (no PAWS-X train or labelled test files in the folder)")
    tested = [lang for lang in dev if not languages or lang in languages]
    return [dev["en"][i] for i in train_lines], {lang: [dev[lang][i] for i in test_lines] for lang in tested}


# --- the hub -----------------------------------------------------------------------------------------

def _hub_split(name: str, config: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many kinds (offline, missing config, auth)
        raise XtremeDataError(f"could not load {name} {config or ''} split {split!r} from the Hugging Face hub "
                              f"({type(err).__name__}: {err}). Fix: check the network, or point PRESENCE_XTREME_DIR "
                              "at a folder with XTREME's download layout and set finetune.xtreme_source=local"
                              ) from None


def _label_names(dataset, column: str) -> list[str] | None:
    feature = dataset.features[column]
    feature = getattr(feature, "feature", feature)  # a sequence of labels
    return list(feature.names) if hasattr(feature, "names") else None


def _decode(value: Any, names: list[str] | None) -> str:
    return names[value] if names is not None and isinstance(value, int) else str(value)


def _rows_where(dataset, column: str, keep: Callable[[Any], bool]):
    """The rows whose `column` passes `keep` (one pass over a single column, not over whole rows)."""
    return dataset.select([i for i, value in enumerate(dataset[column]) if keep(value)])


def _hub_qa(dataset) -> list[QAExample]:
    return [QAExample(str(r["id"]), r["question"], r["context"], tuple(r["answers"]["text"]),
                      tuple(int(s) for s in r["answers"]["answer_start"])) for r in dataset]


def _hub_pairs(dataset, where: str, a: str, b: str, label: str, labels: tuple[str, ...]) -> list[PairExample]:
    names = _label_names(dataset, label)
    examples = []
    for i, row in enumerate(dataset):
        if row[label] == -1:  # MNLI marks pairs without a gold label with -1
            continue
        value = _decode(row[label], names)
        if value not in labels:
            raise XtremeDataError(f"{where}, row {i}: unknown label {row[label]!r}; expected one of {labels}")
        examples.append(PairExample(row[a], row[b], value))
    return examples


def _hub_tagged(dataset, where: str) -> list[TaggedSentence]:
    names = _label_names(dataset, "ner_tags")
    sentences = []
    for i, row in enumerate(dataset):
        tags = tuple(_decode(t, names) for t in row["ner_tags"])
        if len(tags) != len(row["tokens"]) or not set(tags) <= set(NER_TAGS):
            raise XtremeDataError(f"{where}, row {i}: tags {tags} do not fit the tokens or are not {NER_TAGS}")
        sentences.append(TaggedSentence(tuple(row["tokens"]), tags))
    return sentences


def load_hub(task: str, languages: list[str] | None = None) -> TaskData:
    """One task from the hub, with XTREME's real English training sets and test splits: XTREME's languages,
    or those of them in `languages` (google/xtreme's configs hold XTREME's languages only)."""
    langs = [lang for lang in TEST_LANGUAGES[task] if not languages or lang in languages]
    notes = []
    not_on_hub = [lang for lang in languages or [] if lang not in TEST_LANGUAGES[task]]
    if not_on_hub:
        notes.append(f"{task}: {', '.join(not_on_hub)} not evaluated: the hub path loads XTREME's {task} "
                     "languages only; a local folder tests every language it has files for")
    if not langs:
        raise XtremeDataError(f"{task}: none of finetune.test_languages {languages} is among XTREME's {task} "
                              f"languages {TEST_LANGUAGES[task]}. Fix: choose among them, or use a local folder")
    if task == "xnli":
        train = _hub_pairs(_hub_split(HUB_MNLI, None, "train"), f"{HUB_MNLI} train", "premise", "hypothesis",
                           "label", NLI_LABELS)
        xnli = _hub_split(HUB_DATASET, "XNLI", "test")
        test = {lang: _hub_pairs(_rows_where(xnli, "language", lambda value, lang=lang: value == lang),
                                 f"XNLI test ({lang})", "sentence1", "sentence2", "gold_label", NLI_LABELS)
                for lang in langs}
        source = f"{HUB_MNLI} train"
    elif task == "pawsx":
        train = _hub_pairs(_hub_split(HUB_DATASET, "PAWS-X.en", "train"), "PAWS-X.en train", "sentence1",
                           "sentence2", "label", PAWSX_LABELS)
        test = {lang: _hub_pairs(_hub_split(HUB_DATASET, f"PAWS-X.{lang}", "test"), f"PAWS-X.{lang} test",
                                 "sentence1", "sentence2", "label", PAWSX_LABELS) for lang in langs}
        source = "PAWS-X.en train"
    elif task == "panx":
        train = _hub_tagged(_hub_split(HUB_DATASET, "PAN-X.en", "train"), "PAN-X.en train")
        test = {lang: _hub_tagged(_hub_split(HUB_DATASET, f"PAN-X.{lang}", "test"), f"PAN-X.{lang} test")
                for lang in langs}
        source = "PAN-X.en train"
    elif task in ("xquad", "mlqa"):
        train = _hub_qa(_hub_split(HUB_DATASET, "SQuAD", "train"))
        if task == "xquad":  # XQuAD has a single split, named validation on the hub
            test = {lang: _hub_qa(_hub_split(HUB_DATASET, f"XQuAD.{lang}", "validation")) for lang in langs}
        else:
            test = {lang: _hub_qa(_hub_split(HUB_DATASET, f"MLQA.{lang}.{lang}", "test")) for lang in langs}
        source = "SQuAD train"
    elif task == "tydiqa":  # one config for all languages; the question ids start with the language's name
        train = _hub_qa(_rows_where(_hub_split(HUB_DATASET, "tydiqa", "train"), "id",
                                    lambda value: value.startswith("english")))
        validation = _hub_split(HUB_DATASET, "tydiqa", "validation")
        test = {lang: _hub_qa(_rows_where(validation, "id", lambda value, name=TYDIQA_NAMES[lang]:
                                          value.startswith(name))) for lang in langs}
        source = "tydiqa train (english)"
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    empty = [lang for lang, examples in test.items() if not examples]
    if not train or empty:
        raise XtremeDataError(f"{task}: the hub returned no {'training' if not train else 'test'} examples "
                              f"{'for ' + ', '.join(empty) if empty else ''}. Fix: check the google/xtreme configs")
    return TaskData(task, train, f"hub: {source}", test, notes=notes)
