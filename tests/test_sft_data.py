"""SFT data: assistant-only masks against transformers' own renderings, packing invariants, batch determinism,
hostile JSON lines."""

import json
import re
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxfound.data import sft
from jaxfound.errors import JaxfoundError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TOY_WORDS = ["<eos>", "<pad>", "<bos>", "[S]", "[U]", "[A]", "[/]", "a", "b", "c", "d", "e"]
TOY_TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'][0]|upper + '] ' + m['content'] + ' [/] ' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[A] ' }}{% endif %}")
# the SmolLM2 message line, and the same with transformers' {% generation %} marks around what is trained
SMOL_LINE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
SMOL_LINE_MARKED = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                    "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}"
                    "{% else %}{{message['content'] + '<|im_end|>'}}{% endif %}{{'\n'}}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks, bye."},
     {"role": "assistant", "content": "Au revoir.\nÀ bientôt."}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Trailing user turn, not trained."}],
]


def toy_tokenizer(template: str | None = TOY_TEMPLATE, eos: str = "[/]"):
    """Whitespace word-level tokenizer: one token per word, so lengths are hand-countable."""
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(TOY_WORDS)}, unk_token="<pad>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>")
    out.chat_template = template
    return out


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def token_list(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2], edges[1::2]))


# ---------------------------------------------------------------- chat (SmolLM2's ChatML template)


def test_chat_rendering_equals_apply_chat_template(tmp_path, smollm2_tokenizer):
    data = sft.read_sft(write_jsonl(tmp_path, [{"messages": c} for c in CONVERSATIONS]), smollm2_tokenizer, 512)
    assert data.format == sft.CHAT and len(data) == 3 and data.truncated == data.dropped == 0
    for conv, ids in zip(CONVERSATIONS, data.input_ids):
        assert ids.dtype == np.int32
        assert ids.tolist() == token_list(smollm2_tokenizer.apply_chat_template(conv, tokenize=True))


def test_chat_loss_tokens_decode_to_assistant_contents_and_end_of_turn(tmp_path, smollm2_tokenizer):
    data = sft.read_sft(write_jsonl(tmp_path, [{"messages": c} for c in CONVERSATIONS]), smollm2_tokenizer, 512)
    for conv, ids, mask in zip(CONVERSATIONS, data.input_ids, data.loss_mask):
        want = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        got = [smollm2_tokenizer.decode(ids[a:b]) for a, b in runs(mask)]
        assert got == want
        assert ids[mask].tolist().count(smollm2_tokenizer.eos_token_id) == len(want)  # the model learns to stop


