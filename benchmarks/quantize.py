"""int8 benchmark: our `export.to_onnx(..., quantize="int8")` against our float32 graph and against
the path a user has today (Keras's `model.export(format="onnx")`, then onnxruntime's
`quant_pre_process` and `quantize_static`), on the same calibration data.

1. ResNet50 and MobileNetV2 (`keras.applications`, weights=None, 224x224x3, BN statistics
   randomized so that BN is not the identity): latency of our float32 graph, our int8 graph,
   Keras's float32 graph and the anchor's int8 graph at batch 1 and 32; node counts
   (QuantizeLinear / DequantizeLinear, ops quantized and left float), file sizes, and how far each
   int8 graph is from its float graph on held-out random images. Calibration is on a few batches
   of random normal images: these untrained models have no data of their own, so their int8
   errors say how the graph was quantized, not what accuracy a trained model keeps.
2. The small BN-Inception (BN-x5, the paper's recipe, seed 0) trained here on scikit-learn's
   digits under TensorFlow, population statistics estimated (Algorithm 2): test accuracy on the
   449 test digits of Keras, our ONNX float, our int8 and the anchor's graphs, top-1 agreement,
   latency at batch 1 and 32. Calibration on the first 512 training digits.
3. A sweep of `quantize_int8`'s choices on this machine: activations uint8 asymmetric or int8
   symmetric, weights 7-bit (`reduce_range=True`) or 8-bit: int8 latency of ResNet50 at batch 1
   and accuracy and agreement on the BN-Inception.
4. The CPU (model name, AVX2 / AVX-512 VNNI / AVX-VNNI flags, `export.quantization.cpu_has_vnni`),
   versions and the load average at start and end; the issue's targets, each with its measured
   value and whether it holds.

onnxruntime runs on the CPU with 2 intra-op threads and `session.intra_op.allow_spinning` = "0";
the graphs of a figure are timed in turn (A B C D, then D C B A), medians of --repeats runs at
batch 1 and half as many (at least 5) at batch 32, after one warm-up run each. Writes
benchmarks/results/quantize.json and quantize.md.

    python -m benchmarks.quantize [--repeats 21] [--output-dir benchmarks/results]
    python -m benchmarks.quantize --quick --output-dir /tmp/quantize   # a toy run, under a minute

Run from the repository root (TensorFlow backend, whatever KERAS_BACKEND says: tf2onnx needs it).
"""

import os

# Read once, when Keras and TensorFlow start: set before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import argparse
import collections
import dataclasses
import itertools
import json
import logging
import platform
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

