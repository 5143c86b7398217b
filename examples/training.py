"""The single training loop of every experiment, and how it evaluates a model.

`Config` holds what a training run needs besides the data and the variant; `train_and_track`
trains a compiled model (see `examples.variants.build_variant`) with momentum SGD and evaluates
its test accuracy every `eval_every` steps, with exact population statistics (Algorithm 2) or the
moving averages, into an `examples.history.History`.
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


def set_population_statistics(model, x_train, config):
    """Algorithm 2: BN's statistics become the average over training mini-batches of size m."""
    if not has_batch_normalization(model):
        return
    full_batches = len(x_train) // config.batch_size  # every batch of size m, as in training
    steps = min(config.population_batches or full_batches, full_batches)
    keras_bn.estimate_population_statistics(
        model, x_train, steps=steps, batch_size=config.batch_size, verbose=0
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
    """Test accuracy in inference mode (BN uses its moving/population statistics)."""
    scores = predict(model, x, batch_size=batch_size)  # logits or probabilities
    return float(np.mean(np.argmax(scores, axis=-1) == y))


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
    indices = batch_indices(len(x_train), config.batch_size, config.steps, reshuffle, seed)
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
        chunk = indices[step : step + interval].reshape(-1)
        start = time.perf_counter()
        # One `fit` call per evaluation interval: Keras distributes its batches over the replicas
        # of a tf.distribute strategy or a keras.distribution (train_on_batch would not on TF).
        fit = model.fit(
            x_train[chunk],
            y_train[chunk],
            batch_size=config.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        chunk_seconds.append((time.perf_counter() - start, len(chunk) // config.batch_size))
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


def _record_evaluation(history, model, data, config, probe, step, loss, trained_seconds):
    """Evaluate the test accuracy with BN's statistics as `config.statistics` says, append it to
    `history` with the step, loss, training seconds and probe; return the accuracy."""
    if config.statistics == "population":
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
