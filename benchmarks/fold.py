"""Benchmark of keras_bn.fold_batchnorm on ResNet50 and MobileNetV2 (weights=None).

For each model: the time to fold (with and without verification), how many BN folded, the
verification error, and the inference latency of the folded and the unfolded model in Keras
(`predict_on_batch`, same process, batch 1 and 32, median of --repeats runs after warm-up, three
times as many at batch 1, which is cheap and noisier; the two models alternate so that a busy
machine slows both alike). The classifier has no softmax, so that verification compares logits.
Writes benchmarks/results/fold.json, with the 1-minute load average at start and end (on a busy
machine, runs of batch 1 move by tens of percent: `--output benchmarks/results/fold_busy.json`).

    python -m benchmarks.fold [--repeats 7] [--image-size 224] [--output PATH]

Run from the repository root.
"""

import os

# Read once, when TensorFlow starts: set before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import platform
import statistics
import time

import keras
import numpy as np

import keras_bn
from examples.cli import positive_int

MODELS = ("ResNet50", "MobileNetV2")
BATCH_SIZES = (1, 32)
WARM_UP = 2


def randomize_statistics(model, seed=0):
    """BN statistics far from their initial 1 and 0, so that folding has work to do."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # keras.applications models hold no nested models
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.1, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))


def time_fold(model, repeats):
    """Median seconds of fold_batchnorm with verify=True and with verify=False; a verified fold."""
    timings = {True: [], False: []}
    for _ in range(repeats):
        for verify in (True, False):
            start = time.perf_counter()
            keras_bn.fold_batchnorm(model, verify=verify)
            timings[verify].append(time.perf_counter() - start)
    verified = keras_bn.fold_batchnorm(model, verify=True)
    return statistics.median(timings[True]), statistics.median(timings[False]), verified


def time_inference(unfolded, folded, batch_size, repeats, image_size):
    x = np.random.default_rng(1).normal(size=(batch_size, image_size, image_size, 3))
    x = x.astype("float32")
    runs = {"unfolded": [], "folded": []}
    for index in range(WARM_UP + repeats):
        for name, model in (("unfolded", unfolded), ("folded", folded)):
            start = time.perf_counter()
            model.predict_on_batch(x)
            if index >= WARM_UP:
                runs[name].append(time.perf_counter() - start)
    unfolded_ms = 1000 * statistics.median(runs["unfolded"])
    folded_ms = 1000 * statistics.median(runs["folded"])
    return {
        "unfolded_ms": round(unfolded_ms, 2),
        "folded_ms": round(folded_ms, 2),
        "folded_over_unfolded": round(folded_ms / unfolded_ms, 3),
        "runs": repeats,
    }


def benchmark(name, repeats, image_size):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(image_size, image_size, 3), classifier_activation=None
    )
    randomize_statistics(model)
    fold_seconds, fold_seconds_unverified, folded = time_fold(model, repeats=3)
    report = folded.fold_report
    result = {
        "parameters": model.count_params(),
        "bn_folded": len(report.folded),
        "bn_total": report.total,
        "layers_before": len(model.layers),
        "layers_after": len(folded.layers),
        "fold_seconds": round(fold_seconds, 3),
        "fold_seconds_without_verify": round(fold_seconds_unverified, 3),
        "verify_max_error": report.max_error,
        "verify_scale": report.scale,
        "latency": {},
    }
    for batch_size in BATCH_SIZES:
        runs = 3 * repeats if batch_size == 1 else repeats
        result["latency"][str(batch_size)] = time_inference(
            model, folded, batch_size, runs, image_size
        )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed runs per figure (>= 5)")
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fold.json"),
    )
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of >= 5 runs). "
                     f"Received: {args.repeats}")
    results = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs)",
        "image_size": args.image_size,
        "method": "median of --repeats runs (3x at batch 1) of model.predict_on_batch after 2 "
        "warm-up runs; folded and unfolded alternate; fold time is the median of 3 folds",
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "models": {},
    }
    for name in MODELS:
        results["models"][name] = benchmark(name, args.repeats, args.image_size)
        print(name, json.dumps(results["models"][name], indent=2), flush=True)
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    temporary = args.output + ".tmp"
    with open(temporary, "w") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    os.replace(temporary, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
