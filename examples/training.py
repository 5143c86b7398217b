"""The single training loop of every experiment, and how it evaluates a model.

`Config` holds what a training run needs besides the data and the variant; `train_and_track`
trains a compiled model (see `examples.variants.build_variant`) with momentum SGD and evaluates
its test accuracy every `eval_every` steps, with exact population statistics (Algorithm 2) or the
moving averages, into an `examples.history.History`.

In a multi-process run (`examples.devices.initialize_processes`), every process runs the same
loop: it trains on its share of every global batch (`process_share`), estimates the population
statistics from its share of the training batches (`population_shard`), and measures accuracy
with `model.evaluate` on its share of the test set, so that every process holds the result of one
process training on the global batch.
"""
import dataclasses
import logging
import math
import time

import keras
import numpy as np

import keras_bn
from examples import devices
from examples.history import History

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Config:
    """Everything a training run needs besides the data and the variant."""

    family: str = "inception"  # "inception" (small BN-Inception) or "mlp" (the Figure 1 network)
    learning_rate: float = 0.01  # the baseline's; variants multiply it
    batch_size: int = 32
    steps: int = 1000
    eval_every: int = 10
    momentum: float = 0.9  # of SGD
    decay_rate: float = 0.25  # the baseline's lr falls to 25% over `decay_horizon` steps
    decay_horizon: int | None = None  # the baseline's budget (None: `steps`); BN-x: 6x faster
    l2: float = 4e-5  # the baseline's L2 penalty (Inception family only)
    dropout: float = 0.4  # the baseline's dropout (Inception family only)
    alpha: float = 0.125  # width multiplier of BN-Inception
    bn_momentum: float = 0.9  # fits short runs; the moving averages only matter with "moving"
    # BN statistics of the evaluations during training: "population" (Algorithm 2 at every
    # evaluation: exact, but one pass over the training set each time) or "moving" (the paper's
    # way of tracking a model as it trains, Sec. 3.1). The final evaluation always also uses the
    # exact population statistics (`History.final_accuracy`).
    statistics: str = "population"
    population_batches: int | None = None  # training batches for the population estimate (all)
    data_parallel: bool = False  # MirroredStrategy (TF) / keras.distribution.DataParallel (JAX)
    final_population: bool = True  # also evaluate with population statistics after training
    jit_compile: str | bool = "auto"  # passed to `model.compile`
    run_eagerly: bool = False  # no compilation at all: for quick checks of large graphs


def quick_runs_eagerly(quick):
    """Whether a quick check (a few steps) should skip compilation. On TensorFlow, tracing and
    compiling the ~70-conv graph costs more than a few eager steps; on JAX, eager execution
    compiles every primitive of the forward and backward pass one by one, which costs more than
    compiling the whole step once."""
    return bool(quick) and keras.backend.backend() == "tensorflow"


def batch_indices(n, batch_size, steps, reshuffle, seed):
    """The training examples of each step: one shuffle kept for every epoch, or a new one each.

    The paper's baseline saw mini-batches that often held the same examples together; its BN-x
    variants shuffled "more thoroughly" (Sec. 4.2.1). Epochs drop their last partial batch.
    """
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
    order = rng.permutation(n)
    out = np.empty((steps, batch_size), dtype=np.int64)
    for step in range(steps):
        k = step % per_epoch
        if k == 0 and step > 0 and reshuffle:
            order = rng.permutation(n)
        out[step] = order[k * batch_size : (k + 1) * batch_size]
    return out


def has_batch_normalization(model):
    return any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def local_batch_size(batch_size, num_processes):
    """Each process's share of a global batch of `batch_size`."""
    if batch_size % num_processes:
        raise ValueError(
            f"The global batch size must divide by the number of processes, so that each process "
            f"feeds an equal share. Received: batch_size={batch_size}, "
            f"{num_processes} processes"
        )
    return batch_size // num_processes


