"""The steps-to-accuracy protocol of the paper's Figure 3: how many fewer steps BN needs.

1. `search_learning_rate`: a learning-rate grid for the baseline (one seed) that extends until
   the baseline degrades, and `choose_learning_rate` picks the fairest rate of it.
2. The baseline trains at that rate for every seed; its best test accuracy per seed is the target.
3. Every BN variant trains at the baseline's rate times its multiplier; its count is the first
   step whose evaluation reaches the target.

`steps_to_accuracy` runs the whole protocol and returns a JSON-ready summary;
`steps_to_accuracy_with_models` also returns the trained models. `Runs` trains each `Run` (or
reads it back from a checkpoint, an `examples.history.RunLog`).
"""
import dataclasses
import logging
import math

import keras
import numpy as np

from examples import training
from examples import variants as catalogue
from examples.history import RunLog

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LearningRateGrid:
    """How step 1 searches the baseline's learning rate.

    Starting at `start` (None: the `Config`'s learning rate), the rate is multiplied by `factor`
    while the baseline's best test accuracy keeps improving; the search stops only after a rate
    whose best accuracy is more than `tolerance` below the best so far, or that diverges, so the
    chosen rate is never the grid's upper edge. If the best is the first rate, the grid extends
    downwards the same way. At most `max_rates` rates are tried.
    """

    start: float | None = None
    factor: float = 3.0
    max_rates: int = 8
    tolerance: float = 0.005


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the protocol: what sets it apart from the others."""

    variant: str
    seed: int
    learning_rate: float  # the baseline's; `build_variant` applies the variant's multiplier
    steps: int
    target: float | None = None  # the accuracy after which evaluations thin out

    @property
    def key(self):
        """The run's name in a checkpoint (`RunLog`)."""
        return (f"{self.variant} seed={self.seed} lr={self.learning_rate!r} steps={self.steps} "
                f"target={self.target!r}")


def fingerprint(data, config):
    """What every run of one protocol shares: a checkpoint written under another is refused."""
    return {
        "backend": keras.backend.backend(),
        "data": data.name,
        "x_train": list(data.x_train.shape),
        "x_test": list(data.x_test.shape),
        "config": dataclasses.asdict(config),
    }


class Runs:
    """Trains the runs of one protocol on `data` with `config`, one `History` each.

    Args:
        data: an `examples.data.Dataset`.
        config: the protocol's `examples.training.Config`; `config.steps` is the baseline's
            budget and the time scale of every run's learning-rate decay.
        sparse_factor: after a run reaches its target, it is evaluated every
            `sparse_factor * config.eval_every` steps.
        verbose: 1 shows progress bars and one line per finished run.
        checkpoint: optional JSON file (see `RunLog`): every finished run is recorded there, and a
            run already recorded is read back instead of trained again.
        keep_models: keep the trained models (`model`); excludes `checkpoint`, since a run read
            back from it has no model.
    """

    def __init__(self, data, config, *, sparse_factor=5, verbose=1, checkpoint=None,
                 keep_models=False):
        if checkpoint and keep_models:
            raise ValueError("`checkpoint` and `keep_models` exclude each other: a run read back "
                             "from the checkpoint has no model.")
        self.data, self.config = data, config
        self.sparse_factor, self.verbose, self.checkpoint = sparse_factor, verbose, checkpoint
        self.log = RunLog(checkpoint, fingerprint(data, config)) if checkpoint else None
        self._models = {} if keep_models else None

    def history(self, run):
        """The `History` of `run`: read back from the checkpoint, or trained (and recorded)."""
        family = self.config.family
        history = self.log.get(run.key) if self.log else None
        if history is not None:
            if self.verbose:
                print(f"{family} {run.variant} seed={run.seed}: read back from {self.checkpoint}")
            return history
        history = self._train(run)
        if self.verbose:
            best, step, _ = history.best()
            print(f"{family} {run.variant} seed={run.seed}: best {best:.4f} at step {step}")
        if self.log:
            self.log.put(run.key, history)
        return history

    def model(self, variant, seed, learning_rate):
        """The model last trained for `variant` and `seed` at the baseline rate `learning_rate`."""
        if self._models is None:
            raise ValueError("This `Runs` keeps no models; create it with `keep_models=True`.")
        return self._models[(variant, seed, learning_rate)]

    def _train(self, run):
        # The lr decay keeps the baseline budget as its time scale whatever the run's length.
        config = dataclasses.replace(self.config, learning_rate=run.learning_rate,
                                     steps=run.steps, decay_horizon=self.config.steps)
        variant = catalogue.VARIANTS[run.variant]
        model = catalogue.build_variant(variant, config, self.data.input_shape, self.data.classes,
                                       seed=run.seed)
        if self._models is not None:
            self._models[(run.variant, run.seed, run.learning_rate)] = model
        return training.train_and_track(
            model,
            self.data,
            config,
            reshuffle=variant.reshuffle,
            seed=run.seed,
            verbose=self.verbose,
            label=f"{self.config.family} {run.variant} "
            f"lr={run.learning_rate * variant.lr_multiplier:.4g} seed={run.seed}",
            target=run.target,
            eval_every_after_target=self.sparse_factor * self.config.eval_every,
        )


