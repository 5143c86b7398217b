"""The ONNX graph passes that run after tf2onnx (export/graph_passes.py).

Each pass is tested on its own on small graphs built with `onnx.helper`, as tf2onnx tests its
optimizers (`run_and_compare(..., remaining_op_num)`): the op types that remain, the changes it
reports, the same outputs in onnxruntime before and after, and graphs its precondition refuses,
which it must leave byte for byte as they were. Two end-to-end tests run them through `to_onnx`.
"""

import collections

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import randomize_batchnorm
from onnx import TensorProto, helper, numpy_helper

import export
import keras_bn
from export import graph_passes

# --------------------------------------------------------------------------------------------------
# Building and running small graphs


def make_model(nodes, initializers=(), input_shape=(2, 3, 8, 8), outputs=("y",), opset=17):
    """A model with one float input `x` of `input_shape` and float outputs named `outputs`."""
    graph = helper.make_graph(
        nodes,
        "hand_built",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what onnxruntime accepts for every opset used here
    # The checker wants every output's shape: take them from shape inference, and only them, so
    # that no value_info names a tensor a pass removes.
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for output, shaped in zip(model.graph.output, inferred.graph.output, strict=True):
        output.CopyFrom(shaped)
    onnx.checker.check_model(model, full_check=True)
    return model


def constant(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def pads(begin, end):
    """ONNX Pad's pads for NCHW: none on batch and channels, `begin`/`end` on height and width."""
    return constant("pads", [0, 0, *begin, 0, 0, *end])


def random_input(model, seed=0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(0.0, 2.0, shape).astype(np.float32)


def run(model, x):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})


def op_types(model):
    return [node.op_type for node in model.graph.node]


def pads_of(node):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "pads")


def run_and_compare(graph_pass, model, remaining_op_types, changes, rtol=1e-6, atol=1e-6):
    """Runs `graph_pass` on a copy of `model`; checks what remains, the changes and the outputs."""
    optimized = onnx.ModelProto()
    optimized.CopyFrom(model)
    assert graph_pass(optimized) == changes
    assert collections.Counter(op_types(optimized)) == collections.Counter(remaining_op_types)
    onnx.checker.check_model(optimized, full_check=True)
    x = random_input(model)
    for before, after in zip(run(model, x), run(optimized, x), strict=True):
        assert after.shape == before.shape
        np.testing.assert_allclose(after, before, rtol=rtol, atol=atol)
    return optimized


def assert_refused(graph_pass, model):
    """`graph_pass` reports no change and leaves `model` exactly as it was."""
    original = model.SerializeToString()
    assert graph_pass(model) == {}
    assert model.SerializeToString() == original


# --------------------------------------------------------------------------------------------------
# fold_pad_into_conv


def conv_weights(channels_in=3, channels_out=4, kernel=3):
    weights = np.random.default_rng(1).normal(size=(channels_out, channels_in, kernel, kernel))
    return constant("w", weights, np.float32)


def pad_then_conv(begin=(1, 1), end=(1, 1), **conv_attributes):
    return make_model(
        [
            helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
            helper.make_node("Conv", ["padded", "w"], ["y"], name="conv", **conv_attributes),
        ],
        [pads(begin, end), conv_weights()],
    )


def test_fold_pad_into_conv_removes_the_pad():
    folded = run_and_compare(
        graph_passes.fold_pad_into_conv, pad_then_conv(), ["Conv"], {"Pad": -1}
    )
    (conv,) = folded.graph.node
    assert conv.input[0] == "x"
    assert pads_of(conv) == [1, 1, 1, 1]


def test_fold_pad_into_conv_adds_to_the_conv_pads_of_a_grouped_conv():
    model = make_model(
        [
            helper.make_node("Pad", ["x", "pads", "zero"], ["padded"], mode="constant"),
            helper.make_node(
                "Conv", ["padded", "w"], ["y"], group=3, pads=[1, 0, 1, 0], strides=[2, 2]
            ),
        ],
        [
            pads((1, 2), (1, 2)),
            constant("zero", 0.0, np.float32),
            conv_weights(channels_in=1, channels_out=6),
        ],
    )
    folded = run_and_compare(graph_passes.fold_pad_into_conv, model, ["Conv"], {"Pad": -1})
    assert pads_of(folded.graph.node[0]) == [2, 2, 2, 2]


def test_fold_pad_into_conv_reads_pads_from_a_constant_node():
    model = make_model(
        [
            helper.make_node("Constant", [], ["pads"], value=pads((1, 1), (1, 1))),
            helper.make_node("Pad", ["x", "pads"], ["padded"]),
            helper.make_node("Conv", ["padded", "w"], ["y"]),
        ],
        [conv_weights()],
    )
    run_and_compare(graph_passes.fold_pad_into_conv, model, ["Constant", "Conv"], {"Pad": -1})


