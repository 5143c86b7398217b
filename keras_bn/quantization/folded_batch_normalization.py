"""The base of the QAT layers: a linear layer and its BN, trained with BN folded into the kernel."""

import keras
from keras import initializers, ops

# The shifted moments of keras_bn.BatchNormalization: keras.ops.moments is E[z^2] - E[z]^2 on
# torch, which cancels when |mean| is large against the standard deviation.
from keras_bn.batch_normalization import _shifted_moments
from keras_bn.quantization import fake_quantization


class FoldedBatchNormalization(keras.layers.Layer):
    """A linear layer (convolution, dense) followed by BN, trained with BN folded into its
    fake-quantized kernel: the computation shared by `Conv2DBatchNormalization` and
    `DenseBatchNormalization`, which say how the kernel is built, scaled per output channel and
    applied.

    In training (`training=True` on a trainable layer), with `a = gamma / sqrt(moving_variance +
    epsilon)` per output channel and `Q` the per-output-channel symmetric fake quantization of the
    kernel (`fake_quantization.fake_quantize_kernel`):

    `z = linear(x, Q(kernel * a)) / a + bias`, then Algorithm 1 of Ioffe & Szegedy (2015) on `z`:
    `y = gamma * (z - mu_B) / sqrt(sigma2_B + epsilon) + beta` with the batch statistics of `z`,
    gradients flowing through them, and the moving statistics updated as
    `keras_bn.BatchNormalization` updates them (`moving = momentum * moving + (1 - momentum) *
    batch_value`; the unbiased batch variance unless `unbiased_variance=False`). Dividing by `a`
    undoes the scale that the quantizer saw, so the batch statistics are those of the float
    layer up to the rounding of the kernel (Jacob et al. 2018, Sec. 3.2; PyTorch's `_ConvBnNd`).

    In inference (`training=False` or `None`, or `trainable=False`), and in training once
    `freeze_statistics()` (or `keras_bn.freeze_bn_statistics`) has been called, it is the folded,
    weight-quantized layer that deployment runs:
    `y = linear(x, Q(kernel * a)) + B(beta - a * moving_mean + a * bias)`, where `B` rounds the
    folded bias to the grid of the integer layer's accumulator, `input_step * kernel_step[c]`
    (the int32 bias of onnxruntime's QLinearConv), when the input is quantized, and is the
    identity otherwise.
    Frozen, it still trains the kernel, gamma and beta, and no longer updates the moving
    statistics (PyTorch's `freeze_bn_stats`).

    A channel with `gamma = 0` has `a = 0`: its deployed kernel is 0 and its output `beta`. In
    training its kernel is scaled by `1 / sqrt(moving_variance + epsilon)` in place of `a` (its
    output is `beta` all the same), so nothing divides by 0 and `gamma` keeps its gradient.

    With `activation_bits`, the input `x` is fake-quantized first to the unsigned per-tensor grid
    (`fake_quantization.fake_quantize_activations`), over the range `[input_min, input_max]`:
    in training, the range moves towards each batch's minimum and maximum,
    `input_min = activation_momentum * input_min + (1 - activation_momentum) * min(x)` (and the
    same for the maximum; the first training batch sets them), and the batch is quantized with the
    updated range; inference uses the range as it is, and leaves `x` in float while no training
    batch has set it.

    Args:
        use_bias, kernel_initializer, bias_initializer: as for the linear layer.
        momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
            moving_mean_initializer, moving_variance_initializer, unbiased_variance: as for
            `keras_bn.BatchNormalization`, on the linear layer's channel axis.
        weight_bits: bits of the kernel's integer grid (2 to 16), or `None` for a float kernel.
        activation_bits: bits of the input's integer grid (2 to 16), or `None` for a float input.
        activation_momentum: momentum of the moving input range.
        target: the int8 deployment target whose grid the layer trains on (`"cpu"`,
            `"cpu-vnni"`, `"tensorrt"`, whose activation grid is signed with zero point 0;
            `keras_bn.prepare_qat` sets it and export writes the file for it), or `None` when
            not said.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Weights, in order: `kernel`, `bias` (with `use_bias`), `gamma` (with `scale`), `beta` (with
    `center`), `moving_mean`, `moving_variance`, `input_min`, `input_max`, `statistics_frozen`
    (1.0 once frozen).

    Reference:
        - [Jacob et al., 2018](https://arxiv.org/abs/1712.05877), Sec. 3.2.
        - [Krishnamoorthi, 2018](https://arxiv.org/abs/1806.08342), Sec. 2.7.
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167), Algorithms 1 and 2.
    """

    # Lets keras_bn.estimate_population_statistics find the layer's BN statistics.
    has_batch_statistics = True

    def __init__(
        self,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        unbiased_variance=True,
        weight_bits=8,
        activation_bits=8,
        activation_momentum=0.99,
        target=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.unbiased_variance = bool(unbiased_variance)
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.activation_bits = check_bits(activation_bits, "activation_bits")
        self.activation_momentum = float(activation_momentum)
        self.target = None if target is None else str(target)

    # What a subclass defines.

    def build_kernel(self, input_shape):
        """Creates `self.kernel` for `input_shape`; returns the number of output channels."""
        raise NotImplementedError

    def linear(self, x, kernel):
        """The linear layer applied to float32 `x` with `kernel`."""
        raise NotImplementedError

    def output_channel_axis(self, rank):
        """The (non-negative) channel axis of an output of `rank`."""
        return rank - 1

    def scale_kernel(self, kernel, a):
        """`kernel` with output channel `c` multiplied by `a[c]`."""
        return kernel * a

    def quantize_kernel(self, kernel):
        """`kernel` on the per-output-channel grid (output channels on its last axis)."""
        return fake_quantization.fake_quantize_kernel(kernel, self.weight_bits, axis=-1)

    def linear_layer(self):
        """A new, unbuilt float Keras layer (Conv2D, DepthwiseConv2D, Dense) with a bias that
        computes `linear(x, kernel) + bias`."""
        raise NotImplementedError

    # The shared computation.

    def folded_weights(self):
        """The kernel and bias of the deployed layer, as NumPy float32 arrays: `Q(kernel * a)`
        and `beta - a * moving_mean + a * bias` (on the accumulator's grid when the input is
        quantized), what inference computes with (`linear_layer().set_weights(...)` takes
        them)."""
        input_range = self.input_range()
        input_step = None if input_range is None else self._input_step(*input_range)
        kernel, bias, _, deployed = self._folded(ops.cast(self.moving_mean, "float32"),
                                                 ops.cast(self.moving_variance, "float32"),
                                                 input_step)
        kernel = self.scale_kernel(kernel, deployed)
        return [ops.convert_to_numpy(kernel).astype("float32"),
                ops.convert_to_numpy(bias).astype("float32")]

    def input_range(self):
        """`(minimum, maximum)` of the input's grid as Python floats (the learned range widened
        to hold 0), or `None` when the input stays in float: no `activation_bits`, or no training
        batch seen yet."""
        if self.activation_bits is None:
            return None
        minimum = ops.cast(self.input_min, "float32")
        maximum = ops.cast(self.input_max, "float32")
        if not ops.convert_to_numpy(ops.logical_or(minimum != 0.0, maximum != 0.0)):
            return None
        low, high = fake_quantization.activation_range(
            minimum, maximum, self.activation_bits, self.symmetric_activations)
        return float(ops.convert_to_numpy(low)), float(ops.convert_to_numpy(high))

    @property
    def symmetric_activations(self):
        """Whether the input's grid is signed with zero point 0 (the `tensorrt` target)."""
        return self.target in fake_quantization.SYMMETRIC_ACTIVATION_TARGETS

    def build(self, input_shape):
        self.channels = self.build_kernel(input_shape)
        shape = (self.channels,)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(shape=shape, name="bias", initializer=self.bias_initializer)
        self.gamma = None
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer
            )
        self.beta = None
        if self.center:
            self.beta = self.add_weight(shape=shape, name="beta", initializer=self.beta_initializer)
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )
        # [0, 0] means "no training batch seen yet" (a learned range always holds 0 and more).
        self.input_min = self.add_weight(
            shape=(), name="input_min", initializer="zeros", trainable=False, autocast=False
        )
        self.input_max = self.add_weight(
            shape=(), name="input_max", initializer="zeros", trainable=False, autocast=False
        )
        # A variable rather than a Python flag: compiled training steps read it at run time, and
        # it is saved with the weights.
        self.statistics_frozen = self.add_weight(
            shape=(), name="statistics_frozen", initializer="zeros", trainable=False,
            autocast=False,
        )

    def freeze_statistics(self, frozen=True):
        """Trains with the population statistics from now on (`frozen=False` undoes it)."""
        self.statistics_frozen.assign(1.0 if frozen else 0.0)

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        training = bool(training) and self.trainable
        input_step = None
        if self.activation_bits is not None:
            x, input_step = self._quantize_input(x, training)
        gamma = self._vector(self.gamma, 1.0)
        beta = self._vector(self.beta, 0.0)
        # Copies: the values this step computes with, before the updates below assign the
        # variables in place (torch's autograd refuses a saved tensor changed in place).
        moving_mean = ops.copy(ops.cast(self.moving_mean, "float32"))
        moving_variance = ops.copy(ops.cast(self.moving_variance, "float32"))
        kernel, folded_bias, kernel_scale, deployed = self._folded(
            moving_mean, moving_variance, input_step
        )
        linear = self.linear(x, kernel)
        rank = len(linear.shape)
        bias = self._vector(self.bias, 0.0)
        folded = linear * self._per_channel(deployed, rank) + self._per_channel(folded_bias, rank)
        if not training:
            return ops.cast(folded, self.compute_dtype)

        z = linear / self._per_channel(kernel_scale, rank) + self._per_channel(bias, rank)
        axes = [i for i in range(rank) if i != self.output_channel_axis(rank)]
        mean, variance = _shifted_moments(z, axes)
        mean, variance = ops.reshape(mean, (-1,)), ops.reshape(variance, (-1,))
        normalized = (z - self._per_channel(mean, rank)) * self._per_channel(
            gamma * ops.rsqrt(variance + self.epsilon), rank
        ) + self._per_channel(beta, rank)
        frozen = ops.cast(self.statistics_frozen, "float32")
        outputs = frozen * folded + (1.0 - frozen) * normalized

        if self.unbiased_variance:
            count = ops.cast(ops.size(z) // self.channels, "float32")
            variance = variance * count / ops.maximum(count - 1.0, 1.0)
        # Frozen statistics stay as they are: momentum 1.
        momentum = frozen + (1.0 - frozen) * self.momentum
        self.moving_mean.assign(moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(moving_variance * momentum + variance * (1.0 - momentum))
        return ops.cast(outputs, self.compute_dtype)

    def _folded(self, moving_mean, moving_variance, input_step):
        """The quantized kernel `Q(kernel * s)`, the folded bias `B(beta - a * moving_mean +
        a * bias)` (Algorithm 2's affine map folded into the kernel; `B` rounds to the
        accumulator's grid where `input_step` is not None), the kernel's scale `s` and the factor
        `d` that makes `Q(kernel * s) * d` the deployed kernel `Q(kernel * a)`, per output
        channel.

        `s = a` and `d = 1` where `a = gamma / sqrt(moving_variance + epsilon)` is not 0. Where
        it is 0 (`gamma = 0`), the deployed kernel is 0 and the output `beta`, but dividing by
        `a` in training would give 0 / 0: that channel's kernel is scaled by `s = 1 /
        sqrt(moving_variance + epsilon)` (as if `gamma` were 1), so its `z` and batch
        statistics are still those of the float layer up to rounding, and `d = gamma` (0, with
        the gradient `gamma` has in `Q(kernel * gamma * s) ~ gamma * Q(kernel * s)`). PyTorch's
        `_ConvBnNd` gives NaN there unless its `_forward_slow` is switched on."""
        gamma = self._vector(self.gamma, 1.0)
        a = gamma / ops.sqrt(moving_variance + self.epsilon)
        a_is_zero = ops.equal(a, 0.0)
        kernel_scale = ops.where(a_is_zero, ops.rsqrt(moving_variance + self.epsilon), a)
        deployed = ops.where(a_is_zero, gamma, 1.0)
        kernel = self.scale_kernel(ops.cast(self.kernel, "float32"), kernel_scale)
        if self.weight_bits is not None:
            kernel = self.quantize_kernel(kernel)
        bias = self._vector(self.beta, 0.0) - a * moving_mean + a * self._vector(self.bias, 0.0)
        if input_step is not None:
            bias = self._quantize_bias(bias, self.scale_kernel(kernel, deployed), input_step)
        return kernel, bias, kernel_scale, deployed

    def _quantize_input(self, x, training):
        minimum = ops.copy(ops.cast(self.input_min, "float32"))
        maximum = ops.copy(ops.cast(self.input_max, "float32"))
        seen = ops.logical_or(ops.not_equal(minimum, 0.0), ops.not_equal(maximum, 0.0))
        if training:
            batch_min = ops.stop_gradient(ops.min(x))
            batch_max = ops.stop_gradient(ops.max(x))
            m = self.activation_momentum
            minimum = ops.where(seen, m * minimum + (1.0 - m) * batch_min, batch_min)
            maximum = ops.where(seen, m * maximum + (1.0 - m) * batch_max, batch_max)
            self.input_min.assign(minimum)
            self.input_max.assign(maximum)
            quantized = fake_quantization.fake_quantize_activations(
                x, minimum, maximum, self.activation_bits, self.symmetric_activations
            )
            return quantized, self._input_step(minimum, maximum)
        quantized = fake_quantization.fake_quantize_activations(
            x, minimum, maximum, self.activation_bits, self.symmetric_activations
        )
        step = ops.where(seen, self._input_step(minimum, maximum), 0.0)
        return ops.where(seen, quantized, x), step

    def _input_step(self, minimum, maximum):
        low, high = fake_quantization.activation_range(
            minimum, maximum, self.activation_bits, self.symmetric_activations)
        return (high - low) / (2.0**self.activation_bits - 1.0)

    def _quantize_bias(self, bias, kernel, input_step):
        """`bias` rounded to the grid of the integer layer's accumulator, `input_step *
        kernel_step[c]` per output channel (what onnxruntime's QLinearConv adds, as int32), with a
        straight-through gradient; left as it is where the input is not quantized (step 0).
        `kernel` is the quantized kernel; a channel of zeros counts as kernel step 1."""
        if self.weight_bits is None:
            return bias
        step = ops.stop_gradient(input_step * self._kernel_step(kernel))
        safe = ops.where(step > 0.0, step, 1.0)
        rounded = ops.round(bias / safe) * safe
        return ops.where(step > 0.0, bias + ops.stop_gradient(rounded - bias), bias)

    def _kernel_step(self, kernel):
        """The step of each output channel's grid of the quantized `kernel`; 1 for a channel of
        zeros."""
        levels = 2.0 ** (self.weight_bits - 1) - 1.0
        largest = ops.max(ops.abs(ops.reshape(kernel, (-1, self.channels))), axis=0)
        return ops.where(largest > 0.0, largest / levels, 1.0)

    def _vector(self, variable, default):
        if variable is None:
            return ops.full((self.channels,), default, dtype="float32")
        return ops.cast(variable, "float32")

    def _per_channel(self, vector, rank):
        shape = [1] * rank
        shape[self.output_channel_axis(rank)] = -1
        return ops.reshape(vector, shape)

    def get_config(self):
        return {
            **super().get_config(),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "unbiased_variance": self.unbiased_variance,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "activation_momentum": self.activation_momentum,
            "target": self.target,
        }


def check_bits(value, name):
    """`value` if it is a bit width from 2 to 16 or None, else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
        raise ValueError(
            f"`{name}` must be an integer from 2 to 16, or None for float. Received: {value!r}"
        )
    return value
