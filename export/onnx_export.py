"""Convert a frozen Keras model to ONNX with tf2onnx, check it, verify it, write it atomically.

The module is named `onnx_export` rather than `onnx` so that no path setup can ever make it shadow
the `onnx` package that tf2onnx and this module import.
"""

import collections
import contextlib
import dataclasses
import logging
import os
import tempfile
import time

from export import arguments, conversion, keras_comparison, qdq_passes, quantization, runtimes
from export import targets as targets_module
from export.freezing import freeze
from export.graph_passes import (
    EXACT_PASSES,
    global_average_pool_and_squeeze_to_reduce_mean,
    optimize,
    store_weights_as_float16,
)
from export.loading import load_model
from keras_bn import _keras_internals, verification
from keras_bn.quantization.deployment import FakeQuantization
from keras_bn.verification import VerificationError  # noqa: F401  (export.VerificationError)

logger = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = arguments.MIN_OPSET, arguments.MAX_OPSET
DEFAULT_OPSET = 17
# Sizes verification gives the input dimensions a model leaves unknown: two, to show they are
# dynamic, and multiples of 32, which networks that downsample five times by 2 and concatenate
# upsampled features again (U-Nets, feature pyramids) need.
DEFAULT_DYNAMIC_SIZES = (32, 64)
# A QAT graph computes in integers what the QAT model computes in float32: a value within float32
# rounding of a rounding boundary quantizes the other way, and in a deep network the difference
# can grow. Verification allows this fraction of each output's values to lie more than one
# quantization step from Keras (export.runtimes; measured on trained QAT BN-Inceptions: 0.02-0.27%
# of the outputs on the test digits, 2% on uniform noise; docs/qat.md).
QAT_MAX_BEYOND_ONE_STEP = runtimes.MAX_BEYOND_ONE_STEP
# A QAT model's verification adds a run of this many random inputs, so that the fraction beyond
# one step is measured on more than the few values of batches of 1 and 3.
QAT_VERIFICATION_BATCH = 64
# A QAT model's verification also runs this many batches of 32 of `validation_data`, when given.
QAT_VALIDATION_BATCHES = 4


