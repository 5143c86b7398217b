"""Command-line options that every experiment script shares, and the runtime setup they select."""
import argparse
import os
import sys

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "benchmarks", "results")


def add_common_arguments(parser):
    parser.add_argument("--data", default="digits",
                        help="'digits' (scikit-learn, default), an MNIST .npz, a CIFAR-10 python "
                             "batch folder or an ImageNet-style folder (train/, val/)")
    parser.add_argument("--output-dir", default=DEFAULT_RESULTS,
                        help="where JSON, PNG and markdown results go "
                             "(default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps of everything, for tests and smoke checks")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="random seeds")
    parser.add_argument("--statistics", choices=("population", "moving"), default="population",
                        help="evaluate BN with exact population statistics (Algorithm 2) or the "
                             "moving averages")
    parser.add_argument("--mixed-precision", choices=("mixed_float16", "mixed_bfloat16"),
                        default=None, help="Keras mixed-precision policy")
    parser.add_argument("--data-parallel", action="store_true",
                        help="data parallelism over all local devices (tf.distribute."
                             "MirroredStrategy with synchronized BN on TensorFlow, "
                             "keras.distribution.DataParallel on JAX)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="TensorFlow: split the CPU into this many logical devices, to try "
                             "--data-parallel without accelerators (on JAX set XLA_FLAGS="
                             "--xla_force_host_platform_device_count=N instead)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1),
                        help="1 shows progress bars")
    return parser


def apply_runtime_options(args):
    """Set the logical CPU devices and the mixed-precision policy (before any model is built)."""
    import keras

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
