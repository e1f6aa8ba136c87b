"""A checkpoint saved the way 03_pretrain saves final/ (model.save_pretrained + the data stage's tokenizer),
of every model family, loads with its family's Auto class (AutoModelForSeq2SeqLM, AutoModelForCausalLM,
AutoModelForMaskedLM) under the pinned transformers and other releases and computes the same logits: a T5
config says the output layer is untied (as google/mt5's configs do), every config says what the family's
preset ties, and the tokenizer config names a class and special tokens that transformers 4.x knows. `make test` installs a transformers 4.x copy for the cross-version check
(PRESENCE_TRANSFORMERS4_DIR, default .venv/transformers4); without it that check skips, saying so."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from common.config import MODEL_FAMILIES, load_preset
from common.data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
from common.families import get_family
from common.modeling import build_model, load_pretrained
from common.paths import REPO_ROOT
from test_tokenizer import MIXED, corpus_lines

VOCAB = 700
TEXTS = ["the light was good <extra_id_0> over the deep earth", MIXED, "神创造天地。 Бог небо , and ."]
LABELS = [[5, 9, 1], [7, 3, 1], [11, 12, 1]]  # T5's decoder targets
PRESETS = {"t5": "tiny", "gpt2": "presets/variants/tiny_gpt2.yaml", "llama": "presets/variants/tiny_llama.yaml",
           "bert": "presets/variants/tiny_bert.yaml"}
SMALL = ["model.d_model=16", "model.d_ff=32", "model.num_layers=2", "model.num_decoder_layers=1",
         "model.num_heads=2", "model.d_kv=8"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece_tokenizer(corpus_lines(), folder, VOCAB, character_coverage=1.0)
    return folder


@pytest.fixture(scope="module", params=MODEL_FAMILIES)
def checkpoint(request, tokenizer_dir, tmp_path_factory):
    """(folder, the model saved there, its family): the family's tiny preset at a smaller size, tied as
    the preset says (GPT-2 and BERT tied, T5 and Llama untied)."""
    torch.manual_seed(0)
    model = build_model(load_preset(PRESETS[request.param], SMALL).model, VOCAB, positions=64)
    folder = tmp_path_factory.mktemp(request.param) / "final"
    model.save_pretrained(folder)
    load_tokenizer(tokenizer_dir).save_pretrained(folder)
    return folder, model, request.param


def _logits(model, tokenizer, family: str) -> np.ndarray:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    if family == "t5":
        batch["labels"] = torch.tensor(LABELS)
    with torch.no_grad():
        return model.eval()(**batch).logits.numpy()


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_saved_config_says_what_is_tied_and_the_pinned_release_reloads_the_same_model(checkpoint):
    folder, model, family = checkpoint
    tied = load_preset(PRESETS[family]).model.tie_word_embeddings
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is tied
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in tokenizer_config, "transformers 4.x reads that key as a mapping"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reloaded = load_pretrained(folder)
    assert type(reloaded) is type(model) and _tied(reloaded) is _tied(model) is tied
    if family == "t5":
        assert reloaded.encoder.embed_tokens.weight is reloaded.shared.weight, "the input embeddings stay shared"
    np.testing.assert_array_equal(_logits(reloaded, tokenizer, family), _logits(model, tokenizer, family))
    resaved = folder.parent / "resaved"
    reloaded.save_pretrained(resaved)
    load_tokenizer(folder).save_pretrained(resaved)
    assert json.loads((resaved / "config.json").read_text())["tie_word_embeddings"] is tied
    assert json.loads((resaved / "tokenizer_config.json").read_text()) == tokenizer_config


def _transformers4_dir() -> Path:
    chosen = os.environ.get("PRESENCE_TRANSFORMERS4_DIR")
    folder = Path(chosen) if chosen else REPO_ROOT / ".venv" / "transformers4"
    if not (folder / "transformers").is_dir():
        if chosen:
            pytest.fail(f"PRESENCE_TRANSFORMERS4_DIR={chosen} holds no transformers. Fix: `make test` installs it")
        pytest.skip(f"no transformers 4.x copy in {folder} (`make test` installs one; or set "
                    "PRESENCE_TRANSFORMERS4_DIR): the cross-version check did not run")
    return folder


@pytest.mark.slow
def test_transformers_4_loads_the_checkpoint_and_computes_the_same_logits(checkpoint, tmp_path):
    folder, model, family = checkpoint
    auto_class = get_family(family).auto_class
    inputs = {"auto_class": auto_class.__name__, "texts": TEXTS, **({"labels": LABELS} if family == "t5" else {})}
    (tmp_path / "inputs.json").write_text(json.dumps(inputs), encoding="utf-8")
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "load_with_other_transformers.py"), str(folder),
                    str(tmp_path / "inputs.json"), str(tmp_path / "out.json")], check=True,
                   env={**os.environ, "PYTHONPATH": str(_transformers4_dir())})
    other = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert other["transformers"].startswith("4."), other["transformers"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(TEXTS, padding=True)
    assert other["input_ids"] == batch.input_ids
    assert other["decoded"] == tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True)
    assert other["model_class"] == type(model).__name__ and other["lm_head_tied"] is _tied(model)
    pinned = _logits(auto_class.from_pretrained(folder), tokenizer, family)
    np.testing.assert_allclose(np.array(other["logits"]), pinned, rtol=0, atol=1e-5)
