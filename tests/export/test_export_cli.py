"""The keras-bn-export command line: a summary on success, one line and no file on failure."""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
import zipfile

import keras
import numpy as np
import pytest

import keras_bn
from export import __main__ as cli
from export import int8_comparison, keras_comparison, onnx_export, quantization, targets
from export.__main__ import main

BIN = os.path.dirname(sys.executable)
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_success_prints_summary(saved_model, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    assert main([str(saved_model), "-o", str(output), "--opset", "15"]) == 0
    out = capsys.readouterr().out
    assert output.exists()
    assert f"wrote {output}" in out and "opset 15" in out
    assert "BatchNormalization: 2 folded, 1 frozen to constants (Mul+Add)" in out
    assert "max error vs Keras: " in out and "nodes: " in out


def test_default_output_path_and_options(saved_model, capsys):
    assert main([str(saved_model), "--channels-first", "--float16-weights", "--no-fold",
                 "--input-names", "pixels", "--batch-sizes", "2,5"]) == 0
    onnx_path = saved_model.with_suffix(".onnx")
    assert onnx_path.exists()
    out = capsys.readouterr().out
    assert "0 folded, 3 frozen" in out and "(batch sizes 2, 5)" in out and "Cast" in out


def _assert_one_line_failure(capsys, status, expected_status, fragment):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == expected_status
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("keras-bn-export: error: ") and fragment in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_missing_and_foreign_files(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    status = main([str(tmp_path / "absent.keras"), "-o", str(output)])
    _assert_one_line_failure(capsys, status, 2, "no such model file")
    (tmp_path / "text.keras").write_text("hello")
    status = main([str(tmp_path / "text.keras"), "-o", str(output)])
    _assert_one_line_failure(capsys, status, 2, "text.keras: it is not a Keras 3 model file, "
                             "which is a zip archive")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "a zip, but not a Keras model")
    status = main([str(tmp_path / "other.keras"), "-o", str(output)])
    _assert_one_line_failure(capsys, status, 2, "could not load")
    assert not output.exists()


def test_unsupported_model(tmp_path, capsys):
    inputs = keras.Input((4,), batch_size=2)
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "fixed_batch.keras")
    status = main([str(tmp_path / "fixed_batch.keras"), "-o", str(tmp_path / "out.onnx")])
    _assert_one_line_failure(capsys, status, 2, "first dimension must be None")
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_dimensions_and_dynamic_sizes(tmp_path, capsys):
    inputs = keras.Input((None, 4), name="steps")
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "sequence.keras")
    assert main([str(tmp_path / "sequence.keras"), "--dynamic-sizes", "5,9"]) == 0
    assert "unknown dimensions at sizes 5, 9" in capsys.readouterr().out
    assert (tmp_path / "sequence.onnx").exists()


def test_unwritable_output(saved_model, tmp_path, capsys):
    status = main([str(saved_model), "-o", str(tmp_path / "no" / "such" / "out.onnx")])
    _assert_one_line_failure(capsys, status, 2, "does not exist")


