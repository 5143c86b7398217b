"""The paper's training variants (Sec. 4.2.1) and the compiled model of each.

`VARIANTS` maps the variant names of the paper (Inception, BN-Baseline, BN-x5, BN-x30,
BN-x5-Sigmoid, and "Baseline" for the MNIST network of Sec. 4.1) onto the changes each makes;
`build_variant` turns a network family ("mlp" or "inception") and a variant into a model compiled
for momentum SGD.
"""
import dataclasses

import keras
import numpy as np

from examples import devices, models


@dataclasses.dataclass(frozen=True)
class Variant:
    """The paper's changes to the Inception baseline (Sec. 4.2.1), as factors and switches."""

    name: str
    batch_norm: bool
    lr_multiplier: float = 1.0
    dropout: bool = True  # the baseline's dropout (40% for Inception)
    local_response_normalization: bool = True
    l2_multiplier: float = 1.0
    decay_speedup: float = 1.0
    reshuffle: bool = False  # reshuffle the training set every epoch ("thorough shuffling")
    activation: str | None = None  # None: the network's own (ReLU for Inception, sigmoid for MLP)


_BN_X = dict(
    batch_norm=True,
    dropout=False,
    local_response_normalization=False,
    l2_multiplier=0.2,
    decay_speedup=6.0,
    reshuffle=True,
)
VARIANTS = {
    "Inception": Variant("Inception", batch_norm=False),
    "Baseline": Variant("Baseline", batch_norm=False),  # the MNIST network without BN
    "BN-Baseline": Variant("BN-Baseline", batch_norm=True),
    "BN-x5": Variant("BN-x5", lr_multiplier=5.0, **_BN_X),
    "BN-x30": Variant("BN-x30", lr_multiplier=30.0, **_BN_X),
    "BN-x5-Sigmoid": Variant("BN-x5-Sigmoid", lr_multiplier=5.0, activation="sigmoid", **_BN_X),
}
# The baseline of each network family, and the variants that make sense for it (the MNIST network
# is already sigmoid and has no dropout, LRN or L2 to remove).
BASELINE = {"inception": "Inception", "mlp": "Baseline"}
FAMILY_VARIANTS = {
    "inception": ("Inception", "BN-Baseline", "BN-x5", "BN-x30", "BN-x5-Sigmoid"),
    "mlp": ("Baseline", "BN-Baseline", "BN-x5", "BN-x30"),
}


def build_variant(variant, config, input_shape, classes, seed=0):
    """A compiled model of `variant` for the network family of `config`.

    Args:
        variant: a name of `VARIANTS` or a `Variant`.
        config: an `examples.training.Config` (family, learning rate and its decay, momentum,
            widths, BN momentum, data parallelism, compilation).
        input_shape: the shape of one example.
        classes: the number of classes.
        seed: seeds the weights (`keras.utils.set_random_seed`).

    Returns:
        A `keras.Model` that outputs logits (`models.with_softmax` adds the softmax for
        deployment), compiled with momentum SGD on an exponentially decaying learning rate.
    """
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    keras.utils.set_random_seed(seed)
    if config.family == "mlp":
        model = models.mnist_mlp(
            input_dim=int(np.prod(input_shape)),
            classes=classes,
            batch_norm=variant.batch_norm,
            activation=variant.activation or "sigmoid",
            bn_momentum=config.bn_momentum,
            synchronized=devices.synchronized_batch_norm(config.data_parallel),
            seed=seed,
            softmax=False,
        )
    elif config.family == "inception":
        common = dict(
            input_shape=input_shape,
            classes=classes,
            alpha=config.alpha,
            activation=variant.activation or "relu",
            dropout=config.dropout if variant.dropout else 0.0,
            local_response_normalization=variant.local_response_normalization,
            l2=config.l2 * variant.l2_multiplier,
            softmax=False,
        )
        if variant.batch_norm:
            model = models.bn_inception(
                bn_momentum=config.bn_momentum,
                synchronized=devices.synchronized_batch_norm(config.data_parallel),
                **common,
            )
        else:
            model = models.inception_baseline(**common)
    else:
        raise ValueError(f"`family` must be 'inception' or 'mlp'. Received: {config.family!r}")
    schedule = keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate * variant.lr_multiplier,
        decay_steps=max(1.0, (config.decay_horizon or config.steps) / variant.decay_speedup),
        decay_rate=config.decay_rate,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=config.momentum),
        # Logits, not probabilities: on JAX (and torch) the cross-entropy of a softmax output
        # clips the probability, so a class whose probability underflows gets no gradient and is
        # never predicted again (BN-x5's MLP stuck at 79.7% on 2 of 3 seeds, Keras's BN alike);
        # TensorFlow alone recovers the logits behind a softmax.
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=config.jit_compile,
        run_eagerly=config.run_eagerly,
    )
    return model
