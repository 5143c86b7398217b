"""The checks shared by folding and export: which models they accept, and whether a rewritten
model (folded, frozen, converted to ONNX) still computes what the original computes.

- `check_graph_model`: a built Functional or Sequential `keras.Model`, else `TypeError` or
  `ValueError`;
- `check_batchnorm_statistics`: finite BN weights and a non-negative variance, else `ValueError`
  naming the layer;
- `random_inputs`: one random batch for a model's inputs;
- `output_error`: `max|received - expected|` and the scale it is judged against;
- `output_variation`: how much the reference outputs vary over the verification inputs, and
  `can_show_error`: whether they vary enough for a comparison to fail at the tolerance;
- `default_tolerance`: the tolerance of the least precise compute dtype among a model's layers;
- `VerificationError`: raised when the error exceeds `tolerance * scale`.

A rewrite passes when `max|received - expected| <= tolerance * max(1, max|expected|)` over every
output. A non-finite value received where the reference is finite is an infinite error, so a fold
that produced NaN can never pass. A comparison proves something only when the reference outputs
vary over the verification inputs by more than that tolerance: an untrained network whose
softmax gives every class 0.001 for every input, or whose ReLUs are all dead, would pass any
rewrite. Such a check is reported as not verified (`can_show_error`), never as verified.
"""

import keras
import numpy as np

from keras_bn import _keras_internals

# Relative tolerance per compute dtype. Folding rounds the new weights to the layer's dtype and
# reorders the arithmetic, and a deep network can amplify that rounding a thousandfold: measured
# on keras.applications.EfficientNetV2B0 (weights=None, BN statistics randomized) in float32,
# 6e-5 to 6e-4 of the output scale, while in float64 the same fold differs by 2e-13 (exact).
# Export compares the original model with the folded, frozen and converted graph, so it meets the
# same rounding. A wrong fold or conversion (an axis, a bias, a forgotten epsilon, a weight)
# shows at 1e-2 and above.
TOLERANCES = {"float16": 1e-2, "bfloat16": 5e-2}
DEFAULT_TOLERANCE = 1e-3
_BATCH_SIZE = 2
_UNKNOWN_DIMENSION = 32


class VerificationError(ValueError):
    """A rewritten model's outputs differ from the original's by more than the tolerance.

    Raised by `keras_bn.fold_batchnorm` (the folded model is not returned) and by
    `export.to_onnx` (no file is written). A `ValueError`, so code that catches the `ValueError`
    of a failed fold keeps working.
    """


