"""Read a text corpus as a list of documents: local text / JSON lines / parquet through `datasets`, or a hub name."""

from __future__ import annotations

import glob
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
