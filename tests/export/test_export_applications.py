"""Keras applications (weights=None, BN statistics randomized) export with every BN folded."""

import keras
import numpy as np
import onnx
import onnxruntime
import pytest

import export


@pytest.mark.parametrize("name, batchnorms", [("MobileNetV2", 52), ("ResNet50", 53)])
def test_application_exports_without_batchnorm(name, batchnorms, tmp_path, randomize,
                                               normalization_ops):
    model = randomize(getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3)))
    path = tmp_path / f"{name}.onnx"
    result = export.to_onnx(model, path)

    assert len(result.folded) == batchnorms and result.frozen == []
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert normalization_ops.isdisjoint(ops)
    assert result.max_error < 1e-4

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 3):
        x = np.random.default_rng(batch_size).uniform(-1, 1, (batch_size, 64, 64, 3))
        x = x.astype("float32")
        (got,) = session.run(None, {result.input_names[0]: x})
        # The error relative to the largest output, as to_onnx measures it.
        want = keras.ops.convert_to_numpy(model(x, training=False))
        assert got.shape == want.shape == (batch_size, 1000)
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
