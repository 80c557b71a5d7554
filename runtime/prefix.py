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
import io
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import Architecture
from .files import atomic_write
from .stops import check_stops
from .template import check_template

FORMAT_VERSION = 1  # decoder-only
SEQ2SEQ_FORMAT_VERSION = 2  # encoder-decoder
READS = (FORMAT_VERSION, SEQ2SEQ_FORMAT_VERSION)
ARRAYS = ("key", "value", "meta")
SEQ2SEQ_ARRAYS = ("enc_key", "enc_value", "cross_key", "cross_value")
_DTYPES = (np.dtype("float32"), np.dtype("float16"))
# What a reader takes at most: meta JSON (a training history included), its nesting, an .npy
# header, and an array when no backbone says how long a prefix can be.
MAX_META_BYTES = 4 << 20
MAX_META_DEPTH = 32
_MAX_HEADER = 10_000
MAX_ARRAY_BYTES = 1 << 30


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
    source: str | os.PathLike | bytes,
    architecture: Architecture | None = None,
    fingerprint: str | None = None,
    name: str | None = None,
) -> Prefix:
    """Read and validate a prefix file: a path, or the file's bytes (an upload; `name` is then
    what messages call it).

    With `architecture`, the arrays must have shape [L, H, P, D] for that backbone; with
    `fingerprint`, the file must have been trained against that backbone. Every array's
    declared shape and dtype is checked from its `.npy` header before anything is inflated,
    so a small file that claims gigabytes is refused unread.
    """
    if isinstance(source, (bytes, bytearray)):
        where, opened = name or "the uploaded file", io.BytesIO(source)
        head = bytes(source[:4])
    else:
        where = Path(source)
        if not where.is_file():
            raise PrefixFileError(f"{where}: no such prefix file.")
        opened = where
        try:
            with open(where, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise PrefixFileError(f"{where}: cannot be read ({e.strerror or e}).") from None
    if head != b"PK\x03\x04":  # numpy would try to unpickle anything else
        raise PrefixFileError(
            f"{where}: truncated or not an .npz file (it does not start as a zip archive); "
            "copy it again or re-create it with pt-train."
        )
    try:
        with zipfile.ZipFile(opened) as archive:
            arrays = _read_arrays(where, archive, architecture)
    except PrefixFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError,
            NotImplementedError, zlib.error) as e:
        raise PrefixFileError(
            f"{where}: truncated or not an .npz file ({type(e).__name__}: {e}); "
            "copy it again or re-create it with pt-train."
        ) from None
    meta = _parse_meta(where, arrays.pop("meta"))
    key, value = arrays.pop("key"), arrays.pop("value")
    return _validate(where, key, value, meta, architecture, fingerprint, arrays)


