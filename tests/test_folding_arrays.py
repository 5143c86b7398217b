"""The fold maths of keras_bn.folding.arrays against direct numpy computations."""

import numpy as np
import pytest

from keras_bn.folding import arrays


def _affine(rng, channels):
    return rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels), rng.normal(
        0.0, 1.0, channels
    )


def _conv1d_valid(x, kernel, bias, groups=1):
    """A direct VALID 1D convolution, x (length, cin), kernel (k, cin / groups, cout)."""
    k, group_in, cout = kernel.shape
    group_out = cout // groups
    out = np.zeros((x.shape[0] - k + 1, cout))
    for t in range(out.shape[0]):
        for o in range(cout):
            g = o // group_out
            window = x[t : t + k, g * group_in : (g + 1) * group_in]
            out[t, o] = np.sum(window * kernel[:, :, o]) + bias[o]
    return out


def _depthwise1d_valid(x, kernel, bias):
    """A direct VALID 1D depthwise convolution, kernel (k, cin, depth_multiplier)."""
    k, cin, multiplier = kernel.shape
    out = np.zeros((x.shape[0] - k + 1, cin * multiplier))
    for t in range(out.shape[0]):
        for c in range(cin):
            for m in range(multiplier):
                out[t, c * multiplier + m] = np.sum(x[t : t + k, c] * kernel[:, c, m])
    return out + bias


def test_batchnorm_affine_is_algorithm_2():
    gamma, beta = np.array([2.0, -0.5]), np.array([1.0, 3.0])
    mean, variance, eps = np.array([0.5, -2.0]), np.array([3.0, 0.25]), 1e-3
    a, b = arrays.batchnorm_affine(gamma, beta, mean, variance, eps)
    x = np.array([[1.5, -0.25], [-4.0, 7.0]])
    expected = gamma * (x - mean) / np.sqrt(variance + eps) + beta
    np.testing.assert_allclose(a * x + b, expected, rtol=1e-14)
    assert a.dtype == np.float64 and b.dtype == np.float64


def test_batchnorm_affine_without_scale_or_center():
    mean, variance = np.array([1.0, -1.0, 2.0]), np.array([4.0, 1.0, 0.5])
    a, b = arrays.batchnorm_affine(None, None, mean, variance, 0.0)
    np.testing.assert_allclose(a, 1.0 / np.sqrt(variance))
    np.testing.assert_allclose(b, -mean / np.sqrt(variance))
    assert a.shape == b.shape == (3,)


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_after_conv(groups, with_bias):
    rng = np.random.default_rng(groups)
    x = rng.normal(size=(9, 6))
    kernel = rng.normal(size=(3, 6 // groups, 6))
    bias = rng.normal(size=6) if with_bias else None
    a, b = _affine(rng, 6)
    folded_kernel, folded_bias = arrays.fold_after_conv(kernel, bias, a, b)
    zero = np.zeros(6)
    expected = a * _conv1d_valid(x, kernel, zero if bias is None else bias, groups) + b
    np.testing.assert_allclose(
        _conv1d_valid(x, folded_kernel, folded_bias, groups), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_fold_before_conv(groups):
    rng = np.random.default_rng(10 + groups)
    x = rng.normal(size=(9, 6))
    kernel, bias = rng.normal(size=(3, 6 // groups, 12)), rng.normal(size=12)
    a, b = _affine(rng, 6)
    folded_kernel, folded_bias = arrays.fold_before_conv(kernel, bias, a, b, groups)
    np.testing.assert_allclose(
        _conv1d_valid(x, folded_kernel, folded_bias, groups),
        _conv1d_valid(a * x + b, kernel, bias, groups),
        rtol=1e-12,
        atol=1e-12,
    )


def test_fold_after_and_before_dense():
    rng = np.random.default_rng(3)
    x, kernel, bias = rng.normal(size=(5, 4)), rng.normal(size=(4, 7)), rng.normal(size=7)
    a_out, b_out = _affine(rng, 7)
    kernel_after, bias_after = arrays.fold_after_conv(kernel, bias, a_out, b_out)
    np.testing.assert_allclose(x @ kernel_after + bias_after, a_out * (x @ kernel + bias) + b_out)
    a_in, b_in = _affine(rng, 4)
    kernel_before, bias_before = arrays.fold_before_conv(kernel, bias, a_in, b_in)
    np.testing.assert_allclose(x @ kernel_before + bias_before, (a_in * x + b_in) @ kernel + bias)


def test_fold_after_conv_transpose_scales_the_output_axis():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(3, 3, 5, 2))  # (kh, kw, out_channels, in_channels)
    a, b = _affine(rng, 5)
    folded_kernel, folded_bias = arrays.fold_after_conv_transpose(kernel, None, a, b)
    for o in range(5):
        np.testing.assert_allclose(folded_kernel[:, :, o, :], a[o] * kernel[:, :, o, :])
    np.testing.assert_allclose(folded_bias, b)


@pytest.mark.parametrize("depth_multiplier", [1, 3])
def test_fold_after_and_before_depthwise(depth_multiplier):
    rng = np.random.default_rng(depth_multiplier)
    x = rng.normal(size=(8, 4))
    kernel = rng.normal(size=(3, 4, depth_multiplier))
    bias = rng.normal(size=4 * depth_multiplier)
    a_out, b_out = _affine(rng, 4 * depth_multiplier)
    folded = arrays.fold_after_depthwise(kernel, bias, a_out, b_out)
    np.testing.assert_allclose(
        _depthwise1d_valid(x, *folded), a_out * _depthwise1d_valid(x, kernel, bias) + b_out
    )
    a_in, b_in = _affine(rng, 4)
    folded = arrays.fold_before_depthwise(kernel, bias, a_in, b_in)
    np.testing.assert_allclose(
        _depthwise1d_valid(x, *folded), _depthwise1d_valid(a_in * x + b_in, kernel, bias)
    )


def test_fold_before_separable():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 3))
    depthwise, pointwise = rng.normal(size=(3, 3, 2)), rng.normal(size=(1, 6, 5))
    bias = rng.normal(size=5)
    a, b = _affine(rng, 3)

    def separable(inputs, depthwise, pointwise, bias):
        middle = _depthwise1d_valid(inputs, depthwise, np.zeros(6))
        return _conv1d_valid(middle, pointwise, bias)

    folded = arrays.fold_before_separable(depthwise, pointwise, bias, a, b)
    np.testing.assert_allclose(
        separable(x, *folded), separable(a * x + b, depthwise, pointwise, bias), atol=1e-12
    )
