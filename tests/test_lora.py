"""LoRA (jaxfound.models.lora) and PEFT interop (jaxfound.interop.peft): an adapter with B = 0 leaves the model
exactly as it was, folding gives W + (alpha / r) A B, PEFT and jaxfound read each other's adapters with equal logits,
trainable-parameter counts equal PEFT's, and LoRA fine-tuning trains only the adapters and the head."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import LoraConfig, ModelConfig, load_config
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import from_pretrained
from jaxfound.interop.peft import load_adapter, read_adapter_config, save_adapter
from jaxfound.models import build_model, lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4  # max |ours - theirs| / max |theirs|, float32
TINY = {
    "bert": ModelConfig(arch="bert", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position=64),
    "gpt": ModelConfig(arch="gpt", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position=64, activation="gelu_new", layer_norm_eps=1e-5),
    "llama": ModelConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=48, max_position=64, activation="silu", layer_norm_eps=1e-6),
}


def _ids(vocab=97, B=2, L=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (B, L)), jnp.int32)


def _init(cfg, head="lm", seed=0):
    model = build_model(cfg, head)
    return model, nn.unbox(model.init(jax.random.key(seed), _ids())["params"])


def _randomize_adapters(params, seed=1, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) if lora.is_adapter(p) else x, params)


@pytest.mark.parametrize("arch", ["bert", "gpt", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_leaves_the_model_exactly_unchanged_and_fold_matches_the_adapted_model(arch, scan):
    base_cfg = dataclasses.replace(TINY[arch], scan_layers=scan)
    head = "mlm" if arch == "bert" else "lm"
    base, base_params = _init(base_cfg, head)
    cfg = dataclasses.replace(base_cfg, lora=LoraConfig(rank=4, alpha=8.0))
    adapted, params = _init(cfg, head, seed=3)
    plain, adapters = lora.split(params)
    assert jax.tree.structure(plain) == jax.tree.structure(base_params)
    assert all(np.all(np.asarray(b) == 0) for b in jax.tree.leaves(jax.tree.map(lambda n: n, adapters))
               if b.shape[-2] == 4)  # every lora_b (r, out) is zero at init
    with_adapters = lora.combine(base_params, adapters)
    ids = _ids()
    kw = {"masked_positions": jnp.tile(jnp.arange(4)[None], (2, 1))} if arch == "bert" else {}
    same = np.asarray(adapted.apply({"params": with_adapters}, ids, **kw))
    reference = np.asarray(base.apply({"params": base_params}, ids, **kw))
    if scan:  # inside the scanned body XLA fuses the block differently once the adapter's (zero) term is there
        np.testing.assert_allclose(same, reference, rtol=0, atol=1e-6 * np.max(np.abs(reference)))
    else:
        np.testing.assert_array_equal(same, reference)
    moved = _randomize_adapters(with_adapters)
    out = np.asarray(adapted.apply({"params": moved}, ids, **kw))
    folded = np.asarray(base.apply({"params": lora.fold(moved, 8.0)}, ids, **kw))
    assert np.max(np.abs(out - np.asarray(base.apply({"params": base_params}, ids, **kw)))) > 1e-2  # adapters act
    assert np.max(np.abs(out - folded)) / np.max(np.abs(out)) < 1e-5


def test_fold_is_w_plus_alpha_over_r_a_b_by_hand():
    rng = np.random.default_rng(0)
    w, a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 3)), rng.standard_normal((3, 5))
    folded = lora.fold({"dense": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.zeros(5),
                                  "lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}, 12.0)
    assert set(folded["dense"]) == {"kernel", "bias"}
    np.testing.assert_allclose(np.asarray(folded["dense"]["kernel"]), w + (12.0 / 3) * a @ b, rtol=1e-5, atol=1e-5)


def test_targets_choose_modules_by_regex_or_all_linear():
    cfg = dataclasses.replace(TINY["llama"], tie_embeddings=False)
    _, p = _init(dataclasses.replace(cfg, lora=LoraConfig(rank=2, targets="attention/(query|value)")))
    layer = p["llama"]["layer_0"]
    assert "lora_a" in layer["attention"]["query"] and "lora_a" in layer["attention"]["value"]
    assert "lora_a" not in layer["attention"]["key"] and "lora_a" not in layer["mlp"]["up"]
    _, p = _init(dataclasses.replace(cfg, lora=LoraConfig(rank=2)))  # all-linear: the trunk's Denses, not lm_head
    assert "lora_a" not in p["lm_head"]
    assert all("lora_a" in p["llama"]["layer_1"]["mlp"][n] for n in ("gate", "up", "down"))


# ---------------------------------------------------------------- PEFT interop


def _hf_model(arch, head, tmp_path):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                       tie_word_embeddings=False, num_labels=3, attn_implementation="eager")
        cls = {"lm": "LlamaForCausalLM", "token_cls": "LlamaForTokenClassification"}[head]
    elif arch == "gpt":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        cls = "GPT2ForTokenClassification"
    else:
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                      attn_implementation="eager")
        cls = {"token_cls": "BertForTokenClassification", "seq_cls": "BertForSequenceClassification"}[head]
    model = getattr(transformers, cls)(cfg).eval()
    model.save_pretrained(str(tmp_path / "base"))
    return model, tmp_path / "base"


PEFT_CASES = {  # arch, head, PEFT task type, target_modules
    "llama_lm_qv": ("llama", "lm", "CAUSAL_LM", ["q_proj", "v_proj"]),
    "llama_token_cls_all": ("llama", "token_cls", "TOKEN_CLS",
                            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "bert_token_cls": ("bert", "token_cls", "TOKEN_CLS", ["query", "value", "dense"]),
    "bert_seq_cls": ("bert", "seq_cls", "SEQ_CLS", ["query", "key"]),
    "gpt2_fused_qkv": ("gpt", "token_cls", "TOKEN_CLS", ["c_attn", "c_fc"]),
}


def _logits(torch_model, ids):
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapters_load_into_jaxfound_and_back_with_equal_logits(case, tmp_path):
    arch, head, task_type, targets = PEFT_CASES[case]
    hf_model, base_dir = _hf_model(arch, head, tmp_path)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                               fan_in_fan_out=arch == "gpt")
    peft_model = peft.get_peft_model(hf_model, peft_cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init: give the adapters (and the head) values that change the output
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ids = _ids()
    theirs = _logits(peft_model, ids)

    base_model, base_params = from_pretrained(base_dir)
    model, params = load_adapter(tmp_path / "peft", base_model, base_params)
    ours = np.asarray(model.apply({"params": params}, ids))
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < TOL

    # trainable parameters: PEFT's count of the same adapter
    trainable, total = lora.count(params, lora.trainable_labels(params, arch))
    peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()
    # GPT-2's fused c_attn shares one A among query / key / value; jaxfound's separate layers hold it thrice
    shared_a_copies = 2 * 2 * 32 * 4 if arch == "gpt" else 0  # (3 - 1) copies x layers x hidden x rank
    assert trainable == peft_trainable + shared_a_copies

    # jaxfound writes it back; PEFT loads that onto a fresh base model with the same logits
    save_adapter(tmp_path / "ours", model, params, base=str(base_dir))
    fresh = type(hf_model).from_pretrained(str(base_dir)).eval()
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
    again = _logits(reloaded, ids)
    assert np.max(np.abs(again - ours)) / np.max(np.abs(ours)) < TOL
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8.0 and written["task_type"] == task_type


def test_jaxfound_adapter_trained_from_scratch_loads_in_peft_with_equal_logits(tmp_path):
    """An adapter jaxfound made (random A and B on all-linear) on its own params, saved as transformers + PEFT."""
    from jaxfound.interop.hf import save_pretrained

    cfg = dataclasses.replace(TINY["llama"], tie_embeddings=True)
    base, base_params = _init(cfg)
    save_pretrained(tmp_path / "base", base, base_params)
    adapted = build_model(dataclasses.replace(cfg, lora=LoraConfig(rank=3, alpha=6.0)), "lm")
    params = _randomize_adapters(nn.unbox(adapted.init(jax.random.key(2), _ids())["params"]))
    params = lora.combine(base_params, lora.split(params)[1])
    save_adapter(tmp_path / "adapter", adapted, params, base=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    theirs = _logits(peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval(), _ids())
    ours = np.asarray(adapted.apply({"params": params}, _ids()))
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < TOL
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_bad_adapter_dirs_are_named(tmp_path):
    with pytest.raises(JaxfoundError, match="adapter_config.json"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(JaxfoundError, match="LORA"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}')
    with pytest.raises(JaxfoundError, match="use_dora"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(JaxfoundError, match="not valid JSON"):
        read_adapter_config(tmp_path)


def test_lora_config_errors_name_the_key(tmp_path):
    with pytest.raises(JaxfoundError, match="train.lora.targets"):
        load_config(None, ["train.lora.rank=4", "train.lora.targets=(unclosed"])
    with pytest.raises(JaxfoundError, match="train.lora.bogus"):
        load_config(None, ["train.lora.bogus=1"])
    with pytest.raises(JaxfoundError, match="rank >= 0"):
        load_config(None, ["train.lora.rank=-1"])
    assert load_config(None, ["train.lora.rank=8", "train.lora.alpha=32"]).train.lora == LoraConfig(8, 32.0)


# ---------------------------------------------------------------- fine-tuning with adapters


@pytest.fixture(scope="module")
def lora_ner_run(tmp_path_factory):
    from jaxfound.app.finetune import finetune
    from tests.test_finetune import tiny_bert_dir, write_toy_conll

    root = tmp_path_factory.mktemp("lora_ner")
    base = tiny_bert_dir(root / "base")
    train = write_toy_conll(root / "train.txt", 240, seed=1)
    valid = write_toy_conll(root / "valid.txt", 64, seed=2)
    cfg = load_config(None, [
        f"run.dir={root / 'run'}", f"model.init={base}", f"data.train={train}", f"data.valid={valid}",
        f"data.test={valid}", "data.seq_len=32", "train.task=ner", "train.epochs=6", "train.batch_size=16",
        "train.lr=3e-2", "train.warmup_ratio=0.1", "checkpoint.every=0", "model.dropout=0.0",
        "train.lora.rank=8", "train.lora.alpha=16", "train.lora.dropout=0.1",
    ])
    return {"root": root, "base": base, "valid": valid, "summary": finetune(cfg), "run": root / "run"}


def test_lora_finetune_trains_adapters_and_head_only(lora_ner_run):
    from jaxfound import checkpoint as ckpt
    from jaxfound.interop.hf import read_weights

    s = lora_ner_run["summary"]
    assert s["first_eval"]["f1"] < 0.3 and s["reports"]["test"]["f1"] > 0.8
    # PEFT's count for the same adapter: all linear layers of the encoder, the classifier trained in full
    hf = transformers.AutoModelForTokenClassification.from_pretrained(str(lora_ner_run["base"]), num_labels=5,
                                                                     ignore_mismatched_sizes=True)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, task_type="TOKEN_CLS",
                                                         target_modules=["query", "key", "value", "dense"]))
    assert s["trainable_params"] == peft_model.get_nb_trainable_parameters()[0]
    # AdamW's two float32 moments for the trainable leaves only (plus step counters), none for the frozen trunk
    assert 8 * s["trainable_params"] <= s["optimizer_state_bytes"] <= 8 * s["trainable_params"] + 64
    last = ckpt.latest_params(lora_ner_run["run"])
    base, adapters = lora.split(last["bert"])
    raw = read_weights(lora_ner_run["base"])
    np.testing.assert_array_equal(np.asarray(base["layer_1"]["attention"]["query"]["kernel"]),
                                  raw["bert.encoder.layer.1.attention.self.query.weight"].T)  # frozen, bitwise
    assert float(np.max(np.abs(np.asarray(adapters["layer_1"]["attention"]["query"]["lora_b"])))) > 1e-4


def test_lora_run_exports_a_peft_adapter_with_its_predictions(lora_ner_run, tmp_path):
    from jaxfound import runs
    from jaxfound.cli import main

    assert main(["export", "--run", str(lora_ner_run["run"]), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    run = runs.open_run(lora_ner_run["run"])  # adapters folded in: a plain model
    assert run.config.model.lora.rank == 0 and "lora_a" not in run.params["bert"]["layer_0"]["attention"]["query"]
    ids = _ids(vocab=run.config.model.vocab_size, L=16)
    ours = np.asarray(run.model.apply({"params": run.params}, ids))
    hf = transformers.AutoModelForTokenClassification.from_pretrained(  # the base's own 2-label head is replaced
        str(lora_ner_run["base"]), num_labels=5, ignore_mismatched_sizes=True).eval()
    theirs = _logits(peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval(), ids)
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < TOL
    adapter_run = runs.open_run(tmp_path / "adapter")  # the PEFT dir opens on its base model
    assert adapter_run.kind == "adapter"
    again = np.asarray(adapter_run.model.apply({"params": adapter_run.params}, ids))
    assert np.max(np.abs(again - ours)) / np.max(np.abs(ours)) < 1e-5
