"""Quantization-aware training: the fused Conv2D+BN layer against NumPy references of the folded,
fake-quantized computation (Jacob et al. 2018, Sec. 3.2), prepare_qat, freezing, serialization."""

import keras
import numpy as np
import pytest
from reference import bn_train_backward, to_numpy, training_gradients

import keras_bn
from keras_bn._keras_internals import layer_test_case
from keras_bn.quantization import fake_quantization

EPSILON = 1e-3


def conv2d_same(x, kernel):
    """Stride-1 SAME convolution of NHWC `x` with an HWIO kernel, in float64."""
    kh, kw = kernel.shape[:2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            window = padded[:, i : i + x.shape[1], j : j + x.shape[2], :]
            out += window @ kernel[i, j]
    return out


def quantize_kernel(kernel, bits=8):
    """Symmetric narrow-range per-output-channel rounding, as onnxruntime's int8 weights."""
    levels = 2 ** (bits - 1) - 1
    step = np.abs(kernel).max(axis=(0, 1, 2)) / levels
    step = np.where(step > 0, step, 1.0)  # a channel of zeros stays zeros
    return np.clip(np.floor(kernel / step + 0.5), -levels, levels) * step


def quantize_activations(x, minimum, maximum, bits=8):
    """Asymmetric unsigned per-tensor QuantizeLinear -> DequantizeLinear (ties to even)."""
    minimum, maximum = min(minimum, 0.0), max(maximum, 0.0)
    scale = (maximum - minimum) / (2**bits - 1)
    zero_point = np.round(-minimum / scale)
    q = np.clip(np.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def random_layer(rng, **kwargs):
    layer = keras_bn.Conv2DBatchNormalization(4, 3, padding="same", **kwargs)
    layer.build((None, 6, 6, 3))
    layer.kernel.assign(rng.normal(0, 0.5, layer.kernel.shape))
    if layer.bias is not None:
        layer.bias.assign(rng.normal(0, 0.5, (4,)))
    layer.gamma.assign(rng.uniform(0.5, 2.0, (4,)))
    layer.beta.assign(rng.normal(0, 1, (4,)))
    layer.moving_mean.assign(rng.normal(0, 1, (4,)))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, (4,)))
    return layer


def weights64(layer):
    names = ("kernel", "gamma", "beta", "moving_mean", "moving_variance")
    values = {name: to_numpy(getattr(layer, name)).astype("float64") for name in names}
    values["bias"] = to_numpy(layer.bias).astype("float64") if layer.use_bias else 0.0
    return values


def test_training_forward_matches_folded_fake_quantized_reference():
    rng = np.random.default_rng(0)
    layer = random_layer(rng, use_bias=True, activation_bits=None)
    w = weights64(layer)
    x = rng.normal(1.0, 2.0, (5, 6, 6, 3)).astype("float32")

    y = to_numpy(layer(x, training=True))

    a = w["gamma"] / np.sqrt(w["moving_variance"] + EPSILON)
    z = conv2d_same(x.astype("float64"), quantize_kernel(w["kernel"] * a)) / a + w["bias"]
    mean, variance = z.mean((0, 1, 2)), z.var((0, 1, 2))
    expected = w["gamma"] * (z - mean) / np.sqrt(variance + EPSILON) + w["beta"]
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-4)
    # Moving statistics: momentum 0.99, unbiased batch variance (m = 5 * 6 * 6).
    m = 5 * 6 * 6
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), 0.99 * w["moving_mean"] + 0.01 * mean, atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance),
        0.99 * w["moving_variance"] + 0.01 * variance * m / (m - 1),
        rtol=1e-5,
    )


def test_the_kernel_is_on_the_int8_grid():
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 1, (3, 3, 2, 5)).astype("float32")
    quantized = to_numpy(fake_quantization.fake_quantize_kernel(keras.ops.array(kernel), 8))
    np.testing.assert_allclose(quantized, quantize_kernel(kernel.astype("float64")), atol=1e-6)
    steps = quantized / (np.abs(kernel).max(axis=(0, 1, 2)) / 127)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(np.round(steps)).max() == 127


