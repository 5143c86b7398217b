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
def test_population_statistics_of_shares_of_global_batches_equal_one_process(results, layer):
    per_process, single, _ = results
    for result in per_process:
        assert int(result[f"batches/{layer}"]) == worker.EXAMPLES // worker.POPULATION_BATCH
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


def numpy_population(result, prefix, layer, batches):
    """Algorithm 2 over `batches` in float64 for `worker.dense_model` with the weights stored
    under `prefix`: every BN normalizes each batch with that batch's statistics."""
    def get(name):
        return result[f"{prefix}/dense_model/{name}"].astype("float64")

    unbiased = layer == "keras_bn"
    sums, examples = {}, 0
    for x in batches:
        m = len(x)
        first = x.astype("float64") @ get("dense_1/kernel") + get("dense_1/bias")
        normalized = (first - first.mean(0)) / np.sqrt(first.var(0) + 1e-3)
        hidden = np.maximum(normalized * get("bn_1/gamma") + get("bn_1/beta"), 0.0)
        second = hidden @ get("dense_2/kernel") + get("dense_2/bias")
        for bn, values in (("bn_1", first), ("bn_2", second)):
            variance = values.var(0) * (m / (m - 1) if unbiased else 1.0)
            for statistic, value in (("moving_mean", values.mean(0)),
                                     ("moving_variance", variance)):
                sums[f"{bn}/{statistic}"] = sums.get(f"{bn}/{statistic}", 0.0) + m * value
        examples += m
    return {name: total / examples for name, total in sums.items()}


@pytest.mark.parametrize("layer", list(worker.LAYERS))
def test_different_shards_give_every_process_the_global_batch_statistics(results, layer):
    per_process, _, _ = results
    shards = [worker.shard(i) for i in range(PROCESSES)]
    batches = worker.global_batches(shards, worker.SHARD_BATCH)
    assert [len(b) for b in batches] == [32] * 5 + [20, 4]  # unequal and missing slices
    within = [b for x in shards for b in worker.global_batches([x], worker.SHARD_BATCH)]
    for stage, weights in (("estimate", "initial"), ("callback", "callback")):
        # Each process holds the same weights: process 0's give the NumPy reference.
        want = numpy_population(per_process[0], f"shards/{layer}/{weights}", layer, batches)
        old = numpy_population(per_process[0], f"shards/{layer}/{weights}", layer, within)
        for result in per_process:
            for name, value in want.items():
                got = result[f"shards/{layer}/{stage}/dense_model/{name}"]
                np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-4,
                                           err_msg=f"{stage} {name}")
            # Within-process batches miss the spread between the shards (a channel whose Dense
            # weights move the shards' means apart has several times more variance).
            got = result[f"shards/{layer}/{stage}/dense_model/bn_1/moving_variance"]
            assert (got / old["bn_1/moving_variance"]).max() > 3
    for result in per_process:
        assert int(result[f"shards/{layer}/batches"]) == len(batches)


def test_the_issue_table_shards_centred_at_plus_and_minus_3(results):
    """Two shards of 256 examples at +3 and -3 (standard deviation 1), batches of 16 each: the
    estimate's variance is the variance of all the data (about 10), not the within-shard 1."""
    per_process, _, _ = results
    shards = [worker.shard(i, worker.TABLE_SHARDS) for i in range(PROCESSES)]
    everything = np.concatenate(shards).astype("float64")
    batches = worker.global_batches(shards, worker.SHARD_BATCH)
    m = len(batches[0])
    global_variance = np.mean([b.astype("float64").var(0) * m / (m - 1) for b in batches], 0)
    for result in per_process:
        np.testing.assert_allclose(result["table/table/bn/moving_mean"], everything.mean(0),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result["table/table/bn/moving_variance"], global_variance,
                                   rtol=1e-5)
        # Not the within-shard 1: the variance of all the data, to within m / (m - 1) = 32 / 31
        # and the spread of the batch means.
        np.testing.assert_allclose(result["table/table/bn/moving_variance"], everything.var(0),
                                   rtol=0.05)


def test_a_failed_estimate_in_one_process_fails_every_process_and_changes_nothing(results):
    per_process, _, _ = results
    # A NaN in process 1's half of global batch 1: both see the global batch's NaN statistics.
    for result in per_process:
        message = str(result["failure/nan/message"])
        assert "non-finite statistics in global batch 1 (counting from 0)" in message
        assert "process 1's batch holds 108 non-finite input value(s)" in message  # 6 x 6 x 3
    # A batch of the wrong shape in process 1: refused there before any collective step.
    assert "batch 0 (counting from 0) of process 1 does not fit input" in str(
        per_process[1]["failure/shape/message"])
    assert "failed in process(es) [1] of 2" in str(per_process[0]["failure/shape/message"])
    assert all(bool(result[f"failure/{failure}/unchanged"])
               for result in per_process for failure in ("nan", "shape"))


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
