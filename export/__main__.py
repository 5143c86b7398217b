"""keras-bn-export: a .keras model in, a verified ONNX graph out.

    keras-bn-export MODEL.keras -o MODEL.onnx [--opset 17] [--channels-first] [--float16-weights]
    keras-bn-export --version

Prints a short summary on success. A user's mistake (missing or foreign file, unsupported model,
unwritable output, outputs that onnxruntime does not reproduce) gives one line on stderr, no
traceback, no output file, and exit status 2 (1 for a failed verification). Options and paths are
checked before TensorFlow is imported, so such mistakes are reported at once.
"""

import argparse
import contextlib
import importlib.metadata
import logging
import math
import os
import sys
import warnings

PROG = "keras-bn-export"
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
# The opsets tf2onnx 1.17 writes, as in export.onnx_export, which cannot be imported before the
# backend is chosen (it imports Keras); tests/export/test_export_cli.py keeps the two equal.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 13, 18, 17


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {PROG} --help)\n")


class _Version(argparse.Action):
    """`--version`: looked up only when asked, from the installed package's metadata."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{PROG} {version()}")
        parser.exit(0)


def version():
    """keras-bn's version, read from the installed package's metadata without importing Keras."""
    try:
        return importlib.metadata.version("keras-bn")
    except importlib.metadata.PackageNotFoundError:  # a source tree run as `python -m export`
        import keras_bn

        return keras_bn.__version__


def _names(text):
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected unique names, got {text!r}")
    return names


def _sizes(text):
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    # Two different sizes are what shows that the exported batch dimension is dynamic.
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two different positive batch sizes, got {text!r}")
    return sizes


def _opset(text):
    try:
        opset = int(text)
    except ValueError:
        opset = None
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise argparse.ArgumentTypeError(
            f"expected an integer from {MIN_OPSET} to {MAX_OPSET}, got {text!r}")
    return opset


def _tolerance(text):
    try:
        tolerance = float(text)
    except ValueError:
        tolerance = math.nan
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return tolerance


def build_parser():
    parser = _Parser(
        prog=PROG,
        description="Freeze a Keras model's Batch Normalization (fold into the preceding layer, "
        "constants for the rest), convert it to ONNX with tf2onnx, and verify it with "
        "onnxruntime against Keras before writing the file.",
    )
    parser.add_argument("model", help="the .keras file (saved under any Keras backend)")
    parser.add_argument("-o", "--output", help="the .onnx file to write "
                        "(default: MODEL with .onnx in place of .keras)")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("--opset", type=_opset, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--input-names", type=_names, metavar="A,B",
                        help="graph input names, one per model input (default: the Keras names)")
    parser.add_argument("--output-names", type=_names, metavar="A,B",
                        help="graph output names, one per model output (default: the Keras names)")
    parser.add_argument("--channels-first", action="store_true",
                        help="take rank-4 (image) inputs as NCHW instead of the model's NHWC")
    parser.add_argument("--float16-weights", action="store_true",
                        help="store weights as float16 (half the file); arithmetic stays float32")
    parser.add_argument("--no-fold", action="store_true",
                        help="do not fold BN into the preceding layer; freeze every BN to Mul+Add")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime check against Keras (not recommended)")
    parser.add_argument("--batch-sizes", type=_sizes, default=(1, 3), metavar="1,3",
                        help="batch sizes verified (default 1,3)")
    parser.add_argument("--tolerance", type=_tolerance,
                        help="largest accepted relative error (default: 1e-3 for float32, 1e-2 for float16 or --float16-weights, 5e-2 for bfloat16)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each step, and show a traceback on internal errors")
    return parser


@contextlib.contextmanager
def _native_stderr_silenced(enabled):
    """Hide what TensorFlow's C++ runtime writes to file descriptor 2 while it loads.

    TensorFlow 2.21 logs CPU-feature and CUDA notices through absl before TF_CPP_MIN_LOG_LEVEL is
    read; they would bury the one line this command promises on failure.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _check_paths(model, output):
    """What makes `model` unreadable or `output` unwritable, or None: the checks of
    `export.to_onnx` and `export.load_model`, made before TensorFlow is imported."""
    if not os.path.exists(model):
        return f"no such model file: {model}"
    if os.path.isdir(model) or not model.endswith(".keras"):
        return (f"expected a Keras 3 model file ending in .keras. Received: {model} (SavedModel "
                "folders and legacy .h5 files are not supported: load them and call "
                "model.save('model.keras') first)")
    if not os.access(model, os.R_OK):
        return f"cannot read {model}: permission denied"
    target = os.path.abspath(output)
    folder = os.path.dirname(target)
    if os.path.realpath(target) == os.path.realpath(model):
        return f"the output path is the model file itself: {target}"
    if os.path.isdir(target):
        return f"cannot write {target}: it is a directory"
    if not os.path.isdir(folder):
        return f"cannot write {target}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {target}: no permission to write in {folder}"
    return None


def _fail(message, status=EXIT_USAGE):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    output = args.output
    if output is None:
        output = args.model.removesuffix(".keras") + ".onnx"
    problem = _check_paths(args.model, output)
    if problem:
        return _fail(problem)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    already = sys.modules.get("keras")
    if already is None:
        os.environ["KERAS_BACKEND"] = "tensorflow"  # tf2onnx needs it, whatever the model's origin
    elif already.backend.backend() != "tensorflow":
        return _fail(f"Keras is already running on the '{already.backend.backend()}' backend "
                     "in this process; export needs TensorFlow (run the command in a new process)")

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    for name in ("tf2onnx", "tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    if not args.verbose:
        warnings.simplefilter("ignore")

    with _native_stderr_silenced(not args.verbose):
        from export.onnx_export import VerificationError, to_onnx

    try:
        with _native_stderr_silenced(not args.verbose):
            result = to_onnx(
                args.model, output, opset=args.opset, input_names=args.input_names,
                output_names=args.output_names, channels_first=args.channels_first,
                float16_weights=args.float16_weights, fold=not args.no_fold,
                verify=not args.no_verify, batch_sizes=args.batch_sizes,
                tolerance=args.tolerance,
            )
    except VerificationError as error:
        return _fail(f"verification failed: {error}", EXIT_VERIFICATION_FAILED)
    except FileNotFoundError as error:
        return _fail(error)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        return _fail(error)
    except KeyboardInterrupt:
        return _fail("interrupted; no file was written", 130)
    except Exception as error:  # a bug of ours or of a library: still one line, unless --verbose
        if args.verbose:
            raise
        return _fail(f"unexpected {type(error).__name__} while exporting {args.model}: {error} "
                     f"(rerun with --verbose for the traceback; no file was written)", 1)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
