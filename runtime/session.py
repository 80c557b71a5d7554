"""An exported backbone in ONNX Runtime, and the batch layout that lets rows with different
prefixes share one forward pass.

The layout (design doc, "Conventions"): each row's prefix is its initial cache, left-padded
to the batch's longest prefix; each row's tokens are left-padded to the longest row. The
attention mask covers prefix + tokens and is 0 on padding; a row's tokens take positions
P_i, P_i + 1, ... whatever the padding, counted from the mask.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import kernels
from .manifest import ATTENTION_KERNEL, FINGERPRINT_METADATA, MODEL_FILE, Manifest, ManifestError, load_manifest
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


def checked_providers(providers: Sequence[str] | None) -> list:
    """The providers asked for (default_providers() if None), each one this onnxruntime has,
    as InferenceSession takes them (with options where prefixkit sets any)."""
    import onnxruntime as ort

    providers = list(providers or default_providers())
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(
            f"execution provider {', '.join(missing)} is not in this onnxruntime "
            f"(it has {', '.join(ort.get_available_providers())}); for CUDA and TensorRT install "
            f"prefixkit[gpu] in place of onnxruntime."
        )
    # fp32 exports promise fp32 results (token-identical to PyTorch fp32): no TF32 matmuls, which
    # the CUDA provider otherwise uses on Ampere and later GPUs.
    return [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]


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


@dataclasses.dataclass
class BatchInputs:
    """One forward pass for B rows. Shapes: P = longest prefix, T = longest row."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, P + T] int64
    position_ids: np.ndarray  # [B, T] int64
    past_key: np.ndarray  # [L, B, H, P, D]
    past_value: np.ndarray  # [L, B, H, P, D]
    prefix_lens: np.ndarray  # [B]
    token_lens: np.ndarray  # [B]

    def row_logits(self, logits: np.ndarray, row: int) -> np.ndarray:
        """The logits [T_i, V] of row `row`'s own tokens (left-padded), padding dropped; [1, V],
        its last token's, from a graph that projects the last position only (graph.logits)."""
        return logits[row, logits.shape[1] - min(int(self.token_lens[row]), logits.shape[1]) :]

    def row_cache(self, keys: np.ndarray, values: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `row`'s part [L, H, S_i, D] of a returned cache [L, B, H, S, D], for a batch of
        one row (no padding) or a right-padded one."""
        n = int(self.prefix_lens[row] + self.token_lens[row])
        return keys[:, row, :, :n], values[:, row, :, :n]


def positions_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids [B, T] of the last `new_tokens` columns: the count of real entries
    before each one, so a row's tokens start at its own prefix length."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask == 0, 1, positions)  # padding: any valid position
    return positions[:, attention_mask.shape[1] - new_tokens :].astype(np.int64)


def left_padded_batch(
    rows: Sequence[tuple[Prefix | None, Sequence[int]]],
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    pad_token_id: int,
    dtype: np.dtype = np.float32,
) -> BatchInputs:
    """Lay out rows of (prefix or None, token ids) for one forward pass."""
    if not rows:
        raise ValueError("a batch needs at least one row")
    prefix_lens = np.array([0 if p is None else p.prefix_len for p, _ in rows], np.int64)
    token_lens = np.array([len(ids) for _, ids in rows], np.int64)
    if token_lens.min() < 1:
        raise ValueError("every row needs at least one token")
    B, P, T = len(rows), int(prefix_lens.max()), int(token_lens.max())
    past_key = np.zeros((n_layers, B, n_kv_heads, P, head_dim), dtype)
    past_value = np.zeros_like(past_key)
    input_ids = np.full((B, T), pad_token_id, np.int64)
    mask = np.zeros((B, P + T), np.int64)
    for b, (prefix, ids) in enumerate(rows):
        p, t = int(prefix_lens[b]), int(token_lens[b])
        if prefix is not None:
            past_key[:, b, :, P - p :] = prefix.key
            past_value[:, b, :, P - p :] = prefix.value
        mask[b, P - p : P] = 1
        input_ids[b, T - t :] = ids
        mask[b, P + T - t :] = 1
    return BatchInputs(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask, T),
        past_key=past_key,
        past_value=past_value,
        prefix_lens=prefix_lens,
        token_lens=token_lens,
    )


def right_pad(caches: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows' caches (key, value [L, H, S_b, D]) as one batch [L, B, H, max S_b, D], each row's
    positions first and padding after, with the lengths S_b [B]."""
    lens = np.array([k.shape[2] for k, _ in caches], np.int64)
    L, H, _, D = caches[0][0].shape
    past_key = np.zeros((L, len(caches), H, int(lens.max()), D), caches[0][0].dtype)
    past_value = np.zeros_like(past_key)
    for b, (key, value) in enumerate(caches):
        past_key[:, b, :, : lens[b]] = key
        past_value[:, b, :, : lens[b]] = value
    return past_key, past_value, lens


def right_padded_step(caches: Sequence[tuple[np.ndarray, np.ndarray]], next_ids: Sequence[int]) -> BatchInputs:
    """One decode step for rows with caches of different lengths, right-padded, as the fused
    GroupQueryAttention graph needs: row b's cache (key, value [L, H, S_b, D]) fills
    positions 0..S_b - 1, its new token takes position S_b, and the mask holds S_b + 1 ones
    followed by zeros (the graph reads it as a count)."""
    past_key, past_value, lens = right_pad(caches)
    B = len(caches)
    mask = (np.arange(int(lens.max()) + 1)[None] <= lens[:, None]).astype(np.int64)
    return BatchInputs(
        input_ids=np.asarray(next_ids, np.int64).reshape(B, 1),
        attention_mask=mask,
        position_ids=lens.reshape(B, 1),
        past_key=past_key,
        past_value=past_value,
        prefix_lens=lens,
        token_lens=np.ones(B, np.int64),
    )


def _uses_kernels(manifest: Manifest) -> bool:
    """Whether the export's graph has prefixkit's operators (run by its CPU kernels where they
    are registered)."""
    return bool((manifest.quantization or {}).get("kernel_nodes")) or manifest.graph.attention == ATTENTION_KERNEL


def _kernel_notes(folder: Path, manifest: Manifest, providers: Sequence, own_kernels: bool) -> list[str]:
    """What a session on this export misses of prefixkit's CPU kernels: an export made by an
    earlier prefixkit, which remaking would give them, or integer activations that a session
    without the kernels does not round."""
    quantization, notes = manifest.quantization or {}, []
    if kernels.enabled() and kernels.cpu_only(providers):
        older = None
        fused = manifest.graph.kind == "genai-gqa"
        if quantization and "kernel_nodes" not in quantization:
            older = "matmuls"
        elif quantization and fused and "attention_nodes" not in quantization:
            older = "attention"
        elif not quantization and fused and manifest.dtype == "float32" and manifest.graph.attention != ATTENTION_KERNEL:
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
    ):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = checked_providers(providers)
        # prefixkit's CPU kernels, built and loaded only for the exports whose graph uses them
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
        self._gather = None
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
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
        self.session.run_with_iobinding(io)
        if logits is None:
            logits = io.get_outputs()[0].numpy()
        return logits[:, -1].astype(np.float32)

    def gather_rows(self):
        """An ONNX Runtime session, on this backbone's providers, of the graph that reorders a
        device-resident cache (exporter/cache_ops.py)."""
        import onnxruntime as ort

        if self._gather is None:
            path = OPS_DIR / f"gather_rows.{self.kv_dtype.name}.onnx"
            if not path.is_file():
                raise ManifestError(f"no device cache reorder graph for a {self.kv_dtype.name} cache ({path}).")
            self._gather = ort.InferenceSession(str(path), providers=self.session.get_providers())
        return self._gather

    @property
    def architecture(self):
        return self.manifest.architecture

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


