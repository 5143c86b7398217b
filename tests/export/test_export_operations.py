"""Functional graphs that hold operations, not only layers (`x + 3.0`, `keras.ops.*`, `Lambda`),
and the layers freeze rewrites so that tf2onnx converts them (grouped convolutions, exact GELU):
frozen, exported float, int8 and from QAT, and verified."""

import math

import keras
import numpy as np
import onnx
import onnxruntime
import pytest

import export
import keras_bn
from export.freezing import GroupsAsSplitsConv2D, gelu_with_erf


def operations_model(with_lambda=True):
    """BN next to operator arithmetic, a hard-swish and a swish written with keras.ops, a concat,
    a Lambda and a mean over the image: every one an `Operation` node of the graph."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn_conv")(x)
    hard_swish = x * keras.ops.relu6(x + 3.0) * (1.0 / 6.0)
    y = keras.layers.Conv2D(8, 1, name="branch")(inputs)
    y = keras_bn.BatchNormalization(name="bn_branch")(y)
    swish = y * keras.ops.sigmoid(y + 1.0)
    x = keras.ops.concatenate([hard_swish, 2.0 + keras.ops.negative(swish)], axis=-1)
    x = keras.layers.BatchNormalization(name="bn_after_concat")(x)  # after an op: frozen
    if with_lambda:
        x = keras.layers.Lambda(lambda t: t * 0.5 + 0.25, name="lambda")(x)
    x = keras.layers.Conv2D(12, 3, strides=2, name="head_conv")(x)
    x = keras.layers.BatchNormalization(name="bn_head")(x)
    x = keras.ops.mean(x, axis=(1, 2))
    outputs = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inputs, outputs, name="operations")


def images(count, size=8, seed=0):
    return np.random.default_rng(seed).standard_normal((count, size, size, 3)).astype("float32")


@pytest.fixture
def model(randomize):
    keras.utils.set_random_seed(3)  # the same weights every run
    return randomize(operations_model(), seed=3)


def _varied(outputs):
    """Outputs that differ from example to example, so a comparison of them can fail."""
    return float(np.std(outputs, axis=0).mean()) > 1e-2 * float(np.abs(outputs).mean())


def _session(path):
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_freeze_copies_operations_and_folds_the_bn_beside_them(model):
    frozen = export.freeze(model)
    report = frozen.freeze_report
    assert sorted(report.folded) == [("bn_branch", "branch"), ("bn_conv", "conv"),
                                     ("bn_head", "head_conv")]
    assert [name for name, _ in report.frozen] == ["bn_after_concat"]
    x = images(6)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    assert _varied(want)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(frozen(x)), want, rtol=1e-5, atol=1e-5)
    # the original keeps its layers and numbers
    assert model.get_layer("bn_conv") is not None


def test_float_export_of_operations_verifies(model, tmp_path, normalization_ops):
    path = tmp_path / "operations.onnx"
    result = export.to_onnx(model, path, openvino=False)
    assert len(result.folded) == 3 and len(result.frozen) == 1
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert normalization_ops.isdisjoint(ops) and "Concat" in ops
    assert "Transpose" not in ops[1:-1]  # tf2onnx's transpose optimizer ran (see below)
    x = images(4, seed=1)
    (got,) = _session(path).run(None, {"image": x})
    want = keras.ops.convert_to_numpy(model(x, training=False))
    assert _varied(want)
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


def test_scalar_added_to_a_convolution_keeps_tf2onnx_transpose_optimizer(tmp_path):
    """tf2onnx 1.17's transpose optimizer fails on `conv(x) + 3.0` and then skips the whole graph,
    leaving a Transpose pair around every convolution; freeze makes the 3.0 a (1,) array."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x + 3.0)
    x = keras.layers.Conv2D(4, 3, padding="same")(1.5 + x)
    result = export.to_onnx(keras.Model(inputs, x), tmp_path / "add.onnx", openvino=False)
    assert result.node_counts["Transpose"] == 2  # NHWC -> NCHW at the input, back at the output


