"""Loading a `.keras` file for export, whichever backend saved it, with errors for people."""

import os
import re

import keras

from export.conversion import one_line


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
                f"could not load {path} as a Keras model: {one_line(error)}") from error
        if unknown:
            cause = f"it uses the class '{unknown.group(1)}', which Keras does not know"
        else:
            inner = text.split("Exception encountered:")[-1]
            cause = f"Keras could not rebuild a layer from its config: {one_line(inner)}"
        raise ValueError(
            f"could not load {path}: {cause}. Custom layers must be importable and registered "
            "(@keras.saving.register_keras_serializable) before loading: `import keras_bn` "
            "registers keras-bn's, and a model's other custom layers need their own modules "
            "imported first"
        ) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a keras.Model")
    return model
