"""Dense and BatchNormalization as one layer whose BN folds into the kernel during training."""

import keras
from keras import ops

from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization


@keras.saving.register_keras_serializable(package="keras_bn")
class DenseBatchNormalization(FoldedBatchNormalization):
    """A Dense layer followed by BatchNormalization, trained with BN folded into a quantized
    kernel.

    The layer that quantization-aware training puts in place of a `Dense -> BatchNormalization`
    pair (BN on the last axis). With `a = gamma / sqrt(moving_variance + epsilon)` per unit and
    `Q` the symmetric per-unit fake quantization of the kernel:

    - training: `z = (x @ Q(kernel * a)) / a + bias`, then BN with the batch statistics of `z`
      over every axis but the last (Algorithm 1), and the moving statistics updated;
    - inference, or training after `keras_bn.freeze_bn_statistics`:
      `y = x @ Q(kernel * a) + (beta - a * moving_mean) + a * bias`, the folded layer (its bias
      on the integer accumulator's grid when the input is quantized);
    - with `activation_bits`, the input is fake-quantized (unsigned, per tensor) over a range
      learned by moving min/max.

    The details are those of `keras_bn.quantization.FoldedBatchNormalization`.

    Args:
        units, use_bias, kernel_initializer, bias_initializer: as for `keras.layers.Dense`
            (no activation: BN follows the layer).
        **kwargs: BN's and quantization's arguments as for `keras_bn.Conv2DBatchNormalization`,
            and base layer keyword arguments.

    Call arguments:
        inputs: a tensor of rank 2 or more; the last axis is the features.
        training: Python boolean: training (batch statistics, updates) or inference.

    Example:

    >>> layer = keras_bn.DenseBatchNormalization(10)
    >>> y = layer(np.zeros((8, 32), "float32"), training=True)
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build_kernel(self, input_shape):
        features = input_shape[-1]
        if features is None:
            raise ValueError(
                "The last dimension of the inputs must be known. Received: input_shape="
                f"{tuple(input_shape)}"
            )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: features})
        self.kernel = self.add_weight(
            shape=(features, self.units), name="kernel", initializer=self.kernel_initializer
        )
        return self.units

    def linear(self, x, kernel):
        return ops.matmul(x, kernel)

    def linear_layer(self):
        return keras.layers.Dense(self.units, use_bias=True, name=self.name, dtype="float32")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
