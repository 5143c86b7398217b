"""Breadth benchmark: every `keras.applications` architecture of the installed Keras through
folding, float export, int8 export and QAT preparation, beside Keras's own ONNX export.

Each architecture is built with `weights=None`, `classes=10` and no classifier activation (logits,
which vary from input to input where softmax over an untrained head is nearly uniform) at the
smallest input it accepts rounded up to a common size (32x32; 71 for Xception, 75 for the
Inception networks). Its BN population statistics are estimated on real images,
scikit-learn's digits enlarged to the input size
(`keras_bn.estimate_population_statistics`, Algorithm 2) so that every BN normalizes what it sees
and activations neither vanish nor explode. Then, each step timed and its error recorded:

1. `keras_bn.fold_batchnorm`: BN folded and left, and the verified error;
2. `export.to_onnx(model, path)`: the float graph, its node counts, the normalization arithmetic
   left in it, its size and error against Keras;
3. `export.to_onnx(model, path, quantize="int8", calibration_data=...)` for the default target:
   node counts, size, top-1 agreement with the float graph on other digit images;
4. float and int8 latency in onnxruntime (batch 1, 1 intra-op thread,
   `session.intra_op.allow_spinning` = "0", median of --repeats runs after a warm-up);
5. `keras_bn.prepare_qat`, one training-mode batch to set the learned ranges, and `to_onnx` of
   the QAT model;
6. Keras's own `model.export(path, format="onnx")`: whether it writes a file, whether onnxruntime
   loads it, its error against Keras, its node counts and the BN arithmetic left in it.

Each architecture runs in its own process with a time limit, smallest first; the results file is
rewritten after each one. OpenVINO is not run (`openvino=False`): this benchmark is about which
graphs convert. Untrained networks on digit images: the int8 figures say how a graph quantizes,
not what accuracy a trained model keeps. Writes benchmarks/results/architectures.{json,md}.

    python -m benchmarks.architectures [--models MobileNetV3Small ConvNeXtTiny] [--time-limit 600]
    python -m benchmarks.architectures --models NASNetMobile --update   # rerun one, keep the rest

Run from the repository root (TensorFlow backend: tf2onnx needs it).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import machine
from examples.cli import positive_int

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT_DIR = os.path.join(_HERE, "results")
# The smallest input each family takes, where it is above the common 32x32.
INPUT_SIZES = {"Xception": 71, "InceptionV3": 75, "InceptionResNetV2": 75}
DEFAULT_SIZE = 32
CLASSES = 10
STATISTICS_IMAGES = 64
CALIBRATION_IMAGES = 64
VALIDATION_IMAGES = 64
# Normalization arithmetic a graph with every BN folded or frozen holds none of (LayerNorm's own
# arithmetic aside: ConvNeXt's rows name it).
NORMALIZATION_OPS = ("BatchNormalization", "Sub", "Div", "Sqrt", "Rsqrt", "Reciprocal")


def architectures():
    """The names of the architectures of the installed Keras (`keras.applications.<Name>`)."""
    import keras

    return sorted(name for name in dir(keras.applications)
                  if name[:1].isupper() and callable(getattr(keras.applications, name)))


# ---------------------------------------------------------------------------------------------
# One architecture, in its own process


def _images(count, size, block):
    """`count` (at most 100) of scikit-learn's 8x8 digit images, from the `block`-th hundred of
    one fixed shuffle (so blocks share no image), enlarged to `size` x
    `size` by nearest neighbours, grey in all three channels, 0-255: real images, whose
    examples differ as a data set's do. Uniform noise images do not: deep features of one noise
    image are nearly those of another, every BN then divides by a tiny between-example variance,
    and deep untrained networks (EfficientNet) amplify rounding into outputs 10^5 apart."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits().images * (255.0 / 16.0)
    order = np.random.default_rng(0).permutation(len(digits))
    chosen = digits[order[100 * block:100 * block + min(count, 100)]]
    rows = np.arange(size) * 8 // size
    return np.repeat(chosen[:, rows][:, :, rows][..., None], 3, axis=-1).astype("float32")


