"""`python -m benchmarks.quantize --quick`: a toy run writes the JSON and the table, with the CPU,
every graph, each deployment target's files in onnxruntime and OpenVINO, and each target's
measured value. TensorFlow only (tf2onnx)."""
import json
import os

import pytest

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    pytest.skip("the int8 benchmark exports ONNX through tf2onnx (TensorFlow backend)",
                allow_module_level=True)

from benchmarks import quantize  # after the skip: it imports TensorFlow
from export import runtimes, targets


def test_quick_run_writes_every_figure(tmp_path, capsys):
    quantize.main(["--quick", "--repeats", "2", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "quantize.json").read_text())

    cpu = results["machine"]["cpu"]
    assert {"model_name", "avx2", "avx512_vnni", "avx_vnni", "amx_int8", "cpu_has_vnni"} <= set(cpu)
    assert len(results["machine"]["load_average_start"]) == 3
    assert len(results["machine"]["load_average_end"]) == 3
    assert results["onnxruntime_session"] == {
        "intra_op_num_threads": 2, "session.intra_op.allow_spinning": "0",
        "providers": ["CPUExecutionProvider"]}

    toy = results["models"]["toy"]
    assert toy["cpu"] == cpu
    assert toy["anchor"]["error"] is None and toy["anchor"]["target"] == "cpu"
    assert results["anchor_quantize_static_options"]["reduce_range"] == "True"
    graphs = toy["graphs"]
    assert set(graphs) == {"ours_float", "ours_int8", "keras_float", "anchor_int8"}
    assert graphs["ours_float"]["quantize_linear"] == 0
    for int8 in ("ours_int8", "anchor_int8"):
        assert graphs[int8]["quantize_linear"] > 0 and graphs[int8]["dequantize_linear"] > 0
        assert graphs[int8]["quantized_ops"]["Conv"] == 3
    assert graphs["ours_int8"]["quantization"]["target"] == "cpu"
    assert graphs["ours_int8"]["quantization"]["weight_bound"] == 64
    for batch in ("batch_1", "batch_32"):
        figures = toy["latency"][batch]
        assert set(figures["median_ms"]) == set(graphs)
        assert all(len(runs) == figures["repeats"] for runs in figures["all_ms"].values())
        assert set(figures["ratios"]) >= {"ours_int8/ours_float", "ours_int8/anchor_int8"}

    digits = results["bn_inception_digits"]
    assert digits["validation"]["examples"] == 449
    assert set(digits["accuracy"]) == {"keras", "ours_float", "ours_int8", "keras_float",
                                       "anchor_int8"}
    assert digits["accuracy"]["ours_float"] == pytest.approx(digits["accuracy"]["keras"],
                                                             abs=1 / 449)
    assert 0 <= digits["int8_vs_float"]["ours_int8_vs_ours_float"]["top1_agreement"] <= 1

    assert "sweep" not in results
    openvino = runtimes.openvino_installed()
    assert set(results["per_target"]) == {"toy", "toy digits"}
    for name, entry in results["per_target"].items():
        assert entry["cpu"] == cpu and entry["openvino"]["installed"] == openvino
        assert set(entry["targets"]) == set(targets.TARGETS)
        for key, file in entry["targets"].items():
            assert file["cpu"] == cpu
            assert file["made"], file["refusals"]  # the toy files keep every target's rules
            assert file["weight_bound"] == targets.get(key).weight_bound
            assert file["activation_type"] == targets.get(key).activation_type
            checked = {check["runtime"]: check["checked"] for check in file["runtimes"]}
            assert checked["openvino"] == openvino
            # onnxruntime skips a file that is wrong in it on this CPU, and only that one
            assert checked["onnxruntime"] == (
                not targets.get(key).needs_vnni or cpu["cpu_has_vnni"] is not False)
            for batch in ("batch_1", "batch_32"):
                row = file["latency"][batch]
                assert row["cpu_has_vnni"] == cpu["cpu_has_vnni"]
                ms = row["median_ms"]
                assert ms["onnxruntime"]["int8"] > 0 and ms["onnxruntime"]["float"] > 0
                assert row["onnxruntime_int8_over_float"] == pytest.approx(
                    ms["onnxruntime"]["int8"] / ms["onnxruntime"]["float"], abs=1e-3)
                if openvino:
                    assert row["openvino_int8_over_onnxruntime_int8"] == pytest.approx(
                        ms["openvino"]["int8"] / ms["onnxruntime"]["int8"], abs=1e-3)
                    assert sum(file["openvino_execution"]["compute_layers"].values()) > 0
                else:
                    assert row["openvino_int8_over_onnxruntime_int8"] is None
            if name == "toy digits":
                assert 0 <= file["meaning_vs_float"]["int8_accuracy"] <= 1
                assert set(file["accuracy"]) == {"float", "onnxruntime"} | (
                    {"openvino"} if openvino else set())
        for timing in entry["timing"].values():  # float and every file, in both runtimes
            assert len(timing["median_ms"]) == (1 + len(targets.TARGETS)) * (1 + openvino)

    names = [target["target"] for target in results["targets"]]
    assert sum("'cpu' / 'cpu-vnni'" in name for name in names) == 2
    assert sum("OpenVINO int8 / onnxruntime int8" in name for name in names) == 2 * 3 * 2
    for target in results["targets"]:
        assert target["holds"] in (True, False, None)
        assert (target["measured"] is None) == (target["holds"] is None)
        if target["holds"] is None or (target["holds"] is False
                                       and "OpenVINO int8" in target["target"]):
            assert target["note"]  # why not measured, or why OpenVINO is slower, as measured
    table = (tmp_path / "quantize.md").read_text()
    assert "| toy | 32 |" in table and "| target | measured | threshold | holds |" in table
    assert "| toy | cpu-vnni | 32 |" in table and "| toy digits | tensorrt | +-127 |" in table
    output = capsys.readouterr().out
    assert "== targets" in output and "cpu_has_vnni" in output and "per target" in output
