"""CoNLL files: one token per line, columns separated by spaces or tabs, a blank line between sentences.

Token and tag columns are chosen by index (default: first and last). ``-DOCSTART-`` lines are skipped.
A tag column that looks like IOB (only ``O``, ``B-X``, ``I-X``) is normalised to IOB2, so IOB1 files
(CoNLL-2003 as distributed) and IOB2 files read the same; any other column (POS) is taken as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jaxfound.errors import JaxfoundError

IOB_TAG = re.compile(r"^(O|[BI]-\S+)$")
LOOKS_IOB = re.compile(r"^(O|[BIES][-_]\S*|\S+-\S+)$")


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    line: int  # line number (1-based) of the first word, for error messages


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """I-X that starts an entity (after O or after another type) becomes B-X; IOB2 input is unchanged."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaxfoundError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise JaxfoundError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); convert the file to UTF-8") \
            from None


def _is_iob_column(tags: list[str]) -> bool:
    """An entity/chunk column (IOB) rather than POS: 'O' or prefixed tags dominate it."""
    return bool(tags) and sum(bool(LOOKS_IOB.match(t)) for t in tags) >= 0.5 * len(tags)


def read_conll(path: str | Path, token_column: int = 0, tag_column: int = -1, scheme: str = "auto") -> list[Sentence]:
    """Sentences of a CoNLL file; scheme 'auto' normalises IOB-looking tag columns to IOB2, 'none' never does."""
    path = Path(path)
    if not path.is_file():
        raise JaxfoundError(f"{path}: file not found (expected a CoNLL file: token ... tag per line)")
    raw: list[list[tuple[str, str, int]]] = []
    current: list[tuple[str, str, int]] = []
    width = None
    for lineno, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            if current:
                raw.append(current)
                current = []
            continue
        cols = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols]
        if cols[0] == "-DOCSTART-":
            if current:
                raw.append(current)
                current = []
            continue
        need = max(token_column if token_column >= 0 else -token_column - 1,
                   tag_column if tag_column >= 0 else -tag_column - 1) + 1
        if len(cols) < need or (width is not None and len(cols) != width):
            expect = f"{width} columns as above" if width is not None else f"at least {need} columns"
            raise JaxfoundError(f"{path}:{lineno}: {len(cols)} column(s) in {line.strip()!r}; expected {expect} "
                                f"(token column {token_column}, tag column {tag_column})")
        width = len(cols)
        word, tag = cols[token_column], cols[tag_column]
        if not word or not tag:
            raise JaxfoundError(f"{path}:{lineno}: empty token or tag in {line!r}")
        current.append((word, tag, lineno))
    if current:
        raw.append(current)
    if not raw:
        raise JaxfoundError(f"{path}: no sentences found (expected 'token ... tag' lines, blank between sentences)")

    iob = scheme == "iob" or (scheme == "auto" and _is_iob_column([t for s in raw for _, t, _ in s]))
    out = []
    for sent in raw:
        tags = [t for _, t, _ in sent]
        if iob:
            for _, t, lineno in sent:
                if not IOB_TAG.match(t):
                    raise JaxfoundError(f"{path}:{lineno}: tag {t!r} is not IOB; valid tags are O, B-TYPE, I-TYPE "
                                        "(e.g. B-PER, I-LOC)")
            tags = iob1_to_iob2(tags)
        out.append(Sentence(tuple(w for w, _, _ in sent), tuple(tags), sent[0][2]))
    return out


def label_list(sentences: list[Sentence]) -> list[str]:
    """Sorted tag set (B-*, I-*, then O for IOB2 - the classic report order)."""
    return sorted({t for s in sentences for t in s.tags})


def tag_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """IOB2 word tags -> (type, first word, last word + 1); an I-X without a B-X opens an entity (seqeval default)."""
    spans, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        inside = tag.startswith("I-") and kind == tag[2:] and start is not None
        if start is not None and not inside:
            spans.append((kind, start, i))
            start, kind = None, None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start, kind = i, tag[2:]
    return spans
