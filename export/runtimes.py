"""Runtimes an ONNX file is run in, and the check that they compute what the file means.

An int8 QDQ file means what onnxruntime computes with graph optimizations off
(`ORT_DISABLE_ALL`): each QuantizeLinear and DequantizeLinear literally, the operations between
them in float32. Runtimes fuse the pairs into integer kernels (onnxruntime's QLinearConv,
OpenVINO's low-precision transformations). `check` runs each integer layer alone in each runtime
on the codes the meaning gives it: integer and float arithmetic round a value at a boundary
differently, a fraction of a percent of a layer's values, while a wrong kernel (16-bit pair sums
that saturate) puts most of them many steps away. At the graph's outputs those rounding
differences add up through a deep network, so the outputs are compared and reported, not judged.
"""

import dataclasses
import importlib.util
import os
import tempfile

import numpy as np

from keras_bn import verification
from keras_bn.verification import VerificationError

RUNTIMES = ("onnxruntime", "openvino")
# The fraction of an output's values allowed beyond one quantization step of the file's meaning
# (measured: 0 to 0.27% on trained QAT BN-Inceptions on test digits, 2% on uniform noise;
# 77-81% for 8-bit weights in onnxruntime on a CPU without VNNI).
MAX_BEYOND_ONE_STEP = 0.05
# The batches each integer layer is run on alone.
LAYER_CHECK_BATCHES = 2


def session(data, optimized=True):
    """An onnxruntime CPU session of `data` (serialized ONNX); `optimized=False` turns every
    graph optimization off, which computes the file's exact meaning."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # Spinning threads would keep cores busy between runs, which a shared machine cannot afford.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimized:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def openvino_installed():
    """Whether the `openvino` package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


class OpenVINOSession:
    """OpenVINO's CPU plugin on an ONNX file, with onnxruntime's `run(names, feed)`."""

    def __init__(self, data):
        import openvino

        core = openvino.Core()
        with tempfile.TemporaryDirectory(prefix="keras-bn-openvino-") as folder:
            path = os.path.join(folder, "model.onnx")
            with open(path, "wb") as file:
                file.write(data)
            model = core.read_model(path)
        self._outputs = {output.get_any_name(): i for i, output in enumerate(model.outputs)}
        # On CPUs with AMX or AVX-512 BF16, OpenVINO computes float layers in bfloat16 unless
        # told otherwise; the file means float32 there.
        self._compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self._request = self._compiled.create_infer_request()

    def run(self, names, feed):
        results = self._request.infer(feed)
        values = list(results.values())
        return [np.asarray(values[self._outputs[name]]) for name in names]


@dataclasses.dataclass
class RuntimeCheck:
    """How one runtime compares with an int8 file's meaning.

    Attributes:
        runtime: "onnxruntime" or "openvino".
        checked: whether it ran here; `note` says why not.
        note: what ran (the CPU kind) or why it did not.
        layers: the integer layers (Conv, MatMul, Gemm between quantize-dequantize pairs) run
            one by one on the meaning's own inputs.
        worst_layer: the layer with the most values beyond one step, and `layer_beyond_one_step`
            that fraction (at most `MAX_BEYOND_ONE_STEP`, or the file is refused).
        max_steps, beyond_one_step: at the graph's outputs, the largest |runtime - meaning| in
            steps of each output (its grid's step, or its range / 255) and the largest fraction
            of an output's values beyond one step: rounding differences that a deep network
            carries forward, reported, not judged.
    """

    runtime: str
    checked: bool
    note: str
    max_steps: float = None
    beyond_one_step: float = None
    layers: int = 0
    worst_layer: str = None
    layer_beyond_one_step: float = None

    def summary(self):
        if not self.checked:
            return f"{self.runtime}: not checked ({self.note})"
        if self.max_steps is None:
            return f"{self.runtime}: {self.note}"
        text = f"{self.runtime} ({self.note}): "
        if self.layers:
            text += (f"{self.layers} integer layers within one step but "
                     f"{self.layer_beyond_one_step:.2%} of values (worst: {self.worst_layer}); ")
        return text + (f"outputs within {self.max_steps:.2f} steps, {self.beyond_one_step:.2%} "
                       "of values beyond one")


