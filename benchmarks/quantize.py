"""int8 benchmark: our `export.to_onnx(..., quantize="int8")` against our float32 graph and against
the path a user has today (Keras's `model.export(format="onnx")`, then onnxruntime's
`quant_pre_process` and `quantize_static` with the "cpu" target's settings,
`export.targets.get("cpu").quantize_static_options()`), on the same calibration data.

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
3. Per deployment target (`export.targets`: "cpu", "cpu-vnni", "tensorrt"), on ResNet50,
   MobileNetV2 and the BN-Inception: `export.quantize_int8(our float graph, target=...)` on the
   same calibration data; the int8/float latency ratio in onnxruntime and in OpenVINO's CPU plugin
   at batch 1 and 32 (float and every target's int8 file of a model in both runtimes timed in
   turn, so each ratio's float anchor runs in the same runtime beside it), OpenVINO int8 against
   onnxruntime int8, the layers OpenVINO executes in integers, how each runtime compares with the
   file's exact meaning (`QuantizationReport.runtimes`), and on the BN-Inception the accuracy on
   the 449 test digits of the file's meaning and of each runtime. A file the export refuses (a
   guard, a runtime that disagrees with its meaning) is recorded with the refusal's message, then
   made again with the refusing check off, so that its figures are measured and marked as such.
4. The CPU (model name, AVX2 / AVX-512 / VNNI / AMX flags, `export.quantization.cpu_has_vnni`),
   recorded beside every figure, versions and the load average at start and end; the issue's
   targets, each with its measured value and whether it holds.

onnxruntime runs on the CPU with 2 intra-op threads and `session.intra_op.allow_spinning` = "0";
OpenVINO through `export.runtimes.OpenVINOSession` (CPU plugin, INFERENCE_PRECISION_HINT f32, its
latency defaults: every core of this machine); the graphs of a figure are timed in turn
(A B C D, then D C B A), medians of --repeats runs at
batch 1 and half as many (at least 5) at batch 32, after one warm-up run each. Writes
benchmarks/results/quantize.json and quantize.md.

    python -m benchmarks.quantize [--repeats 21] [--output-dir benchmarks/results]
    python -m benchmarks.quantize --quick --output-dir /tmp/quantize   # a toy run, about a minute

Run from the repository root (TensorFlow backend, whatever KERAS_BACKEND says: tf2onnx needs it).
"""

import os

# Read once, when Keras and TensorFlow start: set before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import argparse
import collections
import dataclasses
import functools
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
from benchmarks import machine
from benchmarks.export import randomize_batchnorm
from examples import models, reporting, training
from examples.cli import positive_int
from examples.data import load_dataset
from examples.variants import VARIANTS, build_variant
from export import quantization, runtimes
from export import targets as deployment_targets

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
# The anchor calibrates and quantizes as the default target does.
ANCHOR_TARGET = "cpu"
# On a VNNI CPU the "cpu" file (weights within +-64) may cost at most this over "cpu-vnni"'s.
MAX_CPU_OVER_CPU_VNNI = 1.05
# The layers whose execution precision in OpenVINO says whether it runs the int8 file in integers.
OPENVINO_COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_facts():
    """The CPU's model name, the flags that decide int8 speed, and what `export` concludes."""
    return {**machine.cpu_facts(), "cpu_has_vnni": quantization.cpu_has_vnni()}


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


class OpenVINOFile:
    """An ONNX file in OpenVINO's CPU plugin (`export.runtimes.OpenVINOSession`, float32
    precision hint), run by `run` as an onnxruntime session is."""

    def __init__(self, path):
        graph = onnx.load(path, load_external_data=False).graph
        self.input_name, self.output_name = graph.input[0].name, graph.output[0].name
        with open(path, "rb") as file:
            self.session = runtimes.OpenVINOSession(file.read())


