"""ONNX graph passes that run after tf2onnx, each with a name, a precondition and a log line.

tf2onnx already merges BN that follows a plain convolution and removes transposes; the exact passes
here take away what it leaves behind in common image networks: the explicit zero padding of Keras's
`ZeroPadding2D` before a conv or ResNet's max pool, and the global pool of every classifier head.
Each is a function `pass(proto) -> changes` that rewrites the `onnx.ModelProto` in place where its
precondition (in its docstring) holds, leaves every other node as it was, and returns the change in
node count per op type, e.g. `{"Pad": -1}`, or `{}` when it changed nothing. An exact pass computes
the same function as the graph it replaces; `to_onnx` verifies the final graph against Keras in
onnxruntime anyway.

`store_weights_as_float16` is a pass of the same shape that is not exact (it rounds the weights),
so it is not in `EXACT_PASSES`; `to_onnx` runs it only when asked for `float16_weights=True`.

Example:

```python
import onnx
from export import graph_passes

proto = onnx.load("model.onnx")
graph_passes.optimize(proto)  # ["fold_pad_into_max_pool: Pad -1", ...]
graph_passes.optimize(proto, passes=[graph_passes.store_weights_as_float16])
onnx.save(proto, "model_optimized.onnx")
```
"""

import logging

import numpy as np

logger = logging.getLogger(__name__)


def fold_pad_into_conv(proto):
    """Pad(zeros) -> Conv becomes Conv with pads (Keras's ZeroPadding2D before a 'valid' conv).

    Precondition: the Conv's data input is the output of a constant-mode Pad whose pads are
    constant, non-negative and on the spatial axes only, whose value is 0, whose only consumer is
    that Conv and which is not a graph output; the Conv (any `group`) has explicit padding
    (`auto_pad` NOTSET), and its pads with the Pad's added are symmetric. Conv pads with zeros
    itself, so both compute the same function. Asymmetric pads are left as a Pad: onnxruntime's
    depthwise kernel ran 4% slower with them (MobileNetV2, batch 1) than Pad + Conv.

    Args:
        proto: an `onnx.ModelProto`, changed in place.

    Returns:
        `{"Pad": -n}` for the n Pads folded, or `{}`.
    """
    graph = proto.graph
    index = _GraphIndex(graph)
    folded = []
    for conv in _nodes_of_type(graph, "Conv"):
        pad = _zero_spatial_pad_feeding(conv, index)
        if pad is None:
            continue
        pads = _pads_with(conv, pad, index)
        if pads is None:
            continue
        spatial = len(pads) // 2
        if pads[:spatial] != pads[spatial:]:
            continue
        _absorb_pad(conv, pad, pads)
        folded.append(pad)
    return _remove_pads(graph, folded)


def fold_pad_into_max_pool(proto):
    """Pad(zeros) -> MaxPool becomes MaxPool with pads, where the padded tensor is a Relu output.

    Precondition: the MaxPool's data input is a zero Pad as for `fold_pad_into_conv` (constant,
    spatial, only consumer, not a graph output), the Pad's input is the output of a Relu, the
    MaxPool has explicit padding, `ceil_mode` 0 and one output (no indices), and each of its pads
    with the Pad's added is smaller than the kernel. MaxPool ignores its own pad positions; since a
    Relu output is >= 0 and every window then holds at least one real value, a zero in the window
    never changes the maximum. Asymmetric pads fold too.

    Args:
        proto: an `onnx.ModelProto`, changed in place.

    Returns:
        `{"Pad": -n}` for the n Pads folded, or `{}`.
    """
    graph = proto.graph
    index = _GraphIndex(graph)
    folded = []
    for pool in _nodes_of_type(graph, "MaxPool"):
        pad = _zero_spatial_pad_feeding(pool, index)
        if pad is None:
            continue
        producer = index.producers.get(pad.input[0])
        if producer is None or producer.op_type != "Relu":
            continue  # a negative window would take the zero pad as its maximum
        if len(pool.output) > 1 and pool.output[1]:
            continue  # indices into the padded tensor would change meaning
        if _attribute(pool, "ceil_mode", 0) != 0:
            continue  # windows that start in the padding are dropped, unlike windows on a Pad
        pads = _pads_with(pool, pad, index)
        if pads is None:
            continue
        kernel = list(_attribute(pool, "kernel_shape", []))
        if len(kernel) * 2 != len(pads):
            continue
        if any(p >= k for p, k in zip(pads, kernel + kernel, strict=True)):
            continue  # a window of padding alone has no real value (onnxruntime refuses it)
        _absorb_pad(pool, pad, pads)
        folded.append(pad)
    return _remove_pads(graph, folded)