def test_activation_fake_quantization_matches_uint8_quantize_dequantize():
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 2.0, (200,)).astype("float32")
    # Exact ties (k + 1/2 steps, as after an average pooling) round to even, as ONNX rounds.
    scale = np.float32(4.5) / np.float32(255)
    x[:8] = (np.arange(8) + 0.5).astype("float32") * scale
    ties = x[:8] / scale
    assert (ties == np.arange(8) + 0.5).sum() >= 4  # float32 keeps some ties exact
    y = to_numpy(fake_quantization.fake_quantize_activations(keras.ops.array(x), -1.5, 3.0, 8))
    zero_point = np.round(np.float32(1.5) / scale)
    expected = (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert len(np.unique(y)) <= 256


def test_inference_is_the_folded_weight_quantized_layer():
    rng = np.random.default_rng(3)
    layer = random_layer(rng, use_bias=True, activation_bits=None)
    w = weights64(layer)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")
    moving_before = to_numpy(layer.moving_mean)

    y = to_numpy(layer(x, training=False))

    a = w["gamma"] / np.sqrt(w["moving_variance"] + EPSILON)
    expected = (
        conv2d_same(x.astype("float64"), quantize_kernel(w["kernel"] * a))
        + w["beta"] - a * w["moving_mean"] + a * w["bias"]
    )
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), moving_before)


def test_input_range_is_set_by_the_first_batch_then_moves():
    rng = np.random.default_rng(4)
    layer = random_layer(rng, weight_bits=None, activation_bits=8)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")
    # No range yet: inference leaves the input in float.
    float_layer = random_layer(np.random.default_rng(4), weight_bits=None, activation_bits=None)
    np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(float_layer(x)), atol=1e-5)
    layer(x, training=True)
    np.testing.assert_allclose(to_numpy(layer.input_min), x.min(), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(layer.input_max), x.max(), rtol=1e-6)
    x2 = 2.0 * x
    layer(x2, training=True)
    np.testing.assert_allclose(to_numpy(layer.input_min), 0.99 * x.min() + 0.01 * x2.min(),
                               rtol=1e-5)
    # Inference quantizes the input with the learned range.
    minimum, maximum = float(to_numpy(layer.input_min)), float(to_numpy(layer.input_max))
    float_layer.set_weights(layer.get_weights())
    expected = to_numpy(float_layer(quantize_activations(x.astype("float64"), minimum, maximum)
                                    .astype("float32")))
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-4)


def test_inference_with_a_quantized_input_is_the_integer_layer():
    # Input, kernel and bias all on their grids: the bias on the accumulator's, input step x
    # kernel step per channel, as an integer convolution (onnxruntime's QLinearConv) adds it.
    rng = np.random.default_rng(5)
    layer = random_layer(rng, use_bias=True, activation_bits=8)
    x = rng.normal(0.5, 1.0, (4, 6, 6, 3)).astype("float32")
    layer(x, training=True)  # learns the input range
    w = weights64(layer)
    minimum = min(float(to_numpy(layer.input_min)), 0.0)
    maximum = max(float(to_numpy(layer.input_max)), 0.0)

    y = to_numpy(layer(x, training=False))

    a = w["gamma"] / np.sqrt(w["moving_variance"] + EPSILON)
    kernel = quantize_kernel(w["kernel"] * a)
    input_step = (maximum - minimum) / 255
    bias_step = input_step * np.abs(kernel).max(axis=(0, 1, 2)) / 127
    bias = w["beta"] - a * w["moving_mean"] + a * w["bias"]
    quantized_bias = np.round(bias / bias_step) * bias_step
    assert np.abs(quantized_bias - bias).max() > 0  # the rounding is visible
    expected = conv2d_same(quantize_activations(x.astype("float64"), minimum, maximum), kernel)
    np.testing.assert_allclose(y, expected + quantized_bias, atol=2e-4, rtol=1e-4)
    # The integers of the accumulator: (y - bias) / bias_step and bias / bias_step.
    accumulator = (to_numpy(layer(x, training=False)) - quantized_bias) / bias_step
    np.testing.assert_allclose(accumulator, np.round(accumulator), atol=0.05)