def refused_conv_graphs():
    """Graphs where Pad -> Conv must stay, each named by the precondition it breaks."""
    weights = conv_weights()
    conv = helper.make_node("Conv", ["padded", "w"], ["y"])
    yield "asymmetric pads", pad_then_conv(begin=(0, 0), end=(1, 1))
    yield "non-zero pad value", make_model(
        [helper.make_node("Pad", ["x", "pads", "value"], ["padded"]), conv],
        [pads((1, 1), (1, 1)), constant("value", 1.0, np.float32), weights],
    )
    yield "reflect mode", make_model(
        [helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"), conv],
        [pads((1, 1), (1, 1)), weights],
    )
    yield "a pad feeding two consumers", make_model(
        [
            helper.make_node("Pad", ["x", "pads"], ["padded"]),
            conv,
            helper.make_node("Relu", ["padded"], ["z"]),
        ],
        [pads((1, 1), (1, 1)), weights],
        outputs=("y", "z"),
    )
    yield "a pad that is a graph output", make_model(
        [helper.make_node("Pad", ["x", "pads"], ["padded"]), conv],
        [pads((1, 1), (1, 1)), weights],
        outputs=("y", "padded"),
    )
    yield "padding the channels", make_model(
        [helper.make_node("Pad", ["x", "pads"], ["padded"]), conv],
        [constant("pads", [0, 1, 1, 1, 0, 0, 1, 1]), conv_weights(channels_in=4)],
    )
    yield "cropping (negative pads)", make_model(
        [helper.make_node("Pad", ["x", "pads"], ["padded"]), conv],
        [pads((-1, -1), (-1, -1)), weights],
    )
    yield "pads that are not a constant", make_model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Concat", ["shape", "shape"], ["pads"], axis=0),
            helper.make_node("Sub", ["pads", "pads"], ["zeros"]),
            helper.make_node("Pad", ["x", "zeros"], ["padded"]),
            conv,
        ],
        [weights],
    )
    yield "a conv that pads implicitly (auto_pad)", pad_then_conv(auto_pad="SAME_UPPER")
    yield "a pad with an explicit axes input", make_model(
        [helper.make_node("Pad", ["x", "pads", "", "axes"], ["padded"]), conv],
        [pads((1, 1), (1, 1)), constant("axes", [0, 1, 2, 3]), weights],
        opset=18,
    )
    yield "a pad on the weights", make_model(
        [
            helper.make_node("Pad", ["w", "wpads"], ["padded_w"]),
            helper.make_node("Conv", ["x", "padded_w"], ["y"]),
        ],
        [
            constant("wpads", [0, 0, 1, 1, 0, 0, 1, 1]),
            constant("w", np.ones((4, 3, 1, 1)), np.float32),
        ],
    )


@pytest.mark.parametrize("model", [pytest.param(m, id=n) for n, m in refused_conv_graphs()])
def test_fold_pad_into_conv_refuses(model):
    assert_refused(graph_passes.fold_pad_into_conv, model)


# --------------------------------------------------------------------------------------------------
# fold_pad_into_max_pool


def relu_pad_max_pool(begin=(1, 1), end=(1, 1), relu=True, **pool_attributes):
    pool_attributes = {"kernel_shape": [3, 3], "strides": [2, 2], **pool_attributes}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")] if relu else []
    nodes += [
        helper.make_node("Pad", ["r" if relu else "x", "pads"], ["padded"], name="pad"),
        helper.make_node("MaxPool", ["padded"], ["y"], name="pool", **pool_attributes),
    ]
    return make_model(nodes, [pads(begin, end)])


@pytest.mark.parametrize("begin, end", [((1, 1), (1, 1)), ((0, 0), (1, 1)), ((2, 0), (1, 2))])
def test_fold_pad_into_max_pool_removes_the_pad_after_a_relu(begin, end):
    folded = run_and_compare(
        graph_passes.fold_pad_into_max_pool,
        relu_pad_max_pool(begin, end),
        ["Relu", "MaxPool"],
        {"Pad": -1},
    )
    pool = folded.graph.node[1]
    assert pool.input[0] == "r"
    assert pads_of(pool) == [*begin, *end]


