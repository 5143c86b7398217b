"""A QAT model to int8 ONNX: freezing to the deployed layers, the int8 weight pass, and the graph
in onnxruntime against the QAT model's inference (within one quantization step)."""

import collections

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import export
import keras_bn
from export import qdq_passes, quantization, targets
from export.__main__ import main
from export.freezing import freeze
from keras_bn.quantization.deployment import FakeQuantization
from keras_bn.verification import quantization_step

BN_ARITHMETIC = {"BatchNormalization", "Mul", "Sub", "Div", "Sqrt", "Rsqrt", "Reciprocal"}


def branchy_model():
    """Conv, depthwise and dense pairs, one tensor feeding two pairs, a concat and a float head."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras_bn.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    y = keras_bn.BatchNormalization(name="depthwise_bn")(y)
    y = keras.layers.ReLU()(y)
    z = keras.layers.Conv2D(8, 1, name="pointwise")(x)
    z = keras.layers.BatchNormalization(name="pointwise_bn")(z)
    z = keras.layers.ReLU()(z)
    x = keras.layers.Concatenate()([y, z])
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, name="hidden")(x)
    x = keras_bn.BatchNormalization(name="hidden_bn")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inputs, outputs, name="branchy")


def images(count=64, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 12, 12, 3)).astype("float32")


def trained_qat_model(weight_bits="auto", seed=0, target="cpu"):
    keras.utils.set_random_seed(seed)
    model = keras_bn.prepare_qat(branchy_model(), weight_bits=weight_bits, target=target)
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    x = images(seed=seed)
    y = np.random.default_rng(seed).integers(0, 5, len(x))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def qat_model():
    return trained_qat_model()


def assert_within_one_step(received, expected):
    """Every value within one quantization step of the output (range / 255) but for a rare one
    at a rounding boundary that float32 and integer arithmetic put on different sides (export
    allows 5%; a wrong graph misses most values)."""
    steps = np.abs(received - expected) / quantization_step(expected)
    assert np.mean(steps > 1.0) <= 0.01 and steps.max() < 2.0, (np.mean(steps > 1.0), steps.max())


def run(path, x):
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_freeze_writes_each_qat_layer_as_quantizer_and_plain_layer(qat_model, tmp_path):
    frozen = freeze(qat_model)
    assert sorted(frozen.freeze_report.quantized) == ["depthwise", "hidden", "pointwise", "stem"]
    x = images(seed=1)
    # The deployed layers compute what the QAT layers compute in inference, exactly.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(frozen(x)),
                                  keras.ops.convert_to_numpy(qat_model(x, training=False)))
    stem = frozen.get_layer("stem")
    quantizer, conv = stem.layers
    assert isinstance(quantizer, FakeQuantization) and type(conv) is keras.layers.Conv2D
    assert quantizer.minimum == min(float(qat_model.get_layer("stem").input_min.numpy()), 0.0)
    # The deployed model is a Keras model like any other: it saves and loads.
    frozen.save(tmp_path / "frozen.keras")
    loaded = keras.saving.load_model(tmp_path / "frozen.keras")
    np.testing.assert_array_equal(loaded(x).numpy(), frozen(x).numpy())


def test_qat_model_exports_an_int8_graph_within_one_step(qat_model, tmp_path):
    path = tmp_path / "qat.onnx"
    result = export.to_onnx(qat_model, path, batch_sizes=(1, 64))
    assert sorted(result.qat_layers) == ["depthwise", "hidden", "pointwise", "stem"]
    assert 0.0 <= result.max_error_steps < 2.0 and result.beyond_one_step <= 0.01
    assert "QAT: 4 layers as int8 QDQ" in result.summary()
    # compared layer by layer: the stem reads the graph input; depthwise and pointwise read
    # one tensor over one range, which one quantizer in the graph serves
    assert result.layer_check[0] == 2 and result.layer_check[2] <= 0.01
    assert "layer by layer (each quantizer fed Keras's values), 2 quantized inputs" in (
        result.summary())
    proto = onnx.load(path)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert not BN_ARITHMETIC & set(ops), ops
    # One QuantizeLinear per distinct learned range: the stem's input, the tensor that two
    # pairs read (tf2onnx merges their identical pairs), the hidden layer's input.
    assert ops["QuantizeLinear"] == 3
    int8 = [numpy_helper.to_array(i) for i in proto.graph.initializer
            if i.data_type == TensorProto.INT8 and i.name.endswith("_quantized")]
    assert len(int8) == 4  # the four folded kernels
    # target "cpu": 7-bit grids, integers within +-63, which no x86 CPU's pair sums saturate
    assert all(np.abs(w).max() == 63 for w in int8)
    assert targets.check(proto, "cpu") == []
    assert targets.read_metadata(proto)["target"] == "cpu" == result.target
    assert len([i for i in proto.graph.initializer if i.data_type == TensorProto.INT32
                and i.name.endswith("_quantized")]) == 3  # the convolutions' biases
    # On data like the training data, the graph computes what was trained.
    x = images(256, seed=2)
    assert_within_one_step(run(path, x), qat_model(x, training=False).numpy())


def test_onnxruntime_fuses_the_quantized_convolution(qat_model, tmp_path):
    path = tmp_path / "qat.onnx"
    export.to_onnx(qat_model, path, verify=False)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    # The stem's output goes through ReLU to a learned range: an integer convolution.
    assert "QLinearConv" in ops


def test_four_bit_weights_export_on_their_grid(tmp_path):
    model = trained_qat_model(weight_bits=4, seed=3)
    result = export.to_onnx(model, tmp_path / "w4.onnx")
    assert result.max_error_steps < 2.0 and result.beyond_one_step <= 0.01
    proto = onnx.load(tmp_path / "w4.onnx")
    kernels = [numpy_helper.to_array(i) for i in proto.graph.initializer
               if i.data_type == TensorProto.INT8 and i.name.endswith("_quantized")]
    assert len(kernels) == 4 and all(np.abs(k).max() == 7 for k in kernels)


def test_quantize_option_and_float16_weights_are_refused_for_a_qat_model(qat_model, tmp_path):
    with pytest.raises(ValueError, match="learned ranges, with no calibration"):
        export.to_onnx(qat_model, tmp_path / "a.onnx", quantize="int8",
                       calibration_data=images())
    with pytest.raises(ValueError, match="float16_weights does not apply"):
        export.to_onnx(qat_model, tmp_path / "b.onnx", float16_weights=True)
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_saved_qat_model(qat_model, tmp_path, capsys):
    saved = tmp_path / "qat.keras"
    qat_model.save(saved)
    output = tmp_path / "qat.onnx"
    assert main([str(saved), "-o", str(output)]) == 0
    assert "QAT: 4 layers as int8 QDQ" in capsys.readouterr().out
    x = images(32, seed=4)
    assert_within_one_step(run(output, x), qat_model(x, training=False).numpy())
    np.save(tmp_path / "calibration.npy", x)
    # --validation without --int8: the QAT export is also verified on those inputs
    assert main([str(saved), "-o", str(output), "--validation",
                 str(tmp_path / "calibration.npy")]) == 0
    assert "on random inputs and 1 batches of validation_data" in capsys.readouterr().out
    status = main([str(saved), "-o", str(tmp_path / "int8.onnx"), "--int8", "--calibration",
                   str(tmp_path / "calibration.npy")])
    assert status != 0
    assert "no calibration" in capsys.readouterr().err
    assert not (tmp_path / "int8.onnx").exists()


def test_a_qat_model_that_saw_no_data_keeps_float_inputs(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_bn.prepare_qat(branchy_model())
    result = export.to_onnx(model, tmp_path / "unseen.onnx")
    ops = collections.Counter(node.op_type for node in onnx.load(tmp_path / "unseen.onnx")
                              .graph.node)
    # No range learned: no activation quantizer, and the kernels (on their grid) stay float.
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0
    assert result.max_error < 1e-4


# The int8 weight pass on hand-built graphs.

def conv_graph(weight, bias, input_scale=0.05):
    """x -> QuantizeLinear -> DequantizeLinear -> Conv(weight, bias) -> y."""
    channels = weight.shape[1]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[0], 5, 5])],
        [numpy_helper.from_array(np.array(input_scale, np.float32), "s"),
         numpy_helper.from_array(np.array(128, np.uint8), "z"),
         numpy_helper.from_array(weight.astype(np.float32), "w"),
         numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def on_grid_weight(rng, bits, shape=(4, 3, 3, 3)):
    levels = 2 ** (bits - 1) - 1
    integers = rng.integers(-levels, levels + 1, shape)
    integers[:, 0, 0, 0] = levels  # every channel reaches the grid's end
    steps = rng.uniform(0.01, 0.1, shape[0]).astype(np.float32)
    return (integers * steps[:, None, None, None]).astype(np.float32), integers, steps


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_on_grid_recovers_integers_and_steps(bits):
    weight, integers, steps = on_grid_weight(np.random.default_rng(bits), bits)
    found = qdq_passes.on_grid(weight, axis=0)
    assert found is not None
    np.testing.assert_array_equal(found[0], integers)
    np.testing.assert_allclose(found[1], steps, rtol=1e-6)


def test_on_grid_refuses_float_weights_and_keeps_zero_channels():
    rng = np.random.default_rng(0)
    assert qdq_passes.on_grid(rng.normal(size=(4, 3, 3, 3)), axis=0) is None
    weight, _, _ = on_grid_weight(rng, 8)
    weight[2] = 0.0
    integers, steps = qdq_passes.on_grid(weight, axis=0)
    assert steps[2] == 1.0 and not integers[2].any()


def session_output(proto, x, optimize=True):
    options = onnxruntime.SessionOptions()
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_weights_to_int8_stores_the_grid_and_computes_the_same():
    rng = np.random.default_rng(1)
    weight, integers, _ = on_grid_weight(rng, 8)
    bias = rng.normal(size=4)
    proto = conv_graph(weight, bias)
    x = rng.uniform(-3, 3, (1, 3, 5, 5)).astype(np.float32)
    before = session_output(proto, x, optimize=False)
    assert qdq_passes.weights_to_int8(proto) == {"DequantizeLinear": 2}
    onnx.checker.check_model(proto, full_check=True)
    stored = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(stored["w_quantized"], integers)
    assert stored["b_quantized"].dtype == np.int32
    after = session_output(proto, x)
    # Only the bias rounds: by at most half of one accumulator step, input step * weight step.
    bound = 0.5 * 0.05 * stored["w_scale"].max()
    np.testing.assert_allclose(after, before, atol=bound + 1e-5)


def test_weights_to_int8_leaves_float_weights_and_unquantized_inputs():
    rng = np.random.default_rng(2)
    proto = conv_graph(rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4))
    assert qdq_passes.weights_to_int8(proto) == {}
    weight, _, _ = on_grid_weight(rng, 8)
    proto = conv_graph(weight, rng.normal(size=4))
    del proto.graph.node[:2]  # the Conv reads the graph input, no DequantizeLinear
    proto.graph.node[0].input[0] = "x"
    assert qdq_passes.weights_to_int8(proto) == {}


def test_a_graph_that_computes_something_else_is_refused(qat_model, tmp_path, monkeypatch):
    # A kernel off its trained values (10% larger): verification fails and writes nothing.
    def scale_first_kernel(proto):
        for initializer in proto.graph.initializer:
            values = numpy_helper.to_array(initializer)
            if values.dtype == np.float32 and values.ndim == 4:
                initializer.CopyFrom(numpy_helper.from_array(1.1 * values, initializer.name))
                return {}
        return {}

    monkeypatch.setattr(qdq_passes, "weights_to_int8", scale_first_kernel)
    with pytest.raises(keras_bn.VerificationError,
                       match="quantizes the input of QAT layer '(pointwise|hidden)' "
                             "otherwise than Keras"):
        export.to_onnx(qat_model, tmp_path / "wrong.onnx", batch_sizes=(8, 16))
    assert not (tmp_path / "wrong.onnx").exists()


def test_qat_trains_and_exports_for_its_target(qat_model, tmp_path):
    vnni_model = trained_qat_model(target="cpu-vnni", seed=4)
    path = tmp_path / "vnni.onnx"
    result = export.to_onnx(vnni_model, path)
    proto = onnx.load(path)
    int8 = [numpy_helper.to_array(i) for i in proto.graph.initializer
            if i.data_type == TensorProto.INT8 and i.name.endswith("_quantized")]
    assert all(np.abs(w).max() == 127 for w in int8)
    assert result.target == "cpu-vnni" and targets.check(proto, "cpu-vnni") == []
    # the static rule says, on any CPU, that this file saturates without VNNI
    assert any("16-bit sums" in problem for problem in targets.check(proto, "cpu"))
    ort = result.runtimes[0]
    assert ort.runtime == "onnxruntime"
    assert ort.checked == (quantization.cpu_has_vnni() is not False), ort
    # a model exports for the grid it trained on, and for no other
    with pytest.raises(ValueError, match="trained on the grid of target 'cpu', not of "
                                         "'cpu-vnni'"):
        export.to_onnx(qat_model, tmp_path / "x.onnx", target="cpu-vnni")
    with pytest.raises(ValueError, match="unknown int8 target 'gpu'"):
        export.to_onnx(qat_model, tmp_path / "x.onnx", target="gpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vnni.onnx"]


def test_prepare_qat_refuses_grids_its_target_cannot_run():
    model = branchy_model()
    with pytest.raises(ValueError, match="target 'cpu' keeps kernel integers within \\+-63"):
        keras_bn.prepare_qat(model, weight_bits=8)
    with pytest.raises(ValueError, match="unknown int8 target 'arm'"):
        keras_bn.prepare_qat(model, target="arm")
    layer = keras_bn.prepare_qat(model, weight_bits=4).get_layer("stem")
    assert (layer.weight_bits, layer.target) == (4, "cpu")
    assert layer.get_config()["target"] == "cpu"


def test_qat_for_tensorrt_writes_signed_activations_with_zero_point_0(tmp_path):
    model = trained_qat_model(target="tensorrt", seed=5)
    stem = model.get_layer("stem")
    low, high = stem.input_range()
    step = (high - low) / 255
    assert low == pytest.approx(-128 * step) and high == pytest.approx(127 * step)
    path = tmp_path / "trt.onnx"
    result = export.to_onnx(model, path)
    assert result.target == "tensorrt" and result.beyond_one_step <= 0.05
    assert any(line.startswith("activations_to_int8: QuantizeLinear uint8->int8")
               for line in result.graph_passes)
    proto = onnx.load(path)
    assert targets.check(proto, "tensorrt") == []
    zero_points = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    activation_zero_points = [zero_points[node.input[2]] for node in proto.graph.node
                              if node.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(
        z.dtype == np.int8 and not z.any() for z in activation_zero_points)
    # signed grids over ReLU outputs use half their codes: more values near a rounding boundary
    # than on the "cpu" grid, within what export allows (5% beyond one step)
    x = images(256, seed=6)
    expected = model(x, training=False).numpy()
    steps = np.abs(run(path, x) - expected) / quantization_step(expected)
    assert np.mean(steps > 1.0) <= 0.05


def test_activations_to_int8_keeps_what_the_graph_computes():
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05])
    zero_point = helper.make_tensor("zero_point", TensorProto.UINT8, [], [128])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"])]
    graph = helper.make_graph(
        nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [scale, zero_point],
        value_info=[helper.make_tensor_value_info("q", TensorProto.UINT8, [None, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.linspace(-8.0, 8.0, 64, dtype=np.float32).reshape(16, 4)
    before = _session_run(proto, x)
    changes = qdq_passes.activations_to_int8(proto)
    assert changes == {"QuantizeLinear uint8->int8": 1, "DequantizeLinear uint8->int8": 1}
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_array_equal(_session_run(proto, x), before)  # clipped alike at both ends
    assert qdq_passes.activations_to_int8(proto) == {}


def _session_run(proto, x):
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_tensorflow_grid_rounds_as_keras_does():
    # [-1, 1]: -min / scale is 127.5 in exact arithmetic, just below in float32: TensorFlow's
    # kernel (and so the Keras layer) takes 127 where tf2onnx's float64 half-to-even takes 128
    scale, zero_point = qdq_passes.tensorflow_grid(-1.0, 1.0)
    assert zero_point == 127 and scale == np.float32(2.0) / np.float32(255.0)
    quantizer = FakeQuantization(-1.0, 1.0)
    ends = np.array([[-1.01, 1.0, 1.01]], np.float32)
    codes = np.round(keras.ops.convert_to_numpy(quantizer(ends)) / scale)
    np.testing.assert_array_equal(codes, [[-127, 128, 128]])
    assert qdq_passes.tensorflow_grid(0.0, 6.0) == (pytest.approx(6 / 255), 0)
    assert qdq_passes.tensorflow_grid(-0.375, 3.678)[1] == 24


def test_a_range_ending_at_a_half_code_exports_keras_grid(tmp_path):
    # inputs rescaled to [-1, 1], as MobileNets do, and a learned range of exactly [-1, 1]
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    qat = keras_bn.prepare_qat(keras.Model(inputs, outputs))
    qat(np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 3)).astype("float32"),
        training=True)
    conv = qat.get_layer("conv")
    conv.input_min.assign(-1.0)
    conv.input_max.assign(1.0)
    path = tmp_path / "ends.onnx"
    result = export.to_onnx(qat, path, openvino=False)
    assert "zero_points_as_tensorflow: QuantizeLinear grid as TensorFlow's +1" in (
        result.graph_passes)
    proto = onnx.load(path)
    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    (quantize,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert constants[quantize.input[2]] == 127
    # pixels at and past both ends of the range: every one on Keras's side of it
    x = np.random.default_rng(1).choice([-2.0, 0.0, 127.5, 255.0, 256.0], (16, 8, 8, 3))
    x = x.astype("float32")
    np.testing.assert_allclose(run(path, x), qat(x, training=False).numpy(), atol=1e-5)


def test_qat_export_verifies_on_validation_data(qat_model, tmp_path):
    x = images(40, seed=9)
    result = export.to_onnx(qat_model, tmp_path / "qat.onnx", validation_data=x,
                            openvino=False)
    assert result.layer_check[0] == 2 and result.layer_check[2] <= 0.01
    assert result.validation_batches == 2  # 32 + 8 images
    assert "on random inputs and 2 batches of validation_data" in result.summary()
    # a wrong batch is named before any conversion, and a float model takes no data
    with pytest.raises(ValueError, match="validation_data.*expected shape"):
        export.to_onnx(qat_model, tmp_path / "bad.onnx", validation_data=x[:, :6])
    with pytest.raises(ValueError, match="validation_data is used only with quantize='int8' or "
                                         "a QAT model"):
        export.to_onnx(branchy_model(), tmp_path / "float.onnx", validation_data=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.onnx"]


def test_verification_runs_on_validation_data_batches(qat_model):
    from export import conversion, keras_comparison

    x = images(70, seed=10)
    inputs, names, nchw = conversion.graph_interface(qat_model, None, None, False)
    graph = conversion.convert(export.freeze(qat_model), inputs, names, 17, nchw)
    runs = keras_comparison.data_runs(qat_model, graph, x, names, nchw, max_batches=2)
    assert [run.where for run in runs] == ["validation_data batch 0", "validation_data batch 1"]
    np.testing.assert_array_equal(runs[1].feed["image"], x[32:64])
    np.testing.assert_allclose(runs[1].expected[0], qat_model(x[32:64], training=False).numpy())
