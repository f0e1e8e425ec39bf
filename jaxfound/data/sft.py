"""Instruction fine-tuning (SFT) data for causal decoders: JSON lines -> masked examples -> packed rows -> batches.

Two line formats, one per file (the first non-blank line decides):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, rendered with the
  tokenizer's chat template; the loss is on the tokens of assistant messages only.
- prompt/completion: ``{"prompt": str, "completion": str}``; the loss is on the completion and EOS.

Mask convention: ``loss_mask[t]`` is True where token ``t`` is a *target* (a token the model learns to
predict). Logits at position t predict token t+1, so the loss at position t is weighted by
``loss_mask[t + 1]``; ``pack`` does that shift and returns ``targets`` / ``loss_mask`` aligned with the
logits. Token 0 of an example is never a target (nothing before it predicts it).

Pure numpy; the batch of step s is a pure function of (seed, s), as in jaxfound.data.finetune.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxfound.data.finetune import pack_plan, read_json_lines
from jaxfound.errors import JaxfoundError

ROLES = ("system", "user", "assistant")
CHAT, PROMPT_COMPLETION = "chat", "prompt_completion"
NO_TARGET = -1  # targets where no token is predicted (an example's last token, padding); loss_mask is False there
CHAT_LINE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
PC_LINE = '{"prompt": "...", "completion": "..."}'


@dataclass
class SFTData:
    """Tokenized examples, each at most seq_len tokens with at least one target."""

    input_ids: list[np.ndarray]  # int32 (n,)
    loss_mask: list[np.ndarray]  # bool (n,): True where the token is a target (see the module docstring)
    line: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # source line of each example
    format: str = CHAT  # CHAT or PROMPT_COMPLETION
    truncated: int = 0  # kept examples cut to seq_len
    dropped: int = 0  # examples left with no target after truncation (not in the lists)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def num_targets(self) -> int:
        return int(sum(int(m.sum()) for m in self.loss_mask))

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------- reading


def read_sft(path: str | Path, tokenizer, seq_len: int) -> SFTData:
    """Read a JSON lines file of chat or prompt/completion examples (see the module docstring).

    chat: the conversation is rendered with ``tokenizer.apply_chat_template``. The tokens of assistant message i
    are found by rendering prefixes: ``messages[:i]`` with ``add_generation_prompt=True`` ends where the
    assistant's reply starts, ``messages[:i+1]`` ends where it (and the template's end-of-turn marker) ends.
    Both renderings must be token prefixes of the whole conversation's rendering; a template that renders
    earlier turns differently depending on what follows (not prefix-stable) is refused. The span is
    trained up to and including its last EOS token when it has one (the end-of-turn marker, e.g.
    ``<|im_end|>``, so the model learns to stop); what the template puts after it (a newline) is context.

    prompt/completion: ``prompt`` and ``completion`` are tokenized separately (no special tokens, so the
    boundary between them is a token boundary) and concatenated, then EOS; BOS goes first only if the
    tokenizer itself puts BOS before plain text. The chat template is *not* applied, even if there is one.

    Examples longer than seq_len keep their first seq_len tokens (counted in ``truncated``); those with no
    target left are dropped (counted in ``dropped``).
    """
    path = Path(path)
    if seq_len < 2:
        raise JaxfoundError(f"seq_len={seq_len}: SFT examples need at least 2 tokens (a context and a target)")
    rows = _read_jsonl(path)
    fmt = _detect_format(path, rows)
    if fmt == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise JaxfoundError(f"{path}:{rows[0][0]}: chat lines ({{'messages': ...}}) need a tokenizer with a "
                                f"chat template and this one has none; use prompt/completion lines ({PC_LINE}) "
                                "or a tokenizer with chat_template set")
        encoded = [(lineno, *_chat_example(f"{path}:{lineno}", row["messages"], tokenizer)) for lineno, row in rows]
    else:
        encoded = _prompt_completion_examples(path, rows, tokenizer)
    out = SFTData([], [], format=fmt)
    lines = []
    for lineno, ids, mask in encoded:
        mask[0] = False  # nothing predicts the first token
        cut = len(ids) > seq_len
        ids, mask = ids[:seq_len], mask[:seq_len]
        if not mask.any():
            out.dropped += 1
            continue
        out.truncated += cut
        out.input_ids.append(ids)
        out.loss_mask.append(mask)
        lines.append(lineno)
    if not out.input_ids:
        raise JaxfoundError(f"{path}: no example has a target token within seq_len={seq_len} "
                            f"({out.dropped} dropped); raise seq_len or shorten the prompts")
    out.line = np.array(lines, np.int64)
    return out


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; JSON only, never anything that unpickles."""
    rows = read_json_lines(path, f"JSON lines: {CHAT_LINE} or {PC_LINE}")
    if not rows:
        raise JaxfoundError(f"{path}: empty file; expected JSON lines: {CHAT_LINE} or {PC_LINE}")
    return rows


