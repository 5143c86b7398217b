"""export.targets and export.runtimes: the rules that make an int8 file right on every CPU its
target names, checked statically so that a test on a CPU with VNNI still catches what only a CPU
without it would show; and the runtime checks against a file's exact meaning."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export
from export import runtimes, targets
from export.__main__ import main
from export.quantization import cpu_has_vnni, quantize_int8
from keras_bn.verification import VerificationError

CHANNELS, KERNEL = 8, 3


def _pair_sums_without_vnni(activations, weights):
    """u8 x s8 dot products as onnxruntime's x86 kernels without VNNI compute them: adjacent
    products summed in pairs with int16 saturation (`vpmaddubsw`), then in int32."""
    products = activations.astype(np.int64) * weights.astype(np.int64)
    pairs = products.reshape(products.shape[:-1] + (-1, 2)).sum(-1)
    return np.clip(pairs, -(2**15), 2**15 - 1).sum(-1)


@pytest.mark.parametrize("bound, saturates", [(64, False), (127, True)])
def test_the_weight_bound_is_what_keeps_pair_sums_in_16_bits(bound, saturates):
    rng = np.random.default_rng(0)
    weights = rng.integers(-bound, bound + 1, (64, 32))
    weights[:, :2] = bound  # the worst pair: both products at their largest
    activations = np.full((64, 32), 255)
    exact = (activations.astype(np.int64) * weights).sum(-1)
    assert np.any(_pair_sums_without_vnni(activations, weights) != exact) == saturates
    assert (2 * 255 * bound > targets.PAIR_SUM_LIMIT) == saturates


def _conv_graph(weight_bound, activation_zero_point=None, metadata=None):
    """x -> QuantizeLinear -> DequantizeLinear -> Conv (int8 kernel up to `weight_bound`, per
    channel) -> y: the shape of an integer convolution in a QDQ file."""
    rng = np.random.default_rng(1)
    kernel = rng.integers(-weight_bound, weight_bound + 1, (CHANNELS, 3, KERNEL, KERNEL))
    kernel[:, 0, 0, 0] = weight_bound
    if activation_zero_point is None:
        activation_zero_point = np.uint8(0)
    zero_point_type = numpy_helper.from_array(np.asarray(activation_zero_point), "x_zero_point")
    initializers = [
        numpy_helper.from_array(np.float32(1 / 255), "x_scale"), zero_point_type,
        numpy_helper.from_array(kernel.astype(np.int8), "w"),
        numpy_helper.from_array(np.full(CHANNELS, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(CHANNELS, np.int8), "w_zero_point"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"],
                         name="dq"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero_point"], ["wd"], axis=0,
                         name="w_dq"),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, CHANNELS, 6, 6])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        targets.set_metadata(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_static_rules_of_each_target():
    seven_bit, eight_bit = _conv_graph(64), _conv_graph(127)
    (product,) = targets.integer_products(eight_bit)
    assert (product.node, product.activation_type, product.weight_bound) == ("conv", "uint8",
                                                                              127)
    assert product.pair_sum == 2 * 255 * 127
    assert targets.check(seven_bit, "cpu") == []
    problems = targets.check(eight_bit, "cpu")
    assert len(problems) == 2  # beyond the bound, and beyond the 16-bit pair sums
    assert "conv: weight integers up to 127, beyond the target's 64" in problems
    assert targets.check(eight_bit, "cpu-vnni") == []  # VNNI sums in 32 bits
    trt = targets.check(eight_bit, "tensorrt")
    assert trt == ["q: zero point uint8 [0], not int8 0", "dq: zero point uint8 [0], not int8 0"]
    assert targets.check(_conv_graph(127, np.int8(0)), "tensorrt") == []
    with pytest.raises(ValueError, match="unknown int8 target 'npu'; the targets are 'cpu', "
                                         "'cpu-vnni', 'tensorrt'"):
        targets.check(seven_bit, "npu")


def test_metadata_round_trips_and_replaces():
    model = _conv_graph(64)
    targets.set_metadata(model, {"other": "kept"})
    targets.set_metadata(model, targets.metadata(targets.get("cpu"), "1.2.3"))
    targets.set_metadata(model, targets.metadata(targets.get("cpu-vnni"), "1.2.3"))
    metadata = targets.read_metadata(onnx.load_from_string(model.SerializeToString()))
    assert metadata["target"] == "cpu-vnni" and metadata["version"] == "1.2.3"
    assert metadata["weight_bound"] == "127" and metadata["activation_type"] == "uint8"
    assert "WRONG in onnxruntime on x86 CPUs without VNNI" in metadata["right_on"]
    assert {p.key for p in model.metadata_props} >= {"other", "keras_bn.target"}
    assert len([p for p in model.metadata_props if p.key == "keras_bn.target"]) == 1


def _feeds(count=4):
    rng = np.random.default_rng(2)
    return [{"x": rng.random((2, 3, 6, 6)).astype(np.float32)} for _ in range(count)]


def test_runtimes_match_the_meaning_of_a_file_within_their_target(tmp_path):
    data = _conv_graph(64).SerializeToString()
    checks = runtimes.check(data, _feeds(), ["y"], targets.get("cpu"), cpu_has_vnni=False)
    assert [c.runtime for c in checks] == ["onnxruntime", "openvino"]
    assert all(c.checked and c.beyond_one_step <= runtimes.MAX_BEYOND_ONE_STEP for c in checks)
    # where the target says onnxruntime is wrong, it is not run as a check, and says why
    checks = runtimes.check(_conv_graph(127).SerializeToString(), _feeds(), ["y"],
                            targets.get("cpu-vnni"), cpu_has_vnni=False, openvino=False)
    assert not checks[0].checked and "lacks VNNI" in checks[0].note
    assert checks[1].summary() == "openvino: not checked (skipped)"


def test_a_runtime_far_from_the_meaning_is_refused():
    rng = np.random.default_rng(3)
    want = [rng.random(1000)]
    runtimes.steps_apart({"y": (want, [want[0] + 0.9 / 255])}, "ok", "meaning")
    shifted = want[0].copy()
    shifted[:60] += 3 / 255  # 6% of the values three steps away: a saturating kernel
    with pytest.raises(VerificationError, match=r"onnxruntime \(optimized\): 6.0% of output 'y' "
                                                r"lies more than one quantization step"):
        runtimes.steps_apart({"y": (want, [shifted])}, "onnxruntime (optimized)", "meaning")


def test_check_command_fails_a_file_that_breaks_its_rules(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_conv_graph(64, metadata=targets.metadata(targets.get("cpu"), "0")), good)
    onnx.save(_conv_graph(127), bad)  # no metadata: checked by the rules of "cpu"
    assert main(["--check", str(good), "--openvino", "skip"]) == 0
    out = capsys.readouterr().out
    assert "target 'cpu'" in out and "rules: kept" in out and "passed on this CPU" in out
    assert main(["--check", str(bad), "--openvino", "skip"]) == 1
    out = capsys.readouterr().out
    assert "no keras-bn target in its metadata" in out and "beyond the 16-bit sums" in out
    assert out.rstrip().endswith("FAILED") or "FAILED" in out


def _constant_classifier():
    """x (4 features) -> MatMul with a zero weight + bias -> Softmax: the same scores for every
    input, as an untrained network can give."""
    initializers = [numpy_helper.from_array(np.zeros((4, 3), np.float32), "w"),
                    numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["scores"], axis=-1)]
    graph = helper.make_graph(
        nodes, "constant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_agreement_on_constant_scores_is_refused_as_proving_nothing():
    x = np.random.default_rng(4).standard_normal((64, 4)).astype(np.float32)
    with pytest.raises(export.VerificationError, match="gives every validation example the same "
                                                       "scores, so top-1 agreement proves "
                                                       "nothing"):
        quantize_int8(_constant_classifier(), x, verbose=0)
    _, report = quantize_int8(_constant_classifier(), x, verbose=0, min_agreement=0)
    assert report.outputs[0].constant and report.agreement == 1.0


def test_float_files_run_in_openvino_against_keras(model, tmp_path, monkeypatch):
    result = export.to_onnx(model, tmp_path / "float.onnx", openvino=True)
    (check,) = result.runtimes
    assert check.runtime == "openvino" and check.checked and "within 0.001 of Keras" in check.note

    class Wrong(runtimes.OpenVINOSession):
        def run(self, names, feed):
            return [2.0 * value for value in super().run(names, feed)]

    monkeypatch.setattr(runtimes, "OpenVINOSession", Wrong)
    with pytest.raises(VerificationError, match="OpenVINO output '.*' differs from Keras"):
        export.to_onnx(model, tmp_path / "wrong.onnx", openvino=True)
    assert export.to_onnx(model, tmp_path / "skipped.onnx", openvino=False).runtimes == []
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    with pytest.raises(ValueError, match="OpenVINO was asked for but is not installed"):
        export.to_onnx(model, tmp_path / "missing.onnx", quantize="int8", openvino=True,
                       calibration_data=np.zeros((4, 8, 8, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "skipped.onnx"]


def test_openvino_is_not_judged_where_its_target_is_not_said_right():
    data = _conv_graph(127, np.int8(0)).SerializeToString()
    checks = runtimes.check(data, _feeds(), ["y"], targets.get("tensorrt"), cpu_has_vnni=False)
    assert [c.checked for c in checks] == [False, False]
    assert "lacks VNNI" in checks[1].note
    if cpu_has_vnni():  # the kernels of this CPU must be the ones the check says they are
        checks = runtimes.check(data, _feeds(), ["y"], targets.get("tensorrt"), cpu_has_vnni=True)
        assert all(c.checked for c in checks)
