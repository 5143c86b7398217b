import keras
from keras import ops

from keras_bn import _keras_internals


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch Normalization as the paper defines it (Ioffe & Szegedy 2015).

    A drop-in replacement for `keras.layers.BatchNormalization`: the same arguments, defaults and
    weights in the same order (`gamma`, `beta`, `moving_mean`, `moving_variance`, then the renorm
    weights), so `set_weights(other.get_weights())` works both ways.

    In training (`training=True` on a trainable layer) it applies Algorithm 1 with the mini-batch
    statistics, over the `m` values each channel has in the batch:
    `mu_B = mean(x)`, `sigma2_B = mean((x - mu_B) ** 2)` (biased),
    `y = gamma * (x - mu_B) / sqrt(sigma2_B + epsilon) + beta`,
    with gradients flowing through `mu_B` and `sigma2_B` (Sec. 3), and updates the moving statistics
    with the Keras convention `moving = momentum * moving + (1 - momentum) * batch_value`.
    The moving variance averages the **unbiased** `m / (m - 1) * sigma2_B`, as Algorithm 2 does
    (Keras averages the biased `sigma2_B`; `unbiased_variance=False` restores that). For `m = 1` the
    correction factor is taken as 1.

    In inference (`training=False` or `None`, or `trainable=False` whatever `training` says) it
    applies the population statistics only, as the fixed affine map of Algorithm 2:
    `y = gamma / sqrt(moving_variance + epsilon) * x + (beta - gamma * moving_mean /
    sqrt(moving_variance + epsilon))`, and updates nothing. For the exact population statistics of
    Algorithm 2 (lines 9-11) rather than moving averages, see
    `keras_bn.estimate_population_statistics`.

    On the TensorFlow backend, training with the channel axis right after the batch axis or last
    (any rank from 2 to 5; other ranks are reshaped to rank 4 for free) and no mask, `synchronized`,
    `renorm` or `virtual_batch_size`, runs TensorFlow's fused kernel (`FusedBatchNormV3`), several
    times faster than the generic path; every other case, and every other backend, runs the generic
    `keras.ops` path. The two are tested to agree.

    Args:
        axis: Integer, the channel axis (the one that is not reduced). `-1` for `channels_last`
            inputs, `1` for `channels_first`. Inputs of rank 2 to 5 are supported.
        momentum: Momentum of the moving averages.
        epsilon: Small float added to the variance to avoid dividing by zero.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned scale `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer:
            Initializers of the four weights.
        beta_regularizer, gamma_regularizer: Optional regularizers.
        beta_constraint, gamma_constraint: Optional constraints.
        renorm: Whether to use Batch Renormalization (Ioffe 2017), as Keras 3.15 has it. The
            corrections `r` and `d` use the biased batch statistics, as that paper does; the
            inference statistics follow `unbiased_variance`.
        renorm_clipping: Dictionary with optional keys `"rmax"`, `"rmin"`, `"dmax"` clipping the
            renorm corrections.
        renorm_momentum: Momentum of the moving statistics that renorm uses in training.
        synchronized: If `True`, compute the statistics over the global batch of all replicas of a
            `tf.distribute` strategy (TensorFlow backend only). `m` is then the global count.
        unbiased_variance: If `True` (default), the moving variance averages the unbiased batch
            variance `m / (m - 1) * sigma2_B` (Algorithm 2, and PyTorch); `False` averages the
            biased `sigma2_B`, as `keras.layers.BatchNormalization` does.
        virtual_batch_size: Optional integer that divides the batch size. Training then normalizes
            each group of `virtual_batch_size` consecutive examples with its own statistics ("ghost"
            batches, as tf.keras 2 had it; tf.keras 2 grouped strided examples, this layer groups
            consecutive ones), and the moving statistics average the groups' statistics. Cannot be
            combined with `renorm`.
        fused: `None` (default) uses TensorFlow's fused kernel where the case allows; `False` never
            uses it; `True` requires it and raises if the backend or the case does not allow it
            (as tf.keras 2's argument of that name did).
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Input tensor of rank 2 to 5.
        training: Python boolean: training mode (mini-batch statistics) or inference mode
            (population statistics).
        mask: Optional boolean tensor of the input's shape without the channel (last) axis;
            masked-out values are left out of the statistics, as Keras does.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167), Algorithms 1 and 2.
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) for `renorm`.
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741) for `virtual_batch_size`.

    Example:

    >>> import keras, keras_bn
    >>> model = keras.Sequential([
    ...     keras.Input((32, 32, 3)),
    ...     keras.layers.Conv2D(16, 3, use_bias=False),
    ...     keras_bn.BatchNormalization(),
    ...     keras.layers.ReLU(),
    ... ])
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        unbiased_variance=True,
        virtual_batch_size=None,
        fused=None,
        **kwargs,
    ):
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            synchronized=synchronized,
            **kwargs,
        )
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
                raise TypeError(
                    "`virtual_batch_size` must be a positive integer or None. "
                    f"Received: virtual_batch_size={virtual_batch_size!r}"
                )
            if virtual_batch_size < 1:
                raise ValueError(
                    "`virtual_batch_size` must be a positive integer or None. "
                    f"Received: virtual_batch_size={virtual_batch_size}"
                )
            if renorm:
                raise ValueError(
                    "`renorm=True` cannot be combined with `virtual_batch_size`. "
                    f"Received: renorm=True, virtual_batch_size={virtual_batch_size}"
                )
        if fused not in (None, True, False):
            raise ValueError(f"`fused` must be None, True or False. Received: fused={fused!r}")
        if fused and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "`fused=True` needs the TensorFlow backend (its FusedBatchNormV3 kernel). "
                f"Received: fused=True with backend {keras.backend.backend()!r}; "
                "use fused=None to take the fused kernel where it exists."
            )
        self.unbiased_variance = bool(unbiased_variance)
        self.virtual_batch_size = virtual_batch_size
        self.fused = fused

    def build(self, input_shape):
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"`axis` is out of range for inputs of rank {rank} (shape {tuple(input_shape)}). "
                f"Received: axis={self.axis}"
            )
        self._channel_axis = self.axis % rank
        if self.fused and not self._fused_shape_allowed(rank):
            raise ValueError(
                "`fused=True` needs inputs of rank 2 to 5 with the channel axis at 1 or last, and "
                "no renorm, synchronized or virtual_batch_size. Received: "
                f"input shape {tuple(input_shape)}, axis={self.axis}, renorm={self.renorm}, "
                f"synchronized={self.synchronized}, "
                f"virtual_batch_size={self.virtual_batch_size}"
            )
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        if not (training and self.trainable):
            return self._normalize_with_population_statistics(inputs)
        if self._fused_applies(inputs, mask):
            outputs, mean, variance = self._fused_training(inputs)
        else:
            outputs, mean, variance = self._generic_training(inputs, mask)
        self._update_moving_statistics(mean, variance)
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "unbiased_variance": self.unbiased_variance,
            "virtual_batch_size": self.virtual_batch_size,
            "fused": self.fused,
        }

    # Inference: Algorithm 2, line 11.

    def _normalize_with_population_statistics(self, inputs):
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        scale = ops.rsqrt(ops.cast(self.moving_variance, x.dtype) + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, x.dtype)
        offset = -ops.cast(self.moving_mean, x.dtype) * scale
        if self.center:
            offset = offset + ops.cast(self.beta, x.dtype)
        rank = len(x.shape)
        outputs = x * _per_channel(scale, rank, self._channel_axis) + _per_channel(
            offset, rank, self._channel_axis
        )
        return ops.cast(outputs, self.compute_dtype)

    # Training: Algorithm 1.

    def _fused_shape_allowed(self, rank):
        # The kernel takes rank-4 NHWC/NCHW; other ranks with the channel axis right after the batch
        # axis or last are reshaped to that for free.
        return (
            2 <= rank <= 5
            and self._channel_axis in (1, rank - 1)
            and not (self.renorm or self.synchronized or self.virtual_batch_size)
        )

    def _fused_applies(self, inputs, mask):
        if self.fused is False or keras.backend.backend() != "tensorflow":
            return False
        return (
            mask is None
            and self._fused_shape_allowed(len(inputs.shape))
            and keras.backend.standardize_dtype(inputs.dtype)
            in ("float16", "bfloat16", "float32")
        )

    def _fused_training(self, inputs):
        from keras_bn import _tensorflow

        channels = inputs.shape[self._channel_axis]
        gamma = ops.cast(self.gamma, "float32") if self.scale else ops.ones((channels,))
        beta = ops.cast(self.beta, "float32") if self.center else ops.zeros((channels,))
        rank = len(inputs.shape)
        channels_first = self._channel_axis == 1 and rank > 2
        shape = ops.shape(inputs)
        if rank != 4:
            four_d = (shape[0], channels, -1, 1) if channels_first else (shape[0], -1, 1, channels)
            inputs = ops.reshape(inputs, four_d)
        outputs, mean, variance, count = _tensorflow.fused_batch_norm_training(
            inputs, gamma, beta, self.epsilon, channels_first=channels_first
        )
        if rank != 4:
            outputs = ops.reshape(outputs, shape)
        if not self.unbiased_variance:
            # The kernel returns m/(m-1) * sigma2_B; Keras's convention averages sigma2_B.
            variance = variance * (count - 1.0) / count
        return outputs, mean, variance

    def _generic_training(self, inputs, mask):
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        original_shape = ops.shape(x)
        channel_axis = self._channel_axis
        if self.virtual_batch_size:
            x, mask = self._split_into_ghost_batches(x, mask)
            channel_axis += 1
        rank = len(x.shape)
        axes = [i for i in range(rank) if i != channel_axis]
        if self.virtual_batch_size:
            axes.remove(0)  # one set of statistics per ghost batch
        mean, variance, count = self._moments(x, mask, axes)

        population_variance = variance
        if self.unbiased_variance:
            population_variance = variance * count / ops.maximum(count - 1.0, 1.0)
        mean_vector, variance_vector, population_variance = (
            self._to_channel_vector(statistic)
            for statistic in (mean, variance, population_variance)
        )

        gamma = ops.cast(self.gamma, x.dtype) if self.scale else None
        beta = ops.cast(self.beta, x.dtype) if self.center else None
        if self.renorm:
            r, d = _keras_internals.renorm_correction(self, mean_vector, variance_vector)
            gamma, beta = _keras_internals.compose_renorm(self, r, d, gamma, beta, x.dtype)
            self._update_renorm_statistics(mean_vector, variance_vector)
        # y = gamma * (x - mu_B) / sqrt(sigma2_B + eps) + beta, as two passes over x: the
        # per-channel scale and offset are tiny, and gradients still flow through mu_B and sigma2_B.
        scale = ops.rsqrt(variance + self.epsilon)
        if gamma is not None:
            scale = scale * _per_channel(gamma, rank, channel_axis)
        offset = -mean * scale
        if beta is not None:
            offset = offset + _per_channel(beta, rank, channel_axis)
        outputs = x * scale + offset
        if self.virtual_batch_size:
            outputs = ops.reshape(outputs, original_shape)
        return outputs, mean_vector, population_variance

    def _moments(self, x, mask, axes):
        """Per-channel mean, biased variance and value count m over `axes` (kept as size-1 dims)."""
        if mask is None:
            if self.synchronized:
                mean, variance = ops.moments(x, axes, keepdims=True, synchronized=True)
            else:
                mean, variance = _shifted_moments(x, axes)
            count = 1
            for axis in axes:
                count = count * ops.shape(x)[axis]
            count = ops.cast(count, x.dtype)
            if self.synchronized and keras.backend.backend() == "tensorflow":
                from keras_bn import _tensorflow

                count = count * _tensorflow.replicas_in_sync()
            return mean, variance, count
        if self.synchronized:
            raise ValueError(
                "`synchronized=True` does not support masks: the masked statistics would not be "
                "summed over replicas. Received a mask for an input of shape "
                f"{x.shape}; use synchronized=False or drop the mask."
            )
        weights = ops.broadcast_to(ops.expand_dims(ops.cast(mask, x.dtype), -1), ops.shape(x))
        count = ops.sum(weights, axes, keepdims=True)
        safe_count = ops.maximum(count, 1.0)
        mean = ops.sum(x * weights, axes, keepdims=True) / safe_count
        variance = ops.sum(ops.square(x - mean) * weights, axes, keepdims=True) / safe_count
        return mean, variance, count

    def _split_into_ghost_batches(self, x, mask):
        batch_size = x.shape[0]
        if batch_size is not None and batch_size % self.virtual_batch_size:
            raise ValueError(
                "`virtual_batch_size` must divide the batch size. Received: "
                f"virtual_batch_size={self.virtual_batch_size}, batch size {batch_size}"
            )
        shape = ops.shape(x)
        x = ops.reshape(x, (-1, self.virtual_batch_size, *shape[1:]))
        if mask is not None:
            mask = ops.reshape(mask, (-1, self.virtual_batch_size, *ops.shape(mask)[1:]))
        return x, mask

    def _to_channel_vector(self, statistic):
        """A statistic with size-1 reduced dims -> shape (channels,), averaged over ghost
        batches."""
        if self.virtual_batch_size:
            statistic = ops.mean(statistic, axis=0)
        return ops.reshape(statistic, (-1,))

    # Moving statistics.

    def _update_moving_statistics(self, mean, variance):
        if self.renorm:
            # Keras's renorm tracks the inference statistics as a moving standard deviation.
            stddev = ops.sqrt(variance + self.epsilon)
            _assign_moving_average(self.moving_mean, mean, self.momentum)
            _assign_moving_average(self.moving_stddev, stddev, self.momentum)
            moving_stddev = ops.cast(self.moving_stddev, "float32")
            self.moving_variance.assign(ops.relu(ops.square(moving_stddev) - self.epsilon))
            return
        _assign_moving_average(self.moving_mean, mean, self.momentum)
        _assign_moving_average(self.moving_variance, variance, self.momentum)

    def _update_renorm_statistics(self, mean, variance):
        # Only the statistics that renorm's corrections r and d use in training (biased, as the
        # renorm paper has them); the inference statistics are updated by the caller.
        _assign_moving_average(self.renorm_mean, mean, self.renorm_momentum)
        _assign_moving_average(
            self.renorm_stddev, ops.sqrt(variance + self.epsilon), self.renorm_momentum
        )


def _shifted_moments(x, axes):
    """Mean and biased variance over `axes` (kept as size-1 dims) in one pass over `x`.

    `sigma2 = E[(x - s)^2] - E[x - s]^2` holds for any constant `s`; the two sums are sibling
    reductions that XLA fuses into one pass (1.1-1.6x faster training steps than mean-then-variance
    on JAX). Shifting by one value of each channel from the batch (a constant for the gradient, so
    gradients stay exact) keeps `E[x - s]` within a few standard deviations, so the subtraction does
    not cancel catastrophically when the mean is large against the spread, as it would with `s = 0`.
    """
    first = tuple(slice(0, 1) if axis in axes else slice(None) for axis in range(len(x.shape)))
    shift = ops.stop_gradient(x[first])
    shifted = x - shift
    shifted_mean = ops.mean(shifted, axes, keepdims=True)
    variance = ops.maximum(
        ops.mean(ops.square(shifted), axes, keepdims=True) - ops.square(shifted_mean), 0.0
    )
    return shifted_mean + shift, variance


def _per_channel(vector, rank, channel_axis):
    """Reshapes a (channels,) vector to broadcast against a rank-`rank` tensor."""
    shape = [1] * rank
    shape[channel_axis] = -1
    return ops.reshape(vector, shape)


def _assign_moving_average(variable, value, momentum):
    """`variable = momentum * variable + (1 - momentum) * value`, the Keras convention."""
    value = ops.cast(value, variable.dtype)
    variable.assign(variable * momentum + value * (1.0 - momentum))
