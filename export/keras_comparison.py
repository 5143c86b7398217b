"""The verification of an ONNX graph against the Keras model it came from, on random inputs at
several batch sizes and sizes of the unknown dimensions.

A float graph must reproduce `model(x, training=False)` to a relative tolerance, in onnxruntime
and, when it is installed, in OpenVINO. A QAT graph computes in integers what the QAT model
computes in float32, so its meaning (onnxruntime with optimizations off) is compared in
quantization steps of each output (`export.runtimes.steps_apart`).
"""

import dataclasses

import keras
import numpy as np

from export import runtimes
from keras_bn import verification
from keras_bn.verification import VerificationError


@dataclasses.dataclass
class Run:
    """One verification run: the feed, Keras's outputs and where it was taken."""

    feed: dict
    expected: list
    where: str


def verification_runs(inputs, batch_sizes, dynamic_sizes):
    """`(batch_size, size)` per verification run; `size` is that of every unknown dimension
    other than the batch, `None` when the model has none. Pairing the two lists rather than
    crossing them shows both kinds of dimension dynamic in as few runs."""
    if not any(dim is None for spec in inputs for dim in spec.shape[1:]):
        return [(batch_size, None) for batch_size in batch_sizes]
    count = max(len(batch_sizes), len(dynamic_sizes))
    return [(batch_sizes[i % len(batch_sizes)], dynamic_sizes[i % len(dynamic_sizes)])
            for i in range(count)]


def describe_runs(runs):
    return ", ".join(f"batch size {batch_size}" + ("" if size is None else f" (size {size})")
                     for batch_size, size in runs)


def keras_runs(model, inputs, output_names, nchw, runs, seed):
    """A `Run` per `(batch_size, size)`: random inputs (`keras_bn.verification.random_inputs`)
    and Keras's inference outputs on them, the feed in the graph's layout."""
    rng = np.random.default_rng(seed)
    result = []
    for batch_size, size in runs:
        where = f"batch size {batch_size}" + ("" if size is None else f", unknown dimensions "
                                              f"{size}")
        arrays = verification.random_inputs(model, batch_size, seed=rng, unknown_size=size)
        expected = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(
            model(verification.as_model_input(model, arrays), training=False))]
        feed = {spec.name: (np.transpose(x, (0, 3, 1, 2)) if spec.name in nchw else x)
                for spec, x in zip(inputs, arrays)}
        result.append(Run(feed, expected, where))
    return result


def data_runs(model, proto, data, output_names, nchw, max_batches):
    """A `Run` per batch of 32 of `data` (any form `quantize_int8` takes, labels ignored), at
    most `max_batches`: real inputs, where random ones lie outside a QAT model's learned input
    ranges and quantize to a few codes."""
    from export import calibration_data

    feeds = calibration_data.Feeds(data, calibration_data.graph_inputs(proto, nchw), 32,
                                   max_batches, "validation_data", verbose=0)
    runs = []
    for index, (feed, _) in enumerate(feeds.pairs()):
        arrays = [_nhwc(feed[spec.name], spec.channels_first) for spec in feeds.inputs]
        expected = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(
            model(verification.as_model_input(model, arrays), training=False))]
        runs.append(Run(feed, expected, f"validation_data batch {index}"))
    return runs


def constant_outputs(runs, tolerance):
    """Whether Keras's outputs vary over no run's examples by more than `tolerance` times their
    scale (`keras_bn.verification.can_show_error`): then no comparison with them could fail, and
    a report must not call the graph verified."""
    for run in runs:
        for want in run.expected:
            scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
            if verification.can_show_error(verification.output_variation(want), scale,
                                           tolerance):
                return False
    return True


def verify_float(data, runs, output_names, tolerance, openvino):
    """The largest relative error of the float graph `data` against Keras over `runs`, in
    onnxruntime and (with `openvino`) OpenVINO: `max|runtime - keras| <= tolerance * max(1,
    max|keras|)` for every output, finite wherever Keras's output is; else VerificationError
    naming the runtime, the output and the run."""
    runners = [("onnxruntime", runtimes.session(data))]
    if openvino:
        runners.append(("OpenVINO", runtimes.OpenVINOSession(data)))
    worst = 0.0
    for runtime, runner in runners:
        for run in runs:
            actual = runner.run(output_names, run.feed)
            for name, want, got in zip(output_names, run.expected, actual):
                _check_shape(runtime, name, want, got, run.where)
                error, scale = verification.output_error(want, got)
                if not error < np.inf:
                    raise VerificationError(
                        f"{runtime} output '{name}' holds NaN or inf where Keras's output is "
                        f"finite ({run.where}); no file was written"
                    )
                if not verification.within_tolerance(error, scale, tolerance):
                    raise VerificationError(
                        f"{runtime} output '{name}' differs from Keras by {error / scale:.3g} "
                        f"relative to max(1, its largest value) ({run.where}), above the "
                        f"tolerance {tolerance:g}; no file was written"
                    )
                worst = max(worst, error / scale)
    return worst