def test_chat_mask_equals_transformers_generation_mask(tmp_path, smollm2_tokenizer):
    """Reference: transformers' assistant_masks from the same template with {% generation %} marks added."""
    template = smollm2_tokenizer.chat_template
    assert SMOL_LINE in template
    marked = template.replace(SMOL_LINE, SMOL_LINE_MARKED)
    data = sft.read_sft(write_jsonl(tmp_path, [{"messages": c} for c in CONVERSATIONS]), smollm2_tokenizer, 512)
    for conv, ids, mask in zip(CONVERSATIONS, data.input_ids, data.loss_mask):
        ref = smollm2_tokenizer.apply_chat_template(conv, chat_template=marked, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
        assert ids.tolist() == list(ref["input_ids"])
        assert mask.tolist() == [bool(x) for x in ref["assistant_masks"]]


def test_prompt_completion_is_plain_concatenation_without_chat_template(tmp_path, smollm2_tokenizer):
    rows = [{"prompt": "Translate to French: cat\n", "completion": "chat"},
            {"prompt": "Capital of Italy?", "completion": " Rome.", "id": 7}]
    data = sft.read_sft(write_jsonl(tmp_path, rows), smollm2_tokenizer, 512)
    assert data.format == sft.PROMPT_COMPLETION and data.line.tolist() == [1, 2]
    tok = lambda s: smollm2_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for row, ids, mask in zip(rows, data.input_ids, data.loss_mask):
        p, c = tok(row["prompt"]), tok(row["completion"])
        assert ids.tolist() == p + c + [smollm2_tokenizer.eos_token_id]
        assert mask.tolist() == [False] * len(p) + [True] * (len(c) + 1)
        assert smollm2_tokenizer.decode(ids[mask]) == row["completion"] + "<|im_end|>"
        assert smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids.tolist()


# ---------------------------------------------------------------- truncation, hand-built tokenizer


def test_truncation_and_dropping_are_counted(tmp_path):
    # token counts: "a a a" + "b b" + eos = 6; "a" + "b" + eos = 3; "a a a a a a" + "b" + eos = 8
    rows = [{"prompt": "a a a", "completion": "b b"}, {"prompt": "a", "completion": "b"},
            {"prompt": "a a a a a a", "completion": "b"}]
    data = sft.read_sft(write_jsonl(tmp_path, rows), toy_tokenizer(), seq_len=5)
    a, b, eos = 7, 8, 6
    assert [x.tolist() for x in data.input_ids] == [[a, a, a, b, b], [a, b, eos]]
    assert [x.tolist() for x in data.loss_mask] == [[False, False, False, True, True], [False, True, True]]
    assert (data.truncated, data.dropped, data.line.tolist()) == (1, 1, [1, 2])


def test_first_token_is_never_a_target(tmp_path):
    data = sft.read_sft(write_jsonl(tmp_path, [{"prompt": "", "completion": "c d"}]), toy_tokenizer(), 8)
    assert data.input_ids[0].tolist() == [9, 10, 6]
    assert data.loss_mask[0].tolist() == [False, True, True]


def test_chat_span_ends_at_eos_when_the_template_puts_it_inside(tmp_path):
    """Toy template: assistant turn renders '[A] c [/] '; with eos '[/]' the target is 'c [/]'."""
    rows = [{"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]}]
    data = sft.read_sft(write_jsonl(tmp_path, rows), toy_tokenizer(), 16)
    assert data.input_ids[0].tolist() == [4, 7, 8, 6, 5, 9, 10, 6]
    assert data.loss_mask[0].tolist() == [False] * 5 + [True] * 3


def test_all_examples_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "a a a a", "completion": "b"}])
    with pytest.raises(JaxfoundError, match="no example has a target"):
        sft.read_sft(path, toy_tokenizer(), 3)


# ---------------------------------------------------------------- hostile inputs

