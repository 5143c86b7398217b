"""export.freeze and its FrozenAffine layer."""

import zipfile

import h5py
import keras
import numpy as np
import pytest

import export
import keras_bn
from export import FrozenAffine
from keras_bn._keras_internals import flatten_layers, layer_test_case


def _inference_bn(x, bn, axis=-1):
    shape = [1] * x.ndim
    shape[axis] = -1
    mean, variance = (np.asarray(v, np.float64).reshape(shape)
                      for v in (bn.moving_mean, bn.moving_variance))
    gamma, beta = (np.asarray(v, np.float64).reshape(shape) for v in (bn.gamma, bn.beta))
    return gamma * (x - mean) / np.sqrt(variance + bn.epsilon) + beta


class FrozenAffineLayerTest(layer_test_case()):
    def test_layer_contract(self):
        self.run_layer_test(
            FrozenAffine,
            init_kwargs={"axis": -1},
            input_shape=(2, 5, 3),
            expected_output_shape=(2, 5, 3),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=2,
            supports_masking=True,
            run_training_check=False,
        )

    def test_channels_first_axis_matches_numpy(self):
        layer = FrozenAffine(axis=1)
        layer.build((None, 3, 4, 5))
        scale, offset = np.array([0.5, -2.0, 3.0]), np.array([1.0, 0.0, -1.5])
        layer.set_weights([scale, offset])
        x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype("float32")
        expected = x * scale[None, :, None, None] + offset[None, :, None, None]
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5,
                                   atol=1e-6)

    def test_rejects_bad_axis(self):
        with pytest.raises(TypeError, match="axis"):
            FrozenAffine(axis="last")
        with pytest.raises(ValueError, match="out of range"):
            FrozenAffine(axis=3).build((None, 4))


def test_freeze_matches_inference_bn_and_reports(model):
    frozen = export.freeze(model)
    report = frozen.freeze_report
    assert sorted(report.folded) == [("bn_conv", "conv"), ("bn_dense", "dense")]
    assert [name for name, _ in report.frozen] == ["bn_add"]
    assert "training=True" in report.frozen[0][1]
    assert report.removed == ["dropout"]
    assert report.fold_max_error is not None and report.fold_max_error < 1e-4
    layers = {layer.name: layer for layer in frozen.layers}
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in frozen.layers)
    assert isinstance(layers["bn_add"], FrozenAffine)
    assert isinstance(layers["dropout"], keras.layers.Identity)

    x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    # training=None and training=True: the frozen model has nothing left that depends on it.
    for training in (None, True):
        got = keras.ops.convert_to_numpy(frozen(x, training=training))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_frozen_affine_holds_population_affine(model):
    frozen = export.freeze(model, fold=False)
    assert frozen.freeze_report.folded == []
    assert len(frozen.freeze_report.frozen) == 3
    bn = model.get_layer("bn_add")
    scale, offset = frozen.get_layer("bn_add").get_weights()
    x = np.random.default_rng(2).standard_normal((3, 8))
    np.testing.assert_allclose(x * scale + offset, _inference_bn(x, bn), rtol=1e-5, atol=1e-6)


def test_freeze_leaves_the_original_alone(model):
    before = [w.copy() for w in model.get_weights()]
    classes = [type(layer) for layer in model.layers]
    frozen = export.freeze(model, fold=False)
    assert [type(layer) for layer in model.layers] == classes
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    # No shared weights: changing the frozen model does not reach the original.
    conv = frozen.get_layer("conv")
    conv.set_weights([w + 1.0 for w in conv.get_weights()])
    np.testing.assert_array_equal(model.get_layer("conv").get_weights()[0], before[0])


