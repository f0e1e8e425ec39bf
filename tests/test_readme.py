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


def test_readme_roberta_commands_run(tmp_path):
    """The RoBERTa section's bash block, run by bash as written, with toy CoNLL files for CONLL, run dirs under
    tmp_path, 30 pretraining steps and one fine-tuning epoch: predict answers and export writes a transformers
    RobertaForTokenClassification directory."""
    import json
    import subprocess

    from tests.test_finetune import write_toy_conll

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### RoBERTa", 1)[1].split("\n### ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    for split, n in (("train", 96), ("valid", 32), ("test", 32)):
        write_toy_conll(tmp_path / f"{split}.txt", n, seed=len(split))
    script = (bash.replace("CONLL=../shared/data/conll2003", f"CONLL={tmp_path}").replace("runs/", f"{tmp_path}/runs/")
              .replace("train.lr=1e-3", "train.lr=1e-3 train.epochs=1").replace("train.steps=300", "train.steps=30"))
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["bash", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [row] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"text"')]
    assert row["text"] == "Ada Lovelace lives in Lyon" and isinstance(row["entities"], list)
    config = json.loads((tmp_path / "runs" / "roberta_ner_hf" / "config.json").read_text())
    assert config["architectures"] == ["RobertaForTokenClassification"] and config["model_type"] == "roberta"


def test_readme_compile_commands_run(tmp_path):
    """The GPU and TPU section's `jaxfound compile` lines, run by bash as written with a much smaller model put in
    (2 layers of width 128, batch 16 x 128: the recipes' full size is docs/scaling.md's job), JSON under tmp_path."""
    import importlib.util
    import json
    import subprocess

    import pytest

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jaxfound[tpu]'): no TPU compiler")
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### GPU and TPU", 1)[1].split("\n### ", 1)[0]
    lines = [line.split("  #")[0].strip() for line in re.findall(r"```bash\n(.*?)```", section, re.S)[1].splitlines()
             if line.startswith("jaxfound compile")]
    assert len(lines) == 2, lines
    small = (" model.num_layers=2 model.hidden_size=128 model.intermediate_size=256 model.num_heads=4"
             " model.num_kv_heads=2 model.vocab_size=1024 train.batch_size=16 data.seq_len=128")
    script = "set -e\n" + "\n".join(line.replace("gpt2m.json", str(tmp_path / "gpt2m.json"))
                                    .replace(" --topology", small + " --topology") for line in lines)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpt2m.json").read_text())
    assert report["topology"] == "v5e:4x4" and report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert "[train] compiled" in out.stdout and "on v5p:2x2x2" in out.stdout


def test_readme_lora_and_sft_commands_run(tmp_path, smollm2_tokenizer):
    """The LoRA section's bash block, run by bash as written, on toy CoNLL files (one epoch) and, for SmolLM2, a tiny
    random Llama with SmolLM2's tokenizer and chat template (two epochs of a toy chat file): the PEFT adapter is
    written and the SFT run generates."""
    import json
    import subprocess

    from tests.test_finetune import write_toy_conll
    from tests.test_sft import _chat, tiny_llama_dir

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### LoRA and instruction fine-tuning", 1)[1].split("\n### ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    for split, n in (("train", 96), ("valid", 32), ("test", 32)):
        write_toy_conll(tmp_path / f"{split}.txt", n, seed=len(split))
    tiny_llama_dir(tmp_path / "tiny_llama", smollm2_tokenizer)
    for name, ids in (("chat_train", range(24)), ("chat_valid", range(24, 32))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in ids))
    script = (bash.replace("CONLL=../shared/data/conll2003", f"CONLL={tmp_path}").replace("runs/", f"{tmp_path}/runs/")
              .replace("train.lr=1e-3", "train.lr=1e-3 train.epochs=1")
              .replace("$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf", str(tmp_path / "tiny_llama"))
              .replace("data.train=chat_train.jsonl", f"data.train={tmp_path}/chat_train.jsonl data.seq_len=64 "
                       "train.batch_size=8 train.epochs=2")
              .replace("data.valid=chat_valid.jsonl", f"data.valid={tmp_path}/chat_valid.jsonl"))
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["bash", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    config = json.loads((tmp_path / "runs" / "ner_lora_peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (tmp_path / "runs" / "sft" / "best").exists() and "LoRA rank 16" in out.stdout
