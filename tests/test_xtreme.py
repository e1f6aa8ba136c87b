"""XTREME readers: a synthetic folder in XTREME's layout, malformed files, translate-train detection, the hub
mapping (with datasets.load_dataset replaced by in-memory tables), and the real data when it is present."""
import json
import os
from pathlib import Path

import pytest

from common.evaluation.xtreme import (NER_TAGS, TEST_LANGUAGES, PairExample, QAExample, TaggedSentence, XtremeDataError,
                                     in_xtreme_average, load_hub, load_local, subsample, translate_train_files)

WORDS = ["alpha", "beta", "gamma", "delta", "river", "city", "king", "stone", "light", "house"]
NLI = ["entailment", "neutral", "contradiction"]


def _sentence(i: int, length: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)) + f" number {i}"


def _squad(n: int, lang: str) -> dict:
    """n questions, each answerable from its own short context."""
    paragraphs = []
    for i in range(n):
        answer = f"{WORDS[i % len(WORDS)]} {i}"
        context = f"{_sentence(i)} and then {answer} was seen near the {WORDS[(i + 3) % len(WORDS)]}."
        paragraphs.append({"context": context, "qas": [{
            "id": f"{lang}-{i}", "question": f"what was seen {WORDS[(i + 1) % len(WORDS)]}?",
            "answers": [{"text": answer, "answer_start": context.index(answer)},
                        {"text": answer.split()[0], "answer_start": context.index(answer)}]}]})
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def write_xtreme_folder(root: Path, n: int = 40, languages=("en", "de")) -> Path:
    """A small folder with the layout of the local copy on these machines (English training stand-ins, MLQA
    dev only, PAWS-X dev only); generated text, nothing taken from the real data."""
    def put(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    pairs = "".join(f"{_sentence(i)}\t{_sentence(i + 1, 4)}\t{NLI[i % 3]}\n" for i in range(n))
    paws = "".join(f"{_sentence(i)}\t{_sentence(i + 2)}\t{i % 2}\n" for i in range(n))
    tagged = "".join(f"{WORDS[i % 10]}\tB-PER\n{WORDS[(i + 1) % 10]}\tI-PER\nvisits\tO\n"
                     f"{WORDS[(i + 2) % 10]}\tB-LOC\n\n" for i in range(n))
    put("xnli/dev-en.tsv", pairs)
    put("pawsx/dev-en.tsv", paws)
    put("panx/train-en.tsv", tagged)
    put("tydiqa/tydiqa-goldp-v1.1-train/tydiqa.goldp.en.train.json", json.dumps(_squad(n, "en")))
    for lang in languages:
        put(f"xnli/test-{lang}.tsv", pairs)
        put(f"pawsx/dev-{lang}.tsv", paws)
        put(f"panx/test-{lang}.tsv", tagged)
        put(f"xquad/xquad.{lang}.json", json.dumps(_squad(n, lang)))
        put(f"mlqa/MLQA_V1/dev/dev-context-{lang}-question-{lang}.json", json.dumps(_squad(n, lang)))
    put("tydiqa/tydiqa-goldp-v1.1-dev/tydiqa-goldp-dev-english.json", json.dumps(_squad(n, "en")))
    return root


# --- local folder ------------------------------------------------------------------------------------

def test_local_folder_reads_every_task_with_its_stand_ins_noted(tmp_path):
    root = write_xtreme_folder(tmp_path)
    xnli = load_local("xnli", root)
    assert xnli.train_source == "xnli/dev-en.tsv" and len(xnli.train) == 40
    assert set(xnli.test) == {"en", "de"}
    assert xnli.test["de"][1] == PairExample(xnli.train[1].text_a, xnli.train[1].text_b, "neutral")
    assert any("stand-in for MNLI" in note for note in xnli.notes)
    assert any("no test file for ar" in note for note in xnli.notes), "missing languages are reported"

    panx = load_local("panx", root)
    assert panx.train[0] == TaggedSentence(("alpha", "beta", "visits", "gamma"), ("B-PER", "I-PER", "O", "B-LOC"))

    mlqa = load_local("mlqa", root)
    assert mlqa.test["en"][0].answers == ("alpha 0", "alpha")
    assert any("MLQA dev" in note for note in mlqa.notes) and any("SQuAD" in note for note in mlqa.notes)
    tydiqa = load_local("tydiqa", root)
    assert set(tydiqa.test) == {"en"} and tydiqa.train_source.endswith("tydiqa.goldp.en.train.json")
    assert load_local("xquad", root).train_source == tydiqa.train_source, "the QA stand-in is shared"


def test_pawsx_stand_in_trains_and_tests_on_disjoint_dev_lines(tmp_path):
    root = write_xtreme_folder(tmp_path)
    pawsx = load_local("pawsx", root, seed=3)
    assert len(pawsx.train) == 20 and len(pawsx.test["de"]) == 20
    train_texts = {ex.text_a for ex in pawsx.train}
    assert not train_texts & {ex.text_a for ex in pawsx.test["en"]}, "a test line was also trained on"
    assert pawsx.test["de"] == pawsx.test["en"], "the synthetic dev files are identical, so the halves must be too"
    assert load_local("pawsx", root, seed=3).train == pawsx.train


def test_subsample_is_seeded_and_keeps_parallel_sets_parallel():
    a, b = list(range(100)), [f"x{i}" for i in range(100)]
    sa, sb = subsample(a, 10, seed=1), subsample(b, 10, seed=1)
    assert [f"x{i}" for i in sa] == sb and sa == sorted(sa) and len(set(sa)) == 10
    assert subsample(a, None, 1) == a and subsample(a, 500, 1) == a


@pytest.mark.parametrize("rel, content, expected", [
    ("xnli/test-de.tsv", "premise\thypothesis\tentailment\nonly two\tfields\n", r"test-de\.tsv, line 2: .*2 field"),
    ("xnli/test-de.tsv", "premise\thypothesis\tmaybe\n", r"test-de\.tsv, line 1: unknown label 'maybe'"),
    ("panx/test-de.tsv", "Berlin\tB-LOC\n\nParis\tB-CITY\n", r"test-de\.tsv, line 3: unknown tag 'B-CITY'"),
    ("panx/test-de.tsv", "Berlin B-LOC\n", r"test-de\.tsv, line 1: expected token TAB tag"),
    ("xquad/xquad.de.json", '{"data": [\n{"paragraphs": [}\n]}', r"xquad\.de\.json, line 2: malformed JSON"),
    ("xquad/xquad.de.json", '{"data": [{"paragraphs": [{"qas": [{"id": "1", "question": "q", "answers": []}]}]}]}',
     r"xquad\.de\.json, data\[0\]\.paragraphs\[0\]\.qas\[0\]: question '1' has no answer"),
    ("xquad/xquad.de.json", '{"data": [{"paragraphs": [{"qas": [{"id": "1", "question": "q", "answers": '
     '[{"text": "a", "answer_start": 0}]}]}]}]}',
     r"xquad\.de\.json: not SQuAD v1\.1 JSON \(missing or wrong field 'context'\)"),
])
def test_malformed_files_fail_naming_the_file_and_line(tmp_path, rel, content, expected):
    root = write_xtreme_folder(tmp_path)
    (root / rel).write_text(content, encoding="utf-8")
    task = rel.split("/")[0]
    with pytest.raises(XtremeDataError, match=expected):
        load_local(task, root)


def test_every_test_file_found_is_evaluated_and_languages_beyond_xtreme_are_kept_apart(tmp_path):
    root = write_xtreme_folder(tmp_path)
    # Romanian is an XQuAD language of XTREME-R only; Maltese a PAN-X language outside XTREME's list
    (root / "xquad/xquad.ro.json").write_text(json.dumps(_squad(40, "ro")), encoding="utf-8")
    (root / "panx/test-mt.tsv").write_text("Valletta\tB-LOC\n", encoding="utf-8")
    (root / "xnli/test-de.old.tsv").write_text("a\tb\tneutral\n", encoding="utf-8")
    assert not in_xtreme_average("xquad", "ro") and in_xtreme_average("xquad", "de")

    xquad = load_local("xquad", root)
    assert set(xquad.test) == {"en", "de", "ro"} and xquad.test["ro"][0].id == "ro-0"
    assert any("ro evaluated in rows of their own, outside the XTREME average" in note for note in xquad.notes)
    assert set(load_local("panx", root).test) == {"en", "de", "mt"}
    xnli = load_local("xnli", root)
    assert set(xnli.test) == {"en", "de"}
    assert any("1 file(s) not evaluated" in note and "test-de.old.tsv" in note for note in xnli.notes)

    chosen = load_local("xquad", root, languages=["de", "ro"])
    assert set(chosen.test) == {"de", "ro"}
    assert any("test files for en not evaluated (finetune.test_languages)" in note for note in chosen.notes)
    assert any("no test file for sw" in note for note in load_local("xnli", root, languages=["de", "sw"]).notes)


def test_mlqa_scores_one_language_pairs_notes_the_rest_and_its_dev_fallback_per_language(tmp_path):
    root = write_xtreme_folder(tmp_path)
    dev = root / "mlqa/MLQA_V1/dev"
    (dev / "dev-context-de-question-en.json").write_text(json.dumps(_squad(3, "x")), encoding="utf-8")
    (dev / "dev-context-ja-question-ja.json").write_text(json.dumps(_squad(3, "ja")), encoding="utf-8")
    test = root / "mlqa/MLQA_V1/test"
    test.mkdir()
    (test / "test-context-en-question-en.json").write_text(json.dumps(_squad(5, "en")), encoding="utf-8")

    mlqa = load_local("mlqa", root)
    assert {lang: len(v) for lang, v in mlqa.test.items()} == {"en": 5, "de": 40}, "en from test/, de from dev/"
    assert any("evaluated on MLQA dev for de (no test file for them), on test for en" in n for n in mlqa.notes)
    assert any("dev-context-de-question-en.json" in n and "one language" in n for n in mlqa.notes)
    assert any("test files for ja not evaluated: MLQA's official evaluation" in n for n in mlqa.notes)


@pytest.mark.parametrize("rel, content, expected", [
    ("xnli/test-de.tsv", "", r"test-de\.tsv: no sentence pairs \(the file is empty\)"),
    ("xquad/xquad.de.json", '{"version": "1.1", "data": []}', r"xquad\.de\.json: no questions \(data\[\] holds 0"),
    ("panx/test-de.tsv", "\n\n\n", r"test-de\.tsv: no tagged sentences \(lines 1-3 hold no example\)"),
    ("panx/train-en.tsv", "", r"train-en\.tsv: no tagged sentences \(the file is empty\)"),
    ("tydiqa/tydiqa-goldp-v1.1-train/tydiqa.goldp.en.train.json", '{"data": []}', r"en\.train\.json: no questions"),
])
def test_empty_files_fail_when_read_naming_the_file(tmp_path, rel, content, expected):
    root = write_xtreme_folder(tmp_path)
    (root / rel).write_text(content, encoding="utf-8")
    task = "tydiqa" if rel.startswith("tydiqa") else rel.split("/")[0]
    with pytest.raises(XtremeDataError, match=expected):
        load_local(task, root)


@pytest.mark.parametrize("task, rel, expected", [
    ("xnli", "xnli/test-de.tsv", r"test-de\.tsv: 30 examples, ending at line 30, but test-en\.tsv has 40"),
    ("xquad", "xquad/xquad.de.json", r"xquad\.de\.json: 30 examples, but xquad\.en\.json has 40"),
    ("pawsx", "pawsx/dev-de.tsv", r"dev-de\.tsv: 30 examples, ending at line 30, but dev-en\.tsv has 40"),
])
def test_parallel_test_sets_cut_short_fail_when_read(tmp_path, task, rel, expected):
    root = write_xtreme_folder(tmp_path)
    path = root / rel
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        data["data"][0]["paragraphs"] = data["data"][0]["paragraphs"][:30]
        path.write_text(json.dumps(data), encoding="utf-8")
    else:  # cut at a line boundary: every remaining line is well-formed
        path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:30]), encoding="utf-8")
    with pytest.raises(XtremeDataError, match=expected):
        load_local(task, root)


