"""Fake quantization of kernels and activations on `keras.quantizers.fake_quant_with_min_max_vars`.

The two grids onnxruntime's default QDQ int8 graph uses (`quantize_static` with
`QuantFormat.QDQ`):

- kernels: signed, symmetric, narrow range, one scale per output channel: the integers
  `-(2^(b-1) - 1) .. 2^(b-1) - 1` times `max|w_c| / (2^(b-1) - 1)`;
- activations: unsigned, asymmetric, one scale and zero point per tensor: `0 .. 2^b - 1`, over a
  range `[min, max]` widened to hold 0, so that 0 is exact (zero padding, ReLU).

Keras's fake quantization rounds in the forward pass and passes gradients straight through
inside the range (the straight-through estimator of Jacob et al. 2018, Sec. 3.1); the ranges here
are statistics of the data, never trained, so no gradient flows into them.
"""

from keras import ops, quantizers

# A channel whose weights are all zero has range [0, 0]; a tiny range keeps the quantization
# step finite there (its weights stay exactly zero) rather than dividing by zero.
_TINY_RANGE = 1e-12
# The int8 deployment targets whose activations are signed with zero point 0.
SYMMETRIC_ACTIVATION_TARGETS = frozenset({"tensorrt"})


def fake_quantize_kernel(kernel, num_bits, axis=-1):
    """`kernel` rounded to the symmetric per-channel integer grid of `num_bits`, as floats.

    `q = clip(round(w / delta_c), -(2^(b-1) - 1), 2^(b-1) - 1) * delta_c` with
    `delta_c = max|w_c| / (2^(b-1) - 1)`, the maximum taken over every axis but `axis`.

    Args:
        kernel: float tensor.
        num_bits: integer from 2 to 16.
        axis: the output-channel axis of `kernel`.

    Returns:
        A tensor like `kernel`; its gradient is the identity (straight through) at every
        entry, the channel's largest `|w|` included.
    """
    rank = len(kernel.shape)
    axis = axis % rank
    reduce_axes = tuple(i for i in range(rank) if i != axis)
    bound = ops.stop_gradient(ops.max(ops.abs(kernel), axis=reduce_axes))
    bound = ops.maximum(bound, _TINY_RANGE)
    quantized = quantizers.fake_quant_with_min_max_vars(
        kernel, -bound, bound, num_bits=num_bits, narrow_range=True, axis=axis
    )
    # Keras's gradient passes only where `x <= nudged_max`, and `nudged_max` (8 bits: `127 *
    # (2 * bound / 254)` in float32) can land one ulp below `bound`: the channel's largest weight
    # keeps its value and loses its gradient (0.4-0.6% of random channels on TensorFlow and torch,
    # 4-5% on JAX, whose XLA divides by 254 as a product with 1/254). Every entry lies inside its
    # channel's range, so the gradient here is the identity, as PyTorch's per-channel fake
    # quantization gives it; `kernel - kernel` is exactly 0, so the value is Keras's, bit for bit.
    return ops.stop_gradient(quantized) + (kernel - ops.stop_gradient(kernel))


def fake_quantize_activations(x, minimum, maximum, num_bits, symmetric=False):
    """`x` rounded to the asymmetric unsigned per-tensor grid of `num_bits` over
    `[min(minimum, 0), max(maximum, 0)]`, as floats; with `symmetric`, to the signed grid
    `-2^(b-1) .. 2^(b-1) - 1` of step `max(|minimum|, |maximum|) / (2^(b-1) - 1)` and zero
    point 0 (`activation_range`).

    `scale = (max - min) / (2^b - 1)`, `zero_point = round(-min / scale)`,
    `q = (clip(round(x / scale) + zero_point, 0, 2^b - 1) - zero_point) * scale`: onnxruntime's
    uint8 QuantizeLinear followed by DequantizeLinear, ties rounded to even as ONNX rounds them.
    `keras.quantizers.fake_quant_with_min_max_vars` (TensorFlow's kernel) rounds ties up; the
    two differ on exact ties, which are common after an average pooling (a sum of integers
    divided by 4 or 6), so the forward value here is ONNX's and the gradient Keras's.

    Args:
        x: float tensor.
        minimum, maximum: float scalars, the range.
        num_bits: integer from 2 to 16.
        symmetric: the signed grid with zero point 0 (TensorRT's int8 activations).

    Returns:
        A tensor like `x`; its gradient is the identity inside the range and 0 outside.
    """
    minimum, maximum = activation_range(ops.stop_gradient(ops.cast(minimum, "float32")),
                                        ops.stop_gradient(ops.cast(maximum, "float32")),
                                        num_bits, symmetric)
    keras_rounded = quantizers.fake_quant_with_min_max_vars(
        x, minimum, maximum, num_bits=num_bits, narrow_range=False
    )
    top = 2.0**num_bits - 1.0
    scale = (maximum - minimum) / top
    zero_point = ops.clip(ops.round(-minimum / scale), 0.0, top)
    quantized = ops.clip(ops.round(x / scale) + zero_point, 0.0, top)
    onnx_rounded = (quantized - zero_point) * scale
    return keras_rounded + ops.stop_gradient(onnx_rounded - keras_rounded)


def activation_range(minimum, maximum, num_bits=8, symmetric=False):
    """The activation grid's range for a learned `[minimum, maximum]` (float32 tensors): widened
    to hold 0, and at least `_TINY_RANGE` wide.

    With `symmetric`, the range of the signed grid with zero point 0 that holds both:
    `[-2^(b-1) * step, (2^(b-1) - 1) * step]` with `step = max(|minimum|, |maximum|) /
    (2^(b-1) - 1)`. Its unsigned form has zero point `2^(b-1)` exactly, which is the signed grid
    shifted: what a uint8 QuantizeLinear with zero point 128 and an int8 one with zero point 0
    compute alike (`export.qdq_passes.activations_to_int8` writes the latter)."""
    minimum = ops.minimum(minimum, 0.0)
    maximum = ops.maximum(maximum, 0.0)
    if symmetric:
        levels = 2.0 ** (num_bits - 1) - 1.0
        step = ops.maximum(ops.maximum(-minimum, maximum), _TINY_RANGE) / levels
        return -(levels + 1.0) * step, levels * step
    return minimum, ops.maximum(maximum, minimum + _TINY_RANGE)
