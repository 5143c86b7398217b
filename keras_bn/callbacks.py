"""Population statistics during `fit`: a callback around Algorithm 2, lines 9-11."""

import collections.abc
import logging

import keras

from keras_bn import population

logger = logging.getLogger(__name__)


class PopulationStatistics(keras.callbacks.Callback):
    """Re-estimates the population statistics of every BN layer during `fit`.

    Before each validation that `fit` runs (`validation_data=` or `validation_split=`) and once
    more at the end of `fit`, it calls `keras_bn.estimate_population_statistics(model, data,
    steps, batch_size)`, so that the validation metrics, checkpoints written at the end of an
    epoch and the trained model all use the population statistics of Algorithm 2 (lines 9-11)
    rather than the moving averages. The end-of-`fit` estimate is skipped when no training step
    ran since the last one. Training itself is unchanged: BN normalizes with batch statistics, and
    its moving averages continue from the estimated values. `model.evaluate()` outside `fit`
    estimates nothing, even with this callback in its `callbacks`. (detectron2 and mmpretrain call
    this hook PreciseBN.)

    Each estimate runs the network in training mode over at most `steps` batches of `data`, so its
    cost is bounded whatever the data set's size. Data that does not fit the model's inputs is
    refused with a `ValueError` before training starts (arrays) or at the estimate (iterables),
    with no statistic changed. In a multi-process JAX run (`keras.distribution.DataParallel`),
    give each process its own shard of the training data and `batch_size` its share of a global
    batch, as `fit` takes them: every process then ends with the same statistics, those of the
    global batches that training normalizes (`keras_bn.estimate_population_statistics`).

    Args:
        data: Training inputs, in any form `keras_bn.estimate_population_statistics` takes (an
            array, a tuple `(x, y)`, a dict of arrays, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, a list of batches). It is read once per estimate, so it must
            be iterable again: a one-pass iterator or generator is accepted only with `steps`
            (each estimate then takes the next `steps` batches of an endless stream).
        steps: The most batches an estimate uses; `None` uses all of `data`.
        batch_size: Batch size for array inputs; the paper's mini-batch size m (in a
            multi-process run, this process's share of it). Ignored for iterables. At least 2.
        verbose: 0 (default) is silent; 1 or `"auto"` shows a progress bar for each estimate.

    Reference:
        [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167), Algorithm 2.

    Example:

    >>> model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=10,
    ...           callbacks=[keras_bn.PopulationStatistics(x_train, steps=100)])
    """

    def __init__(self, data, steps=None, batch_size=32, verbose=0):
        super().__init__()
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(
                f"`steps` must be a positive integer or None. Received: steps={steps!r}"
            )
        population.check_batch_size(batch_size)
        if steps is None and isinstance(data, collections.abc.Iterator):
            raise ValueError(
                "`data` is a one-pass iterator, which the first estimate would exhaust. Received: "
                f"{type(data).__name__} with steps=None; pass data that can be iterated again "
                "(arrays, a tf.data.Dataset, a keras.utils.PyDataset, a list of batches), or "
                "an endless iterator with `steps`."
            )
        self.data = data
        self.steps = steps
        self.batch_size = batch_size
        self.verbose = verbose
        self._in_fit = False
        self._trained_since_estimate = False

    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._trained_since_estimate = False
        # Arrays that do not fit the model fail now, not at the first estimate an epoch later
        # (every estimate checks each batch it reads, iterables included).
        inputs = population.Batches(self.data, self.batch_size).inputs
        if inputs is not None:
            population.check_inputs(self.model, inputs, "`data` of PopulationStatistics")

    def on_epoch_begin(self, epoch, logs=None):
        self._trained_since_estimate = True

    def on_test_begin(self, logs=None):
        # `fit` validates through `evaluate`, which calls this hook with fit's callbacks; a call
        # of `evaluate` outside `fit` is told apart by `_in_fit`.
        if self._in_fit:
            self._estimate("validation")

    def on_train_end(self, logs=None):
        self._in_fit = False
        if self._trained_since_estimate:
            self._estimate("the end of fit")

    def _estimate(self, when):
        batches = population.estimate_population_statistics(
            self.model, self.data, steps=self.steps, batch_size=self.batch_size,
            verbose=self.verbose,
        )
        self._trained_since_estimate = False
        logger.info("Population statistics before %s: %d batches.", when, batches)
