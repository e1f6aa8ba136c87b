"""The mixed-sources corpus (common/data/sources.py), its gathering (01_data/gather_sources.py) and the
per-stream weight log of 03_pretrain, on files the tests write themselves (this Python's own library stands
in for a gathered source)."""
import shutil
import zlib

import numpy as np
import pytest

from common.config import ConfigError, load_preset
from common.data.corpus import CorpusError
from common.data.sources import HELDOUT_MODULUS, MixedSourcesCorpus, html_text, split_stream
from common.presence.reweighting import group_shares
from conftest import MINI_DATA, csv_rows, load_stage, pretrain_args

gather = load_stage("01_data/gather_sources.py")


def test_html_text_keeps_the_visible_text_of_one_element():
    page = ("<html><head><title>T</title><style>p {color: red}</style></head><body><nav><p>menu</p></nav>"
            "<div id='DisplayArea'><h1>Heading</h1><div><p>one  &amp;\n two</p></div><script>x()</script>"
            "<ul><li>a</li><li>b</li></ul></div><footer>foot</footer></body></html>")
    assert html_text(page, keep="DisplayArea") == "Heading\none & two\na\nb"
    assert html_text(page) == "T\nmenu\nHeading\none & two\na\nb\nfoot"


def test_streams_and_their_validation():
    assert split_stream("ru+manpages") == ("ru", "manpages") and split_stream("ru") == ("ru", "bible")
    ok = ["data.source=mixed", "data.languages=[en, en+python, ru+manpages]", "data.probe_languages=[en]"]
    assert load_preset("tiny", ok).data.languages == ["en", "en+python", "ru+manpages"]  # no folder needed yet
    with pytest.raises(ConfigError, match="en\\+poetry"):
        load_preset("tiny", ["data.source=mixed", "data.languages=[en, en+poetry]", "data.probe_languages=[en]"])
    with pytest.raises(ConfigError, match="probe_languages"):
        load_preset("tiny", ["data.source=mixed", "data.languages=[en, en+python]", "data.probe_languages=[en+python]"])


def _write_source(root, source, language, documents):
    folder = root / source / language
    folder.mkdir(parents=True)
    for name, text in documents.items():
        (folder / name).write_text(text)


def test_a_gathered_source_is_split_by_the_hash_of_its_file_names(tmp_path):
    documents = {f"page{i}.txt": f"text of page {i}\n  with   spaces\n" for i in range(60)}
    documents["empty.txt"] = " \n\n"
    _write_source(tmp_path, "manpages", "ru", documents)
    corpus = MixedSourcesCorpus(tmp_path)
    train = {d.url.split("/")[-1] for d in corpus.documents("ru+manpages", "train")}
    heldout = {d.url.split("/")[-1] for d in corpus.documents("ru+manpages", "heldout")}
    expected = {n for n in documents if zlib.crc32(n.encode()) % HELDOUT_MODULUS == 0} - {"empty.txt"}
    assert heldout == expected and not train & heldout
    assert train | heldout == set(documents) - {"empty.txt"} and corpus.skipped["ru+manpages"]["empty"] >= 1
    first = next(corpus.documents("ru+manpages", "train"))
    assert first.language == "ru+manpages" and "\n" in first.text and "  " not in first.text
    with pytest.raises(CorpusError, match="gather_sources.py"):
        list(corpus.documents("zh+manpages", "train"))
    with pytest.raises(CorpusError, match="does not exist"):
        MixedSourcesCorpus(tmp_path / "absent")


def test_gathering_helpers_by_hand(tmp_path):
    assert gather.script_share(["abc где"], "ru") == pytest.approx(3 / 6)
    assert gather.script_share(["x"], "sw") is None
    counts = gather.write_documents(tmp_path / "out", [("long", "a" * 300), ("short", "b" * 10)], "en")
    assert counts["documents"] == 1 and counts["left_out_short"] == 1
    assert (tmp_path / "out" / "long.txt").read_text() == "a" * 300 + "\n"
    help_page = tmp_path / "root" / "usr/share/libreoffice/help/ru/text/shared/01/x.html"
    help_page.parent.mkdir(parents=True)
    help_page.write_text("<div id='DisplayArea'><p>Текст</p><p>Help content debug info:</p><p>x.xhp</p></div>")
    assert gather.libreoffice_help(tmp_path / "root") == [("shared-01-x", "Текст")]
    names = [name for name, _ in gather.python_sources()]
    assert "json.decoder" in names and not any(".test." in f".{n}." for n in names)
    assert gather.package_of("manpages", "en") == "manpages" and gather.package_of("libreoffice-help", "zh") == \
        "libreoffice-help-zh-cn"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (it renders manual pages)")
def test_a_manual_page_is_rendered_as_plain_text():
    page = b".TH DEMO 1\n.SH NAME\ndemo \\- show \\fBbold\\fR text\n.SH DESCRIPTION\nIt prints.\n"
    text = gather.man_page_text(page)
    assert "demo - show bold text" in text.replace("‐", "-") and "It prints." in text and "\x08" not in text


def test_group_shares_by_hand():
    shares = group_shares(np.array([0, 0, 2, 2]), np.array([0.1, 0.2, 0.3, 0.4]), ["en", "ru", "en+python"])
    assert shares == [{"stream": "en", "batch_share": 0.5, "weight_share": pytest.approx(0.3)},
                      {"stream": "en+python", "batch_share": 0.5, "weight_share": pytest.approx(0.7)}]


def test_mixed_sources_build_and_train_with_weights_per_stream(tmp_path, monkeypatch):
    """The whole path offline: Python's library as a gathered source beside the Bible, a miniature data build,
    a PRESENCE run, and its weight per stream, which matches the batch's rows and sums to 1 each step."""
    pytest.importorskip("sentencepiece")
    sources = tmp_path / "sources"
    gather.write_documents(sources / "python" / "en", gather.python_sources()[:80], "en")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    monkeypatch.setenv("PRESENCE_SOURCES", str(sources))
    mixed = [item for item in MINI_DATA if not item.startswith(("data.languages", "data.probe_languages"))] + [
        "data.source=mixed", "data.languages=[en, en+python]", "data.probe_languages=[en]"]
    prepare = load_stage("01_data/prepare_data.py")
    try:
        manifest = prepare.main("tiny", mixed, summary_path=tmp_path / "summary.csv")
    except CorpusError as err:
        pytest.skip(f"the embedded corpus is unavailable: {err}")
    assert manifest["train_rows"] > 0
    summary = {r["language"]: r for r in csv_rows(tmp_path / "summary.csv")}
    assert summary["en"]["source"] == "bible" and summary["en+python"]["source"] == "python"
    assert int(summary["en+python"]["train_rows"]) > 0
    pretrain = load_stage("03_pretrain/pretrain.py")
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "mixed", "--method", "presence", "--set",
                                                    "pretrain.log_every=1")))
    rows = csv_rows(tmp_path / "mixed" / "stream_weights.csv")
    assert {r["stream"] for r in rows} <= {"en", "en+python"} and {int(r["step"]) for r in rows} == set(range(1, 7))
    for step in range(1, 7):
        of_step = [r for r in rows if int(r["step"]) == step]
        assert sum(float(r["weight_share"]) for r in of_step) == pytest.approx(1.0)
        assert sum(float(r["batch_share"]) for r in of_step) == pytest.approx(1.0)
