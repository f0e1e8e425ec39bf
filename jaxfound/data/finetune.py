"""Fine-tuning data: word -> subword alignment, overlapping windows, length-bucketed batches, cls examples.

Everything is tokenized once up front (one batched call of a fast tokenizer); batches are numpy.
The batch of step s is a pure function of (seed, s): epoch = s // steps_per_epoch, and within an epoch
examples are shuffled by (seed, epoch), sorted by length inside large chunks, cut into batches, and
the batches shuffled again. Each batch is padded to the smallest of a few bucket lengths (multiples of
``pad_to``, at most ``max_buckets`` of them, chosen to waste the least padding on this data), so the
jitted step compiles only a handful of times.
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxfound.data.tokenizer import pretokenized_words
from jaxfound.errors import JaxfoundError

IGNORE = -100
CHUNK_BATCHES = 50  # sort by length within chunks of this many batches (as transformers' LengthGroupedSampler)
PAD_TO = 4  # padded lengths are multiples of this
MAX_BUCKETS = 12  # at most this many padded lengths (compilations of the train step)
SHAPE_COST = 20_000  # tokens: one more compile of a train step (~10 s for a small BERT on 2 CPU cores) must save more


# ---------------------------------------------------------------- token classification


@dataclass
class Windows:
    """Tokenized examples: one row per window of a sentence (most sentences are one window)."""

    input_ids: list[np.ndarray]  # int32 (n,), with [CLS] ... [SEP]
    labels: list[np.ndarray]  # int32 (n,): label id on each word's first subword, -100 elsewhere
    word_index: list[np.ndarray]  # int32 (n,): the word a first subword starts, -1 elsewhere
    owns: list[np.ndarray]  # bool (n,): this window is where that word's prediction comes from
    sentence: np.ndarray  # int64 (windows,): the sentence of each window
    num_words: np.ndarray  # int64 (sentences,)
    num_split: int  # sentences longer than seq_len, split into several windows
    num_cut_words: int  # single words longer than a whole window, cut to the window (first subword kept)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)


def special_ids(tokenizer) -> tuple[int, int, int]:
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cls_id is None or sep_id is None:
        raise JaxfoundError("the tokenizer has no [CLS]/[SEP] (or bos/eos) tokens; fine-tuning needs them")
    return cls_id, sep_id, pad_id


def plan_windows(word_sub_starts: np.ndarray, num_subwords: int, width: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges [w0, w1) covering a sentence in windows of <= width subwords that start every <= stride subwords.

    word_sub_starts: first-subword offset of each word, plus num_subwords at the end.
    """
    num_words = len(word_sub_starts) - 1
    out, w0 = [], 0
    while True:
        start = word_sub_starts[w0]
        w1 = int(np.searchsorted(word_sub_starts, start + width, side="right")) - 1  # last word ending within width
        w1 = max(w1, w0 + 1)  # a word longer than the window still gets its own window (cut)
        w1 = min(w1, num_words)
        out.append((w0, w1))
        if w1 >= num_words:
            return out
        nxt = int(np.searchsorted(word_sub_starts, start + stride, side="right")) - 1
        w0 = min(max(nxt, w0 + 1), w1)  # progress, and no word is skipped


