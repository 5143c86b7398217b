"""estimate_population_statistics against a NumPy reference of Algorithm 2, lines 9-11."""

import keras
import numpy as np
import pytest
from reference import to_numpy

import keras_bn


def two_bn_model():
    """Dense -> our BN -> Dense -> Keras's BN, inside a nested Functional model."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="dense_1")(inputs)
    hidden = keras_bn.BatchNormalization(name="ours")(hidden)
    hidden = keras.layers.Dense(3, name="dense_2")(hidden)
    outputs = keras.layers.BatchNormalization(name="keras")(hidden)
    inner = keras.Model(inputs, outputs, name="inner")
    outer_inputs = keras.Input((6,))
    return keras.Model(outer_inputs, inner(outer_inputs), name="outer")


def reference_statistics(model, x, batch_size):
    """Algorithm 2 by hand: every BN normalizes its batch with batch statistics (training mode)."""
    inner = model.get_layer("inner")
    w1, b1 = inner.get_layer("dense_1").get_weights()
    gamma, beta = inner.get_layer("ours").get_weights()[:2]
    w2, b2 = inner.get_layer("dense_2").get_weights()
    batches = x.astype("float64").reshape(-1, batch_size, x.shape[1])
    first = batches @ w1 + b1
    normalized = (first - first.mean(1, keepdims=True)) / np.sqrt(
        first.var(1, keepdims=True) + 1e-3
    )
    second = (normalized * gamma + beta) @ w2 + b2
    return {
        # Our layer: E[mu_B] and m/(m-1) E[sigma2_B]; Keras's layer: its own, biased, convention.
        "ours": (first.mean(1).mean(0), first.var(1, ddof=1).mean(0)),
        "keras": (second.mean(1).mean(0), second.var(1).mean(0)),
    }


def test_sets_moving_statistics_to_algorithm_2_population_statistics():
    rng = np.random.default_rng(0)
    model = two_bn_model()
    x = rng.normal(2.0, 3.0, (120, 6)).astype("float32")
    trainable_before = [np.array(w) for w in model.trainable_weights]
    used = keras_bn.estimate_population_statistics(model, x, batch_size=20, verbose=0)
    assert used == 6
    inner = model.get_layer("inner")
    for name, (mean, variance) in reference_statistics(model, x, 20).items():
        layer = inner.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-4)
        assert layer.momentum == 0.99  # restored
    for before, after in zip(trainable_before, model.trainable_weights):
        np.testing.assert_array_equal(before, to_numpy(after))


@pytest.mark.parametrize("kind", ["tuple", "iterable", "generator", "pydataset"])
def test_accepts_the_usual_data_forms(kind):
    rng = np.random.default_rng(1)
    model = two_bn_model()
    x = rng.normal(0.0, 2.0, (60, 6)).astype("float32")
    y = np.zeros((60, 1), "float32")
    if kind == "tuple":
        data = (x, y)
    elif kind == "iterable":
        data = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    elif kind == "generator":
        data = (x[i : i + 20] for i in range(0, 60, 20))
    else:

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 3

            def __getitem__(self, index):
                return x[20 * index : 20 * index + 20], y[20 * index : 20 * index + 20]

        data = Batches()
    assert keras_bn.estimate_population_statistics(model, data, batch_size=20, verbose=0) == 3
    mean, variance = reference_statistics(model, x, 20)["ours"]
    layer = model.get_layer("inner").get_layer("ours")
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-4)


def test_steps_limits_the_batches_used():
    rng = np.random.default_rng(2)
    model = two_bn_model()
    x = rng.normal(0.0, 1.0, (100, 6)).astype("float32")
    x[40:] += 10.0  # batches after the first two would move the mean
    assert keras_bn.estimate_population_statistics(model, x, steps=2, batch_size=20, verbose=0) == 2
    mean, _ = reference_statistics(model, x[:40], 20)["ours"]
    np.testing.assert_allclose(
        model.get_layer("inner").get_layer("ours").moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4
    )


def test_population_statistics_beat_lagging_moving_averages():
    """The reason Algorithm 2 exists: after a short training run, momentum 0.99 lags behind."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (256, 8)).astype("float32")
    labels = (x[:, :4].sum(1) > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, use_bias=False),
            keras_bn.BatchNormalization(momentum=0.99),
            keras.layers.ReLU(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, labels, batch_size=32, epochs=2, verbose=0, shuffle=False)
    features = to_numpy(model.layers[0](x))
    bn = model.layers[1]
    lag = np.abs(bn.moving_mean.numpy() - features.mean(0)).max()
    keras_bn.estimate_population_statistics(model, x, batch_size=32, verbose=0)
    assert np.abs(bn.moving_mean.numpy() - features.mean(0)).max() < 1e-4 < lag


