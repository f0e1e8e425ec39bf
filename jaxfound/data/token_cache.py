"""A tokenized corpus: every document's tokens end to end, with an index of where each document starts.

On disk (data.cache_dir) it is tokenized once, by worker processes, into fixed-width numpy shards that later runs
read by position (ShardFile; the document index is a memory map):

    cache_dir/files.json                   path -> (size, mtime_ns, content blake2b): the fast path of the key
    cache_dir/<key>/manifest.json          tokenizer, corpus digest, dtype, counts, shard sizes, token digest
    cache_dir/<key>/tokens-00000.npy ...   token ids (uint16 when the vocabulary fits, else int32), shard by shard
    cache_dir/<key>/doc_offsets.npy        int64[num_docs + 1]: document d is tokens [offsets[d], offsets[d + 1])

Why fixed-width .npy and not ArrayRecord: pretraining rows are fixed-width windows of one token stream, so row r
is a byte offset away, read without decoding; the seq_len is chosen at training time, not baked into records; the
page cache is shared by every process on a host; and numpy reads the files without pickle. Opening a cache reads
the manifest and the shards' headers only, so start-up does not grow with the corpus.

The key is a hash of the corpus content (the files' bytes, in corpus order; paths do not count), the reader
settings and the tokenizer (its tokenizer.json and whether specials / eos are added). Hashing a file reads it; its
(size, mtime_ns) are remembered in files.json, and a file whose path, size and mtime are unchanged keeps its
recorded hash without being read again (a same-size edit within one mtime tick would go unseen).
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from jaxfound.data.corpus import corpus_files, corpus_format, iter_documents
from jaxfound.errors import JaxfoundError

CACHE_VERSION = 1
CHUNK_CHARS = 8 << 20  # characters of text per worker task (and per shard)


def storage_dtype(vocab_size: int) -> np.dtype:
    """Token ids on disk: two bytes when the vocabulary fits."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


@dataclass(frozen=True)
class Encoding:
    """How documents become tokens: a tokenizers JSON, specials added (encoders) or eos appended (decoders)."""

    tokenizer_json: str
    add_special_tokens: bool
    eos_id: int | None  # appended to every document when set
    vocab_size: int  # the tokenizer's length: picks the storage dtype

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.vocab_size)

    def digest(self) -> str:
        h = hashlib.blake2b(self.tokenizer_json.encode(), digest_size=16)
        h.update(json.dumps([self.add_special_tokens, self.eos_id, self.vocab_size]).encode())
        return h.hexdigest()


