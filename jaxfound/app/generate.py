"""`jaxfound generate`: continue text prompts with a decoder LM from a run dir, a transformers dir or a GGUF file.

    result = generate("runs/gpt_clm", ["Once upon a time"], max_new_tokens=32, temperature=0.8, seed=1)
    print(result.texts[0], summary(result))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from jaxfound import generation, runs
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import load_hf_config

DECODERS = ("gpt", "llama")


def _not_a_decoder(path, what: str) -> JaxfoundError:
    return JaxfoundError(f"{path}: {what}; generation needs a decoder LM: a causal-LM (clm) run dir, a transformers "
                         "GPT-2 / Llama / Mistral / Qwen causal-LM dir, or a .gguf file")


def open_decoder(path) -> runs.Run:
    """A run that generates text: a decoder (GPT-2 or the Llama family) with its LM head and a tokenizer."""
    p = Path(path)
    if p.is_dir() and runs.kind_of(p) == "transformers":  # refuse an encoder before asking it for an LM head
        info = load_hf_config(p)
        if info.model.arch not in DECODERS:
            raise _not_a_decoder(path, f"a transformers {info.architecture} (an encoder)")
    run = runs.open_run(path, head="lm")
    cfg = run.model.cfg
    if cfg.arch not in DECODERS or run.model.head != "lm":
        raise _not_a_decoder(path, f"a {cfg.arch} model with a '{run.model.head}' head (task {run.config.train.task})")
    if run.tokenizer is None:
        raise JaxfoundError(f"{path}: no tokenizer (tokenizer/ or tokenizer files); add the one it was trained with")
    return run


def generate(path, prompts: Sequence[str], *, chat: bool = False, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
             on_token: Callable[[int, int, str], None] | None = None) -> generation.GenerationResult:
    """Continue each prompt (through the chat template with chat=True); sampling draws from key(seed)."""
    if not prompts:
        raise JaxfoundError("generate: no prompts given")
    run = open_decoder(path)
    return generation.generate_text(run.model, run.params, run.tokenizer, list(prompts), chat,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    key=jax.random.key(seed), stop_strings=tuple(stop), on_token=on_token)


def summary(result: generation.GenerationResult) -> str:
    """One line for people: tokens, why rows ended, decode tokens/s, time to first token, compile time."""
    reasons = ", ".join(f"{result.finish_reasons.count(r)} {r}" for r in ("stop", "length")
                        if r in result.finish_reasons)
    return (f"{result.num_generated} tokens in {len(result.tokens)} row(s) ({reasons}); "
            f"{result.decode_tokens_per_second:.1f} tok/s decode, first token {result.time_to_first_token:.3f} s, "
            f"compile {result.compile_seconds:.2f} s")
