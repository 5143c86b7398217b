"""keras_bn.fold_batchnorm on real Keras graphs: every producer, every refusal, the report."""

import logging

import keras
import numpy as np
import pytest
from keras import layers

import keras_bn
from keras_bn._keras_internals import flatten_layers
from keras_bn.folding import arrays, inference_affine

rng = np.random.default_rng(0)


def randomize(model, seed=0):
    """Random weights are already there; give every BN statistics far from 1 and 0."""
    generator = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            if layer.scale:
                sign = generator.choice([-1.0, 1.0], channels)
                layer.gamma.assign(generator.uniform(0.5, 2.0, channels) * sign)
            if layer.center:
                layer.beta.assign(generator.normal(0.0, 1.0, channels))
            layer.moving_mean.assign(generator.normal(0.0, 2.0, channels))
            layer.moving_variance.assign(generator.uniform(0.5, 3.0, channels))
    return model


def _all_layers(model):
    return flatten_layers(model)


def _bn_names(model):
    return {
        layer.name
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    }


def _batch(model, size=2):  # the size verification uses: JAX reuses its compiled ops
    shapes = [[size] + [8 if d is None else d for d in t.shape[1:]] for t in model.inputs]
    batch = [rng.normal(size=shape).astype("float32") for shape in shapes]
    return batch if len(batch) > 1 else batch[0]


def assert_same_outputs(original, folded, rtol=1e-4):
    x = _batch(original)
    expected = keras.tree.flatten(original(x, training=False))
    received = keras.tree.flatten(folded(x, training=False))
    assert len(expected) == len(received)
    for y, z in zip(expected, received):
        y, z = keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(z)
        scale = max(1.0, float(np.abs(y).max()))
        np.testing.assert_allclose(z, y, rtol=0, atol=rtol * scale)


def fold_and_check(model, folded_count, left_count=0):
    randomize(model)
    folded = keras_bn.fold_batchnorm(model)
    report = folded.fold_report
    assert isinstance(report, keras_bn.FoldReport)
    assert len(report.folded) == folded_count, str(report)
    assert len(report.left) == left_count, str(report)
    assert _bn_names(folded) == {name.split("/")[-1] for name, _ in report.left}
    assert report.max_error is not None and report.max_error <= 1e-4 * report.scale
    assert_same_outputs(model, folded)
    return folded, report


def chain(input_shape, *stack):
    inputs = keras.Input(input_shape)
    x = inputs
    for layer in stack:
        x = layer(x)
    return keras.Model(inputs, x, name="chain")


def bn(**kwargs):
    return layers.BatchNormalization(name="bn", **kwargs)


CHANNELS_FIRST = {"data_format": "channels_first"}

PRODUCERS = {
    "conv1d_strided_dilated": ((20, 3), layers.Conv1D(6, 3, strides=2, name="p")),
    "conv1d_dilated_no_bias": (
        (20, 4),
        layers.Conv1D(6, 3, dilation_rate=2, use_bias=False, name="p"),
    ),
    "conv2d_groups": ((9, 9, 4), layers.Conv2D(6, 3, groups=2, padding="same", name="p")),
    "conv2d_strided_no_bias": ((9, 9, 3), layers.Conv2D(5, 3, strides=2, use_bias=False, name="p")),
    "conv2d_channels_first": ((4, 9, 9), layers.Conv2D(6, 3, groups=2, name="p", **CHANNELS_FIRST)),
    "conv3d": ((6, 6, 6, 2), layers.Conv3D(4, 3, dilation_rate=2, use_bias=False, name="p")),
    "conv3d_channels_first": (
        (2, 6, 6, 6),
        layers.Conv3D(4, 2, strides=2, name="p", **CHANNELS_FIRST),
    ),
    "depthwise1d": ((12, 3), layers.DepthwiseConv1D(3, depth_multiplier=2, name="p")),
    "depthwise2d_no_bias": (
        (9, 9, 3),
        layers.DepthwiseConv2D(3, depth_multiplier=3, use_bias=False, name="p"),
    ),
    "depthwise2d_channels_first": (
        (3, 9, 9),
        layers.DepthwiseConv2D(3, depth_multiplier=2, name="p", **CHANNELS_FIRST),
    ),
    "separable1d": ((12, 3), layers.SeparableConv1D(5, 3, depth_multiplier=2, name="p")),
    "separable2d_no_bias": ((9, 9, 3), layers.SeparableConv2D(5, 3, use_bias=False, name="p")),
    "separable2d_channels_first": (
        (3, 9, 9),
        layers.SeparableConv2D(5, 3, name="p", **CHANNELS_FIRST),
    ),
    "conv1d_transpose": ((7, 3), layers.Conv1DTranspose(5, 3, strides=2, name="p")),
    "conv2d_transpose_no_bias": ((5, 5, 3), layers.Conv2DTranspose(4, 3, use_bias=False, name="p")),
    "conv2d_transpose_channels_first": (
        (3, 5, 5),
        layers.Conv2DTranspose(4, 3, strides=2, name="p", **CHANNELS_FIRST),
    ),
    "conv3d_transpose": ((3, 3, 3, 2), layers.Conv3DTranspose(3, 2, strides=2, name="p")),
    "dense": ((7,), layers.Dense(5, name="p")),
    "dense_rank4_no_bias": ((3, 4, 7), layers.Dense(5, use_bias=False, name="p")),
}


