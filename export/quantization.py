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
import os
import platform
import tempfile
import time

import numpy as np
import onnx
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from export import runtimes, targets
from export.calibration_data import (
    DEFAULT_MAX_BATCHES,
    Feeds,
    check_count,
    check_data,
    graph_inputs,
)
from export.int8_comparison import OutputComparison, compare

__all__ = ["CALIBRATION_METHODS", "DEFAULT_MAX_BATCHES", "DEFAULT_MIN_AGREEMENT",
           "OutputComparison", "QuantizationReport", "check_data", "cpu_has_vnni",
           "quantize_int8"]
from keras_bn.verification import VerificationError  # not via export.onnx_export: no cycle

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": ort_quantization.CalibrationMethod.MinMax,
    "entropy": ort_quantization.CalibrationMethod.Entropy,
    "percentile": ort_quantization.CalibrationMethod.Percentile,
}
# An int8 classifier that changes more than 1 top-1 decision in 100 has lost accuracy worth
# looking at; within that, int8 on a folded CNN usually stays within a few tenths of a point.
DEFAULT_MIN_AGREEMENT = 0.99
# An int8 output off by half its float output's largest value has lost what it computes, whatever
# the top-1 agreement says.
MAX_RELATIVE_ERROR = 0.5
# What the guard's refusal suggests; the command line says it in its options' words.
GUARD_ADVICE = "method='entropy' or 'percentile', or lower min_agreement"
# The validation batches the runtimes are run on beside the file's meaning.
RUNTIME_CHECK_BATCHES = 8
# Nodes that exist only to carry integers; every other node computes.
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_QUANTIZABLE_OPS = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