def test_a_missing_training_file_is_named(tmp_path):
    root = write_xtreme_folder(tmp_path)
    (root / "panx/train-en.tsv").unlink()
    with pytest.raises(XtremeDataError, match=r"panx/train-en\.tsv is missing"):
        load_local("panx", root)


def test_translate_train_is_detected_only_when_its_files_exist(tmp_path):
    root = write_xtreme_folder(tmp_path)
    assert translate_train_files("xnli", root) == {}
    assert load_local("xnli", root).translate_train == {}
    folder = root / "xnli/translate-train"
    folder.mkdir()
    # XTREME's translations may carry the English originals first; the last three fields are used
    (folder / "en-de-translated.tsv").write_text("en a\ten b\tder a\tdas b\tcontradictory\n", encoding="utf-8")
    assert translate_train_files("xnli", root) == {"de": folder / "en-de-translated.tsv"}
    data = load_local("xnli", root)
    assert data.translate_train == {"de": [PairExample("der a", "das b", "contradiction")]}
    assert data.translate_source == "xnli/translate-train/en-{}-translated.tsv"
    squad = root / "squad/translate-train"
    squad.mkdir(parents=True)
    (squad / "squad.translate.train.en-de.json").write_text(json.dumps(_squad(3, "de")), encoding="utf-8")
    assert set(load_local("mlqa", root).translate_train) == {"de"}
    assert load_local("tydiqa", root).translate_train == {}