@pytest.mark.parametrize("case", sorted(PRODUCERS))
def test_bn_after_every_producer_folds(case):
    input_shape, producer = PRODUCERS[case]
    axis = 1 if producer.get_config().get("data_format") == "channels_first" else -1
    model = chain(input_shape, producer, bn(axis=axis), layers.Activation("relu", name="relu"))
    folded, report = fold_and_check(model, folded_count=1)
    assert report.folded == [("bn", "p")]
    assert folded.get_layer("p").use_bias
    assert [layer.name for layer in folded.layers] == [model.layers[0].name, "p", "relu"]


CONSUMERS = {
    "conv2d_valid_groups": ((9, 9, 4), layers.Conv2D(6, 3, groups=2, name="c")),
    "conv2d_same_1x1_strided": (
        (9, 9, 4),
        layers.Conv2D(6, 1, strides=2, padding="same", name="c"),
    ),
    "conv1d_valid_channels_first": ((4, 12), layers.Conv1D(3, 3, name="c", **CHANNELS_FIRST)),
    "depthwise2d_valid": ((9, 9, 3), layers.DepthwiseConv2D(3, depth_multiplier=2, name="c")),
    "separable2d_valid": ((9, 9, 3), layers.SeparableConv2D(4, 3, depth_multiplier=2, name="c")),
    "separable1d_valid_no_bias": ((12, 3), layers.SeparableConv1D(4, 3, use_bias=False, name="c")),
    "dense_rank3": ((5, 6), layers.Dense(4, name="c")),
}


@pytest.mark.parametrize("case", sorted(CONSUMERS))
def test_bn_before_exact_consumer_folds_into_it(case):
    input_shape, consumer = CONSUMERS[case]
    axis = 1 if consumer.get_config().get("data_format") == "channels_first" else -1
    # BN fed by the input cannot go backwards; forwards it is exact.
    model = chain(input_shape, bn(axis=axis), consumer)
    _, report = fold_and_check(model, folded_count=1)
    assert report.folded == [("bn", "c")]
    assert report.folded_before == ["bn"]
    assert "following layer c" in str(report)


def test_bn_on_both_sides_of_one_conv():
    inputs = keras.Input((10, 10, 3))
    x = layers.Add(name="add")([inputs, inputs])
    x = layers.BatchNormalization(name="bn_in")(x)
    x = layers.Conv2D(4, 3, name="conv")(x)
    x = layers.BatchNormalization(name="bn_out")(x)
    model = keras.Model(inputs, x)
    _, report = fold_and_check(model, folded_count=2)
    assert sorted(report.folded) == [("bn_in", "conv"), ("bn_out", "conv")]


def _left_reason(report, name):
    return dict(report.left)[name]


def test_activation_in_producer_is_refused():
    model = chain(
        (9, 9, 3),
        layers.Conv2D(4, 3, activation="relu", name="conv"),
        bn(),
        layers.Conv2D(2, 3, padding="same", name="next"),
    )
    _, report = fold_and_check(model, folded_count=0, left_count=1)
    reason = _left_reason(report, "bn")
    assert "activation 'relu'" in reason and "SAME padding" in reason


def test_activation_in_producer_with_exact_consumer_folds_forward():
    model = chain(
        (9, 9, 3),
        layers.Conv2D(4, 3, activation="relu", name="conv"),
        bn(),
        layers.Conv2D(2, 1, name="next"),
    )
    _, report = fold_and_check(model, folded_count=1)
    assert report.folded == [("bn", "next")]


