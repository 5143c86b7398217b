"""Quantization-aware training against post-training int8: what each int8 file keeps.

On digits (default) or Fashion-MNIST (`--data fashion-mnist`, 10,000 test images), for each
network and seed:

1. the float network is trained (BN-Inception BN-x5 with the recipe of `benchmarks.quantize`, or a
   small MobileNetV2-like network of depthwise separable inverted residual blocks), population
   statistics estimated (Algorithm 2): its test accuracy is the float figure;
2. post-training int8 (PTQ): `export.to_onnx(model, quantize="int8", target=t)` for each
   deployment target t of `--ptq-targets` (cpu, cpu-vnni, tensorrt), calibrated on 512 training
   images; its accuracy in onnxruntime;
3. QAT int8: `keras_bn.prepare_qat(model, target=t)` for each t of `--qat-targets`, fine-tuned
   for `--qat-steps` momentum-SGD steps at `--qat-learning-rate` (the first two thirds on batch
   statistics; then the population statistics estimated and `keras_bn.freeze_bn_statistics` for
   the rest), then
   `export.to_onnx(qat_model)`, no calibration; its accuracy in onnxruntime;
4. the same at 4-bit weights (`weight_bits=4`, 8-bit activations): PTQ-4 is
   `prepare_qat(model, weight_bits=4)` with its statistics frozen and its input ranges set on
   the same 512 training images by steps at learning rate 0 (post-training: nothing learns but
   the ranges); QAT-4 fine-tunes as in 3;
5. the control: a copy of the float network fine-tuned as QAT is (same steps, rate and batches;
   batch statistics throughout, population statistics at the end) without quantization, so that
   what QAT gains over post-training is told apart from what the extra training gains
   (`float_ft`);
6. the cost of a QAT training step relative to a float one (median step time, same batches).

Every accuracy comes with its 95% Wilson interval on the test set, and every comparison (PTQ vs
float, QAT vs PTQ, ...) with McNemar's exact test on the same test images (`examples.statistics`);
over several seeds, each comparison's mean difference with Student's t interval over the seeds
(`examples.statistics.across_seeds`: the training's variation, not only the test set's).
Population statistics (Algorithm 2) average 128 training batches of 32.

Writes `--output-dir`/qat.json and qat.md (qat_<data>.json and .md for another data set than
digits), and merges the digits summary into quantize.json under "qat".

    python -m examples.qat                       # both networks, seeds 0 1 2 (about 25 min)
    python -m examples.qat --quick --output-dir /tmp/qat    # one seed, a few steps: a smoke run
    python -m examples.qat --data fashion-mnist --seeds 0 --float-steps 1000 --qat-steps 300

TensorFlow backend (the export needs it). onnxruntime on 2 threads, spinning off. The int8
figures are accuracies, not latencies; the CPU's int8 instructions do not change them.
"""
import os

# Read once, when Keras and TensorFlow start: set before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import argparse
import sys
import tempfile
import time

import keras
import numpy as np
import onnxruntime

import export
import keras_bn
from examples import cli, reporting, training
from examples import statistics as accuracy_statistics
from examples.data import load_dataset
from examples.variants import build_variant
from keras_bn.verification import quantization_step

NETWORKS = ("bn_inception", "mobilenet")
# BN-Inception on digits: benchmarks.quantize's recipe (BN-x5, 600 steps of 32).
INCEPTION = dict(learning_rate=0.01, steps=600, batch_size=32, alpha=0.125)
MOBILENET = dict(learning_rate=0.05, steps=600, batch_size=32)
# Small against the float recipes' rates (BN-Inception's has decayed to 1e-5 by its end; the small
# MobileNet trains at 0.05): fine-tuning adapts the weights to the grid without leaving the
# trained solution.
QAT_LEARNING_RATE = 0.001
CALIBRATION_EXAMPLES = 512
# Algorithm 2 over this many training batches of 32 (all of digits' 42; 4,096 Fashion-MNIST images).
POPULATION_BATCHES = 128
TARGETS = ("cpu", "cpu-vnni", "tensorrt")
# Step times compared over at most this many steps (the median after the first 5).
TIMED_STEPS = 60
# The targets.
MAX_QAT_DROP_POINTS = 0.2


