"""export.to_onnx: conversion, onnx.checker, onnxruntime parity, options, atomic write, errors."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

import export
from export import conversion, onnx_export, runtimes
from keras_bn import verification


def _run(path, feed):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _relative_error(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_export_folds_freezes_and_matches_keras(model, tmp_path, normalization_ops):
    path = tmp_path / "residual.onnx"
    result = export.to_onnx(model, path)

    graph = onnx.load(path).graph
    ops = [node.op_type for node in graph.node]
    assert normalization_ops.isdisjoint(ops)
    assert result.node_counts == {op: ops.count(op) for op in set(ops)}
    assert result.num_nodes == len(ops)
    # Two BN folded into conv and dense; the one after Add is a single Mul (+ its Add).
    assert ops.count("Mul") == 1
    assert [name for name, _ in result.frozen] == ["bn_add"]
    assert len(result.folded) == 2 and result.removed == ["dropout"]
    assert result.input_names == ["image"] and result.output_names == ["logits"]
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.file_size == os.path.getsize(path) and result.path == str(path)
    assert 0 <= result.max_error < 1e-4 and result.batch_sizes == (1, 3)

    # Parity checked here too, on fresh inputs, rather than trusting the result's number.
    for batch_size in (1, 3):
        x = np.random.default_rng(10 + batch_size).standard_normal((batch_size, 8, 8, 3))
        x = x.astype("float32")
        (got,) = _run(path, {"image": x})
        want = keras.ops.convert_to_numpy(model(x, training=False))
        assert got.shape == want.shape
        assert _relative_error(got, want) < 1e-4
    assert [f.name for f in tmp_path.iterdir()] == ["residual.onnx"]  # no temporary left


def test_no_fold_freezes_every_bn_to_mul_add(model, tmp_path, normalization_ops):
    result = export.to_onnx(model, tmp_path / "frozen.onnx", fold=False)
    assert result.folded == [] and len(result.frozen) == 3
    assert normalization_ops.isdisjoint(result.node_counts)
    assert result.max_error < 1e-4


def test_channels_first_input(model, tmp_path):
    path = tmp_path / "nchw.onnx"
    result = export.to_onnx(model, path, channels_first=True, input_names=["pixels (NCHW)"],
                            output_names=["class scores"])
    graph = onnx.load(path).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 8, 8]
    assert result.channels_first and "Transpose" not in result.node_counts
    x = np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype("float32")
    (got,) = _run(path, {"pixels (NCHW)": x.transpose(0, 3, 1, 2)})
    assert _relative_error(got, keras.ops.convert_to_numpy(model(x, training=False))) < 1e-4
    assert [o.name for o in graph.output] == ["class scores"]


def test_float16_weights_halve_the_file(tmp_path, randomize):
    inputs = keras.Input((32,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(512)(inputs))
    model = randomize(keras.Model(inputs, keras.layers.Dense(10)(hidden)))
    full = export.to_onnx(model, tmp_path / "full.onnx")
    half = export.to_onnx(model, tmp_path / "half.onnx", float16_weights=True)
    assert half.float16_weights and half.file_size < 0.55 * full.file_size
    initializers = onnx.load(tmp_path / "half.onnx").graph.initializer
    big = [t for t in initializers if numpy_helper.to_array(t).size > 1]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert 0 < half.max_error < 1e-2


def test_mixed_precision_model(tmp_path, randomize):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, dtype="mixed_float16")(inputs)
    x = keras.layers.BatchNormalization(dtype="mixed_float16")(x)
    x = keras.layers.BatchNormalization(dtype="mixed_float16")(keras.layers.Add()([x, x]))
    outputs = keras.layers.Dense(2, dtype="float32")(keras.layers.Flatten()(x))
    result = export.to_onnx(randomize(keras.Model(inputs, outputs)), tmp_path / "mixed.onnx")
    # float16 arithmetic in both runtimes: agreement to float16 precision, not float32's
    assert 0 < result.max_error < 1e-2


def _two_in_two_out():
    image = keras.Input((6, 6, 2), name="image")
    extra = keras.Input((3,), name="extra")
    x = keras.layers.Conv2D(4, 3, name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    x = keras.layers.Concatenate()([x, extra])
    x = keras.layers.BatchNormalization(name="bn_concat")(x)
    return keras.Model({"image": image, "extra": extra},
                       [keras.layers.Dense(2, name="a")(x), keras.layers.Dense(1, name="b")(x)])


def test_multiple_inputs_and_outputs(tmp_path, randomize):
    model = randomize(_two_in_two_out())
    path = tmp_path / "two.onnx"
    result = export.to_onnx(model, path)
    assert result.output_names == ["a", "b"]
    rng = np.random.default_rng(6)
    inputs = {"image": rng.standard_normal((3, 6, 6, 2)).astype("float32"),
              "extra": rng.standard_normal((3, 3)).astype("float32")}
    got = _run(path, {name: inputs[name] for name in result.input_names})
    want = model(inputs, training=False)
    for g, w in zip(got, want):
        assert _relative_error(g, keras.ops.convert_to_numpy(w)) < 1e-4


def test_sequential_model(tmp_path, randomize, normalization_ops):
    model = randomize(keras.Sequential([
        keras.Input((10,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"), keras.layers.Dropout(0.3),
        keras.layers.BatchNormalization(), keras.layers.Dense(2),
    ]))
    path = tmp_path / "sequential.onnx"
    result = export.to_onnx(model, path)
    assert (len(result.folded), len(result.frozen), len(result.removed)) == (2, 0, 1)
    assert normalization_ops.isdisjoint(result.node_counts)
    x = np.random.default_rng(7).standard_normal((5, 10)).astype("float32")
    (got,) = _run(path, {result.input_names[0]: x})
    assert _relative_error(got, keras.ops.convert_to_numpy(model(x, training=False))) < 1e-4

    # Built with build(), no keras.Input: freeze still has an input to rebuild on.
    built = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()])
    built.build((None, 3))
    result = export.to_onnx(randomize(built), tmp_path / "built.onnx", fold=False)
    assert len(result.frozen) == 1 and result.max_error < 1e-4


def test_captured_constants_stay_constants(tmp_path, randomize):
    """A Normalization layer's mean and variance are tensors, not variables: they must become
    constants, not extra graph inputs (as tf2onnx.convert.from_function would make them)."""
    inputs = keras.Input((6, 6, 3), name="pixels")
    x = keras.layers.Normalization(mean=[0.5, 0.1, -0.2], variance=[4.0, 2.0, 0.5])(inputs)
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
    model = randomize(keras.Model(inputs, keras.layers.Flatten()(x)))
    path = tmp_path / "normalized.onnx"
    result = export.to_onnx(model, path)
    assert [i.name for i in onnx.load(path).graph.input] == ["pixels"]
    assert result.max_error < 1e-4


def test_exports_a_keras_file_saved_under_jax(tmp_path):
    """A model trained under JAX exports here under TensorFlow, matching JAX's own outputs."""
    script = textwrap.dedent(f"""
        import os
        os.environ["KERAS_BACKEND"] = "jax"
        import keras, numpy as np, keras_bn
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
        x = keras_bn.BatchNormalization()(x)
        y = keras.layers.Conv2D(4, 1)(inputs)
        x = keras_bn.BatchNormalization()(keras.layers.Add()([x, y]))
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
        data = np.random.default_rng(0).standard_normal((16, 8, 8, 3)).astype("float32")
        model.compile("sgd", "mse")
        model.fit(data, np.zeros((16, 3)), epochs=2, batch_size=8, verbose=0)
        x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype("float32")
        np.savez(r"{tmp_path / 'reference.npz'}", x=x, y=np.asarray(model(x, training=False)))
        model.save(r"{tmp_path / 'jax.keras'}")
        assert keras.backend.backend() == "jax"
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)

    result = export.to_onnx(tmp_path / "jax.keras", tmp_path / "jax.onnx")
    assert len(result.folded) == 1 and len(result.frozen) == 1
    reference = np.load(tmp_path / "reference.npz")
    (got,) = _run(tmp_path / "jax.onnx", {result.input_names[0]: reference["x"]})
    assert _relative_error(got, reference["y"]) < 1e-4


def _corrupt_first_weight(convert):
    def corrupted(*args, **kwargs):
        proto = convert(*args, **kwargs)
        weights = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.5,
                                                 weights.name))
        return proto
    return corrupted


def test_verification_failure_writes_nothing(model, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    monkeypatch.setattr(conversion, "convert", _corrupt_first_weight(conversion.convert))
    with pytest.raises(export.VerificationError, match="differs from Keras"):
        export.to_onnx(model, path)
    assert path.read_bytes() == b"previous export"
    assert [f.name for f in tmp_path.iterdir()] == ["model.onnx"]
    # verify=False trusts the (wrong) conversion: the check is what caught it.
    assert export.to_onnx(model, path, verify=False).max_error is None


def _poison_first_weight(convert):
    def poisoned(*args, **kwargs):
        proto = convert(*args, **kwargs)
        weights = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        values = numpy_helper.to_array(weights).copy()
        values.flat[0] = np.nan
        weights.CopyFrom(numpy_helper.from_array(values, weights.name))
        return proto
    return poisoned


def test_non_finite_onnx_output_fails_verification(model, tmp_path, monkeypatch):
    monkeypatch.setattr(conversion, "convert", _poison_first_weight(conversion.convert))
    with pytest.raises(export.VerificationError, match="holds NaN or inf where Keras's output is "
                                                       "finite"):
        export.to_onnx(model, tmp_path / "model.onnx", tolerance=1e9)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_fold_is_a_verification_error(model, tmp_path, monkeypatch):
    from keras_bn.folding import arrays

    right = arrays.fold_after_conv

    def wrong(kernel, bias, a, b):
        kernel, bias = right(kernel, bias, a, b)
        return kernel, bias + 1.0

    monkeypatch.setattr(arrays, "fold_after_conv", wrong)
    with pytest.raises(export.VerificationError, match="Folding BN changed the outputs"):
        export.to_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file(model, tmp_path, monkeypatch):
    def refuse(source, target):
        raise OSError("disk full")
    monkeypatch.setattr(onnx_export.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        export.to_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"opset": 5}, "opset must be an integer from 13 to 18"),
    ({"batch_sizes": (2, 2)}, "two different positive sizes"),
    ({"dynamic_sizes": (32,)}, "dynamic_sizes must hold at least two different positive sizes"),
    ({"dynamic_sizes": (0, 32)}, "dynamic_sizes must hold"),
    ({"tolerance": 0}, "tolerance must be a positive"),
    ({"input_names": ["a", "b"]}, "input_names must hold 1"),
    ({"output_names": ["image"]}, "input and output names must differ"),
])
def test_bad_arguments(model, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export.to_onnx(model, tmp_path / "x.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_and_models(model, tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        export.to_onnx(model, tmp_path / "missing" / "x.onnx")
    with pytest.raises(OSError, match="is a directory"):
        export.to_onnx(model, tmp_path)
    (tmp_path / "model.keras").write_text("")
    with pytest.raises(ValueError, match="the model file itself"):
        export.to_onnx(tmp_path / "model.keras", tmp_path / "model.keras")
    with pytest.raises(FileNotFoundError, match="no such model file"):
        export.to_onnx(tmp_path / "absent.keras", tmp_path / "x.onnx")
    (tmp_path / "notes.keras").write_text("not a zip archive")
    with pytest.raises(ValueError, match="could not load"):
        export.to_onnx(tmp_path / "notes.keras", tmp_path / "x.onnx")
    (tmp_path / "weights.h5").write_text("")
    with pytest.raises(ValueError, match="ending in .keras"):
        export.to_onnx(tmp_path / "weights.h5", tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="keras.Model"):
        export.to_onnx(np.zeros(3), tmp_path / "x.onnx")

    fixed = keras.Input((4,), batch_size=2)
    fixed_batch = keras.Model(fixed, keras.layers.Dense(2)(fixed))
    with pytest.raises(ValueError, match="first dimension must be None. Received: input .* "
                                         r"with shape \(2, 4\)"):
        export.to_onnx(fixed_batch, tmp_path / "x.onnx")
    flat = keras.Input((5,))
    dense = keras.Model(flat, keras.layers.Dense(2)(flat))
    with pytest.raises(ValueError, match="rank-4"):
        export.to_onnx(dense, tmp_path / "x.onnx", channels_first=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.keras", "notes.keras",
                                                          "weights.h5"]


def _fully_convolutional(randomize):
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    return randomize(keras.Model(inputs, keras.layers.Dense(5, name="logits")(pooled)))


def test_unknown_height_and_width_export_as_dynamic_axes(tmp_path, randomize, monkeypatch):
    """keras.Input((None, None, 3)): the graph takes any size, verified at two sizes."""
    model = _fully_convolutional(randomize)
    drawn = []
    random_inputs = verification.random_inputs

    def spy(*args, **kwargs):
        arrays = random_inputs(*args, **kwargs)
        if "unknown_size" in kwargs:  # the ONNX check's draws, not the fold check's
            drawn.append([a.shape for a in arrays])
        return arrays

    monkeypatch.setattr(verification, "random_inputs", spy)
    path = tmp_path / "any_size.onnx"
    result = export.to_onnx(model, path)
    assert drawn == [[(1, 32, 32, 3)], [(3, 64, 64, 3)]]  # both kinds of dimension vary
    assert result.dynamic_sizes == (32, 64) and result.batch_sizes == (1, 3)
    assert "(batch sizes 1, 3; unknown dimensions at sizes 32, 64)" in result.summary()
    dims = [d.dim_value or d.dim_param for d in onnx.load(path).graph.input[0].type.tensor_type
            .shape.dim]
    assert dims == ["batch", "image_dim1", "image_dim2", 3]
    assert result.input_shapes == [tuple(dims)] and result.folded and result.max_error < 1e-4
    for shape in [(2, 16, 12, 3), (1, 45, 23, 3)]:
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype("float32")
        (got,) = _run(path, {"image": x})
        assert _relative_error(got, keras.ops.convert_to_numpy(model(x, training=False))) < 1e-4

    drawn.clear()
    result = export.to_onnx(model, path, batch_sizes=(2, 1, 4), dynamic_sizes=(16, 12),
                            channels_first=True)
    assert drawn == [[(2, 16, 16, 3)], [(1, 12, 12, 3)], [(4, 16, 16, 3)]]
    assert result.input_shapes == [("batch", 3, "image_dim2", "image_dim3")]
    x = np.random.default_rng(0).standard_normal((2, 16, 12, 3)).astype("float32")
    (got,) = _run(path, {"image": x.transpose(0, 3, 1, 2)})
    assert _relative_error(got, keras.ops.convert_to_numpy(model(x, training=False))) < 1e-4
    # Known dimensions: dynamic_sizes has nothing to size, and is not reported.
    drawn.clear()
    assert export.to_onnx(_two_in_two_out(), path).dynamic_sizes == ()
    assert drawn == [[(1, 3), (1, 6, 6, 2)], [(3, 3), (3, 6, 6, 2)]]  # in model.inputs order


def test_unknown_sequence_length(tmp_path):
    inputs = keras.Input((None, 4), name="steps")
    x = keras.layers.BatchNormalization()(keras.layers.Dense(6)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    path = tmp_path / "sequence.onnx"
    result = export.to_onnx(model, path)
    assert result.input_shapes == [("batch", "steps_dim1", 4)] and result.max_error < 1e-4
    x = np.random.default_rng(1).standard_normal((3, 7, 4)).astype("float32")
    (got,) = _run(path, {"steps": x})
    assert _relative_error(got, keras.ops.convert_to_numpy(model(x, training=False))) < 1e-4


def test_a_wrong_dynamic_size_fails_verification(tmp_path, randomize, monkeypatch):
    """A graph right at one size and wrong at another is caught by the second size."""
    model = _fully_convolutional(randomize)
    right = runtimes.session

    class WrongAtSize64:
        def __init__(self, data, optimized=True):
            self.session = right(data, optimized)

        def run(self, names, feed):
            outputs = self.session.run(names, feed)
            return [o * 2 if feed["image"].shape[1] == 64 else o for o in outputs]

    monkeypatch.setattr(runtimes, "session", WrongAtSize64)
    with pytest.raises(export.VerificationError, match=r"differs from Keras .* \(batch size 3, "
                                                       r"unknown dimensions 64\)"):
        export.to_onnx(model, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_library_error_leaves_as_a_documented_one(model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("unk__3")  # what a converter's internal lookup might raise

    monkeypatch.setattr(conversion, "convert", broken)
    with pytest.raises(ValueError, match=r"export failed: KeyError in builtins: 'unk__3'"):
        export.to_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_constant_outputs_is_not_called_verified(tmp_path):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, kernel_initializer="zeros")(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    result = export.to_onnx(keras.Model(inputs, outputs), tmp_path / "constant.onnx")
    assert result.outputs_constant
    assert "NOT verified: Keras's outputs are the same for every random input" in result.summary()


def test_conversion_memory_stays_near_the_weights_size(monkeypatch):
    """tf2onnx deep-copies the graph before each of its ONNX optimizers; the dropped copies are
    collected (`conversion._collected_between_optimizers`), not left to pile up: without that,
    this model's 16 MiB of weights took 0.8 GiB more in the optimizers (VGG19: 9.4 GiB)."""
    import threading
    import time

    from tf2onnx import optimizer

    inputs = keras.Input((32, 32, 3), name="image")
    h = inputs
    for _ in range(8):
        h = keras.layers.Conv2D(256, 3, padding="same", activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h)))
    weights = sum(w.nbytes for w in model.get_weights())
    frozen = export.freeze(model, verify=False)
    specs, names, nchw = conversion.graph_interface(frozen, None, None, False)

    def resident():
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    growth, original = [], optimizer.optimize_graph

    def measured(*args, **kwargs):  # the peak resident memory the optimizers add
        start, peak, done = resident(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], resident())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            return original(*args, **kwargs)
        finally:
            done.set()
            sampler.join()
            growth.append(peak[0] - start)

    monkeypatch.setattr(optimizer, "optimize_graph", measured)
    conversion.convert(frozen, specs, names, 17, nchw)
    assert len(growth) == 1 and growth[0] < 10 * weights, growth[0] / weights


def test_conversion_leaves_a_process_frozen_objects_frozen():
    import gc

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    specs, names, nchw = conversion.graph_interface(model, None, None, False)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        conversion.convert(export.freeze(model), specs, names, 17, nchw)
        # still frozen (a few frozen objects may have been freed meanwhile), not unfrozen to 0
        assert gc.get_freeze_count() > 0.99 * frozen
    finally:
        gc.unfreeze()
    conversion.convert(export.freeze(model), specs, names, 17, nchw)
    assert gc.get_freeze_count() == 0
