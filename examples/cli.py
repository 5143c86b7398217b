"""Command-line options that every experiment script shares, and the runtime setup they select."""
import argparse
import os
import sys

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "benchmarks", "results")


def add_common_arguments(parser):
    parser.add_argument("--data", default="digits",
                        help="'digits' (scikit-learn, default), 'fashion-mnist' (Debian's "
                             "dataset-fashion-mnist or $KERAS_BN_DATA), a folder of MNIST-format "
                             "IDX files, an MNIST .npz, a CIFAR-10 python batch folder or an "
                             "ImageNet-style folder (train/, val/)")
    parser.add_argument("--output-dir", default=DEFAULT_RESULTS,
                        help="where JSON, PNG and markdown results go "
                             "(default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps of everything, for tests and smoke checks")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="random seeds")
    parser.add_argument("--statistics", choices=("population", "moving"), default="population",
                        help="evaluate BN with exact population statistics (Algorithm 2) or the "
                             "moving averages")
    parser.add_argument("--population-batches", type=positive_int, default=None,
                        help="training batches (the first N) of each population estimate "
                             "(default: all)")
    parser.add_argument("--mixed-precision", choices=("mixed_float16", "mixed_bfloat16"),
                        default=None, help="Keras mixed-precision policy")
    parser.add_argument("--data-parallel", action="store_true",
                        help="data parallelism over all local devices (tf.distribute."
                             "MirroredStrategy with synchronized BN on TensorFlow, "
                             "keras.distribution.DataParallel on JAX)")
    parser.add_argument("--cpu-devices", type=positive_int, default=None,
                        help="TensorFlow: split the CPU into this many logical devices, to try "
                             "--data-parallel without accelerators (on JAX set XLA_FLAGS="
                             "--xla_force_host_platform_device_count=N instead)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1),
                        help="1 shows progress bars")
    return parser


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def add_process_arguments(parser):
    """Options that place this process in a multi-process run (JAX only): each falls back to
    Keras's environment variable, so a launcher or a cluster scheduler can set either."""
    parser.add_argument("--num-processes", type=positive_int, default=None,
                        help="processes in the run, one per host (JAX; default: "
                             "$KERAS_DISTRIBUTION_NUM_PROCESSES or 1); implies --data-parallel")
    parser.add_argument("--process-id", type=int, default=None,
                        help="this process's index, 0 to N - 1 (default: "
                             "$KERAS_DISTRIBUTION_PROCESS_ID or 0); process 0 writes the results")
    parser.add_argument("--coordinator", default=None,
                        help="host:port of process 0, which every process must reach (default: "
                             "the first of $KERAS_DISTRIBUTION_JOB_ADDRESSES)")
    return parser


def resolve_process_options(args):
    """Fill `args.num_processes`, `args.process_id` and `args.coordinator` from the environment
    where the command line left them out."""
    environ = os.environ
    if getattr(args, "num_processes", None) is None:
        args.num_processes = _environment_int("KERAS_DISTRIBUTION_NUM_PROCESSES", 1)
    if getattr(args, "process_id", None) is None:
        args.process_id = _environment_int("KERAS_DISTRIBUTION_PROCESS_ID", 0)
    if getattr(args, "coordinator", None) is None:
        addresses = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
        args.coordinator = addresses.split(",")[0].strip() or None
    return args


def _environment_int(name, default):
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer. Received: {value!r}") from None


def apply_runtime_options(args):
    """Join the processes of a multi-process run (where the parser has `add_process_arguments`),
    set the logical CPU devices and the mixed-precision policy (before any model is built)."""
    import keras

    if hasattr(args, "num_processes"):
        from examples import devices

        resolve_process_options(args)
        devices.initialize_processes(args.coordinator, args.num_processes, args.process_id)
        if args.num_processes > 1:
            args.data_parallel = True  # processes train together only under DataParallel
            if args.process_id != 0:
                args.verbose = 0  # process 0 reports for all

    if args.cpu_devices:
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "--cpu-devices configures TensorFlow's logical devices; on JAX set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N. "
                f"Received: backend {keras.backend.backend()!r}"
            )
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpu_devices
        )
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(args.mixed_precision)


def run_main(main):
    """Run `main()`; a user's mistake (ValueError/TypeError) becomes one line on stderr, exit 2."""
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def make_parser(description):
    return add_common_arguments(
        argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    )
