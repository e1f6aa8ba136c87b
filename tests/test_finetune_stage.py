"""04_finetune end to end on throwaway fixtures (a SentencePiece tokenizer trained here, a random 1+1-layer
T5 and random 2-layer GPT-2, Llama and BERT models, a synthetic XTREME folder, synthetic held-out verses),
plus the helpers it is built from."""
import csv
import gzip
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common.modeling import IGNORE_INDEX, build_model, load_pretrained
from common.evaluation.extractive_qa import best_span, encode_spans, predict_spans
from common.evaluation.finetuning import (EncoderTagger, collate, encode_tagged, encode_text_to_text, generate,
                               predict_classes, predict_tags, qa_answer_fits)
from common.evaluation.heads import HEADS, head_class
from common.families import backbone
from common.paths import REPO_ROOT
from common.evaluation.retrieval import embed, mean_pool, retrieval_accuracy
from common.config import ConfigError, ModelConfig, load_preset
from common.evaluation.xtreme import QAExample, TaggedSentence, XtremeDataError
from test_xtreme import WORDS, write_xtreme_folder

COLUMNS = ["run", "method", "seed", "task", "setting", "lang", "metric", "value", "n_examples", "chance"]
FAST = ["finetune.steps=3", "finetune.batch_size=4", "finetune.max_train_examples=16", "finetune.max_eval_examples=4",
        "finetune.eval_batch_size=8", "finetune.input_length=96", "finetune.target_length=5",
        "finetune.retrieval_pairs=6", "finetune.log_every=1"]


def _load_stage():
    spec = importlib.util.spec_from_file_location("finetune_all", REPO_ROOT / "04_finetune" / "finetune_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A T5-style tokenizer (pad 0, eos 1, unk 2, 100 sentinels after the pieces) and a random tiny T5."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    folder = tmp_path_factory.mktemp("model")
    text = [" ".join(WORDS[(i * 3 + k) % 10] for k in range(8)) + f" number {i}: question context? premise "
            "hypothesis entailment neutral contradiction paraphrase different xnli pawsx sentence1 sentence2 visits "
            "Ada Lovelace. seen near the and then was what" for i in range(300)]
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model_proto, vocab_size=300,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model_proto.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=100)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, d_kv=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ONE_STACK = ("gpt2", "llama", "bert")
REAL_XTREME = os.environ.get("PRESENCE_XTREME_DIR")  # read before the stage fixture unsets it


