"""keras_bn.PopulationStatistics: Algorithm 2's statistics before every validation of `fit`."""

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
