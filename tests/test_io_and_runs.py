"""Atomic writes and run folders."""
import csv
import gzip
import json

import pytest

from common.io import atomic_open, read_json, write_csv, write_json, write_jsonl_gz
from common.runinfo import RunExistsError, environment_info, prepare_run_dir, write_run_files


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half a file")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("{broken")
            raise RuntimeError("interrupted")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_csv_and_jsonl_round_trip(tmp_path):
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y,z"}]
    assert write_csv(tmp_path / "t.csv", rows) == 2
    with open(tmp_path / "t.csv") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y,z"}]
    records = [{"text": "नमस्ते", "url": "u", "timestamp": "t"}]
    assert write_jsonl_gz(tmp_path / "c.json.gz", records) == 1
    with gzip.open(tmp_path / "c.json.gz", "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == records


def test_corrupt_json_gives_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="re-run"):
        read_json(tmp_path / "bad.json")


def test_a_run_never_silently_overwrites_another(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    write_run_files(run, {"seed": 0}, {"loss": 1.0})
    with pytest.raises(RunExistsError, match="--resume"):
        prepare_run_dir(tmp_path / "run")
    assert prepare_run_dir(tmp_path / "run", resume=True) == run
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        prepare_run_dir(tmp_path / "other", resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "environment.json", "metrics.json"]


def test_environment_records_versions_and_device():
    info = environment_info()
    for key in ("git_commit", "python", "torch", "transformers", "device"):
        assert key in info


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    write_json(tmp_path / "x.json", {})
    plain = tmp_path / "plain"
    plain.write_text("")
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_jsonl_reader_names_the_corrupt_line_and_the_missing_file(tmp_path):
    import gzip as gz

    from common.io import iter_jsonl_gz

    path = tmp_path / "x.jsonl.gz"
    with gz.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n\n{"a": 2}\n{broken\n')
    reader = iter_jsonl_gz(path, "rebuild it")
    assert [next(reader), next(reader)] == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(ValueError, match=r"x\.jsonl\.gz, line 4: not valid JSON .*Fix: rebuild it"):
        next(reader)
    with pytest.raises(FileNotFoundError, match="Fix: rebuild it"):
        list(iter_jsonl_gz(tmp_path / "none.jsonl.gz", "rebuild it"))
