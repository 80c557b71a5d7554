"""prefixkit.runtime: the torch-free side. numpy, onnxruntime and tokenizers only.

Defines the formats the other two parts share (the prefix file, the export manifest, the
backbone fingerprint and architecture numbers) and generates with an exported backbone and
any number of prefixes.
"""

from .backbone import Architecture, backbone_fingerprint
from .files import atomic_write
from .generate import Completion, Generation, GenerationSettings, Generator
from .loader import load
from .manifest import Manifest, ManifestError, load_manifest
from .prefix import FORMAT_VERSION, SEQ2SEQ_FORMAT_VERSION, Prefix, PrefixFileError, load_prefix, make_meta, save_prefix
from .session import ExportedBackbone

__all__ = [
    "Architecture",
    "Completion",
    "ExportedBackbone",
    "Generation",
    "GenerationSettings",
    "Generator",
    "Manifest",
    "ManifestError",
    "load",
    "load_manifest",
    "FORMAT_VERSION",
    "SEQ2SEQ_FORMAT_VERSION",
    "Prefix",
    "PrefixFileError",
    "atomic_write",
    "backbone_fingerprint",
    "load_prefix",
    "make_meta",
    "save_prefix",
]
