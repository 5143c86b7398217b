"""Post-training int8 quantization of a float ONNX graph through `onnxruntime.quantization`.

onnxruntime calibrates the activation ranges on real data and writes the QDQ graph; what is ours is
feeding it the data Keras users have (arrays, `(x, y)`, dicts, `tf.data`, `PyDataset`, batches),
refusing data that would calibrate nonsense, and verifying the int8 graph against the float one
before anything is returned. BN must be folded first (`export.to_onnx` does it): onnxruntime cannot
quantize a BatchNormalization on its own.

Reference:
    [Jacob et al., 2018](https://arxiv.org/abs/1712.05877), Sec. 2 (affine quantization) and
    onnxruntime's [quantization guide](
    https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html).
"""

import collections
import dataclasses
import itertools
import logging
import operator
import os
import platform
import tempfile
import time

import keras
import numpy as np
import onnx
import onnxruntime
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from keras_bn.population import Batches
from keras_bn.verification import VerificationError  # not via export.onnx_export: no cycle

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": ort_quantization.CalibrationMethod.MinMax,
    "entropy": ort_quantization.CalibrationMethod.Entropy,
    "percentile": ort_quantization.CalibrationMethod.Percentile,
}
ACTIVATION_TYPES = {
    "uint8": ort_quantization.QuantType.QUInt8,
    "int8": ort_quantization.QuantType.QInt8,
}
# An int8 classifier that changes more than 1 top-1 decision in 100 has lost accuracy worth
# looking at; within that, int8 on a folded CNN usually stays within a few tenths of a point.
DEFAULT_MIN_AGREEMENT = 0.99
# 16 batches of 32 are 512 examples, the few hundred onnxruntime's guide suggests for calibration.
DEFAULT_MAX_BATCHES = 16
# Nodes that exist only to carry integers; every other node computes.
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_QUANTIZABLE_OPS = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


@dataclasses.dataclass
class OutputComparison:
    """How one output of the int8 graph compares with the float graph on the validation data.

    Attributes:
        name: the graph output's name.
        max_error: `max|int8 - float| / max|float|` over every validation example.
        mean_error: `mean|int8 - float| / max|float|`.
        agreement: for class scores (rank 2, more than one column), the fraction of examples
            whose top-1 class is the same in both graphs; `None` for other outputs.
        float_accuracy, int8_accuracy: top-1 accuracy of each graph when labels were given for
            this output, else `None`.
    """

    name: str
    max_error: float
    mean_error: float
    agreement: float = None
    float_accuracy: float = None
    int8_accuracy: float = None


