"""A Llama-style decoder through the pipeline: pretrained by jaxfound, fine-tuned for NER from that run, recorded
in the knowledge graph with its base, and both runs served over HTTP."""

import json
from pathlib import Path

import httpx

from jaxfound.app import evaluate
from jaxfound.app import generate as generate_app
from jaxfound.app.serve import Background, ServeOptions, Server, open_servable
from jaxfound.cli import main
from jaxfound.fusion import graph
from jaxfound.runs import open_run
from tests.test_finetune import write_toy_conll

RECIPE = str(Path(__file__).resolve().parent.parent / "configs" / "llama_tiny_clm.yaml")
TINY = ["data.synthetic_docs=600", "data.seq_len=32", "train.batch_size=8", "model.hidden_size=32",
        "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=64", "model.max_position=64",
        "train.eval_every=1000", "train.eval_batches=2", "data.tokenizer_vocab=512", "train.steps=30"]


def test_llama_run_finetunes_for_ner_is_registered_with_its_base_and_both_serve(tmp_path):
    registry = tmp_path / "registry"
    base = tmp_path / "llama_base"
    assert main(["pretrain", "-c", RECIPE, *TINY, f"run.dir={base}", f"run.registry={registry}"]) == 0
    assert open_run(base).model.cfg.arch == "llama"
    train = write_toy_conll(tmp_path / "train.txt", 160, seed=1)
    valid = write_toy_conll(tmp_path / "valid.txt", 40, seed=2)
    ner = tmp_path / "llama_ner"
    assert main(["finetune", f"model.init={base}", "train.task=ner", f"data.train={train}", f"data.valid={valid}",
                 "data.test=null",
                 f"run.dir={ner}", f"run.registry={registry}", "train.epochs=4", "train.lr=3e-3",
                 "train.batch_size=16", "data.seq_len=32", "checkpoint.every=0"]) == 0
    rows = [json.loads(line) for line in (ner / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses  # it learns the toy tags
    run = open_run(ner)
    assert run.kind == "finetuned" and run.model.cfg.arch == "llama" and run.model.head == "token_cls"
    g = graph.load(registry)
    assert graph.attr(graph.vertex(g, "llama_ner"), "arch") == "llama"
    v = graph.vertex(g, "llama_ner")
    assert [g.vs[e.target]["name"] for e in graph.out_edges(g, v, ["finetuned_from"])] == ["llama_base"]
    assert graph.lineage(g, "llama_ner")[0] == "llama_base"

    # both runs behind jaxfound serve answer what `jaxfound generate` / `jaxfound predict` give
    answers = {}
    for path, route, body in [(base, "/v1/completions", {"prompt": "Acme", "max_tokens": 8, "temperature": 0}),
                              (ner, "/v1/ner", {"input": ["john smith lives in paris today"]})]:
        run, kind = open_servable(path)
        server = Server(run, kind, ServeOptions(max_batch=2, max_len=64), progress=lambda line: None)
        server.compile()
        with Background(server) as url:
            answers[kind] = httpx.post(url + route, json=body, timeout=120).json()
    assert answers["decoder"]["choices"][0]["text"] == generate_app.generate(base, ["Acme"], max_new_tokens=8).texts[0]
    expected = evaluate.predict(ner, ["john smith lives in paris today"])
    expected[0].pop("tags")
    assert answers["ner"]["data"] == expected and expected[0]["entities"]
