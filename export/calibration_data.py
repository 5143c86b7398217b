"""Calibration and validation data for int8 quantization: Keras-style data in, checked feed dicts
of an ONNX graph's inputs out.

Keras users hold arrays, `(x, y)` tuples, dicts, `tf.data` datasets, `PyDataset`s and lists of
batches (what `keras_bn.estimate_population_statistics` takes); onnxruntime's calibrator wants a
`CalibrationDataReader`. `Feeds` is that reader, and it refuses data that would calibrate
nonsense (wrong shape or dtype, empty, not finite) naming the array and what it held.
"""

import collections
import dataclasses
import operator

import keras
import numpy as np
import onnx
from onnxruntime import quantization as ort_quantization

from keras_bn.population import Batches

# 16 batches of 32 are 512 examples, the few hundred onnxruntime's guide suggests for calibration.
DEFAULT_MAX_BATCHES = 16


def check_data(data, inputs, *, batch_size=32, max_batches=DEFAULT_MAX_BATCHES,
               argument="calibration_data"):
    """Checks data against a graph's inputs before the graph exists, as `quantize_int8` does.

    Array data (an array, `(x, y)`, a dict) is checked at once, as much of it as `max_batches`
    batches read; so is a list of batches, which can be read twice. Other iterables
    (generators, `tf.data`, `PyDataset`) are checked batch by batch when `quantize_int8` reads
    them. `export.to_onnx` calls this before freezing and converting, so that a mistake in the
    data fails in a second, not after the conversion.

    Args:
        data: calibration or validation data, in any form `quantize_int8` takes.
        inputs: `(name, shape, dtype)` of each graph input, in the data's layout (NHWC), `shape`
            with `None` for the batch and every other dimension the graph leaves open.
        batch_size, max_batches: as in `quantize_int8`.
        argument: what the data is called in error messages.

    Raises:
        ValueError: the data is missing, empty, not finite, or of a shape or dtype the inputs
            do not take (the message names the array and what it held).
        TypeError: the data is of a type not accepted.
    """
    graph_inputs = [GraphInput(name, tuple(shape), np.dtype(dtype), False)
                    for name, shape, dtype in inputs]
    feeds = Feeds(data, graph_inputs, batch_size, check_count(max_batches, "max_batches"),
                   argument, verbose=0)
    if isinstance(data, list):
        collections.deque(feeds.pairs(), maxlen=0)


def check_count(value, name):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None. Received: {name}={value!r}")
    return value


@dataclasses.dataclass
class GraphInput:
    name: str
    shape: tuple  # in the data's layout; None for dimensions the graph leaves open, and
    # None in place of the tuple for a graph that does not say its input's rank
    dtype: np.dtype
    channels_first: bool  # the graph takes NCHW, the data is NHWC


def graph_inputs(proto, channels_first_inputs):
    initializers = {tensor.name for tensor in proto.graph.initializer}
    values = [value for value in proto.graph.input if value.name not in initializers]
    names = [value.name for value in values]
    if isinstance(channels_first_inputs, str):
        channels_first_inputs = [channels_first_inputs]
    unknown = sorted(set(channels_first_inputs) - set(names))
    if unknown:
        raise ValueError(f"channels_first_inputs names inputs the graph does not have: {unknown}. "
                         f"The graph's inputs: {names}")
    inputs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else None
                      for dim in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        transposed = value.name in channels_first_inputs
        if transposed:
            if shape is None or len(shape) != 4:
                raise ValueError(f"channels_first_inputs: input '{value.name}' has rank "
                                 f"{'unknown' if shape is None else len(shape)}; only rank-4 "
                                 "(image) inputs are NCHW")
            shape = (shape[0], shape[2], shape[3], shape[1])
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        inputs.append(GraphInput(value.name, shape, dtype, transposed))
    return inputs


