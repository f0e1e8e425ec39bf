"""Instruction fine-tuning (jaxfound.app.sft, train.task=sft): packed rows give each example the logits it has alone
(attention and positions reset per example); `jaxfound finetune train.task=sft` with LoRA lowers held-out loss,
trains only the adapters, and its run dir generates and exports a PEFT adapter that transformers + PEFT load with
the same logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import ModelConfig, load_config
from jaxfound.data import sft as sftdata
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = {
    "llama": ModelConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=48, max_position=64, activation="silu", layer_norm_eps=1e-6),
    "gpt": ModelConfig(arch="gpt", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position=64, activation="gelu_new", layer_norm_eps=1e-5),
}


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_a_packed_row_gives_each_example_its_own_logits(arch):
    """Three examples in one row (segment ids 1..3, positions from 0 each) vs each example alone."""
    model = build_model(TINY[arch], "lm")
    rng = np.random.default_rng(0)
    lengths = (9, 5, 12)
    examples = [rng.integers(3, 97, n) for n in lengths]
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    L = 32
    ids, seg, pos = np.zeros((1, L), np.int32), np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
    start = 0
    for i, ex in enumerate(examples):
        ids[0, start:start + len(ex)], seg[0, start:start + len(ex)] = ex, i + 1
        pos[0, start:start + len(ex)] = np.arange(len(ex))
        start += len(ex)
    packed = np.asarray(model.apply({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg),
                                    positions=jnp.asarray(pos)))
    start = 0
    for ex in examples:
        alone = np.asarray(model.apply({"params": params}, jnp.asarray(ex[None], jnp.int32)))[0]
        np.testing.assert_allclose(packed[0, start:start + len(ex)], alone, rtol=1e-5, atol=1e-5)
        start += len(ex)
    if arch == "gpt":  # learned absolute positions: without the reset the later examples would differ (RoPE is
        # relative, so for Llama the reset only keeps positions small)
        shifted = np.asarray(model.apply({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(seg)))
        assert np.max(np.abs(shifted[0, 9:14] - packed[0, 9:14])) > 1e-4


def tiny_llama_dir(path, tokenizer, hidden: int = 32, intermediate: int = 48, tied: bool = True,
                   initializer_range: float = 0.02):
    """A random tiny transformers Llama with tokenizer's vocabulary (and chat template), saved as a local dir."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=intermediate,
                                   max_position_embeddings=256, tie_word_embeddings=tied,
                                   initializer_range=initializer_range)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _chat(i: int) -> dict:
    """A tiny instruction set a small model can pick up: repeat the user's word in upper case."""
    words = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "brick", "ocean", "maple",
             "zebra"]
    w = words[i % len(words)]
    return {"messages": [{"role": "system", "content": "Shout the word."},
                         {"role": "user", "content": w}, {"role": "assistant", "content": w.upper() + "!"}]}


@pytest.fixture(scope="module")
def sft_run(smollm2_tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (and chat template), LoRA-SFT'd on the chat file."""
    from jaxfound.cli import main

    root = tmp_path_factory.mktemp("sft")
    # a large initializer_range: the frozen, tied LM head must be able to move the logits
    tiny_llama_dir(root / "base", smollm2_tokenizer, initializer_range=0.5)
    for name, ids in (("train", range(48)), ("valid", range(48, 60))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in ids))
    argv = ["finetune", "-c", "configs/sft_smollm2_lora.yaml", f"run.dir={root / 'run'}", f"model.init={root / 'base'}",
            f"data.train={root / 'train.jsonl'}", f"data.valid={root / 'valid.jsonl'}", "data.seq_len=64",
            "train.batch_size=8", "train.epochs=6", "train.lr=2e-2", "train.lora.rank=4", "model.dropout=0.0"]
    assert main(argv) == 0
    return {"root": root, "run": root / "run", "summary": json.loads((root / "run" / "summary.json").read_text())}


def test_sft_lowers_held_out_loss_and_trains_only_adapters(sft_run):
    from jaxfound import checkpoint as ckpt
    from jaxfound.interop.hf import read_weights
    from jaxfound.models import lora

    s = sft_run["summary"]
    assert s["task"] == "sft" and s["format"] == sftdata.CHAT and s["train_examples"] == 48
    assert s["reports"]["valid"]["loss"] < 0.8 * s["first_eval"]["eval_loss"]
    assert s["padding"] < 0.5  # packed: several short conversations per row
    last = ckpt.latest_params(sft_run["run"])
    base, adapters = lora.split(last["llama"])
    raw = read_weights(sft_run["root"] / "base")
    np.testing.assert_array_equal(np.asarray(base["layer_0"]["mlp"]["up"]["kernel"]),
                                  raw["model.layers.0.mlp.up_proj.weight"].T)
    assert s["trainable_params"] == sum(np.size(x) for x in jax.tree.leaves(adapters))  # no head: LM head is tied


def test_sft_run_generates_and_exports_a_peft_adapter(sft_run, tmp_path):
    peft = pytest.importorskip("peft")
    from jaxfound import runs
    from jaxfound.app.evaluate import export

    run = runs.open_run(sft_run["run"])
    assert run.config.model.lora.rank == 0 and run.tokenizer.chat_template
    export(sft_run["run"], tmp_path / "adapter", adapter=True)
    ids = np.asarray(run.tokenizer.apply_chat_template(_chat(3)["messages"], tokenize=True, return_dict=False))[None]
    ours = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(ids, jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(sft_run["root"] / "base")).eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(
            input_ids=torch.tensor(ids)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4


def test_sft_errors_are_named(tmp_path):
    from jaxfound.app.sft import instruct

    with pytest.raises(JaxfoundError, match="model.init"):
        instruct(load_config(None, [f"run.dir={tmp_path / 'r'}", "train.task=sft", f"data.train={tmp_path}/x"]))
