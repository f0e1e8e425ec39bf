"""RoBERTa through the pipeline, all through the CLI: pretrained from scratch (byte-level BPE trained on the built-in
corpus), fine-tuned for NER on a CoNLL-2003 subset (words land on the right subwords and predictions come back to the
words), two fine-tunes merged by a mergekit-style recipe into a transformers directory that equals the hand-computed
average, exported, quantized, and kept apart from BERT models by the knowledge graph's plan.

The subset is the first 320 / 64 sentences of ../shared/data/conll2003 (train / valid) when that directory exists
(JAXFOUND_CONLL overrides it), else toy CoNLL sentences from tests/test_finetune.py (same format, IOB1 tags).
"""

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.app import evaluate
from jaxfound.cli import main
from jaxfound.data.conll import read_conll
from jaxfound.data.finetune import encode_words, merge_windows
from jaxfound.fusion import graph
from jaxfound.fusion.plan import plan_merge
from jaxfound.interop.hf import read_weights
from jaxfound.runs import open_run
from tests.test_finetune import write_toy_conll

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "configs" / "roberta_tiny_mlm.yaml")
CONLL = Path(os.environ.get("JAXFOUND_CONLL", ROOT.parent / "shared" / "data" / "conll2003"))
TINY = ["data.synthetic_docs=800", "data.seq_len=32", "model.max_position=130", "train.batch_size=16",
        "model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64", "train.eval_every=1000",
        "train.eval_batches=2", "data.tokenizer_vocab=600", "train.steps=40", "checkpoint.every=0"]


def conll_subset(out: Path, split: str, n: int, seed: int) -> Path:
    """The first n sentences of CoNLL-2003's split (documents markers dropped), else n toy sentences."""
    if not (CONLL / f"{split}.txt").is_file():
        return write_toy_conll(out, n, seed)
    blocks = [b.strip() for b in (CONLL / f"{split}.txt").read_text().split("\n\n")]
    blocks = [b for b in blocks if b and not b.startswith("-DOCSTART-")][:n]
    out.write_text("\n\n".join(blocks) + "\n")
    return out


def _finetune(root: Path, base: Path, registry: Path, name: str, seed: int) -> Path:
    run = root / name
    assert main(["finetune", "-c", str(ROOT / "configs" / "ner_conll03.yaml"), f"model.init={base}",
                 f"data.train={root / 'data' / 'train.txt'}", f"data.valid={root / 'data' / 'valid.txt'}",
                 "data.test=null", "data.seq_len=128", f"run.dir={run}", f"run.registry={registry}",
                 "train.epochs=1", "train.batch_size=16", "train.lr=2e-3", "train.log_every=1",
                 f"train.seed={seed}"]) == 0
    return run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("roberta")
    (root / "data").mkdir()
    conll_subset(root / "data" / "train.txt", "train", 320, seed=1)
    conll_subset(root / "data" / "valid.txt", "valid", 64, seed=2)
    registry, base = root / "registry", root / "base"
    assert main(["pretrain", "-c", RECIPE, *TINY, f"run.dir={base}", f"run.registry={registry}"]) == 0
    ner = [_finetune(root, base, registry, f"ner{i}", seed=i) for i in (1, 2)]
    return {"root": root, "base": base, "ner": ner, "registry": registry}


