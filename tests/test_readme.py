"""The README's Python examples run as written."""

import re
from pathlib import Path


def test_readme_library_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Use it as a library", 1)[-1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README lost its 'use it as a library' example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 16, 1000)
    assert float(namespace["metrics"]["loss"]) > 0
    assert namespace["qlogits"].shape == (2, 16, 1000)


def test_readme_generate_example_runs(smollm2_gguf):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Generate", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README lost its Generate example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["result"].texts[0].strip() == "The capital of France is Paris."
