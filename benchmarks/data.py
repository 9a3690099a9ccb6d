"""
Text corpora for the benchmarks, available offline, with fixed splits.

    from data import load_domain            # with benchmarks/ on sys.path
    code = load_domain("code")
    texts = code.documents("train")
    calib = code.samples("calibration", count=64, chars=2048, seed=0)

Domains (``DOMAINS``):

- ``code``: the running Python's standard-library ``.py`` sources, one document
  per file (id: path relative to the stdlib, e.g. ``json/decoder.py``). Left
  out: tests, site-packages, and machine-generated modules (``encodings``
  tables, ``pydoc_data``, ``_sysconfigdata``) that are data rather than code.
  About 600 files, 10 MB on CPython 3.11.
- ``prose``: Jane Austen's six novels, one document per chapter (id:
  ``prideprejudice/chapter-001``), 269 chapters, 4.0 MB of English narrative
  and dialogue. Install with ``bash benchmarks/setup.sh`` (Debian package
  ``r-cran-janeaustenr``). Paragraphs are joined into single lines and
  Project Gutenberg's ``_italics_`` marks are dropped.
- any other string or path: a directory of ``.txt`` files (one document per
  file, id: relative path) or a ``.jsonl`` file with a ``"text"`` field per
  line (id: line number), e.g. a local dump of C4 or Zyda-2. Pass a directory
  named like a built-in domain as ``./code``.

Why Jane Austen for prose: it has to install offline from Debian or PyPI, and
neither carries a public-domain book collection as plain files. The Debian
package r-cran-janeaustenr holds the full Project Gutenberg texts of the six
novels (public domain; package MIT), is a 1.6 MB download (apt adds
r-base-core, about 30 MB), and is continuous narrative English, as far from
source code as the benchmarks need. The alternatives were weaker:
python3.11-doc (11 MB of reStructuredText) is about Python and full of
identifiers and code, so it would blur the code/prose contrast;
debian-handbook is a 35 MB download of technical text; the Bible packages
(bible-kjv-text, sword-text-web) keep numbered verses in formats that need
their own readers; the PyPI packages found that mention Gutenberg download
books at run time. The package stores the novels in R's lazy-load format; the small
reader below decodes it with zlib and struct, so R is installed as a
dependency but never run.

Splits: every document goes to ``train`` / ``calibration`` / ``heldout``
(90 / 5 / 5 %) by the SHA-256 of its id, so the assignment does not depend on
file-system order, Python's hash randomisation, or which other documents exist.
"""

import bz2
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import struct
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DOMAINS = ("code", "prose")
SPLITS = ("train", "calibration", "heldout")
SPLIT_FRACTIONS = {"train": 0.90, "calibration": 0.05, "heldout": 0.05}

# Directories (any path component) and stdlib entries left out of "code".
_CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_CODE_SKIP_TOP = ("encodings", "pydoc_data", "_sysconfigdata", "config-")

# Debian's apt installs R packages in the first, R's install.packages() the second.
_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library")
_AUSTEN_RDB = "janeaustenr/data/Rdata.rdb"


class CorpusNotInstalled(FileNotFoundError):
    """A built-in domain's source text is missing from this machine."""


