"""03_pretrain/bench_si_peers.py end to end at a miniature shape: every method's scores against the
per-sample loop, what each library gets wrong on the whole layer set, absent libraries skipped."""
import math
import warnings

import pytest

from common.io import read_csv
from conftest import MINI_MODEL, load_stage

bench = load_stage("03_pretrain/bench_si_peers.py")
MINI = MINI_MODEL + ["data.input_length=32", "data.tokenizer.vocab_size=400"]
BATCH = 4


@pytest.fixture(autouse=True)
def quiet_libraries():
    with warnings.catch_warnings():
        bench.quiet_libraries()
        yield


def run(tmp_path, **options) -> dict[str, dict]:
    result = bench.main("tiny", MINI, device="cpu", batch_size=BATCH, repeats=1, warmup=0, threads=1,
                        out=str(tmp_path / "si_peers.csv"), **options)
    return {f"{row['method']}@{row['params']}": row for row in read_csv(result["path"])}


def test_every_method_is_checked_and_each_library_says_what_it_gets_wrong_on_t5(tmp_path):
    rows = run(tmp_path, measure_memory=False)
    assert list(rows) == [method.key for method in bench.METHODS]
    for method in bench.METHODS:
        row = rows[method.key]
        if not bench.installed(method):
            assert row["note"] == f"skipped: {method.library} is not installed (make peers)"
            assert row["time_ms"] == "" and row["library"] == method.library
            continue
        assert float(row["time_ms"]) > 0 and float(row["ratio_to_plain"]) > 0
        assert float(row["ratio_to_ours_q1"]) <= float(row["ratio_to_ours"]) <= float(row["ratio_to_ours_q3"])
        if method.name == bench.PLAIN:  # the yardstick: an ordinary gradient, nothing per sample to check
            assert row["max_rel_err"] == row["on_whole_k"] == "" and float(row["ratio_to_plain"]) == 1.0
            continue
        assert float(row["max_rel_err"]) < (1e-5 if method.name == "ours" else bench.WRONG), method.key
        assert row["note"] == ""
        assert row["n_params"] == rows[f"ours@{method.params}"]["n_params"]
        if method.name == "ours":
            assert float(row["ratio_to_ours_q1"]) == float(row["ratio_to_ours_q3"]) == 1.0  # ours over ours, each round
            assert row["on_whole_k"] == "ok"
    assert rows["torch.func@K"]["on_whole_k"] == "ok"
    # The bias tables' bucket input is (query, key): 32 queries read as the batch
    methods = {method.key: method for method in bench.METHODS}
    if bench.installed(methods["opacus-gsm@K-no-bias-tables"]):
        assert ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight: per-sample result of shape "
                f"(32, 32, 2) for a batch of {BATCH}") in rows["opacus-gsm@K-no-bias-tables"]["on_whole_k"]
        assert "per-sample result of shape (32,)" in rows["opacus-ghost@K-no-bias-tables"]["on_whole_k"]
    if bench.installed(methods["backpack-batchgrad@K-linear"]):
        for key in ("backpack-batchgrad@K-linear", "backpack-batchl2@K-linear"):
            assert "no per-sample result for encoder.block.0.layer.0.layer_norm.weight" in rows[key]["on_whole_k"]
    n_params = {key: int(row["n_params"]) for key, row in rows.items()}
    assert n_params["ours@K"] > n_params["ours@K-no-bias-tables"] > n_params["ours@K-linear"]


@pytest.mark.slow
def test_absent_libraries_are_skipped_with_the_reason_and_memory_is_measured_per_method(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "installed", lambda method: not method.module)
    rows = run(tmp_path, methods=["ours@K", "opacus-gsm@K-no-bias-tables"])
    assert list(rows) == ["ours@K", "opacus-gsm@K-no-bias-tables"]
    skipped = rows["opacus-gsm@K-no-bias-tables"]
    assert skipped["note"] == "skipped: opacus is not installed (make peers)"
    assert skipped["time_ms"] == skipped["peak_mem_mb"] == skipped["max_rel_err"] == ""
    peak = float(rows["ours@K"]["peak_mem_mb"])
    assert math.isfinite(peak) and peak >= 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_on_every_family_each_method_is_checked_and_what_a_library_cannot_handle_is_said(tmp_path, family):
    result = bench.main(f"presets/variants/tiny_{family}.yaml", MINI, device="cpu", batch_size=BATCH, repeats=1,
                        warmup=0, threads=1, measure_memory=False, out=str(tmp_path / "si_peers.csv"))
    rows = {f"{row['method']}@{row['params']}": row for row in read_csv(result["path"])}
    assert list(rows) == [method.key for method in bench.methods_of(family)]
    assert "K-no-bias-tables" not in {row["params"] for row in rows.values()}, "no bias tables outside T5"
    assert float(rows["ours@K"]["max_rel_err"]) < 1e-5 and rows["ours@K"]["on_whole_k"] == "ok"
    methods = {method.key: method for method in bench.methods_of(family)}
    for key in ("torch.func@K", "opacus-gsm@K", "opacus-ghost@K"):
        if bench.installed(methods[key]):
            assert float(rows[key]["max_rel_err"]) < bench.WRONG and rows[key]["note"] == "", key
    if family == "gpt2":  # every matmul of GPT-2's block is a Conv1D: no nn.Linear for BackPACK
        skipped = ["plain-gradient@K-linear", "ours@K-linear"]
        if bench.installed(methods["backpack-batchgrad@K-linear"]):
            skipped.append("backpack-batchgrad@K-linear")
        for key in skipped:
            assert rows[key]["note"] == "skipped: no parameter of K is in K-linear on gpt2" and rows[key]["time_ms"] == ""
    else:
        assert float(rows["ours@K-linear"]["max_rel_err"]) < 1e-5
    if bench.installed(methods["backpack-batchgrad@K-linear"]):
        whole = rows["backpack-batchgrad@K-linear"]["on_whole_k"]
        expected = {"gpt2": "no per-sample result for transformer.h.0.ln_1.weight",
                    "llama": "no per-sample result for model.layers.0.input_layernorm.weight",
                    "bert": "cannot assign 'torch.FloatTensor' as child module 'output'"}[family]
        assert expected in whole


def test_unknown_methods_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown methods \['ours@everything'\].*ours@K"):
        bench.main("tiny", MINI, methods=["ours@everything"])
