"""The small ONNX graph the runtime reorders a device-resident cache with (runtime/ops/).

With the CUDA or TensorRT provider the running cache stays in device memory as ONNX Runtime
values, and numpy cannot index it. A beam reorder, rows leaving and dropping padding no row
needs are one Gather and one Slice, run by ONNX Runtime on the same device. The runtime may
not import onnx, so the graph is built here and shipped as files; a test checks that the
shipped files are what this module builds.
"""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "float16")
OPS_DIR = Path(__file__).resolve().parent.parent / "runtime" / "ops"


def gather_rows_file(dtype: str) -> str:
    return f"gather_rows.{dtype}.onnx"


def gather_rows_model(dtype: str) -> bytes:
    """key, value [L, N, H, S, D]; rows [n] int64; start, end [1] int64 ->
    key[:, rows, :, start:end], value[:, rows, :, start:end]."""
    import onnx
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
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
    graph = helper.make_graph(nodes, "gather_rows", inputs, outputs, initializer=[axis])
    # Pinned IR and opset, no producer version: the bytes do not depend on the onnx installed.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="prefixkit")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_ops(folder: Path = OPS_DIR) -> None:
    """Regenerate the shipped files: python -m prefixkit.exporter.cache_ops"""
    folder.mkdir(parents=True, exist_ok=True)
    for dtype in DTYPES:
        (folder / gather_rows_file(dtype)).write_bytes(gather_rows_model(dtype))


if __name__ == "__main__":
    write_ops()
