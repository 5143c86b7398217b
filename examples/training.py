"""One training loop for every variant, and the steps-to-accuracy protocol of the paper's Figure 3.

`VARIANTS` maps the paper's variant names (Sec. 4.2.1) onto the changes each makes; `build_variant`
turns a network family ("mlp" or "inception") and a variant into a compiled model; `train_and_track`
trains it with momentum SGD and evaluates test accuracy every `eval_every` steps (with exact
population statistics, Algorithm 2, or the moving averages); `steps_to_accuracy` runs the whole
protocol: a learning-rate grid for the baseline, the baseline's best accuracy as the target, and
the steps each BN variant needs to first reach it.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import time

import keras
import numpy as np

import keras_bn
from examples import models, reporting

logger = logging.getLogger(__name__)


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


def synchronized_batch_norm(data_parallel):
    """BN's `synchronized` argument for data-parallel training: True under TensorFlow, where each
    replica would otherwise normalise by its own share of the batch; JAX's DataParallel computes
    statistics over the global batch already, and Keras accepts the argument only on TensorFlow."""
    return bool(data_parallel) and keras.backend.backend() == "tensorflow"


def quick_runs_eagerly(quick):
    """Whether a quick check (a few steps) should skip compilation. On TensorFlow, tracing and
    compiling the ~70-conv graph costs more than a few eager steps; on JAX, eager execution
    compiles every primitive of the forward and backward pass one by one, which costs more than
    compiling the whole step once."""
    return bool(quick) and keras.backend.backend() == "tensorflow"


def build_variant(variant, config, input_shape, classes, seed=0):
    """A compiled model of `variant` (a name or a `Variant`) for the network family of `config`.

    The model outputs logits (`models.with_softmax` adds the softmax for deployment)."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    keras.utils.set_random_seed(seed)
    if config.family == "mlp":
        model = models.mnist_mlp(
            input_dim=int(np.prod(input_shape)),
            classes=classes,
            batch_norm=variant.batch_norm,
            activation=variant.activation or "sigmoid",
            bn_momentum=config.bn_momentum,
            synchronized=synchronized_batch_norm(config.data_parallel),
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
                synchronized=synchronized_batch_norm(config.data_parallel),
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


@dataclasses.dataclass
class History:
    """What `train_and_track` records at each evaluation."""

    steps: list = dataclasses.field(default_factory=list)
    accuracy: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)  # training loss of the last chunk
    # Cumulative training time, evaluations excluded. The first interval's time includes the
    # one-off tracing/compilation, which would swamp per-step differences at this scale: it is
    # replaced by its steps times the median per-step time of the other intervals.
    seconds: list = dataclasses.field(default_factory=list)
    compile_seconds: float | None = None
    probes: list = dataclasses.field(default_factory=list)  # what `probe` returned
    diverged: bool = False
    # After training: test accuracy with the moving averages and with the exact population
    # statistics of Algorithm 2 (equal for a network without BN).
    final_accuracy_moving: float | None = None
    final_accuracy: float | None = None

    def best(self):
        """(best accuracy, first step that reached it, its training seconds)."""
        if not self.accuracy:
            return float("nan"), None, None
        i = int(np.argmax(self.accuracy))
        return float(self.accuracy[i]), self.steps[i], self.seconds[i]

    def best_by(self, step):
        """The best accuracy of the evaluations up to `step`."""
        return max((a for s, a in zip(self.steps, self.accuracy) if s <= step), default=float("nan"))

    def first_reaching(self, target):
        """(step, seconds) of the first evaluation with accuracy >= target, or (None, None)."""
        for step, acc, sec in zip(self.steps, self.accuracy, self.seconds):
            if acc >= target - 1e-9:
                return step, sec
        return None, None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields):
        return cls(**fields)