@dataclasses.dataclass
class QuantizationReport:
    """What `quantize_int8` did and measured.

    Attributes:
        method: the calibration method, "minmax", "entropy" or "percentile".
        calibration_batches, calibration_examples: the data the ranges were calibrated on.
        validation_batches, validation_examples: the data the int8 graph was compared on.
        validated_on: "validation_data", or "calibration_data" when no validation data was given
            (then agreement is measured on the data the ranges came from, an optimistic figure).
        activation_type: "uint8" or "int8"; weights are always int8.
        symmetric_activations: whether activation ranges are symmetric around zero.
        per_channel: whether weights have one scale per output channel.
        reduce_range: whether weights use 7 bits.
        cpu_has_vnni: whether the CPU that verified the graph has VNNI (`None`: unknown or not
            x86); see `quantize_int8`.
        float_node_counts: `{op_type: count}` of the float graph given.
        node_counts: `{op_type: count}` of the int8 graph.
        quantized_ops: `{op_type: count}` of the computing nodes onnxruntime quantized (their
            inputs come from `DequantizeLinear`, and onnxruntime's CPU kernels fuse the
            surrounding QDQ pair into an integer kernel or a pass-through).
        float_ops: `{op_type: count}` of the computing nodes left in float.
        outputs: one `OutputComparison` per graph output.
        min_agreement: the guard's threshold on top-1 agreement.
        seconds: wall time of pre-processing, calibration, quantization and comparison.
    """

    method: str
    calibration_batches: int
    calibration_examples: int
    validation_batches: int
    validation_examples: int
    validated_on: str
    activation_type: str
    symmetric_activations: bool
    per_channel: bool
    reduce_range: bool
    cpu_has_vnni: bool
    float_node_counts: dict
    node_counts: dict
    quantized_ops: dict
    float_ops: dict
    outputs: list
    min_agreement: float
    seconds: float

    @property
    def agreement(self):
        """The lowest top-1 agreement over class-score outputs, or `None` when there is none."""
        values = [o.agreement for o in self.outputs if o.agreement is not None]
        return min(values) if values else None

    @property
    def max_error(self):
        """The largest relative `max_error` over outputs."""
        return max(o.max_error for o in self.outputs)

    def summary(self):
        """A few lines for people: calibration, the graph, and each output's errors."""
        symmetry = "symmetric" if self.symmetric_activations else "asymmetric"
        weights = "per-channel" if self.per_channel else "per-tensor"
        bits = ", 7-bit" if self.reduce_range else ""
        cpu = {True: "VNNI", False: "no VNNI", None: "VNNI unknown"}[self.cpu_has_vnni]

        def ops(counts):
            return ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"

        lines = [
            f"int8 QDQ: {self.method} calibration on {self.calibration_batches} batches "
            f"({self.calibration_examples} examples); activations {self.activation_type} "
            f"{symmetry}, weights int8 {weights} symmetric{bits}; verified on a CPU with {cpu} "
            f"({self.seconds:.1f} s)",
            f"nodes: {sum(self.float_node_counts.values())} float -> "
            f"{sum(self.node_counts.values())} int8 (QuantizeLinear "
            f"{self.node_counts.get('QuantizeLinear', 0)}, DequantizeLinear "
            f"{self.node_counts.get('DequantizeLinear', 0)}); quantized: "
            f"{ops(self.quantized_ops)}; float: {ops(self.float_ops)}",
        ]
        where = ("validation data" if self.validated_on == "validation_data"
                 else "the calibration data (no validation data given)")
        for output in self.outputs:
            line = (f"output '{output.name}' on {self.validation_examples} examples of {where}: "
                    f"error vs float max {output.max_error:.2e}, mean {output.mean_error:.2e} "
                    "(relative to max|float|)")
            if output.agreement is not None:
                line += f"; top-1 agreement {output.agreement:.2%}"
            if output.float_accuracy is not None:
                line += (f"; accuracy float {output.float_accuracy:.2%}, "
                         f"int8 {output.int8_accuracy:.2%}")
            lines.append(line)
        return "\n".join(lines)