@dataclasses.dataclass
class QuantizationReport:
    """What `quantize_int8` did and measured.

    Attributes:
        method: the calibration method, "minmax", "entropy" or "percentile".
        calibration_batches, calibration_examples: the data the ranges were calibrated on.
        validation_batches, validation_examples: the data the int8 graph was compared on.
        validated_on: "validation_data", or "calibration_data" when no validation data was given
            (then agreement is measured on the data the ranges came from, an optimistic figure).
        target: the deployment target (`export.targets.TARGETS`), which decided the scheme.
        right_on: where the file computes its meaning, in words.
        activation_type: "uint8" or "int8"; weights are always int8, symmetric, per channel.
        symmetric_activations: whether activation zero points are 0.
        weight_bound: the largest |integer| of a weight (64 or 127).
        cpu_has_vnni: whether the CPU that verified the graph has VNNI (`None`: unknown or not
            x86).
        float_node_counts: `{op_type: count}` of the float graph given.
        node_counts: `{op_type: count}` of the int8 graph.
        quantized_ops: `{op_type: count}` of the computing nodes onnxruntime quantized (their
            inputs come from `DequantizeLinear`, and onnxruntime's CPU kernels fuse the
            surrounding QDQ pair into an integer kernel or a pass-through).
        float_ops: `{op_type: count}` of the computing nodes left in float.
        outputs: one `OutputComparison` per graph output: the file's meaning (onnxruntime with
            optimizations off) against the float graph.
        min_agreement: the guard's threshold on top-1 agreement.
        seconds: wall time of pre-processing, calibration, quantization and comparisons.
        runtimes: one `export.runtimes.RuntimeCheck` per runtime: how its fused integer kernels
            on this CPU compare with the file's meaning.
    """

    method: str
    calibration_batches: int
    calibration_examples: int
    validation_batches: int
    validation_examples: int
    validated_on: str
    target: str
    right_on: str
    activation_type: str
    symmetric_activations: bool
    weight_bound: int
    cpu_has_vnni: bool
    float_node_counts: dict
    node_counts: dict
    quantized_ops: dict
    float_ops: dict
    outputs: list
    min_agreement: float
    seconds: float
    runtimes: list = dataclasses.field(default_factory=list)

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
        """A few lines for people: the target, calibration, the graph, each output's errors and
        each runtime's agreement with the file's meaning."""
        symmetry = "symmetric" if self.symmetric_activations else "asymmetric"

        def ops(counts):
            return ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"

        lines = [
            f"int8 QDQ for target '{self.target}': right on {self.right_on}",
            f"{self.method} calibration on {self.calibration_batches} batches "
            f"({self.calibration_examples} examples); activations {self.activation_type} "
            f"{symmetry}, weights int8 per-channel symmetric within +-{self.weight_bound} "
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
        if self.runtimes:
            lines.append("runtimes vs the file's meaning: "
                         + "; ".join(check.summary() for check in self.runtimes))
        return "\n".join(lines)


def quantize_int8(float_model, calibration_data, *, target=targets.DEFAULT_TARGET,
                  method="minmax", max_batches=DEFAULT_MAX_BATCHES, batch_size=32,
                  validation_data=None, max_validation_batches=None,
                  min_agreement=DEFAULT_MIN_AGREEMENT, max_mean_error=None, openvino="auto",
                  channels_first_inputs=(), verbose="auto"):
    """Quantizes a float32 ONNX graph to int8 for a deployment target, calibrated on data and
    verified.

    Runs onnxruntime's pre-processing (`quant_pre_process`: ONNX shape inference and its basic
    graph optimizations), then `quantize_static` in QDQ format with the integer scheme of
    `target` (`export.targets`): activations are quantized with the ranges their calibration
    `method` finds on `calibration_data`, weights per output channel. Then:

    1. the int8 graph's meaning (onnxruntime with graph optimizations off: every
       QuantizeLinear/DequantizeLinear computed literally) is compared with the float graph on
       the validation data (`QuantizationReport.outputs`): errors, top-1 agreement, accuracies.
       These figures are the file's, whatever CPU computes them.
    2. the graph is checked statically against the target's rules (`export.targets.check`: for
       `"cpu"`, no 16-bit pair sum of x86 kernels without VNNI can saturate);
    3. the runtimes at hand that the target is meant for (onnxruntime's fused integer kernels on
       this CPU, OpenVINO's CPU plugin when installed) run the same validation batches and are
       compared with the meaning (`export.runtimes.check`, `QuantizationReport.runtimes`).

    Any failure raises `VerificationError` and returns nothing. Everything happens in memory and
    a temporary folder that is always removed. The graph carries its target in its
    `metadata_props` (`keras_bn.target`, ...; `export.targets.metadata`).

    Args:
        float_model: the float graph, as an `onnx.ModelProto`, its serialized bytes or the path of
            an `.onnx` file, with BN folded (as `export.to_onnx` writes it).
        calibration_data: inputs that look like what the deployed model will see: a NumPy array
            or tensor (split into batches of `batch_size`), a tuple `(x, y)` or
            `(x, y, sample_weight)` of arrays, a dict of arrays keyed by graph input name, or any
            iterable of batches (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator, a
            list) whose elements are `x` or `(x, y[, sample_weight])` -- what
            `keras_bn.estimate_population_statistics` takes. A batch `x` is an array (one graph
            input), a dict keyed by graph input name, or a list of arrays in graph input order.
            Its values must be finite numbers.
        target: where the file will run (`export.targets.TARGETS`): `"cpu"` (default: uint8
            activations, weights within +-64, right on every x86-64 CPU with or without VNNI, ARM
            and OpenVINO), `"cpu-vnni"` (full 8-bit weights, right only where products sum in
            32 bits: wrong in onnxruntime on x86 without VNNI) or `"tensorrt"` (symmetric int8
            activations and weights, every zero point 0).
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
            this fraction of the validation examples, or when such an output of the float graph
            is the same for every validation example (agreement would prove nothing), or when
            any output's int8 error reaches half its largest float value. 0.99 by default; 0
            turns these three off.
        max_mean_error: an optional second guard, for outputs that are not class scores:
            the largest accepted `mean|int8 - float| / max|float|` of any output.
        openvino: "auto" (default) also checks the file in OpenVINO when it is installed, `True`
            requires OpenVINO, `False` skips it.
        channels_first_inputs: names of rank-4 graph inputs that are NCHW while the data is
            NHWC (as `export.to_onnx(..., channels_first=True)` writes them); their batches are
            transposed before they are fed.
        verbose: "auto" or 1 shows a `keras.utils.Progbar` while calibrating and comparing; 0 is
            silent.

    Returns:
        A tuple `(int8_model, report)`: the int8 graph in the form `float_model` came in (a
        `ModelProto` for a `ModelProto` or a path, `bytes` for bytes) and a `QuantizationReport`.

    Raises:
        ValueError: an argument is out of range (an unknown target names the targets), OpenVINO
            is required and missing, or data is empty, non-numeric, not finite, or of a shape
            the graph does not take (the message names the array and what it held).
        TypeError: `float_model` or a data argument is of a type not accepted.
        VerificationError: the int8 graph fails a guard, breaks its target's rules, or a runtime
            disagrees with its meaning; nothing is returned (`keras_bn.VerificationError`, the
            one `export.to_onnx` raises).

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
    target = targets.get(target)
    check_options(method, min_agreement, openvino)
    max_batches = check_count(max_batches, "max_batches")
    max_validation_batches = check_count(max_validation_batches, "max_validation_batches")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")
    if max_mean_error is not None and (isinstance(max_mean_error, bool) or not isinstance(
            max_mean_error, (int, float)) or not max_mean_error > 0):
        raise ValueError("max_mean_error must be a positive number or None. "
                         f"Received: max_mean_error={max_mean_error!r}")
    vnni = cpu_has_vnni()
    inputs = graph_inputs(proto, channels_first_inputs)
    outputs = [value.name for value in proto.graph.output]
    progress = 0 if verbose == 0 else 1

    calibration = Feeds(calibration_data, inputs, batch_size, max_batches, "calibration_data",
                        progress, keep=validation_data is None)
    validation = None  # made before any work, so that arrays with a mistake fail at once
    if validation_data is not None:
        validation = Feeds(validation_data, inputs, batch_size, max_validation_batches,
                           "validation_data", progress)
    int8_proto = _quantize(proto, calibration, target, method)

    if validation is None and calibration.kept is None:
        validation = Feeds(calibration_data, inputs, batch_size, max_batches,
                           "calibration_data", progress)
    # A one-shot iterator cannot be read twice: the batches it gave are compared on.
    pairs = calibration.kept if validation is None else validation.pairs()
    logger.info("quantize_int8: comparing the int8 graph's meaning with the float graph")
    int8_data = int8_proto.SerializeToString()
    comparisons, examples, batches, sample = compare(
        proto.SerializeToString(), int8_data, pairs, outputs, keep=RUNTIME_CHECK_BATCHES)

    report = QuantizationReport(
        method=method, calibration_batches=calibration.batches,
        calibration_examples=calibration.examples, validation_batches=batches,
        validation_examples=examples,
        validated_on="calibration_data" if validation_data is None else "validation_data",
        target=target.name, right_on=target.right_on,
        activation_type=target.activation_type,
        symmetric_activations=target.symmetric_activations, weight_bound=target.weight_bound,
        cpu_has_vnni=vnni,
        float_node_counts=_node_counts(proto), node_counts=_node_counts(int8_proto),
        quantized_ops=_quantized_ops(int8_proto, quantized=True),
        float_ops=_quantized_ops(int8_proto, quantized=False),
        outputs=comparisons, min_agreement=float(min_agreement),
        seconds=time.perf_counter() - start,
    )
    _guard(report, min_agreement, max_mean_error)
    check_target_rules(int8_proto, target)
    logger.info("quantize_int8: checking the runtimes against the file's meaning")
    report.runtimes = runtimes.check(int8_data, [feed for feed, _ in sample], outputs, target,
                                     cpu_has_vnni=vnni, openvino=openvino,
                                     reference=[meaning for _, meaning in sample])
    report.seconds = time.perf_counter() - start
    targets.set_metadata(int8_proto, targets.metadata(target, package_version()))
    logger.info("quantize_int8: %s", report.summary().replace("\n", "; "))
    return (int8_proto.SerializeToString() if as_bytes else int8_proto), report


def check_options(method, min_agreement, openvino):
    """ValueError for a calibration method, guard or OpenVINO choice out of range."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {sorted(CALIBRATION_METHODS)}. "
                         f"Received: {method!r}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not (
            0 <= min_agreement <= 1):
        raise ValueError("min_agreement must be a fraction from 0 to 1. "
                         f"Received: min_agreement={min_agreement!r}")
    if openvino not in ("auto", True, False):
        raise ValueError(f"openvino must be 'auto', True or False. Received: {openvino!r}")
    if openvino is True and not runtimes.openvino_installed():
        raise ValueError('OpenVINO was asked for but is not installed: pip install openvino (or '
                         'pip install "keras-bn[openvino]")')