@dataclasses.dataclass
class ExportResult:
    """What `to_onnx` wrote and measured.

    Attributes:
        path: the ONNX file written.
        opset: the ONNX opset of the graph.
        node_counts: `{op_type: count}` over the graph's nodes, most frequent first.
        max_error: largest `max|onnxruntime - keras| / max(1, max|keras|)` over outputs and batch
            sizes (`keras_bn.verification.output_error`) of the float graph, or `None` when
            `verify=False`. With `quantize="int8"` this is the float graph the int8 one was
            quantized from; `quantization` holds how the int8 graph compares with it.
        batch_sizes: the batch sizes verified.
        dynamic_sizes: the sizes verified for the input dimensions the model leaves unknown, one
            per verification run alongside `batch_sizes` (see `to_onnx`); `()` when every input
            dimension but the batch is known, or with `verify=False`.
        input_names, output_names: the graph's input and output names, in the model's order.
        input_shapes: each graph input's shape, an int per known dimension and a name per
            dynamic one ("batch", and `"<input>_dim<axis>"` for the others).
        channels_first: whether rank-4 inputs are NCHW.
        float16_weights: whether weights are stored as float16.
        folded, frozen, removed: from `export.freeze` (see `FreezeReport`).
        file_size: bytes written.
        seconds: wall time of the whole export.
        graph_passes: one line per ONNX graph pass that changed the graph (`export.graph_passes`),
            e.g. "fold_pad_into_max_pool: Pad -1".
        quantization: the `export.QuantizationReport` of the int8 graph written with
            `quantize="int8"`, else `None`. `node_counts`, `file_size` are then the int8 graph's.
        qat_layers: the QAT layers (`keras_bn.prepare_qat`) written as int8 QDQ: their inputs
            quantized over the learned ranges, their folded kernels stored as int8 on their
            learned grids (`export.qdq_passes`).
        max_error_steps: with QAT layers, the largest `|onnxruntime - keras|` over outputs and
            batch sizes, in quantization steps of each output (its range over the verification
            batch / 255). `None` otherwise.
        beyond_one_step: with QAT layers, the largest fraction of an output's values more than
            one quantization step from Keras. Judged (at most `QAT_MAX_BEYOND_ONE_STEP`) only
            where `layer_check` is `None`; else reported, since a deep network carries rounding
            differences forward. `None` otherwise.
        layer_check: with QAT layers matched in the graph, `(layers, worst layer, its fraction
            beyond one step)`: each QAT layer's quantized input compared with Keras's, every
            quantizer before it fed Keras's values (`keras_comparison.verify_by_layers`); at
            most `QAT_MAX_BEYOND_ONE_STEP` each. `None` otherwise.
        target: the int8 file's deployment target (`export.targets`), also in its metadata;
            `None` for a float file.
        runtimes: one `export.runtimes.RuntimeCheck` per runtime: for an int8 file, how each
            runtime's fused kernels on this CPU compare with the file's meaning (for PTQ also in
            `quantization.runtimes`); for a float file, OpenVINO's check against Keras.
        outputs_constant: Keras's outputs did not vary over the random verification inputs by
            more than the tolerance (an untrained network, a saturated softmax, random inputs
            far outside a QAT model's learned input range): the comparison could not have
            failed, and the summary says the file is not verified.
    """

    path: str
    opset: int
    node_counts: dict
    max_error: float
    batch_sizes: tuple
    input_names: list
    output_names: list
    channels_first: bool
    float16_weights: bool
    folded: list
    frozen: list
    removed: list
    file_size: int
    seconds: float
    graph_passes: list = dataclasses.field(default_factory=list)
    dynamic_sizes: tuple = ()
    input_shapes: list = dataclasses.field(default_factory=list)
    quantization: object = None
    qat_layers: list = dataclasses.field(default_factory=list)
    max_error_steps: float = None
    beyond_one_step: float = None
    target: str = None
    runtimes: list = dataclasses.field(default_factory=list)
    outputs_constant: bool = False
    layer_check: tuple = None
    validation_batches: int = 0

    @property
    def num_nodes(self):
        return sum(self.node_counts.values())

    def summary(self):
        """A few lines for people: what was folded or frozen, the graph, the error, the file,
        and with int8 the quantization report (`QuantizationReport.summary`)."""
        nodes = ", ".join(f"{op} {n}" for op, n in self.node_counts.items())
        error = "not verified"
        if self.max_error is not None:
            error = f"{self.max_error:.2e} (batch sizes {', '.join(map(str, self.batch_sizes))}"
            if self.dynamic_sizes:
                error += (f"; unknown dimensions at sizes "
                          f"{', '.join(map(str, self.dynamic_sizes))}")
            error += ")"
            if self.outputs_constant:
                error += ("; NOT verified: Keras's outputs are the same for every random input "
                          "(an untrained model? inputs outside a QAT model's range?), so no "
                          "difference could show")
        kind = "" if self.target is None else f"int8 for target '{self.target}', "
        of_float = "" if self.quantization is None else " (the float graph before quantization)"
        # Each QAT layer is a conv, depthwise or dense layer with the BN it fused in training.
        fused = (f"{len(self.qat_layers)} fused into QAT layers' int8 kernels, "
                 if self.qat_layers else "")
        lines = [
            f"wrote {self.path} ({kind}{self.file_size / 2**20:.2f} MiB, opset {self.opset}, "
            f"{self.seconds:.1f} s)",
            f"BatchNormalization: {fused}{len(self.folded)} folded, {len(self.frozen)} frozen to "
            f"constants (Mul+Add); {len(self.removed)} training-only layers removed",
            f"nodes: {self.num_nodes} ({nodes})",
            f"max error vs Keras{of_float}: {error}",
        ]
        if self.qat_layers:
            steps = ("not verified" if self.max_error_steps is None
                     else f"{self.max_error_steps:.2f} quantization steps of each output, "
                          f"{self.beyond_one_step:.2%} of values beyond one step")
            if self.layer_check is not None:
                count, worst, fraction = self.layer_check
                data = (f", on random inputs and {self.validation_batches} batches of "
                        "validation_data" if self.validation_batches else "")
                steps = (f"layer by layer (each quantizer fed Keras's values{data}), {count} "
                         f"quantized "
                         f"input{'s' if count != 1 else ''} within one step but {fraction:.2%} "
                         f"of codes (worst: {worst}); "
                         f"at the outputs, carried through the network: {steps}")
            count = len(self.qat_layers)
            lines.append(f"QAT: {count} {'layer' if count == 1 else 'layers'} as int8 QDQ from "
                         f"their learned ranges and grids; max error vs Keras: {steps}")
            right_on = targets_module.get(self.target).right_on
            lines.append(f"target '{self.target}': right on {right_on}")
            lines.append("runtimes vs the file's meaning: "
                         + "; ".join(check.summary() for check in self.runtimes))
        elif self.target is None and self.runtimes:
            lines.append("; ".join(check.summary() for check in self.runtimes))
        if self.quantization is not None:
            lines.append(self.quantization.summary())
        return "\n".join(lines)


