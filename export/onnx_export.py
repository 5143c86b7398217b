"""Convert a frozen Keras model to ONNX with tf2onnx, check it, verify it, write it atomically.

The module is named `onnx_export` rather than `onnx` so that no path setup can ever make it shadow
the `onnx` package that tf2onnx and this module import.
"""

import collections
import dataclasses
import logging
import os
import re
import tempfile
import time

import keras
import numpy as np

from export import qdq_passes, quantization
from export.freezing import freeze
from export.graph_passes import (
    EXACT_PASSES,
    global_average_pool_and_squeeze_to_reduce_mean,
    optimize,
    store_weights_as_float16,
)
from keras_bn import _keras_internals, verification
from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization
from keras_bn.verification import VerificationError

logger = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 writes opsets up to 18
DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1  # a single ONNX file cannot exceed protobuf's 2 GiB
# Sizes verification gives the input dimensions a model leaves unknown: two, to show they are
# dynamic, and multiples of 32, which networks that downsample five times by 2 and concatenate
# upsampled features again (U-Nets, feature pyramids) need.
DEFAULT_DYNAMIC_SIZES = (32, 64)
QUANTIZE_OPTIONS = (None, "int8")
# A QAT graph computes in integers what the QAT model computes in float32: a value within float32
# rounding of a rounding boundary quantizes the other way, and in a deep network the difference
# can grow. Verification allows this fraction of each output's values to lie more than one
# quantization step from Keras (measured on trained QAT BN-Inceptions: 0.02-0.27% of the outputs
# on the test digits, 2% on uniform noise; docs/qat.md).
QAT_MAX_BEYOND_ONE_STEP = 0.05
# A QAT model's verification adds a run of this many random inputs, so that the fraction beyond
# one step is measured on more than the few values of batches of 1 and 3.
QAT_VERIFICATION_BATCH = 64


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
            one quantization step from Keras; verification requires at most
            `QAT_MAX_BEYOND_ONE_STEP`. `None` otherwise.
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
        kind = "" if self.quantization is None else "int8, "
        of_float = "" if self.quantization is None else " (the float graph before quantization)"
        lines = [
            f"wrote {self.path} ({kind}{self.file_size / 2**20:.2f} MiB, opset {self.opset}, "
            f"{self.seconds:.1f} s)",
            f"BatchNormalization: {len(self.folded)} folded, {len(self.frozen)} frozen to "
            f"constants (Mul+Add); {len(self.removed)} training-only layers removed",
            f"nodes: {self.num_nodes} ({nodes})",
            f"max error vs Keras{of_float}: {error}",
        ]
        if self.qat_layers:
            steps = ("not verified" if self.max_error_steps is None
                     else f"{self.max_error_steps:.2f} quantization steps of each output, "
                          f"{self.beyond_one_step:.2%} of values beyond one step")
            lines.append(f"QAT: {len(self.qat_layers)} layers as int8 QDQ from their learned "
                         f"ranges and grids; max error vs Keras: {steps}")
        if self.quantization is not None:
            lines.append(self.quantization.summary())
        return "\n".join(lines)