@pytest.mark.parametrize("training", [True, False])
def test_dense_layer_matches_its_folded_fake_quantized_reference(training):
    rng = np.random.default_rng(11)
    layer = keras_bn.DenseBatchNormalization(4, use_bias=True, activation_bits=None)
    layer.build((None, 3, 5))
    for variable in layer.weights[:6]:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape) * rng.choice([-1, 1], variable.shape)
                        if variable.name != "moving_variance"
                        else rng.uniform(0.5, 2.0, variable.shape))
    w = weights64(layer)
    x = rng.normal(0.5, 1.0, (6, 3, 5)).astype("float32")

    y = to_numpy(layer(x, training=training))

    a = w["gamma"] / np.sqrt(w["moving_variance"] + EPSILON)
    scaled = w["kernel"] * a
    step = np.abs(scaled).max(axis=0) / 127
    linear = x.astype("float64") @ (np.clip(np.floor(scaled / step + 0.5), -127, 127) * step)
    if training:
        z = linear / a + w["bias"]
        mean, variance = z.mean((0, 1)), z.var((0, 1))
        expected = w["gamma"] * (z - mean) / np.sqrt(variance + EPSILON) + w["beta"]
    else:
        expected = linear + w["beta"] - a * w["moving_mean"] + a * w["bias"]
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_depthwise_layer_matches_its_folded_fake_quantized_reference(training):
    rng = np.random.default_rng(12)
    layer = keras_bn.DepthwiseConv2DBatchNormalization(
        3, depth_multiplier=2, padding="same", activation_bits=None
    )
    layer.build((None, 5, 5, 3))
    assert layer.kernel.shape == (3, 3, 3, 2) and layer.gamma.shape == (6,)
    layer.kernel.assign(rng.normal(0, 0.5, layer.kernel.shape))
    layer.gamma.assign(rng.uniform(0.5, 2.0, (6,)))
    layer.beta.assign(rng.normal(0, 1, (6,)))
    layer.moving_mean.assign(rng.normal(0, 1, (6,)))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, (6,)))
    w = weights64(layer)
    x = rng.normal(0.5, 1.0, (4, 5, 5, 3)).astype("float32")

    y = to_numpy(layer(x, training=training))

    a = w["gamma"] / np.sqrt(w["moving_variance"] + EPSILON)
    # Output channel c * 2 + k: input channel c, kernel[:, :, c, k], as a dense HWIO kernel.
    scaled = (w["kernel"] * a.reshape(3, 2)).reshape(3, 3, 1, 6)
    quantized = quantize_kernel(scaled)[:, :, 0, :]
    dense = np.zeros((3, 3, 3, 6))
    for out in range(6):
        dense[:, :, out // 2, out] = quantized[:, :, out]
    linear = conv2d_same(x.astype("float64"), dense)
    if training:
        z = linear / a
        mean, variance = z.mean((0, 1, 2)), z.var((0, 1, 2))
        expected = w["gamma"] * (z - mean) / np.sqrt(variance + EPSILON) + w["beta"]
    else:
        expected = linear + w["beta"] - a * w["moving_mean"]
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-4)


def test_prepare_qat_fuses_depthwise_pairs(tmp_path):
    inputs = keras.Input((6, 6, 3))
    hidden = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(inputs)
    outputs = keras.layers.BatchNormalization(name="bn")(hidden)
    model = keras.Model(inputs, outputs)
    randomize_statistics(model, np.random.default_rng(13))
    qat_model = keras_bn.prepare_qat(model, weight_bits=None, activation_bits=None)
    assert isinstance(qat_model.get_layer("depthwise"), keras_bn.DepthwiseConv2DBatchNormalization)
    x = np.random.default_rng(14).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(qat_model(x)), to_numpy(model(x)), atol=1e-4)
    qat_model.save(tmp_path / "depthwise.keras")
    loaded = keras.models.load_model(tmp_path / "depthwise.keras")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-4)