def global_average_pool_and_squeeze_to_reduce_mean(proto):
    """GlobalAveragePool -> Squeeze(spatial axes) becomes one ReduceMean(spatial axes, keepdims=0).

    Precondition: the pool's input has a rank that shape inference can tell, of at least 3; the
    pool's only consumer is a Squeeze and its output is not a graph output; the Squeeze's axes
    (an attribute before opset 13, a constant input from 13) are exactly the spatial axes
    2 .. rank-1 that the pool reduced to 1. Both then compute the mean over those axes.

    Args:
        proto: an `onnx.ModelProto`, changed in place.

    Returns:
        `{"GlobalAveragePool": -n, "Squeeze": -n, "ReduceMean": +n}`, or `{}`.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    opset = _default_opset(proto)
    ranks = _ranks(proto)
    index = _GraphIndex(graph)
    replaced = 0
    for pool in _nodes_of_type(graph, "GlobalAveragePool"):
        squeeze = index.only_consumer(pool.output[0])
        if squeeze is None or squeeze.op_type != "Squeeze":
            continue
        rank = ranks.get(pool.input[0])
        if rank is None or rank < 3:
            continue
        if opset >= 13:
            if len(squeeze.input) < 2 or squeeze.input[1] not in index.constants:
                continue
            axes = [int(a) for a in index.constants[squeeze.input[1]].ravel()]
        else:
            axes = list(_attribute(squeeze, "axes", []))
        spatial = list(range(2, rank))
        if sorted(a % rank for a in axes) != spatial:
            continue
        name = pool.name or pool.output[0]
        inputs = [pool.input[0]]
        attributes = {"keepdims": 0}
        if opset >= 18:  # ReduceMean's axes moved from an attribute to an input in opset 18
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
        position = list(graph.node).index(pool)
        graph.node.remove(pool)
        graph.node.remove(squeeze)
        graph.node.insert(position, reduce_mean)
        replaced += 1
    if not replaced:
        return {}
    return {"GlobalAveragePool": -replaced, "Squeeze": -replaced, "ReduceMean": +replaced}


def store_weights_as_float16(proto):
    """Stores float32 weights as float16 initializers, each followed by a Cast back to float32.

    Not exact: every weight is rounded to float16 (11 significant bits), so the graph computes a
    slightly different function in exchange for half the file size; this is why it is not in
    `EXACT_PASSES`, and `to_onnx` runs it only with `float16_weights=True`. Arithmetic stays
    float32.

    Precondition, per initializer: float32, at least 2 values (scalars such as epsilons and clip
    bounds stay float32, where they cost nothing), and not also a graph input (a value that a
    caller may feed keeps its type). The graph is refused as a whole, and left unchanged, if any
    such weight lies beyond float16's range.

    Args:
        proto: an `onnx.ModelProto`, changed in place.

    Returns:
        `{"Cast": +n}` for the n weights stored as float16, or `{}`.

    Raises:
        ValueError: a weight holds a value beyond float16's range (65504).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    graph_inputs = {value.name for value in graph.input}
    chosen = []
    for position, initializer in enumerate(graph.initializer):
        if initializer.data_type != TensorProto.FLOAT or initializer.name in graph_inputs:
            continue
        weights = numpy_helper.to_array(initializer)
        if weights.size < 2:
            continue
        with np.errstate(over="ignore"):  # a value that float16 rounds to inf is refused below
            half = weights.astype(np.float16)
        if np.isinf(half).any():
            largest = float(np.max(np.abs(weights)))
            raise ValueError(
                f"float16_weights: weight '{initializer.name}' holds {largest:.3g}, beyond "
                "float16's range (65504); export without float16_weights"
            )
        chosen.append((position, half))
    casts = []
    for position, weights in chosen:
        name = graph.initializer[position].name
        half = numpy_helper.from_array(weights, f"{name}_float16")
        graph.initializer[position].CopyFrom(half)
        casts.append(
            helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}_cast")
        )
    if not casts:
        return {}
    nodes = casts + list(graph.node)  # the casts come first, so the nodes stay in topological order
    del graph.node[:]
    graph.node.extend(nodes)
    return {"Cast": +len(casts)}


