"""Hostile files and arguments: every malformed input ends in JaxfoundError (library) or exit 2 with one line (CLI).

Property-based (hypothesis): random bytes, invalid UTF-8, empty files, wrong JSON shapes, random YAML, random
key=value overrides, malformed registry graphs, CoNLL files and merge recipes. A case passes if the input is either
accepted (a valid result) or rejected with JaxfoundError; any other exception is an escaped traceback.
The number of generated cases per input kind is printed at the end of the module (run with -s to see it).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxfound.config import _SECTION_TYPES, load_config
from jaxfound.errors import JaxfoundError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=True)
CASES, REJECTED = Counter(), Counter()  # generated cases, and how many of them were rejected, per input kind
_ids = itertools.count()
_kind = [""]


def _case(kind: str) -> None:
    CASES[kind] += 1
    _kind[0] = kind


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print("\nhypothesis cases per input kind (rejected/run):",
          {k: f"{REJECTED[k]}/{n}" for k, n in CASES.items()}, "total", sum(CASES.values()))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def _file(work: Path, data: bytes | str, suffix: str) -> Path:
    path = work / f"case{next(_ids)}{suffix}"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


def _accepts_or_rejects(fn, *args, **kwargs):
    """fn's result, or None if it raised JaxfoundError; any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except JaxfoundError as e:
        assert str(e).strip(), "an error must say what is wrong"
        REJECTED[_kind[0]] += 1
        return None


# ---------------------------------------------------------------- building blocks

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars.filter(lambda x: not (isinstance(x, float) and not math.isfinite(x))),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
invalid_utf8 = st.builds(lambda a, b: a + b"\xff\xfe\xc3(" + b, st.binary(max_size=50), st.binary(max_size=50))


# ---------------------------------------------------------------- corpora (text / JSON lines)

def _docs_ok(docs):
    assert docs is None or (isinstance(docs, list) and docs and all(isinstance(d, str) and d.strip() for d in docs))


@settings(max_examples=25, **SETTINGS)
@given(data=st.one_of(st.binary(max_size=300), invalid_utf8, st.just(b""), st.text(max_size=300)))
def test_text_corpus_random_bytes(work, data):
    from jaxfound.data.corpus import read_documents

    _case("corpus .txt")
    _docs_ok(_accepts_or_rejects(read_documents, str(_file(work, data, ".txt"))))


paragraphs = st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=6).map("\n\n".join)  # often valid
valid_jsonl = st.lists(st.text(max_size=30).map(lambda t: json.dumps({"text": t})), min_size=1, max_size=5).map(
    "\n".join)
jsonl_lines = st.lists(st.one_of(
    json_values.map(json.dumps),  # JSON, but not necessarily an object with a 'text' string
    st.dictionaries(st.sampled_from(["text", "txt", "body"]), json_values, max_size=2).map(json.dumps),
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=40)),
    st.text(max_size=30),  # not JSON at all
), max_size=8).map("\n".join)


@settings(max_examples=30, **SETTINGS)
@given(text=st.one_of(jsonl_lines, valid_jsonl), suffix=st.sampled_from([".jsonl", ".json"]))
def test_jsonl_corpus_wrong_fields_and_shapes(work, text, suffix):
    from jaxfound.data.corpus import read_documents

    _case("corpus .jsonl")
    _docs_ok(_accepts_or_rejects(read_documents, str(_file(work, text, suffix))))


@settings(max_examples=10, **SETTINGS)
@given(data=st.one_of(invalid_utf8, st.just(b""), jsonl_lines.map(str.encode)))
def test_jsonl_corpus_invalid_utf8(work, data):
    from jaxfound.data.corpus import read_documents

    _case("corpus .jsonl bytes")
    _docs_ok(_accepts_or_rejects(read_documents, str(_file(work, data, ".jsonl"))))


class _Accepted(Exception):
    """Raised by the stubbed trainer: the CLI got past every input check."""


def _cli(argv) -> tuple[int | str, str]:
    """jaxfound.cli.main in-process -> (exit code or 'accepted', stderr); training itself is stubbed out."""
    from jaxfound import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except _Accepted:
            rc = "accepted"
        except SystemExit as e:  # argparse usage errors
            rc = e.code
    return rc, err.getvalue()


def _assert_one_line_error(rc, stderr: str, verb: str):
    assert rc in ("accepted", 2), (rc, stderr)
    if rc == 2:
        assert "Traceback" not in stderr, stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert lines and (lines[-1].startswith(f"jaxfound {verb}: error:") or "usage:" in stderr), stderr
        if lines[-1].startswith(f"jaxfound {verb}: error:"):
            assert len(lines) == 1, stderr


