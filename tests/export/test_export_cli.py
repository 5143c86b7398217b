"""The keras-bn-export command line: a summary on success, one line and no file on failure."""

import os
import subprocess
import sys

import keras
import pytest

from export import onnx_export
from export.__main__ import main

BIN = os.path.dirname(sys.executable)


def test_success_prints_summary(saved_model, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    assert main([str(saved_model), "-o", str(output), "--opset", "15"]) == 0
    out = capsys.readouterr().out
    assert output.exists()
    assert f"wrote {output}" in out and "opset 15" in out
    assert "BatchNormalization: 2 folded, 1 frozen to constants (Mul+Add)" in out
    assert "max error vs Keras: " in out and "nodes: " in out


def test_default_output_path_and_options(saved_model, capsys):
    assert main([str(saved_model), "--channels-first", "--float16-weights", "--no-fold",
                 "--input-names", "pixels", "--batch-sizes", "2,5"]) == 0
    onnx_path = saved_model.with_suffix(".onnx")
    assert onnx_path.exists()
    out = capsys.readouterr().out
    assert "0 folded, 3 frozen" in out and "(batch sizes 2, 5)" in out and "Cast" in out


def _assert_one_line_failure(capsys, status, expected_status, fragment):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == expected_status
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("keras-bn-export: error: ") and fragment in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_and_foreign_files(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    status = main([str(tmp_path / "absent.keras"), "-o", str(output)])
    _assert_one_line_failure(capsys, status, 2, "no such model file")
    (tmp_path / "text.keras").write_text("hello")
    status = main([str(tmp_path / "text.keras"), "-o", str(output)])
    _assert_one_line_failure(capsys, status, 2, "could not load")
    assert not output.exists()


def test_unsupported_model(tmp_path, capsys):
    inputs = keras.Input((None, 4))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "ragged.keras")
    status = main([str(tmp_path / "ragged.keras"), "-o", str(tmp_path / "out.onnx")])
    _assert_one_line_failure(capsys, status, 2, "every input dimension but the batch")
    assert not (tmp_path / "out.onnx").exists()


def test_unwritable_output(saved_model, tmp_path, capsys):
    status = main([str(saved_model), "-o", str(tmp_path / "no" / "such" / "out.onnx")])
    _assert_one_line_failure(capsys, status, 2, "does not exist")


def test_verification_failure(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnx_export, "_verify", _failing_verify)
    status = main([str(saved_model), "-o", str(tmp_path / "out.onnx")])
    _assert_one_line_failure(capsys, status, 1, "verification failed")
    assert not (tmp_path / "out.onnx").exists()


def _failing_verify(*args, **kwargs):
    raise onnx_export.VerificationError("onnxruntime output 'logits' differs from Keras by 0.5")


def test_bad_option(saved_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(saved_model), "--opset", "seventeen"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-bn-export: error: argument --opset")


def test_console_script_in_a_fresh_process(tmp_path):
    """The installed script picks TensorFlow even when the environment asks for JAX (else the
    error would be about the backend) and fails in exactly one line, TensorFlow's native start-up
    logging included."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    failed = subprocess.run([os.path.join(BIN, "keras-bn-export"), str(tmp_path / "absent.keras"),
                             "-o", str(tmp_path / "out.onnx")],
                            env=env, capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"keras-bn-export: error: no such model file: {tmp_path / 'absent.keras'}"]
    assert failed.stdout == "" and not (tmp_path / "out.onnx").exists()