def encode_words(sentences_words, sentence_label_ids, tokenizer, seq_len: int, stride: int | None = None) -> Windows:
    """Align word labels to subwords (label on the first subword) and split long sentences into windows.

    sentence_label_ids: per sentence, an int array of word label ids (or None at prediction time).
    stride: subwords between window starts (default: half a window, so windows overlap by half).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise JaxfoundError("word alignment needs a fast (Rust) tokenizer with word_ids(); "
                            "save the tokenizer with tokenizer.json")
    cls_id, sep_id, _ = special_ids(tokenizer)
    width = seq_len - 2
    stride = stride or max(1, width // 2)
    enc = tokenizer(pretokenized_words(tokenizer, sentences_words), is_split_into_words=True,
                    add_special_tokens=False)
    out = Windows([], [], [], [], np.zeros(0, np.int64), np.array([len(w) for w in sentences_words], np.int64), 0, 0)
    sent_of = []
    for i, words in enumerate(sentences_words):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int32)
        word_ids = np.array([-1 if w is None else w for w in enc.word_ids(i)], dtype=np.int64)
        n_words = len(words)
        # words the tokenizer drops entirely (e.g. a lone control char) map to [UNK] so every word is predicted
        present = np.zeros(n_words, bool)
        present[word_ids[word_ids >= 0]] = True
        if not present.all():
            unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else sep_id
            keep_ids, keep_words = [], []
            for w in range(n_words):
                sel = word_ids == w
                keep_ids.append(ids[sel] if sel.any() else np.array([unk], np.int32))
                keep_words.append(np.full(max(int(sel.sum()), 1), w))
            ids, word_ids = np.concatenate(keep_ids).astype(np.int32), np.concatenate(keep_words)
        first = np.r_[True, word_ids[1:] != word_ids[:-1]]
        starts = np.r_[np.flatnonzero(first), len(ids)]
        labels_w = sentence_label_ids[i] if sentence_label_ids is not None else None
        plan = plan_windows(starts, len(ids), width, stride)
        out.num_split += len(plan) > 1
        for k, (w0, w1) in enumerate(plan):
            s0, s1 = starts[w0], starts[w1]
            if s1 - s0 > width:  # one word longer than the window: keep its first subwords
                s1 = s0 + width
                out.num_cut_words += 1
            seg_words = word_ids[s0:s1]
            seg_first = first[s0:s1]
            widx = np.where(seg_first, seg_words, -1)
            # a word is owned by the window where it has the most context on its nearer side
            owns = seg_first.copy() if len(plan) == 1 else np.zeros(s1 - s0, bool)
            for p in np.flatnonzero(seg_first) if len(plan) > 1 else ():
                w = seg_words[p]
                best = max(range(len(plan)), key=lambda j: _context(starts, plan[j], w, width))
                owns[p] = best == k
            lab = np.full(s1 - s0, IGNORE, np.int32)
            if labels_w is not None:
                lab[seg_first] = labels_w[seg_words[seg_first]]
            pad = lambda a, v: np.r_[np.array([v], a.dtype), a, np.array([v], a.dtype)]  # noqa: E731
            out.input_ids.append(np.r_[np.int32(cls_id), ids[s0:s1], np.int32(sep_id)].astype(np.int32))
            out.labels.append(pad(lab, IGNORE))
            out.word_index.append(pad(widx.astype(np.int32), -1))
            out.owns.append(pad(owns, False))
            sent_of.append(i)
    out.sentence = np.array(sent_of, dtype=np.int64)
    return out


def _context(starts, window, w, width) -> int:
    """Subwords of context word w has inside window on its poorer side (-1 if not inside)."""
    w0, w1 = window
    if not w0 <= w < w1:
        return -1
    left = starts[w] - starts[w0]
    right = min(starts[w1], starts[w0] + width) - starts[w + 1]
    return int(min(left, right))


def merge_windows(windows: Windows, pred_per_window: list[np.ndarray]) -> list[np.ndarray]:
    """Per-position predictions of each window -> one prediction per word of each sentence."""
    out = [np.full(int(n), -1, np.int64) for n in windows.num_words]
    for k, pred in enumerate(pred_per_window):
        sel = windows.owns[k]
        out[windows.sentence[k]][windows.word_index[k][sel]] = np.asarray(pred)[: len(sel)][sel]
    return out


# ---------------------------------------------------------------- sequence classification


def read_text(path: Path, expected: str) -> str:
    """A UTF-8 file's text; a missing file or bad bytes name the file (and line) and what was expected."""
    if not path.is_file():
        raise JaxfoundError(f"{path}: file not found (expected {expected})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise JaxfoundError(f"{path}:{line}: not UTF-8 (expected {expected})") from None


def read_json_lines(path: Path, expected: str, text: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON lines file; JSON only, never anything that unpickles.
    expected: what a line should be, named in every error."""
    text = read_text(path, expected) if text is None else text
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxfoundError(f"{path}:{lineno}: invalid JSON ({e.msg}); expected one object per line: "
                                f"{expected}") from None
        if not isinstance(row, dict):
            raise JaxfoundError(f"{path}:{lineno}: expected a JSON object per line ({expected}), "
                                f"got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def read_table(path: str | Path, text_column: str, label_column: str | None) -> tuple[list[str], list[str] | None]:
    """Texts (and labels) from a CSV (header row) or JSON lines file."""
    path = Path(path)
    text = read_text(path, "CSV with a header row, or JSON lines")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        rows = read_json_lines(path, "JSON lines of objects with text and label fields", text)
    else:
        reader = csv.DictReader(text.splitlines())
        rows = [(i + 2, r) for i, r in enumerate(reader)]
    texts, labels = [], []
    for lineno, row in rows:
        for col in (text_column, label_column):
            if col is not None and row.get(col) is None:
                raise JaxfoundError(f"{path}:{lineno}: no column '{col}' (columns: {', '.join(map(str, row))}); "
                                    "set data.text_column / data.label_column")
        texts.append(str(row[text_column]))
        if label_column is not None:
            labels.append(str(row[label_column]))
    if not texts:
        raise JaxfoundError(f"{path}: no rows")
    return texts, (labels if label_column is not None else None)


def encode_texts(texts: list[str], label_ids, tokenizer, seq_len: int) -> tuple[Windows, int]:
    """Sequence classification examples (as one-window 'sentences'); returns (examples, number truncated)."""
    enc = tokenizer(list(texts), truncation=False, add_special_tokens=True)
    out = Windows([], [], [], [], np.arange(len(texts)), np.ones(len(texts), np.int64), 0, 0)
    truncated = 0
    _, sep_id, _ = special_ids(tokenizer)
    for i, ids in enumerate(enc["input_ids"]):
        ids = np.asarray(ids, np.int32)
        if len(ids) > seq_len:
            ids = np.r_[ids[: seq_len - 1], np.int32(sep_id)].astype(np.int32)
            truncated += 1
        out.input_ids.append(ids)
        out.labels.append(np.array([label_ids[i] if label_ids is not None else IGNORE], np.int32))
        out.word_index.append(np.zeros(1, np.int32))
        out.owns.append(np.ones(1, bool))
    return out, truncated


# ---------------------------------------------------------------- batches


def pack_plan(lengths, seq_len: int) -> list[list[int]]:
    """Example indices per row, by best-fit decreasing: longest first (ties by index), each into the row with
    the least room that still fits it, else a new row. Deterministic."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > seq_len:
        i = int(np.argmax(lengths))
        raise JaxfoundError(f"example {i} has {lengths[i]} tokens, more than seq_len={seq_len}; "
                            "read the data with the same seq_len")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if free - n > 0:
            bisect.insort(room, (free - n, r))
    return rows


class PackedBatches:
    """Token-level training batches of whole rows: several windows per row (pack_plan, fixed), segment ids and
    positions reset per window, batches shuffled per epoch; batch(s) a pure function of (seed, s). Almost no
    padding, one or two compiled shapes.

    short_len (< seq_len, or 0): windows that fit go into rows of short_len tokens, the rest into rows of seq_len;
    a batch holds rows of one length, rows_per_batch * seq_len / short_len short rows (the same tokens). Attention
    costs each token its row's length, so for short sentences (CoNLL-2003: 99.7% of windows fit 64 tokens)
    shorter rows cut the attention's work about in half at no padding cost. choose_short_len picks it.
    """

    def __init__(self, windows: Windows, rows_per_batch: int, seed: int, seq_len: int, pad_id: int,
                 short_len: int = 0):
        self.windows, self.batch_size, self.seed, self.seq_len, self.pad_id = windows, rows_per_batch, seed, \
            seq_len, pad_id
        if short_len and (seq_len % short_len or short_len >= seq_len):
            raise ValueError(f"short_len={short_len} must divide seq_len={seq_len} and be smaller")
        lengths = np.asarray(windows.lengths)
        tiers = [(short_len, lengths <= short_len), (seq_len, lengths > short_len)] if short_len else \
            [(seq_len, np.ones(len(lengths), bool))]
        self.plan, self.row_len, self.tiers = [], [], []  # tiers: (row length, rows per batch, plan row indices)
        for L, member in tiers:
            index = np.flatnonzero(member)
            if not len(index):
                continue
            first = len(self.plan)
            self.plan += [[int(index[i]) for i in row] for row in pack_plan(lengths[index], L)]
            self.row_len += [L] * (len(self.plan) - first)
            self.tiers.append((L, rows_per_batch * (seq_len // L), np.arange(first, len(self.plan))))
        self.steps_per_epoch = max(1, sum(math.ceil(len(rows) / n) for _, n, rows in self.tiers))
        self.buckets = np.array(sorted(L for L, _, _ in self.tiers) or [seq_len])

    @property
    def padding(self) -> float:
        """Fraction of the packed rows' tokens that are padding."""
        return 1.0 - float(self.windows.lengths.sum()) / max(1, sum(self.row_len))

    @functools.lru_cache(maxsize=2)  # noqa: B019  (one or two epochs live at once)
    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """Each step's indices into the plan (one tier's rows; -1 fills a tier's last batch), in a shuffled order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for _, n, rows in self.tiers:
            order = rows[rng.permutation(len(rows))]
            steps = math.ceil(len(order) / n)
            batches += list(np.r_[order, np.full(steps * n - len(order), -1)].reshape(steps, n))
        if len(self.tiers) > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches or [np.full(self.batch_size, -1)]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        epoch, b = divmod(int(step), self.steps_per_epoch)
        rows = self.epoch_rows(epoch)[b]
        real = rows[rows >= 0]
        L = self.row_len[int(real[0])] if len(real) else self.seq_len
        n = len(rows) // process_count
        rows = rows[process_index * n:(process_index + 1) * n]
        w = self.windows
        ids = np.full((len(rows), L), self.pad_id, np.int32)
        labels = np.full((len(rows), L), IGNORE, np.int32)
        seg, pos = np.zeros((len(rows), L), np.int32), np.zeros((len(rows), L), np.int32)
        for j, r in enumerate(rows):
            start = 0
            for k, i in enumerate(self.plan[r] if r >= 0 else []):
                n_i = len(w.input_ids[i])
                ids[j, start:start + n_i], labels[j, start:start + n_i] = w.input_ids[i], w.labels[i]
                seg[j, start:start + n_i], pos[j, start:start + n_i] = k + 1, np.arange(n_i)
                start += n_i
        return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}

    def shapes(self, epochs: int) -> list[int]:
        return self.buckets.tolist()


def choose_short_len(lengths, seq_len: int, fit: float = 0.97) -> int:
    """The shortest row length seq_len / 2**k (>= 16) that holds >= fit of the windows' tokens, or 0 (one tier):
    the second tier of PackedBatches."""
    lengths = np.asarray(lengths)
    best, L = 0, seq_len // 2
    while L >= 16 and seq_len % L == 0 and lengths[lengths <= L].sum() >= fit * lengths.sum():
        best, L = L, L // 2
    return best


def bucket_length(n: int, buckets) -> int:
    """The smallest bucket length >= n."""
    i = int(np.searchsorted(buckets, n))
    if i == len(buckets):
        raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def choose_buckets(batch_max: np.ndarray, max_buckets: int, pad_to: int, seq_len: int, batch_size: int = 1,
                   shape_cost: float = 0.0, repeats: float = 1.0) -> np.ndarray:
    """Padded lengths (multiples of pad_to, at most max_buckets) minimising padded tokens + shape_cost per length.

    Every distinct length is one compilation of the jitted step, worth about shape_cost tokens of work;
    the batches' padded tokens count `repeats` times (epochs). An exact dynamic programme over the
    (few dozen) candidate lengths picks the set.
    """
    cand = np.unique(np.minimum(np.ceil(np.asarray(batch_max) / pad_to).astype(np.int64) * pad_to, seq_len))
    count = np.array([np.sum(np.minimum(np.ceil(batch_max / pad_to) * pad_to, seq_len) == c) for c in cand])
    n, k_max = len(cand), min(max_buckets, len(cand))
    cum = np.r_[0, np.cumsum(count)]
    cost = np.full((k_max + 1, n + 1), np.inf)
    cost[0, 0] = 0.0
    back = np.zeros((k_max + 1, n + 1), np.int64)
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):  # bucket cand[j-1] serves candidates i..j-1
            options = cost[k - 1, :j] + cand[j - 1] * (cum[j] - cum[:j])
            back[k, j] = int(np.argmin(options))
            cost[k, j] = options[back[k, j]]
    total = cost[:, n] * batch_size * repeats + shape_cost * np.arange(k_max + 1)
    k, j, out = int(np.argmin(total)), n, []
    while j > 0:
        out.append(int(cand[j - 1]))
        j, k = back[k, j], k - 1
    return np.array(sorted(out), np.int64)


def collate(windows: Windows, rows: np.ndarray, size: int, buckets, pad_id: int, token_level: bool) -> dict:
    """Rows (indices, -1 = filler) -> padded numpy batch of `size` rows; filler rows carry no labels."""
    real = [r for r in rows if r >= 0]
    L = bucket_length(max([len(windows.input_ids[r]) for r in real], default=2), buckets)
    ids = np.full((size, L), pad_id, np.int32)
    mask = np.zeros((size, L), np.int32)
    labels = np.full((size, L) if token_level else (size,), IGNORE, np.int32)
    mask[:, 0] = 1  # filler rows attend to one token, so attention never sees an all-masked row
    for j, r in enumerate(rows):
        if r < 0:
            continue
        n = len(windows.input_ids[r])
        ids[j, :n] = windows.input_ids[r]
        mask[j, :n] = 1
        if token_level:
            labels[j, :n] = windows.labels[r]
        else:
            labels[j] = windows.labels[r][0]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels}


class BucketedBatches:
    """Training batches over epochs; batch(s) is a pure function of (seed, s)."""

    def __init__(self, windows: Windows, batch_size: int, seed: int, seq_len: int, pad_id: int,
                 token_level: bool = True, bucketing: bool = True, pad_to: int = PAD_TO, max_buckets: int = MAX_BUCKETS,
                 epochs: int = 1):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.seq_len, self.pad_id, self.token_level = seq_len, pad_id, token_level
        self.bucketing = bucketing
        self.lengths = windows.lengths
        self.steps_per_epoch = max(1, math.ceil(len(windows) / batch_size))
        # the padded lengths: chosen on two epochs' batches; the longest window is in some batch of every epoch
        maxes = [self.lengths[r[r >= 0]].max() for e in range(2) for r in self.epoch_batches(e)]
        self.buckets = choose_buckets(np.array(maxes), max_buckets, pad_to, seq_len, batch_size, SHAPE_COST, epochs / 2)

    @functools.lru_cache(maxsize=2)  # noqa: B019  (one or two epochs live at once)
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches as arrays of row indices (-1 fills the last, short batch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.windows))
        B = self.batch_size
        if self.bucketing:
            chunk = B * CHUNK_BATCHES
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                    for c in np.split(order, range(chunk, len(order), chunk))])
        pad = self.steps_per_epoch * B - len(order)
        batches = np.r_[order, np.full(pad, -1)].reshape(self.steps_per_epoch, B)
        if self.bucketing:
            batches = batches[rng.permutation(self.steps_per_epoch)]
        return list(batches)

    def rows(self, step: int) -> np.ndarray:
        epoch, b = divmod(int(step), self.steps_per_epoch)
        return self.epoch_batches(epoch)[b]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's rows of the global batch of `step`; the padded length is the global batch's."""
        rows = self.rows(step)
        full = collate(self.windows, rows, self.batch_size, self.buckets, self.pad_id, self.token_level)
        b = self.batch_size // process_count
        return {k: v[process_index * b:(process_index + 1) * b] for k, v in full.items()}

    def shapes(self, epochs: int) -> list[int]:
        """Distinct padded lengths over the first epochs (each is one compilation of the train step)."""
        out = set()
        for e in range(epochs):
            for rows in self.epoch_batches(e):
                real = rows[rows >= 0]
                out.add(bucket_length(int(self.lengths[real].max()), self.buckets))
        return sorted(out)


def batch_iterator(batches: BucketedBatches, total_steps: int, process_index: int = 0, process_count: int = 1,
                   prefetch: int = 4):
    """A checkpointable grain iterator over steps (like data.pipeline.batch_iterator)."""
    import grain

    if batches.batch_size % process_count:
        raise JaxfoundError(f"train.batch_size={batches.batch_size} must be divisible by the {process_count} processes")
    ds = grain.MapDataset.range(max(total_steps, 1)).map(lambda s: batches.batch(int(s), process_index, process_count))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


def eval_batches(windows: Windows, batch_size: int, seq_len: int, pad_id: int, token_level: bool = True,
                 pad_to: int = PAD_TO, max_buckets: int = MAX_BUCKETS) -> list[tuple[np.ndarray, dict]]:
    """Fixed evaluation batches, length-sorted: [(row indices, batch)] covering every window once."""
    order = np.argsort(-windows.lengths, kind="stable")
    steps = max(1, math.ceil(len(order) / batch_size))
    order = np.r_[order, np.full(steps * batch_size - len(order), -1)].reshape(steps, batch_size)
    maxes = np.array([windows.lengths[r[r >= 0]].max() for r in order])
    buckets = choose_buckets(maxes, max_buckets, pad_to, seq_len, batch_size, SHAPE_COST / 4)
    return [(rows, collate(windows, rows, batch_size, buckets, pad_id, token_level)) for rows in order]
