"""Knowledge graph: building, JSON round trip, lineage and merge-candidate queries, errors naming the file, PNG."""

import hashlib
import json

import igraph as ig
import jax.numpy as jnp
import pytest

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph as G


@pytest.fixture
def g():
    g = G.new_graph()
    G.register_pretrain(g, "bert-tiny", "ckpt/bert-tiny", "wiki-mini", tokenizer="wordpiece-8k", arch="bert",
                        signature="sigA", sizes={"layers": 2, "embed": 64}, created="2025-01-01T00:00:00+00:00")
    G.register_finetune(g, "bert-ner", "ckpt/ner", "bert-tiny", "conll", "ner", {"f1": 0.81})
    G.register_finetune(g, "bert-pos", "ckpt/pos", "bert-tiny", "conll", "pos", {"accuracy": 0.90})
    G.register_finetune(g, "bert-ner-2", "ckpt/ner2", "bert-tiny", "conll", "ner", {"f1": 0.85})
    G.register_finetune(g, "bert-cls", "ckpt/cls", "bert-tiny", "sst2", "sentiment", {"accuracy": 0.88})
    G.register_finetune(g, "bert-bigvocab", "ckpt/bv", "bert-tiny", "conll", "ner", {"f1": 0.5}, signature="sigX")
    G.register_merge(g, "soup", "ckpt/soup", {"bert-ner": 0.5, "bert-ner-2": 0.5}, method="linear")
    G.record_score(g, "soup", "ner", "f1", 0.86)
    G.register_quantize(g, "soup-int8", "ckpt/soup8", "soup")
    G.register_pretrain(g, "gpt-tiny", None, "web", arch="gpt", signature="sigB")
    G.register_finetune(g, "gpt-cls", None, "gpt-tiny", "sst2", "sentiment", {"accuracy": 0.80})
    G.register_pretrain(g, "bert-wide", None, "wiki-mini", arch="bert", signature="sigC")
    G.register_finetune(g, "bert-wide-ner", None, "bert-wide", "conll", "ner", {"f1": 0.83}, split="dev")
    return g


def test_vertices_have_kinds_and_attributes(g):
    assert G.vertex(g, "conll")["kind"] == "dataset"
    assert G.vertex(g, "wordpiece-8k")["kind"] == "tokenizer"
    assert G.vertex(g, "bert-ner")["signature"] == "sigA"  # inherited from its base
    assert G.vertex(g, "bert-tiny")["sizes"] == {"layers": 2, "embed": 64}
    merged = [e for e in g.es if e["relation"] == "merged_from"]
    assert [(e["method"], e["coefficient"]) for e in merged] == [("linear", 0.5), ("linear", 0.5)]


def test_save_load_round_trip(g, tmp_path):
    path = G.save(g, tmp_path / "registry")
    assert path.name == "graph.json" and json.loads(path.read_text())["format"] == G.FORMAT
    assert [p.name for p in path.parent.iterdir()] == ["graph.json"]  # the temp file was renamed away
    again = G.load(tmp_path / "registry")
    assert G.to_dict(again) == G.to_dict(g)
    assert G.lineage(again, "soup-int8") == G.lineage(g, "soup-int8")


def test_lineage_is_nearest_first(g):
    assert G.lineage(g, "soup-int8") == ["soup", "bert-ner", "bert-ner-2", "bert-tiny", "wiki-mini"]
    assert G.lineage(g, "bert-tiny") == ["wiki-mini"]


def test_compatible_models_share_root_and_signature(g):
    # excludes: the int8 copy (no float trunk), bert-bigvocab (other shape), bert-wide-ner and gpt-cls (other base)
    assert G.compatible_models(g, "bert-tiny") == ["bert-ner", "bert-pos", "bert-ner-2", "bert-cls", "soup"]
    assert G.compatible_models(g, "gpt-tiny") == ["gpt-cls"]