@settings(max_examples=16, **SETTINGS)
@given(data=st.one_of(st.binary(max_size=200), invalid_utf8, st.just(b""), st.text(max_size=200).map(str.encode),
                      paragraphs.map(str.encode), jsonl_lines.map(str.encode), valid_jsonl.map(str.encode)),
       suffix=st.sampled_from([".txt", ".jsonl"]))
def test_cli_pretrain_on_hostile_corpus_exits_2_and_leaves_no_summary(work, data, suffix):
    """Through the CLI up to the trainer (stubbed): corpus reading, tokenizer training and packing see the input."""
    _case("cli pretrain corpus")
    corpus = _file(work, data, suffix)
    run_dir = work / f"run{next(_ids)}"
    with mock.patch("jaxfound.app.pretrain.build", side_effect=_Accepted):
        rc, stderr = _cli(["pretrain", f"data.path={corpus}", f"run.dir={run_dir}", "data.seq_len=16",
                           "model.max_position=16", "data.tokenizer_vocab=128", "train.batch_size=2"])
    _assert_one_line_error(rc, stderr, "pretrain")
    if rc == 2:
        REJECTED[_kind[0]] += 1
        assert not (run_dir / "summary.json").exists() and not (run_dir / "config.json").exists()


# ---------------------------------------------------------------- YAML configs and overrides

config_dicts = st.dictionaries(
    st.one_of(st.sampled_from(list(_SECTION_TYPES)), st.text(max_size=6)),
    st.one_of(yaml_values, st.dictionaries(
        st.one_of(st.sampled_from(["steps", "batch_size", "lr", "arch", "seq_len", "dir", "every", "nonfinite",
                                   "hidden_size", "num_heads", "mask_prob", "data", "keep", "dropout"]),
                  st.text(max_size=6)),
        yaml_values, max_size=4)),
    max_size=4)