def _error(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}"


STEPS = ("fold", "float", "int8", "latency", "qat", "keras_export")


def _step(record, key, function, checkpoint):
    """Run `function`, record its dict (or its error), seconds and the process's peak memory so
    far under `key`. `record` is written to `checkpoint` before the step, naming it as running:
    a process the system kills (out of memory) still reports the steps it finished."""
    import resource

    record["running"] = key
    with open(checkpoint, "w") as file:
        json.dump(record, file, indent=1, default=float)
    start = time.perf_counter()
    try:
        record[key] = {"ok": True, **function()}
    except Exception as error:  # the benchmark records every failure and goes on
        record[key] = {"ok": False, "error": _error(error)}
    record[key]["seconds"] = round(time.perf_counter() - start, 2)
    record[key]["peak_rss_gib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    del record["running"]
    return record[key]


def _graph_facts(path):
    import onnx

    nodes = onnx.load(path).graph.node
    counts = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"nodes": len(nodes), "node_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "normalization_ops": {op: counts[op] for op in NORMALIZATION_OPS if op in counts},
            "file_size": os.path.getsize(path)}


def _session(path, threads=1):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _latency_ms(path, x, repeats):
    session = _session(path)
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def run_one(name, work_dir, repeats, only=()):
    """Every step on one architecture; returns its record (a dict)."""
    import keras
    import numpy as np

    import export
    import keras_bn

    size = INPUT_SIZES.get(name, DEFAULT_SIZE)
    record = {"model": name, "input_size": size}
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                              classes=CLASSES, classifier_activation=None)
    batchnorms = [layer for layer in model._flatten_layers()
                  if isinstance(layer, keras.layers.BatchNormalization)]
    record.update(parameters=int(model.count_params()), batchnorms=len(batchnorms))
    if batchnorms:
        keras_bn.estimate_population_statistics(model, _images(STATISTICS_IMAGES, size, 1),
                                                verbose=0)
    x = _images(3, size, 2)
    outputs = keras.ops.convert_to_numpy(model(x, training=False))
    record["output_std_across_inputs"] = float(np.std(outputs, axis=0).mean())
    calibration = _images(CALIBRATION_IMAGES, size, 3)
    validation = _images(VALIDATION_IMAGES, size, 4)
    float_path = os.path.join(work_dir, f"{name}.onnx")
    int8_path = os.path.join(work_dir, f"{name}.int8.onnx")

    def fold():
        folded = keras_bn.fold_batchnorm(model)
        report = folded.fold_report
        return {"folded": len(report.folded) + len(report.folded_before),
                "left": len(report.left), "max_error": report.max_error}

    def float_export():
        result = export.to_onnx(model, float_path, openvino=False)
        return {"max_error": result.max_error, "bn_folded": len(result.folded),
                "bn_frozen": len(result.frozen), **_graph_facts(float_path)}

    def int8_export():
        facts = {}
        options = dict(quantize="int8", calibration_data=calibration, validation_data=validation,
                       openvino=False, verbose=0)
        try:
            result = export.to_onnx(model, int8_path, **options)
        except export.VerificationError as error:
            if "min_agreement" not in str(error):
                raise
            # The top-1 guard, on an untrained network's close logits: recorded, then the file
            # is made with the guard off so that its graph is measured.
            facts["guard"] = _error(error)
            result = export.to_onnx(model, int8_path, min_agreement=0, **options)
        facts.update(target=result.target, **_graph_facts(int8_path))
        for output in getattr(result.quantization, "outputs", None) or []:
            agreement = getattr(output, "agreement", None)
            if agreement is not None:
                facts["top1_agreement"] = agreement
        return facts

    def latency():
        one = _images(1, size, 5)
        float_ms = _latency_ms(float_path, one, repeats)
        int8_ms = _latency_ms(int8_path, one, repeats)
        return {"float_ms": float_ms, "int8_ms": int8_ms, "int8_over_float": round(
            int8_ms / float_ms, 3)}

    def qat_export():
        qat = keras_bn.prepare_qat(model)
        qat(calibration[:32], training=True)  # sets the learned input ranges
        path = os.path.join(work_dir, f"{name}.qat.onnx")
        from export import arguments

        # validation_data verifies a QAT export; a model with no BN has no QAT layer to verify
        quantizes = bool(arguments.qat_layers(qat))
        result = export.to_onnx(qat, path, validation_data=validation if quantizes else None,
                                openvino=False)
        return {"qat_layers": len(result.qat_layers), "max_error_steps": result.max_error_steps,
                "beyond_one_step": result.beyond_one_step, "layer_check": result.layer_check,
                **_graph_facts(path)}

    def keras_export():
        path = os.path.join(work_dir, f"{name}.keras_export.onnx")
        try:
            model.export(path, format="onnx", verbose=False)
        except TypeError:  # a Keras without the verbose argument
            model.export(path, format="onnx")
        facts = _graph_facts(path)
        try:
            session = _session(path)
        except Exception as error:
            return {"loads": False, "load_error": _error(error), **facts}
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        error = float(np.max(np.abs(got - outputs)) / max(1.0, np.max(np.abs(outputs))))
        return {"loads": True, "max_error": error, **facts}

    checkpoint = os.path.join(work_dir, f"{name}.json")
    if only == ("keras_export",):  # Keras's export alone, where ours ran out of memory
        _step(record, "keras_export", keras_export, checkpoint)
        return record
    if batchnorms:
        _step(record, "fold", fold, checkpoint)
    else:
        record.update(fold={"ok": True, "folded": 0, "left": 0})
    _step(record, "float", float_export, checkpoint)
    _step(record, "int8", int8_export, checkpoint)
    if record["float"]["ok"] and record["int8"]["ok"]:
        _step(record, "latency", latency, checkpoint)
    _step(record, "qat", qat_export, checkpoint)
    _step(record, "keras_export", keras_export, checkpoint)
    return record


