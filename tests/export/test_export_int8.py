"""int8 export: `export.to_onnx(..., quantize="int8")` and `keras-bn-export --int8` on a small
conv/BN/dense classifier trained on scikit-learn's digits, the guard, and every refusal."""

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
from sklearn.datasets import load_digits

import export
import keras_bn
from export import onnx_export
from export.__main__ import main


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The classifier after three epochs on 1200 digits (about 95% on the other 597), saved."""
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int64")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="digit")
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.ReLU()(keras_bn.BatchNormalization()(h))
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(h)
    h = keras.layers.ReLU()(keras_bn.BatchNormalization()(h))
    h = keras.layers.Dense(32)(keras.layers.Flatten()(h))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200], y[:1200], epochs=3, batch_size=32, verbose=0)
    # After 114 steps the moving averages still remember their start; Algorithm 2's population
    # statistics lift the float accuracy from 60-90% to about 95%, with margins int8 keeps.
    keras_bn.estimate_population_statistics(model, x[:1200], verbose=0)
    path = tmp_path_factory.mktemp("digits") / "digits.keras"
    model.save(path)
    return {"model": model, "path": path, "x_train": x[:1200], "y_train": y[:1200],
            "x_test": x[1200:], "y_test": y[1200:]}


def _run(path, feed):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _keras(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_int8_export_writes_a_verified_qdq_graph(digits, tmp_path, normalization_ops):
    path = tmp_path / "digits.int8.onnx"
    x_test, y_test = digits["x_test"], digits["y_test"]
    result = export.to_onnx(digits["model"], path, quantize="int8",
                            calibration_data=digits["x_train"][:256],
                            validation_data=(x_test, y_test), verbose=0)

    assert [f.name for f in tmp_path.iterdir()] == ["digits.int8.onnx"]  # the int8 file alone
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    assert normalization_ops.isdisjoint(ops)
    assert result.node_counts == {op: ops.count(op) for op in set(ops)}
    assert result.file_size == path.stat().st_size
    assert [i.name for i in proto.graph.input] == ["digit"] == result.input_names
    assert result.input_shapes == [("batch", 8, 8, 1)]
    assert result.max_error < 1e-4 and len(result.folded) == 3  # the float graph, vs Keras

    report = result.quantization
    assert isinstance(report, export.QuantizationReport) and export.quantize_int8 is not None
    assert report.quantized_ops["Conv"] == 2 and report.quantized_ops["Gemm"] == 2
    assert (report.calibration_batches, report.calibration_examples) == (8, 256)
    assert report.validated_on == "validation_data" and report.validation_examples == 597
    # Its figures, checked here in onnxruntime and Keras rather than trusted.
    got, want = _run(path, {"digit": x_test}), _keras(digits["model"], x_test)
    (output,) = report.outputs
    assert report.agreement >= 0.99
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    assert output.int8_accuracy == pytest.approx(np.mean(got.argmax(1) == y_test))
    assert output.float_accuracy == pytest.approx(np.mean(want.argmax(1) == y_test))
    assert output.float_accuracy > 0.9
    assert abs(output.int8_accuracy - output.float_accuracy) <= 0.02

    summary = result.summary()
    assert summary.startswith(f"wrote {path} (int8 for target 'cpu', ")
    assert "max error vs Keras (the float graph before quantization)" in summary
    assert "int8 QDQ for target 'cpu': right on every x86-64 CPU" in summary
    assert "minmax calibration on 8 batches (256 examples)" in summary
    assert "runtimes vs the file's meaning: onnxruntime (optimized" in summary
    assert "top-1 agreement" in summary and "accuracy float" in summary
    assert export.to_onnx(digits["model"], tmp_path / "float.onnx").quantization is None


def test_guard_fires_on_all_zero_calibration_and_writes_nothing(digits, tmp_path):
    path = tmp_path / "digits.onnx"
    path.write_bytes(b"previous export")
    zeros = np.zeros((64, 8, 8, 1), "float32")
    with pytest.raises(export.VerificationError, match=r"top-1 agreement \S+% is below "
                                                       r"min_agreement 99\.00%"):
        export.to_onnx(digits["model"], path, quantize="int8", calibration_data=zeros,
                       validation_data=digits["x_test"], verbose=0)
    assert path.read_bytes() == b"previous export"
    assert [f.name for f in tmp_path.iterdir()] == ["digits.onnx"]
    # The guard is the user's to set: off, the same calibration is written, its figures kept.
    result = export.to_onnx(digits["model"], path, quantize="int8", calibration_data=zeros,
                            validation_data=digits["x_test"], min_agreement=0, verbose=0)
    assert result.quantization.agreement < 0.99 and result.quantization.min_agreement == 0


def test_channels_first_int8_takes_channels_last_data(digits, tmp_path):
    path = tmp_path / "nchw.onnx"
    result = export.to_onnx(digits["model"], path, quantize="int8", channels_first=True,
                            calibration_data=digits["x_train"][:128], verbose=0)
    assert result.input_shapes == [("batch", 1, 8, 8)]
    x = digits["x_test"]
    got = _run(path, {"digit": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
    assert np.mean(got.argmax(1) == _keras(digits["model"], x).argmax(1)) >= 0.98


def _refuse_to_freeze(*args, **kwargs):
    raise AssertionError("the data should have been refused before freezing")


BAD_DATA = {
    "wrong shape": (lambda x: x[:, :4], r"calibration_data, input 'digit': expected shape "
                                        r"\('batch', 8, 8, 1\). Received: shape \(64, 4, 8, 1\)"),
    "NaN": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x),
            "calibration_data, input 'digit' holds 1 NaN and 0 infinite values"),
    "empty": (lambda x: x[:0], "is empty"),
    "strings": (lambda x: x.astype(str), "received an array of dtype <U"),
    "dict keys": (lambda x: {"image": x}, r"keyed by the graph's input names \['digit'\]"),
    "a bad batch in a list": (lambda x: [x[:32], x[32:, :, :, :0]], "batch 1, input 'digit'"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_refused_before_freezing(digits, tmp_path, monkeypatch, case):
    monkeypatch.setattr(onnx_export, "freeze", _refuse_to_freeze)
    make, message = BAD_DATA[case]
    bad = make(digits["x_train"][:64])
    with pytest.raises(ValueError, match=message):
        export.to_onnx(digits["model"], tmp_path / "x.onnx", quantize="int8",
                       calibration_data=bad, verbose=0)
    with pytest.raises(ValueError, match=message.replace("calibration_data", "validation_data")):
        export.to_onnx(digits["model"], tmp_path / "x.onnx", quantize="int8",
                       calibration_data=digits["x_train"][:64], validation_data=bad, verbose=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"quantize": "int8"}, "quantize='int8' needs calibration_data"),
    ({"quantize": "int4", "calibration_data": 1}, "quantize must be None .* or 'int8'"),
    ({"calibration_data": np.zeros((1, 8, 8, 1))}, "calibration_data is used only with "
                                                   "quantize='int8'"),
    ({"quantize": "int8", "calibration_data": 1, "float16_weights": True},
     "float16_weights=True"),
    ({"quantize": "int8", "calibration_data": 1, "calibration_method": "kl"},
     r"calibration method must be one of \['entropy', 'minmax', 'percentile'\]"),
    ({"quantize": "int8", "calibration_data": 1, "calibration_batches": 0},
     "calibration_batches must be a positive integer or None"),
    ({"quantize": "int8", "calibration_data": 1, "min_agreement": 1.5},
     "min_agreement must be a fraction from 0 to 1"),
])
def test_bad_int8_arguments(digits, tmp_path, monkeypatch, kwargs, match):
    monkeypatch.setattr(onnx_export, "freeze", _refuse_to_freeze)
    with pytest.raises(ValueError, match=match):
        export.to_onnx(digits["model"], tmp_path / "x.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_fully_convolutional_model_with_unknown_height_and_width(tmp_path, randomize):
    """Dynamic height and width, float and int8: both run at 16x12 and 20x28 and match Keras."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    scores = keras.layers.Conv2D(4, 1, name="scores")(x)  # a score per class and position
    model = randomize(keras.Model(inputs, scores))
    rng = np.random.default_rng(3)
    calibration = [rng.uniform(-1, 1, (16, h, w, 3)).astype("float32")
                   for h, w in [(16, 12), (20, 28)] * 4]

    for quantize, tolerance in [(None, 1e-4), ("int8", 0.1)]:
        path = tmp_path / f"{quantize}.onnx"
        result = export.to_onnx(
            model, path, quantize=quantize, verbose=0,
            calibration_data=calibration if quantize else None)
        assert result.input_shapes == [("batch", "image_dim1", "image_dim2", 3)]
        assert result.dynamic_sizes == (32, 64) and result.batch_sizes == (1, 3)
        for h, w in [(16, 12), (20, 28)]:
            x = rng.uniform(-1, 1, (2, h, w, 3)).astype("float32")
            got, want = _run(path, {"image": x}), _keras(model, x)
            assert got.shape == want.shape == (2, h // 2, w // 2, 4)
            assert np.abs(got - want).max() / np.abs(want).max() < tolerance, quantize
    assert result.quantization.outputs[0].agreement is None  # not class scores: no guard


def test_int8_keeps_global_average_pool_which_onnxruntime_quantizes(tmp_path, randomize):
    """The float graph's ReduceMean head stays float in int8; the pool it replaces is quantized."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras_bn.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inputs, keras.layers.Dense(4)(x)))
    calibration = np.random.default_rng(5).uniform(0, 1, (64, 8, 8, 3)).astype("float32")

    float_ops = export.to_onnx(model, tmp_path / "f.onnx", verbose=0).node_counts
    result = export.to_onnx(model, tmp_path / "q.onnx", quantize="int8", verbose=0,
                            calibration_data=calibration, min_agreement=0)
    assert "ReduceMean" in float_ops and "GlobalAveragePool" not in float_ops
    assert "ReduceMean" not in result.node_counts
    assert result.quantization.quantized_ops.get("GlobalAveragePool") == 1
    assert "GlobalAveragePool" not in result.quantization.float_ops


# The command line, with the model and data files it is given.


@pytest.fixture
def files(digits, tmp_path):
    x, y = digits["x_train"][:256], digits["y_train"][:256]
    np.save(tmp_path / "calibration.npy", x)
    np.savez(tmp_path / "named.npz", digit=x, y=y)
    np.savez(tmp_path / "validation.npz", x=digits["x_test"], labels=digits["y_test"])
    np.save(tmp_path / "wrong_shape.npy", x[:, :4])
    np.savez(tmp_path / "two_names.npz", image=x, extra=x)
    np.save(tmp_path / "zeros.npy", np.zeros_like(x))
    return tmp_path


def _one_line_failure(capsys, status, expected_status, fragment, output):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == expected_status, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("keras-bn-export: error: ") and fragment in lines[0], lines[0]
    assert captured.out == "" and not output.exists()
    return lines[0]


def test_cli_int8_with_npy_calibration_and_npz_validation(digits, files, capsys):
    output = files / "out.onnx"
    status = main([str(digits["path"]), "-o", str(output), "--int8",
                   "--calibration", str(files / "calibration.npy"),
                   "--validation", str(files / "validation.npz"),
                   "--calibration-method", "percentile", "--calibration-batches", "4"])
    out = capsys.readouterr().out
    assert status == 0 and output.exists()
    assert f"wrote {output} (int8 for target 'cpu', " in out
    assert "percentile calibration on 4 batches (128 examples)" in out
    assert "on 597 examples of validation data" in out
    assert "top-1 agreement" in out and "accuracy float" in out and ", int8 " in out
    assert "QuantizeLinear" in out


def test_cli_int8_with_named_npz_and_labels_default_output(digits, files, capsys, tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(digits["path"].read_bytes())
    assert main([str(model), "--int8", "--calibration", str(files / "named.npz"),
                 "--min-agreement", "0.95"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "model.int8.onnx").exists() and not (tmp_path / "model.onnx").exists()
    # Labels in the calibration file: accuracies on it, as nothing else was given.
    assert "of the calibration data (no validation data given)" in out and "accuracy" in out


@pytest.mark.parametrize("arguments, status, fragment", [
    (["--calibration", "wrong_shape.npy"],
     2, "--calibration {files}/wrong_shape.npy: calibration_data, input 'digit': expected shape "
        "('batch', 8, 8, 1). Received: shape (256, 4, 8, 1)"),
    (["--calibration", "calibration.npy", "--validation", "wrong_shape.npy"],
     2, "--validation {files}/wrong_shape.npy: validation_data, input 'digit': expected shape"),
    (["--calibration", "two_names.npz"],
     2, "a dict must be keyed by the graph's input names ['digit']. Received keys: ['extra', "
        "'image']"),
    (["--calibration", "zeros.npy", "--validation", "validation.npz"],
     1, "verification failed: the int8 graph is not accurate enough"),
    (["--calibration", "zeros.npy", "--validation", "validation.npz"],
     1, "try --calibration-method entropy or percentile, or lower --min-agreement"),
])
def test_cli_int8_errors_after_loading_the_model(digits, files, capsys, arguments, status,
                                                 fragment):
    output = files / "out.onnx"
    arguments = [str(files / a) if a.endswith((".npy", ".npz")) else a for a in arguments]
    code = main([str(digits["path"]), "-o", str(output), "--int8", *arguments])
    _one_line_failure(capsys, code, status, fragment.format(files=files), output)
