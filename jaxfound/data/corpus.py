"""Read a text corpus as a stream of documents: text (blank-line separated paragraphs), JSON lines or parquet files
- one file, a directory of them or a glob - or a `datasets` hub name.

Local files are streamed in corpus order (sorted paths) a chunk at a time, never read whole: a directory or glob is
the concatenation of its files. The paragraph split is the one of `datasets`' text loader (`sample_by="paragraph"`:
split on blank lines, universal newlines), so a corpus reads the same as it did through `datasets`.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from jaxfound.errors import JaxfoundError

SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
CHUNK_CHARS = 1 << 20  # characters read at a time from a text file
PARAGRAPH_BREAK = "\n\n"


def corpus_files(path: str) -> list[str]:
    """The corpus files of path, in corpus order: the file itself, the files of a directory (recursive, by known
    suffix) or the matches of a glob; [] for a name that is none of these (a hub dataset)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in SUFFIX_FORMATS and f.is_file())
        if not files:
            raise JaxfoundError(f"data.path={path}: the directory holds no {'/'.join(SUFFIX_FORMATS)} files")
        return files
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise JaxfoundError(f"data.path={path}: no files match the pattern {path!r}")
        return files
    return [path] if p.exists() else []


def corpus_format(path: str, files: list[str], fmt: str) -> str:
    """data.format resolved: 'auto' takes it from the suffixes (text for unknown ones), which must agree."""
    if not files and fmt not in ("auto", "hub"):
        raise JaxfoundError(f"data.path={path}: no such file or directory")
    if not files:
        return "hub"
    if fmt != "auto":
        return fmt
    fmts = {SUFFIX_FORMATS.get(Path(f).suffix, "text") for f in files}
    if len(fmts) > 1:
        raise JaxfoundError(f"data.path={path}: mixed file formats {sorted(fmts)}; set data.format")
    return fmts.pop()


def iter_documents(path: str, fmt: str = "auto", text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of a file, directory or glob (or a hub dataset name), streamed in corpus order."""
    files = corpus_files(path)
    fmt = corpus_format(path, files, fmt)
    source = _hub_documents(path, text_field) if fmt == "hub" else (
        doc for f in files for doc in _FILE_READERS[fmt](f, text_field))
    count, seen_field = 0, fmt in ("text", "hub")
    for doc in source:
        if doc is _NO_FIELD:
            continue
        seen_field = True
        if doc is not None and doc.strip():
            count += 1
            yield doc
    if not seen_field:
        raise JaxfoundError(f"data.path={path}: no '{text_field}' field in any record; set data.text_field")
    if not count:
        raise JaxfoundError(f"data.path={path}: no non-empty documents"
                            + ("" if fmt == "text" else f" in field '{text_field}'"))


def read_documents(path: str, fmt: str = "auto", text_field: str = "text") -> list[str]:
    """All documents of a file, directory or glob, or a hub dataset name (see iter_documents), as a list."""
    return list(iter_documents(path, fmt, text_field))


def _text_documents(f: str, text_field: str = "text") -> Iterator[str]:
    """Paragraphs of a UTF-8 text file, read CHUNK_CHARS at a time; equal to splitting the whole text."""
    try:
        with open(f, encoding="utf-8", newline=None) as fh:
            carry = ""
            while chunk := fh.read(CHUNK_CHARS):
                pieces = (carry + chunk + fh.readline()).split(PARAGRAPH_BREAK)
                carry = pieces.pop()
                yield from (p for p in pieces if p)
            if carry:
                yield carry
    except UnicodeDecodeError as e:
        raise JaxfoundError(f"{f}: not UTF-8 ({e.reason} near character {e.start} of a read); convert the file to "
                            "UTF-8") from None
    except OSError as e:
        raise JaxfoundError(f"{f}: cannot read ({e.strerror or e})") from None


def _jsonl_documents(f: str, text_field: str) -> Iterator[str | None]:
    """text_field of each JSON object (one per line, or one JSON array); every problem names the file and line."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(4096).lstrip()
            if head.startswith(b"["):  # one JSON array: not streamable, read whole
                fh.seek(0)
                whole = _json_array(f, fh.read())
                if whole is not None:
                    for n, row in enumerate(whole, 1):
                        yield _field(row, f"{f}: item {n}", text_field)
                    return
            fh.seek(0)
            offset = 0
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise JaxfoundError(f"{f}: not UTF-8 (byte offset {offset + e.start}); convert the file to "
                                        "UTF-8") from None
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JaxfoundError(f"{f}:{n}: not JSON ({e.msg}); expected one object per line") from None
                yield _field(row, f"{f}:{n}", text_field)
    except OSError as e:
        raise JaxfoundError(f"{f}: cannot read ({e.strerror or e})") from None


def _json_array(f: str, data: bytes):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JaxfoundError(f"{f}: not UTF-8 (byte offset {e.start}); convert the file to UTF-8") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return None  # not one array after all: read it as lines
    return whole if isinstance(whole, list) else None


_NO_FIELD = object()  # a record without the field: skipped, and does not count as having it


def _field(row, where: str, text_field: str):
    """The record's text (_NO_FIELD when it lacks the field, None when the field holds no string)."""
    if not isinstance(row, dict):
        raise JaxfoundError(f"{where}: expected a JSON object with a '{text_field}' field, got {row!r:.60}")
    if text_field not in row:
        return _NO_FIELD
    value = row[text_field]
    return value if isinstance(value, str) else None


def _parquet_documents(f: str, text_field: str) -> Iterator[str | None]:
    """text_field of a parquet file, a row group batch at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise JaxfoundError(f"{f}: no '{text_field}' field (columns: {pf.schema_arrow.names}); set "
                                "data.text_field")
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            yield from (t if isinstance(t, str) else None for t in batch.column(0).to_pylist())
    except JaxfoundError:
        raise
    except Exception as e:  # pyarrow raises many types; the user needs the file and the reason
        raise JaxfoundError(f"{f}: could not read it as parquet ({type(e).__name__}: {e})") from None


_FILE_READERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}


def _hub_documents(name: str, text_field: str) -> Iterator[str | None]:
    """A `datasets` hub dataset's train split (needs the network or a local `datasets` cache)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        raise JaxfoundError(f"data.path={name}: could not read it as a hub dataset ({type(e).__name__}: {e})") \
            from None
    if text_field not in ds.column_names:
        raise JaxfoundError(f"data.path={name}: no '{text_field}' field (columns: {ds.column_names}); set "
                            "data.text_field")
    for batch in ds.iter(batch_size=4096):
        yield from (t if isinstance(t, str) else None for t in batch[text_field])