# --- the hub -----------------------------------------------------------------------------------------

def _fake_hub(monkeypatch):
    """Replace datasets.load_dataset by tables with the hub's schemas (google/xtreme, nyu-mll/multi_nli)."""
    import datasets

    labels = datasets.ClassLabel(names=list(NER_TAGS))
    answers = {"answer_start": [5], "text": ["beta"]}

    def qa_rows(ids):
        return datasets.Dataset.from_dict({"id": ids, "title": ["t"] * len(ids), "context": ["alpha beta"] * len(ids),
                                           "question": ["which?"] * len(ids), "answers": [answers] * len(ids)})

    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "nyu-mll/multi_nli":
            features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                          "label": datasets.ClassLabel(names=NLI)})
            return datasets.Dataset.from_dict({"premise": ["p", "q", "r"], "hypothesis": ["h", "i", "j"],
                                               "label": [2, 0, -1]}, features=features)
        if config == "XNLI":
            langs = list(TEST_LANGUAGES["xnli"])
            return datasets.Dataset.from_dict({"language": langs, "sentence1": ["s"] * len(langs),
                                               "sentence2": ["t"] * len(langs), "gold_label": ["neutral"] * len(langs)})
        if config.startswith("PAN-X"):
            features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                          "ner_tags": datasets.Sequence(labels),
                                          "langs": datasets.Sequence(datasets.Value("string"))})
            return datasets.Dataset.from_dict({"tokens": [["Ada", "Lovelace", "lived"]], "ner_tags": [[1, 2, 0]],
                                               "langs": [["en"] * 3]}, features=features)
        if config.startswith("PAWS-X"):
            return datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": ["1"]})
        if config == "tydiqa":
            return qa_rows(["english-1", "arabic-2", "bengali-3", "finnish-4", "indonesian-5", "korean-6",
                            "russian-7", "swahili-8", "telugu-9", "english-10"])
        return qa_rows([f"{config}-q"])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_configs_map_into_the_same_records(monkeypatch):
    calls = _fake_hub(monkeypatch)
    xnli = load_hub("xnli")
    assert xnli.train == [PairExample("p", "h", "contradiction"), PairExample("q", "i", "entailment")]
    assert set(xnli.test) == set(TEST_LANGUAGES["xnli"]) and xnli.test["sw"] == [PairExample("s", "t", "neutral")]
    panx = load_hub("panx")
    assert panx.train == [TaggedSentence(("Ada", "Lovelace", "lived"), ("B-PER", "I-PER", "O"))]
    assert load_hub("pawsx").test["ko"] == [PairExample("a", "b", "1")]
    tydiqa = load_hub("tydiqa")
    assert [ex.id for ex in tydiqa.train] == ["english-1", "english-10"]
    assert [ex.id for ex in tydiqa.test["te"]] == ["telugu-9"]
    assert tydiqa.test["ar"][0] == QAExample("arabic-2", "which?", "alpha beta", ("beta",), (5,))
    load_hub("xquad")
    load_hub("mlqa")
    assert ("google/xtreme", "SQuAD", "train") in calls
    assert ("google/xtreme", "XQuAD.th", "validation") in calls
    assert ("google/xtreme", "MLQA.zh.zh", "test") in calls
    assert ("google/xtreme", "PAN-X.yo", "test") in calls