def verify_in_steps(data, runs, output_names, judge=True):
    """How the meaning of the int8 graph `data` (onnxruntime with optimizations off) compares
    with a QAT model's Keras outputs over `runs`: `(max relative error, max steps, largest
    fraction beyond one step, the meaning's outputs per run)`; with `judge`, VerificationError
    when more than `runtimes.MAX_BEYOND_ONE_STEP` of an output's values lie beyond one step
    (without, when `verify_by_layers` has judged the graph, the figures are reported)."""
    exact = runtimes.session(data, optimized=False)
    pooled = {name: ([], []) for name in output_names}
    worst, meanings = 0.0, []
    for run in runs:
        actual = exact.run(output_names, run.feed)
        meanings.append(actual)
        for name, want, got in zip(output_names, run.expected, actual):
            _check_shape("onnxruntime", name, want, got, run.where)
            error, scale = verification.output_error(want, got)
            if not error < np.inf:
                raise VerificationError(
                    f"the int8 graph's output '{name}' holds NaN or inf where Keras's output is "
                    f"finite ({run.where}); no file was written")
            worst = max(worst, error / scale)
            pooled[name][0].append(np.ravel(want))
            pooled[name][1].append(np.ravel(got))
    steps, beyond = runtimes.steps_apart(
        pooled, "the int8 graph's meaning (onnxruntime, optimizations off)", "the QAT model",
        limit=runtimes.MAX_BEYOND_ONE_STEP if judge else None)
    return worst, steps, beyond, meanings


def check_runs(data, runs, output_names):
    """The int8 graph `data` runs on the float graph's verification inputs, every size of them,
    with Keras's output shapes and finite values (its accuracy is `quantize_int8`'s to judge, on
    real data: random inputs lie outside the calibrated ranges)."""
    session = runtimes.session(data, optimized=False)
    for run in runs:
        for name, want, got in zip(output_names, run.expected,
                                   session.run(output_names, run.feed)):
            if got.shape != want.shape:
                raise VerificationError(
                    f"the int8 graph's output '{name}' has shape {got.shape}, Keras "
                    f"{want.shape} ({run.where}); no file was written"
                )
            if not np.isfinite(got).all():
                raise VerificationError(
                    f"the int8 graph's output '{name}' holds NaN or inf ({run.where}); no file "
                    "was written"
                )


def _check_shape(runtime, name, want, got, where):
    if np.shape(want) != np.shape(got):
        raise VerificationError(f"{runtime} output '{name}' has shape {np.shape(got)}, Keras "
                                f"{np.shape(want)} ({where}); no file was written")


