"""Figures 2 and 3 of the paper: BN-Inception's training variants, at a scale that runs.

Trains the variants of Sec. 4.2.1 - Inception (no BN, dropout 40%, LRN, L2), BN-Baseline, BN-x5,
BN-x30, BN-x5-Sigmoid (lr x1/x5/x30, no dropout, L2/5, lr decay 6x faster, no LRN, reshuffling every
epoch) - with momentum SGD, following the Figure 3 protocol of `examples.protocol.steps_to_accuracy`
(the baseline's learning rate is the best of a grid that extends until it degrades; its best test
accuracy is the target). Data: scikit-learn digits by default (8x8, the "digits" stem), CIFAR-10
python batches or an ImageNet-style folder from a local path.

    .venv/bin/python -m examples.train_inception                       # digits, alpha 0.125
    .venv/bin/python -m examples.train_inception --data ~/cifar-10-batches-py --alpha 0.25
    .venv/bin/python -m examples.train_inception --quick --output-dir /tmp/fig23
    .venv/bin/python -m examples.train_inception --checkpoint /tmp/runs.json   # rerun to resume
    KERAS_BACKEND=jax .venv/bin/python -m examples.train_inception --throughput --alpha 1 \\
        --image-size 224 --mixed-precision mixed_bfloat16 --data-parallel
    KERAS_BACKEND=jax .venv/bin/python -m examples.launch --num-processes 2 -- \
        .venv/bin/python -m examples.train_inception --quick   # two local processes (JAX)

Run from the repository root. Writes train_inception_<data>.json, figure2_train_inception_<data>.png
(accuracy vs steps of every variant) and figure3_train_inception_<data>.md (steps to the baseline's
best accuracy, max accuracy) in --output-dir; --throughput writes throughput.json (images/s on
synthetic data) instead.

Across processes (JAX only: one per host, `--num-processes N --process-id I --coordinator
HOST:PORT`, or Keras's KERAS_DISTRIBUTION_* variables; `examples.launch` starts N on one
machine), every process runs this same command: each trains on its share of every global batch
(`--batch-size`, which N must divide), and process 0 alone prints and writes the results.
"""
import os

# Read once, when TensorFlow starts: set before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time

import numpy as np

from examples import cli, devices, protocol, reporting, training, variants
from examples.data import load_dataset


def write_results(result, output_dir, stem, title=None):
    """JSON, Figure 2 (PNG) and Figure 3 (markdown) of one protocol run; returns the table."""
    reporting.write_json(os.path.join(output_dir, f"{stem}.json"), result)
    reporting.plot_accuracy_curves(result, os.path.join(output_dir, f"figure2_{stem}.png"), title)
    table = reporting.steps_table(result)
    reporting.write_text(os.path.join(output_dir, f"figure3_{stem}.md"), table)
    return table


