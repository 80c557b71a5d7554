"""What the runtime knows of a backbone without loading it: its architecture numbers and
its fingerprint.

The fingerprint is a hash of the backbone's config and weights. Training and export both
compute it here, from numpy arrays, so a prefix can prove which backbone it was trained
against and the runtime only has to compare two strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping

import numpy as np

FINGERPRINT_VERSION = 1

# Config keys that change what the network computes beyond the architecture numbers.
# Only keys a model class always writes to config.json (never dropped as defaults).
_COMPUTE_KEYS = (
    "activation_function",
    "hidden_act",
    "layer_norm_epsilon",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    # Families beyond Llama: windows, soft-capping, query scale, partial rotary (absent from
    # Llama and GPT-2 configs, so their fingerprints do not change).
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
    "partial_rotary_factor",
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The numbers a prefix and an exported graph must agree on.

    Key/value shapes use the KV heads (grouped-query attention), not the query heads.
    """

    model_type: str
    n_layers: int  # L
    n_heads: int  # query heads
    n_kv_heads: int  # H
    head_dim: int  # D
    hidden_size: int
    vocab_size: int
    max_positions: int
    # Encoder-decoder backbones (BART, T5): the encoder's layers; n_layers counts the decoder's.
    # 0 for decoder-only backbones, and then left out of to_dict, so their fingerprints stay.
    n_encoder_layers: int = 0

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_encoder_layers > 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Architecture":
        """From a Hugging Face config dict (`config.to_dict()` or a config.json).

        GPT-2 uses its own key names (n_layer, n_head, n_embd, n_positions); Llama-family
        models use the common ones, with `num_key_value_heads` and `head_dim` optional.
        """
        model_type = config.get("model_type")
        if not model_type:
            raise ValueError("the backbone config has no model_type")
        if config.get("is_encoder_decoder"):
            return cls._encoder_decoder(config)

        def first(*keys: str) -> Any:
            for key in keys:
                if config.get(key) is not None:
                    return config[key]
            raise ValueError(f"the {model_type} config has none of {', '.join(keys)}")

        n_layers = int(first("num_hidden_layers", "n_layer"))
        n_heads = int(first("num_attention_heads", "n_head"))
        hidden = int(first("hidden_size", "n_embd"))
        n_kv_heads = int(config.get("num_key_value_heads") or n_heads)
        head_dim = int(config.get("head_dim") or hidden // n_heads)
        return cls(
            model_type=str(model_type),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=int(first("vocab_size")),
            max_positions=int(first("max_position_embeddings", "n_positions")),
        )

    @classmethod
    def _encoder_decoder(cls, config: Mapping[str, Any]) -> "Architecture":
        """BART (encoder_layers, d_model, learned positions) and T5 (num_layers, d_kv, relative
        positions: no fixed limit, 512 as its pretraining used unless the config says)."""
        model_type = config["model_type"]
        if model_type == "bart":
            heads = int(config["encoder_attention_heads"])
            if int(config["decoder_attention_heads"]) != heads:
                raise ValueError("prefixkit needs as many encoder as decoder attention heads.")
            return cls(model_type=model_type, n_layers=int(config["decoder_layers"]), n_heads=heads,
                       n_kv_heads=heads, head_dim=int(config["d_model"]) // heads,
                       hidden_size=int(config["d_model"]), vocab_size=int(config["vocab_size"]),
                       max_positions=int(config["max_position_embeddings"]),
                       n_encoder_layers=int(config["encoder_layers"]))
        if model_type in ("t5", "mt5"):
            heads = int(config["num_heads"])
            return cls(model_type=model_type, n_layers=int(config.get("num_decoder_layers") or config["num_layers"]),
                       n_heads=heads, n_kv_heads=heads, head_dim=int(config["d_kv"]),
                       hidden_size=int(config["d_model"]), vocab_size=int(config["vocab_size"]),
                       max_positions=int(config.get("n_positions") or 512),
                       n_encoder_layers=int(config["num_layers"]))
        raise ValueError(f"encoder-decoder backbones of type '{model_type}' are not supported; "
                         "prefixkit runs the BART and T5 families.")

    def kv_shape(self, prefix_len: int) -> tuple[int, int, int, int]:
        """Shape of a prefix's key (and value) array: [L, H, P, D] (the decoder's self-attention
        and cross-attention layers for an encoder-decoder backbone)."""
        return (self.n_layers, self.n_kv_heads, prefix_len, self.head_dim)

    def encoder_kv_shape(self, prefix_len: int) -> tuple[int, int, int, int]:
        """Shape of an encoder-decoder prefix's encoder key (and value) array: [Le, H, P, D]."""
        return (self.n_encoder_layers, self.n_kv_heads, prefix_len, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.is_encoder_decoder:
            del data["n_encoder_layers"]
        return data


def backbone_fingerprint(
    config: Mapping[str, Any], tensors: Iterable[tuple[str, np.ndarray]]
) -> str:
    """Hash of a backbone's config and weights: 'pkfp1-' followed by 64 hex digits.

    config: a Hugging Face config dict. tensors: (name, array) for every weight and
    persistent buffer, in any order. Each tensor is hashed by shape and values (floats as
    float32, so the same weights loaded in bf16/fp16/fp32 hash alike where the values are
    equal); identical tensors count once, so tied and untied spellings of one checkpoint
    agree, and names do not matter, so a checkpoint and its converted copy agree.
    """
    digests = set()
    for _, array in tensors:
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype("<f4", copy=False)
        elif np.issubdtype(array.dtype, np.bool_):
            array = array.astype("u1", copy=False)
        else:
            array = array.astype("<i8", copy=False)
        h = hashlib.sha256()
        h.update(repr(tuple(array.shape)).encode())
        h.update(array.dtype.str.encode())
        h.update(np.ascontiguousarray(array).data)
        digests.add(h.digest())
    described = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "architecture": Architecture.from_config(config).to_dict(),
        "compute": {k: config[k] for k in _COMPUTE_KEYS if k in config},
    }
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for digest in sorted(digests):
        h.update(digest)
    return f"pkfp{FINGERPRINT_VERSION}-{h.hexdigest()}"
