"""jaxfound: pretrain, fine-tune, fuse, quantize and share transformers in JAX.

Importing this package initialises no devices and reads no files. One environment default: where libtpu is installed
(the ``tpu`` or ``test`` extra, for ahead-of-time TPU compiles) on a host with no TPU and no CUDA plugin, JAX_PLATFORMS
defaults to ``cpu``, so jax does not try to start a TPU runtime (slow, and noisy warnings) at its first device query.
"""

import glob as _glob
import importlib.util as _util
import os as _os

from jaxfound.errors import JaxfoundError

if ("JAX_PLATFORMS" not in _os.environ and _util.find_spec("libtpu") is not None
        and not _glob.glob("/dev/accel*") and not _glob.glob("/dev/vfio/[0-9]*")
        and _util.find_spec("jax_cuda12_plugin") is None and _util.find_spec("jax_cuda13_plugin") is None):
    _os.environ["JAX_PLATFORMS"] = "cpu"

__all__ = ["JaxfoundError"]
__version__ = "0.1.0"
