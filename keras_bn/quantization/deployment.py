"""The deployed form of a QAT layer: a fixed-range input quantizer and a plain float layer.

What `Conv2DBatchNormalization`, `DepthwiseConv2DBatchNormalization` and
`DenseBatchNormalization` compute in inference, written with layers that every converter knows:
`FakeQuantization` (TensorFlow's `FakeQuantWithMinMaxVars` on the TensorFlow backend, which
tf2onnx writes as a uint8 QuantizeLinear -> DequantizeLinear pair) over the learned input range,
then a `Conv2D`, `DepthwiseConv2D` or `Dense` holding the folded, quantized kernel and the folded
bias. `export.freeze` puts one in place of every QAT layer.
"""

import keras
from keras import ops, quantizers

from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization


@keras.saving.register_keras_serializable(package="keras_bn")
class FakeQuantization(keras.layers.Layer):
    """Rounds its input to the unsigned per-tensor grid of `num_bits` over a fixed range.

    `scale = (maximum - minimum) / (2^num_bits - 1)`, `zero_point = round(-minimum / scale)`,
    `y = (clip(round(x / scale) + zero_point, 0, 2^num_bits - 1) - zero_point) * scale`:
    `keras.quantizers.fake_quant_with_min_max_vars`, and onnxruntime's QuantizeLinear followed by
    DequantizeLinear. The range is a constant of the layer (inference only).

    Args:
        minimum, maximum: floats with `minimum <= 0 <= maximum` and `minimum < maximum`.
        num_bits: integer from 2 to 16.
        **kwargs: base layer keyword arguments.
    """

    def __init__(self, minimum, maximum, num_bits=8, **kwargs):
        super().__init__(**kwargs)
        self.minimum, self.maximum, self.num_bits = float(minimum), float(maximum), int(num_bits)
        if not self.minimum <= 0.0 <= self.maximum or not self.minimum < self.maximum:
            raise ValueError(
                "FakeQuantization needs minimum <= 0 <= maximum and minimum < maximum. "
                f"Received: minimum={minimum!r}, maximum={maximum!r}"
            )
        if not 2 <= self.num_bits <= 16:
            raise ValueError(f"`num_bits` must be from 2 to 16. Received: num_bits={num_bits!r}")

    def call(self, inputs):
        x = quantizers.fake_quant_with_min_max_vars(
            ops.cast(inputs, "float32"), self.minimum, self.maximum, num_bits=self.num_bits,
            narrow_range=False,
        )
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "minimum": self.minimum, "maximum": self.maximum,
                "num_bits": self.num_bits}


def deployed_layer(layer):
    """The layer that computes what the QAT `layer` computes in inference, and its weights.

    Returns:
        `(new_layer, weights)`: `new_layer` is unbuilt, either the plain linear layer
        (`layer.linear_layer()`, when the input stays in float) or a `keras.Sequential` of a
        `FakeQuantization` over the learned input range and that linear layer; `weights` are the
        folded kernel and bias to set once it is built.
    """
    if not isinstance(layer, FoldedBatchNormalization):
        raise TypeError(f"Expected a QAT layer (FoldedBatchNormalization). Received: {layer!r}")
    weights = layer.folded_weights()
    linear = layer.linear_layer()
    input_range = layer.input_range()
    if input_range is None:
        return linear, weights
    quantizer = FakeQuantization(*input_range, num_bits=layer.activation_bits,
                                 name=f"{layer.name}_input_quantization")
    return keras.Sequential([quantizer, linear], name=layer.name), weights
