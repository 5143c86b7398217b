"""Exact population statistics: Algorithm 2, lines 9-11 of Ioffe & Szegedy (2015)."""

import itertools
import json
import logging
import zlib

import keras
import numpy as np
from keras import ops

from keras_bn import _keras_internals

logger = logging.getLogger(__name__)

# What each process tells the others before every step of a multi-process estimate.
_HAS_BATCH, _DONE, _FAILED = 0.0, 1.0, 2.0


def estimate_population_statistics(model, data, steps=None, batch_size=32, verbose="auto"):
    """Sets every BN layer's moving statistics to the population statistics of Algorithm 2.

    Runs the network in training mode over training mini-batches B (so that every BN layer sees
    the activations it sees in training, normalized by the layers before it with their batch
    statistics) and sets, for every trainable BN layer (`keras_bn.BatchNormalization` and
    `keras.layers.BatchNormalization`, nested models included):
    `moving_mean = E_B[mu_B]` and `moving_variance = E_B[m / (m - 1) * sigma2_B]` (Algorithm 2,
    lines 9-11; the biased `E_B[sigma2_B]` for Keras's layer or `unbiased_variance=False`, as each
    layer's own moving average does). Batches are weighted by their number of examples, which is the
    paper's plain average when they all have the same size. No trainable weight changes, and every
    other non-trainable variable (dropout seeds, renorm's training statistics) is restored. If
    anything fails midway, the model is left exactly as it was; so it is when a batch gives some
    BN layer non-finite statistics (a NaN or inf in the data, or an activation that overflows):
    nothing is written and a `ValueError` names the layer and the batch.

    Every batch is checked against the model's declared inputs before it runs, on every backend
    and call: a batch of another rank or size (`(n, 16, 16)` for an `Input((8, 8, 1))`) raises a
    `ValueError` naming the input, the shape expected and the shape received. A batch of one
    example is refused: its variance is 0 for every BN after a Dense layer, and `m / (m - 1)` is
    undefined at m = 1.

    BN layers with `trainable=False` are frozen on purpose (fine-tuning) and are left as they are.
    Other training-mode behaviour (dropout) is active during the pass, as in training.

    In a multi-process JAX run (`jax.process_count() > 1`, as under
    `keras.distribution.DataParallel(auto_shard_dataset=False)`), every process calls it with its
    own shard of the training data and `batch_size` its share of a global batch, as `fit` takes
    them. Step k's global batch is the k-th batch of every process together, as training
    normalizes it: the network runs in training mode on the global array sharded over every
    process's devices, so each BN layer's `mu_B` and `sigma2_B` are those of the global batch,
    with m its size, and every process ends with the same statistics. Shards of different lengths
    lose nothing: a step where some process has no batch left (or the processes' batches differ
    in size, a short last batch) gathers the batches that exist, and that step's global batch is
    those together, run in every process. If it fails in one process, it raises in every process
    and changes no model.

    Args:
        model: A built Keras model containing BN layers.
        data: Training inputs: a NumPy array or tensor (split into batches of `batch_size`), a
            tuple `(x, y)` or `(x, y, sample_weight)` of arrays as `model.fit` takes them (only `x`
            is used), a dict of arrays for a model with named inputs, or any iterable of batches
            (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator, a list) whose elements are
            `x` or `(x, y[, sample_weight])`.
        steps: Number of batches to use; `None` uses all of `data` (an iterable that never ends
            needs `steps`). In a multi-process run, each process reads at most `steps` batches.
        batch_size: Batch size for array inputs; the paper's mini-batch size m (in a multi-process
            run, this process's share of it). Ignored for iterables. At least 2 in one process.
        verbose: `"auto"` or 1 shows a `keras.utils.Progbar`; 0 is silent.

    Returns:
        The number of batches used, an int: every batch of `data`, or `steps` of them when
        `data` has more (in a multi-process run, the number of global batches, the same in
        every process). The statistics average over them, each batch weighted by its size.

    Raises:
        ValueError: if the model has no trainable BN layer, is not built, `data` yields no batch,
            an argument is out of range, a batch does not fit the model's inputs or holds one
            example, or a batch gives a BN layer non-finite statistics (the message names the
            first such layer in graph order and the batch). The model is left as it was.

    Reference:
        [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167), Algorithm 2.

    Example:

    >>> keras_bn.estimate_population_statistics(model, x_train, batch_size=64)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built: call it on data or give it an Input.")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"`steps` must be a positive integer or None. Received: steps={steps!r}")
    check_batch_size(batch_size)
    layers = [
        layer
        for layer in _keras_internals.flatten_layers(model)  # nested models included, in order
        # has_batch_statistics: a layer that holds a BN inside (keras_bn's fused QAT layers), with
        # BN's momentum, moving_mean and moving_variance and its update rule.
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            or getattr(layer, "has_batch_statistics", False)
        )
        and layer.built
    ]
    frozen = [layer.name for layer in layers if not layer.trainable]
    layers = [layer for layer in layers if layer.trainable]
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no trainable BatchNormalization layer to estimate "
            f"population statistics for (frozen ones: {frozen or 'none'})."
        )

    saved_values = [ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    saved_momenta = [layer.momentum for layer in layers]
    # Size-weighted sums of every layer's (mu_B, sigma2_B), as one float64 vector.
    sums = np.zeros(sum(int(np.prod(v.shape)) for v in _statistics(layers)))
    examples = 0
    used = 0
    try:
        for layer in layers:
            # With momentum 0 a training step leaves exactly this batch's statistics in the
            # moving variables (mu_B, and sigma2_B with the layer's own variance convention).
            layer.momentum = 0.0
        forward = _training_forward(model, layers)
        total = steps if steps is not None else _length(data, batch_size)
        progbar = keras.utils.Progbar(total, verbose=0 if verbose == 0 else 1, unit_name="batch")
        steps_of = _global_steps if _is_multiprocess() else _local_steps
        # islice stops before reading batch `steps + 1`: a generator keeps it for the next call.
        batches = itertools.islice(Batches(data, batch_size), steps)
        for x, size, where, note in steps_of(model, batches):
            if size < 2:
                raise ValueError(
                    f"estimate_population_statistics() refuses {where}: it holds one example, "
                    "whose variance is 0 for every BN layer after a Dense layer (and Algorithm "
                    "2's m / (m - 1) is undefined at m = 1), so it would pull moving_variance "
                    "towards 0. No BN layer was changed. Use batches of at least 2 examples "
                    "(a batch_size that leaves no single example at the end, or `steps`)."
                )
            statistics = forward(x).astype("float64")
            _check_finite(model, layers, statistics, where, note)
            sums = sums + size * statistics
            examples += size
            used += 1
            progbar.update(used)
        if not used:
            raise ValueError("`data` yielded no batch: population statistics need training data.")
        averages = _per_statistic(sums / examples, layers)
        # A float32 (or float16) variable would store an average beyond its range as inf.
        with np.errstate(over="ignore"):
            stored = [a.astype(v.dtype).ravel() for a, v in zip(averages, _statistics(layers))]
        _check_finite(model, layers, np.concatenate(stored), f"the average over {used} batches")
    except BaseException:
        _restore(model, saved_values)
        raise
    finally:
        for layer, momentum in zip(layers, saved_momenta):
            layer.momentum = momentum

    _restore(model, saved_values)
    for layer, mean, variance in zip(layers, averages[0::2], averages[1::2]):
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        if getattr(layer, "renorm", False):
            stddev = np.sqrt(variance + layer.epsilon)
            layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))
    logger.info(
        "Estimated population statistics of %d BatchNormalization layers over %d batches "
        "(%d examples)%s.",
        len(layers),
        used,
        examples,
        f"; left {len(frozen)} frozen layers as they were" if frozen else "",
    )
    return used


def check_batch_size(batch_size):
    """Raises ValueError unless `batch_size` makes batches of at least 2 examples (in a
    multi-process run, global batches: `batch_size` is each process's share)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )
    if batch_size * _process_count() < 2:
        raise ValueError(
            "`batch_size` must be at least 2: a batch of one example has variance 0 for every BN "
            "layer after a Dense layer, and Algorithm 2's m / (m - 1) is undefined at m = 1. "
            "Received: batch_size=1"
        )


def check_inputs(model, x, where):
    """Raises ValueError unless the batch `x` fits `model`'s declared inputs: the same inputs, each
    of the declared rank and of the declared size in every dimension the model fixes.

    Keras checks this only where it traces a call: TensorFlow's relaxed `tf.function` shapes and
    JAX's `stateless_call` accept a batch of another shape, and BN then normalizes something
    else. A model without a known graph (subclassed) declares nothing and is not checked.

    Args:
        model: a built `keras.Model`.
        x: one batch of inputs (an array, a list or a dict of arrays).
        where: what the batch is, for the message (`"batch 3 (counting from 0)"`).
    """
    graph = _keras_internals.functional_graph(model)
    if graph is None or not (isinstance(graph, keras.Sequential)
                             or _keras_internals.is_functional(graph)):
        return
    declared = graph.input
    if isinstance(declared, dict) and isinstance(x, dict):
        missing = sorted(set(declared) - set(x))
        if missing:
            raise ValueError(
                f"estimate_population_statistics(): {where} lacks input(s) {missing} of model "
                f"{model.name!r}. Received the keys {sorted(x)}. No BN layer was changed."
            )
        pairs = [(name, declared[name], x[name]) for name in sorted(declared)]
    else:
        specs, arrays = keras.tree.flatten(declared), keras.tree.flatten(x)
        if len(specs) != len(arrays):
            raise ValueError(
                f"estimate_population_statistics(): model {model.name!r} takes {len(specs)} "
                f"input(s) ({', '.join(repr(s.name) for s in specs)}). Received: {where} with "
                f"{len(arrays)} array(s). No BN layer was changed."
            )
        pairs = [(spec.name, spec, array) for spec, array in zip(specs, arrays)]
    for name, spec, array in pairs:
        expected = tuple(spec.shape)
        received = tuple(int(d) for d in ops.shape(array))
        fits = len(received) == len(expected) and all(
            want is None or want == got for want, got in zip(expected[1:], received[1:])
        )
        if not fits:
            shown = ("batch",) + tuple("any" if d is None else d for d in expected[1:])
            raise ValueError(
                f"estimate_population_statistics(): {where} does not fit input {name!r} of "
                f"model {model.name!r}: expected shape {shown}. Received: {received}. No BN "
                "layer was changed. Give the data the model's input shape (the training data)."
            )


def _process_count():
    """The number of processes of JAX's multi-process runtime; 1 on other backends."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def _is_multiprocess():
    """Whether this is one of several processes of JAX's multi-process runtime."""
    return _process_count() > 1


def _local_steps(model, batches):
    """`(x, size, where, note)` per batch of a single process, each checked against the model."""
    for index, x in enumerate(batches):
        where = f"batch {index} (counting from 0)"
        check_inputs(model, x, where)
        yield x, _batch_length(x), where, _input_note(x)


def _global_steps(model, batches):
    """`(x, size, where, note)` per global batch of a multi-process JAX run, the same in every
    process; `x` is a global array sharded over every process's devices, or the gathered
    batches where the processes' batches differ in size (or some have none left).

    Before each step the processes tell each other, in one `process_allgather`, whether they
    have a batch, its size, its shapes and its non-finite input values, so that none enters the
    step's collective alone: every process stops when all are done, and raises when one fails.
    """
    import jax

    processes, me = jax.process_count(), jax.process_index()
    batches = iter(batches)
    structure = _declared_structure(model)
    for step in itertools.count():
        where = f"global batch {step} (counting from 0)"
        x, failure = None, None
        try:
            x = next(batches, None)
            if x is not None:
                check_inputs(model, x, f"batch {step} (counting from 0) of process {me}")
        except Exception as error:  # the others learn of it below, and every process raises
            failure = error
        arrays = [] if x is None else [np.asarray(ops.convert_to_numpy(a))
                                       for a in keras.tree.flatten(x)]
        structure = structure if x is None else x
        state = [_FAILED if failure is not None else _DONE if x is None else _HAS_BATCH,
                 len(arrays[0]) if arrays else 0, _non_finite(arrays), _signature(arrays)]
        table = _allgather_float64(np.array(state, "float64"))
        failed = np.flatnonzero(table[:, 0] == _FAILED).tolist()
        if failure is not None:
            raise failure
        if failed:
            raise ValueError(
                f"estimate_population_statistics() failed in process(es) {failed} of "
                f"{processes} at {where} (see their error); no BN layer was changed in process "
                f"{me} either."
            )
        present = np.flatnonzero(table[:, 0] == _HAS_BATCH)
        if not present.size:
            return
        signatures = set(table[present, 3].tolist())
        if len(signatures) > 1:
            raise ValueError(
                f"estimate_population_statistics(): at {where}, the batches of processes "
                f"{present.tolist()} hold arrays of different shapes beyond the batch axis or "
                "different dtypes, which cannot form one global batch. No BN layer was changed."
            )
        sizes = table[:, 1].astype(int)
        bad_inputs = {int(p): int(table[p, 2]) for p in present if table[p, 2]}
        note = "".join(f"; process {p}'s batch holds {n} non-finite input value(s)"
                       for p, n in bad_inputs.items())
        local_devices = jax.local_device_count()
        if present.size == processes and len(set(sizes.tolist())) == 1 and (
                sizes[0] % local_devices == 0):
            yield _sharded(x, arrays), int(sizes.sum()), where, note
        else:
            yield _gathered(structure, arrays, sizes), int(sizes.sum()), where, note


def _declared_structure(model):
    """The structure of the model's declared inputs (a process with no batch packs the gathered
    arrays in it), or None for one input or a model that declares none."""
    graph = _keras_internals.functional_graph(model)
    declared = getattr(graph, "input", None) if graph is not None else None
    return declared if isinstance(declared, (dict, list, tuple)) else None


def _sharded(x, arrays):
    """The global batch whose slice on this process is `x`, laid out as `fit` lays out its batches
    under the current `keras.distribution` (else split over every device of every process)."""
    import jax

    distribution = keras.distribution.distribution()
    shardings = []
    for array in arrays:
        if distribution is not None:
            global_shape = (array.shape[0] * jax.process_count(), *array.shape[1:])
            shardings.append(distribution.get_data_layout(global_shape).backend_layout)
        else:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
            shardings.append(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    global_arrays = [jax.make_array_from_process_local_data(sharding, array)
                     for sharding, array in zip(shardings, arrays)]
    return keras.tree.pack_sequence_as(x, global_arrays)


def _gathered(structure, arrays, sizes):
    """Every process's batch of this step together, in process order, as one NumPy batch in
    every process (a process without a batch gives none), packed like `structure`. Bytes
    travel, so no dtype is rounded."""
    present = np.flatnonzero(sizes)
    # Every process learns the shapes and dtypes from the first process with a batch.
    spec = _broadcast_spec(arrays, int(present[0]))
    longest = int(sizes.max())
    gathered = []
    for index, (shape, dtype) in enumerate(spec):
        row = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        local = np.zeros((longest, row), np.uint8)
        if arrays:
            array = np.ascontiguousarray(arrays[index], dtype)
            local[: len(array)] = array.view(np.uint8).reshape(len(array), row)
        table = _allgather(local)  # (processes, longest, row)
        batch = np.ascontiguousarray(np.concatenate([table[p, : sizes[p]] for p in present]))
        gathered.append(batch.view(dtype).reshape(-1, *shape))
    if structure is None:
        return gathered[0] if len(gathered) == 1 else gathered
    return keras.tree.pack_sequence_as(structure, gathered)


def _broadcast_spec(arrays, source):
    """`[(shape beyond the batch axis, dtype)]` of process `source`'s arrays, in every process."""
    import jax

    text = b""
    if jax.process_index() == source:
        text = json.dumps([[list(a.shape[1:]), a.dtype.str] for a in arrays]).encode()
    lengths = _allgather_float64(np.array([len(text)], "float64"))[:, 0].astype(int)
    buffer = np.zeros(int(lengths.max()), np.uint8)
    buffer[: len(text)] = np.frombuffer(text, np.uint8)
    text = _allgather(buffer)[source, : lengths[source]].tobytes().decode()
    return [(tuple(shape), np.dtype(dtype)) for shape, dtype in json.loads(text)]


def _allgather(array):
    """`array` of every process, stacked on a new first axis (JAX's `process_allgather`)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array))


def _allgather_float64(vector):
    """A float64 vector of every process, one row each. JAX without x64 would round float64 to
    float32 on the way: the bits travel as uint32."""
    import jax

    gathered = _allgather(np.ascontiguousarray(vector, "float64").view("uint32"))
    return np.ascontiguousarray(gathered).view("float64").reshape(jax.process_count(), -1)


def _signature(arrays):
    """A number that differs between batches of different shapes (beyond the batch axis) or
    dtypes, exact in float64."""
    return float(zlib.crc32(repr([(a.shape[1:], a.dtype.str) for a in arrays]).encode()))


def _non_finite(arrays):
    return float(sum(int(np.count_nonzero(~np.isfinite(a))) for a in arrays
                     if np.issubdtype(a.dtype, np.floating)))


def _check_finite(model, layers, statistics, where, note=""):
    """Raises ValueError naming the first of `layers` whose statistics in the flat vector
    `statistics` (each layer's mean, then its variance, as `_statistics` orders them) are not
    finite, and `where` they came from; `note` says what the batch's inputs held."""
    if np.isfinite(statistics).all():
        return
    start = 0
    for layer in layers:
        for variable in (layer.moving_mean, layer.moving_variance):
            size = int(np.prod(variable.shape))
            bad = int(np.count_nonzero(~np.isfinite(statistics[start : start + size])))
            if bad:
                name = "mean" if variable is layer.moving_mean else "variance"
                raise ValueError(
                    f"estimate_population_statistics() found non-finite statistics in "
                    f"{where}: BatchNormalization layer {layer.name!r} of model "
                    f"{model.name!r} gets a {name} with {bad} NaN or inf value(s)"
                    f"{note}. No BN layer was changed. Remove or repair the "
                    "non-finite examples (or find the layer whose activations overflow)."
                )
            start += size


def _input_note(x):
    """`"; the batch itself holds N non-finite input values"` when it does, else `""`."""
    arrays = [np.asarray(ops.convert_to_numpy(a)) for a in keras.tree.flatten(x)]
    bad = int(_non_finite(arrays))
    return f"; the batch itself holds {bad} non-finite input value(s)" if bad else ""


def _training_forward(model, layers):
    """A function `forward(x)` that runs `model` in training mode on a batch and returns the
    moving statistics of `layers` afterwards (the batch's, at momentum 0) as one float32 NumPy
    vector, compiled where the backend can.

    Compiling costs seconds on a real network, so the function is kept on the model and reused by
    later calls (one per evaluation during training, say). A trace bakes in which BN layers are
    trainable (and their momentum, always 0 here), so it is rebuilt when those flags change.
    Returning every statistic in one vector costs one device-to-host copy per batch instead of
    two reads per layer.
    """
    key = (keras.backend.backend(), tuple((id(layer), layer.trainable) for layer in layers))
    cached = getattr(model, "_keras_bn_population_forward", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    forward = _compile_training_forward(model, layers)
    # object.__setattr__: a plain attribute, out of Keras's tracking and saving.
    object.__setattr__(model, "_keras_bn_population_forward", (key, forward))
    return forward


def _statistics(layers):
    """moving_mean, moving_variance of each layer, in this order."""
    return [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]


def _per_statistic(vector, layers):
    """The flat float64 `vector` of every statistic, split and shaped like `_statistics(layers)`."""
    variables = _statistics(layers)
    sizes = [int(np.prod(v.shape)) for v in variables]
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return [part.reshape(v.shape) for part, v in zip(parts, variables)]


def _flat(values):
    return ops.concatenate([ops.reshape(ops.cast(v, "float32"), (-1,)) for v in values])


def _compile_training_forward(model, layers):
    backend = keras.backend.backend()
    statistics = _statistics(layers)
    if backend == "tensorflow":
        import tensorflow as tf

        # XLA halves the pass on CPU, where Keras would compile the model too ("auto"); not
        # under a distribution strategy, whose cross-replica reductions stay in the plain graph.
        jit = _keras_internals.model_supports_jit(model) and not tf.distribute.has_strategy()

        @tf.function(reduce_retracing=True, jit_compile=jit)
        def tf_forward(x):
            model(x, training=True)
            return _flat([v.value for v in statistics])  # read after the updates (auto deps)

        return lambda x: ops.convert_to_numpy(tf_forward(x))
    if backend == "jax":
        import jax

        variables = model.non_trainable_variables
        positions = [next(i for i, v in enumerate(variables) if v is s) for s in statistics]

        @jax.jit
        def stateless_forward(trainable_values, non_trainable_values, x):
            values = model.stateless_call(
                trainable_values, non_trainable_values, x, training=True
            )[1]
            return values, _flat([values[i] for i in positions])

        def forward(x):
            values, flat = stateless_forward(
                [v.value for v in model.trainable_variables], [v.value for v in variables], x
            )
            for variable, value in zip(variables, values):  # dropout's seed state moves on
                variable.assign(value)
            return np.asarray(flat)

        return forward

    def forward(x):
        if backend == "torch":
            import torch

            with torch.no_grad():
                model(x, training=True)
        else:
            model(x, training=True)
        return ops.convert_to_numpy(_flat(statistics))

    return forward


def _restore(model, values):
    for variable, value in zip(model.non_trainable_variables, values):
        variable.assign(value)


def _is_array(data):
    return isinstance(data, np.ndarray) or ops.is_tensor(data)


def _array_inputs(data):
    """The model inputs `x` when `data` is arrays (an array, a dict of arrays, or a tuple
    `(x, y[, sample_weight])` of arrays as model.fit takes them), else None (an iterable)."""
    if isinstance(data, tuple) and data and all(_is_array(item) for item in data):
        data = data[0]
    if _is_array(data) or (isinstance(data, dict) and all(map(_is_array, data.values()))):
        return data
    return None


class Batches:
    """The mini-batches of data in every form `estimate_population_statistics` takes.

    Arrays (a NumPy array or tensor, a dict of arrays, or a tuple `(x, y[, sample_weight])` of
    arrays as `model.fit` takes them) are split into batches of `batch_size`, labels alongside
    their inputs. An iterable of batches (a `tf.data.Dataset`, a generator, a list; a
    `keras.utils.PyDataset` is read by index) gives its elements, each `x` or
    `(x, y[, sample_weight])`. `export.quantization` calibrates int8 graphs on the same data.

    Args:
        data: the data, in one of the forms above.
        batch_size: the batch size of array data; iterables keep their own batches.
        steps: the most batches iterated; an iterator is never read past them. `None`: all.
        labels: iterate `(x, y)` pairs (`y` is `None` where the data holds no labels) rather
            than the inputs `x` alone.
        name: what the data is called in error messages.

    Attributes:
        inputs: the inputs `x` of array data, all of them (an array or a dict of arrays), or
            `None` for an iterable.
        count: the number of batches iteration gives, for a progress bar: at most `steps`,
            `steps` when an iterable does not say its length, `None` when neither is known.

    Raises:
        TypeError: on `iter()`, when `data` is neither arrays nor an iterable.

    Example:

    >>> [x.shape for x in Batches(np.zeros((70, 3)), batch_size=32)]
    [(32, 3), (32, 3), (6, 3)]
    """

    def __init__(self, data, batch_size, steps=None, labels=False, name="data"):
        self.data = data
        self.batch_size = batch_size
        self.steps = steps
        self.labels = labels
        self.name = name
        self.inputs = _array_inputs(data)
        count = _length(data, batch_size)
        if steps is not None:
            count = steps if count is None else min(count, steps)
        self.count = count

    def __iter__(self):
        pairs = self._array_pairs() if self.inputs is not None else self._element_pairs()
        batches = pairs if self.labels else (x for x, _ in pairs)
        return itertools.islice(batches, self.steps)

    def _array_pairs(self):
        data = self.data
        labels = data[1] if isinstance(data, tuple) and len(data) > 1 else None
        for start in range(0, _batch_length(self.inputs), self.batch_size):
            window = slice(start, start + self.batch_size)
            x = keras.tree.map_structure(lambda a, window=window: a[window], self.inputs)
            yield x, None if labels is None else labels[window]

    def _element_pairs(self):
        """`(x, y)` per element of an iterable, `y` None where it holds no labels; raises the
        TypeError of a non-iterable at once rather than on the first batch."""
        if isinstance(self.data, keras.utils.PyDataset):
            iterator = (self.data[index] for index in range(len(self.data)))
        else:
            try:
                iterator = iter(self.data)
            except TypeError:
                raise TypeError(
                    f"`{self.name}` must be an array, a tuple (x, y) of arrays, a dict of arrays "
                    f"or an iterable of batches. Received: {type(self.data).__name__}"
                ) from None
        return ((element[0], element[1] if len(element) > 1 else None)
                if isinstance(element, tuple) else (element, None) for element in iterator)


def _batch_length(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def _length(data, batch_size):
    """The number of batches in `data` when it is known, else None (the progress bar then
    counts)."""
    x = _array_inputs(data)
    if x is not None:
        return -(-_batch_length(x) // batch_size)
    try:
        return len(data)
    except TypeError:
        return None
