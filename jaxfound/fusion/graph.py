"""The knowledge graph of models, datasets, tasks and tokenizers, in python-igraph, saved as plain JSON.

Functions over an `igraph.Graph` rather than a Registry class: the graph is a value a user can query
with igraph directly, and the only I/O is `load` / `save` (atomic, never pickle) and `content_hash`.
Vertices carry `kind` and a unique `name` plus JSON-serialisable attributes; edges carry `relation`
and point from the derived thing to its source (model --finetuned_from--> base, task --defined_on--> dataset).
"""

import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import igraph as ig
import jax

from jaxfound.errors import JaxfoundError
from jaxfound.fusion.merge import split_trunk
from jaxfound.models import scan

GRAPH_FILE = "graph.json"
FORMAT = "jaxfound-graph/1"
KINDS = ("model", "adapter", "dataset", "task", "tokenizer")
MODELS = ("model", "adapter")  # what can be trained, scored, merged: whole models and LoRA adapters on a base
# relation -> (source kind(s), target kind(s))
RELATIONS = {
    "pretrained_on": ("model", "dataset"),
    "finetuned_from": (MODELS, MODELS),
    "adapter_of": ("adapter", MODELS),  # a LoRA adapter and the base it was trained on (rank, targets, base hash)
    "trained_on": (MODELS, "dataset"),
    "evaluated_on": (MODELS, "task"),
    "merged_from": (MODELS, MODELS),
    "quantized_from": ("model", MODELS),
    "defined_on": ("task", "dataset"),
    "tokenized_with": (MODELS, "tokenizer"),
    "head_refit_on": (MODELS, "dataset"),  # a merged model's task head trained again on the dataset (a probe)
}
PARENT_RELATIONS = ("finetuned_from", "adapter_of", "merged_from", "quantized_from")
KIND_COLORS = {"model": "#4c72b0", "adapter": "#64b5cd", "dataset": "#55a868", "task": "#dd8452",
               "tokenizer": "#8172b3"}


# ---------------------------------------------------------------- building


def new_graph() -> ig.Graph:
    """An empty directed knowledge graph."""
    return ig.Graph(directed=True)


def vertex(g: ig.Graph, name: str, kind: str | tuple[str, ...] | None = None) -> ig.Vertex:
    """The vertex called name (of that kind or one of those kinds, when given), or a JaxfoundError listing what
    exists."""
    kinds = (kind,) if isinstance(kind, str) else kind
    found = g.vs.select(name_eq=name) if g.vcount() else []
    what = " or ".join(kinds) if kinds else "vertex"
    if not found:
        known = [v["name"] for v in g.vs if kinds is None or v["kind"] in kinds]
        raise JaxfoundError(f"no {what} named '{name}' in the graph; known: {known}")
    v = found[0]
    if kinds is not None and v["kind"] not in kinds:
        raise JaxfoundError(f"'{name}' is a {v['kind']}, not a {what}")
    return v


def models(g: ig.Graph) -> list[ig.Vertex]:
    """Every model and adapter vertex."""
    return list(g.vs.select(kind_in=MODELS)) if g.vcount() else []


def attr(item: ig.Vertex | ig.Edge, key: str):
    """item[key], or None where no vertex (edge) of the graph has that attribute yet."""
    return item.attributes().get(key)


def has(g: ig.Graph, name: str) -> bool:
    return g.vcount() > 0 and len(g.vs.select(name_eq=name)) > 0


def _add_vertex(g: ig.Graph, kind: str, name: str, attrs: Mapping) -> ig.Vertex:
    if kind not in KINDS:
        raise JaxfoundError(f"vertex kind '{kind}' is unknown; valid kinds: {', '.join(KINDS)}")
    if not isinstance(name, str) or not name:
        raise JaxfoundError(f"vertex name must be a non-empty string, got {name!r}")
    if has(g, name):
        raise JaxfoundError(f"a vertex named '{name}' already exists ({vertex(g, name)['kind']}); names are unique")
    clean = {k: v for k, v in attrs.items() if v is not None}
    try:
        json.dumps(clean)
    except TypeError as e:
        raise JaxfoundError(f"attributes of '{name}' must be JSON-serialisable: {e}") from None
    return g.add_vertex(name=name, kind=kind, **clean)


