"""ONNX passes that turn the graph of a QAT model into an int8 QDQ graph, exactly.

A model trained with `keras_bn.prepare_qat` and frozen by `export.freeze` converts (tf2onnx) to a
float graph in which every quantized layer's input passes through a uint8 QuantizeLinear ->
DequantizeLinear pair over its learned range, and every quantized kernel is a float32 initializer
whose values lie on a symmetric per-output-channel integer grid. `weights_to_int8` stores those
kernels as the integers they are, each with a DequantizeLinear, and the biases of such
convolutions as int32 on the scale onnxruntime's integer convolution uses: the QDQ form that
onnxruntime fuses into QLinearConv / QLinearMatMul. Without it onnxruntime quantizes the float
kernels itself, on a grid of its own, and no longer computes what was trained.

Each pass has the shape of `export.graph_passes`' passes: `pass(proto) -> changes`, the
`onnx.ModelProto` rewritten in place (`zero_points_as_tensorflow(ranges)` makes one).
"""

import logging

import numpy as np

from export.graph_passes import _attribute, _GraphIndex

logger = logging.getLogger(__name__)

# The largest integer of each signed symmetric grid, from 2 bits up to 8: the coarsest grid that
# holds a channel gives its integers (a 4-bit channel, on 7 levels, also lies on 63).
_GRID_BOUNDS = (1, 3, 7, 15, 31, 63, 127)
# How far from an integer a weight divided by its step may lie and still be on the grid
# (float32 rounding of the step and of the products that made the weight).
_GRID_TOLERANCE = 1e-3
# Operators that move values without changing them.
_MOVES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
# Weight layout per operator: the axis of the output channels in input 1.
_WEIGHT_AXIS = {"Conv": 0, "MatMul": 1}


def weights_to_int8(proto):
    """Stores the on-grid float weights of quantized-input Conv and MatMul nodes as int8.

    Precondition, per node: a Conv or MatMul whose data input is the output of a
    DequantizeLinear with a constant per-tensor scale, and whose weight (input 1) is a float32
    initializer, read by that node alone and no graph input, whose every output channel (axis 0
    for Conv, the last axis for a 2-D MatMul weight) lies on a symmetric integer grid
    `k * step_c`, `|k| <= 127` (the grid of `keras_bn`'s kernel fake quantization at 2 to 8
    bits: `step_c = max|w_c| / (2^(b-1) - 1)`). The weight becomes an int8 initializer
    followed by a DequantizeLinear (zero point 0, one step per channel), which computes the same
    values to float32 rounding. A Conv's float bias becomes int32 on the steps
    `input_step * step_c`, which onnxruntime's QLinearConv requires: exact for a `keras_bn`
    QAT layer, which rounds its bias to that grid; otherwise rounded to the nearest integer,
    an error of at most half of one accumulator step.

    Args:
        proto: an `onnx.ModelProto`, changed in place.

    Returns:
        `{"DequantizeLinear": +n}` for the n tensors stored as integers, or `{}`.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    index = _GraphIndex(graph)
    graph_inputs = {value.name for value in graph.input}
    initializers = {init.name: init for init in graph.initializer}
    new_nodes, added = [], 0
    for node in graph.node:
        if node.op_type not in _WEIGHT_AXIS or len(node.input) < 2:
            continue
        input_step = _dequantized_step(node.input[0], index)
        weight_name = node.input[1]
        weight = initializers.get(weight_name)
        if (input_step is None or weight is None or weight.data_type != TensorProto.FLOAT
                or weight_name in graph_inputs or len(index.consumers.get(weight_name, [])) != 1):
            continue
        values = numpy_helper.to_array(weight)
        if node.op_type == "MatMul" and values.ndim != 2:
            continue
        axis = _WEIGHT_AXIS[node.op_type] % values.ndim
        bias_name = node.input[2] if node.op_type == "Conv" and len(node.input) > 2 else ""
        bias = initializers.get(bias_name)
        if bias_name and (bias is None or bias.data_type != TensorProto.FLOAT
                          or len(index.consumers.get(bias_name, [])) != 1):
            continue  # a bias onnxruntime cannot take as int32: leave the node float
        bias_units = (None if bias is None else
                      numpy_helper.to_array(bias).astype(np.float64) / np.float32(input_step))
        grid = on_grid(values, axis, bias_units)
        if grid is None:
            logger.info("weights_to_int8: %s's weight is not on an integer grid; left float",
                        node.name)
            continue
        integers, steps = grid
        node.input[1] = _dequantized(graph, new_nodes, weight_name, integers, steps, axis,
                                     np.zeros(steps.shape, np.int8))
        added += 1
        if bias is not None:
            bias_steps = (np.float32(input_step) * steps).astype(np.float32)
            safe = np.where(bias_steps > 0, bias_steps, np.float32(1.0))
            bias_integers = np.round(numpy_helper.to_array(bias) / safe).astype(np.int64)
            bias_integers = np.clip(bias_integers, -(2**31), 2**31 - 1).astype(np.int32)
            node.input[2] = _dequantized(graph, new_nodes, bias_name, bias_integers, safe, 0,
                                         np.zeros(steps.shape, np.int32))
            added += 1
    if not added:
        return {}
    nodes = new_nodes + list(graph.node)  # the new nodes read initializers only: put them first
    del graph.node[:]
    graph.node.extend(nodes)
    return {"DequantizeLinear": +added}


def on_grid(values, axis, bias_units=None):
    """`(integers, steps)` with `values == integers * steps` (steps along `axis`) to float32
    rounding, `integers` int8 in `[-127, 127]`, or `None` when some channel lies on no symmetric
    grid of 2 to 8 bits. A channel of zeros gets step 1.

    A channel on a coarse grid lies on finer ones too (7 levels divide 63): it takes the
    coarsest grid on which `bias_units[c] / step` is also an integer, where `bias_units` is the
    bias divided by the input's step (a `keras_bn` QAT layer rounds its bias to the
    accumulator's grid, `input_step * step`), else the coarsest grid."""
    moved = np.moveaxis(values.astype(np.float64), axis, 0).reshape(values.shape[axis], -1)
    largest = np.abs(moved).max(axis=1)
    steps = np.ones(len(largest))
    integers = np.zeros(moved.shape, np.int8)
    for channel, bound in enumerate(largest):
        if bound == 0.0:
            continue
        fitting = []
        for levels in _GRID_BOUNDS:
            step = bound / levels
            scaled = moved[channel] / step
            if np.abs(scaled - np.round(scaled)).max() <= _GRID_TOLERANCE:
                fitting.append(step)
        if not fitting:
            return None
        chosen = fitting[0]
        if bias_units is not None:
            chosen = next((step for step in fitting if _is_integer(bias_units[channel] / step)),
                          chosen)
        steps[channel] = chosen
        integers[channel] = np.round(moved[channel] / chosen).astype(np.int8)
    shape = list(values.shape)
    shape.insert(0, shape.pop(axis))
    integers = np.moveaxis(integers.reshape(shape), 0, axis)
    return integers, steps.astype(np.float32)


