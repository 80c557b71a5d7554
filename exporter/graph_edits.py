"""Small rewrites of an exported ONNX graph: those that let the weight quantizers reach every
large matrix keep the graph's inputs, outputs and results unchanged; last_position_logits
narrows the logits output to the one position decoding reads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if name in node.input]


def _output_projection(producers: dict[str, onnx.NodeProto], logits: str) -> onnx.NodeProto | None:
    """The MatMul that writes `logits` (the lm_head), or None if another op writes it."""
    node = producers.get(logits)
    return node if node is not None and node.op_type == "MatMul" else None


def untie_lm_head(model: onnx.ModelProto, logits: str = "logits") -> bool:
    """Give a tied output projection its own transposed weight.

    optimum exports a tied lm_head as MatMul(x, Transpose(embedding)); a quantizer skips a
    MatMul whose weight is computed. Store the transposed matrix as an initializer of its
    own instead (the embedding Gather keeps the original). Returns whether it changed.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    matmul = _output_projection(producers, logits)
    if matmul is None:
        return False
    transpose = producers.get(matmul.input[1])
    inits = _initializers(model)
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        return False
    weight = numpy_helper.to_array(inits[transpose.input[0]])
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    untied = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
    name = f"{transpose.input[0]}_untied_lm_head"
    model.graph.initializer.append(numpy_helper.from_array(untied, name))
    matmul.input[1] = name
    if not _consumers(model, transpose.output[0]):
        model.graph.node.remove(transpose)
    return True


def last_position_logits(model: onnx.ModelProto, logits: str = "logits") -> bool:
    """Apply the output projection to each row's last position only: logits [B, 1, V].

    Generation reads the logits of a forward pass at its last position (rows are left-padded or
    run alone), but the exported graphs project every position onto the vocabulary: in a
    prefill of 39 positions on smollm2-135m that is 39 x 576 x 49152 multiply-adds for one row
    of them. A Slice of the hidden state before the projection's MatMul keeps the last.
    Returns whether it changed (False when `logits` does not come from a MatMul)."""
    matmul = _output_projection({out: node for node in model.graph.node for out in node.output}, logits)
    if matmul is None:
        return False
    hidden, last = matmul.input[0], f"{matmul.input[0]}_last_position"
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), f"{last}_start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{last}_end"),
        numpy_helper.from_array(np.array([1], np.int64), f"{last}_axis"),
    ])
    at = list(model.graph.node).index(matmul)
    model.graph.node.insert(at, helper.make_node(
        "Slice", [hidden, f"{last}_start", f"{last}_end", f"{last}_axis"], [last], name=f"{matmul.name}_last_position"))
    matmul.input[0] = last
    for output in model.graph.output:
        if output.name == logits and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].Clear()
            output.type.tensor_type.shape.dim[1].dim_value = 1
    return True


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, B, C) with a constant B as MatMul(A, B) + C.

    GPT-2's projections (Conv1D) export as Gemm, which neither ONNX Runtime's int8 nor its
    int4 weight quantizer handles; MatMul they do. Returns the number rewritten.
    """
    inits = _initializers(model)
    rewritten = 0
    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight_name = node.input[1]
        if attrs.get("transB", 0):
            weight = numpy_helper.to_array(inits[weight_name]).T
            weight_name = f"{weight_name}_transposed"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        index = list(model.graph.node).index(node)
        product = f"{node.output[0]}_matmul"
        new = [helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_MatMul")]
        if len(node.input) > 2 and node.input[2]:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        else:
            new[0].output[0] = node.output[0]
        model.graph.node.remove(node)
        for offset, replacement in enumerate(new):
            model.graph.node.insert(index + offset, replacement)
        rewritten += 1
    drop_unused_initializers(model)
    return rewritten


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node or output uses any more."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)