EXACT_PASSES = (
    fold_pad_into_conv,
    fold_pad_into_max_pool,
    global_average_pool_and_squeeze_to_reduce_mean,
)


def optimize(proto, passes=EXACT_PASSES):
    """Runs `passes` in order on `proto` in place, then drops the constants nothing reads.

    Args:
        proto: an `onnx.ModelProto`, changed in place.
        passes: the pass functions to run; by default `EXACT_PASSES`, every exact pass.

    Returns:
        One line per pass that changed something, e.g. `"fold_pad_into_max_pool: Pad -1"`, also
        logged at INFO level.
    """
    lines = []
    for graph_pass in passes:
        changes = graph_pass(proto)
        if changes:
            line = f"{graph_pass.__name__}: " + ", ".join(
                f"{op_type} {count:+d}" for op_type, count in changes.items()
            )
            logger.info(line)
            lines.append(line)
    _remove_unused_constants(proto.graph)
    return lines


class _GraphIndex:
    """Who produces and who consumes each tensor, the constant tensors, and the graph outputs."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.producers, self.consumers = {}, {}
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:
            for name in node.output:
                self.producers[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attribute.t)
        self.outputs = {output.name for output in graph.output}

    def only_consumer(self, name):
        """The node that alone reads tensor `name`, once, where `name` is no graph output."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]


def _nodes_of_type(graph, op_type):
    return [node for node in graph.node if node.op_type == op_type]


def _zero_spatial_pad_feeding(node, index):
    """The Pad whose output is `node`'s data input, if folding it into `node`'s pads is possible.

    That is: `node` alone reads the Pad's output, which is no graph output; the Pad is in constant
    mode with value 0 (or none), its pads are a constant and non-negative (no cropping) and leave
    the batch and channel axes alone, and it has no explicit `axes` input (opset 18, which tf2onnx
    does not write). Returns None otherwise.
    """
    pad = index.producers.get(node.input[0]) if node.input else None
    if pad is None or pad.op_type != "Pad" or index.only_consumer(pad.output[0]) is not node:
        return None
    if _attribute(pad, "mode", b"constant") != b"constant":
        return None
    if len(pad.input) < 2 or pad.input[1] not in index.constants:
        return None
    if len(pad.input) > 2 and pad.input[2] and not _is_zero(index.constants.get(pad.input[2])):
        return None
    if len(pad.input) > 3 and pad.input[3]:
        return None
    pads = [int(p) for p in index.constants[pad.input[1]].ravel()]
    rank = len(pads) // 2
    if rank < 3 or min(pads) < 0 or pads[:2] != [0, 0] or pads[rank:rank + 2] != [0, 0]:
        return None
    return pad


def _pads_with(node, pad, index):
    """`node`'s own pads plus the spatial pads of `pad`, or None where `node` pads implicitly."""
    if _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b""):
        return None
    pads = [int(p) for p in index.constants[pad.input[1]].ravel()]
    rank = len(pads) // 2
    spatial = rank - 2
    begin, end = pads[2:rank], pads[rank + 2:]
    old = [int(p) for p in _attribute(node, "pads", [0] * (2 * spatial))]
    if len(old) != 2 * spatial:
        return None
    return [b + o for b, o in zip(begin, old[:spatial], strict=True)] + [
        e + o for e, o in zip(end, old[spatial:], strict=True)
    ]


def _absorb_pad(node, pad, pads):
    """Gives `node` the padding `pads` and reads `pad`'s input directly."""
    _set_ints(node, "pads", pads)
    node.input[0] = pad.input[0]


def _remove_pads(graph, pads):
    for pad in pads:
        graph.node.remove(pad)
    return {"Pad": -len(pads)} if pads else {}


def _default_opset(proto):
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


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