def quantize_int8(float_model, calibration_data, *, method="minmax",
                  max_batches=DEFAULT_MAX_BATCHES, batch_size=32, validation_data=None,
                  max_validation_batches=None, min_agreement=DEFAULT_MIN_AGREEMENT,
                  max_mean_error=None, activation_type="uint8", symmetric_activations=False,
                  per_channel=True, reduce_range=None, channels_first_inputs=(),
                  verbose="auto"):
    """Quantizes a float32 ONNX graph to int8 with onnxruntime, calibrated on data and verified.

    Runs onnxruntime's pre-processing (`quant_pre_process`: ONNX shape inference and its basic
    graph optimizations), then `quantize_static` in QDQ format with int8 weights (symmetric,
    per output channel by default): activations are quantized with the ranges their calibration
    `method` finds on `calibration_data`. Then runs the float and the int8 graphs on the
    validation data and compares them (see `QuantizationReport`). Everything happens in memory
    and a temporary folder that is always removed; nothing is written anywhere else.

    The defaults follow onnxruntime's guidance for x86-64 CPUs (the `quantize_static` docstring):
    unsigned 8-bit activations with a zero point (asymmetric; a ReLU's output then uses the whole
    range and the ReLU disappears into the quantization) and signed 8-bit symmetric weights. Where
    the CPU has VNNI (AVX-512 VNNI or AVX-VNNI), 8-bit products accumulate without saturation and
    weights use all 8 bits; without it, onnxruntime's integer kernels sum pairs of u8 x s8
    products in 16 bits (`vpmaddubsw`), which saturates, so weights use 7 bits
    (`reduce_range=True`). `reduce_range=None` chooses by the CPU quantizing, which is also the
    CPU the int8 graph is verified on; set it for the CPU you deploy on when they differ. On ARM,
    `activation_type="int8"` and `symmetric_activations=True` suit its kernels.

    Args:
        float_model: the float graph, as an `onnx.ModelProto`, its serialized bytes, or the path of
            an `.onnx` file, with BN folded (as `export.to_onnx` writes it).
        calibration_data: inputs that look like what the deployed model will see: a NumPy array
            or tensor (split into batches of `batch_size`), a tuple `(x, y)` or
            `(x, y, sample_weight)` of arrays, a dict of arrays keyed by graph input name, or any
            iterable of batches (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator, a
            list) whose elements are `x` or `(x, y[, sample_weight])` -- what
            `keras_bn.estimate_population_statistics` takes. A batch `x` is an array (one graph
            input), a dict keyed by graph input name, or a list of arrays in graph input order.
            Its values must be finite numbers.
        method: how onnxruntime turns observed activations into ranges: "minmax" (the observed
            range), "entropy" (the range minimizing the KL divergence of the quantized
            histogram) or "percentile" (the 99.999th percentile of |activation|). "entropy" and
            "percentile" keep every calibration activation in memory until the end (onnxruntime
            builds their histograms at once), so `max_batches` bounds their memory.
        max_batches: the most calibration batches read; `None` reads all of `calibration_data`
            (an endless iterable then never ends).
        batch_size: batch size for array data.
        validation_data: data to compare the graphs on, in any form `calibration_data` takes;
            labels `y` in `(x, y)` give accuracies (class ids, or one-hot rows; a dict keyed by
            output name for several class-score outputs). `None` compares on
            `calibration_data` (up to `max_batches` batches), which is optimistic.
        max_validation_batches: the most validation batches read; `None` reads them all.
        min_agreement: the guard: a `VerificationError` is raised when any class-score output
            (rank 2, more than one column) agrees with the float graph's top-1 class on fewer than
            this fraction of the validation examples. 0.99 by default; 0 turns it off. Other
            outputs are only reported, unless `max_mean_error` is set.
        max_mean_error: an optional second guard, for outputs that are not class scores:
            the largest accepted `mean|int8 - float| / max|float|` of any output.
        activation_type: "uint8" (default, see above) or "int8".
        symmetric_activations: make activation ranges symmetric around zero (zero point 0).
        per_channel: one weight scale per output channel (default), rather than per tensor.
        reduce_range: quantize weights to 7 bits, for x86 CPUs without VNNI; `None` (default)
            does so exactly when this machine is such a CPU (see above).
        channels_first_inputs: names of rank-4 graph inputs that are NCHW while the data is
            NHWC (as `export.to_onnx(..., channels_first=True)` writes them); their batches are
            transposed before they are fed.
        verbose: "auto" or 1 shows a `keras.utils.Progbar` while calibrating and comparing; 0 is
            silent.

    Returns:
        A tuple `(int8_model, report)`: the int8 graph in the form `float_model` came in (a
        `ModelProto` for a `ModelProto` or a path, `bytes` for bytes) and a `QuantizationReport`.

    Raises:
        ValueError: an argument is out of range, or data is empty, non-numeric, not finite, or
            of a shape the graph does not take (the message names the array and what it held).
        TypeError: `float_model` or a data argument is of a type not accepted.
        VerificationError: the int8 graph fails a guard; nothing is returned
            (`keras_bn.VerificationError`, the one `export.to_onnx` raises).

    Example:

    >>> export.to_onnx(model, "model.onnx")
    >>> int8, report = quantize_int8(onnx.load("model.onnx"), x_train[:512],
    ...                              validation_data=(x_test, y_test))
    >>> print(report.summary())
    >>> onnx.save(int8, "model.int8.onnx")
    """
    start = time.perf_counter()
    as_bytes = isinstance(float_model, (bytes, bytearray))
    proto = _load_model(float_model)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {sorted(CALIBRATION_METHODS)}. "
                         f"Received: method={method!r}")
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"activation_type must be one of {sorted(ACTIVATION_TYPES)}. "
                         f"Received: activation_type={activation_type!r}")
    max_batches = _check_count(max_batches, "max_batches")
    max_validation_batches = _check_count(max_validation_batches, "max_validation_batches")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not (
            0 <= min_agreement <= 1):
        raise ValueError("min_agreement must be a fraction from 0 to 1. "
                         f"Received: min_agreement={min_agreement!r}")
    if max_mean_error is not None and (isinstance(max_mean_error, bool) or not isinstance(
            max_mean_error, (int, float)) or not max_mean_error > 0):
        raise ValueError("max_mean_error must be a positive number or None. "
                         f"Received: max_mean_error={max_mean_error!r}")
    vnni = cpu_has_vnni()
    if reduce_range is None:
        reduce_range = vnni is not True and _is_x86()
    inputs = _graph_inputs(proto, channels_first_inputs)
    outputs = [value.name for value in proto.graph.output]
    progress = 0 if verbose == 0 else 1

    calibration = _Feeds(calibration_data, inputs, batch_size, max_batches, "calibration_data",
                         progress, keep=validation_data is None)
    validation = None  # made before any work, so that arrays with a mistake fail at once
    if validation_data is not None:
        validation = _Feeds(validation_data, inputs, batch_size, max_validation_batches,
                            "validation_data", progress)
    with tempfile.TemporaryDirectory(prefix="keras-bn-int8-") as folder:
        float_path = os.path.join(folder, "float.onnx")
        prepared_path = os.path.join(folder, "prepared.onnx")
        int8_path = os.path.join(folder, "int8.onnx")
        onnx.save(proto, float_path)
        logger.info("quantize_int8: pre-processing the float graph (quant_pre_process)")
        # Symbolic shape inference (sympy) is for transformers' symbolic dimensions; ONNX's own
        # shape inference types every tensor of a convolutional or dense graph.
        ort_quantization.quant_pre_process(float_path, prepared_path, skip_symbolic_shape=True)
        logger.info("quantize_int8: calibrating (%s) and quantizing", method)
        ort_quantization.quantize_static(
            prepared_path, int8_path, calibration,
            quant_format=ort_quantization.QuantFormat.QDQ,
            per_channel=per_channel, reduce_range=reduce_range,
            activation_type=ACTIVATION_TYPES[activation_type],
            weight_type=ort_quantization.QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options={"ActivationSymmetric": bool(symmetric_activations),
                           "WeightSymmetric": True},
        )
        int8_proto = onnx.load(int8_path)

    if validation is None and calibration.kept is None:
        validation = _Feeds(calibration_data, inputs, batch_size, max_batches,
                            "calibration_data", progress)
    # A one-shot iterator cannot be read twice: the batches it gave are compared on.
    pairs = calibration.kept if validation is None else validation.pairs()
    logger.info("quantize_int8: comparing the int8 graph with the float graph")
    comparisons, examples, batches = _compare(proto, int8_proto, pairs, outputs)

    report = QuantizationReport(
        method=method, calibration_batches=calibration.batches,
        calibration_examples=calibration.examples, validation_batches=batches,
        validation_examples=examples,
        validated_on="calibration_data" if validation_data is None else "validation_data",
        activation_type=activation_type, symmetric_activations=bool(symmetric_activations),
        per_channel=bool(per_channel), reduce_range=bool(reduce_range), cpu_has_vnni=vnni,
        float_node_counts=_node_counts(proto), node_counts=_node_counts(int8_proto),
        quantized_ops=_quantized_ops(int8_proto, quantized=True),
        float_ops=_quantized_ops(int8_proto, quantized=False),
        outputs=comparisons, min_agreement=float(min_agreement),
        seconds=time.perf_counter() - start,
    )
    _guard(report, min_agreement, max_mean_error)
    logger.info("quantize_int8: %s", report.summary().replace("\n", "; "))
    return (int8_proto.SerializeToString() if as_bytes else int8_proto), report


