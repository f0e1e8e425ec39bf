"""The run directory: kinds told from the files alone, write_run / open_run round trips, atomic JSON."""

import json

import jax
import numpy as np
import pytest

from jaxfound.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model
from jaxfound.quant import quantize
from jaxfound.runs import kind_of, open_run, read_metrics, write_json, write_run

TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position=16,
                   num_labels=3, dropout=0.0)


@pytest.fixture(scope="module")
def params():
    import flax.linen as nn
    import jax.numpy as jnp

    model = build_model(TINY, "token_cls")
    return nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_write_run_then_open_run_round_trips_each_kind(tmp_path, params):
    config = Config(model=TINY, train=TrainConfig(task="ner"))
    write_run(tmp_path / "ft", config, params, labels=["B", "I", "O"])
    write_run(tmp_path / "merged", config, params, labels=["B", "I", "O"], reports={"merge.json": {"method": "x"}})
    write_run(tmp_path / "q", config, quantize(params), labels=["B", "I", "O"], quant={"mode": "w8"})
    assert [kind_of(tmp_path / d) for d in ("ft", "merged", "q")] == ["finetuned", "merged", "quantized"]
    run = open_run(tmp_path / "ft")
    assert run.labels == ["B", "I", "O"] and run.task.name == "ner" and run.model.head == "token_cls"
    assert _same(run.params, params)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["run"]["dir"] == str((tmp_path / "ft").resolve()) and saved["data"]["seq_len"] == 16  # <= positions
    assert _same(open_run(tmp_path / "q").params, quantize(params))
    from jaxfound.cli import main

    assert main(["export", "--run", str(tmp_path / "q"), "--out", str(tmp_path / "hf")]) == 2  # int8: no export
    assert not (tmp_path / "hf").exists()


def test_a_conll_column_run_reopens_as_its_task(tmp_path, params):
    config = Config(model=TINY, train=TrainConfig(task="ner"), data=DataConfig(tag_column=1))
    write_run(tmp_path / "pos", config, params, labels=["DT", "NN", "VB"])
    assert open_run(tmp_path / "pos").task.name == "pos"


def test_a_transformers_dir_is_its_own_kind(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert kind_of(tmp_path) == "transformers"


@pytest.mark.parametrize("files,match", [({}, "no config.json"), ({"config.json": "{oops"}, r"config.json:1: invalid"),
                                         ({"config.json": '{"run": {}, "model": {}}'}, "no params")])
def test_what_is_not_a_run_dir_says_why(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(JaxfoundError, match=match):
        kind_of(tmp_path)


def test_write_json_is_whole_and_metrics_skip_a_cut_line(tmp_path):
    write_json(tmp_path / "summary.json", {"loss": np.float32(0.5), "path": tmp_path})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"loss": 0.5, "path": str(tmp_path)}
    assert not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