def run(sess, x):
    if isinstance(sess, OpenVINOFile):
        return sess.session.run([sess.output_name], {sess.input_name: x})[0]
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def openvino_execution(path):
    """How OpenVINO's CPU plugin executes a file's compute layers, from its runtime graph:
    `{"Convolution u8": count, ...}` (layer type and the precision it runs in) and the kernels
    (primitive types) it picked, with the properties it compiled under."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    layers, kernels = collections.Counter(), collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in OPENVINO_COMPUTE_LAYERS:
            layers[f"{layer} {info['runtimePrecision'].astype(str)}"] += 1
            kernels[info["primitiveType"].astype(str)] += 1
    return {
        "compute_layers": dict(layers.most_common()),
        "kernels": dict(kernels.most_common()),
        "properties": {key: str(compiled.get_property(key)) for key in (
            "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT",
            "INFERENCE_PRECISION_HINT")},
    }


def integer_layers(execution):
    """How many of `openvino_execution`'s compute layers run in 8-bit integers, of how many."""
    layers = execution["compute_layers"]
    return (sum(n for key, n in layers.items() if key.split()[-1] in ("u8", "i8")),
            sum(layers.values()))


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


def made_or_refused(export_int8, **options):
    """`export_int8(**options)` (`export.to_onnx(..., quantize="int8")` or
    `export.quantize_int8`), and the refusals on the way. When the export refuses the file
    (`keras_bn.VerificationError`: the guard, the target's rules, a runtime that disagrees with
    the file's meaning), the message is kept and the export tried again with the refusing check
    off (OpenVINO for OpenVINO's disagreement, the guard otherwise), so that the refused file's
    figures can still be measured. Returns `(result or None, [{"options", "message"}])`."""
    refusals = []
    while True:
        try:
            return export_int8(**options), refusals
        except keras_bn.VerificationError as error:
            message = " ".join(str(error).splitlines()[0].split())[:1000]
        refusals.append({"options": dict(options), "message": message})
        print(f"int8 export refused ({options}): {message}", flush=True)
        if message.lower().startswith("openvino") and options.get("openvino") is not False:
            options = {**options, "openvino": False}
        elif options.get("min_agreement") != 0.0:
            options = {**options, "min_agreement": 0.0}
        else:
            return None, refusals


def made(result, refusals):
    """`made_or_refused`'s result, or RuntimeError with the refusals when none was made (the
    comparison with the anchor needs the file)."""
    if result is None:
        raise RuntimeError("the int8 export was refused even with its guard and OpenVINO off: "
                           + "; ".join(refusal["message"] for refusal in refusals))
    return result


def min_agreement(args):
    """The guard of the trained digits models: the default, what a user gets; off for --quick,
    whose toy model is barely trained."""
    return 0.0 if args.quick else quantization.DEFAULT_MIN_AGREEMENT


# ---------------------------------------------------------------------------------------------
# The anchor: what a user can do today


