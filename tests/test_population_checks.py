"""estimate_population_statistics and PopulationStatistics refuse data that does not fit the model,
and batches of one example, on every backend and every call, with no statistic changed."""

import keras
import numpy as np
import pytest
from reference import to_numpy

import keras_bn


def pooled_cnn():
    """Input((8, 8, 1)) ending in global pooling: it runs on images of any size."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name="image"),
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras_bn.BatchNormalization(name="ours"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(name="keras"),
        ],
        name="cnn",
    )


def snapshot(model):
    return [to_numpy(v).copy() for v in model.variables]


def assert_unchanged(model, before):
    for value, variable in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(value, to_numpy(variable))


def images(shape, seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, shape).astype("float32")


@pytest.mark.parametrize("shape", [(64, 16, 16, 1), (64, 16, 16)])
def test_data_of_another_shape_is_refused_even_after_a_good_call(shape):
    model = pooled_cnn()
    # A good call first: TensorFlow's relaxed tf.function shapes then take any image size.
    keras_bn.estimate_population_statistics(model, images((64, 8, 8, 1)), verbose=0)
    before = snapshot(model)
    expected = "expected shape ('batch', 8, 8, 1). Received: (32, 16, 16"
    with pytest.raises(ValueError, match=r"batch 0 .* input 'image' of model 'cnn'") as error:
        keras_bn.estimate_population_statistics(model, images(shape), verbose=0)
    assert expected in str(error.value) and "No BN layer was changed" in str(error.value)
    assert_unchanged(model, before)


def test_a_bad_batch_midway_through_an_iterable_is_refused():
    model = pooled_cnn()
    before = snapshot(model)
    batches = [images((16, 8, 8, 1)), images((16, 8, 8, 1), 1), images((16, 8, 9, 1), 2)]
    with pytest.raises(ValueError, match=r"batch 2 .*Received: \(16, 8, 9, 1\)"):
        keras_bn.estimate_population_statistics(model, batches, verbose=0)
    assert_unchanged(model, before)


def test_named_inputs_are_checked_by_name():
    first, second = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    hidden = keras.layers.Concatenate()([first, second])
    outputs = keras_bn.BatchNormalization()(keras.layers.Dense(4)(hidden))
    model = keras.Model({"a": first, "b": second}, outputs, name="two_inputs")
    good = {"a": np.ones((8, 3), "float32"), "b": np.zeros((8, 2), "float32")}
    good["a"][::2] = -1.0
    assert keras_bn.estimate_population_statistics(model, good, batch_size=4, verbose=0) == 2
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"input 'b' .*expected shape \('batch', 2\)\. "
                                         r"Received: \(4, 3\)"):
        keras_bn.estimate_population_statistics(
            model, {"a": good["a"], "b": np.zeros((8, 3), "float32")}, batch_size=4, verbose=0
        )
    with pytest.raises(ValueError, match=r"lacks input\(s\) \['b'\]"):
        keras_bn.estimate_population_statistics(model, {"a": good["a"]}, batch_size=4, verbose=0)
    assert_unchanged(model, before)


def dense_bn():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), keras_bn.BatchNormalization()]
    )


def test_batches_of_one_example_are_refused():
    model = dense_bn()
    x = images((65, 5))
    with pytest.raises(ValueError, match="`batch_size` must be at least 2.*m / \\(m - 1\\)"):
        keras_bn.estimate_population_statistics(model, x, batch_size=1, verbose=0)
    with pytest.raises(ValueError, match="`batch_size` must be at least 2"):
        keras_bn.PopulationStatistics(x, batch_size=1)
    before = snapshot(model)
    # 65 examples in batches of 32: the third batch holds the last example alone.
    with pytest.raises(ValueError, match=r"refuses batch 2 \(counting from 0\): it holds one "
                                         r"example, whose variance is 0"):
        keras_bn.estimate_population_statistics(model, x, batch_size=32, verbose=0)
    assert_unchanged(model, before)
    assert keras_bn.estimate_population_statistics(model, x[:64], batch_size=32, verbose=0) == 2


def test_the_callback_refuses_arrays_that_do_not_fit_before_training():
    model = pooled_cnn()
    model.compile("sgd", "mse")
    x, y = images((32, 8, 8, 1)), np.zeros((32, 3), "float32")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = snapshot(model)
    callback = keras_bn.PopulationStatistics(images((32, 16, 16, 1)), batch_size=16)
    with pytest.raises(ValueError, match=r"`data` of PopulationStatistics does not fit input "
                                         r"'image'.*Received: \(32, 16, 16, 1\)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert_unchanged(model, before)
