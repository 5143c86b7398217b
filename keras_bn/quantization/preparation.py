"""prepare_qat: the model for quantization-aware training, each foldable Conv2D/Dense -> BN pair
fused.

Which pairs fold is `keras_bn.folding`'s decision, read from its plan (the private
`keras_bn.folding.graph._plan`, so that QAT and `fold_batchnorm` never disagree on which BN
folds); the rewrite is the same `clone_model` pass as folding's, with the fused layer in place of
the convolution and the BN passing its input through.
"""

import logging

import keras

from keras_bn import _keras_internals, verification
from keras_bn.folding import graph as folding_graph
from keras_bn.folding.layouts import describe
from keras_bn.folding.report import FoldReport
from keras_bn.quantization.conv2d_batch_normalization import Conv2DBatchNormalization
from keras_bn.quantization.dense_batch_normalization import DenseBatchNormalization
from keras_bn.quantization.depthwise_conv2d_batch_normalization import (
    DepthwiseConv2DBatchNormalization,
)

logger = logging.getLogger(__name__)

# The fused layer of each layer type, and the layer's arguments it takes.
_FUSED = {
    keras.layers.Conv2D: (Conv2DBatchNormalization, (
        "filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "groups",
        "use_bias", "kernel_initializer", "bias_initializer",
    )),
    keras.layers.DepthwiseConv2D: (DepthwiseConv2DBatchNormalization, (
        "kernel_size", "strides", "padding", "depth_multiplier", "data_format", "dilation_rate",
        "use_bias", "depthwise_initializer", "bias_initializer",
    )),
    keras.layers.Dense: (DenseBatchNormalization, (
        "units", "use_bias", "kernel_initializer", "bias_initializer",
    )),
}
# The widest kernel grid QAT trains for each int8 deployment target (`export.targets`): "cpu"
# keeps weight integers within +-63, so that the 16-bit pair sums of onnxruntime's x86 kernels
# without VNNI (at most 2 * 255 * 64) cannot saturate; "cpu-vnni" and "tensorrt" (whose
# activation grids are signed, zero point 0) use all 8 bits.
TARGET_WEIGHT_BITS = {"cpu": 7, "cpu-vnni": 8, "tensorrt": 8}
DEFAULT_TARGET = "cpu"
_BN_ARGUMENTS = (
    "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
    "moving_mean_initializer", "moving_variance_initializer",
)


