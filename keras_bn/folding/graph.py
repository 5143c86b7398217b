"""The graph rewrite: find the BN layers that fold, and build a new model without them.

One pass per Functional or Sequential graph (nested models get their own pass, recursively):

1. plan: for each BN node, fold it into the layer before it (conv/dense -> BN), else into the
   layer after it (BN -> conv where that is exact), else leave it and say why;
2. rebuild: `keras.models.clone_model` with fresh layers (the original is never touched), in
   which a folded BN passes its input through and the layers that absorb BN get a bias;
3. weights: copy every layer's weights, and write the folded ones computed in float64 by
   `layouts`/`arrays`.

Before any of it, `keras_bn.verification` checks the model and every BN's numbers; after it, it
compares the two models' outputs. The graph itself is read through `keras_bn._keras_internals`.
"""

import collections
import logging

import keras

from keras_bn import _keras_internals, verification
from keras_bn.folding import layouts
from keras_bn.folding.layouts import describe
from keras_bn.folding.report import FoldReport

logger = logging.getLogger(__name__)


def fold_batchnorm(model, verify=True, tolerance=None):
    """Fold every inference-mode BN of `model` into a neighbouring linear layer.

    In inference BN is the fixed map `y = a * x + b` per channel (Algorithm 2 of the paper), so
    a conv or dense layer next to it can carry it: after the layer, `W' = a * W` per output
    channel and `bias' = a * bias + b`; before it, `W' = W * a` per input channel and the shift
    goes into the bias. The folded model computes the same function with fewer layers.

    Folds BN after Conv1D/2D/3D (groups, dilation, strides, either data format),
    DepthwiseConv1D/2D, SeparableConv1D/2D (into the pointwise kernel), Conv1D/2D/3DTranspose
    and Dense (inputs of any rank); and BN before a conv, depthwise, separable or dense layer
    where that is exact (VALID padding or a kernel of size 1). A BN is left, with the reason in
    the report, when its layer has a non-linear activation, when that layer's output has
    another consumer, when that layer is called more than once, when BN's axis is not the
    layer's channel axis, or when BN is fed by anything else (Add, Concatenate, an input).

    Args:
        model: a built Functional or Sequential `keras.Model`; nested Functional/Sequential
            models are folded inside. Keras's and keras_bn's BatchNormalization both fold.
        verify: run both models on one random batch in inference mode and raise `ValueError`
            if `max|folded - original| > tolerance * max(1, max|original|)`.
        tolerance: the relative tolerance of `verify`; None picks one for the least precise
            compute dtype among the model's layers (1e-3 for float32, 1e-2 for float16, 5e-2
            for bfloat16; `keras_bn.verification.default_tolerance`), so mixed-precision layers
            count under a float32 model policy.

    Returns:
        A new inference model with the same inputs, outputs and layer names (less the folded
        BN), not compiled: it holds no optimizer or optimizer state, whatever the original was
        compiled with (compile it to train it further). Its attribute `fold_report` is a
        `keras_bn.FoldReport`: what folded into what, what was left and why, and the
        verification error. The original model is unchanged.

    Raises:
        TypeError: `model` is not a `keras.Model`, or is a subclassed model
            (`keras_bn.verification.check_graph_model`).
        ValueError: a Sequential `model` has no known input shape; a BN layer holds a
            non-finite gamma, beta, moving mean or moving variance, or a negative moving
            variance (the message names it, and nothing is built); a layer's config does not
            round-trip.
        keras_bn.VerificationError: with `verify`, the folded model's outputs differ from the
            original's beyond the tolerance, or are not finite where the original's are (a
            `ValueError`).

    Example:

    ```python
    model = keras.applications.ResNet50(weights=None)
    folded = keras_bn.fold_batchnorm(model)
    print(folded.fold_report)   # folded 53 of 53 BatchNormalization layers ...
    ```
    """
    verification.check_graph_model(model, "fold_batchnorm()")
    verification.check_batchnorm_statistics(model, "fold_batchnorm()")
    folded_model, report = _fold_graph(model, prefix="")
    if verify:
        _verify(model, folded_model, report, tolerance)
    folded_model.fold_report = report
    logger.info(report.summary_line())
    logger.debug("%s", report)
    return folded_model