import export
import keras_bn
from benchmarks.export import randomize_batchnorm
from examples import models, reporting, training
from examples.data import load_dataset
from examples.variants import VARIANTS, build_variant
from export import quantization

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT_DIR = os.path.join(_HERE, "results")
MODELS = ("ResNet50", "MobileNetV2")
BATCH_SIZES = (1, 32)
THREADS = 2
CALIBRATION_BATCH = 32  # to_onnx splits array data into batches of 32; the anchor's reader too
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QUANTIZABLE_OPS = frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)
# The targets.
MAX_INT8_OVER_FLOAT = 0.35
MAX_ACCURACY_DROP_POINTS = 0.5
# The BN-Inception recipe: benchmarks/results/train_inception_digits.json's BN-x5 run (the
# baseline's rate 0.01 times 5, 600 steps of 32, decay over the 600-step budget sped up 6x).
INCEPTION = dict(learning_rate=0.01, steps=600, batch_size=32, alpha=0.125)
SWEEP = (  # (activation_type, symmetric_activations, reduce_range)
    ("uint8", False, True), ("uint8", False, False), ("int8", True, True), ("int8", True, False),
)


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_facts():
    """The CPU's model name, the flags that decide int8 speed, and what `export` concludes."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "model_name": name or platform.processor() or platform.machine(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "cpu_has_vnni": quantization.cpu_has_vnni(),
        "logical_cpus": os.cpu_count(),
    }


def load_average():
    return [round(value, 2) for value in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# Graphs and sessions


def session(path):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def predict(sess, x, batch_size=256):
    return np.concatenate([run(sess, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def graph_facts(path):
    """Node counts of an ONNX file: all, QDQ, computing nodes quantized (an op onnxruntime's
    quantizer handles, reading a DequantizeLinear output) and left float (any other node with a
    float output, as `export.QuantizationReport` counts them), the counts after onnxruntime's own
    optimizations (where QDQ pairs around a quantized op become one integer kernel, QLinearConv
    and the like, and a float op between a DequantizeLinear and a QuantizeLinear stays float), and
    the file size."""
    proto = onnx.load(path)
    counts = collections.Counter(node.op_type for node in proto.graph.node)
    dequantized = {output for node in proto.graph.node if node.op_type == "DequantizeLinear"
                   for output in node.output}
    types = {value.name: value.type.tensor_type.elem_type for value in itertools.chain(
        onnx.shape_inference.infer_shapes(proto).graph.value_info, proto.graph.output)}
    quantized, left_float = collections.Counter(), collections.Counter()
    for node in proto.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        if node.op_type in QUANTIZABLE_OPS and node.input and node.input[0] in dequantized:
            quantized[node.op_type] += 1
        elif types.get(node.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT:
            left_float[node.op_type] += 1
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = path + ".optimized.onnx"
    onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    optimized = collections.Counter(
        node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    os.remove(options.optimized_model_filepath)
    return {
        "nodes": sum(counts.values()),
        "quantize_linear": counts["QuantizeLinear"],
        "dequantize_linear": counts["DequantizeLinear"],
        "quantized_ops": dict(quantized.most_common()),
        "float_ops": dict(left_float.most_common()),
        "node_counts": dict(counts.most_common()),
        "nodes_after_onnxruntime_optimization": sum(optimized.values()),
        "node_counts_after_onnxruntime_optimization": dict(optimized.most_common()),
        "file_bytes": os.path.getsize(path),
    }


def alternate_latency(sessions, x, repeats):
    """Median milliseconds per run of each session (a dict), timed in turn, forward then backward,
    so that a busy machine slows all alike; and every run's time."""
    names = list(sessions)
    load_before = load_average()
    for name in names:
        run(sessions[name], x)  # warm-up
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else reversed(names)):
            start = time.perf_counter()
            run(sessions[name], x)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": {name: round(statistics.median(t), 3) for name, t in times.items()},
        "repeats": repeats,
        "load_average_before_after": [load_before, load_average()],
        "all_ms": {name: [round(v, 3) for v in t] for name, t in times.items()},
    }


