"""The private Keras APIs of keras_bn/_keras_internals.py, each checked on a small model.

A Keras upgrade that removes or changes one of them fails here, with a message naming the
internal, rather than somewhere deep in folding, population statistics or export.
"""

import pathlib
import re

import keras
import numpy as np
import pytest

from keras_bn import _keras_internals as internals

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _graph():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(3, name="dense")(inputs)
    outputs = keras.layers.BatchNormalization(name="bn")(hidden, training=True)
    return keras.Model(inputs, outputs, name="graph")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Dense(4, name="block_dense")
        self.norm = keras.layers.BatchNormalization(name="block_bn")

    def call(self, x):
        return self.norm(self.conv(x))


def check_functional_class():
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    assert internals.is_functional(_graph())
    assert not internals.is_functional(subclassed)
    assert not internals.is_functional(keras.layers.Dense(2))


def check_sequential_graph():
    unknown = keras.Sequential([keras.layers.Dense(2)])
    assert internals.functional_graph(unknown) is None
    known = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    graph = internals.functional_graph(known)
    assert internals.is_functional(graph)
    assert [tuple(t.shape) for t in graph.inputs] == [(None, 3)]
    model = _graph()
    assert internals.functional_graph(model) is model


def check_nodes_by_depth():
    model = _graph()
    calls = internals.graph_calls(model)
    assert [call.operation.name for call in calls] == ["x", "dense", "bn"]
    _, dense, bn = calls
    assert bn.input_tensors == dense.output_tensors  # the same KerasTensor objects
    assert [id(t) for t in bn.output_tensors] == [id(t) for t in model.outputs]
    assert bn.kwargs.get("training") is True and "training" not in dense.kwargs
    with pytest.raises(ValueError, match="no known input shape"):
        internals.graph_calls(keras.Sequential([keras.layers.Dense(2)]))


def check_keras_history():
    model = _graph()
    assert internals.producer(model.outputs[0]) is model.get_layer("bn")
    assert isinstance(internals.producer(model.inputs[0]), keras.layers.InputLayer)


def check_flatten_layers():
    inner = _graph()
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="first")(inputs)
    x = inner(x)
    outputs = _Block(name="block")(x)
    model = keras.Model(inputs, outputs)
    names = [layer.name for layer in internals.flatten_layers(model)]
    # Graph order, parents before their layers, each once, the model itself excluded.
    assert names == [
        model.layers[0].name, "first", "graph", "x", "dense", "bn", "block", "block_dense",
        "block_bn",
    ], names


def check_model_supports_jit():
    assert internals.model_supports_jit(_graph()) in (True, False)

    class NoJit(keras.layers.Layer):
        def call(self, x):
            return x

    layer = NoJit()
    layer.supports_jit = False
    inputs = keras.Input((3,))
    assert internals.model_supports_jit(keras.Model(inputs, layer(inputs))) is False


def _renorm_layer():
    layer = keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0})
    layer.build((None, 3))
    layer.renorm_mean.assign(np.zeros(3))
    layer.renorm_stddev.assign(np.ones(3))
    return layer


def check_renorm_correction():
    layer = _renorm_layer()
    mean = keras.ops.convert_to_tensor(np.array([0.5, -3.0, 0.0], "float32"))
    variance = keras.ops.convert_to_tensor(np.array([1.0, 0.25, 99.0], "float32"))
    r, d = internals.renorm_correction(layer, mean, variance)
    # r = sqrt(variance + eps) / renorm_stddev, at most rmax; d = (mean - renorm_mean) / stddev,
    # within dmax.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(r),
                               [np.sqrt(1.001), np.sqrt(0.251), 2.0], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(d), [0.5, -1.0, 0.0], rtol=1e-6)


def check_compose_transforms():
    layer = _renorm_layer()
    r = keras.ops.convert_to_tensor(np.array([2.0, 1.0, 0.5], "float32"))
    d = keras.ops.convert_to_tensor(np.array([1.0, 0.0, -1.0], "float32"))
    gamma = keras.ops.convert_to_tensor(np.array([1.0, 3.0, 2.0], "float32"))
    beta = keras.ops.convert_to_tensor(np.array([0.0, 1.0, 1.0], "float32"))
    effective_gamma, effective_beta = internals.compose_renorm(
        layer, r, d, gamma, beta, "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(effective_gamma), [2.0, 3.0, 1.0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(effective_beta), [1.0, 1.0, -1.0])


def check_testing_test_case():
    test_case = internals.layer_test_case()
    assert callable(getattr(test_case, "run_layer_test", None))


CHECKS = {
    "keras.src.models.functional.Functional": check_functional_class,
    "Sequential._functional": check_sequential_graph,
    "Functional._nodes_by_depth and keras.src.ops.node.Node": check_nodes_by_depth,
    "KerasTensor._keras_history": check_keras_history,
    "Layer._flatten_layers": check_flatten_layers,
    "keras.src.trainers.trainer.model_supports_jit": check_model_supports_jit,
    "BatchNormalization._renorm_correction_and_moments": check_renorm_correction,
    "BatchNormalization._compose_transforms": check_compose_transforms,
    "keras.src.testing.TestCase": check_testing_test_case,
}


@pytest.mark.parametrize("internal", list(CHECKS))
def test_keras_internal_still_behaves_as_relied_on(internal):
    try:
        CHECKS[internal]()
    except Exception as error:  # an AttributeError, ImportError, TypeError or a failed assert
        pytest.fail(
            f"Keras {keras.__version__} changed the private API {internal}, which "
            f"keras_bn/_keras_internals.py relies on: {type(error).__name__}: {error}. Adapt "
            "the function there that uses it (its docstring says why no public API does)."
        )


# The private names above; outside keras_bn/_keras_internals.py (and this test) none may appear.
_INTERNAL_PATTERN = re.compile(
    r"keras\.src|\._nodes_by_depth|\._functional\b|_keras_history|\._flatten_layers"
    r"|\._renorm_correction_and_moments|\._compose_transforms"
)


def test_internals_are_used_only_through_the_internals_module():
    allowed = {ROOT / "keras_bn" / "_keras_internals.py", pathlib.Path(__file__).resolve()}
    offenders = []
    for folder in ("keras_bn", "export", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() in allowed:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _INTERNAL_PATTERN.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, (
        "private Keras APIs used outside keras_bn/_keras_internals.py (add a function there, "
        "with the reason, and call it):\n" + "\n".join(offenders)
    )