def test_channels_first_bn_and_nested_sequential(randomize):
    inputs = keras.Input((4, 5, 5))
    doubled = keras.layers.Add()([inputs, inputs])
    x = keras.layers.BatchNormalization(axis=1, name="bn_nchw")(doubled)
    x = keras.layers.Flatten()(x)
    inner = keras.Sequential(
        [keras.Input((100,)), keras.layers.Dense(7), keras_bn.BatchNormalization(name="inner_bn"),
         keras.layers.Activation("tanh"), keras_bn.BatchNormalization(name="inner_bn_2")],
        name="head",
    )
    model = randomize(keras.Model(inputs, inner(x)))
    frozen = export.freeze(model)
    report = frozen.freeze_report
    assert report.folded == [("head/inner_bn", "head/dense")]
    assert {name for name, _ in report.frozen} == {"bn_nchw", "head/inner_bn_2"}
    assert "model output" in dict(report.frozen)["head/inner_bn_2"]
    remaining = [layer for layer in flatten_layers(frozen)
                 if isinstance(layer, keras.layers.BatchNormalization)]
    assert remaining == []
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 5)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(frozen(x)),
        keras.ops.convert_to_numpy(model(x, training=False)), rtol=1e-5, atol=1e-5)


def test_frozen_model_round_trips_through_keras_file(model, tmp_path):
    frozen = export.freeze(model)
    frozen.save(tmp_path / "frozen.keras")
    loaded = keras.saving.load_model(tmp_path / "frozen.keras")
    assert isinstance(loaded.get_layer("bn_add"), FrozenAffine)
    x = np.random.default_rng(4).standard_normal((2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(frozen(x)), rtol=1e-6, atol=1e-6)


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x):
        return self.bn(x) + x


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_freeze_refuses_what_it_cannot_rewrite():
    with pytest.raises(TypeError, match="keras.Model"):
        export.freeze(keras.layers.Dense(3))
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 2), "float32"))
    # The same TypeError as keras_bn.fold_batchnorm's (keras_bn.verification.check_graph_model).
    with pytest.raises(TypeError, match="subclassed"):
        export.freeze(subclassed)
    inputs = keras.Input((3,))
    hidden = keras.Model(inputs, _Block(name="block")(inputs))
    with pytest.raises(ValueError, match="custom layer"):
        export.freeze(hidden)


def test_subclassed_model_gets_the_same_error_from_freeze_and_fold():
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 2), "float32"))
    messages = []
    for function in (export.freeze, keras_bn.fold_batchnorm):
        with pytest.raises(TypeError, match="only rewrite Functional and Sequential") as error:
            function(subclassed)
        messages.append(str(error.value).split(" can only")[1])
    assert messages[0] == messages[1]


@pytest.mark.parametrize("fold", [True, False])
def test_freeze_refuses_bad_numbers_naming_the_layer(model, monkeypatch, fold):
    bn = model.get_layer("bn_add")  # a BN that does not fold: freezing alone would use it
    variance = keras.ops.convert_to_numpy(bn.moving_variance).copy()
    variance[5] = np.nan
    bn.moving_variance.assign(variance)
    before = [w.copy() for w in model.get_weights()]
    built = []
    monkeypatch.setattr(keras.models, "clone_model", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=r"freeze\(\) refuses BatchNormalization layer 'bn_add' "
                                         r"of model 'residual': its moving_variance holds 1 "
                                         r"non-finite value \(channel 5: nan\)"):
        export.freeze(model, fold=fold)
    assert built == []
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def _sequential(randomize):
    return randomize(keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
        keras.layers.Flatten(), keras.layers.Dropout(0.5), keras.layers.Dense(2),
    ]))


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_frozen_model_holds_no_optimizer_state(model, randomize, tmp_path, fold, kind):
    if kind == "sequential":
        model = _sequential(randomize)
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(5).standard_normal((4, 8, 8, 3)).astype("float32")
    model.fit(x, np.zeros((4, model.outputs[0].shape[-1])), verbose=0)
    frozen = export.freeze(model, fold=fold)
    assert not frozen.compiled and getattr(frozen, "optimizer", None) is None
    assert isinstance(frozen, keras.Sequential) == (kind == "sequential")
    frozen.save(tmp_path / "frozen.keras")
    with zipfile.ZipFile(tmp_path / "frozen.keras") as archive:
        with archive.open("model.weights.h5") as weights, h5py.File(weights, "r") as h5:
            assert "optimizer" not in h5
    np.testing.assert_allclose(keras.ops.convert_to_numpy(frozen(x)),
                               keras.ops.convert_to_numpy(model(x, training=False)),
                               rtol=1e-5, atol=1e-5)
