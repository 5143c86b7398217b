"""Deployment of keras-bn models: freeze population statistics and write verified ONNX graphs,
float32 or int8.

TensorFlow backend only (the conversion goes through tf2onnx); a `.keras` file saved under any
backend is loaded here under TensorFlow. Its packages are an install extra,
`pip install -e ".[export]"` in a clone; without them `import export` raises an `ImportError` that
names the missing packages and the command that installs them, for this installation.

The public names load on first use (PEP 562) so that `import export.__main__`, which the
`keras-bn-export` console script does, imports no Keras before the command line has chosen the
TensorFlow backend. Using any of them, or importing `export.freezing`, registers `FrozenAffine` for
`keras.saving.load_model`.
"""

import importlib
import importlib.util
import os

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


def _install_command():
    """The pip command that adds the extra to this installation: from the source tree (a clone,
    installed with -e or not at all), from the folder it was installed from, or by name."""
    import importlib.metadata  # only on failure: `import export` stays light
    import json
    import urllib.parse
    import urllib.request

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.cfg")):
        where = "." if root == os.getcwd() else root
        return f'pip install -e "{where}[export]"'
    try:
        origin = json.loads(importlib.metadata.distribution("keras-bn").read_text(
            "direct_url.json") or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        origin = {}
    url = origin.get("url", "")
    if url.startswith("file://") and "dir_info" in origin:
        folder = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        return f'pip install "{folder}[export]"'
    return 'pip install "keras-bn[export]"'


_missing = _missing_packages()
if _missing:
    raise ImportError(
        f"keras-bn's export needs its extra: {_install_command()} "
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
