"""Deployment targets of an int8 file: one integer scheme per runtime and CPU, and the static
checks that say a file keeps to its target.

An int8 QDQ file means what its QuantizeLinear/DequantizeLinear nodes around float operations
compute literally (onnxruntime with graph optimizations off). A runtime that fuses them into
integer kernels must compute the same, and on x86 that depends on the CPU: onnxruntime's u8 x s8
kernels without VNNI (AVX2, AVX-512 without VNNI) sum pairs of products in 16 bits
(`vpmaddubsw`), which saturates as soon as `2 * 255 * |w| > 32767`, that is for weights beyond
64 in magnitude. VNNI (`vpdpbusd`) sums in 32 bits. TensorRT takes symmetric int8 activations
only (zero point 0). So the target, not the CPU that exports, decides the scheme:

- `cpu` (default): uint8 asymmetric activations, int8 symmetric per-channel weights in
  `[-64, 64]` (onnxruntime's `reduce_range`): no pair sum can saturate, so the file is right on
  every x86-64 CPU with or without VNNI, on ARM, and in OpenVINO.
- `cpu-vnni`: the same with full 8-bit weights `[-127, 127]`: half a bit more weight precision,
  right only where u8 x s8 products accumulate in 32 bits (x86 with AVX-512 VNNI or AVX-VNNI,
  ARM, OpenVINO); wrong in onnxruntime on x86 CPUs without VNNI.
- `tensorrt`: int8 symmetric activations and weights (every zero point 0), weights per output
  channel (axis 0 of a Conv kernel, axis 1 of a MatMul weight), quantize-dequantize pairs on the
  inputs of Conv, MatMul, Gemm and Add as TensorRT's explicit quantization places them.

Reference:
    [Jacob et al., 2018](https://arxiv.org/abs/1712.05877), Sec. 2; onnxruntime's
    [quantization guide](
    https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html) (reduce_range
    and VNNI); TensorRT's "Working with Quantized Types" (Q/DQ placement).
"""

import dataclasses

import numpy as np

from keras_bn.quantization.preparation import TARGET_WEIGHT_BITS

# The 16-bit pair sums of onnxruntime's x86 u8 x s8 kernels without VNNI hold at most this.
PAIR_SUM_LIMIT = 2**15 - 1
# Keys of the ONNX metadata_props an int8 file carries.
METADATA_PREFIX = "keras_bn."


