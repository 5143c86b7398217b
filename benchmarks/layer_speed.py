"""Training step and inference time: keras_bn.BatchNormalization vs keras.layers.BatchNormalization.

Both layers run in the same process, on the same inputs, compiled the same way (a `tf.function`
on TensorFlow, with and without XLA; `jax.jit` on JAX). A training step is the forward pass, the
backward pass of a fixed upstream gradient dy (gradients for the input, gamma and beta) and the
moving-average update: the layer's own work, with no loss computation around it. Each figure
is the median over `--repeats` repetitions of the mean time of `--iterations` calls; the two layers
alternate within each repetition.

"graph" is a plain `tf.function`, where our layer runs TensorFlow's fused kernel; "xla" is
`jit_compile=True` (what `model.fit` picks by default on TensorFlow), where XLA expands both layers
into the same element-wise code, so the ratio there is about 1. In graph mode the bare
`FusedBatchNormV3` training step is timed alongside (`fused_kernel_train_ms`): the floor of our
layer's step there.

    KERAS_BACKEND=tensorflow python -m benchmarks.layer_speed
    KERAS_BACKEND=jax python -m benchmarks.layer_speed

Run from the repository root. Results are merged into benchmarks/results/layer_speed.json under
the backend's name.
"""

import os

# Read once, when TensorFlow starts: set before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import platform
import statistics
import time
from pathlib import Path

import keras
import numpy as np

import keras_bn
from examples import reporting
from examples.cli import positive_int

SHAPES = [(64, 32, 32, 64), (32, 56, 56, 128), (256, 1024)]
RESULTS = Path(__file__).parent / "results" / "layer_speed.json"


def tensorflow_steps(layer, x, dy, jit_compile):
    import tensorflow as tf

    x, dy = tf.constant(x), tf.constant(dy)
    variables = layer.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def train_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x, *variables], output_gradients=dy)

    @tf.function(jit_compile=jit_compile)
    def inference():
        return layer(x, training=False)

    return lambda: train_step()[0].numpy(), lambda: inference().numpy()


def fused_kernel_step(x, dy, momentum=0.99):
    """The bare `FusedBatchNormV3` training step (forward, backward, moving-average update) that
    our layer runs in graph mode: the floor for its time, and the kernel behind the issue's premise
    ("3.7-4.8x faster than Keras's layer")."""
    import tensorflow as tf

    channels = x.shape[-1]
    x4, dy4 = (tf.constant(a if a.ndim == 4 else a.reshape(-1, 1, 1, channels)) for a in (x, dy))
    gamma, beta = tf.Variable(tf.ones(channels)), tf.Variable(tf.zeros(channels))
    moving_mean, moving_variance = tf.Variable(tf.zeros(channels)), tf.Variable(tf.ones(channels))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            tape.watch(x4)
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x4, gamma, beta, epsilon=1e-3, is_training=True
            )
        moving_mean.assign(moving_mean * momentum + mean * (1 - momentum))
        moving_variance.assign(moving_variance * momentum + variance * (1 - momentum))
        return tape.gradient(y, [x4, gamma, beta], output_gradients=dy4)

    return lambda: train_step()[0].numpy()


def jax_steps(layer, x, dy):
    import jax
    import jax.numpy as jnp

    x, dy = jnp.asarray(x), jnp.asarray(dy)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def train(trainable, non_trainable, x, dy):
        def forward(trainable, x):
            return layer.stateless_call(trainable, non_trainable, x, training=True)

        _, backward, updated = jax.vjp(forward, trainable, x, has_aux=True)
        return backward(dy), updated

    infer = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, training=False)[0])
    return (
        lambda: jax.block_until_ready(train(trainable, non_trainable, x, dy)),
        lambda: jax.block_until_ready(infer(trainable, non_trainable, x)),
    )


def median_ms(functions, iterations, repeats):
    """Median ms per call of each function; they alternate within every repetition, so that load
    from other processes falls on all of them alike."""
    for function in functions:
        function()  # compile and warm up
        function()
    # Sub-millisecond calls get more iterations (>= 50 ms per repetition), or timer noise and
    # scheduling dominate their ratio.
    start = time.perf_counter()
    functions[0]()
    iterations = max(iterations, int(0.05 / max(time.perf_counter() - start, 1e-6)))
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            for _ in range(iterations):
                function()
            samples.append((time.perf_counter() - start) / iterations * 1e3)
    return [statistics.median(samples) for samples in times]


def measure(shape, mode, iterations, repeats):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    dy = rng.normal(0.0, 1.0, shape).astype("float32")  # the upstream gradient
    steps = {}
    layers = (("keras", keras.layers.BatchNormalization), ("keras_bn", keras_bn.BatchNormalization))
    for name, cls in layers:
        layer = cls()
        layer.build(shape)
        if mode == "jit":
            steps[name] = jax_steps(layer, x, dy)
        else:
            steps[name] = tensorflow_steps(layer, x, dy, jit_compile=mode == "xla")
    row = {"shape": list(shape), "mode": mode}
    for index, kind in enumerate(("train", "inference")):
        functions = [steps["keras"][index], steps["keras_bn"][index]]
        if kind == "train" and mode == "graph":
            functions.append(fused_kernel_step(x, dy))
        keras_ms, ours_ms, *kernel_ms = median_ms(functions, iterations, repeats)
        row[f"keras_{kind}_ms"] = keras_ms
        row[f"keras_bn_{kind}_ms"] = ours_ms
        row[f"{kind}_ratio"] = ours_ms / keras_ms
        if kernel_ms:
            row["fused_kernel_train_ms"] = kernel_ms[0]
            row["fused_kernel_train_ratio"] = kernel_ms[0] / keras_ms
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=positive_int, default=10, help="calls per repetition")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="repetitions; the median is kept")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    backend = keras.backend.backend()
    modes = {"tensorflow": ["graph", "xla"], "jax": ["jit"]}.get(backend)
    if modes is None:
        raise SystemExit(
            f"benchmarks.layer_speed measures the tensorflow and jax backends, not {backend!r}")
    rows = []
    print(f"backend={backend}  median of {args.repeats} x {args.iterations} calls, ms per call")
    print(f"{'shape':>20} {'mode':>5} | {'train: keras':>12} {'ours':>8} {'ratio':>6} | "
          f"{'infer: keras':>12} {'ours':>8} {'ratio':>6}")
    for mode in modes:
        for shape in SHAPES:
            row = measure(shape, mode, args.iterations, args.repeats)
            rows.append(row)
            print(f"{str(shape):>20} {mode:>5} | {row['keras_train_ms']:12.2f} "
                  f"{row['keras_bn_train_ms']:8.2f} {row['train_ratio']:6.2f} | "
                  f"{row['keras_inference_ms']:12.2f} {row['keras_bn_inference_ms']:8.2f} "
                  f"{row['inference_ratio']:6.2f}"
                  + (f" | bare kernel: train {row['fused_kernel_train_ms']:.2f} ms, ratio "
                     f"{row['fused_kernel_train_ratio']:.2f}" if "fused_kernel_train_ms" in row
                     else ""), flush=True)

    reporting.merge_json(args.output, backend, {
        "rows": rows,
        "repeats": args.repeats,
        "iterations": args.iterations,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": {"keras": keras.__version__, backend: __import__(backend).__version__},
    })
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