@settings(max_examples=150, **SETTINGS)
@given(text=st.one_of(st.text(max_size=200), config_dicts.map(lambda d: yaml.safe_dump(d)),
                      st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
def test_yaml_config_random_text_and_nested_garbage(work, text):
    _case("config yaml")
    _accepts_or_rejects(load_config, _file(work, text, ".yaml"))


@settings(max_examples=20, **SETTINGS)
@given(data=st.one_of(invalid_utf8, st.just(b"")))
def test_yaml_config_invalid_utf8(work, data):
    _case("config yaml bytes")
    _accepts_or_rejects(load_config, _file(work, data, ".yaml"))


def _key_eq_value(section, key, value):
    return f"{section}.{key}={value}"


overrides = st.one_of(
    st.text(max_size=40),
    st.builds(_key_eq_value, st.sampled_from(list(_SECTION_TYPES)),
              st.sampled_from(["steps", "batch_size", "lr", "arch", "seq_len", "dir", "every", "nonfinite", "x"]),
              st.one_of(st.text(max_size=20), st.integers(-5, 5).map(str), st.sampled_from(
                  ["nan", ".nan", "-.inf", "1e400", "[1, 2]", "{a: 1}", "null", "~", "true", "0x10", "1_000", "'3'",
                   "!!python/object:os.system", "&a [*a]", "- - -"]))),
)


@settings(max_examples=200, **SETTINGS)
@given(items=st.lists(overrides, min_size=1, max_size=3))
def test_key_value_overrides_random_strings(items):
    _case("overrides")
    _accepts_or_rejects(load_config, None, items)


@settings(max_examples=40, **SETTINGS)
@given(text=st.one_of(st.text(max_size=120), config_dicts.map(lambda d: yaml.safe_dump(d))),
       items=st.lists(overrides.filter(lambda o: not o.startswith("-")), max_size=2))
def test_cli_pretrain_hostile_config_exits_2_with_one_line(work, text, items):
    _case("cli pretrain config")
    with mock.patch("jaxfound.app.pretrain.pretrain", side_effect=_Accepted):
        rc, stderr = _cli(["pretrain", "--config", str(_file(work, text, ".yaml")), *items])
    _assert_one_line_error(rc, stderr, "pretrain")
    REJECTED[_kind[0]] += rc == 2


@pytest.mark.parametrize("override", [
    "train.batch_size=0", "model.num_heads=3", "data.seq_len=0", "train.grad_accum=3", "checkpoint.keep=0",
    "train.log_every=0", "data.mask_prob=2", "train.lr=-1", "train.lr=.nan", "mesh.data=0", "data.seq_len=1000",
])
def test_out_of_range_values_are_rejected_naming_the_key(override):
    """Each of these used to pass config checks and crash later (ZeroDivisionError, a jax shape error, numpy's
    'Cannot take a larger sample than population', or a run that silently kept no checkpoint)."""
    key = override.split("=")[0]
    with pytest.raises(JaxfoundError, match=rf"key '{key}' is .*; it must be"):
        load_config(None, [override])


# ---------------------------------------------------------------- registry graph files

def _graph_dicts():
    from jaxfound.fusion.graph import FORMAT, KINDS, RELATIONS

    names = st.sampled_from(["a", "b", "c", "", "a/b"])
    vertex = st.one_of(json_values, st.fixed_dictionaries(
        {"name": st.one_of(names, json_values), "kind": st.one_of(st.sampled_from(KINDS), json_values)},
        optional={"path": json_values, "score": json_values, "arch": json_values}))
    edge = st.one_of(json_values, st.fixed_dictionaries(
        {"source": st.one_of(names, json_values), "target": st.one_of(names, json_values),
         "relation": st.one_of(st.sampled_from(list(RELATIONS)), json_values)},
        optional={"value": json_values, "metric": json_values, "split": json_values}))
    return st.fixed_dictionaries(
        {"format": st.one_of(st.just(FORMAT), json_values)},
        optional={"vertices": st.lists(vertex, max_size=5), "edges": st.lists(edge, max_size=5)})


def _load_graph_file(work: Path, data: bytes | str):
    from jaxfound.fusion import graph

    registry = work / f"registry{next(_ids)}"
    registry.mkdir()
    (registry / "graph.json").write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return _accepts_or_rejects(graph.load, registry)


@settings(max_examples=150, **SETTINGS)
@given(data=st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")), st.just(""),
                      json_values.map(json.dumps), st.deferred(_graph_dicts).map(json.dumps)))
def test_registry_graph_random_and_malformed_json(work, data):
    _case("graph.json")
    _load_graph_file(work, data)


@pytest.mark.parametrize("data", [b"\x80", b'{"x": "\xff"}', b'{"format": "jaxfound-graph/1", "vertices": null}',
                                  b'{"format": "jaxfound-graph/1", "edges": 5}'],
                         ids=["byte_0x80", "latin1_in_json", "vertices_null", "edges_number"])
def test_registry_graph_non_utf8_and_non_list_fields(work, data):
    """Escapes the property test above once found (UnicodeDecodeError, TypeError); now JaxfoundErrors."""
    _load_graph_file(work, data)


# ---------------------------------------------------------------- CoNLL files

conll_lines = st.lists(st.one_of(
    st.just(""), st.just("-DOCSTART- -X- O O"), st.text(max_size=30),
    st.builds(lambda w, t, sep: f"{w}{sep}{t}", st.text(max_size=8),
              st.sampled_from(["O", "B-PER", "I-LOC", "B-", "I-", "X-PER", "b-per", "", "O O", "B-PER-X"]),
              st.sampled_from(["\t", " ", "  ", "\t\t"])),
), max_size=12).map("\n".join)


@settings(max_examples=150, **SETTINGS)
@given(data=st.one_of(conll_lines.map(str.encode), st.binary(max_size=200), invalid_utf8, st.just(b"")),
       tag_column=st.sampled_from([-1, 1, 3, -4]), scheme=st.sampled_from(["auto", "iob", "none"]))
def test_conll_files(work, data, tag_column, scheme):
    from jaxfound.data.conll import read_conll

    _case("conll")
    sentences = _accepts_or_rejects(read_conll, _file(work, data, ".conll"), 0, tag_column, scheme)
    assert sentences is None or all(len(s.words) == len(s.tags) > 0 for s in sentences)


# ---------------------------------------------------------------- merge recipes

def _recipes():
    from jaxfound.fusion.recipe import RECIPE_KEYS, RECIPE_METHODS, RECIPE_PARAMETERS

    params = st.one_of(yaml_values, st.dictionaries(st.one_of(st.sampled_from(RECIPE_PARAMETERS), st.text(max_size=5)),
                                                    yaml_values, max_size=3))
    model = st.one_of(yaml_values, st.fixed_dictionaries({"model": st.one_of(st.text(max_size=8), yaml_values)},
                                                         optional={"parameters": params}))
    return st.dictionaries(st.sampled_from(RECIPE_KEYS), st.one_of(
        yaml_values, st.sampled_from(RECIPE_METHODS), st.lists(model, max_size=3), params), max_size=5)


@settings(max_examples=150, **SETTINGS)
@given(text=st.one_of(st.text(max_size=150), st.deferred(_recipes).map(lambda d: yaml.safe_dump(d)),
                      invalid_utf8.map(lambda b: b.decode("latin-1"))))
def test_merge_recipes(work, text):
    from jaxfound.config import read_yaml
    from jaxfound.fusion.recipe import parse_recipe

    _case("merge recipe")
    path = _file(work, text, ".yaml")
    _accepts_or_rejects(lambda: parse_recipe(read_yaml(path), str(path)))