def split_of(doc_id: str) -> str:
    """The split a document with this id belongs to (stable across runs)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    bound = 0.0
    for split in SPLITS:
        bound += SPLIT_FRACTIONS[split]
        if position < bound:
            return split
    return SPLITS[-1]  # float rounding of the last bound


@dataclass(frozen=True)
class Domain:
    """A corpus: document ids and a reader, split by ``split_of``."""

    name: str
    ids: tuple[str, ...]
    read: Callable[[str], str] = field(repr=False, compare=False)

    def split_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [i for i in self.ids if split_of(i) == split]

    def documents(self, split: str) -> list[str]:
        """The split's document texts, in id order."""
        return [self.read(i) for i in self.split_ids(split)]

    def samples(self, split: str, count: int, chars: int, seed: int = 0) -> list[str]:
        """``count`` distinct, non-overlapping ``chars``-long slices of the split.

        Each slice starts at a line start (a paragraph for prose), so none
        begins mid-word or mid-indentation: after one slice the rest of its
        last line is skipped. Slices are drawn without replacement from all of
        the split's documents; the same arguments give the same slices on
        every run. Documents shorter than ``chars`` give none.
        """
        if count < 0 or chars < 1:
            raise ValueError(f"need count >= 0 and chars >= 1, got {count}, {chars}")
        spans = [
            (doc_id, start)
            for doc_id in self.split_ids(split)
            for start in _chunk_starts(self.read(doc_id), chars)
        ]
        if count > len(spans):
            raise ValueError(
                f"{self.name} {split}: asked for {count} samples of {chars} "
                f"characters, only {len(spans)} available"
            )
        chosen = random.Random(f"{split}:{seed}").sample(spans, count)
        texts = {doc_id: self.read(doc_id) for doc_id in {d for d, _ in chosen}}
        return [texts[doc_id][start : start + chars] for doc_id, start in chosen]


def load_domain(name_or_path: str | Path) -> Domain:
    """A built-in domain (``"code"``, ``"prose"``) or a user corpus by path."""
    if name_or_path == "code":
        return _code_domain()
    if name_or_path == "prose":
        chapters = _austen_chapters()
        return Domain("prose", tuple(sorted(chapters)), chapters.__getitem__)
    path = Path(name_or_path)
    if path.is_dir():
        return _directory_domain(path)
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl_domain(path)
    raise ValueError(
        f"{name_or_path!r} is neither a built-in domain {DOMAINS}, a directory "
        "of .txt files nor a .jsonl file"
    )


def _chunk_starts(text: str, chars: int) -> list[int]:
    starts, start = [], 0
    while start + chars <= len(text):
        starts.append(start)
        newline = text.find("\n", start + chars - 1)
        if newline < 0:
            break
        start = newline + 1
    return starts


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _code_domain() -> Domain:
    root = Path(sysconfig.get_paths()["stdlib"])
    ids = []
    # os.walk rather than rglob, to prune site-packages (often GBs) unvisited.
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [
            d
            for d in dirs
            if d not in _CODE_SKIP_DIRS
            and not (rel == Path(".") and d.startswith(_CODE_SKIP_TOP))
        ]
        for name in files:
            if not name.endswith(".py") or os.path.getsize(Path(folder, name)) == 0:
                continue  # empty __init__.py files say nothing
            if rel == Path(".") and name.startswith(_CODE_SKIP_TOP):
                continue
            ids.append((rel / name).as_posix())
    return Domain("code", tuple(sorted(ids)), lambda i: _read_text(root / i))


def _directory_domain(root: Path) -> Domain:
    ids = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt")))
    if not ids:
        raise ValueError(f"{root} has no .txt files")
    return Domain(str(root), ids, lambda i: _read_text(root / i))


def _jsonl_domain(path: Path) -> Domain:
    # Byte offsets rather than texts, so a multi-GB dump is not held in memory.
    offsets: dict[str, int] = {}
    with path.open("rb") as f:
        position = 0
        for number, line in enumerate(f, start=1):
            if line.strip():
                offsets[str(number)] = position
            position += len(line)
    if not offsets:
        raise ValueError(f"{path} has no records")

    def read(doc_id: str) -> str:
        with path.open("rb") as f:
            f.seek(offsets[doc_id])
            record = json.loads(f.readline())
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path} line {doc_id}: no string 'text' field")
        return record["text"]

    # Ids sort as numbers so documents() follows the file.
    return Domain(str(path), tuple(sorted(offsets, key=int)), read)


