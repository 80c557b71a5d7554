"""The small ONNX graphs the runtime runs beside a backbone on the same device (runtime/ops/).

With the CUDA or TensorRT provider the running cache and the step's logits stay in device
memory as ONNX Runtime values, and numpy cannot index them. Moving rows of the cache (a beam
reorder, rows leaving, a row joining), growing it, and choosing the next tokens from the logits
are graphs of a few standard operators, run by ONNX Runtime where the values are. The runtime
may not import onnx, so the graphs are built here and shipped as files; a test checks that the
shipped files are what this module builds.

  gather_rows  key, value [L, N, H, S, D]; rows [n]; start, end [1] -> the rows' positions
               start..end (the cache that grows each step, DeviceKVCache)
  move_rows    key, value [L, R, H, M, D]; rows [n]; targets [L, n, 2] -> the cache with rows
               targets[l, i] = rows[i] (Gather, then ScatterND: bound in place, only the n
               target rows are written)
  put_rows     key, value [L, R, H, M, D]; new_key, new_value [L, n, H, S, D]; pads [10];
               targets [L, n, 2] -> the cache with the new rows (padded to M) in their slots
  resize       key, value [L, R, H, M, D]; pads [10] -> zero-padded to more rows or positions
  greedy       logits [N, 1, V]; banned [k] (flat indices into [N, V]) -> ids [N]: the first
               largest logit of each row, banned ones ruled out
  beams        logits [N, 1, V]; scores [N] float32; banned [k]; width [2] = (B, K·V); keep [1]
               -> the `keep` largest of log_softmax(logits), banned ruled out, plus the beam's
               score, over each request's K beams: values [B, keep] float32, indices [B, keep]
               (lower index first among equal values, as the ONNX TopK operator defines)
"""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "float16")
OPS = ("gather_rows", "move_rows", "put_rows", "resize", "greedy", "beams")
OPS_DIR = Path(__file__).resolve().parent.parent / "runtime" / "ops"


def op_file(op: str, dtype: str) -> str:
    return f"{op}.{dtype}.onnx"


def gather_rows_file(dtype: str) -> str:
    return op_file("gather_rows", dtype)


def _finish(nodes, name, inputs, outputs, initializers=()) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    # Pinned IR and opset, no producer version: the bytes do not depend on the onnx installed.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="prefixkit")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _elem(dtype: str):
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]


def gather_rows_model(dtype: str) -> bytes:
    """key, value [L, N, H, S, D]; rows [n] int64; start, end [1] int64 ->
    key[:, rows, :, start:end], value[:, rows, :, start:end]."""
    from onnx import TensorProto, helper

    elem = _elem(dtype)
    cache = ["L", "N", "H", "S", "D"]
    out = ["L", "n", "H", "W", "D"]
    inputs = [
        helper.make_tensor_value_info("key", elem, cache),
        helper.make_tensor_value_info("value", elem, cache),
        helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"]),
        helper.make_tensor_value_info("start", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("end", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info(f"{name}_out", elem, out) for name in ("key", "value")]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [3])
    nodes = []
    for name in ("key", "value"):
        nodes.append(helper.make_node("Gather", [name, "rows"], [f"{name}_rows"], axis=1))
        nodes.append(helper.make_node("Slice", [f"{name}_rows", "start", "end", "axis"], [f"{name}_out"]))
    return _finish(nodes, "gather_rows", inputs, outputs, [axis])


def _slots(extra):
    from onnx import TensorProto, helper

    return [helper.make_tensor_value_info("targets", TensorProto.INT64, ["L", "n", 2]), *extra]


def move_rows_model(dtype: str) -> bytes:
    """key, value [L, R, H, M, D]; rows [n]; targets [L, n, 2] -> ScatterND(cache, targets,
    cache[:, rows]). The gathered rows are a copy, made before any row is written, so a cycle
    of rows (beams trading parents) needs nothing more."""
    from onnx import TensorProto, helper

    elem, cache = _elem(dtype), ["L", "R", "H", "M", "D"]
    inputs = [helper.make_tensor_value_info(n, elem, cache) for n in ("key", "value")]
    inputs += _slots([helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])])
    outputs = [helper.make_tensor_value_info(f"{n}_out", elem, cache) for n in ("key", "value")]
    nodes = []
    for name in ("key", "value"):
        nodes.append(helper.make_node("Gather", [name, "rows"], [f"{name}_rows"], axis=1))
        nodes.append(helper.make_node("ScatterND", [name, "targets", f"{name}_rows"], [f"{name}_out"]))
    return _finish(nodes, "move_rows", inputs, outputs)


def put_rows_model(dtype: str) -> bytes:
    """key, value [L, R, H, M, D]; new_key, new_value [L, n, H, S, D]; pads [10]; targets
    [L, n, 2] -> ScatterND(cache, targets, Pad(new, pads)): rows from the host into their slots."""
    from onnx import TensorProto, helper

    elem, cache = _elem(dtype), ["L", "R", "H", "M", "D"]
    inputs = [helper.make_tensor_value_info(n, elem, cache) for n in ("key", "value")]
    inputs += [helper.make_tensor_value_info(f"new_{n}", elem, ["L", "n", "H", "S", "D"]) for n in ("key", "value")]
    inputs += _slots([helper.make_tensor_value_info("pads", TensorProto.INT64, [10])])
    outputs = [helper.make_tensor_value_info(f"{n}_out", elem, cache) for n in ("key", "value")]
    nodes = []
    for name in ("key", "value"):
        nodes.append(helper.make_node("Pad", [f"new_{name}", "pads"], [f"{name}_padded"], mode="constant"))
        nodes.append(helper.make_node("ScatterND", [name, "targets", f"{name}_padded"], [f"{name}_out"]))
    return _finish(nodes, "put_rows", inputs, outputs)