def to_onnx(model, path, *, opset=DEFAULT_OPSET, input_names=None, output_names=None,
            channels_first=False, float16_weights=False, fold=True, verify=True,
            batch_sizes=(1, 3), dynamic_sizes=DEFAULT_DYNAMIC_SIZES, tolerance=None, seed=0,
            quantize=None, calibration_data=None, validation_data=None,
            target=None, calibration_method="minmax",
            calibration_batches=quantization.DEFAULT_MAX_BATCHES,
            min_agreement=quantization.DEFAULT_MIN_AGREEMENT, openvino="auto", verbose="auto"):
    """Freeze `model`, convert it to ONNX with tf2onnx, check it, verify it, and write `path`.

    The graph takes a dynamic batch dimension, and every other input dimension the model leaves
    unknown (`keras.Input((None, None, 3))`, a fully convolutional network) is dynamic too. With
    `verify=True` the file is written only after onnxruntime has reproduced Keras's
    `model(x, training=False)` on random inputs at every batch size in `batch_sizes` (and, for
    unknown dimensions, at every size in `dynamic_sizes`): `max|onnxruntime - keras| <=
    tolerance * max(1, max|keras|)` for every output, and finite wherever Keras's output is
    (`keras_bn.verification`, the check folding uses too). The write is atomic: a temporary file
    in the same folder, renamed onto `path` once complete, so `path` never holds a partial file
    and an existing file is left alone when anything fails.

    With `quantize="int8"` the verified float graph is quantized by
    `export.quantize_int8` (onnxruntime's static quantization, QDQ format, int8 weights per
    output channel) for a deployment `target`, calibrated on `calibration_data` and compared with
    the float graph on `validation_data`, and only the int8 graph is written, once its top-1
    agreement with the float graph passes `min_agreement`, it keeps the target's rules, and the
    runtimes at hand compute its meaning (`export.runtimes`). BN is folded first, which is what
    lets onnxruntime quantize the convolutions and matrix products at all. A QAT model
    (`keras_bn.prepare_qat`) is written as int8 from its learned ranges and grids without
    `quantize`, for the target it trained on.

    Args:
        model: a `keras.Model` (Functional or Sequential), or the path of a `.keras` file, which
            may have been saved under any backend: it is loaded here under TensorFlow.
        path: where to write the `.onnx` file; a path not ending in `.onnx` is refused.
        opset: ONNX opset, 13 to 18.
        input_names: names of the graph inputs, one per model input; defaults to the names of the
            model's `keras.Input`s.
        output_names: names of the graph outputs, one per model output; defaults to
            `model.output_names`.
        channels_first: make every rank-4 input NCHW (for consumers that feed channels-first
            images); the model itself stays channels-last and the transposes cancel inside the
            graph.
        float16_weights: store floating-point weights as float16 (half the file), each followed by a
            `Cast` to float32 that onnxruntime folds away at load; arithmetic stays float32.
        fold: fold BN into the preceding layer before freezing (see `export.freeze`).
        verify: check with onnxruntime against Keras (recommended; `False` skips it).
        batch_sizes: the batch sizes verified; at least two different sizes prove the batch
            dimension is dynamic.
        dynamic_sizes: the sizes verification gives the input dimensions the model leaves
            unknown (other than the batch): at least two different sizes, which prove those
            dimensions dynamic. Verification run `i` uses batch size
            `batch_sizes[i % len(batch_sizes)]` with every unknown dimension of size
            `dynamic_sizes[i % len(dynamic_sizes)]`, for as many runs as the longer of the two
            holds: by default batch 1 at 32 and batch 3 at 64 (`(1, 32, 32, 3)` and
            `(3, 64, 64, 3)` for `keras.Input((None, None, 3))`). Unused when every dimension
            is known.
        tolerance: largest accepted relative error, of the fold and of the ONNX graph; defaults
            to the tolerance of the least precise compute dtype among the model's layers
            (`keras_bn.verification.default_tolerance`: 1e-3 for float32, 1e-2 for float16,
            5e-2 for bfloat16), float16 at least with `float16_weights`.
        seed: seed of the random verification inputs.
        quantize: `None` (default) writes the float32 graph; `"int8"` writes the int8 QDQ graph
            instead (above). Not with `float16_weights`.
        target: the deployment target of an int8 file (`export.targets`): `"cpu"` (the default
            for `quantize="int8"`; right on every x86-64 CPU with or without VNNI, ARM and
            OpenVINO), `"cpu-vnni"` (full 8-bit weights; wrong in onnxruntime on x86 CPUs
            without VNNI) or `"tensorrt"` (symmetric int8, zero points 0). For a QAT model, the
            target it trained on (`prepare_qat(target=...)`), which is also the default. The
            file records it in its `metadata_props`. Not for a float export.
        calibration_data: with `quantize="int8"`, required: inputs like those the deployed model
            will see, in any form `keras_bn.estimate_population_statistics` takes (an array,
            `(x, y)`, a dict keyed by graph input name, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, an iterable of batches), channels-last even with
            `channels_first=True`. Arrays, and lists of batches, are checked against the
            model's inputs (shape, dtype, finite, not empty) before anything else is done.
        validation_data: data the int8 graph is compared with the float graph on, in the same
            forms; labels `y` in `(x, y)` add both graphs' top-1 accuracies. `None` compares on
            `calibration_data`, an optimistic figure. For a QAT model (no `quantize`): inputs
            its export is also verified on (the first `QAT_VALIDATION_BATCHES` batches of 32),
            besides the random ones, which may lie far outside the learned input ranges.
        calibration_method: "minmax" (default), "entropy" or "percentile" (see
            `export.quantize_int8`).
        calibration_batches: the most calibration batches read (array data is split into
            batches of 32); `None` reads all of it.
        min_agreement: the int8 guard: the fraction of validation examples on which every
            class-score output's top-1 class must match the float graph's (0.99; 0 turns it
            off, and also the refusal of a float graph whose class scores are constant).
        openvino: "auto" (default) also runs the file in OpenVINO's CPU plugin when `openvino`
            is installed (a float file against Keras, an int8 file against its meaning); `True`
            requires it; `False` skips it.
        verbose: "auto" or 1 shows a progress bar while calibrating and comparing; 0 is silent.

    Returns:
        An `ExportResult`.

    Raises:
        FileNotFoundError: `model` is a path that does not exist.
        ValueError: an argument is out of range, the file is not a Keras model, the model
            cannot be exported (an input whose batch dimension is fixed, operations tf2onnx
            cannot convert), a BN layer holds non-finite numbers or a negative variance (named
            in the message), or calibration or validation data is missing, empty, not finite,
            or of a shape or dtype the model does not take.
        TypeError: `model` is neither a `keras.Model` nor a path, or is a subclassed model
            (`keras_bn.verification.check_graph_model`).
        OSError: `path` cannot be written.
        VerificationError: folding, onnxruntime or OpenVINO disagrees with Keras, or the int8
            graph fails its guard, breaks its target's rules or computes something else in a
            runtime than it means; no file is written (`keras_bn.VerificationError`, a
            `ValueError`).
        RuntimeError: the Keras backend is not TensorFlow.

    Example:

    >>> export.to_onnx(model, "model.onnx")
    >>> result = export.to_onnx(model, "model.int8.onnx", quantize="int8",
    ...                         calibration_data=x_train[:512],
    ...                         validation_data=(x_test, y_test))
    >>> print(result.summary())
    """
    start = time.perf_counter()
    arguments.require_tensorflow_backend()
    opset = arguments.check_opset(opset)
    batch_sizes = arguments.check_sizes(batch_sizes, "batch_sizes", "batch dimension is")
    dynamic_sizes = arguments.check_sizes(dynamic_sizes, "dynamic_sizes",
                                          "unknown dimensions are")
    arguments.check_quantization_options(quantize, calibration_data, validation_data,
                                         float16_weights, calibration_method,
                                         calibration_batches, min_agreement, target, openvino)
    arguments.check_tolerance(tolerance)
    path = arguments.check_output_path(path)
    model = _model(model, path)
    qat_layers = arguments.qat_layers(model)
    int8_target = _int8_target(qat_layers, quantize, target, float16_weights)
    if tolerance is None:
        tolerance = verification.default_tolerance(model, half_precision=float16_weights)
    inputs, output_names, nchw = conversion.graph_interface(model, input_names, output_names,
                                                            channels_first)
    if quantize is None:
        arguments.check_float_data(validation_data, qat_layers)
    if quantize is not None:  # a mistake in the data fails here, before minutes of conversion
        quantization.check_inputs(calibration_data, validation_data, inputs, calibration_batches)
    elif validation_data is not None:
        quantization.check_data(validation_data, [(s.name, s.shape, s.dtype) for s in inputs],
                                max_batches=QAT_VALIDATION_BATCHES, argument="validation_data")
    with _documented_errors():
        logger.info("to_onnx: freezing '%s'", model.name)
        frozen = freeze(model, fold=fold, verify=verify, tolerance=tolerance)
        logger.info("to_onnx: converting with tf2onnx (opset %d)", opset)
        proto = conversion.convert(frozen, inputs, output_names, opset, nchw)
        graph_passes = optimize(proto, _passes(quantize, qat_layers and int8_target, frozen))
        if float16_weights:
            store_weights_as_float16(proto)
        conversion.check_graph(proto)
        runs = keras_comparison.verification_runs(inputs, batch_sizes, dynamic_sizes)
        if qat_layers:
            runs.append((QAT_VERIFICATION_BATCH, runs[0][1]))
        verified = _verify(model, proto, inputs, output_names, nchw, runs, verify, seed,
                           tolerance, openvino, int8_target if qat_layers else None,
                           validation_data if quantize is None else None)
        report = None
        if quantize == "int8":
            logger.info("to_onnx: quantizing to int8 for target '%s' (%s calibration)",
                        int8_target.name, calibration_method)
            proto, report = quantization.quantize_int8(
                proto, calibration_data, target=int8_target, method=calibration_method,
                max_batches=calibration_batches, validation_data=validation_data,
                min_agreement=min_agreement, openvino=openvino, channels_first_inputs=nchw,
                verbose=verbose,
            )
            proto.producer_name = "keras-bn export (tf2onnx, onnxruntime.quantization)"
            conversion.check_graph(proto)
            keras_comparison.check_runs(proto.SerializeToString(), verified.runs, output_names)
            verified.runtimes = report.runtimes
        elif qat_layers:
            targets_module.set_metadata(proto, targets_module.metadata(
                int8_target, quantization.package_version()))
        data = proto.SerializeToString()
    _write_atomically(data, path)
    freeze_report = frozen.freeze_report
    result = ExportResult(
        path=path, opset=opset,
        node_counts=dict(collections.Counter(n.op_type for n in proto.graph.node).most_common()),
        max_error=verified.max_error,
        batch_sizes=batch_sizes if verify else (),
        input_names=[spec.name for spec in inputs], output_names=list(output_names),
        channels_first=bool(channels_first), float16_weights=bool(float16_weights),
        folded=freeze_report.folded, frozen=freeze_report.frozen,
        removed=freeze_report.removed, file_size=len(data),
        seconds=time.perf_counter() - start, graph_passes=graph_passes,
        dynamic_sizes=dynamic_sizes if verify and runs[0][1] is not None else (),
        input_shapes=[tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                            for d in value.type.tensor_type.shape.dim)
                      for value in proto.graph.input],
        quantization=report,
        qat_layers=list(freeze_report.quantized),
        max_error_steps=verified.steps, beyond_one_step=verified.beyond,
        target=None if int8_target is None else int8_target.name,
        runtimes=verified.runtimes, outputs_constant=verified.outputs_constant,
        layer_check=verified.by_layers,
        validation_batches=sum(run.where.startswith("validation_data") for run in verified.runs),
    )
    logger.info("to_onnx: %s", result.summary().replace("\n", "; "))
    return result


