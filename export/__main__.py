"""keras-bn-export: a .keras model in, a verified ONNX graph out, float32 or int8.

    keras-bn-export MODEL.keras -o MODEL.onnx [--opset 17] [--channels-first] [--float16-weights]
    keras-bn-export MODEL.keras -o MODEL.int8.onnx --int8 --calibration DATA [--validation DATA]
    keras-bn-export MODEL.keras -o MODEL.int8.onnx --int8 --target tensorrt --calibration DATA
    keras-bn-export MODEL.keras -o MODEL.onnx --import my_package.layers [--unsafe]
    keras-bn-export --check MODEL.int8.onnx
    keras-bn-export --version

DATA is a `.npy` file (one array of inputs) or a `.npz` file (arrays named after the model's
inputs, or a single array of inputs; labels in an array named `y` or `labels`).

Prints a short summary on success. A user's mistake (missing or foreign file, unsupported model,
unwritable output, bad calibration data, outputs that onnxruntime does not reproduce) gives one
line on stderr, no traceback, no output file, and exit status 2 (1 for a failed verification or
int8 guard). Options, paths and data files are checked before TensorFlow is imported, so such
mistakes are reported at once; only the data's shapes wait for the model.
"""

import argparse
import contextlib
import importlib
import importlib.metadata
import logging
import math
import os
import sys
import warnings
import zipfile

import numpy as np

PROG = "keras-bn-export"
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
# The opsets tf2onnx 1.17 writes, as in export.onnx_export, which cannot be imported before the
# backend is chosen (it imports Keras); tests/export/test_export_cli.py keeps the two equal.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 13, 18, 17
# export.onnx_export.DEFAULT_DYNAMIC_SIZES and export.quantization's defaults, kept equal by the
# same test.
DEFAULT_DYNAMIC_SIZES = (32, 64)
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
# export.targets.TARGETS and its default, kept equal by tests/export/test_export_cli.py.
TARGETS = ("cpu", "cpu-vnni", "tensorrt")
DEFAULT_TARGET = "cpu"
OPENVINO_CHOICES = {"auto": "auto", "require": True, "skip": False}
DEFAULT_CALIBRATION_BATCHES = 16
DEFAULT_MIN_AGREEMENT = 0.99
# How a .npy file begins (numpy.lib.format.MAGIC_PREFIX); a .npz file is a zip archive.
NUMPY_MAGIC = b"\x93NUMPY"
# Names of the labels array in a .npz data file; every other array holds inputs.
LABEL_NAMES = ("y", "labels")
DATA_HELP = (
    "DATA is a .npy file holding one array of inputs (batch first, channels last), or a .npz "
    "file holding one array per model input, named after the graph inputs (--input-names, "
    "else the Keras input names), or a single array for a one-input model; an array named "
    f"{' or '.join(LABEL_NAMES)} holds labels (class ids or one-hot rows), which give the "
    "float and int8 accuracies. Arrays must be numeric, finite and non-empty."
)


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
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    # Two different sizes are what shows that the exported dimensions are dynamic.
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two different positive sizes, got {text!r}")
    return sizes


