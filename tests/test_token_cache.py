"""The on-disk token cache and streamed corpora: built once and reused, invalidated by content or tokenizer, equal to
tokenizing directly, read a batch of rows at a time by each process; directories and globs read as their files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxfound.data import corpus as corpus_module
from jaxfound.data import token_cache
from jaxfound.data.corpus import read_documents
from jaxfound.data.pipeline import (
    ExampleStream,
    PackedCorpus,
    StreamSpec,
    local_batch,
    pack_documents,
    packed_fingerprint,
)
from jaxfound.data.synthetic import synthetic_corpus
from jaxfound.data.token_cache import ShardFile, cached_corpus, encoding_for, storage_dtype
from jaxfound.data.tokenizer import train_tokenizer
from jaxfound.errors import JaxfoundError


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Three text files of synthetic documents (blank-line separated), one with Windows line ends."""
    root = tmp_path_factory.mktemp("corpus")
    docs = synthetic_corpus(90, seed=1)
    for i in range(3):
        text = "\n\n".join(docs[30 * i:30 * (i + 1)]) + "\n"
        (root / f"part{i}.txt").write_bytes(text.replace("\n", "\r\n" if i == 1 else "\n").encode())
    return root


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, corpus_dir):
    docs = read_documents(str(corpus_dir))
    root = tmp_path_factory.mktemp("tok")
    return {arch: train_tokenizer(docs, arch, 300, str(root / arch)) for arch in ("bert", "gpt")}


def _count_chunks(monkeypatch) -> list:
    calls = []
    encode = token_cache._encode_chunk
    monkeypatch.setattr(token_cache, "_encode_chunk", lambda *a: calls.append(a[0]) or encode(*a))
    return calls


def test_second_run_reuses_the_cache_without_tokenizing(tmp_path, corpus_dir, tokenizers, monkeypatch):
    calls = _count_chunks(monkeypatch)
    encoding = encoding_for(tokenizers["bert"], encoder=True)
    first = cached_corpus(str(corpus_dir), "auto", "text", encoding, tmp_path, workers=1)
    assert calls == [0]
    again = cached_corpus(str(corpus_dir), "auto", "text", encoding, tmp_path, workers=1)
    assert calls == [0] and again.digest == first.digest
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
    assert isinstance(again.shards[0], ShardFile) and isinstance(again.doc_offsets, np.memmap)  # nothing read whole
    whole = np.load(again.shards[0].path, allow_pickle=False)
    assert np.array_equal(again.shards[0][0:len(whole)], whole) and np.array_equal(again.shards[0][5:9], whole[5:9])
    assert len(again.shards[0][len(whole) - 2:len(whole) + 5]) == 2 and len(again.shards[0][7:3]) == 0


