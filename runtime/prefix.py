"""The prefix file (`.npz`, format 1): the one definition training writes and the runtime reads.

Arrays:
  key, value  [L, H, P, D] float32 or float16 — per layer, the prefix's keys and values
              (H = KV heads, so grouped-query backbones store fewer heads than they query).
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

FORMAT_VERSION = 1
ARRAYS = ("key", "value", "meta")
_DTYPES = (np.dtype("float32"), np.dtype("float16"))


class PrefixFileError(ValueError):
    """A prefix file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class Prefix:
    """One learned prefix: per-layer keys and values, shape [L, H, P, D], and its meta."""

    key: np.ndarray
    value: np.ndarray
    meta: dict[str, Any]

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
    meta.setdefault("format", FORMAT_VERSION)
    checked = _validate(path, prefix.key, prefix.value, meta)
    meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), np.uint8)
    with atomic_write(path) as f:
        np.savez(f, key=checked.key, value=checked.value, meta=meta_bytes)
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
    return _validate(path, arrays["key"], arrays["value"], meta, architecture, fingerprint)


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
) -> Prefix:
    version = meta.get("format")
    if version != FORMAT_VERSION:
        raise PrefixFileError(
            f"{path}: prefix format {version!r} is not one this prefixkit reads "
            f"(it reads format {FORMAT_VERSION}); upgrade prefixkit or re-create the prefix."
        )
    for field in ("backbone_fingerprint", "prefix_len"):
        if field not in meta:
            raise PrefixFileError(f"{path}: meta has no '{field}'; re-create the prefix with pt-train.")
    for name, array in (("key", key), ("value", value)):
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
    for name, array in (("key", key), ("value", value)):
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
    return Prefix(key=key, value=value, meta=meta)


def _short(fingerprint: Any) -> str:
    return str(fingerprint)[:18] + "…" if len(str(fingerprint)) > 18 else str(fingerprint)