def _detect_format(path: Path, rows: list[tuple[int, dict]]) -> str:
    """The file's format (from its first line), after checking every line is in it and well formed."""
    first = None
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        chat, pc = "messages" in row, "prompt" in row or "completion" in row
        if chat and pc:
            raise JaxfoundError(f"{where}: has both 'messages' and 'prompt'/'completion'; a line is either "
                                f"{CHAT_LINE} or {PC_LINE}")
        if not chat and not pc:
            keys = ", ".join(map(repr, row)) or "none"
            raise JaxfoundError(f"{where}: neither SFT format (keys: {keys}); expected {CHAT_LINE} or {PC_LINE}")
        fmt = CHAT if chat else PROMPT_COMPLETION
        if first is None:
            first = (lineno, fmt)
        elif fmt != first[1]:
            raise JaxfoundError(f"{where}: a {fmt} line in a {first[1]} file (line {first[0]} set the format); "
                                "use one format per file")
        if chat:
            _check_messages(where, row["messages"])
        else:
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    got = "missing" if key not in row else type(row[key]).__name__
                    raise JaxfoundError(f"{where}: '{key}' must be a string ({got}); expected {PC_LINE}")
    return first[1]


def _check_messages(where: str, messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise JaxfoundError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects; "
                            f"expected {CHAT_LINE}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise JaxfoundError(f"{where}: messages[{i}] must be an object with exactly the keys 'role' and "
                                f"'content' (got {got})")
        if m["role"] not in ROLES:
            raise JaxfoundError(f"{where}: messages[{i}].role={m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise JaxfoundError(f"{where}: messages[{i}].content must be a string "
                                f"(got {type(m['content']).__name__})")
    if messages[0]["role"] == "assistant":  # its reply has no rendered prefix (transformers refuses empty chats)
        raise JaxfoundError(f"{where}: messages[0] is an assistant message; a conversation opens with a system or "
                            "user message")
    if not any(m["role"] == "assistant" for m in messages):
        raise JaxfoundError(f"{where}: no assistant message, so nothing to learn; each conversation needs at least "
                            "one message with role 'assistant'")


