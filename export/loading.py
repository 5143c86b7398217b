"""Loading a `.keras` file for export, whichever backend saved it, with errors for people."""

import os
import re
import zipfile

import keras

from export.conversion import one_line


def load_model(path, safe_mode=True):
    """Load a `.keras` file under the current (TensorFlow) backend, whichever backend saved it.

    Args:
        path: the `.keras` file.
        safe_mode: Keras's `safe_mode`. `False` lets a `Lambda` layer's Python function load: its
            bytecode is stored in the file and runs when the model does, so give `False` only for
            files you trust (`keras-bn-export --unsafe`).
    """
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
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"could not load {path}: it is not a Keras 3 model file, which is a zip archive "
            "(model.save('model.keras') writes one)"
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:  # a corrupt or foreign file fails in many ways inside Keras
        # Keras's headline for an unregistered custom class ("<class Functional> could not be
        # deserialized properly") names the model, not the class; the cause is further down.
        text = " ".join(str(error).split())
        unknown = re.search(r"Could not locate class '([^']+)'", text)
        if "safe_mode=False" in text:
            raise ValueError(
                f"could not load {path}: it holds a Lambda layer whose Python function Keras "
                "loads only outside its safe mode, since the function's code is stored in the "
                "file and runs with the model. If you trust the file: "
                "export.load_model(path, safe_mode=False), or keras-bn-export --unsafe"
            ) from error
        if unknown is None and "could not be deserialized" not in text:
            raise ValueError(
                f"could not load {path} as a Keras model: {one_line(error)}") from error
        if unknown:
            cause = f"it uses the class '{unknown.group(1)}', which Keras does not know"
        else:
            inner = text.split("Exception encountered:")[-1]
            cause = f"Keras could not rebuild a layer from its config: {one_line(inner)}"
        raise ValueError(
            f"could not load {path}: {cause}. Custom layers must be importable and registered "
            "(@keras.saving.register_keras_serializable) before loading: `import keras_bn` "
            "registers keras-bn's, and a model's other custom layers (or model class) need "
            "their own modules imported first (keras-bn-export --import MODULE)"
        ) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a keras.Model")
    return model