class _Reader(ort_quantization.CalibrationDataReader):
    """onnxruntime's calibration reader over the same batches our export calibrates on."""

    def __init__(self, name, x, batch_size=CALIBRATION_BATCH):
        self._feeds = iter([{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self._feeds, None)


def anchor_int8(keras_path, int8_path, calibration, target=ANCHOR_TARGET):
    """Keras's ONNX file through `quant_pre_process` and `quantize_static` with `target`'s
    settings (`export.targets.Target.quantize_static_options`: QDQ, per-channel int8 weights, its
    activation type, symmetry and weight range) and MinMax calibration: returns notes on what
    happened. Pre-processing runs with its defaults first; when that fails (its symbolic shape
    inference needs sympy, which onnxruntime does not install), it runs again as its error
    message advises, without symbolic shape inference, and the note says so."""
    notes = {"target": target}
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
        calibrate_method=ort_quantization.CalibrationMethod.MinMax,
        **deployment_targets.get(target).quantize_static_options(),
    )
    os.remove(prepared)
    notes["seconds"] = round(time.perf_counter() - start, 2)
    return notes


def keras_export(model, path):
    start = time.perf_counter()
    model.export(path, format="onnx", verbose=False)
    return round(time.perf_counter() - start, 2)


def try_anchor(keras_path, int8_path, calibration):
    """`anchor_int8`, or the error it failed with (recorded, not raised: that is a result)."""
    try:
        return anchor_int8(keras_path, int8_path, calibration), None
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

    start = time.perf_counter()
    export.to_onnx(model, paths["ours_float"], verbose=0)
    float_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # Untrained weights on random images: top-1 decisions of near-uniform scores say nothing about
    # accuracy, so the guard is off here (min_agreement=0) and the agreement only recorded.
    ours, refusals = made_or_refused(
        functools.partial(export.to_onnx, model, paths["ours_int8"], quantize="int8",
                          target=ANCHOR_TARGET, calibration_data=calibration,
                          validation_data=validation, calibration_batches=None, verbose=0),
        min_agreement=0.0)
    int8_seconds = time.perf_counter() - start
    keras_seconds = keras_export(model, paths["keras_float"])
    notes, failure = try_anchor(paths["keras_float"], paths["anchor_int8"], calibration)

    sessions = {key: session(path) for key, path in paths.items()
                if key != "anchor_int8" or failure is None}
    graphs = {key: graph_facts(path) for key, path in paths.items()
              if key != "anchor_int8" or failure is None}
    graphs["ours_float"]["export_seconds"] = round(float_seconds, 2)
    graphs["ours_int8"]["export_seconds"] = round(int8_seconds, 2)
    graphs["ours_int8"]["quantization"] = report_facts(made(ours, refusals).quantization)
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
        "ours_int8_refusals": refusals,
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

    export.to_onnx(model, paths["ours_float"], verbose=0)
    # The guard at its default (99% top-1 agreement), what a user gets; off for --quick. A
    # refusal is a finding, recorded; the figures below are then those of the refused graph.
    ours, refusals = made_or_refused(
        functools.partial(export.to_onnx, model, paths["ours_int8"], quantize="int8",
                          target=ANCHOR_TARGET, calibration_data=calibration,
                          validation_data=(x_test, y_test), calibration_batches=None, verbose=0),
        min_agreement=min_agreement(args))
    keras_seconds = keras_export(model, paths["keras_float"])
    notes, failure = try_anchor(paths["keras_float"], paths["anchor_int8"], calibration)
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
    graphs["ours_int8"]["quantization"] = report_facts(made(ours, refusals).quantization)
    latency = latency_figures(
        sessions, lambda b: np.ascontiguousarray(x_test[:b]), args.repeats * 5, label)
    return {
        "label": label,
        "calibration": {"data": f"the first {len(calibration)} training digits",
                        "examples": len(calibration), "batch_size": CALIBRATION_BATCH},
        "validation": {"data": "the test digits, with labels", "examples": len(x_test)},
        "min_agreement": min_agreement(args),
        "ours_int8_refusals": refusals,
        "anchor": {"error": failure, **notes},
        "accuracy": accuracy,
        "top1_agreement_with_keras": agreement_with_keras,
        "int8_vs_float": int8_vs_float,
        "graphs": graphs,
        "latency": latency,
        "paths": paths,
        "calibration_data": calibration,
    }


# ---------------------------------------------------------------------------------------------
# 3. Per deployment target


def bench_targets(name, float_path, calibration, validation, x_for_batch, repeats, folder, cpu,
                  *, guard=0.0):
    """Every target's int8 file of our float graph `float_path` (`export.quantize_int8` on
    `calibration`, compared on `validation`, an array or `(x, labels)`), each run in onnxruntime
    and OpenVINO beside the float graph in the same runtime; see the module's docstring."""
    print(f"== {name}: per target ({', '.join(deployment_targets.TARGETS)})", flush=True)
    labels = validation[1] if isinstance(validation, tuple) else None
    x_validation = validation[0] if isinstance(validation, tuple) else validation
    openvino = runtimes.openvino_installed()
    files, entries = {"float": float_path}, {}
    for target in deployment_targets.TARGETS:
        start = time.perf_counter()
        result, refusals = made_or_refused(functools.partial(
            export.quantize_int8, float_path, calibration, target=target, max_batches=None,
            validation_data=validation, verbose=0), min_agreement=guard)
        entry = {"target": target, "cpu": cpu, "refusals": refusals, "made": result is not None}
        if result is not None:
            int8, report = result
            files[target] = os.path.join(folder, f"{name}_{target}.onnx")
            onnx.save(int8, files[target])
            output = report.outputs[0]
            entry.update({
                "seconds": round(time.perf_counter() - start, 1),
                "weight_bound": report.weight_bound,
                "activation_type": report.activation_type,
                "symmetric_activations": report.symmetric_activations,
                "meaning_vs_float": {"max_error": output.max_error,
                                     "mean_error": output.mean_error,
                                     "top1_agreement": output.agreement,
                                     "float_accuracy": output.float_accuracy,
                                     "int8_accuracy": output.int8_accuracy},
                "runtimes": [dataclasses.asdict(check) for check in report.runtimes],
                "report": report.summary(),
                "file_bytes": os.path.getsize(files[target]),
            })
            print(f"{name} '{target}': " + report.summary().splitlines()[-1]
                  + (" [made after a refusal]" if refusals else ""), flush=True)
        entries[target] = entry
    sessions = {f"onnxruntime {key}": session(path) for key, path in files.items()}
    if openvino:
        sessions.update({f"openvino {key}": OpenVINOFile(path) for key, path in files.items()})
        for key, path in files.items():
            execution = openvino_execution(path)
            if key == "float":
                float_execution = execution
            else:
                entries[key]["openvino_execution"] = execution
    if labels is not None:  # each runtime's accuracy on the test digits
        for key in files:
            if key == "float":
                continue
            entries[key]["accuracy"] = {}
            for runtime in ("onnxruntime", "openvino"):
                if f"{runtime} {key}" in sessions:
                    scores = predict(sessions[f"{runtime} {key}"], x_validation)
                    entries[key]["accuracy"][runtime] = float(np.mean(scores.argmax(1) == labels))
            entries[key]["accuracy"]["float"] = float(np.mean(
                predict(sessions["onnxruntime float"], x_validation).argmax(1) == labels))
    timing = {}
    for batch_size in BATCH_SIZES:
        n = repeats if batch_size == 1 else max(5, repeats // 2)
        figures = alternate_latency(sessions, x_for_batch(batch_size), n)
        timing[f"batch_{batch_size}"] = figures
        ms = figures["median_ms"]
        for key, entry in entries.items():
            if key not in files:
                continue
            row = {"median_ms": {runtime: {"float": ms.get(f"{runtime} float"),
                                           "int8": ms.get(f"{runtime} {key}")}
                                 for runtime in runtimes.RUNTIMES},
                   "repeats": n, "load_average_before_after": figures[
                       "load_average_before_after"], "cpu_has_vnni": cpu["cpu_has_vnni"]}
            for runtime in runtimes.RUNTIMES:
                pair = row["median_ms"][runtime]
                row[f"{runtime}_int8_over_float"] = (
                    None if pair["int8"] is None else round(pair["int8"] / pair["float"], 3))
            row["openvino_int8_over_onnxruntime_int8"] = (
                None if row["median_ms"]["openvino"]["int8"] is None else round(
                    row["median_ms"]["openvino"]["int8"] / row["median_ms"]["onnxruntime"]["int8"],
                    3))
            entry.setdefault("latency", {})[f"batch_{batch_size}"] = row
            print(f"{name} '{key}' batch {batch_size}: int8/float onnxruntime "
                  f"{row['onnxruntime_int8_over_float']}, openvino "
                  f"{row['openvino_int8_over_float']}; openvino/onnxruntime int8 "
                  f"{row['openvino_int8_over_onnxruntime_int8']} "
                  f"(median of {n}; load {figures['load_average_before_after'][1][0]})",
                  flush=True)
    return {
        "cpu": cpu,
        "openvino": {"installed": openvino,
                     "version": _openvino_version() if openvino else None,
                     "float_execution": float_execution if openvino else None},
        "targets": entries,
        "timing": timing,
    }


def _openvino_version():
    import openvino

    return openvino.__version__


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
    refused = "; ".join(refusal["message"] for refusal in digits["ours_int8_refusals"])
    drop = round(100 * (accuracy["ours_float"] - accuracy["ours_int8"]), 3)
    target(f"{label} int8 accuracy drop vs our ONNX float (points)", drop,
           f"<= {MAX_ACCURACY_DROP_POINTS}", drop <= MAX_ACCURACY_DROP_POINTS,
           f"the export refused the graph: {refused}" if refused else "")
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
    per_target = results["per_target"]
    first = "ResNet50" if "ResNet50" in per_target else models_run[0]
    files = per_target[first]["targets"]
    for batch_size in BATCH_SIZES:
        what = (f"{first} 'cpu' / 'cpu-vnni' int8 latency in onnxruntime, batch {batch_size} "
                "(on a VNNI CPU)")
        if not all(files[key]["made"] for key in ("cpu", "cpu-vnni")):
            target(what, None, f"<= {MAX_CPU_OVER_CPU_VNNI}", None, "a file was refused")
            continue
        ms = [files[key]["latency"][f"batch_{batch_size}"]["median_ms"]["onnxruntime"]["int8"]
              for key in ("cpu", "cpu-vnni")]
        ratio = round(ms[0] / ms[1], 3)
        if results["machine"]["cpu"]["cpu_has_vnni"]:
            target(what, ratio, f"<= {MAX_CPU_OVER_CPU_VNNI}", ratio <= MAX_CPU_OVER_CPU_VNNI)
        else:
            target(what, None, f"<= {MAX_CPU_OVER_CPU_VNNI}", None,
                   f"this CPU has no VNNI, where 'cpu-vnni' files are wrong in onnxruntime "
                   f"(measured {ratio} all the same)")
    for name, entry in per_target.items():
        for key, file in entry["targets"].items():
            for batch_size in BATCH_SIZES:
                what = (f"{name} '{key}' OpenVINO int8 / onnxruntime int8 latency, batch "
                        f"{batch_size}")
                if not file["made"]:
                    target(what, None, "<= 1.0", None, "the export refused every file: "
                           + file["refusals"][-1]["message"])
                    continue
                row = file["latency"][f"batch_{batch_size}"]
                ratio = row["openvino_int8_over_onnxruntime_int8"]
                if ratio is None:
                    target(what, None, "<= 1.0", None, "OpenVINO is not installed")
                else:
                    target(what, ratio, "<= 1.0", ratio <= 1.0,
                           "" if ratio <= 1.0 else why_openvino_slower(entry, file, row))
    return found


def why_openvino_slower(entry, file, row):
    """What was measured beside an OpenVINO int8 file slower than onnxruntime's: whether OpenVINO
    is slower on the float graph too, and how many compute layers it ran in integers."""
    ms = row["median_ms"]
    integer, total = integer_layers(file["openvino_execution"])
    float_ratio = ms["openvino"]["float"] / ms["onnxruntime"]["float"]
    kernels = ", ".join(file["openvino_execution"]["kernels"])
    return (f"float: OpenVINO {ms['openvino']['float']:.2f} ms, onnxruntime "
            f"{ms['onnxruntime']['float']:.2f} ms ({float_ratio:.2f}x); int8/float: OpenVINO "
            f"{row['openvino_int8_over_float']}, onnxruntime {row['onnxruntime_int8_over_float']}"
            f"; OpenVINO runs {integer} of {total} conv/matmul layers in 8-bit integers "
            f"({kernels})")


def _ms(entry, key):
    value = entry["median_ms"].get(key)
    return "failed" if value is None else f"{value:.2f}"


def cpu_line(cpu):
    """The CPU in a few words: its name and the flags that decide int8 speed."""
    flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                               "amx_int8") if cpu.get(flag)]
    vnni = "with VNNI" if cpu["cpu_has_vnni"] else "no VNNI"
    return f"{cpu['model_name']} ({vnni}: {' '.join(flags)}; {cpu['logical_cpus']} logical CPUs)"


