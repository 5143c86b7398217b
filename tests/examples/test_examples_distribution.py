"""Data parallelism on two CPU devices, in subprocesses (devices must be set before TF/JAX start).

TensorFlow: two logical CPU devices and `tf.distribute.MirroredStrategy` with synchronized BN.
JAX: `XLA_FLAGS=--xla_force_host_platform_device_count=2` and `keras.distribution.DataParallel`.
Each checks that a data-parallel training step of the BN network equals the single-device step on
the same global batch (so BN's statistics are global), then runs examples.figure1 --data-parallel.
Torch: no data-parallel engine; asking for one is a clear error.
"""
import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

from examples import devices

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run with the repository root as the working directory, where `python -c` finds `examples`.
SNIPPET = r"""
import json, os, sys
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from examples import devices, figure1, training, variants
from examples.data import load_dataset

data = load_dataset("digits", flatten=True)
data.x_train, data.y_train = data.x_train[:64], data.y_train[:64]
config = training.Config(family="mlp", learning_rate=0.5, batch_size=32, steps=2, eval_every=2,
                         statistics="moving", final_population=False)
single = variants.build_variant("BN-x5", config, data.input_shape, 10, seed=3)
training.train_and_track(single, data, config, verbose=0)
parallel_config = training.Config(**{**config.__dict__, "data_parallel": True})
with devices.data_parallel_scope(True):
    replicas = devices.replica_count()
    model = variants.build_variant("BN-x5", parallel_config, data.input_shape, 10, seed=3)
    synchronized = model.get_layer("hidden1_bn").synchronized
    training.train_and_track(model, data, parallel_config, verbose=0)
difference = max(
    float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
    for a, b in zip(single.weights, model.weights)
)
figure1.main(["--quick", "--steps", "4", "--data-parallel", "--verbose", "0",
              "--output-dir", sys.argv[1]])
saved = json.load(open(os.path.join(sys.argv[1], "figure1.json")))
print("RESULT " + json.dumps({"replicas": replicas, "synchronized": synchronized,
                              "difference": difference, "figure1_replicas": saved["replicas"],
                              "figure1_steps": saved["results"]["with BN"]["steps"][-1]}))
"""


def test_data_parallel_on_two_cpu_devices(tmp_path):
    # The engine of the backend under test: CI runs the suite under TensorFlow and under JAX, so
    # both MirroredStrategy and keras.distribution.DataParallel are exercised, each once.
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):  # torch: Keras offers no data-parallel engine here
        with pytest.raises(ValueError, match="supports tensorflow and jax"):
            with devices.data_parallel_scope(True):
                pass
        return
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": ""}
    if backend == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    completed = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2 and result["figure1_replicas"] == 2
    assert result["synchronized"] is (backend == "tensorflow")  # JAX: global statistics anyway
    assert result["figure1_steps"] == 4
    # Same weights as one device on the same global batches: BN used global batch statistics.
    assert result["difference"] < 1e-4
