"""The conversion of a frozen Keras model to ONNX with tf2onnx: the graph's input and output names
and shapes, the conversion itself, and the checks of what tf2onnx wrote.
"""

import collections
import contextlib
import dataclasses
import gc
import logging
import re

import keras
import numpy as np

from keras_bn import _keras_internals

PROTOBUF_LIMIT = 2**31 - 1  # a single ONNX file cannot exceed protobuf's 2 GiB


@dataclasses.dataclass
class InputSpec:
    name: str
    shape: tuple  # with None for the batch dimension and every other unknown one
    dtype: str


def input_specs(model, names):
    tensors = list(model.inputs)
    if names is None:
        names = [_onnx_name(tensor.name, f"input_{i}") for i, tensor in enumerate(tensors)]
    names = _check_names(names, len(tensors), "input_names", "input")
    specs = []
    for name, tensor in zip(names, tensors):
        shape = tuple(tensor.shape)
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if not shape or shape[0] is not None:
            raise ValueError(
                f"to_onnx exports a dynamic batch dimension, so each input's first dimension must "
                f"be None. Received: input '{tensor.name}' with shape {shape}"
            )
        if not (dtype.startswith(("float", "int", "uint")) or dtype == "bool"):
            raise ValueError(
                f"to_onnx accepts numeric inputs. Received: input '{tensor.name}' of dtype {dtype}"
            )
        specs.append(InputSpec(name, shape, dtype))
    return specs


def output_names_of(model, names):
    if names is None:
        keras_names = getattr(model, "output_names", None) or [  # Sequential has none
            _keras_internals.producer(tensor).name for tensor in model.outputs]
        names = [_onnx_name(name, f"output_{i}") for i, name in enumerate(keras_names)]
        seen = collections.Counter()
        for i, name in enumerate(names):  # Keras may repeat a name; ONNX may not
            seen[name] += 1
            if seen[name] > 1:
                names[i] = f"{name}_{seen[name] - 1}"
    return _check_names(names, len(model.outputs), "output_names", "output")


def _check_names(names, count, argument, what):
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if len(names) != count or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{argument} must hold {count} non-empty string(s), one per model {what}. "
            f"Received: {argument}={names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{argument} must be unique. Received: {argument}={names!r}")
    return names


def _onnx_name(name, default):
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", str(name or "")).strip("_")
    return name or default


def check_size(model):
    size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    if size > PROTOBUF_LIMIT:
        raise ValueError(
            f"the model's weights take {size / 2**30:.1f} GiB; a single ONNX file holds at most "
            "2 GiB (external-data ONNX files are not supported)"
        )


@contextlib.contextmanager
def _collected_between_optimizers():
    """tf2onnx deep-copies the whole graph, weights included, before each of its ONNX optimizers,
    and the copies it drops are reference cycles, which Python's collector (it counts objects,
    not bytes) leaves for long: VGG19 at 32x32 (149 MiB of weights) peaked at 9.4 GiB in the
    optimizers. A collection before each optimizer keeps the live copies to two (3.9 GiB)."""
    from tf2onnx import optimizer

    original = optimizer._get_optimizers

    def collecting(factory):
        def make():
            gc.collect()
            return factory()
        return make

    optimizer._get_optimizers = lambda: collections.OrderedDict(
        (name, collecting(factory)) for name, factory in original().items())
    # What exists before the conversion is set aside (gc.freeze), so that each collection looks
    # at the conversion's own objects only: milliseconds, not the quarter second a collection
    # over TensorFlow's and Keras's objects takes. A process that froze objects itself keeps
    # them frozen: then nothing is frozen or unfrozen here.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        optimizer._get_optimizers = original
        if freeze:
            gc.unfreeze()