GOOD_CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
GOOD_PC = {"prompt": "a", "completion": "b"}
BAD_LINES = {  # (first line, bad second line, what the message says)
    "not_json": (GOOD_PC, '{"prompt": "a", ', "invalid JSON"),
    "not_object": (GOOD_PC, "[1, 2]", "JSON object"),
    "string_line": (GOOD_PC, '"prompt"', "JSON object"),
    "neither_format": (GOOD_PC, {"text": "a"}, "neither SFT format"),
    "both_formats": (GOOD_CHAT, {**GOOD_CHAT, **GOOD_PC}, "both"),
    "chat_in_pc_file": (GOOD_PC, GOOD_CHAT, "one format per file"),
    "pc_in_chat_file": (GOOD_CHAT, GOOD_PC, "one format per file"),
    "prompt_not_string": (GOOD_PC, {"prompt": 1, "completion": "b"}, "'prompt' must be a string"),
    "completion_missing": (GOOD_PC, {"prompt": "a"}, "'completion' must be a string"),
    "completion_null": (GOOD_PC, {"prompt": "a", "completion": None}, "'completion' must be a string"),
    "messages_not_list": (GOOD_CHAT, {"messages": "a"}, "non-empty list"),
    "messages_empty": (GOOD_CHAT, {"messages": []}, "non-empty list"),
    "message_not_object": (GOOD_CHAT, {"messages": ["a"]}, "messages\\[0\\]"),
    "message_extra_key": (GOOD_CHAT, {"messages": [{"role": "user", "content": "a", "weight": 0}]}, "exactly"),
    "message_no_content": (GOOD_CHAT, {"messages": [{"role": "user"}]}, "exactly"),
    "bad_role": (GOOD_CHAT, {"messages": [{"role": "tool", "content": "a"}]}, "valid roles"),
    "role_not_string": (GOOD_CHAT, {"messages": [{"role": ["user"], "content": "a"}]}, "valid roles"),
    "content_not_string": (GOOD_CHAT, {"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    "opens_with_assistant": (GOOD_CHAT, {"messages": GOOD_CHAT["messages"][::-1]}, "opens with a system or user"),
    "no_assistant": (GOOD_CHAT, {"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path, case):
    first, bad, says = BAD_LINES[case]
    path = write_jsonl(tmp_path, [first, "", bad, first])  # a blank line still counts
    with pytest.raises(JaxfoundError, match=says) as err:
        sft.read_sft(path, toy_tokenizer(), 16)
    assert f"{path}:3:" in str(err.value)


def test_not_utf8_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD_PC).encode() + b'\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(JaxfoundError, match=f"{re.escape(str(path))}:2: not UTF-8"):
        sft.read_sft(path, toy_tokenizer(), 16)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(JaxfoundError, match=f"{re.escape(str(path))}: empty file"):
        sft.read_sft(path, toy_tokenizer(), 16)


def test_missing_file(tmp_path):
    with pytest.raises(JaxfoundError, match="file not found"):
        sft.read_sft(tmp_path / "nope.jsonl", toy_tokenizer(), 16)


def test_chat_needs_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path, ["", GOOD_CHAT])
    with pytest.raises(JaxfoundError, match=f"{re.escape(str(path))}:2: .*needs? a tokenizer with a chat template"):
        sft.read_sft(path, toy_tokenizer(template=None), 16)
    assert len(sft.read_sft(write_jsonl(tmp_path, [GOOD_PC], "pc.jsonl"), toy_tokenizer(template=None), 16)) == 1


def test_template_that_is_not_prefix_stable_is_refused(tmp_path):
    """Like templates that strip reasoning from earlier turns: the last assistant turn renders differently."""
    unstable = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '[A] e [/] ' }}"
                "{% else %}{{ '[' + m['role'][0]|upper + '] ' + m['content'] + ' [/] ' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[A] ' }}{% endif %}")
    conv = {"messages": GOOD_CHAT["messages"] * 2}
    path = write_jsonl(tmp_path, [GOOD_CHAT, conv])
    with pytest.raises(JaxfoundError, match=f"{re.escape(str(path))}:2: .*not prefix-stable at messages\\[1\\]"):
        sft.read_sft(path, toy_tokenizer(unstable), 32)


def test_template_that_raises_is_reported_with_line(tmp_path):
    strict = "{% if messages | length > 2 %}{{ raise_exception('two messages at most') }}{% endif %}"
    path = write_jsonl(tmp_path, [GOOD_CHAT, {"messages": GOOD_CHAT["messages"] * 2}])
    with pytest.raises(JaxfoundError, match=f"{re.escape(str(path))}:2: .*two messages at most"):
        sft.read_sft(path, toy_tokenizer(strict + TOY_TEMPLATE), 32)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | json_values,
                                 "content": st.text(alphabet="abcde []/", max_size=12) | json_values})
line = (json_values | st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values})
        | st.fixed_dictionaries({"prompt": st.text(alphabet="abc ", max_size=8) | json_values,
                                 "completion": st.text(alphabet="de ", max_size=8) | json_values}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=4))
def test_hostile_lines_read_or_raise_jaxfound_error(tmp_path, lines):
    path = write_jsonl(tmp_path, lines)
    try:
        data = sft.read_sft(path, toy_tokenizer(), 6)
    except JaxfoundError as e:
        assert str(path) in str(e)
        return
    for ids, mask in zip(data.input_ids, data.loss_mask):
        assert len(ids) == len(mask) <= 6 and mask.any() and not mask[0]


# ---------------------------------------------------------------- packing


