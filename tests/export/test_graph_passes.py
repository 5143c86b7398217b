"""The exact ONNX graph passes that run after tf2onnx (export/graph_passes.py)."""

import keras
import numpy as np
import onnx
import onnxruntime

import export
import keras_bn
from conftest import randomize_batchnorm


def node_types(path):
    return [node.op_type for node in onnx.load(path).graph.node]


def padded_network(relu_before_pool=True):
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.ZeroPadding2D(2)(inputs)  # Pad -> Conv
    x = keras.layers.Conv2D(8, 5, strides=2, use_bias=False)(x)
    x = keras_bn.BatchNormalization()(x)
    if relu_before_pool:
        x = keras.layers.ReLU()(x)
    x = keras.layers.ZeroPadding2D(1)(x)  # Pad -> MaxPool (exact only on ReLU outputs)
    x = keras.layers.MaxPooling2D(3, strides=2)(x)
    x = keras.layers.ZeroPadding2D(1)(x)  # symmetric, before a depthwise conv: Pad -> Conv
    x = keras.layers.DepthwiseConv2D(3, use_bias=False)(x)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(x)  # asymmetric: stays a Pad (faster in ORT)
    x = keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False)(x)
    x = keras_bn.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)  # GlobalAveragePool + Squeeze -> ReduceMean
    outputs = keras.layers.Dense(4)(x)
    return randomize_batchnorm(keras.Model(inputs, outputs))


def test_passes_remove_pads_and_the_squeeze_and_keep_outputs_equal(tmp_path):
    model = padded_network()
    result = export.to_onnx(model, tmp_path / "model.onnx")
    types = node_types(result.path)
    assert types.count("Pad") == 1  # the asymmetric one
    assert "Squeeze" not in types and "GlobalAveragePool" not in types
    assert types.count("ReduceMean") == 1
    assert result.graph_passes == [
        "fold_pad_into_conv: Pad -1",  # tf2onnx merges the symmetric one itself
        "fold_pad_into_max_pool: Pad -1",
        "global_average_pool_and_squeeze_to_reduce_mean: "
        "GlobalAveragePool -1, Squeeze -1, ReduceMean +1",
    ]
    assert result.max_error < 1e-4
    # And independently of to_onnx's own check: asymmetric pads and negative inputs included.
    x = np.random.default_rng(1).normal(0, 3, (5, 16, 16, 3)).astype("float32")
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    onnx_output = session.run(None, {"image": x})[0]
    np.testing.assert_allclose(onnx_output, model(x, training=False), rtol=1e-4, atol=1e-4)


def test_a_pad_before_max_pool_stays_when_its_input_can_be_negative(tmp_path):
    # Without the ReLU, a zero pad can be the maximum of a window of negative values.
    model = padded_network(relu_before_pool=False)
    result = export.to_onnx(model, tmp_path / "model.onnx")
    assert node_types(result.path).count("Pad") == 2
    assert "fold_pad_into_max_pool" not in " ".join(result.graph_passes)
    assert result.max_error < 1e-4