def check_target_rules(proto, target):
    """VerificationError naming what in the int8 graph `proto` breaks `target`'s rules."""
    problems = targets.check(proto, target)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise VerificationError(
            f"the int8 graph breaks target '{target.name}''s rules: " + "; ".join(problems[:3])
            + more + "; nothing was written")


def _quantize(proto, calibration, target, method):
    """onnxruntime's pre-processing and static QDQ quantization of `proto` for `target`."""
    with tempfile.TemporaryDirectory(prefix="keras-bn-int8-") as folder:
        float_path = os.path.join(folder, "float.onnx")
        prepared_path = os.path.join(folder, "prepared.onnx")
        int8_path = os.path.join(folder, "int8.onnx")
        onnx.save(proto, float_path)
        logger.info("quantize_int8: pre-processing the float graph (quant_pre_process)")
        # Symbolic shape inference (sympy) is for transformers' symbolic dimensions; ONNX's own
        # shape inference types every tensor of a convolutional or dense graph.
        ort_quantization.quant_pre_process(float_path, prepared_path, skip_symbolic_shape=True)
        logger.info("quantize_int8: calibrating (%s) and quantizing for target '%s'", method,
                    target.name)
        ort_quantization.quantize_static(
            prepared_path, int8_path, calibration,
            calibrate_method=CALIBRATION_METHODS[method], **target.quantize_static_options(),
        )
        return onnx.load(int8_path)