def add_model(g: ig.Graph, name: str, *, path: str | None = None, arch: str | None = None,
              signature: str | None = None, content_hash: str | None = None, created: str | None = None,
              **attrs) -> ig.Vertex:
    """A model vertex; signature is `trunk_signature(params)`, content_hash is `content_hash(path)`."""
    created = created or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return _add_vertex(g, "model", name, dict(path=path, arch=arch, signature=signature,
                                              content_hash=content_hash, created=created, **attrs))


def add_edge(g: ig.Graph, source: str, target: str, relation: str, **attrs) -> ig.Edge:
    """source --relation--> target, checked against the kinds RELATIONS allows."""
    if relation not in RELATIONS:
        raise JaxfoundError(f"relation '{relation}' is unknown; valid relations: {', '.join(RELATIONS)}")
    src_kinds, dst_kinds = RELATIONS[relation]
    s, t = vertex(g, source, src_kinds), vertex(g, target, dst_kinds)
    return g.add_edge(s.index, t.index, relation=relation, **{k: v for k, v in attrs.items() if v is not None})


def ensure(g: ig.Graph, kind: str, name: str) -> None:
    if not has(g, name):
        _add_vertex(g, kind, name, {})
    else:
        vertex(g, name, kind)


def record_score(g: ig.Graph, model: str, task: str, metric: str, value: float, split: str = "test") -> None:
    """model --evaluated_on--> task with (metric, split, value), replacing an earlier score of the same key."""
    m, t = vertex(g, model, MODELS), vertex(g, task, "task")
    old = [e.index for e in out_edges(g, m, ["evaluated_on"])
           if e.target == t.index and attr(e, "metric") == metric and attr(e, "split") == split]
    g.delete_edges(old)
    add_edge(g, model, task, "evaluated_on", metric=metric, split=split, value=float(value))


def register_pretrain(g: ig.Graph, model: str, path: str | None, dataset: str, *, tokenizer: str | None = None,
                      **attrs) -> ig.Vertex:
    """A pretrained base model with its corpus (and tokenizer), creating those vertices if new."""
    v = add_model(g, model, path=path, **attrs)
    ensure(g, "dataset", dataset)
    add_edge(g, model, dataset, "pretrained_on")
    if tokenizer is not None:
        ensure(g, "tokenizer", tokenizer)
        add_edge(g, model, tokenizer, "tokenized_with")
    return v


def register_finetune(g: ig.Graph, model: str, path: str | None, base: str, dataset: str, task: str,
                      scores: Mapping[str, float] | None = None, split: str = "test", **attrs) -> ig.Vertex:
    """A fine-tuned model: finetuned_from base, trained_on dataset, evaluated_on task with scores {metric: value}."""
    base_v = vertex(g, base, MODELS)
    # a fine-tune keeps its base's trunk unless told otherwise (e.g. a resized vocabulary)
    attrs = {"arch": attr(base_v, "arch"), "signature": attr(base_v, "signature")} | attrs
    v = add_model(g, model, path=path, **attrs)
    add_edge(g, model, base, "finetuned_from")
    _trained_for(g, model, dataset, task, scores, split)
    return v


def _trained_for(g: ig.Graph, model: str, dataset: str, task: str, scores: Mapping[str, float] | None,
                 split: str) -> None:
    """model trained_on dataset, evaluated_on task (defined_on dataset) with scores {metric: value} on split."""
    ensure(g, "dataset", dataset)
    add_edge(g, model, dataset, "trained_on")
    ensure(g, "task", task)
    task_v, dataset_v = vertex(g, task), vertex(g, dataset)
    if not any(e.target == dataset_v.index for e in out_edges(g, task_v, ["defined_on"])):
        add_edge(g, task, dataset, "defined_on")
    for metric, value in (scores or {}).items():
        record_score(g, model, task, metric, value, split)


