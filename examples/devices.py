"""Where the examples compute: the local devices, and data parallelism across them.

Data parallelism uses each backend's own engine: `tf.distribute.MirroredStrategy` with
synchronized BN on TensorFlow, `keras.distribution.DataParallel` on JAX (where XLA computes BN's
batch statistics over the global batch). Torch has no engine here.
"""
import contextlib

import keras
import numpy as np


def synchronized_batch_norm(data_parallel):
    """BN's `synchronized` argument for data-parallel training: True under TensorFlow, where each
    replica would otherwise normalise by its own share of the batch; JAX's DataParallel computes
    statistics over the global batch already, and Keras accepts the argument only on TensorFlow."""
    return bool(data_parallel) and keras.backend.backend() == "tensorflow"


@contextlib.contextmanager
def data_parallel_scope(enabled=True):
    """Data parallelism over every local device with the backend's own engine.

    TensorFlow: a `tf.distribute.MirroredStrategy` scope (build and compile the model inside it;
    BN built with `synchronized=True` then uses global batch statistics). JAX:
    `keras.distribution.DataParallel` over `jax.devices()` (XLA computes BN's batch statistics over
    the global batch). Other backends, or `enabled=False`: no-op.
    """
    backend = keras.backend.backend()
    if not enabled:
        yield None
    elif backend == "tensorflow":
        with _mirrored_strategy().scope() as strategy:
            yield strategy
    elif backend == "jax":
        previous = keras.distribution.distribution()
        distribution = keras.distribution.DataParallel()
        keras.distribution.set_distribution(distribution)
        try:
            yield distribution
        finally:
            keras.distribution.set_distribution(previous)
    else:
        raise ValueError(f"Data parallelism supports tensorflow and jax. Backend: {backend!r}")


_STRATEGIES = []


def _mirrored_strategy():
    """One MirroredStrategy per process: a second one would reuse the first one's collective-op
    keys, and replicas would exchange tensors of different variables."""
    if not _STRATEGIES:
        import tensorflow as tf

        _STRATEGIES.append(
            tf.distribute.MirroredStrategy(
                [d.name for d in tf.config.list_logical_devices("GPU")]
                or [d.name for d in tf.config.list_logical_devices("CPU")]
            )
        )
    return _STRATEGIES[0]


def local_devices():
    """The devices the backend computes on, as strings: "gpu:0 (NVIDIA H100 80GB HBM3)", "cpu"...

    (`keras.distribution.list_devices` has no torch implementation.)"""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()]
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())]
        return ["cpu"]
    return [str(d) for d in keras.distribution.list_devices()]


def replica_count():
    """How many replicas the current data-parallel scope trains on (1 outside one)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    return int(np.prod(distribution.device_mesh.shape))
