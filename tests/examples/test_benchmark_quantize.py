"""`python -m benchmarks.quantize --quick`: a toy run writes the JSON and the table, with the CPU,
every graph, the sweep and each target's measured value. TensorFlow only (tf2onnx)."""
import json
import os

import pytest

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    pytest.skip("the int8 benchmark exports ONNX through tf2onnx (TensorFlow backend)",
                allow_module_level=True)

from benchmarks import quantize  # after the skip: it imports TensorFlow


def test_quick_run_writes_every_figure(tmp_path, capsys):
    quantize.main(["--quick", "--repeats", "2", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "quantize.json").read_text())

    cpu = results["machine"]["cpu"]
    assert {"model_name", "avx2", "avx512_vnni", "avx_vnni", "cpu_has_vnni"} <= set(cpu)
    assert len(results["machine"]["load_average_start"]) == 3
    assert len(results["machine"]["load_average_end"]) == 3
    assert results["onnxruntime_session"] == {
        "intra_op_num_threads": 2, "session.intra_op.allow_spinning": "0",
        "providers": ["CPUExecutionProvider"]}

    toy = results["models"]["toy"]
    assert toy["anchor"]["error"] is None
    graphs = toy["graphs"]
    assert set(graphs) == {"ours_float", "ours_int8", "keras_float", "anchor_int8"}
    assert graphs["ours_float"]["quantize_linear"] == 0
    for int8 in ("ours_int8", "anchor_int8"):
        assert graphs[int8]["quantize_linear"] > 0 and graphs[int8]["dequantize_linear"] > 0
        assert graphs[int8]["quantized_ops"]["Conv"] == 3
    assert graphs["ours_int8"]["quantization"]["reduce_range"] == results["reduce_range"]
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

    sweep = results["sweep"]
    assert len(sweep["configurations"]) == 4
    assert {(row["activation_type"], row["reduce_range"]) for row in sweep["configurations"]} == {
        ("uint8", True), ("uint8", False), ("int8", True), ("int8", False)}
    assert sweep["default_on_this_machine"] in {row["configuration"]
                                                for row in sweep["configurations"]}

    for target in results["targets"]:
        assert target["holds"] in (True, False, None)
        assert (target["measured"] is None) == (target["holds"] is None)
    table = (tmp_path / "quantize.md").read_text()
    assert "| toy | 32 |" in table and "| target | measured | threshold | holds |" in table
    output = capsys.readouterr().out
    assert "== targets" in output and "cpu_has_vnni" in output
