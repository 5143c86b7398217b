"""Export benchmark: our `export.to_onnx` against Keras's `model.export(format="onnx")`.

For ResNet50 and MobileNetV2 (weights=None, BN statistics randomized, 224x224x3): export time,
ONNX node counts (as written, and after onnxruntime's own graph optimizations), file size, and
onnxruntime latency at batch 1 and 32, plus batch 1 with onnxruntime's graph optimizations off (as
a runtime without its fusions would run the file); same process, the two graphs timed alternately,
median of the repeats. Writes benchmarks/results/export.json.

    python -m benchmarks.export [--input-size 224] [--repeats 15] [--threads 1] [--output PATH]

Run from the repository root (TensorFlow backend, whatever KERAS_BACKEND says: tf2onnx needs it).
"""

import os

# Read once, when Keras and TensorFlow start: set before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import argparse
import collections
import json
import logging
import platform
import statistics
import tempfile
import time

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

import export
from examples.cli import positive_int

_HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("ResNet50", "MobileNetV2")
BATCH_SIZES = (1, 32)
NORMALIZATION_OPS = ("BatchNormalization", "Sub", "Div", "Sqrt", "Rsqrt", "Reciprocal")


def randomize_batchnorm(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.2, channels))
    return model


def graph_facts(path):
    counts = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    return {
        "nodes": sum(counts.values()),
        "node_counts": dict(counts.most_common()),
        "normalization_nodes": sum(counts[op] for op in NORMALIZATION_OPS),
        "mul_nodes": counts["Mul"],
        "file_bytes": os.path.getsize(path),
    }


def runtime_optimized_nodes(path):
    """Node count after onnxruntime's own graph optimizations (what it actually runs)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = path + ".optimized.onnx"
    onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return len(onnx.load(options.optimized_model_filepath).graph.node)


def session(path, threads, optimize=True):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not optimize:  # as a runtime without onnxruntime's fusions would run the file
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def alternate_latency(sessions, x, repeats):
    """Median milliseconds per run for each session, timing them in turn to share the noise."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds):
        s.run(None, feed)  # warm-up
    times = [[] for _ in sessions]
    for repeat in range(repeats):
        order = range(len(sessions)) if repeat % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(t) for t in times], times


def bench_model(name, size, repeats, threads, folder):
    model = randomize_batchnorm(getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3)))
    model(np.zeros((1, size, size, 3), "float32"))  # Keras's export needs a called model

    ours_path = os.path.join(folder, f"{name}_keras_bn.onnx")
    start = time.perf_counter()
    result = export.to_onnx(model, ours_path)
    ours_seconds = time.perf_counter() - start

    keras_path = os.path.join(folder, f"{name}_keras.onnx")
    start = time.perf_counter()
    model.export(keras_path, format="onnx", verbose=False)
    keras_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    latency = {}
    runs = [(batch_size, True) for batch_size in BATCH_SIZES] + [(1, False)]
    for batch_size, optimize in runs:
        sessions = [session(ours_path, threads, optimize), session(keras_path, threads, optimize)]
        x = rng.uniform(-1, 1, (batch_size, size, size, 3)).astype("float32")
        want = keras.ops.convert_to_numpy(model(x, training=False))
        errors = [float(np.max(np.abs(s.run(None, {s.get_inputs()[0].name: x})[0] - want))
                        / np.max(np.abs(want))) for s in sessions]
        n = repeats if batch_size == 1 else max(7, repeats // 2)  # a batch of 32 takes seconds
        (ours_ms, keras_ms), raw = alternate_latency(sessions, x, n)
        key = f"batch_{batch_size}" + ("" if optimize else "_without_graph_optimization")
        latency[key] = {
            "ours_ms": round(ours_ms, 3), "keras_ms": round(keras_ms, 3),
            "ratio": round(ours_ms / keras_ms, 3), "repeats": n,
            "ours_max_error": errors[0], "keras_max_error": errors[1],
            "ours_all_ms": [round(t, 3) for t in raw[0]],
            "keras_all_ms": [round(t, 3) for t in raw[1]],
        }
        print(f"{name} {key}: ours {ours_ms:.2f} ms, Keras {keras_ms:.2f} ms "
              f"(ratio {ours_ms / keras_ms:.3f}, median of {n})", flush=True)

    ours, theirs = graph_facts(ours_path), graph_facts(keras_path)
    ours["nodes_after_onnxruntime_optimization"] = runtime_optimized_nodes(ours_path)
    theirs["nodes_after_onnxruntime_optimization"] = runtime_optimized_nodes(keras_path)
    print(f"{name}: nodes ours {ours['nodes']} vs Keras {theirs['nodes']}; export "
          f"{ours_seconds:.1f} s vs {keras_seconds:.1f} s", flush=True)
    return {
        "input_shape": [size, size, 3],
        "batchnorm_layers": sum(isinstance(layer, keras.layers.BatchNormalization)
                                for layer in model.layers),
        "ours": {**ours, "export_seconds": round(ours_seconds, 2),
                 "folded": len(result.folded), "frozen": len(result.frozen),
                 "verified_max_error": result.max_error},
        "keras_export": {**theirs, "export_seconds": round(keras_seconds, 2)},
        "latency": latency,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=positive_int, default=224)
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed runs at batch 1 "
                        "(half as many, at least 7, at batch 32)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="onnxruntime intra-op threads; "
                        "1 keeps the A/B timing steadier on a shared machine")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--output", default=os.path.join(_HERE, "results", "export.json"))
    args = parser.parse_args()
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    results = {
        "what": "export.to_onnx vs keras Model.export(format='onnx'); onnxruntime CPU latency, "
                "median ms, the two graphs timed alternately in one process",
        "onnxruntime_threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "shared by several processes while measured; medians"},
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__,
                     "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            results["models"][name] = bench_model(name, args.input_size, args.repeats,
                                                  args.threads, folder)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
