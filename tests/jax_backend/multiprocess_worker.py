"""One process of the two-process data-parallel test (`test_multiprocess.py`), JAX backend.

    KERAS_BACKEND=jax python tests/jax_backend/multiprocess_worker.py COORDINATOR N PROCESS_ID OUT

joins JAX's multi-process runtime of N processes (CPU collectives over gloo), and under
`keras.distribution.DataParallel(auto_shard_dataset=False)` trains on its share of every global
batch, estimates population statistics from its own, uneven, shard of the training data, and
trains on with `keras_bn.PopulationStatistics`; process 0 saves the model. Then it estimates again
on a shard that holds a NaN in process 1. It writes what it ended with to the `.npz` file
OUT. The test runs the same `run` in one process on the whole data and compares.
"""

import sys

import keras
import numpy as np

import keras_bn

EXAMPLES = 64
GLOBAL_BATCH = 32
EPOCHS = 2
POPULATION_BATCH = 8
POPULATION_SPLIT = (3, 5)  # population batches of process 0 and process 1: uneven on purpose
LAYERS = {"keras_bn": keras_bn.BatchNormalization, "keras": keras.layers.BatchNormalization}


def training_data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (EXAMPLES, 6, 6, 3)).astype("float32")
    # The second half of every global batch (process 1's share) has statistics of its own.
    halves = x.reshape(EXAMPLES // GLOBAL_BATCH, 2, GLOBAL_BATCH // 2, *x.shape[1:])
    halves[:, 1] = 3.0 * halves[:, 1] - 1.0
    y = rng.normal(0.0, 1.0, (EXAMPLES, 1)).astype("float32")
    x_val = rng.normal(1.0, 2.0, (GLOBAL_BATCH, 6, 6, 3)).astype("float32")
    y_val = rng.normal(0.0, 1.0, (GLOBAL_BATCH, 1)).astype("float32")
    return x, y, x_val, y_val


def build_model(layer):
    # Seeded initializers rather than keras.utils.set_random_seed, which would import TensorFlow
    # (seconds) in each process.
    return keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, use_bias=False, name="conv",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=1)),
            LAYERS[layer](momentum=0.5, name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, name="dense",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=2)),
        ],
        name="model",
    )


def process_share(array, process_id, num_processes, global_batch=GLOBAL_BATCH):
    """This process's slice of every global batch, in order: what it feeds `fit`."""
    local = global_batch // num_processes
    batches = array.reshape(-1, num_processes, local, *array.shape[1:])
    return batches[:, process_id].reshape(-1, *array.shape[1:])


def population_shard(x, process_id, num_processes):
    """Process 0's first 3 batches of POPULATION_BATCH and process 1's next 5; all 8 in a single
    process."""
    if num_processes == 1:
        return x[: sum(POPULATION_SPLIT) * POPULATION_BATCH]
    start = sum(POPULATION_SPLIT[:process_id]) * POPULATION_BATCH
    return x[start : start + POPULATION_SPLIT[process_id] * POPULATION_BATCH]


def weights(model, prefix):
    return {f"{prefix}/{v.path}": keras.ops.convert_to_numpy(v) for v in model.weights}


def run(layer, process_id=0, num_processes=1, global_batch=GLOBAL_BATCH, train_only=False,
        save_to=None):
    """Trains, estimates and trains on with the callback; returns every result by name. Process
    0 then saves the model to `save_to`, if given."""
    x, y, x_val, y_val = training_data()

    def share(array):
        return process_share(array, process_id, num_processes, global_batch)

    model = build_model(layer)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    batch_size = global_batch // num_processes
    model.fit(share(x), share(y), batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)
    out = weights(model, f"trained/{layer}")
    if train_only:
        return out
    population = population_shard(x, process_id, num_processes)
    out[f"batches/{layer}"] = np.array(
        keras_bn.estimate_population_statistics(
            model, population, batch_size=POPULATION_BATCH, verbose=0
        )
    )
    out.update(weights(model, f"population/{layer}"))
    history = model.fit(
        share(x), share(y), batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
        validation_data=(share(x_val), share(y_val)),
        callbacks=[keras_bn.PopulationStatistics(population, batch_size=POPULATION_BATCH)],
    )
    out[f"val_loss/{layer}"] = np.array(history.history["val_loss"])
    out.update(weights(model, f"callback/{layer}"))
    if save_to and process_id == 0:
        save_outside_the_distribution(model, save_to)
    return out


def save_outside_the_distribution(model, path):
    """`model.save` from one process. Saving creates a variable (Keras's optimizer check), which
    under the multi-process distribution would wait for every process to create it too."""
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        model.save(path)
    finally:
        keras.distribution.set_distribution(distribution)


def failed_estimate(process_id):
    """The error `estimate_population_statistics` raises in this process when the last process's
    shard holds a NaN, and whether every weight is as it was."""
    model = build_model("keras_bn")
    x = training_data()[0][:16].copy()
    if process_id == 1:
        x[9] = np.nan
    before = [keras.ops.convert_to_numpy(v) for v in model.weights]
    try:
        keras_bn.estimate_population_statistics(model, x, batch_size=8, verbose=0)
        message = ""
    except ValueError as error:
        message = str(error)
    unchanged = all(
        np.array_equal(a, keras.ops.convert_to_numpy(v)) for a, v in zip(before, model.weights)
    )
    return {"failure/message": np.array(message), "failure/unchanged": np.array(unchanged)}


def main(coordinator, num_processes, process_id, output):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # keras.distribution.initialize(...) calls this too, and then agrees a random seed across
    # processes through keras.utils.set_random_seed, which imports TensorFlow (seconds); the
    # model's initializers are seeded instead.
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    out = {"process_count": np.array(jax.process_count()),
           "device_count": np.array(jax.device_count())}
    for layer in LAYERS:
        out.update(run(layer, process_id, num_processes,
                       save_to=output.replace(".npz", f"_{layer}.keras")))
    out.update(failed_estimate(process_id))
    np.savez(output, **out)


if __name__ == "__main__":
    coordinator, num_processes, process_id, output = sys.argv[1:]
    main(coordinator, int(num_processes), int(process_id), output)