# ---------------------------------------------------------------------------------------------
# The driver


def _run_in_process(name, work_dir, repeats, time_limit, only=()):
    out = os.path.join(work_dir, f"{name}.json")
    command = [sys.executable, "-m", "benchmarks.architectures", "--one", name,
               "--work-dir", work_dir, "--repeats", str(repeats)] + (
                   ["--keras-export-only"] if only else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, text=True)
    try:
        _, stderr = process.communicate(timeout=time_limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"model": name, "process": f"killed at the time limit of {time_limit} s"}
    seconds = round(time.perf_counter() - start, 1)
    record = {}
    if os.path.exists(out):
        with open(out) as file:
            record = json.load(file)
    if process.returncode == 0 and "running" not in record:
        record["seconds"] = seconds
        return record
    if process.returncode == -signal.SIGKILL:
        why = "killed by the system (SIGKILL: out of memory"
        steps = [record[key]["peak_rss_gib"] for key in STEPS
                 if "peak_rss_gib" in record.get(key, {})]
        why += f"; {steps[-1]} GiB at the last step finished)" if steps else ")"
    else:
        tail = " ".join(line for line in stderr.strip().splitlines()[-3:]
                        if "oneDNN" not in line and "cuda" not in line)[-300:]
        why = f"exit status {process.returncode}: {tail}"
    running = record.pop("running", None)
    if not record or running is None:
        return {"model": name, "process": why, "seconds": seconds}
    # the steps it finished stand; the one it died in and those after it are failures
    for key in STEPS[STEPS.index(running):]:
        if key != "latency":
            record[key] = {"ok": False, "error": why if key == running else "not reached"}
    record["seconds"] = seconds
    return record


def _ok(record, key):
    return bool(record.get(key, {}).get("ok"))


