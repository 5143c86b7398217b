"""keras_bn.verification: the model check, random inputs, error measure and tolerance that folding
and export share."""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import verification


def test_output_error_is_relative_to_the_reference_scale():
    expected = [np.array([1.0, -4.0]), np.array([[0.5]])]
    received = [np.array([1.5, -4.0]), np.array([[0.25]])]
    assert verification.output_error(expected, received) == (0.5, 4.0)
    # Below 1 the scale stays 1: small outputs are not judged on their own tiny scale.
    assert verification.output_error(np.array([1e-3]), np.array([2e-3])) == (1e-3, 1.0)
    assert verification.within_tolerance(0.5, 4.0, tolerance=0.125)
    assert not verification.within_tolerance(0.5, 4.0, tolerance=0.1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_output_fails_where_the_reference_is_finite(bad):
    expected = np.array([1.0, 2.0, 3.0])
    received = np.array([1.0, bad, 3.0])
    max_error, scale = verification.output_error(expected, received)
    assert max_error == np.inf and scale == 3.0
    assert not verification.within_tolerance(max_error, scale, tolerance=1e9)


def test_the_same_non_finite_value_on_both_sides_is_no_error():
    expected = np.array([np.nan, np.inf, -np.inf, 2.0])
    assert verification.output_error(expected, expected.copy()) == (0.0, 2.0)
    # A finite value where the reference is NaN is a difference, too.
    assert verification.output_error(expected, np.array([0.0, np.inf, -np.inf, 2.0]))[0] == np.inf


def test_output_error_refuses_different_structures():
    with pytest.raises(verification.VerificationError, match="shape"):
        verification.output_error(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(verification.VerificationError, match="2 outputs, received 1"):
        verification.output_error([np.zeros(2), np.zeros(2)], [np.zeros(2)])


def test_verification_error_is_a_value_error():
    assert issubclass(keras_bn.VerificationError, ValueError)
    assert keras_bn.VerificationError is verification.VerificationError


def test_default_tolerance_follows_the_least_precise_layer():
    inputs = keras.Input((3,))
    float32 = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert verification.default_tolerance(float32) == 1e-3
    assert verification.default_tolerance(float32, half_precision=True) == 1e-2
    x = keras.layers.Dense(2, dtype="mixed_float16")(inputs)
    mixed = keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(x))
    assert mixed.dtype_policy.compute_dtype == "float32"
    assert verification.default_tolerance(mixed) == 1e-2
    x = keras.layers.Dense(2, dtype="mixed_bfloat16")(inputs)
    bfloat16 = keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(x))
    assert verification.default_tolerance(bfloat16, half_precision=True) == 5e-2


def test_random_inputs_follow_the_model_inputs():
    image = keras.Input((4, 4, 3), name="image")
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(2, 3)(tokens))
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    model = keras.Model({"image": image, "tokens": tokens}, pooled + embedded)
    arrays = verification.random_inputs(model, batch_size=5)
    by_name = dict(zip([t.name for t in model.inputs], arrays))
    assert by_name["image"].shape == (5, 4, 4, 3) and by_name["image"].dtype == np.float32
    assert by_name["tokens"].shape == (5, 32) and by_name["tokens"].dtype == np.int32
    assert set(np.unique(by_name["tokens"])) <= {0, 1}
    batch = verification.as_model_input(model, arrays)
    assert set(batch) == {"image", "tokens"}
    assert tuple(model(batch).shape) == (5, 3)
    # The same seed gives the same batch; a generator moves on.
    np.testing.assert_array_equal(verification.random_inputs(model)[0],
                                  verification.random_inputs(model)[0])
    rng = np.random.default_rng(0)
    first, second = (verification.random_inputs(model, 2, rng)[0] for _ in range(2))
    assert not np.array_equal(first, second)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_check_graph_model_says_what_it_accepts():
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 2), "float32"))
    with pytest.raises(TypeError, match="only rewrite Functional and Sequential.*subclassed"):
        verification.check_graph_model(subclassed, "fold_batchnorm()")
    with pytest.raises(TypeError, match=r"freeze\(\) expects a keras.Model.*Received: Dense"):
        verification.check_graph_model(keras.layers.Dense(2), "freeze()")
    with pytest.raises(ValueError, match="no known input shape"):
        verification.check_graph_model(keras.Sequential([keras.layers.Dense(2)]), "to_onnx()")
    built = keras.Sequential([keras.layers.Dense(2)])
    built.build((None, 3))
    verification.check_graph_model(built, "fold_batchnorm()")


def test_batchnorm_statistics_are_named_by_their_path():
    inputs = keras.Input((3,))
    inner = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")],
                             name="inner")
    model = keras.Model(inputs, inner(keras.layers.BatchNormalization(name="first")(inputs)),
                        name="outer")
    verification.check_batchnorm_statistics(model, "fold_batchnorm()")
    inner.get_layer("bn").moving_variance.assign([1.0, -2.0, -3.0])
    with pytest.raises(
        ValueError,
        match=r"fold_batchnorm\(\) refuses BatchNormalization layer 'inner/bn' of model 'outer': "
        r"its moving_variance holds 2 negative values \(channel 1: -2, channel 2: -3\)",
    ):
        verification.check_batchnorm_statistics(model, "fold_batchnorm()")