def _ratio(value):
    return "-" if value is None else f"{value:.3f}"


def per_target_table(results):
    """The per-target figures: latency ratios in both runtimes, agreement with the file's
    meaning, accuracy on the test digits."""
    lines = [
        "", f"Per target, CPU {cpu_line(results['machine']['cpu'])}; onnxruntime "
        f"{results['versions']['onnxruntime']} ({THREADS} threads), OpenVINO "
        f"{results['versions'].get('openvino')}; int8/float in each runtime, median ms in brackets",
        "",
        "| model | target | batch | onnxruntime int8/float | OpenVINO int8/float "
        "| OpenVINO int8 / onnxruntime int8 |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["per_target"].items():
        for key, file in entry["targets"].items():
            if not file["made"]:
                lines.append(f"| {name} | {key} | - | refused | refused | - |")
                continue
            for batch_size in BATCH_SIZES:
                row = file["latency"][f"batch_{batch_size}"]
                ms = row["median_ms"]
                cells = []
                for runtime in runtimes.RUNTIMES:
                    pair = ms[runtime]
                    cells.append("-" if pair["int8"] is None else
                                 f"{row[f'{runtime}_int8_over_float']:.3f} "
                                 f"({pair['int8']:.2f} / {pair['float']:.2f})")
                lines.append(f"| {name} | {key} | {batch_size} | {cells[0]} | {cells[1]} | "
                             f"{_ratio(row['openvino_int8_over_onnxruntime_int8'])} |")
    lines += ["", "| model | target | weights | refused | runtimes vs the file's meaning "
              "| OpenVINO conv/matmul in int8 | accuracy: meaning, onnxruntime, OpenVINO |",
              "|---|---|---|---|---|---|---|"]
    for name, entry in results["per_target"].items():
        for key, file in entry["targets"].items():
            refused = "; ".join(refusal["message"] for refusal in file["refusals"]) or "no"
            if not file["made"]:
                lines.append(f"| {name} | {key} | - | {refused} | - | - | - |")
                continue
            checks = "; ".join(
                f"{check['runtime']} {check['max_steps']:.2f} steps, "
                f"{check['beyond_one_step']:.2%} beyond one" if check["max_steps"] is not None
                else f"{check['runtime']} not checked" for check in file["runtimes"])
            integer = ("-" if "openvino_execution" not in file
                       else "{} of {}".format(*integer_layers(file["openvino_execution"])))
            accuracy = "-"
            if "accuracy" in file:
                values = [file["meaning_vs_float"]["int8_accuracy"]] + [
                    file["accuracy"].get(runtime) for runtime in runtimes.RUNTIMES]
                accuracy = ", ".join("-" if v is None else f"{v:.2%}" for v in values)
            lines.append(f"| {name} | {key} | +-{file['weight_bound']} | {refused} | {checks} | "
                         f"{integer} | {accuracy} |")
    return lines


def table(results, models_run):
    cpu = results["machine"]["cpu"]
    lines = [
        f"onnxruntime {results['versions']['onnxruntime']}, {THREADS} intra-op threads, "
        f"{cpu_line(cpu)}; median ms; load average {results['machine']['load_average_start']} "
        f"at start, {results['machine']['load_average_end']} at end",
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
        f"{key} {value:.2%}" for key, value in accuracy.items())]
    lines += per_target_table(results)
    lines += ["", "| target | measured | threshold | holds |", "|---|---|---|---|"]
    for entry in results["targets"]:
        holds = {True: "yes", False: "**no**", None: "not measured"}[entry["holds"]]
        lines.append(f"| {entry['target']} | {entry['measured']} | {entry['threshold']} | "
                     f"{holds} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=21,
                        help="timed runs at batch 1 (half as "
                        "many, at least 5, at batch 32; five times as many on the BN-Inception)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="where quantize.json and quantize.md go")
    parser.add_argument("--models", default=None, help="keras.applications models, comma "
                        f"separated (default {','.join(MODELS)}; 'toy' with --quick)")
    parser.add_argument("--calibration-batches", type=positive_int, default=4,
                        help="batches of 32 random images the applications calibrate on")
    parser.add_argument("--validation-examples", type=positive_int, default=64,
                        help="random images the applications' int8 graphs are compared on")
    parser.add_argument("--digits-calibration-batches", type=positive_int, default=16,
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
                    "note": f"{os.cpu_count()} logical CPUs, shared with other processes "
                            "while measured (see the load averages); medians"},
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__,
                     "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__,
                     "openvino": _openvino_version() if runtimes.openvino_installed() else None},
        "onnxruntime_session": {"intra_op_num_threads": THREADS,
                                "session.intra_op.allow_spinning": "0",
                                "providers": ["CPUExecutionProvider"]},
        "method": "every graph of a figure timed in turn (forward, then backward), one warm-up "
                  "run each, medians of repeats; int8 is QDQ, MinMax calibration; ours and the "
                  f"anchor use target '{ANCHOR_TARGET}' (uint8 asymmetric activations, int8 "
                  "symmetric per-channel weights within +-64); the per-target section uses "
                  "each target's scheme",
        "anchor_target": ANCHOR_TARGET,
        "anchor_quantize_static_options": {
            key: str(value) for key, value in
            deployment_targets.get(ANCHOR_TARGET).quantize_static_options().items()},
        "openvino_session": "export.runtimes.OpenVINOSession: CPU plugin, "
                            "INFERENCE_PRECISION_HINT f32, other properties at their defaults",
        "models": {},
    }
    cpu = results["machine"]["cpu"]
    print(f"CPU {cpu['model_name']}: avx2 {cpu['avx2']}, avx512_vnni {cpu['avx512_vnni']}, "
          f"avx_vnni {cpu['avx_vnni']}, amx_int8 {cpu['amx_int8']}, cpu_has_vnni "
          f"{cpu['cpu_has_vnni']}; load {results['machine']['load_average_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="keras-bn-quantize-") as folder:
        for name in models_run:
            results["models"][name] = {"cpu": cpu, **bench_application(name, size, args, folder)}
        model, data, recipe = train_toy_digits() if args.quick else train_bn_inception()
        digits = bench_bn_inception(model, data, args, folder,
                                    "toy digits" if args.quick else "BN-Inception")
        paths, digits_calibration = digits.pop("paths"), digits.pop("calibration_data")
        results["bn_inception_digits"] = {"cpu": cpu, "training": recipe, **digits}
        results["per_target"] = {}
        for name in models_run:
            results["per_target"][name] = bench_targets(
                name, os.path.join(folder, f"{name}_ours_float.onnx"),
                random_images(args.calibration_batches * CALIBRATION_BATCH, size, seed=1),
                random_images(args.validation_examples, size, seed=2),
                lambda b: random_images(b, size, seed=3), args.repeats, folder, cpu)
        results["per_target"][digits["label"]] = bench_targets(
            "bn_inception", paths["ours_float"], digits_calibration, (data.x_test, data.y_test),
            lambda b: np.ascontiguousarray(data.x_test[:b]), args.repeats * 5, folder, cpu,
            guard=min_agreement(args))
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
