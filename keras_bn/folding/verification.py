"""The check that folding changed nothing: both models on one random batch, in inference mode."""

import keras
import numpy as np

# Relative tolerance per compute dtype. Folding rounds the new weights to the layer's dtype and
# reorders the arithmetic, and a deep network can amplify that rounding a thousandfold: measured
# on keras.applications.EfficientNetV2B0 (weights=None, BN statistics randomized) in float32,
# 6e-5 to 6e-4 of the output scale, while in float64 the same fold differs by 2e-13 (exact).
# A wrong fold (an axis, a bias, a forgotten epsilon) shows at 1e-2 and above.
_TOLERANCES = {"float16": 1e-2, "bfloat16": 5e-2}
_DEFAULT_TOLERANCE = 1e-3
_BATCH_SIZE = 2
_UNKNOWN_DIMENSION = 32


def random_batch(model, seed=0):
    """One random batch for `model`'s inputs, in their structure: normal floats, small ints.

    Unknown dimensions get size 2 (batch) or 32 (others).
    """
    rng = np.random.default_rng(seed)
    batch = []
    for tensor in model.inputs:
        shape = [_BATCH_SIZE] + [_UNKNOWN_DIMENSION if d is None else d for d in tensor.shape[1:]]
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if "float" in dtype:
            batch.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == "bool":
            batch.append(rng.integers(0, 2, shape).astype(bool))
        else:
            batch.append(rng.integers(0, 2, shape).astype(dtype))
    if isinstance(model, keras.Sequential):
        return batch[0]  # one input, and Sequential.input is only known once called
    return keras.tree.pack_sequence_as(model.input, batch)


def default_tolerance(model):
    """The tolerance of the least precise compute dtype among `model`'s layers.

    A model under a float32 policy can still hold mixed_float16 layers; its outputs then carry
    float16 rounding, which the model's own policy does not show.
    """
    dtypes = {model.dtype_policy.compute_dtype} | {
        layer.compute_dtype for layer in model._flatten_layers(include_self=False, recursive=True)
    }
    return max(_TOLERANCES.get(dtype, _DEFAULT_TOLERANCE) for dtype in dtypes)


def verify_outputs(original, folded, report, tolerance=None):
    """Compare the two models' inference outputs on a random batch; record or raise.

    Sets `report.max_error`, `report.scale` and `report.tolerance`. Raises `ValueError` when
    `max|folded - original| > tolerance * max(1, max|original|)`.
    """
    if tolerance is None:
        tolerance = default_tolerance(original)
    batch = random_batch(original)
    expected = _as_arrays(original(batch, training=False))
    received = _as_arrays(folded(batch, training=False))
    max_error, scale = 0.0, 1.0
    for y, z in zip(expected, received):
        both_nan = np.isnan(y) & np.isnan(z)
        difference = np.where(both_nan, 0.0, np.abs(y - z))
        max_error = max(max_error, float(np.nan_to_num(difference.max(initial=0.0), nan=np.inf)))
        finite = y[np.isfinite(y)]
        scale = max(scale, float(np.abs(finite).max(initial=0.0)))
    report.max_error, report.scale, report.tolerance = max_error, scale, tolerance
    if not max_error <= tolerance * scale:
        raise ValueError(
            f"Folding BN changed the outputs of model {original.name!r}: max |folded - original| "
            f"= {max_error:.3g} on a random batch, above tolerance {tolerance:g} x scale "
            f"{scale:.3g}; the folded model was not returned. Rounding alone stays far below "
            "this unless the network amplifies it (deep and untrained): then pass a larger "
            "tolerance; otherwise this is a bug in keras_bn.fold_batchnorm, please report it "
            f"with this plan:\n{report}"
        )


def _as_arrays(outputs):
    return [
        np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)
        for y in keras.tree.flatten(outputs)
    ]