def random_examples(seed: int, n: int, seq_len: int) -> sft.SFTData:
    """Mixed lengths (many short, a few long), random tokens and target spans."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        length = int(rng.integers(2, seq_len + 1) if rng.random() < 0.3 else rng.integers(2, seq_len // 4 + 2))
        mask = rng.random(length) < 0.5
        mask[0], mask[rng.integers(1, length)] = False, True
        ids.append(rng.integers(3, 50, size=length).astype(np.int32))
        masks.append(mask)
    return sft.SFTData(ids, masks)


def segments(rows):
    """(row, start, end) of every segment, read from segment_ids alone."""
    out = []
    for r, seg in enumerate(rows["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            assert len(where) and (np.diff(where) == 1).all(), "a segment must be contiguous"
            out.append((r, int(where[0]), int(where[-1]) + 1))
    return out


def test_pack_plan_is_best_fit_decreasing_by_hand():
    # longest first: 6 (#4) -> row 0, 5 (#0) -> row 1, 4 (#2) -> row 2, 3 (#1) fills row 1, 2 (#3) fills row 0
    assert sft.pack_plan([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert sft.pack_plan([4, 4, 4], 8) == [[0, 1], [2]]  # ties by index
    with pytest.raises(JaxfoundError, match="more than seq_len"):
        sft.pack_plan([3, 9], 8)


@pytest.mark.parametrize("seed", [0, 1])
def test_packing_keeps_every_example_once_with_its_targets(seed):
    L = 64
    data = random_examples(seed, 120, L)
    rows = sft.pack(data, L, pad_id=0)
    assert {k: (v.shape, v.dtype.name) for k, v in rows.items()} == {
        "input_ids": ((len(rows["input_ids"]), L), "int32"), "targets": ((len(rows["input_ids"]), L), "int32"),
        "loss_mask": ((len(rows["input_ids"]), L), "bool"), "segment_ids": ((len(rows["input_ids"]), L), "int32"),
        "positions": ((len(rows["input_ids"]), L), "int32")}
    found = []
    for r, a, b in segments(rows):
        ids = rows["input_ids"][r, a:b]
        assert rows["positions"][r, a:b].tolist() == list(range(b - a))
        assert rows["targets"][r, a:b - 1].tolist() == ids[1:].tolist()
        assert rows["targets"][r, b - 1] == sft.NO_TARGET and not rows["loss_mask"][r, b - 1]
        found.append((tuple(ids.tolist()), (False, *rows["loss_mask"][r, a:b - 1].tolist())))
    want = [(tuple(i.tolist()), tuple(m.tolist())) for i, m in zip(data.input_ids, data.loss_mask)]
    assert sorted(found) == sorted(want)  # every example exactly once, with its mask shifted onto the logits
    assert sorted(i for row in sft.pack_plan(data.lengths, L) for i in row) == list(range(len(data)))


def test_no_loss_on_padding_or_across_boundaries():
    L = 48
    rows = sft.pack(random_examples(2, 100, L), L, pad_id=1)
    seg, mask = rows["segment_ids"], rows["loss_mask"]
    pad = seg == 0
    assert (rows["input_ids"][pad] == 1).all() and (rows["positions"][pad] == 0).all()
    assert (rows["targets"][pad] == sft.NO_TARGET).all() and not mask[pad].any()
    same_next = np.c_[seg[:, 1:] == seg[:, :-1], np.zeros((len(seg), 1), bool)]
    assert not (mask & ~same_next).any()
    assert ((rows["targets"] >= 0) == (same_next & ~pad)).all()


def test_packed_loss_equals_unpacked_and_direct_sum():
    """A bigram 'model' (loss depends on the input token and its target only): packing must not change the sum."""
    L = 64
    data = random_examples(3, 150, L)
    table = np.random.default_rng(0).random((50, 50))
    direct = sum(float((table[i[:-1], i[1:]] * m[1:]).sum()) for i, m in zip(data.input_ids, data.loss_mask))
    count = sum(int(m[1:].sum()) for m in data.loss_mask)
    for rows in (sft.pack(data, L, 0), sft.unpacked(data, L, 0)):
        w = rows["loss_mask"]
        loss = float(table[rows["input_ids"][w], rows["targets"][w]].sum())
        assert np.isclose(loss, direct) and int(w.sum()) == count == data.num_targets


def test_packing_pads_less_than_one_example_per_row():
    L = 64
    data = random_examples(4, 200, L)
    packed, single = sft.pack(data, L, 0), sft.unpacked(data, L, 0)
    assert len(single["input_ids"]) == len(data)
    frac = sft.padding_fraction(packed)
    assert frac == pytest.approx(1 - data.lengths.sum() / packed["input_ids"].size)
    assert frac < 0.5 * sft.padding_fraction(single)
    assert len(packed["input_ids"]) >= int(np.ceil(data.lengths.sum() / L))


def test_pack_real_chat_examples(tmp_path, smollm2_tokenizer):
    data = sft.read_sft(write_jsonl(tmp_path, [{"messages": c} for c in CONVERSATIONS * 4]), smollm2_tokenizer, 256)
    rows = sft.pack(data, 256, smollm2_tokenizer.pad_token_id)
    assert len(rows["input_ids"]) < len(data)
    eos = smollm2_tokenizer.eos_token_id
    assert int(rows["loss_mask"].sum()) == data.num_targets
    assert (rows["targets"][rows["loss_mask"]] == eos).sum() == 4 * 4  # each assistant turn's <|im_end|> is trained


# ---------------------------------------------------------------- batches


def test_batches_are_a_pure_function_of_seed_and_step():
    rows = sft.pack(random_examples(5, 300, 32), 32, 0)
    a, b = sft.SFTBatches(rows, 8, seed=3), sft.SFTBatches(rows, 8, seed=3)
    for step in (0, 5, a.steps_per_epoch + 1, 3 * a.steps_per_epoch - 1):
        x, y = a.batch(step), b.batch(step)
        assert all(np.array_equal(x[k], y[k]) for k in rows)
    assert not np.array_equal(sft.SFTBatches(rows, 8, seed=4).row_indices(0), a.row_indices(0))


def test_each_epoch_visits_every_row_once_in_the_seeded_order():
    rows = sft.pack(random_examples(6, 200, 32), 32, 0)
    R, B = len(rows["input_ids"]), 6
    batches = sft.SFTBatches(rows, B, seed=11)
    assert batches.steps_per_epoch == -(-R // B)
    for epoch in (0, 1):
        seen = np.concatenate([batches.row_indices(epoch * batches.steps_per_epoch + s)
                               for s in range(batches.steps_per_epoch)])
        assert seen[:R].tolist() == np.random.default_rng([11, epoch]).permutation(R).tolist()
        assert (seen[R:] == R).all()  # filler
    last = batches.batch(batches.steps_per_epoch - 1)
    filler = batches.row_indices(batches.steps_per_epoch - 1) == R
    assert filler.sum() == batches.steps_per_epoch * B - R
    assert not last["loss_mask"][filler].any() and (last["segment_ids"][filler] == 0).all()


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_get_disjoint_rows_covering_the_global_batch(processes):
    rows = sft.pack(random_examples(7, 300, 32), 32, 0)
    batches = sft.SFTBatches(rows, 8, seed=1)
    for step in (0, 7):
        whole = batches.batch(step)
        parts = [batches.batch(step, p, processes) for p in range(processes)]
        for k in rows:
            assert np.array_equal(np.concatenate([part[k] for part in parts]), whole[k])
        idx = batches.row_indices(step)
        b = 8 // processes
        real = [idx[p * b:(p + 1) * b] for p in range(processes)]
        real = [r[r < batches.num_rows].tolist() for r in real]  # filler rows aside
        assert sorted(sum(real, [])) == sorted(idx[idx < batches.num_rows].tolist())
        assert len(set(sum(real, []))) == len(sum(real, []))  # disjoint
    with pytest.raises(JaxfoundError, match="divisible"):
        batches.batch(0, 0, 3)
