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


def test_readme_generate_command_answers(smollm2_gguf):
    """The Generate section's SmolLM2 command lines, run by bash as written."""
    import subprocess

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Generate", 1)[1].split("\n### ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    lines = [line for line in bash.splitlines() if "SMOL" in line]
    assert len(lines) == 2, lines
    out = subprocess.run(["bash", "-c", "set -e\n" + "\n".join(lines)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "The capital of France is Paris.", out.stdout


def test_readme_serve_commands_answer(smollm2_gguf):
    """The Serve section's bash block, run as written on a free port instead of 8000: curl and the openai client
    get SmolLM2's answer, and the server exits 0 on SIGTERM."""
    import socket
    import subprocess

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Serve", 1)[1].split("\n### ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = "set -e\n" + bash.replace("8000", str(port))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert '"content":"The capital of France is Paris."' in out.stdout, out.stdout[-2000:]
    assert "\nThe capital of France is Paris.\n" in out.stdout
    assert "in-flight requests finished" in out.stdout