def grid_score(history):
    """A rate's score in the grid: its best accuracy, or -1 when it diverged or never evaluated."""
    best_accuracy = history.best()[0]
    return -1.0 if history.diverged or not math.isfinite(best_accuracy) else best_accuracy


def choose_learning_rate(tried, tolerance):
    """The rate of `tried` (rate -> `History`) that reaches its best accuracy in the fewest steps
    among those within `tolerance` of the top score (the fairest choice for the baseline)."""
    top = max(grid_score(h) for h in tried.values())
    candidates = [rate for rate, h in tried.items() if grid_score(h) >= top - tolerance]
    return min(candidates, key=lambda rate: (tried[rate].best()[1], -tried[rate].best()[0]))


def search_learning_rate(runs, baseline, seed, grid):
    """Step 1: the baseline's histories by learning rate, in the order tried (see
    `LearningRateGrid`)."""
    steps = runs.config.steps
    start = grid.start or runs.config.learning_rate
    tried = {start: runs.history(Run(baseline, seed, start, steps))}
    rate = start
    while len(tried) < grid.max_rates:  # upwards until the baseline degrades or diverges
        rate *= grid.factor
        tried[rate] = runs.history(Run(baseline, seed, rate, steps))
        top = max(grid_score(h) for h in tried.values())
        if grid_score(tried[rate]) < top - grid.tolerance:
            break
    rate = start
    # Downwards while the best is the lowest rate tried.
    while len(tried) < grid.max_rates and choose_learning_rate(tried, grid.tolerance) == min(tried):
        rate /= grid.factor
        tried[rate] = runs.history(Run(baseline, seed, rate, steps))
    return tried


def steps_of(variant, variant_steps, default):
    """The training steps of `variant`: `variant_steps` (an int, or a dict by variant name), or
    `default`."""
    if isinstance(variant_steps, dict):
        return variant_steps.get(variant) or default
    return variant_steps or default


def _median(values):
    """Median where None (never reached) counts as infinitely many steps."""
    finite = [math.inf if v is None else v for v in values]
    m = float(np.median(finite))
    return None if math.isinf(m) else m


def _ratio(baseline, variant):
    if baseline is None or variant is None or variant == 0:
        return None
    return baseline / variant


def variant_summary(histories, baseline_histories, seeds, targets, learning_rate):
    """One variant's entry of the result: steps and seconds to the target (median and per seed),
    the ratios to the baseline, best and final accuracy, and the histories.

    Args:
        histories: the variant's `History` by seed.
        baseline_histories: the baseline's `History` by seed.
        seeds: the seeds, in order.
        targets: the target accuracy by seed.
        learning_rate: the variant's own learning rate.
    """
    base_reached = [baseline_histories[s].first_reaching(targets[s]) for s in seeds]
    base_steps = [r[0] for r in base_reached]
    base_seconds = [r[1] for r in base_reached]
    reached = [histories[s].first_reaching(targets[s]) for s in seeds]
    steps = [r[0] for r in reached]
    seconds = [r[1] for r in reached]
    best_accuracy = [histories[s].best()[0] for s in seeds]
    return {
        "learning_rate": learning_rate,
        "steps_to_target": {"median": _median(steps), "per_seed": steps},
        "seconds_to_target": {"median": _median(seconds), "per_seed": seconds},
        "ratio": _ratio(_median(base_steps), _median(steps)),
        "ratio_per_seed": [_ratio(b, v) for b, v in zip(base_steps, steps)],
        "wall_clock_ratio": _ratio(_median(base_seconds), _median(seconds)),
        "best_accuracy": {"median": float(np.median(best_accuracy)), "per_seed": best_accuracy},
        # After the whole run, BN with the exact population statistics of Algorithm 2.
        "final_accuracy_population": _median([histories[s].final_accuracy for s in seeds]),
        "seconds_per_step": float(np.median(
            [histories[s].seconds[-1] / max(1, histories[s].steps[-1]) for s in seeds]
        )),
        "histories": {str(s): histories[s].to_dict() for s in seeds},
    }


