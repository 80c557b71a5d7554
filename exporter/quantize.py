"""Weight-only block quantisation of an exported graph's MatMuls, exact where the weights
already sit on a block grid (a dequantised GGUF), through ONNX Runtime's fast MatMulNBits.

Per block of 32 input rows (K) of each output column, weights are stored as
    w = d * q + m          q integer in [0, 2^bits - 1]
with d and m from the block's range (asymmetric) or its largest magnitude (symmetric),
whichever reproduces the block better. That is exact for any block already on such a grid:
GGUF Q4_1, Q4_0 and Q8_0 blocks (a Q4_1 block also at 8 bits, since 255 = 15 * 17). ONNX Runtime's CPU kernel takes float
zero points only on a slow path, so the per-block offsets are applied outside it:

    A @ W = MatMulNBits(A, q, d) + (A @ S) @ M

S [K, K/32] sums A over each block and M [K/32, N] holds the offsets; both are tiny. At 4 bits
this is one node, prefixkit.MatMulQ4, a model function with that body: prefixkit's own CPU
kernel (runtime/kernels.py) computes it in one pass, for any number of rows, and any other
session runs the body. At 8 bits,
q splits into two 4-bit halves, q = 16 * hi + lo, two MatMulNBits on the same fast path.
Where every block's offset is a whole number of steps, m = -z * d (symmetric grids: GGUF Q8_0,
Q4_0, such as SmolLM2's tied output projection), z goes into MatMulNBits' integer zero points,
which stay on the fast path, and the offset path is left out.
Accuracy level 1 keeps activations in fp32: level 4 quantises them to int8 per block, which
on a backbone with outlier channels moved logits by up to 2 and made a row's result depend on
its batch's padding (measured on smollm2-135m).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from prefixkit.runtime.kernels import DOMAIN as KERNEL_DOMAIN

from .graph_edits import drop_unused_initializers

BLOCK = 32
ACCURACY_LEVEL = 1  # fp32 activations
# Activations 16 or 8 (exports quantised as int4-a16, int4-a8, ...): prefixkit's CPU kernel rounds
# each row's activations to integers per block of 32 (scale max|a| / 16256 or / 127, the latter
# as llama.cpp's Q8 activations) and sums integer products with AVX-512 VNNI: faster, and no
# longer exact to the quantised weights (runtime/csrc/blockq.c). The function bodies, which other
# sessions run, keep fp32 activations.
ACTIVATIONS = (32, 16, 8)
KERNEL_ATTRIBUTES = ["K", "N", "activations"]


def block_quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [K, N] → q [N, K/32, 32] uint8, scale d [N, K/32], offset m [N, K/32].

    Each block takes whichever grid reproduces it better: asymmetric (d = (max - min) /
    (2^bits - 1), m = min; exact for GGUF Q4_1) or symmetric (d = max|w| / (2^(bits-1) - 1),
    m = -(2^(bits-1) - 1) d; exact for Q4_0 and Q8_0).
    """
    K, N = weight.shape
    blocks = weight.T.reshape(N, K // BLOCK, BLOCK).astype(np.float64)
    levels = 2**bits - 1
    half = 2 ** (bits - 1) - 1
    low = blocks.min(axis=-1)
    asym_scale = (blocks.max(axis=-1) - low) / levels
    sym_scale = np.abs(blocks).max(axis=-1) / half
    best = None
    for scale, offset in ((asym_scale, low), (sym_scale, -half * sym_scale)):
        scale = np.where(scale == 0, 1.0, scale)  # a constant block: q = 0 reproduces it
        q = np.clip(np.rint((blocks - offset[..., None]) / scale[..., None]), 0, levels)
        error = np.abs(q * scale[..., None] + offset[..., None] - blocks).max(axis=-1)
        if best is None:
            best = [q, scale, offset, error]
        else:
            better = error < best[3]
            best[0] = np.where(better[..., None], q, best[0])
            best[1] = np.where(better, scale, best[1])
            best[2] = np.where(better, offset, best[2])
            best[3] = np.minimum(error, best[3])
    q, scale, offset, _ = best
    return q.astype(np.uint8), scale.astype(np.float32), offset.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, low: np.ndarray) -> np.ndarray:
    """The weight [K, N] that block_quantize's output stands for."""
    N, n_blocks, _ = q.shape
    blocks = q.astype(np.float32) * scale[..., None] + low[..., None]
    return blocks.reshape(N, n_blocks * BLOCK).T


