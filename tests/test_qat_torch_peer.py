"""Our QAT layers against PyTorch's implementation of the same method, on every Keras backend.

`torch.ao.nn.intrinsic.qat.ConvBn2d` and `LinearBn1d` (Jacob et al. 2018, Sec. 3.2, as PyTorch
writes it) train a convolution or linear layer with BN folded into its fake-quantized weight. With
the same weights, batches and grids (PyTorch's weight fake quantizer set to ours: per output
channel, symmetric, -127..127, step `max|w_c| / 127`; its input quantizer uint8 over a moving
min/max with averaging constant 0.01 = 1 - our `activation_momentum`), the two must compute the
same thing up to float32 rounding: training outputs, gradients of `sum(R * y)` for a fixed random
`R` with respect to the kernel, bias, gamma and beta, the moving statistics and input range after
each step, the folded int8 kernel codes, and, once the statistics are frozen (`freeze_bn_stats`,
our `freeze_statistics`), training and inference outputs.

What differs by design is named and excluded, not hidden in a tolerance (docs/qat.md, "Compared
with PyTorch"):
- our folded bias is rounded to the accumulator's grid (input step x kernel step) when frozen and
  in inference; PyTorch adds it in float. The test adds the rounding to PyTorch's output.
- a kernel value on an exact tie of its grid rounds up in Keras and to even in PyTorch.
- the input gradient at the edges of the input range: Keras passes it inside the nudged range,
  PyTorch wherever the rounded code is within 0..255 (up to half a step beyond).
"""

import dataclasses

import keras
import numpy as np
import pytest
from reference import to_numpy, training_gradients

import keras_bn

torch = pytest.importorskip("torch")  # in the dev extra: CI installs it
from torch.ao import quantization as tq  # noqa: E402
from torch.ao.nn.intrinsic import qat as nniqat  # noqa: E402

EPSILON = 1e-3
MOMENTUM = 0.9  # PyTorch's BN momentum 0.1
# Enough output channels that float32 puts Keras's nudged range below some channel's max|w|
# (0.4-0.6% of channels per step on TensorFlow and torch): the kernel gradient there shows it.
CHANNELS = 48
STEPS = 6
FROZEN_STEPS = 3
LEARNING_RATE = 0.05
# float32 rounding, relative to each compared quantity's largest magnitude
OUTPUT_TOLERANCE = 5e-6
GRADIENT_TOLERANCE = 2e-5
STATISTICS_TOLERANCE = 5e-6


@dataclasses.dataclass
class Pair:
    """One of our layers, its PyTorch peer and how to translate between their layouts."""

    ours: keras.layers.Layer
    peer: torch.nn.Module  # the input's fake quantizer, then the fused module
    fused: torch.nn.Module
    kernel_to_torch: callable
    kernel_from_torch: callable
    x_to_torch: callable
    y_from_torch: callable


def qconfig():
    weight = tq.FakeQuantize.with_args(
        observer=tq.PerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0,
    )
    activation = tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, averaging_constant=0.01, quant_min=0,
        quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
    )
    return tq.QConfig(activation=activation, weight=weight)


def peer_model(fused):
    # PyTorch's per-channel MinMax observer keeps the extremes of every weight it has seen; our
    # grid is that of the current weight (as after each optimizer step), so it forgets them.
    def reset(module, _):
        module.activation_post_process.reset_min_max_vals()

    fused.weight_fake_quant.register_forward_pre_hook(reset)
    return torch.nn.Sequential(qconfig().activation(), fused).train()


def nchw(x):
    return torch.as_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(y):
    return y.detach().permute(0, 2, 3, 1).numpy()


def conv_pair():
    ours = keras_bn.Conv2DBatchNormalization(
        CHANNELS, 3, padding="same", use_bias=True, momentum=MOMENTUM, epsilon=EPSILON
    )
    ours.build((None, 7, 7, 3))
    fused = nniqat.ConvBn2d(3, CHANNELS, 3, padding=1, bias=True, eps=EPSILON,
                            momentum=1 - MOMENTUM, qconfig=qconfig())
    return Pair(ours, peer_model(fused), fused,
                lambda k: k.transpose(3, 2, 0, 1), lambda t: t.permute(2, 3, 1, 0).numpy(),
                nchw, nhwc)


def depthwise_pair():
    multiplier = CHANNELS // 3
    ours = keras_bn.DepthwiseConv2DBatchNormalization(
        3, depth_multiplier=multiplier, padding="same", use_bias=True, momentum=MOMENTUM,
        epsilon=EPSILON,
    )
    ours.build((None, 7, 7, 3))
    fused = nniqat.ConvBn2d(3, 3 * multiplier, 3, padding=1, groups=3, bias=True, eps=EPSILON,
                            momentum=1 - MOMENTUM, qconfig=qconfig())
    # Our output channel c * multiplier + k is kernel[:, :, c, k] on input channel c; PyTorch's
    # output channel o of groups=3 reads input channel o // multiplier with weight[o, 0].
    return Pair(ours, peer_model(fused), fused,
                lambda k: k.reshape(3, 3, 3 * multiplier).transpose(2, 0, 1)[:, None],
                lambda t: t[:, 0].permute(1, 2, 0).reshape(3, 3, 3, multiplier).numpy(),
                nchw, nhwc)