def _read_arrays(where, archive: zipfile.ZipFile, architecture: Architecture | None) -> dict[str, np.ndarray]:
    """The prefix's arrays from an open .npz, each checked from its header (member name, npy
    version, dtype, shape, declared size) before it is inflated."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        stem = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else None
        if stem not in (*ARRAYS, *SEQ2SEQ_ARRAYS):
            raise PrefixFileError(
                f"{where}: holds {info.filename!r}, which is not one of a prefix's arrays "
                f"({', '.join(ARRAYS + SEQ2SEQ_ARRAYS)}, each as .npy); re-create it with pt-train."
            )
        if stem in members:
            raise PrefixFileError(f"{where}: holds {info.filename!r} twice; re-create it with pt-train.")
        members[stem] = info
    missing = [name for name in ARRAYS if name not in members]
    if missing:
        raise PrefixFileError(
            f"{where}: not a prefix file: the array(s) {', '.join(missing)} are missing "
            f"(a prefix file holds {', '.join(ARRAYS)})."
        )
    arrays = {}
    for stem, info in members.items():
        with archive.open(info) as f:
            shape, dtype, header_bytes = _npy_header(where, stem, f)
            _check_declared(where, stem, shape, dtype, architecture)
            if info.file_size != header_bytes + _nbytes(shape, dtype):
                raise PrefixFileError(
                    f"{where}: '{stem}' declares {shape} {dtype} but its member holds {info.file_size} bytes; "
                    "the file is damaged: copy it again or re-create it with pt-train."
                )
            array = np.empty(shape, dtype)
            view = array.reshape(-1).view(np.uint8) if array.size else None
            if view is not None and f.readinto(memoryview(view)) != view.size:
                raise PrefixFileError(f"{where}: '{stem}' is truncated; copy the file again.")
        arrays[stem] = array
    return arrays


def _npy_header(where, stem: str, f) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length in bytes) of an .npy member, read without its data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"npy format version {version} is not read here")
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise PrefixFileError(f"{where}: '{stem}' is not a readable .npy array ({e}); re-create it with pt-train.") from None
    if dtype.hasobject:
        raise PrefixFileError(
            f"{where}: holds a pickled object array, which prefixkit never loads "
            "(it could run code); write key/value as float arrays and meta as JSON bytes."
        )
    if fortran and len(shape) > 1:
        raise PrefixFileError(f"{where}: '{stem}' is stored in Fortran order; re-create it with pt-train.")
    return tuple(int(n) for n in shape), dtype, f.tell()


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _check_declared(where, stem: str, shape: tuple[int, ...], dtype: np.dtype,
                    architecture: Architecture | None) -> None:
    """Refuse a dtype, a shape or a size no prefix can have, from the header alone."""
    if stem == "meta":
        if not (dtype == np.uint8 and len(shape) == 1 or dtype.kind in "US" and shape == ()):
            raise PrefixFileError(
                f"{where}: meta must be UTF-8 JSON stored as bytes or a string, not a "
                f"{dtype} array of shape {shape}."
            )
        if _nbytes(shape, dtype) > MAX_META_BYTES * (4 if dtype.kind == "U" else 1):  # UTF-32 for "U"
            raise PrefixFileError(f"{where}: meta is {_nbytes(shape, dtype)} bytes; at most {MAX_META_BYTES} are read.")
        return
    if dtype not in _DTYPES:
        raise PrefixFileError(f"{where}: '{stem}' is {dtype}; a prefix stores float32 or float16.")
    if len(shape) != 4:
        raise PrefixFileError(
            f"{where}: '{stem}' has shape {shape}; expected 4 dimensions [layers, kv_heads, prefix_len, head_dim]."
        )
    limit = MAX_ARRAY_BYTES
    if architecture is not None:  # the longest prefix this backbone can attend to
        layers = architecture.n_encoder_layers if stem.startswith("enc_") else architecture.n_layers
        limit = max(layers, 1) * architecture.n_kv_heads * architecture.max_positions * architecture.head_dim * 4
    if _nbytes(shape, dtype) > limit:
        raise PrefixFileError(
            f"{where}: '{stem}' declares shape {shape}, {_nbytes(shape, dtype)} bytes, more than a prefix "
            f"{'for this backbone ' if architecture is not None else ''}can hold ({limit} bytes); "
            "the file is damaged or not a prefix."
        )


def _parse_meta(path, raw: np.ndarray) -> dict[str, Any]:
    if raw.dtype == np.uint8:
        text_bytes = raw.tobytes()
    elif raw.dtype.kind == "U":
        text_bytes = str(raw[()]).encode("utf-8", "surrogatepass")
    else:
        text_bytes = bytes(raw[()])
    if len(text_bytes) > MAX_META_BYTES:
        raise PrefixFileError(f"{path}: meta is {len(text_bytes)} bytes; at most {MAX_META_BYTES} are read.")
    try:
        meta = json.loads(text_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixFileError(f"{path}: meta is not valid UTF-8 JSON ({e}).") from None
    except RecursionError:
        raise PrefixFileError(f"{path}: meta is nested too deeply (at most {MAX_META_DEPTH} levels).") from None
    if not isinstance(meta, dict):
        raise PrefixFileError(f"{path}: meta must be a JSON object, found {type(meta).__name__}.")
    if _depth(meta) > MAX_META_DEPTH:
        raise PrefixFileError(f"{path}: meta is nested too deeply (at most {MAX_META_DEPTH} levels).")
    _check_meta_fields(path, meta)
    return meta


def _depth(value: Any) -> int:
    """How deeply JSON lists and objects nest in `value` (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_META_DEPTH:
            todo.extend((child, level + 1) for child in children)
    return deepest


# The meta fields prefixkit reads, and what each must be.
_META_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "backbone_fingerprint": (str, "a string"),
    "prefix_len": (int, "an integer"),
    "created": (str, "an ISO date string"),
    "template": ((str, type(None)), "a string with {input} once, or null"),
    "stop": (list, "a list of strings"),
    "method": (str, "a string"),
    "backbone": (str, "a string"),
    "steps": (int, "an integer"),
    "seconds": ((int, float), "a number"),
    "data": (dict, "an object"),
    "losses": (dict, "an object"),
    "settings": (dict, "an object"),
}