def verify_by_layers(model, data, runs, output_names, nchw):
    """The QAT graph `data` against the QAT `model` one quantized layer at a time: each QAT
    layer's input quantizer in the graph is fed Keras's own input of that layer, so that every
    stretch of float operations between two quantizers, and from the last ones to the outputs,
    is compared alone. A deep network carries a rounding difference at one quantizer forward and
    amplifies it (an untrained one most), which an output-level comparison would take for an
    error; a wrong stretch puts many values beyond one step where it is.

    Returns:
        `(layers compared, worst layer, its fraction beyond one step)`, or `None` when the graph
        cannot be matched to the layers (a QAT layer inside a nested model or called twice, a
        quantizer not found by name, a shape that does not match): then the outputs are judged
        instead.

    Raises:
        VerificationError: more than `runtimes.MAX_BEYOND_ONE_STEP` of some layer's quantized
            input, or of some output, lies beyond one step of Keras's.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(data)
    quantizers = _forced_quantizers(model, proto)
    if not quantizers:
        return None
    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    sources = [node.input[0] for _, node in quantizers]
    known = {value.name for value in graph.output}
    graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                        for name in dict.fromkeys(sources) if name not in known)
    unforced = runtimes.session(proto.SerializeToString(), optimized=False)
    probe = keras.Model(model.inputs, [layer.input for layer, _ in quantizers])
    keras_values = []  # per run, Keras's input of each QAT layer in the graph's layout
    for index, run in enumerate(runs):
        arrays = [_nhwc(array, name in nchw) for name, array in run.feed.items()]
        values = [keras.ops.convert_to_numpy(v).astype(np.float32) for v in keras.tree.flatten(
            probe(verification.as_model_input(probe, arrays), training=False))]
        if index == 0:
            layouts = _layouts(values, unforced.run(sources, run.feed))
            if layouts is None:
                return None
        keras_values.append([np.transpose(v, (0, 3, 1, 2)) if transpose else v
                             for v, transpose in zip(values, layouts)])
    for (layer, node), value in zip(quantizers, keras_values[0]):  # fed from Keras from now on
        node.input[0] = f"keras_bn.forced/{layer.name}"
        graph.input.append(onnx.helper.make_tensor_value_info(
            node.input[0], onnx.TensorProto.FLOAT, ["batch", *value.shape[1:]]))
    session = runtimes.session(proto.SerializeToString(), optimized=False)
    names = [value.name for value in graph.output]
    beyond = [[] for _ in quantizers]
    pooled = {name: ([], []) for name in output_names}
    for run, values in zip(runs, keras_values):
        feed = dict(run.feed)
        feed.update((node.input[0], value) for (_, node), value in zip(quantizers, values))
        results = dict(zip(names, session.run(names, feed)))
        for flags, (_, node), source, want in zip(beyond, quantizers, sources, values):
            low, high, step = _grid(node, constants)
            got = np.clip(results[source], low, high)
            flags.append(np.ravel(~(np.abs(got - np.clip(want, low, high)) / step <= 1.0)))
        for name, want in zip(output_names, run.expected):
            pooled[name][0].append(np.ravel(want))
            pooled[name][1].append(np.ravel(results[name]))
    worst, worst_beyond = None, 0.0
    for (layer, _), flags in zip(quantizers, beyond):
        fraction = float(np.mean(np.concatenate(flags)))
        if fraction > runtimes.MAX_BEYOND_ONE_STEP:
            raise VerificationError(
                f"the int8 graph's meaning (onnxruntime, optimizations off) quantizes the input "
                f"of QAT layer '{layer.name}' otherwise than Keras: {fraction:.1%} of its codes "
                "lie more than one step away when every quantizer before it is fed Keras's "
                f"values, above the {runtimes.MAX_BEYOND_ONE_STEP:.0%} allowed; nothing was "
                "written")
        if worst is None or fraction > worst_beyond:
            worst, worst_beyond = layer.name, fraction
    runtimes.steps_apart(pooled, "the int8 graph's meaning (onnxruntime, optimizations off) "
                         "with each quantizer fed Keras's values", "the QAT model")
    return len(quantizers), worst, worst_beyond


def _layouts(keras_values, graph_values):
    """Per quantizer input, whether the graph holds Keras's channels-last value transposed to
    channels-first; `None` when a shape matches neither. Where both match (height, width and
    channels equal), the layout closer to the graph's own value is taken."""
    layouts = []
    for want, got in zip(keras_values, graph_values):
        candidates = [transpose for transpose in (False, True)
                      if (want.ndim == 4 or not transpose) and np.shape(
                          np.transpose(want, (0, 3, 1, 2)) if transpose else want)[1:]
                      == np.shape(got)[1:]]
        if not candidates:
            return None
        layouts.append(min(candidates, key=lambda transpose: float(np.mean(np.abs(
            (np.transpose(want, (0, 3, 1, 2)) if transpose else want)[:len(got)] - got)))))
    return layouts


def _forced_quantizers(model, proto):
    """`[(QAT layer, the QuantizeLinear node of its input in proto)]` for the QAT layers whose
    input quantizer the graph holds under the name `export.freeze` gives it
    (`<layer>_input_quantization`) and whose input is not a graph input, or `None` when a QAT
    layer is nested or shared, or a name is found twice. A layer whose quantizer is not found
    shares another's: tf2onnx merges equal computations, such as two layers reading one tensor
    (or two equal ReLUs of it, NASNet's) over one range, and the merged quantizer is fed Keras's
    value of the other layer's input, the same tensor."""
    from export import arguments

    top = {id(layer) for layer in model.layers}
    graph_inputs = {value.name for value in proto.graph.input}
    pairs = []
    for layer in arguments.qat_layers(model):
        if layer.input_range() is None:
            continue
        if id(layer) not in top or len(layer._inbound_nodes) != 1:
            return None
        marker = f"/{layer.name}_input_quantization"
        nodes = [node for node in proto.graph.node
                 if node.op_type == "QuantizeLinear" and marker in node.name]
        if len(nodes) > 1:
            return None
        if nodes and nodes[0].input[0] not in graph_inputs:  # a graph input is Keras's value
            pairs.append((layer, nodes[0]))
    return pairs


def _grid(node, constants):
    """`(lowest, highest, step)` in float of the per-tensor QuantizeLinear `node`."""
    scale = float(np.ravel(constants[node.input[1]])[0])
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
    if zero_point is None:
        low, high, zero = 0, 255, 0
    else:
        info = np.iinfo(zero_point.dtype)
        low, high, zero = info.min, info.max, int(np.ravel(zero_point)[0])
    return (low - zero) * scale, (high - zero) * scale, scale


def _nhwc(array, channels_first):
    return np.transpose(array, (0, 2, 3, 1)) if channels_first else array
