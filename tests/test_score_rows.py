"""04_finetune's score CSVs: chance levels by hand, re-runs replacing their rows, a file without the chance
column upgraded in place, and a broken file refused rather than merged into."""
import csv

import pytest

from common.evaluation.score_rows import COLUMNS, chance_level, upsert_rows

OLD_HEADER = "run,method,seed,task,setting,lang,metric,value,n_examples\n"


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_chance_levels_by_hand():
    assert chance_level("xnli", "accuracy", 5010) == pytest.approx(33.3333, abs=1e-4)  # 3 labels
    assert chance_level("pawsx", "accuracy", 2000) == 50.0  # paraphrase or not
    assert chance_level("verse_retrieval", "accuracy", 200) == 0.5  # 1 right verse among 200
    assert chance_level("verse_retrieval", "accuracy_en_to_x", 500) == 0.2
    assert chance_level("xquad", "f1", 1190) is None and chance_level("panx", "span_f1", 100) is None


def test_a_file_without_the_chance_column_is_upgraded_and_reruns_replace_rows(tmp_path):
    path = tmp_path / "retrieval.csv"
    path.write_text(OLD_HEADER + "old,baseline,1,verse_retrieval,zero-shot,hi,accuracy,0.5,200\n"
                    "old,baseline,1,verse_retrieval,zero-shot,avg,accuracy,0.5,400\n"
                    "r,baseline,0,verse_retrieval,zero-shot,hi,accuracy,9.0,100\n", encoding="utf-8")
    new = [{"run": "r", "method": "baseline", "seed": 0, "task": "verse_retrieval", "setting": "zero-shot",
            "lang": lang, "metric": "accuracy", "value": value, "n_examples": n}
           for lang, value, n in (("hi", 1.0, 100), ("ru", 3.0, 100), ("avg", 2.0, 200))]
    upsert_rows(path, new)
    rows = _rows(path)
    assert list(rows[0]) == COLUMNS
    by_key = {(r["run"], r["lang"]): (r["value"], r["chance"]) for r in rows}
    assert by_key == {("old", "hi"): ("0.5", "0.5"), ("old", "avg"): ("0.5", "0.5"),
                      ("r", "hi"): ("1.0", "1.0"), ("r", "ru"): ("3.0", "1.0"), ("r", "avg"): ("2.0", "1.0")}


@pytest.mark.parametrize("content, expected", [
    (OLD_HEADER + "r,baseline,0,xnli,zero-shot,de,accuracy,40.0,100\nr,baseline,0,xnli,zero-sh",
     r"retrieval\.csv, line 3: a row with missing fields"),
    ("run,task,value\nr,xnli,1\n", r"has columns \['run', 'task', 'value'\]"),
])
def test_a_broken_file_is_refused_not_merged_into(tmp_path, content, expected):
    path = tmp_path / "retrieval.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        upsert_rows(path, [])
    assert path.read_text(encoding="utf-8") == content