def measure_throughput(args):
    """Images per second of BN-Inception training steps on synthetic data (no accuracy)."""
    import keras

    from examples import models

    size = args.image_size or 224
    batch = args.batch_size or 32
    steps = 5 if args.quick else args.throughput_steps
    with devices.data_parallel_scope(args.data_parallel):
        replicas = devices.replica_count()
        global_batch = batch * replicas
        # Each process feeds its share of every global batch (one process: all of it).
        local_batch = training.local_batch_size(global_batch, devices.process_count())
        keras.utils.set_random_seed(0)  # across processes, every one must build the same weights
        model = models.bn_inception(
            input_shape=(size, size, 3), classes=1000, alpha=args.alpha,
            synchronized=devices.synchronized_batch_norm(args.data_parallel),
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.045, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            run_eagerly=training.quick_runs_eagerly(args.quick),
        )
        rng = np.random.default_rng(0)
        x = rng.standard_normal((local_batch * 2, size, size, 3)).astype("float32")
        y = rng.integers(0, 1000, local_batch * 2).astype("int32")
        model.fit(x, y, batch_size=local_batch, epochs=1, verbose=0)  # compile
        xs = np.concatenate([x] * max(1, steps // 2))
        ys = np.concatenate([y] * max(1, steps // 2))
        start = time.perf_counter()
        model.fit(xs, ys, batch_size=local_batch, epochs=1, verbose=args.verbose)
        seconds = time.perf_counter() - start
    result = {
        "backend": keras.backend.backend(),
        "devices": devices.local_devices(),
        "processes": devices.process_count(),
        "replicas": replicas,
        "mixed_precision": args.mixed_precision,
        "alpha": args.alpha,
        "image_size": size,
        "global_batch_size": global_batch,
        "steps": len(xs) // local_batch,
        "parameters": model.count_params(),
        "images_per_second": len(xs) * devices.process_count() / seconds,
    }
    if devices.process_index() != 0:  # process 0 writes for all
        return result
    path = reporting.write_json(os.path.join(args.output_dir, "throughput.json"), result)
    print(f"{result['images_per_second']:.1f} images/s ({result['backend']}, "
          f"{result['processes']} process(es), {replicas} replica(s), batch {global_batch}); "
          f"wrote {path}")
    return result


def main(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, default=0.125, help="width multiplier")
    parser.add_argument("--image-size", type=cli.positive_int, default=None,
                        help="resize images to this square size (default: the data's own)")
    parser.add_argument("--steps", type=cli.positive_int, default=None,
                        help="the baseline's budget in steps (default 1500; quick 20)")
    parser.add_argument("--variant-steps", type=cli.positive_int, default=None,
                        help="steps of each BN variant (default: the baseline's budget)")
    parser.add_argument("--eval-every", type=cli.positive_int, default=None,
                        help="steps between evaluations (default: 1%% of the budget)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32, help="the paper's 32")
    parser.add_argument("--learning-rate", type=float, default=0.01,
                        help="first rate of the baseline's learning-rate grid")
    parser.add_argument("--grid-factor", type=float, default=3.0,
                        help="ratio between consecutive rates of the grid")
    parser.add_argument("--variants", nargs="+",
                        default=list(variants.FAMILY_VARIANTS["inception"]),
                        choices=list(variants.VARIANTS), help="variants to train")
    parser.add_argument("--checkpoint", default=None,
                        help="JSON file recording each finished training run; a rerun with the "
                             "same file reads those back and resumes the protocol where it "
                             "stopped")
    parser.add_argument("--throughput", action="store_true",
                        help="only measure training images/s on synthetic data")
    parser.add_argument("--throughput-steps", type=cli.positive_int, default=50)
    cli.add_process_arguments(parser)
    args = parser.parse_args(argv)
    cli.resolve_process_options(args)
    if args.checkpoint and args.num_processes > 1:
        raise ValueError(
            "--checkpoint records runs from one process: every process would write the file. "
            f"Received: --checkpoint {args.checkpoint!r} with {args.num_processes} processes"
        )
    cli.apply_runtime_options(args)
    if args.throughput:
        return measure_throughput(args)
    steps = args.steps or (20 if args.quick else 1500)
    image_size = (args.image_size, args.image_size) if args.image_size else None
    data = load_dataset(args.data, image_size=image_size)
    if args.quick:
        data.x_train, data.y_train = data.x_train[:256], data.y_train[:256]
    config = training.Config(
        family="inception",
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        steps=steps,
        eval_every=args.eval_every or max(1, steps // 100),
        alpha=args.alpha,
        statistics=args.statistics,
        population_batches=args.population_batches,
        data_parallel=args.data_parallel,
        # Quick mode checks the code paths, not the accuracy: no compilation of the large graph.
        run_eagerly=training.quick_runs_eagerly(args.quick),
        final_population=not args.quick,
    )
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    with devices.data_parallel_scope(args.data_parallel):
        result = protocol.steps_to_accuracy(
            data,
            config,
            variants=args.variants,
            seeds=seeds,
            # quick: code paths only, no grid
            grid=protocol.LearningRateGrid(factor=args.grid_factor,
                                           max_rates=1 if args.quick else 8),
            variant_steps=args.variant_steps,
            verbose=args.verbose,
            checkpoint=args.checkpoint,
        )
    if devices.process_index() != 0:  # every process holds the same result: process 0 writes
        return result
    stem = f"train_inception_{data.name}"  # benchmarks/steps_to_accuracy.py owns "inception_*"
    table = write_results(result, args.output_dir, stem,
                          f"Small BN-Inception (alpha {args.alpha}) on {data.name}")
    print(table)
    print(f"Wrote {stem}.json, figure2_{stem}.png, figure3_{stem}.md to {args.output_dir}")
    return result


if __name__ == "__main__":
    cli.run_main(main)
