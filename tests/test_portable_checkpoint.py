"""A checkpoint saved the way 03_pretrain saves final/ (model.save_pretrained + the data stage's tokenizer)
loads with the Auto classes of other transformers releases and computes the same thing: its config says the
output layer is untied (as google/mt5's configs do), and its tokenizer config names a class and special
tokens that transformers 4.x knows. `make test` installs a transformers 4.x copy for the cross-version check
(PRESENCE_TRANSFORMERS4_DIR, default .venv/transformers4); without it that check skips, saying so."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from common.config import ModelConfig
from common.data.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
from common.modeling import build_model, load_pretrained
from common.paths import REPO_ROOT
from test_tokenizer import MIXED, corpus_lines

VOCAB = 700
TEXTS = ["the light was good <extra_id_0> over the deep earth", MIXED, "神创造天地。 Бог небо , and ."]
LABELS = [[5, 9, 1], [7, 3, 1], [11, 12, 1]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    train_sentencepiece_tokenizer(corpus_lines(), root / "tokenizer", VOCAB, character_coverage=1.0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8),
                        VOCAB)
    folder = root / "final"
    model.save_pretrained(folder)
    load_tokenizer(root / "tokenizer").save_pretrained(folder)
    return folder, model


def _logits(model, tokenizer) -> np.ndarray:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch, labels=torch.tensor(LABELS)).logits.numpy()


def test_saved_config_says_untied_and_the_pinned_release_reloads_the_same_model(checkpoint):
    folder, model = checkpoint
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in tokenizer_config, "transformers 4.x reads that key as a mapping"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reloaded = load_pretrained(folder)
    assert reloaded.lm_head.weight is not reloaded.shared.weight
    assert reloaded.encoder.embed_tokens.weight is reloaded.shared.weight, "the input embeddings stay shared"
    np.testing.assert_array_equal(_logits(reloaded, tokenizer), _logits(model, tokenizer))
    resaved = folder.parent / "resaved"
    reloaded.save_pretrained(resaved)
    load_tokenizer(folder).save_pretrained(resaved)
    assert json.loads((resaved / "config.json").read_text())["tie_word_embeddings"] is False
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
    folder, model = checkpoint
    (tmp_path / "inputs.json").write_text(json.dumps({"texts": TEXTS, "labels": LABELS}), encoding="utf-8")
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "load_with_other_transformers.py"), str(folder),
                    str(tmp_path / "inputs.json"), str(tmp_path / "out.json")], check=True,
                   env={**os.environ, "PYTHONPATH": str(_transformers4_dir())})
    other = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert other["transformers"].startswith("4."), other["transformers"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(TEXTS, padding=True)
    assert other["input_ids"] == batch.input_ids
    assert other["decoded"] == tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True)
    assert other["lm_head_tied"] is False
    pinned = _logits(AutoModelForSeq2SeqLM.from_pretrained(folder), tokenizer)
    np.testing.assert_allclose(np.array(other["logits"]), pinned, rtol=0, atol=1e-5)
