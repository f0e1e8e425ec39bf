"""The README's library example runs as written."""

import re
from pathlib import Path


def test_readme_library_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README lost its 'use it as a library' example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 16, 1000)
    assert float(namespace["metrics"]["loss"]) > 0
    assert namespace["qlogits"].shape == (2, 16, 1000)
