"""jaxfound: pretrain, fine-tune, fuse, quantize and share transformers in JAX.

Importing this package initialises no devices and reads no files.
"""

from jaxfound.errors import JaxfoundError

__all__ = ["JaxfoundError"]
__version__ = "0.1.0"
