"""The same losses on every mesh, and FSDP really splits params and optimizer state."""

import jax
import numpy as np
import pytest

from jaxfound.config import MeshConfig, ModelConfig, TrainConfig
from jaxfound.errors import JaxfoundError
from jaxfound.losses import clm_loss, mlm_loss
from jaxfound.models import build_model
from jaxfound.sharding import bytes_per_device, make_mesh, mesh_shape
from jaxfound.train.optim import make_optimizer
from jaxfound.train.state import init_state, state_shardings
from jaxfound.train.step import make_train_step

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                  max_position=32, dropout=0.1)
LLAMA = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=96, max_position=32, dropout=0.0, activation="silu", layer_norm_eps=1e-5)
B, L, P = 16, 32, 5


def _batches(n):
    rng = np.random.default_rng(0)
    return n * [{"input_ids": rng.integers(5, 256, (B, L)).astype(np.int32),
             "segment_ids": np.repeat([[1] * 20 + [2] * 12], B, 0).astype(np.int32),
             "mlm_positions": np.sort(rng.choice(L, (B, P)), axis=1).astype(np.int32),
             "mlm_labels": rng.integers(5, 256, (B, P)).astype(np.int32),
             "mlm_weights": np.ones((B, P), np.float32)}]  # one batch, repeated: the loss must fall


def _run(data, fsdp, tensor, steps=5, cfg=CFG):
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:data * fsdp * tensor])
    causal = cfg.arch == "llama"
    model = build_model(cfg, "lm" if causal else "mlm")
    tx = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=1), 100)
    shardings = state_shardings(model, tx, mesh, L)
    state = init_state(model, tx, mesh, L, seed=0, shardings=shardings)
    step = make_train_step(model, tx, clm_loss if causal else mlm_loss, mesh, shardings, seed=0)
    losses = []
    for batch in _batches(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["bert", "llama"])
def test_losses_agree_across_meshes(cfg):
    reference, _ = _run(1, 1, 1, cfg=cfg)
    assert reference[-1] < reference[0]
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        losses, _ = _run(*shape, cfg=cfg)
        np.testing.assert_allclose(losses, reference, rtol=1e-4, err_msg=f"mesh {shape}")


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state():
    _, replicated = _run(8, 1, 1, steps=1)
    _, sharded = _run(1, 8, 1, steps=1)
    full = max(bytes_per_device(replicated).values())
    per_device = bytes_per_device(sharded)
    assert len(per_device) == 8
    # everything with an 'embed' dimension is split 8 ways; LayerNorms, biases and the step counter are not
    assert max(per_device.values()) < full / 8 * 1.15


def test_mesh_shape_resolves_minus_one_and_rejects_bad_products():
    assert mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    with pytest.raises(JaxfoundError, match="there are 8 devices"):
        mesh_shape(3, 1, 1, 8)
    with pytest.raises(JaxfoundError, match="at most one"):
        mesh_shape(-1, -1, 1, 8)