def test_producer_output_with_another_consumer_is_refused():
    inputs = keras.Input((9, 9, 3))
    y = layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(y)
    outputs = layers.Add(name="add")([x, y])
    model = keras.Model(inputs, outputs)
    _, report = fold_and_check(model, folded_count=0, left_count=1)
    assert "also feeds add" in _left_reason(report, "bn")


def test_producer_output_that_is_a_model_output_is_refused():
    inputs = keras.Input((6,))
    y = layers.Dense(4, name="dense")(inputs)
    x = layers.BatchNormalization(name="bn")(y)
    model = keras.Model(inputs, [x, y])
    _, report = fold_and_check(model, folded_count=0, left_count=1)
    assert "also a model output" in _left_reason(report, "bn")


def test_shared_producer_is_refused():
    inputs = keras.Input((9, 9, 3))
    conv = layers.Conv2D(3, 3, name="conv")
    a = layers.BatchNormalization(name="bn_a")(conv(inputs))
    b = layers.BatchNormalization(name="bn_b")(conv(layers.Activation("tanh")(inputs)))
    model = keras.Model(inputs, [a, b])
    _, report = fold_and_check(model, folded_count=0, left_count=2)
    assert "called 2 times" in _left_reason(report, "bn_a")


def test_shared_bn_is_refused():
    inputs = keras.Input((6,))
    norm = layers.BatchNormalization(name="bn")
    x = norm(layers.Dense(6, name="d1")(inputs))
    x = norm(layers.Dense(6, name="d2")(x))
    _, report = fold_and_check(keras.Model(inputs, x), folded_count=0, left_count=1)
    assert "called 2 times" in _left_reason(report, "bn")


def test_bn_on_another_axis_is_refused():
    model = chain((9, 9, 3), layers.Conv2D(4, 3, name="conv"), bn(axis=1))
    _, report = fold_and_check(model, folded_count=0, left_count=1)
    assert "axis 1" in _left_reason(report, "bn") and "axis 3" in _left_reason(report, "bn")


@pytest.mark.parametrize("merge", [layers.Add, layers.Concatenate])
def test_bn_after_a_merge_is_refused(merge):
    inputs = keras.Input((8, 8, 2))
    x = merge(name="merge")([inputs, inputs])
    x = layers.BatchNormalization(name="bn")(x)
    outputs = layers.GlobalAveragePooling2D(name="pool")(x)
    _, report = fold_and_check(keras.Model(inputs, outputs), folded_count=0, left_count=1)
    reason = _left_reason(report, "bn")
    assert f"fed by {merge.__name__} 'merge'" in reason and "GlobalAveragePooling2D" in reason


def test_bn_on_input_feeding_the_output_is_refused():
    model = chain((5,), bn())
    _, report = fold_and_check(model, folded_count=0, left_count=1)
    assert "fed by a model input" in _left_reason(report, "bn")
    assert "model output" in _left_reason(report, "bn")


@pytest.mark.parametrize(
    "consumer, words",
    [
        (layers.Conv2D(4, 3, padding="same", name="c"), "SAME padding"),
        (layers.DepthwiseConv2D(3, padding="same", name="c"), "SAME padding"),
        (layers.Conv2DTranspose(4, 1, name="c"), "transposed convolution"),
        (layers.Conv2D(4, 1, activation="relu", name="c"), None),
    ],
)
def test_bn_before_an_inexact_consumer_is_refused(consumer, words):
    inputs = keras.Input((8, 8, 3))
    x = layers.Activation("relu", name="relu")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, consumer(x))
    if words is None:
        # An activation after the consumer does not matter: BN meets only its linear part.
        fold_and_check(model, folded_count=1)
        return
    _, report = fold_and_check(model, folded_count=0, left_count=1)
    assert words in _left_reason(report, "bn")


def test_bn_before_a_conv_fed_twice_is_refused():
    inputs = keras.Input((8, 8, 3))
    norm = layers.BatchNormalization(name="bn")(layers.Activation("relu")(inputs))
    x = layers.Conv2D(3, 1, name="c1")(norm)
    y = layers.Conv2D(3, 1, name="c2")(norm)
    _, report = fold_and_check(keras.Model(inputs, [x, y]), folded_count=0, left_count=1)
    assert "feeds 2 layers (c1, c2)" in _left_reason(report, "bn")


