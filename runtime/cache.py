"""The running key/value cache, and the batch layout every graph shares.

Positions: a row's tokens take positions from its own prefix length on, whatever the padding
(token_positions; positions_from_mask counts them from a left-padded mask).

Layout: a prefill batch (left_padded_batch) left-pads each row's prefix, its initial cache,
to the batch's longest prefix and its tokens to the longest row; the mask covers prefix +
tokens and is 0 on padding. The running cache follows the graph (manifest `graph.padding`):
  left   (optimum graph): each step appends a column to the mask.
  right  (fused GroupQueryAttention graph): rows are prefilled alone and decode on
         right-padded caches whose lengths the mask states as a count (right_padding_mask).

Four running caches, chosen by new_cache: KVCache copies the cache into a new buffer each
step; SharedKVCache (the fused graph on the CPU) lets the graph write in place;
DeviceKVCache keeps it in the memory of a CUDA or TensorRT device; DeviceSharedKVCache
(runtime/device.py) keeps the fused graph's there, in place.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .prefix import Prefix

if TYPE_CHECKING:
    from .session import ExportedBackbone


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


def token_positions(prefix_lens, new_tokens: int) -> np.ndarray:
    """The rule: a row's tokens take positions from its own prefix length on, whatever the
    padding. Positions [..., new_tokens] of `new_tokens` tokens after `prefix_lens` real
    positions (a number, or one per row)."""
    return np.asarray(prefix_lens, np.int64)[..., None] + np.arange(new_tokens, dtype=np.int64)


def right_padding_mask(lens: np.ndarray, width: int) -> np.ndarray:
    """The mask [B, width] of right-padded rows holding lens [B] real positions each: ones,
    then zeros (the fused graph reads it as a count)."""
    return (np.arange(width)[None] < np.asarray(lens)[:, None]).astype(np.int64)


def positions_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """token_positions for left-padded rows: position ids [B, T] of the last `new_tokens`
    columns, the count of real entries before each one."""
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
    return BatchInputs(
        input_ids=np.asarray(next_ids, np.int64).reshape(B, 1),
        attention_mask=right_padding_mask(lens + 1, int(lens.max()) + 1),
        position_ids=token_positions(lens, 1),
        past_key=past_key,
        past_value=past_value,
        prefix_lens=lens,
        token_lens=np.ones(B, np.int64),
    )


ROOM_STEP = 64  # positions an in-place cache adds at a time


def grown_room(present: tuple[int, int], needed: tuple[int, int], limit: int) -> tuple[int, int] | None:
    """The rule of the in-place caches (SharedKVCache here, DeviceSharedKVCache on a device): the
    (rows, positions) to reallocate to from `present` room so that `needed` fits, None where it
    fits already. Rows at least double; positions grow in steps of ROOM_STEP, up to the
    backbone's `limit`. From (0, 0) it is the first allocation."""
    (R, M), (rows, positions) = present, needed
    if rows <= R and positions <= M:
        return None
    return (max(rows, 2 * R) if rows > R else R), max(M, min(limit, -(-positions // ROOM_STEP) * ROOM_STEP))


class SharedKVCache:
    """The running cache of the fused GroupQueryAttention graph, kept where the graph writes it.

    Preallocated buffers key, value [L, R, H, M, D] (room for R rows of M positions) hold each
    row's cache from position 0, padding after, with the lengths in `lens`. A decode step binds
    the first B rows as both past and present (ONNX Runtime IO binding); GroupQueryAttention,
    given one buffer for both, writes the new position in place instead of copying the cache.
    Only a row joining, leaving or being reordered (beam search) copies anything; the logits
    are those of a step that copies.
    """

    def __init__(self, exported: ExportedBackbone, key: np.ndarray, value: np.ndarray, lens: np.ndarray,
                 room: tuple[int, int] | None = None):
        """`room`: rows and positions to make room for now, where the generation's length is known
        (growing mid-way copies the whole cache and rebinds it).
        Pages past what the rows hold are never touched: unused room is address space, not memory."""
        L, B, H, S, D = key.shape
        self.exported = exported
        self.limit = exported.manifest.max_positions
        rows, positions = room or (0, 0)
        R, M = grown_room((0, 0), (max(B, rows, 1), max(S + 1, positions)), self.limit)
        self.key = np.zeros((L, R, H, M, D), exported.kv_dtype)
        self.value = np.zeros_like(self.key)
        self.key[:, :B, :, :S], self.value[:, :B, :, :S] = key, value
        self.lens = np.asarray(lens, np.int64).copy()
        self._bound: tuple | None = None

    def __len__(self) -> int:
        return len(self.lens)

    def _grow(self, rows: int, positions: int) -> None:
        L, R, H, M, D = self.key.shape
        grown = grown_room((R, M), (rows, positions), self.limit)
        if grown is None:
            return
        R2, M2 = grown
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
                                        token_positions([S], T))
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
        mask = right_padding_mask(self.lens + 1, int(self.lens.max()) + 1)
        logits = self.exported.run_step(io, logits, np.asarray(next_ids, np.int64).reshape(B, 1), mask,
                                        token_positions(self.lens, 1))
        self.lens = self.lens + 1
        return logits


class KVCache:
    """The running cache of N rows: key, value [L, N, H, S, D] and what says which positions
    are real (a mask [N, S] for left padding, lengths [N] for right padding)."""

    device = "cpu"  # where key and value live, as ONNX Runtime names it

    def __init__(self, key: np.ndarray, value: np.ndarray, mask: np.ndarray | None, lens: np.ndarray | None,
                 exported: ExportedBackbone | None = None):
        self.key, self.value, self.mask, self.lens = key, value, mask, lens
        self.exported = exported

    def step(self, next_ids: np.ndarray) -> BatchInputs:
        n = len(next_ids)
        if self.mask is not None:
            mask = np.concatenate([self.mask, np.ones((n, 1), np.int64)], axis=1)
            positions = positions_from_mask(mask, 1)
        else:
            mask = right_padding_mask(self.lens + 1, self.width + 1)
            positions = token_positions(self.lens, 1)
        return BatchInputs(
            input_ids=next_ids.reshape(n, 1).astype(np.int64), attention_mask=mask, position_ids=positions,
            past_key=self.key, past_value=self.value,
            prefix_lens=np.zeros(n, np.int64), token_lens=np.ones(n, np.int64),
        )

    def advance(self, inputs: BatchInputs, key: np.ndarray, value: np.ndarray) -> None:
        self.key, self.value = key, value
        if self.mask is not None:
            self.mask = inputs.attention_mask
        else:
            self.lens = self.lens + 1

    def __len__(self) -> int:
        return self.key.shape[1]

    @property
    def width(self) -> int:
        """Positions held per row, padding included."""
        return self.key.shape[3]

    def select(self, rows: np.ndarray, same_before: int = 0) -> None:
        """Keep rows `rows` (any order, repeats allowed): beam expansion and reordering, rows
        leaving. Padding no remaining row needs is dropped. (`same_before`, which lets the
        in-place cache skip positions every row shares, does not matter to a gather.)"""
        start, end = self._keep(rows)
        self.key, self.value = self.key[:, rows, :, start:end], self.value[:, rows, :, start:end]

    def _keep(self, rows: np.ndarray) -> tuple[int, int]:
        """Keep `rows` in the mask or lengths; returns the positions [start, end) the kept rows
        still need (left padding: from the first column any of them uses; right padding: up to
        the longest)."""
        start, end = 0, self.width
        if self.mask is not None:
            self.mask = self.mask[rows]
            used = self.mask.any(axis=0)
            start = int(np.argmax(used)) if used.any() else 0
            self.mask = self.mask[:, start:]
        else:
            self.lens = self.lens[rows]
            end = min(end, int(self.lens.max(initial=0)))
        return start, end

    def append(self, key: np.ndarray, value: np.ndarray) -> None:
        """One more row, its cache key, value [L, H, S1, D], padded into the batch's layout."""
        L, B, H, S, D = self.key.shape
        S1 = key.shape[2]
        W = max(S, S1)
        new_key = np.zeros((L, B + 1, H, W, D), self.key.dtype)
        new_value = np.zeros_like(new_key)
        if self.mask is not None:  # left padding: real positions end at the right edge
            new_key[:, :B, :, W - S:], new_value[:, :B, :, W - S:] = self.key, self.value
            new_key[:, B, :, W - S1:], new_value[:, B, :, W - S1:] = key, value
            mask = np.zeros((B + 1, W), np.int64)
            mask[:B, W - S:] = self.mask
            mask[B, W - S1:] = 1
            self.mask = mask
        else:
            new_key[:, :B, :, :S], new_value[:, :B, :, :S] = self.key, self.value
            new_key[:, B, :, :S1], new_value[:, B, :, :S1] = key, value
            self.lens = np.append(self.lens, S1)
        self.key, self.value = new_key, new_value

    def forward(self, next_ids: np.ndarray) -> np.ndarray:
        """One decode step: next_ids [B] -> last-position logits [B, V] float32. Every layer's
        present is written straight into one new buffer [L, B, H, S + 1, D] (IO binding by
        address), instead of one array per layer stacked afterwards."""
        inputs = self.step(next_ids)
        past, present = self._step_buffers()
        logits = bound_step(self.exported, inputs, self.device, past, present)
        self.advance(inputs, *present)
        return logits

    def _step_buffers(self) -> tuple[tuple, tuple]:
        """(key, value) as a step binds them, and new (key, value) one position wider."""
        dtype = self.exported.kv_dtype
        self.key, self.value = np.ascontiguousarray(self.key, dtype), np.ascontiguousarray(self.value, dtype)
        L, N, H, S, D = self.key.shape
        return (self.key, self.value), (np.empty((L, N, H, S + 1, D), dtype), np.empty((L, N, H, S + 1, D), dtype))


class DeviceKVCache(KVCache):
    """The running cache kept in the memory of the backbone's device (CUDA, TensorRT), as ONNX
    Runtime values key, value [L, N, H, S, D]. A decode step binds each layer's slice as the
    graph's past and its present to a new device buffer, so the cache does not cross to the
    host while decoding: only the step's ids and mask go in and the last logits come out. Beam
    reorders and rows leaving run a Gather/Slice graph on the same device (runtime/ops/). A row
    joining a running batch (pt-serve) moves the cache through the host once.
    """

    def __init__(self, key: np.ndarray, value: np.ndarray, mask: np.ndarray | None, lens: np.ndarray | None,
                 exported: ExportedBackbone):
        self.exported, self.device = exported, exported.cache_device
        super().__init__(self._upload(key), self._upload(value), mask, lens, exported)

    def _upload(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, self.exported.kv_dtype), self.device, 0)

    def __len__(self) -> int:
        return self.key.shape()[1]

    @property
    def width(self) -> int:
        return self.key.shape()[3]

    def _step_buffers(self) -> tuple[tuple, tuple]:
        import onnxruntime as ort

        L, N, H, S, D = self.key.shape()
        present = tuple(ort.OrtValue.ortvalue_from_shape_and_type([L, N, H, S + 1, D], self.exported.kv_dtype,
                                                                  self.device, 0) for _ in range(2))
        return (self.key, self.value), present

    def select(self, rows: np.ndarray, same_before: int = 0) -> None:
        """As KVCache.select (same rows kept, same padding dropped), on the device."""
        rows = np.asarray(rows, np.int64)
        start, end = self._keep(rows)
        if start == 0 and end == self.width and np.array_equal(rows, np.arange(len(self))):
            return
        gather = self.exported.op("gather_rows")
        io = gather.io_binding()
        io.bind_ortvalue_input("key", self.key)
        io.bind_ortvalue_input("value", self.value)
        io.bind_cpu_input("rows", rows)
        io.bind_cpu_input("start", np.array([start], np.int64))
        io.bind_cpu_input("end", np.array([end], np.int64))
        io.bind_output("key_out", self.device)
        io.bind_output("value_out", self.device)
        gather.run_with_iobinding(io)
        self.key, self.value = io.get_outputs()

    def append(self, key: np.ndarray, value: np.ndarray) -> None:
        host = KVCache(self.key.numpy(), self.value.numpy(), self.mask, self.lens)
        host.append(key, value)
        self.key, self.value, self.mask, self.lens = self._upload(host.key), self._upload(host.value), host.mask, host.lens


def bound_step(exported: ExportedBackbone, inputs: BatchInputs, device: str, past, present) -> np.ndarray:
    """One decode step with the cache bound by address. past and present are (key, value)
    buffers [L, N, H, S, D] and [L, N, H, S + 1, D] on `device`: numpy arrays for "cpu", ONNX
    Runtime values otherwise. Layer l's past and present are bound l layers' sizes from their
    first byte. Returns the last logits [N, V] float32."""
    on_host = isinstance(past[0], np.ndarray)

    def address(buffer) -> int:
        return buffer.ctypes.data if on_host else buffer.data_ptr()

    dtype = exported.kv_dtype
    _, N, H, S, D = past[0].shape if on_host else past[0].shape()
    io = exported.session.io_binding()
    logits = exported.bind_logits(io, N)  # first: get_outputs() lists outputs in binding order
    for bind, names, (key, value), length in ((io.bind_input, exported._past, past, S),
                                              (io.bind_output, exported._present, present, S + 1)):
        size = N * H * length * D * dtype.itemsize  # bytes per layer
        for layer, (key_name, value_name) in enumerate(names):
            bind(key_name, device, 0, dtype, [N, H, length, D], address(key) + layer * size)
            bind(value_name, device, 0, dtype, [N, H, length, D], address(value) + layer * size)
    return exported.run_step(io, logits, inputs.input_ids, inputs.attention_mask, inputs.position_ids)


def new_cache(exported: ExportedBackbone, key: np.ndarray, value: np.ndarray, mask: np.ndarray | None = None,
              lens: np.ndarray | None = None, room: tuple[int, int] | None = None):
    """The running cache for `exported`: on the device for the CUDA and TensorRT providers, in
    place for the fused graph (runtime/device.py), else a new buffer each step (DeviceKVCache); in place (SharedKVCache) for the fused graph on the CPU; otherwise copied each
    step (KVCache). key, value [L, B, H, S, D]; mask [B, S] for left padding, lens [B] for right
    padding; room (rows, positions) the in-place cache makes at once."""
    if exported.searches_on_device and mask is None:
        from .device import DeviceSharedKVCache  # device.py builds on this module

        return DeviceSharedKVCache(exported, key, value, lens, room)
    if exported.cache_device is not None:
        return DeviceKVCache(key, value, mask, lens, exported)
    if mask is None and exported.shares_cache_buffers:
        return SharedKVCache(exported, key, value, lens, room)
    return KVCache(key, value, mask, lens, exported)