@lru_cache(maxsize=1)
def _austen_chapters() -> dict[str, str]:
    found = [Path(lib) / _AUSTEN_RDB for lib in _R_LIBRARIES]
    rdb = next((path for path in found if path.is_file()), None)
    if rdb is None:
        raise CorpusNotInstalled(
            "the prose domain needs Debian's r-cran-janeaustenr (not found under "
            f"{', '.join(_R_LIBRARIES)}); run `bash benchmarks/setup.sh` as root"
        )
    chapters = {}
    for book, lines in _read_lazyload_db(rdb).items():
        for number, text in enumerate(_chapters(lines), start=1):
            chapters[f"{book}/chapter-{number:03d}"] = text
    return chapters


_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+[ivxlc]+\s*$", re.IGNORECASE)


def _chapters(lines: list[str | None]) -> list[str]:
    """A novel's chapters, front matter dropped, one paragraph per line."""
    chapters: list[list[str]] = []
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph and chapters:
            # single spaces: the Gutenberg texts put two after a full stop
            chapters[-1].append(" ".join(" ".join(paragraph).split()))
        paragraph.clear()

    for line in lines:
        line = (line or "").strip()
        if _CHAPTER.match(line):
            end_paragraph()
            chapters.append([])
        elif not line or _VOLUME.match(line):
            end_paragraph()
        else:
            paragraph.append(line.replace("_", ""))
    end_paragraph()
    return ["\n".join(paragraphs) + "\n" for paragraphs in chapters]


def _read_lazyload_db(rdb: Path) -> dict[str, list[str | None]]:
    """The character vectors of an R lazy-load database (``.rdb`` + ``.rdx``)."""
    index = _RReader(gzip.decompress(rdb.with_suffix(".rdx").read_bytes())).read()
    variables = index.by_name["variables"]
    compression = index.by_name["compressed"][0]
    data = rdb.read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.names, variables):
        blob = data[offset + 4 : offset + length]  # after the uncompressed size
        if compression in (2, 3):  # a type byte says which codec
            kind, blob = blob[:1], blob[1:]
            codecs = {b"Z": lzma.decompress, b"2": bz2.decompress}
            codecs |= {b"1": zlib.decompress, b"0": bytes}
            blob = codecs[kind](blob)
        else:
            blob = zlib.decompress(blob)
        out[name] = _RReader(blob).read()
    return out


class _RList(list):
    """An R vector with its ``names`` attribute."""

    names: list[str] = []

    @property
    def by_name(self) -> dict:
        return dict(zip(self.names, self))


class _RReader:
    """Just enough of R's XDR serialization for vectors of strings and ints."""

    _NULL, _REF, _SYMBOL, _PAIRLIST, _CHAR = 254, 255, 1, 2, 9
    _LOGICAL, _INT, _REAL, _STRING, _LIST = 10, 13, 14, 16, 19

    def __init__(self, raw: bytes) -> None:
        if raw[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.raw, self.pos, self.refs = raw, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader R versions
        if version == 3:
            self.pos += 4 + self._int()  # native encoding name

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.raw, self.pos)
        self.pos += 4
        return value

    def _ints(self, fmt: str, size: int) -> list:
        n = self._int()
        values = struct.unpack_from(f">{n}{fmt}", self.raw, self.pos)
        self.pos += n * size
        return list(values)

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == self._NULL:
            return None
        if kind == self._REF:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == self._SYMBOL:
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == self._CHAR:
            n = self._int()
            if n < 0:
                return None  # NA_character_
            text = self.raw[self.pos : self.pos + n]
            self.pos += n
            latin1 = flags & (1 << 14)  # LATIN1 mask in the levels bits
            return text.decode("latin-1" if latin1 else "utf-8", errors="replace")
        if kind == self._PAIRLIST:  # as a dict tag -> value
            if has_attr:
                self.read()  # a pairlist's own attributes: unused here
            tag = self.read() if has_tag else None
            pairs = {tag: self.read()}
            rest = self.read()
            return pairs | (rest or {})
        if kind in (self._STRING, self._LIST):
            values = _RList(self.read() for _ in range(self._int()))
        elif kind in (self._LOGICAL, self._INT):
            values = _RList(self._ints("i", 4))
        elif kind == self._REAL:
            values = _RList(self._ints("d", 8))
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            values.names = self.read().get("names", [])
        return values
