"""`python -m examples.qat --quick`: float, post-training and QAT int8 accuracies of one seed.
TensorFlow only (tf2onnx)."""
import json
import os

import pytest

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    pytest.skip("the QAT example exports ONNX through tf2onnx (TensorFlow backend)",
                allow_module_level=True)

from examples import qat  # after the skip: it imports TensorFlow


def test_quick_run_writes_every_accuracy(tmp_path, capsys):
    qat.main(["--quick", "--networks", "mobilenet", "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "qat.json").read_text())
    (row,) = result["rows"]
    for key in ("float", "ptq8", "qat8", "ptq4", "qat4", "float_ft"):
        assert 0.0 <= row[key] <= 1.0, key
    # the control: the float network fine-tuned as QAT is, compared with QAT on the same images
    assert row["comparisons"]["qat8_cpu vs float_ft"]["n"] == row["test_examples"]
    # What was trained is what was deployed: the QAT graphs match Keras within one step but for
    # the few values export's verification allows (QAT_MAX_BEYOND_ONE_STEP).
    for bits in (8, 4):
        assert row[f"qat{bits}_test_beyond_one_step"] <= 0.05
        assert row[f"qat{bits}_test_steps_max"] < 4.0
    assert row["qat_step_cost"] > 0
    summary = result["summary"]["mobilenet"]
    assert set(summary) >= {"qat8_drop_points", "qat8_never_below_ptq8", "qat4_minus_ptq4_points"}
    assert json.loads((tmp_path / "quantize.json").read_text())["qat"]["summary"] == \
        result["summary"]
    assert "| mobilenet | 0 |" in (tmp_path / "qat.md").read_text()
    assert "mobilenet seed 0: float" in capsys.readouterr().out



def test_comparisons_and_interval_tables_pair_each_file_with_its_reference():
    import numpy as np

    from examples import statistics

    rng = np.random.default_rng(0)
    keys = ["float", "ptq8_cpu", "ptq8_tensorrt", "qat8_cpu", "ptq4", "qat4", "float_ft"]
    correct = {key: rng.random(400) < 0.8 for key in keys}
    comparisons = qat.comparisons(correct, ["cpu", "tensorrt"], ["cpu"])
    assert set(comparisons) == {"ptq8_cpu vs float", "ptq8_tensorrt vs float", "qat8_cpu vs float",
                                "qat8_cpu vs ptq8_cpu", "ptq4 vs float", "qat4 vs float",
                                "qat4 vs ptq4", "float_ft vs float", "qat8_cpu vs float_ft",
                                "qat4 vs float_ft"}
    expected = statistics.paired_comparison(correct["ptq8_cpu"], correct["qat8_cpu"])
    assert comparisons["qat8_cpu vs ptq8_cpu"] == expected
    row = {"network": "mobilenet", "seed": 0, "test_examples": 400, "comparisons": comparisons,
           "intervals": {k: statistics.accuracy_interval(v) for k, v in correct.items()}}
    text = qat.interval_tables([row])
    assert "400 test images" in text
    line = next(x for x in text.splitlines() if x.startswith("| QAT int8, target cpu |"))
    assert statistics.format_comparison(expected) in line
    control = statistics.format_comparison(comparisons["qat8_cpu vs float_ft"])
    assert line.endswith(f"| {control} |")
    assert "| float fine-tuned as QAT (control) |" in text


def test_seeds_table_gives_each_comparison_over_the_seeds():
    import numpy as np

    from examples import statistics

    rng = np.random.default_rng(1)
    rows = []
    for seed in range(3):
        correct = {key: rng.random(500) < 0.8 for key in ("float", "ptq8_cpu", "qat8_cpu",
                                                          "ptq4", "qat4", "float_ft")}
        row = {key: float(np.mean(v)) for key, v in correct.items()}
        row.update(network="mobilenet", seed=seed, ptq8=row["ptq8_cpu"], qat8=row["qat8_cpu"],
                   qat_step_cost=4.0, comparisons=qat.comparisons(correct, ["cpu"], ["cpu"]))
        rows.append(row)
    summary = qat.summarize(rows, ["mobilenet"])
    across = summary["mobilenet"]["across_seeds"]["qat8_cpu vs float_ft"]
    assert across == statistics.across_seeds([r["comparisons"]["qat8_cpu vs float_ft"]
                                              for r in rows])
    assert summary["mobilenet"]["mean"]["float_ft"] == np.mean([r["float_ft"] for r in rows])
    text = qat.seeds_table(summary)
    line = next(x for x in text.splitlines()
                if x.startswith("| QAT int8, target cpu vs float fine-tuned as QAT (control) |"))
    assert line.endswith(f"| {statistics.format_across_seeds(across)} |") and "over 3 seeds" in line
    assert "| mobilenet | 2 |" in qat.table(rows, summary)