def check_data(data, inputs, *, batch_size=32, max_batches=DEFAULT_MAX_BATCHES,
               argument="calibration_data"):
    """Checks data against a graph's inputs before the graph exists, as `quantize_int8` does.

    Array data (an array, `(x, y)`, a dict) is checked at once, as much of it as `max_batches`
    batches read; so is a list of batches, which can be read twice. Other iterables
    (generators, `tf.data`, `PyDataset`) are checked batch by batch when `quantize_int8` reads
    them. `export.to_onnx` calls this before freezing and converting, so that a mistake in the
    data fails in a second, not after the conversion.

    Args:
        data: calibration or validation data, in any form `quantize_int8` takes.
        inputs: `(name, shape, dtype)` of each graph input, in the data's layout (NHWC), `shape`
            with `None` for the batch and every other dimension the graph leaves open.
        batch_size, max_batches: as in `quantize_int8`.
        argument: what the data is called in error messages.

    Raises:
        ValueError: the data is missing, empty, not finite, or of a shape or dtype the inputs
            do not take (the message names the array and what it held).
        TypeError: the data is of a type not accepted.
    """
    graph_inputs = [_GraphInput(name, tuple(shape), np.dtype(dtype), False)
                    for name, shape, dtype in inputs]
    feeds = _Feeds(data, graph_inputs, batch_size, _check_count(max_batches, "max_batches"),
                   argument, verbose=0)
    if isinstance(data, list):
        collections.deque(feeds.pairs(), maxlen=0)