def run_protocol(runs, *, variants=None, seeds=(0, 1, 2), grid=LearningRateGrid(),
                 variant_steps=None):
    """The three steps of the protocol with `runs` (a `Runs`); returns the JSON-ready result of
    `steps_to_accuracy`."""
    config, data = runs.config, runs.data
    names = tuple(variants or catalogue.FAMILY_VARIANTS[config.family])
    baseline = catalogue.BASELINE[config.family]
    if baseline not in names:
        raise ValueError(f"`variants` must include the baseline {baseline!r}. Received: {names}")
    seeds = tuple(seeds)

    tried = search_learning_rate(runs, baseline, seeds[0], grid)
    chosen = choose_learning_rate(tried, grid.tolerance)
    rates = sorted(tried)
    inside = rates[0] < chosen < rates[-1]
    if not inside:
        logger.warning("The chosen learning rate %g lies at the grid's edge %s.", chosen, rates)

    histories = {baseline: {seeds[0]: tried[chosen]}}
    for seed in seeds[1:]:
        histories[baseline][seed] = runs.history(Run(baseline, seed, chosen, config.steps))
    targets = {seed: histories[baseline][seed].best()[0] for seed in seeds}
    for name in names:
        if name != baseline:
            steps = steps_of(name, variant_steps, config.steps)
            histories[name] = {
                seed: runs.history(Run(name, seed, chosen, steps, target=targets[seed]))
                for seed in seeds
            }

    return {
        "family": config.family,
        # Did the baseline plateau? Its best accuracy by 50%, 75% and 100% of its budget, per seed.
        "baseline_plateau": {
            str(s): [histories[baseline][s].best_by(f * config.steps) for f in (0.5, 0.75, 1.0)]
            for s in seeds
        },
        "data": data.name,
        "baseline": baseline,
        "config": dataclasses.asdict(config),
        # The steps each variant trained: the baseline always trains `config.steps`.
        "variant_steps": {n: config.steps if n == baseline else steps_of(n, variant_steps,
                                                                          config.steps)
                          for n in names},
        "seeds": list(seeds),
        "targets": {str(s): targets[s] for s in seeds},
        "learning_rate_grid": {
            "rates": rates,
            "best_accuracy": [tried[r].best()[0] for r in rates],
            "steps_to_best": [tried[r].best()[1] for r in rates],
            "diverged": [tried[r].diverged for r in rates],
            "chosen": chosen,
            "chosen_inside_grid": inside,
        },
        "variants": {
            name: variant_summary(histories[name], histories[baseline], seeds, targets,
                                  chosen * catalogue.VARIANTS[name].lr_multiplier)
            for name in names
        },
    }


def steps_to_accuracy(data, config, *, variants=None, seeds=(0, 1, 2), grid=LearningRateGrid(),
                      variant_steps=None, sparse_factor=5, verbose=1, checkpoint=None):
    """The Figure 3 protocol: how many fewer steps BN variants need to reach the baseline's best.

    1. Learning-rate grid for the baseline (seed `seeds[0]`), see `LearningRateGrid`. Among rates
       within `grid.tolerance` of the top accuracy, the one that reaches its own best in the
       fewest steps wins (the fairest choice for the baseline).
    2. The baseline trains `config.steps` steps per seed at that rate; its best test accuracy
       (per seed) is the target, and the first step reaching it is the baseline's count.
    3. Each BN variant trains `variant_steps` steps at the baseline's rate times its multiplier,
       evaluated every `config.eval_every` steps; its count is the first evaluation at or above
       the target. After that evaluation it is evaluated every `sparse_factor * config.eval_every`
       steps (its best accuracy is then read at that spacing).

    Args:
        data: an `examples.data.Dataset`.
        config: an `examples.training.Config`; `config.steps` is the baseline's budget.
        variants: variant names, the family's baseline among them (default: every variant of
            `config.family`).
        seeds: random seeds; each variant trains once per seed.
        grid: a `LearningRateGrid`.
        variant_steps: steps of each BN variant, an int or a dict by variant name (default
            `config.steps`).
        sparse_factor: see step 3.
        verbose: 1 shows progress bars and one line per finished run.
        checkpoint: optional JSON file path: every finished run is recorded there (see
            `examples.history.RunLog`) and a run already recorded is read back instead of
            trained again, so an interrupted protocol resumes where it stopped.

    Returns:
        A JSON-ready dict: the grid, the chosen rate, and per variant the steps and training
        seconds to the target (median and per seed), `ratio` (baseline steps / variant steps, of
        the medians), `ratio_per_seed`, `wall_clock_ratio` (the same in training seconds) and
        each variant's best accuracy (median and per seed).
    """
    runs = Runs(data, config, sparse_factor=sparse_factor, verbose=verbose, checkpoint=checkpoint)
    return run_protocol(runs, variants=variants, seeds=seeds, grid=grid,
                        variant_steps=variant_steps)


def steps_to_accuracy_with_models(data, config, *, variants=None, seeds=(0, 1, 2),
                                  grid=LearningRateGrid(), variant_steps=None, sparse_factor=5,
                                  verbose=1):
    """`steps_to_accuracy`, and the trained models (no checkpoint: a run read back has none).

    Returns:
        A pair `(result, models)`: the result of `steps_to_accuracy`, and a dict mapping each
        variant to its model trained with the last seed at the chosen learning rate.
    """
    runs = Runs(data, config, sparse_factor=sparse_factor, verbose=verbose, keep_models=True)
    result = run_protocol(runs, variants=variants, seeds=seeds, grid=grid,
                          variant_steps=variant_steps)
    chosen, last_seed = result["learning_rate_grid"]["chosen"], tuple(seeds)[-1]
    return result, {name: runs.model(name, last_seed, chosen) for name in result["variants"]}