def resize_model(dtype: str) -> bytes:
    """key, value [L, R, H, M, D]; pads [10] -> both zero-padded by `pads`."""
    from onnx import TensorProto, helper

    elem = _elem(dtype)
    inputs = [helper.make_tensor_value_info(n, elem, ["L", "R", "H", "M", "D"]) for n in ("key", "value")]
    inputs.append(helper.make_tensor_value_info("pads", TensorProto.INT64, [10]))
    outputs = [helper.make_tensor_value_info(f"{n}_out", elem, ["L", "R2", "H", "M2", "D"]) for n in ("key", "value")]
    nodes = [helper.make_node("Pad", [n, "pads"], [f"{n}_out"], mode="constant") for n in ("key", "value")]
    return _finish(nodes, "resize", inputs, outputs)


def _banned(source: str, nodes: list) -> str:
    """Nodes setting the flat indices `banned` of `source` [N, V] to -inf; returns the name of
    the result [N, V]."""
    from onnx import helper

    nodes += [
        helper.make_node("Shape", [source], ["shape"]),
        helper.make_node("Reshape", [source, "flat_shape"], ["flat"]),
        helper.make_node("Shape", ["banned"], ["banned_shape"]),
        helper.make_node("Expand", ["minus_inf", "banned_shape"], ["minus_infs"]),
        helper.make_node("ScatterElements", ["flat", "banned", "minus_infs"], ["flat_banned"], axis=0),
        helper.make_node("Reshape", ["flat_banned", "shape"], ["allowed"]),
    ]
    return "allowed"


def _choice_inputs(dtype: str):
    from onnx import TensorProto, helper

    return [helper.make_tensor_value_info("logits", _elem(dtype), ["N", 1, "V"]),
            helper.make_tensor_value_info("banned", TensorProto.INT64, ["k"])]


def _choice_constants():
    from onnx import TensorProto, helper

    return [helper.make_tensor("flat_shape", TensorProto.INT64, [1], [-1]),
            helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [float("-inf")]),
            helper.make_tensor("middle", TensorProto.INT64, [1], [1])]


def greedy_model(dtype: str) -> bytes:
    """logits [N, 1, V]; banned [k] -> ids [N] int64: ArgMax (its first largest) of float32
    logits with the banned flat indices at -inf."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["logits"], ["logits32"], to=TensorProto.FLOAT),
             helper.make_node("Squeeze", ["logits32", "middle"], ["rows"])]
    allowed = _banned("rows", nodes)
    nodes.append(helper.make_node("ArgMax", [allowed], ["ids"], axis=-1, keepdims=0, select_last_index=0))
    outputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])]
    return _finish(nodes, "greedy", _choice_inputs(dtype), outputs, _choice_constants())


def beams_model(dtype: str) -> bytes:
    """logits [N, 1, V]; banned [k]; scores [N]; width [2]; keep [1] -> values, indices
    [B, keep]: TopK over (B, K·V) of log_softmax(float32 logits), banned at -inf, plus each
    beam's running score: Hugging Face's beam candidates."""
    from onnx import TensorProto, helper

    inputs = _choice_inputs(dtype) + [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("width", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("keep", TensorProto.INT64, [1]),
    ]
    nodes = [helper.make_node("Cast", ["logits"], ["logits32"], to=TensorProto.FLOAT),
             helper.make_node("Squeeze", ["logits32", "middle"], ["rows"]),
             helper.make_node("LogSoftmax", ["rows"], ["log_probs"], axis=-1)]
    allowed = _banned("log_probs", nodes)
    nodes += [
        helper.make_node("Unsqueeze", ["scores", "middle"], ["column"]),
        helper.make_node("Add", [allowed, "column"], ["summed"]),
        helper.make_node("Reshape", ["summed", "width"], ["per_request"]),
        helper.make_node("TopK", ["per_request", "keep"], ["values", "indices"], axis=-1, largest=1, sorted=1),
    ]
    outputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["B", "keep"]),
               helper.make_tensor_value_info("indices", TensorProto.INT64, ["B", "keep"])]
    return _finish(nodes, "beams", inputs, outputs, _choice_constants())


BUILDERS = {"gather_rows": gather_rows_model, "move_rows": move_rows_model, "put_rows": put_rows_model,
            "resize": resize_model, "greedy": greedy_model, "beams": beams_model}


def op_model(op: str, dtype: str) -> bytes:
    return BUILDERS[op](dtype)


def write_ops(folder: Path = OPS_DIR) -> None:
    """Regenerate the shipped files: python -m prefixkit.exporter.cache_ops"""
    folder.mkdir(parents=True, exist_ok=True)
    for op in OPS:
        for dtype in DTYPES:
            (folder / op_file(op, dtype)).write_bytes(op_model(op, dtype))


if __name__ == "__main__":
    write_ops()