def small_mobilenet(input_shape, classes, seed=0):
    """A MobileNetV2-like network for 8x8 digits: a 3x3 stem, three inverted residual blocks
    (1x1 expansion, 3x3 depthwise, 1x1 linear projection, each with BN; ReLU6), a 1x1 head, the
    global pool and a dense classifier (logits)."""
    keras.utils.set_random_seed(seed)

    def conv_bn(x, filters, kernel_size, name, strides=1, relu=True, depthwise=False):
        if depthwise:
            x = keras.layers.DepthwiseConv2D(kernel_size, strides, padding="same",
                                             use_bias=False, name=name)(x)
        else:
            x = keras.layers.Conv2D(filters, kernel_size, strides, padding="same",
                                    use_bias=False, name=name)(x)
        x = keras_bn.BatchNormalization(name=f"{name}_bn")(x)
        return keras.layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input(input_shape, name="digit")
    x = conv_bn(inputs, 16, 3, "stem")
    for index, (filters, strides) in enumerate([(16, 1), (24, 2), (24, 1)]):
        name = f"block{index}"
        y = conv_bn(x, 4 * x.shape[-1], 1, f"{name}_expand")
        y = conv_bn(y, None, 3, f"{name}_depthwise", strides=strides, depthwise=True)
        y = conv_bn(y, filters, 1, f"{name}_project", relu=False)
        x = keras.layers.Add(name=f"{name}_add")([x, y]) if y.shape == x.shape else y
    x = conv_bn(x, 64, 1, "head")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_mobilenet")


def train_float(network, data, seed, steps):
    """The float network trained on `data`, population statistics estimated."""
    if network == "bn_inception":
        config = training.Config(
            family="inception", learning_rate=INCEPTION["learning_rate"],
            batch_size=INCEPTION["batch_size"], steps=steps, eval_every=steps,
            alpha=INCEPTION["alpha"], statistics="moving", final_population=True,
            population_batches=POPULATION_BATCHES,
        )
        model = build_variant("BN-x5", config, data.input_shape, data.classes, seed=seed)
        training.train_and_track(model, data, config, seed=seed, verbose=0)
        return model
    model = small_mobilenet(data.input_shape, data.classes, seed=seed)
    compile_for_training(model, MOBILENET["learning_rate"])
    batches = training.batch_indices(len(data.x_train), MOBILENET["batch_size"], steps,
                                     reshuffle=True, seed=seed).reshape(-1)
    model.fit(data.x_train[batches], data.y_train[batches], batch_size=MOBILENET["batch_size"],
              shuffle=False, verbose=0)
    estimate_population(model, data)
    return model


def estimate_population(model, data):
    """Algorithm 2 over the first `POPULATION_BATCHES` training batches of 32."""
    keras_bn.estimate_population_statistics(model, data.x_train[:POPULATION_BATCHES * 32],
                                            batch_size=32, verbose=0)


def compile_for_training(model, learning_rate):
    model.compile(keras.optimizers.SGD(learning_rate, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))


class StepTimes(keras.callbacks.Callback):
    """Wall time of every training step."""

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)

    def on_train_begin(self, logs=None):
        self.seconds = []