def encoding_for(tokenizer, encoder: bool) -> Encoding:
    """The Encoding of a transformers fast tokenizer: encoders get [CLS] ... [SEP], decoders ... eos."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise JaxfoundError(f"data.cache_dir needs a fast (tokenizers-backed) tokenizer, got "
                            f"{type(tokenizer).__name__}")
    state = json.loads(backend.to_str())
    state["truncation"] = state["padding"] = None  # a tokenizer.json may carry them; transformers' calls ignore them
    return Encoding(json.dumps(state), encoder, None if encoder else int(tokenizer.eos_token_id), len(tokenizer))


@dataclass(frozen=True)
class ShardFile:
    """One token shard (.npy) on disk, read by position: a slice is one read of its bytes, not a memory map.

    A memory map's pages count in the process's resident memory once touched, and this kernel maps the page cache
    in large folios (touching two tokens of a 4.6 MB shard mapped 3 MB of it): training from the 1 GB benchmark
    corpus, whose rows are 128 tokens at random places, grew by ~6 MB a step (benchmarks/data_pipeline.py)."""

    path: str
    dtype: np.dtype
    offset: int  # bytes before the first token (the .npy header)
    length: int

    @classmethod
    def open(cls, path: Path) -> ShardFile:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # parses the header; the map is dropped
        if header.ndim != 1:
            raise JaxfoundError(f"{path}: a token shard is 1-D, this array has shape {header.shape}; rebuild the "
                                "cache (delete its entry directory)")
        return cls(str(path), header.dtype, int(header.offset), len(header))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.length)
        if step != 1:
            raise IndexError(f"{self.path}: a shard is read in contiguous slices, not with step {step}")
        with open(self.path, "rb") as f:
            return np.fromfile(f, self.dtype, max(0, stop - start), offset=self.offset + start * self.dtype.itemsize)


@dataclass(frozen=True)
class TokenCorpus:
    """Documents' tokens end to end in one or more shards, and where each document starts (doc_offsets)."""

    shards: tuple  # 1-D arrays or ShardFiles (what sliced gives arrays), in order
    doc_offsets: np.ndarray  # int64[num_docs + 1]
    digest: str  # blake2b of the tokens and the offsets: what the data fingerprint of a run builds on

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def span(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (a view when they lie in one shard)."""
        ends = self.shard_ends
        first = int(np.searchsorted(ends, start, side="right"))
        parts, at = [], start
        for s in range(first, len(self.shards)):
            if at >= stop:
                break
            base = int(ends[s - 1]) if s else 0
            parts.append(self.shards[s][at - base:min(stop, int(ends[s])) - base])
            at = min(stop, int(ends[s]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int32)

    @functools.cached_property
    def shard_ends(self) -> np.ndarray:
        return np.cumsum([len(s) for s in self.shards])


def token_digest(shards: Iterable[np.ndarray], doc_offsets: np.ndarray, dtype: np.dtype) -> str:
    """blake2b of the token stream (dtype and values; not where the shards cut it) and the document offsets."""
    h = hashlib.blake2b(np.dtype(dtype).str.encode(), digest_size=16)
    for s in shards:
        h.update(np.ascontiguousarray(s, dtype).view(np.uint8))
    h.update(np.ascontiguousarray(doc_offsets, np.int64).view(np.uint8))
    return h.hexdigest()


def encode_documents(tokenizer, docs: list[str], encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of docs end to end (encoding's dtype) and each document's length; tokenizer: a `tokenizers.Tokenizer`."""
    encoded = tokenizer.encode_batch_fast(docs, add_special_tokens=encoding.add_special_tokens)
    extra = encoding.eos_id is not None
    lengths = np.fromiter((len(e) + extra for e in encoded), np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), encoding.dtype)
    ends = np.cumsum(lengths)
    for e, end, n in zip(encoded, ends, lengths):
        tokens[end - n:end - extra] = e.ids
    if extra:
        tokens[ends - 1] = encoding.eos_id
    return tokens, lengths