def test_bn_called_in_training_mode_is_left():
    inputs = keras.Input((6,))
    x = layers.BatchNormalization(name="bn")(layers.Dense(6)(inputs), training=True)
    model = keras.Model(inputs, x)
    folded = keras_bn.fold_batchnorm(randomize(model), verify=False)
    assert "training=True" in _left_reason(folded.fold_report, "bn")


KERAS_BN_VARIANTS = [
    {"renorm": True},
    {"scale": False, "center": False},
    {"virtual_batch_size": 2, "unbiased_variance": False},
]
if keras.backend.backend() == "tensorflow":  # Keras accepts synchronized=True only there
    KERAS_BN_VARIANTS.append({"synchronized": True})


@pytest.mark.parametrize("kwargs", KERAS_BN_VARIANTS)
def test_keras_bn_layers_fold(kwargs):
    model = chain(
        (9, 9, 3),
        layers.Conv2D(4, 3, name="conv"),
        keras_bn.BatchNormalization(name="bn", **kwargs),
        layers.Conv2D(4, 3, name="next"),
    )
    _, report = fold_and_check(model, folded_count=1)
    assert report.folded == [("bn", "conv")]


def test_sequential_stays_sequential_with_its_names():
    model = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            layers.Conv2D(4, 3, use_bias=False, name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(name="relu"),
            layers.Flatten(name="flat"),
            layers.Dense(3, name="dense"),
            layers.BatchNormalization(name="bn2"),
        ],
        name="seq",
    )
    folded, report = fold_and_check(model, folded_count=2)
    assert isinstance(folded, keras.Sequential) and folded.name == "seq"
    assert [layer.name for layer in folded.layers] == ["conv", "relu", "flat", "dense"]


def test_nested_models_fold_inside_and_keep_structure():
    inner_inputs = keras.Input((8, 8, 4))
    x = layers.Conv2D(4, 3, padding="same", name="inner_conv")(inner_inputs)
    x = layers.BatchNormalization(name="inner_bn")(x)
    inner = keras.Model(inner_inputs, x, name="inner")
    block = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            layers.DepthwiseConv2D(3, padding="same", name="dw"),
            layers.BatchNormalization(name="dw_bn"),
        ],
        name="block",
    )
    inputs = [keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")]
    conv = layers.Conv2D(4, 1, name="outer_conv")
    x = layers.BatchNormalization(name="outer_bn")(conv(layers.Add()(inputs)))
    x = inner(x)
    y = layers.BatchNormalization(name="after_inner")(inner(block(x)))
    model = keras.Model(inputs, {"x": x, "y": y}, name="outer")
    folded, report = fold_and_check(model, folded_count=3, left_count=1)
    assert ("inner/inner_bn", "inner/inner_conv") in report.folded
    assert ("block/dw_bn", "block/dw") in report.folded
    assert ("outer_bn", "outer_conv") in report.folded
    assert "nested model 'inner'" in _left_reason(report, "after_inner")
    assert [t.name for t in folded.inputs] == ["a", "b"]
    assert set(folded.output) == {"x", "y"}
    assert isinstance(folded.get_layer("block"), keras.Sequential)
    # The shared nested model stays one shared model.
    assert folded.get_layer("inner") is not inner
    assert len([layer for layer in folded.layers if layer.name == "inner"]) == 1


def test_bn_inside_a_custom_layer_is_reported_as_left():
    @keras.saving.register_keras_serializable(package="test_folding")
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(3, 3, padding="same")
            self.norm = layers.BatchNormalization(name="hidden_bn")

        def call(self, x):
            return self.norm(self.conv(x))

    model = chain((8, 8, 3), Block(name="block"), layers.Conv2D(2, 3, name="c"), bn())
    _, report = fold_and_check(model, folded_count=1, left_count=1)
    assert "inside Block 'block'" in _left_reason(report, "block/hidden_bn")


def test_original_model_is_untouched():
    model = randomize(chain((9, 9, 3), layers.Conv2D(4, 3, name="conv", use_bias=False), bn()))
    x = _batch(model)
    before_outputs = keras.ops.convert_to_numpy(model(x, training=False))
    before_weights = [w.copy() for w in model.get_weights()]
    before_layers = [layer.name for layer in model.layers]
    folded = keras_bn.fold_batchnorm(model)
    assert [layer.name for layer in model.layers] == before_layers
    assert not model.get_layer("conv").use_bias
    for old, new in zip(before_weights, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x, training=False)), before_outputs
    )
    assert all(new is not old for new in folded.layers for old in model.layers)
    assert not hasattr(model, "fold_report")


