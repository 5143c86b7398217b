"""Deployment of keras-bn models: freeze population statistics and write verified ONNX graphs.

TensorFlow backend only (the conversion goes through tf2onnx); a `.keras` file saved under any
backend is loaded here under TensorFlow.

The public names load on first use (PEP 562) so that `import export.__main__`, which the
`keras-bn-export` console script does, imports no Keras before the command line has chosen the
TensorFlow backend. Using any of them, or importing `export.freezing`, registers `FrozenAffine` for
`keras.saving.load_model`.
"""

import importlib

_PUBLIC = {
    "ExportResult": "export.onnx_export",
    "FreezeReport": "export.freezing",
    "FrozenAffine": "export.freezing",
    "VerificationError": "export.onnx_export",
    "freeze": "export.freezing",
    "load_model": "export.onnx_export",
    "to_onnx": "export.onnx_export",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
