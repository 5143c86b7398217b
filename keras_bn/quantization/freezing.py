"""freeze_bn_statistics: the last phase of quantization-aware training, on population statistics."""

import keras

from keras_bn import _keras_internals
from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization


def freeze_bn_statistics(model, frozen=True):
    """Switches every fused QAT layer of `model` to its population (moving) statistics.

    From then on the fused layers train as the folded, deployed layers compute
    (`conv(x, Q(kernel * a)) + beta - a * moving_mean`, `a = gamma / sqrt(moving_variance +
    epsilon)`), and their moving statistics stay as they are: the recipe of Jacob et al. 2018
    (Sec. 3.2) and Krishnamoorthi 2018 (Sec. 2.7) for the last part of training, PyTorch's
    `freeze_bn_stats`. The switch is a weight of each layer, so compiled training steps see it
    without recompiling and a saved model keeps it. Float BN layers are not changed.

    Args:
        model: a `keras.Model` (or layer) holding fused QAT layers
            (`keras_bn.Conv2DBatchNormalization`, `keras_bn.DepthwiseConv2DBatchNormalization`,
            `keras_bn.DenseBatchNormalization`), nested models included.
        frozen: `False` switches them back to batch statistics.

    Returns:
        The number of layers switched.

    Raises:
        ValueError: `model` holds no fused QAT layer.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    layers = [
        layer for layer in [model, *_keras_internals.flatten_layers(model)]
        if isinstance(layer, FoldedBatchNormalization)
    ]
    if not layers:
        raise ValueError(
            f"Model {model.name!r} holds no fused QAT layer (Conv2DBatchNormalization, "
            "DepthwiseConv2DBatchNormalization, DenseBatchNormalization) to freeze; "
            "keras_bn.prepare_qat(model) makes them."
        )
    for layer in layers:
        layer.freeze_statistics(frozen)
    return len(layers)
