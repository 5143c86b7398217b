"""Quantization-aware training against post-training int8, on digits: what each int8 file keeps.

For each network and seed:

1. the float network is trained (BN-Inception BN-x5 with the recipe of `benchmarks.quantize`, or a
   small MobileNetV2-like network of depthwise separable inverted residual blocks), population
   statistics estimated (Algorithm 2): its test accuracy is the float figure;
2. post-training int8 (PTQ): `export.to_onnx(model, quantize="int8")` calibrated on 512 training
   digits; its accuracy in onnxruntime;
3. QAT int8: `keras_bn.prepare_qat(model)` fine-tuned for `--qat-steps` momentum-SGD steps at
   `--qat-learning-rate` (the first two thirds on batch statistics; then the population
   statistics estimated and `keras_bn.freeze_bn_statistics` for the rest), then
   `export.to_onnx(qat_model)`, no calibration; its accuracy in onnxruntime;
4. the same at 4-bit weights (`weight_bits=4`, 8-bit activations): PTQ-4 is
   `prepare_qat(model, weight_bits=4)` with its statistics frozen and its input ranges set on
   the same 512 training digits by steps at learning rate 0 (post-training: nothing learns but
   the ranges); QAT-4 fine-tunes as in 3;
5. the cost of a QAT training step relative to a float one (median step time, same batches).

Writes `--output-dir`/qat.json and qat.md, and merges the summary into quantize.json under "qat".

    python -m examples.qat                       # both networks, seeds 0 1 2 (about 25 min)
    python -m examples.qat --quick --output-dir /tmp/qat    # one seed, a few steps: a smoke run

TensorFlow backend (the export needs it). onnxruntime on 2 threads, spinning off. The int8
figures are accuracies, not latencies; the CPU's int8 instructions do not change them.
"""
import os

# Read once, when Keras and TensorFlow start: set before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import argparse
import statistics
import tempfile
import time

import keras
import numpy as np
import onnxruntime

import export
import keras_bn
from examples import cli, reporting, training
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
    keras_bn.estimate_population_statistics(model, data.x_train, batch_size=32, verbose=0)
    return model


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


