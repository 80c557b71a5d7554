"""prefixkit.runtime: the torch-free side. numpy, onnxruntime and tokenizers only.

Defines the formats the other two parts share: the prefix file and the backbone
fingerprint and architecture numbers.
"""

from .backbone import Architecture, backbone_fingerprint
from .files import atomic_write
from .prefix import FORMAT_VERSION, Prefix, PrefixFileError, load_prefix, make_meta, save_prefix

__all__ = [
    "Architecture",
    "FORMAT_VERSION",
    "Prefix",
    "PrefixFileError",
    "atomic_write",
    "backbone_fingerprint",
    "load_prefix",
    "make_meta",
    "save_prefix",
]
