"""Exact ONNX graph passes that run after tf2onnx, each with a name, a precondition and a log line.

tf2onnx already merges BN that follows a plain convolution and removes transposes; these passes take
away what it leaves behind in common image networks (the explicit zero padding of Keras's
ZeroPadding2D before a conv or ResNet's max pool, the global pool of every classifier head). Each pass changes the graph only where the result is exactly the same
function; `to_onnx` then verifies the final graph against Keras in onnxruntime anyway.
"""

import logging

import numpy as np

logger = logging.getLogger(__name__)


def optimize(proto):
    """Runs every pass on `proto` in place; returns one line per pass that changed something."""
    lines = []
    passes = (
        fold_pad_into_conv,
        fold_pad_into_max_pool,
        global_average_pool_and_squeeze_to_reduce_mean,
    )
    for graph_pass in passes:
        changes = graph_pass(proto)
        if changes:
            line = f"{graph_pass.__name__}: " + ", ".join(
                f"{op} {count:+d}" for op, count in changes.items()
            )
            logger.info(line)
            lines.append(line)
    _remove_unused_constants(proto.graph)
    return lines


def fold_pad_into_conv(proto):
    """Pad(zeros) -> Conv becomes Conv with pads (Keras's ZeroPadding2D before a 'valid' conv).

    Precondition: a constant-mode Pad with value 0 on the spatial axes only, whose only consumer is
    a Conv (any groups) with explicit padding, and the resulting pads symmetric. Conv pads with
    zeros itself, so both are equal. Asymmetric pads are left as a Pad: onnxruntime's depthwise
    kernel ran 4% slower with them (MobileNetV2, batch 1) than Pad + Conv.
    """
    return _fold_pad_into("Conv", proto, needs_nonnegative_input=False, symmetric_only=True)


def fold_pad_into_max_pool(proto):
    """Pad(zeros) -> MaxPool becomes MaxPool with pads, where the padded tensor is a Relu output.

    Precondition: as for `fold_pad_into_conv`, with a MaxPool fed by a Relu and padding smaller than
    the kernel. MaxPool ignores its own pad positions; since a Relu output is >= 0 and every window
    holds at least one real value, a zero in the window never changes the maximum.
    """
    return _fold_pad_into("MaxPool", proto, needs_nonnegative_input=True, symmetric_only=False)


def _fold_pad_into(op_type, proto, needs_nonnegative_input, symmetric_only):
    graph = proto.graph
    producers, consumers, constants, outputs = _index(graph)
    removed = []
    for pad in [node for node in graph.node if node.op_type == "Pad"]:
        data = pad.input[0]
        users = consumers.get(pad.output[0], [])
        if len(users) != 1 or users[0].op_type != op_type or pad.output[0] in outputs:
            continue
        layer = users[0]
        if layer.input[0] != pad.output[0]:
            continue  # the Pad feeds the weights, not the data
        if _attribute(pad, "mode", b"constant") != b"constant":
            continue
        if len(pad.input) < 2 or pad.input[1] not in constants:
            continue
        if len(pad.input) > 2 and pad.input[2] and not _is_zero(constants.get(pad.input[2])):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # explicit `axes` (opset 18): not produced by tf2onnx; leave it
        if needs_nonnegative_input:
            producer = producers.get(data)
            if producer is None or producer.op_type != "Relu":
                continue
        if _attribute(layer, "auto_pad", b"NOTSET") not in (b"NOTSET", b""):
            continue
        pads = [int(p) for p in constants[pad.input[1]].ravel()]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(pads) < 0:
            continue  # batch or channel padding, or cropping
        spatial = rank - 2
        old = list(_attribute(layer, "pads", [0] * (2 * spatial)))
        if len(old) != 2 * spatial:
            continue
        new = [b + o for b, o in zip(begin[2:], old[:spatial])] + [
            e + o for e, o in zip(end[2:], old[spatial:])
        ]
        if symmetric_only and new[:spatial] != new[spatial:]:
            continue
        if op_type == "MaxPool":
            kernel = list(_attribute(layer, "kernel_shape", []))
            if len(kernel) != spatial or any(p >= k for p, k in zip(new, kernel + kernel)):
                continue
        _set_ints(layer, "pads", new)
        layer.input[0] = data
        removed.append(pad)
    for node in removed:
        graph.node.remove(node)
    return {"Pad": -len(removed)} if removed else {}


def global_average_pool_and_squeeze_to_reduce_mean(proto):
    """GlobalAveragePool -> Squeeze(spatial axes) becomes one ReduceMean(spatial axes, keepdims=0).

    Precondition: the pool's only consumer is a Squeeze that removes exactly the spatial axes
    (2 .. rank-1) that the pool reduced to 1, so both compute the mean over those axes.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ranks = _ranks(proto)
    producers, consumers, constants, outputs = _index(graph)
    replaced = 0
    for pool in [node for node in graph.node if node.op_type == "GlobalAveragePool"]:
        users = consumers.get(pool.output[0], [])
        rank = ranks.get(pool.input[0])
        if len(users) != 1 or users[0].op_type != "Squeeze" or pool.output[0] in outputs:
            continue
        if rank is None or rank < 3:
            continue
        squeeze = users[0]
        if opset >= 13:
            if len(squeeze.input) < 2 or squeeze.input[1] not in constants:
                continue
            axes = [int(a) for a in constants[squeeze.input[1]].ravel()]
        else:
            axes = list(_attribute(squeeze, "axes", []))
        spatial = list(range(2, rank))
        if sorted(a % rank for a in axes) != spatial:
            continue
        name = pool.name or pool.output[0]
        inputs = [pool.input[0]]
        attributes = {"keepdims": 0}
        if opset >= 18:
            axes_name = f"{name}_reduce_axes"
            graph.initializer.append(
                numpy_helper.from_array(np.array(spatial, dtype=np.int64), axes_name)
            )
            inputs.append(axes_name)
        else:
            attributes["axes"] = spatial
        reduce_mean = helper.make_node(
            "ReduceMean", inputs, [squeeze.output[0]], name=f"{name}_reduce_mean", **attributes
        )
        index = list(graph.node).index(pool)
        graph.node.remove(pool)
        graph.node.remove(squeeze)
        graph.node.insert(index, reduce_mean)
        replaced += 1
    if not replaced:
        return {}
    return {"GlobalAveragePool": -replaced, "Squeeze": -replaced, "ReduceMean": +replaced}


def _index(graph):
    """Who produces and who consumes each tensor, the constant tensors, and the graph outputs."""
    from onnx import numpy_helper

    producers, consumers = {}, {}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        for name in node.output:
            producers[name] = node
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    return producers, consumers, constants, {output.name for output in graph.output}


def _ranks(proto):
    """The rank of every tensor whose shape ONNX shape inference can tell."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    ranks = {}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


def _attribute(node, name, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _set_ints(node, name, values):
    from onnx import helper

    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute(name, [int(v) for v in values]))


def _is_zero(array):
    if array is None or array.size > 1:
        return False
    return array.size == 0 or float(array.ravel()[0]) == 0.0


def _remove_unused_constants(graph):
    """Drops the initializers and Constant nodes that no node or graph output reads any more."""
    used = {name for node in graph.node for name in node.input}
    used |= {output.name for output in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