def test_folded_weights_keep_the_layer_dtype():
    model = randomize(
        chain(
            (6,), layers.Dense(4, dtype="float16", name="d"), layers.BatchNormalization(name="bn")
        )
    )
    folded = keras_bn.fold_batchnorm(model, tolerance=1e-2)
    assert folded.fold_report.tolerance == 1e-2
    assert {w.dtype for w in folded.get_layer("d").weights} == {"float16"}
    assert_same_outputs(model, folded, rtol=1e-2)


def test_subclassed_model_is_refused_clearly():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(3)
            self.norm = layers.BatchNormalization()

        def call(self, x):
            return self.norm(self.dense(x))

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="only rewrite Functional and Sequential"):
        keras_bn.fold_batchnorm(net)
    with pytest.raises(TypeError, match="expects a keras.Model"):
        keras_bn.fold_batchnorm(layers.Dense(3))
    with pytest.raises(ValueError, match="no known input shape"):
        keras_bn.fold_batchnorm(keras.Sequential([layers.Dense(3)]))


def test_report_text_and_verify_false():
    model = chain(
        (9, 9, 3),
        layers.Conv2D(4, 3, name="conv"),
        bn(),
        layers.ReLU(name="relu"),
        layers.BatchNormalization(name="bn_left"),
    )
    folded = keras_bn.fold_batchnorm(randomize(model), verify=False)
    report = folded.fold_report
    assert report.max_error is None
    text = str(report)
    assert text.splitlines()[0].startswith("folded 1 of 2 BatchNormalization layers")
    assert "folded bn into the preceding layer conv" in text
    assert "left   bn_left: " in text and "not verified" in text
    assert report.folded == [("bn", "conv")] and report.left[0][0] == "bn_left"


def test_verification_catches_a_wrong_fold(monkeypatch):
    right = arrays.fold_after_conv

    def wrong(kernel, bias, a, b):
        kernel, bias = right(kernel, bias, a, b)
        return kernel, bias + 1.0

    monkeypatch.setattr(arrays, "fold_after_conv", wrong)
    model = randomize(chain((6,), layers.Dense(4, name="d"), bn()))
    with pytest.raises(ValueError, match="changed the outputs"):
        keras_bn.fold_batchnorm(model)


def test_one_log_line_per_model(caplog):
    model = randomize(chain((9, 9, 3), layers.Conv2D(4, 3, name="conv"), bn()))
    with caplog.at_level(logging.INFO, logger="keras_bn.folding"):
        keras_bn.fold_batchnorm(model)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("keras_bn.folding")]
    assert len(lines) == 1 and lines[0].startswith("folded 1 of 1 BatchNormalization layers")


@pytest.mark.parametrize("layer_class", [layers.BatchNormalization, keras_bn.BatchNormalization])
def test_inference_affine_matches_the_layer(layer_class):
    model = randomize(chain((5, 4), layer_class(name="bn", epsilon=0.01)))
    norm = model.get_layer("bn")
    a, b = inference_affine(norm)
    assert a.dtype == b.dtype == np.float64 and a.shape == b.shape == (4,)
    x = rng.normal(size=(2, 5, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(norm(x, training=False))
    np.testing.assert_allclose(a * x + b, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="BatchNormalization"):
        inference_affine(layers.Dense(2))
    with pytest.raises(ValueError, match="not built"):
        inference_affine(layers.BatchNormalization())


@pytest.mark.parametrize(
    "application, size, count",
    [("ResNet50", 32, 53), ("MobileNetV2", 32, 52)],
)
def test_applications_fold_completely(application, size, count):
    model = getattr(keras.applications, application)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    folded, report = fold_and_check(model, folded_count=count)
    assert report.left == []
    assert len(folded.layers) == len(model.layers) - count


def test_keras_ops_calls_in_the_graph_are_kept():
    inputs = keras.Input((8, 8, 3))
    x = layers.BatchNormalization(name="bn")(
        layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    )
    outputs = layers.BatchNormalization(name="bn_after_add")(x + inputs)  # an ops.Add node
    _, report = fold_and_check(keras.Model(inputs, outputs), folded_count=1, left_count=1)
    assert "fed by Add" in _left_reason(report, "bn_after_add")


def test_folded_model_saves_and_loads(tmp_path):
    model = chain(
        (9, 9, 3), layers.Conv2D(4, 3, name="conv"), keras_bn.BatchNormalization(name="bn")
    )
    folded, _ = fold_and_check(model, folded_count=1)
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in folded.layers]
    assert_same_outputs(folded, loaded, rtol=1e-6)


def test_verify_tolerance_follows_the_least_precise_layer():
    # The model's own policy is float32, but its layers compute in float16: the check must allow
    # float16 rounding (this flaked in CI when it used the model's policy).
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, dtype="mixed_float16")(inputs)
    x = keras.layers.BatchNormalization(dtype="mixed_float16")(x)
    outputs = keras.layers.Dense(2, dtype="float32")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    assert model.dtype_policy.compute_dtype == "float32"
    assert keras_bn.fold_batchnorm(model).fold_report.tolerance == 1e-2
    float32_model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()]
    )
    assert keras_bn.fold_batchnorm(float32_model).fold_report.tolerance == 1e-3