@dataclasses.dataclass(frozen=True)
class Target:
    """One deployment target of an int8 file.

    Attributes:
        name: what `to_onnx(..., target=)` and `--target` take.
        right_on: where the file computes its meaning, in words (the report and the file say it).
        activation_type: "uint8" or "int8".
        symmetric_activations: whether every activation zero point is 0.
        weight_bound: the largest |integer| of a weight: 64 (onnxruntime's `reduce_range`) or 127.
        needs_vnni: onnxruntime's fused kernels on x86 compute the file's meaning only with VNNI.
        op_types_to_quantize: the operations whose inputs are quantized; `None` for
            onnxruntime's default (every operation it has a quantized form of).
        openvino_needs_vnni: OpenVINO is only said to compute the file's meaning on CPUs with
            VNNI: signed activations are unmeasured on CPUs without it, where oneDNN's int8
            kernels rescale to avoid 16-bit saturation.
        quantize_outputs: whether the outputs of Conv, MatMul and Gemm get their own
            quantize-dequantize pair (onnxruntime's CPU kernels fuse it into QLinearConv);
            TensorRT places pairs on inputs only.
        qat_weight_bits: the widest QAT kernel grid (`keras_bn.prepare_qat`) whose integers stay
            within `weight_bound` (`2^(b-1) - 1 <= weight_bound`); `None` where QAT does not
            train for the target.
    """

    name: str
    right_on: str
    activation_type: str
    symmetric_activations: bool
    weight_bound: int
    needs_vnni: bool
    op_types_to_quantize: tuple = None
    quantize_outputs: bool = True
    openvino_needs_vnni: bool = False

    @property
    def qat_weight_bits(self):
        return TARGET_WEIGHT_BITS.get(self.name)

    @property
    def reduce_range(self):
        return self.weight_bound < 127

    def quantize_static_options(self):
        """Keyword arguments of `onnxruntime.quantization.quantize_static` for this target
        (besides the model, the data and the calibration method)."""
        from onnxruntime import quantization as ort_quantization

        types = {"uint8": ort_quantization.QuantType.QUInt8,
                 "int8": ort_quantization.QuantType.QInt8}
        extra = {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": True,
                 # A MatMul weight is (in, out): one scale per output channel is axis 1.
                 "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
        if not self.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = ["Conv", "MatMul", "Gemm"]
        options = dict(
            quant_format=ort_quantization.QuantFormat.QDQ, per_channel=True,
            reduce_range=self.reduce_range, activation_type=types[self.activation_type],
            weight_type=ort_quantization.QuantType.QInt8, extra_options=extra,
        )
        if self.op_types_to_quantize is not None:
            options["op_types_to_quantize"] = list(self.op_types_to_quantize)
        return options

    def describe(self):
        """One line: the scheme and where it is right."""
        symmetry = "symmetric" if self.symmetric_activations else "asymmetric"
        return (f"target '{self.name}': activations {self.activation_type} {symmetry}, weights "
                f"int8 per-channel symmetric in [-{self.weight_bound}, {self.weight_bound}]; "
                f"right on {self.right_on}")


TARGETS = {
    target.name: target for target in (
        Target(
            name="cpu",
            right_on="every x86-64 CPU (with or without VNNI), ARM, and OpenVINO",
            activation_type="uint8", symmetric_activations=False, weight_bound=64,
            needs_vnni=False,
        ),
        Target(
            name="cpu-vnni",
            right_on="x86-64 CPUs with VNNI (AVX-512 VNNI or AVX-VNNI), ARM, and OpenVINO; "
                     "WRONG in onnxruntime on x86 CPUs without VNNI (16-bit pair sums saturate)",
            activation_type="uint8", symmetric_activations=False, weight_bound=127,
            needs_vnni=True,
        ),
        Target(
            name="tensorrt",
            right_on="TensorRT (explicit quantization: symmetric int8, zero points 0), and "
                     "onnxruntime and OpenVINO on CPUs with VNNI",
            activation_type="int8", symmetric_activations=True, weight_bound=127,
            needs_vnni=True, op_types_to_quantize=("Conv", "MatMul", "Gemm", "Add"),
            quantize_outputs=False, openvino_needs_vnni=True,
        ),
    )
}
DEFAULT_TARGET = "cpu"


def get(name):
    """The `Target` called `name`; ValueError naming the targets there are."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown int8 target {name!r}; the targets are "
                         f"{', '.join(repr(n) for n in TARGETS)}")
    return TARGETS[name]


def metadata(target, version):
    """`{key: value}` of the ONNX `metadata_props` an int8 file of `target` carries."""
    return {
        f"{METADATA_PREFIX}target": target.name,
        f"{METADATA_PREFIX}right_on": target.right_on,
        f"{METADATA_PREFIX}activation_type": target.activation_type,
        f"{METADATA_PREFIX}symmetric_activations": str(target.symmetric_activations).lower(),
        f"{METADATA_PREFIX}weight_bound": str(target.weight_bound),
        f"{METADATA_PREFIX}version": version,
    }


def set_metadata(proto, values):
    """Writes `values` into `proto.metadata_props`, replacing entries of the same keys."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in kept + sorted(values.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(proto):
    """The `keras_bn.*` metadata of `proto`, keys without the prefix."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


@dataclasses.dataclass
class IntegerProduct:
    """A Conv, MatMul or Gemm whose data and weight both come from DequantizeLinear: what a
    runtime fuses into an integer kernel.

    Attributes:
        node: the node's name.
        activation_type: "uint8" or "int8", the type of its quantized data input.
        activation_zero_point: that input's zero point.
        weight_bound: the largest |integer - zero point| of its weight.
        pair_sum: the largest |a1 w1 + a2 w2| two products can reach in an x86 pair sum.
    """

    node: str
    activation_type: str
    activation_zero_point: int
    weight_bound: int
    pair_sum: int


def integer_products(proto):
    """Every `IntegerProduct` of an int8 QDQ graph, in graph order."""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    constants = dict(initializers)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    producers = {output: node for node in graph.node for output in node.output}
    products = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        data, weight = (_dequantized(producers.get(name), constants) for name in node.input[:2])
        if data is None or weight is None or weight[0] is None:
            continue
        (_, data_zero_point, data_dtype), (integers, weight_zero_point, _) = data, weight
        if data_zero_point is None:
            continue
        weight_zero_point = np.asarray(weight_zero_point, np.int64)
        if weight_zero_point.size > 1:  # per channel: broadcast along the weight's axis 0/1
            shape = [1] * integers.ndim
            axis = 0 if node.op_type == "Conv" else integers.ndim - 1
            shape[axis] = weight_zero_point.size
            weight_zero_point = weight_zero_point.reshape(shape)
        bound = int(np.abs(integers.astype(np.int64) - weight_zero_point).max(initial=0))
        zero_point = int(np.asarray(data_zero_point).ravel()[0])
        info = np.iinfo(data_dtype)
        largest_activation = max(info.max - zero_point, zero_point - info.min)
        if data_dtype == np.uint8:
            # the kernels take the unsigned codes themselves, not the codes minus zero point
            largest_activation = info.max
        products.append(IntegerProduct(
            node=node.name or node.output[0], activation_type=np.dtype(data_dtype).name,
            activation_zero_point=zero_point, weight_bound=bound,
            pair_sum=2 * int(largest_activation) * bound,
        ))
    return products


def _dequantized(node, constants):
    """`(integers or None, zero point or None, integer dtype)` of a DequantizeLinear `node`
    whose zero point is constant; `integers` when its quantized input is constant too."""
    if node is None or node.op_type != "DequantizeLinear":
        return None
    integers = constants.get(node.input[0])
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    dtype = (zero_point.dtype if zero_point is not None
             else integers.dtype if integers is not None else None)
    if dtype is None:
        return None
    if zero_point is None:
        zero_point = np.zeros((), dtype)
    return integers, zero_point, np.dtype(dtype)


def check(proto, target):
    """What in `proto` breaks `target`'s rules, one line each (empty when it keeps them).

    The rules are static, so they hold whatever CPU checks them: for every target, every
    weight integer lies within `target.weight_bound`; for `cpu`, no pair of u8 x s8 products
    can leave 16 bits (`PAIR_SUM_LIMIT`), which is what onnxruntime's x86 kernels without VNNI
    need; for symmetric targets, every activation zero point is 0 and of type int8.
    """
    target = get(target)
    problems = []
    products = integer_products(proto)
    for product in products:
        if product.weight_bound > target.weight_bound:
            problems.append(f"{product.node}: weight integers up to {product.weight_bound}, "
                            f"beyond the target's {target.weight_bound}")
        if not target.needs_vnni and product.pair_sum > PAIR_SUM_LIMIT:
            problems.append(f"{product.node}: a pair of {product.activation_type} x int8 "
                            f"products reaches {product.pair_sum}, beyond the 16-bit sums "
                            f"({PAIR_SUM_LIMIT}) of x86 CPUs without VNNI")
    if target.symmetric_activations:
        from onnx import numpy_helper

        zero_points = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
                continue
            zero_point = zero_points.get(node.input[2])
            if zero_point is None or zero_point.dtype == np.int32:  # a bias: int32 by nature
                continue
            if zero_point.dtype != np.int8 or np.any(zero_point != 0):
                problems.append(f"{node.name or node.output[0]}: zero point "
                                f"{zero_point.dtype.name} {zero_point.ravel()[:4].tolist()}, "
                                "not int8 0")
    return problems