def package_version():
    """keras-bn's version, as the files it writes record it."""
    from export.__main__ import version

    return version()


def check_inputs(calibration_data, validation_data, inputs, calibration_batches):
    """Checks calibration and validation data against the graph's `inputs` (`InputSpec`s,
    NHWC) before the graph exists, so that a mistake fails in a second."""
    described = [(spec.name, spec.shape, spec.dtype) for spec in inputs]
    check_data(calibration_data, described, max_batches=calibration_batches,
               argument="calibration_data")
    if validation_data is not None:
        check_data(validation_data, described, max_batches=None, argument="validation_data")


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
        if output.agreement is not None and output.constant and min_agreement > 0:
            failures.append(f"output '{output.name}': the float graph gives every validation "
                            "example the same scores, so top-1 agreement proves nothing (an "
                            "untrained model?); validate on inputs the model tells apart")
        if not np.isfinite(output.max_error):
            failures.append(f"output '{output.name}': the int8 graph gives NaN or infinite values")
        elif output.max_error >= MAX_RELATIVE_ERROR and min_agreement > 0:
            failures.append(f"output '{output.name}': the int8 graph is off by "
                            f"{output.max_error:.0%} of the float output's largest value")
        if max_mean_error is not None and not output.mean_error <= max_mean_error:
            failures.append(f"output '{output.name}': mean error {output.mean_error:.3g} is above "
                            f"max_mean_error {max_mean_error:g}")
    if failures:
        raise VerificationError(
            "the int8 graph is not accurate enough; nothing was returned or written. "
            + "; ".join(failures) + ". Calibrate on more or more representative data, try "
            + GUARD_ADVICE + ".\n" + report.summary()
        )
