"""The networks of the paper: BN-Inception (Sec. 4.2, Figure 5), its Inception baseline, and the
MNIST network of Sec. 4.1.

Every builder returns a functional `keras.Model` whose layers have stable names, so that tests and
the folding/export tools can find a conv and the BN that follows it (`<name>_conv`, `<name>_bn`,
`<name>_act`).

Reference: Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167
"""
import logging

import keras
import numpy as np
from keras import ops

import keras_bn

logger = logging.getLogger(__name__)

# Figure 5, one row per module: (name, #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3,
# pool type, pool projection, stride). A projection of None is the "pass through" max pool of the
# stride-2 modules 3c and 4e, which also have no 1x1 branch. "proj" marks the 4c/4d projections
# whose width is a parameter (see `bn_inception`).
_MODULES = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", None, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 160, 128, 160, 128, 160, "avg", "proj", 1),
    ("4d", 96, 128, 192, 160, 192, "avg", "proj", 1),
    ("4e", 0, 128, 192, 192, 256, "max", None, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)

STEMS = ("imagenet", "cifar", "digits")


@keras.saving.register_keras_serializable(package="keras_bn_examples")
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalization across channels, as in AlexNet and GoogLeNet (Caffe's LRN).

    `y = x / (k + alpha / size * sum_{c' in window(c)} x_{c'}^2) ** beta`, the window holding `size`
    neighbouring channels centred on `c`. Keras 3 has no such layer; this one uses `keras.ops` only.
    The paper's Inception baseline has it after the stem; the BN-x variants drop it (Sec. 4.2.1).

    Args:
        size: the number of channels in the window (odd).
        alpha, beta, k: the constants of the formula (Caffe's defaults for GoogLeNet).
    """

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0, **kwargs):
        super().__init__(**kwargs)
        if int(size) != size or size < 1 or size % 2 == 0:
            raise ValueError(f"`size` must be a positive odd integer. Received: size={size}")
        self.size = int(size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)

    def call(self, inputs):
        channels = inputs.shape[-1]
        radius = self.size // 2
        squared = ops.square(inputs)
        padding = [[0, 0]] * (len(inputs.shape) - 1) + [[radius, radius]]
        padded = ops.pad(squared, padding)
        window_sum = padded[..., 0:channels]
        for offset in range(1, self.size):
            window_sum = window_sum + padded[..., offset : offset + channels]
        return inputs / ops.power(self.k + self.alpha / self.size * window_sum, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "size": self.size,
            "alpha": self.alpha,
            "beta": self.beta,
            "k": self.k,
        }


def _width(channels, alpha):
    return max(1, int(round(channels * alpha)))


def _default_stem(input_shape):
    size = min(input_shape[0], input_shape[1])
    if size >= 64:
        return "imagenet"
    if size >= 16:
        return "cifar"
    return "digits"


class _Builder:
    """Holds the choices that every conv unit of one network shares: BN or bias, activation, L2."""

    def __init__(self, batch_norm, activation, l2, bn_momentum, bn_epsilon, synchronized,
                 kernel_initializer, bn_layer=keras_bn.BatchNormalization):
        self.kernel_initializer = kernel_initializer
        self.batch_norm = batch_norm
        self.bn_layer = bn_layer
        self.activation = activation
        self.regularizer = keras.regularizers.L2(l2) if l2 else None
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.synchronized = synchronized

    def conv(self, x, filters, kernel_size, name, strides=1, separable=False):
        """conv (no bias when BN follows, Sec. 3.2) -> BN -> nonlinearity."""
        common = dict(
            strides=strides,
            padding="same",
            use_bias=not self.batch_norm,
            name=f"{name}_conv",
        )
        if separable:
            x = keras.layers.SeparableConv2D(
                filters,
                kernel_size,
                depth_multiplier=8,
                depthwise_regularizer=self.regularizer,
                depthwise_initializer=self.kernel_initializer,
                pointwise_initializer=self.kernel_initializer,
                pointwise_regularizer=self.regularizer,
                **common,
            )(x)
        else:
            x = keras.layers.Conv2D(
                filters,
                kernel_size,
                kernel_regularizer=self.regularizer,
                kernel_initializer=self.kernel_initializer,
                **common,
            )(x)
        if self.batch_norm:
            x = self.bn_layer(
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                synchronized=self.synchronized,
                name=f"{name}_bn",
            )(x)
        return keras.layers.Activation(self.activation, name=f"{name}_act")(x)

    def module(self, x, spec, alpha, projection_4cd):
        name, n1x1, n3r, n3, nd3r, nd3, pool, projection, stride = spec
        if projection == "proj":
            projection = projection_4cd
        prefix = f"inception_{name}"
        branches = []
        if n1x1:
            branches.append(self.conv(x, _width(n1x1, alpha), 1, f"{prefix}_1x1"))
        b = self.conv(x, _width(n3r, alpha), 1, f"{prefix}_3x3_reduce")
        branches.append(self.conv(b, _width(n3, alpha), 3, f"{prefix}_3x3", strides=stride))
        b = self.conv(x, _width(nd3r, alpha), 1, f"{prefix}_double_3x3_reduce")
        b = self.conv(b, _width(nd3, alpha), 3, f"{prefix}_double_3x3a")
        branches.append(
            self.conv(b, _width(nd3, alpha), 3, f"{prefix}_double_3x3b", strides=stride)
        )
        pool_layer = keras.layers.AveragePooling2D if pool == "avg" else keras.layers.MaxPooling2D
        b = pool_layer(3, strides=stride, padding="same", name=f"{prefix}_pool")(x)
        if projection is not None:
            b = self.conv(b, _width(projection, alpha), 1, f"{prefix}_pool_proj")
        branches.append(b)
        # Post-nonlinearity concatenation, as in GoogLeNet and the paper's Figure 5.
        return keras.layers.Concatenate(name=f"{prefix}_concat")(branches)


def _inception(
    *,
    input_shape,
    classes,
    alpha,
    pool_projection_4cd,
    activation,
    stem,
    separable_stem,
    batch_norm,
    dropout,
    local_response_normalization,
    l2,
    bn_momentum,
    bn_epsilon,
    synchronized,
    kernel_initializer,
    name,
    bn_layer=keras_bn.BatchNormalization,
    softmax=True,
):
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, channels). Received: input_shape={input_shape}"
        )
    if not alpha > 0:
        raise ValueError(f"`alpha` must be positive. Received: alpha={alpha}")
    if activation not in ("relu", "sigmoid"):
        raise ValueError(
            f"`activation` must be 'relu' or 'sigmoid'. Received: activation={activation!r}"
        )
    stem = _default_stem(input_shape) if stem in (None, "auto") else stem
    if stem not in STEMS:
        raise ValueError(f"`stem` must be one of {STEMS} or 'auto'. Received: stem={stem!r}")
    build = _Builder(
        batch_norm, activation, l2, bn_momentum, bn_epsilon, synchronized, kernel_initializer,
        bn_layer,
    )

    inputs = keras.Input(input_shape, name="image")
    if stem == "imagenet":
        # 224x224 -> 112 -> 56 -> 28 at module 3a, as Figure 5.
        x = build.conv(inputs, _width(64, alpha), 7, "stem_conv1", strides=2,
                       separable=separable_stem)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool1")(x)
        x = build.conv(x, _width(64, alpha), 1, "stem_conv2_reduce")
        x = build.conv(x, _width(192, alpha), 3, "stem_conv2")
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool2")(x)
    else:
        # Small inputs: the same three convs at stride 1; one pool for 32x32 (stages at 16/8/4),
        # none for 8x8 digits (stages at 8/4/2).
        x = build.conv(inputs, _width(64, alpha), 3, "stem_conv1")
        x = build.conv(x, _width(64, alpha), 1, "stem_conv2_reduce")
        x = build.conv(x, _width(192, alpha), 3, "stem_conv2")
        if stem == "cifar":
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    if local_response_normalization:
        x = LocalResponseNormalization(name="stem_lrn")(x)
    for spec in _MODULES:
        x = build.module(x, spec, alpha, pool_projection_4cd)
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(
        classes,
        activation="softmax" if softmax else None,
        kernel_regularizer=build.regularizer,
        dtype="float32",  # softmax in float32 under mixed precision
        name="predictions",
    )(x)
    model = keras.Model(inputs, outputs, name=name)
    logger.info(
        "%s (alpha %g, %s stem, input %s): %d trainable parameters (paper: 13.6M in the text, "
        "~11.3M from Figure 5's table at alpha 1 and 224x224)",
        name, alpha, stem, input_shape,
        sum(int(np.prod(w.shape)) for w in model.trainable_weights),
    )
    return model


def bn_inception(
    input_shape=(224, 224, 3),
    classes=1000,
    alpha=1.0,
    pool_projection_4cd=128,
    activation="relu",
    stem="auto",
    separable_stem=False,
    dropout=0.0,
    local_response_normalization=False,
    l2=0.0,
    bn_momentum=0.99,
    bn_epsilon=1e-3,
    synchronized=False,
    kernel_initializer="he_normal",
    name="bn_inception",
    bn_layer=keras_bn.BatchNormalization,
    softmax=True,
):
    """BN-Inception, the network of the paper's Figure 5 (Sec. 4.2), built from `keras_bn` layers.

    Every conv is `conv (no bias) -> keras_bn.BatchNormalization -> activation`: BN sits before the
    nonlinearity and takes over the conv's bias (Sec. 3.2). Branches are concatenated after their
    nonlinearity; the stride-2 modules 3c and 4e have no 1x1 branch, put the stride in the 3x3 conv
    and in the second conv of the double-3x3 branch, and pass a 3x3/2 max pool through unprojected.
    The defaults (no dropout, no LRN) are the paper's BN-x5/BN-x30 networks; `dropout=0.4`,
    `local_response_normalization=True` and the baseline's L2 give its BN-Baseline.

    Parameter count. At `alpha=1`, 224x224x3 and 1000 classes this builder has 11,285,224
    trainable parameters with `pool_projection_4cd=128` (11,194,984 with 96): 11,265,192 (96:
    11,175,080) conv/dense weights and biases plus 20,032 BN gammas and betas; `count_params()` also
    counts the 20,032 moving statistics (11,305,256). Figure 5's table gives about 11.2-11.3M; the
    paper's text says 13.6M, a gap that no public source explains. With `separable_stem=True` (the
    paper's 7x7 separable conv, depth multiplier 8) the stem's first conv shrinks from 9,408 to
    2,712 weights.

    Args:
        input_shape: (height, width, channels). 224x224 is the paper's.
        classes: the number of classes of the softmax.
        alpha: width multiplier applied to every channel count (0.25 and 0.125 give whole
            numbers everywhere).
        pool_projection_4cd: width of the pool projection of modules 4c and 4d. 128 (default)
            follows the Caffe and PyTorch ports; 96 reproduces TF-slim's inception_v2 and the
            576-channel outputs printed in Figure 5 (with 128 they concatenate to 608).
        activation: "relu" (the paper) or "sigmoid" (the BN-x5-Sigmoid variant).
        stem: "imagenet" (7x7/2 conv, max pool, 1x1, 3x3, max pool: 224 -> 28), "cifar"
            (3x3, 1x1, 3x3, max pool: 32 -> 16), "digits" (no pooling: 8 -> 8), or "auto" to
            choose from the input size.
        separable_stem: use the paper's separable 7x7 conv in the "imagenet" stem.
        dropout: dropout rate before the classifier (0 for the BN-x variants).
        local_response_normalization: LRN after the stem (off for the BN-x variants).
        l2: L2 penalty on every kernel (the BN-x variants use the baseline's / 5).
        bn_momentum, bn_epsilon: the BN layers' arguments. At a few dozen steps per epoch use a
            momentum of 0.9, or estimate exact population statistics after training.
        synchronized: synchronise BN statistics across replicas under a `tf.distribute`
            strategy (TensorFlow backend; JAX data parallelism computes global statistics anyway).
        kernel_initializer: of every conv. He initialisation (default) keeps the signal of a
            deep ReLU network without BN alive: with Glorot's, the ~25-conv-deep baseline stays
            at chance on digits (GoogLeNet needed auxiliary classifiers), which would make the
            comparison with BN unfair.
        name: the model's name.
        bn_layer: the BN layer class; `keras.layers.BatchNormalization` builds the same network
            with Keras's layer, for speed comparisons.
        softmax: end in a softmax (class probabilities); False gives logits, for training with
            `from_logits=True` (see `examples.variants.build_variant`).

    Returns:
        A functional `keras.Model` from images to class probabilities (float32 softmax), or to
        float32 logits with `softmax=False`.

    Reference:
        Ioffe & Szegedy 2015, Sec. 4.2 and Appendix (Figure 5), https://arxiv.org/abs/1502.03167

    Example:
        >>> model = bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125)
        >>> model.output_shape
        (None, 10)
    """
    return _inception(
        input_shape=input_shape,
        classes=classes,
        alpha=alpha,
        pool_projection_4cd=pool_projection_4cd,
        activation=activation,
        stem=stem,
        separable_stem=separable_stem,
        batch_norm=True,
        dropout=dropout,
        local_response_normalization=local_response_normalization,
        l2=l2,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        synchronized=synchronized,
        kernel_initializer=kernel_initializer,
        name=name,
        bn_layer=bn_layer,
        softmax=softmax,
    )


def inception_baseline(
    input_shape=(224, 224, 3),
    classes=1000,
    alpha=1.0,
    pool_projection_4cd=128,
    activation="relu",
    stem="auto",
    separable_stem=False,
    dropout=0.4,
    local_response_normalization=True,
    l2=4e-5,
    kernel_initializer="he_normal",
    name="inception_baseline",
    softmax=True,
):
    """The paper's "Inception" baseline (Sec. 4.2.1): the network of `bn_inception` without BN.

    Convs have biases, 40% dropout precedes the classifier, local response normalization follows
    the stem (`LocalResponseNormalization`, written with `keras.ops`), and every kernel carries an
    L2 penalty. Arguments as `bn_inception` (He initialisation of the convs by default, which the
    deep network needs to train at all without BN).

    Reference:
        Ioffe & Szegedy 2015, Sec. 4.2.1, https://arxiv.org/abs/1502.03167
    """
    return _inception(
        input_shape=input_shape,
        classes=classes,
        alpha=alpha,
        pool_projection_4cd=pool_projection_4cd,
        activation=activation,
        stem=stem,
        separable_stem=separable_stem,
        batch_norm=False,
        dropout=dropout,
        local_response_normalization=local_response_normalization,
        l2=l2,
        bn_momentum=None,
        bn_epsilon=None,
        synchronized=False,
        kernel_initializer=kernel_initializer,
        name=name,
        softmax=softmax,
    )


def mnist_mlp(
    input_dim=784,
    classes=10,
    batch_norm=False,
    hidden_units=(100, 100, 100),
    activation="sigmoid",
    init_stddev=0.1,
    bn_momentum=0.99,
    synchronized=False,
    seed=None,
    name=None,
    softmax=True,
):
    """The MNIST network of Sec. 4.1: three fully-connected hidden layers of 100 sigmoid units.

    Weights start from small Gaussian values (`init_stddev`; the paper gives no scale). With
    `batch_norm=True` every hidden layer is `Dense (no bias) -> BN -> sigmoid`, BN on `Wu` right
    before the nonlinearity (Sec. 3.2). The input of the last hidden layer's sigmoids (Figure 1 b,
    c) is the output of the layer named `hidden3_bn` (BN) or `hidden3_dense` (no BN); see
    `sigmoid_input_layer`.

    Args:
        input_dim: the number of input features (784 for MNIST, 64 for scikit-learn digits).
        classes: the number of classes.
        batch_norm: add BN to each hidden layer.
        hidden_units: the widths of the hidden layers.
        activation: the hidden nonlinearity.
        init_stddev: the standard deviation of the Gaussian weight initialisation.
        bn_momentum: the BN layers' momentum.
        synchronized: synchronise BN across `tf.distribute` replicas.
        seed: seed of the weight initialisers.
        name: the model's name (default "mnist_bn" or "mnist_baseline").
        softmax: end in a softmax (class probabilities); False gives logits.

    Reference:
        Ioffe & Szegedy 2015, Sec. 4.1 and Figure 1, https://arxiv.org/abs/1502.03167
    """
    name = name or ("mnist_bn" if batch_norm else "mnist_baseline")
    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    for i, units in enumerate(hidden_units, start=1):
        init_seed = None if seed is None else seed + i
        x = keras.layers.Dense(
            units,
            use_bias=not batch_norm,
            kernel_initializer=keras.initializers.RandomNormal(stddev=init_stddev, seed=init_seed),
            name=f"hidden{i}_dense",
        )(x)
        if batch_norm:
            x = keras_bn.BatchNormalization(
                momentum=bn_momentum, synchronized=synchronized, name=f"hidden{i}_bn"
            )(x)
        x = keras.layers.Activation(activation, name=f"hidden{i}_act")(x)
    init_seed = None if seed is None else seed
    outputs = keras.layers.Dense(
        classes,
        activation="softmax" if softmax else None,
        kernel_initializer=keras.initializers.RandomNormal(stddev=init_stddev, seed=init_seed),
        dtype="float32",
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def with_softmax(model):
    """`model` (ending in logits) followed by a softmax: class probabilities for deployment. The
    layers are shared, so the result sees every later change to `model`'s weights."""
    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(model.output)
    return keras.Model(model.input, probabilities, name=model.name)


def sigmoid_input_layer(model):
    """The layer whose output is the input of the last hidden layer's nonlinearity (Fig. 1 b, c)."""
    activations = [layer for layer in model.layers if layer.name.endswith("_act")]
    if not activations:
        raise ValueError(f"Model {model.name!r} has no layer named '*_act'.")
    prefix = activations[-1].name[: -len("_act")]
    names = {layer.name for layer in model.layers}
    return model.get_layer(f"{prefix}_bn" if f"{prefix}_bn" in names else f"{prefix}_dense")