def fine_tune(model, data, steps, seed, learning_rate=QAT_LEARNING_RATE, qat=True):
    """`steps` momentum-SGD steps: two thirds on batch statistics; then the population
    statistics estimated (Algorithm 2, as for the float network) and, for a QAT model, frozen
    for the rest (a float model, the control, goes on on batch statistics and has its population
    statistics estimated again at the end). Returns the step times of the first part."""
    compile_for_training(model, learning_rate)
    batches = training.batch_indices(len(data.x_train), 32, steps, reshuffle=True,
                                     seed=seed + 1000).reshape(-1)
    split = (2 * steps // 3) * 32
    timer = StepTimes()
    model.fit(data.x_train[batches[:split]], data.y_train[batches[:split]], batch_size=32,
              shuffle=False, verbose=0, callbacks=[timer])
    times = list(timer.seconds)
    estimate_population(model, data)
    if qat:
        keras_bn.freeze_bn_statistics(model)
    model.fit(data.x_train[batches[split:]], data.y_train[batches[split:]], batch_size=32,
              shuffle=False, verbose=0)
    if not qat:
        estimate_population(model, data)
    return times


def calibrate_ranges(qat_model, x):
    """Post-training: the QAT layers' input ranges set from `x` with learning rate 0 and frozen
    statistics, so that nothing but the ranges changes."""
    keras_bn.freeze_bn_statistics(qat_model)
    compile_for_training(qat_model, 0.0)
    qat_model.fit(x, np.zeros(len(x), "int32"), batch_size=32, shuffle=False, verbose=0)


def float_step_times(model, data, steps, seed, learning_rate):
    """Step times of the float model on the batches `fine_tune` uses, weights left as they are
    (a copy trains)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    compile_for_training(copy, learning_rate)
    timed = min(2 * steps // 3, TIMED_STEPS)
    batches = training.batch_indices(len(data.x_train), 32, steps, reshuffle=True,
                                     seed=seed + 1000).reshape(-1)[:timed * 32]
    timer = StepTimes()
    copy.fit(data.x_train[batches], data.y_train[batches], batch_size=32, shuffle=False,
             verbose=0, callbacks=[timer])
    return timer.seconds


def onnx_outputs(path, x):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 256]})[0]
                           for i in range(0, len(x), 256)])


def onnx_correct(path, x, y):
    """Per test image: whether the ONNX graph's top-1 class is right."""
    return np.argmax(onnx_outputs(path, x), axis=-1) == y


def steps_from_keras(path, expected, x):
    """How far the graph's outputs on `x` lie from the Keras model's (`expected`), in
    quantization steps of the output (its range / 255): the largest, and the fraction beyond one
    step."""
    steps = np.abs(onnx_outputs(path, x) - expected) / quantization_step(expected)
    return float(steps.max()), float(np.mean(steps > 1.0))


def median_step_ms(seconds):
    seconds = seconds[:TIMED_STEPS]
    return 1000 * float(np.median(seconds[5:] or seconds))


def comparisons(correct, ptq_targets, qat_targets):
    """The paired comparisons (B vs A) of one network and seed: {"B vs A": McNemar's test}."""
    pairs = [(f"ptq8_{t}", "float") for t in ptq_targets]
    for t in qat_targets:
        pairs += [(f"qat8_{t}", "float")] + ([(f"qat8_{t}", f"ptq8_{t}")]
                                              if t in ptq_targets else [])
    pairs += [("ptq4", "float"), ("qat4", "float"), ("qat4", "ptq4"), ("float_ft", "float")]
    pairs += [(f"qat8_{t}", "float_ft") for t in qat_targets] + [("qat4", "float_ft")]
    return {f"{b} vs {a}": accuracy_statistics.paired_comparison(correct[a], correct[b])
            for b, a in pairs}


def run_one(network, data, seed, args, folder):
    """Every figure of one network and seed."""
    start = time.perf_counter()
    model = train_float(network, data, seed, args.float_steps)
    x_test, y_test = data.x_test, data.y_test
    calibration = data.x_train[:CALIBRATION_EXAMPLES]
    correct = {"float": np.argmax(training.predict(model, x_test), axis=-1) == y_test}
    row = {"network": network, "seed": seed}
    path = os.path.join(folder, f"{network}_{seed}")
    for target in args.ptq_targets:
        result = export.to_onnx(model, f"{path}_ptq8_{target}.onnx", quantize="int8",
                                target=target, calibration_data=calibration, min_agreement=0.0,
                                verbose=0)
        correct[f"ptq8_{target}"] = onnx_correct(f"{path}_ptq8_{target}.onnx", x_test, y_test)
        row[f"ptq8_{target}_target"] = result.target
    qat_runs = [(8, target) for target in args.qat_targets] + [(4, args.qat_targets[0])]
    for bits, target in qat_runs:
        key = f"qat8_{target}" if bits == 8 else "qat4"
        # 8: the target's widest int8 grid ('cpu': 7-bit kernels, right on every x86 CPU)
        qat_model = keras_bn.prepare_qat(model, weight_bits="auto" if bits == 8 else bits,
                                         target=target)
        times = fine_tune(qat_model, data, args.qat_steps, seed, args.qat_learning_rate)
        result = export.to_onnx(qat_model, f"{path}_{key}.onnx")
        correct[key] = onnx_correct(f"{path}_{key}.onnx", x_test, y_test)
        expected = training.predict(qat_model, x_test)
        row[f"{key}_keras"] = float(np.mean(np.argmax(expected, axis=-1) == y_test))
        row[f"{key}_test_steps_max"], row[f"{key}_test_beyond_one_step"] = \
            steps_from_keras(f"{path}_{key}.onnx", expected, x_test)
        row[f"{key}_verification_steps_max"] = result.max_error_steps
        if "qat_step_ms" not in row:
            row["qat_step_ms"] = median_step_ms(times)
    control = keras.models.clone_model(model)  # the float network, fine-tuned as QAT is
    control.set_weights(model.get_weights())
    fine_tune(control, data, args.qat_steps, seed, args.qat_learning_rate, qat=False)
    correct["float_ft"] = np.argmax(training.predict(control, x_test), axis=-1) == y_test
    ptq4 = keras_bn.prepare_qat(model, weight_bits=4, target=args.qat_targets[0])
    calibrate_ranges(ptq4, calibration)
    export.to_onnx(ptq4, f"{path}_ptq4.onnx")
    correct["ptq4"] = onnx_correct(f"{path}_ptq4.onnx", x_test, y_test)
    for key, values in correct.items():
        row[key] = float(np.mean(values))
    # The first target's figures under the names the digits results have always used.
    row["ptq8"] = row[f"ptq8_{args.ptq_targets[0]}"]
    row["qat8"] = row[f"qat8_{args.qat_targets[0]}"]
    for key in ("keras", "test_steps_max", "test_beyond_one_step", "verification_steps_max"):
        row[f"qat8_{key}"] = row[f"qat8_{args.qat_targets[0]}_{key}"]
    row["test_examples"] = int(len(y_test))
    row["intervals"] = {key: accuracy_statistics.accuracy_interval(values)
                        for key, values in correct.items()}
    row["comparisons"] = comparisons(correct, args.ptq_targets, args.qat_targets)
    row["float_step_ms"] = median_step_ms(float_step_times(model, data, args.qat_steps, seed,
                                                         args.qat_learning_rate))
    row["qat_step_cost"] = row["qat_step_ms"] / row["float_step_ms"]
    row["seconds"] = time.perf_counter() - start
    print(f"{network} seed {seed}: float {row['float']:.2%}, PTQ int8 {row['ptq8']:.2%}, "
          f"QAT int8 {row['qat8']:.2%}; 4-bit weights: PTQ {row['ptq4']:.2%}, QAT "
          f"{row['qat4']:.2%}; QAT step {row['qat_step_cost']:.2f}x float "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


def summarize(rows, networks):
    summary = {}
    keys = ("float", "ptq8", "qat8", "ptq4", "qat4", "float_ft", "qat_step_cost")
    for network in networks:
        mine = [r for r in rows if r["network"] == network]
        means = {key: float(np.mean([r[key] for r in mine])) for key in keys
                 if all(key in r for r in mine)}
        drop = 100 * (means["float"] - means["qat8"])
        summary[network] = {
            "seeds": [r["seed"] for r in mine],
            "mean": means,
            "qat8_drop_points": drop,
            "qat8_within_0.2_points_of_float": bool(drop <= MAX_QAT_DROP_POINTS),
            "qat8_never_below_ptq8": all(r["qat8"] >= r["ptq8"] for r in mine),
            "qat4_minus_ptq4_points": 100 * (means["qat4"] - means["ptq4"]),
            # each paired comparison over the seeds: what the method does, not one network
            "across_seeds": {key: accuracy_statistics.across_seeds(
                [r["comparisons"][key] for r in mine]) for key in mine[0].get("comparisons", {})
                if all(key in r.get("comparisons", {}) for r in mine)},
        }
    return summary


def table(rows, summary):
    lines = ["| network | seed | float | PTQ int8 | QAT int8 | PTQ 4-bit w | QAT 4-bit w | "
             "float fine-tuned (control) | QAT step / float |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cells(values):
        return " | ".join(f"{values[key]:.2%}" if key in values else "" for key in
                          ("float", "ptq8", "qat8", "ptq4", "qat4", "float_ft"))

    for r in rows:
        lines.append(f"| {r['network']} | {r['seed']} | {cells(r)} | {r['qat_step_cost']:.2f}x |")
    for network, s in summary.items():
        m = s["mean"]
        lines.append(f"| **{network} mean** | | {cells(m)} | {m['qat_step_cost']:.2f}x |")
    return "\n".join(lines)


def seeds_table(summary):
    """Each paired comparison over the seeds, per network: the mean difference with Student's t
    interval over the seeds, and how many seeds' McNemar tests found it."""
    lines = []
    for network, s in summary.items():
        comparisons = s.get("across_seeds", {})
        if not comparisons:
            continue
        seeds = len(s["seeds"])
        lines += [f"{network}, over {seeds} seed{'s' if seeds != 1 else ''} (B - A in points; "
                  "the interval and t-test over the seeds; McNemar's test per seed at p<0.05):",
                  "", "| B vs A | per seed | across seeds |", "|---|---|---|"]
        for key, c in comparisons.items():
            b, a = key.split(" vs ")
            per_seed = ", ".join(f"{100 * d:+.2f}" for d in c["differences"])
            lines.append(f"| {_label(b)} vs {_label(a)} | {per_seed} | "
                         f"{accuracy_statistics.format_across_seeds(c)} |")
        lines.append("")
    return "\n".join(lines)


LABELS = {"float": "float", "ptq4": "PTQ 4-bit weights", "qat4": "QAT 4-bit weights",
          "float_ft": "float fine-tuned as QAT (control)"}


def _label(key):
    if key in LABELS:
        return LABELS[key]
    kind, target = key.split("_", 1)
    return f"{'PTQ' if kind == 'ptq8' else 'QAT'} int8, target {target}"


def interval_tables(rows):
    """Per network and seed: each accuracy with its 95% interval, and McNemar's paired tests
    against float and against the post-training file of the same bits and target."""
    blocks = []
    for r in rows:
        lines = [f"{r['network']}, seed {r['seed']}, {r['test_examples']} test images "
                 "(difference in points [95% CI], McNemar's exact p, discordant images "
                 "reference only / this only):", "",
                 "| model | accuracy [95% CI] | vs float | vs post-training | vs float "
                 "fine-tuned |", "|---|---|---|---|---|"]
        for key, interval in r["intervals"].items():
            cells = []
            for reference in ("float", "ptq4" if key == "qat4" else key.replace("qat8", "ptq8"),
                              "float_ft"):
                comparison = r["comparisons"].get(f"{key} vs {reference}")
                cells.append(accuracy_statistics.format_comparison(comparison)
                             if comparison else "")
            lines.append(f"| {_label(key)} | {accuracy_statistics.format_accuracy(interval)} | "
                         f"{cells[0]} | {cells[1]} | {cells[2]} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=cli.DEFAULT_RESULTS)
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--float-steps", type=cli.positive_int, default=600,
                        help="training steps of the float networks")
    parser.add_argument("--qat-steps", type=cli.positive_int, default=300,
                        help="QAT fine-tuning steps")
    parser.add_argument("--qat-learning-rate", type=float, default=QAT_LEARNING_RATE,
                        help="momentum-SGD rate of the QAT fine-tuning")
    parser.add_argument("--data", default="digits",
                        help="'digits' (default), 'fashion-mnist' or a folder of MNIST-format IDX "
                             "files (examples.data)")
    parser.add_argument("--ptq-targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                        help="deployment targets of the post-training int8 files")
    parser.add_argument("--qat-targets", nargs="+", choices=TARGETS, default=["cpu"],
                        help="targets QAT int8 trains for (the first also for 4-bit weights)")
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.float_steps, args.qat_steps = args.seeds[:1], 30, 15
    if min(args.float_steps, args.qat_steps) < 3:
        raise ValueError(f"--float-steps and --qat-steps must be at least 3. Received: "
                         f"{args.float_steps} and {args.qat_steps}")
    data = load_dataset(args.data)
    start = time.perf_counter()
    rows = []
    command = "python -m examples.qat " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as folder:
        # Seeds outermost: a run cut short covers every network.
        for seed in args.seeds:
            for network in args.networks:
                keras.backend.clear_session()
                rows.append(run_one(network, data, seed, args, folder))
                # Written after every row: a run cut short keeps what it measured.
                result = write_results(args, data, rows, command, time.perf_counter() - start)
    return result


def write_results(args, data, rows, command, seconds):
    """qat.json and qat.md (qat_<data>.* off digits) for the rows measured so far."""
    networks = [n for n in args.networks if any(r["network"] == n for r in rows)]
    summary = summarize(rows, networks)
    complete = len(rows) == len(args.networks) * len(args.seeds)
    result = {
        "what": f"float, post-training int8 (PTQ, targets {', '.join(args.ptq_targets)}) and "
                f"QAT int8 (targets {', '.join(args.qat_targets)}) test accuracy on the "
                f"{len(data.y_test)} test images of {data.name}, in onnxruntime, each with its "
                "95% Wilson interval; 4-bit weights both ways; paired comparisons by McNemar's "
                "exact test on the same test images; QAT step time / float",
        "command": command, "complete": complete,
        "data": data.name, "test_examples": int(len(data.y_test)),
        "train_examples": int(len(data.y_train)), "seeds": args.seeds,
        "ptq_targets": args.ptq_targets, "qat_targets": args.qat_targets,
        "population_batches": POPULATION_BATCHES,
        "float_steps": args.float_steps, "qat_steps": args.qat_steps,
        "qat_learning_rate": args.qat_learning_rate, "calibration_examples": CALIBRATION_EXAMPLES,
        "rows": rows, "summary": summary, "seconds": seconds,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    stem = "qat" if data.name == "digits" else f"qat_{data.name}"
    reporting.write_json(os.path.join(args.output_dir, f"{stem}.json"), result)
    markdown = (f"{result['what']}.\n\n`{command}`: float {args.float_steps} steps, QAT "
                f"{args.qat_steps} steps, seeds {sorted({r['seed'] for r in rows})}"
                f"{'' if complete else ' (incomplete run)'}\n\n" + table(rows, summary)
                + "\n\n" + seeds_table(summary) + "\n" + interval_tables(rows))
    reporting.write_text(os.path.join(args.output_dir, f"{stem}.md"), markdown + "\n")
    written = f"{args.output_dir}/{stem}.json, {stem}.md"
    if data.name == "digits" and complete:
        reporting.merge_json(os.path.join(args.output_dir, "quantize.json"), "qat",
                             {"command": result["command"], "summary": summary})
        written += " (and the 'qat' key of quantize.json)"
    if complete:
        print(markdown)
        print(f"wrote {written}")
    return result


if __name__ == "__main__":
    cli.run_main(main)