def register_adapter(g: ig.Graph, adapter: str, path: str | None, base: str, dataset: str, task: str, *,
                     rank: int, alpha: float, targets: str, base_hash: str | None = None,
                     scores: Mapping[str, float] | None = None, split: str = "test", **attrs) -> ig.Vertex:
    """A LoRA adapter: adapter_of its base (rank, alpha, targets and the base's content hash on the edge), trained_on
    dataset, evaluated_on task; it shares the base's arch and trunk signature, so it merges with the base's other
    fine-tunes and adapters (runs open an adapter run with its adapters folded in)."""
    base_v = vertex(g, base, MODELS)
    attrs = {"arch": attr(base_v, "arch"), "signature": attr(base_v, "signature")} | attrs
    v = _add_vertex(g, "adapter", adapter, dict(path=path, rank=rank, alpha=alpha, targets=targets, created=(
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")), **attrs))
    add_edge(g, adapter, base, "adapter_of", rank=rank, alpha=alpha, targets=targets, base_hash=base_hash)
    _trained_for(g, adapter, dataset, task, scores, split)
    return v


def register_merge(g: ig.Graph, model: str, path: str | None, sources: Mapping[str, float], method: str,
                   **attrs) -> ig.Vertex:
    """A merged model: merged_from each source with (method, coefficient)."""
    first = vertex(g, next(iter(sources)), MODELS) if sources else None
    if first is None:
        raise JaxfoundError(f"register_merge '{model}': sources is empty; give {{model name: coefficient}}")
    attrs = {"arch": attr(first, "arch"), "signature": attr(first, "signature")} | attrs
    v = add_model(g, model, path=path, merge_method=method, **attrs)
    for source, coefficient in sources.items():
        add_edge(g, model, source, "merged_from", method=method, coefficient=float(coefficient))
    return v


def record_head_refit(g: ig.Graph, model: str, dataset: str, task: str, **hyper) -> ig.Edge:
    """model --head_refit_on--> dataset with the task and the re-fit's hyper-parameters: what was trained after a
    merge, so the lineage says the head is not the parents'."""
    vertex(g, model, MODELS)
    vertex(g, task, "task")
    ensure(g, "dataset", dataset)
    return add_edge(g, model, dataset, "head_refit_on", task=task, **hyper)


def task_datasets(g: ig.Graph, task: str) -> list[str]:
    """The datasets task is defined on."""
    return [g.vs[e.target]["name"] for e in out_edges(g, vertex(g, task, "task"), ["defined_on"])]


def register_quantize(g: ig.Graph, model: str, path: str | None, source: str, method: str = "int8",
                      **attrs) -> ig.Vertex:
    """A quantized model; its signature differs from the source's, so it is never offered for merging."""
    src = vertex(g, source, MODELS)
    v = add_model(g, model, path=path, arch=attr(src, "arch"), quantization=method, **attrs)
    add_edge(g, model, source, "quantized_from", method=method)
    return v


# ---------------------------------------------------------------- fingerprints


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint file, or over every file of a directory (relative path and bytes, sorted)."""
    root = Path(path)
    if not root.exists():
        raise JaxfoundError(f"cannot hash checkpoint '{root}': no such file or directory")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def trunk_signature(params) -> str:
    """sha256 of the trunk's (path, shape, dtype) list: equal signatures mean the trunks can be merged. A scanned
    trunk (model.scan_layers) is described unrolled, so both layouts of one model have one signature."""
    if scan.is_scanned(params):
        params = jax.eval_shape(scan.unstack_layers, params)
    key, trunk, _ = split_trunk(params)
    spec = [(jax.tree_util.keystr(p), list(x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(trunk)[0]]
    return hashlib.sha256(json.dumps([key, spec]).encode()).hexdigest()


# ---------------------------------------------------------------- persistence


def to_dict(g: ig.Graph) -> dict:
    """Plain JSON-ready form: vertices by name, edges by (source, target) names."""
    def attrs(seq_item):
        return {k: v for k, v in seq_item.attributes().items() if v is not None}

    vertices = [attrs(v) for v in g.vs]
    edges = [{"source": g.vs[e.source]["name"], "target": g.vs[e.target]["name"], **attrs(e)} for e in g.es]
    return {"format": FORMAT, "vertices": vertices, "edges": edges}


def from_dict(data: Mapping, source: str = "<dict>") -> ig.Graph:
    """Rebuild a graph from to_dict's form; every problem names source and the offending entry."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise JaxfoundError(f"{source}: not a jaxfound graph (expected an object with \"format\": \"{FORMAT}\")")
    for key in ("vertices", "edges"):
        if not isinstance(data.get(key, []), list):
            raise JaxfoundError(f"{source}: '{key}' must be a list, got {type(data[key]).__name__}")
    g = new_graph()
    for i, v in enumerate(data.get("vertices", [])):
        if not isinstance(v, Mapping) or "name" not in v or "kind" not in v:
            raise JaxfoundError(f"{source}: vertex {i} needs 'name' and 'kind', got {v!r}")
        try:
            _add_vertex(g, v["kind"], v["name"], {k: x for k, x in v.items() if k not in ("name", "kind")})
        except JaxfoundError as e:
            raise JaxfoundError(f"{source}: vertex {i}: {e}") from None
    for i, e in enumerate(data.get("edges", [])):
        if not isinstance(e, Mapping) or not {"source", "target", "relation"} <= set(e):
            raise JaxfoundError(f"{source}: edge {i} needs 'source', 'target' and 'relation', got {e!r}")
        for end in ("source", "target"):
            if not has(g, e[end]):
                raise JaxfoundError(f"{source}: edge {i} ({e['relation']}) points to '{e[end]}', which is not a vertex")
        try:
            add_edge(g, e["source"], e["target"], e["relation"],
                     **{k: x for k, x in e.items() if k not in ("source", "target", "relation")})
        except JaxfoundError as err:
            raise JaxfoundError(f"{source}: edge {i}: {err}") from None
    return g


def save(g: ig.Graph, registry_dir: str | os.PathLike) -> Path:
    """Write registry_dir/graph.json atomically (temp file + os.replace); returns the file path."""
    directory = Path(registry_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / GRAPH_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".graph-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_dict(g), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def load(registry_dir: str | os.PathLike, create: bool = False) -> ig.Graph:
    """Read registry_dir/graph.json; with create, a missing file gives an empty graph."""
    path = Path(registry_dir) / GRAPH_FILE
    if not path.exists():
        if create:
            return new_graph()
        raise JaxfoundError(f"{path}: no knowledge graph here; pass create=True to start an empty one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise JaxfoundError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise JaxfoundError(f"{path}: not UTF-8 text (byte {e.start}); a registry graph is a JSON file") from None
    return from_dict(data, str(path))


def write_graphml(g: ig.Graph, path: str | os.PathLike) -> None:
    """GraphML export for other tools; non-scalar attributes become JSON strings, missing ones ''."""
    h = g.copy()
    for seq in (h.vs, h.es):
        for key in seq.attributes():
            seq[key] = [x if isinstance(x, (str, int, float, bool)) else ("" if x is None else json.dumps(x))
                        for x in seq[key]]
    h.write_graphml(str(path))


# ---------------------------------------------------------------- queries


def out_edges(g: ig.Graph, v: ig.Vertex, relations: Iterable[str]) -> list[ig.Edge]:
    relations = set(relations)
    return [g.es[i] for i in sorted(g.incident(v.index, mode="out")) if g.es[i]["relation"] in relations]


def in_edges(g: ig.Graph, v: ig.Vertex, relations: Iterable[str]) -> list[ig.Edge]:
    relations = set(relations)
    return [g.es[i] for i in sorted(g.incident(v.index, mode="in")) if g.es[i]["relation"] in relations]


def lineage(g: ig.Graph, model: str) -> list[str]:
    """Ancestors, nearest first (breadth-first, edges in insertion order), through fine-tune/merge/quantize
    edges and ending with pretraining corpora; a merged model's re-fitted heads add the data they were fitted on."""
    start = vertex(g, model, MODELS)
    order, seen, frontier = [], {start.index}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in out_edges(g, v, PARENT_RELATIONS + ("pretrained_on", "head_refit_on")):
                if e.target not in seen:
                    seen.add(e.target)
                    order.append(g.vs[e.target]["name"])
                    nxt.append(g.vs[e.target])
        frontier = nxt
    return order


def root_model(g: ig.Graph, model: str) -> str | None:
    """The pretrained model every line of descent of model leads to (None when merged across bases)."""
    v = vertex(g, model, MODELS)
    parents = [g.vs[e.target]["name"] for e in out_edges(g, v, PARENT_RELATIONS)]
    if not parents:
        return model
    roots = {root_model(g, p) for p in parents}
    return roots.pop() if len(roots) == 1 else None


def compatible_models(g: ig.Graph, base: str) -> list[str]:
    """Models descending from the pretrained base whose arch and trunk signature match it (merge candidates)."""
    b = vertex(g, base, MODELS)
    return [v["name"] for v in models(g)
            if v["name"] != base and attr(v, "arch") == attr(b, "arch") and attr(v, "signature") == attr(b, "signature")
            and root_model(g, v["name"]) == base]


def scores(g: ig.Graph, model: str) -> list[dict]:
    """Every recorded score of model: [{task, metric, split, value}]."""
    v = vertex(g, model, MODELS)
    return [{"task": g.vs[e.target]["name"], "metric": e["metric"], "split": e["split"], "value": e["value"]}
            for e in out_edges(g, v, ["evaluated_on"])]


def best_model(g: ig.Graph, task: str, metric: str, split: str | None = None,
               higher_is_better: bool = True) -> tuple[str, float]:
    """(model, value) with the best recorded metric on task (and split, when given)."""
    t = vertex(g, task, "task")
    evals = in_edges(g, t, ["evaluated_on"])
    found = [(g.vs[e.source]["name"], e["value"]) for e in evals
             if e["metric"] == metric and (split is None or e["split"] == split)]
    if not found:
        metrics = sorted({e["metric"] for e in evals})
        raise JaxfoundError(f"no model has '{metric}' recorded on task '{task}'; recorded metrics: {metrics}")
    return (max if higher_is_better else min)(found, key=lambda nv: nv[1])


def related_tasks(g: ig.Graph, task: str) -> list[str]:
    """Other tasks defined on at least one dataset that task is defined on."""
    t = vertex(g, task, "task")
    datasets = [g.vs[e.target] for e in out_edges(g, t, ["defined_on"])]
    return sorted({g.vs[e.source]["name"] for d in datasets for e in in_edges(g, d, ["defined_on"])
                   if e.source != t.index})


# ---------------------------------------------------------------- rendering


def plot(g: ig.Graph, path: str | os.PathLike, bbox: tuple[int, int] = (1200, 900)) -> Path:
    """Render to PNG (or SVG/PDF by suffix): vertices coloured by kind, edges labelled by relation."""
    if g.vcount() == 0:
        raise JaxfoundError(f"cannot plot '{path}': the graph is empty")
    ig.plot(
        g,
        target=str(path),
        bbox=bbox,
        margin=80,
        layout=g.layout("kk"),  # deterministic: starts from a circle
        vertex_color=[KIND_COLORS[k] for k in g.vs["kind"]],
        vertex_label=g.vs["name"],
        vertex_size=28,
        vertex_label_dist=1.6,
        edge_label=g.es["relation"] if g.ecount() else None,
        edge_label_size=9,
        edge_arrow_size=0.8,
    )
    return Path(path)