@pytest.fixture(scope="module")
def family_dirs(model_dir, tmp_path_factory):
    """Random 2-layer GPT-2, Llama and BERT models as 03_pretrain builds them, with the T5 fixture's
    tokenizer, saved as 03_pretrain saves final/."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folders = {}
    for family in ONE_STACK:
        torch.manual_seed(0)
        model = build_model(ModelConfig(family=family, d_model=32, d_ff=64, num_layers=2, num_heads=2),
                            len(tokenizer), positions=128)
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


def _install_checkpoint(model_dir, artefacts, run, method, seed):
    final = artefacts / "tiny" / "pretrain" / run / "final"
    final.mkdir(parents=True)
    for path in model_dir.iterdir():
        (final / path.name).write_bytes(path.read_bytes())
    (final / "presence_run.json").write_text(json.dumps(
        {"run_name": run, "method": method, "seed": seed, "preset": "tiny", "steps": 1}))
    return final


def _write_verses(artefacts, languages=("en", "de", "fr"), n=8, copies_of_english=False):
    path = artefacts / "tiny" / "data" / "heldout_parallel_verses.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            record = {"book": 43, "chapter": 3, "verse": i}
            for lang_index, lang in enumerate(languages):
                if i >= n - lang_index:  # fr lacks the last two verses: only aligned ids may be sampled
                    continue
                shift = 0 if copies_of_english else lang_index
                record[lang] = " ".join(WORDS[(i * 7 + k + shift) % 10] for k in range(6)) + f" number {i}"
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """The stage module with artefacts and results redirected into tmp_path."""
    module = _load_stage()
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    monkeypatch.delenv("PRESENCE_XTREME_DIR", raising=False)
    monkeypatch.setattr(module, "results_dir", lambda preset, stage_name: tmp_path / "results" / preset / stage_name)
    return module


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.mark.slow
def test_two_checkpoints_end_to_end_and_reruns_replace_rows(stage, model_dir, tmp_path):
    artefacts = tmp_path / "artefacts"
    _install_checkpoint(model_dir, artefacts, "baseline-seed0", "baseline", 0)
    _install_checkpoint(model_dir, artefacts, "presence-seed0", "presence", 0)
    _write_verses(artefacts)
    xtreme = write_xtreme_folder(tmp_path / "xtreme")
    (xtreme / "xnli/translate-train").mkdir()
    (xtreme / "xnli/translate-train/en-de-translated.tsv").write_text(
        "".join(f"alpha beta {i}\tgamma {i}\tneutral\n" for i in range(8)), encoding="utf-8")
    # Romanian: an XQuAD language of XTREME-R, not of XTREME
    (xtreme / "xquad/xquad.ro.json").write_text((xtreme / "xquad/xquad.de.json").read_text(), encoding="utf-8")

    summary = stage.main("tiny", FAST, None, str(xtreme))
    results = tmp_path / "results" / "tiny" / "finetune"
    rows = _read(results / "xtreme.csv")
    assert {r["run"] for r in rows} == {"baseline-seed0", "presence-seed0"}
    settings = {(r["task"], r["setting"]) for r in rows}
    assert settings == {(task, "zero-shot") for task in stage.KIND} | {("xnli", "translate-train")}
    baseline = [r for r in rows if r["run"] == "baseline-seed0" and r["setting"] == "zero-shot"]
    assert {r["lang"] for r in baseline if r["task"] == "tydiqa"} == {"en", "avg"}
    assert {r["metric"] for r in baseline if r["task"] == "mlqa"} == {"f1", "exact_match"}
    assert {r["metric"] for r in baseline if r["task"] == "panx"} == {"span_f1", "span_precision", "span_recall"}
    assert {r["lang"] for r in baseline if r["task"] == "xquad"} == {"en", "de", "ro", "avg"}
    for task in stage.KIND:
        langs = [r for r in baseline if r["task"] == task and r["lang"] not in ("avg", "ro")
                 and r["metric"] == stage.TASK_METRICS[task][0]]
        avg = next(r for r in baseline if r["task"] == task and r["lang"] == "avg"
                   and r["metric"] == stage.TASK_METRICS[task][0])
        assert float(avg["value"]) == pytest.approx(np.mean([float(r["value"]) for r in langs]), abs=1e-3)
        assert int(avg["n_examples"]) == sum(int(r["n_examples"]) for r in langs) == 4 * len(langs)
        assert langs and all(0 <= float(r["value"]) <= 100 for r in langs)
    assert {r["seed"] for r in rows} == {"0"} and {r["method"] for r in rows} == {"baseline", "presence"}
    chance = {(r["task"], r["metric"]): r["chance"] for r in rows}
    assert chance[("xnli", "accuracy")] == str(round(100 / 3, 4)) and chance[("pawsx", "accuracy")] == "50.0"
    assert chance[("xquad", "f1")] == chance[("panx", "span_f1")] == "", "no single chance level for F1"

    retrieval = _read(results / "retrieval.csv")
    assert {(r["task"], r["setting"]) for r in retrieval} == {("verse_retrieval", "zero-shot")}
    assert {r["lang"] for r in retrieval} == {"de", "fr", "avg"}
    assert {r["metric"] for r in retrieval} == {"accuracy", "accuracy_en_to_x", "accuracy_middle_layer"}
    assert {r["n_examples"] for r in retrieval if r["lang"] == "de"} == {"6"}, "6 of the 6 verses all share"
    assert {r["chance"] for r in retrieval} == {str(round(100 / 6, 4))}, "one right verse among 6, avg rows too"
    run_dir = artefacts / "tiny" / "finetune" / "presence-seed0" / "mlqa" / "zero-shot"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_examples_per_second"] > 0 and set(metrics["scores"]) == {"en", "de"}
    assert json.loads((run_dir / "config.json").read_text())["trained_with"] == ["xquad", "mlqa", "tydiqa"]
    assert (run_dir / "environment.json").is_file()
    assert set(summary["retrieval"]) == {"baseline-seed0", "presence-seed0"}

    stage.main("tiny", FAST + ["finetune.tasks=[pawsx]"], None, str(xtreme))
    again = _read(results / "xtreme.csv")
    assert len(again) == len(rows), "a re-run must replace its rows, not add to them"
    assert _read(results / "retrieval.csv") == retrieval, "retrieval is deterministic"


@pytest.mark.slow
@pytest.mark.parametrize("family", ONE_STACK)
def test_every_family_is_fine_tuned_on_the_tasks_it_has_a_head_for(stage, family_dirs, tmp_path, family, capsys):
    artefacts = tmp_path / "artefacts"
    _install_checkpoint(family_dirs[family], artefacts, f"{family}-seed0", "baseline", 0)
    _write_verses(artefacts)
    summary = stage.main("tiny", FAST, None, str(write_xtreme_folder(tmp_path / "xtreme")))
    results = tmp_path / "results" / "tiny" / "finetune"
    rows = _read(results / "xtreme.csv")
    evaluated = {task for task in stage.KIND if head_class(family, stage.KIND[task]) is not None}
    assert {"xnli", "pawsx"} <= evaluated, "pair classification for every family"
    assert {r["task"] for r in rows} == evaluated
    for task in evaluated:
        metric = stage.TASK_METRICS[task][0]
        scores = {r["lang"]: float(r["value"]) for r in rows if r["task"] == task and r["metric"] == metric}
        assert set(scores) == ({"en", "avg"} if task == "tydiqa" else {"en", "de", "avg"})
        assert all(0 <= v <= 100 for v in scores.values())
        config = json.loads((artefacts / "tiny/finetune" / f"{family}-seed0" / task / "zero-shot/config.json")
                            .read_text())
        assert config["checkpoint"]["run"] == f"{family}-seed0"
    skipped = [line.split(" | ")[1].split("+") for line in capsys.readouterr().out.splitlines()
               if f"| zero-shot | skipped for a {family} model: " in line]
    assert {task for group in skipped for task in group} == set(stage.KIND) - evaluated, "said, never silently missing"
    retrieval = _read(results / "retrieval.csv")
    assert {r["lang"] for r in retrieval} == {"de", "fr", "avg"}
    assert set(summary["retrieval"]) == {f"{family}-seed0"}
    run_dir = artefacts / "tiny/finetune" / f"{family}-seed0" / "xnli" / "zero-shot"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["valid_label_percent"] == {"en": 100.0, "de": 100.0}, "a class head always names a label"
    assert metrics["train"]["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("family", ("t5",) + ONE_STACK)
def test_every_family_reads_the_real_xtreme_folder_when_there_is_one(stage, model_dir, family_dirs, tmp_path, family):
    """The real local XTREME copy ($PRESENCE_XTREME_DIR), two languages, a few steps: every task a family
    has a head for gets an average row."""
    folder = REAL_XTREME
    if not folder or not os.path.isdir(folder):
        pytest.skip("PRESENCE_XTREME_DIR is unset or missing: no local XTREME data to fine-tune on")
    _install_checkpoint(model_dir if family == "t5" else family_dirs[family], tmp_path / "artefacts",
                        f"{family}-seed0", "baseline", 0)
    _write_verses(tmp_path / "artefacts")
    stage.main("tiny", FAST + ["finetune.test_languages=[en, de]"], None, folder)
    rows = _read(tmp_path / "results" / "tiny" / "finetune" / "xtreme.csv")
    expected = {task for task in stage.KIND if family == "t5" or head_class(family, stage.KIND[task]) is not None}
    assert {r["task"] for r in rows if r["lang"] == "avg"} == expected


@pytest.mark.parametrize("family", ONE_STACK)
def test_retrieval_of_every_family_is_found_by_its_own_copy(stage, family_dirs, tmp_path, family, capsys):
    _install_checkpoint(family_dirs[family], tmp_path / "artefacts", f"{family}-seed1", "baseline", 1)
    _write_verses(tmp_path / "artefacts", languages=("en", "de"), copies_of_english=True)
    stage.main("tiny", FAST, None, None)
    assert "X->en accuracy avg 100.0% (chance 16.7%) over 1 language |" in capsys.readouterr().out
    assert {float(r["value"]) for r in _read(tmp_path / "results/tiny/finetune/retrieval.csv")} == {100.0}


def test_without_xtreme_data_only_retrieval_runs(stage, model_dir, tmp_path, capsys):
    _install_checkpoint(model_dir, tmp_path / "artefacts", "baseline-seed1", "baseline", 1)
    # "translations" identical to the English verses: every verse must find itself, in both directions
    _write_verses(tmp_path / "artefacts", languages=("en", "de"), copies_of_english=True)
    summary = stage.main("tiny", FAST, None, None)
    out = capsys.readouterr().out
    assert "XTREME tasks skipped" in out
    assert "X->en accuracy avg 100.0% (chance 16.7%) over 1 language |" in out  # 1 right verse of 6: 16.7%
    assert summary["xtreme"] == {} and not (tmp_path / "results/tiny/finetune/xtreme.csv").exists()
    rows = _read(tmp_path / "results/tiny/finetune/retrieval.csv")
    assert {r["seed"] for r in rows} == {"1"} and {r["lang"] for r in rows} == {"de", "avg"}
    assert {float(r["value"]) for r in rows} == {100.0}


def test_missing_inputs_say_which_stage_to_run(stage, model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        stage.main("tiny", FAST, None, None)
    _install_checkpoint(model_dir, tmp_path / "artefacts", "baseline-seed0", "baseline", 0)
    with pytest.raises(FileNotFoundError, match="make data"):
        stage.main("tiny", FAST, None, None)
    path = _write_verses(tmp_path / "artefacts")
    with gzip.open(path, "at", encoding="utf-8") as f:
        f.write('{"chapter": 1, "verse": 1, "en": "no book"}\n')
    with pytest.raises(ValueError, match=r"heldout_parallel_verses\.jsonl\.gz, line 9: expected JSON"):
        stage.main("tiny", FAST, None, None)


def test_checkpoint_arguments(stage, model_dir, tmp_path):
    final = _install_checkpoint(model_dir, tmp_path / "artefacts", "presence-seed3", "presence", 3)
    assert stage.describe_checkpoint(str(final), 0, "tiny") == stage.Checkpoint(str(final), "presence-seed3",
                                                                                 "presence", 3)
    assert stage.describe_checkpoint(str(model_dir), 7, "tiny").method == "external"
    hub = stage.describe_checkpoint("google/mt5-small", 0, "tiny")
    assert (hub.path, hub.run, hub.method) == ("google/mt5-small", "google--mt5-small", "external")
    with pytest.raises(FileNotFoundError, match="config.json"):
        stage.describe_checkpoint(str(tmp_path), 0, "tiny")


@pytest.mark.parametrize("mistyped", ["{final}x", "{parent}/fnal", "presence-seed3", "./google/mt5-small",
                                      "{artefacts}/tiny/pretrain/presence-seed4/final", "google/mt5-small/extra"])
def test_a_mistyped_checkpoint_fails_at_once_listing_the_local_runs(stage, model_dir, tmp_path, mistyped):
    final = _install_checkpoint(model_dir, tmp_path / "artefacts", "presence-seed3", "presence", 3)
    name = mistyped.format(final=final, parent=final.parent, artefacts=tmp_path / "artefacts")
    with pytest.raises(FileNotFoundError, match=rf"--checkpoint .*no such folder, and not a hub model id.*{final}"):
        stage.main("tiny", FAST, [name], None)


def test_bad_xtreme_data_fails_before_any_model_runs(stage, model_dir, tmp_path):
    _install_checkpoint(model_dir, tmp_path / "artefacts", "baseline-seed0", "baseline", 0)
    _write_verses(tmp_path / "artefacts")
    xtreme = write_xtreme_folder(tmp_path / "xtreme")
    (xtreme / "panx/test-de.tsv").write_text("\n\n", encoding="utf-8")
    with pytest.raises(XtremeDataError, match=r"panx/test-de\.tsv: no tagged sentences"):
        stage.main("tiny", FAST, None, str(xtreme))
    assert not (tmp_path / "results").exists(), "nothing was evaluated, not even retrieval"
    assert not (tmp_path / "artefacts" / "tiny" / "finetune").exists()


@pytest.mark.parametrize("override", ["finetune.test_languages=[de, de]", "finetune.test_languages=['de/x']",
                                      "finetune.test_languages=['']"])
def test_test_languages_must_be_distinct_codes(override):
    with pytest.raises(ConfigError, match=r"finetune\.test_languages"):
        load_preset("tiny", [override])


def test_the_average_row_is_over_the_given_languages_only(stage):
    ckpt = stage.Checkpoint("x", "run", "baseline", 0)
    scores = {"en": {"f1": 60.0}, "de": {"f1": 40.0}, "ro": {"f1": 100.0}}
    rows = stage.result_rows(ckpt, "xquad", "zero-shot", scores, {"en": 10, "de": 10, "ro": 5}, ["en", "de"])
    assert [(r["lang"], r["value"], r["n_examples"]) for r in rows] == [
        ("en", 60.0, 10), ("de", 40.0, 10), ("ro", 100.0, 5), ("avg", 50.0, 20)]
    assert [r["lang"] for r in stage.result_rows(ckpt, "xquad", "zero-shot", {"ro": {"f1": 1.0}}, {"ro": 5}, [])] \
        == ["ro"], "no XTREME language, no average"
    assert stage.describe_average("xnli", "accuracy", 40.0, ["en", "de", "ro"]) == \
        "accuracy avg 40.00% (chance 33.33%) over 2 languages (+ ro in rows of their own)"


def test_a_run_folder_is_replaced_whole_or_not_at_all(stage, tmp_path, monkeypatch):
    preset = load_preset("tiny")
    ckpt = stage.Checkpoint("x", "run", "baseline", 0)
    stage.save_run(preset, ckpt, "xnli", "zero-shot", {"notes": []}, {"scores": {"de": 1}})
    run_dir = tmp_path / "artefacts" / "tiny" / "finetune" / "run" / "xnli" / "zero-shot"
    (run_dir / "stale.json").write_text("{}")

    def interrupted(folder, config, metrics):
        (folder / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(stage, "write_run_files", interrupted)
        stage.save_run(preset, ckpt, "xnli", "zero-shot", {}, {"scores": {"de": 2}})
    assert json.loads((run_dir / "metrics.json").read_text())["scores"] == {"de": 1}, "the earlier folder is intact"
    stage.save_run(preset, ckpt, "xnli", "zero-shot", {}, {"scores": {"de": 3}})
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "environment.json", "metrics.json"]
    assert json.loads((run_dir / "metrics.json").read_text())["scores"] == {"de": 3}


# --- helpers -----------------------------------------------------------------------------------------

def test_retrieval_accuracy_and_mean_pooling_by_hand():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    candidates = np.array([[2.0, 0.0], [0.1, 3.0], [1.0, 1.2]])
    # cosine nearest neighbours: q0 -> c0 (right), q1 -> c1 (right), q2 -> c0 (wrong, c2 is its match)
    assert retrieval_accuracy(queries, candidates) == pytest.approx(200 / 3)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_tags_sit_on_first_subwords_and_truncated_words_are_predicted_o(model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentence = TaggedSentence(("Lovelace", "visits", "alpha", "beta"), ("B-PER", "O", "B-LOC", "I-LOC"))
    [encoded] = encode_tagged(tokenizer, [sentence], input_length=64)
    pieces = tokenizer([list(sentence.tokens)], is_split_into_words=True).word_ids(0)
    assert encoded["first_subword"] == [pieces.index(k) for k in range(4)]
    labelled = [i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX]
    assert labelled == encoded["first_subword"]
    [short] = encode_tagged(tokenizer, [sentence], input_length=3)
    assert short["first_subword"][-1] is None
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tagger = EncoderTagger(model.get_encoder(), model.config.d_model, 0.1)
    assert torch.equal(tagger.encoder.block[0].layer[0].SelfAttention.q.weight,
                       model.encoder.block[0].layer[0].SelfAttention.q.weight), "the head sits on pre-trained weights"
    [tags] = predict_tags(tagger, [short], 4, tokenizer.pad_token_id, torch.device("cpu"))
    assert len(tags) == 4 and tags[-1] == "O"


@pytest.mark.parametrize("family", ("t5",) + ONE_STACK)
def test_verse_vectors_are_the_models_own_states_mean_pooled_whatever_the_padding(model_dir, family_dirs, family):
    """Against Hugging Face's whole model run on one sentence at a time (no padding): T5's encoder states,
    the other families' hidden states, at the last and the middle entry."""
    from transformers import AutoTokenizer

    folder = model_dir if family == "t5" else family_dirs[family]
    tokenizer, model = AutoTokenizer.from_pretrained(folder), load_pretrained(folder).eval()
    texts = [" ".join(WORDS[: 1 + 3 * i]) for i in range(4)]  # four lengths: padded in one batch of 3 + 1
    layers = [-1, model.config.num_hidden_layers // 2]
    vectors = embed(backbone(model), tokenizer, texts, layers, 3, 64, torch.device("cpu"))
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            if family == "t5":
                states = model(input_ids=ids, decoder_input_ids=ids[:, :1], output_hidden_states=True).encoder_hidden_states
            else:
                states = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in layers:
            np.testing.assert_allclose(vectors[layer][i], states[layer][0].mean(0).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ONE_STACK)
def test_pair_heads_sit_on_the_pretrained_weights_and_classify_each_example_as_alone(model_dir, family_dirs,
                                                                                     family):
    from transformers import AutoTokenizer

    folder = family_dirs[family]
    tokenizer, pretrained = AutoTokenizer.from_pretrained(folder), load_pretrained(folder)
    head = load_pretrained(folder, head_class(family, "pair"), num_labels=3).eval()
    assert type(head).__name__.endswith("ForSequenceClassification") and head.num_labels == 3
    for name, weight in backbone(pretrained).state_dict().items():
        assert torch.equal(backbone(head).state_dict()[name], weight), name
    encoded = encode_text_to_text(tokenizer, [" ".join(WORDS[: 2 + 3 * i]) for i in range(5)], input_length=64)
    batched = predict_classes(head, encoded, 2, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        alone = [head(input_ids=torch.tensor([ex["input_ids"]])).logits.argmax(-1).item() for ex in encoded]
    assert batched == alone


@pytest.mark.parametrize("family", ("t5",) + ONE_STACK)
def test_a_checkpoint_loads_with_the_fine_tuning_dropout_in_every_dropout_layer(model_dir, family_dirs, family):
    folder = model_dir if family == "t5" else family_dirs[family]
    model = load_pretrained(folder, dropout_rate=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    if family == "llama":  # no dropout modules: attention dropout is a rate the attention function reads
        assert not rates and model.config.attention_dropout == 0.3
    else:
        assert rates == {0.3}
    if family in HEADS and "tagging" in HEADS[family]:
        tagger = load_pretrained(folder, head_class(family, "tagging"), dropout_rate=0.3, num_labels=7)
        assert {m.p for m in tagger.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}, "the head's too"


def test_collate_pads_inputs_and_ignores_padded_labels():
    batch = collate([{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [5, 1], "labels": [1]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1], [1, IGNORE_INDEX]]


def test_collate_stacks_one_target_per_example():
    batch = collate([{"input_ids": [5, 1], "labels": 2, "start_positions": 0},
                     {"input_ids": [5, 6, 1], "labels": 0, "start_positions": 1}], pad_id=0)
    assert batch["labels"].tolist() == [2, 0] and batch["start_positions"].tolist() == [0, 1]


def test_answer_spans_are_the_tokens_that_spell_the_answer_and_truncation_is_detected(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = "alpha beta gamma. Ada Lovelace visits the river city. " + " ".join(["king stone"] * 40)
    examples = [QAExample("1", "who visits?", context, ("Ada Lovelace",), (context.index("Ada"),)),
                QAExample("2", "what city?", context, ("river city",), (context.index("river"),)),
                QAExample("3", "what last?", context, ("king stone",), (context.rindex("king"),))]
    rows = encode_spans(tokenizer, examples, input_length=48)
    for row, example in zip(rows[:2], examples):
        first, last = row["offsets"][row["start_positions"]], row["offsets"][row["end_positions"]]
        assert context[first[0]:last[1]].strip() == example.answers[0]
        question = [t for t, span in enumerate(row["offsets"]) if span is None]
        assert row["start_positions"] > max(t for t in question if t < row["start_positions"]), "inside the context"
    assert len(rows[2]["input_ids"]) == 48 and rows[2]["start_positions"] is None, "cut off by truncation"


def test_the_best_span_is_the_brute_force_best_within_the_context():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        start, end = torch.randn(12, generator=g), torch.randn(12, generator=g)
        in_context = torch.rand(12, generator=g) < 0.7
        in_context[5] = True
        candidates = [(s, e) for s in range(12) for e in range(s, min(12, s + 4)) if in_context[s] and in_context[e]]
        expected = max(candidates, key=lambda span: (start[span[0]] + end[span[1]]).item())
        assert best_span(start, end, in_context, max_tokens=4) == expected


def test_predicted_answers_are_cut_from_the_context_at_the_best_span(model_dir):
    from transformers import AutoTokenizer
    from transformers.modeling_outputs import QuestionAnsweringModelOutput

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = "alpha beta. Ada Lovelace visits the river city."
    examples = [QAExample("1", "who?", context, ("Ada Lovelace",), (context.index("Ada"),)),
                QAExample("2", "where?", context, ("the river city",), (context.index("the river"),))]
    rows = encode_spans(tokenizer, examples, input_length=64)

    class Oracle(torch.nn.Module):  # peaks its logits at each row's gold span, rows told apart by length
        def forward(self, input_ids, attention_mask):
            start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
            for b, length in enumerate(attention_mask.sum(1).tolist()):
                row = next(r for r in rows if len(r["input_ids"]) == length)
                start[b, row["start_positions"]] = end[b, row["end_positions"]] = 5.0
            return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)

    assert len({len(r["input_ids"]) for r in rows}) == 2
    predicted = predict_spans(Oracle(), rows, [context, context], 2, tokenizer.pad_token_id, torch.device("cpu"))
    assert predicted == ["Ada Lovelace", "the river city"]


def test_answers_cut_off_by_truncation_are_detected(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = " ".join(["alpha beta gamma"] * 30) + " king stone"
    early = QAExample("1", "what?", context, ("alpha beta",), (0,))
    late = QAExample("2", "what?", context, ("king stone",), (context.index("king stone"),))
    assert qa_answer_fits(tokenizer, [early, late], input_length=32) == [True, False]
    assert qa_answer_fits(tokenizer, [late], input_length=512) == [True]


def test_truncated_inputs_keep_eos_and_batched_generation_keeps_input_order(model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [" ".join(WORDS[: 1 + 2 * i]) for i in range(5)]  # five lengths, batched out of order by length
    encoded = encode_text_to_text(tokenizer, texts, input_length=5, targets=["alpha"] * 5, target_length=4)
    assert all(len(ex["input_ids"]) <= 5 and ex["input_ids"][-1] == tokenizer.eos_token_id for ex in encoded)
    assert encoded[0]["labels"] == tokenizer("alpha").input_ids[:3] + [tokenizer.eos_token_id], "cut to 4, EOS kept"
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    inputs = encode_text_to_text(tokenizer, list(reversed(texts)), input_length=64)
    batched = generate(model, tokenizer, inputs, 3, 4, torch.device("cpu"))
    one_by_one = [generate(model, tokenizer, [ex], 1, 4, torch.device("cpu"))[0] for ex in inputs]
    assert batched == one_by_one


RUN_WITH_RESULTS_IN = """
import runpy, sys
from pathlib import Path
import common.paths
common.paths.RESULTS_DIR = Path(sys.argv.pop(1))  # not the repository's results/
sys.argv[0] = "04_finetune/finetune_all.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _start(args, results, artefacts):
    """finetune_all.py as a user runs it (its __main__), writing its results under `results`."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PRESENCE_ARTEFACTS": str(artefacts), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("PRESENCE_XTREME_DIR", None)
    return subprocess.Popen([sys.executable, "-c", RUN_WITH_RESULTS_IN, str(results), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)


def _interruptible() -> None:
    """The child takes Ctrl-C as a user's shell gives it, whatever signal state the test process passes on
    (a blocked or ignored SIGINT is inherited across exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_exits_130_keeps_what_finished_and_says_how_to_run_again(model_dir, tmp_path):
    """SIGINT while XTREME fine-tunes (asked for far more steps than it gets), after verse retrieval finished."""
    artefacts, results = tmp_path / "artefacts", tmp_path / "results"
    _install_checkpoint(model_dir, artefacts, "baseline-seed0", "baseline", 0)
    _write_verses(artefacts)
    sets = [item for item in FAST if not item.startswith("finetune.steps")] + ["finetune.steps=1000000",
                                                                              "finetune.tasks=[xnli]"]
    args = ["--preset", "tiny", *[x for item in sets for x in ("--set", item)],
            "--xtreme-dir", str(write_xtreme_folder(tmp_path / "xtreme"))]
    process = _start(args, results, artefacts)
    deadline = time.monotonic() + 300
    for line in process.stdout:  # fine-tuning starts once retrieval is written
        assert time.monotonic() < deadline
        if "| step 1 |" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)  # a loaded machine finishes the step slowly
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    kept = results / "tiny" / "finetune"
    assert err.strip().splitlines()[-1] == (
        f"finetune_all.py: interrupted (Ctrl-C); the evaluations that finished are kept in {kept} (a rerun "
        "evaluates every checkpoint again and replaces its rows). Run again with: python 04_finetune/finetune_all.py "
        + shlex.join(args))
    assert {r["run"] for r in _read(kept / "retrieval.csv")} == {"baseline-seed0"}
    assert not (kept / "xtreme.csv").exists()


def test_a_truncated_model_is_one_line_naming_the_file_and_the_fix(model_dir, tmp_path):
    artefacts = tmp_path / "artefacts"
    final = _install_checkpoint(model_dir, artefacts, "baseline-seed0", "baseline", 0)
    _write_verses(artefacts)
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    process = _start(["--preset", "tiny", "--checkpoint", str(final)], tmp_path / "results", artefacts)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 2, err[-2000:]
    [line] = err.strip().splitlines()
    assert line.startswith(f"finetune_all.py: error: {weights} cannot be read (")
    assert line.endswith(f"): the model in {final} is truncated or damaged. Fix: write it again by resuming the "
                         "pre-training run baseline-seed0 (03_pretrain/pretrain.py with that run's arguments and "
                         "--resume; a finished run rewrites final/ from its last checkpoint), or use another model")