def prepare_qat(model, weight_bits="auto", activation_bits=8, target=DEFAULT_TARGET):
    """A copy of `model` for quantization-aware training with BN folded into the convolutions.

    Every `Conv2D`, `DepthwiseConv2D` or `Dense -> BatchNormalization` pair that
    `keras_bn.fold_batchnorm` would fold into the layer before BN becomes one
    `keras_bn.Conv2DBatchNormalization`, `keras_bn.DepthwiseConv2DBatchNormalization` or
    `keras_bn.DenseBatchNormalization` layer (named after the layer before BN), which trains
    with BN folded into a per-channel fake-quantized kernel and fake-quantizes its input (Jacob
    et al. 2018, Sec. 3.2). The fused layer starts from the pair's weights and moving
    statistics; Keras's BN keeps its biased variance convention (`unbiased_variance=False`),
    keras_bn's its own; a BN with `trainable=False` gives a fused layer whose statistics are
    frozen (`keras_bn.freeze_bn_statistics`) and whose gamma and beta do not train. Every other
    layer is copied as it is and stays in float, and so does every BN that does not fold into a
    preceding Conv2D, DepthwiseConv2D or Dense: those that `fold_batchnorm` leaves (with its
    reason), those it would fold into the following layer, those after another kind of layer
    (SeparableConv2D, Conv1D, ...), renorm or ghost-batch BN, and BN inside nested models.

    Args:
        model: a built Functional or Sequential `keras.Model` holding Keras's or keras_bn's
            BatchNormalization.
        weight_bits: bits of the kernels' signed per-channel grid (2 up to the target's
            widest), "auto" (default) for the target's widest grid, or `None` for float kernels.
        activation_bits: bits of the fused layers' unsigned per-tensor input grid (2 to 8), or
            `None` for float inputs.
        target: the int8 deployment target the model will be exported for (`export.targets`):
            `"cpu"` (default: 7-bit kernels, integers within +-63, so the file is right on every
            x86-64 CPU with or without VNNI, ARM and OpenVINO), `"cpu-vnni"` (8-bit kernels;
            the file is wrong in onnxruntime on x86 CPUs without VNNI) or `"tensorrt"` (8-bit
            kernels and signed input grids with zero point 0, as TensorRT takes them).

    Returns:
        A new, uncompiled Functional model with the same inputs and outputs; the original is
        unchanged. Its attribute `qat_report` is a `keras_bn.FoldReport`: the BN fused (with the
        layer they fused into), the BN kept in float and why, and the largest difference between
        the two models' inference outputs on a random batch (the kernels' rounding; the inputs
        are not quantized until training has seen a batch): a comparison with the float model,
        never "verified", since a fake-quantized model differs from it by design.

    Raises:
        TypeError: `model` is not a Functional or Sequential `keras.Model`.
        ValueError: the model is not built, a BN layer holds unusable statistics, or a bit
            width is out of range.

    Example:

    ```python
    qat_model = keras_bn.prepare_qat(model)
    qat_model.compile("adam", "sparse_categorical_crossentropy")
    qat_model.fit(x, y, epochs=2)
    keras_bn.freeze_bn_statistics(qat_model)
    qat_model.fit(x, y, epochs=1)
    ```
    """
    verification.check_graph_model(model, "prepare_qat()")
    verification.check_batchnorm_statistics(model, "prepare_qat()")
    weight_bits = _check_target(target, weight_bits)
    for name, bits in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                                 or not 2 <= bits <= 16):
            raise ValueError(
                f"`{name}` must be an integer from 2 to 16, or None for float. Received: {bits!r}"
            )
    if activation_bits is not None and activation_bits > 8:
        raise ValueError("`activation_bits` must be at most 8: int8 files quantize activations "
                         f"to 8 bits. Received: {activation_bits!r}")
    functional = _keras_internals.functional_graph(model)
    plan = folding_graph._plan(functional, prefix="")
    fused, removed, report = _fusions(functional, plan, model.name)

    clones = []

    def clone_function(layer):
        if id(layer) in removed:
            return layer  # never called: call_function passes its input through
        if id(layer) in fused:
            conv, bn = layer, fused[id(layer)]
            new_layer = _fused_layer(conv, bn, weight_bits, activation_bits, target)
        else:
            new_layer = folding_graph.copy_operation(layer)
        clones.append((layer, new_layer))
        return new_layer

    def call_function(layer, *args, **kwargs):
        if id(layer) in removed:
            return args[0]
        return layer(*args, **kwargs)

    clone = keras.models.clone_model(
        functional,
        input_tensors=keras.tree.map_structure(folding_graph._new_input, functional.input),
        clone_function=clone_function,
        call_function=call_function,
    )
    qat_model = keras.Model(clone.input, clone.output, name=model.name)
    for layer, new_layer in clones:
        if not isinstance(layer, keras.layers.Layer):
            continue  # a keras.ops call in the graph: no weights
        if id(layer) in fused:
            _copy_pair_weights(layer, fused[id(layer)], new_layer)
        else:
            new_layer.set_weights(layer.get_weights())

    # A comparison, not a verification: fake-quantized kernels differ from float by design.
    arrays = verification.random_inputs(model)
    batch = verification.as_model_input(model, arrays)
    expected = model(batch, training=False)
    report.max_error, report.scale = verification.output_error(
        expected, qat_model(batch, training=False)
    )
    report.compared_with = "the float model"
    report.variation = verification.output_variation(expected)
    report.examples = len(arrays[0])
    report.tolerance = None
    qat_model.qat_report = report
    logger.info(report.summary_line())
    logger.debug("%s", report)
    return qat_model


