"""Deployment of keras-bn models: freeze population statistics and write verified ONNX graphs.

TensorFlow backend only (the conversion goes through tf2onnx); a `.keras` file saved under any
backend is loaded here under TensorFlow. Importing this package registers `FrozenAffine` (and
`keras_bn.BatchNormalization`) for `keras.saving.load_model`.
"""

from export.freeze import FreezeReport, FrozenAffine, freeze
from export.onnx_export import ExportResult, VerificationError, load_model, to_onnx

__all__ = [
    "ExportResult",
    "FreezeReport",
    "FrozenAffine",
    "VerificationError",
    "freeze",
    "load_model",
    "to_onnx",
]