def check(data, feeds, output_names, target, *, cpu_has_vnni, openvino="auto", reference=None,
          every_runtime=False):
    """Runs the int8 file `data` in every runtime at hand that its `target` is meant for, on
    `feeds` (feed dicts), against its exact meaning.

    Each integer layer (a Conv, MatMul or Gemm whose input and weight come from
    DequantizeLinear, with its output's quantize pair) runs alone in each runtime on the codes
    the meaning gives it, so that a wrong kernel shows where it is, not blurred by the rounding
    differences that a deep network carries to its outputs: a saturating kernel puts most of a
    layer's values beyond one step, rounding a fraction of a percent. The graph's outputs are
    compared too, and reported.

    Args:
        data: the serialized int8 ONNX graph.
        feeds: a list of `{input name: array}`.
        output_names: the graph's outputs.
        target: an `export.targets.Target`.
        cpu_has_vnni: whether this CPU has VNNI (`None`: not x86 or unknown, taken as safe).
        openvino: "auto" runs OpenVINO when it is installed, `True` requires it, `False` skips.
        reference: the meaning's outputs per feed, when already computed.
        every_runtime: also run onnxruntime where the target says the file is wrong (a
            `cpu-vnni` file on a CPU without VNNI), to show it.

    Returns:
        A list of `RuntimeCheck`, one per runtime.

    Raises:
        VerificationError: a runtime puts more than `MAX_BEYOND_ONE_STEP` of some integer
            layer's values beyond one step from the meaning (the runtime and layer named).
        ValueError: `openvino=True` and OpenVINO is not installed.
    """
    if openvino is True and not openvino_installed():
        raise ValueError('OpenVINO was asked for but is not installed: pip install openvino (or '
                         'pip install "keras-bn[openvino]")')
    if reference is None:
        exact = session(data, optimized=False)
        reference = [exact.run(output_names, feed) for feed in feeds]
    cpu = {True: "a CPU with VNNI", False: "a CPU without VNNI", None: "this CPU"}[cpu_has_vnni]
    steps = output_steps(data)
    layers = _integer_layers(data, feeds[:LAYER_CHECK_BATCHES])
    checks = []
    if target.needs_vnni and cpu_has_vnni is False and not every_runtime:
        checks.append(RuntimeCheck(
            "onnxruntime", False, f"this CPU lacks VNNI, where target '{target.name}' files are "
            "wrong in onnxruntime; its meaning is verified"))
    else:
        checks.append(_compare("onnxruntime", session, data, feeds, reference, output_names,
                               f"optimized, on {cpu}", steps, layers))
    if openvino is False or (openvino == "auto" and not openvino_installed()):
        checks.append(RuntimeCheck("openvino", False, "not installed" if openvino else "skipped"))
    elif target.openvino_needs_vnni and cpu_has_vnni is False and not every_runtime:
        checks.append(RuntimeCheck(
            "openvino", False, f"this CPU lacks VNNI, where OpenVINO is not said to compute "
            f"target '{target.name}' files right; its meaning is verified"))
    else:
        checks.append(_compare("openvino", OpenVINOSession, data, feeds, reference, output_names,
                               f"CPU plugin, on {cpu}", steps, layers))
    return checks


@dataclasses.dataclass
class _Layer:
    """One integer layer as a graph of its own: its input codes in, its output out."""

    name: str
    data: bytes  # the subgraph, serialized
    feeds: list  # `{codes name: codes}` per batch, from the meaning
    output: str
    reference: list  # the subgraph's meaning per batch
    step: float  # 1 for integer codes, else the float output's range / 255