class RunLog:
    """The finished training runs of one protocol, kept in a JSON file, so that an interrupted
    protocol resumes where it stopped (a long run on a lent accelerator, say).

    `fingerprint` describes what every run shares (the data and the `Config`); a file written
    under another fingerprint is refused rather than mixed in. Each run is stored under a key
    naming what sets it apart (variant, seed, learning rate, steps, target).
    """

    def __init__(self, path, fingerprint):
        self.path, self.fingerprint, self.runs = path, fingerprint, {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"The checkpoint {path} was written by another protocol (other data or "
                    "configuration); name a new file or delete it. "
                    f"Its fingerprint: {saved.get('fingerprint')}; this run's: {fingerprint}"
                )
            self.runs = saved["runs"]

    def get(self, key):
        return History.from_dict(self.runs[key]) if key in self.runs else None

    def put(self, key, history):
        self.runs[key] = history.to_dict()
        # Atomic: a process killed mid-write leaves the last complete file.
        reporting.write_json(self.path, {"fingerprint": self.fingerprint, "runs": self.runs})


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
    """`model.predict` in inference mode, with the input padded to a multiple of the replica
    count (JAX's data parallelism shards every batch evenly over the devices)."""
    replicas = replica_count()
    pad = (-len(x)) % replicas
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    batch_size = max(replicas, batch_size // replicas * replicas)
    return model.predict(x, batch_size=batch_size, verbose=0)[: len(x) - pad]


def evaluate_accuracy(model, x, y, batch_size=256):
    """Test accuracy in inference mode (BN uses its moving/population statistics)."""
    scores = predict(model, x, batch_size=batch_size)  # logits or probabilities
    return float(np.mean(np.argmax(scores, axis=-1) == y))


def train_and_track(model, data, config, *, reshuffle=False, seed=0, probe=None, verbose=1,
                    label=None, target=None, eval_every_after_target=None):
    """Train `model` for `config.steps` momentum-SGD steps and evaluate every `config.eval_every`.

    The single training loop of every experiment: `model.fit` over the mini-batches of
    `batch_indices`, one call per evaluation interval, a `keras.utils.Progbar`, and at each evaluation the test accuracy after
    setting BN's statistics as `config.statistics` says (the exact population estimate of
    Algorithm 2 over the training set, or the moving averages). Evaluation time is not counted in
    `History.seconds`. A loss that turns NaN stops the run and marks it diverged. At the end the
    test accuracy is also measured with the moving averages and with the exact population
    statistics (`History.final_accuracy_moving`, `History.final_accuracy`).

    Args:
        model: a compiled model (see `build_variant`).
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

    def evaluate(step, loss):
        if config.statistics == "population":
            set_population_statistics(model, x_train, config)
        accuracy = evaluate_accuracy(model, data.x_test, data.y_test)
        history.steps.append(step)
        history.accuracy.append(accuracy)
        history.loss.append(loss)
        history.seconds.append(trained_seconds)
        if probe is not None:
            history.probes.append(probe(model))
        return accuracy

    def next_interval():
        reached = target is not None and history.first_reaching(target)[0] is not None
        return (eval_every_after_target or config.eval_every) if reached else config.eval_every

    evaluate(0, float("nan"))
    step = 0
    chunk_seconds = []
    while step < config.steps:
        interval = next_interval()
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
        accuracy = evaluate(step, loss)
        progbar.update(step, [("loss", loss), ("test_acc", accuracy)])
    if len(chunk_seconds) > 1:
        per_step = float(np.median([sec / n for sec, n in chunk_seconds[1:]]))
        first_seconds, first_steps = chunk_seconds[0]
        history.compile_seconds = max(0.0, first_seconds - per_step * first_steps)
        history.seconds = [max(0.0, s - history.compile_seconds) for s in history.seconds]
    if not history.diverged:
        history.final_accuracy_moving = evaluate_accuracy(model, data.x_test, data.y_test)
        history.final_accuracy = history.final_accuracy_moving
        if config.final_population and has_batch_normalization(model):
            set_population_statistics(model, x_train, config)
            history.final_accuracy = evaluate_accuracy(model, data.x_test, data.y_test)
    return history


def _median(values):
    """Median where None (never reached) counts as infinitely many steps."""
    finite = [math.inf if v is None else v for v in values]
    m = float(np.median(finite))
    return None if math.isinf(m) else m


def _ratio(baseline, variant):
    if baseline is None or variant is None or variant == 0:
        return None
    return baseline / variant


def _steps_of(name, variant_steps, default):
    if isinstance(variant_steps, dict):
        return variant_steps.get(name) or default
    return variant_steps or default


def _grid_score(best_accuracy, diverged):
    return -1.0 if diverged or not math.isfinite(best_accuracy) else best_accuracy


def steps_to_accuracy(
    data,
    config,
    *,
    variants=None,
    seeds=(0, 1, 2),
    lr_grid_start=None,
    lr_grid_factor=3.0,
    lr_grid_max=8,
    tolerance=0.005,
    variant_steps=None,
    sparse_factor=5,
    verbose=1,
    return_models=False,
    checkpoint=None,
):
    """The Figure 3 protocol: how many fewer steps the BN variants need to reach the baseline's best.

    1. Learning-rate grid for the baseline (seed `seeds[0]`): starting at `lr_grid_start`
       (default `config.learning_rate`), multiply by `lr_grid_factor` while the baseline's best
       test accuracy keeps improving; stop only after a rate whose best accuracy is more than
       `tolerance` below the best so far, or that diverges, so the chosen rate is never the
       grid's upper edge; if the best is the first rate, extend downwards the same way. Among
       rates within `tolerance` of the top accuracy, the one that reaches its own best in the
       fewest steps wins (the fairest choice for the baseline).
    2. The baseline trains `config.steps` steps per seed at that rate; its best test accuracy
       (per seed) is the target, and the first step reaching it is the baseline's count.
    3. Each BN variant trains `variant_steps` steps (an int, or a dict by variant name; default
       `config.steps`) at the baseline's
       rate times its multiplier, evaluated every `config.eval_every` steps; its count is the first
       evaluation at or above the target. After that evaluation it is evaluated every
       `sparse_factor * config.eval_every` steps (its best accuracy is then read at that spacing).

    Returns:
        A JSON-ready dict: the grid, the chosen rate, and per variant the steps and training
        seconds to the target (median and per seed), `ratio` (baseline steps / variant steps, of
        the medians), `ratio_per_seed`, `wall_clock_ratio` (the same in training seconds) and
        each variant's best accuracy (median and per seed). With `return_models=True`, a pair
        `(result, models)` where `models` maps each variant to its trained model of the last seed.
        With `checkpoint` (a JSON file path), every finished run is recorded there (see `RunLog`)
        and a run already recorded is read back instead of trained again; not with
        `return_models`.
    """
    names = tuple(variants or FAMILY_VARIANTS[config.family])
    baseline_name = BASELINE[config.family]
    if baseline_name not in names:
        raise ValueError(f"`variants` must include the baseline {baseline_name!r}. Received: {names}")
    seeds = tuple(seeds)
    if checkpoint and return_models:
        raise ValueError("`checkpoint` and `return_models` exclude each other: a run read back "
                         "from the checkpoint has no model.")
    log = RunLog(checkpoint, {
        "backend": keras.backend.backend(),
        "data": data.name,
        "x_train": list(data.x_train.shape),
        "x_test": list(data.x_test.shape),
        "config": dataclasses.asdict(config),
    }) if checkpoint else None

    trained = {}

    def run(name, seed, learning_rate, steps, target=None):
        key = f"{name} seed={seed} lr={learning_rate!r} steps={steps} target={target!r}"
        history = log.get(key) if log else None
        if history is None:
            history = train(name, seed, learning_rate, steps, target)
            if verbose:
                best, step, _ = history.best()
                print(f"{config.family} {name} seed={seed}: best {best:.4f} at step {step}")
            if log:
                log.put(key, history)
        elif verbose:
            print(f"{config.family} {name} seed={seed}: read back from {checkpoint}")
        return history

    def train(name, seed, learning_rate, steps, target):
        # `learning_rate` is the baseline's; `build_variant` applies the variant's multiplier, and
        # the lr decay keeps the baseline budget as its time scale whatever the run's length.
        run_config = dataclasses.replace(
            config, learning_rate=learning_rate, steps=steps, decay_horizon=config.steps
        )
        variant = VARIANTS[name]
        model = build_variant(variant, run_config, data.input_shape, data.classes, seed=seed)
        if return_models:
            trained[(name, seed, learning_rate)] = model
        return train_and_track(
            model,
            data,
            run_config,
            reshuffle=variant.reshuffle,
            seed=seed,
            verbose=verbose,
            label=f"{config.family} {name} lr={learning_rate * variant.lr_multiplier:.4g} "
            f"seed={seed}",
            target=target,
            eval_every_after_target=sparse_factor * config.eval_every,
        )

    # 1. The baseline's learning-rate grid.
    start = lr_grid_start or config.learning_rate
    grid = {}

    def try_rate(lr):
        history = run(baseline_name, seeds[0], lr, config.steps)
        grid[lr] = history
        return _grid_score(history.best()[0], history.diverged)

    def top():
        return max(_grid_score(h.best()[0], h.diverged) for h in grid.values())

    def choose():
        candidates = [
            r for r, h in grid.items() if _grid_score(h.best()[0], h.diverged) >= top() - tolerance
        ]
        return min(candidates, key=lambda r: (grid[r].best()[1], -grid[r].best()[0]))

    lr = start
    try_rate(lr)
    while len(grid) < lr_grid_max:  # upwards until the baseline degrades or diverges
        lr *= lr_grid_factor
        if try_rate(lr) < top() - tolerance:
            break
    lr = start
    while len(grid) < lr_grid_max and choose() == min(grid):  # downwards if the best is the lowest
        lr /= lr_grid_factor
        try_rate(lr)
    chosen = choose()
    rates = sorted(grid)
    inside = rates[0] < chosen < rates[-1]
    if not inside:
        logger.warning("The chosen learning rate %g lies at the grid's edge %s.", chosen, rates)

    # 2 and 3. Baseline per seed, then every variant per seed.
    histories = {baseline_name: {seeds[0]: grid[chosen]}}
    for seed in seeds[1:]:
        histories[baseline_name][seed] = run(baseline_name, seed, chosen, config.steps)
    targets = {seed: histories[baseline_name][seed].best()[0] for seed in seeds}
    for name in names:
        if name == baseline_name:
            continue
        histories[name] = {
            seed: run(name, seed, chosen, _steps_of(name, variant_steps, config.steps),
                      target=targets[seed])
            for seed in seeds
        }

    results = {}
    base_steps = [histories[baseline_name][s].first_reaching(targets[s])[0] for s in seeds]
    base_seconds = [histories[baseline_name][s].first_reaching(targets[s])[1] for s in seeds]
    for name in names:
        reached = [histories[name][s].first_reaching(targets[s]) for s in seeds]
        steps = [r[0] for r in reached]
        seconds = [r[1] for r in reached]
        best_accuracy = [histories[name][s].best()[0] for s in seeds]
        results[name] = {
            "learning_rate": chosen * VARIANTS[name].lr_multiplier,
            "steps_to_target": {"median": _median(steps), "per_seed": steps},
            "seconds_to_target": {"median": _median(seconds), "per_seed": seconds},
            "ratio": _ratio(_median(base_steps), _median(steps)),
            "ratio_per_seed": [_ratio(b, v) for b, v in zip(base_steps, steps)],
            "wall_clock_ratio": _ratio(_median(base_seconds), _median(seconds)),
            "best_accuracy": {"median": float(np.median(best_accuracy)), "per_seed": best_accuracy},
            # After the whole run, BN with the exact population statistics of Algorithm 2.
            "final_accuracy_population": _median(
                [histories[name][s].final_accuracy for s in seeds]
            ),
            "seconds_per_step": float(np.median(
                [histories[name][s].seconds[-1] / max(1, histories[name][s].steps[-1]) for s in seeds]
            )),
            "histories": {str(s): histories[name][s].to_dict() for s in seeds},
        }
    result = {
        "family": config.family,
        # Did the baseline plateau? Its best accuracy by 50%, 75% and 100% of its budget, per seed.
        "baseline_plateau": {
            str(s): [histories[baseline_name][s].best_by(f * config.steps) for f in (0.5, 0.75, 1.0)]
            for s in seeds
        },
        "data": data.name,
        "baseline": baseline_name,
        "config": dataclasses.asdict(config),
        "variant_steps": {n: _steps_of(n, variant_steps, config.steps) for n in names},
        "seeds": list(seeds),
        "targets": {str(s): targets[s] for s in seeds},
        "learning_rate_grid": {
            "rates": rates,
            "best_accuracy": [grid[r].best()[0] for r in rates],
            "steps_to_best": [grid[r].best()[1] for r in rates],
            "diverged": [grid[r].diverged for r in rates],
            "chosen": chosen,
            "chosen_inside_grid": inside,
        },
        "variants": results,
    }
    if return_models:
        return result, {name: trained[(name, seeds[-1], chosen)] for name in names}
    return result
