"""QAT trained on JAX, exported with TensorFlow: the path of a model trained on an accelerator.

A QAT model trains under JAX and saves to `.keras`; the export command line, in a process on the
TensorFlow backend, writes its int8 QDQ graph; onnxruntime's outputs match the JAX model's
inference within one quantization step of the output.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import onnx
import onnxruntime

import keras_bn
from keras_bn.verification import quantization_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


def small_model():
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12)(x)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def test_qat_trained_on_jax_exports_within_one_step(tmp_path):
    assert keras.backend.backend() == "jax"
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (96, 10, 10, 3)).astype("float32")
    y = rng.integers(0, 4, 96)
    model = keras_bn.prepare_qat(small_model())
    model.compile(keras.optimizers.SGD(0.02, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:64], y[:64], batch_size=16, epochs=2, verbose=0)
    keras_bn.freeze_bn_statistics(model)
    model.fit(x[:64], y[:64], batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "qat.keras")

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [sys.executable, "-m", "export", str(tmp_path / "qat.keras"), "-o",
         str(tmp_path / "qat.onnx")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "QAT: 3 layers as int8 QDQ" in completed.stdout

    ops = {node.op_type for node in onnx.load(tmp_path / "qat.onnx").graph.node}
    assert "QuantizeLinear" in ops and not ops & {"BatchNormalization", "Sqrt", "Div"}
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(tmp_path / "qat.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    held_out = x[64:]
    expected = keras.ops.convert_to_numpy(model(held_out, training=False))
    received = session.run(None, {session.get_inputs()[0].name: held_out})[0]
    # Within one step but for a rare value at a rounding boundary (export allows 5%).
    steps = np.abs(received - expected) / quantization_step(expected)
    assert np.mean(steps > 1.0) <= 0.01 and steps.max() < 2.0, (np.mean(steps > 1.0), steps.max())
