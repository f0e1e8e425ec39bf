"""Read a text corpus as a list of documents: local text / JSON lines / parquet through `datasets`, or a hub name."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from jaxfound.errors import JaxfoundError

SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def _files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in SUFFIX_FORMATS)
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if p.exists() else [])
    return files


def read_documents(path: str, fmt: str = "auto", text_field: str = "text") -> list[str]:
    """Documents from a file, directory or glob (text: blank-line separated paragraphs), or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    files = _files(path)
    if not files and fmt not in ("auto", "hub"):
        raise JaxfoundError(f"data.path={path}: no such file or directory")
    try:
        if files:
            if fmt == "auto":
                fmts = {SUFFIX_FORMATS.get(Path(f).suffix, "text") for f in files}
                if len(fmts) > 1:
                    raise JaxfoundError(f"data.path={path}: mixed file formats {sorted(fmts)}; set data.format")
                fmt = fmts.pop()
            if fmt == "text":
                ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="paragraph")
                field = "text"
            elif fmt == "jsonl":  # parsed here: datasets' JSON loader segfaults on a line such as `null`
                return _read_jsonl(path, files, text_field)
            else:
                ds = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=files, split="train")
                field = text_field
        else:
            ds = datasets.load_dataset(path, split="train")  # a hub name (needs the network or a cache)
            field = text_field
    except JaxfoundError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        raise JaxfoundError(f"data.path={path}: could not read it as {fmt} ({type(e).__name__}: {e})") from None
    if field not in ds.column_names:
        raise JaxfoundError(f"data.path={path}: no '{field}' field (columns: {ds.column_names}); set data.text_field")
    docs = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise JaxfoundError(f"data.path={path}: no non-empty documents in field '{field}'")
    return docs


def _read_jsonl(path: str, files: list[str], text_field: str) -> list[str]:
    """JSON lines (or one JSON array) of objects; every problem names the file and line."""

    docs, seen_field = [], False
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise JaxfoundError(f"{f}: not UTF-8 (byte offset {e.start}); convert the file to UTF-8") from None
        except OSError as e:
            raise JaxfoundError(f"{f}: cannot read ({e.strerror})") from None
        try:
            whole = json.loads(text) if text.lstrip().startswith("[") else None
        except json.JSONDecodeError:
            whole = None
        rows = enumerate(whole, 1) if isinstance(whole, list) else (
            (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip())
        for n, row in rows:
            if isinstance(row, str) and whole is None:
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as e:
                    raise JaxfoundError(f"{f}:{n}: not JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                where = f"{f}:{n}" if whole is None else f"{f}: item {n}"
                raise JaxfoundError(f"{where}: expected a JSON object with a '{text_field}' field, got {row!r:.60}")
            seen_field |= text_field in row
            value = row.get(text_field)
            if isinstance(value, str) and value.strip():
                docs.append(value)
    if not seen_field:
        raise JaxfoundError(f"data.path={path}: no '{text_field}' field in any record; set data.text_field")
    if not docs:
        raise JaxfoundError(f"data.path={path}: no non-empty documents in field '{text_field}'")
    return docs