def cpu_has_vnni():
    """Whether this machine's CPU has VNNI (`avx512_vnni` or `avx_vnni`), from /proc/cpuinfo;
    `None` where that cannot be told (not Linux, not x86)."""
    if not _is_x86():
        return None
    try:
        with open("/proc/cpuinfo") as file:
            flags = next((line.split(":", 1)[1].split() for line in file
                          if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags))


def _is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _load_model(model):
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as error:  # protobuf's DecodeError and friends
            raise ValueError(f"float_model bytes are not an ONNX model: {error}") from error
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no such ONNX file: {os.fspath(model)}")
        return onnx.load(os.fspath(model))
    raise TypeError("float_model must be an onnx.ModelProto, its serialized bytes or the path of "
                    f"an .onnx file. Received: {type(model).__name__}")


def _check_count(value, name):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None. Received: {name}={value!r}")
    return value


@dataclasses.dataclass
class _GraphInput:
    name: str
    shape: tuple  # in the data's layout; None for dimensions the graph leaves open, and
    # None in place of the tuple for a graph that does not say its input's rank
    dtype: np.dtype
    channels_first: bool  # the graph takes NCHW, the data is NHWC


def _graph_inputs(proto, channels_first_inputs):
    initializers = {tensor.name for tensor in proto.graph.initializer}
    values = [value for value in proto.graph.input if value.name not in initializers]
    names = [value.name for value in values]
    if isinstance(channels_first_inputs, str):
        channels_first_inputs = [channels_first_inputs]
    unknown = sorted(set(channels_first_inputs) - set(names))
    if unknown:
        raise ValueError(f"channels_first_inputs names inputs the graph does not have: {unknown}. "
                         f"The graph's inputs: {names}")
    inputs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else None
                      for dim in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        transposed = value.name in channels_first_inputs
        if transposed:
            if shape is None or len(shape) != 4:
                raise ValueError(f"channels_first_inputs: input '{value.name}' has rank "
                                 f"{'unknown' if shape is None else len(shape)}; only rank-4 "
                                 "(image) inputs are NCHW")
            shape = (shape[0], shape[2], shape[3], shape[1])
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        inputs.append(_GraphInput(value.name, shape, dtype, transposed))
    return inputs