def test_int8_export_of_operations(model, tmp_path):
    path = tmp_path / "operations.int8.onnx"
    # An untrained network's logits on noise are near ties, so its top-1 agreement says little:
    # the guard is off, and the graph is judged by its error against Keras below.
    result = export.to_onnx(model, path, quantize="int8", calibration_data=images(64, seed=2),
                            validation_data=images(64, seed=3), openvino=False, verbose=0,
                            min_agreement=0)
    assert result.target == "cpu"
    counts = result.node_counts
    assert counts["QuantizeLinear"] > 0 and counts["Conv"] == 3
    x = images(16, seed=4)
    (got,) = _session(path).run(None, {"image": x})
    want = keras.ops.convert_to_numpy(model(x, training=False))
    assert _varied(want)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 0.1


def test_qat_export_of_operations(tmp_path, randomize):
    keras.utils.set_random_seed(0)
    # prepare_qat copies a Lambda around its function (keras_bn.folding.graph.copy_operation):
    # from its config, Keras would refuse it outside safe_mode=False.
    qat = keras_bn.prepare_qat(randomize(operations_model()))
    qat.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    x = images(64, seed=5)
    qat.fit(x, np.random.default_rng(5).integers(0, 5, len(x)), batch_size=16, epochs=1,
            verbose=0)
    path = tmp_path / "operations.qat.onnx"
    result = export.to_onnx(qat, path, openvino=False)
    assert len(result.qat_layers) == 3
    assert result.max_error_steps is not None and result.layer_check[2] <= 0.05
    (got,) = _session(path).run(None, {"image": x[:8]})
    want = keras.ops.convert_to_numpy(qat(x[:8], training=False))
    assert _varied(want)


@pytest.fixture(scope="module")
def mobilenet_v3():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10,
                                                classifier_activation=None)
    # Population statistics of random images: every BN normalizes what it sees, as after
    # training, so activations and outputs neither vanish nor explode.
    keras_bn.estimate_population_statistics(
        model, np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype("float32"),
        verbose=0)
    return model


def _mobilenet_images(count, seed):
    return np.random.default_rng(seed).uniform(0, 255, (count, 32, 32, 3)).astype("float32")


def test_mobilenet_v3_small_float_export(mobilenet_v3, tmp_path, normalization_ops):
    path = tmp_path / "mobilenet_v3.onnx"
    result = export.to_onnx(mobilenet_v3, path, openvino=False)
    assert len(result.folded) == 34 and result.frozen == []
    counts = result.node_counts
    assert normalization_ops.isdisjoint(counts)
    assert counts["Transpose"] <= 2
    x = _mobilenet_images(4, seed=1)
    (got,) = _session(path).run(None, {result.input_names[0]: x})
    want = keras.ops.convert_to_numpy(mobilenet_v3(x, training=False))
    assert _varied(want)
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


def test_mobilenet_v3_small_int8_export(mobilenet_v3, tmp_path):
    # An untrained network's ten logits lie close together: top-1 agreement on random images
    # measures noise, so the guard is off here and the error is checked instead.
    path = tmp_path / "mobilenet_v3.int8.onnx"
    result = export.to_onnx(mobilenet_v3, path, quantize="int8",
                            calibration_data=_mobilenet_images(64, seed=2),
                            validation_data=_mobilenet_images(32, seed=3), min_agreement=0,
                            openvino=False, verbose=0)
    assert result.node_counts["QuantizeLinear"] > 30
    x = _mobilenet_images(16, seed=4)
    (got,) = _session(path).run(None, {result.input_names[0]: x})
    want = keras.ops.convert_to_numpy(mobilenet_v3(x, training=False))
    assert _varied(want)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 0.5