def refused_max_pool_graphs():
    yield "input not a relu output", relu_pad_max_pool(relu=False)
    yield "padding as large as the kernel", relu_pad_max_pool((3, 0), (0, 0))
    yield "ceil_mode", relu_pad_max_pool((0, 0), (1, 1), kernel_shape=[2, 2], ceil_mode=1)
    yield "a max pool that pads implicitly (auto_pad)", relu_pad_max_pool(auto_pad="SAME_UPPER")
    yield "a pad feeding two consumers", make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Pad", ["r", "pads"], ["padded"]),
            helper.make_node("MaxPool", ["padded"], ["y"], kernel_shape=[3, 3]),
            helper.make_node("Identity", ["padded"], ["z"]),
        ],
        [pads((1, 1), (1, 1))],
        outputs=("y", "z"),
    )
    yield "a pad that is a graph output", make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Pad", ["r", "pads"], ["padded"]),
            helper.make_node("MaxPool", ["padded"], ["y"], kernel_shape=[3, 3]),
        ],
        [pads((1, 1), (1, 1))],
        outputs=("y", "padded"),
    )
    yield "a max pool with indices", make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Pad", ["r", "pads"], ["padded"]),
            helper.make_node("MaxPool", ["padded"], ["y", "indices"], kernel_shape=[3, 3]),
            helper.make_node("Cast", ["indices"], ["z"], to=TensorProto.FLOAT),
        ],
        [pads((1, 1), (1, 1))],
        outputs=("y", "z"),
    )


@pytest.mark.parametrize("model", [pytest.param(m, id=n) for n, m in refused_max_pool_graphs()])
def test_fold_pad_into_max_pool_refuses(model):
    assert_refused(graph_passes.fold_pad_into_max_pool, model)


@pytest.mark.parametrize(
    "model, pool_attributes",
    [
        (relu_pad_max_pool(relu=False), {"kernel_shape": [3, 3], "strides": [2, 2]}),
        (
            relu_pad_max_pool((0, 0), (1, 1), kernel_shape=[2, 2], ceil_mode=1),
            {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
        ),
    ],
    ids=["input not a relu output", "ceil_mode"],
)
def test_the_max_pool_preconditions_matter(model, pool_attributes):
    # Folding these by hand changes the output: the refusals above are needed, not cautious.
    # Without the Relu, a border window of negative values takes the zero pad as its maximum; with
    # ceil_mode, onnxruntime drops a last window that would start in MaxPool's own padding but
    # keeps it on a Pad's output.
    data = model.graph.node[-2].input[0]
    padding = [int(p) for p in numpy_helper.to_array(model.graph.initializer[0])]
    folded = make_model(
        list(model.graph.node)[:-2]
        + [
            helper.make_node(
                "MaxPool", [data], ["y"], pads=padding[2:4] + padding[6:8], **pool_attributes
            )
        ],
    )
    x = -np.abs(random_input(model))
    expected, got = run(model, x)[0], run(folded, x)[0]
    assert expected.shape != got.shape or not np.allclose(expected, got)


# --------------------------------------------------------------------------------------------------
# global_average_pool_and_squeeze_to_reduce_mean


def pool_then_squeeze(axes=(2, 3), opset=17, outputs=("y",), extra_nodes=()):
    if opset >= 13:
        squeeze = helper.make_node("Squeeze", ["pooled", "axes"], ["y"])
        initializers = [constant("axes", list(axes))]
    else:
        squeeze = helper.make_node("Squeeze", ["pooled"], ["y"], axes=list(axes))
        initializers = []
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"], name="pool"), squeeze]
    return make_model(nodes + list(extra_nodes), initializers, outputs=outputs, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
@pytest.mark.parametrize("axes", [(2, 3), (-1, -2)])
def test_global_average_pool_and_squeeze_become_one_reduce_mean(opset, axes):
    optimized = run_and_compare(
        graph_passes.global_average_pool_and_squeeze_to_reduce_mean,
        pool_then_squeeze(axes, opset),
        ["ReduceMean"],
        {"GlobalAveragePool": -1, "Squeeze": -1, "ReduceMean": +1},
    )
    (reduce_mean,) = optimized.graph.node
    assert reduce_mean.output[0] == "y"


def refused_pool_graphs():
    yield "squeezing one spatial axis", pool_then_squeeze(axes=(3,))
    yield "squeezing the batch axis too", make_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Squeeze", ["pooled", "axes"], ["y"]),
        ],
        [constant("axes", [0, 2, 3])],
        input_shape=(1, 3, 8, 8),
    )
    yield "a squeeze without axes (it would drop a batch of 1 too)", make_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Squeeze", ["pooled"], ["y"]),
        ]
    )
    yield "a pool that is a graph output", pool_then_squeeze(outputs=("y", "pooled"))
    yield "a pool feeding two consumers", pool_then_squeeze(
        outputs=("y", "z"), extra_nodes=[helper.make_node("Relu", ["pooled"], ["z"])]
    )
    yield "a pool followed by something else", make_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["y"]),
        ]
    )


@pytest.mark.parametrize("model", [pytest.param(m, id=n) for n, m in refused_pool_graphs()])
def test_global_average_pool_and_squeeze_to_reduce_mean_refuses(model):
    assert_refused(graph_passes.global_average_pool_and_squeeze_to_reduce_mean, model)


