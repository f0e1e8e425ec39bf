"""`jaxfound quantize` for decoders: a transformers dir, GGUF file or run dir becomes an int8 run dir whose logits stay
within the int8 error bound of float32, that generates with its KV cache, and whose greedy answers agree with
float32 SmolLM2's on most tokens."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound import runs
from jaxfound.app.quantize import quantize_run
from jaxfound.cli import main
from jaxfound.errors import JaxfoundError
from jaxfound.generation import encode_prompts, generate_text
from jaxfound.models import build_model
from jaxfound.quant.checkpoint import flatten
from jaxfound.quant.int8 import quantize, quantize_tied_embedding
from tests.test_sft import tiny_llama_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("qdec")
    tiny_llama_dir(root / "base", smollm2_tokenizer, hidden=64, intermediate=128, tied=False)
    text = " ".join(f"line {i} of a held out text about rivers, stones and clouds." for i in range(300))
    (root / "held_out.txt").write_text(text)
    return root


@pytest.mark.parametrize("mode,rel_bound", [("w8", 0.02), ("w8a8", 0.04)])
def test_quantized_decoder_logits_stay_within_the_int8_bound(tiny_llama, tmp_path, mode, rel_bound):
    report = quantize_run(tiny_llama / "base", mode, tmp_path / "q", rounds=1)
    # every block Dense but key / value (32 outputs: the default rules keep kernels under 64 outputs float), lm_head
    assert report["task"] == "clm" and report["quantized_layers"] == 2 * 5 + 1
    run, float_run = runs.open_run(tmp_path / "q"), runs.open_run(tiny_llama / "base")
    assert run.kind == "quantized" and run.config.model.quant == mode
    assert run.params["lm_head"]["kernel"].dtype == jnp.int8
    assert run.params["llama"]["word"]["embedding"].dtype == jnp.float32  # the embedding table stays float
    ids = jnp.asarray(np.random.default_rng(0).integers(10, 1000, (2, 24)), jnp.int32)
    got = np.asarray(run.model.apply({"params": run.params}, ids))
    ref = np.asarray(float_run.model.apply({"params": float_run.params}, ids))
    rms = np.sqrt(np.mean(ref ** 2))
    assert np.sqrt(np.mean((got - ref) ** 2)) <= rel_bound * rms
    # the int8 run decodes with its KV cache exactly as its own full forward passes choose (greedy)
    out = generate_text(run.model, run.params, run.tokenizer, ["line 3 of a held"], max_new_tokens=6)
    seq = np.asarray(run.tokenizer("line 3 of a held", add_special_tokens=False)["input_ids"])
    for token in out.tokens[0]:
        logits = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(seq[None], jnp.int32)))
        assert int(np.argmax(logits[0, -1])) == token
        seq = np.append(seq, token)


def test_quantize_cli_reports_held_out_loss_for_a_decoder(tiny_llama, tmp_path, capsys):
    assert main(["quantize", "--checkpoint", str(tiny_llama / "base"), "--mode", "w8", "--out", str(tmp_path / "q"),
                 "--eval", str(tiny_llama / "held_out.txt"), "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "held-out next-token loss" in printed
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert abs(report["metric_delta"]) < 0.05 * report["metric_before"]
    with pytest.raises(JaxfoundError, match="already int8"):
        quantize_run(tmp_path / "q", "w8", tmp_path / "again")


def test_int8_smollm2_greedy_agrees_with_float32(smollm2_gguf):
    """Greedy answers of SmolLM2 with w8a8 weights and the tied int8 head with its float16 lookup copy (quantized
    as quantize_run writes them: tested above; packed for the native kernel by generate) vs float32 (the GGUF's
    weights dequantized),
    token by token up to the first divergence; where a row diverges, float32 itself was nearly tied there."""
    f = runs.open_run(smollm2_gguf)
    q_model = build_model(dataclasses.replace(f.config.model, quant="w8a8"), "lm")
    q_params = quantize_tied_embedding(quantize(f.params), "llama")
    prompts = ["What is the capital of France?", "Name three primary colors.", "What is the capital of Japan?",
               "Who wrote Romeo and Juliet?"]
    a = generate_text(q_model, q_params, f.tokenizer, prompts, chat=True, max_new_tokens=12)
    b = generate_text(f.model, f.params, f.tokenizer, prompts, chat=True, max_new_tokens=12)
    same = total = 0
    diverged = []  # float32's context where an int8 row took another token
    for ids, x, y in zip(encode_prompts(f.tokenizer, prompts, chat=True), a.tokens, b.tokens):
        n = min(len(x), len(y))
        agree = next((i for i in range(n) if x[i] != y[i]), n)
        same, total = same + agree, total + max(len(y), 1)  # tokens up to the first divergence
        diverged += [ids + y[:agree]] if agree < n else []
    gaps = []
    if diverged:  # one causal forward pass over the contexts, right-padded: float32's top-2 gap at each one's end
        width = max(map(len, diverged))
        logits = np.asarray(jax.jit(f.model.apply)({"params": f.params},
                                                   jnp.asarray([c + [0] * (width - len(c)) for c in diverged])))
        top2 = np.sort(logits[np.arange(len(diverged)), [len(c) - 1 for c in diverged]], axis=-1)[:, -2:]
        gaps = (top2[:, 1] - top2[:, 0]).tolist()
    print(f"w8a8 + int8 head vs float32 greedy: {same}/{total} tokens before the first divergence; float32 top-2 "
          f"gaps at divergences {gaps}; answers {a.texts} vs {b.texts}")
    assert same / total >= 0.5
    assert all(g < 1.0 for g in gaps)  # int8 error flips only near-ties of float32


def test_tied_decoder_quantizes_its_table_and_generates_from_the_cli(smollm2_tokenizer, tmp_path, capsys):
    base, out = tiny_llama_dir(tmp_path / "base", smollm2_tokenizer, hidden=64, intermediate=128), tmp_path / "q"
    assert main(["quantize", "--checkpoint", str(base), "--mode", "w8a8", "--out", str(out)]) == 0
    run = runs.open_run(out)
    word = run.params["llama"]["word"]  # one int8 table, one scale per vocab entry: lookup and LM head
    assert "lm_head" not in run.params and word["embedding"].dtype == jnp.int8
    assert word["scale"].shape == (len(smollm2_tokenizer),)
    # a transformers dir without --eval is read straight into int8, tensor by tensor: the same params as
    # quantizing the float model
    float_params = runs.open_run(base).params
    want = flatten(quantize_tied_embedding(quantize(float_params), "llama"))
    got = flatten(run.params)
    assert sorted(got) == sorted(want) and all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)
    report = json.loads((out / "quant_report.json").read_text())
    assert report["read"] == "one tensor at a time"
    assert report["bytes_before"] == sum(np.asarray(v).nbytes for v in flatten(float_params).values())
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "the river", "--max-new-tokens", "4"]) == 0
    ref = generate_text(run.model, run.params, run.tokenizer, ["the river"], max_new_tokens=4)
    assert ref.texts[0].strip() and ref.texts[0] in capsys.readouterr().out
