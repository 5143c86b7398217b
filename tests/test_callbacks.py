"""keras_bn.PopulationStatistics: Algorithm 2's statistics before every validation of `fit`."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from reference import to_numpy

import keras_bn


def conv_bn_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras_bn.BatchNormalization(name="ours"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(3, 1),
            keras.layers.BatchNormalization(name="keras"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )


def compiled(model):
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (n, 6, 6, 2)).astype("float32")
    y = rng.normal(0.0, 1.0, (n, 1)).astype("float32")
    return x, y


def assert_all_close(got, want):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def statistics(model):
    return [
        to_numpy(v)
        for name in ("ours", "keras")
        for v in (model.get_layer(name).moving_mean, model.get_layer(name).moving_variance)
    ]


class CountingBatches(keras.utils.PyDataset):
    """Batches of 16 training examples; counts how many were read."""

    def __init__(self, x, batches):
        super().__init__()
        self.x, self.batches, self.reads = x, batches, 0

    def __len__(self):
        return self.batches

    def __getitem__(self, index):
        self.reads += 1
        return self.x[16 * index : 16 * index + 16]


class StatisticsAtValidation(keras.callbacks.Callback):
    """Records the BN statistics that each validation of `fit` runs with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_test_begin(self, logs=None):
        self.seen.append(statistics(self.model))


def test_fit_ends_with_the_population_statistics_and_validates_with_them():
    x, y = data()
    x_val, y_val = data(32, seed=1)
    spy = StatisticsAtValidation()
    with_callback = compiled(conv_bn_model())
    history = with_callback.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[keras_bn.PopulationStatistics(x, batch_size=16), spy],
    )
    plain = compiled(conv_bn_model())
    plain_history = plain.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=(x_val, y_val)
    )
    # Training is unchanged (BN trains on batch statistics): the same weights without callback.
    assert_all_close(map(to_numpy, with_callback.trainable_weights),
                     map(to_numpy, plain.trainable_weights))
    moving_averages = statistics(plain)
    keras_bn.estimate_population_statistics(plain, x, batch_size=16, verbose=0)
    expected = statistics(plain)
    for got, want, moving in zip(statistics(with_callback), expected, moving_averages):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(moving, want, rtol=1e-2), "the moving averages lag behind"
    # The last validation ran with the statistics fit ended with (no step came after it) ...
    assert_all_close(spy.seen[-1], expected)
    assert len(spy.seen) == 2
    val_loss = plain.evaluate(x_val, y_val, batch_size=16, verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], val_loss, rtol=1e-5)
    # ... which are not the moving averages that plain fit validated with.
    assert not np.isclose(plain_history.history["val_loss"][-1], val_loss, rtol=1e-3)


def test_estimates_read_at_most_steps_batches_and_only_inside_fit():
    x, y = data()
    x_val, y_val = data(16, seed=1)
    batches = CountingBatches(x, 4)
    callback = keras_bn.PopulationStatistics(batches, steps=2)
    model = compiled(conv_bn_model())
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, validation_data=(x_val, y_val),
              callbacks=[callback])
    # Three validations of 2 batches each; the end of fit follows a validation, so it adds none.
    assert batches.reads == 6
    expected = statistics(model)
    reference = compiled(conv_bn_model())
    reference.set_weights(model.get_weights())
    keras_bn.estimate_population_statistics(reference, x[:32], batch_size=16, verbose=0)
    assert_all_close(expected, statistics(reference))
    model.evaluate(x_val, y_val, verbose=0, callbacks=[callback])
    assert batches.reads == 6, "evaluate() outside fit estimates nothing"


def test_fit_without_validation_estimates_once_at_the_end():
    x, y = data()
    batches = CountingBatches(x, 4)
    model = compiled(conv_bn_model())
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[keras_bn.PopulationStatistics(batches)])
    assert batches.reads == 4


def test_refuses_bad_arguments():
    x, _ = data(16)
    with pytest.raises(ValueError, match="steps"):
        keras_bn.PopulationStatistics(x, steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        keras_bn.PopulationStatistics(x, batch_size=0)
    with pytest.raises(ValueError, match="one-pass iterator"):
        keras_bn.PopulationStatistics(iter([x]))
    keras_bn.PopulationStatistics(iter([x]), steps=1)  # an endless stream with a bound is fine


MIRRORED_SCRIPT = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, keras_bn

rng = np.random.default_rng(0)
x = rng.normal(1, 2, (64, 5, 5, 3)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")

def build(synchronized):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((5, 5, 3)), keras.layers.Conv2D(4, 3),
        keras_bn.BatchNormalization(synchronized=synchronized, name="bn"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1),
    ])
    model.compile("sgd", "mse")
    return model

def bn_statistics(model):
    bn = model.get_layer("bn")
    return [keras.ops.convert_to_numpy(v).tolist() for v in (bn.moving_mean, bn.moving_variance)]

with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    model = build(True)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                        validation_data=(x[:16], y[:16]),
                        callbacks=[keras_bn.PopulationStatistics(x, batch_size=16)])
reference = build(False)
reference.set_weights(model.get_weights())
keras_bn.estimate_population_statistics(reference, x, batch_size=16, verbose=0)
print("RESULT" + json.dumps({
    "statistics": bn_statistics(model), "expected": bn_statistics(reference),
    "val_loss": history.history["val_loss"][-1],
    "expected_val_loss": reference.evaluate(x[:16], y[:16], verbose=0),
}))
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute")
def test_under_mirrored_strategy_with_synchronized_bn():
    # Two logical CPU devices must be set before TensorFlow starts: a fresh interpreter.
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True,
                               text=True, env=env, timeout=300)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, completed.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT"):])
    for got, want in zip(result["statistics"], result["expected"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["val_loss"], result["expected_val_loss"], rtol=1e-5)