def _is_integer(value):
    return abs(value - round(value)) <= _GRID_TOLERANCE + 1e-6 * abs(value)


def _dequantized_step(name, index):
    """The constant per-tensor scale of the DequantizeLinear that produces `name`, directly or
    through data movement (`_MOVES`, which onnxruntime moves the pair across), or None."""
    producer = index.producers.get(name)
    while producer is not None and producer.op_type in _MOVES:
        producer = index.producers.get(producer.input[0])
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = index.constants.get(producer.input[1])
    if scale is None or scale.size != 1 or _attribute(producer, "axis", 1) is None:
        return None
    return float(scale.ravel()[0])


def _dequantized(graph, new_nodes, name, integers, steps, axis, zero_points):
    """Replaces initializer `name` by `integers` (named `name`_quantized) and a DequantizeLinear
    with `steps` and `zero_points` along `axis`; returns the DequantizeLinear's output name."""
    from onnx import helper, numpy_helper

    for position, initializer in enumerate(graph.initializer):
        if initializer.name == name:
            del graph.initializer[position]
            break
    graph.initializer.extend([
        numpy_helper.from_array(integers, f"{name}_quantized"),
        numpy_helper.from_array(steps.astype(np.float32), f"{name}_scale"),
        numpy_helper.from_array(zero_points, f"{name}_zero_point"),
    ])
    output = f"{name}_dequantized"
    new_nodes.append(helper.make_node(
        "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
        [output], axis=axis, name=f"{name}_DequantizeLinear",
    ))
    return output


def tensorflow_grid(minimum, maximum, num_bits=8):
    """`(scale, zero point)` of TensorFlow's `FakeQuantWithMinMaxVars` over `[minimum, maximum]`
    (what Keras's `fake_quant_with_min_max_vars` runs on the TensorFlow backend): the range
    nudged so that 0 is a code, computed in float32 as TensorFlow's kernel does, the zero point
    rounded half away from zero. Where `-minimum / scale` is a half in exact arithmetic (a
    symmetric range such as [-1, 1]), float32 puts it just below or above, and that decides."""
    import math

    quant_max = np.float32(2**num_bits - 1)
    scale = (np.float32(maximum) - np.float32(minimum)) / quant_max
    from_min = float(np.float32(0.0) - np.float32(minimum) / scale)
    if from_min <= 0.0:
        return float(scale), 0
    if from_min >= float(quant_max):
        return float(scale), int(quant_max)
    whole = math.floor(from_min)
    return float(scale), whole + (1 if from_min - whole >= 0.5 else 0)