# --------------------------------------------------------------------------------------------------
# store_weights_as_float16


def dense_layers(extra_initializers=()):
    """x (2, 8) @ w (8, 4) + b (4,), times a float32 scalar, reshaped by an int64 shape."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["h_biased"]),
        helper.make_node("Mul", ["h_biased", "scale"], ["h_scaled"]),
        helper.make_node("Reshape", ["h_scaled", "shape"], ["y"]),
    ]
    initializers = [
        constant("w", rng.normal(size=(8, 4)), np.float32),
        constant("b", rng.normal(size=4), np.float32),
        constant("scale", 0.5, np.float32),
        constant("shape", [-1]),
        *extra_initializers,
    ]
    return make_model(nodes, initializers, input_shape=(2, 8))


def test_store_weights_as_float16_rounds_weights_and_casts_them_back():
    model = dense_layers()
    half = run_and_compare(
        graph_passes.store_weights_as_float16,
        model,
        ["Cast", "Cast", "MatMul", "Add", "Mul", "Reshape"],
        {"Cast": +2},
        rtol=1e-2,  # float16 rounds each weight by at most 2**-11 of its value
        atol=1e-2,
    )
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types == {
        "w_float16": TensorProto.FLOAT16,
        "b_float16": TensorProto.FLOAT16,
        "scale": TensorProto.FLOAT,  # a scalar stays float32
        "shape": TensorProto.INT64,
    }
    # Exactly the original graph computed with the weights rounded to float16, in float32.
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for initializer in rounded.graph.initializer:
        if initializer.name in ("w", "b"):
            array = numpy_helper.to_array(initializer).astype(np.float16).astype(np.float32)
            initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
    x = random_input(model)
    np.testing.assert_allclose(run(half, x)[0], run(rounded, x)[0], rtol=1e-6, atol=1e-6)
    assert not np.array_equal(run(half, x)[0], run(model, x)[0])  # the pass is not exact


def test_store_weights_as_float16_leaves_scalars_integers_and_graph_inputs():
    # `w` is also a graph input (a default a caller may override): it keeps its float32 type.
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Mul", ["h", "scale"], ["y"]),
        ],
        [constant("w", np.ones((8, 4)), np.float32), constant("scale", 2.0, np.float32)],
        input_shape=(2, 8),
    )
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4]))
    assert_refused(graph_passes.store_weights_as_float16, model)


def test_store_weights_as_float16_refuses_a_weight_beyond_float16_range():
    model = dense_layers([constant("huge", [1.0, 7e4], np.float32)])
    original = model.SerializeToString()
    with pytest.raises(ValueError, match="'huge' holds 7e\\+04, beyond float16's range"):
        graph_passes.store_weights_as_float16(model)
    assert model.SerializeToString() == original  # `w` and `b`, found first, are untouched too


# --------------------------------------------------------------------------------------------------
# optimize


def test_optimize_runs_the_exact_passes_logs_them_and_drops_unused_constants(caplog):
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Pad", ["r", "pool_pads"], ["padded"]),
            helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[3, 3]),
            helper.make_node("Pad", ["pooled", "pads"], ["padded_again"]),
            helper.make_node("Conv", ["padded_again", "w"], ["y"]),
        ],
        [constant("pool_pads", [0, 0, 1, 1, 0, 0, 1, 1]), pads((1, 1), (1, 1)), conv_weights()],
    )
    x = random_input(model)
    expected = run(model, x)[0]
    with caplog.at_level("INFO", logger="export.graph_passes"):
        lines = graph_passes.optimize(model)
    assert lines == ["fold_pad_into_conv: Pad -1", "fold_pad_into_max_pool: Pad -1"]
    assert [r.getMessage() for r in caplog.records] == lines
    assert op_types(model) == ["Relu", "MaxPool", "Conv"]
    assert [i.name for i in model.graph.initializer] == ["w"]
    np.testing.assert_allclose(run(model, x)[0], expected, rtol=1e-6, atol=1e-6)


def test_optimize_leaves_float16_out_of_the_exact_passes():
    assert graph_passes.store_weights_as_float16 not in graph_passes.EXACT_PASSES
    model = dense_layers()
    assert graph_passes.optimize(model) == []
    assert graph_passes.optimize(model, passes=[graph_passes.store_weights_as_float16]) == [
        "store_weights_as_float16: Cast +2"
    ]


# --------------------------------------------------------------------------------------------------
# End to end, through to_onnx


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
        (
            "global_average_pool_and_squeeze_to_reduce_mean: "
            "GlobalAveragePool -1, Squeeze -1, ReduceMean +1"
        ),
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