def to_onnx(model, path, *, opset=DEFAULT_OPSET, input_names=None, output_names=None,
            channels_first=False, float16_weights=False, fold=True, verify=True,
            batch_sizes=(1, 3), dynamic_sizes=DEFAULT_DYNAMIC_SIZES, tolerance=None, seed=0,
            quantize=None, calibration_data=None, validation_data=None,
            calibration_method="minmax", calibration_batches=quantization.DEFAULT_MAX_BATCHES,
            min_agreement=quantization.DEFAULT_MIN_AGREEMENT, verbose="auto"):
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
    output channel), calibrated on `calibration_data` and compared with the float graph on
    `validation_data`, and only the int8 graph is written, once its top-1 agreement with the
    float graph passes `min_agreement`. BN is folded first, which is what lets onnxruntime
    quantize the convolutions and matrix products at all.

    Args:
        model: a `keras.Model` (Functional or Sequential), or the path of a `.keras` file, which
            may have been saved under any backend: it is loaded here under TensorFlow.
        path: where to write the `.onnx` file.
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
        calibration_data: with `quantize="int8"`, required: inputs like those the deployed model
            will see, in any form `keras_bn.estimate_population_statistics` takes (an array,
            `(x, y)`, a dict keyed by graph input name, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, an iterable of batches), channels-last even with
            `channels_first=True`. Arrays, and lists of batches, are checked against the
            model's inputs (shape, dtype, finite, not empty) before anything else is done.
        validation_data: data the int8 graph is compared with the float graph on, in the same
            forms; labels `y` in `(x, y)` add both graphs' top-1 accuracies. `None` compares on
            `calibration_data`, an optimistic figure.
        calibration_method: "minmax" (default), "entropy" or "percentile" (see
            `export.quantize_int8`).
        calibration_batches: the most calibration batches read (array data is split into
            batches of 32); `None` reads all of it.
        min_agreement: the int8 guard: the fraction of validation examples on which every
            class-score output's top-1 class must match the float graph's (0.99; 0 turns it
            off).
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
        VerificationError: folding or onnxruntime disagrees with Keras, or the int8 graph
            fails its guard; no file is written (`keras_bn.VerificationError`, a `ValueError`).
        RuntimeError: the Keras backend is not TensorFlow.

    Example:

    >>> export.to_onnx(model, "model.onnx")
    >>> result = export.to_onnx(model, "model.int8.onnx", quantize="int8",
    ...                         calibration_data=x_train[:512],
    ...                         validation_data=(x_test, y_test))
    >>> print(result.summary())
    """
    start = time.perf_counter()
    _require_tensorflow_backend()
    opset = _check_opset(opset)
    batch_sizes = _check_sizes(batch_sizes, "batch_sizes", "batch dimension is")
    dynamic_sizes = _check_sizes(dynamic_sizes, "dynamic_sizes", "unknown dimensions are")
    _check_quantization_options(quantize, calibration_data, validation_data, float16_weights,
                                calibration_method, calibration_batches, min_agreement)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(
            tolerance, (int, float)) or not tolerance > 0):
        raise ValueError(f"tolerance must be a positive number. Received: tolerance={tolerance!r}")
    path = _check_output_path(path)
    if isinstance(model, (str, os.PathLike)):
        if os.path.abspath(os.fspath(model)) == path:
            raise ValueError(f"the output path is the model file itself: {path}")
        logger.info("to_onnx: loading %s", os.fspath(model))
        model = load_model(model)
    verification.check_graph_model(model, "to_onnx()")
    qat = _holds_qat_layers(model)
    if qat and quantize is not None:
        raise ValueError(
            "this model was trained for quantization (keras_bn.prepare_qat): its int8 graph "
            "comes from its learned ranges, with no calibration; call to_onnx without quantize. "
            f"Received: quantize={quantize!r}"
        )
    if qat and float16_weights:
        raise ValueError("float16_weights does not apply to a QAT model, whose weights are "
                         "written as int8. Received: float16_weights=True")
    if tolerance is None:
        tolerance = verification.default_tolerance(model, half_precision=float16_weights)
    inputs = _input_specs(model, input_names)
    output_names = _output_names(model, output_names)
    clashes = sorted({spec.name for spec in inputs} & set(output_names))
    if clashes:
        raise ValueError(f"input and output names must differ. Received both: {clashes}")
    nchw = [spec.name for spec in inputs if channels_first and len(spec.shape) == 4]
    if channels_first and not nchw:
        raise ValueError(
            "channels_first=True transposes rank-4 (image) inputs to NCHW, but this model has "
            f"none. Received input shapes: {[tuple(spec.shape) for spec in inputs]}"
        )
    _check_size(model)
    if quantize is not None:  # a mistake in the data fails here, before minutes of conversion
        described = [(spec.name, spec.shape, spec.dtype) for spec in inputs]
        quantization.check_data(calibration_data, described, max_batches=calibration_batches,
                                argument="calibration_data")
        if validation_data is not None:
            quantization.check_data(validation_data, described, max_batches=None,
                                    argument="validation_data")

    logger.info("to_onnx: freezing '%s'", model.name)
    frozen = freeze(model, fold=fold, verify=verify, tolerance=tolerance)
    logger.info("to_onnx: converting with tf2onnx (opset %d)", opset)
    proto = _convert(frozen, inputs, output_names, opset, nchw)
    # onnxruntime quantizes a GlobalAveragePool (QLinearGlobalAveragePool) but leaves the
    # ReduceMean that the float graph is faster with in float: an int8 graph keeps the pool.
    passes = EXACT_PASSES if quantize is None else tuple(
        p for p in EXACT_PASSES if p is not global_average_pool_and_squeeze_to_reduce_mean)
    if qat:
        passes = (*passes, qdq_passes.weights_to_int8)
    graph_passes = optimize(proto, passes)
    if float16_weights:
        store_weights_as_float16(proto)
    _check_graph(proto)
    data = proto.SerializeToString()

    runs = _verification_runs(inputs, batch_sizes, dynamic_sizes)
    if qat:
        runs.append((QAT_VERIFICATION_BATCH, runs[0][1]))
    max_error, steps, cases = None, (None, None), []
    if verify:
        logger.info("to_onnx: verifying with onnxruntime at %s", _describe_runs(runs))
        max_error, steps, cases = _verify(model, data, inputs, output_names, nchw, runs,
                                          tolerance, seed, in_steps=qat)
    report = None
    if quantize == "int8":
        logger.info("to_onnx: quantizing to int8 (%s calibration)", calibration_method)
        int8, report = quantization.quantize_int8(
            proto, calibration_data, method=calibration_method, max_batches=calibration_batches,
            validation_data=validation_data, min_agreement=min_agreement,
            channels_first_inputs=nchw, verbose=verbose,
        )
        int8.producer_name = "keras-bn export (tf2onnx, onnxruntime.quantization)"
        _check_graph(int8)
        if cases:
            _check_runs(int8, cases, output_names)
        proto, data = int8, int8.SerializeToString()
    _write_atomically(data, path)
    freeze_report = frozen.freeze_report
    result = ExportResult(
        path=path, opset=opset,
        node_counts=dict(collections.Counter(n.op_type for n in proto.graph.node).most_common()),
        max_error=max_error,
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
        max_error_steps=steps[0], beyond_one_step=steps[1],
    )
    logger.info("to_onnx: %s", result.summary().replace("\n", "; "))
    return result


def load_model(path):
    """Load a `.keras` file under the current (TensorFlow) backend, whichever backend saved it."""
    import keras_bn  # noqa: F401  registers keras_bn.BatchNormalization

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    if os.path.isdir(path) or not path.endswith(".keras"):
        raise ValueError(
            f"expected a Keras 3 model file ending in .keras. Received: {path} (SavedModel "
            "folders and legacy .h5 files are not supported: load them and call "
            "model.save('model.keras') first)"
        )
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # a corrupt or foreign file fails in many ways inside Keras
        # Keras's headline for an unregistered custom class ("<class Functional> could not be
        # deserialized properly") names the model, not the class; the cause is further down.
        text = " ".join(str(error).split())
        unknown = re.search(r"Could not locate class '([^']+)'", text)
        if unknown is None and "could not be deserialized" not in text:
            raise ValueError(
                f"could not load {path} as a Keras model: {_one_line(error)}") from error
        if unknown:
            cause = f"it uses the class '{unknown.group(1)}', which Keras does not know"
        else:
            inner = text.split("Exception encountered:")[-1]
            cause = f"Keras could not rebuild a layer from its config: {_one_line(inner)}"
        raise ValueError(
            f"could not load {path}: {cause}. Custom layers must be importable and registered "
            "(@keras.saving.register_keras_serializable) before loading: `import keras_bn` "
            "registers keras-bn's, and a model's other custom layers need their own modules "
            "imported first"
        ) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a keras.Model")
    return model


def _holds_qat_layers(model):
    return any(isinstance(layer, FoldedBatchNormalization)
               for layer in _keras_internals.flatten_layers(model))


def _require_tensorflow_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            "to_onnx converts through tf2onnx and needs KERAS_BACKEND=tensorflow. Received backend "
            f"'{backend}'. Save the model with model.save('model.keras') and run "
            "`keras-bn-export model.keras -o model.onnx`, which loads it under TensorFlow."
        )


def _check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not (
            MIN_OPSET <= opset <= MAX_OPSET):
        raise ValueError(
            f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}. Received: opset={opset!r}"
        )
    return int(opset)


def _check_sizes(sizes, argument, what):
    try:
        checked = tuple(int(size) for size in sizes)
    except (TypeError, ValueError):
        checked = ()
    if len(set(checked)) < 2 or min(checked) < 1:
        raise ValueError(
            f"{argument} must hold at least two different positive sizes, which show the {what} "
            f"dynamic. Received: {argument}={sizes!r}"
        )
    return checked


def _check_quantization_options(quantize, calibration_data, validation_data, float16_weights,
                                method, batches, min_agreement):
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError("quantize must be None (float32) or 'int8'. "
                         f"Received: quantize={quantize!r}")
    if quantize is None:
        given = [name for name, value in (("calibration_data", calibration_data),
                                          ("validation_data", validation_data))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} used "
                             "only with quantize='int8'; the float32 export needs no data. "
                             "Received: quantize=None")
        return
    if calibration_data is None:
        raise ValueError(
            "quantize='int8' needs calibration_data: a few hundred inputs like those the "
            "deployed model will see (an array, (x, y), a dict, a tf.data.Dataset, ...), on which "
            "onnxruntime calibrates the int8 ranges. Received: calibration_data=None"
        )
    if float16_weights:
        raise ValueError("float16_weights stores float32 weights as float16; an int8 graph's "
                         "weights are int8 already. Received: quantize='int8' with "
                         "float16_weights=True")
    if method not in quantization.CALIBRATION_METHODS:
        raise ValueError(f"calibration_method must be one of "
                         f"{sorted(quantization.CALIBRATION_METHODS)}. "
                         f"Received: calibration_method={method!r}")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                or batches < 1):
        raise ValueError("calibration_batches must be a positive integer or None. "
                         f"Received: calibration_batches={batches!r}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not (
            0 <= min_agreement <= 1):
        raise ValueError("min_agreement must be a fraction from 0 to 1. "
                         f"Received: min_agreement={min_agreement!r}")


def _check_output_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike. Received: {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise OSError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(f"cannot write {path}: no permission to write in {folder}")
    return path


@dataclasses.dataclass
class _InputSpec:
    name: str
    shape: tuple  # with None for the batch dimension and every other unknown one
    dtype: str


def _input_specs(model, names):
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
        specs.append(_InputSpec(name, shape, dtype))
    return specs


def _output_names(model, names):
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


def _check_size(model):
    size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    if size > PROTOBUF_LIMIT:
        raise ValueError(
            f"the model's weights take {size / 2**30:.1f} GiB; a single ONNX file holds at most "
            "2 GiB (external-data ONNX files are not supported)"
        )


def _convert(frozen, inputs, output_names, opset, nchw):
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
            proto, _ = tf2onnx.convert.from_graph_def(
                function.graph.as_graph_def(add_shapes=True), name=frozen.name,
                input_names=tf_inputs, output_names=tf_outputs, opset=opset,
                inputs_as_nchw=transposed, tensors_to_rename=renames,
            )
        finally:
            tf_logger.setLevel(level)
    except Exception as error:  # TensorFlow and tf2onnx raise whatever their handlers raise
        raise ValueError(f"tf2onnx could not convert the model: {_one_line(error)}") from error

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


def _check_graph(proto):
    import onnx

    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise ValueError("the ONNX graph exceeds protobuf's 2 GiB limit for a single file")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ValueError(
            f"onnx.checker rejected the converted graph: {_one_line(error)}"
        ) from error


def _verification_runs(inputs, batch_sizes, dynamic_sizes):
    """`(batch_size, size)` per verification run; `size` is that of every unknown dimension
    other than the batch, `None` when the model has none. Pairing the two lists rather than
    crossing them shows both kinds of dimension dynamic in as few runs."""
    if not any(dim is None for spec in inputs for dim in spec.shape[1:]):
        return [(batch_size, None) for batch_size in batch_sizes]
    count = max(len(batch_sizes), len(dynamic_sizes))
    return [(batch_sizes[i % len(batch_sizes)], dynamic_sizes[i % len(dynamic_sizes)])
            for i in range(count)]


def _describe_runs(runs):
    return ", ".join(f"batch size {batch_size}" + ("" if size is None else f" (size {size})")
                     for batch_size, size in runs)


def _session(data):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _verify(model, data, inputs, output_names, nchw, runs, tolerance, seed, in_steps=False):
    """Largest relative error of onnxruntime against Keras; with `in_steps`, the largest error
    in quantization steps of each output (`verification.quantization_step`) and the largest
    fraction of an output's values beyond one step (else `(None, None)`); and the runs as
    `(feed, Keras output shapes, description)`. VerificationError past tolerance: `tolerance`
    relative to max(1, max|output|), or with `in_steps` more than `QAT_MAX_BEYOND_ONE_STEP` of an
    output's values beyond one step."""
    session = _session(data)
    rng = np.random.default_rng(seed)
    worst = 0.0
    pooled = {name: ([], []) for name in output_names}  # with in_steps: Keras's, onnxruntime's
    cases = []
    for batch_size, size in runs:
        where = f"batch size {batch_size}" + ("" if size is None else f", unknown dimensions "
                                              f"{size}")
        arrays = verification.random_inputs(model, batch_size, seed=rng, unknown_size=size)
        expected = keras.tree.flatten(
            model(verification.as_model_input(model, arrays), training=False))
        feed = {spec.name: (np.transpose(x, (0, 3, 1, 2)) if spec.name in nchw else x)
                for spec, x in zip(inputs, arrays)}
        actual = session.run(output_names, feed)
        shapes = []
        for name, want, got in zip(output_names, expected, actual):
            want = keras.ops.convert_to_numpy(want)
            shapes.append(want.shape)
            if want.shape != got.shape:
                raise VerificationError(
                    f"onnxruntime output '{name}' has shape {got.shape}, Keras {want.shape} "
                    f"({where}); no file was written"
                )
            error, scale = verification.output_error(want, got)
            if not error < np.inf:
                raise VerificationError(
                    f"onnxruntime output '{name}' holds NaN or inf where Keras's output is finite "
                    f"({where}); no file was written"
                )
            if in_steps:
                pooled[name][0].append(want.ravel())
                pooled[name][1].append(got.ravel())
            elif not verification.within_tolerance(error, scale, tolerance):
                raise VerificationError(
                    f"onnxruntime output '{name}' differs from Keras by {error / scale:.3g} "
                    f"relative to max(1, its largest value) ({where}), above the "
                    f"tolerance {tolerance:g}; no file was written"
                )
            worst = max(worst, error / scale)
        cases.append((feed, shapes, where))
    if not in_steps:
        return worst, (None, None), cases
    return worst, _steps_from_keras(pooled, _describe_runs(runs)), cases


