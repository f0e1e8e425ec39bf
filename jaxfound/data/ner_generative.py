"""NER as generation: a sentence's entities written as text lines by an instruction model, and parsed back to tags.

The answer format, one entity per line in sentence order, TYPE one of PER, ORG, LOC, MISC::

    ORG: European Commission
    MISC: German
    PER: Peter Blackburn

and the single line ``none`` when the sentence has no entity. The span is the entity's words exactly as in the
sentence, joined by single spaces.

    chat = to_chat(sentence.words, sentence.tags)       # {"messages": [system, user, assistant]} for jaxfound.data.sft
    result = parse_answer(generated_text, sentence.words)
    result.tags                                          # IOB2 over the words, for seqeval (jaxfound.metrics)

Parsing never fails: a line that is not ``TYPE: span`` with a known TYPE and a span found in the sentence tags
nothing and is counted in ``bad_lines``, so a bad or cut-off generation scores as the entities it does state.
Pure python.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from jaxfound.data.conll import iob1_to_iob2, read_conll, tag_spans

TYPES = ("PER", "ORG", "LOC", "MISC")
NONE = "none"
SYSTEM = ("List the named entities in the user's sentence, one per line as TYPE: words, in sentence order. "
          "TYPE is PER (person), ORG (organization), LOC (location) or MISC (other names). "
          "Copy the words exactly. If there is no entity, write none.")
LINE = re.compile(r"^\s*([A-Za-z]+)\s*:\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class ParseResult:
    """IOB2 tags over the sentence's words and the answer lines that tagged nothing (format errors)."""

    tags: list[str]
    num_entities: int  # lines that tagged an entity
    bad_lines: tuple[str, ...]  # malformed, unknown type, span not (or no more) in the sentence; an empty answer: ('',)

    @property
    def num_bad_lines(self) -> int:
        return len(self.bad_lines)


def render_answer(words, tags) -> str:
    """The entities of a sentence (IOB1 or IOB2 tags) as ``TYPE: words`` lines in sentence order, else ``none``."""
    spans = tag_spans(iob1_to_iob2(list(tags)))
    if not spans:
        return NONE
    return "\n".join(f"{kind}: {' '.join(words[start:end])}" for kind, start, end in spans)


def to_chat(words, tags) -> dict:
    """One SFT conversation: the system prompt, the sentence's words joined by spaces, the rendered answer."""
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": " ".join(words)},
                         {"role": "assistant", "content": render_answer(words, tags)}]}


def prompt_messages(words) -> list[dict]:
    """The conversation a model answers at test time: to_chat without the assistant's turn."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": " ".join(words)}]


def write_chat_jsonl(conll_path: str | Path, out_path: str | Path, limit: int | None = None) -> int:
    """The first `limit` sentences (all with None) of a CoNLL file as chat JSON lines; the number written."""
    sentences = read_conll(conll_path)[:limit]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps(to_chat(s.words, s.tags)) + "\n")
    return len(sentences)


def _find(words, span: list[str], free: list[bool], start: int) -> int:
    """First index >= start where span matches words on untagged positions only, else -1."""
    n = len(span)
    for i in range(start, len(words) - n + 1):
        if all(free[i:i + n]) and list(words[i:i + n]) == span:
            return i
    return -1


def parse_answer(text: str, words) -> ParseResult:
    """IOB2 tags over `words` from a generated answer (format in the module docstring).

    Each ``TYPE: span`` line tags the first untagged occurrence of the span's words that starts after the previous
    line's entity (answers list entities in sentence order, so repeated mentions map in order), else the first
    untagged occurrence anywhere. Lines that fit neither, unknown types, and ``none`` next to entity lines are
    bad lines; an answer with no line at all is one bad line (the format asks for ``none``).
    """
    words = [str(w) for w in words]
    tags = ["O"] * len(words)
    free = [True] * len(words)
    lines = [line for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ParseResult(tags, 0, ("",))
    if len(lines) == 1 and lines[0].strip().lower() == NONE:
        return ParseResult(tags, 0, ())
    bad, found, cursor = [], 0, 0
    for line in lines:
        m = LINE.match(line)
        if m is None or m.group(1) not in TYPES:
            bad.append(line)
            continue
        span = m.group(2).split()
        start = _find(words, span, free, cursor)
        if start < 0:
            start = _find(words, span, free, 0)
        if start < 0:
            bad.append(line)
            continue
        end = start + len(span)
        tags[start:end] = [f"B-{m.group(1)}"] + [f"I-{m.group(1)}"] * (len(span) - 1)
        free[start:end] = [False] * len(span)
        found, cursor = found + 1, end
    return ParseResult(tags, found, tuple(bad))


__all__ = ["NONE", "SYSTEM", "TYPES", "ParseResult", "parse_answer", "prompt_messages", "render_answer", "to_chat",
           "write_chat_jsonl"]