def latency_figures(sessions, x_for_batch, repeats, label):
    """`alternate_latency` at every batch size, with int8/float ratios printed and recorded."""
    figures = {}
    for batch_size in BATCH_SIZES:
        n = repeats if batch_size == 1 else max(5, repeats // 2)
        entry = alternate_latency(sessions, x_for_batch(batch_size), n)
        ms = entry["median_ms"]
        entry["ratios"] = {}
        for int8, reference in (("ours_int8", "ours_float"), ("anchor_int8", "keras_float"),
                                ("ours_int8", "anchor_int8"), ("anchor_int8", "ours_float")):
            if int8 in ms and reference in ms:
                entry["ratios"][f"{int8}/{reference}"] = round(ms[int8] / ms[reference], 3)
        figures[f"batch_{batch_size}"] = entry
        print(f"{label} batch {batch_size}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + "; " + ", ".join(f"{k} {v:.3f}" for k, v in entry["ratios"].items())
              + f" (median of {n}; load {entry['load_average_before_after'][1][0]})", flush=True)
    return figures


def compare(float_sess, int8_sess, x, labels=None):
    """How an int8 graph's output compares with its float graph's on `x`."""
    want, got = predict(float_sess, x).astype(np.float64), predict(int8_sess, x).astype(np.float64)
    scale = float(np.max(np.abs(want)))
    result = {
        "examples": len(x),
        "max_error": float(np.max(np.abs(got - want)) / scale),
        "mean_error": float(np.mean(np.abs(got - want)) / scale),
        "top1_agreement": float(np.mean(got.argmax(1) == want.argmax(1))),
    }
    if labels is not None:
        result["float_accuracy"] = float(np.mean(want.argmax(1) == labels))
        result["int8_accuracy"] = float(np.mean(got.argmax(1) == labels))
    return result


def report_facts(report):
    """The JSON-able part of an `export.QuantizationReport`."""
    facts = dataclasses.asdict(report)
    facts["summary"] = report.summary()
    return facts


# ---------------------------------------------------------------------------------------------
# The anchor: what a user can do today


class _Reader(ort_quantization.CalibrationDataReader):
    """onnxruntime's calibration reader over the same batches our export calibrates on."""

    def __init__(self, name, x, batch_size=CALIBRATION_BATCH):
        self._feeds = iter([{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self._feeds, None)


def anchor_int8(keras_path, int8_path, calibration, *, reduce_range, activation_type="uint8",
                symmetric_activations=False):
    """Keras's ONNX file through `quant_pre_process` and `quantize_static` (QDQ, per-channel int8
    weights, the activation type, symmetry and reduce_range given, MinMax calibration): returns
    notes on what happened. Pre-processing runs with its defaults first; when that fails (its
    symbolic shape inference needs sympy, which onnxruntime does not install), it runs again as
    its error message advises, without symbolic shape inference, and the note says so."""
    notes = {}
    prepared = keras_path + ".prepared.onnx"
    start = time.perf_counter()
    try:
        ort_quantization.quant_pre_process(keras_path, prepared)
    except Exception as error:  # whatever the pre-processing raises is the finding
        notes["preprocess_error"] = f"{type(error).__name__}: {error}"
        ort_quantization.quant_pre_process(keras_path, prepared, skip_symbolic_shape=True)
        notes["preprocess"] = "skip_symbolic_shape=True, as the error advises"
    name = onnx.load(prepared).graph.input[0].name
    ort_quantization.quantize_static(
        prepared, int8_path, _Reader(name, calibration),
        quant_format=ort_quantization.QuantFormat.QDQ, per_channel=True,
        reduce_range=reduce_range, activation_type=quantization.ACTIVATION_TYPES[activation_type],
        weight_type=ort_quantization.QuantType.QInt8,
        calibrate_method=ort_quantization.CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
    )
    os.remove(prepared)
    notes["seconds"] = round(time.perf_counter() - start, 2)
    return notes


def keras_export(model, path):
    start = time.perf_counter()
    model.export(path, format="onnx", verbose=False)
    return round(time.perf_counter() - start, 2)


def try_anchor(keras_path, int8_path, calibration, reduce_range):
    """`anchor_int8`, or the error it failed with (recorded, not raised: that is a result)."""
    try:
        return anchor_int8(keras_path, int8_path, calibration, reduce_range=reduce_range), None
    except Exception as error:
        message = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
        print(f"the anchor path failed: {message}", flush=True)
        return {}, message


# ---------------------------------------------------------------------------------------------
# Models


def toy_model(size):
    """A few Conv/depthwise/Dense + BN blocks, for --quick: the code paths of the applications."""
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="toy")


def random_images(count, size, seed):
    return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype("float32")


def application(name, size):
    keras.utils.set_random_seed(0)
    if name == "toy":
        model = toy_model(size)
    else:
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    randomize_batchnorm(model)
    model(np.zeros((1, size, size, 3), "float32"))  # Keras's export needs a called model
    return model


# ---------------------------------------------------------------------------------------------
# 1. ResNet50 and MobileNetV2


def bench_application(name, size, args, folder):
    print(f"== {name} ({size}x{size}x3, weights=None, BN statistics randomized)", flush=True)
    model = application(name, size)
    calibration = random_images(args.calibration_batches * CALIBRATION_BATCH, size, seed=1)
    validation = random_images(args.validation_examples, size, seed=2)
    paths = {key: os.path.join(folder, f"{name}_{key}.onnx")
             for key in ("ours_float", "ours_int8", "keras_float", "anchor_int8")}
    reduce_range = quantization.cpu_has_vnni() is not True  # what quantize_int8 chooses here

    start = time.perf_counter()
    export.to_onnx(model, paths["ours_float"], verbose=0)
    float_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # Untrained weights on random images: top-1 decisions of near-uniform scores say nothing about
    # accuracy, so the guard is off here (min_agreement=0) and the agreement only recorded.
    ours = export.to_onnx(model, paths["ours_int8"], quantize="int8",
                          calibration_data=calibration, validation_data=validation,
                          calibration_batches=None, min_agreement=0.0, verbose=0)
    int8_seconds = time.perf_counter() - start
    keras_seconds = keras_export(model, paths["keras_float"])
    notes, failure = try_anchor(paths["keras_float"], paths["anchor_int8"], calibration,
                                reduce_range)

    sessions = {key: session(path) for key, path in paths.items()
                if key != "anchor_int8" or failure is None}
    graphs = {key: graph_facts(path) for key, path in paths.items()
              if key != "anchor_int8" or failure is None}
    graphs["ours_float"]["export_seconds"] = round(float_seconds, 2)
    graphs["ours_int8"]["export_seconds"] = round(int8_seconds, 2)
    graphs["ours_int8"]["quantization"] = report_facts(ours.quantization)
    graphs["keras_float"]["export_seconds"] = keras_seconds
    anchor = {"error": failure, **notes}
    if failure is None:
        graphs["anchor_int8"]["anchor"] = notes
    errors = {"ours_int8_vs_ours_float": compare(sessions["ours_float"], sessions["ours_int8"],
                                                 validation)}
    if failure is None:
        errors["anchor_int8_vs_keras_float"] = compare(sessions["keras_float"],
                                                       sessions["anchor_int8"], validation)
    for key, facts in graphs.items():
        print(f"{name} {key}: {facts['nodes']} nodes (QuantizeLinear {facts['quantize_linear']}, "
              f"DequantizeLinear {facts['dequantize_linear']}; float ops "
              f"{sum(facts['float_ops'].values())}), {facts['file_bytes'] / 2**20:.1f} MiB",
              flush=True)
    latency = latency_figures(sessions, lambda b: random_images(b, size, seed=3), args.repeats,
                              name)
    return {
        "input_shape": [size, size, 3],
        "batchnorm_layers": sum(isinstance(layer, keras.layers.BatchNormalization)
                                for layer in model.layers),
        "calibration": {"data": "random images, N(0, 1) per pixel (seed 1)",
                        "batches": args.calibration_batches, "batch_size": CALIBRATION_BATCH,
                        "examples": len(calibration)},
        "validation": {"data": "other random images, N(0, 1) per pixel (seed 2)",
                       "examples": len(validation)},
        "anchor": anchor,
        "graphs": graphs,
        "int8_vs_float": errors,
        "latency": latency,
    }


# ---------------------------------------------------------------------------------------------
# 2. The trained BN-Inception on digits


def train_bn_inception():
    """BN-x5 on digits with the fixed recipe, seed 0; population statistics (Algorithm 2) over
    every full training batch; returned with a softmax, as deployed."""
    data = load_dataset("digits")
    config = training.Config(
        family="inception", learning_rate=INCEPTION["learning_rate"],
        batch_size=INCEPTION["batch_size"], steps=INCEPTION["steps"],
        eval_every=INCEPTION["steps"], alpha=INCEPTION["alpha"], statistics="moving",
        final_population=True,
    )
    variant = VARIANTS["BN-x5"]
    model = build_variant(variant, config, data.input_shape, data.classes, seed=0)
    start = time.perf_counter()
    history = training.train_and_track(model, data, config, reshuffle=variant.reshuffle, seed=0,
                                       verbose=0)
    seconds = time.perf_counter() - start
    recipe = {
        "model": "BN-Inception (examples.models.bn_inception), variant BN-x5", "seed": 0,
        "steps": config.steps, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate * variant.lr_multiplier, "alpha": config.alpha,
        "training_examples": len(data.x_train), "test_examples": len(data.x_test),
        "population_statistics": "Algorithm 2 over every full training batch of 32",
        "accuracy_moving_averages": history.final_accuracy_moving,
        "accuracy_population_statistics": history.final_accuracy,
        "train_seconds": round(seconds, 1),
    }
    print(f"BN-Inception (BN-x5) trained {config.steps} steps in {seconds:.0f} s: test accuracy "
          f"{history.final_accuracy:.2%} with population statistics", flush=True)
    return models.with_softmax(model), data, recipe


def train_toy_digits():
    """For --quick: a small Conv/BN network on 192 training digits, one epoch, population
    statistics estimated; the BN-Inception's code paths in seconds."""
    data = load_dataset("digits")
    data.x_train, data.y_train = data.x_train[:192], data.y_train[:192]
    keras.utils.set_random_seed(0)
    inputs = keras.Input(data.input_shape, name="digit")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(data.classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="toy_digits")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy",
                  jit_compile=False)
    model.fit(data.x_train, data.y_train, batch_size=32, epochs=1, verbose=0)
    keras_bn.estimate_population_statistics(model, data.x_train, batch_size=32, verbose=0)
    recipe = {"model": "toy Conv/BN network (--quick)", "seed": 0, "epochs": 1,
              "training_examples": len(data.x_train), "test_examples": len(data.x_test)}
    return model, data, recipe


def bench_bn_inception(model, data, args, folder, label):
    print(f"== {label} on digits", flush=True)
    calibration = data.x_train[:args.digits_calibration_batches * CALIBRATION_BATCH]
    x_test, y_test = data.x_test, data.y_test
    paths = {key: os.path.join(folder, f"bn_inception_{key}.onnx")
             for key in ("ours_float", "ours_int8", "keras_float", "anchor_int8")}
    reduce_range = quantization.cpu_has_vnni() is not True

    export.to_onnx(model, paths["ours_float"], verbose=0)
    int8_options = dict(quantize="int8", calibration_data=calibration,
                        validation_data=(x_test, y_test), calibration_batches=None, verbose=0)
    ours_error = None
    try:  # the guard at its default (99% top-1 agreement), what a user gets; off for --quick
        ours = export.to_onnx(model, paths["ours_int8"], **int8_options,
                              **({"min_agreement": 0.0} if args.quick else {}))
    except keras_bn.VerificationError as error:
        # A finding, recorded; the figures below are then those of the graph the guard refused.
        ours_error = str(error).splitlines()[0]
        print(f"our int8 export refused: {ours_error}", flush=True)
        ours = export.to_onnx(model, paths["ours_int8"], **int8_options, min_agreement=0.0)
    keras_seconds = keras_export(model, paths["keras_float"])
    notes, failure = try_anchor(paths["keras_float"], paths["anchor_int8"], calibration,
                                reduce_range)
    present = [key for key in paths if os.path.exists(paths[key])]
    sessions = {key: session(paths[key]) for key in present}
    keras_scores = training.predict(model, x_test)
    keras_top1 = keras_scores.argmax(1)
    accuracy = {"keras": float(np.mean(keras_top1 == y_test))}
    agreement_with_keras, scores = {}, {}
    for key, sess in sessions.items():
        scores[key] = predict(sess, x_test)
        accuracy[key] = float(np.mean(scores[key].argmax(1) == y_test))
        agreement_with_keras[key] = float(np.mean(scores[key].argmax(1) == keras_top1))
    pairs = {"ours_int8_vs_ours_float": ("ours_float", "ours_int8"),
             "anchor_int8_vs_keras_float": ("keras_float", "anchor_int8")}
    int8_vs_float = {label: compare(sessions[a], sessions[b], x_test, y_test)
                     for label, (a, b) in pairs.items() if a in sessions and b in sessions}
    print(f"{label} test accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items()),
          flush=True)
    graphs = {key: graph_facts(paths[key]) for key in present}
    graphs["keras_float"]["export_seconds"] = keras_seconds
    graphs["ours_int8"]["quantization"] = report_facts(ours.quantization)
    latency = latency_figures(
        sessions, lambda b: np.ascontiguousarray(x_test[:b]), args.repeats * 5, label)
    return {
        "label": label,
        "calibration": {"data": f"the first {len(calibration)} training digits",
                        "examples": len(calibration), "batch_size": CALIBRATION_BATCH},
        "validation": {"data": "the test digits, with labels", "examples": len(x_test)},
        "min_agreement": 0.0 if args.quick else quantization.DEFAULT_MIN_AGREEMENT,
        "ours_int8_refused_by_guard": ours_error,
        "anchor": {"error": failure, **notes},
        "accuracy": accuracy,
        "top1_agreement_with_keras": agreement_with_keras,
        "int8_vs_float": int8_vs_float,
        "graphs": graphs,
        "latency": latency,
        "paths": paths,
    }


# ---------------------------------------------------------------------------------------------
# 3. The sweep of quantize_int8's choices


def sweep(latency_model, latency_float_path, latency_calibration, size, digits_float_path, data,
          label, args, folder):
    """Each (activation type and symmetry, reduce_range) through `quantize_int8` on our float
    graphs: the int8 latency of `latency_model` (ResNet50) at batch 1, every configuration timed
    in turn with the float graph, twice --repeats runs; and the digits model's accuracy and top-1
    agreement with its float graph on the test digits."""
    print(f"== sweep: activations and reduce_range ({latency_model} batch 1, {label})",
          flush=True)
    rows, sessions = [], {"float": session(latency_float_path)}
    digits_calibration = data.x_train[:args.digits_calibration_batches * CALIBRATION_BATCH]
    for activation_type, symmetric, reduce_range in SWEEP:
        key = (f"{activation_type}_{'symmetric' if symmetric else 'asymmetric'}_"
               f"{'7bit' if reduce_range else '8bit'}_weights")
        options = dict(method="minmax", max_batches=None, min_agreement=0.0, verbose=0,
                       activation_type=activation_type, symmetric_activations=symmetric,
                       reduce_range=reduce_range)
        int8, report = export.quantize_int8(latency_float_path, latency_calibration, **options)
        path = os.path.join(folder, f"sweep_{key}.onnx")
        onnx.save(int8, path)
        sessions[key] = session(path)
        _, digits = export.quantize_int8(digits_float_path, digits_calibration,
                                         validation_data=(data.x_test, data.y_test), **options)
        output = digits.outputs[0]
        rows.append({
            "configuration": key, "activation_type": activation_type,
            "symmetric_activations": symmetric, "reduce_range": reduce_range,
            "latency_model_mean_error": report.outputs[0].mean_error,
            "latency_model_max_error": report.outputs[0].max_error,
            "bn_inception_float_accuracy": output.float_accuracy,
            "bn_inception_int8_accuracy": output.int8_accuracy,
            "bn_inception_top1_agreement": output.agreement,
            "bn_inception_mean_error": output.mean_error,
        })
    timing = alternate_latency(sessions, random_images(1, size, seed=3), 2 * args.repeats)
    for row in rows:
        ms = timing["median_ms"][row["configuration"]]
        row[f"{latency_model}_batch_1_ms"] = ms
        row[f"{latency_model}_batch_1_int8_over_float"] = round(
            ms / timing["median_ms"]["float"], 3)
        print(f"sweep {row['configuration']}: {latency_model} batch 1 {ms:.2f} ms "
              f"({row[f'{latency_model}_batch_1_int8_over_float']:.3f}x float); {label} int8 "
              f"{row['bn_inception_int8_accuracy']:.2%} (float "
              f"{row['bn_inception_float_accuracy']:.2%}), agreement "
              f"{row['bn_inception_top1_agreement']:.2%}", flush=True)
    fastest = min(rows, key=lambda r: r[f"{latency_model}_batch_1_ms"])["configuration"]
    # Agreement first: on 449 digits a graph that flips many decisions can still gain accuracy.
    most_accurate = max(rows, key=lambda r: (r["bn_inception_top1_agreement"],
                                             r["bn_inception_int8_accuracy"]))["configuration"]
    default = rows[0]["configuration"] if quantization.cpu_has_vnni() is not True else rows[1][
        "configuration"]
    return {
        "latency_model": latency_model,
        "float_batch_1_ms": timing["median_ms"]["float"],
        "repeats": timing["repeats"],
        "calibration": "as in the benchmark above: the same random images and training digits",
        "configurations": rows,
        "default_on_this_machine": default,
        "fastest": fastest,
        "most_accurate_on_bn_inception": most_accurate,
        "most_accurate_means": "highest top-1 agreement with the float graph, then accuracy",
        "all_ms": timing["all_ms"],
    }


# ---------------------------------------------------------------------------------------------
# Targets, the table, main


def targets(results, models_run):
    """The issue's targets, each with the value measured here and whether it holds (`None`: not
    measured, the note says why)."""
    found = []
    no_vnni = "" if results["machine"]["cpu"]["cpu_has_vnni"] else "AVX2 only, no VNNI"

    def target(name, measured, threshold, holds, note=""):
        found.append({"target": name, "measured": measured, "threshold": threshold,
                      "holds": holds, "note": note})

    if "ResNet50" in results["models"]:
        for batch_size in BATCH_SIZES:
            ratios = results["models"]["ResNet50"]["latency"][f"batch_{batch_size}"]["ratios"]
            ratio = ratios["ours_int8/ours_float"]
            target(f"ResNet50 int8 latency / our float32, batch {batch_size}", ratio,
                   f"<= {MAX_INT8_OVER_FLOAT}", ratio <= MAX_INT8_OVER_FLOAT, no_vnni)
    digits = results["bn_inception_digits"]
    label, accuracy = digits["label"], digits["accuracy"]
    refused = digits["ours_int8_refused_by_guard"]
    drop = round(100 * (accuracy["ours_float"] - accuracy["ours_int8"]), 3)
    target(f"{label} int8 accuracy drop vs our ONNX float (points)", drop,
           f"<= {MAX_ACCURACY_DROP_POINTS}", drop <= MAX_ACCURACY_DROP_POINTS,
           f"the guard refused the graph: {refused}" if refused else "")
    for name in models_run + [label]:
        entry = digits if name == label else results["models"][name]
        for batch_size in BATCH_SIZES:
            ratios = entry["latency"][f"batch_{batch_size}"]["ratios"]
            what = f"{name} our int8 / anchor int8 latency, batch {batch_size}"
            if entry["anchor"]["error"] is not None:
                target(what, None, "<= 1.0", None,
                       f"the anchor path failed: {entry['anchor']['error']}")
            else:
                ratio = ratios["ours_int8/anchor_int8"]
                target(what, ratio, "<= 1.0", ratio <= 1.0)
    what = f"{label} int8 accuracy: ours - anchor's (points)"
    if digits["anchor"]["error"] is not None:
        target(what, None, ">= 0", None, f"the anchor path failed: {digits['anchor']['error']}")
    else:
        target(what, round(100 * (accuracy["ours_int8"] - accuracy["anchor_int8"]), 3), ">= 0",
               accuracy["ours_int8"] >= accuracy["anchor_int8"])
    return found


def _ms(entry, key):
    value = entry["median_ms"].get(key)
    return "failed" if value is None else f"{value:.2f}"


def table(results, models_run):
    cpu = results["machine"]["cpu"]
    vnni = "with VNNI" if cpu["cpu_has_vnni"] else "AVX2, no VNNI"
    lines = [
        f"onnxruntime {results['versions']['onnxruntime']}, {THREADS} intra-op threads, "
        f"{cpu['model_name']} ({vnni}); median ms",
        "",
        "| model | batch | ours float32 | ours int8 | int8/float | Keras float32 | anchor int8 "
        "| ours int8 / anchor int8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    digits = results["bn_inception_digits"]
    for name in models_run + [digits["label"]]:
        entry = digits if name == digits["label"] else results["models"][name]
        for batch_size in BATCH_SIZES:
            figures = entry["latency"][f"batch_{batch_size}"]
            ratios = figures["ratios"]
            lines.append(
                f"| {name} | {batch_size} | {_ms(figures, 'ours_float')} | "
                f"{_ms(figures, 'ours_int8')} | {ratios.get('ours_int8/ours_float', '-')} | "
                f"{_ms(figures, 'keras_float')} | {_ms(figures, 'anchor_int8')} | "
                f"{ratios.get('ours_int8/anchor_int8', '-')} |")
    accuracy = digits["accuracy"]
    lines += ["", f"{digits['label']} on the {digits['validation']['examples']} test digits, "
              "accuracy: " + ", ".join(
        f"{key} {value:.2%}" for key, value in accuracy.items()), "",
        "| target | measured | threshold | holds |", "|---|---|---|---|"]
    for entry in results["targets"]:
        holds = {True: "yes", False: "**no**", None: "not measured"}[entry["holds"]]
        lines.append(f"| {entry['target']} | {entry['measured']} | {entry['threshold']} | "
                     f"{holds} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed runs at batch 1 (half as "
                        "many, at least 5, at batch 32; five times as many on the BN-Inception)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="where quantize.json and quantize.md go")
    parser.add_argument("--models", default=None, help="keras.applications models, comma "
                        f"separated (default {','.join(MODELS)}; 'toy' with --quick)")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="batches of 32 random images the applications calibrate on")
    parser.add_argument("--validation-examples", type=int, default=64,
                        help="random images the applications' int8 graphs are compared on")
    parser.add_argument("--digits-calibration-batches", type=int, default=16,
                        help="batches of 32 training digits the BN-Inception calibrates on")
    parser.add_argument("--quick", action="store_true",
                        help="a toy run: a small conv net at 32x32, 8 training steps, 3 repeats")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: {args.repeats}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.calibration_batches = min(args.calibration_batches, 2)
        args.validation_examples = min(args.validation_examples, 32)
        args.digits_calibration_batches = min(args.digits_calibration_batches, 4)
    models_run = (args.models or ("toy" if args.quick else ",".join(MODELS))).split(",")
    size = 32 if args.quick else 224
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    started = time.perf_counter()
    command = "python -m benchmarks.quantize " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    results = {
        "what": "int8 ONNX: export.to_onnx(quantize='int8') against our float32 graph and against "
                "Keras's model.export(format='onnx') + onnxruntime quant_pre_process + "
                "quantize_static on the same calibration data",
        "command": command.strip(),
        "quick": args.quick,
        "machine": {"cpu": cpu_facts(), "platform": platform.platform(),
                    "load_average_start": load_average(),
                    "note": "2-core VM shared with other processes while measured; medians"},
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__,
                     "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "onnxruntime_session": {"intra_op_num_threads": THREADS,
                                "session.intra_op.allow_spinning": "0",
                                "providers": ["CPUExecutionProvider"]},
        "method": "every graph of a figure timed in turn (forward, then backward), one warm-up "
                  "run each, medians of repeats; int8 is QDQ, MinMax calibration, weights int8 "
                  "symmetric per channel, activations uint8 asymmetric, reduce_range as "
                  "quantize_int8 chooses on this CPU, for ours and the anchor alike",
        "reduce_range": quantization.cpu_has_vnni() is not True,
        "models": {},
    }
    cpu = results["machine"]["cpu"]
    print(f"CPU {cpu['model_name']}: avx2 {cpu['avx2']}, avx512_vnni {cpu['avx512_vnni']}, "
          f"avx_vnni {cpu['avx_vnni']}, cpu_has_vnni {cpu['cpu_has_vnni']}; load "
          f"{results['machine']['load_average_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="keras-bn-quantize-") as folder:
        for name in models_run:
            results["models"][name] = bench_application(name, size, args, folder)
        model, data, recipe = train_toy_digits() if args.quick else train_bn_inception()
        digits = bench_bn_inception(model, data, args, folder,
                                    "toy digits" if args.quick else "BN-Inception")
        paths = digits.pop("paths")
        results["bn_inception_digits"] = {"training": recipe, **digits}
        first = models_run[0]
        calibration = random_images(args.calibration_batches * CALIBRATION_BATCH, size, seed=1)
        results["sweep"] = sweep(first, os.path.join(folder, f"{first}_ours_float.onnx"),
                                 calibration, size, paths["ours_float"], data, digits["label"],
                                 args, folder)
    results["machine"]["load_average_end"] = load_average()
    results["targets"] = targets(results, models_run)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print("== targets", flush=True)
    for entry in results["targets"]:
        holds = {True: "holds", False: "DOES NOT HOLD", None: "not measured"}[entry["holds"]]
        print(f"{entry['target']}: {entry['measured']} (target {entry['threshold']}): {holds}"
              + (f" [{entry['note']}]" if entry["note"] else ""), flush=True)
    json_path = os.path.join(args.output_dir, "quantize.json")
    if os.path.exists(json_path):  # examples.qat's section, measured apart, stays
        with open(json_path) as f:
            previous = json.load(f)
        if "qat" in previous:
            results["qat"] = previous["qat"]
    json_path = reporting.write_json(json_path, results)
    reporting.write_text(os.path.join(args.output_dir, "quantize.md"),
                         table(results, models_run))
    print(f"wrote {json_path} and quantize.md in {results['seconds'] / 60:.1f} min; load average "
          f"{results['machine']['load_average_end']}", flush=True)
    return results


if __name__ == "__main__":
    main()
