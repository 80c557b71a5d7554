"""The prefix file (`.npz`): the one definition training writes and the runtime reads.

Format 1 (decoder-only backbones):
  key, value  [L, H, P, D] float32 or float16 — per layer, the prefix's keys and values
              (H = KV heads, so grouped-query backbones store fewer heads than they query).
Format 2 (encoder-decoder backbones: BART, T5) adds, with the same P:
  enc_key, enc_value      [Le, H, P, D] — the encoder's self-attention prefix;
  cross_key, cross_value  [L, H, P, D]  — the decoder's cross-attention prefix;
  key, value then hold the decoder's self-attention prefix. Decoder-only prefixes are still
  written as format 1, so older readers keep reading them; they reject format 2 by its number.
  meta        UTF-8 JSON as a uint8 byte array (a 0-d unicode array is read too): format,
              backbone fingerprint, prefix length, the prompt template and stop strings used
              in training, method and settings, data summary, losses, creation time.

Files are written atomically and read with `allow_pickle=False`; every problem a reader can
meet is reported as a `PrefixFileError` naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import Architecture
from .files import atomic_write

FORMAT_VERSION = 1  # decoder-only
SEQ2SEQ_FORMAT_VERSION = 2  # encoder-decoder
READS = (FORMAT_VERSION, SEQ2SEQ_FORMAT_VERSION)
ARRAYS = ("key", "value", "meta")
SEQ2SEQ_ARRAYS = ("enc_key", "enc_value", "cross_key", "cross_value")
_DTYPES = (np.dtype("float32"), np.dtype("float16"))


class PrefixFileError(ValueError):
    """A prefix file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class Prefix:
    """One learned prefix: per-layer keys and values, shape [L, H, P, D], and its meta."""

    key: np.ndarray
    value: np.ndarray
    meta: dict[str, Any]
    # Encoder-decoder prefixes only (format 2): encoder self-attention [Le, H, P, D] and decoder
    # cross-attention [L, H, P, D] keys and values; `key`/`value` are the decoder self-attention.
    enc_key: np.ndarray | None = None
    enc_value: np.ndarray | None = None
    cross_key: np.ndarray | None = None
    cross_value: np.ndarray | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.enc_key is not None

    @property
    def prefix_len(self) -> int:
        return int(self.key.shape[2])

    @property
    def fingerprint(self) -> str:
        return self.meta["backbone_fingerprint"]