def convert(frozen, inputs, output_names, opset, nchw):
    """The ONNX graph of `frozen(x, training=False)`, its tensors named as asked."""
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # TensorFlow restricts tensor names; the ONNX names, which need not follow its rules, are
    # put in by tf2onnx's renaming below.
    signature = [tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=f"input_{i}")
                 for i, spec in enumerate(inputs)]
    structure = frozen.input if len(frozen.inputs) > 1 else None

    @tf.function(input_signature=signature, autograph=False)
    def inference(*tensors):
        model_inputs = (keras.tree.pack_sequence_as(structure, list(tensors))
                        if structure is not None else tensors[0])
        # identity: every output its own tensor, even where the model repeats one
        return [tf.identity(t) for t in keras.tree.flatten(frozen(model_inputs, training=False))]

    try:
        # Freezing here rather than in tf2onnx.convert.from_function turns captured tensors
        # (e.g. a Normalization layer's mean and variance, which are not variables) into
        # constants; from_function would make each of them an extra graph input.
        function = convert_variables_to_constants_v2(
            inference.get_concrete_function(), lower_control_flow=False, aggressive_inlining=True
        )
        tf_inputs = [t.name for t in function.inputs]
        tf_outputs = [t.name for t in function.outputs]
        if len(tf_inputs) != len(inputs) or len(tf_outputs) != len(output_names):
            raise ValueError(
                f"the traced function has {len(tf_inputs)} inputs and {len(tf_outputs)} outputs; "
                f"the model {len(inputs)} and {len(output_names)}"
            )
        renames = dict(zip(tf_inputs, [spec.name for spec in inputs]))
        renames.update(zip(tf_outputs, output_names))
        transposed = [tf_inputs[i] for i, spec in enumerate(inputs) if spec.name in nchw]
        tf_logger = tf.get_logger()
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)  # tf2onnx's TF1 freezing calls log deprecation notices
        try:
            with _collected_between_optimizers():
                proto, _ = tf2onnx.convert.from_graph_def(
                    function.graph.as_graph_def(add_shapes=True), name=frozen.name,
                    input_names=tf_inputs, output_names=tf_outputs, opset=opset,
                    inputs_as_nchw=transposed, tensors_to_rename=renames,
                )
        finally:
            tf_logger.setLevel(level)
    except Exception as error:  # TensorFlow and tf2onnx raise whatever their handlers raise
        raise ValueError(f"tf2onnx could not convert the model: {one_line(error)}") from error

    graph = proto.graph
    unconverted = sorted({n.op_type for n in graph.node if n.domain == "" and not _is_onnx_op(
        n.op_type, opset)})
    if unconverted:
        raise ValueError(
            f"tf2onnx has no ONNX equivalent for the TensorFlow operation(s) {unconverted} at "
            f"opset {opset}; try another opset or replace the layers that use them"
        )
    names = ([v.name for v in graph.input], [v.name for v in graph.output])
    if names != ([spec.name for spec in inputs], list(output_names)):
        raise ValueError(f"the converted graph has inputs {names[0]} and outputs {names[1]}; "
                         f"expected {[spec.name for spec in inputs]} and {list(output_names)}")
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    # tf2onnx names the other unknown dimensions unk__<n>; a name per input and axis says what
    # they are. Distinct names, since two inputs' unknown dimensions need not be equal.
    for value in graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis and not dim.HasField("dim_value"):
                dim.dim_param = f"{value.name}_dim{axis}"
    proto.producer_name = "keras-bn export (tf2onnx)"
    return proto


def _is_onnx_op(op_type, opset):
    from onnx import defs

    try:
        defs.get_schema(op_type, opset, "")
    except Exception:  # onnx raises SchemaError for an unknown operator
        return False
    return True


def check_graph(proto):
    import onnx

    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise ValueError("the ONNX graph exceeds protobuf's 2 GiB limit for a single file")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ValueError(
            f"onnx.checker rejected the converted graph: {one_line(error)}"
        ) from error


def one_line(error, limit=300):
    """`error`'s text on one line, shortened at a word boundary to about `limit` characters."""
    text = " ".join(str(error).split())
    if len(text) <= limit:
        return text or type(error).__name__
    return text[:limit + 1].rsplit(" ", 1)[0] + " ..."


def graph_interface(model, input_names, output_names, channels_first):
    """`(input specs, output names, names of the inputs written NCHW)` of `model`'s graph, each
    name checked: unique, inputs and outputs distinct, `channels_first` only with an image
    input."""
    inputs = input_specs(model, input_names)
    output_names = output_names_of(model, output_names)
    clashes = sorted({spec.name for spec in inputs} & set(output_names))
    if clashes:
        raise ValueError(f"input and output names must differ. Received both: {clashes}")
    nchw = [spec.name for spec in inputs if channels_first and len(spec.shape) == 4]
    if channels_first and not nchw:
        raise ValueError(
            "channels_first=True transposes rank-4 (image) inputs to NCHW, but this model has "
            f"none. Received input shapes: {[tuple(spec.shape) for spec in inputs]}"
        )
    check_size(model)
    return inputs, output_names, nchw