def check_graph_model(model, caller):
    """Raises unless `model` is a `keras.Model` whose layer graph is known and can be rewritten.

    Args:
        model: the model received.
        caller: the name of the function checking, for the message (`"fold_batchnorm()"`).

    Raises:
        TypeError: `model` is not a `keras.Model`, or is a subclassed model (its `call()` is
            arbitrary Python, so there is no graph to rewrite).
        ValueError: `model` is a Sequential model whose input shape is not known yet.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{caller} expects a keras.Model (Functional or Sequential). Received: "
            f"{type(model).__name__}"
        )
    if not isinstance(model, keras.Sequential) and not _keras_internals.is_functional(model):
        raise TypeError(
            f"{caller} can only rewrite Functional and Sequential models, whose layer graph is "
            f"known. Received: the subclassed model {model.name!r} ({type(model).__name__}), whose "
            "call() is arbitrary Python. Rebuild it with keras.Input and the functional API (or "
            "keras.Sequential), or fold its BN layers by hand with "
            "keras_bn.folding.inference_affine."
        )
    if _keras_internals.functional_graph(model) is None:
        raise ValueError(
            f"{caller} needs a model with known inputs. Received: Sequential model "
            f"{model.name!r}, which has no known input shape, so its graph cannot be rewritten. "
            "Start it with keras.Input(shape) or call model.build(input_shape)."
        )


def check_batchnorm_statistics(model, caller):
    """Raises `ValueError` naming the first BN layer of `model` whose numbers cannot be used.

    Inference BN is `gamma / sqrt(moving_variance + epsilon) * (x - moving_mean) + beta`
    (Algorithm 2, line 11): a NaN or infinite weight, or a negative moving variance, turns it (and
    any layer it is folded into) into NaN or nonsense. Every built `BatchNormalization` layer is
    checked (Keras's and keras_bn's, in nested models and custom layers too), in graph order.

    Args:
        model: a `keras.Model`.
        caller: the name of the function checking, for the message.

    Raises:
        ValueError: naming the layer (`"outer/inner"` inside a nested model or custom layer), the
            weight and what is wrong with it.
    """
    for name, layer in _batchnorms_by_name(model):
        reason = why_statistics_unusable(layer)
        if reason is not None:
            raise ValueError(
                f"{caller} refuses BatchNormalization layer {name!r} of model {model.name!r}: "
                f"{reason}. Nothing was changed. Train the layer or estimate its statistics again "
                "(keras_bn.estimate_population_statistics) on finite data."
            )


def why_statistics_unusable(bn_layer):
    """Why a built BN layer's weights cannot make an inference BN, or None when they can.

    gamma, beta and moving_mean must be finite; moving_variance finite and non-negative.
    """
    weights = {"moving_mean": bn_layer.moving_mean, "moving_variance": bn_layer.moving_variance}
    if bn_layer.scale:
        weights["gamma"] = bn_layer.gamma
    if bn_layer.center:
        weights["beta"] = bn_layer.beta
    for weight_name in ("gamma", "beta", "moving_mean", "moving_variance"):
        if weight_name not in weights:
            continue
        values = np.asarray(keras.ops.convert_to_numpy(weights[weight_name]), np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            return (
                f"its {weight_name} holds {_count(bad, 'non-finite value')} "
                f"({_examples(values, bad)})"
            )
        if weight_name == "moving_variance":
            negative = values < 0
            if negative.any():
                return (
                    f"its moving_variance holds {_count(negative, 'negative value')} "
                    f"({_examples(values, negative)}); a variance is never negative"
                )
    return None


def random_inputs(model, batch_size=_BATCH_SIZE, seed=0, unknown_size=None):
    """One random batch for `model.inputs`: standard normal floats, 0 or 1 for integers and bools.

    Args:
        model: a built `keras.Model`.
        batch_size: the size of the first dimension.
        seed: an integer, or a `numpy.random.Generator` to draw from (successive batches differ).
        unknown_size: the size of every other dimension the model leaves unknown (None: 32).

    Returns:
        A list of NumPy arrays, one per `model.inputs`, in that order (`as_model_input` puts them
        in the structure the model is called with).
    """
    rng = np.random.default_rng(seed)
    unknown_size = _UNKNOWN_DIMENSION if unknown_size is None else unknown_size
    batch = []
    for tensor in model.inputs:
        shape = [batch_size] + [unknown_size if d is None else d for d in tensor.shape[1:]]
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if "float" in dtype:
            batch.append(rng.standard_normal(shape).astype(dtype))
        else:  # integer ids or flags: 0 and 1 are valid for any embedding or lookup
            batch.append(rng.integers(0, 2, shape).astype(dtype))
    return batch


def as_model_input(model, arrays):
    """The arrays of `random_inputs` in the structure `model(...)` takes (a dict, a list, one)."""
    if isinstance(model, keras.Sequential):
        return arrays[0]  # one input, and Sequential.input is only known once called
    return keras.tree.pack_sequence_as(model.input, list(arrays))


def output_error(expected, received):
    """How far `received` is from the reference `expected`: `(max_error, scale)`.

    `max_error = max|received - expected|` over every value of every output, and
    `scale = max(1, max|expected|)` over the finite reference values; a rewrite passes when
    `max_error <= tolerance * scale`. Where the reference is finite, a NaN or infinite value
    received counts as an infinite error; where both hold the same non-finite value, none.

    Args:
        expected: the reference outputs, an array or a structure of arrays or tensors.
        received: the outputs to judge, in the same structure.

    Returns:
        `(max_error, scale)`, two floats; `max_error` is `inf` for a non-finite output.

    Raises:
        VerificationError: the two hold a different number of outputs or different shapes.
    """
    expected, received = _as_arrays(expected), _as_arrays(received)
    if len(expected) != len(received):
        raise VerificationError(
            f"expected {len(expected)} outputs, received {len(received)}"
        )
    max_error, scale = 0.0, 1.0
    for index, (y, z) in enumerate(zip(expected, received)):
        if y.shape != z.shape:
            raise VerificationError(
                f"output {index} has shape {z.shape}, the reference {y.shape}"
            )
        with np.errstate(invalid="ignore"):
            same = (y == z) | (np.isnan(y) & np.isnan(z))  # inf == inf; NaN != NaN
            difference = np.where(same, 0.0, np.abs(y - z))
        difference[np.isnan(difference)] = np.inf  # NaN against a finite value
        max_error = max(max_error, float(difference.max(initial=0.0)))
        scale = max(scale, float(np.abs(y[np.isfinite(y)]).max(initial=0.0)))
    return max_error, scale


def output_variation(expected):
    """How much the reference outputs vary over the examples of the verification batch:
    `max|y_i - y_0|` over every example i, value and output (finite values only; 0 for a batch
    of one example).

    Args:
        expected: the reference outputs on a batch, an array or a structure of arrays or
            tensors, the batch on the first axis.

    Returns:
        A float, 0 when every example gives the same outputs.
    """
    variation = 0.0
    for y in _as_arrays(expected):
        if y.ndim == 0 or len(y) < 2:
            continue
        with np.errstate(invalid="ignore"):
            spread = np.abs(y - y[:1])
        spread = spread[np.isfinite(spread)]
        variation = max(variation, float(spread.max(initial=0.0)))
    return variation


def can_show_error(variation, scale, tolerance):
    """Whether a comparison at `tolerance` could fail: the reference outputs vary over the
    verification inputs by more than `tolerance * scale`. Outputs that do not (constant, or
    nearly: a saturated softmax, dead ReLUs) would pass any rewrite that keeps them constant."""
    return bool(variation > tolerance * scale)


def within_tolerance(max_error, scale, tolerance):
    """The pass rule: `max_error <= tolerance * scale` (False for an infinite or NaN error)."""
    return bool(max_error <= tolerance * scale)


def quantization_step(output, num_bits=8):
    """One step of an 8-bit grid over `output`'s range: `(max - min) / (2^num_bits - 1)` over
    its finite values, at least the float32 resolution of its largest magnitude (so that a
    constant output still has a positive step)."""
    values = np.asarray(output, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return float(np.finfo(np.float32).tiny)
    spread = float(values.max() - values.min()) / (2**num_bits - 1)
    return max(spread, 4 * float(np.finfo(np.float32).eps) * max(1.0, float(np.abs(values).max())))


def default_tolerance(model, half_precision=False):
    """The tolerance of the least precise compute dtype among `model`'s layers.

    1e-3 for float32 (and float64), 1e-2 for float16, 5e-2 for bfloat16. A model under a float32
    policy can still hold mixed_float16 layers; its outputs then carry float16 rounding, which the
    model's own policy does not show.

    Args:
        model: a `keras.Model`.
        half_precision: count the model as float16 at least (export stores float16 weights).
    """
    dtypes = {model.dtype_policy.compute_dtype} | {
        layer.compute_dtype for layer in _keras_internals.flatten_layers(model)
    }
    if half_precision:
        dtypes.add("float16")
    return max(TOLERANCES.get(dtype, DEFAULT_TOLERANCE) for dtype in dtypes)


def _as_arrays(outputs):
    return [
        np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)
        for y in keras.tree.flatten(outputs)
    ]


def _batchnorms_by_name(model):
    """`(name, layer)` of every built BN in `model`, named as `fold_batchnorm`'s report does."""
    found = []

    def walk(parent, prefix):
        for layer in parent.layers:
            name = prefix + layer.name
            if isinstance(layer, keras.layers.BatchNormalization):
                found.append((name, layer))
            elif isinstance(layer, keras.Model):
                walk(layer, name + "/")
            else:
                found.extend(
                    (f"{name}/{inner.name}", inner)
                    for inner in _keras_internals.flatten_layers(layer)
                    if isinstance(inner, keras.layers.BatchNormalization)
                )

    walk(model, "")
    return [(name, layer) for name, layer in found if layer.built]


def _count(mask, what):
    count = int(mask.sum())
    return f"{count} {what}{'' if count == 1 else 's'}"


def _examples(values, mask, limit=3):
    channels = np.flatnonzero(mask)
    shown = ", ".join(f"channel {c}: {values.flat[c]:.3g}" for c in channels[:limit])
    return shown + (", ..." if len(channels) > limit else "")