def _positive_integer(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


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
    parser.add_argument("model", nargs="?",
                        help="the .keras file (saved under any Keras backend)")
    parser.add_argument("--check", metavar="FILE.onnx",
                        help="check an int8 ONNX file instead of exporting: its target (from its "
                        "metadata) and rules, and onnxruntime and OpenVINO on this CPU against "
                        "its exact meaning, on random inputs")
    parser.add_argument("-o", "--output", help="the .onnx file to write "
                        "(default: MODEL with .onnx in place of .keras)")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                        default=[],
                        help="import MODULE (from the current folder or an installed package) "
                        "before loading the model, so that the custom layers or model class it "
                        "registers (@keras.saving.register_keras_serializable) are known; "
                        "repeatable")
    parser.add_argument("--unsafe", action="store_true",
                        help="load with Keras's safe_mode=False, which a Lambda layer's Python "
                        "function needs: its code is stored in the file and runs, so only for "
                        "files you trust")
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
    parser.add_argument("--dynamic-sizes", type=_sizes, default=DEFAULT_DYNAMIC_SIZES,
                        metavar="32,64",
                        help="sizes verified for input dimensions the model leaves unknown, "
                        "such as the height and width of keras.Input((None, None, 3)), paired "
                        "with the batch sizes (default 32,64)")
    parser.add_argument("--tolerance", type=_tolerance,
                        help="largest accepted relative error (default: 1e-3 for float32, "
                        "1e-2 for float16 or --float16-weights, 5e-2 for bfloat16)")
    int8 = parser.add_argument_group(
        "int8", "Quantize the verified float graph with onnxruntime (static, QDQ, int8 weights per "
        "output channel) and write only the int8 graph, once its top-1 agreement with the float "
        "graph passes --min-agreement. " + DATA_HELP)
    int8.add_argument("--int8", action="store_true",
                      help="write an int8 graph (default output: MODEL.int8.onnx); needs "
                      "--calibration")
    int8.add_argument("--calibration", metavar="DATA",
                      help="inputs the int8 ranges are calibrated on (a few hundred, like "
                      "those the deployed model will see)")
    int8.add_argument("--validation", metavar="DATA",
                      help="inputs (and labels) the int8 graph is compared with the float graph "
                      "on (default: the calibration data, an optimistic figure); without --int8, "
                      "inputs a QAT model's export is also verified on")
    int8.add_argument("--calibration-method", choices=CALIBRATION_METHODS,
                      help="how activation ranges are chosen (default minmax)")
    int8.add_argument("--calibration-batches", type=_positive_integer, metavar="N",
                      help=f"the most calibration batches of 32 read (default "
                      f"{DEFAULT_CALIBRATION_BATCHES})")
    int8.add_argument("--min-agreement", type=_fraction, metavar="F",
                      help="the guard: the fraction of examples whose top-1 class must match the "
                      f"float graph's (default {DEFAULT_MIN_AGREEMENT}; 0 turns it off)")
    int8.add_argument("--target", choices=TARGETS,
                      help="where the int8 file will run: cpu (default; every x86-64 CPU with or "
                      "without VNNI, ARM, OpenVINO), cpu-vnni (full 8-bit weights; wrong in "
                      "onnxruntime on x86 CPUs without VNNI), tensorrt (symmetric int8). A QAT "
                      "model exports for the target it trained on")
    parser.add_argument("--openvino", choices=tuple(OPENVINO_CHOICES), default="auto",
                        help="also run the file in OpenVINO: when installed (auto, default), "
                        "always (require), never (skip)")
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
    if not zipfile.is_zipfile(model):
        return (f"could not load {model}: it is not a Keras 3 model file, which is a zip archive "
                "(model.save('model.keras') writes one)")
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
    if not output.endswith(".onnx"):
        return f"the output path must end in .onnx. Received: {output}"
    return None


def _check_int8_options(parser, args):
    """Exits with a usage error for int8 options that do not go together."""
    int8_only = [option for option, value in (
        ("--calibration", args.calibration),
        ("--calibration-method", args.calibration_method),
        ("--calibration-batches", args.calibration_batches),
        ("--min-agreement", args.min_agreement)) if value is not None]
    if not args.int8:
        if int8_only:
            verb = "goes" if len(int8_only) == 1 else "go"
            parser.error(f"{', '.join(int8_only)} only {verb} with --int8")
        return
    if args.calibration is None:
        parser.error("--int8 needs --calibration DATA, the inputs the int8 ranges are "
                     "calibrated on (a .npy or .npz file)")
    if args.float16_weights:
        parser.error("--float16-weights does not go with --int8: int8 weights are smaller still")


