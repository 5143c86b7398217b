"""Exact population statistics: Algorithm 2, lines 9-11 of Ioffe & Szegedy (2015)."""

import itertools
import logging

import keras
import numpy as np
from keras import ops

from keras_bn import _keras_internals

logger = logging.getLogger(__name__)


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

    BN layers with `trainable=False` are frozen on purpose (fine-tuning) and are left as they are.
    Other training-mode behaviour (dropout) is active during the pass, as in training.

    In a multi-process JAX run (`jax.process_count() > 1`, as under
    `keras.distribution.DataParallel(auto_shard_dataset=False)`), every process calls it with its
    own shard of the training data, as `fit` takes it; shards may hold different numbers of
    batches. Each process runs its own batches, and the sums of their statistics and example
    counts are added up across processes, so every process ends with the statistics of all shards
    together. If it fails in one process, it raises in every process and changes no model.

    Args:
        model: A built Keras model containing BN layers.
        data: Training inputs: a NumPy array or tensor (split into batches of `batch_size`), a
            tuple `(x, y)` or `(x, y, sample_weight)` of arrays as `model.fit` takes them (only `x`
            is used), a dict of arrays for a model with named inputs, or any iterable of batches
            (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator, a list) whose elements are
            `x` or `(x, y[, sample_weight])`.
        steps: Number of batches to use; `None` uses all of `data` (an iterable that never ends
            needs `steps`).
        batch_size: Batch size for array inputs; the paper's mini-batch size m. Ignored for
            iterables.
        verbose: `"auto"` or 1 shows a `keras.utils.Progbar`; 0 is silent.

    Returns:
        The number of batches used, an int: every batch of `data`, or `steps` of them when
        `data` has more (in a multi-process run, the sum over processes, each of which uses at
        most `steps`). The statistics average over them, each batch weighted by its size.

    Raises:
        ValueError: if the model has no trainable BN layer, is not built, `data` yields no batch,
            an argument is out of range, or a batch gives a BN layer non-finite statistics (the
            message names the first such layer in graph order and the batch; the model is left
            as it was).

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
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer. Received: {batch_size!r}")
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
        failure = None
        try:
            # islice stops before reading batch `steps + 1`: a generator keeps it for the next call.
            for x in itertools.islice(Batches(data, batch_size), steps):
                size = _batch_length(x)
                statistics = forward(x).astype("float64")
                _check_finite(model, layers, statistics, f"batch {used} (counting from 0)", x)
                sums = sums + size * statistics
                examples += size
                used += 1
                progbar.update(used)
        except Exception as error:
            # The other processes of a multi-process run wait for this one's sums: they learn
            # of the failure from them, and every process raises.
            if not _is_multiprocess():
                raise
            failure = error
        sums, examples, used = _sum_over_processes(sums, examples, used, failure is not None)
        if failure is not None:
            raise failure
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


def _is_multiprocess():
    """Whether this is one of several processes of JAX's multi-process runtime."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.process_count() > 1


def _sum_over_processes(sums, examples, used, failed):
    """`sums`, `examples` and `used` summed over the processes of a multi-process JAX run, where
    each process estimates on its own shard of the data (as `fit` takes it under
    `keras.distribution.DataParallel(auto_shard_dataset=False)`); unchanged in a single process.

    Every process must call it once per estimate, whatever its number of batches: the sums travel
    in one `process_allgather`. `failed` says this process failed; the others then raise a
    ValueError naming it.
    """
    if not _is_multiprocess():
        return sums, examples, used
    import jax
    from jax.experimental import multihost_utils

    local = np.concatenate([[float(failed), examples, used], sums]).astype("float64")
    # JAX without x64 would round float64 to float32 on the way: the bits travel as uint32.
    gathered = np.asarray(multihost_utils.process_allgather(local.view("uint32")))
    gathered = np.ascontiguousarray(gathered).view("float64").reshape(jax.process_count(), -1)
    failed_processes = np.flatnonzero(gathered[:, 0]).tolist()
    if failed_processes and not failed:
        raise ValueError(
            "estimate_population_statistics() failed in process(es) "
            f"{failed_processes} of {jax.process_count()} (see their error); no BN layer was "
            f"changed in process {jax.process_index()} either."
        )
    total = gathered.sum(axis=0)
    return total[3:], int(total[1]), int(total[2])


def _check_finite(model, layers, statistics, where, x=None):
    """Raises ValueError naming the first of `layers` whose statistics in the flat vector
    `statistics` (each layer's mean, then its variance, as `_statistics` orders them) are not
    finite, and `where` they came from."""
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
                    f"{_input_note(x)}. No BN layer was changed. Remove or repair the "
                    "non-finite examples (or find the layer whose activations overflow)."
                )
            start += size


def _input_note(x):
    """`"; the batch itself holds N non-finite input values"` when it does, else `""`."""
    if x is None:
        return ""
    bad = 0
    for array in keras.tree.flatten(x):
        array = np.asarray(ops.convert_to_numpy(array))
        if np.issubdtype(array.dtype, np.floating):
            bad += int(np.count_nonzero(~np.isfinite(array)))
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