def dense_pair():
    ours = keras_bn.DenseBatchNormalization(
        CHANNELS, use_bias=True, momentum=MOMENTUM, epsilon=EPSILON
    )
    ours.build((None, 8))
    fused = nniqat.LinearBn1d(8, CHANNELS, bias=True, eps=EPSILON, momentum=1 - MOMENTUM,
                              qconfig=qconfig())
    return Pair(ours, peer_model(fused), fused, lambda k: k.T, lambda t: t.T.numpy(),
                torch.as_tensor, lambda y: y.detach().numpy())


PAIRS = {"conv": conv_pair, "depthwise": depthwise_pair, "dense": dense_pair}


def set_weights(pair, kernel, bias, gamma, beta):
    pair.ours.kernel.assign(kernel)
    pair.ours.bias.assign(bias)
    pair.ours.gamma.assign(gamma)
    pair.ours.beta.assign(beta)
    with torch.no_grad():
        pair.fused.weight.copy_(torch.as_tensor(np.ascontiguousarray(pair.kernel_to_torch(kernel))))
        pair.fused.bias.copy_(torch.as_tensor(bias))
        pair.fused.bn.weight.copy_(torch.as_tensor(gamma))
        pair.fused.bn.bias.copy_(torch.as_tensor(beta))


def peer_step(pair, x, upstream):
    """PyTorch's output and gradients of sum(upstream * y): kernel (our layout), bias, gamma,
    beta, input (our layout)."""
    x = pair.x_to_torch(x).requires_grad_(True)
    y = pair.peer(x)
    loss = torch.sum(y * pair.x_to_torch(upstream))
    fused = pair.fused
    parameters = [fused.weight, fused.bias, fused.bn.weight, fused.bn.bias]
    dkernel, dbias, dgamma, dbeta, dx = torch.autograd.grad(loss, [*parameters, x])
    return (pair.y_from_torch(y), [pair.kernel_from_torch(dkernel), dbias.numpy(),
                                   dgamma.numpy(), dbeta.numpy()], pair.y_from_torch(dx))


def close(actual, expected, tolerance, what):
    scale = max(np.abs(expected).max(), 1e-6)
    error = np.abs(actual - expected).max() / scale
    assert error <= tolerance, f"{what}: max |difference| {error:.2e} of max |value| {scale:.3g}"
    return error


def input_range(pair):
    observer = pair.peer[0].activation_post_process
    return float(observer.min_val), float(observer.max_val)


def bias_rounding(layer):
    """Our folded bias minus the float folded bias `beta - a * moving_mean + a * bias`: what
    rounding it to the accumulator's grid adds to each channel."""
    gamma, beta, mean, variance, bias = (
        to_numpy(v).astype("float64") for v in (layer.gamma, layer.beta, layer.moving_mean,
                                                 layer.moving_variance, layer.bias))
    a = gamma / np.sqrt(variance + EPSILON)
    return layer.folded_weights()[1] - (beta - a * mean + a * bias)


def batches(pair, rng, count):
    shape = (8, 7, 7, 3) if len(pair.ours.kernel.shape) == 4 else (32, 8)
    for _ in range(count):
        # Means and spreads that vary by channel and by step, so statistics and ranges move.
        offset = rng.normal(0.5, 1.0, shape[-1]).astype("float32")
        spread = rng.uniform(0.5, 2.0, shape[-1]).astype("float32")
        x = (offset + spread * rng.normal(size=shape)).astype("float32")
        yield x, rng.normal(size=(*shape[:-1], pair.ours.channels)).astype("float32")


