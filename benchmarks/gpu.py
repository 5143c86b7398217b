"""BN-Inception on an accelerator: training throughput at the paper's scale, and Figure 3 larger.

Two parts, each merged into `--output-dir`/gpu.json under its own key:

    throughput  images/s of BN-Inception training steps (alpha 1, 224x224x3, 1000 classes,
                synthetic data, model.fit), with our BN layer and with
                keras.layers.BatchNormalization in the same process, in float32 and
                mixed_bfloat16. Medians of --repeats epochs of --steps batches after a warm-up
                epoch that compiles.
    figure3     the Figure 3 protocol of examples.train_inception (baseline lr grid, baseline's
                best accuracy as the target, every variant's steps to reach it) on digits upscaled
                to --image-size, at --alpha; its JSON, PNG and markdown go to --output-dir too.
                Every other option goes to examples.train_inception (see its --help):
                --seeds, --variants, --variant-steps, --checkpoint, --quick, --verbose...

Meant for KERAS_BACKEND=jax on a GPU (it runs anywhere, slowly); run from the repository root:

    KERAS_BACKEND=jax python -m benchmarks.gpu throughput --output-dir /tmp/gpu
    KERAS_BACKEND=jax python -m benchmarks.gpu figure3 --output-dir /tmp/gpu --alpha 0.25 \
        --checkpoint /tmp/gpu/figure3_runs.json     # rerun the same line to resume

Across processes (JAX only: one per host), both parts take `--num-processes N --process-id I
--coordinator HOST:PORT`, each falling back to Keras's KERAS_DISTRIBUTION_NUM_PROCESSES,
KERAS_DISTRIBUTION_PROCESS_ID and KERAS_DISTRIBUTION_JOB_ADDRESSES (see examples/cli.py), and
every process runs the same command. throughput then trains under
keras.distribution.DataParallel over the devices of all processes (one process trains on one
device, without a distribution), each process feeding its share
of every global batch of --batch-size (which N must divide), and reports global images/s (global
batch x steps / process 0's median epoch seconds); figure3 passes the options on to
examples.train_inception, which refuses --checkpoint across processes. Process 0 alone prints and
writes gpu.json. N local processes (CPU devices unless JAX_PLATFORMS says otherwise):

    python -m examples.launch --num-processes 2 -- \
        .venv/bin/python -m benchmarks.gpu throughput --output-dir /tmp/gpu

On several hosts, run the command itself on each, with process 0's reachable address and each
host's index (a host with several GPUs is one process that uses them all):

    KERAS_BACKEND=jax python -m benchmarks.gpu throughput --output-dir /tmp/gpu \
        --num-processes 2 --process-id 0 --coordinator 10.0.0.1:12355   # --process-id 1 on host 2
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
from examples import cli, devices, models, reporting, training

LAYERS = {"keras_bn": keras_bn.BatchNormalization, "keras": keras.layers.BatchNormalization}


class _SameBatch(keras.utils.PyDataset):
    """`steps` copies of one synthetic batch: the input pipeline costs nothing but the copy."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.x, self.y, self.steps = x, y, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.x, self.y