def load_data(path, option):
    """`(inputs, labels)` from a .npy or .npz data file, checked for what can be checked without
    the model: an array or a dict of arrays, and the labels array or None.

    Raises:
        ValueError: naming the option and the file: missing, not .npy/.npz, unreadable, empty,
            non-numeric, NaN or infinite, or arrays of different lengths.
    """
    where = f"{option} {path}"
    if not os.path.exists(path):
        raise ValueError(f"{where}: no such file")
    if os.path.isdir(path) or not path.endswith((".npy", ".npz")):
        raise ValueError(f"{where}: expected a .npy file (one array of inputs) or a .npz file "
                         "(arrays named after the model's inputs, labels named "
                         f"{' or '.join(LABEL_NAMES)})")
    try:
        with open(path, "rb") as file:
            magic = file.read(len(NUMPY_MAGIC))
    except OSError as error:
        raise ValueError(f"{where}: cannot be read ({_words(error)})") from None
    # np.load takes any other file for a pickle; a text or CSV file renamed .npy is neither.
    if magic != NUMPY_MAGIC and not zipfile.is_zipfile(path):
        raise ValueError(f"{where}: is not a NumPy file (a .npy file starts with "
                         f"{NUMPY_MAGIC!r}, a .npz file is a zip archive); save arrays with "
                         "numpy.save or numpy.savez")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:  # an archive: its arrays are read here, and it is closed
                arrays = {name: loaded[name] for name in loaded.files}
        else:
            arrays = None
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(f"{where}: holds Python objects (a pickle), not numeric arrays; "
                             "save numbers with numpy.save or numpy.savez") from None
        raise ValueError(f"{where}: cannot be read as a NumPy file ({_words(error)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{where}: cannot be read as a NumPy file ({_words(error)})") from None
    if arrays is None:
        _check_numbers(loaded, where)
        return loaded, None
    if not arrays:
        raise ValueError(f"{where}: the .npz file holds no arrays")
    found = [name for name in LABEL_NAMES if name in arrays]
    if len(found) > 1:
        raise ValueError(f"{where}: labels under both {found[0]!r} and {found[1]!r}; keep one")
    labels = arrays.pop(found[0]) if found else None
    if not arrays:
        raise ValueError(f"{where}: the .npz file holds labels ({found[0]!r}) but no inputs")
    for name, array in arrays.items():
        _check_numbers(array, f"{where}, array {name!r}")
    lengths = {name: array.shape[0] for name, array in arrays.items()}
    if labels is not None:
        _check_numbers(labels, f"{where}, labels {found[0]!r}")
        lengths[found[0]] = labels.shape[0]
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: arrays of different lengths {lengths}; one row per example")
    inputs = next(iter(arrays.values())) if len(arrays) == 1 else arrays
    return inputs, labels


def _check_numbers(array, what):
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{what}: holds {array.dtype} values; expected numbers (bool, integer "
                         "or float)")
    if array.ndim == 0:
        raise ValueError(f"{what}: holds a single number; expected an array with one row per "
                         "example")
    if array.size == 0:
        raise ValueError(f"{what}: is empty (shape {array.shape}); expected at least one example")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            nans = int(np.isnan(array).sum())
            infinite = finite.size - int(finite.sum()) - nans
            raise ValueError(f"{what}: holds {nans} NaN and {infinite} infinite values (shape "
                             f"{array.shape}); expected finite numbers")


def _words(error):
    return " ".join(str(error).split())


def _as_data(inputs, labels, batch_size=32):
    """What `to_onnx` takes: the inputs, or `(x, y)`; a dict of inputs with labels goes as a list
    of `(x, y)` batches, since a tuple of a dict and an array is not array data."""
    if labels is None:
        return inputs
    if not isinstance(inputs, dict):
        return inputs, labels
    return [({name: array[start:start + batch_size] for name, array in inputs.items()},
             labels[start:start + batch_size]) for start in range(0, len(labels), batch_size)]


