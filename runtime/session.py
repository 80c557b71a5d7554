"""An exported backbone in ONNX Runtime: its session, the providers and kernels it runs with,
one forward pass over a batch laid out as runtime/cache.py says, and a prompt prefilled in
chunks."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .manifest import ATTENTION_KERNEL, FINGERPRINT_METADATA, MODEL_FILE, Manifest, ManifestError, load_manifest
from .cache import BatchInputs, SharedKVCache, left_padded_batch
from .prefix import Prefix

PROVIDERS_ENV = "PREFIXKIT_PROVIDERS"
# Providers whose running cache stays in device memory between decode steps (DeviceKVCache),
# and the ONNX Runtime device name of that memory.
CACHE_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
OPS_DIR = Path(__file__).resolve().parent / "ops"


def default_providers() -> tuple[str, ...]:
    """ONNX Runtime execution providers in order of preference: $PREFIXKIT_PROVIDERS
    (comma-separated, e.g. "CUDAExecutionProvider,CPUExecutionProvider"), else the CPU."""
    named = [p.strip() for p in os.environ.get(PROVIDERS_ENV, "").split(",") if p.strip()]
    return tuple(named) or ("CPUExecutionProvider",)


def checked_providers(providers: Sequence[str] | None, manifest: Manifest | None = None,
                      cuda_graphs: bool = False) -> list:
    """The providers asked for (default_providers() if None), each one this onnxruntime has,
    as InferenceSession takes them, with prefixkit's options (provider_options) for `manifest`'s
    export."""
    import onnxruntime as ort

    providers = list(providers or default_providers())
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(
            f"execution provider {', '.join(missing)} is not in this onnxruntime "
            f"(it has {', '.join(ort.get_available_providers())}); for CUDA and TensorRT install "
            f"prefixkit[gpu] in place of onnxruntime."
        )
    return [(p, options) if (options := provider_options(p, manifest, cuda_graphs)) else p for p in providers]


CUDA_GRAPHS_ENV = "PREFIXKIT_CUDA_GRAPHS"
TRT_MAX_ROWS = 64  # the most rows a TensorRT engine is built for


def provider_options(provider: str, manifest: Manifest | None = None, cuda_graphs: bool = False) -> dict[str, str]:
    """What prefixkit sets on a provider for an export.

    CUDA: no TF32 matmuls (fp32 exports promise fp32 results, token-identical to PyTorch fp32;
    the provider otherwise uses TF32 on Ampere and later GPUs), and CUDA graph capture where
    asked (runtime/device.py replays one graph per batch size).
    TensorRT: fp16 for fp16 exports, engines cached under the prefixkit cache by backbone, and
    one dynamic-shape profile: 1 row of 1 token with an empty cache, tuned for 8 rows decoding
    one token in a cache of 128 positions (the mask as wide, as the device search binds it),
    up to TRT_MAX_ROWS rows of the backbone's positions."""
    if provider == "CUDAExecutionProvider":
        return {"use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graphs else {})}
    if provider != "TensorrtExecutionProvider" or manifest is None:
        return {}
    from .files import cache_dir

    a, graph, M = manifest.architecture, manifest.graph, manifest.max_positions
    cache_inputs = [graph.past_key.format(layer=i) for i in range(a.n_layers)]
    cache_inputs += [graph.past_value.format(layer=i) for i in range(a.n_layers)]

    def profile(rows: int, tokens: int, past: int, mask: int) -> str:
        shapes = {"input_ids": [rows, tokens], "attention_mask": [rows, mask]}
        if "position_ids" in graph.inputs:
            shapes["position_ids"] = [rows, tokens]
        shapes |= {name: [rows, a.n_kv_heads, past, a.head_dim] for name in cache_inputs}
        return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())

    engines = cache_dir() / "tensorrt" / manifest.fingerprint.replace(":", "-")
    return {
        "trt_fp16_enable": "1" if manifest.dtype == "float16" else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "1",
        "trt_profile_min_shapes": profile(1, 1, 0, 1),
        "trt_profile_opt_shapes": profile(8, 1, min(128, M), min(128, M)),
        "trt_profile_max_shapes": profile(TRT_MAX_ROWS, M, M, M),
    }


