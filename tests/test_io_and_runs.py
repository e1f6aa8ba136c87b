"""Atomic writes, run folders, the run lock and stop signals."""
import csv
import gzip
import json
import os
import signal
import subprocess
import sys

import pytest

from common.io import (append_csv_row, atomic_open, read_json, remove_interrupted_writes, write_csv, write_json,
                       write_jsonl_gz)
from common.paths import REPO_ROOT
from common.runinfo import (RunExistsError, bind_store, config_changes, environment_info, prepare_run_dir, run_lock,
                            write_run_files)
from common import runinfo
from common.signals import StopRequests


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
    with pytest.raises(RunExistsError, match="--resume") as error:
        prepare_run_dir(tmp_path / "run")
    assert "committed results" not in str(error.value)
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


def test_a_run_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom common.runinfo import run_lock\nwith run_lock(sys.argv[1]):\n"
         "    print('locked', flush=True)\n    time.sleep(600)", str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunExistsError, match=f"in use by another process .pid {holder.pid} .*Fix:"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no chance to unlock, the kernel releases the lock
        holder.wait()
    with run_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / "run.lock").read_text()


def test_a_store_is_bound_to_one_run_folder(tmp_path):
    store = tmp_path / "artefacts" / "runX"
    store.mkdir(parents=True)
    assert bind_store(store, tmp_path / "a" / "runX") is None  # adopted
    assert bind_store(store, tmp_path / "a" / "runX") is None
    with pytest.raises(RunExistsError, match="holds the checkpoints of the run in .*/a/runX.*Fix"):
        bind_store(store, tmp_path / "b" / "runX")
    assert bind_store(store, tmp_path / "b" / "runX", take_over=True) == str((tmp_path / "a" / "runX").resolve())
    assert read_json(store / "owner.json") == {"run_dir": str((tmp_path / "b" / "runX").resolve())}


def test_config_changes_walk_nested_mappings():
    old = {"method": "presence", "preset": {"pretrain": {"steps": 3, "peak_lr": 0.01}, "data": {"languages": ["en"]}},
           "gone": 1}
    new = {"method": "presence", "preset": {"pretrain": {"steps": 6, "peak_lr": 0.01}, "data": {"languages": ["hi"]}},
           "added": 2}
    assert config_changes(old, new) == {"preset.data.languages": (["en"], ["hi"]), "preset.pretrain.steps": (3, 6)}


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    keep = [tmp_path / "metrics.json", tmp_path / "checkpoints" / "step-2" / "model.safetensors", tmp_path / ".hidden"]
    leftovers = [tmp_path / ".metrics.json.k2j4x.tmp", tmp_path / "checkpoints" / ".step-4.tmp" / "model.safetensors",
                 tmp_path / ".final.tmp" / "config.json"]
    for path in keep + leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    remove_interrupted_writes(tmp_path)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() or p.parent.name.endswith(".tmp") and p.parent.exists() for p in leftovers)


def test_a_failed_write_names_its_file(tmp_path):
    """A full disk reports ENOSPC when the buffered row is flushed, naming no file (/dev/full, the Linux
    device that is always full, shows it)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError, match="No space left on device: '/dev/full'"):
        append_csv_row("/dev/full", {"step": 1}, ["step"])


def test_a_stop_signal_is_recorded_and_a_second_one_exits():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        assert stops.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.received == signal.SIGTERM and stops.exit_status == 143
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGINT)
        assert exit_info.value.code == 130
    assert signal.getsignal(signal.SIGTERM) == previous


def test_overwriting_a_committed_run_is_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(runinfo, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results" / "tiny" / "run").mkdir(parents=True)
    (tmp_path / "results" / "tiny" / "run" / "config.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--overwrite to replace it .which replaces the run in .*part of the "
                                             "committed results"):
        prepare_run_dir(tmp_path / "results" / "tiny" / "run")


def test_run_records_name_the_command_from_the_repository_root(monkeypatch):
    script = str(REPO_ROOT / "03_pretrain" / "pretrain.py")
    monkeypatch.setattr(sys, "argv", [script, "--out", str(REPO_ROOT / "results" / "x"), "--set", "a=/etc/b"])
    assert environment_info()["argv"] == ["03_pretrain/pretrain.py", "--out", "results/x", "--set", "a=/etc/b"]


def test_no_committed_run_record_names_an_absolute_path():
    records = sorted((REPO_ROOT / "results").glob("**/*.json"))
    assert records
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []
    found = [f"{p.relative_to(REPO_ROOT)}: {s}" for p in records for s in strings(json.loads(p.read_text()))
             if s.startswith("/")]
    assert not found, found[:5]


def test_a_table_rewritten_with_float_noise_below_its_precision_stays_byte_identical(tmp_path):
    """digits=6: noise in the 7th digit, also across a rounding boundary (1.000005: ...49 / ...51), keeps the
    file as it is, even text written with more digits earlier; a real change rewrites that cell only."""
    path = tmp_path / "scores.csv"
    columns = ["lang", "n", "loss", "si", "note"]
    rows = [{"lang": "en", "n": 88, "loss": 5.823085308074951, "si": 1.0000049999, "note": ""},
            {"lang": "hi", "n": 91, "loss": float("nan"), "si": 1e-7, "note": "x"}]
    write_csv(path, rows, columns, digits=6)
    first = path.read_bytes()
    assert first.decode().splitlines() == ["lang,n,loss,si,note", "en,88,5.82309,1.0,", "hi,91,nan,1e-07,x"]
    noisy = [{**rows[0], "loss": 5.823085308074951 * (1 + 3e-7), "si": 1.0000050001},
             {**rows[1], "si": 1.0000003e-7}]
    before = path.stat().st_mtime_ns
    write_csv(path, noisy, columns, digits=6)
    assert path.read_bytes() == first and path.stat().st_mtime_ns == before  # not even rewritten
    older = b"lang,n,loss,si,note\r\nen,88,5.823085308074951,1.0000049999,\r\nhi,91,nan,1e-07,x\r\n"
    path.write_bytes(older)
    write_csv(path, noisy, columns, digits=6)
    assert path.read_bytes() == older
    write_csv(path, [{**noisy[0], "loss": 5.9}, noisy[1]], columns, digits=6)
    assert path.read_bytes() == older.replace(b"5.823085308074951", b"5.9")
    write_csv(path, noisy[:1], columns, digits=6)  # another shape: written afresh
    assert path.read_text().splitlines() == ["lang,n,loss,si,note", "en,88,5.82309,1.00001,"]
