"""keras_bn.BatchNormalization against the paper's Algorithms 1 and 2 and against Keras's layer.

Runs on every backend CI uses (TensorFlow and JAX); on TensorFlow the rank-4 cases take the fused
kernel, so the numeric tests check it as well as the generic path (see test_tensorflow_paths.py for
the two paths side by side).
"""

import keras
import numpy as np
import pytest
from reference import (
    EPSILON,
    bn_inference,
    bn_train_backward,
    bn_train_forward,
    per_channel,
    to_numpy,
    training_gradients,
)

import keras_bn
from keras_bn._keras_internals import layer_test_case

SHAPES_AND_AXES = [
    ((16, 5), -1),
    ((6, 7, 4), -1),
    ((6, 4, 7), 1),
    ((4, 5, 6, 3), -1),
    ((4, 3, 5, 6), 1),
    ((3, 4, 5, 6, 2), -1),
    ((3, 2, 4, 5, 6), 1),
]


def random_statistics(channels, rng):
    return dict(
        gamma=rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),
        beta=rng.normal(0, 1, channels),
        moving_mean=rng.normal(0, 2, channels),
        moving_variance=rng.uniform(0.5, 3.0, channels),
    )


def set_statistics(layer, stats):
    layer.set_weights(
        [
            stats[name].astype("float32")
            for name in ("gamma", "beta", "moving_mean", "moving_variance")
        ]
    )


class LayerTest(layer_test_case()):
    def test_run_layer_test_dense_input(self):
        self.run_layer_test(
            keras_bn.BatchNormalization,
            init_kwargs={"center": True, "scale": True},
            call_kwargs={"training": True},
            input_shape=(4, 3),
            expected_output_shape=(4, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=2,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
        )

    def test_run_layer_test_image_input_with_regularizers(self):
        self.run_layer_test(
            keras_bn.BatchNormalization,
            init_kwargs={"beta_regularizer": "l2", "gamma_regularizer": "l2"},
            call_kwargs={"training": True},
            input_shape=(2, 4, 4, 3),
            expected_output_shape=(2, 4, 4, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=2,
            expected_num_seed_generators=0,
            expected_num_losses=2,
            supports_masking=True,
        )

    def test_run_layer_test_without_center_and_scale(self):
        self.run_layer_test(
            keras_bn.BatchNormalization,
            init_kwargs={"center": False, "scale": False, "axis": 1},
            call_kwargs={"training": True},
            input_shape=(2, 3, 4, 4),
            expected_output_shape=(2, 3, 4, 4),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=2,
            supports_masking=True,
        )

    def test_run_layer_test_renorm_and_virtual_batches(self):
        self.run_layer_test(
            keras_bn.BatchNormalization,
            init_kwargs={"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1}},
            call_kwargs={"training": True},
            input_shape=(4, 3, 3, 2),
            expected_output_shape=(4, 3, 3, 2),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=5,
            supports_masking=True,
        )
        self.run_layer_test(
            keras_bn.BatchNormalization,
            init_kwargs={"virtual_batch_size": 2, "unbiased_variance": False},
            call_kwargs={"training": True},
            input_shape=(4, 3, 3, 2),
            expected_output_shape=(4, 3, 3, 2),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=2,
            supports_masking=True,
        )


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
@pytest.mark.parametrize("unbiased_variance", [True, False])
def test_training_matches_algorithm_1(shape, axis, unbiased_variance):
    rng = np.random.default_rng(1)
    channels = shape[axis]
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    dy = rng.normal(0, 1, shape).astype("float32")
    stats = random_statistics(channels, rng)
    layer = keras_bn.BatchNormalization(
        axis=axis, momentum=0.7, unbiased_variance=unbiased_variance
    )
    layer.build(shape)
    set_statistics(layer, stats)

    y, dx, (dgamma, dbeta) = training_gradients(layer, x, dy)

    y_ref, mean, variance, m = bn_train_forward(x, stats["gamma"], stats["beta"], axis)
    dx_ref, dgamma_ref, dbeta_ref = bn_train_backward(x, stats["gamma"], dy, axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    # Gradients flow through mu_B and sigma2_B (Sec. 3); treating them as constants would fail here.
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-4, atol=1e-3)

    batch_variance = variance * m / (m - 1) if unbiased_variance else variance
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.7 * stats["moving_mean"] + 0.3 * mean, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        0.7 * stats["moving_variance"] + 0.3 * batch_variance,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
def test_inference_matches_algorithm_2_and_updates_nothing(shape, axis):
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 3.0, shape).astype("float32")
    stats = random_statistics(shape[axis], rng)
    layer = keras_bn.BatchNormalization(axis=axis)
    layer.build(shape)
    set_statistics(layer, stats)
    expected = bn_inference(
        x, stats["gamma"], stats["beta"], stats["moving_mean"], stats["moving_variance"], axis
    )
    for training in (None, False):
        np.testing.assert_allclose(
            to_numpy(layer(x, training=training)), expected, rtol=1e-4, atol=1e-4
        )
    layer.trainable = False  # a frozen layer uses population statistics whatever `training` says
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), stats["moving_mean"].astype("float32"))
    np.testing.assert_array_equal(
        layer.moving_variance.numpy(), stats["moving_variance"].astype("float32")
    )