def test_mobilenet_v3_small_qat_export(mobilenet_v3, tmp_path):
    qat = keras_bn.prepare_qat(mobilenet_v3)
    qat(_mobilenet_images(32, seed=5), training=True)  # learned ranges from a batch
    result = export.to_onnx(qat, tmp_path / "mobilenet_v3.qat.onnx", openvino=False)
    assert len(result.qat_layers) == 34
    # judged layer by layer: each quantized input against Keras's, every quantizer before it
    # fed Keras's values, through MobileNetV3's hard-swish and squeeze-excite operations
    count, worst, fraction = result.layer_check
    assert count >= 30 and worst in result.qat_layers and fraction <= 0.05


def convnext_block():
    """ConvNeXt's block at a tiny size: a grouped convolution of one channel per group (Keras runs
    it through a jit_compile function), LayerNorm, exact GELU, and its layer scale as an op."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 2, strides=2, name="stem")(inputs)
    shortcut = x
    x = keras.layers.Conv2D(8, 3, padding="same", groups=8, name="depthwise")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="layer_norm")(x)
    x = keras.layers.Dense(16, name="expand")(x)
    x = keras.layers.Activation("gelu", name="gelu")(x)
    x = keras.layers.Dense(8, name="project")(x)
    x = shortcut + x * 0.5
    x = keras.layers.Conv2D(6, 3, padding="same", groups=2, name="grouped")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="gelu", name="logits")(x)
    return keras.Model(inputs, outputs, name="convnext_block")


def test_convnext_block_exports_with_depthwise_and_erf(tmp_path):
    keras.utils.set_random_seed(1)
    model = convnext_block()
    frozen = export.freeze(model)
    rewritten = dict(frozen.freeze_report.rewritten)
    assert "depthwise" in rewritten["depthwise"] and "2 convolutions" in rewritten["grouped"]
    assert rewritten["gelu"] == rewritten["logits"] == "exact GELU with Erf"
    assert isinstance(frozen.get_layer("depthwise"), keras.layers.DepthwiseConv2D)
    assert isinstance(frozen.get_layer("grouped"), GroupsAsSplitsConv2D)
    x = images(4, seed=6)
    want = keras.ops.convert_to_numpy(model(x))
    assert _varied(want)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(frozen(x)), want, rtol=1e-5, atol=1e-5)

    path = tmp_path / "convnext_block.onnx"
    result = export.to_onnx(model, path, openvino=False)
    assert result.max_error < 1e-4
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "Erf" in ops and "Erfc" not in ops
    (got,) = _session(path).run(None, {"image": x})
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


def test_exact_gelu_as_an_operation_exports_with_erf(tmp_path):
    # keras.ops.gelu(approximate=False) in the graph: TensorFlow lowers it to Erfc, which tf2onnx
    # cannot convert; freeze writes it with Erf
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,), name="features")
    hidden = keras.ops.gelu(keras.layers.Dense(8, name="dense")(inputs), approximate=False)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))
    path = tmp_path / "gelu.onnx"
    result = export.to_onnx(model, path, openvino=False)
    assert "exact GELU with Erf" in dict(export.freeze(model).freeze_report.rewritten).values()
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "Erf" in ops and "Erfc" not in ops and result.max_error < 1e-5
    x = np.random.default_rng(0).normal(0.0, 3.0, (16, 6)).astype("float32")
    (got,) = _session(path).run(None, {"features": x})
    want = keras.ops.convert_to_numpy(model(x))
    assert _varied(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gelu_with_erf_matches_the_definition():
    x = np.linspace(-12.0, 12.0, 97)
    want = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    got = keras.ops.convert_to_numpy(gelu_with_erf(x.astype("float32")))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_frozen_rewrites_save_and_load(tmp_path):
    keras.utils.set_random_seed(2)
    frozen = export.freeze(convnext_block())
    path = tmp_path / "frozen.keras"
    frozen.save(path)
    loaded = keras.saving.load_model(path)
    x = images(2, seed=7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(frozen(x)), rtol=1e-6, atol=1e-6)