class _Graph:
    """The nodes of one Functional graph, and who consumes what inside it."""

    def __init__(self, model):
        self.nodes = _keras_internals.graph_calls(model)
        self.calls = collections.Counter(id(node.operation) for node in self.nodes)
        self.consumers = collections.defaultdict(list)
        for node in self.nodes:
            for tensor in node.input_tensors:
                self.consumers[id(tensor)].append(node)
        self.outputs = {id(tensor) for tensor in keras.tree.flatten(model.outputs)}

    def why_not_single_consumer(self, tensor, layer, expected_node):
        """Why `tensor` (an output of `layer`) goes elsewhere than `expected_node`; or None."""
        if id(tensor) in self.outputs:
            return f"the output of {describe(layer)} is also a model output"
        others = [node for node in self.consumers[id(tensor)] if node is not expected_node]
        if others:
            names = ", ".join(sorted({node.operation.name for node in others}))
            return f"the output of {describe(layer)} also feeds {names}"
        return None

    def why_shared(self, layer):
        if self.calls[id(layer)] > 1:
            return (
                f"{describe(layer)} is called {self.calls[id(layer)]} times in the model "
                "(shared weights), and folding would change every call"
            )
        return None


class _Plan:
    """What one graph's rewrite does: the BN removed and the layers that absorb them."""

    def __init__(self):
        self.removed = set()  # id() of the BN layers that fold
        self.before = {}  # id(layer) -> (a, b) of the BN in front of it
        self.after = {}  # id(layer) -> (a, b) of the BN behind it
        self.folded, self.folded_before, self.left = [], [], []

    def absorbs(self, layer):
        return id(layer) in self.before or id(layer) in self.after

    def new_weights(self, layer):
        """The folded float64 weights: the BN in front first, then the BN behind."""
        weights = layouts.read_weights(layer)
        if id(layer) in self.before:
            weights = layouts.fold_before(layer, weights, *self.before[id(layer)])
        if id(layer) in self.after:
            weights = layouts.fold_after(layer, weights, *self.after[id(layer)])
        return weights


def _plan(model, prefix):
    graph = _Graph(model)
    plan = _Plan()
    seen = set()
    for node in graph.nodes:
        layer = node.operation
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            _plan_batchnorm(node, graph, plan, prefix)
        elif isinstance(layer, keras.layers.Layer) and not _is_graph_model(layer):
            # BN inside a custom layer or a subclassed model: its call() is Python we cannot
            # rewrite, so the BN stays; say so rather than miss it in the count.
            for inner in _keras_internals.flatten_layers(layer):
                if isinstance(inner, keras.layers.BatchNormalization):
                    plan.left.append((
                        f"{prefix}{layer.name}/{inner.name}",
                        f"inside {describe(layer)}, which is not a Functional or Sequential "
                        "graph; only those can be rewritten",
                    ))
    return plan


def _plan_batchnorm(node, graph, plan, prefix):
    bn = node.operation
    name = prefix + bn.name
    reason = graph.why_shared(bn)
    if reason is None and node.kwargs.get("training") is True and bn.trainable:
        reason = f"{describe(bn)} is called with training=True, so it never runs in inference"
    if reason is not None:
        plan.left.append((name, reason))
        return
    affine = layouts.inference_affine(bn)
    producer, why_not_after = _producer(node, graph)
    if why_not_after is None:
        plan.removed.add(id(bn))
        plan.after[id(producer)] = affine
        plan.folded.append((name, prefix + producer.name))
        return
    consumer, why_not_before = _consumer(node, graph)
    if why_not_before is None:
        plan.removed.add(id(bn))
        plan.before[id(consumer)] = affine
        plan.folded.append((name, prefix + consumer.name))
        plan.folded_before.append(name)
        return
    plan.left.append((
        name,
        f"not into the layer before ({why_not_after}), nor into the layer after "
        f"({why_not_before})",
    ))


def _producer(bn_node, graph):
    """The layer BN folds into as conv -> BN, or None and the reason it cannot."""
    tensor = bn_node.input_tensors[0]
    producer = _keras_internals.producer(tensor)
    if producer is None or isinstance(producer, keras.layers.InputLayer):
        return None, "it is fed by a model input"
    if _is_graph_model(producer):
        return None, f"it is fed by nested model {producer.name!r}; folds stay inside a model"
    if layouts.layout(producer) is None:
        return None, f"it is fed by {describe(producer)}, which has no weights to absorb BN"
    reason = graph.why_shared(producer) or graph.why_not_single_consumer(
        tensor, producer, bn_node
    )
    if reason is None:
        reason = _why_other_axis(bn_node, producer, len(tensor.shape)) or layouts.why_not_after(
            producer
        )
    return (producer, None) if reason is None else (None, reason)