def test_best_model_and_scores(g):
    assert G.best_model(g, "ner", "f1") == ("soup", 0.86)
    assert G.best_model(g, "ner", "f1", split="dev") == ("bert-wide-ner", 0.83)
    assert G.best_model(g, "ner", "f1", higher_is_better=False) == ("bert-bigvocab", 0.5)
    G.record_score(g, "bert-ner", "ner", "f1", 0.9)  # replaces the 0.81 of the same (metric, split)
    assert G.scores(g, "bert-ner") == [{"task": "ner", "metric": "f1", "split": "test", "value": 0.9}]
    assert G.best_model(g, "ner", "f1") == ("bert-ner", 0.9)
    with pytest.raises(JaxfoundError, match=r"no model has 'bleu' recorded on task 'ner'; recorded metrics: \['f1'\]"):
        G.best_model(g, "ner", "bleu")


def test_related_tasks_share_a_dataset(g):
    assert G.related_tasks(g, "ner") == ["pos"]
    assert G.related_tasks(g, "sentiment") == []


def test_building_errors_name_what_is_valid(g):
    with pytest.raises(JaxfoundError, match="relation 'distilled_from' is unknown; valid relations: pretrained_on"):
        G.add_edge(g, "bert-ner", "bert-tiny", "distilled_from")
    with pytest.raises(JaxfoundError, match="'conll' is a dataset, not a model"):
        G.add_edge(g, "bert-ner", "conll", "finetuned_from")
    with pytest.raises(JaxfoundError, match="'bert-ner' already exists"):
        G.add_model(g, "bert-ner")
    with pytest.raises(JaxfoundError, match="no model or adapter named 'bert-huge'"):
        G.register_finetune(g, "x", None, "bert-huge", "conll", "ner")


@pytest.mark.parametrize("text,message", [
    ("{not json", "malformed JSON at line 1"),
    ('{"format": "something-else"}', "not a jaxfound graph"),
    ('{"format": "jaxfound-graph/1", "vertices": [{"name": "a", "kind": "optimizer"}]}',
     "vertex 0: vertex kind 'optimizer' is unknown; valid kinds: model, adapter, dataset, task, tokenizer"),
    ('{"format": "jaxfound-graph/1", "vertices": [{"name": "a", "kind": "model"}],'
     ' "edges": [{"source": "a", "target": "ghost", "relation": "finetuned_from"}]}',
     "edge 0 \\(finetuned_from\\) points to 'ghost', which is not a vertex"),
])
def test_malformed_file_error_names_the_file(tmp_path, text, message):
    (tmp_path / "graph.json").write_text(text)
    with pytest.raises(JaxfoundError, match=f"{tmp_path / 'graph.json'}: .*{message}"):
        G.load(tmp_path)


def test_missing_registry_needs_create(tmp_path):
    with pytest.raises(JaxfoundError, match="graph.json: no knowledge graph here"):
        G.load(tmp_path)
    assert G.load(tmp_path, create=True).vcount() == 0


def test_content_hash_covers_names_and_bytes(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"hello")
    assert G.content_hash(ckpt) == hashlib.sha256(b"a.bin\0hello").hexdigest()
    assert G.content_hash(ckpt / "a.bin") == hashlib.sha256(b"a.bin\0hello").hexdigest()
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "b.bin").write_bytes(b"!")
    assert G.content_hash(ckpt) == hashlib.sha256(b"a.bin\0hellosub/b.bin\0!").hexdigest()
    with pytest.raises(JaxfoundError, match="cannot hash checkpoint .*nope"):
        G.content_hash(tmp_path / "nope")


def test_trunk_signature_ignores_heads_and_sees_shapes():
    a = {"bert": {"w": jnp.zeros((2, 3))}, "classifier": {"k": jnp.zeros((3, 5))}}
    b = {"bert": {"w": jnp.ones((2, 3))}, "classifier": {"k": jnp.zeros((3, 2))}}
    c = {"bert": {"w": jnp.zeros((2, 4))}}
    assert G.trunk_signature(a) == G.trunk_signature(b) != G.trunk_signature(c)


def test_plot_writes_png_and_graphml_exports(g, tmp_path):
    png = G.plot(g, tmp_path / "graph.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    G.write_graphml(g, tmp_path / "graph.graphml")
    back = ig.Graph.Read_GraphML(str(tmp_path / "graph.graphml"))
    assert (back.vcount(), back.ecount()) == (g.vcount(), g.ecount())
    assert json.loads(back.vs.find(name="bert-tiny")["sizes"]) == {"layers": 2, "embed": 64}
