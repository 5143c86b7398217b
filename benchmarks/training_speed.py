"""Whole-model training speed (images/s with model.fit): a conv net with our BN vs Keras's BN.

The network: three stages of two (Conv 3x3 without bias -> BN -> ReLU) and a max pool, global
average pool, Dense; 32x32x3 inputs, batch 64. Both layers train the same network in the same
process, compiled with `jit_compile=True` (what `fit` picks by default on TensorFlow and JAX) and,
on TensorFlow, `jit_compile=False` (plain graph, where our layer runs the fused kernel). Each figure
is the median over `--repeats` epochs of `--examples` random images, after one warm-up epoch.

    KERAS_BACKEND=tensorflow python -m benchmarks.training_speed
    KERAS_BACKEND=jax python -m benchmarks.training_speed

Run from the repository root. Results are merged into benchmarks/results/training_speed.json under
the backend's name.
"""

import os

# Read once, when TensorFlow starts: set before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import statistics
import time
from pathlib import Path

import keras
import numpy as np

import keras_bn
from examples import reporting
from examples.cli import positive_int

RESULTS = Path(__file__).parent / "results" / "training_speed.json"


def conv_net(batch_normalization):
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for filters in (32, 64, 128):
        for _ in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = batch_normalization()(x)
            x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def images_per_second(batch_normalization, jit_compile, x, y, repeats):
    keras.utils.set_random_seed(0)
    model = conv_net(batch_normalization)
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # compile and warm up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - start)
    return len(x) / statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=positive_int, default=512, help="images per epoch")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed epochs; the median is kept")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.examples)
    modes = [True, False] if backend == "tensorflow" else [True]
    rows = []
    print(f"backend={backend}, images/s, median of {args.repeats} epochs of {args.examples} images")
    for jit_compile in modes:
        row = {"jit_compile": jit_compile}
        for name, layer in (("keras", keras.layers.BatchNormalization),
                            ("keras_bn", keras_bn.BatchNormalization)):
            row[f"{name}_images_per_second"] = images_per_second(layer, jit_compile, x, y,
                                                                 args.repeats)
        row["speedup"] = row["keras_bn_images_per_second"] / row["keras_images_per_second"]
        rows.append(row)
        print(f"jit_compile={jit_compile!s:5}  keras {row['keras_images_per_second']:7.0f}  "
              f"keras_bn {row['keras_bn_images_per_second']:7.0f}  speed-up {row['speedup']:.2f}x",
              flush=True)
    reporting.merge_json(args.output, backend, {
        "rows": rows, "examples": args.examples, "repeats": args.repeats,
        "machine": f"{os.cpu_count()} CPU cores", "keras": keras.__version__,
    })
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
