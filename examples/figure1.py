"""Figure 1 of the paper: the MNIST network (Sec. 4.1) with and without BN.

(a) test accuracy vs training steps; (b, c) the 15th, 50th and 85th percentiles, over the test set,
of the input to one sigmoid of the last hidden layer, without BN (b, drifting) and with BN (c,
stable). Data: --data fashion-mnist (Debian's dataset-fashion-mnist), a folder of MNIST-format
IDX files or an MNIST `.npz`, else scikit-learn's bundled 8x8 digits.

    .venv/bin/python -m examples.figure1                    # digits, writes benchmarks/results/
    .venv/bin/python -m examples.figure1 --data fashion-mnist --steps 50000
    .venv/bin/python -m examples.figure1 --quick --output-dir /tmp/fig1

Run from the repository root. Writes figure1.json, figure1.png and figure1.md in --output-dir
(figure1_<data>.* for another data set than digits, e.g. figure1_fashion-mnist.json). The final
accuracies come with their 95% Wilson intervals on the test set.
"""
import os

# Read once, when TensorFlow starts: set before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dataclasses

import numpy as np

from examples import cli, devices, reporting, training, variants
from examples import statistics as accuracy_statistics
from examples.data import load_dataset
from examples.models import sigmoid_input_layer

PERCENTILES = (15, 50, 85)


def sigmoid_input_probe(model, x_test, unit):
    """A `probe` for `train_and_track`: percentiles of one last-hidden-layer sigmoid's input."""
    import keras

    layer = sigmoid_input_layer(model)
    probe_model = keras.Model(model.inputs, layer.output)

    def probe(_):
        values = training.predict(probe_model, x_test, batch_size=512)[:, unit]
        return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}

    return probe


def run_figure1(data, config, unit=0, seed=0, verbose=1):
    """Train the network with and without BN at the same learning rate; return both histories."""
    results = {}
    for label, variant in (("without BN", "Baseline"), ("with BN", "BN-Baseline")):
        model = variants.build_variant(variant, config, data.input_shape, data.classes, seed=seed)
        history = training.train_and_track(
            model,
            data,
            config,
            seed=seed,
            probe=sigmoid_input_probe(model, data.x_test, unit),
            verbose=verbose,
            label=f"Figure 1, {label}",
        )
        results[label] = history.to_dict()
        correct = np.argmax(training.predict(model, data.x_test), axis=-1) == data.y_test
        results[label]["final_interval"] = accuracy_statistics.accuracy_interval(correct)
    return results


def plot_figure1(results, path, title):
    plt = reporting._figure()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, history in results.items():
        axes[0].plot(history["steps"], history["accuracy"], label=label)
    axes[0].set_title("(a) test accuracy")
    axes[0].set_xlabel("training steps")
    axes[0].set_ylim(0.0, 1.0)
    axes[0].legend(loc="lower right")
    for ax, (label, panel) in zip(axes[1:], (("without BN", "(b)"), ("with BN", "(c)"))):
        history = results[label]
        steps = history["steps"][: len(history["probes"])]
        for p in PERCENTILES:
            ax.plot(steps, [probe[f"p{p}"] for probe in history["probes"]], label=f"{p}th")
        ax.set_title(f"{panel} {label}: input of one last-layer sigmoid", fontsize=10)
        ax.set_xlabel("training steps")
        ax.legend(loc="best", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.03)
    reporting.save_figure(fig, path)
    plt.close(fig)
    return path


def markdown(results, config):
    lines = [
        "| network | best test accuracy | final (moving averages) "
        "| final (population statistics) [95% CI] |",
        "|---|---|---|---|",
    ]
    for label, h in results.items():
        final = (accuracy_statistics.format_accuracy(h["final_interval"])
                 if "final_interval" in h else f"{(h['final_accuracy'] or float('nan')):.1%}")
        lines.append(
            f"| {label} | {max(h['accuracy']):.1%} | "
            f"{(h['final_accuracy_moving'] or float('nan')):.1%} | {final} |"
        )
    return (
        f"Figure 1 network, {config.steps} steps of {config.batch_size}, momentum SGD, "
        f"lr {config.learning_rate}\n\n" + "\n".join(lines) + "\n"
    )


def main(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=cli.positive_int, default=None,
                        help="training steps (default 5000)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=60, help="the paper's 60")
    parser.add_argument("--learning-rate", type=float, default=0.5,
                        help="momentum-SGD learning rate, the same for both networks")
    parser.add_argument("--unit", type=int, default=0, help="which last-hidden-layer sigmoid")
    args = parser.parse_args(argv)
    cli.apply_runtime_options(args)
    steps = args.steps or (200 if args.quick else 5000)
    data = load_dataset(args.data, flatten=True)
    config = training.Config(
        family="mlp",
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        steps=steps,
        eval_every=max(1, steps // (5 if args.quick else 100)),
        statistics=args.statistics,
        population_batches=args.population_batches,
        data_parallel=args.data_parallel,
    )
    seed = (args.seeds or [0])[0]
    with devices.data_parallel_scope(args.data_parallel):
        replicas = devices.replica_count()
        results = run_figure1(data, config, unit=args.unit, seed=seed, verbose=args.verbose)
    out = args.output_dir
    stem = "figure1" if data.name == "digits" else f"figure1_{data.name}"
    payload = {"data": data.name, "test_examples": int(len(data.y_test)),
               "config": dataclasses.asdict(config), "unit": args.unit,
               "seed": seed, "replicas": replicas, "results": results}
    reporting.write_json(os.path.join(out, f"{stem}.json"), payload)
    plot_figure1(results, os.path.join(out, f"{stem}.png"),
                 f"Figure 1 on {data.name}: 3 x Dense(100, sigmoid), with and without BN")
    table = (f"{data.name}, {len(data.y_test)} test images. " + markdown(results, config))
    reporting.write_text(os.path.join(out, f"{stem}.md"), table)
    print(table)
    print(f"Wrote {stem}.json, {stem}.png, {stem}.md to {out}")


if __name__ == "__main__":
    cli.run_main(main)
