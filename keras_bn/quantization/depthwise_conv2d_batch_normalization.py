"""DepthwiseConv2D and BatchNormalization as one layer whose BN folds into the kernel during
training."""

import keras
from keras import ops

from keras_bn.quantization import fake_quantization
from keras_bn.quantization.conv2d_batch_normalization import Conv2DBatchNormalization


@keras.saving.register_keras_serializable(package="keras_bn")
class DepthwiseConv2DBatchNormalization(Conv2DBatchNormalization):
    """A DepthwiseConv2D followed by BatchNormalization, trained with BN folded into a quantized
    kernel.

    The layer that quantization-aware training puts in place of a `DepthwiseConv2D ->
    BatchNormalization` pair. Output channel `c * depth_multiplier + k` comes from input channel
    `c` and kernel slice `kernel[:, :, c, k]`; with `a` per output channel and `Q` the symmetric
    per-output-channel fake quantization of that slice, it computes what
    `keras_bn.Conv2DBatchNormalization` computes with `depthwise_conv` in place of `conv`
    (details in `keras_bn.quantization.FoldedBatchNormalization`).

    Args:
        kernel_size, strides, padding, depth_multiplier, data_format, dilation_rate, use_bias,
            depthwise_initializer, bias_initializer: as for `keras.layers.DepthwiseConv2D`
            (no activation: BN follows the convolution).
        **kwargs: BN's and quantization's arguments as for `keras_bn.Conv2DBatchNormalization`,
            and base layer keyword arguments.

    Call arguments:
        inputs: a rank-4 tensor.
        training: Python boolean: training (batch statistics, updates) or inference.

    Example:

    >>> layer = keras_bn.DepthwiseConv2DBatchNormalization(3, padding="same")
    >>> y = layer(np.zeros((8, 32, 32, 16), "float32"), training=True)
    """

    def __init__(self, kernel_size, depth_multiplier=1, depthwise_initializer="glorot_uniform",
                 **kwargs):
        kwargs.pop("filters", None)
        kwargs.pop("groups", None)
        super().__init__(
            filters=1, kernel_size=kernel_size, kernel_initializer=depthwise_initializer, **kwargs
        )
        self.depth_multiplier = int(depth_multiplier)

    def build_kernel(self, input_shape):
        channel_axis = self.output_channel_axis(4)
        channels = input_shape[channel_axis]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be known. Received: input_shape="
                f"{tuple(input_shape)}"
            )
        self.filters = channels * self.depth_multiplier
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={channel_axis: channels})
        self.kernel = self.add_weight(
            shape=(*self.kernel_size, channels, self.depth_multiplier),
            name="kernel",
            initializer=self.kernel_initializer,
        )
        return self.filters

    def scale_kernel(self, kernel, a):
        return kernel * ops.reshape(a, kernel.shape[2:])

    def quantize_kernel(self, kernel):
        # One grid per output channel c * depth_multiplier + k: the slices kernel[:, :, c, k].
        shape = kernel.shape
        flat = ops.reshape(kernel, (shape[0], shape[1], shape[2] * shape[3]))
        flat = fake_quantization.fake_quantize_kernel(flat, self.weight_bits, axis=-1)
        return ops.reshape(flat, shape)

    def linear(self, x, kernel):
        return ops.depthwise_conv(
            x,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )

    def linear_layer(self):
        return keras.layers.DepthwiseConv2D(
            self.kernel_size, strides=self.strides, padding=self.padding,
            depth_multiplier=self.depth_multiplier, data_format=self.data_format,
            dilation_rate=self.dilation_rate, use_bias=True, name=self.name, dtype="float32",
        )

    def compute_output_shape(self, input_shape):
        channels = input_shape[self.output_channel_axis(4)]
        self.filters = channels * self.depth_multiplier
        return super().compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        for name in ("filters", "groups"):
            config.pop(name)
        config["depthwise_initializer"] = config.pop("kernel_initializer")
        config["depth_multiplier"] = self.depth_multiplier
        return config