def conv_bn_model(bn=keras.layers.BatchNormalization):
    inputs = keras.Input((6, 6, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(inputs)
    hidden = bn(name="bn1")(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.Conv2D(5, 3, use_bias=True, name="conv2")(hidden)
    hidden = bn(name="bn2")(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    hidden = bn(name="bn_pool")(hidden)  # folds into the dense layer after it: stays float
    hidden = keras.layers.Dense(3, name="dense")(hidden)
    outputs = bn(name="bn_dense")(hidden)
    return keras.Model(inputs, outputs, name="net")


def randomize_statistics(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 1, layer.beta.shape))
            layer.moving_mean.assign(rng.normal(0, 1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))


def test_prepare_qat_fuses_what_folds_reports_the_rest_and_leaves_the_original():
    rng = np.random.default_rng(5)
    model = conv_bn_model()
    randomize_statistics(model, rng)
    before = [to_numpy(w).copy() for w in model.weights]
    layer_types = [type(layer) for layer in model.layers]

    qat_model = keras_bn.prepare_qat(model)

    fused = [layer for layer in qat_model.layers
             if isinstance(layer, keras_bn.Conv2DBatchNormalization)]
    assert [layer.name for layer in fused] == ["conv1", "conv2"]
    assert isinstance(qat_model.get_layer("dense"), keras_bn.DenseBatchNormalization)
    float_bn = [layer.name for layer in qat_model.layers
                if isinstance(layer, keras.layers.BatchNormalization)]
    assert float_bn == ["bn_pool"]
    report = qat_model.qat_report
    assert report.folded == [("bn1", "conv1"), ("bn2", "conv2"), ("bn_dense", "dense")]
    assert [name for name, _ in report.left] == ["bn_pool"]
    assert "following layer dense" in report.left[0][1]
    assert report.max_error < 0.1 * report.scale  # only the kernels' int8 rounding
    assert fused[0].unbiased_variance is False  # Keras's BN convention kept
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, to_numpy(new))
    assert [type(layer) for layer in model.layers] == layer_types


@pytest.mark.parametrize("bn", [keras.layers.BatchNormalization, keras_bn.BatchNormalization])
def test_without_quantization_the_prepared_model_is_the_original(bn):
    rng = np.random.default_rng(6)
    model = conv_bn_model(bn)
    randomize_statistics(model, rng)
    qat_model = keras_bn.prepare_qat(model, weight_bits=None, activation_bits=None)
    x = rng.normal(0, 1, (4, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(qat_model(x, training=False)), to_numpy(model(x, training=False)), atol=1e-4
    )
    np.testing.assert_allclose(
        to_numpy(qat_model(x, training=True)), to_numpy(model(x, training=True)), atol=1e-4
    )
    for name, fused_name in (("bn1", "conv1"), ("bn2", "conv2"), ("bn_dense", "dense")):
        for statistic in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                to_numpy(getattr(qat_model.get_layer(fused_name), statistic)),
                to_numpy(getattr(model.get_layer(name), statistic)),
                rtol=1e-5, atol=1e-6,
            )


def test_a_training_step_reaches_kernel_gamma_beta_and_fit_lowers_the_loss():
    rng = np.random.default_rng(7)
    keras.utils.set_random_seed(7)
    model = conv_bn_model()
    qat_model = keras_bn.prepare_qat(model)
    x = rng.normal(0, 1, (64, 6, 6, 3)).astype("float32")
    y = np.stack([x[..., 0].mean((1, 2)), x[..., 1].std((1, 2)), x.max((1, 2, 3))], -1)
    conv1 = qat_model.get_layer("conv1")
    before = {name: to_numpy(getattr(conv1, name)).copy()
              for name in ("kernel", "gamma", "beta", "moving_mean")}
    qat_model.compile(keras.optimizers.Adam(0.01), "mse")
    first = qat_model.evaluate(x, y, verbose=0)
    qat_model.fit(x, y, batch_size=16, epochs=40, verbose=0)
    for name, value in before.items():
        assert not np.allclose(value, to_numpy(getattr(conv1, name))), name
    # 160 steps leave the moving averages behind the weights: judge with Algorithm 2's statistics
    keras_bn.estimate_population_statistics(qat_model, x, batch_size=16, verbose=0)
    assert qat_model.evaluate(x, y, verbose=0) < 0.7 * first
    assert float(to_numpy(conv1.input_max)) > 0.0


def test_freeze_bn_statistics_trains_on_population_statistics():
    rng = np.random.default_rng(8)
    model = conv_bn_model()
    randomize_statistics(model, rng)
    qat_model = keras_bn.prepare_qat(model)
    x = rng.normal(0, 1, (4, 6, 6, 3)).astype("float32")
    qat_model(x, training=True)  # learn the input ranges
    assert keras_bn.freeze_bn_statistics(qat_model) == 3
    statistics = [to_numpy(v).copy() for v in qat_model.get_layer("conv1").weights[3:5]]
    conv1 = keras.Model(qat_model.input, qat_model.get_layer("conv1").output)
    for layer in conv1.layers[1:]:
        layer.activation_momentum = 1.0  # keep the input range: compare like with like
    np.testing.assert_allclose(
        to_numpy(conv1(x, training=True)), to_numpy(conv1(x, training=False)), atol=1e-5
    )
    for before, after in zip(statistics, qat_model.get_layer("conv1").weights[3:5]):
        np.testing.assert_array_equal(before, to_numpy(after))
    keras_bn.freeze_bn_statistics(qat_model, frozen=False)
    assert float(to_numpy(qat_model.get_layer("conv1").statistics_frozen)) == 0.0
    with pytest.raises(ValueError, match="no fused QAT layer"):
        keras_bn.freeze_bn_statistics(model)


def test_estimate_population_statistics_updates_the_fused_layers():
    rng = np.random.default_rng(9)
    model = conv_bn_model(keras_bn.BatchNormalization)
    randomize_statistics(model, rng)
    qat_model = keras_bn.prepare_qat(model, weight_bits=None, activation_bits=None)
    x = rng.normal(0, 1, (40, 6, 6, 3)).astype("float32")
    keras_bn.estimate_population_statistics(model, x, batch_size=10, verbose=0)
    assert keras_bn.estimate_population_statistics(qat_model, x, batch_size=10, verbose=0) == 4
    for name, fused_name in (("bn1", "conv1"), ("bn2", "conv2"), ("bn_dense", "dense")):
        for statistic in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                to_numpy(getattr(qat_model.get_layer(fused_name), statistic)),
                to_numpy(getattr(model.get_layer(name), statistic)),
                rtol=1e-4, atol=1e-5,
            )
    assert qat_model.get_layer("conv1").momentum == 0.99


def test_qat_model_round_trips_through_a_keras_file(tmp_path):
    rng = np.random.default_rng(10)
    qat_model = keras_bn.prepare_qat(conv_bn_model(), weight_bits=4)
    x = rng.normal(0, 1, (8, 6, 6, 3)).astype("float32")
    qat_model(x, training=True)
    keras_bn.freeze_bn_statistics(qat_model)
    path = tmp_path / "qat.keras"
    qat_model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("conv1")
    assert isinstance(layer, keras_bn.Conv2DBatchNormalization)
    assert layer.weight_bits == 4 and float(to_numpy(layer.statistics_frozen)) == 1.0
    np.testing.assert_allclose(
        to_numpy(loaded(x, training=False)), to_numpy(qat_model(x, training=False)), atol=1e-6
    )


def test_a_frozen_bn_gives_frozen_statistics_and_fixed_gamma_beta_from_a_sequential_model():
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
    ])
    model.get_layer("bn").trainable = False
    qat_model = keras_bn.prepare_qat(model)
    layer = qat_model.get_layer("conv")
    assert isinstance(qat_model, keras.Model) and not isinstance(qat_model, keras.Sequential)
    assert [v.name for v in layer.trainable_weights] == ["kernel", "bias"]
    assert float(to_numpy(layer.statistics_frozen)) == 1.0
    assert model.get_layer("bn").trainable is False and len(model.layers) == 2


