"""The arithmetic of folding, on float64 numpy arrays, one function per kernel layout.

In inference BN is the per-channel affine map `y = a * x + b` (Algorithm 2 of the paper), with
`a = gamma / sqrt(Var[x] + eps)` and `b = beta - a * E[x]`. Folding moves that map into the
weights of a linear layer next to it:

- after the layer (the usual conv -> BN): every output channel `o` is scaled,
  `W'[..., o] = a[o] * W[..., o]` and `bias' = a * bias + b`;
- before the layer (BN -> conv): every input channel `c` is scaled, `W'[..., c, :] = a[c] * W`
  and the shift `b` travels through the kernel into the bias, `bias' = bias + sum(W * b[c])`.
  That is exact only where every output sees a full kernel window (VALID padding, or a kernel
  of size 1): the graph rewrite checks that, these functions do not.

Nothing here knows about Keras: arrays in, arrays out, so each layout is tested on its own
against a direct computation (like `torch.nn.utils.fusion.fuse_conv_bn_weights`).
"""

import numpy as np


def batchnorm_affine(gamma, beta, moving_mean, moving_variance, epsilon):
    """Inference BN as `y = a * x + b` (Algorithm 2, line 11), in float64.

    Args:
        gamma: scale per channel, or None when the layer has `scale=False` (then 1).
        beta: offset per channel, or None when the layer has `center=False` (then 0).
        moving_mean: `E[x]` per channel.
        moving_variance: `Var[x]` per channel.
        epsilon: the constant added to the variance.

    Returns:
        `(a, b)`, two float64 arrays of shape `(channels,)`.
    """
    moving_mean = np.asarray(moving_mean, dtype=np.float64)
    moving_variance = np.asarray(moving_variance, dtype=np.float64)
    gamma = 1.0 if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = 0.0 if beta is None else np.asarray(beta, dtype=np.float64)
    a = gamma / np.sqrt(moving_variance + float(epsilon))
    b = beta - a * moving_mean
    shape = moving_mean.shape
    return np.broadcast_to(a, shape).copy(), np.broadcast_to(b, shape).copy()


def _as_float64(kernel, bias, out_channels):
    kernel = np.asarray(kernel, dtype=np.float64)
    if bias is None:
        bias = np.zeros(out_channels, dtype=np.float64)
    return kernel, np.asarray(bias, dtype=np.float64)


def fold_after_conv(kernel, bias, a, b):
    """BN after a layer whose kernel is `(..., in_channels / groups, out_channels)`.

    The layout of Conv1D/2D/3D (any groups), of Dense `(in, out)` and of the pointwise kernel
    of SeparableConv. `bias` may be None (a layer built with `use_bias=False`).

    Returns:
        `(kernel, bias)` in float64.
    """
    kernel, bias = _as_float64(kernel, bias, kernel.shape[-1])
    return kernel * a, a * bias + b


def fold_after_conv_transpose(kernel, bias, a, b):
    """BN after a transposed convolution, whose kernel is `(..., out_channels, in_channels)`."""
    kernel, bias = _as_float64(kernel, bias, kernel.shape[-2])
    return kernel * a[:, None], a * bias + b


def fold_after_depthwise(kernel, bias, a, b):
    """BN after a depthwise convolution, kernel `(..., in_channels, depth_multiplier)`.

    Output channel `c * depth_multiplier + k` comes from `kernel[..., c, k]`.
    """
    in_channels, depth_multiplier = kernel.shape[-2:]
    kernel, bias = _as_float64(kernel, bias, in_channels * depth_multiplier)
    return kernel * a.reshape(in_channels, depth_multiplier), a * bias + b


def fold_before_conv(kernel, bias, a, b, groups=1):
    """BN before a layer whose kernel is `(..., in_channels / groups, out_channels)`.

    Input channel `g * (in_channels / groups) + i` reaches only the output channels of group
    `g`, through `kernel[..., i, g * (out_channels / groups) : (g + 1) * ...]`. Exact only
    where no output sees padding (see the module docstring).
    """
    kernel, bias = _as_float64(kernel, bias, kernel.shape[-1])
    group_in, out_channels = kernel.shape[-2:]
    group_of_output = np.arange(out_channels) // (out_channels // groups)
    # scale[i, o]: the BN map of the input channel that kernel row i carries to output o.
    scale = a.reshape(groups, group_in)[group_of_output].T
    shift = b.reshape(groups, group_in)[group_of_output].T
    summed_axes = tuple(range(kernel.ndim - 1))
    return kernel * scale, bias + np.sum(kernel * shift, axis=summed_axes)


def fold_before_depthwise(kernel, bias, a, b):
    """BN before a depthwise convolution, kernel `(..., in_channels, depth_multiplier)`."""
    in_channels, depth_multiplier = kernel.shape[-2:]
    kernel, bias = _as_float64(kernel, bias, in_channels * depth_multiplier)
    summed_axes = tuple(range(kernel.ndim - 2))
    shift = np.sum(kernel * b[:, None], axis=summed_axes).reshape(-1)
    return kernel * a[:, None], bias + shift


def fold_before_separable(depthwise_kernel, pointwise_kernel, bias, a, b):
    """BN before a separable convolution: the scale goes into the depthwise kernel, the shift
    it produces (one value per depthwise output channel) through the pointwise kernel.

    Returns:
        `(depthwise_kernel, pointwise_kernel, bias)` in float64.
    """
    depthwise_kernel, shift = fold_before_depthwise(depthwise_kernel, None, a, b)
    pointwise_kernel = np.asarray(pointwise_kernel, dtype=np.float64)
    ones = np.ones_like(shift)
    pointwise_kernel, bias = fold_before_conv(pointwise_kernel, bias, ones, shift)
    return depthwise_kernel, pointwise_kernel, bias