class Feeds(ort_quantization.CalibrationDataReader):
    """onnxruntime's calibration reader over Keras-style data: one checked feed dict
    `{graph input name: array}` per batch.

    onnxruntime's calibrator calls `get_next`, which gives the feed alone; `pairs()` gives
    `(feed, labels)` pairs for the comparison. With `keep=True` and a one-shot iterator (a
    generator), the pairs are kept for a second pass (`kept`), since the data cannot be read
    twice.
    """

    def __init__(self, data, inputs, batch_size, max_batches, argument, verbose, keep=False):
        if data is None:
            raise ValueError(f"{argument} is required: int8 ranges are calibrated on real inputs.")
        self.argument = argument
        self.inputs = inputs
        self.batches = 0
        self.examples = 0
        source = Batches(data, batch_size, steps=max_batches, labels=True, name=argument)
        if source.inputs is not None:  # checked at once, before any work: as much as will be read
            arrays = source.inputs
            if max_batches is not None:
                arrays = keras.tree.map_structure(
                    operator.itemgetter(slice(0, max_batches * batch_size)), arrays)
            self._check_batch(arrays, "")
        one_shot = source.inputs is None and not isinstance(data, keras.utils.PyDataset) and (
            _is_iterator(data))
        self._source = iter(source)
        self.kept = [] if keep and one_shot else None
        self._progbar = keras.utils.Progbar(source.count, verbose=verbose, unit_name="batch")

    def pairs(self):
        while True:
            pair = self._next_pair()
            if pair is None:
                return
            yield pair

    def get_next(self):
        pair = self._next_pair()
        return None if pair is None else pair[0]

    def _next_pair(self):
        element = next(self._source, None)
        if element is None:
            return self._finish()
        x, labels = element
        where = f" batch {self.batches}"
        feed = self._check_batch(x, where)
        size = next(iter(feed.values())).shape[0]
        self.batches += 1
        self.examples += size
        self._progbar.update(self.batches)
        if labels is not None:
            labels = as_numpy(labels)
        if self.kept is not None:
            self.kept.append((feed, labels))
        return feed, labels

    def _finish(self):
        if not self.batches:
            raise ValueError(f"{self.argument} yielded no batch; it needs at least one example.")
        if self._progbar.target != self.batches:  # the bar closes itself on reaching its target
            self._progbar.update(self.batches, finalize=True)
        return None

    def _check_batch(self, x, where):
        """The feed dict of one batch `x`; ValueError/TypeError naming what is wrong."""
        names = [graph_input.name for graph_input in self.inputs]
        if isinstance(x, dict):
            if sorted(x) != sorted(names):
                raise ValueError(
                    f"{self.argument}{where}: a dict must be keyed by the graph's input names "
                    f"{names}. Received keys: {sorted(map(str, x))}"
                )
            arrays = [x[name] for name in names]
        elif isinstance(x, (list, tuple)) and len(self.inputs) > 1:
            if len(x) != len(names):
                raise ValueError(f"{self.argument}{where}: {len(x)} arrays for the graph's "
                                 f"{len(names)} inputs {names}")
            arrays = list(x)
        elif len(self.inputs) == 1:
            arrays = [x]
        else:
            raise ValueError(
                f"{self.argument}{where}: the graph has {len(names)} inputs {names}; give a dict "
                f"keyed by these names or a list in this order. Received: {type(x).__name__}"
            )
        feed = {}
        for graph_input, array in zip(self.inputs, arrays):
            array = self._check_array(graph_input, array, f"{self.argument}{where}, input "
                                      f"'{graph_input.name}'")
            if graph_input.channels_first:
                array = np.transpose(array, (0, 3, 1, 2))
            feed[graph_input.name] = np.ascontiguousarray(array)
        sizes = {array.shape[0] for array in feed.values()}
        if len(sizes) > 1:
            raise ValueError(f"{self.argument}{where}: inputs with different batch sizes "
                             f"{ {name: a.shape[0] for name, a in feed.items()} }")
        return feed

    def _check_array(self, graph_input, array, what):
        if not (isinstance(array, (np.ndarray, list, np.generic)) or keras.ops.is_tensor(array)):
            raise TypeError(f"{what}: expected an array. Received: {type(array).__name__}")
        array = as_numpy(array)
        expected = graph_input.dtype
        kinds = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}.get(expected.kind, expected.kind)
        if array.dtype.kind not in kinds:
            raise ValueError(f"{what}: the graph takes {expected.name}; received an array of dtype "
                             f"{array.dtype} (non-numeric or not convertible)")
        want = graph_input.shape
        if array.ndim == 0 or want is not None and (array.ndim != len(want) or any(
                dim is not None and got != dim for got, dim in zip(array.shape[1:], want[1:]))):
            expected_shape = ("batch", "...") if want is None else ("batch",) + tuple(
                "?" if dim is None else dim for dim in want[1:])
            raise ValueError(
                f"{what}: expected shape {expected_shape}. Received: shape {array.shape}")
        if array.shape[0] == 0:
            raise ValueError(
                f"{what} is empty (shape {array.shape}); it needs at least one example")
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                nans = int(np.isnan(array).sum())
                infinite = int(finite.size - finite.sum()) - nans
                raise ValueError(
                    f"{what} holds {nans} NaN and {infinite} infinite values (shape "
                    f"{array.shape}); quantization needs finite inputs"
                )
        return array.astype(expected, copy=False)


def as_numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value) if keras.ops.is_tensor(value) else value)


def _is_iterator(data):
    try:
        return iter(data) is data
    except TypeError:
        return False
