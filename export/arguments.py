"""The checks of `export.to_onnx`'s arguments, made before any work: one clear error per mistake."""

import os

import keras
import numpy as np

from export import quantization, targets
from keras_bn import _keras_internals
from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization

MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 writes opsets up to 18
QUANTIZE_OPTIONS = (None, "int8")


def require_tensorflow_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            "to_onnx converts through tf2onnx and needs KERAS_BACKEND=tensorflow. Received backend "
            f"'{backend}'. Save the model with model.save('model.keras') and run "
            "`keras-bn-export model.keras -o model.onnx`, which loads it under TensorFlow."
        )


def check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not (
            MIN_OPSET <= opset <= MAX_OPSET):
        raise ValueError(
            f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}. Received: opset={opset!r}"
        )
    return int(opset)


def check_sizes(sizes, argument, what):
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


def check_float_data(validation_data, qat_layers):
    """`validation_data` without `quantize` is for a QAT model's export only."""
    if validation_data is not None and not qat_layers:
        raise ValueError("validation_data is used only with quantize='int8' or a QAT model "
                         "(keras_bn.prepare_qat), whose export it verifies on; the float32 export "
                         "needs no data. Received: quantize=None")


def check_quantization_options(quantize, calibration_data, validation_data, float16_weights,
                               method, batches, min_agreement, target, openvino):
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError("quantize must be None (float32) or 'int8'. "
                         f"Received: quantize={quantize!r}")
    if target is not None:
        targets.get(target)
    if openvino not in ("auto", True, False):
        raise ValueError(f"openvino must be 'auto', True or False. Received: {openvino!r}")
    if quantize is None:
        # validation_data also verifies a QAT model's export: `check_float_data` judges it
        # once the model is known
        if calibration_data is not None:
            raise ValueError("calibration_data is used only with quantize='int8'; the float32 "
                             "export needs no data. Received: quantize=None")
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
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                or batches < 1):
        raise ValueError("calibration_batches must be a positive integer or None. "
                         f"Received: calibration_batches={batches!r}")
    quantization.check_options(method, min_agreement, openvino)


def check_output_path(path):
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


def qat_layers(model):
    """The QAT layers (`keras_bn.prepare_qat`) of `model`, nested models included."""
    return [layer for layer in _keras_internals.flatten_layers(model)
            if isinstance(layer, FoldedBatchNormalization)]


def qat_target(layers, requested):
    """The target a QAT model's int8 graph is written for: the one its layers trained on
    (`prepare_qat(target=...)`), which `requested` (a name or `None`) must match. A model saved
    before layers recorded their target is taken as trained for the narrowest target its
    grids fit."""
    trained = set()
    for layer in layers:
        name = getattr(layer, "target", None)
        if name is None:
            fits = [t for t in targets.TARGETS.values() if t.qat_weight_bits is not None
                    and not t.symmetric_activations
                    and (layer.weight_bits or 0) <= t.qat_weight_bits]
            name = fits[0].name if fits else "cpu-vnni"
        trained.add(name)
    if len(trained) > 1:
        raise ValueError(f"the QAT layers were prepared for different targets {sorted(trained)}; "
                         "prepare the whole model for one target with keras_bn.prepare_qat")
    (name,) = trained
    if requested is not None and targets.get(requested).name != name:
        raise ValueError(
            f"this QAT model trained on the grid of target '{name}', not of '{requested}': its "
            f"int8 graph is right only for '{name}'. Export it with target='{name}' (or no "
            f"target), or prepare and train it again with keras_bn.prepare_qat(model, "
            f"target='{requested}')")
    return targets.get(name)


def check_tolerance(tolerance):
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(
            tolerance, (int, float)) or not tolerance > 0):
        raise ValueError(f"tolerance must be a positive number. Received: tolerance={tolerance!r}")