class SharedKVCache:
    """The running cache of the fused GroupQueryAttention graph, kept where the graph writes it.

    Preallocated buffers key, value [L, R, H, M, D] (room for R rows of M positions) hold each
    row's cache from position 0, padding after, with the lengths in `lens`. A decode step binds
    the first B rows as both past and present (ONNX Runtime IO binding); GroupQueryAttention,
    given one buffer for both, writes the new position in place instead of copying the cache.
    Only a row joining, leaving or being reordered (beam search) copies anything; the logits
    are those of a step that copies.
    """

    GROW = 64  # positions added at a time

    def __init__(self, exported: "ExportedBackbone", key: np.ndarray, value: np.ndarray, lens: np.ndarray,
                 room: tuple[int, int] | None = None):
        """`room`: rows and positions to make room for now, where the generation's length is known
        (growing mid-way copies the whole cache and rebinds it).
        Pages past what the rows hold are never touched: unused room is address space, not memory."""
        L, B, H, S, D = key.shape
        self.exported = exported
        self.limit = exported.manifest.max_positions
        rows, positions = room or (0, 0)
        self.key = np.zeros((L, max(B, rows, 1), H, self._room(max(S + 1, positions)), D), exported.kv_dtype)
        self.value = np.zeros_like(self.key)
        self.key[:, :B, :, :S], self.value[:, :B, :, :S] = key, value
        self.lens = np.asarray(lens, np.int64).copy()
        self._bound: tuple | None = None

    def __len__(self) -> int:
        return len(self.lens)

    def _room(self, needed: int) -> int:
        return min(self.limit, -(-needed // self.GROW) * self.GROW)

    def _grow(self, rows: int, positions: int) -> None:
        L, R, H, M, D = self.key.shape
        if rows <= R and positions <= M:
            return
        R2 = max(rows, 2 * R) if rows > R else R
        M2 = max(M, self._room(positions))
        key = np.zeros((L, R2, H, M2, D), self.key.dtype)
        value = np.zeros_like(key)
        n, w = len(self.lens), int(self.lens.max(initial=0))
        key[:, :n, :, :w], value[:, :n, :, :w] = self.key[:, :n, :, :w], self.value[:, :n, :, :w]
        self.key, self.value, self._bound = key, value, None

    def append(self, key: np.ndarray, value: np.ndarray) -> None:
        """One more row, its cache key, value [L, H, S, D]."""
        S, n = key.shape[2], len(self.lens)
        self._grow(n + 1, S + 1)
        self.key[:, n, :, :S], self.value[:, n, :, :S] = key, value
        self.key[:, n, :, S:], self.value[:, n, :, S:] = 0, 0
        self.lens = np.append(self.lens, S)
        self._bound = None

    def select(self, rows: np.ndarray, same_before: int | np.ndarray = 0) -> None:
        """Keep rows `rows` (any order, repeats allowed), as the first len(rows) rows. The caller
        may promise that positions below `same_before` (one for all rows, or one per kept row)
        already hold in each row what its new source row holds: the beams of one request share
        its prefix and prompt, and two beams with the same first tokens share their cache
        there. Those positions are not copied."""
        rows = np.asarray(rows)
        n, w = len(rows), int(self.lens[rows].max(initial=0))
        self._grow(n, w + 1)
        # Only rows that take another row's cache are copied (beam search keeps many in place), and
        # the IO binding stays valid while the batch keeps its size and buffers.
        moved = np.flatnonzero(rows != np.arange(n))
        starts = np.minimum(np.broadcast_to(np.asarray(same_before, np.int64), (n,)), w)
        moved = moved[starts[moved] < w]
        # Copies in an order where no row is overwritten while a later copy still reads it; a
        # cycle of rows (two beams trading parents) goes through a copy of one of them.
        pending = {int(i): int(rows[i]) for i in moved}
        readers = collections.Counter(pending.values())
        saved: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        while pending:
            free = [i for i in pending if not readers[i]]
            if not free:  # every pending row is still read: a cycle
                i = next(iter(pending))
                a = min(int(starts[j]) for j, source in pending.items() if source == i)
                saved[i] = (self.key[:, i, :, a:w].copy(), self.value[:, i, :, a:w].copy(), a)
                readers[i] = 0
                continue
            for i in free:
                source, a = pending.pop(i), int(starts[i])
                if source in saved:
                    key, value, first = saved[source]
                    key, value = key[:, :, a - first :], value[:, :, a - first :]
                else:
                    key, value = self.key[:, source, :, a:w], self.value[:, source, :, a:w]
                    readers[source] -= 1
                self.key[:, i, :, a:w], self.value[:, i, :, a:w] = key, value
        self.lens = self.lens[rows]
        if self._bound is not None and self._bound[0] != n:
            self._bound = None

    def extend(self, ids: Sequence[int]) -> np.ndarray:
        """Several new tokens of a one-row cache, written in place (a prefill chunk): ids [T] ->
        the last position's logits [1, V] float32."""
        import onnxruntime as ort

        S, T = int(self.lens[0]), len(ids)
        self._grow(1, S + T)
        io = self.exported.session.io_binding()
        logits = self.exported.bind_logits(io, 1) if self.exported.manifest.graph.logits == "last" else None
        if logits is None:
            io.bind_output("logits", "cpu")
        for layer, ((pk, pv), (ok, ov)) in enumerate(zip(self.exported._past, self.exported._present)):
            k = ort.OrtValue.ortvalue_from_numpy(self.key[layer, :1])
            v = ort.OrtValue.ortvalue_from_numpy(self.value[layer, :1])
            io.bind_ortvalue_input(pk, k)
            io.bind_ortvalue_input(pv, v)
            io.bind_ortvalue_output(ok, k)
            io.bind_ortvalue_output(ov, v)
        mask = np.ones((1, S + T), np.int64)
        logits = self.exported.run_step(io, logits, np.asarray(ids, np.int64).reshape(1, T), mask,
                                        np.arange(S, S + T, dtype=np.int64).reshape(1, T))
        self.lens = self.lens + T
        self._bound = None
        return logits

    def forward(self, next_ids: np.ndarray) -> np.ndarray:
        """One decode step: next_ids [B] -> last-position logits [B, V] float32."""
        import onnxruntime as ort

        B = len(self.lens)
        self._grow(B, int(self.lens.max()) + 1)
        if self._bound is None or self._bound[0] != B:
            io = self.exported.session.io_binding()
            logits = self.exported.bind_logits(io, B)
            for layer, ((pk, pv), (ok, ov)) in enumerate(zip(self.exported._past, self.exported._present)):
                k = ort.OrtValue.ortvalue_from_numpy(self.key[layer, :B])
                v = ort.OrtValue.ortvalue_from_numpy(self.value[layer, :B])
                io.bind_ortvalue_input(pk, k)
                io.bind_ortvalue_input(pv, v)
                io.bind_ortvalue_output(ok, k)
                io.bind_ortvalue_output(ov, v)
            self._bound = (B, io, logits)
        io, logits = self._bound[1], self._bound[2]
        width = int(self.lens.max()) + 1
        mask = (np.arange(width)[None] <= self.lens[:, None]).astype(np.int64)
        logits = self.exported.run_step(io, logits, np.asarray(next_ids, np.int64).reshape(B, 1), mask,
                                        self.lens.reshape(B, 1))
        self.lens = self.lens + 1
        return logits


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