def make_meta(fingerprint: str, prefix_len: int, **fields: Any) -> dict[str, Any]:
    """The required meta fields plus any others (template, stop, method, settings, data,
    losses); `created` defaults to now, in UTC."""
    meta = {
        "format": FORMAT_VERSION,
        "backbone_fingerprint": fingerprint,
        "prefix_len": int(prefix_len),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(fields)
    return meta


def save_prefix(path: str | os.PathLike, prefix: Prefix) -> Path:
    """Validate `prefix` and write it to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    meta = dict(prefix.meta)
    meta["format"] = SEQ2SEQ_FORMAT_VERSION if prefix.is_encoder_decoder else FORMAT_VERSION
    extra = {name: getattr(prefix, name) for name in SEQ2SEQ_ARRAYS if getattr(prefix, name) is not None}
    checked = _validate(path, prefix.key, prefix.value, meta, extra=extra)
    meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), np.uint8)
    arrays = {"key": checked.key, "value": checked.value, **{n: getattr(checked, n) for n in extra}}
    with atomic_write(path) as f:
        np.savez(f, **arrays, meta=meta_bytes)
    return path


def load_prefix(
    path: str | os.PathLike,
    architecture: Architecture | None = None,
    fingerprint: str | None = None,
) -> Prefix:
    """Read and validate a prefix file.

    With `architecture`, the arrays must have shape [L, H, P, D] for that backbone; with
    `fingerprint`, the file must have been trained against that backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise PrefixFileError(f"{path}: no such prefix file.")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # numpy would try to unpickle anything else
            raise PrefixFileError(
                f"{path}: truncated or not an .npz file (it does not start as a zip archive); "
                "copy it again or re-create it with pt-train."
            )
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = [name for name in ARRAYS if name not in names]
            if missing:
                raise PrefixFileError(
                    f"{path}: not a prefix file: the array(s) {', '.join(missing)} are missing "
                    f"(a prefix file holds {', '.join(ARRAYS)})."
                )
            arrays = {name: npz[name] for name in ARRAYS}
            extra = {name: npz[name] for name in SEQ2SEQ_ARRAYS if name in names}
    except PrefixFileError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise PrefixFileError(
                f"{path}: holds a pickled object array, which prefixkit never loads "
                "(it could run code); write key/value as float arrays and meta as JSON bytes."
            ) from None
        raise PrefixFileError(f"{path}: unreadable ({e}); re-create it with pt-train.") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise PrefixFileError(
            f"{path}: truncated or not an .npz file ({type(e).__name__}: {e}); "
            "copy it again or re-create it with pt-train."
        ) from None
    meta = _parse_meta(path, arrays["meta"])
    return _validate(path, arrays["key"], arrays["value"], meta, architecture, fingerprint, extra)


def _parse_meta(path: Path, raw: np.ndarray) -> dict[str, Any]:
    if raw.dtype == np.uint8 and raw.ndim == 1:
        text_bytes = raw.tobytes()
    elif raw.dtype.kind == "U" and raw.ndim == 0:
        text_bytes = str(raw[()]).encode("utf-8")
    elif raw.dtype.kind == "S" and raw.ndim == 0:
        text_bytes = bytes(raw[()])
    else:
        raise PrefixFileError(
            f"{path}: meta must be UTF-8 JSON stored as bytes or a string, not a "
            f"{raw.dtype} array of shape {raw.shape}."
        )
    try:
        meta = json.loads(text_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixFileError(f"{path}: meta is not valid UTF-8 JSON ({e}).") from None
    if not isinstance(meta, dict):
        raise PrefixFileError(f"{path}: meta must be a JSON object, found {type(meta).__name__}.")
    return meta


def _validate(
    path: Path,
    key: np.ndarray,
    value: np.ndarray,
    meta: dict[str, Any],
    architecture: Architecture | None = None,
    fingerprint: str | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Prefix:
    version = meta.get("format")
    if version not in READS:
        raise PrefixFileError(
            f"{path}: prefix format {version!r} is not one this prefixkit reads "
            f"(it reads formats {', '.join(map(str, READS))}); upgrade prefixkit or re-create the prefix."
        )
    extra = dict(extra or {})
    if version == SEQ2SEQ_FORMAT_VERSION:
        missing = [name for name in SEQ2SEQ_ARRAYS if name not in extra]
        if missing:
            raise PrefixFileError(
                f"{path}: an encoder-decoder prefix (format 2) needs the array(s) {', '.join(missing)}; "
                "re-create it with pt-train."
            )
    elif extra:
        raise PrefixFileError(
            f"{path}: holds encoder-decoder arrays ({', '.join(sorted(extra))}) but says format {version}; "
            "re-create it with pt-train."
        )
    for field in ("backbone_fingerprint", "prefix_len"):
        if field not in meta:
            raise PrefixFileError(f"{path}: meta has no '{field}'; re-create the prefix with pt-train.")
    for name, array in (("key", key), ("value", value), *extra.items()):
        if array.dtype not in _DTYPES:
            raise PrefixFileError(
                f"{path}: '{name}' is {array.dtype}; a prefix stores float32 or float16."
            )
        if array.ndim != 4:
            raise PrefixFileError(
                f"{path}: '{name}' has shape {tuple(array.shape)}; expected 4 dimensions "
                "[layers, kv_heads, prefix_len, head_dim]."
            )
    if key.shape != value.shape:
        raise PrefixFileError(
            f"{path}: 'key' has shape {tuple(key.shape)} but 'value' has {tuple(value.shape)}; "
            "they must match."
        )
    if extra:
        pairs = (("enc_key", "enc_value"), ("cross_key", "cross_value"), ("key", "cross_key"))
        everything = {"key": key, **extra}
        for a, b in pairs:
            if everything[a].shape != everything[b].shape:
                raise PrefixFileError(
                    f"{path}: '{a}' has shape {tuple(everything[a].shape)} but '{b}' has "
                    f"{tuple(everything[b].shape)}; they must match."
                )
        if extra["enc_key"].shape[1:] != key.shape[1:]:
            raise PrefixFileError(
                f"{path}: 'enc_key' has shape {tuple(extra['enc_key'].shape)}; it must have the heads, "
                f"length and head size of 'key' {tuple(key.shape)}."
            )
    if architecture is not None and architecture.is_encoder_decoder != bool(extra):
        made_for = "an encoder-decoder" if extra else "a decoder-only"
        raise PrefixFileError(
            f"{path}: a prefix for {made_for} backbone; this backbone ({architecture.model_type}) is "
            f"{'encoder-decoder' if architecture.is_encoder_decoder else 'decoder-only'}."
        )
    if key.shape[2] != meta["prefix_len"]:
        raise PrefixFileError(
            f"{path}: meta says prefix_len {meta['prefix_len']} but the arrays hold "
            f"{key.shape[2]} positions."
        )
    if key.shape[2] < 1:
        raise PrefixFileError(f"{path}: the prefix is empty (prefix_len 0).")
    if architecture is not None:
        expected = architecture.kv_shape(key.shape[2])
        if tuple(key.shape) != expected:
            raise PrefixFileError(
                f"{path}: arrays have shape {tuple(key.shape)} but this backbone "
                f"({architecture.model_type}, {architecture.n_layers} layers, "
                f"{architecture.n_kv_heads} KV heads, head_dim {architecture.head_dim}) needs "
                f"{expected}; the prefix was made for another backbone."
            )
        if extra and tuple(extra["enc_key"].shape) != architecture.encoder_kv_shape(key.shape[2]):
            raise PrefixFileError(
                f"{path}: 'enc_key' has shape {tuple(extra['enc_key'].shape)} but this backbone's "
                f"encoder needs {architecture.encoder_kv_shape(key.shape[2])}; the prefix was made "
                "for another backbone."
            )
    for name, array in (("key", key), ("value", value), *extra.items()):
        if not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise PrefixFileError(
                f"{path}: '{name}' holds {bad} non-finite value(s) (NaN or Inf); "
                "training diverged or the file is damaged."
            )
    if fingerprint is not None and meta["backbone_fingerprint"] != fingerprint:
        raise PrefixFileError(
            f"{path}: trained against backbone {_short(meta['backbone_fingerprint'])}, "
            f"not this one ({_short(fingerprint)}); use the backbone it was trained on "
            "or train a prefix for this one."
        )
    return Prefix(key=key, value=value, meta=meta, **extra)


def _short(fingerprint: Any) -> str:
    return str(fingerprint)[:18] + "…" if len(str(fingerprint)) > 18 else str(fingerprint)