def _nested_bn_model():
    inner_inputs = keras.Input((6,))
    x = layers.BatchNormalization(name="bn")(layers.Dense(4, name="dense")(inner_inputs))
    inner = keras.Model(inner_inputs, x, name="inner")
    inputs = keras.Input((6,))
    outputs = layers.BatchNormalization(name="outer_bn")(layers.Dense(6, name="d")(inputs))
    return randomize(keras.Model(inputs, inner(outputs), name="outer"))


@pytest.mark.parametrize(
    "weight, value, words",
    [
        ("moving_variance", -0.5, "moving_variance holds 1 negative value"),
        ("moving_variance", np.nan, "moving_variance holds 1 non-finite value"),
        ("moving_variance", np.inf, "moving_variance holds 1 non-finite value"),
        ("moving_mean", np.inf, "moving_mean holds 1 non-finite value"),
        ("gamma", np.nan, "gamma holds 1 non-finite value"),
        ("beta", -np.inf, "beta holds 1 non-finite value"),
    ],
)
def test_bad_numbers_are_refused_with_the_layer_named(monkeypatch, weight, value, words):
    model = _nested_bn_model()
    bn = model.get_layer("inner").get_layer("bn")
    values = keras.ops.convert_to_numpy(getattr(bn, weight)).copy()
    values[2] = value
    getattr(bn, weight).assign(values)
    before = [w.copy() for w in model.get_weights()]
    built = []
    monkeypatch.setattr(keras.models, "clone_model", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=f"'inner/bn' of model 'outer': its {words}") as error:
        keras_bn.fold_batchnorm(model)
    assert "channel 2" in str(error.value)
    assert built == []  # refused before building anything
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)  # NaN compares equal to NaN here
    assert not hasattr(model, "fold_report")


def test_a_bn_left_unfolded_is_checked_too():
    model = chain((8, 8, 2), layers.Activation("relu", name="relu"), bn())  # bn cannot fold
    randomize(model).get_layer("bn").moving_variance.assign([1.0, -1.0])
    with pytest.raises(ValueError, match="'bn'.*negative"):
        keras_bn.fold_batchnorm(model, verify=False)


def test_inference_affine_refuses_bad_numbers():
    model = randomize(chain((4,), bn()))
    model.get_layer("bn").moving_mean.assign([0.0, np.nan, 0.0, 0.0])
    with pytest.raises(ValueError, match="'bn'.*moving_mean holds 1 non-finite value"):
        inference_affine(model.get_layer("bn"))


def test_verification_fails_on_a_non_finite_fold(monkeypatch):
    right = arrays.fold_after_conv

    def overflowing(kernel, bias, a, b):
        kernel, bias = right(kernel, bias, a, b)
        return kernel, bias * np.nan

    monkeypatch.setattr(arrays, "fold_after_conv", overflowing)
    model = randomize(chain((6,), layers.Dense(4, name="d"), bn()))
    with pytest.raises(keras_bn.VerificationError, match="non-finite"):
        keras_bn.fold_batchnorm(model)