def fine_tune(model, data, steps, seed, learning_rate=QAT_LEARNING_RATE):
    """`steps` momentum-SGD steps: two thirds on batch statistics; then the population
    statistics estimated (Algorithm 2, as for the float network) and frozen for the rest.
    Returns the step times of the first part."""
    compile_for_training(model, learning_rate)
    batches = training.batch_indices(len(data.x_train), 32, steps, reshuffle=True,
                                     seed=seed + 1000).reshape(-1)
    split = (2 * steps // 3) * 32
    timer = StepTimes()
    model.fit(data.x_train[batches[:split]], data.y_train[batches[:split]], batch_size=32,
              shuffle=False, verbose=0, callbacks=[timer])
    times = list(timer.seconds)
    keras_bn.estimate_population_statistics(model, data.x_train, batch_size=32, verbose=0)
    keras_bn.freeze_bn_statistics(model)
    model.fit(data.x_train[batches[split:]], data.y_train[batches[split:]], batch_size=32,
              shuffle=False, verbose=0)
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
    batches = training.batch_indices(len(data.x_train), 32, steps, reshuffle=True,
                                     seed=seed + 1000).reshape(-1)[:(2 * steps // 3) * 32]
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


def onnx_accuracy(path, x, y):
    return float(np.mean(np.argmax(onnx_outputs(path, x), axis=-1) == y))


def steps_from_keras(path, model, x):
    """How far the graph's outputs on `x` lie from the Keras model's, in quantization steps of
    the output (its range / 255): the largest, and the fraction beyond one step."""
    expected = training.predict(model, x)
    steps = np.abs(onnx_outputs(path, x) - expected) / quantization_step(expected)
    return float(steps.max()), float(np.mean(steps > 1.0))


def median_step_ms(seconds):
    return 1000 * statistics.median(seconds[5:] or seconds)


def run_one(network, data, seed, args, folder):
    """Every figure of one network and seed."""
    start = time.perf_counter()
    model = train_float(network, data, seed, args.float_steps)
    x_test, y_test = data.x_test, data.y_test
    calibration = data.x_train[:CALIBRATION_EXAMPLES]
    row = {"network": network, "seed": seed,
           "float": training.evaluate_accuracy(model, x_test, y_test)}
    path = os.path.join(folder, f"{network}_{seed}")
    result = export.to_onnx(model, f"{path}_ptq8.onnx", quantize="int8",
                            calibration_data=calibration, min_agreement=0.0, verbose=0)
    row["ptq8"] = onnx_accuracy(f"{path}_ptq8.onnx", x_test, y_test)
    row["ptq8_target"] = result.target
    for bits in (8, 4):
        # 8: the "cpu" target's int8 grid (7-bit kernels, right on every x86 CPU)
        qat_model = keras_bn.prepare_qat(model, weight_bits="auto" if bits == 8 else bits)
        times = fine_tune(qat_model, data, args.qat_steps, seed, args.qat_learning_rate)
        result = export.to_onnx(qat_model, f"{path}_qat{bits}.onnx")
        row[f"qat{bits}"] = onnx_accuracy(f"{path}_qat{bits}.onnx", x_test, y_test)
        row[f"qat{bits}_keras"] = training.evaluate_accuracy(qat_model, x_test, y_test)
        row[f"qat{bits}_test_steps_max"], row[f"qat{bits}_test_beyond_one_step"] = \
            steps_from_keras(f"{path}_qat{bits}.onnx", qat_model, x_test)
        row[f"qat{bits}_verification_steps_max"] = result.max_error_steps
        if bits == 8:
            row["qat_step_ms"] = median_step_ms(times)
    ptq4 = keras_bn.prepare_qat(model, weight_bits=4)
    calibrate_ranges(ptq4, calibration)
    export.to_onnx(ptq4, f"{path}_ptq4.onnx")
    row["ptq4"] = onnx_accuracy(f"{path}_ptq4.onnx", x_test, y_test)
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
    keys = ("float", "ptq8", "qat8", "ptq4", "qat4", "qat_step_cost")
    for network in networks:
        mine = [r for r in rows if r["network"] == network]
        means = {key: float(np.mean([r[key] for r in mine])) for key in keys}
        drop = 100 * (means["float"] - means["qat8"])
        summary[network] = {
            "seeds": [r["seed"] for r in mine],
            "mean": means,
            "qat8_drop_points": drop,
            "qat8_within_0.2_points_of_float": bool(drop <= MAX_QAT_DROP_POINTS),
            "qat8_never_below_ptq8": all(r["qat8"] >= r["ptq8"] for r in mine),
            "qat4_minus_ptq4_points": 100 * (means["qat4"] - means["ptq4"]),
        }
    return summary


def table(rows, summary):
    lines = ["| network | seed | float | PTQ int8 | QAT int8 | PTQ 4-bit w | QAT 4-bit w | "
             "QAT step / float |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['seed']} | {r['float']:.2%} | {r['ptq8']:.2%} | "
                     f"{r['qat8']:.2%} | {r['ptq4']:.2%} | {r['qat4']:.2%} | "
                     f"{r['qat_step_cost']:.2f}x |")
    for network, s in summary.items():
        m = s["mean"]
        lines.append(f"| **{network} mean** | | {m['float']:.2%} | {m['ptq8']:.2%} | "
                     f"{m['qat8']:.2%} | {m['ptq4']:.2%} | {m['qat4']:.2%} | "
                     f"{m['qat_step_cost']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=cli.DEFAULT_RESULTS)
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--float-steps", type=int, default=600,
                        help="training steps of the float networks")
    parser.add_argument("--qat-steps", type=int, default=300, help="QAT fine-tuning steps")
    parser.add_argument("--qat-learning-rate", type=float, default=QAT_LEARNING_RATE,
                        help="momentum-SGD rate of the QAT fine-tuning")
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.float_steps, args.qat_steps = args.seeds[:1], 30, 15
    if min(args.float_steps, args.qat_steps) < 3:
        raise ValueError(f"--float-steps and --qat-steps must be at least 3. Received: "
                         f"{args.float_steps} and {args.qat_steps}")
    data = load_dataset("digits")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for network in args.networks:
            for seed in args.seeds:
                keras.backend.clear_session()
                rows.append(run_one(network, data, seed, args, folder))
    summary = summarize(rows, args.networks)
    result = {
        "what": "float, post-training int8 (PTQ) and QAT int8 test accuracy on the 449 test "
                "digits, in onnxruntime; 4-bit weights both ways; QAT step time / float",
        "command": "python -m examples.qat" + (" --quick" if args.quick else ""),
        "float_steps": args.float_steps, "qat_steps": args.qat_steps,
        "qat_learning_rate": args.qat_learning_rate, "calibration_examples": CALIBRATION_EXAMPLES,
        "rows": rows, "summary": summary, "seconds": time.perf_counter() - start,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    reporting.write_json(os.path.join(args.output_dir, "qat.json"), result)
    markdown = table(rows, summary)
    with open(os.path.join(args.output_dir, "qat.md"), "w") as f:
        f.write(markdown + "\n")
    reporting.merge_json(os.path.join(args.output_dir, "quantize.json"), "qat",
                         {"command": result["command"], "summary": summary})
    print(markdown)
    print(f"wrote {args.output_dir}/qat.json, qat.md (and the 'qat' key of quantize.json)")
    return result


if __name__ == "__main__":
    cli.run_main(main)
