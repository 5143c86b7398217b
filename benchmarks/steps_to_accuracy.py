"""Steps to accuracy (the paper's Figure 3 protocol): the Figure 1 network, small BN-Inception.

For each network on scikit-learn's digits, with 3 seeds: the baseline's learning rate is the best
of a grid that extends upward until the baseline degrades or diverges (the chosen rate is never the
grid's edge); the baseline trains a fixed budget long enough to plateau (the JSON records its best
accuracy by 50/75/100% of the budget); its best test accuracy is the target; every BN variant's
steps (and training seconds) to first reach it are counted with an evaluation every 1% of the
budget (every 5% once the target is reached). BN is evaluated with exact population statistics
(Algorithm 2 over the whole training set) at every evaluation. Writes
benchmarks/results/steps_to_accuracy.json (per network and variant: steps median and per seed,
`ratio` = baseline steps / variant steps, `wall_clock_ratio`), steps_to_accuracy.md and the
accuracy-vs-steps plots figure2_mlp_digits.png and figure2_inception_digits.png.

    .venv/bin/python -m benchmarks.steps_to_accuracy            # ~15 minutes on 2 CPU cores (JAX)
    .venv/bin/python -m benchmarks.steps_to_accuracy --quick --output-dir /tmp/sta

Run from the repository root.
"""
import os

# Read once, when Keras and TensorFlow start: set before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX by default: on this 2-core CPU it trains these small networks fastest (BN-Inception 29 ms per
# step vs TensorFlow's 40-52 ms, the MLP 0.4 ms vs 3-5 ms). KERAS_BACKEND=tensorflow also works.
os.environ.setdefault("KERAS_BACKEND", "jax")

import contextlib
import platform
import shutil
import tempfile
import time

from examples import cli, devices, protocol, reporting, training, variants
from examples.data import load_dataset

# Budgets long enough for each baseline to plateau on digits (see the README's measurements).
# BN-Baseline keeps the baseline's learning rate and decay, so it gets the baseline's budget; the
# BN-x variants decay 6x faster and are done long before.
NETWORKS = {
    "mlp": dict(batch_size=60, steps=3000, learning_rate=0.1,
                variant_steps={"BN-Baseline": 3000, "BN-x5": 1000, "BN-x30": 1000}),
    "inception": dict(batch_size=32, steps=1000, learning_rate=0.01,
                      variant_steps={"BN-Baseline": 1000, "BN-x5": 500, "BN-x30": 500}),
}
NETWORK_TITLES = {"mlp": "Figure 1 network (3 x Dense(100, sigmoid))",
                  "inception": "Small BN-Inception"}
QUICK = {
    "mlp": dict(batch_size=60, steps=30, variant_steps=20, learning_rate=0.1),
    "inception": dict(batch_size=32, steps=6, variant_steps=4, learning_rate=0.01),
}


@contextlib.contextmanager
def _jax_compilation_cache(enabled=True):
    """On JAX, a fresh persistent compilation cache for the block: the 3 seeds of a variant share
    their compiled train, predict and population steps (identical programs), which saves minutes.
    The folder is removed and the cache switched off afterwards. Other backends: no-op."""
    import keras

    if not enabled or keras.backend.backend() != "jax":
        yield
        return
    import jax

    folder = tempfile.mkdtemp(prefix="keras_bn_jax_cache_")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        shutil.rmtree(folder, ignore_errors=True)


def run_network(family, args, seeds):
    """The protocol for one network family; writes its plot and JSON and returns the result."""
    s = (QUICK if args.quick else NETWORKS)[family]
    data = load_dataset(args.data, flatten=family == "mlp")
    if args.quick:
        data.x_train, data.y_train = data.x_train[:240], data.y_train[:240]
    config = training.Config(
        family=family,
        learning_rate=s["learning_rate"],
        batch_size=s["batch_size"],
        steps=s["steps"],
        eval_every=max(1, s["steps"] // (5 if args.quick else 100)),
        alpha=args.alpha,
        statistics=args.statistics,
        population_batches=args.population_batches,
        data_parallel=args.data_parallel,
        run_eagerly=training.quick_runs_eagerly(args.quick),
        final_population=not args.quick,
    )
    with devices.data_parallel_scope(args.data_parallel):
        result = protocol.steps_to_accuracy(
            data,
            config,
            seeds=seeds,
            variants=args.variants or (variants.BASELINE[family], "BN-Baseline", "BN-x5",
                                       "BN-x30"),
            # quick: code paths only, no grid
            grid=protocol.LearningRateGrid(max_rates=1 if args.quick else 8),
            variant_steps=s["variant_steps"],
            verbose=args.verbose,
        )
    stem = f"{family}_{data.name}"
    reporting.plot_accuracy_curves(
        result, os.path.join(args.output_dir, f"figure2_{stem}.png"),
        f"{NETWORK_TITLES[family]} on {data.name}: median of {len(seeds)} seeds",
    )
    reporting.write_json(os.path.join(args.output_dir, f"steps_to_accuracy_{stem}.json"), result)
    return result


def main(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--alpha", type=float, default=0.125, help="BN-Inception's width")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="variants (default: the baseline - 'Inception' or 'Baseline' for the "
                             "MNIST network - BN-Baseline, BN-x5, BN-x30; BN-x5-Sigmoid is in "
                             "examples.train_inception)")
    args = parser.parse_args(argv)
    cli.apply_runtime_options(args)
    seeds = args.seeds or [0, 1, 2]
    results, tables = {}, []
    start = time.perf_counter()
    with _jax_compilation_cache(enabled=not args.quick):
        for family in args.networks:
            result = run_network(family, args, seeds)
            results[family] = reporting.without_histories(result)
            tables.append(reporting.steps_table(result))
    import keras

    payload = {
        "protocol": "Figure 3: baseline lr = best of an upward-extending grid; baseline budget "
        "fixed; target = baseline's best test accuracy per seed; steps of first evaluation >= "
        "target",
        "backend": keras.backend.backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared while measured)",
        "total_seconds": time.perf_counter() - start,
        "networks": results,
    }
    reporting.write_json(os.path.join(args.output_dir, "steps_to_accuracy.json"), payload)
    text = "\n".join(tables) + f"\nTotal time: {payload['total_seconds'] / 60:.1f} min\n"
    reporting.write_text(os.path.join(args.output_dir, "steps_to_accuracy.md"), text)
    print(text)
    return payload


if __name__ == "__main__":
    cli.run_main(main)
