"""Conv2D and BatchNormalization as one layer whose BN folds into the kernel during training."""

import keras
from keras import ops

from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization


@keras.saving.register_keras_serializable(package="keras_bn")
class Conv2DBatchNormalization(FoldedBatchNormalization):
    """A Conv2D followed by BatchNormalization, trained with BN folded into a quantized kernel.

    The layer that quantization-aware training puts in place of a `Conv2D -> BatchNormalization`
    pair, so that training sees the integer kernel that the deployed network will use, BN folded
    into it (Jacob et al. 2018, Sec. 3.2; Krishnamoorthi 2018, Sec. 2.7; PyTorch's `ConvBn2d`).
    With `a = gamma / sqrt(moving_variance + epsilon)` per output channel and `Q` the symmetric
    per-output-channel fake quantization of the kernel:

    - training: `z = conv(x, Q(kernel * a)) / a + bias`, then BN with the batch statistics of `z`
      (Algorithm 1), and the moving statistics updated;
    - inference, or training after `keras_bn.freeze_bn_statistics`:
      `y = conv(x, Q(kernel * a)) + (beta - a * moving_mean) + a * bias`, the folded layer (its
      bias on the integer accumulator's grid when the input is quantized);
    - with `activation_bits`, the input is fake-quantized (unsigned, per tensor) over a range
      learned by moving min/max.

    The details are those of `keras_bn.quantization.FoldedBatchNormalization`.

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate, groups, use_bias,
            kernel_initializer, bias_initializer: as for `keras.layers.Conv2D` (no activation:
            BN follows the convolution).
        momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
            moving_mean_initializer, moving_variance_initializer, unbiased_variance: as for
            `keras_bn.BatchNormalization`, on the convolution's channel axis.
        weight_bits: bits of the kernel's integer grid (2 to 16), or `None` for a float kernel.
        activation_bits: bits of the input's integer grid (2 to 16), or `None` for a float input.
        activation_momentum: momentum of the moving input range.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Weights, in order: `kernel`, `bias` (with `use_bias`), `gamma` (with `scale`), `beta` (with
    `center`), `moving_mean`, `moving_variance`, `input_min`, `input_max`, `statistics_frozen`.

    Call arguments:
        inputs: a rank-4 tensor.
        training: Python boolean: training (batch statistics, updates) or inference.

    Reference:
        - [Jacob et al., 2018](https://arxiv.org/abs/1712.05877), Sec. 3.2.
        - [Krishnamoorthi, 2018](https://arxiv.org/abs/1806.08342), Sec. 2.7.

    Example:

    >>> layer = keras_bn.Conv2DBatchNormalization(16, 3, padding="same")
    >>> y = layer(np.zeros((8, 32, 32, 3), "float32"), training=True)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate")
        padding = str(padding).lower()
        if padding not in ("valid", "same"):
            raise ValueError(f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        self.padding = padding
        data_format = data_format or keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "`data_format` must be 'channels_last', 'channels_first' or None. Received: "
                f"data_format={data_format!r}"
            )
        self.data_format = data_format
        self.groups = int(groups)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def output_channel_axis(self, rank):
        return rank - 1 if self.data_format == "channels_last" else 1

    def build_kernel(self, input_shape):
        channel_axis = self.output_channel_axis(4)
        channels = input_shape[channel_axis]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be known. Received: input_shape="
                f"{tuple(input_shape)}"
            )
        if channels % self.groups or self.filters % self.groups:
            raise ValueError(
                "`groups` must divide both the input channels and `filters`. Received: "
                f"groups={self.groups}, input channels {channels}, filters={self.filters}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={channel_axis: channels})
        self.kernel = self.add_weight(
            shape=(*self.kernel_size, channels // self.groups, self.filters),
            name="kernel",
            initializer=self.kernel_initializer,
        )
        return self.filters

    def linear(self, x, kernel):
        return ops.conv(
            x,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )

    def linear_layer(self):
        return keras.layers.Conv2D(
            self.filters, self.kernel_size, strides=self.strides, padding=self.padding,
            data_format=self.data_format, dilation_rate=self.dilation_rate, groups=self.groups,
            use_bias=True, name=self.name, dtype="float32",
        )

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_last":
            spatial = input_shape[1:3]
        else:
            spatial = input_shape[2:4]
        out = []
        for size, kernel, stride, dilation in zip(
            spatial, self.kernel_size, self.strides, self.dilation_rate
        ):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // stride))
            else:
                out.append((size - dilation * (kernel - 1) - 1) // stride + 1)
        if self.data_format == "channels_last":
            return (input_shape[0], *out, self.filters)
        return (input_shape[0], self.filters, *out)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
        }


def _pair(value, name):
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"`{name}` must be an integer or a pair of integers. Received: {value!r}")
    return value
