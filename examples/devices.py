"""Where the examples compute: the local devices, and data parallelism across them.

Data parallelism uses each backend's own engine: `tf.distribute.MirroredStrategy` with
synchronized BN on TensorFlow, `keras.distribution.DataParallel` on JAX (where XLA computes BN's
batch statistics over the global batch). Torch has no engine here.

Across processes (one per host, or several on one machine for a try), JAX's multi-process runtime
joins them (`initialize_processes`) and `keras.distribution.DataParallel(auto_shard_dataset=False)`
splits every global batch over the devices of all of them; each process feeds its own share.
TensorFlow stops at one host: Keras 3's `fit` under `MultiWorkerMirroredStrategy` fails
(keras-team/keras#20585).
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
        # Built after `initialize_processes`: DataParallel reads the process count when built.
        # Across processes each one feeds its own share of every batch (never the whole batch).
        distribution = keras.distribution.DataParallel(auto_shard_dataset=process_count() == 1)
        keras.distribution.set_distribution(distribution)
        try:
            yield distribution
        finally:
            keras.distribution.set_distribution(previous)
    else:
        raise ValueError(f"Data parallelism supports tensorflow and jax. Backend: {backend!r}")


def initialize_processes(coordinator, num_processes, process_id):
    """Join JAX's multi-process runtime as process `process_id` of `num_processes`.

    Call it before any JAX computation. `coordinator` is process 0's `host:port`, which every
    process must reach. On CPUs the processes exchange data over gloo. One process
    (`num_processes=1`) is a no-op on every backend.

    Raises:
        ValueError: for a process count, index or address out of range, and on the TensorFlow
            and torch backends, which have no multi-process path here.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(
            f"The number of processes must be a positive integer. Received: {num_processes!r}"
        )
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"The process index must be in 0..{num_processes - 1}. Received: {process_id!r}"
        )
    if num_processes == 1:
        return
    backend = keras.backend.backend()
    if backend == "tensorflow":
        raise ValueError(
            "Training across processes needs the JAX backend (KERAS_BACKEND=jax): Keras 3's fit "
            "under tf.distribute.MultiWorkerMirroredStrategy fails "
            "(https://github.com/keras-team/keras/issues/20585). On one TensorFlow host, use "
            f"--data-parallel. Received: {num_processes} processes, backend 'tensorflow'"
        )
    if backend != "jax":
        raise ValueError(
            "Training across processes needs the JAX backend (KERAS_BACKEND=jax). Received: "
            f"{num_processes} processes, backend {backend!r}"
        )
    if not coordinator or ":" not in str(coordinator):
        raise ValueError(
            "Training across processes needs the coordinator's address, host:port of process 0. "
            f"Received: {coordinator!r}"
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax.distributed.initialize rather than keras.distribution.initialize: the examples seed
    # their models themselves (`keras.utils.set_random_seed` in `build_variant`).
    jax.distributed.initialize(str(coordinator), num_processes=num_processes,
                               process_id=process_id)


def process_count():
    """The number of processes in the run (1 unless JAX's multi-process runtime joined more)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def process_index():
    """This process's index, 0 to `process_count() - 1`; process 0 writes every file."""
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


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