@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((4, 5, 5, 3), -1), ((4, 3, 5, 5), 1)])
def test_biased_mode_agrees_with_keras_layer(shape, axis):
    rng = np.random.default_rng(3)
    ours = keras_bn.BatchNormalization(axis=axis, momentum=0.8, unbiased_variance=False)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.8)
    ours.build(shape)
    theirs.build(shape)
    set_statistics(ours, random_statistics(shape[axis], rng))
    theirs.set_weights(ours.get_weights())  # same weights, same order
    for _ in range(3):
        x = rng.normal(2.0, 3.0, shape).astype("float32")
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True)),
            to_numpy(theirs(x, training=True)),
            rtol=1e-4,
            atol=1e-4,
        )
    for mine, keras_weight in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(mine, keras_weight, rtol=1e-5, atol=1e-5)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(theirs(x)), rtol=1e-4, atol=1e-4)
    ours.set_weights(theirs.get_weights())  # and back


def test_unbiased_mode_differs_from_keras_by_exactly_bessel_correction():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, (5, 3)).astype("float32")
    ours = keras_bn.BatchNormalization(momentum=0.0)
    theirs = keras.layers.BatchNormalization(momentum=0.0)
    ours(x, training=True)
    theirs(x, training=True)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), theirs.moving_variance.numpy() * 5 / 4, rtol=1e-5
    )


def test_masked_statistics_leave_masked_values_out():
    rng = np.random.default_rng(5)
    x = rng.normal(1, 2, (4, 6, 3)).astype("float32")
    mask = rng.uniform(size=(4, 6)) > 0.4
    layer = keras_bn.BatchNormalization(momentum=0.0)
    y = to_numpy(layer(x, training=True, mask=mask))
    kept = x[mask]  # (count, channels)
    mean, variance = kept.mean(0), kept.var(0)
    np.testing.assert_allclose(
        y[mask], (kept - mean) / np.sqrt(variance + EPSILON), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), kept.var(0, ddof=1), rtol=1e-4, atol=1e-5
    )
    keras_layer = keras.layers.BatchNormalization(momentum=0.0)
    np.testing.assert_allclose(
        to_numpy(keras_layer(x, training=True, mask=mask)), y, rtol=1e-3, atol=1e-3
    )


def test_masking_inside_a_model():
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            keras_bn.BatchNormalization(momentum=0.0),
        ]
    )
    tokens = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 0, 0]])
    model(tokens, training=True)
    embedded = to_numpy(model.layers[0](tokens))
    kept = embedded[tokens > 0]
    np.testing.assert_allclose(
        model.layers[1].moving_mean.numpy(), kept.mean(0), rtol=1e-5, atol=1e-6
    )


def test_virtual_batches_normalize_each_ghost_batch():
    rng = np.random.default_rng(6)
    x = rng.normal(1, 2, (8, 3, 3, 2)).astype("float32")
    layer = keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.0)
    y = to_numpy(layer(x, training=True))
    ghosts = x.reshape(2, 4, 3, 3, 2)
    mean = ghosts.mean((1, 2, 3), keepdims=True)
    variance = ghosts.var((1, 2, 3), keepdims=True)
    np.testing.assert_allclose(
        y, ((ghosts - mean) / np.sqrt(variance + EPSILON)).reshape(x.shape), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), ghosts.mean((1, 2, 3)).mean(0), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), ghosts.var((1, 2, 3), ddof=1).mean(0), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(x[:6], training=True)


def test_renorm_biased_mode_agrees_with_keras_renorm():
    rng = np.random.default_rng(7)
    kwargs = dict(
        renorm=True,
        renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.5},
        momentum=0.6,
        renorm_momentum=0.5,
    )
    ours = keras_bn.BatchNormalization(unbiased_variance=False, **kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, (6, 4)).astype("float32")
        np.testing.assert_allclose(
            to_numpy(ours(x, training=True)),
            to_numpy(theirs(x, training=True)),
            rtol=1e-4,
            atol=1e-4,
        )
    for mine, keras_weight in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(mine, keras_weight, rtol=1e-5, atol=1e-5)


