"""Packed fine-tuning (data.packing): several sentences per row with segment ids and positions reset per sentence
give each sentence the logits it has alone; PackedBatches covers every window once per epoch, deterministically;
`jaxfound finetune data.packing=true` learns the toy NER task as the unpacked run does, with one compiled shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import ModelConfig, load_config
from jaxfound.data import finetune as ftdata
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_packed_row_gives_each_sentence_its_own_token_logits(arch):
    cfg = ModelConfig(arch=arch, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position=64, num_labels=5, type_vocab_size=1 if arch == "roberta" else 2)
    model = build_model(cfg, "token_cls")
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    sentences = [rng.integers(5, 97, n) for n in (7, 11, 4)]
    L = 32
    ids, seg, pos = np.full((1, L), 1, np.int32), np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
    start = 0
    for k, s in enumerate(sentences):
        ids[0, start:start + len(s)], seg[0, start:start + len(s)] = s, k + 1
        pos[0, start:start + len(s)] = np.arange(len(s))
        start += len(s)
    packed = np.asarray(model.apply({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg),
                                    positions=jnp.asarray(pos)))
    start = 0
    for s in sentences:
        alone = np.asarray(model.apply({"params": params}, jnp.asarray(s[None], jnp.int32),
                                       jnp.ones((1, len(s)), jnp.int32)))[0]
        np.testing.assert_allclose(packed[0, start:start + len(s)], alone, rtol=1e-5, atol=1e-5)
        start += len(s)


def _windows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = len(lengths)
    return ftdata.Windows(input_ids=[rng.integers(5, 90, k).astype(np.int32) for k in lengths],
                          labels=[np.full(k, i % 7, np.int32) for i, k in enumerate(lengths)],
                          word_index=[np.zeros(k, np.int32) for k in lengths], owns=[np.ones(k, bool) for k in lengths],
                          sentence=np.arange(n), num_words=np.asarray(lengths), num_split=0, num_cut_words=0)


@pytest.mark.parametrize("short_len", [0, 16])
def test_packed_batches_cover_every_window_once_per_epoch_deterministically(short_len):
    lengths = np.random.default_rng(1).integers(3, 30, 57)
    w = _windows(lengths)
    batches = ftdata.PackedBatches(w, 4, seed=3, seq_len=32, pad_id=0, short_len=short_len)
    assert batches.padding < (0.25 if short_len else 0.15) and batches.shapes(2) == ([16, 32] if short_len else [32])
    seen, widths = [], set()
    for step in range(batches.steps_per_epoch):
        b = batches.batch(step)
        rows, L = b["input_ids"].shape
        widths.add(L)
        assert rows * L == 4 * 32  # a batch holds rows of one length, as many tokens either way
        longest = max((len(w.input_ids[i]) for r in range(rows) for i in _row_windows(b, r, w)), default=0)
        if short_len:  # the short tier's batches hold only windows that fit it, the full tier's only the others
            assert longest <= L and (L == 32) == (longest > short_len)
        else:
            assert L == 32
        for row in range(b["input_ids"].shape[0]):
            for k in range(1, b["segment_ids"][row].max() + 1):
                where = np.flatnonzero(b["segment_ids"][row] == k)
                np.testing.assert_array_equal(b["positions"][row, where], np.arange(len(where)))
                ids = b["input_ids"][row, where]
                match = [i for i in range(len(w)) if len(w.input_ids[i]) == len(ids) and
                         np.array_equal(w.input_ids[i], ids)]
                assert match and np.array_equal(b["labels"][row, where], w.labels[match[0]])
                seen.append(match[0])
        assert np.all(b["labels"][b["segment_ids"] == 0] == ftdata.IGNORE)
    assert sorted(seen) == list(range(len(w))) and widths == set(batches.shapes(2))
    again = ftdata.PackedBatches(w, 4, seed=3, seq_len=32, pad_id=0, short_len=short_len)
    for step in (0, batches.steps_per_epoch + 1):
        jax.tree.map(np.testing.assert_array_equal, batches.batch(step), again.batch(step))
    halves = [batches.batch(2, p, 2) for p in (0, 1)]
    jax.tree.map(lambda a, b, full: np.testing.assert_array_equal(np.concatenate([a, b]), full), *halves,
                 batches.batch(2))


def _row_windows(b, row, w):
    """Indices of the windows packed in a batch row (matched by their tokens)."""
    out = []
    for k in range(1, b["segment_ids"][row].max() + 1):
        ids = b["input_ids"][row, b["segment_ids"][row] == k]
        out += [i for i in range(len(w)) if np.array_equal(w.input_ids[i], ids)][:1]
    return out


def test_choose_short_len_by_hand():
    assert ftdata.choose_short_len([10] * 97 + [100] * 1, 128) == 0  # 970 of 1070 tokens fit 64: < 97%
    assert ftdata.choose_short_len([10] * 990 + [100] * 1, 128) == 16  # 9900 of 10000: 99%
    assert ftdata.choose_short_len([20] * 990 + [100] * 1, 128) == 32
    assert ftdata.choose_short_len([60] * 50 + [100] * 50, 128) == 0  # most tokens need the full rows


def test_packed_finetune_learns_like_the_unpacked_run(tmp_path):
    from jaxfound.app.finetune import finetune
    from tests.test_finetune import tiny_bert_dir, write_toy_conll

    base = tiny_bert_dir(tmp_path / "base")
    train = write_toy_conll(tmp_path / "train.txt", 240, seed=1)
    valid = write_toy_conll(tmp_path / "valid.txt", 64, seed=2)
    cfg = load_config(None, [
        f"run.dir={tmp_path / 'run'}", f"model.init={base}", f"data.train={train}", f"data.valid={valid}",
        f"data.test={valid}", "data.seq_len=32", "train.task=ner", "train.epochs=4", "train.batch_size=16",
        "train.lr=3e-3", "train.warmup_ratio=0.1", "checkpoint.every=0", "model.dropout=0.0", "data.packing=true"])
    summary = finetune(cfg)
    # every toy sentence fits 16 tokens, so they are packed in rows of 16 (choose_short_len), 2x as many per batch
    assert summary["batch_lengths"] == [16] and summary["packed_padding"] < 0.2
    assert summary["reports"]["test"]["f1"] > 0.9  # tests/test_finetune.py: the unpacked run's bar
    with pytest.raises(JaxfoundError, match="data.packing"):
        finetune(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, task="cls")))
