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
    for key in ("float", "ptq8", "qat8", "ptq4", "qat4"):
        assert 0.0 <= row[key] <= 1.0, key
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

