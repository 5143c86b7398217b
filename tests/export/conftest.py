"""Export is TensorFlow-only (tf2onnx): under another backend pytest collects nothing here."""

import os

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn._keras_internals import flatten_layers

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    collect_ignore_glob = ["*"]

# What BN in training mode or unfrozen BN arithmetic would leave in an ONNX graph: batch moments
# always subtract the mean (Sub) and take a root (Sqrt/Rsqrt/Div). ReduceMean alone is no sign of
# BN: export.graph_passes writes the classifier's global average pool as one ReduceMean.
NORMALIZATION_OPS = {
    "BatchNormalization", "Sub", "Div", "Sqrt", "Rsqrt", "Reciprocal",
}


def randomize_batchnorm(model, seed=0):
    """Give every BN non-trivial population statistics and affine parameters, as training would."""
    rng = np.random.default_rng(seed)
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.2, channels))
    return model


def residual_model():
    """keras_bn layers: BN after a conv (folds), after an Add (cannot fold), after a Dense (folds),
    one called with training=True, and a dropout."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras_bn.BatchNormalization(name="bn_conv")(x)
    x = keras.layers.ReLU(name="relu")(x)
    shortcut = keras.layers.Conv2D(8, 1, name="shortcut")(inputs)
    x = keras.layers.Add(name="add")([x, shortcut])
    x = keras_bn.BatchNormalization(name="bn_add")(x, training=True)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    x = keras.layers.Dense(6, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return randomize_batchnorm(keras.Model(inputs, outputs, name="residual"))


@pytest.fixture
def model():
    return residual_model()


@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "residual.keras"
    residual_model().save(path)
    return path


@pytest.fixture
def randomize():
    return randomize_batchnorm


@pytest.fixture
def normalization_ops():
    return NORMALIZATION_OPS
