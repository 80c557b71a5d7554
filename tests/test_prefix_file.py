"""The prefix file (format 1): what is written comes back exactly, and every bad file is
rejected with a message that names the file and the problem."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest

from prefixkit.runtime import Architecture, PrefixFileError, load_prefix, make_meta, save_prefix
from prefixkit.runtime.prefix import Prefix

# A Llama-like backbone with grouped-query attention: 4 query heads, 2 KV heads.
ARCH = Architecture(
    model_type="llama", n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
    hidden_size=32, vocab_size=512, max_positions=128,
)
FP = "pkfp1-" + "ab" * 32
P = 5


def make_prefix(dtype=np.float32, prefix_len=P, **meta_fields) -> Prefix:
    rng = np.random.default_rng(0)
    shape = ARCH.kv_shape(prefix_len)
    return Prefix(
        key=rng.standard_normal(shape).astype(dtype),
        value=rng.standard_normal(shape).astype(dtype),
        meta=make_meta(FP, prefix_len, template="{input}\n", stop=["\n"], **meta_fields),
    )


def write_raw(path, **arrays):
    """Write an .npz exactly as given, bypassing save_prefix's validation."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def meta_bytes(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), np.uint8)


def good_arrays(**override):
    prefix = make_prefix()
    arrays = {"key": prefix.key, "value": prefix.value, "meta": meta_bytes(prefix.meta)}
    arrays.update(override)
    return arrays


def assert_rejected(path, *fragments, **kwargs):
    with pytest.raises(PrefixFileError) as info:
        load_prefix(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_saved_prefix_reads_back_identical_with_its_meta(tmp_path, dtype):
    prefix = make_prefix(dtype, method="prefix", losses={"train": 1.25}, note="café ☕")
    path = save_prefix(tmp_path / "user42.npz", prefix)
    loaded = load_prefix(path, architecture=ARCH, fingerprint=FP)
    assert loaded.key.dtype == dtype and loaded.value.dtype == dtype
    np.testing.assert_array_equal(loaded.key, prefix.key)
    np.testing.assert_array_equal(loaded.value, prefix.value)
    assert loaded.meta == prefix.meta
    assert loaded.prefix_len == P and loaded.fingerprint == FP
    assert loaded.meta["format"] == 1 and loaded.meta["template"] == "{input}\n"


def test_file_holds_no_object_arrays_and_loads_without_pickle(tmp_path):
    path = save_prefix(tmp_path / "p.npz", make_prefix())
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["key", "value", "meta"] or set(npz.files) == {"key", "value", "meta"}
        assert all(npz[name].dtype != object for name in npz.files)
        assert json.loads(npz["meta"].tobytes().decode())["prefix_len"] == P


def test_meta_stored_as_a_numpy_string_is_read_too(tmp_path):
    prefix = make_prefix()
    path = write_raw(tmp_path / "p.npz", key=prefix.key, value=prefix.value, meta=np.array(json.dumps(prefix.meta)))
    assert load_prefix(path, architecture=ARCH).meta == prefix.meta


@pytest.mark.parametrize("missing", ["key", "value", "meta"])
def test_missing_array_is_named(tmp_path, missing):
    arrays = good_arrays()
    del arrays[missing]
    path = write_raw(tmp_path / "p.npz", **arrays)
    assert_rejected(path, "missing", missing)


def test_shape_of_another_backbone_is_rejected_with_the_expected_shape(tmp_path):
    # The classic grouped-query mistake: one KV head per query head.
    wrong = np.zeros((ARCH.n_layers, ARCH.n_heads, P, ARCH.head_dim), np.float32)
    path = write_raw(tmp_path / "p.npz", **good_arrays(key=wrong, value=wrong))
    assert load_prefix(path).key.shape == wrong.shape  # self-consistent without a backbone
    assert_rejected(path, str(tuple(wrong.shape)), str(ARCH.kv_shape(P)), architecture=ARCH)


def test_key_and_value_of_different_shapes_are_rejected(tmp_path):
    prefix = make_prefix()
    path = write_raw(tmp_path / "p.npz", **good_arrays(value=prefix.value[:, :, :3]))
    assert_rejected(path, "'key' has shape", "'value' has")


def test_wrong_rank_is_rejected(tmp_path):
    path = write_raw(tmp_path / "p.npz", **good_arrays(key=np.zeros((3, 2, 5), np.float32)))
    assert_rejected(path, "4 dimensions")


def test_prefix_len_in_meta_must_match_arrays(tmp_path):
    meta = make_prefix().meta | {"prefix_len": 7}
    path = write_raw(tmp_path / "p.npz", **good_arrays(meta=meta_bytes(meta)))
    assert_rejected(path, "prefix_len 7", "5 positions")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(tmp_path, bad):
    value = make_prefix().value.copy()
    value[1, 0, 2, 3] = bad
    path = write_raw(tmp_path / "p.npz", **good_arrays(value=value))
    assert_rejected(path, "'value'", "1 non-finite")


def test_integer_arrays_are_rejected(tmp_path):
    key = np.zeros(ARCH.kv_shape(P), np.int32)
    path = write_raw(tmp_path / "p.npz", **good_arrays(key=key))
    assert_rejected(path, "int32", "float32 or float16")


def test_prefix_of_another_backbone_fingerprint_is_rejected(tmp_path):
    path = save_prefix(tmp_path / "p.npz", make_prefix())
    other = "pkfp1-" + "cd" * 32
    assert_rejected(path, "trained against backbone pkfp1-abab", "not this one (pkfp1-cdcd", fingerprint=other)


@pytest.mark.parametrize("version", [3, 0, None, "1"])
def test_unknown_format_version_is_rejected(tmp_path, version):
    meta = make_prefix().meta | {"format": version}
    path = write_raw(tmp_path / "p.npz", **good_arrays(meta=meta_bytes(meta)))
    assert_rejected(path, f"prefix format {version!r}", "reads formats 1, 2")


def test_format_2_without_its_encoder_decoder_arrays_is_rejected(tmp_path):
    meta = make_prefix().meta | {"format": 2}
    path = write_raw(tmp_path / "p.npz", **good_arrays(meta=meta_bytes(meta)))
    assert_rejected(path, "encoder-decoder prefix (format 2)", "enc_key, enc_value, cross_key, cross_value")


def test_missing_fingerprint_in_meta_is_rejected(tmp_path):
    meta = make_prefix().meta
    del meta["backbone_fingerprint"]
    path = write_raw(tmp_path / "p.npz", **good_arrays(meta=meta_bytes(meta)))
    assert_rejected(path, "backbone_fingerprint")


def test_pickled_object_array_is_refused_not_unpickled(tmp_path):
    prefix = make_prefix()
    obj = np.array([{"evil": "payload"}], dtype=object)
    path = write_raw(tmp_path / "p.npz", key=prefix.key, value=prefix.value, meta=obj)
    assert_rejected(path, "pickled object array")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_file_is_rejected(tmp_path, keep):
    data = save_prefix(tmp_path / "good.npz", make_prefix()).read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: int(len(data) * keep)])
    assert_rejected(path, "truncated or not an .npz")