def _integer_layers(data, feeds):
    """Every integer layer of `data` as a `_Layer`, with the codes the file's meaning gives its
    input on `feeds`."""
    import onnx
    from onnx import utils

    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    types = {value.name: value for value in (*graph.value_info, *graph.input, *graph.output)}
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        source, weight = producers.get(node.input[0]), producers.get(node.input[1])
        if (source is None or weight is None or source.op_type != "DequantizeLinear"
                or weight.op_type != "DequantizeLinear" or weight.input[0] not in initializers
                or source.input[0] in initializers or source.input[0] not in types):
            continue
        output = node.output[0]
        after = consumers.get(output, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            following = consumers.get(after[0].output[0], [])
            if len(following) == 1 and following[0].op_type == "QuantizeLinear":
                output = following[0].output[0]
        elif len(after) == 1 and after[0].op_type == "QuantizeLinear":
            output = after[0].output[0]
        if output not in types:
            continue
        found.append((node.name or node.output[0], source.input[0], output))
    if not found:
        return []
    codes = sorted({name for _, name, _ in found})
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {value.name for value in probe.graph.output}
    probe.graph.output.extend(types[name] for name in codes if name not in known)
    names = [value.name for value in probe.graph.output]
    exact = session(probe.SerializeToString(), optimized=False)
    values = [dict(zip(names, exact.run(names, feed))) for feed in feeds]
    extractor = utils.Extractor(proto)
    layers = []
    for name, source, output in found:
        sub = extractor.extract_model([source], [output])
        sub.opset_import.extend([op for op in proto.opset_import
                                 if op.domain not in {o.domain for o in sub.opset_import}])
        sub_data = sub.SerializeToString()
        layer_feeds = [{source: batch[source]} for batch in values]
        meaning = session(sub_data, optimized=False)
        reference = [meaning.run([output], feed)[0] for feed in layer_feeds]
        integer = reference[0].dtype.kind in "iu"
        step = 1.0 if integer else verification.quantization_step(
            np.concatenate([r.ravel() for r in reference]))
        layers.append(_Layer(name, sub_data, layer_feeds, output, reference, step))
    return layers


def _compare(runtime, make_runner, data, feeds, reference, output_names, note, steps, layers):
    worst_name, worst_beyond = None, 0.0
    for layer in layers:
        runner = make_runner(layer.data)
        beyond = []
        for feed, want in zip(layer.feeds, layer.reference):
            (got,) = runner.run([layer.output], feed)
            if np.shape(got) != np.shape(want):
                raise VerificationError(
                    f"{runtime} gives integer layer {layer.name} the shape {np.shape(got)}, the "
                    f"file's meaning {np.shape(want)}; nothing was written")
            distance = np.abs(got.astype(np.float64) - want.astype(np.float64)) / layer.step
            beyond.append(np.ravel(~(distance <= 1.0)))
        fraction = float(np.mean(np.concatenate(beyond)))
        if fraction > MAX_BEYOND_ONE_STEP:
            raise VerificationError(
                f"{runtime} ({note}) computes integer layer {layer.name} otherwise than the "
                f"file means: {fraction:.1%} of its values (output '{layer.output}') lie more "
                f"than one step away on the same input codes, above the "
                f"{MAX_BEYOND_ONE_STEP:.0%} that rounding explains (a saturating kernel?); "
                "nothing was written")
        if worst_name is None or fraction > worst_beyond:
            worst_name, worst_beyond = layer.name, fraction
    runner = make_runner(data)
    pooled = {name: ([], []) for name in output_names}
    for feed, expected in zip(feeds, reference):
        for name, want, got in zip(output_names, expected, runner.run(output_names, feed)):
            if np.shape(got) != np.shape(want):
                raise VerificationError(
                    f"{runtime} gives output '{name}' the shape {np.shape(got)}, the file's "
                    f"meaning {np.shape(want)}; nothing was written")
            pooled[name][0].append(np.ravel(want))
            pooled[name][1].append(np.ravel(got))
    max_steps, beyond_one = steps_apart(pooled, f"{runtime} ({note})", "the file's meaning",
                                        steps, limit=None)
    return RuntimeCheck(runtime, True, note, max_steps, beyond_one, len(layers), worst_name,
                        worst_beyond if layers else None)


def output_steps(data):
    """`{output name: step}` of the graph outputs that a DequantizeLinear with a constant
    per-tensor scale produces: one step of the output's own integer grid."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(data).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    steps = {}
    outputs = {value.name for value in graph.output}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            scale = constants.get(node.input[1])
            if scale is not None and scale.size == 1:
                steps[node.output[0]] = float(scale.ravel()[0])
    return steps


def steps_apart(pooled, who, against, grid_steps=None, limit=MAX_BEYOND_ONE_STEP):
    """The largest distance in quantization steps and the largest fraction of values beyond one
    step over outputs `{name: (reference values, values)}` (lists of arrays), each output's step
    its reference's range / 255, or one step of its own integer grid (`grid_steps`, `{name:
    step}`) where that is larger (a constant output has no range); VerificationError past
    `limit` (`None`: no limit)."""
    worst_steps, worst_beyond = 0.0, 0.0
    for name, (wants, gots) in pooled.items():
        want = np.concatenate(wants).astype(np.float64)
        got = np.concatenate(gots).astype(np.float64)
        step = max(verification.quantization_step(want), (grid_steps or {}).get(name, 0.0))
        steps = np.abs(got - want) / step
        steps[np.isnan(want) & np.isnan(got)] = 0.0
        beyond = float(np.mean(~(steps <= 1.0)))
        if limit is not None and beyond > limit:
            raise VerificationError(
                f"{who}: {beyond:.1%} of output '{name}' lies more than one quantization step "
                f"(the output's range / 255, or its grid's step) from {against}, up to "
                f"{np.nanmax(steps):.3g} steps, above the {limit:.0%} allowed; "
                "nothing was written"
            )
        worst_steps = max(worst_steps, float(np.nanmax(steps, initial=0.0)))
        worst_beyond = max(worst_beyond, beyond)
    return worst_steps, worst_beyond