def test_renorm_unbiased_mode_tracks_unbiased_variance():
    x = np.random.default_rng(8).normal(0, 3, (4, 2)).astype("float32")
    layer = keras_bn.BatchNormalization(renorm=True, momentum=0.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(0, ddof=1), rtol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("shape,axis", [((4, 6), -1), ((2, 5, 5, 3), -1), ((2, 3, 5, 5), 1)])
def test_mixed_precision_large_inputs_stay_finite(policy, shape, axis):
    rng = np.random.default_rng(9)
    # float16 tops out at 65504: the squares of these values overflow unless statistics are float32.
    x = np.clip(rng.normal(0, 1, shape) * 2e4, -6e4, 6e4).astype("float32")
    layer = keras_bn.BatchNormalization(axis=axis, dtype=policy, momentum=0.0)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    y = to_numpy(keras.ops.cast(y, "float32"))
    assert np.all(np.isfinite(y))
    x_low = to_numpy(keras.ops.cast(keras.ops.cast(x, policy.split("_")[1]), "float32"))
    expected, mean, _, _ = bn_train_forward(
        x_low, np.ones(shape[axis]), np.zeros(shape[axis]), axis
    )
    np.testing.assert_allclose(y, expected, atol=0.05, rtol=0.05)
    assert layer.moving_variance.dtype == "float32"
    assert np.all(np.isfinite(layer.moving_variance.numpy()))
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-2, atol=30)
    inference = to_numpy(keras.ops.cast(layer(x), "float32"))
    assert np.all(np.isfinite(inference))


@pytest.mark.parametrize("shape", [(1, 3), (1, 4, 4, 3), (1, 3, 4, 4)])
def test_batch_of_one_is_finite(shape):
    x = np.random.default_rng(10).normal(0, 1, shape).astype("float32")
    layer = keras_bn.BatchNormalization(axis=1 if shape[1] == 3 else -1)
    y = to_numpy(layer(x, training=True))
    assert np.all(np.isfinite(y))
    assert np.all(np.isfinite(layer.moving_variance.numpy()))


def test_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(11)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, use_bias=False),
            keras_bn.BatchNormalization(
                momentum=0.9, epsilon=1e-5, unbiased_variance=False, virtual_batch_size=2
            ),
            keras.layers.ReLU(),
        ]
    )
    set_statistics(model.layers[1], random_statistics(3, rng))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[1]
    assert isinstance(layer, keras_bn.BatchNormalization)
    assert (layer.unbiased_variance, layer.virtual_batch_size, layer.epsilon) == (False, 2, 1e-5)
    x = rng.normal(size=(4, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6)


def test_trains_in_a_model_with_fit():
    rng = np.random.default_rng(12)
    x = rng.normal(0, 1, (64, 6, 6, 2)).astype("float32")
    y = (x.mean((1, 2, 3)) > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras_bn.BatchNormalization(momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.layers[1].moving_mean.numpy().copy()
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(model.layers[1].moving_mean.numpy(), before)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size"),
        (dict(virtual_batch_size=2.5), TypeError, "virtual_batch_size"),
        (dict(virtual_batch_size=2, renorm=True), ValueError, "renorm"),
        (dict(fused="yes"), ValueError, "fused"),
        (dict(renorm=True, renorm_clipping={"rmax": 1, "foo": 2}), ValueError, "renorm_clipping"),
    ],
)
def test_bad_arguments_say_what_was_received(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_bn.BatchNormalization(**kwargs)


def test_axis_out_of_range_says_what_was_received():
    with pytest.raises(ValueError, match="axis=5"):
        keras_bn.BatchNormalization(axis=5).build((2, 3, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        keras_bn.BatchNormalization()(
            np.ones((2, 3, 4), "float32"), training=True, mask=np.ones((2,), bool)
        )


def test_is_a_keras_batch_normalization_and_config_has_new_arguments():
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    assert isinstance(layer, keras.layers.BatchNormalization)
    config = layer.get_config()
    assert config["unbiased_variance"] is True and config["virtual_batch_size"] == 4
    assert keras_bn.BatchNormalization.from_config(config).virtual_batch_size == 4
    # Every argument of Keras's layer is accepted with the same default.
    import inspect

    keras_parameters = inspect.signature(keras.layers.BatchNormalization.__init__).parameters
    ours = inspect.signature(keras_bn.BatchNormalization.__init__).parameters
    for name, parameter in keras_parameters.items():
        assert name in ours and ours[name].default == parameter.default, name


def test_per_channel_reference_helper_is_consistent():
    # Guards the reference itself: Algorithm 2 with batch statistics equals Algorithm 1's output.
    rng = np.random.default_rng(13)
    x = rng.normal(size=(5, 4, 3))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y, mean, variance, _ = bn_train_forward(x, gamma, beta)
    np.testing.assert_allclose(bn_inference(x, gamma, beta, mean, variance), y, rtol=1e-10)
    assert per_channel(np.arange(3), (5, 4, 3), -1).shape == (1, 1, 3)


def test_statistics_stay_accurate_for_a_large_mean_against_a_small_spread():
    # E[x^2] - E[x]^2 with no shift would lose every digit of a unit variance at a mean of 1e4.
    rng = np.random.default_rng(14)
    x = (1e4 + rng.normal(0, 1, (64, 8))).astype("float32")
    layer = keras_bn.BatchNormalization(momentum=0.0, fused=False)
    y = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), x.astype("float64").var(0, ddof=1), rtol=1e-3
    )
    expected, _, _, _ = bn_train_forward(x, np.ones(8), np.zeros(8))
    np.testing.assert_allclose(y, expected, atol=5e-3)