def test_verification_failure(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(keras_comparison, "verify_float", _failing_verify)
    status = main([str(saved_model), "-o", str(tmp_path / "out.onnx")])
    _assert_one_line_failure(capsys, status, 1, "verification failed")
    assert not (tmp_path / "out.onnx").exists()


def _failing_verify(*args, **kwargs):
    raise onnx_export.VerificationError("onnxruntime output 'logits' differs from Keras by 0.5")


def test_bad_option(saved_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(saved_model), "--opset", "seventeen"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-bn-export: error: argument --opset")


def test_console_script_in_a_fresh_process(tmp_path):
    """The installed script picks TensorFlow even when the environment asks for JAX (else the
    error would be about the backend) and fails in exactly one line, TensorFlow's native start-up
    logging included."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    start = time.perf_counter()
    failed = subprocess.run([os.path.join(BIN, "keras-bn-export"), str(tmp_path / "absent.keras"),
                             "-o", str(tmp_path / "out.onnx")],
                            env=env, capture_output=True, text=True)
    assert time.perf_counter() - start < 3  # checked before TensorFlow is imported
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"keras-bn-export: error: no such model file: {tmp_path / 'absent.keras'}"]
    assert failed.stdout == "" and not (tmp_path / "out.onnx").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"keras-bn-export {keras_bn.__version__}\n"


def test_version_of_a_source_tree_that_was_never_installed(monkeypatch, capsys):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"keras-bn-export {keras_bn.__version__}\n"


def test_opsets_and_defaults_match_the_exporter():
    assert (cli.MIN_OPSET, cli.MAX_OPSET, cli.DEFAULT_OPSET) == (
        onnx_export.MIN_OPSET, onnx_export.MAX_OPSET, onnx_export.DEFAULT_OPSET)
    assert cli.DEFAULT_DYNAMIC_SIZES == onnx_export.DEFAULT_DYNAMIC_SIZES
    assert cli.CALIBRATION_METHODS == tuple(sorted(quantization.CALIBRATION_METHODS))
    assert cli.DEFAULT_CALIBRATION_BATCHES == quantization.DEFAULT_MAX_BATCHES
    assert cli.DEFAULT_MIN_AGREEMENT == quantization.DEFAULT_MIN_AGREEMENT
    assert cli.TARGETS == tuple(targets.TARGETS) and cli.DEFAULT_TARGET == targets.DEFAULT_TARGET


# Every mistake the command line can see in its arguments and paths: (arguments, fragment of the
# one-line message). "MODEL" is a file named like a model; it is never loaded.
MISTAKES = [
    (["absent.keras"], "no such model file: absent.keras"),
    (["text.keras"], "could not load text.keras: it is not a Keras 3 model file, which is a zip"),
    (["MODEL", "-o", "model.txt"], "the output path must end in .onnx. Received: model.txt"),
    (["model.h5"], "expected a Keras 3 model file ending in .keras. Received: model.h5"),
    (["folder.keras"], "expected a Keras 3 model file ending in .keras"),
    (["MODEL", "-o", "no/such/out.onnx"], "the folder"),
    (["MODEL", "-o", "model.keras"], "the output path is the model file itself"),
    (["MODEL", "-o", "folder.keras"], "it is a directory"),
    (["MODEL", "--opset", "12"], "argument --opset: expected an integer from 13 to 18, got '12'"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--target", "arm"],
     "argument --target: invalid choice: 'arm'"),
    (["--check", "absent.onnx"], "--check absent.onnx: no such .onnx file"),
    (["MODEL", "--check", "absent.onnx"], "--check takes an ONNX file instead of a model"),
    (["MODEL", "--opset", "seventeen"], "argument --opset"),
    (["MODEL", "--batch-sizes", "3,3"], "argument --batch-sizes: expected at least two different"),
    (["MODEL", "--batch-sizes", "0,1"], "argument --batch-sizes"),
    (["MODEL", "--tolerance", "0"], "argument --tolerance: expected a positive number"),
    (["MODEL", "--tolerance", "nan"], "argument --tolerance"),
    (["MODEL", "--input-names", "a,a"], "argument --input-names: expected unique names"),
    (["MODEL", "--output-names", "a,"], "argument --output-names"),
    (["MODEL", "--dynamic-sizes", "32"], "argument --dynamic-sizes: expected at least two"),
    # int8: options that do not go together, and data files refused before the model is read.
    (["MODEL", "--int8"], "--int8 needs --calibration DATA"),
    (["MODEL", "--calibration", "x.npy"], "--calibration only goes with --int8"),
    (["MODEL", "--min-agreement", "0.5"], "--min-agreement only goes with --int8"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--float16-weights"],
     "--float16-weights does not go with --int8"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--min-agreement", "1.5"],
     "argument --min-agreement: expected a number from 0 to 1, got '1.5'"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--calibration-batches", "0"],
     "argument --calibration-batches: expected a positive integer"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--calibration-method", "kl"],
     "argument --calibration-method: invalid choice: 'kl'"),
    (["MODEL", "--int8", "--calibration", "absent.npy"], "--calibration absent.npy: no such file"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--validation", "absent.npz"],
     "--validation absent.npz: no such file"),
    (["MODEL", "--int8", "--calibration", "data.csv"],
     "--calibration data.csv: expected a .npy file (one array of inputs) or a .npz file"),
    (["MODEL", "--int8", "--calibration", "nan.npy"],
     "--calibration nan.npy: holds 2 NaN and 0 infinite values (shape (4, 3))"),
    (["MODEL", "--int8", "--calibration", "inf.npz"],
     "--calibration inf.npz, array 'x': holds 0 NaN and 1 infinite values"),
    (["MODEL", "--int8", "--calibration", "empty.npy"],
     "--calibration empty.npy: is empty (shape (0, 3))"),
    (["MODEL", "--int8", "--calibration", "strings.npy"],
     "--calibration strings.npy: holds <U32 values; expected numbers"),
    (["MODEL", "--int8", "--calibration", "objects.npy"],
     "--calibration objects.npy: holds Python objects (a pickle)"),
    (["MODEL", "--int8", "--calibration", "text.npy"],
     "--calibration text.npy: is not a NumPy file (a .npy file starts with b'\\x93NUMPY'"),
    (["MODEL", "--int8", "--calibration", "text.npz"], "--calibration text.npz: is not a NumPy"),
    (["MODEL", "--int8", "--calibration", "scalar.npy"], "holds a single number"),
    (["MODEL", "--int8", "--calibration", "corrupt.npy"],
     "--calibration corrupt.npy: cannot be read as a NumPy file"),
    (["MODEL", "--int8", "--calibration", "no_arrays.npz"], "the .npz file holds no arrays"),
    (["MODEL", "--int8", "--calibration", "labels_only.npz"], "holds labels ('y') but no inputs"),
    (["MODEL", "--int8", "--calibration", "two_labels.npz"], "labels under both 'y' and 'labels'"),
    (["MODEL", "--int8", "--calibration", "x.npy", "--validation", "ragged.npz"],
     "--validation ragged.npz: arrays of different lengths {'x': 4, 'y': 3}"),
    (["MODEL", "--int8", "--calibration", "nan_labels.npz"],
     "labels 'labels': holds 1 NaN"),
]

CHECK_MISTAKES = """
import contextlib
import io
import json
import sys

from export.__main__ import main

results = []
for arguments in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main(arguments)
        except SystemExit as exit:
            status = exit.code
    results.append([status, err.getvalue()])
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"keras", "tensorflow", "tf2onnx"})
print(json.dumps({"results": results, "loaded": loaded}))
"""


def _with_nan(array, count):
    array = array.astype("float32")
    array.flat[:count] = np.nan
    return array


def _with_inf(array):
    array = array.copy()
    array.flat[-1] = np.inf
    return array


def test_mistakes_are_reported_before_tensorflow_is_imported(tmp_path):
    """Each mistake is one line and exit status 2, in a process that never imports Keras."""
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as archive:  # a zip, never loaded
        archive.writestr("config.json", "{}")
    (tmp_path / "text.keras").write_text("not a zip")
    (tmp_path / "text.npy").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "text.npz").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "model.h5").write_text("")
    (tmp_path / "folder.keras").mkdir()
    x = np.zeros((4, 3), "float32")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "data.csv").write_text("1,2,3")
    np.save(tmp_path / "nan.npy", _with_nan(x, 2))
    np.savez(tmp_path / "inf.npz", x=_with_inf(x))
    np.save(tmp_path / "empty.npy", x[:0])
    np.save(tmp_path / "strings.npy", x.astype(str))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "scalar.npy", np.float32(1))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    np.savez(tmp_path / "no_arrays.npz")
    np.savez(tmp_path / "labels_only.npz", y=np.arange(4))
    np.savez(tmp_path / "two_labels.npz", x=x, y=np.arange(4), labels=np.arange(4))
    np.savez(tmp_path / "ragged.npz", x=x, y=np.arange(3))
    np.savez(tmp_path / "nan_labels.npz", x=x, labels=_with_nan(np.arange(4.0), 1))
    arguments = [[("model.keras" if a == "MODEL" else a) for a in args] for args, _ in MISTAKES]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHECK_MISTAKES),
                           json.dumps(arguments)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert time.perf_counter() - start < 3
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loaded"] == []
    for (args, fragment), (status, err) in zip(MISTAKES, report["results"]):
        lines = err.splitlines()
        assert status == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("keras-bn-export: error: "), (args, err)
        assert fragment in lines[0], (args, err)


def test_unregistered_custom_layer(tmp_path, capsys):
    """Keras's headline ("Functional could not be deserialized") hides the cause; the command line
    names the class and says custom layers must be importable and registered."""

    class Twice(keras.layers.Layer):  # not registered: unknown to Keras when loading
        def call(self, x):
            return 2 * x

    inputs = keras.Input((3,))
    keras.Model(inputs, Twice()(keras.layers.Dense(2)(inputs))).save(tmp_path / "twice.keras")
    status = main([str(tmp_path / "twice.keras"), "-o", str(tmp_path / "out.onnx")])
    line = _assert_one_line_failure(capsys, status, 2,
                                    "it uses the class 'Twice', which Keras does not know")
    assert "Custom layers must be importable and registered" in line
    assert "`import keras_bn` registers keras-bn's" in line
    assert "could not be deserialized" not in line


def test_custom_layer_that_cannot_be_rebuilt(tmp_path):
    class Broken(keras.layers.Layer):
        def call(self, x):
            return x

        @classmethod
        def from_config(cls, config):
            raise TypeError("Broken needs a factor")

    inputs = keras.Input((3,))
    keras.Model(inputs, Broken()(inputs)).save(tmp_path / "broken.keras")
    with keras.saving.custom_object_scope({"Broken": Broken}):
        with pytest.raises(ValueError) as error:
            onnx_export.load_model(tmp_path / "broken.keras")
    message = str(error.value)
    assert "Keras could not rebuild a layer from its config: Broken needs a factor" in message
    assert "Custom layers must be importable and registered" in message
    assert "\n" not in message


def _registered_module(folder, name):
    """A module in `folder` that registers a custom layer, as a user's own code would."""
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""
        import keras


        @keras.saving.register_keras_serializable(package="{name}")
        class Twice(keras.layers.Layer):
            def call(self, x):
                return 2 * x
    """))


def test_import_registers_custom_layers_before_loading(tmp_path, capsys, monkeypatch):
    """`--import MODULE` (from the current folder) makes a custom layer loadable; without it the
    message points to the option."""
    name = "cli_custom_layers_for_test"
    _registered_module(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    twice = __import__(name).Twice
    inputs = keras.Input((3,))
    keras.Model(inputs, twice()(keras.layers.Dense(2)(inputs))).save(tmp_path / "twice.keras")
    # As a new process would see it: the class unknown until its module is imported.
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(tmp_path), "")])
    monkeypatch.delitem(keras.saving.get_custom_objects(), f"{name}>Twice")

    status = main(["twice.keras", "-o", "without.onnx"])
    line = _assert_one_line_failure(capsys, status, 2, "it uses the class")
    assert line.endswith("(keras-bn-export --import MODULE)")
    status = main(["twice.keras", "-o", "absent.onnx", "--import", "no_such_module_here"])
    _assert_one_line_failure(capsys, status, 2,
                             "--import no_such_module_here: no module named 'no_such_module_here'")
    assert main(["twice.keras", "-o", "twice.onnx", "--import", name, "--import", "json"]) == 0
    assert "wrote " in capsys.readouterr().out and (tmp_path / "twice.onnx").exists()
    assert not (tmp_path / "without.onnx").exists() and not (tmp_path / "absent.onnx").exists()


def test_lambda_layers_load_only_with_unsafe(tmp_path, capsys):
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: 2.0 * x)(keras.layers.Dense(2)(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    output = tmp_path / "lambda.onnx"
    status = main([str(tmp_path / "lambda.keras"), "-o", str(output)])
    line = _assert_one_line_failure(capsys, status, 2, "it holds a Lambda layer")
    assert line.endswith("If you trust the file: export.load_model(path, safe_mode=False), or "
                         "keras-bn-export --unsafe") and "..." not in line
    assert not output.exists()
    assert main([str(tmp_path / "lambda.keras"), "-o", str(output), "--unsafe"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"keras-bn-export: warning: --unsafe loads {tmp_path / 'lambda.keras'} with Keras's "
        "safe_mode=False: the Python code of its Lambda layers runs, so use it only for files "
        "you trust"]
    assert f"wrote {output}" in captured.out


def test_long_messages_are_shortened_between_words():
    from export.conversion import one_line

    text = "word " * 100
    short = one_line(ValueError(text))
    assert short.endswith(" word ...") and len(short) <= 305
    assert one_line(ValueError("a\n b")) == "a b" and one_line(ValueError()) == "ValueError"


def test_python_api_refuses_an_output_path_not_ending_in_onnx(model, tmp_path):
    with pytest.raises(ValueError, match=r"path must end in \.onnx\. Received: .*model\.txt"):
        onnx_export.to_onnx(model, tmp_path / "model.txt")
    assert list(tmp_path.iterdir()) == []


def test_validation_labels_outside_the_classes_are_refused():
    labels = np.arange(100, 104)
    with pytest.raises(ValueError, match=r"must be class ids from 0 to 9 \(the output scores 10 "
                       r"classes\)\. Received: 4 of a batch's 4 outside, labels from 100 to 103"):
        int8_comparison._labels_per_output(labels, ["logits"], 4, {"logits": 10})
    with pytest.raises(ValueError, match="from 0 to 9"):
        int8_comparison._labels_per_output(np.array([0, -1, 2, 3]), ["logits"], 4, {"logits": 10})
    with pytest.raises(ValueError, match="one-hot rows of 3 classes, but the output scores 10"):
        int8_comparison._labels_per_output(np.eye(3)[[0, 1, 2, 0]], ["logits"], 4,
                                           {"logits": 10})
    ids = int8_comparison._labels_per_output(np.array([0, 9, 3, 3]), ["logits"], 4,
                                             {"logits": 10})
    assert ids["logits"].tolist() == [0, 9, 3, 3]


def test_qat_summary_counts_the_bn_fused_into_qat_layers():
    result = onnx_export.ExportResult(
        path="qat.onnx", opset=17, node_counts={"QuantizeLinear": 3}, max_error=1e-6,
        batch_sizes=(1, 3), input_names=["x"], output_names=["y"], channels_first=False,
        float16_weights=False, folded=[], frozen=[], removed=[], file_size=2**20, seconds=1.0,
        qat_layers=["conv", "depthwise", "dense"], max_error_steps=0.5, beyond_one_step=0.0,
        target="cpu")
    lines = result.summary().splitlines()
    assert lines[1] == ("BatchNormalization: 3 fused into QAT layers' int8 kernels, 0 folded, 0 "
                        "frozen to constants (Mul+Add); 0 training-only layers removed")
    assert lines[4].startswith("QAT: 3 layers as int8 QDQ")


def test_freeze_bn_statistics_names_every_fused_layer_type():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError) as error:
        keras_bn.freeze_bn_statistics(model)
    for name in ("Conv2DBatchNormalization", "DepthwiseConv2DBatchNormalization",
                 "DenseBatchNormalization"):
        assert name in str(error.value)


def test_validation_without_int8_is_for_qat_models(saved_model, tmp_path, capsys):
    np.save(tmp_path / "validation.npy", np.ones((4, 8, 8, 3), "float32"))
    status = main([str(saved_model), "-o", str(tmp_path / "out.onnx"), "--validation",
                   str(tmp_path / "validation.npy")])
    _assert_one_line_failure(capsys, status, 2, "--validation goes with --int8, or verifies a QAT "
                                                "model's export (keras_bn.prepare_qat);")
    assert not (tmp_path / "out.onnx").exists()
