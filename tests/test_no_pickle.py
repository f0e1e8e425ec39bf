"""Nothing a user hands jaxfound is unpickled: a scan of the package sources for every unpickling loader."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxfound"

# (what, pattern over one call's source text); each pattern matches only the unsafe form of the call
UNSAFE = [
    ("pickle.load / pickle.loads / Unpickler", re.compile(r"\b(c?pickle|_pickle)\.(loads?|Unpickler)\b")),
    ("np.load with allow_pickle=True", re.compile(r"\b(np|numpy)\.load\(.*allow_pickle\s*=\s*True", re.S)),
    ("torch.load without weights_only=True", re.compile(r"\btorch\.load\((?!.*weights_only\s*=\s*True)", re.S)),
    ("joblib / dill / cloudpickle load", re.compile(r"\b(joblib|dill|cloudpickle)\.loads?\b")),
    ("yaml.load without SafeLoader", re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\((?!.*SafeLoader)",
                                                re.S)),
    ("pandas.read_pickle", re.compile(r"\.read_pickle\(")),
    ("shelve.open", re.compile(r"\bshelve\.open\(")),
]
UNSAFE_IMPORTS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _calls(tree: ast.AST, source: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node.lineno, ast.get_source_segment(source, node) or ""


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"expected the jaxfound package under {PACKAGE}"
    return files


def test_no_unpickling_calls_in_jaxfound():
    found = []
    for path in _sources():
        source = path.read_text(encoding="utf-8")
        for lineno, call in _calls(ast.parse(source), source):
            for what, pattern in UNSAFE:
                if pattern.search(call):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {what}: {call[:100]!r}")
    assert not found, "unpickling loaders in jaxfound:\n" + "\n".join(found)


def test_no_pickle_module_is_imported():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: import {n}" for n in names
                      if n.split(".")[0] in UNSAFE_IMPORTS]
    assert not found, "\n".join(found)


def test_the_scan_catches_what_it_claims_to():
    """The patterns flag the unsafe forms and pass the safe ones (so an empty scan means something)."""
    unsafe = ["pickle.load(f)", "pickle.loads(b)", "np.load(p, allow_pickle=True)", "torch.load(p)",
              "torch.load(p, weights_only=False)", "joblib.load(p)", "dill.loads(b)", "cloudpickle.load(f)",
              "yaml.load(s)", "yaml.load(s, Loader=yaml.FullLoader)", "yaml.unsafe_load(s)", "pd.read_pickle(p)"]
    safe = ["np.load(p)", "np.load(p, allow_pickle=False)", "torch.load(p, weights_only=True)",
            "yaml.safe_load(s)", "yaml.load(s, Loader=yaml.SafeLoader)", "json.load(f)", "json.loads(s)"]
    def flagged(code):
        return any(p.search(call) for _, call in _calls(ast.parse(code), code) for _, p in UNSAFE)
    assert [c for c in unsafe if not flagged(c)] == []
    assert [c for c in safe if flagged(c)] == []
