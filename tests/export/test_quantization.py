"""export.quantization: int8 QDQ graphs from onnxruntime.quantization, calibrated on every data form
Keras users have, verified against the float graph, and every refusal of bad data."""

import tempfile

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from onnx import numpy_helper

import export
import keras_bn
from export import onnx_export, targets
from export.quantization import QuantizationReport, cpu_has_vnni, quantize_int8

CLASSES = 4
SHAPE = (8, 8, 3)


def _separable(rng, templates, size):
    """Each class a fixed random image plus noise: a classifier learns wide margins in a few steps,
    so int8 agreement with float measures quantization, not ties between near-equal logits."""
    labels = rng.integers(0, CLASSES, size)
    x = templates[labels] + rng.standard_normal((size,) + SHAPE)
    return x.astype("float32"), labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small conv/BN/dense classifier fitted on synthetic data, and its float ONNX graph."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    templates = 0.5 * rng.standard_normal((CLASSES,) + SHAPE)
    x_train, y_train = _separable(rng, templates, 512)
    x_test, y_test = _separable(rng, templates, 256)
    inputs = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras_bn.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")(x)
    x = keras_bn.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("float") / "m.onnx"
    export.to_onnx(model, path)
    return {"model": model, "path": path, "proto": onnx.load(path), "x_train": x_train,
            "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _run(proto, feed):
    """The graph's exact meaning: onnxruntime with graph optimizations off (what the report's
    figures are, on every CPU)."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _quantize(trained, data, **kwargs):
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("validation_data", (trained["x_test"], trained["y_test"]))
    return quantize_int8(trained["proto"], data, **kwargs)


def test_int8_graph_is_qdq_runs_and_agrees_with_float(trained, tmp_path, monkeypatch):
    assert "BatchNormalization" not in {n.op_type for n in trained["proto"].graph.node}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the work folder goes
    int8, report = _quantize(trained, trained["x_train"][:256])

    assert isinstance(int8, onnx.ModelProto) and isinstance(report, QuantizationReport)
    onnx.checker.check_model(int8, full_check=True)
    ops = [node.op_type for node in int8.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    assert "BatchNormalization" not in ops
    assert report.node_counts == {op: ops.count(op) for op in set(ops)}
    assert report.quantized_ops["Conv"] == 2 and report.quantized_ops["Gemm"] == 2
    assert "Conv" not in report.float_ops and "Gemm" not in report.float_ops
    assert list(tmp_path.iterdir()) == []  # the work folder is gone

    # Weights are int8 with one scale per output channel, read through a DequantizeLinear.
    initializers = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    producers = {out: node for node in int8.graph.node for out in node.output}
    for conv in (node for node in int8.graph.node if node.op_type == "Conv"):
        dequantize = producers[conv.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        weights, scales = initializers[dequantize.input[0]], initializers[dequantize.input[1]]
        assert weights.dtype == np.int8 and scales.shape == (weights.shape[0],)

    # The figures are checked here, in onnxruntime, rather than trusting the report's numbers.
    x_test, y_test = trained["x_test"], trained["y_test"]
    want, got = _run(trained["proto"], {"image": x_test}), _run(int8, {"image": x_test})
    agreement = float(np.mean(want.argmax(1) == got.argmax(1)))
    assert agreement >= 0.99 and report.agreement == pytest.approx(agreement)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale == pytest.approx(report.max_error, rel=1e-5)
    assert report.max_error < 0.15 and report.outputs[0].mean_error < 0.01
    (output,) = report.outputs
    assert output.name == "logits"
    assert output.float_accuracy == pytest.approx(np.mean(want.argmax(1) == y_test))
    assert output.int8_accuracy == pytest.approx(np.mean(got.argmax(1) == y_test))
    assert output.float_accuracy > 0.95 and abs(output.int8_accuracy - output.float_accuracy) < 0.02
    assert (report.method, report.calibration_batches, report.calibration_examples) == (
        "minmax", 8, 256)
    assert (report.validation_batches, report.validation_examples) == (8, 256)
    assert report.validated_on == "validation_data"
    assert (report.target, report.activation_type, report.symmetric_activations,
            report.weight_bound) == ("cpu", "uint8", False, 64)
    summary = report.summary()
    assert "minmax calibration on 8 batches (256 examples)" in summary
    assert "output 'logits'" in summary and "top-1 agreement" in summary


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_calibration_method(trained, method):
    int8, report = _quantize(trained, trained["x_train"][:128], method=method)
    assert report.method == method and report.agreement >= 0.99
    assert "QuantizeLinear" in report.node_counts


def test_model_forms_in_and_out(trained):
    data = trained["x_train"][:64]
    int8, _ = _quantize(trained, data, validation_data=None)
    as_bytes, _ = quantize_int8(trained["proto"].SerializeToString(), data, verbose=0)
    from_path, _ = quantize_int8(trained["path"], data, verbose=0)
    assert isinstance(as_bytes, bytes) and onnx.load_from_string(as_bytes) == int8
    assert isinstance(from_path, onnx.ModelProto) and from_path == int8
    with pytest.raises(TypeError, match="float_model must be an onnx.ModelProto.*Received: int"):
        quantize_int8(3, data)
    with pytest.raises(ValueError, match="bytes are not an ONNX model"):
        quantize_int8(b"not a model", data)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[window], self.y[window]


DATA_FORMS = {
    "array": lambda x, y: x,
    "tuple": lambda x, y: (x, y),
    "dict": lambda x, y: {"image": x},
    "tf.data": lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
    "PyDataset": lambda x, y: _Batches(x, y, 32),
    "list of batches": lambda x, y: [x[i:i + 32] for i in range(0, len(x), 32)],
    "generator of (x, y)": lambda x, y: ((x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)),
}


@pytest.mark.parametrize("form", DATA_FORMS)
def test_every_data_form_calibrates_and_validates(trained, form):
    x, y = trained["x_train"][:160], trained["y_train"][:160]
    labelled = form in ("tuple", "tf.data", "PyDataset", "generator of (x, y)")
    # As calibration data, compared on the same data (kept for a second pass when one-shot).
    _, report = quantize_int8(trained["proto"], DATA_FORMS[form](x, y), verbose=0)
    assert (report.calibration_batches, report.calibration_examples) == (5, 160)
    assert (report.validation_batches, report.validation_examples) == (5, 160)
    assert report.validated_on == "calibration_data" and report.agreement >= 0.99
    assert (report.outputs[0].float_accuracy is not None) == labelled
    # As validation data.
    x_test, y_test = trained["x_test"], trained["y_test"]
    _, checked = _quantize(trained, x, validation_data=DATA_FORMS[form](x_test, y_test))
    assert checked.validation_examples == len(x_test) and checked.agreement >= 0.99
    assert (checked.outputs[0].int8_accuracy is not None) == labelled


def test_one_hot_labels_give_the_same_accuracy(trained):
    x_test, y_test = trained["x_test"], trained["y_test"]
    _, ids = _quantize(trained, trained["x_train"][:64])
    _, one_hot = _quantize(trained, trained["x_train"][:64],
                           validation_data=(x_test, np.eye(CLASSES)[y_test]))
    assert one_hot.outputs[0].float_accuracy == ids.outputs[0].float_accuracy
    assert one_hot.outputs[0].int8_accuracy == ids.outputs[0].int8_accuracy
    with pytest.raises(ValueError, match="labels for output 'logits' must be 32 class ids"):
        _quantize(trained, trained["x_train"][:64], validation_data=(x_test, y_test[:, None, None]))


def test_the_batch_bound_is_honoured(trained):
    x = trained["x_train"]
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield x[:16]

    _, report = quantize_int8(trained["proto"], endless(), max_batches=3, verbose=0)
    assert len(pulled) == 3  # not one batch more is read than used
    assert (report.calibration_batches, report.calibration_examples) == (3, 48)
    assert report.validation_batches == 3  # compared on the three batches it kept
    _, report = _quantize(trained, x[:256], batch_size=16, max_batches=5,
                          max_validation_batches=2)
    assert (report.calibration_batches, report.calibration_examples) == (5, 80)
    assert (report.validation_batches, report.validation_examples) == (2, 32)
    _, report = _quantize(trained, x[:100], batch_size=16, max_batches=None)
    assert (report.calibration_batches, report.calibration_examples) == (7, 100)


def test_progress_bar_when_verbose(trained, capsys):
    _quantize(trained, trained["x_train"][:64], verbose=1)
    assert "2/2" in capsys.readouterr().out
    _quantize(trained, trained["x_train"][:64], verbose=0)
    assert capsys.readouterr().out == ""


def _largest_weight(model):
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return max(int(np.abs(initializers[node.input[0]].astype(int)).max())
               for node in model.graph.node if node.op_type == "DequantizeLinear"
               and initializers.get(node.input[0], np.zeros(0, np.uint8)).dtype == np.int8)


def test_each_target_writes_its_scheme_whatever_the_cpu(trained):
    """The target decides the integer scheme, never the CPU that quantizes: the same call gives
    the same weights on a CPU with VNNI and without."""
    data = trained["x_train"][:64]
    cpu, report = _quantize(trained, data)
    assert _largest_weight(cpu) <= 64 and report.target == "cpu" and report.weight_bound == 64
    assert targets.check(cpu, "cpu") == []
    vnni, report = _quantize(trained, data, target="cpu-vnni", min_agreement=0)
    assert _largest_weight(vnni) == 127 and report.weight_bound == 127
    # 8-bit weights with uint8 activations: pair sums of 2 * 255 * 127 leave 16 bits
    problems = targets.check(vnni, "cpu")
    assert problems and "beyond the 16-bit sums" in " ".join(problems)
    trt, report = _quantize(trained, data, target="tensorrt", min_agreement=0)
    assert (report.activation_type, report.symmetric_activations) == ("int8", True)
    assert targets.check(trt, "tensorrt") == []
    zero_points = [numpy_helper.to_array(t) for t in trt.graph.initializer
                   if t.name.endswith("zero_point")]
    activations = [z for z in zero_points if z.dtype != np.int32]  # int32: conv biases
    assert activations and all(z.dtype == np.int8 and not z.any() for z in activations)
    # every file says what it is; the CPU that made it is no part of it
    for proto, name in ((cpu, "cpu"), (vnni, "cpu-vnni"), (trt, "tensorrt")):
        metadata = targets.read_metadata(proto)
        assert metadata["target"] == name and metadata["version"]
        assert metadata["weight_bound"] == str(targets.TARGETS[name].weight_bound)
    assert cpu_has_vnni() in (True, False, None)
    with pytest.raises(ValueError, match="unknown int8 target 'arm'; the targets are 'cpu', "
                                         "'cpu-vnni', 'tensorrt'"):
        _quantize(trained, data, target="arm")


def test_runtimes_are_checked_against_the_meaning(trained):
    _, report = _quantize(trained, trained["x_train"][:64])
    (ort, openvino) = report.runtimes
    assert ort.runtime == "onnxruntime" and ort.checked and ort.beyond_one_step <= 0.05
    assert openvino.runtime == "openvino" and openvino.checked  # installed with dev
    assert "runtimes vs the file's meaning: onnxruntime" in report.summary()


def test_channels_first_inputs_take_channels_last_data(trained, tmp_path):
    path = tmp_path / "nchw.onnx"
    export.to_onnx(trained["model"], path, channels_first=True)
    x_test = trained["x_test"]
    int8, report = quantize_int8(onnx.load(path), trained["x_train"][:128], verbose=0,
                                 validation_data=x_test, channels_first_inputs=["image"])
    nchw = np.ascontiguousarray(np.transpose(x_test, (0, 3, 1, 2)))
    want = keras.ops.convert_to_numpy(trained["model"](x_test, training=False))
    assert np.mean(_run(int8, {"image": nchw}).argmax(1) == want.argmax(1)) >= 0.99
    assert report.agreement >= 0.99
    with pytest.raises(ValueError, match=r"channels_first_inputs names inputs the graph does not "
                                         r"have: \['images'\]"):
        quantize_int8(onnx.load(path), x_test, channels_first_inputs=["images"])


def test_guard_fires_on_all_zero_calibration(trained):
    assert export.VerificationError is onnx_export.VerificationError is keras_bn.VerificationError
    zeros = np.zeros((64,) + SHAPE, "float32")
    with pytest.raises(export.VerificationError, match=r"nothing was returned.*top-1 agreement "
                                                       r"\S+% is below min_agreement 99\.00%"):
        _quantize(trained, zeros)
    # The threshold is the user's: off, it lets the same graph through, its figures reported.
    _, report = _quantize(trained, zeros, min_agreement=0)
    assert report.agreement < 0.99
    with pytest.raises(export.VerificationError, match="mean error .* above max_mean_error"):
        _quantize(trained, trained["x_train"][:64], max_mean_error=1e-9)


def _with(x, index, value):
    x = x.copy()
    x[index] = value
    return x


BAD_DATA = {
    "empty array": (lambda x: x[:0], r"calibration_data, input 'image' is empty \(shape "
                                     r"\(0, 8, 8, 3\)\)"),
    "empty list": (lambda x: [], "calibration_data yielded no batch"),
    "NaN": (lambda x: _with(x, (3, 1, 1, 0), np.nan),
            r"calibration_data, input 'image' holds 1 NaN and 0 infinite values"),
    "inf": (lambda x: _with(x, (5, 0, 0, 2), -np.inf), "holds 0 NaN and 1 infinite values"),
    "wrong shape": (lambda x: x[:, :4], r"expected shape \('batch', 8, 8, 3\). Received: shape "
                                        r"\(64, 4, 8, 3\)"),
    "wrong rank": (lambda x: x[..., 0], r"expected shape .* Received: shape \(64, 8, 8\)"),
    "strings": (lambda x: x.astype(str), "the graph takes float32; received an array of dtype <U"),
    "objects": (lambda x: x.astype(object), "received an array of dtype object"),
    "dict keys": (lambda x: {"images": x}, r"keyed by the graph's input names \['image'\]. "
                                           r"Received keys: \['images'\]"),
    "NaN in batch 2": (lambda x: [x[:16], x[16:32], _with(x[32:48], (0, 0, 0, 0), np.nan)],
                       "calibration_data batch 2, input 'image' holds 1 NaN"),
    "one bad batch shape": (lambda x: [x[:16], x[16:32, :, :4]],
                            r"calibration_data batch 1, input 'image': expected shape"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_calibration_data_is_refused(trained, case):
    make, message = BAD_DATA[case]
    with pytest.raises(ValueError, match=message):
        quantize_int8(trained["proto"], make(trained["x_train"][:64]), verbose=0)


def test_bad_validation_data_and_arguments_are_refused(trained):
    x = trained["x_train"][:64]
    with pytest.raises(ValueError, match="validation_data, input 'image' holds 1 NaN"):
        _quantize(trained, x, validation_data=_with(x, (0, 0, 0, 0), np.nan))
    with pytest.raises(TypeError, match="must be an array.*Received: int"):
        quantize_int8(trained["proto"], 5)
    with pytest.raises(ValueError, match="calibration_data is required"):
        quantize_int8(trained["proto"], None)
    for arguments, message in [
        ({"method": "kl"}, r"calibration method must be one of \['entropy', 'minmax', "
                           r"'percentile'\]"),
        ({"max_batches": 0}, "max_batches must be a positive integer or None"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"min_agreement": 1.5}, "min_agreement must be a fraction from 0 to 1"),
        ({"max_mean_error": -1}, "max_mean_error must be a positive number"),
        ({"openvino": "yes"}, "openvino must be 'auto', True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            quantize_int8(trained["proto"], x, **arguments)


def test_two_inputs_are_fed_by_name_or_in_order(tmp_path):
    keras.utils.set_random_seed(1)
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    x = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], keras.layers.Dense(3, name="scores")(x))
    export.to_onnx(model, tmp_path / "two.onnx")
    proto = onnx.load(tmp_path / "two.onnx")
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((64, 6), "float32"), rng.standard_normal((64, 4), "float32")

    _, by_name = quantize_int8(proto, {"a": xa, "b": xb}, verbose=0, min_agreement=0.9)
    batches = [[xa[i:i + 16], xb[i:i + 16]] for i in range(0, 64, 16)]
    _, in_order = quantize_int8(proto, batches, verbose=0, min_agreement=0.9)
    assert by_name.calibration_examples == in_order.calibration_examples == 64
    assert by_name.outputs[0].name == "scores" and by_name.agreement is not None
    with pytest.raises(ValueError, match=r"the graph has 2 inputs \['a', 'b'\]; give a dict"):
        quantize_int8(proto, xa, verbose=0)
    with pytest.raises(ValueError, match=r"batch 0: 1 arrays for the graph's 2 inputs"):
        quantize_int8(proto, [[xa]], verbose=0)
    with pytest.raises(ValueError, match=r"batch 0: inputs with different batch sizes"):
        quantize_int8(proto, [[xa, xb[:8]]], verbose=0)
