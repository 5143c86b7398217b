"""The model builders: shapes, parameter counts, BN placement, no conv bias before BN."""
import keras
import numpy as np
import pytest

import keras_bn
from examples import models
from keras_bn._keras_internals import graph_calls, producer

# Structure tests need no random weights: "zeros" skips the per-shape random-number kernels that
# JAX compiles on first use (tens of seconds for the ~70 kernel shapes of a new network).
FAST = dict(kernel_initializer="zeros")


def _bn_inputs(model):
    """(BN layer, the layer feeding it, the layers it feeds) for every BN of a functional model."""
    calls = graph_calls(model)
    triples = []
    for call in calls:
        if isinstance(call.operation, keras.layers.BatchNormalization):
            (output,) = call.output_tensors
            after = [c.operation for c in calls if any(t is output for t in c.input_tensors)]
            triples.append((call.operation, producer(call.input_tensors[0]), after))
    return triples


def _parents(layer):
    """The layers whose outputs `layer` was called on, in order."""
    return [producer(tensor) for tensor in layer.input]


def test_bn_inception_full_size_parameters_and_shapes(caplog):
    with caplog.at_level("INFO", logger="examples.models"):
        model = models.bn_inception(**FAST)
    assert "11285224 trainable parameters" in caplog.text  # it reports its size
    assert model.output_shape == (None, 1000)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 11_285_224  # the docstring's figure: ~11.3M, as Figure 5's table
    assert model.get_layer("inception_3a_concat").output.shape[1:] == (28, 28, 256)
    assert model.get_layer("inception_4d_concat").output.shape[1:] == (14, 14, 608)
    assert model.get_layer("inception_4e_concat").output.shape[1:] == (7, 7, 1056)
    assert model.get_layer("inception_5b_concat").output.shape[1:] == (7, 7, 1024)


def test_pool_projection_96_reproduces_tf_slim_widths():
    model = models.bn_inception(input_shape=(32, 32, 3), classes=10, alpha=0.25,
                                pool_projection_4cd=96, **FAST)
    assert model.get_layer("inception_4c_concat").output.shape[-1] == 576 // 4
    assert model.get_layer("inception_4e_concat").output.shape[-1] == 1024 // 4


@pytest.mark.parametrize(
    "input_shape, stem, stages",
    [((8, 8, 1), "digits", (8, 4, 2)), ((32, 32, 3), "cifar", (16, 8, 4)),
     ((64, 64, 3), "imagenet", (8, 4, 2))],
)
def test_stems_choose_stage_sizes(input_shape, stem, stages):
    model = models.bn_inception(input_shape=input_shape, classes=7, alpha=0.125, **FAST)
    assert model.output_shape == (None, 7)
    sizes = tuple(model.get_layer(f"inception_{m}_concat").output.shape[1]
                  for m in ("3b", "4d", "5b"))
    assert sizes == stages
    names = {layer.name for layer in model.layers}
    assert ("stem_pool" in names) == (stem == "cifar")
    assert ("stem_pool1" in names) == (stem == "imagenet")


def test_small_bn_inception_size_matches_paper_notes():
    model = models.bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125, **FAST)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert 150_000 < trainable < 180_000  # PAPER.md: "about 166k parameters"


def test_conv_bn_relu_placement_and_no_bias():
    model = models.bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125, **FAST)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    triples = _bn_inputs(model)
    assert len(triples) == len(convs) == 3 + sum(  # the stem's 3, then each module's
        (6 if m[1] else 5) + (1 if m[7] else 0) for m in models._MODULES
    )
    for bn, before, after in triples:
        assert isinstance(bn, keras_bn.BatchNormalization)
        assert isinstance(before, keras.layers.Conv2D) and not before.use_bias
        assert len(after) == 1 and isinstance(after[0], keras.layers.Activation)
        assert after[0].get_config()["activation"] == "relu"
    # Concatenation after the nonlinearity; no dropout or LRN in BN-x form.
    parents = _parents(model.get_layer("inception_3a_concat"))
    assert len(parents) == 4 and all(isinstance(p, keras.layers.Activation) for p in parents)
    parents = _parents(model.get_layer("inception_3c_concat"))
    assert [type(p).__name__ for p in parents] == ["Activation", "Activation", "MaxPooling2D"]
    assert not any(isinstance(layer, (keras.layers.Dropout, models.LocalResponseNormalization))
                   for layer in model.layers)


