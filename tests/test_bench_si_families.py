"""03_pretrain/bench_si_families.py end to end at a miniature shape: every family and layer set is timed."""
from conftest import load_stage

bench = load_stage("03_pretrain/bench_si_families.py")


def test_every_family_and_layer_set_gets_a_row(tmp_path):
    out = tmp_path / "si_families.csv"
    cfg = bench.parse_args(["--batch-size", "2", "--length", "8", "--d-model", "32", "--num-layers", "1",
                            "--vocab-size", "50", "--repeats", "2", "--out", str(out)])
    rows = bench.main(cfg)["rows"]
    assert [(r["family"], r["layers"]) for r in rows] == [(f, k) for f in bench.FAMILIES for k in bench.LAYER_SETS]
    assert all(r["plain_ms"] > 0 and r["ours_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert out.read_text().splitlines()[0].split(",") == bench.COLUMNS
