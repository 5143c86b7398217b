"""Deployment of keras-bn models: freeze population statistics and write verified ONNX graphs,
float32 or int8.

TensorFlow backend only (the conversion goes through tf2onnx); a `.keras` file saved under any
backend is loaded here under TensorFlow. Its packages are an install extra,
`pip install "keras-bn[export]"`; without them `import export` raises an `ImportError` that names
the extra and the missing packages.

The public names load on first use (PEP 562) so that `import export.__main__`, which the
`keras-bn-export` console script does, imports no Keras before the command line has chosen the
TensorFlow backend. Using any of them, or importing `export.freezing`, registers `FrozenAffine` for
`keras.saving.load_model`.
"""

import importlib
import importlib.util

# What `pip install "keras-bn[export]"` adds to keras-bn's own requirements (setup.cfg).
_EXTRA_PACKAGES = ("tensorflow", "tf2onnx", "onnx", "onnxruntime")


def _missing_packages():
    """The extra's packages that cannot be found, looked up without importing them: TensorFlow
    takes seconds to import, and the command line chooses the Keras backend before it does."""
    missing = []
    for name in _EXTRA_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            # An import hook that refuses the package, or a sys.modules entry without a spec.
            found = False
        if not found:
            missing.append(name)
    return missing


_missing = _missing_packages()
if _missing:
    raise ImportError(
        'keras-bn\'s export needs its extra: pip install "keras-bn[export]" '
        f"(missing: {', '.join(_missing)})"
    )
del _missing

_PUBLIC = {
    "ExportResult": "export.onnx_export",
    "FreezeReport": "export.freezing",
    "FrozenAffine": "export.freezing",
    "QuantizationReport": "export.quantization",
    "VerificationError": "export.onnx_export",
    "freeze": "export.freezing",
    "load_model": "export.loading",
    "quantize_int8": "export.quantization",
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