def _steps_from_keras(pooled, where):
    """The largest error in quantization steps and the largest fraction of values beyond one
    step, over the outputs `{name: (Keras's values, onnxruntime's values)}` of every run, each
    output's step taken over all its values; VerificationError past `QAT_MAX_BEYOND_ONE_STEP`."""
    worst_steps, worst_beyond = 0.0, 0.0
    for name, (wants, gots) in pooled.items():
        want, got = np.concatenate(wants), np.concatenate(gots)
        steps = np.abs(got.astype(np.float64) - want) / verification.quantization_step(want)
        beyond = float(np.mean(~(steps <= 1.0)))
        if beyond > QAT_MAX_BEYOND_ONE_STEP:
            raise VerificationError(
                f"{beyond:.1%} of onnxruntime output '{name}' lies more than one quantization "
                f"step (the output's range / 255) from the QAT model, up to "
                f"{np.nanmax(steps):.3g} steps ({where}), above the "
                f"{QAT_MAX_BEYOND_ONE_STEP:.0%} allowed; no file was written"
            )
        worst_steps = max(worst_steps, float(np.nanmax(steps)))
        worst_beyond = max(worst_beyond, beyond)
    return worst_steps, worst_beyond


def _check_runs(proto, cases, output_names):
    """The int8 graph runs on the float graph's verification inputs, every size of them, with
    Keras's output shapes and finite values (its accuracy is `quantize_int8`'s to judge, on
    real data: random inputs lie outside the calibrated ranges)."""
    session = _session(proto.SerializeToString())
    for feed, shapes, where in cases:
        for name, shape, got in zip(output_names, shapes, session.run(output_names, feed)):
            if got.shape != shape:
                raise VerificationError(
                    f"the int8 graph's output '{name}' has shape {got.shape}, Keras {shape} "
                    f"({where}); no file was written"
                )
            if not np.isfinite(got).all():
                raise VerificationError(
                    f"the int8 graph's output '{name}' holds NaN or inf ({where}); no file was "
                    "written"
                )


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


def _one_line(error):
    text = " ".join(str(error).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(error).__name__)
