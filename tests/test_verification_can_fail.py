"""A report says "verified" only where its check could have failed: outputs that vary over the
verification inputs by more than the stated tolerance. fold_batchnorm on a model with constant
outputs and prepare_qat (a fake-quantized model is not the float model) say what they compared."""

import logging

import keras
import numpy as np

import keras_bn
from keras_bn import verification


def conv_bn_model(dense_kernel="glorot_uniform", seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras_bn.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5, kernel_initializer=dense_kernel, name="dense"),
        ],
        name="model",
    )
    rng = np.random.default_rng(seed)
    bn = model.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    bn.beta.assign(rng.normal(0.0, 0.5, 4).astype("float32"))
    bn.moving_mean.assign(rng.normal(0.0, 0.5, 4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    return model


def test_output_variation_and_whether_a_check_can_fail():
    varying = np.array([[0.0, 1.0], [0.5, 1.0], [0.0, -2.0]])
    assert verification.output_variation(varying) == 3.0
    assert verification.output_variation([np.full((4, 3), 0.001), np.ones((4,))]) == 0.0
    assert verification.output_variation(np.ones((1, 3))) == 0.0  # one example: nothing varies
    assert verification.can_show_error(3.0, scale=2.0, tolerance=1e-3)
    assert not verification.can_show_error(1e-6, scale=1.0, tolerance=1e-3)  # a flat softmax


def test_fold_on_varying_outputs_is_verified_under_a_stated_tolerance():
    folded = keras_bn.fold_batchnorm(conv_bn_model())
    report = folded.fold_report
    assert report.verified and not report.outputs_constant
    assert report.examples == 2 and report.variation > report.tolerance * report.scale
    line = report.summary_line()
    assert "(verified: max |difference| " in line
    assert f"<= tolerance 0.001 x scale {report.scale:.3g} over 2 random inputs)" in line


def test_fold_on_constant_outputs_says_it_is_not_verified(caplog):
    # A zero Dense kernel: every input gives the same output (the bias), as an untrained
    # MobileNetV2 gives every class 0.001; no wrong fold before the Dense could show.
    model = conv_bn_model(dense_kernel="zeros")
    with caplog.at_level(logging.WARNING, logger="keras_bn.folding.graph"):
        folded = keras_bn.fold_batchnorm(model)
    report = folded.fold_report
    assert report.max_error == 0.0 and report.variation == 0.0
    assert report.outputs_constant and not report.verified
    assert "NOT verified: the original's outputs are constant over 2 random inputs" in str(report)
    assert "(verified" not in report.summary_line()
    assert "a wrong fold could not show" in caplog.text
    # What that check would have missed: a fold that forgot BN's shift entirely.
    wrong = keras.models.clone_model(folded)
    wrong.set_weights(folded.get_weights())
    wrong.get_layer("conv").bias.assign(np.zeros(4, "float32"))
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrong(x)),
                                  keras.ops.convert_to_numpy(model(x)))


def test_prepare_qat_states_what_it_compares():
    qat_model = keras_bn.prepare_qat(conv_bn_model(), weight_bits=3)
    report = qat_model.qat_report
    assert report.compared_with == "the float model" and report.tolerance is None
    assert not report.verified and report.max_error > 0
    line = report.summary_line()
    assert "compared with the float model, not verified (it differs by design): max |difference|" \
        in line
    assert f"({report.max_error / report.scale:.2%}) over 2 random inputs" in line
    assert "(verified" not in line