def test_pretrained_roberta_has_its_tokenizer_and_positions(pipeline):
    run = open_run(pipeline["base"])
    cfg = run.model.cfg
    assert (cfg.arch, cfg.pad_token_id, cfg.type_vocab_size) == ("roberta", 1, 1)
    tok = run.tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    ids = tok("Peter met Smith")["input_ids"]
    assert ids[0] == tok.cls_token_id == 0 and ids[-1] == tok.sep_token_id == 2
    losses = [r["loss"] for r in map(json.loads, (pipeline["base"] / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0]


def test_a_20_step_ner_run_lowers_its_loss(pipeline):
    for run in pipeline["ner"]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert 20 <= len(losses) <= 22, len(losses)  # 320 sentences (a long one may take 2 windows), batch 16
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
        r = open_run(run)
        assert (r.model.cfg.arch, r.model.head) == ("roberta", "token_cls")


def test_word_labels_land_on_the_first_subword_and_come_back(pipeline):
    """Byte-level BPE: each word's first subword carries the leading space it has inside running text; decoding the
    subwords from one word start to the next gives ' ' + the word; labels placed there map back to the words."""
    tok = open_run(pipeline["base"]).tokenizer
    sentences = read_conll(pipeline["root"] / "data" / "valid.txt")
    words = [s.words for s in sentences]
    label_ids = [np.arange(len(w)) % 7 for w in words]  # a distinct-ish label per word, any ids will do
    windows = encode_words(words, label_ids, tok, seq_len=32)
    assert windows.num_split > 0 or max(len(w) for w in words) < 20  # long sentences are windowed, and still align
    checked = 0
    for k, ids in enumerate(windows.input_ids):
        starts = list(np.flatnonzero(windows.word_index[k] >= 0)) + [len(ids) - 1]
        sent = words[windows.sentence[k]]
        for p, nxt in zip(starts[:-1], starts[1:]):
            w = windows.word_index[k][p]
            assert tok.decode(ids[p:nxt]) == " " + sent[w], (tok.convert_ids_to_tokens(ids[p:nxt]), sent[w])
            assert windows.labels[k][p] == label_ids[windows.sentence[k]][w]
            checked += 1
    assert checked >= sum(len(w) for w in words)
    back = merge_windows(windows, windows.labels)  # the gold labels as predictions -> one per word
    assert all(np.array_equal(b, g) for b, g in zip(back, label_ids))


def test_predictions_come_back_as_the_words_of_the_text(pipeline):
    texts = ["EU rejects German call to boycott British lamb .", "Peter Blackburn met  Müller in São Paulo"]
    rows = evaluate.predict(pipeline["ner"][0], texts)
    for text, row in zip(texts, rows):
        assert len(row["tags"]) == len(text.split())
        for e in row["entities"]:  # every entity is a run of whole words of the text
            span = text[e["start"]:e["end"]]
            assert span == e["text"] and " ".join(span.split()) in " ".join(text.split())
            assert text[e["start"] - 1:e["start"]] in ("", " ") and text[e["end"]:e["end"] + 1] in ("", " ")


def test_recipe_merge_of_two_roberta_finetunes_loads_in_transformers_as_the_average(pipeline):
    root, (ner1, ner2) = pipeline["root"], pipeline["ner"]
    recipe = root / "soup.yaml"
    recipe.write_text(f"models:\n  - model: {ner1}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {ner2}\n    parameters: {{weight: 1.0}}\n"
                      "merge_method: linear\nparameters:\n  normalize: true\ndtype: float32\n")
    merged = root / "soup_hf"
    assert main(["merge", "--recipe", str(recipe), "--out", str(merged), "--hf"]) == 0
    for run in (ner1, ner2):
        assert main(["export", "--run", str(run), "--out", str(root / f"{run.name}_hf")]) == 0
    a, b = read_weights(root / "ner1_hf"), read_weights(root / "ner2_hf")
    model = transformers.AutoModelForTokenClassification.from_pretrained(merged).eval()
    assert type(model).__name__ == "RobertaForTokenClassification"
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(a) <= set(state)
    for name in a:  # the hand-computed average, tensor by tensor
        np.testing.assert_allclose(state[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6, err_msg=name)
    # and transformers' logits on a padded batch equal jaxfound's for the merged run
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    enc = tok(["EU rejects German call .", "Peter"], padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(enc["input_ids"]),
                       attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    run = open_run(merged)
    ours = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(enc["input_ids"]),
                                      jnp.asarray(enc["attention_mask"])))
    mask = enc["attention_mask"].astype(bool)
    assert np.max(np.abs(ours[mask] - theirs[mask])) <= 1e-4


def test_quantized_roberta_stays_within_int8_error_of_the_float_run(pipeline):
    ner1, q = pipeline["ner"][0], pipeline["root"] / "ner1_w8a8"
    assert main(["quantize", "--checkpoint", str(ner1), "--mode", "w8a8", "--out", str(q)]) == 0
    fp, int8 = open_run(ner1), open_run(q)
    assert int8.model.cfg.quant == "w8a8" and int8.model.cfg.arch == "roberta"
    words = [s.words for s in read_conll(pipeline["root"] / "data" / "valid.txt")][:16]
    windows = encode_words(words, None, fp.tokenizer, seq_len=128)
    L = max(windows.lengths)
    ids = np.full((len(windows), L), fp.tokenizer.pad_token_id, np.int32)
    for i, row in enumerate(windows.input_ids):
        ids[i, :len(row)] = row
    mask = (ids != fp.tokenizer.pad_token_id).astype(np.int32)
    logits = [np.asarray(r.model.apply({"params": r.params}, jnp.asarray(ids), jnp.asarray(mask)))[mask == 1]
              for r in (fp, int8)]
    rel = np.abs(logits[1] - logits[0]).max() / np.abs(logits[0]).max()
    agree = np.mean(logits[1].argmax(-1) == logits[0].argmax(-1))
    print(f"w8a8 vs float: max|dlogit| / max|logit| = {rel:.4f}, argmax agreement {agree:.3f}")
    assert 0 < rel < 0.05 and agree >= 0.95  # int8 changes the numbers a little, not the tags


def test_the_plan_never_merges_roberta_with_bert(pipeline):
    g = graph.load(pipeline["registry"])
    assert graph.attr(graph.vertex(g, "ner1"), "arch") == "roberta"
    [task] = {s["task"] for s in graph.scores(g, "ner1")}
    # a BERT base and two NER fine-tunes of it on the same dataset, scored higher than the RoBERTa ones
    graph.add_model(g, "bert-base", arch="bert", signature="b" * 64)
    dataset = next(g.vs[e.target]["name"] for e in graph.out_edges(g, graph.vertex(g, "ner1"), ["trained_on"]))
    for i in (1, 2):
        graph.register_finetune(g, f"bert-ner{i}", None, "bert-base", dataset, task, {"f1": 0.99}, split="valid")
    plan = plan_merge(g, task, base="base")
    assert sorted(c.name for c in plan.candidates) == ["ner1", "ner2"]
    reasons = dict(plan.excluded)
    for i in (1, 2):
        assert "architecture 'bert' differs from the base's 'roberta'" in reasons[f"bert-ner{i}"]


def test_finetune_from_the_transformers_copy_replays_the_run_dir_finetune(pipeline):
    """The pretrained run saved as a transformers RobertaForMaskedLM directory and fine-tuned from there (as from any
    RoBERTa checkpoint) gives the same losses as the fine-tune from the run dir: same weights, seed and batches."""
    from jaxfound.interop.hf import save_pretrained

    root, base = pipeline["root"], open_run(pipeline["base"])
    hf_dir = save_pretrained(root / "base_hf", base.model, base.params, tokenizer=base.tokenizer)
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
    run = _finetune(root, hf_dir, root / "registry_hf", "ner1_from_hf", seed=1)
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (run, pipeline["ner"][0])]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