def _check_meta_fields(path, meta: dict[str, Any]) -> None:
    """The known fields' types, the template's one {input}, and the stop strings' limits."""
    for field, (kind, described) in _META_FIELDS.items():
        value = meta.get(field)
        if field in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            raise PrefixFileError(f"{path}: meta field '{field}' is {type(value).__name__}; it must be {described}.")
    template = meta.get("template")
    if isinstance(template, str):
        try:
            check_template(template)
        except ValueError as e:
            raise PrefixFileError(f"{path}: meta field 'template': {e}") from None
    try:
        check_stops(meta.get("stop", ()), "the prefix's stop strings")
    except ValueError as e:
        raise PrefixFileError(f"{path}: meta field 'stop': {e}") from None


def _validate(
    path,
    key: np.ndarray,
    value: np.ndarray,
    meta: dict[str, Any],
    architecture: Architecture | None = None,
    fingerprint: str | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Prefix:
    """The arrays and meta of one prefix, checked together: format and arrays, shapes against
    each other and the backbone, finite values, the backbone's fingerprint."""
    extra = dict(extra or {})
    _check_format(path, meta, extra)
    _check_arrays(path, key, value, extra)
    if key.shape[2] != meta["prefix_len"]:
        raise PrefixFileError(
            f"{path}: meta says prefix_len {meta['prefix_len']} but the arrays hold "
            f"{key.shape[2]} positions."
        )
    if key.shape[2] < 1:
        raise PrefixFileError(f"{path}: the prefix is empty (prefix_len 0).")
    if architecture is not None:
        _check_backbone(path, key, extra, architecture)
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


def _check_format(path, meta: dict[str, Any], extra: dict[str, np.ndarray]) -> None:
    """A format this reader knows, with the arrays that format has and the meta it needs."""
    version = meta.get("format")
    if version not in READS or isinstance(version, bool):
        raise PrefixFileError(
            f"{path}: prefix format {version!r} is not one this prefixkit reads "
            f"(it reads formats {', '.join(map(str, READS))}); upgrade prefixkit or re-create the prefix."
        )
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


def _check_arrays(path, key: np.ndarray, value: np.ndarray, extra: dict[str, np.ndarray]) -> None:
    """Float arrays of 4 dimensions whose shapes agree with each other."""
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
    if not extra:
        return
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


def _check_backbone(path, key: np.ndarray, extra: dict[str, np.ndarray], architecture: Architecture) -> None:
    """Shapes that fit this backbone: decoder-only or not, layers, KV heads, head size."""
    if architecture.is_encoder_decoder != bool(extra):
        made_for = "an encoder-decoder" if extra else "a decoder-only"
        raise PrefixFileError(
            f"{path}: a prefix for {made_for} backbone; this backbone ({architecture.model_type}) is "
            f"{'encoder-decoder' if architecture.is_encoder_decoder else 'decoder-only'}."
        )
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


def _short(fingerprint: Any) -> str:
    return str(fingerprint)[:18] + "…" if len(str(fingerprint)) > 18 else str(fingerprint)
