"""The fused TensorFlow kernel against the generic path, and synchronized BN under
MirroredStrategy."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn import _tensorflow


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that grows by one each time the layer calls TensorFlow's fused kernel."""
    calls = []
    fused_kernel = _tensorflow.fused_batch_norm_training
    monkeypatch.setattr(
        _tensorflow,
        "fused_batch_norm_training",
        lambda *args, **kwargs: calls.append(1) or fused_kernel(*args, **kwargs),
    )
    return calls


def run_training_step(layer, x, dy):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") * dy)
    gradients = tape.gradient(loss, [x, *layer.trainable_variables])
    return [np.asarray(tf.cast(t, "float32")) for t in (y, *gradients)] + [
        w for w in layer.get_weights()
    ]


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((4, 5, 5, 3), -1),
        ((4, 3, 5, 5), 1),
        ((16, 3), -1),
        ((4, 6, 3), -1),
        ((4, 3, 6), 1),
        ((2, 3, 4, 5, 3), -1),
        ((2, 3, 3, 4, 5), 1),
    ],
)
@pytest.mark.parametrize("unbiased_variance", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
@pytest.mark.parametrize("scale,center", [(True, True), (False, False)])
def test_fused_and_generic_paths_agree(
    shape, axis, unbiased_variance, dtype, scale, center, fused_calls
):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    dy = rng.normal(0, 1, shape).astype("float32")
    results = []
    for fused in (None, False):
        layer = keras_bn.BatchNormalization(
            axis=axis,
            momentum=0.6,
            unbiased_variance=unbiased_variance,
            fused=fused,
            dtype=dtype,
            scale=scale,
            center=center,
        )
        layer.build(shape)
        layer.set_weights([w + 0.5 for w in layer.get_weights()])
        results.append(run_training_step(layer, x, dy))
    assert len(fused_calls) == 1, (
        "fused=None must take the fused kernel when the channel axis is 1 or last"
    )
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    for fused_value, generic_value in zip(*results):
        np.testing.assert_allclose(fused_value, generic_value, rtol=tolerance, atol=tolerance)


def test_fused_path_is_taken_inside_a_compiled_model(fused_calls):
    import keras

    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3),
            keras_bn.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile("sgd", "mse", jit_compile=True)
    model.fit(np.ones((8, 6, 6, 2)), np.ones((8, 1)), epochs=1, verbose=0)
    assert fused_calls


def test_fused_true_refuses_cases_it_cannot_run():
    with pytest.raises(ValueError, match="fused=True"):
        keras_bn.BatchNormalization(fused=True, axis=2).build((4, 3, 3, 2))
    with pytest.raises(ValueError, match="fused=True"):
        keras_bn.BatchNormalization(fused=True).build((4, 3, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="fused=True"):
        keras_bn.BatchNormalization(fused=True, renorm=True).build((4, 3, 3, 2))


SYNCHRONIZED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, keras_bn

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (16, 5, 5, 3)).astype("float32")
    x[8:] = x[8:] * 3 + 2  # the two replicas' halves differ, so local statistics differ
    y = rng.normal(0, 1, (16, 1)).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": strategy.num_replicas_in_sync}
    for synchronized in (True, False):
        keras.utils.set_random_seed(1)
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((5, 5, 3)),
                keras.layers.Conv2D(4, 3, use_bias=False),
                keras_bn.BatchNormalization(momentum=0.5, synchronized=synchronized),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(1),
            ])
            model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile="auto")
        features = np.asarray(model.layers[0](x), dtype="float64")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        bn = model.layers[1]
        result[str(synchronized)] = {
            "moving_mean": bn.moving_mean.numpy().tolist(),
            "moving_variance": bn.moving_variance.numpy().tolist(),
            "expected_mean": (0.5 * features.mean((0, 1, 2))).tolist(),
            "expected_variance": (0.5 + 0.5 * features.var((0, 1, 2), ddof=1)).tolist(),
        }
    print("RESULT" + json.dumps(result))
    """
)


def test_synchronized_statistics_equal_a_single_device_run_on_the_whole_batch():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", SYNCHRONIZED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, completed.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT") :])
    assert result["replicas"] == 2
    synchronized = result["True"]
    np.testing.assert_allclose(
        synchronized["moving_mean"], synchronized["expected_mean"], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        synchronized["moving_variance"], synchronized["expected_variance"], rtol=1e-4, atol=1e-5
    )
    # Without synchronization each replica normalizes its own half: the variance is not the
    # global one.
    local = result["False"]
    assert not np.allclose(local["moving_variance"], local["expected_variance"], rtol=1e-2)