def open_session(path: Path, options, providers, fingerprint: str):
    """An ONNX Runtime session of an exported graph, which must carry the backbone fingerprint
    the manifest states (the exporter stamps it into the graph's metadata). A graph ONNX
    Runtime cannot load (a file cut short, a weights file missing), or another backbone's, is a
    ManifestError in one sentence."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors here
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ManifestError(
            f"{path.parent}: ONNX Runtime cannot load {path.name} ({first}); the export is damaged or "
            "incomplete: export it again with pt-export --force."
        ) from None
    stamped = session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_METADATA)
    if stamped != fingerprint:
        raise ManifestError(
            f"{path.parent}: {path.name} belongs to backbone {stamped!r}, but the manifest "
            f"says {fingerprint!r}; the folder was mixed up, export it again."
        )
    return session


def _uses_kernels(manifest: Manifest) -> bool:
    """Whether the export's graph has prefixkit's operators (run by its CPU kernels where they
    are registered)."""
    return bool((manifest.quantization or {}).get("kernel_nodes")) or manifest.graph.attention == ATTENTION_KERNEL


def _kernel_notes(folder: Path, manifest: Manifest, providers: Sequence, own_kernels: bool) -> list[str]:
    """What a session on this export misses of prefixkit's CPU kernels: an export made by an
    earlier prefixkit, which remaking would give them, or integer activations that a session
    without the kernels does not round."""
    from . import kernels  # imported where used: `python -m prefixkit.runtime.kernels` runs it as a script

    quantization, notes = manifest.quantization or {}, []
    if kernels.wanted() and kernels.cpu_only(providers):
        older = None
        fused = manifest.graph.kind == "genai-gqa"
        if quantization and "kernel_nodes" not in quantization:
            older = "matmuls"
        elif quantization and fused and "attention_nodes" not in quantization:
            older = "attention"
        elif not quantization and fused and manifest.dtype == "float32" and not manifest.graph.attention:
            older = "attention"
        if older:
            notes.append(f"{folder} was exported before prefixkit's own CPU kernel for its {older} and runs it "
                         "on ONNX Runtime's, which is slower; `pt-export --force` remakes it with it.")
    if quantization.get("activations", "fp32") != "fp32" and not own_kernels:
        notes.append(f"{folder} rounds activations to {quantization['activations']} in prefixkit's CPU kernel, "
                     "which this session does not use: it runs with fp32 activations.")
    return notes


class ExportedBackbone:
    """An export folder loaded once into an ONNX Runtime session."""

    def __init__(
        self,
        folder: str | os.PathLike,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        """`cuda_graphs`: capture decode steps in CUDA graphs (default: $PREFIXKIT_CUDA_GRAPHS=1),
        where the search runs on the device under CUDA."""
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "0") == "1"
        wanted = list(providers or default_providers())
        self.cuda_graphs = (cuda_graphs and wanted[0] == "CUDAExecutionProvider"
                            and self.manifest.graph.kind == "genai-gqa" and self.manifest.dtype != "float32")
        providers = checked_providers(wanted, self.manifest, self.cuda_graphs)
        self.captured_graphs: dict[tuple, int] = {}  # CUDA graph ids by what a step binds (runtime/device.py)
        self._run_options: dict[int, object] = {}
        # prefixkit's CPU kernels, loaded only for the exports whose graph uses them
        from . import kernels

        self.own_kernels = _uses_kernels(self.manifest) and kernels.register(options, providers)
        for note in _kernel_notes(self.folder, self.manifest, providers, self.own_kernels):
            print(f"prefixkit: {note}", file=sys.stderr)
        self.session = open_session(self.folder / MODEL_FILE, options, providers, self.manifest.fingerprint)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.kv_dtype = np.dtype(self.manifest.dtype)
        graph, n_layers = self.manifest.graph, self.manifest.architecture.n_layers
        self._past = [(graph.past_key.format(layer=i), graph.past_value.format(layer=i)) for i in range(n_layers)]
        self._present = [
            (graph.present_key.format(layer=i), graph.present_value.format(layer=i)) for i in range(n_layers)
        ]
        # ONNX Runtime's GroupQueryAttention has CUDA kernels for float16 and bfloat16 only
        # (1.31; seen on an H200): in a float32 fused graph it runs on the CPU whatever the
        # provider, so that graph's cache stays in host memory, in place, where its attention
        # reads it (the matmuls still run on the GPU): copying the cache to and from device memory
        # every step costs more than it saves (benchmarks/results/latency-cuda.md).
        provider = self.session.get_providers()[0]
        self.attention_on_host = graph.kind == "genai-gqa" and (
            provider == "CPUExecutionProvider" or self.kv_dtype == np.float32)
        # Where decoding keeps the cache: None for host memory (numpy), else an ONNX Runtime
        # device name ("cuda"). Tests set "cpu" to run the device path on the CPU provider.
        self.cache_device: str | None = None if self.attention_on_host else CACHE_DEVICE.get(provider)
        self._ops: dict = {}
        logits = next(output for output in self.session.get_outputs() if output.name == "logits")
        self._logits_dtype = np.dtype(np.float16 if logits.type == "tensor(float16)" else np.float32)
        self._vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None

    def bind_logits(self, io, rows: int) -> np.ndarray | None:
        """Bind a decode step's logits [rows, 1, V] to a new host array and return it: reading
        them from there does not wrap every one of the step's outputs (get_outputs, 61 of them
        for smollm2). None, and bound by name, where the graph leaves V open."""
        if self._vocab is None:
            io.bind_output("logits", "cpu")
            return None
        logits = np.empty((rows, 1, self._vocab), self._logits_dtype)
        io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        return logits

    def run_step(self, io, logits: np.ndarray | None, input_ids: np.ndarray, attention_mask: np.ndarray,
                 position_ids: np.ndarray) -> np.ndarray:
        """Run one decode step on `io`, whose cache and logits (bind_logits' array, or None) are
        bound already: binds the step's ids, mask and (where the graph takes them) positions,
        runs, and returns the last logits [B, V] float32, a copy (a bound array is reused)."""
        self.run_bound(io, input_ids, attention_mask, position_ids)
        if logits is None:
            logits = io.get_outputs()[0].numpy()
        return logits[:, -1].astype(np.float32)

    def run_bound(self, io, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> None:
        """Bind a step's ids, mask and (where the graph takes them) positions to `io`, whose
        cache and logits are bound already, and run it (never as a captured CUDA graph)."""
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
        self.run_io(io)

    def run_io(self, io, graph_id: int = -1) -> None:
        """Run a bound step; with CUDA graphs, as the captured graph `graph_id` (captured on its
        first runs), or uncaptured (-1)."""
        if not self.cuda_graphs:
            self.session.run_with_iobinding(io)
            return
        if graph_id not in self._run_options:  # made once per graph: this is every decode step
            import onnxruntime as ort

            self._run_options[graph_id] = ort.RunOptions()
            self._run_options[graph_id].add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(io, self._run_options[graph_id])

    def op(self, name: str, dtype: np.dtype | None = None):
        """An ONNX Runtime session, on this backbone's providers, of one of the small graphs
        that work on a device-resident cache or on a step's logits (exporter/cache_ops.py), for
        values of `dtype` (the cache's by default)."""
        import onnxruntime as ort

        dtype = np.dtype(dtype or self.kv_dtype)
        if (name, dtype) not in self._ops:
            path = OPS_DIR / f"{name}.{dtype.name}.onnx"
            if not path.is_file():
                raise ManifestError(f"no {name} graph for {dtype.name} values ({path}).")
            self._ops[name, dtype] = ort.InferenceSession(str(path), providers=self.session.get_providers())
        return self._ops[name, dtype]

    @property
    def logits_dtype(self) -> np.dtype:
        return self._logits_dtype

    @property
    def vocab(self) -> int | None:
        """The logits' last dimension, where the graph fixes it."""
        return self._vocab

    @property
    def architecture(self):
        return self.manifest.architecture

    @property
    def searches_on_device(self) -> bool:
        """Whether decoding keeps the fused graph's cache in device memory, in place, and
        chooses tokens there (runtime/device.py): its attention runs on the device."""
        return self.cache_device is not None and self.manifest.graph.kind == "genai-gqa"

    @property
    def shares_cache_buffers(self) -> bool:
        """Whether decoding can keep the cache in place (SharedKVCache): the fused graph, whose
        GroupQueryAttention writes into a shared past/present buffer, where that attention runs
        on the CPU (numpy buffers live in host memory)."""
        return self.attention_on_host

    def batch(self, rows: Sequence[tuple[Prefix | None, Sequence[int]]]) -> BatchInputs:
        a = self.architecture
        return left_padded_batch(
            rows, a.n_layers, a.n_kv_heads, a.head_dim, self.manifest.pad_token_id, self.kv_dtype
        )

    def run_alone(self, prefix: Prefix | None, ids: Sequence[int]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """One row through the graph by itself, no padding: its logits [T, V] ([1, V], the last
        position, where graph.logits is "last") and its cache (key, value [L, H, P + T, D])."""
        batch = self.batch([(prefix, ids)])
        logits, keys, values = self.forward(batch)
        return batch.row_logits(logits, 0), batch.row_cache(keys, values, 0)

    def forward(self, inputs: BatchInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits [B, T, V] ([B, 1, V] where graph.logits is "last") and the new cache, key and
        value [L, B, H, P + T, D]."""
        feed = {
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
        }
        if "position_ids" in self.input_names:
            feed["position_ids"] = inputs.position_ids
        for layer, (k, v) in enumerate(self._past):
            feed[k] = inputs.past_key[layer]
            feed[v] = inputs.past_value[layer]
        wanted = ["logits"] + [name for pair in self._present for name in pair]
        out = self.session.run(wanted, feed)
        logits = out[0]
        keys = np.stack(out[1::2])
        values = np.stack(out[2::2])
        return logits, keys, values


class Prefill:
    """One row's prompt prefilled a chunk at a time, so that a long prompt shares the machine
    with rows that are decoding: the same logits and cache as `run_alone(prefix, ids)` in one go.

    Every chunk has at least two tokens: ONNX Runtime's and prefixkit's matmuls take another
    path for a single new token (a decode step), which sums in another order; chunks of two or
    more give the one-go prefill's values bit for bit (tests compare them). The fused graph on
    the CPU writes each chunk in place into one preallocated row (SharedKVCache); other graphs
    pass the cache so far as the next chunk's past.
    """

    def __init__(self, exported: ExportedBackbone, prefix: Prefix | None, ids: Sequence[int], room: int = 0):
        self.exported, self.ids, self.done = exported, list(ids), 0
        P = 0 if prefix is None else prefix.prefix_len
        a = exported.architecture
        if prefix is None:
            key = np.zeros((a.n_layers, a.n_kv_heads, 0, a.head_dim), exported.kv_dtype)
            prefix = Prefix(key, key.copy(), {})
        self.past: Prefix | None = prefix
        self.cache: SharedKVCache | None = None
        if exported.shares_cache_buffers:
            self.cache = SharedKVCache(exported, prefix.key[:, None], prefix.value[:, None], np.array([P]),
                                       room=(1, P + len(self.ids) + room))
            self.past = None
        self.logits: np.ndarray | None = None

    @property
    def left(self) -> int:
        return len(self.ids) - self.done

    def advance(self, tokens: int) -> bool:
        """Prefill about `tokens` more tokens (at least 2, and never leaving 1); True when done."""
        n = min(self.left, max(2, tokens))
        if self.left - n == 1:
            n += 1
        chunk = self.ids[self.done : self.done + n]
        if self.cache is not None:
            self.logits = self.cache.extend(chunk)
        else:
            logits, (key, value) = self.exported.run_alone(self.past, chunk)
            self.logits, self.past = logits[-1:], Prefix(key, value, {})
        self.done += n
        return self.left == 0

    def result(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """As run_alone: the last logits [1, V] and the row's cache (key, value [L, H, P + T, D])."""
        if self.cache is not None:
            S = int(self.cache.lens[0])
            return self.logits, (self.cache.key[:, 0, :, :S], self.cache.value[:, 0, :, :S])
        return self.logits, (self.past.key, self.past.value)