def test_non_npz_file_is_rejected(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays\n")
    assert_rejected(path, "truncated or not an .npz")


def test_corrupted_member_is_rejected(tmp_path):
    # Flip bytes inside the stored key array: the zip's CRC no longer matches.
    path = save_prefix(tmp_path / "p.npz", make_prefix())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("key.npy")
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    assert_rejected(path, "truncated or not an .npz")


def test_meta_that_is_not_json_is_rejected(tmp_path):
    path = write_raw(tmp_path / "p.npz", **good_arrays(meta=np.frombuffer(b"{not json", np.uint8)))
    assert_rejected(path, "meta is not valid UTF-8 JSON")


def test_missing_file_is_named(tmp_path):
    assert_rejected(tmp_path / "nope.npz", "no such prefix file")


def test_save_refuses_an_invalid_prefix_and_leaves_no_file(tmp_path):
    prefix = make_prefix()
    prefix.key[0, 0, 0, 0] = np.nan
    with pytest.raises(PrefixFileError, match="non-finite"):
        save_prefix(tmp_path / "p.npz", prefix)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_prefix(tmp_path / "user42.npz", make_prefix())
    before = path.read_bytes()

    def savez_then_crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_prefix(path, make_prefix(prefix_len=2))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["user42.npz"]
    assert load_prefix(path, architecture=ARCH).prefix_len == P


def test_written_file_gets_the_usual_permissions_not_mkstemp_private_ones(tmp_path):
    from prefixkit.runtime.files import _UMASK

    path = save_prefix(tmp_path / "p.npz", make_prefix())
    assert path.stat().st_mode & 0o777 == 0o666 & ~_UMASK
