"""fold_batchnorm on graphs holding operations and a Lambda, on every backend."""

import keras
import numpy as np

import keras_bn
from keras_bn.folding.graph import copy_operation


def test_fold_keeps_a_python_lambda_and_folds_the_bn_before_it():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras_bn.BatchNormalization(name="bn")(x)
    x = keras.layers.Lambda(lambda t: t * keras.ops.sigmoid(t + 1.0), name="lambda")(x)
    outputs = keras.ops.mean(x + 3.0, axis=(1, 2))
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(0, 0.5, 4))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4))
    bn.gamma.assign(rng.uniform(0.5, 1.5, 4))

    folded = keras_bn.fold_batchnorm(model)  # Lambda.from_config would refuse a Python lambda

    assert folded.fold_report.folded == [("bn", "conv")]
    x = rng.standard_normal((5, 6, 6, 3)).astype("float32")
    want = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.std(want, axis=0).mean() > 1e-3
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded(x)), want, rtol=1e-4, atol=1e-5)


def test_copy_operation_makes_a_new_lambda_around_the_same_function():
    function = lambda t, scale: t * scale  # noqa: E731
    layer = keras.layers.Lambda(function, arguments={"scale": 2.0}, name="scaled")
    copy = copy_operation(layer)
    assert copy is not layer and copy.function is function and copy.name == "scaled"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(copy(np.ones((1, 2), "float32"))),
                               [[2.0, 2.0]])
