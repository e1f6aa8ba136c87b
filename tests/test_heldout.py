"""The held-out yardstick: per-language losses with standard errors, the mixture-weighted overall row,
and rows that read the same in any batch."""
import contextlib
import math

import numpy as np
import pytest
import torch

from common.data.packed_data import SpanCorruptionBatches
from common.evaluation.heldout import heldout_rows, row_losses, summarise


def test_summary_by_hand():
    losses = np.array([1.0, 3.0, 2.0, 2.0, 5.0])
    counts = np.array([10, 10, 10, 10, 10])
    rows = summarise(losses, counts, ["en", "en", "hi", "hi", "hi"], {"en": 0.25, "hi": 0.5, "zh": 0.25})
    en, hi, overall = rows
    assert en == {"lang": "en", "n_rows": 2, "n_tokens": 20, "loss": 2.0, "se": pytest.approx(math.sqrt(2) / math.sqrt(2))}
    assert hi["loss"] == pytest.approx(3.0) and hi["se"] == pytest.approx(math.sqrt(3) / math.sqrt(3))
    # zh is absent from the held-out rows: en and hi share the weight 1/3 : 2/3
    assert overall["lang"] == "all" and overall["n_rows"] == 5 and overall["n_tokens"] == 50
    assert overall["loss"] == pytest.approx(2.0 / 3 + 3.0 * 2 / 3)
    assert overall["se"] == pytest.approx(math.sqrt((1 / 3) ** 2 * 1 + (2 / 3) ** 2 * 1))


def test_fixed_subset_is_the_same_for_every_call():
    assert np.array_equal(heldout_rows(100, None), np.arange(100))
    a, b = heldout_rows(1000, 50), heldout_rows(1000, 50)
    assert np.array_equal(a, b) and len(np.unique(a)) == 50


def test_a_row_reads_the_same_in_any_batch_and_scores_like_hugging_face(mini_artefacts):
    from transformers import T5Config, T5ForConditionalGeneration

    loader = SpanCorruptionBatches(mini_artefacts / "tiny" / "data", "heldout", 1, seed=12345)
    pair, alone = loader.fixed_rows(np.array([3, 5])), loader.fixed_rows(np.array([5]))
    assert all(torch.equal(pair[k][1], alone[k][0]) for k in pair)
    m = loader.manifest
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=m["vocab_size"], d_model=16, d_ff=32, num_layers=1,
                                                num_decoder_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0,
                                                pad_token_id=0, eos_token_id=1,
                                                dropout_rate=0.0)).double()
    rows = np.arange(7)
    losses, counts = row_losses(model, loader, rows, batch_size=3, device="cpu", autocast=contextlib.nullcontext)
    for i in (0, 4, 6):
        with torch.no_grad():
            expected = model(**loader.fixed_rows(rows[i:i + 1])).loss.item()
        assert losses[i] == pytest.approx(expected, rel=1e-10)
    assert (counts == m["target_length"]).all()