def _model(model, path):
    """`model`, loaded when it is a path (not the output path, which must end in .onnx), checked
    for a graph."""
    is_path = isinstance(model, (str, os.PathLike))
    if is_path and os.path.abspath(os.fspath(model)) == path:
        raise ValueError(f"the output path is the model file itself: {path}")
    if not path.endswith(".onnx"):  # a file named otherwise would not be taken for an ONNX graph
        raise ValueError(f"path must end in .onnx. Received: {path}")
    if is_path:
        logger.info("to_onnx: loading %s", os.fspath(model))
        model = load_model(model)
    verification.check_graph_model(model, "to_onnx()")
    return model


@dataclasses.dataclass
class _Verified:
    """What `_verify` measured: the float graph's (or a QAT graph's) error against Keras, the
    runs it was measured on, and the runtime checks."""

    max_error: float = None
    steps: float = None
    beyond: float = None
    runs: list = dataclasses.field(default_factory=list)
    runtimes: list = dataclasses.field(default_factory=list)
    outputs_constant: bool = False
    by_layers: tuple = None  # keras_comparison.verify_by_layers's


def _verify(model, proto, inputs, output_names, nchw, runs, verify, seed, tolerance, openvino,
            qat_target, validation_data=None):
    """The converted graph against Keras: a float graph to `tolerance` in onnxruntime (and
    OpenVINO); a QAT graph (`qat_target` given) in quantization steps by its meaning, on the
    random runs and the first `QAT_VALIDATION_BATCHES` batches of `validation_data`, then its
    target's rules and runtimes."""
    data = proto.SerializeToString()
    if not verify:
        if qat_target is not None:
            quantization.check_target_rules(proto, qat_target)
        return _Verified()
    logger.info("to_onnx: verifying at %s", keras_comparison.describe_runs(runs))
    keras_runs = keras_comparison.keras_runs(model, inputs, output_names, nchw, runs, seed)
    if qat_target is None:
        use_openvino = openvino is True or (openvino == "auto" and runtimes.openvino_installed())
        max_error = keras_comparison.verify_float(data, keras_runs, output_names, tolerance,
                                                  use_openvino)
        checks = [runtimes.RuntimeCheck("openvino", True, f"float, within {tolerance:g} of "
                                        "Keras like onnxruntime")] if use_openvino else []
        return _Verified(max_error, runs=keras_runs, runtimes=checks,
                         outputs_constant=keras_comparison.constant_outputs(keras_runs, tolerance))
    if validation_data is not None:
        keras_runs += keras_comparison.data_runs(model, proto, validation_data, output_names,
                                                 nchw, QAT_VALIDATION_BATCHES)
    by_layers = keras_comparison.verify_by_layers(model, data, keras_runs, output_names, nchw)
    max_error, steps, beyond, meanings = keras_comparison.verify_in_steps(
        data, keras_runs, output_names, judge=by_layers is None)
    quantization.check_target_rules(proto, qat_target)
    checks = runtimes.check(data, [run.feed for run in keras_runs], output_names, qat_target,
                            cpu_has_vnni=quantization.cpu_has_vnni(), openvino=openvino,
                            reference=meanings)
    return _Verified(max_error, steps, beyond, keras_runs, checks,
                     keras_comparison.constant_outputs(keras_runs, tolerance), by_layers)