def test_hub_languages_can_be_chosen_among_xtremes(monkeypatch):
    calls = _fake_hub(monkeypatch)
    xquad = load_hub("xquad", languages=["de", "ro"])
    assert set(xquad.test) == {"de"} and ("google/xtreme", "XQuAD.en", "validation") not in calls
    assert any("ro not evaluated: the hub path loads XTREME's xquad languages only" in n for n in xquad.notes)
    assert set(load_hub("tydiqa", languages=["te"]).test) == {"te"}
    with pytest.raises(XtremeDataError, match="none of finetune.test_languages"):
        load_hub("mlqa", languages=["ro"])


def test_hub_failures_say_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(XtremeDataError, match="PRESENCE_XTREME_DIR"):
        load_hub("pawsx")


# --- the real data, when present ---------------------------------------------------------------------

def _real_folder() -> Path:
    folder = os.environ.get("PRESENCE_XTREME_DIR")
    if not folder or not Path(folder).is_dir():
        pytest.skip("PRESENCE_XTREME_DIR is unset or missing: no local XTREME data to check")
    return Path(folder)


@pytest.mark.slow
def test_real_folder_has_the_documented_sizes_and_answer_spans():
    root = _real_folder()
    xquad = load_local("xquad", root)
    assert {len(v) for v in xquad.test.values()} == {1190} and len(xquad.test) == 11
    for examples in xquad.test.values():
        for ex in examples:
            start = ex.answer_starts[0]
            assert ex.context[start:start + len(ex.answers[0])] == ex.answers[0]
    assert sum(len(v) for v in load_local("tydiqa", root).test.values()) == 5077
    xnli = load_local("xnli", root)
    assert {len(v) for v in xnli.test.values()} == {5010} and len(xnli.train) == 2490
    assert set(load_local("panx", root).test) == set(TEST_LANGUAGES["panx"]) - {"th"}
    mlqa = load_local("mlqa", root)
    assert set(mlqa.test) == set(TEST_LANGUAGES["mlqa"])
    assert any("42 file(s) not evaluated" in note for note in mlqa.notes), "the 42 mixed-language pairs"
