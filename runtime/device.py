"""The search on the device: the fused graph's cache kept in device memory, in place, and the
next tokens chosen there, so that a decode step moves a few numbers per row to the host.

Where the fused graph's attention runs on the device (fp16 exports under CUDA), decoding keeps
two preallocated device buffers, key and value [L, R, H, M, D]: room for R rows of M positions
each. A step binds the first B rows of each layer as both the graph's past and its present
(ONNX Runtime IO binding by address); GroupQueryAttention, given one buffer for both, writes
the new position in place. The mask always has M columns (ones for a row's real positions and
the new one, zeros after), so a batch of B rows has the same shapes at every step: what a
captured CUDA graph needs.

Everything else that touches the cache is one of the small graphs of runtime/ops, run on the
same provider, in place where it can be:
  - a row joins: its prefix goes into its slot (put_rows), then its prompt is prefilled there,
    GroupQueryAttention writing in place (the row alone, its slot bound as a batch of one);
  - rows leave or beams take new parents: move_rows gathers the source rows, then scatters
    them into their new slots (only the rows that change are written);
  - a row or position more than there is room for: resize, into new buffers.
The step's logits stay on the device too. `DeviceLogits.greedy` returns each row's id and
`DeviceLogits.beams` each request's best candidates (log-softmax, the banned tokens of the
logits processors, the beam scores, top-k), both through graphs. Sampling reads the logits on
the host: the one step that moves them (`DeviceLogits.numpy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .cache import grown_room, right_padding_mask, token_positions
from .prefix import Prefix

if TYPE_CHECKING:
    from .session import ExportedBackbone


class DeviceLogits:
    """Logits [N, 1, V] of one forward pass, where it left them: rows start..start+N of a device
    buffer [R, 1, V] (an ONNX Runtime value), or a host array. The search reads them through
    the greedy and beams graphs, on the backbone's provider."""

    def __init__(self, exported: ExportedBackbone, buffer, start: int = 0, rows: int | None = None):
        self.exported, self.buffer = exported, buffer
        self.on_host = isinstance(buffer, np.ndarray)
        total, _, self.vocab = buffer.shape if self.on_host else buffer.shape()
        self.start, self.rows = start, total - start if rows is None else rows

    @classmethod
    def from_host(cls, exported: ExportedBackbone, logits: np.ndarray) -> "DeviceLogits":
        """Host logits [N, V], e.g. a prefill's, read through the same graphs."""
        return cls(exported, np.ascontiguousarray(logits[:, None], exported.logits_dtype))

    def row(self, i: int) -> "DeviceLogits":
        """Row i alone."""
        return DeviceLogits(self.exported, self.buffer, self.start + i, 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.vocab

    def _bind(self, io) -> None:
        if self.on_host:
            io.bind_cpu_input("logits", self.buffer[self.start : self.start + self.rows])
            return
        dtype = self.exported.logits_dtype
        address = self.buffer.data_ptr() + self.start * self.vocab * dtype.itemsize
        io.bind_input("logits", self.buffer.device_name(), 0, dtype, [self.rows, 1, self.vocab], address)

    def numpy(self) -> np.ndarray:
        """The logits on the host, float32 [N, V]."""
        whole = self.buffer if self.on_host else self.buffer.numpy()
        return whole[self.start : self.start + self.rows, 0].astype(np.float32)

    def _run(self, op: str, outputs: Sequence[str], **inputs: np.ndarray) -> list[np.ndarray]:
        """Run token-choice graph `op` on these logits and host `inputs`; its `outputs` on the host."""
        session = self.exported.op(op, self.exported.logits_dtype)
        io = session.io_binding()
        self._bind(io)
        for name, array in inputs.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in outputs:
            io.bind_output(name, "cpu")
        session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    def greedy(self, banned: np.ndarray) -> np.ndarray:
        """Each row's first largest logit, banned flat indices (row * V + token) ruled out: ids [N]."""
        return self._run("greedy", ["ids"], banned=np.asarray(banned, np.int64))[0]

    def beams(self, scores: np.ndarray, banned: np.ndarray, requests: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """Hugging Face's beam candidates: log-softmax of each row, banned flat indices ruled out,
        plus the row's running score [N], then the `keep` largest over each request's rows
        (requests × K = N): values, indices [requests, keep], indices into K·V."""
        values, indices = self._run("beams", ["values", "indices"], banned=np.asarray(banned, np.int64),
                                    scores=np.asarray(scores, np.float32),
                                    width=np.array([requests, self.rows // requests * self.vocab], np.int64),
                                    keep=np.array([keep], np.int64))
        return values, indices


class DeviceSharedKVCache:
    """The fused graph's running cache in device memory, in place (see the module's text).
    `lens` [B] holds each row's real positions; rows hold theirs from position 0."""

    def __init__(self, exported: ExportedBackbone, key: np.ndarray | None = None, value: np.ndarray | None = None,
                 lens: np.ndarray | None = None, room: tuple[int, int] | None = None):
        """Rows to start with (host key, value [L, B, H, S, D] and their lens [B]), if any, and
        `room` (rows, positions) to make at once where the generation's length is known."""
        a = exported.architecture
        self.exported, self.device = exported, exported.cache_device
        self.limit = exported.manifest.max_positions
        self._layout = (a.n_layers, a.n_kv_heads, a.head_dim)
        B, S = (0, 0) if key is None else (key.shape[1], key.shape[3])
        rows, positions = room or (0, 0)
        self.lens = np.zeros(0, np.int64)
        self.key = self.value = self.logits = None
        self._bound: tuple | None = None
        self._allocate(*grown_room((0, 0), (max(B, rows, 1), max(S + 1, positions)), self.limit))
        if B:
            self._put(key, value, np.arange(B))
            self.lens = np.asarray(lens, np.int64).copy()

    def __len__(self) -> int:
        return len(self.lens)

    @property
    def room(self) -> tuple[int, int]:
        """(rows, positions) the buffers hold."""
        shape = self.key.shape()
        return shape[1], shape[3]

    def _zeros(self, shape: Sequence[int], dtype: np.dtype):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)

    def _allocate(self, rows: int, positions: int) -> None:
        L, H, D = self._layout
        dtype = self.exported.kv_dtype
        self.key = self._zeros((L, rows, H, positions, D), dtype)
        self.value = self._zeros((L, rows, H, positions, D), dtype)
        self._new_logits(rows)

    def _new_logits(self, rows: int) -> None:
        vocab = self.exported.vocab
        self.logits = None if vocab is None else self._zeros((rows, 1, vocab), self.exported.logits_dtype)

    def _grow(self, rows: int, positions: int) -> None:
        """Room for `rows` rows of `positions` positions: new buffers, the rows copied on the
        device (resize), where the present ones are too small."""
        R, M = self.room
        grown = grown_room((R, M), (rows, positions), self.limit)
        if grown is None:
            return
        R2, M2 = grown
        session = self.exported.op("resize")
        io = session.io_binding()
        io.bind_ortvalue_input("key", self.key)
        io.bind_ortvalue_input("value", self.value)
        io.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, R2 - R, 0, M2 - M, 0], np.int64))
        io.bind_output("key_out", self.device)
        io.bind_output("value_out", self.device)
        session.run_with_iobinding(io)
        self.key, self.value = io.get_outputs()
        if R2 > R:
            self._new_logits(R2)
        self._bound = None

    def _address(self, buffer, layer: int, row: int) -> int:
        """Where row `row` of layer `layer` starts in `buffer` [L, R, H, M, D]."""
        _, R, H, M, D = buffer.shape()
        return buffer.data_ptr() + ((layer * R + row) * H * M * D) * self.exported.kv_dtype.itemsize

    def _in_place(self, op: str, **inputs: np.ndarray) -> None:
        """Run one of the graphs that write rows of the cache, with the cache bound as both its
        input and its output (the rows it scatters are computed before any is written)."""
        session = self.exported.op(op)
        io = session.io_binding()
        dtype, shape = self.exported.kv_dtype, list(self.key.shape())
        for name, buffer in (("key", self.key), ("value", self.value)):
            io.bind_input(name, self.device, 0, dtype, shape, buffer.data_ptr())
            io.bind_output(f"{name}_out", self.device, 0, dtype, shape, buffer.data_ptr())
        for name, array in inputs.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array))
        session.run_with_iobinding(io)

    def _targets(self, slots: np.ndarray) -> np.ndarray:
        """ScatterND's indices [L, n, 2] of rows `slots` in every layer."""
        L = self._layout[0]
        layers, rows = np.meshgrid(np.arange(L), np.asarray(slots, np.int64), indexing="ij")
        return np.stack([layers, rows], axis=-1).astype(np.int64)

    def _put(self, key: np.ndarray, value: np.ndarray, slots: np.ndarray) -> None:
        """Host rows key, value [L, n, H, S, D] into slots `slots`, zero after position S."""
        S, M = key.shape[3], self.room[1]
        dtype = self.exported.kv_dtype
        self._in_place("put_rows", new_key=np.ascontiguousarray(key, dtype), new_value=np.ascontiguousarray(value, dtype),
                       pads=np.array([0, 0, 0, 0, 0, 0, 0, 0, M - S, 0], np.int64), targets=self._targets(slots))

    def append(self, key: np.ndarray, value: np.ndarray) -> None:
        """One more row, its cache key, value [L, H, S, D] from the host (a prompt prefilled
        elsewhere, in chunks)."""
        S, n = key.shape[2], len(self.lens)
        self._grow(n + 1, S + 1)
        self._put(key[:, None], value[:, None], np.array([n]))
        self.lens = np.append(self.lens, S)
        self._bound = None

    def join(self, prefix: Prefix | None, ids: Sequence[int]) -> DeviceLogits:
        """One more row: its prefix into its slot, then its prompt prefilled there, in place.
        Returns the logits of its last position (left on the device)."""
        L, H, D = self._layout
        n, T = len(self.lens), len(ids)
        P = 0 if prefix is None else prefix.prefix_len
        self._grow(n + 1, P + T + 1)
        if prefix is None:
            empty = np.zeros((L, 1, H, 0, D), self.exported.kv_dtype)
            self._put(empty, empty, np.array([n]))
        else:
            self._put(prefix.key[:, None], prefix.value[:, None], np.array([n]))
        io = self.exported.session.io_binding()
        self._bind_rows(io, n, 1)
        logits = self._bind_logits(io, n, 1)
        self.exported.run_bound(io, np.asarray(ids, np.int64).reshape(1, T), np.ones((1, P + T), np.int64),
                                token_positions([P], T))
        self.lens = np.append(self.lens, P + T)
        self._bound = None
        return logits or DeviceLogits(self.exported, io.get_outputs()[0])

    def _bind_rows(self, io, first: int, rows: int) -> None:
        """Rows first..first+rows of every layer as both past and present."""
        _, H, D = self._layout
        M, dtype = self.room[1], self.exported.kv_dtype
        shape = [rows, H, M, D]
        for layer, ((pk, pv), (ok, ov)) in enumerate(zip(self.exported._past, self.exported._present)):
            for past, present, buffer in ((pk, ok, self.key), (pv, ov, self.value)):
                address = self._address(buffer, layer, first)
                io.bind_input(past, self.device, 0, dtype, shape, address)
                io.bind_output(present, self.device, 0, dtype, shape, address)

    def _bind_logits(self, io, first: int, rows: int) -> DeviceLogits | None:
        """Bind the logits of rows first..first+rows to their rows of the logits buffer (by name,
        to a new device value, where the graph leaves V open: None)."""
        if self.logits is None:
            io.bind_output("logits", self.device)
            return None
        dtype, vocab = self.exported.logits_dtype, self.exported.vocab
        address = self.logits.data_ptr() + first * vocab * dtype.itemsize
        io.bind_output("logits", self.device, 0, dtype, [rows, 1, vocab], address)
        return DeviceLogits(self.exported, self.logits, first, rows)

    def select(self, rows: np.ndarray, same_before: int | np.ndarray = 0) -> None:
        """Keep rows `rows` (any order, repeats allowed) as the first len(rows) rows; only rows
        that take another row's cache are written. (`same_before`, which spares the host cache
        copies, does not matter to a gather on the device.)"""
        rows = np.asarray(rows, np.int64)
        n = len(rows)
        self._grow(n, int(self.lens[rows].max(initial=0)) + 1)
        moved = np.flatnonzero(rows != np.arange(n))
        if moved.size:
            self._in_place("move_rows", rows=rows[moved], targets=self._targets(moved))
        self.lens = self.lens[rows]
        if self._bound is not None and self._bound[0] != n:
            self._bound = None

    def forward(self, next_ids: np.ndarray) -> DeviceLogits:
        """One decode step: next_ids [B] -> the logits [B, 1, V], left on the device."""
        B = len(self.lens)
        self._grow(B, int(self.lens.max()) + 1)
        if self._bound is None or self._bound[0] != B:
            io = self.exported.session.io_binding()
            self._bind_rows(io, 0, B)
            inputs = self._step_inputs(io, B)
            self._bound = (B, io, self._bind_logits(io, 0, B), inputs, self._graph_id(B, inputs))
        _, io, logits, inputs, graph_id = self._bound
        ids = np.asarray(next_ids, np.int64).reshape(B, 1)
        mask = right_padding_mask(self.lens + 1, self.room[1])
        positions = token_positions(self.lens, 1)
        if inputs is None:
            self.exported.run_bound(io, ids, mask, positions)
        else:  # a captured graph reads its inputs where they were at capture: written there in place
            for value, array in zip(inputs, (ids, mask, positions)):
                value.update_inplace(array)
            self.exported.run_io(io, graph_id)
        self.lens = self.lens + 1
        return logits or DeviceLogits(self.exported, io.get_outputs()[0])

    def _step_inputs(self, io, rows: int) -> tuple | None:
        """With CUDA graphs: device values for a step's ids, mask and positions, bound to `io`
        once (a captured graph replays with the addresses it was captured with). None without."""
        if not self.exported.cuda_graphs or self.logits is None:
            return None
        M = self.room[1]
        inputs = tuple(self._zeros(shape, np.int64) for shape in ((rows, 1), (rows, M), (rows, 1)))
        names = ["input_ids", "attention_mask", "position_ids"]
        for name, value in zip(names, inputs):
            if name in self.exported.input_names:
                io.bind_ortvalue_input(name, value)
        return inputs

    def _graph_id(self, rows: int, inputs: tuple | None) -> int:
        """The captured graph of a step of `rows` rows bound where this one is: one per set of
        addresses (buffers, logits, inputs) and shape, kept by the session. Ids start at 1
        (0 is ONNX Runtime's own)."""
        if inputs is None:
            return -1
        bound = (rows, *self.key.shape(), self.key.data_ptr(), self.value.data_ptr(), self.logits.data_ptr(),
                 *(value.data_ptr() for value in inputs))
        graphs = self.exported.captured_graphs
        return graphs.setdefault(bound, len(graphs) + 1)