def process_share(indices, process_id, num_processes):
    """The examples process `process_id` feeds `fit` from the global batches `indices` (one row
    per step): its slice of every batch, in order, so that the processes' k-th batches together
    are the k-th global batch."""
    local = local_batch_size(indices.shape[1], num_processes)
    return indices[:, process_id * local : (process_id + 1) * local].reshape(-1)


def population_shard(x_train, config, process_id=0, num_processes=1):
    """The training examples of process `process_id` for Algorithm 2, the batch count, and its
    batch size.

    The mini-batches of size m are the first `config.population_batches` (or all) full batches of
    `x_train`, as one process takes them; process `process_id` takes its slice of every one
    (`process_share`), m / `num_processes` examples, so that the processes' k-th batches together
    are the one-process k-th batch: the global batch `keras_bn.estimate_population_statistics`
    normalizes in a multi-process run, and the estimate is the one-process estimate.
    """
    full_batches = len(x_train) // config.batch_size  # every batch of size m, as in training
    steps = min(config.population_batches or full_batches, full_batches)
    indices = np.arange(steps * config.batch_size).reshape(steps, config.batch_size)
    mine = process_share(indices, process_id, num_processes)
    return x_train[mine], steps, local_batch_size(config.batch_size, num_processes)


def population_statistics_callback(model, x_train, config):
    """A `keras_bn.PopulationStatistics` that estimates from this process's `population_shard`
    at the end of each `fit`, or None for a model without BN."""
    if not has_batch_normalization(model):
        return None
    shard, steps, batch_size = population_shard(x_train, config, devices.process_index(),
                                                devices.process_count())
    return _PopulationStatisticsUnlessDiverged(shard, steps=max(1, steps), batch_size=batch_size)


class _PopulationStatisticsUnlessDiverged(keras_bn.PopulationStatistics):
    """No estimate after a `fit` whose loss turned NaN: the run stops there as diverged, and the
    estimate would refuse the non-finite statistics."""

    def on_epoch_end(self, epoch, logs=None):
        self.diverged = not math.isfinite(float((logs or {}).get("loss", 0.0)))

    def on_train_end(self, logs=None):
        if not getattr(self, "diverged", False):
            super().on_train_end(logs)


def set_population_statistics(model, x_train, config):
    """Algorithm 2: BN's statistics become the average over training mini-batches of size m
    (over the batches of every process, in a multi-process run)."""
    if not has_batch_normalization(model):
        return
    shard, steps, batch_size = population_shard(x_train, config, devices.process_index(),
                                                devices.process_count())
    keras_bn.estimate_population_statistics(
        model, shard, steps=steps, batch_size=batch_size, verbose=0
    )