@contextlib.contextmanager
def _documented_errors():
    """Lets the errors `to_onnx` documents through, and turns any other exception of a library
    (Keras, TensorFlow, tf2onnx, onnx, onnxruntime, OpenVINO) into a `ValueError` that names it:
    a caller handles one set of errors."""
    try:
        yield
    except (ValueError, TypeError, OSError, RuntimeError, KeyboardInterrupt):
        raise
    except Exception as error:
        raise ValueError(f"export failed: {type(error).__name__} in "
                         f"{type(error).__module__}: {conversion.one_line(error)}") from error


def _int8_target(qat_layers, quantize, target, float16_weights):
    """The `export.targets.Target` of the int8 file, or `None` for a float one."""
    if qat_layers:
        if quantize is not None:
            raise ValueError(
                "this model was trained for quantization (keras_bn.prepare_qat): its int8 graph "
                "comes from its learned ranges, with no calibration; call to_onnx without "
                f"quantize. Received: quantize={quantize!r}"
            )
        if float16_weights:
            raise ValueError("float16_weights does not apply to a QAT model, whose weights are "
                             "written as int8. Received: float16_weights=True")
        return arguments.qat_target(qat_layers, target)
    if quantize is None:
        if target is not None:
            raise ValueError("target applies to int8 files (quantize='int8' or a QAT model); a "
                             f"float32 file runs alike everywhere. Received: target={target!r}")
        return None
    return targets_module.get(target or targets_module.DEFAULT_TARGET)


def _passes(quantize, qat_target, frozen):
    # onnxruntime quantizes a GlobalAveragePool (QLinearGlobalAveragePool) but leaves the
    # ReduceMean that the float graph is faster with in float: an int8 graph keeps the pool.
    passes = EXACT_PASSES if quantize is None else tuple(
        p for p in EXACT_PASSES if p is not global_average_pool_and_squeeze_to_reduce_mean)
    if qat_target:
        ranges = {layer.name: (layer.minimum, layer.maximum, layer.num_bits)
                  for layer in _keras_internals.flatten_layers(frozen)
                  if isinstance(layer, FakeQuantization)}
        passes = (*passes, qdq_passes.zero_points_as_tensorflow(ranges),
                  qdq_passes.weights_to_int8)
        if qat_target.symmetric_activations:
            passes = (*passes, qdq_passes.activations_to_int8)
    return passes


def _write_atomically(data, path):
    folder, name = os.path.split(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would surprise a deployer
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