def _consumer(bn_node, graph):
    """The layer BN folds into as BN -> conv, or None and the reason it cannot."""
    tensor = bn_node.output_tensors[0]
    if id(tensor) in graph.outputs:
        return None, "its output is a model output"
    users = graph.consumers[id(tensor)]
    if len(users) != 1:
        names = ", ".join(sorted({node.operation.name for node in users}))
        return None, f"its output feeds {len(users)} layers ({names})"
    consumer = users[0].operation
    if layouts.layout(consumer) is None:
        return None, f"it feeds {describe(consumer)}, which has no weights to absorb BN"
    reason = graph.why_shared(consumer)
    if reason is None:
        reason = _why_other_axis(bn_node, consumer, len(tensor.shape)) or layouts.why_not_before(
            consumer
        )
    return (consumer, None) if reason is None else (None, reason)


def _why_other_axis(bn_node, layer, rank):
    bn = bn_node.operation
    bn_axis = bn.axis % rank
    layer_axis = layouts.channel_axis(layer, rank)
    if bn_axis != layer_axis:
        return (
            f"BN normalizes axis {bn_axis} but the channels of {describe(layer)} are on axis "
            f"{layer_axis}"
        )
    return None


def _fold_graph(model, prefix):
    """The folded copy of a Functional/Sequential `model`, and its FoldReport."""
    plan = _plan(model, prefix)
    report = FoldReport(model.name, plan.folded, plan.folded_before, plan.left)
    clones = []

    def clone_function(layer):
        if id(layer) in plan.removed:
            return layer  # never called: call_function passes its input through
        if _is_graph_model(layer):
            new_layer, inner = _fold_graph(layer, f"{prefix}{layer.name}/")
            report.folded += inner.folded
            report.folded_before += inner.folded_before
            report.left += inner.left
        else:
            new_layer = _clone_layer(layer, with_bias=plan.absorbs(layer))
        clones.append((layer, new_layer))
        return new_layer

    def call_function(layer, *args, **kwargs):
        if id(layer) in plan.removed:
            return args[0]
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        new_model = _rebuild_sequential(model, plan, clone_function)
    else:
        new_model = _without_optimizer(keras.models.clone_model(
            model,
            input_tensors=keras.tree.map_structure(_new_input, model.input),
            clone_function=clone_function,
            call_function=call_function,
        ))
    for layer, new_layer in clones:
        if _is_graph_model(layer):
            continue  # its own _fold_graph set its weights
        if not isinstance(layer, keras.layers.Layer):
            continue  # a keras.ops call in the graph (`x + y`): no weights
        if plan.absorbs(layer):
            layouts.write_weights(new_layer, plan.new_weights(layer))
        else:
            new_layer.set_weights(layer.get_weights())
    return new_model, report


def _new_input(tensor):
    """A fresh input like `tensor`, named after its InputLayer (clone_model would not)."""
    return keras.Input(
        batch_shape=tensor.shape,
        dtype=tensor.dtype,
        sparse=tensor.sparse,
        name=_keras_internals.producer(tensor).name,
    )


def _rebuild_sequential(model, plan, clone_function):
    new_input = _new_input(model.inputs[0])
    layers = [clone_function(layer) for layer in model.layers if id(layer) not in plan.removed]
    return keras.Sequential([new_input, *layers], name=model.name, trainable=model.trainable)


def _without_optimizer(clone):
    """`clone` as an uncompiled Functional model over the same layers.

    `clone_model` compiles its copy, with a fresh optimizer, whenever the source was compiled;
    a folded model is for inference, and optimizer variables would double its `.keras` file.
    """
    if not clone.compiled:
        return clone
    return keras.Model(clone.input, clone.output, name=clone.name, trainable=clone.trainable)


def _is_graph_model(layer):
    return isinstance(layer, keras.Sequential) or _keras_internals.is_functional(layer)


