"""The comparison of an int8 graph with the float graph it was quantized from, on data: errors
relative to the float output, top-1 agreement and accuracies of class-score outputs.
"""

import collections
import dataclasses

import numpy as np

from export import runtimes
from export.calibration_data import as_numpy


@dataclasses.dataclass
class OutputComparison:
    """How one output of the int8 graph compares with the float graph on the validation data.

    Attributes:
        name: the graph output's name.
        max_error: `max|int8 - float| / max|float|` over every validation example.
        mean_error: `mean|int8 - float| / max|float|`.
        agreement: for class scores (rank 2, more than one column), the fraction of examples
            whose top-1 class is the same in both graphs; `None` for other outputs.
        float_accuracy, int8_accuracy: top-1 accuracy of each graph when labels were given for
            this output, else `None`.
        constant: whether the float graph gave every validation example the same values (to
            float32 rounding): then no comparison on this output can fail.
    """

    name: str
    max_error: float
    mean_error: float
    agreement: float = None
    float_accuracy: float = None
    int8_accuracy: float = None
    constant: bool = False


def compare(float_data, int8_data, feeds, names, keep=0):
    """Per-output errors, top-1 agreement and accuracies of the int8 graph's meaning
    (onnxruntime with graph optimizations off) against the float graph over `feeds`
    (`(feed, labels)` pairs); both graphs serialized.

    Returns:
        `(comparisons, examples, batches, kept)`: an `OutputComparison` per output, the
        examples and batches compared, and the first `keep` batches as `(feed, int8 outputs)`.
    """
    reference = runtimes.session(float_data)
    quantized = runtimes.session(int8_data, optimized=False)
    kept = []
    first = {}  # each output's float values on the first example, to tell a constant output
    varies = collections.defaultdict(bool)
    largest = collections.defaultdict(float)  # max|float|
    worst = collections.defaultdict(float)  # max|int8 - float|
    total = collections.defaultdict(float)  # sum|int8 - float|
    elements = collections.Counter()
    agree, correct_float, correct_int8, labelled = (collections.Counter() for _ in range(4))
    class_names = set()
    examples = batches = 0
    for feed, labels in feeds:
        want = reference.run(names, feed)
        got = quantized.run(names, feed)
        if len(kept) < keep:
            kept.append((feed, got))
        size = next(iter(feed.values())).shape[0]
        examples += size
        batches += 1
        class_outputs = [name for name, value in zip(names, want) if _is_class_scores(value)]
        class_names.update(class_outputs)
        per_output = _labels_per_output(labels, class_outputs, size, classes={
            name: value.shape[1] for name, value in zip(names, want)})
        for name, expected, actual in zip(names, want, got):
            expected = expected.astype(np.float64)
            first.setdefault(name, expected[:1])
            if expected.shape[1:] == first[name].shape[1:]:
                spread = np.abs(expected - first[name]).max(initial=0.0)
                # a float32 output that changes by no more than its rounding does not vary
                varies[name] |= bool(spread > 1e-5 * max(1.0, np.abs(first[name]).max()))
            difference = np.abs(actual.astype(np.float64) - expected)
            largest[name] = max(largest[name], float(np.max(np.abs(expected), initial=0.0)))
            worst[name] = max(worst[name], float(np.max(difference, initial=0.0)))
            if not np.isfinite(difference).all():
                worst[name] = float("inf")
            total[name] += float(difference.sum())
            elements[name] += difference.size
            if name in class_outputs:
                top_float, top_int8 = expected.argmax(axis=1), actual.argmax(axis=1)
                agree[name] += int((top_float == top_int8).sum())
                if name in per_output:
                    truth = per_output[name]
                    correct_float[name] += int((top_float == truth).sum())
                    correct_int8[name] += int((top_int8 == truth).sum())
                    labelled[name] += size
    comparisons = []
    for name in names:
        scale = max(largest[name], np.finfo(np.float32).tiny)
        is_class = name in class_names
        comparisons.append(OutputComparison(
            name=name, max_error=worst[name] / scale,
            mean_error=total[name] / max(elements[name], 1) / scale,
            agreement=agree[name] / examples if is_class else None,
            float_accuracy=correct_float[name] / labelled[name] if labelled[name] else None,
            int8_accuracy=correct_int8[name] / labelled[name] if labelled[name] else None,
            constant=examples > 1 and not varies[name],
        ))
    return comparisons, examples, batches, kept


def _is_class_scores(value):
    return value.ndim == 2 and value.shape[1] > 1


def _labels_per_output(labels, class_outputs, size, classes):
    """`{output name: class ids}` from a batch's labels: one array for the single class-score
    output, or a dict keyed by output name; class ids or one-hot rows, each within the
    `classes[name]` classes the output scores (else every accuracy would be a silent 0%)."""
    if labels is None:
        return {}
    if isinstance(labels, dict):
        unknown = sorted(set(labels) - set(class_outputs))
        if unknown:
            raise ValueError(f"validation labels for outputs {unknown}, which are not class-score "
                             f"outputs; those are {class_outputs}")
        items = labels.items()
    elif len(class_outputs) == 1:
        items = [(class_outputs[0], labels)]
    else:
        raise ValueError(
            f"validation labels given as one array, but the graph has {len(class_outputs)} "
            f"class-score outputs {class_outputs}; give a dict keyed by output name"
        )
    result = {}
    for name, y in items:
        y = as_numpy(y)
        count = classes[name]
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot or probabilities
            if y.shape[1] != count:
                raise ValueError(
                    f"validation labels for output '{name}' are one-hot rows of {y.shape[1]} "
                    f"classes, but the output scores {count} classes")
            y = y.argmax(axis=1)
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.shape != (size,) or y.dtype.kind not in "iuf":
            raise ValueError(
                f"validation labels for output '{name}' must be {size} class ids or one-hot rows "
                f"(one per example). Received: shape {y.shape}, dtype {y.dtype}"
            )
        outside = (y < 0) | (y >= count) | (y != np.round(y))
        if outside.any():
            raise ValueError(
                f"validation labels for output '{name}' must be class ids from 0 to {count - 1} "
                f"(the output scores {count} classes). Received: {int(outside.sum())} of a batch's "
                f"{size} outside, labels from {y.min():g} to {y.max():g}"
            )
        result[name] = y.astype(np.int64)
    return result
