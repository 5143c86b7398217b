"""Freeze a Keras model for inference: fold what folds, a constant affine for the rest.

At inference a Batch Normalization layer is the per-channel affine map of Algorithm 2, line 11
(Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167):

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps)) = a * x + b

`keras_bn.fold_batchnorm` moves `a` and `b` into the weights of the layer before the BN where that
is exact. Every BN it leaves (after an `Add`, a pooling, an input ...) becomes a `FrozenAffine`
holding the constants `a` and `b`, so the exported graph keeps one `Mul` and one `Add` for it and
no normalization arithmetic (`Sub`, `Div`, `Sqrt`, `Rsqrt`). Training-only layers (dropout, noise,
activity regularization) become `Identity` and every `training=` argument recorded in the graph is
dropped, so the frozen model computes the same thing whatever it is called with.
"""

import dataclasses
import logging
import math

import keras
import numpy as np
from keras import ops

import keras_bn
from keras_bn import _keras_internals, verification
from keras_bn.folding import inference_affine
from keras_bn.folding.graph import copy_operation
from keras_bn.quantization import deployment
from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization

logger = logging.getLogger(__name__)

# Layers that are the identity at inference and only act when `training=True`.
TRAINING_ONLY_LAYERS = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
)


@keras.saving.register_keras_serializable(package="keras_bn")
class FrozenAffine(keras.layers.Layer):
    """A per-channel affine map with constant coefficients: `y = scale * x + offset`.

    What an inference-mode Batch Normalization layer computes (Algorithm 2, line 11), with
    `scale = gamma / sqrt(moving_variance + epsilon)` and
    `offset = beta - moving_mean * scale` computed once from the population statistics.
    `export.freeze` puts one in place of every BN that cannot be folded into the layer before it.
    The coefficients are non-trainable weights, so the layer saves and loads with `.keras` files.

    Args:
        axis: Integer, the channel axis the coefficients apply to. Defaults to `-1`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`).

    Call arguments:
        inputs: A tensor whose `axis` dimension is the number of channels.

    Reference:
        [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167), Algorithm 2.

    Example:

    >>> layer = FrozenAffine(axis=-1)
    >>> layer.build((None, 3))
    >>> layer.set_weights([np.array([1.0, 2.0, 3.0]), np.zeros(3)])
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(
                f"FrozenAffine expects an integer `axis`. Received: axis={axis!r}"
            )
        self.axis = axis
        self.supports_masking = True
        self.scale = None
        self.offset = None

    def build(self, input_shape):
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"FrozenAffine axis {self.axis} is out of range for inputs of rank {ndim}. "
                f"Received: input_shape={input_shape}"
            )
        axis = self.axis % ndim
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                "FrozenAffine needs a known number of channels on its axis. "
                f"Received: axis={self.axis}, input_shape={input_shape}"
            )
        self.input_spec = keras.InputSpec(ndim=ndim, axes={axis: channels})
        self.scale = self.add_weight(
            shape=(channels,), name="scale", initializer="ones", trainable=False,
            autocast=False,
        )
        self.offset = self.add_weight(
            shape=(channels,), name="offset", initializer="zeros", trainable=False,
            autocast=False,
        )
        # Broadcast the coefficients along `axis`; a channels-last layer needs no reshape.
        self._broadcast_shape = None if axis == ndim - 1 else [
            channels if i == axis else 1 for i in range(ndim)
        ]

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        scale = ops.cast(self.scale, "float32")
        offset = ops.cast(self.offset, "float32")
        if self._broadcast_shape is not None:
            scale = ops.reshape(scale, self._broadcast_shape)
            offset = ops.reshape(offset, self._broadcast_shape)
        return ops.cast(x * scale + offset, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@dataclasses.dataclass
class FreezeReport:
    """What `freeze` did to each layer, by name.

    Attributes:
        folded: `(bn_name, producer_name)` pairs folded by `keras_bn.fold_batchnorm`.
        frozen: `(bn_name, reason)` pairs: BN layers replaced by a `FrozenAffine`, with the reason
            folding gave for leaving them.
        removed: names of training-only layers (dropout, noise) replaced by `Identity`.
        quantized: names of QAT layers (`keras_bn.Conv2DBatchNormalization` and its kind)
            replaced by their deployed form: a fixed-range input quantizer and a plain layer
            holding the folded, quantized kernel (`keras_bn.quantization.deployment`).
        rewritten: `(name, how)` pairs: layers computed another, equal way that tf2onnx
            converts (`gelu_with_erf`, a grouped convolution as a depthwise one or as one
            convolution per group).
        fold_max_error: the largest difference `fold_batchnorm` measured between the folded and
            the original model, or `None` when folding was skipped or not verified.
    """

    folded: list = dataclasses.field(default_factory=list)
    frozen: list = dataclasses.field(default_factory=list)
    removed: list = dataclasses.field(default_factory=list)
    quantized: list = dataclasses.field(default_factory=list)
    rewritten: list = dataclasses.field(default_factory=list)
    fold_max_error: float = None


def freeze(model, fold=True, verify=True, tolerance=None):
    """Return an inference-only copy of `model`, its BN folded or frozen into constants.

    Steps: `keras_bn.fold_batchnorm(model, verify=verify)` folds every BN that directly follows a
    foldable layer; every QAT layer (`keras_bn.prepare_qat`) becomes its deployed form, a
    fixed-range input quantizer over the learned range and a plain layer holding the folded,
    quantized kernel; every remaining BN (ours or Keras's) becomes a `FrozenAffine` with the
    constants of Algorithm 2, line 11; dropout and noise layers become `Identity`; `training=`
    arguments recorded in the graph are dropped. The input model is not modified; the result
    shares no weights with it, is not compiled (no optimizer state) and carries a
    `freeze_report` (`FreezeReport`).

    Args:
        model: a built Functional or Sequential `keras.Model` (nested Functional/Sequential models
            are frozen too).
        fold: fold BN into the preceding layer first (`True`), or only freeze (`False`: every BN
            becomes a `FrozenAffine`, which ONNX runtimes may still fuse into a neighbouring
            convolution).
        verify: passed to `fold_batchnorm`, which then checks the folded model against the
            original on random inputs.
        tolerance: passed to `fold_batchnorm`; None picks the tolerance of the least precise
            compute dtype among the model's layers.

    Returns:
        A new `keras.Model` with a `freeze_report` attribute.

    Raises:
        TypeError: `model` is not a `keras.Model`, or is a subclassed model
            (`keras_bn.verification.check_graph_model`).
        ValueError: a Sequential `model` has no known input shape; a BN layer holds a
            non-finite gamma, beta, moving mean or moving variance, or a negative moving variance
            (the message names it; nothing is built); or a BN hides inside a custom layer where
            it cannot be replaced.
        keras_bn.VerificationError: with `verify`, folding changed the model's outputs (a
            `ValueError`).
    """
    verification.check_graph_model(model, "freeze()")
    verification.check_batchnorm_statistics(model, "freeze()")
    report = FreezeReport()
    source = model
    if fold and _batch_normalizations(model):
        source = keras_bn.fold_batchnorm(model, verify=verify, tolerance=tolerance)
        fold_report = source.fold_report
        report.folded = [tuple(pair) for pair in fold_report.folded]
        report.fold_max_error = fold_report.max_error
        left_reasons = dict(fold_report.left)
    else:
        left_reasons = {}

    names = _qualified_names(source)  # "head/bn" for a BN inside the nested model "head"
    originals = {}
    replacements = set()  # ids of the FrozenAffine and Identity layers put in

    def clone_layer(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            frozen = FrozenAffine(axis=layer.axis, name=layer.name, dtype=layer.dtype_policy.name)
            replacements.add(id(frozen))
            scale, offset = inference_affine(layer)
            originals[id(frozen)] = (frozen, [scale.astype("float32"), offset.astype("float32")])
            name = names.get(id(layer), layer.name)
            reason = left_reasons.get(name, "not folded: fold=False")
            report.frozen.append((name, reason))
            return frozen
        if isinstance(layer, FoldedBatchNormalization):
            deployed, weights = deployment.deployed_layer(layer)
            report.quantized.append(names.get(id(layer), layer.name))
            originals[id(deployed)] = (deployed, weights)
            return deployed
        if isinstance(layer, TRAINING_ONLY_LAYERS):
            report.removed.append(names.get(id(layer), layer.name))
            identity = keras.layers.Identity(name=layer.name, dtype=layer.dtype_policy.name)
            replacements.add(id(identity))
            return identity
        if not isinstance(layer, keras.layers.Layer):  # a keras.ops call (`x + 3.0`, ...)
            if type(layer).__name__ == "Gelu" and getattr(layer, "approximate", True) is False:
                report.rewritten.append((layer.name, "exact GELU with Erf"))
                return keras.layers.Activation(gelu_with_erf, name=layer.name)
            return copy_operation(layer)
        copy, weights, how = _convertible_copy(layer)
        if how:
            report.rewritten.append((names.get(id(layer), layer.name), how))
        originals[id(copy)] = (copy, weights)
        return copy

    def call_without_training(layer, *args, **kwargs):
        if id(layer) in replacements:
            return layer(args[0])  # BN's mask= and training= mean nothing to a constant map
        kwargs.pop("training", None)
        if _is_add_operation(layer):
            args = _scalars_as_arrays(args)
        return layer(*args, **kwargs)

    if isinstance(source, keras.Sequential):
        # An explicit input also covers a Sequential built with build() and no keras.Input,
        # whose clone would otherwise come back unbuilt.
        frozen_model = keras.models.clone_model(
            source, clone_function=clone_layer, recursive=True,
            input_tensors=keras.Input(batch_shape=source.inputs[0].shape,
                                      dtype=source.inputs[0].dtype),
        )
    else:
        frozen_model = keras.models.clone_model(
            source, clone_function=clone_layer, call_function=call_without_training,
            recursive=True,
        )
    frozen_model = _without_optimizer(frozen_model)
    for layer, weights in originals.values():
        layer.set_weights(weights)

    left = [layer.name for layer in _batch_normalizations(frozen_model)]
    if left:
        raise ValueError(
            f"freeze could not replace the BatchNormalization layer(s) {left}: they sit inside a "
            "custom layer or subclassed model whose graph cannot be rewritten. Build the model "
            "from Functional or Sequential parts, or fold those layers by hand."
        )
    frozen_model.freeze_report = report
    logger.info(
        "freeze: %d BN folded, %d frozen to constants, %d QAT layers deployed, %d training-only "
        "layers removed", len(report.folded), len(report.frozen), len(report.quantized),
        len(report.removed),
    )
    return frozen_model


@keras.saving.register_keras_serializable(package="keras_bn")
def gelu_with_erf(x):
    """The exact GELU `x * Phi(x)` written as `0.5 * x * (1 + erf(x / sqrt(2)))`.

    Keras's exact GELU (`keras.activations.gelu`, `approximate=False`) lowers in TensorFlow to
    `0.5 * x * erfc(-x / sqrt(2))`, and tf2onnx has no ONNX form for `Erfc`; ONNX has `Erf`. Both
    compute the same function; for large negative `x` the `erf` form rounds to 0 where `erfc`
    keeps a value below `|x| * 1e-7`.

    Reference:
        [Hendrycks & Gimpel, 2016](https://arxiv.org/abs/1606.08415), Section 2.
    """
    x = ops.convert_to_tensor(x)
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


class _GroupsAsSplits:
    """A grouped convolution computed as one plain convolution per group, concatenated.

    Keras runs a grouped convolution in TensorFlow through a `jit_compile` function (TensorFlow's
    CPU kernel lacks groups), which stays a `StatefulPartitionedCall` tf2onnx cannot convert. The
    per-group convolutions take the same kernel, split along its output channels, and compute the
    same sums. The ONNX graph holds a `Split`, one `Conv` per group and a `Concat` (a graph pass
    that joins them into one `Conv` with `group` is yet to be written); a grouped convolution of
    one channel per group becomes a depthwise convolution instead (`_convertible_copy`).
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1:
            return super().convolution_op(inputs, kernel)
        axis = -1 if self.data_format == "channels_last" else 1
        return ops.concatenate([
            super(_GroupsAsSplits, self).convolution_op(part, part_kernel)
            for part, part_kernel in zip(ops.split(inputs, self.groups, axis=axis),
                                         ops.split(kernel, self.groups, axis=-1))
        ], axis=axis)


@keras.saving.register_keras_serializable(package="keras_bn")
class GroupsAsSplitsConv1D(_GroupsAsSplits, keras.layers.Conv1D):
    """`keras.layers.Conv1D` with its groups computed one convolution each (`_GroupsAsSplits`)."""


@keras.saving.register_keras_serializable(package="keras_bn")
class GroupsAsSplitsConv2D(_GroupsAsSplits, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with its groups computed one convolution each (`_GroupsAsSplits`)."""


@keras.saving.register_keras_serializable(package="keras_bn")
class GroupsAsSplitsConv3D(_GroupsAsSplits, keras.layers.Conv3D):
    """`keras.layers.Conv3D` with its groups computed one convolution each (`_GroupsAsSplits`)."""


_GROUPS_AS_SPLITS = {
    keras.layers.Conv1D: GroupsAsSplitsConv1D,
    keras.layers.Conv2D: GroupsAsSplitsConv2D,
    keras.layers.Conv3D: GroupsAsSplitsConv3D,
}
_DEPTHWISE = {keras.layers.Conv1D: keras.layers.DepthwiseConv1D,
              keras.layers.Conv2D: keras.layers.DepthwiseConv2D}


def _convertible_copy(layer):
    """A fresh copy of `layer` that tf2onnx converts, its weights, and how it differs or `None`.

    A grouped convolution whose every group is one input channel (ConvNeXt's) becomes the
    depthwise convolution it is, other grouped convolutions one convolution per group
    (`_GroupsAsSplits`); an exact GELU activation becomes `gelu_with_erf`. Each computes what the
    original does.
    """
    how = []
    weights = layer.get_weights()
    if type(layer) in _GROUPS_AS_SPLITS and layer.groups > 1:
        config = layer.get_config()
        channels = layer.kernel.shape[-2] * layer.groups
        if type(layer) in _DEPTHWISE and layer.groups == channels and layer.padding != "causal":
            # Conv kernel (..., 1, groups * multiplier): output channel c * multiplier + m reads
            # input channel c, as the depthwise kernel (..., channels, multiplier) does.
            multiplier = layer.filters // layer.groups
            copy = _DEPTHWISE[type(layer)](
                kernel_size=layer.kernel_size, strides=layer.strides, padding=layer.padding,
                depth_multiplier=multiplier, data_format=layer.data_format,
                dilation_rate=layer.dilation_rate, activation=config["activation"],
                use_bias=layer.use_bias, name=layer.name, dtype=layer.dtype_policy.name,
            )
            kernel = weights[0]
            weights[0] = kernel.reshape(kernel.shape[:-2] + (channels, multiplier))
            how.append(f"grouped convolution ({layer.groups} groups of 1 channel) as depthwise")
        else:
            copy = _GROUPS_AS_SPLITS[type(layer)].from_config(config)
            how.append(f"grouped convolution as {layer.groups} convolutions")
    else:
        copy = copy_operation(layer)
    if getattr(copy, "activation", None) is keras.activations.gelu:
        copy.activation = gelu_with_erf
        how.append("exact GELU with Erf")
    return copy, weights, "; ".join(how) or None


def _is_add_operation(operation):
    """Whether `operation` is the `keras.ops.add` of `x + y` in a functional graph (not a layer)."""
    return not isinstance(operation, keras.layers.Layer) and type(operation).__name__ == "Add"


def _scalars_as_arrays(args):
    """`args` with each Python number beside a floating-point tensor made a one-element array of
    that tensor's dtype, which broadcasts, and rounds, as the number does.

    tf2onnx's transpose optimizer fails on an `Add` of a scalar constant to a convolution's output
    (`x + 3.0` in MobileNetV3's hard-swish: `max()` of the constant's empty shape, tf2onnx 1.17)
    and then skips the whole graph, leaving a pair of `Transpose`s around every convolution; a
    constant of shape `(1,)` takes its ordinary path.
    """
    floats = [arg for arg in args if isinstance(arg, keras.KerasTensor)
              and keras.backend.is_float_dtype(arg.dtype)]
    if not floats:
        return args
    dtype = keras.backend.standardize_dtype(floats[0].dtype)
    return tuple(
        np.full((1,), arg, dtype=dtype)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool) else arg
        for arg in args
    )


def _without_optimizer(clone):
    """`clone` uncompiled, over the same layers.

    `clone_model` compiles its copy, with a fresh optimizer, whenever the source was compiled (as
    it is with `fold=False`); a frozen model is for inference only.
    """
    if not clone.compiled:
        return clone
    if isinstance(clone, keras.Sequential):
        inputs = keras.Input(batch_shape=clone.inputs[0].shape, dtype=clone.inputs[0].dtype)
        return keras.Sequential([inputs, *clone.layers], name=clone.name,
                                trainable=clone.trainable)
    return keras.Model(clone.input, clone.output, name=clone.name, trainable=clone.trainable)


def _batch_normalizations(model):
    return [
        layer for layer in _keras_internals.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _qualified_names(model, prefix=""):
    """`{id(layer): "outer/inner/name"}` for the layers of nested Functional/Sequential models."""
    names = {}
    for layer in model.layers:
        names[id(layer)] = prefix + layer.name
        if isinstance(layer, keras.Sequential) or _keras_internals.is_functional(layer):
            names.update(_qualified_names(layer, f"{prefix}{layer.name}/"))
    return names
