"""benchmarks/data.py: splits, samples, user corpora, and what the text looks like."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
# benchmarks/ holds scripts, not a package; its scripts import data the same way.
sys.path.insert(0, str(BENCHMARKS))

import data  # noqa: E402

COMMON_WORDS = {
    "the", "and", "of", "to", "a", "in", "is", "was", "it", "that", "he", "she",
    "i", "you", "for", "with", "not", "be", "her", "his", "as", "had",
}  # fmt: skip


@pytest.fixture(scope="module")
def code() -> data.Domain:
    return data.load_domain("code")


@pytest.fixture(scope="module")
def prose() -> data.Domain:
    try:
        return data.load_domain("prose")
    except data.CorpusNotInstalled:
        pytest.skip(
            "prose corpus not installed (Debian r-cran-janeaustenr): "
            "run `bash benchmarks/setup.sh` as root"
        )


@pytest.fixture(params=["code", "prose"])
def builtin(request) -> data.Domain:
    return request.getfixturevalue(request.param)


def line_stats(texts: list[str]) -> dict[str, float]:
    """Fractions of non-blank lines with given features, over all texts."""
    lines = [line.strip() for text in texts for line in text.splitlines()]
    lines = [line for line in lines if line]
    words = [set(re.findall(r"[a-z]+", line.lower())) for line in lines]
    return {
        "common_word": sum(bool(w & COMMON_WORDS) for w in words) / len(lines),
        "ends_colon": sum(line.endswith(":") for line in lines) / len(lines),
        "has_equals": sum("=" in line for line in lines) / len(lines),
        "ends_sentence": sum(
            line.endswith((".", "!", "?", '"', "'", ";")) for line in lines
        )
        / len(lines),
    }


def looks_like_prose(texts: list[str]) -> bool:
    stats = line_stats(texts)
    return (
        stats["common_word"] > 0.9
        and stats["ends_colon"] < 0.05
        and stats["has_equals"] < 0.01
        and stats["ends_sentence"] > 0.8
    )


def assert_partition(domain: data.Domain) -> None:
    by_split = {split: domain.split_ids(split) for split in data.SPLITS}
    assigned = [doc_id for ids in by_split.values() for doc_id in ids]
    assert sorted(assigned) == sorted(domain.ids)  # each exactly once
    assert len(set(domain.ids)) == len(domain.ids)
    for split, ids in by_split.items():
        assert all(data.split_of(doc_id) == split for doc_id in ids)


# -- splits ------------------------------------------------------------------


def test_split_of_fixed_values_and_proportions():
    # Fixed expectations: a change of hash or bounds would silently move
    # documents between train and held-out across benchmark runs.
    assert data.split_of("doc-0") == "train"
    assert data.split_of("doc-3") == "calibration"
    assert data.split_of("doc-31") == "heldout"
    splits = [data.split_of(f"id-{n}") for n in range(20_000)]
    for split, fraction in data.SPLIT_FRACTIONS.items():
        assert splits.count(split) / len(splits) == pytest.approx(fraction, abs=0.01)


def test_split_of_ignores_hash_randomisation():
    script = "import data; print([data.split_of(f'd{n}') for n in range(200)])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=BENCHMARKS,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {str([data.split_of(f"d{n}") for n in range(200)]) + "\n"}


def test_builtin_splits_partition_and_repeat(builtin):
    assert_partition(builtin)
    counts = {split: len(builtin.split_ids(split)) for split in data.SPLITS}
    assert 0.8 < counts["train"] / len(builtin.ids) < 0.97
    for split in ("calibration", "heldout"):
        assert 1 <= counts[split] <= 0.12 * len(builtin.ids)
    again = data.load_domain(builtin.name)
    assert again.ids == builtin.ids
    assert again.documents("heldout") == builtin.documents("heldout")


def test_unknown_split_and_name():
    with pytest.raises(ValueError, match="unknown split"):
        data.load_domain("code").split_ids("test")
    with pytest.raises(ValueError, match="built-in domain"):
        data.load_domain("no-such-domain")


# -- samples -----------------------------------------------------------------


def test_samples_deterministic_and_from_their_split(code):
    samples = code.samples("heldout", count=20, chars=500, seed=3)
    assert samples == code.samples("heldout", count=20, chars=500, seed=3)
    assert samples != code.samples("heldout", count=20, chars=500, seed=4)
    assert all(len(s) == 500 for s in samples)
    assert len(set(samples)) == len(samples)
    heldout = "\n".join(code.documents("heldout"))
    assert all(("\n" + s) in ("\n" + heldout) for s in samples)  # from line starts
    with pytest.raises(ValueError, match="only"):
        code.samples("heldout", count=10**6, chars=500)


# -- built-in domains look like what they claim -----------------------------


def test_code_is_python(code):
    documents = code.documents("calibration") + code.documents("heldout")
    for text in documents:
        ast.parse(text)
    assert not looks_like_prose(documents)
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for doc_id in code.ids
        for part in doc_id.split("/")
    )
    assert "json/decoder.py" in code.ids


def test_prose_is_english_sentences(prose, code):
    assert len(prose.ids) == 269  # the six novels' chapters
    assert sum(len(prose.read(i)) for i in prose.ids) > 3_500_000
    for split in data.SPLITS:
        assert looks_like_prose(prose.documents(split))
    # Samples end mid-sentence, so only the word-level checks apply.
    stats = line_stats(prose.samples("heldout", count=20, chars=1000))
    assert stats["common_word"] > 0.9 and stats["has_equals"] == 0
    first = prose.read("prideprejudice/chapter-001")
    assert first.startswith("It is a truth universally acknowledged")
    assert "_" not in first and "Chapter" not in first


def test_prose_missing_names_setup_script(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_R_LIBRARIES", (str(tmp_path),))
    data._austen_chapters.cache_clear()
    try:
        with pytest.raises(data.CorpusNotInstalled, match="benchmarks/setup.sh"):
            data.load_domain("prose")
    finally:
        data._austen_chapters.cache_clear()


# -- user corpora -------------------------------------------------------------


def sentence(n: int) -> str:
    return f"Document {n} says that the river ran past the mill in the morning.\n"


def test_user_directory(tmp_path):
    names = [f"part-{n % 3}/doc-{n:03d}.txt" for n in range(300)]
    # Written in opposite orders: the splits must not follow file-system order.
    for root, order in ((tmp_path / "a", names), (tmp_path / "b", names[::-1])):
        for name in order:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(sentence(int(name[-7:-4])) * 20)
    (tmp_path / "a" / "notes.md").write_text("not a .txt file")
    first, second = data.load_domain(tmp_path / "a"), data.load_domain(tmp_path / "b")
    assert first.ids == tuple(sorted(names)) == second.ids
    assert_partition(first)
    for split in data.SPLITS:
        assert first.split_ids(split) == second.split_ids(split)
    assert first.documents("heldout") == second.documents("heldout")
    doc_id = first.split_ids("calibration")[0]
    assert first.read(doc_id) == sentence(int(doc_id[-7:-4])) * 20
    samples = first.samples("train", count=5, chars=200, seed=1)
    assert samples == second.samples("train", count=5, chars=200, seed=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        data.load_domain(tmp_path / "empty")


def test_user_jsonl(tmp_path):
    path = tmp_path / "dump.jsonl"
    lines = [json.dumps({"text": sentence(n) * 20, "url": f"u{n}"}) for n in range(300)]
    lines.insert(10, "")  # blank lines are skipped but keep numbering
    path.write_text("\n".join(lines) + "\n")
    domain = data.load_domain(str(path))
    assert len(domain.ids) == 300 and "11" not in domain.ids
    assert_partition(domain)
    assert [int(i) for i in domain.ids] == sorted(int(i) for i in domain.ids)
    assert domain.read("12") == sentence(10) * 20
    heldout = domain.documents("heldout")
    assert heldout == data.load_domain(path).documents("heldout")
    samples = domain.samples("heldout", count=3, chars=100)
    assert all(any(s in doc for doc in heldout) for s in samples)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        data.load_domain(bad).read("1")