def test_changed_corpus_or_tokenizer_makes_a_new_entry(tmp_path, corpus_dir, tokenizers, monkeypatch):
    calls = _count_chunks(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    for f in corpus_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    bert = encoding_for(tokenizers["bert"], encoder=True)
    cache = tmp_path / "cache"
    base = cached_corpus(str(data), "auto", "text", bert, cache, workers=1)
    (data / "part2.txt").write_text((data / "part2.txt").read_text() + "\nOne more paragraph here.\n")
    grown = cached_corpus(str(data), "auto", "text", bert, cache, workers=1)
    assert grown.num_docs == base.num_docs + 1 and len(calls) == 2
    gpt = cached_corpus(str(data), "auto", "text", encoding_for(tokenizers["gpt"], encoder=False), cache, workers=1)
    assert len(calls) == 3 and gpt.digest != grown.digest
    os.utime(data / "part0.txt", ns=(1, 1))  # a new mtime, the same bytes: rehashed, and the entry is reused
    assert cached_corpus(str(data), "auto", "text", bert, cache, workers=1).digest == grown.digest
    assert len(calls) == 3
    memo = json.loads((cache / "files.json").read_text())
    assert memo[str((data / "part0.txt").resolve())]["mtime_ns"] == 1


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_rows_read_through_the_index_equal_tokenizing_directly(tmp_path, corpus_dir, tokenizers, arch, monkeypatch):
    """Two worker processes and small chunks (several shards): document d and every packed row equal transformers'
    own tokenization of the corpus, packed in memory."""
    monkeypatch.setattr(token_cache, "CHUNK_CHARS", 2000)
    tok = tokenizers[arch]
    cached = cached_corpus(str(corpus_dir / "*.txt"), "auto", "text", encoding_for(tok, arch == "bert"), tmp_path,
                           workers=2)
    assert len(cached.shards) > 2
    docs = read_documents(str(corpus_dir))
    direct = tok(docs, add_special_tokens=arch == "bert")["input_ids"]
    direct = direct if arch == "bert" else [t + [tok.eos_token_id] for t in direct]
    assert cached.num_docs == len(docs)
    for d in range(len(docs)):
        assert cached.span(int(cached.doc_offsets[d]), int(cached.doc_offsets[d + 1])).tolist() == direct[d]
    rows = PackedCorpus(cached, 16, first_doc=2)
    reference = pack_documents(direct[2:], 16)
    np.testing.assert_array_equal(rows.ids_NxL, reference.ids_NxL)
    np.testing.assert_array_equal(rows.segment_ids_NxL, reference.segment_ids_NxL)
    in_memory = PackedCorpus(token_cache.in_memory_corpus(direct, storage_dtype(len(tok))), 16, first_doc=2)
    assert packed_fingerprint(rows) == packed_fingerprint(in_memory)  # cached or not: the same run data


def test_two_processes_read_disjoint_rows_that_cover_the_epoch(tmp_path, corpus_dir, tokenizers, monkeypatch):
    tok = tokenizers["bert"]
    cached = cached_corpus(str(corpus_dir), "auto", "text", encoding_for(tok, True), tmp_path, workers=1)
    spec = StreamSpec("mlm", 3, 0.15, tok.mask_token_id, tuple(tok.all_special_ids), len(tok))
    stream = ExampleStream(PackedCorpus(cached, 16), spec)
    batch, steps = 4, stream.num_rows // 4
    read = {0: [], 1: []}
    rows = PackedCorpus.rows
    for p in (0, 1):
        monkeypatch.setattr(PackedCorpus, "rows", lambda self, index, p=p: read[p].extend(index) or rows(self, index))
        for step in range(steps):
            local_batch(stream, step, batch, p, 2)
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == sorted(stream.row_of(np.arange(steps * batch)).tolist())
    assert len(set(read[0]) | set(read[1])) == steps * batch  # a whole epoch's rows, each once


def test_a_directory_or_glob_reads_as_the_concatenation_of_its_files(corpus_dir, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 7)  # paragraphs cut across many reads
    files = sorted(corpus_dir.glob("*.txt"))
    whole = [doc for f in files for doc in f.read_text().split("\n\n") if doc.strip()]  # universal newlines
    assert read_documents(str(corpus_dir)) == whole
    assert read_documents(str(corpus_dir / "part*.txt")) == whole
    assert read_documents(str(files[1])) == [d for d in files[1].read_text().split("\n\n") if d.strip()]


def test_glob_and_file_errors_name_the_pattern_and_the_file(tmp_path):
    with pytest.raises(JaxfoundError, match=r"no files match the pattern '.*nothing\*\.txt'"):
        read_documents(str(tmp_path / "nothing*.txt"))
    (tmp_path / "a.txt").write_text("fine\n\nfine too\n")
    (tmp_path / "b.txt").write_bytes(b"good start\n\n\xff\xfe broken")
    with pytest.raises(JaxfoundError, match=r"b\.txt: not UTF-8"):
        read_documents(str(tmp_path / "*.txt"))
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(JaxfoundError, match=r"c\.parquet: could not read it as parquet"):
        read_documents(str(tmp_path / "c.parquet"))


def test_truncation_and_padding_saved_in_a_tokenizer_json_are_not_applied(tmp_path, corpus_dir, tokenizers):
    """Some shipped tokenizer.json files (all-MiniLM-L6-v2's) fix truncation and padding at 128; transformers' calls
    ignore them, and so does the cache."""
    from transformers import AutoTokenizer

    tokenizers["bert"].save_pretrained(tmp_path / "tok")
    state = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    state["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    state["padding"] = {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                        "pad_type_id": 0, "pad_token": "[PAD]"}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(state))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    cached = cached_corpus(str(corpus_dir / "part0.txt"), "auto", "text", encoding_for(tok, True), tmp_path / "c",
                           workers=1)
    docs = read_documents(str(corpus_dir / "part0.txt"))
    direct = tok(docs)["input_ids"]
    assert max(map(len, direct)) > 8
    assert [cached.span(int(a), int(b)).tolist() for a, b in zip(cached.doc_offsets, cached.doc_offsets[1:])] == direct
