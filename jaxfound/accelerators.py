"""What accelerators offer: dense peak FLOP/s per device kind, TPU generations (HBM, peak, topology names), and the
devices of a TPU slice described without the hardware (libtpu's topology description, for ahead-of-time compiles).

    chip = tpu_chip("v5e:2x2")                 # TpuChip(name='v5e', hbm_bytes=16 GiB, peak_bf16=197e12, ...)
    devices = topology_devices("v5e:2x2")      # 4 abstract TPU v5 lite devices: build a Mesh, lower, compile

libtpu comes with the ``tpu`` extra (``pip install 'jaxfound[tpu]'``); the default install does not load it, and
nothing here imports it until a topology is asked for. On a host without a TPU, libtpu prints warnings about
TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES when it is first loaded: they are harmless for compiling.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from jax.experimental import topologies

from jaxfound.errors import JaxfoundError

GIB = 1024**3

# Dense peak FLOP/s per device by device_kind substring: (bf16, fp32). GPU fp32 is the TF32 tensor-core peak, since
# XLA runs fp32 matmuls in TF32 by default there; TPUs run fp32 matmuls in bf16 passes at default precision, so fp32
# is given the bf16 peak. Longer keys first: 'v5 lite' must win over 'v5'.
PEAK_FLOPS = {
    "TPU v6 lite": (918e12, 918e12),
    "TPU v6e": (918e12, 918e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (459e12, 459e12),
    "TPU v4": (275e12, 275e12),
    "TPU v3": (123e12, 123e12),
    "A100": (312e12, 156e12),
    "H100": (989e12, 495e12),
    "H200": (989e12, 495e12),
}


@dataclass(frozen=True)
class TpuChip:
    """One TPU generation, per chip (Google Cloud's published figures)."""

    name: str  # as in topology names: 'v5e'
    hbm_bytes: int
    peak_bf16: float  # dense FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s of inter-chip links per chip (all links, one direction)
    device_kind: str  # what jax reports
    example: str  # a valid topology name


TPU_CHIPS = {
    "v3": TpuChip("v3", 32 * GIB, 123e12, 900e9, 82e9, "TPU v3", "v3:2x2"),
    "v4": TpuChip("v4", 32 * GIB, 275e12, 1228e9, 150e9, "TPU v4", "v4:2x2x1"),
    "v5e": TpuChip("v5e", 16 * GIB, 197e12, 819e9, 100e9, "TPU v5 lite", "v5e:2x2"),
    "v5p": TpuChip("v5p", 95 * GIB, 459e12, 2765e9, 300e9, "TPU v5", "v5p:2x2x1"),
    "v6e": TpuChip("v6e", 32 * GIB, 918e12, 1640e9, 200e9, "TPU v6 lite", "v6e:2x2"),
}
_TOPOLOGY = re.compile(r"^(v3|v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def _valid_names() -> str:
    return ", ".join(f"{c.example} ({c.name}: {c.hbm_bytes // GIB} GiB HBM per chip)" for c in TPU_CHIPS.values())


def tpu_chip(topology: str) -> TpuChip:
    """The chip of a topology name 'GEN:AxB[xC]' (v5e:2x2, v5p:2x2x1, ...); a bad name says which are valid."""
    m = _TOPOLOGY.match(topology or "")
    if not m:
        raise JaxfoundError(f"topology {topology!r} is not valid; give GENERATION:AxB or AxBxC with a generation of "
                            f"{', '.join(TPU_CHIPS)}, e.g. {_valid_names()}")
    return TPU_CHIPS[m.group(1)]


def chips_in(topology: str) -> int:
    tpu_chip(topology)
    return functools.reduce(lambda a, b: a * b, (int(d) for d in topology.split(":")[1].split("x")))


@functools.cache
def topology_devices(topology: str) -> tuple:
    """The abstract devices of a TPU slice (no TPU needed): for Mesh, lower and compile ahead of time."""
    tpu_chip(topology)
    # the host stays a CPU host (jax would otherwise try to start a TPU runtime at its first device query), and
    # several processes may describe topologies at once (libtpu otherwise takes a machine-wide lockfile)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise JaxfoundError("compiling for a TPU topology needs libtpu: pip install 'jaxfound[tpu]' "
                            "(the libtpu wheel that jax[tpu] pins; no TPU is needed)") from None
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's own message says what is wrong with the layout
        raise JaxfoundError(f"topology {topology!r}: libtpu rejects it ({str(e).splitlines()[0][:300]}); "
                            f"valid names look like {_valid_names()}") from None
    return tuple(desc.devices)


def peak_of(device_kind: str, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of one device of this kind for dtype, where it comes from), or (None, why not)."""
    for kind, (bf16, fp32) in PEAK_FLOPS.items():
        if kind.lower() in device_kind.lower():
            return (bf16 if dtype == "bfloat16" else fp32), f"table: {kind} {dtype} dense peak"
    return None, f"unknown device kind {device_kind!r}"