class _Feeds(ort_quantization.CalibrationDataReader):
    """onnxruntime's calibration reader over Keras-style data: one checked feed dict
    `{graph input name: array}` per batch.

    onnxruntime's calibrator calls `get_next`, which gives the feed alone; `pairs()` gives
    `(feed, labels)` pairs for the comparison. With `keep=True` and a one-shot iterator (a
    generator), the pairs are kept for a second pass (`kept`), since the data cannot be read
    twice.
    """

    def __init__(self, data, inputs, batch_size, max_batches, argument, verbose, keep=False):
        if data is None:
            raise ValueError(f"{argument} is required: int8 ranges are calibrated on real inputs.")
        self.argument = argument
        self.inputs = inputs
        self.batches = 0
        self.examples = 0
        source = Batches(data, batch_size, steps=max_batches, labels=True, name=argument)
        if source.inputs is not None:  # checked at once, before any work: as much as will be read
            arrays = source.inputs
            if max_batches is not None:
                arrays = keras.tree.map_structure(
                    operator.itemgetter(slice(0, max_batches * batch_size)), arrays)
            self._check_batch(arrays, "")
        one_shot = source.inputs is None and not isinstance(data, keras.utils.PyDataset) and (
            _is_iterator(data))
        self._source = iter(source)
        self.kept = [] if keep and one_shot else None
        self._progbar = keras.utils.Progbar(source.count, verbose=verbose, unit_name="batch")

    def pairs(self):
        while True:
            pair = self._next_pair()
            if pair is None:
                return
            yield pair

    def get_next(self):
        pair = self._next_pair()
        return None if pair is None else pair[0]

    def _next_pair(self):
        element = next(self._source, None)
        if element is None:
            return self._finish()
        x, labels = element
        where = f" batch {self.batches}"
        feed = self._check_batch(x, where)
        size = next(iter(feed.values())).shape[0]
        self.batches += 1
        self.examples += size
        self._progbar.update(self.batches)
        if labels is not None:
            labels = _numpy(labels)
        if self.kept is not None:
            self.kept.append((feed, labels))
        return feed, labels

    def _finish(self):
        if not self.batches:
            raise ValueError(f"{self.argument} yielded no batch; it needs at least one example.")
        if self._progbar.target != self.batches:  # the bar closes itself on reaching its target
            self._progbar.update(self.batches, finalize=True)
        return None

    def _check_batch(self, x, where):
        """The feed dict of one batch `x`; ValueError/TypeError naming what is wrong."""
        names = [graph_input.name for graph_input in self.inputs]
        if isinstance(x, dict):
            if sorted(x) != sorted(names):
                raise ValueError(
                    f"{self.argument}{where}: a dict must be keyed by the graph's input names "
                    f"{names}. Received keys: {sorted(map(str, x))}"
                )
            arrays = [x[name] for name in names]
        elif isinstance(x, (list, tuple)) and len(self.inputs) > 1:
            if len(x) != len(names):
                raise ValueError(f"{self.argument}{where}: {len(x)} arrays for the graph's "
                                 f"{len(names)} inputs {names}")
            arrays = list(x)
        elif len(self.inputs) == 1:
            arrays = [x]
        else:
            raise ValueError(
                f"{self.argument}{where}: the graph has {len(names)} inputs {names}; give a dict "
                f"keyed by these names or a list in this order. Received: {type(x).__name__}"
            )
        feed = {}
        for graph_input, array in zip(self.inputs, arrays):
            array = self._check_array(graph_input, array, f"{self.argument}{where}, input "
                                      f"'{graph_input.name}'")
            if graph_input.channels_first:
                array = np.transpose(array, (0, 3, 1, 2))
            feed[graph_input.name] = np.ascontiguousarray(array)
        sizes = {array.shape[0] for array in feed.values()}
        if len(sizes) > 1:
            raise ValueError(f"{self.argument}{where}: inputs with different batch sizes "
                             f"{ {name: a.shape[0] for name, a in feed.items()} }")
        return feed

    def _check_array(self, graph_input, array, what):
        if not (isinstance(array, (np.ndarray, list, np.generic)) or keras.ops.is_tensor(array)):
            raise TypeError(f"{what}: expected an array. Received: {type(array).__name__}")
        array = _numpy(array)
        expected = graph_input.dtype
        kinds = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(expected.kind, expected.kind)
        if array.dtype.kind not in kinds:
            raise ValueError(f"{what}: the graph takes {expected.name}; received an array of dtype "
                             f"{array.dtype} (non-numeric or not convertible)")
        want = graph_input.shape
        if array.ndim == 0 or want is not None and (array.ndim != len(want) or any(
                dim is not None and got != dim for got, dim in zip(array.shape[1:], want[1:]))):
            expected_shape = ("batch", "...") if want is None else ("batch",) + tuple(
                "?" if dim is None else dim for dim in want[1:])
            raise ValueError(
                f"{what}: expected shape {expected_shape}. Received: shape {array.shape}")
        if array.shape[0] == 0:
            raise ValueError(
                f"{what} is empty (shape {array.shape}); it needs at least one example")
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                nans = int(np.isnan(array).sum())
                infinite = int(finite.size - finite.sum()) - nans
                raise ValueError(
                    f"{what} holds {nans} NaN and {infinite} infinite values (shape "
                    f"{array.shape}); quantization needs finite inputs"
                )
        return array.astype(expected, copy=False)


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value) if keras.ops.is_tensor(value) else value)