def in_memory_corpus(token_lists: list[list[int]], dtype=np.int32) -> TokenCorpus:
    """A TokenCorpus of already-tokenized documents."""
    lengths = np.array([len(t) for t in token_lists], np.int64)
    tokens = np.fromiter((i for t in token_lists for i in t), dtype, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenCorpus((tokens,), offsets, token_digest([tokens], offsets, dtype))


# ---------------------------------------------------------------- the key

def file_digest(path: str, memo: dict) -> str:
    """blake2b of a file's bytes; memo (path -> size, mtime_ns, digest) skips files whose stat is unchanged."""
    try:
        st = os.stat(path)
        seen = memo.get(os.path.abspath(path))
        if seen and seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
            return seen["blake2b"]
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    except OSError as e:
        raise JaxfoundError(f"{path}: cannot read ({e.strerror or e})") from None
    memo[os.path.abspath(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": h.hexdigest()}
    return h.hexdigest()


def cache_key(path: str, fmt: str, text_field: str, encoding: Encoding, cache_dir: Path) -> str:
    """The cache entry of (corpus content, reader settings, tokenizer); updates cache_dir/files.json."""
    files = corpus_files(path)
    fmt = corpus_format(path, files, fmt)
    memo_file = cache_dir / "files.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    if fmt == "hub":
        content = [f"hub:{path}"]  # the hub dataset's name and split; datasets caches its own download
    else:
        content = [file_digest(f, memo) for f in files]
        _write_json(memo_file, memo)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([CACHE_VERSION, content, fmt, text_field if fmt != "text" else None,
                         encoding.digest()]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- open / build

def open_cache(entry: Path) -> TokenCorpus:
    """A built cache entry: its shards read by position, its document offsets as a memory map (reads the manifest
    and the shards' headers only)."""
    manifest = json.loads((entry / "manifest.json").read_text())
    shards = tuple(ShardFile.open(entry / s["file"]) for s in manifest["shards"])
    offsets = np.load(entry / "doc_offsets.npy", mmap_mode="r", allow_pickle=False)
    return TokenCorpus(shards, offsets, manifest["tokens_blake2b"])


def cached_corpus(path: str, fmt: str, text_field: str, encoding: Encoding, cache_dir: str | Path,
                  workers: int = 0, build: bool = True) -> TokenCorpus:
    """The corpus's tokens from cache_dir, tokenized there first if no entry has its key (build=False: must exist).

    workers: tokenizing processes (0: one per CPU; 1: this process).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / cache_key(path, fmt, text_field, encoding, cache_dir)
    if not (entry / "manifest.json").exists():
        if not build:
            raise JaxfoundError(f"data.cache_dir={cache_dir}: no entry {entry.name} for data.path={path} (process 0 "
                                "builds it; is cache_dir on storage every process shares?)")
        build_cache(iter_documents(path, fmt, text_field), encoding, entry, workers, _total_bytes(path))
    return open_cache(entry)


def build_cache(docs: Iterator[str], encoding: Encoding, entry: Path, workers: int = 0,
                total_bytes: int | None = None) -> None:
    """Tokenize docs into entry: shards written by worker processes, then the offsets and the manifest; the entry
    appears (is renamed into place) only when complete."""
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing into {entry.parent.name}/"
               f"{entry.name[:8]}", dynamic_ncols=True)
    shard_sizes, doc_lengths = [], []
    try:
        for index, (n_tokens, chars) in enumerate(_encode_all(_chunks(docs), encoding, tmp, workers)):
            shard_sizes.append(n_tokens)
            doc_lengths.append(np.load(tmp / f"lengths-{index:05d}.npy"))
            bar.update(chars)
    finally:
        bar.close()
    lengths = np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(tmp / "doc_offsets.npy", offsets)
    shards = [{"file": f"tokens-{i:05d}.npy", "tokens": n} for i, n in enumerate(shard_sizes)]
    for i in range(len(shards)):
        (tmp / f"lengths-{i:05d}.npy").unlink()
    digest = token_digest((np.load(tmp / s["file"], mmap_mode="r") for s in shards), offsets, encoding.dtype)
    _write_json(tmp / "manifest.json", {
        "version": CACHE_VERSION, "tokenizer": encoding.digest(), "dtype": encoding.dtype.str,
        "add_special_tokens": encoding.add_special_tokens, "eos_id": encoding.eos_id,
        "num_docs": len(lengths), "num_tokens": int(offsets[-1]), "shards": shards, "tokens_blake2b": digest})
    try:
        tmp.rename(entry)
    except OSError:  # another process finished the same entry first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for d in docs:
        chunk.append(d)
        chars += len(d)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_all(chunks: Iterator[list[str]], encoding: Encoding, out: Path,
                workers: int) -> Iterator[tuple[int, int]]:
    """(tokens, characters) of each chunk in order, its shard written to out; at most 2 chunks per worker in flight
    (the corpus is never held whole)."""
    if workers == 1:
        _init_worker(encoding)
        for index, chunk in enumerate(chunks):
            yield _encode_chunk(index, chunk, str(out))
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax's threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(encoding, True)) as pool:
        pending = deque()
        for index, chunk in enumerate(chunks):
            pending.append(pool.apply_async(_encode_chunk, (index, chunk, str(out))))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_WORKER = {}


def _init_worker(encoding: Encoding, one_thread: bool = False) -> None:
    if one_thread:  # one process per core already
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"], _WORKER["encoding"] = Tokenizer.from_str(encoding.tokenizer_json), encoding


def _encode_chunk(index: int, docs: list[str], out: str) -> tuple[int, int]:
    tokens, lengths = encode_documents(_WORKER["tokenizer"], docs, _WORKER["encoding"])
    np.save(Path(out) / f"tokens-{index:05d}.npy", tokens)
    np.save(Path(out) / f"lengths-{index:05d}.npy", lengths)
    return len(tokens), sum(len(d) for d in docs)


def _total_bytes(path: str) -> int | None:
    files = corpus_files(path)
    return sum(os.path.getsize(f) for f in files) if files else None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