def _fail(message, status=EXIT_USAGE):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def main(argv=None):
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is not None:
        return _check_file(parser, args)
    if args.model is None:
        parser.error("the following arguments are required: model (or --check FILE.onnx)")
    _check_int8_options(parser, args)
    output = args.output
    if output is None:
        output = args.model.removesuffix(".keras") + (".int8.onnx" if args.int8 else ".onnx")
    problem = _check_paths(args.model, output)
    if problem:
        return _fail(problem)
    data = {}
    try:
        if args.int8:
            data["calibration_data"] = _as_data(*load_data(args.calibration, "--calibration"))
        if args.validation is not None:
            data["validation_data"] = _as_data(*load_data(args.validation, "--validation"))
    except ValueError as error:
        return _fail(error)
    if args.int8:
        data.update(
            quantize="int8",
            calibration_method=args.calibration_method or "minmax",
            calibration_batches=args.calibration_batches or DEFAULT_CALIBRATION_BATCHES,
            min_agreement=(DEFAULT_MIN_AGREEMENT if args.min_agreement is None
                           else args.min_agreement),
            # A progress bar is for a person watching; piped output holds the summary alone.
            verbose=1 if args.verbose or sys.stdout.isatty() else 0,
        )

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
        from export.loading import load_model
        from export.onnx_export import VerificationError, to_onnx

    problem = _import_modules(args.imports)
    if problem:
        return _fail(problem)
    if args.unsafe:
        print(f"{PROG}: warning: --unsafe loads {args.model} with Keras's safe_mode=False: the "
              "Python code of its Lambda layers runs, so use it only for files you trust",
              file=sys.stderr)
    try:
        with _native_stderr_silenced(not args.verbose):
            model = load_model(args.model, safe_mode=not args.unsafe)
            result = to_onnx(
                model, output, opset=args.opset, input_names=args.input_names,
                output_names=args.output_names, channels_first=args.channels_first,
                float16_weights=args.float16_weights, fold=not args.no_fold,
                verify=not args.no_verify, batch_sizes=args.batch_sizes,
                dynamic_sizes=args.dynamic_sizes, tolerance=args.tolerance, target=args.target,
                openvino=OPENVINO_CHOICES[args.openvino], **data,
            )
    except VerificationError as error:
        return _fail(f"verification failed: {_in_option_words(str(error))}",
                     EXIT_VERIFICATION_FAILED)
    except FileNotFoundError as error:
        return _fail(error)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        return _fail(_with_option_names(str(error), args))
    except KeyboardInterrupt:
        return _fail("interrupted; no file was written", 130)
    except Exception as error:  # a bug of ours or of a library: still one line, unless --verbose
        if args.verbose:
            raise
        return _fail(f"unexpected {type(error).__name__} while exporting {args.model}: {error} "
                     f"(rerun with --verbose for the traceback; no file was written)", 1)
    print(result.summary())
    return 0


def _import_modules(names):
    """Imports each module of `--import`; what went wrong, or None."""
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own modules
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            return (f"--import {name}: no module named {error.name!r} (in the current folder "
                    "or the installed packages)")
        except Exception as error:  # the user's module failed: still one line
            return f"--import {name}: importing it raised {type(error).__name__}: {error}"
    return None


def _check_file(parser, args):
    """`--check FILE.onnx`: the file's target, its rules and its runtimes; exit 1 when it
    breaks them."""
    if args.model is not None:
        parser.error("--check takes an ONNX file instead of a model; give one or the other")
    if not os.path.isfile(args.check) or not args.check.endswith(".onnx"):
        return _fail(f"--check {args.check}: no such .onnx file")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with _native_stderr_silenced(not args.verbose):
        from export.file_check import check_file
    try:
        report = check_file(args.check, openvino=OPENVINO_CHOICES[args.openvino])
    except ValueError as error:
        return _fail(error)
    print(report.summary())
    return 0 if report.passed else EXIT_VERIFICATION_FAILED


def _in_option_words(message):
    """The guard's advice in the command line's words."""
    return message.replace("method='entropy' or 'percentile', or lower min_agreement",
                           "--calibration-method entropy or percentile, or lower "
                           "--min-agreement")


def _with_option_names(message, args):
    """`to_onnx`'s message about `calibration_data` or `validation_data` in the command line's
    words: the option and its file."""
    if message.startswith("validation_data is used only"):
        return ("--validation goes with --int8, or verifies a QAT model's export "
                f"(keras_bn.prepare_qat); {args.model} holds no QAT layer")
    for argument, option, path in (("calibration_data", "--calibration", args.calibration),
                                   ("validation_data", "--validation", args.validation)):
        if message.startswith(argument):
            return f"{option} {path}: {message}"
    return message


if __name__ == "__main__":
    sys.exit(main())