def _opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (its function definitions import the same)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _quantizable(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "MatMul" or node.input[1] not in inits:
        return False
    init = inits[node.input[1]]
    return len(init.dims) == 2 and init.dims[0] % BLOCK == 0 and init.data_type == onnx.TensorProto.FLOAT


def _merge_shared_input_matmuls(model: onnx.ModelProto, bits_for: dict[str, int]) -> int:
    """Make MatMuls that read the same input with constant weights of the same depth (a Llama
    MLP's gate and up projections) one MatMul over the weights side by side, then a Split.

    Quantised, each group is then one MatMulNBits and one offset path instead of several: at
    batch 1 a decode step is a few hundred small kernels, and each one costs its dispatch.
    Every output column is still its own dot product over the same weights. Groups whose
    members would get different bit widths are left alone; a merged group's width is entered in
    `bits_for` under its new name. The replaced weights are left for quantize_graph to drop.
    Returns how many groups were merged.
    """
    inits = {init.name: init for init in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if _quantizable(node, inits):
            groups.setdefault(node.input[0], []).append(node)
    opset = _opset(model)
    merged = 0
    for a, nodes in groups.items():
        depths = {inits[n.input[1]].dims[0] for n in nodes}
        widths = {bits_for.get(n.name) for n in nodes}
        if len(nodes) < 2 or len(depths) != 1 or len(widths) != 1:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        base = f"{nodes[0].name or nodes[0].output[0]}_shared_input"
        sizes = np.array([w.shape[1] for w in weights], np.int64)
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{base}_weight"))
        matmul = helper.make_node("MatMul", [a, f"{base}_weight"], [f"{base}_out"], name=base)
        outputs = [n.output[0] for n in nodes]
        if opset >= 13:
            model.graph.initializer.append(numpy_helper.from_array(sizes, f"{base}_sizes"))
            split = helper.make_node("Split", [f"{base}_out", f"{base}_sizes"], outputs, name=f"{base}_Split", axis=-1)
        else:
            split = helper.make_node("Split", [f"{base}_out"], outputs, name=f"{base}_Split", axis=-1, split=sizes.tolist())
        if widths != {None}:
            bits_for[base] = widths.pop()
        index = list(model.graph.node).index(nodes[0])  # the shared input exists here; every consumer comes later
        for n in nodes:
            model.graph.node.remove(n)
        model.graph.node.insert(index, matmul)
        model.graph.node.insert(index + 1, split)
        merged += 1
    return merged


def quantize_graph(model: onnx.ModelProto, bits: int, bits_for: dict[str, int] | None = None,
                   activations: int = 32) -> dict[str, int]:
    """Replace every MatMul with a constant [K, N] weight (K a multiple of 32) by its block
    quantised form, at `bits` or at `bits_for[node name]`, those sharing an input as one
    (_merge_shared_input_matmuls). An 8-bit weight that 4 bits reproduce at least as well (a
    GGUF Q4_1 layer: exactly, where 8 bits are off by an ulp, as 255 / 15 steps do not divide
    its scale evenly) is stored at 4 bits: the same weights in half the bytes and one
    MatMulNBits instead of two. `activations` 16 or 8 marks prefixkit's matmul nodes to round
    their activations to integers in its kernel (see ACTIVATIONS). Returns counts of what was done."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations}")
    bits_for = dict(bits_for or {})
    merged = _merge_shared_input_matmuls(model, bits_for)
    inits = {init.name: init for init in model.graph.initializer}
    done = skipped = narrowed = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        if not _quantizable(node, inits):
            skipped += 1
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        index = list(model.graph.node).index(node)
        width = bits_for.get(node.name, bits)
        quantized = block_quantize(weight, width)
        if width == 8:
            narrow = block_quantize(weight, 4)
            if _error(weight, narrow) <= _error(weight, quantized):
                width, quantized, narrowed = 4, narrow, narrowed + 1
        new_nodes, new_inits = _quantized_matmul(node, quantized, width, activations)
        model.graph.node.remove(node)
        for offset, replacement in enumerate(new_nodes):
            model.graph.node.insert(index + offset, replacement)
        model.graph.initializer.extend(new_inits)
        done += 1
    drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if any(n.domain == KERNEL_DOMAIN for n in model.graph.node):
        add_kernel_functions(model)
    return {"quantized": done, "left_in_float": skipped, "merged": merged, "narrowed": narrowed}


def matmul_q4_function(opset: int) -> onnx.FunctionProto:
    """prefixkit.MatMulQ4(A, B, scales, block_sum, offsets) with attributes K and N:
    A @ W for W = scales * (q - 8) + offsets per block of 32, q the 4-bit values in B as
    MatMulNBits packs them. prefixkit's CPU kernel computes it directly
    (runtime/csrc/blockq.c); elsewhere ONNX Runtime runs this body: MatMulNBits at accuracy
    level 1 plus the offset path, (A @ block_sum) @ offsets. `opset`: the model's own."""
    nbits = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["product"], domain="com.microsoft",
                             bits=4, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)
    nbits.attribute.extend([helper.make_attribute_ref(name, onnx.AttributeProto.INT) for name in ("K", "N")])
    body = [
        nbits,
        helper.make_node("MatMul", ["A", "block_sum"], ["sums"]),
        helper.make_node("MatMul", ["sums", "offsets"], ["shift"]),
        helper.make_node("Add", ["product", "shift"], ["Y"]),
    ]
    return helper.make_function(
        KERNEL_DOMAIN, "MatMulQ4", ["A", "B", "scales", "block_sum", "offsets"], ["Y"], body,
        [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], attributes=KERNEL_ATTRIBUTES,
    )


def matmul_q8_function(opset: int) -> onnx.FunctionProto:
    """prefixkit.MatMulQ8(A, B_high, scales_high, zero_high, B_low, scales, zero_low) with
    attributes K and N: A @ W for W = scales * (q - z) per block of 32, q = 16 * high + low
    nibble (from B_high, B_low as MatMulNBits packs them) and z likewise, scales_high being
    16 * scales. prefixkit's CPU kernel computes it in one pass; elsewhere ONNX Runtime runs this
    body, the two halves as 4-bit MatMulNBits with integer zero points. `opset`: the model's."""
    halves = []
    for half, inputs in (("high", ["A", "B_high", "scales_high", "zero_high"]), ("low", ["A", "B_low", "scales", "zero_low"])):
        node = helper.make_node("MatMulNBits", inputs, [half], domain="com.microsoft",
                                bits=4, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)
        node.attribute.extend([helper.make_attribute_ref(name, onnx.AttributeProto.INT) for name in ("K", "N")])
        halves.append(node)
    return helper.make_function(
        KERNEL_DOMAIN, "MatMulQ8", ["A", "B_high", "scales_high", "zero_high", "B_low", "scales", "zero_low"], ["Y"],
        [*halves, helper.make_node("Add", ["high", "low"], ["Y"])],
        [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], attributes=KERNEL_ATTRIBUTES,
    )


# GroupQueryAttention as the fused exports use it, which prefixkit.Attention computes: packed
# query/key/value, rotary halves, no softcap, window, smooth softmax, quantised cache or extras.
ATTENTION_INPUTS = ["qkv", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
_GQA_REQUIRED = {"do_rotary": 1, "rotary_interleaved": 0, "softcap": 0.0, "local_window_size": -1,
                 "qk_output": 0, "k_quant_type": b"NONE", "v_quant_type": b"NONE"}


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _attention_fits(node: onnx.NodeProto) -> bool:
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return False
    inputs, attrs = list(node.input), _attributes(node)
    return (
        len(inputs) >= 9 and not inputs[1] and not inputs[2] and all(inputs[i] for i in (0, 3, 4, 5, 6, 7, 8))
        and not any(inputs[9:]) and len(node.output) >= 3 and not any(node.output[3:])
        and attrs.get("scale", 0.0) > 0 and attrs.get("smooth_softmax", -1) <= 0
        and all(attrs.get(name, value) == value for name, value in _GQA_REQUIRED.items())
    )


def attention_function(opset: int, gqa: onnx.NodeProto) -> onnx.FunctionProto:
    """prefixkit.Attention(qkv, past_key, past_value, seqlens_k, total_sequence_length,
    cos_cache, sin_cache) with attributes num_heads, kv_num_heads and scale: prefixkit's CPU
    kernel (runtime/csrc/attention.c) where registered; elsewhere this body, the
    GroupQueryAttention node `gqa` stood for, its other attributes as they were."""
    body = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", *ATTENTION_INPUTS[1:]], ["output", "present_key", "present_value"],
        domain="com.microsoft",
    )
    refs = {"num_heads": onnx.AttributeProto.INT, "kv_num_heads": onnx.AttributeProto.INT, "scale": onnx.AttributeProto.FLOAT}
    body.attribute.extend([a for a in gqa.attribute if a.name not in refs])
    body.attribute.extend([helper.make_attribute_ref(name, kind) for name, kind in refs.items()])
    return helper.make_function(
        KERNEL_DOMAIN, "Attention", ATTENTION_INPUTS, ["output", "present_key", "present_value"], [body],
        [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], attributes=list(refs),
    )


def use_attention_kernel(model: onnx.ModelProto) -> int:
    """Turn the GroupQueryAttention nodes that prefixkit.Attention computes into it, those of
    the first one's attributes (all of a model's, in the fused exports). Returns how many."""
    nodes = [n for n in model.graph.node if _attention_fits(n)]
    if not nodes:
        return 0
    original = onnx.NodeProto()
    original.CopyFrom(nodes[0])
    first = {a.name: a for a in original.attribute}
    same = [n for n in nodes if {a.name: a for a in n.attribute} == first]
    for node in same:
        attrs = _attributes(node)
        replacement = helper.make_node(
            "Attention", [node.input[0], *node.input[3:9]], list(node.output[:3]), name=node.name,
            domain=KERNEL_DOMAIN, num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"], scale=attrs["scale"],
        )
        node.CopyFrom(replacement)
    model.functions.append(attention_function(_opset(model), original))
    add_kernel_functions(model)
    return len(same)


def add_kernel_functions(model: onnx.ModelProto) -> None:
    """Give `model` the definitions of prefixkit's matmul operators (again: ONNX Runtime's
    optimised model files leave model functions out) and their opset. Functions need IR version
    8. prefixkit.Attention's definition depends on the node it replaced: the caller keeps it."""
    opset = _opset(model)
    used = {n.op_type for n in model.graph.node if n.domain == KERNEL_DOMAIN}
    for name, function in (("MatMulQ4", matmul_q4_function), ("MatMulQ8", matmul_q8_function)):
        if name in used and not any(f.domain == KERNEL_DOMAIN and f.name == name for f in model.functions):
            model.functions.append(function(opset))
    if not any(o.domain == KERNEL_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    model.ir_version = max(model.ir_version, 8)


def _error(weight: np.ndarray, quantized: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    return float(np.abs(dequantize(*quantized) - weight).max())


def integer_zero_points(scale: np.ndarray, low: np.ndarray, bits: int) -> np.ndarray | None:
    """z [N, K/32] in 0..2^bits - 1 with low == -z * scale (in float32) for every block, so that
    w = d * q + m = d * (q - z); None where some block's offset is not a whole number of steps."""
    z = np.rint(-low.astype(np.float64) / scale)
    if z.min() < 0 or z.max() > 2**bits - 1:
        return None
    if not np.array_equal((-z * scale).astype(np.float32), low):
        return None
    return z.astype(np.uint8)


def _packed_nibbles(values: np.ndarray) -> np.ndarray:
    """[..., n] values in 0..15 → [..., ceil(n / 2)] bytes, the first of each pair low."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _quantized_matmul(node: onnx.NodeProto, quantized: tuple[np.ndarray, np.ndarray, np.ndarray], bits: int,
                      activations: int = 32):
    q, scale, low = quantized
    N, n_blocks, _ = q.shape
    K = n_blocks * BLOCK
    zero = integer_zero_points(scale, low, bits)
    base = node.name or node.output[0]
    a, y = node.input[0], node.output[0]
    inits = []

    # Without a zero-point input MatMulNBits computes (q - 8) * d, hence the 8·d (and 136·d) below.
    if bits == 4:
        halves = [(q, scale, zero)]
        offset = low + 8 * scale
    else:
        halves = [(q >> 4, 16 * scale, None if zero is None else zero >> 4),
                  (q & 15, scale, None if zero is None else zero & 15)]
        offset = low + 136 * scale
    half_inputs = []  # per 4-bit half: its packed values, its scales and any integer zero points
    for i, (nibbles, d, z) in enumerate(halves):
        names = [f"{base}_q{i}", f"{base}_scale{i}"]
        inits += [numpy_helper.from_array(_packed_nibbles(nibbles), names[0]),  # [N, K/32, 16]
                  numpy_helper.from_array(d.reshape(-1), names[1])]
        if z is not None:
            names.append(f"{base}_zero{i}")
            inits.append(numpy_helper.from_array(_packed_nibbles(z).reshape(-1), names[2]))
        half_inputs.append(names)
    if zero is None:
        indicator = np.zeros((K, n_blocks), np.float32)
        indicator[np.arange(K), np.arange(K) // BLOCK] = 1.0
        s_name, m_name = f"{base}_block_sum", f"{base}_block_offset"
        inits += [numpy_helper.from_array(indicator, s_name),
                  numpy_helper.from_array(np.ascontiguousarray(offset.T), m_name)]

    # One of prefixkit's operators where there is one for the form (its kernel where registered,
    # else its function body, the nodes below); otherwise those nodes.
    kernel_node = None
    if bits == 4 and zero is None:
        kernel_node = helper.make_node("MatMulQ4", [a, *half_inputs[0], s_name, m_name], [y], name=f"{base}_MatMulQ4",
                                       domain=KERNEL_DOMAIN, K=K, N=N)
    if bits == 8 and zero is not None:
        kernel_node = helper.make_node("MatMulQ8", [a, *half_inputs[0], *half_inputs[1]], [y], name=f"{base}_MatMulQ8",
                                       domain=KERNEL_DOMAIN, K=K, N=N)
    if kernel_node is not None:
        if activations != 32:
            kernel_node.attribute.append(helper.make_attribute("activations", activations))
        return [kernel_node], inits
    nodes, terms = [], []
    for i, names in enumerate(half_inputs):
        nodes.append(helper.make_node(
            "MatMulNBits", [a, *names], [f"{base}_nbits{i}"], name=f"{base}_MatMulNBits{i}", domain="com.microsoft",
            K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL,
        ))
        terms.append(f"{base}_nbits{i}")
    if zero is None:
        sums = f"{base}_block_sums"
        nodes.append(helper.make_node("MatMul", [a, s_name], [sums], name=f"{base}_BlockSum"))
        nodes.append(helper.make_node("MatMul", [sums, m_name], [f"{base}_offsets"], name=f"{base}_Offsets"))
        terms.append(f"{base}_offsets")

    if len(terms) == 1:
        nodes[-1].output[0] = y
    total = terms[0]
    for i, term in enumerate(terms[1:]):
        out = y if i == len(terms) - 2 else f"{base}_sum{i}"
        nodes.append(helper.make_node("Add", [total, term], [out], name=f"{base}_Add{i}"))
        total = out
    return nodes, inits
