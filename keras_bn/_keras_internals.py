"""The private Keras APIs that keras_bn and export rely on, each behind one function.

Keras 3's public API builds, calls, clones and saves models, but it does not say which call of
which layer feeds which (the graph that folding rewrites), nor which class a functional model is.
Every use of `keras.src` or of a private attribute goes through this module, with the reason the
public API does not suffice, so that a Keras upgrade breaks here and nowhere else:
`tests/test_keras_internals.py` exercises each function and names the internal that changed.

Imports of `keras.src` happen inside the functions, so that `import keras_bn` still works on a
Keras whose private layout moved; only the feature that needs the internal fails.
"""

import dataclasses


def is_functional(model):
    """Whether `model` was built with the functional API (`keras.Model(inputs, outputs)`).

    Internal: `keras.src.models.functional.Functional`. Keras exports no public name for the class
    that `keras.Model(inputs, outputs)` returns, and a subclassed `keras.Model` is a
    `keras.Model` too; only the private class tells a known graph from arbitrary Python.
    """
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def functional_graph(model):
    """The Functional graph of a Functional or Sequential model; None for a Sequential whose input
    shape is not known yet.

    Internal: `Sequential._functional`. A Sequential keeps its layer graph in a private Functional
    model, built once its input shape is known; no public attribute exposes it, and
    `Sequential.inputs` raises instead of saying "not yet".
    """
    import keras

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model


@dataclasses.dataclass(eq=False)
class Call:
    """One call of an operation in a Functional graph (a Keras `Node`, read once).

    Attributes:
        operation: the layer, nested model or `keras.ops` operation called.
        input_tensors: the KerasTensors it was called on, flattened.
        output_tensors: the KerasTensors it returned, flattened.
        kwargs: the keyword arguments of the call (`training=True` among them).
    """

    operation: object
    input_tensors: list
    output_tensors: list
    kwargs: dict


def graph_calls(model):
    """Every call in the graph of a Functional or Sequential `model`, inputs first.

    Internal: `Functional._nodes_by_depth` and the attributes of `keras.src.ops.node.Node`
    (`operation`, `input_tensors`, `outputs`, `arguments.kwargs`). The public API lists the layers
    (`model.layers`) but not their calls: which tensor each call consumed and produced, and with
    which arguments, is what folding needs to find a conv -> BN pair.

    Raises:
        ValueError: `model` is a Sequential without a known input shape.
    """
    functional = functional_graph(model)
    if functional is None:
        raise ValueError(f"Sequential model {model.name!r} has no known input shape yet.")
    by_depth = functional._nodes_by_depth
    return [
        Call(
            operation=node.operation,
            input_tensors=list(node.input_tensors),
            output_tensors=list(node.outputs),
            kwargs=dict(node.arguments.kwargs),
        )
        for depth in sorted(by_depth, reverse=True)  # the deepest depth holds the inputs
        for node in by_depth[depth]
    ]


def producer(tensor):
    """The operation (layer, `InputLayer`, `keras.ops` call) that produced a symbolic tensor.

    Internal: `KerasTensor._keras_history`. A KerasTensor records where it came from only in this
    private attribute; the public API goes from layers to tensors, never back.
    """
    return tensor._keras_history.operation


def flatten_layers(layer):
    """Every layer inside `layer` (itself excluded), depth first, each once, parents before the
    layers they hold and siblings in the order they were tracked (a model's graph order).

    Internal: `Layer._flatten_layers`. `Model.layers` lists only the direct children of a model,
    and layers tracked inside a custom layer have no public listing at all; this walks nested
    models and custom layers alike. `_flatten_layers(recursive=True)` would visit the children of
    a nested model in reverse, so the walk recurses one level at a time.
    """
    layers, seen = [], set()

    def walk(parent):
        for child in parent._flatten_layers(include_self=False, recursive=False):
            if id(child) not in seen:
                seen.add(id(child))
                layers.append(child)
                walk(child)

    walk(layer)
    return layers


def model_supports_jit(model):
    """Whether Keras would compile `model` with XLA when `jit_compile="auto"`.

    Internal: `keras.src.trainers.trainer.model_supports_jit`. Population statistics compile their
    own training-mode pass and follow Keras's rule for `fit` (layers that support XLA, no
    determinism flag, no Apple-silicon GPU); the rule itself is not public.
    """
    from keras.src.trainers.trainer import model_supports_jit as supports_jit

    return supports_jit(model)


def renorm_correction(layer, mean, variance):
    """Batch renormalization's `(r, d)` for a batch's `mean` and `variance`, clipped as Keras clips.

    Internal: `keras.layers.BatchNormalization._renorm_correction_and_moments`. keras_bn's layer
    accepts Keras's `renorm` arguments and trains exactly as Keras's layer does; reusing Keras's
    own correction keeps the two identical, where a copy would drift from Keras's clipping rules.
    """
    r, d, _, _ = layer._renorm_correction_and_moments(mean, variance)
    return r, d


def compose_renorm(layer, r, d, gamma, beta, dtype):
    """The effective `(gamma, beta)` of renorm's `(x * r + d) * gamma + beta`, `r` and `d` held
    constant for the gradient.

    Internal: `keras.layers.BatchNormalization._compose_transforms`, for the reason given in
    `renorm_correction`.
    """
    return layer._compose_transforms(r, d, gamma, beta, dtype)


def layer_test_case():
    """Keras's `TestCase`, whose `run_layer_test` checks a layer's serialization, weights,
    symbolic and eager calls, a training step and mixed precision in one call.

    Internal: `keras.src.testing.TestCase`. Keras tests its own layers with it and publishes it
    nowhere else; the tests of keras_bn's layers use it rather than a weaker copy.
    """
    from keras.src.testing import TestCase

    return TestCase
