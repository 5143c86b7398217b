"""The experiment scripts in quick mode: they run, write JSON/PNG/markdown, and say what they did;
every script runs as a module from the repository root (`python -m examples.figure1`)."""
import json
import os
import pathlib
import runpy
import subprocess
import sys
import warnings

import keras
import pytest

from benchmarks import gpu as gpu_benchmark
from benchmarks import steps_to_accuracy as steps_benchmark
from examples import demo, figure1, launch, train_inception

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = [
    "examples.demo", "examples.figure1", "examples.train_inception",
    "benchmarks.export", "benchmarks.fold", "benchmarks.gpu", "benchmarks.layer_speed",
    "benchmarks.steps_to_accuracy", "benchmarks.training_speed",
]
if keras.backend.backend() == "tensorflow":  # they export through tf2onnx
    SCRIPTS += ["benchmarks.quantize", "examples.qat"]


def test_a_script_runs_with_python_dash_m_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run([sys.executable, "-m", "examples.figure1", "--help"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "usage:" in completed.stdout and "--output-dir" in completed.stdout


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_script_runs_as_a_module(module, monkeypatch, capsys):
    # What `python -m <module> --help` does, in this process (one subprocess per script would
    # start Keras nine times). Scripts set environment defaults (tests/conftest.py has set both
    # variables already); monkeypatch restores what they change.
    for name in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.setenv(name, os.environ[name])
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with warnings.catch_warnings():
        # runpy warns that the module was imported before (by this file): harmless here.
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_figure1_quick(tmp_path, capsys):
    figure1.main(["--quick", "--steps", "20", "--output-dir", str(tmp_path), "--verbose", "0"])
    payload = json.loads((tmp_path / "figure1.json").read_text())
    for label in ("without BN", "with BN"):
        history = payload["results"][label]
        assert history["steps"][-1] == 20 and len(history["probes"]) == len(history["steps"])
        p = history["probes"][-1]
        assert p["p15"] <= p["p50"] <= p["p85"]
    assert (tmp_path / "figure1.png").stat().st_size > 10_000
    assert "with BN" in (tmp_path / "figure1.md").read_text()
    assert "Wrote figure1.json" in capsys.readouterr().out


def test_train_inception_quick(tmp_path):
    argv = [
        "--quick", "--output-dir", str(tmp_path), "--verbose", "0", "--statistics", "moving",
        "--variants", "Inception", "BN-x5", "--steps", "4",
        "--checkpoint", str(tmp_path / "runs.json"),
    ]
    result = train_inception.main(argv)
    # Run again with the same checkpoint: every run is read back, nothing retrains or changes.
    def as_json(value):  # NaN (the loss before the first step) compares equal as text
        return json.dumps(value, sort_keys=True)

    assert as_json(train_inception.main(argv)) == as_json(result)
    assert set(result["variants"]) == {"Inception", "BN-x5"}
    assert result["learning_rate_grid"]["rates"] == [0.01]  # quick mode: one rate, no grid
    assert (tmp_path / "figure2_train_inception_digits.png").stat().st_size > 10_000
    table = (tmp_path / "figure3_train_inception_digits.md").read_text()
    assert "| BN-x5 |" in table and "| Inception |" in table


def test_population_batches_reach_the_protocol(tmp_path, capsys):
    result = train_inception.main([
        "--quick", "--output-dir", str(tmp_path), "--verbose", "0", "--variants", "Inception",
        "--steps", "2", "--population-batches", "3"])
    assert result["config"]["population_batches"] == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as exit_info:
            train_inception.main(["--quick", "--population-batches", bad])
        assert exit_info.value.code == 2
        assert f"expected a positive integer, received {bad!r}" in capsys.readouterr().err


@pytest.mark.parametrize("main, option", [
    (train_inception.main, "--steps"), (train_inception.main, "--eval-every"),
    (train_inception.main, "--batch-size"), (figure1.main, "--steps"),
    (demo.main, "--variant-steps"), (gpu_benchmark.main, "--repeats"),
    (steps_benchmark.main, "--population-batches"), (launch.main, "--num-processes"),
])
def test_counts_must_be_positive(main, option, capsys):
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main([option, bad])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.endswith(f"expected a positive integer, received {bad!r}")


def test_train_inception_throughput_quick(tmp_path):
    result = train_inception.main([
        "--throughput", "--quick", "--image-size", "32", "--batch-size", "4", "--verbose", "0",
        "--output-dir", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["images_per_second"] == pytest.approx(result["images_per_second"])
    assert saved["images_per_second"] > 0 and saved["replicas"] == 1
    assert saved["backend"] == keras.backend.backend() and saved["global_batch_size"] == 4


def test_steps_to_accuracy_benchmark_quick(tmp_path):
    payload = steps_benchmark.main(["--quick", "--output-dir", str(tmp_path), "--verbose", "0",
                                    "--seeds", "0", "--networks", "mlp", "--statistics", "moving"])
    saved = json.loads((tmp_path / "steps_to_accuracy.json").read_text())
    variants = saved["networks"]["mlp"]["variants"]
    assert set(variants) == {"Baseline", "BN-Baseline", "BN-x5", "BN-x30"}
    for entry in variants.values():
        assert {"steps_to_target", "ratio", "wall_clock_ratio", "best_accuracy"} <= set(entry)
        assert len(entry["steps_to_target"]["per_seed"]) == 1
    assert variants["Baseline"]["ratio"] == 1.0
    assert payload["backend"] == keras.backend.backend()
    assert (tmp_path / "figure2_mlp_digits.png").exists()


def test_gpu_benchmark_parts_merge_into_one_file(tmp_path):
    # Both parts at a toy size: each writes its own key of gpu.json and keeps the other's.
    gpu_benchmark.main(["throughput", "--output-dir", str(tmp_path), "--alpha", "0.125",
                        "--image-size", "32", "--batch-size", "4", "--steps", "1", "--repeats", "1",
                        "--policies", "float32", "--layers", "keras_bn"])
    payload = gpu_benchmark.main(["figure3", "--quick", "--output-dir", str(tmp_path),
                                  "--steps", "4", "--seeds", "0", "--verbose", "0",
                                  "--variants", "Inception",  # the baseline alone: a toy run
                                  "--checkpoint", str(tmp_path / "runs.json")])
    assert set(json.loads((tmp_path / "gpu.json").read_text())) == {"throughput", "figure3"}
    (row,) = payload["throughput"]["rows"]
    assert row["layer"] == "keras_bn" and row["images_per_second"] > 0
    assert payload["throughput"]["backend"] == keras.backend.backend()
    assert payload["throughput"]["processes"] == 1
    assert set(payload["figure3"]["variants"]) == {"Inception"}
    assert (tmp_path / "runs.json").exists()


def test_scripts_report_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_inception.cli.run_main(
            lambda: train_inception.main(["--data", str(tmp_path / "missing.npz"), "--quick"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: MNIST file not found")


def test_demo_quick(tmp_path, capsys):
    if keras.backend.backend() != "tensorflow":
        # The demo's ONNX export goes through tf2onnx: under another backend it says so.
        with pytest.raises(ValueError, match="KERAS_BACKEND=tensorflow"):
            demo.main(["--quick", "--output-dir", str(tmp_path)])
        return
    summary = demo.main(["--quick", "--output-dir", str(tmp_path), "--verbose", "0"])
    assert os.path.isfile(tmp_path / "bn_inception_digits.onnx")
    assert summary["fold"]["folded"] > 0 and summary["fold"]["left"] == 0
    assert summary["onnx"]["max_error_test_set"] < 1e-4
    assert summary["accuracy"]["onnxruntime"] == pytest.approx(
        summary["accuracy"]["population_statistics"], abs=1e-6)
    assert set(summary["latency_ms"]["1"]) == {"keras_unfolded", "keras_folded", "onnxruntime",
                                               "onnxruntime_int8"}
    assert os.path.isfile(tmp_path / "bn_inception_digits.int8.onnx")
    assert summary["int8"]["node_counts"]["QuantizeLinear"] > 0
    assert "BatchNormalization" not in summary["int8"]["node_counts"]
    assert 0.0 <= summary["accuracy"]["onnxruntime_int8"] <= 1.0
    # the guard compared the file's meaning with the float graph on the labelled test images
    assert summary["int8"]["guard_float_accuracy"] == pytest.approx(
        summary["accuracy"]["onnxruntime"], abs=1e-6)
    assert 0.0 <= summary["int8"]["guard_int8_accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "steps to" in out and "onnxruntime" in out


def test_demo_int8_guard_refuses_lost_accuracy_and_allows_near_tie_flips():
    from types import SimpleNamespace

    from keras_bn.verification import VerificationError

    def report(float_accuracy, int8_accuracy):
        return SimpleNamespace(outputs=[
            SimpleNamespace(name="features", float_accuracy=None, int8_accuracy=None),
            SimpleNamespace(name="probabilities", float_accuracy=float_accuracy,
                            int8_accuracy=int8_accuracy)])

    # Fashion-MNIST's demo network: 2.1% of decisions flip, accuracy 74.10% -> 74.04%
    assert demo.check_int8_accuracy(report(0.7410, 0.7404)) == pytest.approx(0.0006)
    assert demo.check_int8_accuracy(report(0.9800, 0.9822)) < 0  # int8 may gain
    with pytest.raises(VerificationError, match="loses 1.00% of test accuracy on output "
                                                "'probabilities'"):
        demo.check_int8_accuracy(report(0.7410, 0.7310))
    with pytest.raises(ValueError, match="labelled data"):
        demo.check_int8_accuracy(SimpleNamespace(outputs=[]))