def predict(model, x, batch_size=256):
    """`model.predict` in inference mode, in batches that all have one shape.

    The input is padded with copies of its last example, and the padding's outputs dropped:
    to a multiple of `batch_size`, because a last, smaller batch would make TensorFlow trace (and
    JAX compile) each model's predict step a second time, and the experiments evaluate many
    models; and to a multiple of the replica count, because JAX's data parallelism shards every
    batch evenly over the devices.
    """
    replicas = devices.replica_count()
    batch_size = max(replicas, batch_size // replicas * replicas)
    if len(x) <= batch_size:  # one batch
        batch_size = max(replicas, -(-len(x) // replicas) * replicas)
    pad = (-len(x)) % batch_size
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return model.predict(x, batch_size=batch_size, verbose=0)[: len(x) - pad]


def evaluate_accuracy(model, x, y, batch_size=256):
    """Test accuracy in inference mode (BN uses its moving/population statistics).

    In a multi-process run `model.predict` fails (its outputs span every process's devices):
    there each process evaluates its share of `x` (`evaluate_accuracy_across_processes`).
    """
    if devices.process_count() > 1:
        return evaluate_accuracy_across_processes(
            model, x, y, devices.process_index(), devices.process_count(), batch_size
        )
    scores = predict(model, x, batch_size=batch_size)  # logits or probabilities
    return float(np.mean(np.argmax(scores, axis=-1) == y))


_EVALUATORS = {}


def evaluate_accuracy_across_processes(model, x, y, process_id, num_processes, batch_size=256):
    """Test accuracy of `model` on all of `x`, from this process's share of it: `model.evaluate`
    over the global batches that the processes' shares make together gives the accuracy of the
    whole set in every process.

    Process `process_id` takes every `num_processes`-th example; every share is padded, with
    weight 0, to one length that the local batch divides, since every process must run the same
    number of steps. The accuracy comes from a model over the same layers (the weights are
    shared) compiled with a weighted accuracy, so `model`'s own compilation is untouched.
    """
    local_batch = max(1, batch_size // num_processes)
    share_length = -(-len(x) // num_processes)
    padded_length = max(1, -(-share_length // local_batch)) * local_batch
    x_share, y_share = x[process_id::num_processes], y[process_id::num_processes]
    pad = padded_length - len(x_share)
    weights = np.concatenate([np.ones(len(x_share)), np.zeros(pad)]).astype("float32")
    if pad:
        x_share = np.concatenate([x_share, np.repeat(x[:1], pad, axis=0)])
        y_share = np.concatenate([y_share, np.repeat(y[:1], pad, axis=0)])
    evaluator = _EVALUATORS.get(id(model))
    if evaluator is None or evaluator[0] is not model:
        _EVALUATORS.clear()  # one model at a time: the experiments evaluate one, then the next
        accuracy_model = keras.Model(model.inputs, model.outputs)
        accuracy_model.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            jit_compile=model.jit_compile, run_eagerly=model.run_eagerly,
        )
        evaluator = _EVALUATORS[id(model)] = (model, accuracy_model)
    metrics = evaluator[1].evaluate(x_share, y_share, sample_weight=weights,
                                    batch_size=local_batch, verbose=0, return_dict=True)
    return float(metrics["accuracy"])


def train_and_track(model, data, config, *, reshuffle=False, seed=0, probe=None, verbose=1,
                    label=None, target=None, eval_every_after_target=None):
    """Train `model` for `config.steps` momentum-SGD steps and evaluate every `config.eval_every`.

    The single training loop of every experiment: `model.fit` over the mini-batches of
    `batch_indices`, one call per evaluation interval, a `keras.utils.Progbar`, and at each
    evaluation the test accuracy after setting BN's statistics as `config.statistics` says (the
    exact population estimate of Algorithm 2 over the training set, or the moving averages).
    Evaluation time is not counted in `History.seconds`. A loss that turns NaN stops the run and
    marks it diverged. At the end the test accuracy is also measured with the moving averages and
    with the exact population statistics (`History.final_accuracy_moving`,
    `History.final_accuracy`).

    Args:
        model: a compiled model (see `examples.variants.build_variant`).
        data: an `examples.data.Dataset` whose arrays match the model's input.
        config: a `Config`.
        reshuffle: reshuffle the training set every epoch.
        seed: seed of the batch order.
        probe: optional callable `probe(model) -> dict`, called at each evaluation (Figure 1's
            percentiles).
        verbose: 1 shows a progress bar.
        label: title printed above the progress bar.
        target: a test accuracy; once an evaluation reaches it, evaluations come every
            `eval_every_after_target` steps instead (the steps to the target are known by then,
            and with exact population statistics each evaluation costs a pass over the training
            set).
        eval_every_after_target: see `target` (default: `config.eval_every`).

    Returns:
        A `History`.
    """
    if config.statistics not in ("population", "moving"):
        raise ValueError(
            f"`statistics` must be 'population' or 'moving'. Received: {config.statistics!r}"
        )
    x_train, y_train = data.x_train, data.y_train
    process_id, num_processes = devices.process_index(), devices.process_count()
    fit_batch_size = local_batch_size(config.batch_size, num_processes)
    indices = batch_indices(len(x_train), config.batch_size, config.steps, reshuffle, seed)
    # At each evaluation `fit` ends with the population estimate of Algorithm 2 (the callback,
    # after the training time is taken); the first evaluation and the final one estimate by hand.
    callbacks = [_TrainingClock()]
    if config.statistics == "population":
        population = population_statistics_callback(model, x_train, config)
        callbacks += [population] if population else []
    history = History()
    if verbose and label:
        print(label)
    progbar = keras.utils.Progbar(config.steps, verbose=verbose, stateful_metrics=["test_acc"])
    trained_seconds = 0.0
    _record_evaluation(history, model, data, config, probe, 0, float("nan"), trained_seconds)
    step = 0
    chunk_seconds = []
    while step < config.steps:
        interval = _evaluation_interval(history, config, target, eval_every_after_target)
        chunk = process_share(indices[step : step + interval], process_id, num_processes)
        # One `fit` call per evaluation interval: Keras distributes its batches over the replicas
        # of a tf.distribute strategy or a keras.distribution (train_on_batch would not on TF).
        fit = model.fit(
            x_train[chunk],
            y_train[chunk],
            batch_size=fit_batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        chunk_seconds.append((callbacks[0].seconds, len(chunk) // fit_batch_size))
        trained_seconds += chunk_seconds[-1][0]
        step = min(step + interval, config.steps)
        loss = float(fit.history["loss"][-1])
        if not math.isfinite(loss):
            history.diverged = True
            history.steps.append(step)
            history.accuracy.append(1.0 / data.classes)
            history.loss.append(loss)
            history.seconds.append(trained_seconds)
            logger.info("%s diverged before step %d", label or model.name, step)
            progbar.update(config.steps, [("loss", loss)], finalize=True)
            break
        accuracy = _record_evaluation(history, model, data, config, probe, step, loss,
                                      trained_seconds)
        progbar.update(step, [("loss", loss), ("test_acc", accuracy)])
    _discount_compilation(history, chunk_seconds)
    if not history.diverged:
        history.final_accuracy_moving = evaluate_accuracy(model, data.x_test, data.y_test)
        history.final_accuracy = history.final_accuracy_moving
        if config.final_population and has_batch_normalization(model):
            set_population_statistics(model, x_train, config)
            history.final_accuracy = evaluate_accuracy(model, data.x_test, data.y_test)
    return history


class _TrainingClock(keras.callbacks.Callback):
    """The seconds of one `fit`'s training steps: from its start to the end of its epoch, before
    the callbacks that run at the end of `fit` (the population estimate)."""

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self._start


def _record_evaluation(history, model, data, config, probe, step, loss, trained_seconds):
    """Evaluate the test accuracy with BN's statistics as `config.statistics` says (at step 0 set
    here, later by `fit`'s `PopulationStatistics`), append it to `history` with the step, loss,
    training seconds and probe; return the accuracy."""
    if config.statistics == "population" and step == 0:
        set_population_statistics(model, data.x_train, config)
    accuracy = evaluate_accuracy(model, data.x_test, data.y_test)
    history.steps.append(step)
    history.accuracy.append(accuracy)
    history.loss.append(loss)
    history.seconds.append(trained_seconds)
    if probe is not None:
        history.probes.append(probe(model))
    return accuracy


def _evaluation_interval(history, config, target, eval_every_after_target):
    """Steps until the next evaluation: `config.eval_every`, or `eval_every_after_target` once an
    evaluation has reached `target`."""
    reached = target is not None and history.first_reaching(target)[0] is not None
    return (eval_every_after_target or config.eval_every) if reached else config.eval_every


def _discount_compilation(history, chunk_seconds):
    """Replace the first interval's time, which includes tracing and compilation, by its steps
    times the median per-step time of the other intervals (`History.compile_seconds` keeps the
    difference)."""
    if len(chunk_seconds) > 1:
        per_step = float(np.median([sec / n for sec, n in chunk_seconds[1:]]))
        first_seconds, first_steps = chunk_seconds[0]
        history.compile_seconds = max(0.0, first_seconds - per_step * first_steps)
        history.seconds = [max(0.0, s - history.compile_seconds) for s in history.seconds]