def _is_iterator(data):
    try:
        return iter(data) is data
    except TypeError:
        return False


def _session(model):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # Spinning threads would keep cores busy between runs, which a shared machine cannot afford.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def _compare(float_proto, int8_proto, feeds, names):
    """Per-output errors, top-1 agreement and accuracies of the int8 graph against the float one
    over `feeds` (`(feed, labels)` pairs); returns the comparisons, examples and batches."""
    reference, quantized = _session(float_proto), _session(int8_proto)
    largest = collections.defaultdict(float)  # max|float|
    worst = collections.defaultdict(float)  # max|int8 - float|
    total = collections.defaultdict(float)  # sum|int8 - float|
    elements = collections.Counter()
    agree, correct_float, correct_int8, labelled = (collections.Counter() for _ in range(4))
    class_names = set()
    examples = batches = 0
    for feed, labels in feeds:
        want = reference.run(names, feed)
        got = quantized.run(names, feed)
        size = next(iter(feed.values())).shape[0]
        examples += size
        batches += 1
        class_outputs = [name for name, value in zip(names, want) if _is_class_scores(value)]
        class_names.update(class_outputs)
        per_output = _labels_per_output(labels, class_outputs, size)
        for name, expected, actual in zip(names, want, got):
            expected = expected.astype(np.float64)
            difference = np.abs(actual.astype(np.float64) - expected)
            largest[name] = max(largest[name], float(np.max(np.abs(expected), initial=0.0)))
            worst[name] = max(worst[name], float(np.max(difference, initial=0.0)))
            if not np.isfinite(difference).all():
                worst[name] = float("inf")
            total[name] += float(difference.sum())
            elements[name] += difference.size
            if name in class_outputs:
                top_float, top_int8 = expected.argmax(axis=1), actual.argmax(axis=1)
                agree[name] += int((top_float == top_int8).sum())
                if name in per_output:
                    truth = per_output[name]
                    correct_float[name] += int((top_float == truth).sum())
                    correct_int8[name] += int((top_int8 == truth).sum())
                    labelled[name] += size
    comparisons = []
    for name in names:
        scale = max(largest[name], np.finfo(np.float32).tiny)
        is_class = name in class_names
        comparisons.append(OutputComparison(
            name=name, max_error=worst[name] / scale,
            mean_error=total[name] / max(elements[name], 1) / scale,
            agreement=agree[name] / examples if is_class else None,
            float_accuracy=correct_float[name] / labelled[name] if labelled[name] else None,
            int8_accuracy=correct_int8[name] / labelled[name] if labelled[name] else None,
        ))
    return comparisons, examples, batches


