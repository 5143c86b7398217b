"""keras-bn-export: a .keras model in, a verified ONNX graph out.

    keras-bn-export MODEL.keras -o MODEL.onnx [--opset 17] [--channels-first] [--float16-weights]

Prints a short summary on success. A user's mistake (missing or foreign file, unsupported model,
unwritable output, outputs that onnxruntime does not reproduce) gives one line on stderr, no
traceback, no output file, and exit status 2 (1 for a failed verification).
"""

import argparse
import contextlib
import logging
import os
import sys
import warnings

PROG = "keras-bn-export"
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _names(text):
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _sizes(text):
    try:
        return tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


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
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 18 (default 17)")
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
    parser.add_argument("--tolerance", type=float,
                        help="largest accepted relative error (default 1e-4, 1e-2 with float16)")
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


def _fail(message, status=EXIT_USAGE):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
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

    output = args.output
    if output is None:
        stem = args.model[:-len(".keras")] if args.model.endswith(".keras") else args.model
        output = stem + ".onnx"

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