def _render(where: str, tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=False)
    except Exception as e:  # the template is user code (jinja): it may raise anything, e.g. on role order
        raise JaxfoundError(f"{where}: the tokenizer's chat template failed on this conversation "
                            f"({type(e).__name__}: {e})") from None
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _chat_example(where: str, messages: list[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, loss_mask) of one conversation: the assistant spans from prefix renderings."""
    full = _render(where, tokenizer, messages, False)
    mask = np.zeros(len(full), bool)
    eos = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(where, tokenizer, messages[:i], True)
        upto = _render(where, tokenizer, messages[: i + 1], False)
        if upto != full[: len(upto)] or before != upto[: len(before)]:
            raise JaxfoundError(f"{where}: the tokenizer's chat template is not prefix-stable at messages[{i}]: "
                                f"rendering messages[:{i}] with the generation prompt, then messages[:{i + 1}], "
                                "must give token prefixes of the whole conversation's rendering, or the assistant "
                                "tokens cannot be found; use a template that renders earlier turns unchanged")
        span = upto[len(before):]
        if not span:
            raise JaxfoundError(f"{where}: messages[{i}] (assistant) renders to no tokens with this chat template")
        end = len(upto)
        if eos is not None and eos in span:  # the end-of-turn marker is the last target; what follows is context
            end = len(before) + len(span) - span[::-1].index(eos)
        mask[len(before):end] = True
    return np.asarray(full, np.int32), mask


def _prompt_completion_examples(path: Path, rows, tokenizer) -> list[tuple[int, np.ndarray, np.ndarray]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise JaxfoundError(f"{path}: prompt/completion lines need a tokenizer with an EOS token (it ends each "
                            "completion) and this one has none")
    bos = tokenizer.bos_token_id
    adds_bos = (bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
                and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos])
    lead = [bos] if adds_bos else []
    prompts = tokenizer([row["prompt"] for _, row in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([row["completion"] for _, row in rows], add_special_tokens=False)["input_ids"]
    out = []
    for (lineno, _), p, c in zip(rows, prompts, completions):
        ids = np.array(lead + list(p) + list(c) + [eos], np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(lead) + len(p):] = True
        out.append((lineno, ids, mask))
    return out


# ---------------------------------------------------------------- packing


def pack(examples: SFTData, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Several examples per row (rows from pack_plan), arrays (R, seq_len):

    input_ids int32 (pad_id on padding); targets int32, targets[t] = input_ids[t+1] of the same example,
    NO_TARGET (-1) at each example's last token and on padding; loss_mask bool, True where targets[t] is
    trained (the example's loss_mask shifted left, so no target crosses an example boundary); segment_ids
    int32, 1, 2, ... per example within a row, 0 on padding; positions int32, 0.. within each example, 0 on
    padding.
    """
    return layout(examples, pack_plan(examples.lengths, seq_len), seq_len, pad_id)


def unpacked(examples: SFTData, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, in the layout of pack (for comparisons)."""
    return layout(examples, [[i] for i in range(len(examples))], seq_len, pad_id)


def layout(examples: SFTData, plan: list[list[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The rows of `plan` (example indices per row) as the arrays described in pack."""
    R = len(plan)
    out = {"input_ids": np.full((R, seq_len), pad_id, np.int32), "targets": np.full((R, seq_len), NO_TARGET, np.int32),
           "loss_mask": np.zeros((R, seq_len), bool), "segment_ids": np.zeros((R, seq_len), np.int32),
           "positions": np.zeros((R, seq_len), np.int32)}
    for r, idx in enumerate(plan):
        t = 0
        for s, i in enumerate(idx, 1):
            ids, mask = examples.input_ids[i], examples.loss_mask[i]
            n = len(ids)
            if t + n > seq_len:
                raise JaxfoundError(f"row {r}: examples {idx} need more than seq_len={seq_len} tokens")
            out["input_ids"][r, t:t + n] = ids
            out["targets"][r, t:t + n - 1] = ids[1:]
            out["loss_mask"][r, t:t + n - 1] = mask[1:]
            out["segment_ids"][r, t:t + n] = s
            out["positions"][r, t:t + n] = np.arange(n)
            t += n
    return out


def padding_fraction(rows: dict[str, np.ndarray]) -> float:
    """Share of the row tokens that are padding (segment 0)."""
    return float(np.mean(rows["segment_ids"] == 0)) if rows["segment_ids"].size else 0.0


# ---------------------------------------------------------------- batches


class SFTBatches:
    """Batches of packed rows over epochs; batch(s) is a pure function of (seed, s).

    Epoch e visits the rows in the order np.random.default_rng([seed, e]).permutation; the last batch of an
    epoch is filled with all-padding rows (no loss). Process p of P gets rows [p*B/P, (p+1)*B/P) of each
    global batch, as BucketedBatches in jaxfound.data.finetune.
    """

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int, pad_id: int = 0):
        self.num_rows = len(rows["input_ids"])
        if self.num_rows == 0 or batch_size < 1:
            raise JaxfoundError(f"SFT batches need rows and batch_size >= 1 (rows={self.num_rows}, "
                                f"batch_size={batch_size})")
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = math.ceil(self.num_rows / batch_size)
        filler = {"input_ids": pad_id, "targets": NO_TARGET}  # row num_rows: all padding, no loss
        self.rows = {k: np.concatenate([v, np.full_like(v[:1], filler.get(k, 0))]) for k, v in rows.items()}

    @functools.lru_cache(maxsize=2)  # noqa: B019  (one or two epochs live at once)
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's row indices, (steps_per_epoch, batch_size); num_rows is the filler row."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        fill = self.steps_per_epoch * self.batch_size - self.num_rows
        return np.r_[order, np.full(fill, self.num_rows)].reshape(self.steps_per_epoch, self.batch_size)

    def row_indices(self, step: int) -> np.ndarray:
        """The global batch of `step` as row indices (num_rows marks a filler row)."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        return self.epoch_order(epoch)[b]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`."""
        if self.batch_size % process_count:
            raise JaxfoundError(f"train.batch_size={self.batch_size} must be divisible by the {process_count} "
                                "processes")
        b = self.batch_size // process_count
        idx = self.row_indices(step)[process_index * b:(process_index + 1) * b]
        return {k: v[idx] for k, v in self.rows.items()}