def kernel_codes(pair):
    """The int8 codes of the deployed kernel, ours and PyTorch's, and where the scaled kernel
    lies on an exact tie of its grid (rounded up by Keras, to even by PyTorch)."""
    layer = pair.ours
    kernel = layer.folded_weights()[0]
    flat = kernel.reshape(-1, layer.channels)
    ours = flat / (np.abs(flat).max(axis=0) / 127)
    fused = pair.fused
    with torch.no_grad():
        scale = fused.bn.weight / torch.sqrt(fused.bn.running_var + fused.bn.eps)
        shape = [-1] + [1] * (fused.weight.dim() - 1)
        fused.weight_fake_quant.activation_post_process.reset_min_max_vals()
        quantized = fused.weight_fake_quant(fused.weight * scale.reshape(shape))
        step = fused.weight_fake_quant.scale.reshape(shape)
        theirs = pair.kernel_from_torch(quantized / step).reshape(-1, layer.channels)
        scaled = pair.kernel_from_torch(fused.weight * scale.reshape(shape) / step)
    scaled = scaled.reshape(-1, layer.channels).astype("float64")
    ties = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) < 1e-4
    return np.round(ours), np.round(theirs), ties


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_qat_layer_computes_what_pytorch_computes(kind):
    torch.manual_seed(0)
    rng = np.random.default_rng(["conv", "depthwise", "dense"].index(kind))
    pair = PAIRS[kind]()
    layer = pair.ours
    channels = layer.channels
    kernel = rng.normal(0.0, 0.3, layer.kernel.shape).astype("float32")
    bias = rng.normal(0.0, 0.5, channels).astype("float32")
    gamma = rng.uniform(0.5, 2.0, channels).astype("float32") * rng.choice([-1, 1], channels)
    beta = rng.normal(0.0, 1.0, channels).astype("float32")
    set_weights(pair, kernel, bias, gamma, beta)
    errors = {}

    def record(name, error):
        errors[name] = max(errors.get(name, 0.0), error)

    # Training on batch statistics; the same SGD step applied to both from our gradients.
    for step, (x, upstream) in enumerate(batches(pair, rng, STEPS)):
        y, dx, gradients = training_gradients(layer, x, upstream)
        peer_y, peer_gradients, peer_dx = peer_step(pair, x, upstream)
        record("training output", close(y, peer_y, OUTPUT_TOLERANCE, f"step {step}: output"))
        for name, ours, theirs in zip(("kernel", "bias", "gamma", "beta"), gradients,
                                      peer_gradients):
            if name == "bias":  # BN removes it: both ~0, compared on the kernel's scale
                assert np.abs(ours).max() <= 1e-4 * np.abs(gradients[0]).max()
                assert np.abs(theirs).max() <= 1e-4 * np.abs(gradients[0]).max()
                continue
            record(f"d{name}", close(ours, theirs, GRADIENT_TOLERANCE, f"step {step}: d{name}"))
        # The input gradient, away from the input range's edges.
        low, high = layer.input_range()
        edge = (high - low) / 255
        inside = (x > low + edge) & (x < high - edge)
        assert inside.mean() > 0.9
        record("dx inside the range", close(dx[inside], peer_dx[inside], GRADIENT_TOLERANCE,
                                            f"step {step}: dx"))
        for name, ours, theirs in (
            ("moving_mean", layer.moving_mean, pair.fused.bn.running_mean),
            ("moving_variance", layer.moving_variance, pair.fused.bn.running_var),
        ):
            record(name, close(to_numpy(ours), theirs.numpy(), STATISTICS_TOLERANCE,
                               f"step {step}: {name}"))
        record("input range", close(np.array(layer.input_range()), np.array(input_range(pair)),
                                    STATISTICS_TOLERANCE, f"step {step}: input range"))
        ours_codes, their_codes, ties = kernel_codes(pair)
        assert np.array_equal(ours_codes[~ties], their_codes[~ties]), f"step {step}: codes"
        assert ties.sum() <= 2
        kernel, bias, gamma, beta = (
            value - LEARNING_RATE * gradient
            for value, gradient in zip((kernel, bias, gamma, beta), gradients)
        )
        set_weights(pair, kernel, bias, gamma, beta)

    # Frozen statistics: the folded layer in training; neither moves its statistics.
    layer.freeze_statistics()
    pair.fused.freeze_bn_stats()
    statistics = [to_numpy(layer.moving_mean).copy(), to_numpy(layer.moving_variance).copy()]
    peer_statistics = [pair.fused.bn.running_mean.clone(), pair.fused.bn.running_var.clone()]
    for step, (x, upstream) in enumerate(batches(pair, rng, FROZEN_STEPS)):
        y, _, gradients = training_gradients(layer, x, upstream)
        peer_y, peer_gradients, _ = peer_step(pair, x, upstream)
        rounding = bias_rounding(layer)
        assert np.abs(rounding).max() > 0  # the difference of design is there to exclude
        record("frozen output", close(y, peer_y + rounding, OUTPUT_TOLERANCE,
                                      f"frozen step {step}: output"))
        for name, ours, theirs in zip(("kernel", "bias", "gamma", "beta"), gradients,
                                      peer_gradients):
            record(f"frozen d{name}", close(ours, theirs, GRADIENT_TOLERANCE,
                                            f"frozen step {step}: d{name}"))
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), statistics[0])
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), statistics[1])
    torch.testing.assert_close(pair.fused.bn.running_mean, peer_statistics[0], rtol=0, atol=0)
    torch.testing.assert_close(pair.fused.bn.running_var, peer_statistics[1], rtol=0, atol=0)

    # Inference after freezing: the observers stop (PyTorch's observe in eval mode too).
    pair.peer.eval()
    pair.peer.apply(tq.disable_observer)
    x, _ = next(batches(pair, rng, 1))
    y = to_numpy(layer(x, training=False))
    with torch.no_grad():
        peer_y = pair.y_from_torch(pair.peer(pair.x_to_torch(x)))
    record("inference output", close(y, peer_y + bias_rounding(layer), OUTPUT_TOLERANCE,
                                     "inference output"))
    print(kind, {name: f"{error:.1e}" for name, error in errors.items()})