def test_bad_bit_widths_are_refused():
    with pytest.raises(ValueError, match="weight_bits"):
        keras_bn.prepare_qat(conv_bn_model(), weight_bits=1)
    with pytest.raises(ValueError, match="activation_bits"):
        keras_bn.Conv2DBatchNormalization(4, 3, activation_bits=8.0)


def gradient(function, x, upstream):
    """d sum(upstream * function(x)) / dx on the current backend, as a NumPy array."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(function(x) * upstream)
        return tape.gradient(loss, x).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda x: jax.numpy.sum(function(x) * upstream))(x))
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        loss = torch.sum(function(x) * torch.as_tensor(upstream, device=x.device))
        return to_numpy(torch.autograd.grad(loss, [x])[0])
    raise NotImplementedError(f"gradient helper for backend {backend}")


def test_the_kernel_gradient_is_the_identity_at_each_channels_largest_weight():
    # Keras's fake quantization passes the gradient only where x <= nudged_max, which float32
    # puts one ulp below max|w| for some channels (more of them on JAX): among 2000 channels
    # some lose the gradient of their largest weight there, on every backend.
    rng = np.random.default_rng(15)
    kernel = rng.normal(0.0, 0.1, (3, 3, 2, 2000)).astype("float32")
    upstream = rng.normal(size=kernel.shape).astype("float32")

    def keras_fake_quantization(kernel):
        bound = keras.ops.stop_gradient(keras.ops.max(keras.ops.abs(kernel), axis=(0, 1, 2)))
        return keras.quantizers.fake_quant_with_min_max_vars(
            kernel, -bound, bound, num_bits=8, narrow_range=True, axis=-1
        )

    largest = np.abs(kernel).reshape(-1, 2000).argmax(axis=0), np.arange(2000)
    keras_gradient = gradient(keras_fake_quantization, kernel, upstream).reshape(-1, 2000)
    assert (keras_gradient[largest] == 0).sum() >= 1  # the case the test is about occurs

    ours = gradient(lambda k: fake_quantization.fake_quantize_kernel(k, 8), kernel, upstream)
    np.testing.assert_array_equal(ours, upstream)
    # The value is Keras's, bit for bit.
    np.testing.assert_array_equal(
        to_numpy(fake_quantization.fake_quantize_kernel(keras.ops.array(kernel), 8)).view("int32"),
        to_numpy(keras_fake_quantization(keras.ops.array(kernel))).view("int32"),
    )


@pytest.mark.parametrize("offset", [1000.0, 3000.0])
def test_the_batch_variance_at_a_large_mean_matches_float64(offset):
    # keras.ops.moments is E[z^2] - E[z]^2 on torch: at |mean / std| = 1000 it cancels to a
    # few percent (negative at 3000); the layer's statistics are shifted, as BN's are.
    rng = np.random.default_rng(17)
    layer = keras_bn.DenseBatchNormalization(
        4, use_bias=True, momentum=0.0, unbiased_variance=False, weight_bits=None,
        activation_bits=None,
    )
    layer.build((None, 8))
    kernel = rng.normal(0.0, 0.5, (8, 4)).astype("float32")
    x = rng.normal(0.0, 1.0, (256, 8)).astype("float32")
    linear = x.astype("float64") @ kernel
    bias = (offset * linear.std(axis=0)).astype("float32")
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)

    layer(x, training=True)

    z = linear + bias
    assert np.abs(z.mean(axis=0) / z.std(axis=0)).min() > 0.9 * offset
    np.testing.assert_allclose(to_numpy(layer.moving_variance), z.var(axis=0), rtol=1e-4)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), z.mean(axis=0), rtol=1e-6)


def conv2d_same_kernel_gradient(x, dz, kernel_shape):
    """d sum(dz * conv2d_same(x, K)) / dK, in float64."""
    kh, kw = kernel_shape[:2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    out = np.zeros(kernel_shape)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, i : i + x.shape[1], j : j + x.shape[2], :]
            out[i, j] = np.einsum("nhwi,nhwo->io", window, dz)
    return out


def test_a_channel_with_gamma_0_and_a_channel_of_zero_weights_train_and_deploy():
    # gamma = 0 makes a = gamma / sqrt(var + eps) = 0, and training divides by a; a channel of
    # zero weights has batch variance 0. Channel 1 has the first, channel 2 the second.
    rng = np.random.default_rng(16)
    layer = random_layer(rng, use_bias=True, activation_bits=8)
    layer.gamma.assign(np.array([1.3, 0.0, 0.8, 1.1], "float32"))
    kernel = to_numpy(layer.kernel).copy()
    kernel[..., 2] = 0.0
    layer.kernel.assign(kernel)
    w = weights64(layer)
    x = rng.normal(0.5, 1.0, (4, 6, 6, 3)).astype("float32")
    dy = rng.normal(size=(4, 6, 6, 4)).astype("float32")

    y, _, (dkernel, _, dgamma, dbeta) = training_gradients(layer, x, dy)

    minimum, maximum = float(to_numpy(layer.input_min)), float(to_numpy(layer.input_max))
    assert (minimum, maximum) == (float(x.min()), float(x.max()))
    xq = quantize_activations(x.astype("float64"), minimum, maximum)
    std = np.sqrt(w["moving_variance"] + EPSILON)
    a = w["gamma"] / std
    scale = np.where(a == 0, 1.0 / std, a)  # channel 1's kernel on the grid of gamma = 1
    quantized = conv2d_same(xq, quantize_kernel(w["kernel"] * scale)) / scale
    z = quantized + w["bias"]
    mean, variance = z.mean((0, 1, 2)), z.var((0, 1, 2))
    z_hat = (z - mean) / np.sqrt(variance + EPSILON)
    for value in (y, dkernel, dgamma, dbeta):
        assert np.isfinite(value).all()
    np.testing.assert_allclose(y, w["gamma"] * z_hat + w["beta"], atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(y[..., 1:3], np.broadcast_to(w["beta"][1:3], y[..., 1:3].shape)
                                  .astype("float32"))
    # Gradients of Algorithm 1 through z, the kernel's straight through: gamma's of channel 1 is
    # not 0 (it can train away from 0); its kernel's is 0, as in float BN. Where a is not 0,
    # gamma also reaches z through a: dz/dgamma = (conv(x, W) - conv(x, Q(W a)) / a) / gamma,
    # the kernel's rounding error.
    dz, expected_dgamma, expected_dbeta = bn_train_backward(z, w["gamma"], dy)
    through_a = (conv2d_same(xq, w["kernel"]) - quantized) / np.where(a == 0, 1.0, w["gamma"])
    expected_dgamma += np.where(a == 0, 0.0, np.sum(dz * through_a, axis=(0, 1, 2)))
    np.testing.assert_allclose(dgamma, expected_dgamma, rtol=1e-4, atol=1e-4)
    assert abs(dgamma[1]) > 1.0
    np.testing.assert_allclose(dbeta, expected_dbeta, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        dkernel, conv2d_same_kernel_gradient(xq, dz, kernel.shape), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_array_equal(dkernel[..., 1], 0.0)
    m = 4 * 6 * 6
    np.testing.assert_allclose(to_numpy(layer.moving_variance),
                               0.99 * w["moving_variance"] + 0.01 * variance * m / (m - 1),
                               rtol=1e-5)

    # Deployed: channel 1's kernel is 0 and its output beta (on the accumulator's grid).
    w = weights64(layer)
    folded_kernel, folded_bias = layer.folded_weights()
    assert np.isfinite(folded_kernel).all() and np.isfinite(folded_bias).all()
    np.testing.assert_array_equal(folded_kernel[..., 1:3], 0.0)
    std = np.sqrt(w["moving_variance"] + EPSILON)
    a = w["gamma"] / std
    deployed_kernel = quantize_kernel(w["kernel"] * np.where(a == 0, 1.0, a))
    deployed_kernel[..., a == 0] = 0.0
    kernel_step = np.abs(deployed_kernel).max(axis=(0, 1, 2)) / 127
    bias_step = (maximum - min(minimum, 0.0)) / 255 * np.where(kernel_step > 0, kernel_step, 1.0)
    bias = w["beta"] - a * w["moving_mean"] + a * w["bias"]
    expected = conv2d_same(xq, deployed_kernel) + np.round(bias / bias_step) * bias_step
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected, atol=2e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(folded_kernel, deployed_kernel, atol=1e-6)

    # Frozen statistics (the folded form in training), then a few optimizer steps: finite, and
    # channel 1's gamma trains away from 0.
    layer.freeze_statistics()
    y, _, gradients = training_gradients(layer, x, dy)
    assert np.isfinite(y).all() and all(np.isfinite(g).all() for g in gradients)
    np.testing.assert_array_equal(gradients[0][..., 1], 0.0)
    layer.freeze_statistics(False)
    model = keras.Sequential([keras.Input((6, 6, 3)), layer])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, x[..., :1] * np.ones(4, "float32"), batch_size=2, epochs=2, verbose=0)
    for variable in layer.weights:
        assert np.isfinite(to_numpy(variable)).all(), variable.name
    assert float(to_numpy(layer.gamma)[1]) != 0.0
    assert np.isfinite(to_numpy(model(x, training=False))).all()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="export needs TensorFlow")
def test_a_channel_with_gamma_0_and_a_channel_of_zero_weights_export_to_int8(tmp_path):
    import onnxruntime

    import export

    rng = np.random.default_rng(18)
    qat_model = keras_bn.prepare_qat(conv_bn_model())
    layer = qat_model.get_layer("conv1")
    layer.gamma.assign(np.array([1.3, 0.0, 0.8, 1.1], "float32"))
    layer.beta.assign(np.array([0.1, 0.7, -0.2, 0.3], "float32"))  # channel 1 passes ReLU
    kernel = to_numpy(layer.kernel).copy()
    kernel[..., 2] = 0.0
    layer.kernel.assign(kernel)
    x = rng.normal(0, 1, (16, 6, 6, 3)).astype("float32")
    qat_model(x, training=True)  # learns the input ranges
    keras_bn.freeze_bn_statistics(qat_model)

    export.to_onnx(qat_model, tmp_path / "qat.onnx")

    session = onnxruntime.InferenceSession(str(tmp_path / "qat.onnx"))
    y = session.run(None, {session.get_inputs()[0].name: x})[0]
    expected = to_numpy(qat_model(x, training=False))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, atol=0.02 * np.ptp(expected))


class LayerTest(layer_test_case()):
    def test_run_layer_test(self):
        self.run_layer_test(
            keras_bn.Conv2DBatchNormalization,
            init_kwargs={"filters": 4, "kernel_size": 3, "padding": "same", "use_bias": True},
            call_kwargs={"training": True},
            input_shape=(2, 5, 5, 3),
            expected_output_shape=(2, 5, 5, 4),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=5,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=False,
        )

    def test_run_layer_test_dense(self):
        self.run_layer_test(
            keras_bn.DenseBatchNormalization,
            init_kwargs={"units": 4},
            call_kwargs={"training": True},
            input_shape=(3, 5),
            expected_output_shape=(3, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=5,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=False,
        )


def test_symmetric_activation_grid_is_signed_with_zero_point_zero():
    """The tensorrt target's input grid: step max(|min|, |max|) / 127, codes -128..127."""
    from keras_bn.quantization import fake_quantization

    low, high = fake_quantization.activation_range(
        keras.ops.convert_to_tensor(-0.5), keras.ops.convert_to_tensor(2.54), 8, symmetric=True)
    step = 2.54 / 127
    np.testing.assert_allclose([float(low), float(high)], [-128 * step, 127 * step], rtol=1e-6)
    # values a quarter step off the grid's midpoints: no tie for float rounding to decide
    x = ((np.arange(-240, 240) + 0.25) * step).astype("float32")
    got = keras.ops.convert_to_numpy(fake_quantization.fake_quantize_activations(
        x, -0.5, 2.54, 8, symmetric=True))
    codes = np.clip(np.round(x / np.float32(step)), -128, 127)
    np.testing.assert_allclose(got, codes * step, atol=1e-6)
    assert got.min() == pytest.approx(-128 * step) and got.max() == pytest.approx(127 * step)