def device_description():
    return {"backend": keras.backend.backend(), "devices": devices.local_devices(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "keras": keras.__version__}


def throughput(args):
    """Images/s of BN-Inception training with each BN layer and precision policy.

    Across processes, each process feeds `fit` its share of every global batch of
    `args.batch_size` under `keras.distribution.DataParallel`; the images/s are global."""
    processes, process_id = devices.process_count(), devices.process_index()
    report = process_id == 0  # process 0 prints for all
    size, batch = args.image_size, args.batch_size
    local_batch = training.local_batch_size(batch, processes)
    # Synthetic data: each process its own share (one process: the whole batch, seed 0).
    rng = np.random.default_rng(process_id)
    x = rng.standard_normal((local_batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 1000, local_batch).astype("int32")
    rows, parameters = [], None
    for policy in args.policies:
        for name in args.layers:
            keras.backend.clear_session()  # resets the global policy too: set it afterwards
            keras.mixed_precision.set_global_policy(policy)
            # One process trains on one device, as it always has; several share every batch.
            with devices.data_parallel_scope(processes > 1):
                keras.utils.set_random_seed(0)  # across processes: the same initial weights
                model = models.bn_inception(input_shape=(size, size, 3), classes=1000,
                                            alpha=args.alpha, bn_layer=LAYERS[name])
                model.compile(optimizer=keras.optimizers.SGD(0.045, momentum=0.9),
                              loss="sparse_categorical_crossentropy")
                parameters = model.count_params()
                start = time.perf_counter()
                model.fit(_SameBatch(x, y, 3), epochs=1, verbose=0)  # compiles
                compile_seconds = time.perf_counter() - start
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    model.fit(_SameBatch(x, y, args.steps), epochs=1, verbose=0)
                    seconds.append(time.perf_counter() - start)
            row = {
                "policy": policy,
                "layer": name,
                "batch_size": batch,
                "images_per_second": batch * args.steps / statistics.median(seconds),
                "ms_per_step": 1000 * statistics.median(seconds) / args.steps,
                "first_epoch_seconds": compile_seconds,
            }
            rows.append(row)
            if report:
                print(f"{policy:15} {name:9} {row['images_per_second']:8.0f} images/s "
                      f"({row['ms_per_step']:.1f} ms/step, first epoch {compile_seconds:.0f} s)",
                      flush=True)
            del model
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    for policy in args.policies:
        by_layer = {r["layer"]: r["images_per_second"] for r in rows if r["policy"] == policy}
        if len(by_layer) == 2 and report:
            print(f"{policy}: keras_bn / keras = {by_layer['keras_bn'] / by_layer['keras']:.2f}x")
    return {
        "model": f"bn_inception(alpha={args.alpha}, input {size}x{size}x3, 1000 classes), "
        "SGD momentum 0.9, synthetic data, model.fit",
        "parameters": parameters,
        "processes": processes,
        "batch_size_per_process": local_batch,
        "steps_per_epoch": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }


def figure3(args, train_inception_args):
    """The Figure 3 protocol of examples.train_inception at a larger scale; the options this
    script does not know (--seeds, --variants, --checkpoint, --quick...) go to train_inception,
    and so do the process options given on this command line."""
    from examples import train_inception

    argv = ["--output-dir", args.output_dir, "--alpha", str(args.alpha),
            "--image-size", str(args.image_size), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), *train_inception_args]
    # The process options given here (train_inception reads the environment for the others).
    for option, value in (("--num-processes", args.num_processes),
                          ("--process-id", args.process_id),
                          ("--coordinator", args.coordinator)):
        if value is not None:
            argv += [option, str(value)]
    start = time.perf_counter()
    result = train_inception.main(argv)
    summary = reporting.without_histories(result)
    return {
        "data": f"digits upscaled to {args.image_size}x{args.image_size}",
        "alpha": args.alpha,
        "baseline_steps": args.steps,
        "seconds_this_invocation": time.perf_counter() - start,  # a resumed run reads others back
        "learning_rate_grid": summary["learning_rate_grid"],
        "targets": summary["targets"],
        "variants": summary["variants"],
    }


def join_processes(args):
    """Join the run of `args.num_processes` processes (the command line's or Keras's
    KERAS_DISTRIBUTION_* variables'); one process: nothing to join. Off JAX, several processes
    are `devices.initialize_processes`'s one-line error."""
    cli.resolve_process_options(args)
    training.local_batch_size(args.batch_size, args.num_processes)  # fails before joining
    devices.initialize_processes(args.coordinator, args.num_processes, args.process_id)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("throughput", "figure3"))
    parser.add_argument("--output-dir", default=cli.DEFAULT_RESULTS)
    parser.add_argument("--alpha", type=float, default=None,
                        help="width multiplier (default: 1 for throughput, 0.25 for figure3)")
    parser.add_argument("--image-size", type=cli.positive_int, default=None,
                        help="default: 224 for throughput, 32 for figure3")
    parser.add_argument("--batch-size", type=cli.positive_int, default=None,
                        help="default: 128 for throughput, the paper's 32 for figure3")
    parser.add_argument("--steps", type=cli.positive_int, default=None,
                        help="throughput: batches per timed epoch (default 20); figure3: the "
                             "baseline's budget (default 1500)")
    parser.add_argument("--repeats", type=cli.positive_int, default=5,
                        help="throughput: timed epochs")
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    cli.add_process_arguments(parser)
    args, train_inception_args = parser.parse_known_args(argv)
    if args.part == "throughput" and train_inception_args:
        parser.error(f"unrecognized arguments: {' '.join(train_inception_args)}")
    defaults = {"throughput": (1.0, 224, 128, 20), "figure3": (0.25, 32, 32, 1500)}[args.part]
    args.alpha = args.alpha or defaults[0]
    args.image_size = args.image_size or defaults[1]
    args.batch_size = args.batch_size or defaults[2]
    args.steps = args.steps or defaults[3]
    if args.part == "throughput":
        join_processes(argparse.Namespace(**vars(args)))
    os.makedirs(args.output_dir, exist_ok=True)
    result = throughput(args) if args.part == "throughput" else figure3(args, train_inception_args)
    result = {**device_description(), **result}
    if devices.process_index() != 0:  # process 0 writes for all
        return {args.part: result}
    path = reporting.merge_json(os.path.join(args.output_dir, "gpu.json"), args.part, result)
    print(f"wrote {path}")
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    cli.run_main(main)
