"""The verification of an ONNX graph against the Keras model it came from, on random inputs at
several batch sizes and sizes of the unknown dimensions.

A float graph must reproduce `model(x, training=False)` to a relative tolerance, in onnxruntime
and, when it is installed, in OpenVINO. A QAT graph computes in integers what the QAT model
computes in float32, so its meaning (onnxruntime with optimizations off) is compared in
quantization steps of each output (`export.runtimes.steps_apart`).
"""

import dataclasses

import keras
import numpy as np

from export import runtimes
from keras_bn import verification
from keras_bn.verification import VerificationError


@dataclasses.dataclass
class Run:
    """One verification run: the feed, Keras's outputs and where it was taken."""

    feed: dict
    expected: list
    where: str


def verification_runs(inputs, batch_sizes, dynamic_sizes):
    """`(batch_size, size)` per verification run; `size` is that of every unknown dimension
    other than the batch, `None` when the model has none. Pairing the two lists rather than
    crossing them shows both kinds of dimension dynamic in as few runs."""
    if not any(dim is None for spec in inputs for dim in spec.shape[1:]):
        return [(batch_size, None) for batch_size in batch_sizes]
    count = max(len(batch_sizes), len(dynamic_sizes))
    return [(batch_sizes[i % len(batch_sizes)], dynamic_sizes[i % len(dynamic_sizes)])
            for i in range(count)]


def describe_runs(runs):
    return ", ".join(f"batch size {batch_size}" + ("" if size is None else f" (size {size})")
                     for batch_size, size in runs)


def keras_runs(model, inputs, output_names, nchw, runs, seed):
    """A `Run` per `(batch_size, size)`: random inputs (`keras_bn.verification.random_inputs`)
    and Keras's inference outputs on them, the feed in the graph's layout."""
    rng = np.random.default_rng(seed)
    result = []
    for batch_size, size in runs:
        where = f"batch size {batch_size}" + ("" if size is None else f", unknown dimensions "
                                              f"{size}")
        arrays = verification.random_inputs(model, batch_size, seed=rng, unknown_size=size)
        expected = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(
            model(verification.as_model_input(model, arrays), training=False))]
        feed = {spec.name: (np.transpose(x, (0, 3, 1, 2)) if spec.name in nchw else x)
                for spec, x in zip(inputs, arrays)}
        result.append(Run(feed, expected, where))
    return result


def constant_outputs(runs, tolerance):
    """Whether Keras's outputs vary over no run's examples by more than `tolerance` times their
    scale (`keras_bn.verification.can_show_error`): then no comparison with them could fail, and
    a report must not call the graph verified."""
    for run in runs:
        for want in run.expected:
            scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
            if verification.can_show_error(verification.output_variation(want), scale,
                                           tolerance):
                return False
    return True


def verify_float(data, runs, output_names, tolerance, openvino):
    """The largest relative error of the float graph `data` against Keras over `runs`, in
    onnxruntime and (with `openvino`) OpenVINO: `max|runtime - keras| <= tolerance * max(1,
    max|keras|)` for every output, finite wherever Keras's output is; else VerificationError
    naming the runtime, the output and the run."""
    runners = [("onnxruntime", runtimes.session(data))]
    if openvino:
        runners.append(("OpenVINO", runtimes.OpenVINOSession(data)))
    worst = 0.0
    for runtime, runner in runners:
        for run in runs:
            actual = runner.run(output_names, run.feed)
            for name, want, got in zip(output_names, run.expected, actual):
                _check_shape(runtime, name, want, got, run.where)
                error, scale = verification.output_error(want, got)
                if not error < np.inf:
                    raise VerificationError(
                        f"{runtime} output '{name}' holds NaN or inf where Keras's output is "
                        f"finite ({run.where}); no file was written"
                    )
                if not verification.within_tolerance(error, scale, tolerance):
                    raise VerificationError(
                        f"{runtime} output '{name}' differs from Keras by {error / scale:.3g} "
                        f"relative to max(1, its largest value) ({run.where}), above the "
                        f"tolerance {tolerance:g}; no file was written"
                    )
                worst = max(worst, error / scale)
    return worst


def verify_in_steps(data, runs, output_names):
    """How the meaning of the int8 graph `data` (onnxruntime with optimizations off) compares
    with a QAT model's Keras outputs over `runs`: `(max relative error, max steps, largest
    fraction beyond one step, the meaning's outputs per run)`; VerificationError when more than
    `runtimes.MAX_BEYOND_ONE_STEP` of an output's values lie beyond one step."""
    exact = runtimes.session(data, optimized=False)
    pooled = {name: ([], []) for name in output_names}
    worst, meanings = 0.0, []
    for run in runs:
        actual = exact.run(output_names, run.feed)
        meanings.append(actual)
        for name, want, got in zip(output_names, run.expected, actual):
            _check_shape("onnxruntime", name, want, got, run.where)
            error, scale = verification.output_error(want, got)
            if not error < np.inf:
                raise VerificationError(
                    f"the int8 graph's output '{name}' holds NaN or inf where Keras's output is "
                    f"finite ({run.where}); no file was written")
            worst = max(worst, error / scale)
            pooled[name][0].append(np.ravel(want))
            pooled[name][1].append(np.ravel(got))
    steps, beyond = runtimes.steps_apart(
        pooled, "the int8 graph's meaning (onnxruntime, optimizations off)", "the QAT model")
    return worst, steps, beyond, meanings


def check_runs(data, runs, output_names):
    """The int8 graph `data` runs on the float graph's verification inputs, every size of them,
    with Keras's output shapes and finite values (its accuracy is `quantize_int8`'s to judge, on
    real data: random inputs lie outside the calibrated ranges)."""
    session = runtimes.session(data, optimized=False)
    for run in runs:
        for name, want, got in zip(output_names, run.expected,
                                   session.run(output_names, run.feed)):
            if got.shape != want.shape:
                raise VerificationError(
                    f"the int8 graph's output '{name}' has shape {got.shape}, Keras "
                    f"{want.shape} ({run.where}); no file was written"
                )
            if not np.isfinite(got).all():
                raise VerificationError(
                    f"the int8 graph's output '{name}' holds NaN or inf ({run.where}); no file "
                    "was written"
                )


def _check_shape(runtime, name, want, got, where):
    if np.shape(want) != np.shape(got):
        raise VerificationError(f"{runtime} output '{name}' has shape {np.shape(got)}, Keras "
                                f"{np.shape(want)} ({where}); no file was written")
