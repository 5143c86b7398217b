"""Multi-process data parallelism on JAX: two local processes give the one-process result.

Two processes (`multiprocess_worker.py`) join JAX's multi-process runtime over a free local port
(CPU collectives over gloo) and train under `keras.distribution.DataParallel(auto_shard_dataset=
False)`, each feeding half of every global batch of 32. BN's statistics are then global-batch
statistics: the weights and moving statistics equal those of one process training on the global
batch, with keras_bn's layer as with Keras's. `estimate_population_statistics`, given 3 batches in
one process and 5 in the other, gives both the statistics of all 8, and so does
`keras_bn.PopulationStatistics` during `fit`; an estimate that fails in one process fails in both,
leaving the model as it was, instead of leaving the other process waiting. Process 0 alone saves
the model, outside the distribution.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import multiprocess_worker as worker
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
PROCESSES = 2
TIMEOUT_SECONDS = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(folder):
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    coordinator = f"127.0.0.1:{free_port()}"
    workers = []
    for process_id in range(PROCESSES):
        log = open(folder / f"process_{process_id}.log", "w")
        command = [sys.executable, str(WORKER), coordinator, str(PROCESSES), str(process_id),
                   str(folder / f"process_{process_id}.npz")]
        workers.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log))
    return workers


def wait_for(workers, folder):
    """Waits until every worker exits; a failed or late worker fails the test with its log."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while any(process.poll() is None for process, _ in workers):
        # A failed process leaves the others waiting for it in a collective: stop at once.
        failed = [process.returncode for process, _ in workers if process.returncode]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    logs = "\n".join(
        f"--- process {i}:\n{(folder / f'process_{i}.log').read_text()[-3000:]}"
        for i in range(PROCESSES)
    )
    codes = [process.poll() for process, _ in workers]
    assert codes == [0] * PROCESSES, f"exit codes {codes} (None: still running)\n{logs}"
    return [{**np.load(folder / f"process_{i}.npz"), "folder": folder} for i in range(PROCESSES)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(what each of the two processes ended with, the one-process run on the global batch, the
    one-process run on batches of 16)."""
    folder = tmp_path_factory.mktemp("multiprocess")
    workers = start_workers(folder)
    try:
        # The one-process references run meanwhile, in this process.
        single = {}
        half_batch = {}
        for layer in worker.LAYERS:
            single.update(worker.run(layer))
            half_batch.update(worker.run(layer, global_batch=16, train_only=True))
        per_process = wait_for(workers, folder)
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
            process.wait()
            log.close()
    return per_process, single, half_batch


def assert_close(got, want, names):
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def keys(results, prefix):
    return [name for name in results if name.startswith(prefix)]


def test_two_processes_share_one_global_runtime(results):
    per_process, _, _ = results
    for result in per_process:
        assert int(result["process_count"]) == 2 and int(result["device_count"]) == 2


@pytest.mark.parametrize("layer", list(worker.LAYERS))
def test_training_on_two_processes_equals_one_process_on_the_global_batch(results, layer):
    per_process, single, half_batch = results
    names = keys(single, f"trained/{layer}/")
    assert f"trained/{layer}/model/bn/moving_mean" in names
    for result in per_process:
        assert_close(result, single, names)
    # Each process's half of the batch alone gives other statistics (the halves differ).
    for statistic in ("moving_mean", "moving_variance"):
        name = f"trained/{layer}/model/bn/{statistic}"
        assert not np.allclose(half_batch[name], single[name], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("layer", list(worker.LAYERS))
def test_population_statistics_of_uneven_shards_are_those_of_the_whole_data(results, layer):
    per_process, single, _ = results
    for result in per_process:
        assert int(result[f"batches/{layer}"]) == sum(worker.POPULATION_SPLIT)
        assert_close(result, single, keys(single, f"population/{layer}/"))
    # Not what training left: the estimate replaced the moving averages.
    name = "model/bn/moving_variance"
    estimated, moving_average = (single[f"{stage}/{layer}/{name}"]
                                 for stage in ("population", "trained"))
    assert not np.allclose(estimated, moving_average, rtol=1e-2)


@pytest.mark.parametrize("layer", list(worker.LAYERS))
def test_population_statistics_callback_across_processes(results, layer):
    per_process, single, _ = results
    for result in per_process:
        assert_close(result, single, [f"val_loss/{layer}", *keys(single, f"callback/{layer}/")])


def test_a_failed_estimate_in_one_process_fails_every_process_and_changes_nothing(results):
    per_process, _, _ = results
    assert "non-finite statistics" in str(per_process[1]["failure/message"])
    assert "failed in process(es) [1] of 2" in str(per_process[0]["failure/message"])
    assert all(bool(result["failure/unchanged"]) for result in per_process)


@pytest.mark.parametrize("layer", list(worker.LAYERS))
def test_process_0_saves_the_model_alone(results, layer):
    import keras

    per_process, _, _ = results
    folder = per_process[0]["folder"]
    assert not (folder / f"process_1_{layer}.keras").exists()
    saved = keras.saving.load_model(folder / f"process_0_{layer}.keras").get_weights()
    trained = [per_process[1][name] for name in keys(per_process[1], f"callback/{layer}/")]
    assert len(saved) == len(trained)
    for got, want in zip(saved, trained):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