def _fusions(model, plan, model_name):
    """`{id(conv): bn}` of the pairs to fuse, the ids of their BN, and the report."""
    fused, removed, folded, left = {}, set(), [], list(plan.left)
    before = set(plan.folded_before)
    for bn_name, layer_name in plan.folded:
        bn = model.get_layer(bn_name)
        if bn_name in before:
            left.append((bn_name, f"it folds into the following layer {layer_name}; QAT fuses a "
                         "BN into the convolution before it only"))
            continue
        layer = model.get_layer(layer_name)
        reason = _why_not_fused(layer, bn)
        if reason is not None:
            left.append((bn_name, reason))
            continue
        fused[id(layer)] = bn
        removed.add(id(bn))
        folded.append((bn_name, layer_name))
    for layer in model.layers:
        if isinstance(layer, keras.Sequential) or _keras_internals.is_functional(layer):
            for inner in _keras_internals.flatten_layers(layer):
                if isinstance(inner, keras.layers.BatchNormalization):
                    left.append((f"{layer.name}/{inner.name}",
                                 f"inside nested model {layer.name!r}; QAT fuses top-level pairs"))
    return fused, removed, FoldReport(model_name, folded, (), left)


def _why_not_fused(layer, bn):
    if type(layer) not in _FUSED:
        return (f"it folds into {describe(layer)}; QAT fuses Conv2D, DepthwiseConv2D "
                "and Dense -> BatchNormalization only so far, the rest stays in float")
    if getattr(bn, "renorm", False) or getattr(bn, "virtual_batch_size", None):
        return f"{describe(bn)} uses renorm or virtual_batch_size, which the fused layer lacks"
    return None


def _check_target(target, weight_bits):
    """`weight_bits` resolved for `target` ("auto": the target's widest grid); ValueError for an
    unknown target or a grid wider than the target keeps."""
    if target not in TARGET_WEIGHT_BITS:
        raise ValueError(f"unknown int8 target {target!r}; prepare_qat trains for "
                         f"{', '.join(repr(name) for name in TARGET_WEIGHT_BITS)}")
    widest = TARGET_WEIGHT_BITS[target]
    if weight_bits == "auto":
        return widest
    if isinstance(weight_bits, int) and not isinstance(weight_bits, bool) and (
            weight_bits > widest):
        raise ValueError(
            f"target {target!r} keeps kernel integers within +-{2**(widest - 1) - 1} "
            f"({widest}-bit grids) so that its file is right where it runs. Received: "
            f"weight_bits={weight_bits}; use target='cpu-vnni' for 8-bit kernels (wrong in "
            "onnxruntime on x86 CPUs without VNNI)")
    return weight_bits


def _fused_layer(conv, bn, weight_bits, activation_bits, target):
    conv_config, bn_config = conv.get_config(), bn.get_config()
    fused_class, arguments = _FUSED[type(conv)]
    return fused_class(
        **{name: conv_config[name] for name in arguments},
        **{name: bn_config[name] for name in _BN_ARGUMENTS},
        unbiased_variance=getattr(bn, "unbiased_variance", False),
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        target=target,
        trainable=conv.trainable,
        dtype=conv.dtype_policy,
        name=conv.name,
    )


def _copy_pair_weights(conv, bn, fused):
    fused.kernel.assign(conv.kernel)
    if conv.use_bias:
        fused.bias.assign(conv.bias)
    if bn.scale:
        fused.gamma.assign(bn.gamma)
    if bn.center:
        fused.beta.assign(bn.beta)
    fused.moving_mean.assign(bn.moving_mean)
    fused.moving_variance.assign(bn.moving_variance)
    if not bn.trainable:
        # A frozen BN (fine-tuning) runs on its population statistics and learns nothing: so
        # does the BN half of the fused layer, while its kernel trains as the layer's did.
        fused.freeze_statistics()
        for variable in (fused.gamma, fused.beta):
            if variable is not None:
                variable.trainable = False
