"""examples.launch and `train_inception` across processes.

The launcher: it stops every process when one fails, and passes on the failure's status.
JAX: `python -m examples.launch --num-processes 2 -- python -m examples.train_inception --quick`
trains two local processes (one CPU device each, gloo) to the result of one process on the same
global batches, and only process 0 writes it; `benchmarks.gpu throughput` on two processes reports
global images/s and only process 0 writes gpu.json. TensorFlow and torch: asking for several
processes is one clear error, in train_inception and in both parts of benchmarks.gpu.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from benchmarks import gpu as gpu_benchmark
from examples import launch, train_inception, training

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 900
DIGITS_TEST_EXAMPLES = 449  # scikit-learn digits' test split in examples.data


def test_launch_stops_every_process_when_one_fails(tmp_path):
    # Process 1 fails at once; process 0 would sleep for a minute.
    script = ("import os, sys, time\n"
              "if os.environ['KERAS_DISTRIBUTION_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    status = launch.main(["--num-processes", "2", "--log-dir", str(tmp_path), "--",
                          sys.executable, "-c", script])
    assert status == 3
    assert time.monotonic() - start < 30


def test_launch_sets_each_process_its_place(tmp_path):
    script = ("import os, sys\n"
              "names = ('KERAS_DISTRIBUTION_JOB_ADDRESSES', 'KERAS_DISTRIBUTION_NUM_PROCESSES',"
              " 'KERAS_DISTRIBUTION_PROCESS_ID', 'KERAS_BACKEND')\n"
              "out = os.path.join(sys.argv[1], os.environ[names[2]] + '.txt')\n"
              "open(out, 'w').write(' '.join(os.environ[n] for n in names))\n")
    assert launch.main(["--num-processes", "3", "--", sys.executable, "-c", script,
                        str(tmp_path)]) == 0
    seen = [(tmp_path / f"{i}.txt").read_text().split() for i in range(3)]
    assert len({address for address, *_ in seen}) == 1  # one coordinator for all
    assert seen[0][0].startswith("127.0.0.1:")
    assert [s[1:3] for s in seen] == [["3", str(i)] for i in range(3)]


def test_launch_refuses_a_missing_command(capsys):
    assert launch.main(["--num-processes", "2"]) == 2
    assert "Give the command" in capsys.readouterr().err


def test_processes_shares_make_the_global_batches():
    indices = np.arange(24).reshape(3, 8)  # 3 steps of global batch 8
    shares = [training.process_share(indices, i, 2) for i in range(2)]
    assert shares[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    together = np.stack([s.reshape(3, 4) for s in shares], axis=1).reshape(3, 8)
    np.testing.assert_array_equal(together, indices)
    with pytest.raises(ValueError, match="must divide by the number of processes"):
        training.process_share(np.arange(24).reshape(3, 8), 0, 3)


def test_population_shards_hold_the_one_process_batches():
    x = np.arange(100, dtype="float32")[:, None]
    config = training.Config(batch_size=8, population_batches=5)
    whole, steps, batch_size = training.population_shard(x, config)
    assert (steps, batch_size, len(whole)) == (5, 8, 40)
    shards = [training.population_shard(x, config, i, 2) for i in range(2)]
    assert [(steps, size) for _, steps, size in shards] == [(5, 4), (5, 4)]
    # the processes' k-th batches of 4 together are the one-process k-th batch of 8: the global
    # batch that estimate_population_statistics normalizes across processes
    together = np.concatenate([shard.reshape(5, 4, 1) for shard, _, _ in shards], axis=1)
    np.testing.assert_array_equal(together, whole.reshape(5, 8, 1))


def test_accuracy_from_process_shares_equals_the_accuracy_of_the_whole_set():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5)).astype("float32")
    y = rng.integers(0, 3, 37)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    want = training.evaluate_accuracy(model, x, y)
    # One process of one: the shares' weighted accuracy, with padding of weight 0.
    got = training.evaluate_accuracy_across_processes(model, x, y, 0, 1, batch_size=8)
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="JAX trains across processes")
def test_several_processes_off_jax_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs the JAX backend") as error:
        train_inception.main(["--num-processes", "2", "--process-id", "0", "--coordinator",
                              "127.0.0.1:1", "--quick", "--output-dir", str(tmp_path)])
    if keras.backend.backend() == "tensorflow":
        assert "keras-team/keras/issues/20585" in str(error.value)
        assert "--data-parallel" in str(error.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="JAX trains across processes")
@pytest.mark.parametrize("part", ["throughput", "figure3"])
def test_gpu_benchmark_on_several_processes_off_jax_is_one_clear_error(part, tmp_path):
    # figure3 hands the process options to train_inception, whose check refuses them.
    with pytest.raises(ValueError, match="needs the JAX backend") as error:
        gpu_benchmark.main([part, "--num-processes", "2", "--process-id", "0", "--coordinator",
                            "127.0.0.1:1", "--quick" if part == "figure3" else "--steps=1",
                            "--output-dir", str(tmp_path)])
    assert "\n" not in str(error.value)
    assert f"backend {keras.backend.backend()!r}" in str(error.value)
    assert not list(tmp_path.iterdir())


def _train_inception(tmp_path, processes, name):
    output = tmp_path / name
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    command = [sys.executable, "-m", "examples.launch", "--num-processes", str(processes),
               "--log-dir", str(output / "logs"), "--timeout", str(TIMEOUT_SECONDS), "--",
               sys.executable, "-m", "examples.train_inception", "--quick", "--steps", "2",
               "--eval-every", "1", "--variants", "Inception", "BN-Baseline",
               "--verbose", "0", "--output-dir", str(output)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True), output


# Three JAX processes compile BN-Inception at once: minutes on two cores, so it runs with
# `pytest -m slow`; tests/jax_backend/test_multiprocess.py checks the same training in CI.
@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="multi-process runs need JAX")
def test_train_inception_on_two_processes_equals_one_process(tmp_path):
    # Slow: JAX compiles the small BN-Inception's steps in each of three processes (the
    # two-process run and the one-process reference, started together): about 11 minutes on
    # two shared CPU cores, 2 to 3 on an idle 16-core machine.
    runs = [_train_inception(tmp_path, n, f"processes_{n}") for n in (2, 1)]
    results = []
    for process, output in runs:
        try:
            log, _ = process.communicate(timeout=TIMEOUT_SECONDS + 30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, log[-3000:]
        written = sorted(p.name for p in output.iterdir() if p.is_file())
        assert written == ["figure2_train_inception_digits.png",
                           "figure3_train_inception_digits.md", "train_inception_digits.json"]
        results.append(json.loads((output / "train_inception_digits.json").read_text()))
    two, one = results
    # The same global batches and seeds, and BN's statistics over the global batch: the same
    # training, up to the order of float32 sums (the all-reduce across processes). The training
    # losses agree to 1e-4; an accuracy counts test examples, and near the start of training a
    # logit near a tie may flip (measured: BN-Baseline 45 vs 44 of 449 at step 2), so accuracies
    # may differ by one test example.
    tolerance = 1.0 / DIGITS_TEST_EXAMPLES + 1e-6
    assert two["variants"].keys() == one["variants"].keys() == {"Inception", "BN-Baseline"}
    for name in two["variants"]:
        got, want = (result["variants"][name]["histories"]["0"] for result in (two, one))
        assert got["steps"] == want["steps"], name
        np.testing.assert_allclose(got["loss"][1:], want["loss"][1:], rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(got["accuracy"], want["accuracy"], atol=tolerance,
                                   err_msg=name)


# Two JAX processes compile BN-Inception's training step at once: about 2.5 minutes on two
# shared cores, so it runs with `pytest -m slow`.
@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="multi-process runs need JAX")
def test_gpu_throughput_on_two_processes_writes_global_images_per_second_once(tmp_path):
    output = tmp_path / "gpu"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    command = [sys.executable, "-m", "examples.launch", "--num-processes", "2",
               "--log-dir", str(tmp_path / "logs"), "--timeout", str(TIMEOUT_SECONDS), "--",
               sys.executable, "-m", "benchmarks.gpu", "throughput", "--output-dir", str(output),
               "--alpha", "0.125", "--image-size", "32", "--batch-size", "8", "--steps", "2",
               "--repeats", "1", "--policies", "float32", "--layers", "keras_bn"]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=TIMEOUT_SECONDS + 30)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    assert [p.name for p in output.iterdir()] == ["gpu.json"]  # process 1 wrote nothing
    assert completed.stdout.count("wrote ") == 1  # and printed nothing (its log is elsewhere)
    result = json.loads((output / "gpu.json").read_text())["throughput"]
    assert result["processes"] == 2 and result["backend"] == "jax"
    assert len(result["devices"]) == 2  # one CPU device in each process, all in the mesh
    assert result["batch_size_per_process"] == 4
    (row,) = result["rows"]
    assert row["batch_size"] == 8 and row["images_per_second"] > 0
    assert row["images_per_second"] == pytest.approx(8 * 2 / (row["ms_per_step"] * 2 / 1000))