def _is_class_scores(value):
    return value.ndim == 2 and value.shape[1] > 1


def _labels_per_output(labels, class_outputs, size):
    """`{output name: class ids}` from a batch's labels: one array for the single class-score
    output, or a dict keyed by output name; class ids or one-hot rows."""
    if labels is None:
        return {}
    if isinstance(labels, dict):
        unknown = sorted(set(labels) - set(class_outputs))
        if unknown:
            raise ValueError(f"validation labels for outputs {unknown}, which are not class-score "
                             f"outputs; those are {class_outputs}")
        items = labels.items()
    elif len(class_outputs) == 1:
        items = [(class_outputs[0], labels)]
    else:
        raise ValueError(
            f"validation labels given as one array, but the graph has {len(class_outputs)} "
            f"class-score outputs {class_outputs}; give a dict keyed by output name"
        )
    result = {}
    for name, y in items:
        y = _numpy(y)
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot or probabilities
            y = y.argmax(axis=1)
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.shape != (size,) or y.dtype.kind not in "iuf":
            raise ValueError(
                f"validation labels for output '{name}' must be {size} class ids or one-hot rows "
                f"(one per example). Received: shape {y.shape}, dtype {y.dtype}"
            )
        result[name] = y.astype(np.int64)
    return result


def _node_counts(proto):
    return dict(collections.Counter(node.op_type for node in proto.graph.node).most_common())


def _quantized_ops(proto, quantized):
    """`{op_type: count}` of computing nodes that onnxruntime quantized (`quantized=True`: an op
    its quantizer handles, reading a dequantized tensor) or left in float (`False`: any other node
    with a floating-point output). Integer shape arithmetic (Shape, Gather on shapes) is neither."""
    dequantized = {output for node in proto.graph.node if node.op_type == "DequantizeLinear"
                   for output in node.output}
    types = {value.name: value.type.tensor_type.elem_type for value in itertools.chain(
        onnx.shape_inference.infer_shapes(proto).graph.value_info, proto.graph.output)}
    counts = collections.Counter()
    for node in proto.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        if node.op_type in _QUANTIZABLE_OPS and node.input and node.input[0] in dequantized:
            is_quantized = True
        elif types.get(node.output[0], onnx.TensorProto.FLOAT) in _FLOAT_TYPES:
            is_quantized = False  # unknown types count as float: the report must not flatter
        else:
            continue
        if is_quantized == quantized:
            counts[node.op_type] += 1
    return dict(counts.most_common())


def _guard(report, min_agreement, max_mean_error):
    failures = []
    for output in report.outputs:
        if output.agreement is not None and not output.agreement >= min_agreement:
            failures.append(f"output '{output.name}': top-1 agreement {output.agreement:.2%} is "
                            f"below min_agreement {min_agreement:.2%}")
        if not np.isfinite(output.max_error):
            failures.append(f"output '{output.name}': the int8 graph gives NaN or infinite values")
        if max_mean_error is not None and not output.mean_error <= max_mean_error:
            failures.append(f"output '{output.name}': mean error {output.mean_error:.3g} is above "
                            f"max_mean_error {max_mean_error:g}")
    if failures:
        raise VerificationError(
            "the int8 graph is not accurate enough; nothing was returned or written. "
            + "; ".join(failures) + ". Calibrate on more or more representative data, try "
            "method='entropy' or 'percentile', or lower the guard.\n" + report.summary()
        )