def test_refuses_models_without_bn_and_empty_data():
    no_bn = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no trainable BatchNormalization"):
        keras_bn.estimate_population_statistics(no_bn, np.ones((4, 3)), verbose=0)
    model = two_bn_model()
    with pytest.raises(ValueError, match="no batch"):
        keras_bn.estimate_population_statistics(model, [], verbose=0)
    with pytest.raises(ValueError, match="steps"):
        keras_bn.estimate_population_statistics(model, np.ones((4, 6)), steps=0, verbose=0)
    with pytest.raises(TypeError, match="keras.Model"):
        keras_bn.estimate_population_statistics(keras_bn.BatchNormalization(), np.ones((4, 6)))


def test_leaves_the_model_unchanged_when_it_fails_midway():
    model = two_bn_model()
    before = [np.array(v) for v in model.variables]

    def batches():
        yield np.ones((8, 6), "float32") * 5.0
        yield np.ones((8, 6), "float32")
        raise RuntimeError("the data pipeline broke")

    with pytest.raises(RuntimeError, match="pipeline broke"):
        keras_bn.estimate_population_statistics(model, batches(), verbose=0)
    for value, variable in zip(before, model.variables):
        np.testing.assert_array_equal(value, to_numpy(variable))
    inner = model.get_layer("inner")
    assert inner.get_layer("ours").momentum == 0.99 and inner.get_layer("keras").momentum == 0.99


def test_frozen_bn_layers_are_left_as_they_are():
    model = two_bn_model()
    frozen = model.get_layer("inner").get_layer("keras")
    frozen.trainable = False
    before = frozen.get_weights()
    keras_bn.estimate_population_statistics(
        model,
        np.random.default_rng(4).normal(size=(40, 6)).astype("float32"),
        batch_size=20,
        verbose=0,
    )
    for value, after in zip(before, frozen.get_weights()):
        np.testing.assert_array_equal(value, after)


def test_later_calls_reuse_the_compiled_forward_pass_and_stay_exact():
    rng = np.random.default_rng(5)
    model = two_bn_model()
    first = rng.normal(0.0, 1.0, (40, 6)).astype("float32")
    second = rng.normal(3.0, 2.0, (60, 6)).astype("float32")
    keras_bn.estimate_population_statistics(model, first, batch_size=20, verbose=0)
    compiled = model._keras_bn_population_forward
    keras_bn.estimate_population_statistics(model, second, batch_size=20, verbose=0)
    assert model._keras_bn_population_forward is compiled
    inner = model.get_layer("inner")
    for name, (mean, variance) in reference_statistics(model, second, 20).items():
        np.testing.assert_allclose(
            inner.get_layer(name).moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            inner.get_layer(name).moving_variance.numpy(), variance, rtol=1e-4, atol=1e-4
        )
    # Freezing a BN layer changes what a trace must do: the cache is rebuilt, not reused.
    inner.get_layer("keras").trainable = False
    keras_bn.estimate_population_statistics(model, second, batch_size=20, verbose=0)
    assert model._keras_bn_population_forward is not compiled


def _assert_unchanged(model, before):
    for value, variable in zip(before, model.variables):
        np.testing.assert_array_equal(value, to_numpy(variable))
    inner = model.get_layer("inner")
    assert inner.get_layer("ours").momentum == 0.99 and inner.get_layer("keras").momentum == 0.99


def test_non_finite_data_is_refused_naming_the_first_layer_and_the_batch():
    rng = np.random.default_rng(6)
    model = two_bn_model()
    clean = rng.normal(1.0, 2.0, (40, 6)).astype("float32")
    keras_bn.estimate_population_statistics(model, clean, batch_size=20, verbose=0)
    before = [np.array(v) for v in model.variables]
    x = rng.normal(0.0, 1.0, (60, 6)).astype("float32")
    x[45, 3] = np.nan  # one value, in the third batch of 20
    # Every BN after the NaN gets NaN statistics; the message names the first of them.
    with pytest.raises(
        ValueError,
        match=r"batch 2 \(counting from 0\): BatchNormalization layer 'ours' of model 'outer' "
        r"gets a mean with 5 NaN or inf value\(s\); the batch itself holds 1 non-finite input",
    ):
        keras_bn.estimate_population_statistics(model, x, batch_size=20, verbose=0)
    _assert_unchanged(model, before)


def test_statistics_that_overflow_are_refused():
    model = two_bn_model()
    before = [np.array(v) for v in model.variables]
    huge = np.full((40, 6), 1e30, "float32")  # finite, but its square is not in float32
    huge[::2] *= -1.0
    with pytest.raises(ValueError, match="layer 'ours' .* variance with 5 NaN or inf") as error:
        keras_bn.estimate_population_statistics(model, huge, batch_size=20, verbose=0)
    assert "input value" not in str(error.value)
    _assert_unchanged(model, before)