def _verify(original, folded, report, tolerance):
    """Compares the two models' inference outputs on a random batch; records or raises.

    Sets `report.max_error`, `report.scale`, `report.tolerance`, `report.variation` and
    `report.examples`. Outputs that are constant over the batch pass but are reported (and
    logged) as not verified: they could not show a wrong fold.
    """
    if tolerance is None:
        tolerance = verification.default_tolerance(original)
    arrays = verification.random_inputs(original)
    batch = verification.as_model_input(original, arrays)
    expected = original(batch, training=False)
    max_error, scale = verification.output_error(expected, folded(batch, training=False))
    report.max_error, report.scale, report.tolerance = max_error, scale, tolerance
    report.variation = verification.output_variation(expected)
    report.examples = len(arrays[0])
    if verification.within_tolerance(max_error, scale, tolerance):
        if report.outputs_constant:
            logger.warning("fold_batchnorm(): %s", report.verification_line())
        return
    pairs = _worst_pair_error(original, folded, report) if max_error < float("inf") else None
    if pairs is not None and pairs <= tolerance and _quantizes(original):
        # The folds are exact one by one; the model rounds to a grid (QAT), where a value at a
        # rounding boundary that float32 puts on the other side moves a whole step, and the
        # network carries that on. Export judges such a model by its quantization steps.
        report.pair_max_error = pairs
        logger.info("fold_batchnorm(): %s", report.verification_line())
        return
    if not max_error < float("inf"):
        raise verification.VerificationError(
            f"Folding BN made the outputs of model {original.name!r} non-finite (NaN or inf) "
            "on a random batch where the original's are finite; the folded model was not "
            "returned. A folded weight may overflow its layer's dtype (float16 holds at most "
            "65504); otherwise this is a bug in keras_bn.fold_batchnorm, please report it with "
            f"this plan:\n{report}"
        )
    raise verification.VerificationError(
        f"Folding BN changed the outputs of model {original.name!r}: max |folded - original| "
        f"= {max_error:.3g} on a random batch, above tolerance {tolerance:g} x scale "
        f"{scale:.3g}; the folded model was not returned. " + (
            f"Each fold alone is within {pairs:.2g} of its layer and BN, so the network "
            "amplifies rounding (deep and untrained): pass a larger tolerance"
            if pairs is not None and pairs <= tolerance else
            "Rounding alone stays far below this unless the network amplifies it (deep and "
            "untrained): then pass a larger tolerance") +
        "; otherwise this is a bug in keras_bn.fold_batchnorm, please report it with this "
        f"plan:\n{report}"
    )


def _layers_by_name(model, prefix=""):
    """`{"outer/inner/name": layer}` over nested Functional and Sequential models, the names
    the fold report uses."""
    layers = {}
    for layer in model.layers:
        layers[prefix + layer.name] = layer
        if isinstance(layer, keras.Sequential) or _keras_internals.is_functional(layer):
            layers.update(_layers_by_name(layer, f"{prefix}{layer.name}/"))
    return layers


def _worst_pair_error(original, folded, report):
    """Each fold alone: the original layer and BN (in their order) against the folded layer on
    a random batch of the layer's input shape; the largest `max_error / scale`
    (`verification.output_error`), or None when some pair cannot be run alone."""
    old, new = _layers_by_name(original), _layers_by_name(folded)
    before = set(report.folded_before)
    worst = 0.0
    for index, (bn_name, layer_name) in enumerate(report.folded):
        bn, layer, replacement = old[bn_name], old[layer_name], new.get(layer_name)
        first = bn if bn_name in before else layer
        try:
            shape = [4] + [8 if size is None else size for size in first.input.shape[1:]]
            x = keras.random.normal(shape, seed=index, dtype=first.input.dtype)
            expected = (layer(bn(x, training=False)) if bn_name in before
                        else bn(layer(x), training=False))
            received = replacement(x)
        except Exception:  # a layer that cannot be called alone: the end-to-end check stands
            return None
        max_error, scale = verification.output_error(expected, received)
        worst = max(worst, max_error / scale)
    return worst


def _quantizes(model):
    """Whether `model` holds QAT layers (`keras_bn.prepare_qat`), whose outputs are rounded."""
    from keras_bn.quantization.folded_batch_normalization import FoldedBatchNormalization

    return any(isinstance(layer, FoldedBatchNormalization)
               for layer in _layers_by_name(model).values())


def copy_operation(operation):
    """A fresh copy of a graph node's `operation`, without its weights.

    A layer is re-created from its config. A `keras.layers.Lambda` is re-created around the same
    Python function: its config holds the function's bytecode, which Keras refuses to load
    outside `safe_mode=False`, yet copying a model in memory deserializes nothing untrusted. A
    `keras.ops` call in the graph (`x + y`, `keras.ops.concatenate`), an `Operation` but not a
    `Layer`, has no weights and is re-created from its config too.
    """
    if isinstance(operation, keras.layers.Lambda):
        return keras.layers.Lambda(
            operation.function, output_shape=operation._output_shape, mask=operation.mask,
            arguments=dict(operation.arguments), name=operation.name,
            dtype=operation.dtype_policy.name,
        )
    return operation.__class__.from_config(operation.get_config())


def _clone_layer(layer, with_bias):
    try:
        if with_bias:
            return layouts.with_bias(layer)
        return copy_operation(layer)
    except Exception as error:  # a custom layer whose config does not round-trip
        raise ValueError(
            f"fold_batchnorm() copies every layer from its config, and {describe(layer)} "
            f"could not be re-created with {type(layer).__name__}.from_config(get_config()): "
            f"{error}. Give the layer a get_config() that round-trips."
        ) from error
