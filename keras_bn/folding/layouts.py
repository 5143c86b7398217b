"""Which Keras layers can absorb an inference BN, and where their channels lie.

The glue between a Keras layer and the array maths of `arrays.py`: read the layer's weights as
float64 arrays, say which axis holds its channels, say why a fold would be wrong, and pick the
array function for the layer's kernel layout. No graph plumbing here: that is `graph.py`.
"""

import keras
import numpy as np

from keras_bn import verification
from keras_bn.folding import arrays

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_CONV_TRANSPOSE = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DENSE = (keras.layers.Dense,)

_KERNEL_NAMES = {"separable": ("depthwise_kernel", "pointwise_kernel")}


def inference_affine(bn_layer):
    """The inference BN of a built layer as `y = a * x + b` (Algorithm 2, line 11).

    `a = gamma / sqrt(moving_variance + epsilon)`, `b = beta - a * moving_mean`, with `gamma = 1`
    when `scale=False` and `beta = 0` when `center=False`. Renorm and synchronized layers are
    plain BN in inference, so they are handled alike.

    Args:
        bn_layer: a built `keras.layers.BatchNormalization` (Keras's or `keras_bn`'s).

    Returns:
        `(a, b)`, float64 numpy arrays of shape `(channels,)`.

    Raises:
        TypeError: `bn_layer` is not a BatchNormalization layer.
        ValueError: the layer is not built, or holds a non-finite weight or a negative moving
            variance (`keras_bn.verification.why_statistics_unusable`).
    """
    if not isinstance(bn_layer, keras.layers.BatchNormalization):
        raise TypeError(
            "inference_affine() expects a keras.layers.BatchNormalization layer (Keras's or "
            f"keras_bn's). Received: {type(bn_layer).__name__} {getattr(bn_layer, 'name', '')!r}"
        )
    if not bn_layer.built:
        raise ValueError(
            f"BatchNormalization layer {bn_layer.name!r} is not built, so it has no moving "
            "statistics yet. Call it on data or build it first."
        )
    reason = verification.why_statistics_unusable(bn_layer)
    if reason is not None:
        raise ValueError(
            f"inference_affine() refuses BatchNormalization layer {bn_layer.name!r}: {reason}."
        )

    def value(variable):
        return None if variable is None else keras.ops.convert_to_numpy(variable)

    return arrays.batchnorm_affine(
        gamma=value(bn_layer.gamma) if bn_layer.scale else None,
        beta=value(bn_layer.beta) if bn_layer.center else None,
        moving_mean=value(bn_layer.moving_mean),
        moving_variance=value(bn_layer.moving_variance),
        epsilon=bn_layer.epsilon,
    )


def layout(layer):
    """The kernel layout of a layer that can absorb BN, or None for any other layer."""
    for kind, classes in (
        ("conv", _CONV),
        ("conv_transpose", _CONV_TRANSPOSE),
        ("depthwise", _DEPTHWISE),
        ("separable", _SEPARABLE),
        ("dense", _DENSE),
    ):
        if isinstance(layer, classes):
            return kind
    return None


def channel_axis(layer, rank):
    """The channel axis (non-negative) of the layer's input and output tensors of `rank`."""
    if layout(layer) != "dense" and layer.data_format == "channels_first":
        return 1
    return rank - 1


def why_not_absorbing(layer):
    """Why `layer`'s weights cannot take BN in, whichever side BN is on; None if they can."""
    if getattr(layer, "quantization_mode", None) is not None:
        return f"{describe(layer)} is quantized ({layer.quantization_mode})"
    if getattr(layer, "lora_enabled", False):
        return f"{describe(layer)} has LoRA enabled"
    return None


def why_not_after(layer):
    """Why a BN after `layer` cannot fold into it (beyond the graph's own reasons); or None."""
    activation = layer.get_config().get("activation", "linear")
    if activation not in ("linear", None):
        return (
            f"{describe(layer)} has activation {activation!r}: BN after a non-linearity is "
            "not an affine map of the layer's weights"
        )
    return why_not_absorbing(layer)


def why_not_before(layer):
    """Why a BN before `layer` cannot fold into it exactly; or None."""
    kind = layout(layer)
    if kind == "conv_transpose":
        return (
            f"{describe(layer)} is a transposed convolution: its outputs see different numbers "
            "of inputs, so the BN shift does not become a constant bias"
        )
    if kind in ("conv", "depthwise", "separable"):
        if layer.padding != "valid" and any(size != 1 for size in layer.kernel_size):
            return (
                f"{describe(layer)} uses {layer.padding.upper()} padding with kernel "
                f"{tuple(layer.kernel_size)}: the zeros padded at the borders are not shifted "
                "by BN, so the fold would be wrong there"
            )
    return why_not_absorbing(layer)


def read_weights(layer):
    """The layer's kernel(s) and bias as float64 arrays; `bias` is None without one."""
    names = _KERNEL_NAMES.get(layout(layer), ("kernel",))
    weights = {name: _to_float64(getattr(layer, name)) for name in names}
    weights["bias"] = _to_float64(layer.bias) if layer.use_bias else None
    return weights


def fold_after(layer, weights, a, b):
    """New weights of `layer` with BN `y = a * x + b` applied to its output."""
    kind = layout(layer)
    if kind == "separable":
        pointwise, bias = arrays.fold_after_conv(weights["pointwise_kernel"], weights["bias"], a, b)
        return {**weights, "pointwise_kernel": pointwise, "bias": bias}
    fold = {
        "conv": arrays.fold_after_conv,
        "dense": arrays.fold_after_conv,
        "conv_transpose": arrays.fold_after_conv_transpose,
        "depthwise": arrays.fold_after_depthwise,
    }[kind]
    kernel, bias = fold(weights["kernel"], weights["bias"], a, b)
    return {"kernel": kernel, "bias": bias}


def fold_before(layer, weights, a, b):
    """New weights of `layer` with BN `x = a * x + b` applied to its input."""
    kind = layout(layer)
    if kind == "separable":
        depthwise, pointwise, bias = arrays.fold_before_separable(
            weights["depthwise_kernel"], weights["pointwise_kernel"], weights["bias"], a, b
        )
        return {"depthwise_kernel": depthwise, "pointwise_kernel": pointwise, "bias": bias}
    if kind == "depthwise":
        kernel, bias = arrays.fold_before_depthwise(weights["kernel"], weights["bias"], a, b)
    else:
        groups = layer.groups if kind == "conv" else 1
        kernel, bias = arrays.fold_before_conv(weights["kernel"], weights["bias"], a, b, groups)
    return {"kernel": kernel, "bias": bias}


def with_bias(layer):
    """A fresh, unbuilt copy of `layer` (same name and config) that has a bias."""
    config = layer.get_config()
    config["use_bias"] = True
    return layer.__class__.from_config(config)


def write_weights(layer, weights):
    """Assign float64 `weights` (by variable name) to a built layer, cast to its dtypes."""
    variables = {variable.name: variable for variable in layer.weights}
    for name, value in weights.items():
        variable = variables[name]
        variable.assign(value.astype(variable.dtype))


def _to_float64(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


def describe(layer):
    """`Conv2D 'conv1'`: how messages name a layer."""
    return f"{type(layer).__name__} {layer.name!r}"
