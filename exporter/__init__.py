"""prefixkit.exporter: the PyTorch side that brings a backbone in and writes it to
ONNX once. May import the runtime, torch, transformers and optimum; never training."""

from .backbones import (
    DEFAULT_BACKBONE,
    REGISTRY,
    Backbone,
    BackboneError,
    cache_dir,
    fetch_backbone,
    fingerprint_folder,
    fingerprint_model,
    load_backbone,
    resolve_backbone,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "REGISTRY",
    "Backbone",
    "BackboneError",
    "cache_dir",
    "fetch_backbone",
    "fingerprint_folder",
    "fingerprint_model",
    "load_backbone",
    "resolve_backbone",
]