def zero_points_as_tensorflow(ranges):
    """A pass that gives the uint8 quantize-dequantize pair of each of `ranges` (`{name of the
    fake-quantization layer in the frozen model: (minimum, maximum, num_bits)}`) TensorFlow's
    scale and zero point (`tensorflow_grid`).

    tf2onnx computes the pair's zero point in float64 and rounds it half to even: over [-1, 1]
    it writes 128 where the Keras layer, in float32, uses 127, and the graph then holds
    [-128, 127] steps where the model holds [-127, 128]: inputs at the ends of the range differ
    by a step. The pair's nodes are found by the layer's name scope in their names; constants
    tf2onnx shares between pairs are not changed, each pair gets its own.
    """
    import re

    from onnx import TensorProto, numpy_helper

    def zero_points_as_tensorflow(proto):
        graph = proto.graph
        initializers = {init.name: init for init in graph.initializer}
        readers = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        changed = 0
        for node in graph.node:
            if node.op_type != "QuantizeLinear" or len(node.input) < 3:
                continue
            names = [name for name in ranges if re.search(f"/{re.escape(name)}(_[0-9]+)?/",
                                                          node.name)]
            zero_point = initializers.get(node.input[2])
            scale = initializers.get(node.input[1])
            if (len(names) != 1 or zero_point is None or scale is None
                    or zero_point.data_type != TensorProto.UINT8):
                continue
            want_scale, want_zero = tensorflow_grid(*ranges[names[0]])
            have_scale = float(numpy_helper.to_array(scale).ravel()[0])
            have_zero = int(numpy_helper.to_array(zero_point).ravel()[0])
            if (have_scale, have_zero) == (np.float32(want_scale), want_zero):
                continue
            pair = [node] + [reader for reader in readers.get(node.output[0], [])
                             if reader.op_type == "DequantizeLinear"]
            scale_name, zero_name = f"{node.name}_scale_tf", f"{node.name}_zero_point_tf"
            graph.initializer.extend([
                numpy_helper.from_array(np.array(want_scale, np.float32), scale_name),
                numpy_helper.from_array(np.array(want_zero, np.uint8), zero_name)])
            for member in pair:
                member.input[1], member.input[2] = scale_name, zero_name
            changed += 1
        return {"QuantizeLinear grid as TensorFlow's": changed} if changed else {}

    return zero_points_as_tensorflow


def activations_to_int8(proto):
    """Writes the uint8 quantize-dequantize pairs whose zero point is 128 as int8 pairs with
    zero point 0.

    Precondition, per node: a QuantizeLinear or DequantizeLinear whose zero point is a uint8
    initializer equal to 128 (what TensorFlow's fake quantization over a `keras_bn` QAT layer's
    symmetric range, `activation_range(..., symmetric=True)`, converts to). `q_u8 - 128` over
    `[0, 255]` and `q_s8 - 0` over `[-128, 127]` are the same grid, so the graph computes the same
    values; TensorRT takes only the second. The value_info of the integer tensors that change
    type is dropped (shape inference restores it).

    Args:
        proto: an `onnx.ModelProto`, changed in place.

    Returns:
        `{"QuantizeLinear uint8->int8": n, "DequantizeLinear uint8->int8": m}` of the nodes
        rewritten, or `{}`.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shifted = {}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero_point = initializers.get(node.input[2])
        if (zero_point is None or zero_point.data_type != TensorProto.UINT8
                or not np.all(numpy_helper.to_array(zero_point) == 128)):
            continue
        shifted.setdefault(node.input[2], []).append(node)
    if not shifted:
        return {}
    counts = {}
    retyped = set()
    for name, nodes in shifted.items():
        users = readers[name]
        if any(user not in nodes for user in users):
            continue  # the zero point feeds something else too: leave it
        values = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array(np.zeros(values.shape, np.int8), name))
        for node in nodes:
            key = f"{node.op_type} uint8->int8"
            counts[key] = counts.get(key, 0) + 1
            if node.op_type == "QuantizeLinear":
                retyped.add(node.output[0])
    kept = [value for value in graph.value_info if value.name not in retyped]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return counts