def _saved_weight_groups(path):
    """The top-level groups of the weights file inside a `.keras` archive."""
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as weights:
        with h5py.File(weights, "r") as h5:
            return set(h5.keys())


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_folded_model_holds_no_optimizer_state(tmp_path, kind):
    stack = [layers.Conv2D(4, 3, name="conv"), bn(), layers.Flatten(name="flat")]
    if kind == "functional":
        model = chain((6, 6, 3), *stack)
    else:
        model = keras.Sequential([keras.Input((6, 6, 3)), *stack])
    model = randomize(model)
    model.compile(optimizer="adam", loss="mse")
    model.fit(rng.normal(size=(4, 6, 6, 3)), np.zeros((4, 64)), epochs=1, verbose=0)
    assert model.optimizer.variables  # the original's optimizer is built and holds state
    folded = keras_bn.fold_batchnorm(model)
    assert not folded.compiled and getattr(folded, "optimizer", None) is None
    assert model.compiled  # the original keeps its own
    path = tmp_path / "folded.keras"
    folded.save(path)
    assert "optimizer" not in _saved_weight_groups(path)
    loaded = keras.saving.load_model(path)
    assert not loaded.compiled
    assert_same_outputs(folded, loaded, rtol=1e-6)


def _pairs_model():
    """conv -> BN, BN -> 1x1 conv (folds into the following layer), a nested dense -> BN."""
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn_after")(x)
    x = layers.ReLU()(x)
    x = layers.BatchNormalization(name="bn_before")(x)
    x = layers.Conv2D(5, 1, name="pointwise")(x)
    x = layers.GlobalAveragePooling2D()(x)
    head_inputs = keras.Input((5,))
    head = keras.Model(head_inputs, layers.BatchNormalization(name="bn_dense")(
        layers.Dense(3, name="dense")(head_inputs)), name="head")
    return randomize(keras.Model(inputs, head(x)))


def test_each_fold_alone_is_checked_against_its_layer_and_bn():
    from keras_bn.folding import graph

    model = _pairs_model()
    folded = keras_bn.fold_batchnorm(model)
    report = folded.fold_report
    assert sorted(bn for bn, _ in report.folded) == ["bn_after", "bn_before", "head/bn_dense"]
    assert graph._worst_pair_error(model, folded, report) < 1e-5
    kernel = folded.get_layer("head").get_layer("dense").kernel
    kernel.assign(kernel.numpy() * 1.01)  # a fold 1% off, in a nested model
    assert graph._worst_pair_error(model, folded, report) > 1e-3


def test_a_quantizing_model_is_verified_fold_by_fold(monkeypatch):
    """In a QAT model a value at a rounding boundary moves a whole grid step when float32 sums
    differ, and the network carries it on: the outputs cannot judge a fold there; each fold
    alone can. A float model keeps the end-to-end rule."""
    from keras_bn import verification
    from keras_bn.folding import graph

    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.SeparableConv2D(4, 3, padding="same", name="separable")(x)
    x = layers.BatchNormalization(name="bn_separable")(x)  # prepare_qat leaves it; freeze folds
    model = randomize(keras.Model(inputs, layers.GlobalAveragePooling2D()(x)))
    qat = keras_bn.prepare_qat(model)
    qat(np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32"), training=True)
    # At tolerance 1e-12 the end-to-end comparison fails on float32 rounding alone; where a
    # backend's sums happen to round alike on the random batch, the error is set to a rounding's.
    output_error = verification.output_error

    def rounding_error(*args):
        error, scale = output_error(*args)
        return max(error, 1e-7 * scale), scale

    monkeypatch.setattr(verification, "output_error", rounding_error)
    monkeypatch.setattr(graph, "_worst_pair_error", lambda *args: 0.0)
    report = keras_bn.fold_batchnorm(qat, tolerance=1e-12).fold_report
    assert report.folded == [("bn_separable", "separable")]
    assert report.pair_max_error == 0.0 and report.verified
    assert "verified fold by fold: each of the 1 folds" in report.verification_line()
    with pytest.raises(keras_bn.VerificationError, match="Each fold alone is within 0 of its "
                                                         "layer and BN, so the network amplifies"):
        keras_bn.fold_batchnorm(model, tolerance=1e-12)
    monkeypatch.setattr(graph, "_worst_pair_error", lambda *args: 0.5)  # a wrong fold
    with pytest.raises(keras_bn.VerificationError, match="Rounding alone stays far below"):
        keras_bn.fold_batchnorm(qat, tolerance=1e-12)