def _failure(step, length):
    """A failed step's cell: what our export refused, or what stopped the process."""
    error = step["error"]
    if error == "not reached" or error.startswith("killed by the system"):
        return error[:length]
    return f"refused: {error[:length]}"


def markdown(results):
    cpu = results["cpu"]
    lines = [
        "# Breadth benchmark: keras.applications through keras-bn's export",
        "",
        f"`python -m benchmarks.architectures` on {cpu['model_name']} "
        f"(avx512_vnni: {cpu['avx512_vnni']}, avx_vnni: {cpu['avx_vnni']}), Keras "
        f"{results['versions']['keras']}, TensorFlow {results['versions']['tensorflow']}, "
        f"tf2onnx {results['versions']['tf2onnx']}, onnxruntime "
        f"{results['versions']['onnxruntime']}, {results.get('memory_gib', '?')} GiB of memory. "
        f"weights=None, {CLASSES} classes, logits; BN "
        "statistics estimated on scikit-learn's digits enlarged to the input size; each model in "
        "its own process "
        f"(time limit {results['time_limit_s']} s). Latency: onnxruntime, batch 1, 1 thread.",
        "",
        "| model | input | BN | folded | float: nodes, MiB, error | BN ops left | int8: nodes, "
        "MiB | int8/float latency | QAT export (vs Keras, in steps) | Keras's export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in results["models"]:
        name = record["model"]
        if "process" in record:
            lines.append(f"| {name} | | | | {record['process']} | | | | | |")
            continue
        fold, flt, int8 = record["fold"], record["float"], record["int8"]
        folded = (f"{fold.get('folded', 0)}/{record['batchnorms']}" if fold["ok"]
                  else f"error: {fold['error'][:80]}")
        if flt["ok"]:
            float_cell = (f"{flt['nodes']}, {flt['file_size'] / 2**20:.1f}, "
                          f"{flt['max_error']:.1e}")
            left = ", ".join(f"{op} {n}" for op, n in flt["normalization_ops"].items()) or "none"
        else:
            float_cell, left = _failure(flt, 160), ""
        int8_cell = (f"{int8['nodes']}, {int8['file_size'] / 2**20:.1f}" if int8["ok"]
                     else _failure(int8, 160))
        if int8.get("guard"):
            int8_cell += f" (guard off: top-1 agreement {int8.get('top1_agreement', 0):.0%})"
        speed = record.get("latency", {})
        speed_cell = (f"{speed['int8_over_float']:.2f} ({speed['int8_ms']:.1f} / "
                      f"{speed['float_ms']:.1f} ms)" if speed.get("ok") else "")
        qat = record["qat"]
        qat_cell = (f"{qat['qat_layers']} layers; outputs {qat['max_error_steps']:.2f} steps max, "
                    f"{qat['beyond_one_step']:.1%} beyond one"
                    if qat["ok"] and qat.get("max_error_steps") is not None
                    else "ok" if qat["ok"] else _failure(qat, 120))
        if qat["ok"] and qat.get("layer_check"):
            qat_cell += f"; worst layer {qat['layer_check'][2]:.1%} beyond one"
        keras_export = record["keras_export"]
        if keras_export.get("error") == "not reached":
            keras_cell = "not reached"
        elif not keras_export["ok"]:
            keras_cell = f"fails: {keras_export['error'][:120]}"
        elif not keras_export["loads"]:
            keras_cell = f"writes a file onnxruntime refuses: {keras_export['load_error'][:120]}"
        else:
            bn = ", ".join(f"{op} {n}" for op, n in keras_export["normalization_ops"].items())
            keras_cell = (f"ok, {keras_export['nodes']} nodes, error "
                          f"{keras_export['max_error']:.1e}" + (f", {bn}" if bn else ""))
        lines.append(f"| {name} | {record['input_size']} | {record['batchnorms']} | {folded} | "
                     f"{float_cell} | {left} | {int8_cell} | {speed_cell} | {qat_cell} | "
                     f"{keras_cell} |")
    lines += ["", "## Exceptions", ""]
    exceptions = []
    for record in results["models"]:
        name = record["model"]
        if "process" in record:
            exceptions.append(f"- {name}: not measured ({record['process']}).")
            continue
        keras_export = record.get("keras_export", {})
        if keras_export.get("ok"):
            keras = ("Keras's export loads" if keras_export.get("loads")
                     else "Keras's export writes a file that does not load")
        elif keras_export.get("error", "not reached") == "not reached":
            keras = "Keras's export not measured"
        else:
            keras = f"Keras's export fails: {keras_export['error'][:100]}"
        for key, what in (("float", "float export"), ("int8", "int8 export"),
                          ("qat", "QAT export")):
            if not _ok(record, key):
                exceptions.append(f"- {name}, {what} ({keras}): {record[key]['error']}")
    lines += exceptions or ["None: every architecture exported float, int8 and QAT."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="architecture names (default: every one)")
    parser.add_argument("--time-limit", type=positive_int, default=600,
                        help="seconds per architecture")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--keras-export-only", action="store_true",
                        help="with --update: run only Keras's own export for --models and keep "
                        "their other results (for models ours could not measure)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--update", action="store_true",
                        help="keep the other architectures' records of the results file and "
                             "replace those of --models")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.sizes:
        import keras

        sizes = {}
        for name in args.sizes:
            sizes[name] = getattr(keras.applications, name)(
                weights=None, input_shape=(INPUT_SIZES.get(name, DEFAULT_SIZE),) * 2 + (3,),
                classes=CLASSES).count_params()
            keras.backend.clear_session()
        print(json.dumps(sizes))
        return 0
    if args.one:
        record = run_one(args.one, args.work_dir, args.repeats,
                         ("keras_export",) if args.keras_export_only else ())
        with open(os.path.join(args.work_dir, f"{args.one}.json"), "w") as file:
            json.dump(record, file, indent=1, default=float)
        return 0

    import keras
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    names = args.models or architectures()
    # Smallest first: a run cut short still covers the most architectures. Counted in a process
    # of its own, whose memory (GiBs for the largest) is then given back to the runs.
    sizes = json.loads(subprocess.run(
        [sys.executable, "-m", "benchmarks.architectures", "--sizes", *names], check=True,
        capture_output=True, text=True).stdout)
    names = sorted(names, key=sizes.get)
    results = {
        "cpu": machine.cpu_facts(),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__,
                     "tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "time_limit_s": args.time_limit, "models": [],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }
    kept, before = [], {}
    if args.update and os.path.exists(os.path.join(args.output_dir, "architectures.json")):
        with open(os.path.join(args.output_dir, "architectures.json")) as file:
            previous = json.load(file)["models"]
        kept = [record for record in previous if record["model"] not in names]
        before = {record["model"]: record for record in previous}
    order = {name: index for index, name in enumerate(architectures())}
    fresh = []
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="architectures.") as work_dir:
        for name in names:
            record = _run_in_process(name, work_dir, args.repeats, args.time_limit,
                                     args.keras_export_only)
            if args.keras_export_only and name in before:  # the other steps as they were
                keras_export = record.get("keras_export") or {"ok": False,
                                                              "error": record.get("process")}
                record = {**before[name], "keras_export": keras_export}
            fresh.append(record)
            results["models"] = sorted(kept + fresh, key=lambda r: (
                sizes.get(r["model"]) or r.get("parameters") or float("inf"),
                order.get(r["model"], 0)))
            with open(os.path.join(args.output_dir, "architectures.json"), "w") as file:
                json.dump(results, file, indent=1, default=float)
            with open(os.path.join(args.output_dir, "architectures.md"), "w") as file:
                file.write(markdown(results))
            print(f"{name}: {record.get('process') or 'done'} "
                  f"({record.get('seconds', '?')} s)", flush=True)
            for path in os.listdir(work_dir):  # the next model needs the disk, not these files
                os.unlink(os.path.join(work_dir, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