def test_stride_two_modules_pass_through_pool_and_have_no_1x1():
    model = models.bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125, **FAST)
    names = {layer.name for layer in model.layers}
    for module in ("3c", "4e"):
        assert f"inception_{module}_1x1_conv" not in names
        assert f"inception_{module}_pool_proj_conv" not in names
        pool = model.get_layer(f"inception_{module}_pool")
        assert isinstance(pool, keras.layers.MaxPooling2D) and pool.strides == (2, 2)
        assert model.get_layer(f"inception_{module}_3x3_conv").strides == (2, 2)
        assert model.get_layer(f"inception_{module}_double_3x3b_conv").strides == (2, 2)
        assert model.get_layer(f"inception_{module}_double_3x3a_conv").strides == (1, 1)
    assert isinstance(model.get_layer("inception_5b_pool"), keras.layers.MaxPooling2D)
    assert isinstance(model.get_layer("inception_5a_pool"), keras.layers.AveragePooling2D)


def test_sigmoid_variant():
    model = models.bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125,
                                activation="sigmoid", **FAST)
    acts = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert acts and all(layer.get_config()["activation"] == "sigmoid" for layer in acts)


def test_inception_baseline_has_bias_dropout_lrn_l2_and_no_bn():
    model = models.inception_baseline(input_shape=(8, 8, 1), classes=10, alpha=0.125, **FAST)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(c.use_bias and c.kernel_regularizer is not None for c in convs)
    assert model.get_layer("dropout").rate == pytest.approx(0.4)
    assert isinstance(model.get_layer("stem_lrn"), models.LocalResponseNormalization)
    model(np.zeros((2, 8, 8, 1), "float32"))
    assert len(model.losses) == len(convs) + 1  # every kernel, the classifier's too


def test_local_response_normalization_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 3, 7)).astype("float32")
    layer = models.LocalResponseNormalization(size=5, alpha=0.1, beta=0.75, k=2.0)
    expected = np.empty_like(x)
    for c in range(7):
        window = x[..., max(0, c - 2) : c + 3]
        expected[..., c] = x[..., c] / (2.0 + 0.1 / 5 * np.sum(window**2, axis=-1)) ** 0.75
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5)
    restored = models.LocalResponseNormalization.from_config(layer.get_config())
    assert restored.size == 5 and restored.k == 2.0
    with pytest.raises(ValueError, match="size=4"):
        models.LocalResponseNormalization(size=4)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_mnist_mlp(batch_norm):
    model = models.mnist_mlp(input_dim=64, batch_norm=batch_norm, seed=1)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [d.units for d in dense] == [100, 100, 100, 10]
    assert len(bns) == (3 if batch_norm else 0)
    assert all(d.use_bias != batch_norm for d in dense[:3])
    expected = "hidden3_bn" if batch_norm else "hidden3_dense"
    assert models.sigmoid_input_layer(model).name == expected
    assert model.output_shape == (None, 10)


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        models.bn_inception(input_shape=(8, 8, 1), activation="tanh")
    with pytest.raises(ValueError, match="stem"):
        models.bn_inception(input_shape=(8, 8, 1), stem="big")
    with pytest.raises(ValueError, match="input_shape"):
        models.bn_inception(input_shape=(8, 8))


def test_bn_inception_with_keras_batch_normalization_for_comparisons():
    ours = models.bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125)
    theirs = models.bn_inception(input_shape=(8, 8, 1), classes=10, alpha=0.125,
                                 bn_layer=keras.layers.BatchNormalization)
    kinds = [{type(layer) for layer in m.layers
              if isinstance(layer, keras.layers.BatchNormalization)} for m in (ours, theirs)]
    assert kinds == [{keras_bn.BatchNormalization}, {keras.layers.BatchNormalization}]
    assert ours.count_params() == theirs.count_params()


def test_with_softmax_turns_logits_into_probabilities():
    logits_model = models.mnist_mlp(input_dim=64, classes=10, batch_norm=True, seed=0,
                                    softmax=False)
    deployed = models.with_softmax(logits_model)
    x = np.random.default_rng(0).normal(size=(5, 64)).astype("float32")
    logits = keras.ops.convert_to_numpy(logits_model(x))
    probabilities = keras.ops.convert_to_numpy(deployed(x))
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(-1, keepdims=True), rtol=1e-5)
    assert deployed.layers[-1].name == "probabilities" and deployed.get_layer("hidden1_bn")
